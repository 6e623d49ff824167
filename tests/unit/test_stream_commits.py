"""What the stream commits (stream/commits.py, ADR 0020 "The loss"): only offsets below which the
worker's own code finished every message, whatever Faust acked."""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
from faust.transport.consumer import Consumer as FaustConsumer
from faust.types import TP

from handtrace.stream.commits import CommitGate, GatedConsumer

EVENTS = TP("events", 3)


def _msg(offset: int, tp: TP = EVENTS) -> Any:
    return SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=offset)


def _faust_bookkeeping(committed: int | None, acked: list[int]) -> Any:
    return SimpleNamespace(_acked=defaultdict(list, {EVENTS: list(acked)}), _gap=defaultdict(list),
                           _acked_index=defaultdict(set, {EVENTS: set(acked)}),
                           _committed_offset=defaultdict(lambda: None, {EVENTS: committed}))


@pytest.mark.parametrize("committed", [None, 0, 30])
def test_faust_alone_commits_past_offsets_it_never_saw_acked(committed: int | None) -> None:
    # The root cause, on Faust's own code: offsets 31-38 were skipped during a rebalance and acked
    # (Stream.__aiter__), 0-30 (or just 30) are in a micro-batch whose sends are not confirmed.
    # Faust forgot the committed offset on revocation (None), treats 0 as unknown, and checks the
    # head gap one too late (30): in every case it would commit 39.
    consumer = _faust_bookkeeping(committed, list(range(31, 39)))
    assert FaustConsumer._new_offset(consumer, EVENTS) == 39  # type: ignore[arg-type]


def test_the_gate_commits_only_a_confirmed_run_from_the_committed_offset() -> None:
    gate = CommitGate(["events"])
    gate.confirm([_msg(o) for o in range(31, 39)])  # processed, but 30 is not
    assert gate.needs_base([EVENTS]) == [EVENTS]
    gate.set_base(EVENTS, 30, 0, gate.epoch)
    assert gate.committable([EVENTS]) == {}  # held at 30, never past it
    gate.confirm([_msg(30)])
    assert gate.committable([EVENTS]) == {EVENTS: 39}
    gate.committed({EVENTS: 39}, gate.epoch)
    assert gate.base[EVENTS] == 39 and gate.done[EVENTS] == set()
    gate.confirm([_msg(39), _msg(41)])
    assert gate.committable([EVENTS]) == {EVENTS: 40}


def test_no_committed_offset_starts_at_the_log_start_and_never_below_it() -> None:
    gate = CommitGate(["events"])
    gate.confirm([_msg(o) for o in range(5, 9)])
    gate.set_base(EVENTS, None, 0, gate.epoch)  # nothing committed, log starts at 0: 0-4 unseen
    assert gate.committable([EVENTS]) == {}
    gate.reset()
    gate.set_base(EVENTS, 2, 5, gate.epoch)  # committed 2, but retention deleted up to 5
    assert gate.committable([EVENTS]) == {EVENTS: 9}


def test_a_base_read_across_a_rebalance_is_discarded() -> None:
    gate = CommitGate(["events"])
    gate.confirm([_msg(0)])
    epoch = gate.epoch
    gate.reset()  # revoked while the committed offset was being read
    gate.set_base(EVENTS, 0, 0, epoch)
    gate.committed({EVENTS: 1}, epoch)
    assert EVENTS not in gate.base and gate.committable([EVENTS]) == {}
    assert gate.needs_base([EVENTS]) == [EVENTS]


def test_only_assigned_partitions_of_gated_topics_are_committed() -> None:
    gate = CommitGate(["events"])
    other = TP("events", 4)
    gate.confirm([_msg(0), _msg(0, other), _msg(0, TP("changelog", 3))])
    assert gate.needs_base([EVENTS]) == [EVENTS]  # 4 is not assigned; changelog is not gated
    gate.set_base(EVENTS, None, 0, gate.epoch)
    assert gate.committable([EVENTS]) == {EVENTS: 1}


def test_a_held_commit_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    gate = CommitGate(["events"])
    gate.confirm([_msg(1)])
    gate.set_base(EVENTS, 0, 0, gate.epoch)
    with caplog.at_level(logging.WARNING, "handtrace.stream.commits"):
        gate.committable([EVENTS], now=0.0)
        gate.committable([EVENTS], now=30.0)
        assert not caplog.records
        gate.committable([EVENTS], now=61.0)
        gate.committable([EVENTS], now=62.0)
    assert len(caplog.records) == 1 and "held at offset 0" in caplog.records[0].getMessage()


def test_the_consumer_commits_the_gate_s_offsets_not_faust_s_acks() -> None:
    # GatedConsumer._commit_tps over Faust's bookkeeping as a skipped-and-acked rebalance leaves it.
    consumer = object.__new__(GatedConsumer)
    gate = CommitGate(["events"])
    consumer.gate = gate
    book = _faust_bookkeeping(None, list(range(31, 39)))
    consumer._acked, consumer._acked_index, consumer._gap = book._acked, book._acked_index, book._gap
    consumer._committed_offset = book._committed_offset
    committed: list[dict[Any, int]] = []
    reads: list[list[TP]] = []

    async def read_bases(parts: list[TP], epoch: int) -> None:
        reads.append(parts)
        for p in parts:
            gate.set_base(p, None, 0, epoch)

    async def commit_offsets(offsets: dict[Any, int], start_new_transaction: bool = True) -> bool:
        committed.append(dict(offsets))
        return True

    consumer.assignment = lambda: {EVENTS}  # type: ignore[method-assign]
    consumer._read_bases = read_bases  # type: ignore[method-assign]
    consumer._commit_offsets = commit_offsets  # type: ignore[method-assign]

    async def rounds() -> None:
        gate.confirm([_msg(o) for o in range(31, 39)])
        assert await consumer._commit_tps([EVENTS], True) is False
        assert committed == [] and reads == [[EVENTS]]
        assert EVENTS not in consumer._acked  # Faust's acks of gated topics are dropped
        gate.confirm([_msg(o) for o in range(31)])
        assert await consumer._commit_tps([], True) is True
        assert committed == [{EVENTS: 39}] and gate.base[EVENTS] == 39

    asyncio.run(rounds())


def _event(offset: int, tp: TP = EVENTS) -> Any:
    return SimpleNamespace(message=_msg(offset, tp))


def test_a_partition_is_processed_in_offset_order_with_none_missing() -> None:
    # What the sink needs: a partition's accepted messages in source-offset order, none after a
    # missing one (the sink skips rows at or below the highest source offset it stored). In the
    # scale-out test (run 10) Faust skipped offset 0 of a partition during a rebalance, the worker
    # published 1.., the replay of 0 came later and the sink skipped its 160 rows.
    gate = CommitGate(["events"])
    other = TP("events", 4)
    gate.next.update({EVENTS: 0, other: 5})
    admitted, gaps = gate.sequence([_event(1), _event(5, other), _event(2), _event(6, other)])
    assert [e.message.offset for e in admitted] == [5, 6] and gaps == {EVENTS: 0}
    admitted, gaps = gate.sequence([_event(0), _event(1), _event(6, other), _event(7, other)])
    assert [(e.message.partition, e.message.offset) for e in admitted] == [(3, 0), (3, 1), (4, 7)]
    assert gaps == {}  # 6 of partition 4 again: a replay, dropped


def test_admit_starts_at_the_committed_offset_and_fetches_a_gap_again() -> None:
    consumer = object.__new__(GatedConsumer)
    gate = consumer.gate = CommitGate(["events"])
    sought: list[dict[Any, int]] = []

    async def read_committed(parts: list[TP]) -> tuple[dict[TP, int | None], dict[TP, int]]:
        return {p: None for p in parts}, {p: 0 for p in parts}  # nothing committed, log from 0

    async def seek_wait(partitions: dict[Any, int]) -> None:
        sought.append(dict(partitions))

    consumer._read_committed = read_committed  # type: ignore[method-assign]
    consumer.seek_wait = seek_wait  # type: ignore[method-assign]
    consumer.assignment = lambda: {EVENTS}  # type: ignore[method-assign]

    async def rounds() -> None:
        # Offset 0 was skipped; the fetch position went on at 1 (no committed offset to seek to).
        assert await consumer.admit([_event(1), _event(2)]) == []
        assert await consumer.admit([_event(3)]) == []
        assert sought == [{EVENTS: 0}]  # once per gap
        got = await consumer.admit([_event(0), _event(1)])
        assert [e.message.offset for e in got] == [0, 1]
        gate.reset()  # a rebalance: where to start is read again
        assert await consumer.admit([_event(1)]) == [] and sought[-1] == {EVENTS: 0}

    asyncio.run(rounds())


def test_a_partition_whose_every_fetched_message_was_skipped_is_fetched_again() -> None:
    # Run 15: the joining worker took two partitions with no committed offset; everything in them
    # was fetched and skipped during the rebalance, so no later message ever showed the agent a
    # gap. Fetched past the next offset with no progress for STALLED_S: fetch again.
    consumer = object.__new__(GatedConsumer)
    gate = consumer.gate = CommitGate(["events"])
    sought: list[dict[Any, int]] = []
    positions = {EVENTS: 51}

    async def read_committed(parts: list[TP]) -> tuple[dict[TP, int | None], dict[TP, int]]:
        return {p: None for p in parts}, {p: 0 for p in parts}

    async def seek_wait(partitions: dict[Any, int]) -> None:
        sought.append(dict(partitions))

    async def position(tp: Any) -> int:
        return positions[TP(tp.topic, tp.partition)]

    consumer._read_committed = read_committed  # type: ignore[method-assign]
    consumer.seek_wait = seek_wait  # type: ignore[method-assign]
    consumer.position = position  # type: ignore[method-assign]
    consumer.assignment = lambda: {EVENTS, TP("changelog", 3)}  # type: ignore[method-assign]

    async def rounds() -> None:
        await consumer.refetch_stalled(after_s=10, now=0.0)
        await consumer.refetch_stalled(after_s=10, now=9.0)
        assert sought == [] and gate.next == {EVENTS: 0}
        await consumer.refetch_stalled(after_s=10, now=10.0)
        assert sought == [{EVENTS: 0}]
        assert [e.message.offset for e in await consumer.admit([_event(0), _event(1)])] == [0, 1]
        await consumer.refetch_stalled(after_s=10, now=25.0)  # progress: the clock starts again
        await consumer.refetch_stalled(after_s=10, now=30.0)
        assert sought == [{EVENTS: 0}]
        positions[EVENTS] = 2  # caught up: nothing to do
        await consumer.refetch_stalled(after_s=10, now=100.0)
        assert sought == [{EVENTS: 0}] and EVENTS not in gate.progress

    asyncio.run(rounds())


CONTROLS = TP("controls", 3)


def test_reach_waits_for_the_controls_fold_from_the_committed_offset() -> None:
    # The data agents wait (GatedConsumer.reach) until the controls partition's fold has finished
    # every record below the end offset read after the data was fetched: from the committed offset
    # (folded before, by whoever committed it) through the run this worker confirmed.
    consumer = object.__new__(GatedConsumer)
    gate = consumer.gate = CommitGate(["controls"])

    async def read_committed(parts: list[TP]) -> tuple[dict[TP, int | None], dict[TP, int]]:
        return {p: 10 for p in parts}, {p: 0 for p in parts}

    consumer._read_committed = read_committed  # type: ignore[method-assign]

    async def rounds() -> None:
        assert gate.finished_below(CONTROLS) is None
        assert await consumer.reach({CONTROLS: 10}, gate.epoch)  # all below the committed offset
        assert gate.finished_below(CONTROLS) == 10
        waiting = asyncio.ensure_future(consumer.reach({CONTROLS: 13}, gate.epoch))
        await asyncio.sleep(0.05)
        gate.confirm([_msg(11, CONTROLS), _msg(12, CONTROLS)])  # 10 not yet folded: still waiting
        await asyncio.sleep(0.05)
        assert not waiting.done() and gate.finished_below(CONTROLS) == 10
        gate.confirm([_msg(10, CONTROLS)])
        assert await asyncio.wait_for(waiting, 2) is True
        waiting = asyncio.ensure_future(consumer.reach({CONTROLS: 20}, gate.epoch))
        await asyncio.sleep(0.05)
        gate.reset()  # a rebalance: the caller drops its micro-batch (replayed), never proceeds
        assert await asyncio.wait_for(waiting, 2) is False

    asyncio.run(rounds())
