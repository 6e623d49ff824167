"""The control-plane audit trail through the real broker into the real embedded ClickHouse (issue
#13, "Audit"): entries written the way the API writes them land in ``control_audit`` exactly once
although the sink process is SIGKILLed mid-stream again and again; a message that is not an entry
is kept as ``invalid`` with its text; ``handtrace control policy history`` shows them (also
while the sink runs, through the endpoint it serves); a grant made through the API with the real
services reaches ``control_audit``."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from handtrace.control.api.auth import Principal
from handtrace.control.api.roles import Role
from handtrace.control.api.services import KafkaAudit, audit_entry
from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.settings import Settings, settings_env
from handtrace.sink.audit import INVALID, AuditWriter
from tests.integration.conftest import producer, start_sink_process, topics_of, wait_for
from tests.unit.api_support import ISSUER, bearer, jwks, mint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]

ENTRIES = 600
BAD = b'{"subject": "mallory", "action": "policy_sampling"'  # cut short: not JSON


def rows(s: Settings, sql: str) -> list[tuple[Any, ...]]:
    return list(clickhouse.connect(s.clickhouse_dsn()).query(sql).result_rows)


def history(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "handtrace.cli", "control", "policy", "history", *args],  # noqa: S603
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def test_audit_entries_land_exactly_once_across_sigkills_and_policy_history_shows_them(
        settings_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory(sink={"audit_batch_messages": 7})
    topic, group = topics_of(s).audit, s.sink.audit_group_id
    audit = KafkaAudit(s)
    people = [Principal(f"user-{i}", f"e-{i}", frozenset({Role.hr} if i % 2 else {Role.ops}), f"User {i}")
              for i in range(5)]
    for i in range(ENTRIES):
        who = people[i % 5]
        audit.record(audit_entry(who, action="exemption_grant" if i % 2 else "policy_sampling",
                                 target=f"emp-{i}", reason=f"reason {i}",
                                 outcome="refused" if i % 7 == 0 else "allowed",
                                 before={"rate": i / 1000}, after={"rate": (i + 1) / 1000}, method="PUT",
                                 path="/api/v1/policy/sampling"))
        if i == ENTRIES // 2:
            p = producer(s)
            p.produce(topic, key=b"mallory", value=BAD)
            assert p.flush(30) == 0
    total = ENTRIES + 1
    assert group_lag(s.kafka, group, topic) == total

    log = tmp_path / "sink.log"
    rng = random.Random(3)
    kills, at_kill = 0, []
    for _ in range(4):
        before = group_lag(s.kafka, group, topic)
        if before == 0:
            break
        proc = start_sink_process(s, log)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and group_lag(s.kafka, group, topic) >= before and proc.poll() is None:
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere between a ledger row, its insert and its commit
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        at_kill.append(group_lag(s.kafka, group, topic))
    assert kills >= 2, f"the sink should have been killed mid-stream at least twice (lag at kills: {at_kill})"
    assert any(0 < n < total for n in at_kill), f"no kill mid-stream (lag at each kill: {at_kill})"
    print("lag at each kill:", at_kill, "of", total)

    final = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, group, topic) == 0, 120, "the sink to store the whole trail",
                 lambda: log.read_text()[-3000:])
        # The sink owns the data dir and serves it. Committed offsets can run ahead of what this
        # process has re-inserted of its last ledger range at start-up, so poll (exactly once is
        # checked below, after it stops).
        seen: list[int] = []

        def served_all() -> bool:
            served = history(s, "--json", "--limit", "5000")
            assert served.returncode == 0, served.stderr
            seen.append(len(json.loads(served.stdout)))
            return seen[-1] == total

        wait_for(served_all, 60, "policy history through the sink's endpoint to show the whole trail",
                 lambda: f"counts seen: {seen}")
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(30)
    assert final.returncode == 0, log.read_text()[-3000:]

    db = s.clickhouse.database
    try:
        (n, offsets, lo, hi), = rows(s, f"SELECT count(), uniqExact(source_offset), min(source_offset), "
                                        f"max(source_offset) FROM {db}.control_audit")
        assert (n, offsets, lo, hi) == (total, total, 0, total - 1), "every message exactly once"
        (bad,) = rows(s, f"SELECT subject, action, outcome, reason, detail FROM {db}.control_audit "
                         f"WHERE action = '{INVALID}'")
        assert bad == ("mallory", INVALID, INVALID, "not JSON", BAD.decode())
        row = rows(s, f"SELECT subject, name, roles, action, target, reason, before, after, outcome "
                      f"FROM {db}.control_audit WHERE target = 'emp-13'")
        assert row == [("user-3", "User 3", ["hr"], "exemption_grant", "emp-13", "reason 13",
                        '{"rate": 0.013}', '{"rate": 0.014}', "allowed")]
    finally:
        clickhouse.close(s.clickhouse_dsn())

    shown = history(s, "--json", "--limit", "5000")
    assert shown.returncode == 0, shown.stderr
    trail = json.loads(shown.stdout)
    assert len(trail) == total
    ats = [e["at"] for e in trail]
    assert ats == sorted(ats, reverse=True), "newest first"
    newest = trail[0]
    assert (newest["subject"], newest["roles"], newest["action"], newest["target"], newest["reason"],
            newest["before"], newest["after"], newest["outcome"]) == (
        "user-4", ["ops"], "exemption_grant", f"emp-{ENTRIES - 1}", f"reason {ENTRIES - 1}",
        {"rate": (ENTRIES - 1) / 1000}, {"rate": ENTRIES / 1000}, "allowed")
    grants = history(s, "--json", "--action", "exemption_grant", "--limit", "3")
    assert [e["target"] for e in json.loads(grants.stdout)] == ["emp-599", "emp-597", "emp-595"]
    invalid = json.loads(history(s, "--json", "--action", "invalid").stdout)
    assert [(e["subject"], e["detail"]) for e in invalid] == [("mallory", BAD.decode())]
    table = history(s, "--limit", "2")
    assert table.returncode == 0 and "exemption_grant" in table.stdout and "user-4" in table.stdout, table.stdout


@pytest.fixture
def audit_writer() -> Iterator[Callable[[Settings], AuditWriter]]:
    """Factory: an AuditWriter in a thread of this test (stopped and ClickHouse closed at teardown)."""
    started: list[tuple[threading.Event, threading.Thread, str]] = []

    def start(s: Settings) -> AuditWriter:
        w = AuditWriter.on_clickhouse(s, clickhouse.connect(s.clickhouse_dsn()))
        stop = threading.Event()
        th = threading.Thread(target=w.run, args=(stop,), daemon=True)
        th.start()
        started.append((stop, th, s.clickhouse_dsn()))
        return w

    yield start
    for stop, th, _dsn in started:
        stop.set()
        th.join(30)
        assert not th.is_alive(), "the audit writer did not stop"
    for dsn in {x[2] for x in started}:
        clickhouse.close(dsn)


def test_a_grant_through_the_api_reaches_control_audit(  # type: ignore[no-untyped-def]
    settings_factory, audit_writer, api_client, tmp_path: Path
) -> None:
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks()))
    s = settings_factory(api={"jwks_file": str(jwks_file), "issuer": ISSUER, "read_timeout_s": 20})
    client = api_client(s)
    hr = bearer(mint("harriet", ["hr"]))
    r = client.post("/api/v1/me/exemption-requests", headers=bearer(mint("emp-x", [])),
                    json={"reason": "works council member"})
    assert r.status_code == 202, r.text
    assert client.get("/api/v1/exemption-requests", headers=bearer(mint("emp-y", []))).status_code == 403
    r = client.post("/api/v1/exemptions/emp-x/grant", headers=hr, json={"reason": "approved by HR"})
    assert r.status_code == 202, r.text

    w = audit_writer(s)
    wait_for(lambda: w.rows_inserted == 3 and group_lag(s.kafka, s.sink.audit_group_id, topics_of(s).audit) == 0,
             60, "the three entries stored and committed")
    got = rows(s, f"SELECT subject, roles, action, target, reason, before, after, outcome "
                  f"FROM {s.clickhouse.database}.control_audit ORDER BY source_offset")
    assert [(g[0], g[2], g[7]) for g in got] == [
        ("emp-x", "exemption_request", "allowed"), ("emp-y", "exemptions", "refused"),
        ("harriet", "exemption_grant", "allowed")]
    grant = got[2]
    assert grant[1] == ["employee", "hr"] and grant[3:5] == ("emp-x", "approved by HR")
    assert json.loads(grant[5])["mode"] == "capturing" and json.loads(grant[6])["mode"] == "exempt"


class Died(BaseException):
    """Stands in for the process dying right after an insert returned (before its commit)."""


def test_a_death_between_insert_and_commit_is_replayed_once_even_when_batches_differ(
        settings_factory, audit_writer) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()
    topic, group = topics_of(s).audit, s.sink.audit_group_id
    audit = KafkaAudit(s)
    who = Principal("olga", "e-o", frozenset({Role.ops}), "Olga")

    def record(i: int) -> None:
        audit.record(audit_entry(who, action="policy_sampling", target="policy", reason=f"r{i}", outcome="allowed",
                                 before={"v": i}, after={"v": i + 1}))

    for i in range(5):
        record(i)
    first = AuditWriter.on_clickhouse(s, clickhouse.connect(s.clickhouse_dsn()))
    inner = first.store.insert

    def insert_then_die(rows_: Any, token: str) -> None:
        inner(rows_, token)
        raise Died

    first.store.insert = insert_then_die  # type: ignore[method-assign]
    died: list[BaseException] = []

    def run() -> None:
        try:
            first.run(threading.Event())
        except Died as e:
            died.append(e)

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(60)
    assert died and not th.is_alive(), "the first writer should have died after its insert"
    assert group_lag(s.kafka, group, topic) == 5, "nothing committed"
    # More entries: the next writer reads all ten in one poll, a batch the first never made.
    for i in range(5, 10):
        record(i)
    w = audit_writer(s)
    wait_for(lambda: group_lag(s.kafka, group, topic) == 0, 60, "the second writer to catch up")
    got = rows(s, f"SELECT source_offset, reason FROM {s.clickhouse.database}.control_audit ORDER BY source_offset")
    assert got == [(i, f"r{i}") for i in range(10)], "each entry exactly once"
    assert w.rows_inserted == 10  # the replayed five went in again under their token (dropped by ClickHouse)
