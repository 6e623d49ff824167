"""docs/cookbook.md runs: every SQL block of the page, read from the page, is executed on
simulator data (synthetic passive activity of several people, simulated demonstrations, simulated
heartbeats) in an embedded ClickHouse, through the access tier it names, and its answer is checked
against the raw tables. The rollups are checked too: their totals equal the raw counts, whether
the rows were there before the views existed (backfill) or came after (the views).

``python -m tests.unit.test_cookbook`` prints each recipe's output (what the page shows).
"""

from __future__ import annotations

import re
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import clickhouse, ids
from handtrace.core.framestore import LocalStore
from handtrace.core.settings import FleetSettings
from handtrace.export.simulate import DEFAULT_APPS, seed_demonstrations
from handtrace.fleet import store as fleet_store
from handtrace.fleet.energy import EnergyModel
from handtrace.fleet.state import FleetState
from handtrace.sink import schema
from handtrace.warehouse import tiers

pytestmark = pytest.mark.timeout(600)

DB = "handtrace"
K = 5
COOKBOOK = Path(__file__).resolve().parents[2] / "docs" / "cookbook.md"
T0 = datetime(2026, 11, 2, 8, 0, tzinfo=UTC)
PEOPLE = 12
HOURS = 4
STRETCH_MIN = 4
EVENT_COLUMNS = ["event_id", "batch_id", "employee_key", "device_key", "kind", "captured_at", "received_at", "x",
                 "y", "button", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text", "text_masked",
                 "app_id", "window_title", "url", "agent_version", "os", "source_partition", "source_offset"]
MISSING_APPS = ("gimp", "inkscape")


# ------------------------------------------------------------------ the page


@dataclass(frozen=True)
class Recipe:
    name: str
    role: str | None
    """The access tier it is run under; None: the fleet store (not tiered)."""
    sql: str


def recipes(text: str | None = None) -> dict[str, Recipe]:
    """The recipes of docs/cookbook.md: a ``<!-- recipe: NAME role=ROLE|store=fleet -->`` line
    followed by a ```sql block."""
    text = COOKBOOK.read_text() if text is None else text
    found: dict[str, Recipe] = {}
    for m in re.finditer(r"<!-- recipe: (\w+) (?:role=(\w+)|store=fleet) -->\n```sql\n(.*?)```", text, re.S):
        assert m[1] not in found, f"recipe {m[1]} twice"
        found[m[1]] = Recipe(m[1], m[2], m[3].strip())
    return found


def bind(sql: str, params: dict[str, Any]) -> str:
    """The placeholders bound as ``handtrace sql --param NAME=VALUE`` binds them (values in
    ClickHouse's text format)."""
    def text(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ",".join("'" + str(x).replace("'", "\\'") + "'" for x in v) + "]"
        return str(v)
    return tiers.bind_parameters(sql, {k: text(v) for k, v in params.items()})


# ------------------------------------------------------------------ simulator data


def employee_key(p: int) -> str:
    return f"{p + 0xA0:02x}" * 32


def passive_events(person: int) -> pl.DataFrame:
    """One person's synthetic activity: a stretch of STRETCH_MIN minutes in each of HOURS hours,
    as rows of the ``events`` table."""
    src = SyntheticActivity(seed=person)
    t0 = int(T0.timestamp() * 1_000_000) + person * 7_000_000
    events: list[dict[str, Any]] = []
    for h in range(HOURS):
        start = t0 + h * 3_600_000_000
        events += src.events_between(start, start + STRETCH_MIN * 60_000_000)
    df = pl.DataFrame(events, infer_schema_length=None)
    n = df.height
    at = pl.from_epoch(pl.col("captured_at_us"), time_unit="us").dt.replace_time_zone("UTC")
    out = df.with_columns(
        event_id=pl.col("event_id").map_elements(lambda b: str(uuid.UUID(bytes=b)), return_dtype=pl.String),
        captured_at=at, received_at=at + pl.duration(seconds=2), employee_key=pl.lit(employee_key(person)),
        device_key=pl.lit(f"device-{person}"), batch_id=pl.lit("00000000-0000-0000-0000-000000000001"),
        text_masked=pl.lit(False), agent_version=pl.lit("0.1.0"), os=pl.lit("linux"),
        source_partition=pl.lit(0, pl.Int32), source_offset=pl.int_range(n, dtype=pl.Int64),
        button=pl.col("button").fill_null(""),
    )
    return out.select(EVENT_COLUMNS)


def insert_events(client: Any, df: pl.DataFrame, database: str = DB) -> None:
    client.insert(f"{database}.events", df.rows(), column_names=EVENT_COLUMNS)


def heartbeats() -> list[list[Any]]:
    """3 laptops, a heartbeat every 5 minutes for HOURS hours: rows of the fleet store's ``heartbeats``."""
    model = EnergyModel.from_settings(FleetSettings())
    state = FleetState(model)
    rows = []
    t0 = int(T0.timestamp() * 1_000_000)
    for i in range(HOURS * 12 + 1):
        for d in range(3):
            t_us = t0 + i * 300_000_000 + d * 1_000_000
            hb = {
                "heartbeat_id": ids.uuid7_bytes(t_us // 1000), "device_id": f"laptop-{d}", "sent_at_us": t_us,
                "agent_started_at_us": t0 - 60_000_000, "agent_version": "0.1.0", "os": ("linux", "darwin")[d % 2],
                "cohort": "eng", "state": "capturing", "battery_percent": 95.0 - 0.2 * i - d, "charging": False,
                "cpu_seconds": 0.9 * i, "rss_bytes": 90 << 20, "payload_bytes_sent": 40_000 * i * (d + 1),
                "wire_bytes_sent": 45_000 * i * (d + 1), "events_captured": 900 * i, "events_sent": 880 * i,
                "events_dropped": {"paused": 15 * i, "policy": 5 * i} if d else {}, "spool_depth_events": 0,
                "spool_depth_bytes": 0, "radio_wakeups": 5 * i,
            }
            rows.append(fleet_store.heartbeat_row(hb, state.observe(hb, t_us / 1e6 + 0.5), t_us / 1e6 + 0.5))
    return rows


def demonstration_with_drops(client: Any) -> None:
    """A complete demonstration the stream removed events and frames from (the seed drops none)."""
    start = T0 + timedelta(hours=1, minutes=30)
    client.insert(f"{DB}.demonstrations", [[
        "00000000-0000-7000-8000-00000000d409", employee_key(0), "device-0", "eng", "fill in the form", "complete",
        start, start + timedelta(minutes=2), start + timedelta(minutes=3), start + timedelta(minutes=3),
        1280, 800, 1.0, ["firefox"], "2026-01", "7", "0.1.0", "linux", 0, 0, 0,
        {"not_allowlisted": 2}, {"paused": 7, "not_allowlisted": 3}, ""]],
        column_names=["demonstration_id", "employee_key", "device_key", "cohort", "instruction", "status",
                      "started_at", "ended_at", "sent_at", "received_at", "screen_width", "screen_height",
                      "screen_scale", "apps", "consent_version", "policy_version", "agent_version", "os", "frames",
                      "events", "missing_frames", "frames_dropped", "events_dropped", "reason"])


@dataclass
class Warehouse:
    client: Any
    demonstration_ids: list[str]


def build(root: Path) -> Warehouse:
    """Migrate, then store simulator data (the views fill the rollups as it is inserted)."""
    client = clickhouse.connect(f"chdb://{root / 'ch'}")
    schema.migrate(client, DB)
    fleet_store.migrate(client, DB)  # one embedded dir here, as with a server DSN (shared database)
    for p in range(PEOPLE):
        insert_events(client, passive_events(p))
    seeded = seed_demonstrations(client, DB, LocalStore(root / "frames"), n=24, steps=10, participants=6, seed=5,
                                 workers=1, frame_kind="plain", t0_us=int(T0.timestamp() * 1_000_000))
    demonstration_with_drops(client)
    client.insert(f"{DB}.heartbeats", heartbeats(), column_names=fleet_store.COLUMNS)
    return Warehouse(client, seeded.demonstration_ids)


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Warehouse]:
    root = tmp_path_factory.mktemp("cookbook")
    try:
        yield build(root)
    finally:
        clickhouse.close(f"chdb://{root / 'ch'}")


def params(w: Warehouse) -> dict[str, Any]:
    demo, app = w.client.query(
        f"SELECT demonstration_id, app_id FROM {DB}.demonstration_events WHERE app_id != '' "
        "GROUP BY demonstration_id, app_id ORDER BY count() DESC, demonstration_id LIMIT 1").result_rows[0]
    return {"demonstration_id": str(demo), "app_id": app, "allowed_apps": [*DEFAULT_APPS, *MISSING_APPS],
            "at_least": 3, "month": "2026-11-01 00:00:00"}


def run(w: Warehouse, name: str) -> tiers.Answer | Any:
    r = recipes()[name]
    sql = bind(r.sql, params(w))
    if r.role is None:
        return w.client.query(sql)
    return tiers.run(w.client, sql, role=r.role, database=DB, k=K, actor="cookbook test",
                     purpose="cookbook test" if r.role == "researcher" else None)


def rows_of(answer: Any) -> list[dict[str, Any]]:
    if isinstance(answer, tiers.Answer):
        return list(answer.named_results())
    return [dict(zip(answer.column_names, row, strict=True)) for row in answer.result_rows]


def raw(w: Warehouse, sql: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in w.client.query(sql).result_rows]


# ------------------------------------------------------------------ the page's shape


def test_every_recipe_of_the_page_is_tested() -> None:
    found = recipes()
    tested = {n.removeprefix("test_recipe_") for n in globals() if n.startswith("test_recipe_")}
    assert set(found) == tested, (set(found) ^ tested)
    assert {r.role for r in found.values()} == {"analyst", "researcher", "admin", None}


def test_placeholders_bind_to_typed_literals() -> None:
    sql = tiers.bind_parameters("WHERE a = {x:UUID} AND b IN {y:Array(String)} AND c < {z:UInt64}",
                                {"x": "u", "y": "['a','it\\'s']", "z": "3"})
    assert sql == ("WHERE a = CAST('u' AS UUID) AND b IN CAST('[\\'a\\',\\'it\\\\\\'s\\']' AS Array(String)) "
                   "AND c < CAST('3' AS UInt64)")
    with pytest.raises(ValueError, match="--param z=VALUE"):
        tiers.bind_parameters("WHERE c < {z:UInt64}", {})


def test_bound_values_cannot_break_out_of_their_literal(warehouse: Warehouse) -> None:
    """A value with a quote cannot break out of its literal: ClickHouse parses it as the type."""
    answer = tiers.run(warehouse.client, tiers.bind_parameters(
        "SELECT {s:String} AS s, {a:Array(String)} AS a", {"s": "x' OR 1=1 --", "a": "['it\\'s']"}),
        role="admin", database=DB, k=K, actor="cookbook test")
    assert answer.rows == [("x' OR 1=1 --", ["it's"])]


# ------------------------------------------------------------------ rollups


ROLLUP_TOTALS = {
    "rollup_app_activity_hourly": ("sum(events)", "events", "count()"),
    "rollup_shortcuts_hourly": (
        "sum(presses)", "events",
        "countIf(kind = 'key_down' AND bitAnd(ifNull(modifiers, 0), 14) != 0 AND key_code IS NOT NULL "
        "AND key_code NOT BETWEEN 65505 AND 65518)"),
    "rollup_demonstrations_daily": ("sum(demonstrations)", "demonstrations",
                                    "sum(greatest(length(apps), 1)) FILTER (WHERE status = 'complete')"),
    "rollup_demonstration_drops_hourly": (
        "sum(dropped)", "demonstrations",
        "sum(arraySum(mapValues(events_dropped)) + arraySum(mapValues(frames_dropped))) "
        "FILTER (WHERE status = 'complete')"),
}


def test_rollup_totals_equal_the_raw_counts(warehouse: Warehouse) -> None:
    for table, (measure, source, raw_count) in ROLLUP_TOTALS.items():
        got, = raw(warehouse, f"SELECT {measure} FROM {DB}.{table}")[0]
        want, = raw(warehouse, f"SELECT {raw_count} FROM {DB}.{source}")[0]
        assert got == want and want > 0, (table, got, want)
    # per group too, not only in total: hour x app x kind x person
    diff = raw(warehouse, f"""
        SELECT count() FROM (
            SELECT toStartOfHour(captured_at) AS hour, ifNull(app_id, '') AS app_id, kind, employee_key,
                   count() AS n FROM {DB}.events GROUP BY ALL) AS r
        FULL JOIN (SELECT hour, app_id, kind, employee_key, sum(events) AS n FROM {DB}.rollup_app_activity_hourly
                   GROUP BY ALL) AS u USING (hour, app_id, kind, employee_key)
        WHERE r.n != u.n""")
    assert diff == [(0,)]
    fleet = raw(warehouse, f"SELECT sum(heartbeats), round(sum(upload_bytes)) FROM {DB}.rollup_heartbeats_hourly")
    assert fleet == raw(warehouse, f"SELECT count(), round(sum(ifNull(upload_bytes_per_hour * interval_s / 3600, 0))) "
                                   f"FROM {DB}.heartbeats")
    assert fleet[0][1] > 0


def test_rollups_backfill_what_was_there_before_them(warehouse: Warehouse,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows stored before the rollup migrations count: the backfill (then the view for new rows).
    (A database of its own in the same embedded dir: one process opens one dir.)"""
    client, db = warehouse.client, "handtrace_backfill"
    every = list(schema.MIGRATIONS)
    monkeypatch.setattr(schema, "MIGRATIONS", [m for m in every if m[0] < 14])
    schema.migrate(client, db)
    before, after = passive_events(0), passive_events(1)
    insert_events(client, before, db)
    monkeypatch.setattr(schema, "MIGRATIONS", every)
    assert set(schema.migrate(client, db)) >= set(range(14, 26))
    total = f"SELECT sum(events) FROM {db}.rollup_app_activity_hourly"
    assert raw(warehouse, total) == [(before.height,)]
    insert_events(client, after, db)
    assert schema.migrate(client, db) == []  # a re-run adds nothing
    assert raw(warehouse, total) == [(before.height + after.height,)]


def test_the_fleet_rollup_backfills_too(warehouse: Warehouse, monkeypatch: pytest.MonkeyPatch) -> None:
    client, db = warehouse.client, "fleet_backfill"
    every = list(fleet_store.MIGRATIONS)
    monkeypatch.setattr(fleet_store, "MIGRATIONS", every[:1])
    fleet_store.migrate(client, db)
    rows = heartbeats()
    client.insert(f"{db}.heartbeats", rows[:60], column_names=fleet_store.COLUMNS)
    monkeypatch.setattr(fleet_store, "MIGRATIONS", every)
    assert fleet_store.migrate(client, db) == [2, 3, 4]
    client.insert(f"{db}.heartbeats", rows[60:], column_names=fleet_store.COLUMNS)
    assert fleet_store.migrate(client, db) == []
    assert raw(warehouse, f"SELECT sum(heartbeats), uniqExactMerge(devices) FROM {db}.rollup_heartbeats_hourly") == [
        (len(rows), 3)]


def test_erasure_removes_a_person_from_the_rollups(warehouse: Warehouse) -> None:
    from handtrace.core.erasure import count_rows, delete_rows

    client, db = warehouse.client, "handtrace_erasure"
    schema.migrate(client, db)
    for p in (0, 1):
        insert_events(client, passive_events(p), db)
    rollups = [t for t in schema.ERASABLE if t.startswith("rollup_")]
    assert rollups and all(t in tiers.TABLES for t in schema.ROLLUP_SOURCES)
    before = count_rows(client, db, employee_key(0), rollups)
    assert before["rollup_app_activity_hourly"] > 0 and before["rollup_shortcuts_hourly"] > 0
    delete_rows(client, db, employee_key(0), schema.ERASABLE)
    assert count_rows(client, db, employee_key(0), schema.ERASABLE) == dict.fromkeys(schema.ERASABLE, 0)
    kept = count_rows(client, db, employee_key(1), rollups)
    assert kept["rollup_app_activity_hourly"] > 0 and kept["rollup_shortcuts_hourly"] > 0


# ------------------------------------------------------------------ the recipes


def test_recipe_trajectory(warehouse: Warehouse) -> None:
    p = params(warehouse)
    rows = rows_of(run(warehouse, "trajectory"))
    want, = raw(warehouse, f"SELECT count() FROM {DB}.demonstration_events WHERE demonstration_id = "
                           f"'{p['demonstration_id']}' AND app_id = '{p['app_id']}' AND (text IS NULL OR text_masked)")
    assert len(rows) == want[0] > 0
    times = [r["captured_at"] for r in rows]
    assert times == sorted(times) and {"kind", "x", "y", "key_code", "text"} <= set(rows[0])


def test_recipe_navigation(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "navigation"))
    assert rows and set(rows[0]) == {"app_id", "path", "demonstrations", "steps"}
    assert all(r["path"].count(" > ") == r["steps"] - 1 for r in rows)
    assert any("click(" in r["path"] for r in rows) and any("[" in r["path"] for r in rows)
    demos, = raw(warehouse, f"SELECT uniqExact(demonstration_id, app_id) FROM {DB}.demonstration_events "
                            "WHERE kind = 'focus_change' OR (kind = 'click' AND pressed)")[0]
    assert sum(r["demonstrations"] for r in rows) <= demos


def test_recipe_shortcuts(warehouse: Warehouse) -> None:
    answer = run(warehouse, "shortcuts")
    rows = rows_of(answer)
    assert rows and answer.audit["outcome"] == "allowed" and "uniqExact(employee_key) >= 5" in answer.audit["executed"]
    for r in rows:
        assert r["people"] >= K and "+" in r["chord"]
    # each shown count is the raw count of that chord in that app, the 20 most used shown
    raw_counts = {(a, m, c): n for a, m, c, n in raw(warehouse, f"""
        SELECT ifNull(app_id, ''), modifiers, key_code, count() FROM {DB}.events
        WHERE kind = 'key_down' AND bitAnd(ifNull(modifiers, 0), 14) != 0 AND key_code NOT BETWEEN 65505 AND 65518
        GROUP BY ALL HAVING uniqExact(employee_key) >= {K}""")}
    assert len(rows) == min(20, len(raw_counts))
    for r in rows:
        assert r["presses"] == raw_counts[(r["app_id"], r["modifiers"], r["key_code"])]
    assert rows[-1]["presses"] >= sorted(raw_counts.values())[-len(rows)]


def test_recipe_form_time(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "form_time"))
    assert rows and set(rows[0]) == {"app_id", "demonstrations", "median_s", "max_s"}
    assert all(0 < r["median_s"] <= r["max_s"] < 3600 for r in rows)
    submitted, = raw(warehouse, f"SELECT uniqExact(demonstration_id, app_id) FROM {DB}.demonstration_events "
                                "WHERE kind = 'key_down' AND key_code = 65293")[0]
    assert sum(r["demonstrations"] for r in rows) == submitted > 0


def test_recipe_lacking(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "lacking"))
    counts = dict(raw(warehouse, f"SELECT arrayJoin(apps) AS a, count() FROM {DB}.demonstrations "
                                 "WHERE status = 'complete' GROUP BY a"))
    want = sorted(a for a in [*DEFAULT_APPS, *MISSING_APPS] if counts.get(a, 0) < 3)
    assert sorted(r["app_id"] for r in rows) == want and set(MISSING_APPS) <= set(want)
    assert all(r["demonstrations"] == counts.get(r["app_id"], 0) for r in rows)


def test_recipe_demonstrations_per_app(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "demonstrations_per_app"))
    assert rows and all(r["people"] >= K for r in rows)
    for r in rows:
        n, = raw(warehouse, f"SELECT count() FROM {DB}.demonstrations WHERE status = 'complete' "
                            f"AND has(apps, '{r['app_id']}')")[0]
        assert r["demos"] == n


def test_recipe_hourly_report(warehouse: Warehouse) -> None:
    answer = run(warehouse, "hourly_report")
    rows = rows_of(answer)
    assert rows and "uniqExact(employee_key) >= 5" in answer.audit["executed"]
    assert {r["hour"].hour for r in rows} <= set(range(T0.hour, T0.hour + HOURS))
    raw_groups = {(h.replace(tzinfo=None), a): (n, people) for h, a, n, people in raw(warehouse, f"""
        SELECT toStartOfHour(captured_at), ifNull(app_id, ''), count(), uniqExact(employee_key) FROM {DB}.events
        GROUP BY ALL""")}
    shown = {(r["hour"].replace(tzinfo=None), r["app_id"]): r for r in rows}
    assert shown.keys() == {g for g, (_, people) in raw_groups.items() if people >= K}
    for g, r in shown.items():
        assert (r["all_events"], r["people"]) == raw_groups[g]
        assert r["clicks"] + r["keys"] + r["scrolls"] <= r["all_events"]


def test_recipe_drops(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "drops"))
    assert {(r["what"], r["reason"], r["dropped"]) for r in rows} == {
        ("events", "paused", 7), ("events", "not_allowlisted", 3), ("frames", "not_allowlisted", 2)}


def test_recipe_fleet_hourly(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "fleet_hourly"))
    assert rows and sum(r["heartbeats"] for r in rows) == HOURS * 12 * 3 + 3
    assert all(0 < r["battery_pct"] <= 100 and r["devices"] >= 1 for r in rows)
    assert sum(r["upload_mb"] for r in rows) == pytest.approx(45_000 * HOURS * 12 * 6 / 1e6, rel=0.01)  # wire bytes


def test_recipe_agent_drops(warehouse: Warehouse) -> None:
    rows = rows_of(run(warehouse, "agent_drops"))
    by_reason: dict[str, int] = {}
    for r in rows:
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + r["dropped"]
    # 2 devices drop; per hour each counts the growth from its hour's first heartbeat to its last (11 steps)
    assert by_reason == {"paused": 2 * HOURS * 11 * 15, "policy": 2 * HOURS * 11 * 5}


def test_the_dashboard_rollup_panel_answers_from_the_rollup(warehouse: Warehouse) -> None:
    """Analyst overview's per-app-per-hour panel (dashboards/definitions.py) runs on the rollup and
    shows the raw counts (the plugin's macros expanded over the data's day)."""
    from dashboards.builder import SQL
    from dashboards.definitions import analyst_overview

    panel = next(p for p in analyst_overview.panels() if p.title == "Events per app per hour (rollup)")
    query = panel.queries[0]
    assert isinstance(query, SQL)
    sql = query.sql
    day = "hour >= '2026-11-02 00:00:00' AND hour < '2026-11-03 00:00:00'"
    got = {(t.replace(tzinfo=None), a): n for t, a, n in raw(warehouse, sql.replace("$__timeFilter(hour)", day))}
    want = {(h.replace(tzinfo=None), a): n for h, a, n in raw(warehouse, f"""
        SELECT toStartOfHour(captured_at) AS h, app_id, count() FROM {DB}.events
        WHERE app_id IS NOT NULL AND app_id != '' GROUP BY ALL""")}
    assert got == want and len(got) >= HOURS


# ------------------------------------------------------------------ the page's outputs


def table(rows: list[dict[str, Any]], limit: int, width: int = 48) -> str:
    """Rows as a plain text table (values cut at ``width`` characters)."""
    if not rows:
        return "(no rows)"
    names = list(rows[0])
    cells = [[("NULL" if v is None else str(v).replace("\n", " "))[:width] for v in r.values()] for r in rows[:limit]]
    widths = [max(len(n), *(len(c[i]) for c in cells)) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) for c in cells]
    if len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more rows")
    return "\n".join(line.rstrip() for line in lines)


def outputs(w: Warehouse, limit: int = 8) -> dict[str, str]:
    """Each recipe's output as the page shows it (first ``limit`` rows)."""
    return {name: table(rows_of(run(w, name)), limit) for name in recipes()}


def shown_outputs() -> dict[str, str]:
    """The output block the page shows after each recipe (the first plain block after its SQL)."""
    text = COOKBOOK.read_text()
    found = {}
    for m in re.finditer(r"<!-- recipe: (\w+) [^>]*-->\n```sql\n.*?```\n", text, re.S):
        block = re.search(r"\n```\n(.*?)```", text[m.end():], re.S)
        assert block is not None, m[1]
        found[m[1]] = block[1].rstrip("\n")
    return found


def test_the_page_shows_what_the_recipes_return(warehouse: Warehouse) -> None:
    """The simulator data is deterministic (seeds, fixed times): the page's outputs are the real ones
    (regenerate with ``python -m tests.unit.test_cookbook`` and paste)."""
    assert shown_outputs() == outputs(warehouse)


def render() -> str:
    with tempfile.TemporaryDirectory() as d:
        w = build(Path(d))
        try:
            return "\n".join(f"== {name}\n{body}" for name, body in outputs(w).items())
        finally:
            clickhouse.close(f"chdb://{Path(d) / 'ch'}")


if __name__ == "__main__":
    sys.stdout.write(render() + "\n")
