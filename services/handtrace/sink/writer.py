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
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from handtrace.core.clock import now_us
from handtrace.core.rows import STORED_SCHEMA, from_ipc, join_ipc, to_ipc
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.sink import metrics
from handtrace.sink.schema import migrate

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
        self.topic = Topics.from_settings(settings.topics).stored
        self.group_id = group_id or settings.sink.group_id
        self.rows_inserted = 0
        self.flushes = 0
        self.on_insert = on_insert
        self._parts: dict[int, _PartitionState] = {}
        self._consumer: Consumer | None = None
        migrate(client, self.db)

    # -------------------------------------------------------------- ledger

    def _load_ledger(self, partitions: list[int]) -> None:
        rows = self.client.query(
            f"SELECT partition, argMax(first_source_offset, last_source_offset), "
            f"max(last_source_offset), argMax(token, last_source_offset) "
            f"FROM {self.db}.sink_ledger WHERE topic = %(t)s GROUP BY partition",
            parameters={"t": self.topic},
        ).result_rows
        known = {r[0]: r for r in rows}
        for p in partitions:
            st = _PartitionState()
            if p in known:
                _, lo, hi, token = known[p]
                st.hwm = hi
                st.replay = (lo, hi, token)
            self._parts[p] = st

    # -------------------------------------------------------------- kafka callbacks

    def _on_assign(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        self._load_ledger([tp.partition for tp in parts])

    def _on_revoke(self, consumer: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:
            st = self._parts.get(tp.partition)
            if st is not None:
                self._flush(tp.partition, st)
                self._commit(tp.partition, st)
                self._parts.pop(tp.partition, None)

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
            return
        if st.replay is not None:
            lo, hi, token = st.replay
        else:
            lo, hi = pend.first_source, pend.last_source
            token = f"{self.topic}/{p}/{lo}-{hi}"
        if pend.rows:
            data = join_ipc([b if b is not None else to_ipc(t)
                             for t, b in zip(pend.tables, pend.payloads, strict=True)])
            self._write(p, lo, hi, token, data, pend.tables)
            st.hwm = max(st.hwm, hi)
        st.replay = None
        st.commit_at = max(st.commit_at or 0, pend.last_offset + 1)
        st.pending = _Pending()
        self._commit(p, st)

    def _write(self, p: int, lo: int, hi: int, token: str, data: bytes, tables: list[pa.Table]) -> None:
        """Ledger row, then the insert of ``data`` (one ArrowStream holding ``tables``' rows)."""
        rows = sum(t.num_rows for t in tables)
        delay = 0.2
        while True:
            try:
                self.client.insert(
                    f"{self.db}.sink_ledger",
                    [[self.topic, p, lo, hi, rows, token]],
                    column_names=["topic", "partition", "first_source_offset", "last_source_offset", "rows", "token"],
                )
                with metrics.INSERT_SECONDS.time():
                    # The received bytes as they are (lz4 buffers): clickhouse-connect's
                    # insert_arrow would re-serialise the table and, embedded, spool it
                    # uncompressed to a temporary file -- ~60 % of the sink's CPU (BENCHMARKS.md).
                    self.client.raw_insert(f"{self.db}.events", _COLUMNS, data, fmt="ArrowStream",
                                           settings=_INSERT_SETTINGS | {"insert_deduplication_token": token})
                break
            except Exception as e:  # noqa: BLE001 -- ClickHouse outage: retry, never drop rows
                metrics.INSERT_ERRORS.inc()
                log.warning("insert of %s rows failed (%s); retrying in %.1fs", rows, e, delay)
                self._keep_alive(delay)
                delay = min(delay * 2, 30.0) * (0.8 + 0.4 * random.random())  # noqa: S311
        self.rows_inserted += rows
        self.flushes += 1
        metrics.ROWS_INSERTED.inc(rows)
        metrics.INSERT_ROWS.observe(rows)
        self._observe_latency(tables)
        if self.on_insert is not None:
            self.on_insert(tables)

    def _keep_alive(self, seconds: float) -> None:
        """Wait while staying in the consumer group (paused partitions, polling)."""
        c = self._consumer
        if c is None:
            time.sleep(seconds)
            return
        assignment = c.assignment()
        c.pause(assignment)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
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
            self._consumer.commit(offsets=[TopicPartition(self.topic, p, st.commit_at)], asynchronous=False)
            st.commit_at = None
        except KafkaException as e:
            log.warning("offset commit for partition %s failed: %s (will retry)", p, e)

    # -------------------------------------------------------------- main loop

    def run(self, stop: threading.Event, on_tick: Callable[[Sink], None] | None = None) -> None:
        """Consume and write until ``stop`` is set; flushes and commits what it holds on exit."""
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
        }
        c = Consumer(conf)
        self._consumer = c
        c.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke)
        last_lag = 0.0
        try:
            while not stop.is_set():
                msgs = c.consume(num_messages=self.settings.sink.poll_messages, timeout=0.2)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            partition = m.partition()
                            if partition is not None:
                                self._on_partition_eof(partition)
                        else:
                            log.warning("consumer error: %s", err)
                        continue
                    self._consume_one(m)
                for p, st in list(self._parts.items()):
                    if self._due(st):
                        self._flush(p, st)
                    elif st.pending.empty and st.commit_at is not None:
                        self._commit(p, st)
                if time.monotonic() - last_lag > 5:
                    last_lag = time.monotonic()
                    self._update_lag(c)
                if on_tick is not None:
                    on_tick(self)
            for p, st in list(self._parts.items()):
                self._flush(p, st)
                self._commit(p, st)
        finally:
            c.close()
            self._consumer = None

    def _consume_one(self, m: Any) -> None:
        try:
            table = from_ipc(m.value())
            if not table.schema.equals(STORED_SCHEMA, check_metadata=False):
                raise ValueError("schema mismatch")
        except (ValueError, pa.ArrowInvalid) as e:
            # Not written by our stream: counted and skipped (nothing from it can be trusted).
            metrics.MESSAGES.labels("invalid").inc()
            log.warning("skipping invalid message at %s/%s: %s", m.partition(), m.offset(), e)
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
