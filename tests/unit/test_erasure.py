"""Erasure with a receipt (core/erasure.py, issue #14 part E) on a real embedded ClickHouse: two
people stored (demonstrations with frames in a local frame store, and events), one erased; the
other untouched; the receipt's counts are what was there; nothing is left; exports containing
the erased person are stale; a failed re-query records no receipt. The owner's fixed erase
operation on the query endpoint is checked against an owner subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from handtrace.core import chserve, clickhouse
from handtrace.core.erasure import ErasureError, NotVerified, count_rows, erase, receipts
from handtrace.core.framestore import LocalStore
from handtrace.export.dataset import stale_exports
from handtrace.export.simulate import seed_demonstrations
from handtrace.sink.schema import ERASABLE, KEPT_AFTER_ERASURE, migrate
from tests.chserve_support import wait_served

DB = "handtrace"
SERVICES = str(Path(__file__).resolve().parents[2] / "services")
T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC)


def add_events(client: Any, employee_key: str, n: int, *, versions: int = 2) -> None:
    """``n`` events of one person, each written ``versions`` times (ReplacingMergeTree keeps
    the duplicates until a merge: every physical copy must go)."""
    for v in range(versions):  # a new received_at each time: not a block the dedup window drops
        rows = [[uuid.UUID(int=int(employee_key[:8], 16) << 64 | i), uuid.UUID(int=1), employee_key, "dev",
                 "key_down", T0 + timedelta(seconds=i), T0 + timedelta(seconds=i, milliseconds=v), "x", i,
                 ord("c"), 2]  # ctrl+c: the shortcut rollup holds them too
                for i in range(n)]
        client.insert(f"{DB}.events", rows, column_names=["event_id", "batch_id", "employee_key", "device_key", "kind",
                                                           "captured_at", "received_at", "app_id", "source_offset",
                                                           "key_code", "modifiers"])


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[tuple[Any, LocalStore, list[str]]]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        migrate(client, DB)
        store = LocalStore(tmp_path / "frames")
        seeded = seed_demonstrations(client, DB, store, n=4, steps=4, participants=2, seed=3, workers=1,
                                     frame_kind="plain")
        for p in seeded.participants:
            add_events(client, p, 7)
        yield client, store, seeded.participants
    finally:
        clickhouse.close(dsn)


def _export_with(client: Any, participants: list[str]) -> str:
    eid = uuid.uuid4()
    client.insert(f"{DB}.dataset_exports", [[eid, T0, T0, "ana", "/exports/x", participants]],
                  column_names=["export_id", "created_at", "finished_at", "actor", "output", "participants"])
    return str(eid)


def test_every_table_with_an_employee_key_is_erased_or_kept_on_purpose(tmp_path: Path) -> None:
    """A new table keyed by person cannot be forgotten: it must be in ERASABLE (or kept, with why)."""
    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        migrate(client, DB)
        keyed = {r[0] for r in client.query(
            "SELECT table FROM system.columns WHERE database = {d:String} AND name = 'employee_key' AND table "
            "NOT IN (SELECT name FROM system.tables WHERE database = {d:String} AND engine = 'MaterializedView')",
            parameters={"d": DB}).result_rows}
    finally:
        clickhouse.close(dsn)
    assert keyed, "no table has an employee_key column: the check below would prove nothing"
    assert keyed == set(ERASABLE) | set(KEPT_AFTER_ERASURE), (
        f"not in sink.schema.ERASABLE nor KEPT_AFTER_ERASURE: {sorted(keyed - set(ERASABLE) - set(KEPT_AFTER_ERASURE))}"
        f"; listed but without an employee_key column: {sorted((set(ERASABLE) | set(KEPT_AFTER_ERASURE)) - keyed)}")
    assert not set(ERASABLE) & set(KEPT_AFTER_ERASURE)


def test_one_person_is_erased_with_a_receipt_and_the_other_is_untouched(
        warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, (gone, kept) = warehouse
    export = _export_with(client, [gone, kept])
    before = {p: count_rows(client, DB, p, ERASABLE) for p in (gone, kept)}
    objects = {p: sorted(store.list(f"frames/{p}/")) for p in (gone, kept)}
    assert all(before[p][t] > 0 for p in (gone, kept) for t in ERASABLE), before
    assert before[gone]["events"] == 14 and all(objects.values())
    steps: list[str] = []
    r = erase(client, DB, store, gone, actor=" dpo-1 ", reason="Art. 17 request #12", tables=ERASABLE,
              suppress=lambda eid: steps.append(f"suppress {eid}"), progress=steps.append,
              settle=lambda: steps.append("settle") is None)

    # the suppression goes out, then the pipeline settles, then anything is deleted
    assert steps[0] == f"suppress {r.erasure_control_id}" and steps[2] == "settle"
    assert steps[3].startswith("rows deleted from") and r.settled
    assert r.rows_removed == before[gone] and r.objects_removed == len(objects[gone]) and r.found
    assert count_rows(client, DB, gone, ERASABLE) == dict.fromkeys(ERASABLE, 0)
    assert list(store.list(f"frames/{gone}/")) == []
    assert count_rows(client, DB, kept, ERASABLE) == before[kept]
    assert sorted(store.list(f"frames/{kept}/")) == objects[kept]
    assert r.actor == "dpo-1" and r.verified_at >= r.requested_at

    (row,) = receipts(client, DB)
    assert row["receipt_id"] == r.receipt_id and row["employee_key"] == gone and row["actor"] == "dpo-1"
    assert row["reason"] == "Art. 17 request #12" and row["objects_removed"] == len(objects[gone])
    assert {k: int(v) for k, v in row["rows_removed"].items()} == before[gone]
    assert row["erasure_control_id"] == r.erasure_control_id and row["withdrawal_id"] == r.withdrawal_id
    assert row["settled"] is True
    withdrawn = client.query(f"SELECT toString(withdrawal_id), kind, employee_key FROM {DB}.withdrawals").result_rows
    assert withdrawn == [(r.withdrawal_id, "participant", gone)]
    (stale,) = stale_exports(client, DB)
    assert stale.export_id == export and stale.participants == [gone]
    assert any("rows deleted from events: 14" in s for s in steps) and any("verified" in s for s in steps)


def test_a_person_never_stored_gets_the_suppression_and_an_empty_receipt(
        warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, people = warehouse
    sent: list[str] = []
    r = erase(client, DB, store, "ab" * 16, actor="dpo-1", reason="r", tables=ERASABLE, suppress=sent.append)
    assert sent == [r.erasure_control_id] and not r.found and not r.settled  # no settle step: not claimed
    assert r.rows_removed == dict.fromkeys(ERASABLE, 0) and r.objects_removed == 0
    assert all(sum(count_rows(client, DB, p, ERASABLE).values()) > 0 for p in people)


def test_rows_left_after_the_deletion_fail_loudly_and_record_no_receipt(
        warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, (gone, _kept) = warehouse
    with pytest.raises(NotVerified, match="still there: no receipt recorded"):
        erase(client, DB, store, gone, actor="dpo-1", reason="r", tables=ERASABLE, suppress=lambda _e: None,
              delete=lambda key: count_rows(client, DB, key, ERASABLE))  # "deletes" nothing
    assert receipts(client, DB) == []
    assert client.query(f"SELECT count() FROM {DB}.withdrawals").first_row[0] == 0


def test_a_receipt_that_cannot_be_written_says_the_person_is_erased_all_the_same(
        warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, (gone, _kept) = warehouse
    client.command(f"DROP TABLE {DB}.erasure_receipts")  # a sink from before migration 11
    with pytest.raises(ErasureError, match=r"is erased \(verified 0 rows, 0 objects\) but the receipt could not"):
        erase(client, DB, store, gone, actor="dpo-1", reason="r", tables=ERASABLE, suppress=lambda _e: None)
    assert count_rows(client, DB, gone, ERASABLE) == dict.fromkeys(ERASABLE, 0)


def test_objects_left_after_the_deletion_fail_loudly_too(warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, (gone, _kept) = warehouse

    class StubbornStore:
        def list(self, prefix: str) -> Any:
            return store.list(prefix)

        def delete_prefix(self, prefix: str) -> int:
            return 0

    with pytest.raises(NotVerified, match="objects under"):
        erase(client, DB, StubbornStore(), gone, actor="dpo-1", reason="r", tables=ERASABLE, suppress=lambda _e: None)
    assert receipts(client, DB) == []


@pytest.mark.parametrize(("actor", "reason"), [("", "r"), ("dpo", "  "), (" ", "")])
def test_blank_actor_or_reason_is_refused_before_anything_happens(warehouse: tuple[Any, LocalStore, list[str]],
                                                                 actor: str, reason: str) -> None:
    client, store, (gone, _kept) = warehouse
    sent: list[str] = []
    with pytest.raises(ErasureError, match="--actor and --reason"):
        erase(client, DB, store, gone, actor=actor, reason=reason, tables=ERASABLE, suppress=sent.append)
    assert sent == [] and count_rows(client, DB, gone, ERASABLE)["events"] == 14


def test_no_suppression_no_deletion(warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, (gone, _kept) = warehouse

    def broker_down(_eid: str) -> None:
        raise ErasureError("the suppression could not be sent (broker down); nothing was deleted")

    with pytest.raises(ErasureError, match="nothing was deleted"):
        erase(client, DB, store, gone, actor="dpo-1", reason="r", tables=ERASABLE, suppress=broker_down)
    assert count_rows(client, DB, gone, ERASABLE)["events"] == 14 and list(store.list(f"frames/{gone}/"))


def test_a_key_that_is_not_a_pseudonym_never_reaches_a_statement(
        warehouse: tuple[Any, LocalStore, list[str]]) -> None:
    client, store, _people = warehouse
    for key in ("' OR 1=1 --", "", "ABCDEF0123456789", "x" * 40):
        with pytest.raises(ValueError, match="not an employee pseudonym"):
            erase(client, DB, store, key, actor="a", reason="r", tables=ERASABLE, suppress=lambda _e: None)


# ---------------------------------------------------------------- through the owner's endpoint

OWNER = r"""
import signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.sink.schema import ERASABLE, migrate
sys.path.insert(0, sys.argv[3])
from tests.unit.test_erasure import add_events

dsn, db = sys.argv[1:3]
client = clickhouse.connect(dsn)
migrate(client, db)
for key in ("aa" * 16, "bb" * 16):
    add_events(client, key, 5)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop, erasable=ERASABLE, database=db)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""


def test_the_owner_erases_for_another_process_and_only_by_pseudonym(tmp_path: Path) -> None:
    data = tmp_path / "ch"
    root = str(Path(__file__).resolve().parents[2])
    proc = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB, root],
                            env={**os.environ, "PYTHONPATH": f"{SERVICES}:{root}"}, stderr=subprocess.PIPE)
    try:
        wait_served(proc, data)
        remote = clickhouse.open_for_cli(f"chdb://{data}")
        assert clickhouse.is_remote(remote)
        with pytest.raises(chserve.StatementRefused, match="not an employee pseudonym"):
            remote.erase("' OR 1=1 --")
        with pytest.raises(chserve.StatementRefused):
            remote.command(f"ALTER TABLE {DB}.events DELETE WHERE 1 SETTINGS mutations_sync = 2")
        r = erase(remote, DB, None, "aa" * 16, actor="dpo-1", reason="r", tables=ERASABLE,
                  suppress=lambda _e: None, delete=remote.erase)
        rollups = {"rollup_app_activity_hourly", "rollup_shortcuts_hourly"}  # rows: how many parts, not merged yet
        assert {t: n for t, n in r.rows_removed.items() if t not in rollups} == {
            **dict.fromkeys(set(ERASABLE) - rollups, 0), "events": 10}
        assert all(r.rows_removed[t] > 0 for t in rollups), r.rows_removed
        assert count_rows(remote, DB, "aa" * 16, ERASABLE)["events"] == 0
        assert count_rows(remote, DB, "bb" * 16, ERASABLE)["events"] == 10
        assert [x["receipt_id"] for x in receipts(remote, DB)] == [r.receipt_id]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
