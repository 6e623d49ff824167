"""Services stop within 10 s of SIGTERM while their broker is unreachable (issue #10, class 8: a
Kubernetes-like grace period) and exit cleanly (code 0): the fleet exporter with heartbeats
consumed but not yet committed, the agent with captured events not yet shipped. (The stream
worker and the sink have tests of their own.)"""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from handtrace.agent.simulator import SimulatedFleet
from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import LocalBroker
from handtrace.core.settings import KafkaSettings, Settings, TopicSettings
from tests.conftest import free_port
from tests.integration.conftest import FleetExporterProcess, start_outage_broker, wait_for
from tests.integration.test_agent_outage import AgentProc

pytestmark = pytest.mark.timeout(300)

GRACE_S = 10.0


def stopped_within_grace(proc: subprocess.Popen[bytes], what: str, tail: Callable[[], str]) -> float:
    """SIGTERM ``proc``; fail unless it exits with 0 within GRACE_S; return how long it took."""
    t0 = time.monotonic()
    proc.terminate()
    while time.monotonic() < t0 + GRACE_S and proc.poll() is None:
        time.sleep(0.05)
    took = time.monotonic() - t0
    print(f"{what} stopped {took:.1f} s after SIGTERM")
    assert proc.poll() is not None, f"{what} still ran {GRACE_S:.0f} s after SIGTERM with the broker gone:\n{tail()}"
    assert proc.returncode == 0, f"{what}: exit code {proc.returncode} after {took:.1f} s:\n{tail()}"
    return took


def heartbeats_seen(port: int) -> float:
    """handtrace_fleet_heartbeats_total summed over outcomes, from the exporter's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()  # noqa: S310
    except (urllib.error.URLError, ConnectionError):
        return -1.0
    return sum(s.value for f in text_string_to_metric_families(text) if f.name == "handtrace_fleet_heartbeats"
               for s in f.samples if s.name.endswith("_total"))


def test_fleet_exporter_stops_within_grace_with_the_broker_gone(outage_broker: LocalBroker,
                                                                tmp_path: Path) -> None:
    start_outage_broker(outage_broker)
    tag = uuid.uuid4().hex[:10]
    port = free_port()
    # A long flush interval: what was consumed is still uncommitted when SIGTERM arrives, so the
    # exporter's last commit meets the unreachable broker.
    s = Settings(state_dir=tmp_path / "state", dev_mode=True,
                 kafka={"bootstrap_servers": outage_broker.bootstrap},
                 topics={"prefix": f"t{tag}", "partitions": 2},
                 fleet={"group_id": f"fleet-{tag}", "metrics_port": port, "flush_interval_s": 60,
                        "lag_interval_s": 1})
    ensure_topics(s.kafka, s.topics)
    exporter = FleetExporterProcess(s, tmp_path / "fleet.log")
    exporter.start()
    try:
        wait_for(lambda: heartbeats_seen(port) >= 0, 90, "the exporter's /metrics", exporter.tail)
        fleet = SimulatedFleet(s, agents=5, speedup=10, batch_interval_s=2.0, heartbeat_interval_s=5.0)
        runner = threading.Thread(target=fleet.run, args=(4.0,), daemon=True)
        runner.start()
        runner.join(60)
        assert not runner.is_alive()
        wait_for(lambda: heartbeats_seen(port) > 0, 60, "heartbeats consumed by the exporter", exporter.tail)

        outage_broker.stop()
        time.sleep(3)  # the exporter's clients notice the broker is gone
        assert exporter.proc is not None and exporter.proc.poll() is None, exporter.tail()
        stopped_within_grace(exporter.proc, "the fleet exporter", exporter.tail)
    finally:
        exporter.kill()


def test_agent_stops_within_grace_with_the_broker_gone(outage_broker: LocalBroker, tmp_path: Path) -> None:
    start_outage_broker(outage_broker)
    prefix = f"sd-{uuid.uuid4().hex[:6]}"
    ensure_topics(KafkaSettings(bootstrap_servers=outage_broker.bootstrap), TopicSettings(prefix=prefix, partitions=2))
    state = tmp_path / "agent"
    state.mkdir()
    agent = AgentProc(state, outage_broker.bootstrap, prefix, "emp-shutdown")
    agent.env["HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE"] = "true"  # its consumer meets the outage too
    agent.env["HANDTRACE_DEV_MODE"] = "true"  # the follower verifies the control plane's (dev) key
    agent.start()
    try:
        wait_for(lambda: agent.status().get("events_sent", 0) > 0, 60, "the agent to ship events", agent.log)
        outage_broker.stop()
        # Captured while the broker is gone: the shipper is retrying when SIGTERM arrives.
        time.sleep(5)
        assert agent.proc is not None and agent.proc.poll() is None, agent.log()
        stopped_within_grace(agent.proc, "the agent", agent.log)
    finally:
        agent.stop()
