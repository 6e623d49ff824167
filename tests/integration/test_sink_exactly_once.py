"""The sink's exactly-once bookkeeping against the real broker and real ClickHouse:
replayed source messages, a crash between insert and commit, a crash between ledger and insert."""

from __future__ import annotations

from typing import Any

import pytest

from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.clock import now_us
from handtrace.core.rows import HEADER_ROWS, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, to_ipc
from handtrace.sink.writer import Sink
from handtrace.stream.pipeline import BatchPipeline
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.validate import ValidateStep
from tests.factories import make_batch
from tests.integration.conftest import producer, run_sink_until, topics_of


class Crash(BaseException):
    """Stands in for the process dying at a chosen point."""


def _publish_accepted(s: Any, batches: int, per_batch: int, *, repeat: range = range(0)) -> list[bytes]:
    """Publish what the stream would: one accepted-rows message per source offset 0..batches-1,
    all in partition 0; source offsets in ``repeat`` are published a second time (a replay)."""
    pipe = BatchPipeline([ValidateStep(), PseudonymiseStep(b"k" * 32)])
    p = producer(s)
    ids: list[bytes] = []
    messages = []
    for off in range(batches):
        payload, event_ids = make_batch(f"emp-{off % 3}", per_batch, seed=off)
        out = pipe.process(payload, 0, off, now_us())
        assert out.stored == per_batch and not out.deadletters
        ids += event_ids
        messages.append((off, to_ipc(out.rows[0]), per_batch))
    for off, value, n in [*messages, *[messages[i] for i in repeat]]:
        p.produce(topics_of(s).stored, value=value, partition=0, headers=[
            (HEADER_SOURCE_PARTITION, b"0"), (HEADER_SOURCE_OFFSET, str(off).encode()),
            (HEADER_ROWS, str(n).encode())])
    p.flush(30)
    return ids


def _counts(s: Any) -> tuple[int, int]:
    c = clickhouse.connect(s.clickhouse_dsn())
    return c.query(f"SELECT count(), uniqExact(event_id) FROM {s.clickhouse.database}.events").result_rows[0]


def _stop_merges(s: Any) -> None:
    # ReplacingMergeTree would hide duplicates once parts merge; count physical rows instead.
    clickhouse.connect(s.clickhouse_dsn()).command(f"SYSTEM STOP MERGES {s.clickhouse.database}.events")




def test_replayed_source_messages_are_stored_once(settings_factory) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()
    ids = _publish_accepted(s, 20, 50, repeat=range(5, 15))
    sink = Sink(s, clickhouse.connect(s.clickhouse_dsn()))
    _stop_merges(s)
    try:
        assert run_sink_until(sink, lambda: sink.rows_inserted >= len(ids)) is None
        assert _counts(s) == (len(ids), len(ids))
    finally:
        clickhouse.close(s.clickhouse_dsn())


@pytest.mark.parametrize("crash_point", ["after_insert_before_commit", "after_ledger_before_insert"])
def test_crash_mid_flush_then_restart_stores_each_event_once(settings_factory, crash_point: str) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory(sink={"flush_rows": 200, "flush_interval_s": 5.0, "poll_messages": 5})
    ids = _publish_accepted(s, 30, 40)
    client = clickhouse.connect(s.clickhouse_dsn())
    try:
        first = Sink(s, client)
        _stop_merges(s)
        if crash_point == "after_insert_before_commit":
            real_commit = first._commit
            flushes = []

            def crash_commit(p: int, st: Any) -> None:
                if len(flushes) >= 3:  # dead processes commit nothing
                    return
                flushes.append(p)
                if len(flushes) == 3:  # two commits went through, the third flush's did not
                    raise Crash
                real_commit(p, st)
            first._commit = crash_commit  # type: ignore[method-assign]
        else:
            real_insert = client.raw_insert

            class Crashing:
                def __getattr__(self, name: str) -> Any:
                    if name == "raw_insert":
                        def boom(*_a: Any, **_k: Any) -> None:
                            raise Crash
                        return boom
                    return getattr(client, name)

            first.client = Crashing()
            assert real_insert is not None
        # A killed process runs no rebalance callback (that would flush and commit).
        first._on_revoke = lambda *_a: None  # type: ignore[method-assign]
        crashed = run_sink_until(first, lambda: False)
        assert isinstance(crashed, Crash), f"expected the simulated crash, got {crashed!r}"
        stored_before, _ = _counts(s)
        if crash_point == "after_insert_before_commit":
            assert stored_before >= 400, "flushes landed before the crash"
            uncommitted = group_lag(s.kafka, s.sink.group_id, topics_of(s).stored)
            assert uncommitted > 30 - stored_before // 40, "the last flush must be uncommitted"
        else:
            assert stored_before == 0

        second = Sink(s, client)
        assert run_sink_until(second, lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0) is None
        assert _counts(s) == (len(ids), len(ids))
        got = {r[0].bytes for r in client.query(f"SELECT event_id FROM {s.clickhouse.database}.events").result_rows}
        assert got == set(ids)
    finally:
        clickhouse.close(s.clickhouse_dsn())
