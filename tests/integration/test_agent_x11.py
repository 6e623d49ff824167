"""The whole agent on real X11 input: Xvfb, real windows, xdotool typing -- and what reaches the
spool (the only way anything leaves the laptop). Allowlisted apps are captured with their masking
rule, a non-allowlisted app never is, and a pause over the local socket takes effect at once."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from handtrace.agent.localsock import ControlServer, request
from handtrace.agent.runtime import Agent
from handtrace.agent.sources.x11 import X11Source
from handtrace.agent.spool import Spool
from handtrace.core import codec
from handtrace.core.policy import Policy
from handtrace.core.settings import AgentSettings
from tests.xvfb import WindowFactory, XvfbServer, xdotool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

POLICY = Policy.from_record({"version": 1, "allowed_apps": ["code", "slack"], "allowed_domains": [],
                             "sampling": {}, "text_capture": {"code": "full", "slack": "masked"}})
SETTLE_S = 0.8  # > 3 focus polls: the agent has announced the newly focused window


def typed_by_app(spool: Spool) -> dict[str, str]:
    rows: list[dict[str, Any]] = []
    for _seq, e in spool.pending(100_000, 1 << 30, roles=["events"]):
        rows.extend(codec.decode_event_batch(e.value).events.with_columns(
            pl.col("captured_at_us").dt.epoch("us")).to_dicts())
    out: dict[str, str] = {}
    for r in sorted(rows, key=lambda r: r["captured_at_us"]):
        if r["kind"] == "key_down" and r["text"] is not None:
            out[r["app_id"]] = out.get(r["app_id"], "") + r["text"]
        out.setdefault(r["app_id"], out.get(r["app_id"], ""))
    return out


def test_agent_on_real_x11_input(xvfb: XvfbServer, windows: WindowFactory, tmp_path: Path) -> None:
    code = windows(wm_class=("code", "Code"), title="plan.md - Code", geometry=(50, 50, 500, 300))
    chat = windows(wm_class=("telegram-desktop", "TelegramDesktop"), title="Mum", geometry=(600, 50, 500, 300),
                   focus=False)
    slack = windows(wm_class=("slack", "Slack"), title="#team - Slack", geometry=(50, 400, 500, 300), focus=False)
    spool = Spool(tmp_path / "spool", max_bytes=64 << 20, fsync=False)
    # Focus is moved programmatically here (no input): poll it as often when idle as when busy.
    cfg = AgentSettings(employee_id="emp-x11", device_id="dev-x11", screenshots=False, focus_poll_s=0.1,
                        focus_idle_poll_s=0.1,
                        batch_interval_s=3600)
    agent = Agent(cfg, X11Source(display=xvfb.display), spool, policy=POLICY, battery_fn=lambda: False)
    server = ControlServer(agent, tmp_path / "sock" / "agent.sock")
    before = set(threading.enumerate())
    agent.start()
    server.start()
    try:
        code.focus()
        time.sleep(SETTLE_S)
        xdotool(xvfb, "type", "--delay", "20", "secret plan")
        time.sleep(SETTLE_S)
        chat.focus()
        time.sleep(SETTLE_S)
        xdotool(xvfb, "type", "--delay", "20", "hi mum")
        time.sleep(SETTLE_S)
        slack.focus()
        time.sleep(SETTLE_S)
        xdotool(xvfb, "type", "--delay", "20", "ok 42")
        time.sleep(SETTLE_S)
        code.focus()
        time.sleep(SETTLE_S)
        t0 = time.perf_counter()
        reply = request(server.path, {"cmd": "pause", "minutes": 1})
        pause_latency = time.perf_counter() - t0
        assert reply["ok"], reply
        xdotool(xvfb, "type", "--delay", "20", "private")
        time.sleep(SETTLE_S)
        assert request(server.path, {"cmd": "resume"})["ok"]
        time.sleep(SETTLE_S)
        xdotool(xvfb, "type", "--delay", "20", "back")
        time.sleep(SETTLE_S)
    finally:
        server.stop()
        agent.stop()
    assert pause_latency < 0.1, f"pausing took {pause_latency * 1000:.0f} ms"
    typed = typed_by_app(spool)
    assert set(typed) <= {"code", "slack"}, f"a non-allowlisted app reached the spool: {set(typed)}"
    assert typed["code"] == "secret planback"
    assert typed["slack"] == "•••••"  # masked: the rhythm, not the characters
    dropped = agent.counters.events_dropped
    assert dropped["not_allowlisted_app"] >= 12 and dropped["paused"] >= 14, dropped
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not leftover, f"threads left running: {leftover}"
    spool.close()
