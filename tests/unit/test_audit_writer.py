"""The sink's audit writer without I/O (issue #13, "Audit"): entries as the API writes them become
``control_audit`` rows, anything else is kept as ``invalid`` with its text, and a crash at any
point followed by a restart (which re-reads whatever was not committed, in other batches) stores
every message exactly once.

The fake store keeps ClickHouse's one promise the writer relies on -- an insert repeating a token
is dropped -- and nothing else."""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.control.api.auth import Principal
from handtrace.control.api.roles import Role
from handtrace.control.api.services import audit_entry
from handtrace.core.settings import Settings
from handtrace.sink import metrics
from handtrace.sink.audit import (
    AUDIT_SCHEMA,
    INVALID,
    MAX_DETAIL,
    AuditMessage,
    AuditWriter,
    batch_token,
    decode_batch,
)
from handtrace.sink.split import Stopped

TOPIC = "t.audit"
HR = Principal(subject="harriet", employee_id="e-h", roles=frozenset({Role.hr, Role.employee}), name="Harriet H")


def entry(i: int, **kw: Any) -> bytes:
    e = audit_entry(HR, action="exemption_grant", target=f"emp-{i}", reason=f"approved {i}", outcome="allowed",
                    before="capturing", after={"mode": "exempt", "n": i}, method="POST",
                    path=f"/api/v1/exemptions/emp-{i}/grant")
    return json.dumps({**e, **kw}, default=str, sort_keys=True).encode()


def msg(offset: int, value: bytes | None, key: bytes | None = b"harriet", p: int = 0) -> AuditMessage:
    return AuditMessage(p, offset, key, value, 1_700_000_000_000_000 + offset)


def test_an_api_entry_becomes_its_row() -> None:
    raw = entry(7)
    table, invalid = decode_batch([msg(42, raw)])
    assert invalid == 0 and table.schema.equals(AUDIT_SCHEMA)
    (row,) = table.to_pylist()
    e = json.loads(raw)
    assert row["at"].timestamp() * 1_000_000 == pytest.approx(e["at_us"])
    assert (row["subject"], row["name"], row["roles"]) == ("harriet", "Harriet H", ["employee", "hr"])
    assert (row["action"], row["target"], row["reason"], row["outcome"]) == (
        "exemption_grant", "emp-7", "approved 7", "allowed")
    assert json.loads(row["before"]) == "capturing" and json.loads(row["after"]) == {"mode": "exempt", "n": 7}
    assert (row["method"], row["path"]) == ("POST", "/api/v1/exemptions/emp-7/grant")
    assert (row["source_partition"], row["source_offset"]) == (0, 42)


@pytest.mark.parametrize(("value", "why"), [
    (b"{not json", "not JSON"),
    (b"\xff\xfe binary", "not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (b"", "not JSON"),
    (None, "not JSON"),
    (json.dumps({"subject": "x"}).encode(), "at_us missing or not a time"),
    (entry(1, at_us="yesterday"), "at_us missing or not a time"),
    (entry(1, at_us=10**18), "at_us missing or not a time"),
    (entry(1, subject=""), "subject missing or not a string"),
    (entry(1, action=None), "action missing or not a string"),
    (entry(1, outcome="maybe"), "outcome not allowed or refused"),
    (entry(1, roles="hr"), "roles missing or not a list of strings"),
    (entry(1, target=5), "target not a string"),
    (entry(1, reason=["x"]), "reason not a string"),
])
def test_what_is_not_an_entry_is_kept_as_invalid_with_its_text(value: bytes | None, why: str) -> None:
    table, invalid = decode_batch([msg(0, entry(0)), msg(1, value, key=b"mallory"), msg(2, entry(2))])
    assert invalid == 1 and table.num_rows == 3
    good0, bad, good2 = table.to_pylist()
    assert good0["action"] == good2["action"] == "exemption_grant"
    assert (bad["action"], bad["outcome"], bad["reason"], bad["subject"]) == (INVALID, INVALID, why, "mallory")
    assert bad["source_offset"] == 1
    assert bad["at"].timestamp() == pytest.approx(1_700_000_000.000001)
    if value:
        assert bad["detail"] == value.decode("utf-8", errors="backslashreplace")


def test_a_huge_invalid_message_is_cut_not_dropped() -> None:
    table, invalid = decode_batch([msg(0, b"x" * (MAX_DETAIL * 3))])
    assert invalid == 1 and table.column("detail")[0].as_py() == "x" * MAX_DETAIL


def test_the_token_names_topic_partition_and_range() -> None:
    assert batch_token("p.audit", 0, 10, 19) == "p.audit/0/10-19"
    assert len({batch_token(TOPIC, p, lo, hi) for p in (0, 1) for lo in (0, 1) for hi in (5, 6)}) == 8


# ------------------------------------------------------------------ crash and replay


class Crash(BaseException):
    """Stands in for the process dying (SIGKILL) at a chosen call."""


class FakeStore:
    """control_audit and sink_ledger in memory; an insert repeating a token is dropped. Call number
    ``crash_at`` (ledger writes and inserts counted together) crashes before or after it acts."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.ledger: list[tuple[int, int, int, str]] = []
        self.tokens: set[str] = set()
        self.calls = 0
        self.crash_at: int | None = None
        self.crash_after = False

    def _call(self, act: Any) -> None:
        self.calls += 1
        if self.calls == self.crash_at and not self.crash_after:
            raise Crash
        act()
        if self.calls == self.crash_at:
            raise Crash

    def last_flush(self, topic: str, partition: int) -> tuple[int, int, str] | None:
        mine = [r for r in self.ledger if r[0] == partition]
        if not mine:
            return None
        _p, lo, hi, token = max(mine, key=lambda r: r[2])
        return lo, hi, token

    def record_flush(self, topic: str, partition: int, first: int, last: int, rows: int, token: str) -> None:
        assert topic == TOPIC and rows == last - first + 1
        self._call(lambda: self.ledger.append((partition, first, last, token)))

    def insert(self, rows: pa.Table, token: str) -> None:
        def act() -> None:
            if token not in self.tokens:
                self.tokens.add(token)
                self.rows.extend(rows.to_pylist())
        self._call(act)


def writer(store: FakeStore) -> AuditWriter:
    s = Settings(topics={"prefix": "t"})
    return AuditWriter(s, store, group_id="g")


def consume(store: FakeStore, msgs: list[AuditMessage], committed: int, cuts: list[int]) -> int:
    """One life of the writer: reads from ``committed`` in polls cut at ``cuts``; returns the
    committed offset when it ends (a Crash leaves the last commit)."""
    w = writer(store)
    w.assign(0)
    rest = [m for m in msgs if m.offset >= committed]
    bounds = sorted({0, len(rest), *(c % (len(rest) + 1) for c in cuts)})
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            at = w.handle(0, rest[a:b])
            if at is not None:
                assert at >= committed
                committed = at
        if w.end_replay(0):  # the partition's end
            committed = w._parts[0].hwm + 1
    except Crash:
        pass
    return committed


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(1, 30), bad=st.sets(st.integers(0, 29)), cuts1=st.lists(st.integers(0, 40), max_size=6),
       cuts2=st.lists(st.integers(0, 40), max_size=6), cuts3=st.lists(st.integers(0, 40), max_size=6),
       crash=st.integers(1, 12), after=st.booleans(), crash2=st.integers(1, 12), after2=st.booleans())
def test_crashes_anywhere_then_restarts_store_every_message_exactly_once(
        n: int, bad: set[int], cuts1: list[int], cuts2: list[int], cuts3: list[int], crash: int, after: bool,
        crash2: int, after2: bool) -> None:
    msgs = [msg(i, b"garbage %d" % i if i in bad else entry(i)) for i in range(n)]
    store = FakeStore()
    store.crash_at, store.crash_after = crash, after
    committed = consume(store, msgs, 0, cuts1)
    store.crash_at, store.crash_after, store.calls = crash2, after2, 0
    committed = consume(store, msgs, committed, cuts2)
    store.crash_at = None
    committed = consume(store, msgs, committed, cuts3)
    assert committed == n
    assert sorted(r["source_offset"] for r in store.rows) == list(range(n))
    invalid = sorted(r["source_offset"] for r in store.rows if r["action"] == INVALID)
    assert invalid == sorted(i for i in bad if i < n)


def test_a_restart_skips_what_was_stored_and_counts_it() -> None:
    store = FakeStore()
    msgs = [msg(i, entry(i)) for i in range(10)]
    assert consume(store, msgs, 0, [4]) == 10
    before = metrics.AUDIT_ENTRIES.labels("duplicate")._value.get()
    assert consume(store, msgs, 0, [3, 7]) == 10  # the commit was lost: everything again
    assert len(store.rows) == 10
    # 0..3 skipped (before the last ledger range); 4..9 inserted again under their token (dropped)
    assert metrics.AUDIT_ENTRIES.labels("duplicate")._value.get() - before == 4


class Refusing(FakeStore):
    """ClickHouse refuses the first insert of each token as bad data (Code: 53)."""

    def insert(self, rows: pa.Table, token: str) -> None:
        if not token.endswith("/refused"):
            raise RuntimeError("Code: 53. DB::Exception: Type mismatch")
        super().insert(rows, token)


def test_rows_clickhouse_refuses_are_kept_as_invalid() -> None:
    store = Refusing()
    msgs = [msg(i, entry(i)) for i in range(3)]
    assert consume(store, msgs, 0, []) == 3
    assert [(r["source_offset"], r["action"], r["reason"]) for r in store.rows] == [
        (i, INVALID, "refused:TYPE_MISMATCH") for i in range(3)]
    assert json.loads(store.rows[0]["detail"])["target"] == "emp-0"


def test_an_outage_is_waited_out_and_a_stop_interrupts_the_wait() -> None:
    class Down(FakeStore):
        def insert(self, rows: pa.Table, token: str) -> None:
            raise ConnectionRefusedError("ClickHouse is down")

    w = writer(Down())
    w._stop.set()
    with pytest.raises(Stopped):
        w.handle(0, [msg(0, entry(0))])
