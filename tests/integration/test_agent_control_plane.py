"""The agent follows the control plane through the real broker: a policy published by ops applies
at the source at the agent's next wakeup, and an exemption granted by HR stops capture -- nothing
captured after it reaches the broker."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from handtrace.agent.capture import Emit, WindowInfo
from handtrace.agent.service import build_agent
from handtrace.control.publish import control_record, publish
from handtrace.core import codec
from handtrace.core.clock import now_us
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from tests.integration.conftest import topic_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


class Manual:
    name = "synthetic"

    def __init__(self) -> None:
        self.window: WindowInfo | None = WindowInfo("code", "main.py", window_id=1)
        self.running = False

    def start(self, emit: Emit) -> None:
        self.running = True

    def stop(self) -> None:
        self.running = False

    def focused_window(self) -> WindowInfo | None:
        return self.window


def policy_rec(version: int, apps: list[str]) -> dict[str, Any]:
    return control_record("policy_update", employee_id=None, actor="ops-1", role="ops", policy={
        "version": version, "allowed_apps": apps, "allowed_domains": [], "sampling": {},
        "text_capture": {"*": "full"}})


def typed(agent: Any, text: str) -> None:
    t = now_us()
    for i, ch in enumerate(text):
        agent.on_event({"kind": "key_down", "captured_at_us": t + i, "key_code": ord(ch), "modifiers": 0,
                        "text": ch})


def test_policy_and_exemption_from_the_control_plane(settings_factory: Callable[..., Settings],
                                                     tmp_path: Path) -> None:
    s = settings_factory(agent={"employee_id": "emp-cp", "device_id": "dev-cp", "screenshots": False,
                                "source": "synthetic"})
    topics = Topics.from_settings(s.topics)
    src = Manual()
    agent = build_agent(s, source=src)
    try:
        assert agent.local.version == 0  # no policy yet: capture nothing (fails closed)
        agent.tick()
        typed(agent, "before any policy")
        agent.wakeup()
        assert agent.counters.events_dropped["no_policy"] > 0

        publish(s, policy_rec(7, ["code"]))
        agent.wakeup()
        assert agent.local.version == 7
        agent.tick()
        typed(agent, "allowed")
        agent.wakeup()

        publish(s, control_record("exemption_grant", employee_id="emp-cp", actor="hr-1", role="hr",
                                  reason="works council", exemption_effective_at_us=now_us()))
        publish(s, control_record("exemption_grant", employee_id="someone-else", actor="hr-1", role="hr",
                                  exemption_effective_at_us=now_us()))
        time.sleep(0.01)
        typed(agent, "after grant")  # still delivered by the OS; the agent must not keep it
        agent.wakeup()
        assert agent.mode == "exempt" and agent.status().mode == "exempt"
        typed(agent, "exempt")
        agent.tick()
        agent.wakeup()
    finally:
        agent.stop()
        agent.follower.close()
        agent.shipper.close()
        agent.spool.close()

    text = ""
    for v in topic_records(s.kafka.bootstrap(), topics.events):
        frame = codec.decode_event_batch(v).events
        text += "".join(t for t in frame.get_column("text").to_list() if t)
    assert text == "allowed"
    assert agent.counters.events_dropped["exempt"] >= len("after grant") + len("exempt")
