"""Which source offsets the worker may commit: only those below which every offset of the
partition was finished by the worker's own code (ADR 0020, "The loss").

Faust decides what to commit from its acks, and it acks messages nobody processed. While a
rebalance is under way, and for messages fetched in an earlier generation, ``Stream.__aiter__``
(faust-streaming 0.15.3) *skips* a message (flow control inactive, or
``message.generation_id != app.consumer_generation_id``) and then acks it "otherwise the lag
would increase". The consumer forgets its committed offsets on revocation
(``Consumer.on_partitions_revoked`` pops ``_committed_offset``), and ``Consumer._new_offset``
checks for a gap at the head of the acked offsets only when a committed offset is known (and
then one too late: ``min(acked) - committed > 1``). So the skipped-and-acked offsets are
committed -- by the revoking member during ``wait_empty`` or by the next generation -- while the
micro-batch holding the offsets before them is still unsent: the next owner starts past it and
those batches are never published nor dead-lettered. Read offsets that jump are acked too
(``Consumer._add_gap``).

:class:`CommitGate` replaces that decision for the topics the worker processes: the agents
*confirm* a message once they are done with it (the event agents after the broker confirmed every
send of its micro-batch, the controls fold after folding it), and a partition's committable
offset is the end of the run of confirmed offsets that starts at the partition's committed offset
as the broker has it (read once per assignment, raised to the log start when retention deleted
below it). A message Faust skipped is not confirmed, so nothing at or past it is committed until
it has been fetched again and processed (Faust seeks to the committed offsets after every
rebalance); whatever happens inside Faust, the gate can only hold a commit back, never move one
forward: a rebalance or a crash replays, never loses. Faust's own ack bookkeeping still runs
(``wait_empty`` needs it) and keeps deciding for any other topic.

Committing right is not enough: the sink skips rows at or below the highest source offset it
stored, so a partition's messages must also be *processed* in offset order with none missing.
:meth:`GatedConsumer.admit` lets a micro-batch through partition by partition from the offset
each starts at (the broker's committed offset at assignment) and, at a gap, drops the rest of
that partition and fetches it again from the missing offset; :meth:`GatedConsumer.refetch_stalled`
catches the gap no later message reveals (everything fetched was skipped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

from faust.transport.drivers.aiokafka import Consumer as AIOKafkaConsumer
from faust.transport.drivers.aiokafka import ensure_aiokafka_TP
from faust.types import TP as Partition  # noqa: N811 -- (topic, partition)

log = logging.getLogger("handtrace.stream.commits")

STALLED_S = 10.0  # a partition fetched past its next offset, with no progress this long, is fetched again
HELD_WARNING_S = 60.0  # a commit held behind a missing offset this long is logged (once a minute)


class CommitGate:
    """Confirmed offsets per partition and, per assigned partition, the committed offset they
    must continue from. ``epoch`` changes on every revocation and assignment: a base read from the
    broker across one is discarded (it may belong to the previous owner's generation)."""

    def __init__(self, topics: Iterable[str]) -> None:
        self.topics = frozenset(topics)
        self.done: dict[Partition, set[int]] = {}
        self.base: dict[Partition, int] = {}
        self.epoch = 0
        self.next: dict[Partition, int] = {}  # the offset each partition's agent may process next
        self.sought: dict[Partition, int] = {}
        self.progress: dict[Partition, tuple[int, float]] = {}  # (next offset, since when)
        self._held_since: dict[Partition, float] = {}
        self._warned_at: dict[Partition, float] = {}
        self._moved: asyncio.Event | None = None

    def confirm(self, messages: Iterable[Any]) -> None:
        """These messages (Faust ``Message``: topic, partition, offset) are finished: their
        output, if any, is confirmed by the broker."""
        for m in messages:
            if m.topic in self.topics:
                self.done.setdefault(Partition(m.topic, m.partition), set()).add(m.offset)
        self._wake()

    def finished_below(self, p: Partition) -> int | None:
        """The offset below which every message of ``p`` is finished -- by this worker or, below
        the committed offset, by whoever committed it -- or None while ``p``'s base is unknown."""
        base = self.base.get(p)
        if base is None:
            return None
        done = self.done.get(p, ())
        x = base
        while x in done:
            x += 1
        return x

    async def moved(self, timeout_s: float) -> None:
        """Return when something is confirmed or a base learnt (or after ``timeout_s``)."""
        if self._moved is None:
            self._moved = asyncio.Event()
        try:
            await asyncio.wait_for(self._moved.wait(), timeout_s)
        except TimeoutError:
            pass

    def _wake(self) -> None:
        if self._moved is not None:
            self._moved.set()
            self._moved = None

    def reset(self) -> None:
        """A rebalance: every base is unknown until read again from the broker."""
        self.epoch += 1
        self.base.clear()
        self.next.clear()
        self.sought.clear()
        self.progress.clear()
        self._held_since.clear()
        self._wake()

    def needs_base(self, assigned: Iterable[Any]) -> list[Partition]:
        """Assigned partitions of gated topics with confirmed offsets but no known base."""
        out = []
        for tp in assigned:
            p = Partition(tp.topic, tp.partition)
            if p.topic in self.topics and self.done.get(p) and p not in self.base:
                out.append(p)
        return out

    def set_base(self, p: Partition, committed: int | None, log_start: int, epoch: int) -> None:
        """The broker's committed offset of ``p`` (None: none yet) and its log start, as read
        during ``epoch``; ignored if a rebalance came in between."""
        if epoch != self.epoch:
            return
        self.base[p] = log_start if committed is None else max(committed, log_start)
        self._prune(p)
        self._wake()

    def sequence(self, events: Iterable[Any]) -> tuple[list[Any], dict[Partition, int]]:
        """The events each partition's agent may process now, in order, and the partitions with a
        gap (a message Faust skipped): for those, the offset to fetch again. Needs ``next`` for
        every partition of ``events``. An event at or below an offset already let through is
        dropped (a replay); one past a gap is dropped with everything after it: processing it
        would publish source offset n+1 before n, and the sink skips rows at or below the highest
        source offset it stored, so n's rows would never be stored."""
        admitted, gaps = [], {}
        for e in events:
            m = e.message
            p = Partition(m.topic, m.partition)
            if p in gaps:
                continue
            n = self.next[p]
            if m.offset == n:
                admitted.append(e)
                self.next[p] = n + 1
            elif m.offset > n:
                gaps[p] = n
        return admitted, gaps

    def committable(self, assigned: Iterable[Any], now: float | None = None) -> dict[Partition, int]:
        """For each assigned partition with a known base: the offset after the run of confirmed
        offsets starting at the base, when that run is not empty."""
        now = time.monotonic() if now is None else now
        out: dict[Partition, int] = {}
        for tp in assigned:
            p = Partition(tp.topic, tp.partition)
            done = self.done.get(p)
            x = self.finished_below(p)
            if x is None or not done:
                continue
            if x > self.base[p]:
                out[p] = x
            self._watch(p, x, done, now)
        return out

    def committed(self, offsets: Mapping[Partition, int], epoch: int) -> None:
        """These offsets were committed (read during ``epoch``): they are the new bases."""
        if epoch != self.epoch:
            return
        for p, x in offsets.items():
            if self.base.get(p, -1) < x:
                self.base[p] = x
                self._prune(p)

    def _prune(self, p: Partition) -> None:
        done = self.done.get(p)
        if done:
            base = self.base[p]
            done.difference_update([o for o in done if o < base])

    def _watch(self, p: Partition, x: int, done: set[int], now: float) -> None:
        # Confirmed offsets beyond a missing one: normal for a moment (micro-batches of several
        # partitions finish together), a problem if it lasts (a skipped message never fetched
        # again). It is held, never skipped: say so.
        if not any(o > x for o in done):
            self._held_since.pop(p, None)
            return
        since = self._held_since.setdefault(p, now)
        if now - since >= HELD_WARNING_S and now - self._warned_at.get(p, float("-inf")) >= HELD_WARNING_S:
            self._warned_at[p] = now
            log.warning("commit of %s[%d] held at offset %d for %.0f s: that offset was never processed "
                        "(it is replayed after the next rebalance or restart; nothing is skipped)",
                        p.topic, p.partition, x, now - since)


class GatedConsumer(AIOKafkaConsumer):
    """Faust's aiokafka consumer whose commits for the gated topics come from :class:`CommitGate`
    (module docstring); every other topic keeps Faust's own decision."""

    gate: CommitGate

    async def on_partitions_revoked(self, revoked: set[Any]) -> None:
        self.gate.reset()
        await super().on_partitions_revoked(revoked)

    async def on_partitions_assigned(self, assigned: set[Any], generation_id: int = 0) -> None:
        self.gate.reset()
        await super().on_partitions_assigned(assigned, generation_id)

    async def _commit_tps(self, tps: Iterable[Any], start_new_transaction: bool) -> bool:
        gate = self.gate
        tps = list(tps)
        for tp in tps:
            if tp.topic in gate.topics:  # Faust's acks of these are not used: keep them from growing
                self._acked.pop(tp, None)
                self._acked_index.pop(tp, None)
                self._gap.pop(tp, None)
        faust_decides = [tp for tp in tps if tp.topic not in gate.topics]
        offsets: dict[Any, int] = dict(self._filter_committable_offsets(faust_decides))
        if offsets:
            await self._handle_attached(offsets)
        epoch = gate.epoch
        assigned = self.assignment()
        try:
            await self._read_bases(gate.needs_base(assigned), epoch)
        except Exception as exc:  # noqa: BLE001 -- no commit this round; the next one asks again
            log.warning("reading committed offsets failed (%s: %s); commits wait for the next round",
                        type(exc).__name__, str(exc)[:200])
            return False
        gated = {ensure_aiokafka_TP(p): x for p, x in gate.committable(assigned).items()}
        offsets.update(gated)
        if not offsets:
            return False
        did_commit = await self._commit_offsets(offsets, start_new_transaction=start_new_transaction)
        if did_commit:
            gate.committed({Partition(tp.topic, tp.partition): x for tp, x in gated.items()}, epoch)
        return did_commit

    async def admit(self, events: list[Any]) -> list[Any]:
        """The events of a micro-batch the agent may process (CommitGate.sequence); for a gap,
        the partition is fetched again from its next offset (once per gap). The rest are dropped:
        they are never confirmed, so nothing at or past them is committed."""
        gate = self.gate
        await self._learn_next({Partition(e.message.topic, e.message.partition) for e in events})
        admitted, gaps = gate.sequence(events)
        assigned = self.assignment()
        for p, n in gaps.items():
            if gate.sought.get(p) != n and p in assigned:
                gate.sought[p] = n
                log.info("%s[%d]: offset %d was skipped by the consumer (a rebalance); fetching again from it",
                         p.topic, p.partition, n)
                await self.seek_wait({ensure_aiokafka_TP(p): n})  # in the consumer's own thread
        return admitted

    async def reach(self, targets: Mapping[Partition, int], epoch: int) -> bool:
        """Wait until every message of each gated partition below its target offset is finished
        (``CommitGate.finished_below``, bases read from the broker where unknown). False if a
        rebalance came in since ``epoch`` (the caller drops its micro-batch: it is replayed).
        While it waits, it says so once a minute: a partition not assigned here never moves."""
        gate = self.gate
        started = warned = time.monotonic()
        while gate.epoch == epoch:
            unknown = [p for p in targets if gate.finished_below(p) is None]
            if unknown:
                await self._read_bases(unknown, epoch)
                continue
            behind = {p: (gate.finished_below(p), x) for p, x in targets.items()
                      if (gate.finished_below(p) or 0) < x}
            if not behind:
                return True
            now = time.monotonic()
            if now - warned >= HELD_WARNING_S:
                warned = now
                log.warning("held for %.0f s until %s are folded", now - started, ", ".join(
                    f"{p.topic}[{p.partition}] (at {at}, to {x})" for p, (at, x) in sorted(behind.items())))
            await gate.moved(1.0)
        return False

    async def _learn_next(self, parts: Iterable[Partition]) -> None:
        """``gate.next`` for every partition of ``parts``: the broker's committed offset (or the
        log start), read again if a rebalance came in between."""
        gate = self.gate
        parts = list(parts)
        while True:
            epoch = gate.epoch
            unknown = [p for p in parts if p not in gate.next]
            if not unknown:
                return
            log.info("reading where %d partition(s) start: %s", len(unknown),
                     ", ".join(f"{p.topic}[{p.partition}]" for p in sorted(unknown)))
            committed, starts = await self._read_committed(unknown)
            if gate.epoch == epoch:
                for p in unknown:
                    c, start = committed[p], starts[p]
                    gate.next[p] = start if c is None else max(c, start)
                    log.info("%s[%d] starts at offset %d (committed %s, log start %d)",
                             p.topic, p.partition, gate.next[p], c, start)

    async def refetch_stalled(self, after_s: float = STALLED_S, now: float | None = None) -> None:
        """The net under ``admit``: a gap is seen only when a later message of the partition
        reaches the agent. If every message the consumer fetched was skipped (nothing more to
        fetch), nothing ever does: the fetch position is past the partition's next offset and
        the next offset does not move. After ``after_s`` so, fetch again from the next offset.
        (Spurious on an agent stuck that long on one micro-batch: the copies are dropped as
        replays.)"""
        gate = self.gate
        now = time.monotonic() if now is None else now
        tps = [tp for tp in self.assignment() if tp.topic in gate.topics]
        await self._learn_next(Partition(tp.topic, tp.partition) for tp in tps)
        for tp in tps:
            p = Partition(tp.topic, tp.partition)
            n = gate.next.get(p)
            position = await self.position(ensure_aiokafka_TP(p))
            if n is None or position is None or position <= n:
                gate.progress.pop(p, None)
                continue
            seen, since = gate.progress.get(p, (None, now))
            if seen != n:
                gate.progress[p] = (n, now)
            elif now - since >= after_s:
                gate.progress[p] = (n, now)
                log.info("%s[%d]: fetched up to %d but nothing past %d reached the agent for %.0f s "
                         "(skipped by the consumer); fetching again from %d",
                         p.topic, p.partition, position, n, now - since, n)
                await self.seek_wait({ensure_aiokafka_TP(p): n})

    async def _read_committed(self, parts: list[Partition]) -> tuple[dict[Partition, int | None], dict[Partition, int]]:
        thread = self._thread
        consumer = thread._ensure_consumer()
        tps = [ensure_aiokafka_TP(p) for p in parts]

        async def read() -> tuple[dict[Any, int | None], Mapping[Any, int]]:
            committed = {tp: await consumer.committed(tp) for tp in tps}
            return committed, await consumer.beginning_offsets(tps)

        committed, starts = await thread.call_thread(read)
        return ({p: committed[tp] for p, tp in zip(parts, tps, strict=True)},
                {p: starts.get(tp, 0) for p, tp in zip(parts, tps, strict=True)})

    async def _read_bases(self, parts: list[Partition], epoch: int) -> None:
        if parts:
            committed, starts = await self._read_committed(parts)
            for p in parts:
                self.gate.set_base(p, committed[p], starts[p], epoch)
