"""Queries while the pipeline runs (control plane part 3 A): the sink process owns the embedded
data dir and serves it; ``handtrace query`` and the dataset CLI (separate processes) read and
record through it, writes are refused with the statement kind, and the endpoint is gone after the
sink stops. ``handtrace sql`` runs its tier in the sink (``/v1/sql``): a researcher reads masked
demonstration text while the sink runs, and the sink writes the audit row with the OS user
(issue #14 Part Q)."""

from __future__ import annotations

import getpass
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from handtrace.core import chserve, clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.settings import Settings, settings_env
from handtrace.sink.schema import migrate
from tests.factories import make_batch
from tests.integration.conftest import producer, start_sink_process, topics_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "handtrace.cli", *args],  # noqa: S603
                          env=env, capture_output=True, text=True, timeout=120, check=False)


def served_count(s: Settings) -> int:
    r = cli(s, "query", f"SELECT count() AS n FROM {s.clickhouse.database}.events", "--format", "json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["n"])


def test_handtrace_query_answers_while_the_sink_runs(settings_factory, stream_worker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()
    t = topics_of(s)
    db = s.clickhouse.database
    data = Path(clickhouse.embedded_path(s.clickhouse_dsn()) or "")
    worker = stream_worker(s)
    p = producer(s)
    for b in range(4):
        payload, _ = make_batch(f"emp-{b}", 100, seed=b, seq=b)
        p.produce(t.events, key=f"emp-{b}".encode(), value=payload)
    assert p.flush(30) == 0

    # demonstration events typed before the sink starts (now: within the retention the sink applies)
    owner = clickhouse.connect(s.clickhouse_dsn())
    try:
        migrate(owner, db)
        owner.command(f"INSERT INTO {db}.demonstration_events (event_id, employee_key, kind, captured_at, "
                      "received_at, text, text_masked) "
                      "VALUES (generateUUIDv4(), 'emp-1', 'key', now64(6), now64(6), '•••', 1), "
                      "(generateUUIDv4(), 'emp-1', 'key', now64(6), now64(6), 'UNMASKED', 0)")
    finally:
        clickhouse.close(s.clickhouse_dsn())

    log = tmp_path / "sink.log"
    sink = start_sink_process(s, log)
    try:
        wait_for(lambda: (data / chserve.ENDPOINT_FILE).exists(), 120, "the sink to serve its data dir",
                 lambda: log.read_text()[-3000:])
        wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
                 and group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 120, "the pipeline to store the events",
                 worker.tail)
        wait_for(lambda: served_count(s) > 0, 30, "the events to be visible through the endpoint")
        n = served_count(s)

        refused = cli(s, "query", f"DROP TABLE {db}.events")
        assert refused.returncode == 1
        assert "DROP statement refused" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
        assert served_count(s) == n

        withdrawn = cli(s, "dataset", "withdraw", "--participant", "pk-1", "--actor", "ops", "--reason", "asked")
        assert withdrawn.returncode == 0, withdrawn.stderr
        listed = cli(s, "dataset", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        w = cli(s, "query", f"SELECT employee_key, actor FROM {db}.withdrawals", "--format", "csv")
        assert w.returncode == 0 and w.stdout.splitlines()[1:] == ["pk-1,ops"], (w.stdout, w.stderr)
        history = cli(s, "control", "policy", "history", "--json")
        assert history.returncode == 0 and json.loads(history.stdout) == [], history.stderr

        for role in chserve.TIERED_ROLES:  # no endpoint_groups: every role file is the sink user's alone
            assert (data / f"query.{role}.endpoint").stat().st_mode & 0o777 == 0o600
        masked = cli(s, "sql", "--role", "researcher", "--purpose", "integration", "--actor", "rey", "--format",
                     "json", f"SELECT text FROM {db}.demonstration_events")
        assert masked.returncode == 0, masked.stderr
        assert [json.loads(line) for line in masked.stdout.splitlines()] == [{"text": "•••"}]
        raw = cli(s, "sql", "--role", "analyst", f"SELECT text FROM {db}.demonstration_events")
        assert raw.returncode == 1 and "not readable by analysts" in raw.stderr, raw.stderr
        audit = cli(s, "sql", "--role", "auditor", "--format", "json",
                    f"SELECT role, actor, os_user, outcome FROM {db}.access_audit WHERE role != 'auditor' "
                    "AND role != 'admin' ORDER BY at")
        assert audit.returncode == 0, audit.stderr
        assert [json.loads(line) for line in audit.stdout.splitlines()] == [
            {"role": "researcher", "actor": "rey", "os_user": getpass.getuser(), "outcome": "allowed"},
            {"role": "analyst", "actor": getpass.getuser(), "os_user": getpass.getuser(), "outcome": "refused"}]
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(60)
    assert sink.returncode == 0, log.read_text()[-3000:]
    assert not (data / chserve.ENDPOINT_FILE).exists(), "a clean stop removes the endpoint"

    c = clickhouse.connect(s.clickhouse_dsn())  # the dir is free again: the served count was the real one
    try:
        assert c.query(f"SELECT count() FROM {db}.events").result_rows[0][0] == n
    finally:
        clickhouse.close(s.clickhouse_dsn())
