"""Splitting a flush that ClickHouse refuses (issue #10, class 2), against a fake of the client
that refuses any insert block holding a row marked bad, deduplicates by token like
``insert_deduplication_token``, and refuses blocks spanning too many partitions like the server.

Invariants (hypothesis): every good row is inserted exactly once, every bad row is rejected
(dead-lettered) and never inserted -- also when the process dies at any callback and a replay
runs from the recorded ledger decisions, even with other settings or a server that now behaves
differently."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.sink.errors import TOO_MANY_PARTITIONS
from handtrace.sink.split import (
    DEAD_LETTERED,
    Decision,
    FlushSplitter,
    Piece,
    Stopped,
    children,
    distinct_months,
)

BASE = dt.datetime(2026, 1, 10, tzinfo=dt.UTC)


class Crash(BaseException):
    """The process dies here."""


def make_rows(spec: list[tuple[int, int, bool]]) -> pa.Table:
    """Rows (source offset, months after BASE, bad?) with unique 16-byte event ids."""
    caps = [BASE.replace(year=BASE.year + (BASE.month - 1 + m) // 12, month=(BASE.month - 1 + m) % 12 + 1)
            for _, m, _ in spec]
    return pa.table({
        "event_id": pa.array([i.to_bytes(16, "big") for i in range(len(spec))], pa.binary(16)),
        "source_offset": pa.array([o for o, _, _ in spec], pa.int64()),
        "source_partition": pa.array([0] * len(spec), pa.int32()),
        "captured_at": pa.array(caps, pa.timestamp("us", tz="UTC")),
        "bad": pa.array([b for _, _, b in spec]),
    })


def ids(t: pa.Table) -> list[int]:
    return [int.from_bytes(b, "big") for b in t.column("event_id").to_pylist()]


@dataclass
class FakeClickHouse:
    """Refuses blocks with a bad row (TYPE_MISMATCH) or too many partitions (252); drops a
    repeated token like insert_deduplication_token; ``weird`` rows fail with an unclassified
    error while ``weird_until`` more calls remain."""

    max_partitions: int = 100
    weird_calls: int = 0
    blocks: dict[str, list[int]] = field(default_factory=dict)
    calls: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def insert(self, piece: Piece, token: str) -> None:
        self.calls += 1
        if token in self.blocks:
            return
        if distinct_months(piece.rows) > self.max_partitions:
            self.refused["partitions"] += 1
            raise DatabaseError(f"Code: 252. DB::Exception: Too many partitions for single INSERT block "
                                f"(more than {self.max_partitions}). (TOO_MANY_PARTS)", code=252)
        if pc.any(piece.rows.column("bad")).as_py():
            self.refused["bad"] += 1
            raise DatabaseError("Code: 53. DB::Exception: Type mismatch. (TYPE_MISMATCH)", code=53)
        if self.weird_calls > 0:
            self.weird_calls -= 1
            raise RuntimeError("something nobody classified")
        self.blocks[token] = ids(piece.rows)

    def stored(self) -> Counter[int]:
        return Counter(i for rows in self.blocks.values() for i in rows)


@dataclass
class Harness:
    ch: FakeClickHouse
    ledger: list[tuple[str, Decision]] = field(default_factory=list)
    dead: list[tuple[str, list[int]]] = field(default_factory=list)
    waits: int = 0
    crash_at: int | None = None
    crash_after_effect: bool = False
    steps: int = 0

    def _step(self, effect: Callable[[], object]) -> None:
        self.steps += 1
        if self.crash_at is not None and self.steps == self.crash_at:
            if self.crash_after_effect:
                effect()
            raise Crash
        effect()

    def insert(self, piece: Piece, token: str) -> None:
        self._step(lambda: self.ch.insert(piece, token))

    def record(self, piece: Piece, d: Decision) -> None:
        self._step(lambda: self.ledger.append((piece.name, d)))

    def publish(self, piece: Piece, reason: str, detail: str) -> None:
        assert reason and len(detail) <= 200
        self._step(lambda: self.dead.append((reason, ids(piece.rows))))

    def wait(self, attempt: int) -> None:
        self.waits += 1

    def decided(self) -> dict[str, Decision]:
        """What Sink._load_decisions reads back from the ledger."""
        out: dict[str, Decision] = {}
        for name, d in self.ledger:
            if out.get(name, Decision("")).outcome != DEAD_LETTERED:
                out[name] = d
        return out

    def splitter(self, **kw: int) -> FlushSplitter:
        return FlushSplitter(insert=self.insert, record=self.record, publish=self.publish, wait=self.wait,
                             healthy=lambda: True, **kw)

    def dead_ids(self) -> set[int]:
        return {i for _, rows in self.dead for i in rows}


rows_spec = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from([0, 0, 0, 0, 1, 5, 13, 30]),
              st.sampled_from([False] * 6 + [True])),
    min_size=1, max_size=60,
)


def expected(spec: list[tuple[int, int, bool]], max_per_batch: int) -> tuple[set[int], set[int]]:
    """(ids that must be stored, ids that must be rejected): a batch spanning too many months is
    rejected whole; otherwise exactly the bad rows are."""
    t = make_rows(spec)
    months_per_offset: dict[int, set[int]] = {}
    for o, m, _ in spec:
        months_per_offset.setdefault(o, set()).add(m)
    wide = {o for o, ms in months_per_offset.items() if len(ms) > max_per_batch}
    good, bad = set(), set()
    for i, (o, _, b) in zip(ids(t), spec, strict=True):
        (bad if b or o in wide else good).add(i)
    return good, bad


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rows_spec, limit=st.sampled_from([1, 2, 100]), per_batch=st.sampled_from([1, 3, 100]))
def test_split_inserts_exactly_the_good_rows_once_and_rejects_exactly_the_bad(
        spec: list[tuple[int, int, bool]], limit: int, per_batch: int) -> None:
    h = Harness(FakeClickHouse(max_partitions=limit))
    rows = make_rows(spec)
    out = h.splitter(max_partitions_per_insert=limit, max_partitions_per_batch=per_batch,
                     failed_inserts_per_batch=10_000).write(Piece("", rows), "t/0/0-12")
    good, bad = expected(spec, per_batch)
    stored = h.ch.stored()
    assert set(stored) == good and all(n == 1 for n in stored.values())
    assert h.dead_ids() == bad
    assert sum(out.rejected.values()) == len(bad) and out.rows_inserted == len(good)
    # Proactive: no insert is ever refused for its partition count.
    assert h.ch.refused["partitions"] == 0


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=rows_spec, crash_at=st.integers(1, 80), after=st.booleans(),
       limits=st.sampled_from([(100, 100), (2, 3), (1, 1)]), replay_limits=st.sampled_from([(100, 100), (2, 3)]))
def test_a_crash_anywhere_then_replay_reaches_the_same_outcome(
        spec: list[tuple[int, int, bool]], crash_at: int, after: bool,
        limits: tuple[int, int], replay_limits: tuple[int, int]) -> None:
    """The replay follows the ledger's decisions, even when the settings changed meanwhile."""
    ch = FakeClickHouse(max_partitions=min(limits[0], replay_limits[0]))
    rows = make_rows(spec)
    first = Harness(ch, crash_at=crash_at, crash_after_effect=after)
    try:
        first.splitter(max_partitions_per_insert=limits[0], max_partitions_per_batch=limits[1]).write(
            Piece("", rows), "tok")
    except Crash:
        pass
    again = Harness(ch, ledger=list(first.ledger), dead=list(first.dead))
    again.splitter(max_partitions_per_insert=replay_limits[0], max_partitions_per_batch=replay_limits[1]).write(
        Piece("", rows), "tok", again.decided())
    stored = ch.stored()
    rejected_final = {i for name, d in again.decided().items() if d.outcome == DEAD_LETTERED
                      for i in _piece_ids(rows, name)}
    all_ids = set(ids(rows))
    assert all(n == 1 for n in stored.values()), "a row inserted twice"
    assert set(stored) | rejected_final == all_ids and not set(stored) & rejected_final
    _, bad_rows = expected(spec, 10_000)
    assert not set(stored) & bad_rows, "a refused row was stored"
    assert rejected_final <= again.dead_ids(), "every rejected row is on the dead-letter topic"


def _piece_ids(root: pa.Table, name: str) -> set[int]:
    """Ids of the rows a piece name designates, found by walking the same split tree."""
    stack = [Piece("", root)]
    while stack:
        p = stack.pop()
        if p.name == name:
            return set(ids(p.rows))
        stack.extend(children(p))
    raise AssertionError(f"no piece named {name}")


def test_one_wide_batch_is_cut_off_and_the_others_stored() -> None:
    spec = [(o, 0, False) for o in range(40) for _ in range(5)] + [(17, m, False) for m in range(36)]
    h = Harness(FakeClickHouse())
    out = h.splitter().write(Piece("", make_rows(spec)), "tok")
    assert out.rows_inserted == 195 and out.rejected == {TOO_MANY_PARTITIONS: 41}  # all of batch 17
    assert [r for r, _ in h.dead] == [TOO_MANY_PARTITIONS]
    assert out.inserts <= 2 * 7, "isolated by halving source offsets"


def test_a_batch_of_only_bad_rows_costs_a_bounded_number_of_inserts() -> None:
    spec = [(0, 0, False)] * 50 + [(1, 0, True)] * 2000 + [(2, 0, False)] * 50
    h = Harness(FakeClickHouse())
    out = h.splitter(failed_inserts_per_batch=8).write(Piece("", make_rows(spec)), "tok")
    assert out.rows_inserted == 100 and sum(out.rejected.values()) == 2000
    assert h.ch.calls < 40


def test_unknown_errors_are_retried_then_treated_as_bad_data() -> None:
    h = Harness(FakeClickHouse(weird_calls=1000))
    out = h.splitter(unknown_error_retries=3).write(Piece("", make_rows([(0, 0, False)] * 4)), "tok")
    assert h.waits >= 3 and out.rows_inserted == 0
    assert out.rejected == {"RuntimeError": 4}


def test_unknown_errors_are_waited_out_while_clickhouse_is_unhealthy() -> None:
    h = Harness(FakeClickHouse(weird_calls=1000))

    def wait(attempt: int) -> None:
        if attempt >= 20:
            raise Stopped
    s = FlushSplitter(insert=h.insert, record=h.record, publish=h.publish, wait=wait, healthy=lambda: False,
                      unknown_error_retries=1)
    with pytest.raises(Stopped):
        s.write(Piece("", make_rows([(0, 0, False)] * 4)), "tok")
    assert not h.dead and not h.ledger, "nothing rejected while the server itself is failing"


def test_outages_are_retried_until_stopped_and_nothing_is_rejected() -> None:
    h = Harness(FakeClickHouse())

    def down(piece: Piece, token: str) -> None:
        raise ConnectionRefusedError(111, "Connection refused")

    def wait(attempt: int) -> None:
        if attempt >= 50:
            raise Stopped
    s = FlushSplitter(insert=down, record=h.record, publish=h.publish, wait=wait, healthy=lambda: True)
    with pytest.raises(Stopped):
        s.write(Piece("", make_rows([(0, 0, True)] * 4)), "tok")
    assert not h.dead and not h.ledger


def test_piece_names_depend_on_rows_not_on_their_order() -> None:
    spec = [(o % 5, o % 3, False) for o in range(30)]
    t = make_rows(spec)
    shuffled = t.take(pa.array(list(reversed(range(t.num_rows)))))

    def tree(root: pa.Table) -> dict[str, list[int]]:
        out, stack = {}, [Piece("", root)]
        while stack:
            p = stack.pop()
            out[p.name] = sorted(ids(p.rows))
            stack.extend(children(p))
        return out
    assert tree(t) == tree(shuffled)
