"""A real Prometheus scrapes the real services after a simulated fleet run, and every query of
every dashboard and rule returns data.

Through the real broker: a Faust stream worker, the sink and the fleet exporter run as
processes (each with its /metrics); a simulated fleet produces batches and heartbeats (twice,
so agent restarts show), a pause, an exemption and one malformed message are added so the
privacy and dead-letter panels have something to show. Prometheus (the Debian package's binary,
started here on a free port with a temporary config and TSDB, 1 s scrape and rule interval,
loading deploy/prometheus/rules) scrapes them. Then:

- every PromQL target of every dashboard returns at least one finite sample (template variables
  as "All", Grafana's interval variables as fixed windows);
- every recording rule returns data and every operand of every alert expression returns data
  (an alert's full expression is empty while it is not firing); all rules evaluate without error;
- every ClickHouse panel query runs against the engine the services wrote and returns rows.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from dashboards.promql import RULES_DIR, dashboard_queries, operands, rules

from handtrace.agent.simulator import SimulatedFleet
from handtrace.control.publish import publish
from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.controls import control_record, pause_record
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings
from handtrace.fleet.grafana import load_dashboards
from handtrace.fleet.store import fleet_dsn
from tests.conftest import free_port
from tests.integration.conftest import StreamWorker, topics_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

ROOT = Path(__file__).resolve().parents[2]
POLICY = {**json.loads((ROOT / "deploy" / "policy.example.json").read_text()),
          "sampling": {"*": 1.0, "kind:pointer_move": 0.5}}
# Grafana's variables, as the panels would be rendered with "All" selected over a short run.
PROM_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "5s", "$os": ".*",
             "$agent_version": ".*", "$cohort": ".*"}
WINDOW = "sent_at >= now64(6) - INTERVAL 1 DAY AND sent_at <= now64(6) + INTERVAL 1 HOUR"


def ch_macros(sql: str) -> str:
    """Expand grafana-clickhouse-datasource macros the way the plugin does, for the last day."""
    import re

    sql = re.sub(r"\$__timeFilter\((\w+)\)",
                 lambda m: f"{m.group(1)} >= now64(6) - INTERVAL 1 DAY AND {m.group(1)} <= now64(6) + INTERVAL 1 HOUR",
                 sql)
    return re.sub(r"\$__timeInterval\((\w+)\)", lambda m: f"toStartOfInterval({m.group(1)}, INTERVAL 60 second)", sql)


class SinkProcess(StreamWorker):
    """The sink as its own process (`python -m handtrace.sink`), serving /metrics."""

    module = "handtrace.sink"


class Prometheus:
    """A real Prometheus server on a free port with a temporary config and TSDB."""

    def __init__(self, workdir: Path, targets: dict[str, int]) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the `prometheus` binary is not installed (Debian package `prometheus`; "
                        "deploy/setup.sh installs it)")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "prometheus.yml"
        jobs = "".join(f"  - job_name: handtrace-{job}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
                       for job, port in targets.items())
        config.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                          f"rule_files:\n  - {RULES_DIR}/*.yml\nscrape_configs:\n{jobs}")
        self.log = workdir / "prometheus.log"
        with open(self.log, "ab") as out:
            self.proc = spawn_owned(
                [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}" if params else f"{self.url}{path}"
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 -- our own local server
            body = r.read()
        return json.loads(body) if body.startswith(b"{") else body

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited ({self.proc.returncode}):\n{self.tail()}")
        try:
            self.get("/-/ready")
            return True
        except (urllib.error.URLError, ConnectionError):
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = self.get("/api/v1/query", query=expr)
        assert r["status"] == "success", (expr, r)
        data = r["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]  # type: ignore[no-any-return]

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], Prometheus]]:
    servers: list[Prometheus] = []

    def start(targets: dict[str, int]) -> Prometheus:
        p = Prometheus(tmp_path, targets)
        servers.append(p)
        return p

    yield start
    for p in servers:
        p.stop()


def metrics_up(port: int) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()  # noqa: S310
        return True
    except (urllib.error.URLError, ConnectionError):
        return False


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in result)


def test_every_dashboard_and_rule_query_returns_data(
    settings_factory: Callable[..., Settings], stream_worker: Callable[..., StreamWorker],
    fleet_exporter: Callable[[Settings], StreamWorker], prometheus: Callable[[dict[str, int]], Prometheus],
    tmp_path: Path,
) -> None:
    ports = {"stream": free_port(), "sink": free_port(), "fleet": free_port()}
    s = settings_factory(
        stream={"metrics_port": ports["stream"], "log_level": "warn"},
        sink={"metrics_port": ports["sink"]},
        fleet={"metrics_port": ports["fleet"], "group_id": f"fleet-{uuid.uuid4().hex[:8]}",
               "lag_interval_s": 1.0, "flush_interval_s": 0.5},
    )
    t = topics_of(s)
    worker = stream_worker(s, POLICY)
    sink = SinkProcess(s, tmp_path / "sink.log")
    sink.start()
    exporter = fleet_exporter(s)
    prom = prometheus(ports)
    try:
        for name, port in ports.items():
            wait_for(lambda port=port: metrics_up(port), 90, f"{name} /metrics",
                     lambda: f"worker:\n{worker.tail()}\nsink:\n{sink.tail()}\nfleet:\n{exporter.tail()}")
        wait_for(prom.ready, 30, "prometheus ready", prom.tail)
        # Privacy controls for two simulated employees, covering the whole (simulated) run.
        now = int(time.time() * 1e6)
        publish(s, pause_record("emp-00001", 20, actor="emp-00001", at_us=now - 600_000_000))
        publish(s, control_record("exemption_grant", employee_id="emp-00002", actor="hr-1", role="hr",
                                  exemption_effective_at_us=now - 3_600_000_000))
        # Two fleet runs: the second one is a restart of every agent (new agent_started_at).
        for duration in (14.0, 8.0):
            fleet = SimulatedFleet(s, agents=30, speedup=10, batch_interval_s=2.0, heartbeat_interval_s=20.0)
            runner = threading.Thread(target=fleet.run, args=(duration,), daemon=True)
            runner.start()
            if duration == 14.0:
                time.sleep(4)
                p = Producer(s.kafka.librdkafka())
                p.produce(t.events, key=b"emp-00003", value=b"\x00not an event batch")
                p.flush(10)
                del p
            runner.join(120)
            assert not runner.is_alive() and fleet.stats.failed == 0
        wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
                 and group_lag(s.kafka, s.sink.group_id, t.stored) == 0
                 and group_lag(s.kafka, s.fleet.group_id, t.heartbeats) == 0, 90, "the pipeline to drain",
                 lambda: f"worker:\n{worker.tail()}\nsink:\n{sink.tail()}\nfleet:\n{exporter.tail()}")
        time.sleep(4)  # a few more scrapes and rule evaluations after the last heartbeat

        # --- every rule evaluates without error; every recording rule and alert operand has data
        groups = prom.get("/api/v1/rules")["data"]["groups"]
        loaded = [r for g in groups for r in g["rules"]]
        assert len(loaded) == len(rules())
        bad = [(r["name"], r.get("lastError")) for r in loaded if r["health"] != "ok"]
        assert not bad, bad
        empty = []
        for r in rules():
            exprs = [r["expr"]] if "record" in r else operands(r["expr"])
            empty += [(r.get("alert") or r["record"], e) for e in exprs if not finite(prom.query(e))]
        assert not empty, f"rule expressions without data: {empty}"

        # --- every PromQL panel target has data
        dashboards = load_dashboards()
        empty = []
        for uid, title, ds, target in dashboard_queries(dashboards):
            if ds != "prometheus":
                continue
            expr = target["expr"]
            for var, value in PROM_VARS.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"unsubstituted variable in {uid}/{title}: {expr}"
            if not finite(prom.query(expr)):
                empty.append(f"{uid} / {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
        assert prom.query('sum(handtrace_fleet_agents_online{state="exempt"})')[0]["value"][1] != "0"
    finally:
        for proc in (exporter, sink):
            proc.stop()
        prom.stop()

    # --- every ClickHouse panel query runs and returns rows (services stopped: dirs released)
    sql_panels = [(uid, title, target["rawSql"]) for uid, title, ds, target in dashboard_queries(load_dashboards())
                  if ds == "grafana-clickhouse-datasource"]
    assert sql_panels
    executed = set()
    for dsn in (s.clickhouse_dsn(), fleet_dsn(s)):
        client = clickhouse.connect(dsn)
        try:
            tables = {r[0] for r in client.query(f"SHOW TABLES FROM {s.clickhouse.database}").result_rows}
            for uid, title, sql in sql_panels:
                table = "heartbeats" if "handtrace.heartbeats" in sql else "events"
                if table not in tables:
                    continue
                rows = client.query(ch_macros(sql).replace("handtrace.", f"{s.clickhouse.database}.")).result_rows
                assert rows, f"{uid} / {title}: no rows"
                executed.add((uid, title))
                if title == "Worst offenders":
                    drains = [r[4] for r in rows if r[4] is not None]  # desktops have no battery
                    assert len(drains) >= 10 and drains == sorted(drains, reverse=True) and drains[0] > 0
        finally:
            clickhouse.close(dsn)
    assert executed == {(uid, title) for uid, title, _ in sql_panels}, "a ClickHouse panel's table was not found"
