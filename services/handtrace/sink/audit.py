"""The audit writer: the control-plane audit topic -> ClickHouse ``control_audit``, exactly once
(issue #13, "Audit"; contract: docs/design/control-plane.md).

The API writes one JSON entry per change and per refusal to ``<prefix>.audit`` (one partition,
kept forever, keyed by actor). This writer, a thread of ``python -m handtrace.sink`` with its own
consumer group (``sink.audit_group_id``), takes up to ``sink.audit_batch_messages`` entries per
poll, turns them into one Arrow table and inserts it; offsets are committed only after the insert.

Exactly once, as the events sink does it (sink/writer.py):
- before each insert a ``sink_ledger`` row records the offset range and a dedup token derived
  from it (``<topic>/<partition>/<first>-<last>``); the insert carries that token;
- after a crash (or a kill, or a rebalance) the new owner reads the partition's last ledger row:
  offsets before its range were stored (a ledger row is only written once the previous insert
  returned), its range is inserted again *as one insert with the same token* (ClickHouse drops
  it if it had landed), and reading goes on after it.

A message that is not a valid audit entry (not JSON, missing or mistyped fields) never stops the
writer and is never dropped silently: it is stored with ``action = outcome = 'invalid'``, why in
``reason`` and the message as it was in ``detail``, and counted
(``handtrace_sink_audit_entries_total{outcome="invalid"}``).

Entries are decoded one by one (``before``/``after`` are arbitrary JSON kept as JSON text), but
the rows go to ClickHouse as one Arrow table per poll: the audit trail is human actions, a few
per second at most.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from handtrace.core.cluster import layout_of
from handtrace.core.rows import TS, ipc_stream
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.sink import metrics
from handtrace.sink.assignment import static_consumer_conf, take_partitions
from handtrace.sink.errors import RowsRefused, backoff_in_group, retry_clickhouse
from handtrace.sink.schema import migrate
from handtrace.sink.split import Stopped

log = logging.getLogger("handtrace.sink.audit")

AUDIT_SCHEMA = pa.schema([
    pa.field("at", TS, nullable=False),
    pa.field("subject", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("roles", pa.list_(pa.string()), nullable=False),
    pa.field("action", pa.string(), nullable=False),
    pa.field("target", pa.string()),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("before", pa.string(), nullable=False),
    pa.field("after", pa.string(), nullable=False),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("detail", pa.string(), nullable=False),
    pa.field("method", pa.string(), nullable=False),
    pa.field("path", pa.string(), nullable=False),
    pa.field("source_partition", pa.int32(), nullable=False),
    pa.field("source_offset", pa.int64(), nullable=False),
])

INVALID = "invalid"
OUTCOMES = frozenset({"allowed", "refused"})
#: ``detail`` of an invalid entry keeps the message up to this many characters.
MAX_DETAIL = 64 * 1024
# DateTime64(6) holds 1900-01-01 .. 2299-12-31; anything else is not a time the API wrote.
_MIN_US = 0
_MAX_US = 10_413_791_999_000_000
_TEXT = ("name", "reason", "detail", "method", "path")


@dataclass(frozen=True)
class AuditMessage:
    """One message of the audit topic, as the writer needs it."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_us: int  # the broker's time: the ``at`` of an invalid entry


class InvalidEntry(ValueError):
    """A message that is not an audit entry as ``services.audit_entry`` writes it."""


def _text(raw: bytes | None) -> str:
    return (raw or b"").decode("utf-8", errors="backslashreplace")


def parse_entry(value: bytes | None) -> dict[str, Any]:
    """The row of one audit entry (``at`` in µs); ``InvalidEntry`` saying why if it is not one."""
    try:
        doc = json.loads(value or b"")
    except (ValueError, UnicodeDecodeError):
        raise InvalidEntry("not JSON") from None
    if not isinstance(doc, dict):
        raise InvalidEntry("not a JSON object")
    at = doc.get("at_us")
    if not isinstance(at, int) or isinstance(at, bool) or not _MIN_US <= at <= _MAX_US:
        raise InvalidEntry("at_us missing or not a time")
    for name in ("subject", "action"):
        if not isinstance(doc.get(name), str) or not doc[name]:
            raise InvalidEntry(f"{name} missing or not a string")
    if doc.get("outcome") not in OUTCOMES:
        raise InvalidEntry("outcome not allowed or refused")
    roles = doc.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise InvalidEntry("roles missing or not a list of strings")
    target = doc.get("target")
    if target is not None and not isinstance(target, str):
        raise InvalidEntry("target not a string")
    row: dict[str, Any] = {"at": at, "subject": doc["subject"], "roles": roles, "action": doc["action"],
                           "target": target, "outcome": doc["outcome"]}
    for name in _TEXT:
        v = doc.get(name, "")
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise InvalidEntry(f"{name} not a string")
        row[name] = v
    row["before"] = json.dumps(doc.get("before"), sort_keys=True, ensure_ascii=False)
    row["after"] = json.dumps(doc.get("after"), sort_keys=True, ensure_ascii=False)
    return row


def invalid_row(m: AuditMessage, why: str) -> dict[str, Any]:
    """The row that keeps a message that is not an audit entry (nothing is lost silently)."""
    return {"at": min(max(m.timestamp_us, _MIN_US), _MAX_US), "subject": _text(m.key), "name": "",
            "roles": [], "action": INVALID, "target": None, "reason": why, "before": "null",
            "after": "null", "outcome": INVALID, "detail": _text(m.value)[:MAX_DETAIL], "method": "",
            "path": ""}


def decode_batch(msgs: Sequence[AuditMessage]) -> tuple[pa.Table, int]:
    """The ``control_audit`` rows of ``msgs`` (one per message, in order) and how many of them
    were invalid."""
    rows: list[dict[str, Any]] = []
    invalid = 0
    for m in msgs:
        try:
            row = parse_entry(m.value)
        except InvalidEntry as e:
            row = invalid_row(m, str(e))
            invalid += 1
        row["source_partition"] = m.partition
        row["source_offset"] = m.offset
        rows.append(row)
    cols = {f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in AUDIT_SCHEMA}
    return pa.Table.from_pydict(cols, schema=AUDIT_SCHEMA), invalid


def batch_token(topic: str, partition: int, first: int, last: int) -> str:
    """The insert_deduplication_token of the insert holding offsets ``first..last``."""
    return f"{topic}/{partition}/{first}-{last}"


# ------------------------------------------------------------------ ClickHouse side


class AuditStore(Protocol):
    """What the writer needs from ClickHouse."""

    def last_flush(self, topic: str, partition: int) -> tuple[int, int, str] | None:
        """The (first, last, token) of the partition's latest ledger row, or None."""
        ...

    def record_flush(self, topic: str, partition: int, first: int, last: int, rows: int, token: str) -> None:
        """Write the ledger row of a flush (before its insert)."""
        ...

    def insert(self, rows: pa.Table, token: str) -> None:
        """Insert ``rows`` into ``control_audit`` with ``insert_deduplication_token = token``."""
        ...


class ClickHouseAudit:
    """AuditStore on a clickhouse-connect client (server or embedded)."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.db = database

    def last_flush(self, topic: str, partition: int) -> tuple[int, int, str] | None:
        rows = self.client.query(
            f"SELECT argMax(first_source_offset, last_source_offset), max(last_source_offset), "
            f"argMax(token, last_source_offset), count() FROM {self.db}.sink_ledger "
            f"WHERE topic = %(t)s AND partition = %(p)s AND outcome = ''",
            parameters={"t": topic, "p": partition}).result_rows
        if not rows or not rows[0][3]:
            return None
        lo, hi, token, _n = rows[0]
        return int(lo), int(hi), str(token)

    def record_flush(self, topic: str, partition: int, first: int, last: int, rows: int, token: str) -> None:
        self.client.insert(f"{self.db}.sink_ledger", [[topic, partition, first, last, rows, token]],
                           column_names=["topic", "partition", "first_source_offset", "last_source_offset",
                                         "rows", "token"])

    def insert(self, rows: pa.Table, token: str) -> None:
        self.client.raw_insert(f"{self.db}.control_audit", list(rows.schema.names), ipc_stream(rows, "lz4"),
                               fmt="ArrowStream",
                               settings={"insert_deduplicate": 1, "insert_deduplication_token": token})


# ------------------------------------------------------------------ the writer


@dataclass
class _Partition:
    hwm: int = -1  # offsets at or below are stored
    replay: tuple[int, int, str] | None = None  # the last ledger row's range, to insert again
    held: list[AuditMessage] = field(default_factory=list)  # read of the replay range so far


class AuditWriter:
    """Consumes the audit topic and stores it in ``control_audit`` (see the module docstring)."""

    def __init__(self, settings: Settings, store: AuditStore, *, group_id: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.topic = Topics.from_settings(settings.topics).audit
        self.group_id = group_id or settings.sink.audit_group_id
        self.rows_inserted = 0
        self._parts: dict[int, _Partition] = {}
        self._stop = threading.Event()
        self._consumer: Consumer | None = None

    @classmethod
    def on_clickhouse(cls, settings: Settings, client: Any, **kw: Any) -> AuditWriter:
        """A writer on a clickhouse-connect client (migrations applied first)."""
        migrate(client, settings.clickhouse.database, settings.warehouse.retention, layout_of(settings.clickhouse))
        return cls(settings, ClickHouseAudit(client, settings.clickhouse.database), **kw)

    # -------------------------------------------------------------- batches

    def assign(self, partition: int) -> None:
        """Take ``partition``: its last ledger row says what is stored and what to replay."""
        last = self._ch("ledger read", lambda: self.store.last_flush(self.topic, partition))
        st = _Partition()
        if last is not None:
            st.replay, st.hwm = last, last[1]
        self._parts[partition] = st

    def handle(self, partition: int, msgs: Sequence[AuditMessage]) -> int | None:
        """Store what is new in ``msgs`` (offsets ascending); returns the offset the partition may
        commit now (None: nothing yet, e.g. a replay range not read to its end)."""
        st = self._parts.get(partition)
        if st is None:
            self.assign(partition)
            st = self._parts[partition]
        if not msgs:
            return None
        if st.replay is not None:
            lo, hi, _token = st.replay
            st.held += [m for m in msgs if lo <= m.offset <= hi]
            below = sum(1 for m in msgs if m.offset < lo)
            if below:
                metrics.AUDIT_ENTRIES.labels("duplicate").inc(below)
            msgs = [m for m in msgs if m.offset > hi]
            if not msgs and (not st.held or st.held[-1].offset < hi):
                return None  # the rest of the range is still to come
            self.end_replay(partition)
        fresh = [m for m in msgs if m.offset > st.hwm]
        if len(fresh) < len(msgs):
            metrics.AUDIT_ENTRIES.labels("duplicate").inc(len(msgs) - len(fresh))
        if fresh:
            lo, hi = fresh[0].offset, fresh[-1].offset
            token = batch_token(self.topic, partition, lo, hi)
            self._ch("ledger write", lambda: self.store.record_flush(self.topic, partition, lo, hi,
                                                                     len(fresh), token))
            self._write(fresh, token)
            st.hwm = hi
        return max(st.hwm, msgs[-1].offset) + 1 if msgs else st.hwm + 1

    def end_replay(self, partition: int) -> bool:
        """Insert what was read of the replay range as one insert under its original token (the
        range's end is reached, or the partition's end); False if there was no replay."""
        st = self._parts[partition]
        if st.replay is None:
            return False
        _lo, _hi, token = st.replay
        if st.held:
            self._write(st.held, token)
        st.replay, st.held = None, []
        return True

    def _write(self, msgs: Sequence[AuditMessage], token: str) -> None:
        rows, invalid = decode_batch(msgs)
        if invalid:
            log.warning("%d audit messages are not valid entries: stored as '%s'", invalid, INVALID)
        try:
            self._ch("insert into control_audit", lambda: self.store.insert(rows, token), refusable=True)
        except _Refused as e:
            # Rows we built ourselves refused for good: keep every message as an invalid row
            # (raw text in detail) under a token of its own, so the trail still has it.
            log.error("audit rows refused by ClickHouse (%s): stored as '%s'", e.reason, INVALID)
            kept = [invalid_row(m, f"refused:{e.reason}") | {"source_partition": m.partition,
                                                              "source_offset": m.offset} for m in msgs]
            table = pa.Table.from_pylist(kept, schema=AUDIT_SCHEMA)
            self._ch("insert into control_audit", lambda: self.store.insert(table, token + "/refused"))
            invalid = len(msgs)
        self.rows_inserted += len(msgs)
        metrics.AUDIT_ENTRIES.labels("stored").inc(len(msgs) - invalid)
        metrics.AUDIT_ENTRIES.labels("invalid").inc(invalid)

    # -------------------------------------------------------------- ClickHouse with retries

    def _ch(self, what: str, fn: Callable[[], Any], refusable: bool = False) -> Any:
        """``fn()`` against ClickHouse (``errors.retry_clickhouse``): outages retried until
        stopped; for inserts, rows refused for good raise ``_Refused``."""
        return retry_clickhouse(what, fn, backoff=self._backoff, log=log, refusable=refusable,
                                unknown_retries=self.settings.sink.unknown_error_retries, passthrough=(Stopped,))

    def _backoff(self, attempt: int) -> None:
        """``errors.backoff_in_group``; ``Stopped`` once stopping."""
        if not backoff_in_group(self._consumer, self._stop, attempt, log=log):
            raise Stopped

    # -------------------------------------------------------------- kafka

    def _on_assign(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self.assign(tp.partition)

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:  # nothing is buffered between polls but a replay: the next owner replays it
            self._parts.pop(tp.partition, None)

    def consumer_config(self) -> dict[str, Any]:
        """Consumer settings: manual commits, from the topic's start, end-of-partition events
        (they end a replay whose range the topic no longer continues)."""
        return {
            **self.settings.kafka.librdkafka(),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "session.timeout.ms": int(self.settings.sink.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, self.settings.sink.session_timeout_s / 3) * 1000),
            "log_level": 3,
            **static_consumer_conf(self.settings.sink.partitions),
        }

    def _commit(self, c: Consumer, partition: int, offset: int | None) -> None:
        if offset is None:
            return
        try:
            c.commit(offsets=[TopicPartition(self.topic, partition, offset)], asynchronous=False)
        except KafkaException as e:  # the rows are stored: a lost commit only means a replay
            log.warning("audit offset commit failed: %s (the ledger makes the replay harmless)", e)

    def run(self, stop: threading.Event) -> None:
        """Consume until ``stop`` is set; every poll's entries are stored, then committed."""
        self._stop = stop
        c = Consumer(self.consumer_config())
        self._consumer = c
        try:
            # sink.partitions (separate embedded data dirs): the same partitions of this topic.
            take_partitions(c, self.topic, self.settings.sink.partitions, self._on_assign, self._on_revoke,
                            strict=False, stop=stop)
            while not stop.is_set():
                batch: dict[int, list[AuditMessage]] = {}
                for m in c.consume(num_messages=self.settings.sink.audit_batch_messages, timeout=0.5):
                    err = m.error()
                    p = m.partition() or 0
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            if p in self._parts and self.end_replay(p) and p in self._parts:
                                self._commit(c, p, self._parts[p].hwm + 1)
                        elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                            log.warning("consumer error: %s", err)
                        continue
                    if p not in self._parts:
                        continue  # revoked within this poll
                    _kind, ts_ms = m.timestamp()
                    batch.setdefault(p, []).append(AuditMessage(p, m.offset() or 0, m.key(), m.value(),
                                                                max(ts_ms, 0) * 1000))
                for p, msgs in batch.items():
                    at = self.handle(p, msgs)
                    if p in self._parts:  # not revoked while ClickHouse was waited for
                        self._commit(c, p, at)
        except Stopped:
            log.info("audit writer stopped with an unfinished insert; it is replayed on the next start")
        finally:
            try:
                c.close()
            finally:
                self._consumer = None


_Refused = RowsRefused  # ClickHouse refuses the rows for good (errors.retry_clickhouse)
