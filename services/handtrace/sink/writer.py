"""The ClickHouse sink: accepted rows → ``events``, exactly once.

Per partition it buffers Arrow tables and flushes on size or age. Every flush is recorded in
``sink_ledger`` *before* the insert (range of source offsets + a deterministic dedup token),
the insert carries that token, and Kafka offsets are committed only after the insert succeeded.

Why this is exactly-once:
- crash after the insert, before the commit: on restart the last ledger entry is replayed with
  the same token, so ClickHouse drops the re-insert (insert_deduplication_token);
- crash after the ledger write, before (or during) the insert: the replay completes it;
- the stream is at-least-once and may publish a source message twice: every row message names
  its source offset, and anything at or below the partition's high-water mark is skipped.

Rows ClickHouse refuses (bad data), or a flush that would touch too many partitions, do not stop
the sink: the flush is split and the offending rows go to ``events.rejected`` with a reason
(sink/split.py; ledger decisions keep it exactly-once). Every wait watches the stop event.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from handtrace.core.clock import now_us
from handtrace.core.cluster import INSERT_CONSISTENT, SELECT_CONSISTENT, layout_of
from handtrace.core.producer import producer_config
from handtrace.core.rows import STORED_SCHEMA, from_ipc, join_ipc, to_ipc
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.sink import metrics
from handtrace.sink.assignment import static_consumer_conf, take_partitions
from handtrace.sink.schema import migrate
from handtrace.sink.split import DEAD_LETTERED, Decision, FlushSplitter, Piece, Stopped, piece_token


class _Abandoned(Stopped):  # noqa: N818 -- a signal, not an error
    """The partition being flushed was revoked while the flush waited out an outage: its new
    owner replays the flush from the ledger, so this one gives up without committing."""

log = logging.getLogger("handtrace.sink")
_COLUMNS = list(STORED_SCHEMA.names)

_INSERT_SETTINGS = {
    "insert_deduplicate": 1,
    # ReplacingMergeTree would otherwise collapse equal sorting keys within each inserted block
    # at insert time, which costs ~30% of the insert's CPU (docs/BENCHMARKS.md, issue #4) and
    # guarantees nothing: stream replays never reach an insert (dropped per row by source offset
    # in _handle), and the only copies one flush can hold -- a batch an agent sent twice, two
    # source messages -- land in different inserts just as often, so merges and FINAL are what
    # deduplicate them in any case (docs/adr/0003, point 6).
    "optimize_on_insert": 0,
}


@dataclass
class _Pending:
    """Rows buffered for one flush of one partition."""

    tables: list[pa.Table] = field(default_factory=list)
    # The received IPC bytes of each table when it is a whole message (inserted as they are),
    # None when rows were filtered out of it (re-serialised at flush).
    payloads: list[bytes | None] = field(default_factory=list)
    rows: int = 0
    first_source: int = -1
    last_source: int = -1
    last_offset: int = -1
    opened: float = 0.0

    def add(self, table: pa.Table, offset: int, payload: bytes | None = None) -> None:
        if self.last_offset < 0:
            self.opened = time.monotonic()
        if table.num_rows:
            bounds = pc.min_max(table.column("source_offset")).as_py()
            lo, hi = int(bounds["min"]), int(bounds["max"])
            self.first_source = lo if self.first_source < 0 else min(self.first_source, lo)
            self.last_source = max(self.last_source, hi)
            self.tables.append(table)
            self.payloads.append(payload)
            self.rows += table.num_rows
        self.last_offset = max(self.last_offset, offset)

    @property
    def empty(self) -> bool:
        return self.last_offset < 0


@dataclass
class _PartitionState:
    hwm: int = -1
    replay: tuple[int, int, str] | None = None
    # Ledger decisions about pieces of the replayed flush (it had been split): name -> decision.
    replay_decisions: dict[str, Decision] = field(default_factory=dict)
    pending: _Pending = field(default_factory=_Pending)
    commit_at: int | None = None


class Sink:
    """Consumes the accepted-rows topic and writes ClickHouse. Owns its ClickHouse client."""

    def __init__(self, settings: Settings, client: Any, *, group_id: str | None = None,
                 on_insert: Callable[[list[pa.Table]], None] | None = None) -> None:
        """``on_insert`` is called with the tables of every insert right after it returned (their
        rows are queryable from then on; benchmarks time latency with it)."""
        self.settings = settings
        self.client = client
        self.db = settings.clickhouse.database
        topics = Topics.from_settings(settings.topics)
        self.topic = topics.stored
        self.rejected_topic = topics.rejected
        self.group_id = group_id or settings.sink.group_id
        self.rows_inserted = 0
        self.rows_rejected = 0
        self.flushes = 0
        self.on_insert = on_insert
        self._parts: dict[int, _PartitionState] = {}
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._stop = threading.Event()
        self._flushing: int | None = None
        self._abandon = False
        self.cluster = layout_of(settings.clickhouse)
        migrate(client, self.db, settings.warehouse.retention, self.cluster)
        # Cluster mode (ADR 0020): ledger rows and inserts are acknowledged by a quorum of the
        # shard's replicas, synchronously through the Distributed tables, and the ledger is read
        # back with sequential consistency, so a restarted sink on any node sees its last flush.
        self._write_settings: dict[str, Any] = dict(INSERT_CONSISTENT) if self.cluster else {}
        self._read_settings: dict[str, Any] = dict(SELECT_CONSISTENT) if self.cluster else {}
        self.max_partitions_per_insert = self._server_partition_limit()

    def _server_partition_limit(self) -> int:
        """The server's ``max_partitions_per_insert_block`` (0 there means no limit)."""
        try:
            value = int(self.client.query(
                "SELECT value FROM system.settings WHERE name = 'max_partitions_per_insert_block'"
            ).result_rows[0][0])
        except Exception:  # noqa: BLE001 -- an old server or no access: ClickHouse's default
            return 100
        return value if value > 0 else 1 << 30

    # -------------------------------------------------------------- ledger

    def _load_ledger(self, partitions: list[int]) -> None:
        rows = self._retrying("ledger read", lambda: self.client.query(
            f"SELECT partition, argMax(first_source_offset, last_source_offset), "
            f"max(last_source_offset), argMax(token, last_source_offset) "
            f"FROM {self.db}.sink_ledger WHERE topic = %(t)s AND outcome = '' GROUP BY partition",
            parameters={"t": self.topic}, settings=self._read_settings,
        ).result_rows)
        known = {r[0]: r for r in rows}
        for p in partitions:
            st = _PartitionState()
            if p in known:
                _, lo, hi, token = known[p]
                st.hwm = hi
                st.replay = (lo, hi, token)
                st.replay_decisions = self._load_decisions(p, token)
            self._parts[p] = st

    def _load_decisions(self, p: int, token: str) -> dict[str, Decision]:
        """The recorded decisions about pieces of flush ``token`` (empty unless it was split)."""
        rows = self._retrying("ledger read", lambda: self.client.query(
            f"SELECT piece, outcome, reason, detail FROM {self.db}.sink_ledger "
            f"WHERE topic = %(t)s AND partition = %(p)s AND token = %(k)s AND outcome != ''",
            parameters={"t": self.topic, "p": p, "k": token}, settings=self._read_settings,
        ).result_rows)
        decided: dict[str, Decision] = {}
        for piece, outcome, reason, detail in rows:
            if decided.get(piece, Decision("")).outcome != DEAD_LETTERED:  # the later step wins
                decided[piece] = Decision(outcome, reason, detail)
        return decided

    # -------------------------------------------------------------- kafka callbacks

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._load_ledger([tp.partition for tp in parts])

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:
            st = self._parts.pop(tp.partition, None)
            if tp.partition == self._flushing:
                # Revoked from inside that partition's own flush (a poll while it backs off):
                # flushing it again here would race the flush in progress; abandon it instead.
                self._abandon = True
                continue
            if st is not None and st.replay is not None:
                # A replay not yet read to its end (it flushes as soon as it is): flushing part of
                # it under the original token -- or re-splitting part of a split flush -- would
                # make ClickHouse drop the rest as a duplicate. The next owner replays it whole.
                continue
            if st is not None:
                try:
                    self._flush(tp.partition, st)
                    self._commit(tp.partition, st)
                except Stopped:
                    # Stopping with ClickHouse down: nothing of this flush is committed; whoever
                    # gets the partition next replays it from the ledger.
                    log.info("partition %s released with an unfinished flush (replayed later)", tp.partition)

    # -------------------------------------------------------------- message handling

    def _handle(self, p: int, offset: int, table: pa.Table, payload: bytes | None = None) -> None:
        """Route one message's rows: replay range, duplicates (source offset at or below what
        is already stored or buffered), or the buffer. Filtering is per row, so a stream replay
        that groups source messages differently is still deduplicated exactly. ``payload``, the
        message's IPC bytes, travels on to the insert when no row was filtered out."""
        st = self._parts.setdefault(p, _PartitionState())
        if st.replay is not None:
            lo, hi, _token = st.replay
            src = table.column("source_offset")
            floor = max(lo - 1, st.pending.last_source)
            in_range = table.filter(pc.and_(pc.greater(src, floor), pc.less_equal(src, hi)))
            beyond = table.filter(pc.greater(src, hi))
            if beyond.num_rows == 0:
                st.pending.add(in_range, offset, payload if in_range.num_rows == table.num_rows else None)
                metrics.MESSAGES.labels("replayed").inc()
                return
            # The message straddles the end of the replayed range: its in-range rows complete the
            # replay, but its offset is committed only with the rows beyond (offset - 1 here), so
            # a crash before those are flushed re-reads it instead of losing them.
            if in_range.num_rows:
                st.pending.add(in_range, offset - 1)
            self._flush(p, st)  # completes the interrupted flush with its original token
            table = beyond
            payload = None
        floor = max(st.hwm, st.pending.last_source)
        src = table.column("source_offset")
        if floor < 0 or table.num_rows == 0 or pc.min(src).as_py() > floor:
            fresh = table  # the common case: nothing to filter (a filter copies every column)
        else:
            fresh = table.filter(pc.greater(src, floor))
            payload = payload if fresh.num_rows == table.num_rows else None
        skipped = table.num_rows - fresh.num_rows
        if skipped:
            metrics.DUPLICATE_ROWS.inc(skipped)
        if fresh.num_rows == 0:
            metrics.MESSAGES.labels("duplicate").inc()
            st.commit_at = max(st.commit_at or 0, offset + 1)
            return
        st.pending.add(fresh, offset, payload)
        metrics.MESSAGES.labels("buffered").inc()

    def _due(self, st: _PartitionState) -> bool:
        if st.replay is not None:
            # A replay flushes only once its whole source range has been read (a row beyond it,
            # or the end of the partition): flushing part of it under the original token would
            # let ClickHouse drop the rest as a duplicate insert.
            return False
        if st.pending.empty:
            return False
        return (st.pending.rows >= self.settings.sink.flush_rows
                or time.monotonic() - st.pending.opened >= self.settings.sink.flush_interval_s)

    def _on_partition_eof(self, p: int) -> None:
        st = self._parts.get(p)
        if st is not None and st.replay is not None:
            self._flush(p, st)

    def _flush(self, p: int, st: _PartitionState) -> None:
        pend = st.pending
        if pend.empty:
            st.replay = None
            st.replay_decisions = {}
            return
        decided: dict[str, Decision] = {}
        if st.replay is not None:
            lo, hi, token = st.replay
            decided = st.replay_decisions
        else:
            lo, hi = pend.first_source, pend.last_source
            token = f"{self.topic}/{p}/{lo}-{hi}"
        if pend.rows:
            data = join_ipc([b if b is not None else to_ipc(t)
                             for t, b in zip(pend.tables, pend.payloads, strict=True)])
            self._flushing = p
            try:
                self._write(p, lo, hi, token, data, pend.tables, decided)
            finally:
                self._flushing = None
            st.hwm = max(st.hwm, hi)
        st.replay = None
        st.replay_decisions = {}
        st.commit_at = max(st.commit_at or 0, pend.last_offset + 1)
        st.pending = _Pending()
        self._commit(p, st)

    def _write(self, p: int, lo: int, hi: int, token: str, data: bytes, tables: list[pa.Table],
               decided: dict[str, Decision] | None = None) -> None:
        """Ledger row, then the insert of ``data`` (one ArrowStream holding ``tables``' rows);
        rows ClickHouse refuses are isolated and dead-lettered (sink/split.py). Raises
        ``Stopped`` if the sink is stopped before the flush is complete (nothing committed)."""
        rows = sum(t.num_rows for t in tables)
        self._ledger(p, lo, hi, token, rows)

        def insert(piece: Piece, piece_tok: str) -> None:
            # The whole flush goes in as the received bytes (lz4 buffers): clickhouse-connect's
            # insert_arrow would re-serialise the table and, embedded, spool it uncompressed to
            # a temporary file -- ~60 % of the sink's CPU (BENCHMARKS.md). Pieces of a split
            # flush are re-serialised (rare).
            body = data if not piece.name else to_ipc(piece.rows)
            with metrics.INSERT_SECONDS.time():
                self.client.raw_insert(f"{self.db}.events", _COLUMNS, body, fmt="ArrowStream",
                                       settings=_INSERT_SETTINGS | self._write_settings
                                       | {"insert_deduplication_token": piece_tok})

        def record(piece: Piece, decision: Decision) -> None:
            self._ledger(p, lo, hi, token, piece.rows.num_rows, piece.name, decision)

        def publish(piece: Piece, reason: str, detail: str) -> None:
            self._publish_rejected(p, piece, reason, detail, piece_token(token, piece))

        splitter = FlushSplitter(
            insert=insert, record=record, publish=publish, wait=self._backoff, healthy=self._healthy,
            max_partitions_per_insert=self.max_partitions_per_insert,
            max_partitions_per_batch=self.settings.sink.max_partitions_per_batch,
            unknown_error_retries=self.settings.sink.unknown_error_retries,
            failed_inserts_per_batch=self.settings.sink.failed_inserts_per_batch,
        )
        root = Piece("", pa.concat_tables(tables) if len(tables) > 1 else tables[0])
        out = splitter.write(root, token, decided)
        inserted = out.rows_inserted
        self.rows_inserted += inserted
        self.rows_rejected += sum(out.rejected.values())
        self.flushes += 1
        metrics.ROWS_INSERTED.inc(inserted)
        metrics.INSERT_ROWS.observe(inserted)
        if out.rejected:
            log.warning("flush %s: %s rows inserted, rows dead-lettered by reason: %s", token, inserted,
                        out.rejected)
        self._observe_latency(out.inserted)
        if self.on_insert is not None and out.inserted:
            self.on_insert(out.inserted)

    def _ledger(self, p: int, lo: int, hi: int, token: str, rows: int, piece: str = "",
                decision: Decision | None = None) -> None:
        """One ledger row (a flush, or a decision about one of its pieces), written durably
        before what it announces; retried while ClickHouse is away (its contents are ours, never
        bad data)."""
        d = decision or Decision("")
        self._retrying("ledger write", lambda: self.client.insert(
            f"{self.db}.sink_ledger",
            [[self.topic, p, lo, hi, rows, token, piece, d.outcome, d.reason, d.detail]],
            column_names=["topic", "partition", "first_source_offset", "last_source_offset", "rows",
                          "token", "piece", "outcome", "reason", "detail"],
            settings=self._write_settings,
        ))

    def _retrying(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried with backoff until it succeeds or the sink stops (``Stopped``)."""
        attempt = 0
        while True:
            try:
                return fn()
            except Stopped:
                raise
            except Exception as e:  # noqa: BLE001 -- ClickHouse outage: wait, never drop rows
                metrics.INSERT_ERRORS.labels("retryable").inc()
                log.warning("%s failed (%s); retrying", what, type(e).__name__)
                self._backoff(attempt)
                attempt += 1

    def _backoff(self, attempt: int) -> None:
        """Sleep before retry ``attempt`` (jittered exponential, at most 30 s) while staying in
        the consumer group; raises ``Stopped`` once the sink is asked to stop."""
        if self._stop.is_set():
            raise Stopped
        delay = min(0.2 * 2 ** min(attempt, 8), 30.0) * (0.8 + 0.4 * random.random())  # noqa: S311
        self._keep_alive(delay)
        if self._stop.is_set():
            raise Stopped
        if self._abandon:
            self._abandon = False
            raise _Abandoned

    def _healthy(self) -> bool:
        """Whether ClickHouse answers a trivial query (an unclassified insert error is blamed on
        the rows only then)."""
        try:
            self.client.query("SELECT 1")
            return True
        except Exception:  # noqa: BLE001
            return False

    # -------------------------------------------------------------- dead letters

    def _publish_rejected(self, p: int, piece: Piece, reason: str, detail: str, token: str) -> None:
        """Rows the sink does not insert -> ``events.rejected`` (same partition), Arrow IPC like
        the accepted topic, with headers saying where they came from and why; returns once the
        broker has them. No row values in headers. At-least-once: a crash before the ledger
        records the copy re-publishes it (``ht-token`` names it for deduplication)."""
        chunks = self._ipc_chunks(piece.rows)
        bounds = pc.min_max(piece.rows.column("source_offset")).as_py()
        source_partition = pc.min(piece.rows.column("source_partition")).as_py()
        self._send_rejected(p, [(value, [
            ("ht-stage", b"sink"), ("ht-reason", reason.encode()), ("ht-detail", detail.encode()[:200]),
            ("ht-source-partition", str(source_partition).encode()),
            ("ht-source-offset-first", str(bounds["min"]).encode()),
            ("ht-source-offset-last", str(bounds["max"]).encode()),
            ("ht-rows", str(n).encode()), ("ht-token", token.encode()),
            ("ht-chunk", f"{i + 1}/{len(chunks)}".encode()),
        ]) for i, (n, value) in enumerate(chunks)])

    def _send_rejected(self, p: int, messages: list[tuple[bytes, list[tuple[str, str | bytes | None]]]],
                       key: bytes | None = None) -> None:
        """Produce ``messages`` to partition ``p`` of ``events.rejected`` and wait until the
        broker has them all (retrying, and raising ``Stopped`` once the sink stops)."""
        attempt = 0
        while True:
            producer = self._dead_letter_producer()
            results: list[Any] = []

            def delivered(err: Any, _msg: Any, done: Callable[[Any], None] = results.append) -> None:
                done(err)

            for value, headers in messages:
                producer.produce(self.rejected_topic, value=value, key=key, partition=p,
                                 headers=headers, on_delivery=delivered)
            while len(results) < len(messages):
                producer.poll(0.2)
                if self._stop.is_set():
                    raise Stopped
            errors = [e for e in results if e is not None]
            if not errors:
                return
            log.warning("dead-letter publish failed (%s); retrying", errors[0])
            self._backoff(attempt)
            attempt += 1

    def _ipc_chunks(self, rows: pa.Table) -> list[tuple[int, bytes]]:
        """``rows`` as IPC messages (rows in it, bytes) each within the topic's message size
        (halving)."""
        limit = int(self.settings.topics.max_message_bytes * 0.9)
        value = to_ipc(rows)
        if len(value) <= limit or rows.num_rows < 2:
            return [(rows.num_rows, value)]
        half = rows.num_rows // 2
        return self._ipc_chunks(rows.slice(0, half)) + self._ipc_chunks(rows.slice(half))

    def _dead_letter_producer(self) -> Producer:
        if self._producer is None:
            self._producer = Producer(producer_config(
                self.settings.kafka, **{"message.max.bytes": self.settings.topics.max_message_bytes}))
        return self._producer

    def _keep_alive(self, seconds: float) -> None:
        """Wait while staying in the consumer group (paused partitions, polling); returns early
        when the sink is asked to stop."""
        c = self._consumer
        if c is None:
            self._stop.wait(seconds)
            return
        assignment = c.assignment()
        c.pause(assignment)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self._stop.is_set():
            c.poll(0.1)
        c.resume(assignment)

    def _observe_latency(self, tables: list[pa.Table]) -> None:
        # Histogram.observe is per value; a bounded sample per flush keeps this off the hot path.
        cap = np.concatenate([pc.cast(t.column("captured_at"), pa.int64()).to_numpy() for t in tables]) \
            if tables else np.empty(0, np.int64)
        if len(cap) == 0:
            return
        idx = np.linspace(0, len(cap) - 1, num=min(len(cap), 64)).astype(int)
        lat = (now_us() - cap[idx]) / 1e6
        for v in lat:
            metrics.END_TO_END_SECONDS.observe(max(float(v), 0.0))

    def _commit(self, p: int, st: _PartitionState) -> None:
        if st.commit_at is None or self._consumer is None:
            return
        try:
            # Once stopping, the commit is not waited for: with the broker gone a synchronous
            # commit would hold the process past its grace period, and an offset that does not
            # make it only means the flush is replayed (a no-op) on the next start.
            offsets = [TopicPartition(self.topic, p, st.commit_at)]
            if self._stop.is_set():
                self._consumer.commit(offsets=offsets, asynchronous=True)
            else:
                self._consumer.commit(offsets=offsets, asynchronous=False)
            st.commit_at = None
        except KafkaException as e:
            log.warning("offset commit for partition %s failed: %s (will retry)", p, e)

    # -------------------------------------------------------------- main loop

    def run(self, stop: threading.Event, on_tick: Callable[[Sink], None] | None = None) -> None:
        """Consume and write until ``stop`` is set; then flushes and commits what it holds if
        ClickHouse takes it at the first attempt (every wait returns once ``stop`` is set; an
        unfinished flush is left uncommitted, for the ledger replay)."""
        self._stop = stop
        conf = {
            **self.settings.kafka.librdkafka(),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "session.timeout.ms": int(self.settings.sink.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, self.settings.sink.session_timeout_s / 3) * 1000),
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": self.settings.topics.max_message_bytes * 2,
            "log_level": 3,
            **static_consumer_conf(self.settings.sink.partitions),
        }
        c = Consumer(conf)
        self._consumer = c
        try:
            take_partitions(c, self.topic, self.settings.sink.partitions, self._on_assign, self._on_revoke,
                            strict=True, stop=stop)
            self._consume_until(c, stop, on_tick)
        except Stopped:
            log.info("stopped during a flush; it is replayed from the ledger on the next start")
            for st in self._parts.values():
                # Never flushed again by this process (the revoke at close would retry it
                # without the decisions a split flush recorded): the ledger replay finishes it.
                st.pending = _Pending()
                st.commit_at = None
        finally:
            try:
                c.close()
            finally:
                self._consumer = None
                # Dead-letter copies were confirmed when sent; nothing is waited for here.
                self._producer = None

    def _consume_until(self, c: Consumer, stop: threading.Event,
                       on_tick: Callable[[Sink], None] | None) -> None:
        last_lag = 0.0
        while not stop.is_set():
            msgs = c.consume(num_messages=self.settings.sink.poll_messages, timeout=0.2)
            for m in msgs:
                err = m.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        self._on_partition_eof(m.partition() or 0)
                    else:
                        log.warning("consumer error: %s", err)
                    continue
                self._consume_one(m)
            for p, st in list(self._parts.items()):
                if self._due(st):
                    try:
                        self._flush(p, st)
                    except _Abandoned:
                        log.info("partition %s was revoked during its flush; its new owner replays it", p)
                elif st.pending.empty and st.commit_at is not None:
                    self._commit(p, st)
            if time.monotonic() - last_lag > 5:
                last_lag = time.monotonic()
                self._update_lag(c)
            if on_tick is not None:
                on_tick(self)
        for p, st in list(self._parts.items()):
            if st.replay is not None:  # not read to its end: the next start replays it whole
                st.pending = _Pending()
                st.commit_at = None
                continue
            try:
                self._flush(p, st)
                self._commit(p, st)
            except Stopped:
                log.info("partition %s: flush left for the ledger replay", p)
                st.pending = _Pending()  # not to be flushed again by the revoke at close
                st.commit_at = None

    def _consume_one(self, m: Any) -> None:
        try:
            table = from_ipc(m.value())
            if not table.schema.equals(STORED_SCHEMA, check_metadata=False):
                raise ValueError("schema mismatch")
            # Arrow does not enforce a field's nullability on read: a null source_offset would
            # break the dedup arithmetic, a null key column would be stored as ''.
            nulls = [f.name for f in STORED_SCHEMA if not f.nullable and table.column(f.name).null_count]
            if nulls:
                raise ValueError(f"nulls in non-nullable columns: {', '.join(nulls)}")
        except Exception as e:  # noqa: BLE001 -- whatever the bytes are, they are not ours
            # Not written by our stream: nothing from it can be trusted or inserted. Its bytes go
            # to events.rejected as they are (with its key and headers), before its offset can
            # be committed.
            metrics.MESSAGES.labels("invalid").inc()
            log.warning("invalid message at %s/%s (%s): dead-lettered", m.partition(), m.offset(),
                        type(e).__name__)
            detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
            self._send_rejected(m.partition(), [(m.value() or b"", [
                *(m.headers() or []), ("ht-stage", b"sink"), ("ht-reason", b"invalid_message"),
                ("ht-detail", detail.encode()[:200]), ("ht-accepted-offset", str(m.offset()).encode()),
            ])], key=m.key())
            st = self._parts.setdefault(m.partition(), _PartitionState())
            st.commit_at = max(st.commit_at or 0, m.offset() + 1)
            return
        self._handle(m.partition(), m.offset(), table, m.value())

    def _update_lag(self, c: Consumer) -> None:
        lag = 0
        try:
            for tp in c.assignment():
                # Cached watermarks come with every fetch; a broker round trip here would queue
                # behind the consumer's pending fetch and stall the loop (~0.5 s per partition).
                lo, hi = c.get_watermark_offsets(tp, cached=True)
                pos = c.position([tp])[0].offset
                lag += max(hi - (pos if pos >= 0 else lo), 0)
        except KafkaException:
            return
        metrics.LAG_MESSAGES.set(lag)
