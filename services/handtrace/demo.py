"""`handtrace demo`: the whole pipeline on one machine, on embedded defaults.

Starts the local Kafka broker (unless a cluster is configured), creates the topics, runs a Faust
stream worker (subprocess), the ClickHouse sink (this process owns the embedded engine), the fleet
exporter (subprocess, with its own embedded dir) and a simulated fleet; shows progress; waits for
the pipeline to drain; prints what landed.
Ctrl-C stops everything cleanly (the broker too, if the demo started it).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from handtrace.agent.simulator import FleetStats, SimulatedFleet
from handtrace.control.publish import policy_record, publish
from handtrace.core import clickhouse
from handtrace.core.admin import ensure_topics, group_lag
from handtrace.core.localbroker import LocalBroker
from handtrace.core.procs import spawn_owned, stop_child
from handtrace.core.resources import data_file
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.sink.service import open_sink, serve_queries
from handtrace.sink.writer import Sink


@dataclass
class DemoResult:
    """What the demo measured."""

    events_produced: int
    events_stored: int
    rows_by_kind: dict[str, int]
    payload_bytes_per_event: float
    wire_bytes_per_event: float
    produce_seconds: float
    total_seconds: float
    deadlettered: int
    decisions: dict[str, int]
    policy_path: Path


def local_broker(settings: Settings, *, owned: bool = False) -> LocalBroker:
    """The project's own broker for these settings; ``owned``: it dies with this process (the
    demo), else it runs detached until `handtrace kafka down` (`handtrace kafka up`)."""
    return LocalBroker(settings.state_dir.resolve() / "kafka", settings.kafka.local_port,
                       settings.kafka.local_controller_port, owned=owned)


def _progress_table(fleet: FleetStats, sink: Sink, phase: str) -> Table:
    t = Table(title=f"handtrace demo — {phase}", show_header=True, header_style="bold")
    for col in ("agents", "events produced", "events/s", "delivered msgs", "stored rows", "wire KiB"):
        t.add_column(col, justify="right")
    rate = fleet.events / fleet.elapsed if fleet.elapsed > 0 else 0.0
    t.add_row(str(fleet.agents), f"{fleet.events:,}", f"{rate:,.0f}", f"{fleet.delivered:,}",
              f"{sink.rows_inserted:,}", f"{fleet.wire_bytes / 1024:,.0f}")
    return t


DEFAULT_POLICY = data_file("deploy", "policy.example.json")
"""The example policy: shipped in the wheel (handtrace/_deploy), or the checkout's deploy/."""


def stream_decisions(settings: Settings) -> dict[str, int]:
    """Events by decision, scraped from the stream worker's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{settings.stream.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310 -- our own local worker
    out: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name == "handtrace_stream_events":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    out[sample.labels["decision"]] = int(sample.value)
    return out


def run_demo(settings: Settings, *, agents: int, duration_s: float, speedup: float,
             batch_interval_s: float, console: Console, drain_timeout_s: float = 120.0,
             policy_path: Path = DEFAULT_POLICY) -> DemoResult:
    """Run the demo; always cleans up what it started."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    topics = Topics.from_settings(settings.topics)
    broker = local_broker(settings, owned=True) if settings.kafka.uses_local_broker else None
    started_broker = False
    stream_proc: subprocess.Popen[bytes] | None = None
    fleet_proc: subprocess.Popen[bytes] | None = None
    stop_sink = threading.Event()
    sink_thread: threading.Thread | None = None
    server: Any = None
    dsn = settings.clickhouse_dsn()
    run_started = datetime.now(UTC)
    try:
        if broker is not None:
            with console.status(f"starting Kafka at {broker.bootstrap} (first run downloads it) ..."):
                started_broker = broker.start(echo=False)
            state = "started" if started_broker else "already running"
            console.print(f"[green]✓[/] Kafka {state} at {broker.bootstrap}")
        else:
            console.print(f"[green]✓[/] using Kafka at {settings.kafka.bootstrap()}")
        created = ensure_topics(settings.kafka, settings.topics, retention=settings.warehouse.retention)
        console.print(f"[green]✓[/] topics ready ({len(created)} created)")
        publish(settings, policy_record(policy_path, actor="demo", reason="demo policy"))
        console.print(f"[green]✓[/] policy published ({policy_path})")
        sink = open_sink(settings)
        server = serve_queries(settings, stop_sink)
        console.print(f"[green]✓[/] ClickHouse ready at {dsn}"
                      + (" (handtrace query works meanwhile)" if server is not None else ""))
        log_path = settings.state_dir / "stream-worker.log"
        with open(log_path, "ab") as log:
            # Owned children: killed by the kernel if the demo itself dies by SIGKILL (issue #10).
            stream_proc = spawn_owned(
                [sys.executable, "-m", "handtrace.stream"], stdout=log, stderr=subprocess.STDOUT,
                # the demo relies on a generated pseudonym key unless one is configured
                stdin=subprocess.DEVNULL, start_new_session=True, env={"HANDTRACE_DEV_MODE": "true", **os.environ},
            )
        console.print(f"[green]✓[/] stream worker started (pid {stream_proc.pid}, log {log_path})")
        if settings.fleet.metrics_port:
            # The fleet exporter opens its own embedded dir (the sink owns the default one):
            # docs/adr/0006-fleet-heartbeat-store.md.
            fleet_log = settings.state_dir / "fleet-exporter.log"
            with open(fleet_log, "ab") as log:
                fleet_proc = spawn_owned(
                    [sys.executable, "-m", "handtrace.fleet"], stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True, env=dict(os.environ),
                )
            console.print(f"[green]✓[/] fleet exporter started (metrics on :{settings.fleet.metrics_port}, "
                          f"log {fleet_log})")
        sink_thread = threading.Thread(target=sink.run, args=(stop_sink,), name="sink", daemon=True)
        sink_thread.start()
        fleet = SimulatedFleet(settings, agents, speedup=speedup, batch_interval_s=batch_interval_s)
        fleet_stop = threading.Event()
        fleet_thread = threading.Thread(target=fleet.run, args=(duration_s, fleet_stop), name="fleet", daemon=True)
        fleet_thread.start()
        t_fleet = time.monotonic()
        with Live(_progress_table(fleet.stats, sink, "producing"), console=console,
                  refresh_per_second=4, transient=False) as live:
            while fleet_thread.is_alive():
                fleet_thread.join(0.25)
                live.update(_progress_table(fleet.stats, sink, "producing"))
                if stream_proc.poll() is not None:
                    raise RuntimeError(f"the stream worker exited ({stream_proc.returncode}); see {log_path}")
            deadline = time.monotonic() + drain_timeout_s
            while time.monotonic() < deadline:
                live.update(_progress_table(fleet.stats, sink, "draining"))
                stream_lag = group_lag(settings.kafka, settings.stream.app_id, topics.events)
                sink_lag = group_lag(settings.kafka, settings.sink.group_id, topics.stored)
                if stream_lag == 0 and sink_lag == 0 and sink.rows_inserted >= 0:
                    break
                time.sleep(0.5)
            live.update(_progress_table(fleet.stats, sink, "done"))
        t_drained = time.monotonic()
        stats = fleet.stats
        decisions = stream_decisions(settings)
        stop_sink.set()
        sink_thread.join(60)
        client = clickhouse.connect(dsn)
        db = settings.clickhouse.database
        since = {"since": run_started.replace(tzinfo=None)}
        by_kind = dict(client.query(
            f"SELECT kind, count() FROM {db}.events WHERE stored_at >= %(since)s GROUP BY kind ORDER BY kind",
            parameters=since).result_rows)
        stored = sum(by_kind.values())
        dead = group_end(settings, topics.deadletter)
        n = max(stats.events, 1)
        return DemoResult(stats.events, stored, by_kind, stats.payload_bytes / n, stats.wire_bytes / n,
                          stats.elapsed, t_drained - t_fleet, dead, decisions, policy_path)
    finally:
        stop_sink.set()
        if sink_thread is not None:
            sink_thread.join(60)
        for child in (stream_proc, fleet_proc):
            if child is not None:
                stop_child(child, 30)
        if server is not None:
            server.stop()
        clickhouse.close(dsn)
        if broker is not None and started_broker:
            broker.stop()


def group_end(settings: Settings, topic: str) -> int:
    """Messages currently in ``topic`` (sum of end minus start offsets)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**settings.kafka.librdkafka(), "group.id": "handtrace-demo-probe", "log_level": 3})
    try:
        md = c.list_topics(topic, timeout=5).topics[topic]
        total = 0
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=5, cached=False)
            total += hi - lo
        return total
    finally:
        c.close()
