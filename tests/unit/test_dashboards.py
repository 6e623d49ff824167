"""Dashboards as code: the committed JSON is exactly what the code generates, every metric a
dashboard or rule names is declared in a metrics.py inventory, the layout is valid, and
`handtrace dashboards push` sends Grafana the requests it should (checked by a local HTTP server
standing in for Grafana, in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from dashboards.__main__ import HERE, render
from dashboards.definitions import DASHBOARDS
from dashboards.promql import (
    dashboard_queries,
    inventory_names,
    metric_names,
    operands,
    recorded_names,
    rules,
)
from typer.testing import CliRunner

from handtrace.cli import app
from handtrace.fleet.grafana import PushError, push, with_datasources

pytestmark = pytest.mark.timeout(60)

COMMITTED = sorted(HERE.glob("*.json"))


def committed() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in COMMITTED]


# --- generated, committed, identical -------------------------------------------------------


def test_regenerating_gives_the_committed_json() -> None:
    """`python -m dashboards` would change nothing: same files, byte for byte."""
    files = render()
    assert sorted(files) == [p.name for p in COMMITTED], "a dashboard was added or removed without regenerating"
    for name, text in files.items():
        assert (HERE / name).read_text() == text, f"dashboards/{name} is stale: run `python -m dashboards`"


def test_the_five_dashboards() -> None:
    titles = {d["title"] for d in committed()}
    assert titles == {"handtrace / Fleet impact", "handtrace / Pipeline health", "handtrace / Privacy controls",
                      "handtrace / Sampling", "handtrace / Analyst overview"}


def test_layout_ids_and_datasources() -> None:
    """Unique panel ids, panels inside the 24-column grid without overlap, known datasource uids."""
    for d in committed():
        ids = [p["id"] for p in d["panels"]]
        assert len(ids) == len(set(ids)), d["uid"]
        cells: set[tuple[int, int]] = set()
        for p in d["panels"]:
            g = p["gridPos"]
            assert 0 <= g["x"] and g["x"] + g["w"] <= 24, (d["uid"], p["title"])
            mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not (mine & cells), f"{d['uid']}: {p['title']} overlaps another panel"
            cells |= mine
            if p["type"] != "row":
                assert p["targets"], (d["uid"], p["title"])
                assert p["datasource"]["uid"] in ("prometheus", "clickhouse")
    assert any(ds == "grafana-clickhouse-datasource" for _, _, ds, _ in dashboard_queries(committed()))


# --- every metric named exists in the code ------------------------------------------------


def named_metrics() -> dict[str, set[str]]:
    """Metric name -> where it is named (dashboards and rules)."""
    where: dict[str, set[str]] = {}
    for uid, title, ds, target in dashboard_queries(committed()):
        if ds == "prometheus":
            for n in metric_names(target["expr"]):
                where.setdefault(n, set()).add(f"{uid}: {title}")
    for d in committed():
        for v in d["templating"]["list"]:
            for n in metric_names(v["definition"].removeprefix("label_values(").split(",")[0]):
                where.setdefault(n, set()).add(f"{d['uid']}: variable {v['name']}")
    for r in rules():
        for n in metric_names(r["expr"]):
            where.setdefault(n, set()).add(f"rule {r.get('alert') or r.get('record')}")
    return where


def test_every_metric_named_is_in_an_inventory() -> None:
    known = inventory_names() | recorded_names() | {"up"}
    missing = {n: sorted(w) for n, w in named_metrics().items() if n not in known}
    assert not missing, f"named but declared in no metrics.py inventory: {missing}"


def test_every_fleet_metric_is_shown_somewhere() -> None:
    """Declared fleet metrics are used by a dashboard or a rule (no dead inventory)."""
    used = set(named_metrics())
    unused = {n for n in inventory_names() if n.startswith(("handtrace_fleet_", "handtrace_pipeline_"))
              and not n.endswith(("_sum", "_count")) and n not in used}
    allowed = {"handtrace_fleet_label_overflow_total", "handtrace_fleet_agent_cpu_seconds_total",
               "handtrace_fleet_agent_radio_wakeups_total"}  # runbook diagnostics, queried ad hoc
    assert unused <= allowed, sorted(unused - allowed)


@pytest.mark.parametrize(("expr", "want"), [
    ('sum(rate(handtrace_a_total{x="y"}[5m]))', {"handtrace_a_total"}),
    ("histogram_quantile(0.9, sum by (le, cohort) (rate(m_bucket[1m])))", {"m_bucket"}),
    ("a > on() group_left() max(b) and 1e9 < c", {"a", "b", "c"}),
    ('up{job=~"handtrace-.*"} == 0', {"up"}),
    ("handtrace:ratio:rate10m > 0.01", {"handtrace:ratio:rate10m"}),
    ("time() - max(x) > 600", {"x"}),
    ('count(m{a="sum(b)"}) offset 5m', {"m"}),
])
def test_metric_names(expr: str, want: set[str]) -> None:
    assert metric_names(expr) == want


@pytest.mark.parametrize(("expr", "want"), [
    ("a > 1", ["a"]),
    ("x", ["x"]),
    ("a > on() group_left() max(b)", ["a", "max(b)"]),
    ('(sum(rate(a[5m])) or on() vector(0)) == 0 and on() sum(b{s="x"}) > 0',
     ["(sum(rate(a[5m])) or on() vector(0))", 'sum(b{s="x"})']),
    ('up{job=~"a|b", x!="y"} == 0', ['up{job=~"a|b", x!="y"}']),
    ("a >= bool b", ["a", "b"]),
])
def test_operands(expr: str, want: list[str]) -> None:
    assert operands(expr) == want


def test_inventory_check_can_fail() -> None:
    """A typo in a dashboard metric is caught (the check is not vacuous)."""
    known = inventory_names() | recorded_names() | {"up"}
    assert "handtrace_fleet_agent_cpu_percent_bucket" in known
    assert not metric_names("rate(handtrace_fleet_agent_cpu_percnt_bucket[5m])") <= known


# --- push ------------------------------------------------------------------------------------


class FakeGrafana:
    """Records every request; answers like Grafana's HTTP API for folders, datasources and
    dashboards (state kept across requests, so idempotence is observable)."""

    def __init__(self, datasources: dict[str, str]) -> None:
        self.requests: list[dict[str, Any]] = []
        self.folders: dict[str, str] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.datasources = datasources
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _answer(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:  # noqa: N802
                fake.requests.append({"method": "GET", "path": self.path, "auth": self.headers.get("Authorization")})
                if self.path.startswith("/api/datasources/uid/"):
                    uid = self.path.rsplit("/", 1)[1]
                    if uid in fake.datasources:
                        return self._answer(200, {"uid": uid, "type": fake.datasources[uid]})
                    return self._answer(404, {"message": "Data source not found"})
                if self.path.startswith("/api/folders/"):
                    uid = self.path.rsplit("/", 1)[1]
                    if uid in fake.folders:
                        return self._answer(200, {"uid": uid, "title": fake.folders[uid]})
                    return self._answer(404, {"message": "folder not found"})
                return self._answer(404, {"message": "not found"})

            def do_POST(self) -> None:  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"method": "POST", "path": self.path, "body": body,
                                      "auth": self.headers.get("Authorization")})
                if self.path == "/api/folders":
                    if body["uid"] in fake.folders:
                        return self._answer(409, {"message": "folder exists"})
                    fake.folders[body["uid"]] = body["title"]
                    return self._answer(200, {"uid": body["uid"], "title": body["title"]})
                if self.path == "/api/dashboards/db":
                    d = body["dashboard"]
                    if body.get("folderUid") not in fake.folders:
                        return self._answer(400, {"message": "folder not found"})
                    old = fake.dashboards.get(d["uid"])
                    if old is not None and not body.get("overwrite"):
                        return self._answer(412, {"message": "version-mismatch"})
                    version = (old["version"] + 1) if old else 1
                    fake.dashboards[d["uid"]] = {"dashboard": d, "folderUid": body["folderUid"], "version": version}
                    return self._answer(200, {"uid": d["uid"], "version": version, "status": "success",
                                              "url": f"/d/{d['uid']}"})
                return self._answer(404, {"message": "not found"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def writes(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["method"] != "GET"]


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    g = FakeGrafana({"prom-a": "prometheus", "ch-b": "grafana-clickhouse-datasource"})
    g.thread.start()
    yield g
    g.server.shutdown()
    g.server.server_close()


def test_push_creates_folder_and_dashboards_then_overwrites(grafana: FakeGrafana) -> None:
    uids = {"prometheus": "prom-a", "clickhouse": "ch-b"}
    pushed = push(grafana.url, "tok-123", folder_uid="handtrace", datasource_uids=uids)
    assert [p.version for p in pushed] == [1] * len(COMMITTED)
    assert all(r["auth"] == "Bearer tok-123" for r in grafana.requests)
    gets = [r["path"] for r in grafana.requests if r["method"] == "GET"]
    assert "/api/datasources/uid/prom-a" in gets and "/api/datasources/uid/ch-b" in gets
    writes = grafana.writes()
    assert writes[0]["path"] == "/api/folders" and writes[0]["body"] == {"title": "handtrace", "uid": "handtrace"}
    posts = [w["body"] for w in writes[1:]]
    assert {b["dashboard"]["uid"] for b in posts} == {d["uid"] for d in committed()}
    for b in posts:
        assert b["overwrite"] is True and b["folderUid"] == "handtrace" and b["dashboard"]["id"] is None
        used = {t["datasource"]["uid"] for p in b["dashboard"]["panels"] for t in p.get("targets", [])}
        assert used <= {"prom-a", "ch-b"}, used
    # Pushing again: no new folder, the same dashboards overwritten in place.
    again = push(grafana.url, "tok-123", folder_uid="handtrace", datasource_uids=uids)
    assert [p.version for p in again] == [2] * len(COMMITTED)
    assert [w["path"] for w in grafana.writes()].count("/api/folders") == 1
    assert len(grafana.dashboards) == len(COMMITTED)


def test_push_fails_before_writing_on_unknown_datasource(grafana: FakeGrafana) -> None:
    with pytest.raises(PushError, match="datasource uid 'nope'"):
        push(grafana.url, "t", datasource_uids={"prometheus": "nope", "clickhouse": "ch-b"})
    assert grafana.writes() == []
    with pytest.raises(PushError, match="is a prometheus"):
        push(grafana.url, "t", datasource_uids={"prometheus": "prom-a", "clickhouse": "prom-a"})
    assert grafana.writes() == []


def test_cli_push(grafana: FakeGrafana, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["dashboards", "push", "--url", grafana.url, "--token", "tok",
                                      "--prometheus-uid", "prom-a", "--clickhouse-uid", "ch-b"])
    assert result.exit_code == 0, result.output
    assert len(grafana.dashboards) == len(COMMITTED) and "Fleet impact" in result.output
    bad = CliRunner().invoke(app, ["dashboards", "push", "--url", grafana.url, "--token", "tok",
                                   "--dir", str(tmp_path)])
    assert bad.exit_code == 1 and "no dashboards" in bad.output


def test_with_datasources_rewrites_only_known_uids() -> None:
    d = {"panels": [{"datasource": {"uid": "prometheus"}, "targets": [{"datasource": {"uid": "other"}}]}]}
    out = with_datasources(d, {"prometheus": "p1"})
    assert out["panels"][0]["datasource"]["uid"] == "p1"
    assert out["panels"][0]["targets"][0]["datasource"]["uid"] == "other"
    assert d["panels"][0]["datasource"]["uid"] == "prometheus"  # input untouched


def test_definitions_match_dashboards_dir() -> None:
    assert {d.uid for d in DASHBOARDS} == {d["uid"] for d in committed()}
