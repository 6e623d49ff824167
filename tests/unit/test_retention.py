"""Retention (core/retention.py, issue #14 part R) on a real embedded ClickHouse in a tmp dir: the
migration sets every table's TTL from the settings, a changed setting changes it (and only it),
a second run changes nothing, expired rows really go when the TTL is materialised, the report
counts what is past its policy, frame objects without a live row are deleted in batches, and
topics keep a class no longer than its policy."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from handtrace.core import clickhouse
from handtrace.core.framestore import LocalStore
from handtrace.core.retention import (
    CLASSES,
    current_ttl,
    expire_frame_objects,
    table_reports,
    topic_retention_ms,
    ttl_expression,
)
from handtrace.core.settings import RetentionSettings, TopicSettings
from handtrace.core.topics import RETENTION_CLASS, topic_specs
from handtrace.export.simulate import seed_demonstrations
from handtrace.fleet import store as fleet_store
from handtrace.sink.schema import MIGRATIONS, NEVER_EXPIRED, RETENTION, apply_retention, migrate
from tests.chserve_support import wait_served

DB = "handtrace"
DAY_MS = 86_400_000


@pytest.fixture
def ch(tmp_path: Path) -> Iterator[Any]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        yield client
    finally:
        clickhouse.close(dsn)


def ttls(client: Any, tables: dict[str, Any] = RETENTION) -> dict[str, str | None]:
    return {t: current_ttl(client, DB, t) for t in tables}


def applied_log(client: Any) -> list[tuple[str, int, str]]:
    return [tuple(r) for r in client.query(
        f"SELECT table, days, after FROM {DB}.retention_applied ORDER BY at, table").result_rows]


def add_events(client: Any, ages_days: list[float]) -> None:
    now = datetime.now(UTC)
    rows = [[uuid.uuid4(), uuid.UUID(int=1), "emp", "dev", "key_down", now - timedelta(days=a), now, "x", i]
            for i, a in enumerate(ages_days)]
    client.insert(f"{DB}.events", rows, column_names=["event_id", "batch_id", "employee_key", "device_key", "kind",
                                                       "captured_at", "received_at", "app_id", "source_offset"])


def test_every_migrated_table_has_a_retention_class_or_a_reason(ch: Any) -> None:
    """A new table cannot be forgotten: it is classed (RETENTION) or said never to expire."""
    migrate(ch, DB)
    tables = {r[0] for r in ch.query(f"SELECT name FROM system.tables WHERE database = '{DB}' "
                                     "AND engine != 'MaterializedView'").result_rows}  # a view holds no rows
    assert tables, "the migrations created no table"
    unclassed = tables - set(RETENTION) - set(NEVER_EXPIRED)
    assert not unclassed, f"tables with no retention class: {sorted(unclassed)} (add them to sink.schema.RETENTION "
    assert not set(RETENTION) & set(NEVER_EXPIRED)
    assert set(RETENTION) <= tables
    assert {c.data_class for c in RETENTION.values()} <= set(CLASSES)
    assert 13 in {m[0] for m in MIGRATIONS}


def test_migration_sets_ttls_from_the_settings(ch: Any) -> None:
    policy = RetentionSettings(events_days=90, demonstrations_days=365, audit_days=0)
    migrate(ch, DB, policy)
    got = ttls(ch)
    assert got["events"] == "toDateTime(captured_at) + toIntervalDay(90)"
    assert got["demonstrations"] == "toDateTime(started_at) + toIntervalDay(365)"
    assert got["frames"] == got["demonstration_events"] == "toDateTime(captured_at) + toIntervalDay(365)"
    assert got["control_audit"] == got["access_audit"] == ""  # 0 = forever: no TTL
    rollups = [t for t, c in RETENTION.items() if c.data_class == "rollups"]
    assert rollups and all(got[t].endswith("toIntervalDay(730)") for t in rollups)  # the default
    assert sorted(applied_log(ch)) == sorted([
        ("events", 90, got["events"]), ("demonstrations", 365, got["demonstrations"]),
        ("frames", 365, got["frames"]), ("demonstration_events", 365, got["demonstration_events"]),
        *[(t, 730, got[t]) for t in rollups]])


def test_changed_settings_change_only_what_differs_and_a_rerun_changes_nothing(ch: Any) -> None:
    migrate(ch, DB, RetentionSettings())
    before = ttls(ch)
    n_log = len(applied_log(ch))
    assert apply_retention(ch, DB, RetentionSettings()) == []  # idempotent
    assert migrate(ch, DB, RetentionSettings()) == []
    assert ttls(ch) == before and len(applied_log(ch)) == n_log

    changes = apply_retention(ch, DB, RetentionSettings(events_days=7, audit_days=2190))
    assert {c.table for c in changes} == {"events", "control_audit", "access_audit"}
    after = ttls(ch)
    assert after["events"] == ttl_expression("captured_at", 7)
    assert after["access_audit"] == after["control_audit"] == ttl_expression("at", 2190)
    assert after["frames"] == before["frames"]
    assert len(applied_log(ch)) == n_log + 3

    changes = apply_retention(ch, DB, RetentionSettings(events_days=7, audit_days=2190, demonstrations_days=0))
    assert {c.table for c in changes} == {"demonstrations", "frames", "demonstration_events"}
    assert all(c.after == "" and c.before for c in changes)
    assert ttls(ch)["frames"] == ""


def test_expired_rows_are_deleted_and_the_report_counts_them(ch: Any) -> None:
    migrate(ch, DB, RetentionSettings(events_days=0))  # no TTL yet: old rows stay
    add_events(ch, [200, 120, 45, 1, 0.1])
    policy = RetentionSettings(events_days=30)
    (rep,) = [t for t in table_reports(ch, DB, RETENTION, policy) if t.table == "events"]
    assert (rep.rows, rep.past_policy, rep.policy_days, rep.ttl, rep.ttl_matches) == (5, 3, 30, "", False)
    assert rep.oldest is not None and rep.oldest.startswith(str((datetime.now(UTC) - timedelta(days=200)).date()))

    migrate(ch, DB, policy)
    ch.command(f"ALTER TABLE {DB}.events MATERIALIZE TTL SETTINGS mutations_sync = 2")
    ch.command(f"OPTIMIZE TABLE {DB}.events FINAL")
    assert ch.query(f"SELECT count() FROM {DB}.events").result_rows[0][0] == 2
    (rep,) = [t for t in table_reports(ch, DB, RETENTION, policy) if t.table == "events"]
    assert (rep.rows, rep.past_policy, rep.ttl_matches) == (2, 0, True)

    add_events(ch, [50])  # late data older than the policy: dropped once parts merge
    ch.command(f"OPTIMIZE TABLE {DB}.events FINAL")
    assert ch.query(f"SELECT count() FROM {DB}.events").result_rows[0][0] == 2


def test_the_fleet_store_follows_the_heartbeats_policy(ch: Any) -> None:
    fleet_store.migrate(ch, DB)
    assert current_ttl(ch, DB, "heartbeats") == ttl_expression("sent_at", 90)  # migration 1's own
    fleet_store.migrate(ch, DB, RetentionSettings(heartbeats_days=30))
    assert current_ttl(ch, DB, "heartbeats") == ttl_expression("sent_at", 30)
    assert fleet_store.apply_retention(ch, DB, RetentionSettings(heartbeats_days=30)) == []
    fleet_store.migrate(ch, DB, RetentionSettings(heartbeats_days=0))
    assert current_ttl(ch, DB, "heartbeats") == ""
    tables = {r[0] for r in ch.query(f"SELECT name FROM system.tables WHERE database = '{DB}' "
                                     "AND engine != 'MaterializedView'").result_rows}
    assert tables == set(fleet_store.RETENTION) | set(fleet_store.NEVER_EXPIRED)


def test_frame_objects_without_a_live_row_are_deleted_in_batches(ch: Any, tmp_path: Path) -> None:
    migrate(ch, DB)
    store = LocalStore(tmp_path / "frames")
    t0 = datetime.now(UTC) - timedelta(days=10)
    seed_demonstrations(ch, DB, store, n=4, steps=3, participants=2, seed=1, workers=1, frame_kind="plain",
                        t0_us=int(t0.timestamp() * 1e6))
    keys = sorted(store.list("frames/"))
    assert len(keys) >= 8
    referenced = {r[0] for r in ch.query(f"SELECT DISTINCT object_key FROM {DB}.frames").result_rows}
    assert referenced == set(keys)
    orphan = keys[0].rsplit("/", 1)[0] + "/" + "f" * 64 + ".png"
    store.put(orphan, b"no row")
    later = time.time() + 3 * 86_400  # everything is older than the grace period then

    young = expire_frame_objects(ch, DB, store, RetentionSettings(), apply=True)  # now: all too young
    assert (young.objects, young.unreferenced, young.young_kept, young.deleted) == (len(keys) + 1, 1, 1, 0)

    dry = expire_frame_objects(ch, DB, store, RetentionSettings(), apply=False, now=later, batch=3)
    assert (dry.unreferenced, dry.deleted) == (1, 0) and store.exists(orphan)
    done = expire_frame_objects(ch, DB, store, RetentionSettings(), apply=True, now=later, batch=3)
    assert (done.unreferenced, done.deleted) == (1, 1) and not store.exists(orphan)
    assert sorted(store.list("frames/")) == keys

    # the demonstrations policy shorter than their age: no row is live any more, every object goes
    gone = expire_frame_objects(ch, DB, store, RetentionSettings(demonstrations_days=5), apply=True, now=later,
                                batch=3)
    assert (gone.objects, gone.deleted) == (len(keys), len(keys))
    assert list(store.list("frames/")) == []


def test_topics_keep_a_class_no_longer_than_its_policy() -> None:
    ts = TopicSettings(prefix="p", events_retention_hours=72)
    default = {s.name: s.configs.get("retention.ms") for s in topic_specs(ts)}
    assert default["p.events.raw"] == str(72 * 3600 * 1000)  # transport retention shorter than 90 days
    assert default["p.audit"] == "-1" and default["p.heartbeats"] == str(7 * DAY_MS)
    short = {s.name: s.configs.get("retention.ms") for s in topic_specs(
        ts, retention=RetentionSettings(events_days=1, demonstrations_days=2, heartbeats_days=3, audit_days=400))}
    for suffix, klass in RETENTION_CLASS.items():
        want = {"events": DAY_MS, "demonstrations": 2 * DAY_MS, "heartbeats": 3 * DAY_MS,
                "audit": 400 * DAY_MS}[klass]
        assert short[f"p.{suffix}"] == str(want), suffix
    assert short["p.controls"] is None  # compacted state: no time retention


@given(st.one_of(st.just(-1), st.integers(1, 10**12)), st.integers(0, 36_500))
def test_topic_retention_never_exceeds_either_bound(transport_ms: int, days: int) -> None:
    got = topic_retention_ms(transport_ms, days)
    if days:
        assert 0 < got <= days * DAY_MS
    if transport_ms >= 0:
        assert got <= transport_ms or days == 0 and got == transport_ms
        assert got >= 0
    if transport_ms < 0 and days == 0:
        assert got == -1


def test_cli_reports_past_policy_and_apply_fixes_it(tmp_path: Path) -> None:
    from handtrace.cli import app

    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        migrate(client, DB)
        add_events(client, [100, 1])
    finally:
        clickhouse.close(dsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}
    env.update({"HANDTRACE_CLICKHOUSE__DSN": dsn, "HANDTRACE_STATE_DIR": str(tmp_path),
                "HANDTRACE_WAREHOUSE__RETENTION__EVENTS_DAYS": "30",
                "HANDTRACE_STORE__URL": f"file://{tmp_path / 'frames'}"})
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--json"], env=env)
        assert res.exit_code == 1, res.output
        rep = json.loads(res.stdout)
        (ev,) = [t for t in rep["tables"] if t["table"] == "events"]
        assert (ev["past_policy"], ev["ttl"], ev["ttl_matches"], ev["policy_days"]) == (1, "", False, 30)
        assert rep["ok"] is False and rep["frame_objects"]["objects"] == 0

        res = runner.invoke(app, ["db", "retention", "--no-topics", "--apply", "--json"], env=env)
        rep = json.loads(res.stdout)
        assert [c["table"] for c in rep["ttl_changes"] if c["table"] == "events"] == ["events"]
        (ev,) = [t for t in rep["tables"] if t["table"] == "events"]
        assert ev["ttl_matches"] is True
        assert res.exit_code in (0, 1)  # rows past policy go when the mutation/merge ran
        client = clickhouse.connect(dsn)
        client.command(f"ALTER TABLE {DB}.events MATERIALIZE TTL SETTINGS mutations_sync = 2")
        clickhouse.close(dsn)
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--json"], env=env)
        assert res.exit_code == 0, res.output
        rep = json.loads(res.stdout)
        assert rep["ok"] is True and all(t["past_policy"] == 0 for t in rep["tables"])
        res = runner.invoke(app, ["db", "retention", "--no-topics"], env={**env, "COLUMNS": "250"})
        assert res.exit_code == 0, res.output
        line = next(ln for ln in res.stdout.splitlines() if "│ events " in ln)
        assert "toDateTime(captured_at) + toIntervalDay(30)" in line and "30 d" in line
    finally:
        clickhouse.close(dsn)


OWNER = r"""
import signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.core.settings import RetentionSettings
from handtrace.sink.schema import migrate

dsn, db = sys.argv[1:3]
c = clickhouse.connect(dsn)
migrate(c, db, RetentionSettings(events_days=0))
c.command(f"INSERT INTO {db}.events (event_id, employee_key, kind, captured_at) "
          "VALUES (generateUUIDv4(), 'p', 'key', now64(6) - INTERVAL 100 DAY), "
          "(generateUUIDv4(), 'p', 'key', now64(6))")
migrate(c, db, RetentionSettings(events_days=30))  # the sink at start: TTL from the settings
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop)
print("serving", flush=True)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""


def test_report_and_apply_while_the_sink_owns_the_database(tmp_path: Path) -> None:
    """Through the owner's query endpoint: the report works, --apply changes no TTL (the owner
    does at its start) and says so, frame objects are still handled."""
    import subprocess
    import sys

    from handtrace.cli import app

    data = tmp_path / "ch"
    services = str(Path(__file__).resolve().parents[2] / "services")
    proc = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": services})
    try:
        wait_served(proc, data)
        store = LocalStore(tmp_path / "frames")
        store.put("frames/p/ab/" + "ab" * 32 + ".png", b"orphan")
        env = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}
        env.update({"HANDTRACE_CLICKHOUSE__DSN": f"chdb://{data}", "HANDTRACE_STATE_DIR": str(tmp_path),
                    "HANDTRACE_WAREHOUSE__RETENTION__EVENTS_DAYS": "30",
                    "HANDTRACE_STORE__URL": f"file://{tmp_path / 'frames'}"})
        runner = CliRunner()
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--json"], env=env)
        rep = json.loads(res.stdout)
        (ev,) = [t for t in rep["tables"] if t["table"] == "events"]
        assert ev["ttl_matches"] is True and ev["policy_days"] == 30
        assert ev["past_policy"] in (0, 1) and ev["rows"] == ev["past_policy"] + 1  # before/after the merge
        assert rep["frame_objects"] == {"objects": 1, "oldest": rep["frame_objects"]["oldest"], "unreferenced": 1,
                                        "deleted": 0, "young_kept": 1}

        env["HANDTRACE_WAREHOUSE__RETENTION__EVENTS_DAYS"] = "7"
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--apply", "--json"], env=env)
        rep = json.loads(res.stdout)
        assert res.exit_code == 1
        assert rep["ttl_changes"] == []
        assert any("the sink owns the embedded database" in n for n in rep["notes"])
        (ev,) = [t for t in rep["tables"] if t["table"] == "events"]
        assert ev["ttl_matches"] is False and ev["ttl"] == ttl_expression("captured_at", 30)
        res = runner.invoke(app, ["db", "migrate"], env=env)
        assert res.exit_code == 1 and "restart the sink" in res.output
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def test_cli_reports_and_applies_the_fleet_store_too(tmp_path: Path) -> None:
    """Heartbeats live in an embedded dir of their own: the report opens it after the warehouse
    (one embedded dir per process) and --apply sets its TTL from the heartbeats policy."""
    from handtrace.cli import app

    fdsn = f"chdb://{tmp_path / 'clickhouse-fleet'}"
    fc = clickhouse.connect(fdsn)
    try:
        fleet_store.migrate(fc, DB)
        fc.command(f"INSERT INTO {DB}.heartbeats (heartbeat_id, device_id, sent_at) VALUES "
                   "(generateUUIDv4(), 'd', now64(6) - INTERVAL 40 DAY), (generateUUIDv4(), 'd', now64(6))")
    finally:
        clickhouse.close(fdsn)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}
    env.update({"HANDTRACE_STATE_DIR": str(tmp_path), "HANDTRACE_WAREHOUSE__RETENTION__HEARTBEATS_DAYS": "30"})
    runner = CliRunner()
    try:
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--json"], env=env)
        assert res.stdout.startswith("{"), (res.output, res.exception)
        rep = json.loads(res.stdout)
        (hb,) = [t for t in rep["tables"] if t["store"] == "fleet" and t["table"] == "heartbeats"]
        assert (hb["table"], hb["rows"], hb["past_policy"], hb["ttl_matches"]) == ("heartbeats", 2, 1, False)
        assert hb["ttl"] == ttl_expression("sent_at", 90)
        assert rep["ok"] is False
        res = runner.invoke(app, ["db", "retention", "--no-topics", "--apply", "--json"], env=env)
        assert res.stdout.startswith("{"), (res.output, res.exception)
        rep = json.loads(res.stdout)
        assert [c["table"] for c in rep["ttl_changes"]].count("heartbeats") == 1
        (hb,) = [t for t in rep["tables"] if t["store"] == "fleet" and t["table"] == "heartbeats"]
        assert hb["ttl"] == ttl_expression("sent_at", 30) and hb["ttl_matches"] is True
    finally:
        clickhouse.close(fdsn)
        clickhouse.close(f"chdb://{tmp_path / 'clickhouse'}")
