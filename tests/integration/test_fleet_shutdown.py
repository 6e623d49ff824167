"""The fleet exporter stops within 10 s of SIGTERM while its broker is unreachable (issue #10,
class 8: a Kubernetes-like grace period), with heartbeats consumed but not yet committed, and
exits cleanly (code 0)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from handtrace.agent.simulator import SimulatedFleet
from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import LocalBroker
from handtrace.core.settings import Settings
from tests.conftest import free_port
from tests.integration.conftest import FleetExporterProcess, start_outage_broker, wait_for

pytestmark = pytest.mark.timeout(300)

GRACE_S = 10.0


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
        t0 = time.monotonic()
        exporter.proc.terminate()
        deadline = t0 + GRACE_S
        while time.monotonic() < deadline and exporter.proc.poll() is None:
            time.sleep(0.05)
        took = time.monotonic() - t0
        print(f"fleet exporter stopped {took:.1f} s after SIGTERM")
        assert exporter.proc.poll() is not None, (
            f"the fleet exporter still ran {GRACE_S:.0f} s after SIGTERM with the broker gone:\n{exporter.tail()}")
        assert exporter.proc.returncode == 0, f"exit code {exporter.proc.returncode} after {took:.1f} s:\n" \
                                              f"{exporter.tail()}"
    finally:
        exporter.kill()
