"""The demonstration writer: accepted demonstrations → frame store + ClickHouse, whole or not at
all, exactly once (issue #11; contract: docs/design/demonstrations.md, "In the sink").

Its own consumer (group ``demo.sink_group_id``) reads ``<prefix>.demonstrations.accepted``:

- a **header** opens a *pending* demonstration that expects the frames of its manifest;
- a **frame** whose (employee key, demonstration id, sha256) a pending manifest lists is written
  to the store at ``framestore.frame_key`` (retried with backoff while the store is away, stop
  aware); any other frame is discarded and counted;
- once every manifest frame is stored: the ``frames`` rows, the ``demonstration_events`` rows,
  then the ``demonstrations`` row (``complete``) **last**, each insert carrying a deterministic
  ``insert_deduplication_token`` (demonstration id, table);
- a demonstration still pending after ``demo.hold_s`` gets an ``incomplete`` row only, and its
  objects (those no stored frame row references) are deleted.

Why exactly once, whole or nothing:
- offsets: a partition commits only up to the first offset of its oldest pending demonstration
  (``safe_commit``), so a crash, a kill or a rebalance replays every demonstration that was not
  finished -- header and frames -- and object writes are idempotent (content-addressed keys);
- a replay that repeats inserts that had landed is dropped by ClickHouse (same token, within
  the tables' ``non_replicated_deduplication_window``); a header whose demonstration is already
  stored ``complete`` is skipped (replays, re-uploads after the window);
- a frames or events row is never queryable as part of a demonstration before its objects are
  stored (objects first, rows after), and the ``complete`` row comes last: rows of a demonstration
  whose ``complete`` row is missing are a write in progress, finished by the replay.

All frames of one person are in one partition (keyed by pseudonym), so one writer owns them:
deleting an incomplete demonstration's objects cannot race another writer's use of the same key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from handtrace.core.cluster import layout_of
from handtrace.core.framestore import FrameStore, frame_key
from handtrace.core.rows import (
    DEMONSTRATION_EVENTS_SCHEMA as EVENTS_SCHEMA,
)
from handtrace.core.rows import (
    DEMONSTRATIONS_SCHEMA,
    FRAMES_SCHEMA,
    STORED_SCHEMA,
    UUID_BYTES,
    from_ipc,
    ipc_stream,
)
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.sink import metrics
from handtrace.sink.assignment import static_consumer_conf, take_partitions
from handtrace.sink.errors import RowsRefused, backoff_in_group, retry_clickhouse
from handtrace.sink.schema import migrate
from handtrace.sink.split import Stopped

log = logging.getLogger("handtrace.sink.demonstrations")



COMPLETE = "complete"
INCOMPLETE = "incomplete"
HOLD_EXPIRED = "hold_expired"


class InvalidMessage(ValueError):
    """A message the stream did not write as the contract says: skipped and counted."""


def _header(headers: Iterable[tuple[str, bytes | None]] | None, name: str) -> bytes | None:
    for k, v in headers or ():
        if k == name:
            return v
    return None


def dedup_token(demo_id: bytes, table: str, status: str = COMPLETE) -> str:
    """The insert_deduplication_token of one demonstration's insert into ``table``: a function
    of (demonstration id, table) only, so every replay repeats it."""
    suffix = "" if status == COMPLETE else f"/{status}"
    return f"demo/{demo_id.hex()}/{table}{suffix}"


def safe_commit(position: int, pending_first_offsets: Iterable[int]) -> int:
    """The offset a partition may commit: what it has read (``position``, the next offset), but
    never past the first offset of a demonstration still pending there (a crash must replay it
    from its header)."""
    return min([position, *pending_first_offsets])


# ------------------------------------------------------------------ parsing


@dataclass(frozen=True)
class DemoHeader:
    """An accepted demonstration header: its ``ht-demo`` metadata and its events (Arrow IPC)."""

    demo_id: bytes
    employee_key: str
    meta: dict[str, Any]
    events_ipc: bytes
    #: sha256 hex -> object key of every frame of the accepted manifest
    expected: dict[str, str]


def parse_header(headers: Any, value: bytes | None) -> DemoHeader:
    """Check and decode a header message; raises InvalidMessage."""
    raw = _header(headers, "ht-demo")
    if raw is None:
        raise InvalidMessage("header without ht-demo")
    try:
        meta = json.loads(raw)
        demo_id = bytes.fromhex(meta["demonstration_id"])
        employee_key = str(meta["employee_key"])
        expected: dict[str, str] = {}
        for f in meta.get("frames") or []:
            expected[f["sha256"]] = frame_key(employee_key, f["sha256"], f["format"])
    except (ValueError, KeyError, TypeError) as e:
        raise InvalidMessage(f"bad ht-demo: {type(e).__name__}") from e
    if len(demo_id) != 16:
        raise InvalidMessage("demonstration id is not 16 bytes")
    hdr_id = _header(headers, "ht-demo-id")
    if hdr_id is not None and hdr_id != demo_id:
        raise InvalidMessage("ht-demo-id differs from ht-demo")
    return DemoHeader(demo_id, employee_key, meta, value or b"", expected)


def parse_frame(headers: Any) -> tuple[bytes, str, str, str]:
    """(demonstration id, employee key, sha256 hex, format) of a frame message; raises
    InvalidMessage."""
    demo_id = _header(headers, "ht-demo-id")
    key = _header(headers, "ht-employee-key")
    sha = _header(headers, "ht-sha256")
    fmt = _header(headers, "ht-format")
    if demo_id is None or len(demo_id) != 16 or not key or not sha or not fmt:
        raise InvalidMessage("frame without ht-demo-id, ht-employee-key, ht-sha256 or ht-format")
    try:
        return demo_id, key.decode(), sha.decode(), fmt.decode()
    except UnicodeDecodeError as e:
        raise InvalidMessage("frame headers are not UTF-8") from e


# ------------------------------------------------------------------ rows (whole Arrow tables)


def _uuid(hex_or_none: str | None) -> bytes | None:
    return bytes.fromhex(hex_or_none) if hex_or_none else None


def frames_table(h: DemoHeader) -> pa.Table:
    """The ``frames`` rows of a demonstration (one per manifest frame; bounded by the manifest)."""
    frames = h.meta.get("frames") or []
    cols: dict[str, list[Any]] = {
        "demonstration_id": [h.demo_id] * len(frames),
        "employee_key": [h.employee_key] * len(frames),
        "step": [int(f["step"]) for f in frames],
        "sha256": [f["sha256"] for f in frames],
        "object_key": [h.expected[f["sha256"]] for f in frames],
        "format": [f["format"] for f in frames],
        "bytes": [int(f["bytes"]) for f in frames],
        "width": [int(f["width"]) for f in frames],
        "height": [int(f["height"]) for f in frames],
        "captured_at": [int(f["captured_at_us"]) for f in frames],
        "reason": [str(f.get("reason") or "") for f in frames],
        "action_started_at": [f.get("action_started_at_us") for f in frames],
        "action_event_id": [_uuid(f.get("action_event_id")) for f in frames],
        "windows": [[{k: w.get(k) for k in ("app_id", "url", "x", "y", "width", "height")}
                     for w in f.get("windows") or []] for f in frames],
        "filled": [[{k: b[k] for k in ("x", "y", "width", "height")} for b in f.get("filled") or []]
                   for f in frames],
    }
    return pa.table(cols, schema=FRAMES_SCHEMA)


def events_table(h: DemoHeader) -> pa.Table:
    """The ``demonstration_events`` rows: the header's enforced events (Arrow IPC, STORED_SCHEMA)
    with ``demonstration_id`` added; raises InvalidMessage if they are not the contract's rows
    or name another person."""
    if not h.events_ipc:
        return EVENTS_SCHEMA.empty_table()
    try:
        table = from_ipc(h.events_ipc)
    except pa.ArrowInvalid as e:
        raise InvalidMessage("events are not Arrow IPC") from e
    if not table.schema.equals(STORED_SCHEMA, check_metadata=False):
        raise InvalidMessage("events do not match STORED_SCHEMA")
    if table.num_rows and not pc.all(pc.equal(table.column("employee_key"), h.employee_key)).as_py():
        raise InvalidMessage("events of another employee in a demonstration")
    ids = pa.repeat(pa.scalar(h.demo_id, UUID_BYTES), table.num_rows)
    return pa.Table.from_arrays([ids, *table.columns], schema=EVENTS_SCHEMA)


def demonstration_table(h: DemoHeader, status: str, events: int, missing: int, reason: str = "") -> pa.Table:
    """The one ``demonstrations`` row."""
    m = h.meta
    screen = m.get("screen") or {}

    def counts(d: Any) -> list[tuple[str, int]]:
        return [(str(k), int(v)) for k, v in (d or {}).items()]

    row = {
        "demonstration_id": [h.demo_id], "employee_key": [h.employee_key],
        "device_key": [str(m.get("device_key") or "")], "cohort": [str(m.get("cohort") or "")],
        "instruction": [str(m.get("instruction") or "")],
        "status": [status], "started_at": [int(m["started_at_us"])], "ended_at": [int(m["ended_at_us"])],
        "sent_at": [int(m.get("sent_at_us") or 0)], "received_at": [int(m.get("received_at_us") or 0)],
        "screen_width": [int(screen.get("width") or 0)], "screen_height": [int(screen.get("height") or 0)],
        "screen_scale": [float(screen.get("scale") or 1.0)], "apps": [[str(a) for a in m.get("apps") or []]],
        "consent_version": [str(m.get("consent_version") or "")],
        "policy_version": [str(m.get("policy_version") or "")],
        "agent_version": [str(m.get("agent_version") or "")], "os": [str(m.get("os") or "")],
        "frames": [len(h.meta.get("frames") or [])], "events": [events], "missing_frames": [missing],
        "frames_dropped": [counts(m.get("frames_dropped"))], "events_dropped": [counts(m.get("events_dropped"))],
        "reason": [reason],
    }
    return pa.table(row, schema=DEMONSTRATIONS_SCHEMA)


# ------------------------------------------------------------------ state (no I/O)


@dataclass
class PendingDemo:
    """A demonstration whose header has arrived, waiting for its manifest's frames."""

    header: DemoHeader
    partition: int
    first_offset: int
    opened_at: float
    stored: set[str] = field(default_factory=set)

    @property
    def missing(self) -> set[str]:
        return set(self.header.expected) - self.stored

    @property
    def done(self) -> bool:
        return not self.missing


class Pending:
    """Pending demonstrations and read positions per partition: which frame belongs where, when
    a demonstration is complete or expired, and how far a partition may commit."""

    def __init__(self) -> None:
        self.demos: dict[int, dict[bytes, PendingDemo]] = {}
        self.position: dict[int, int] = {}

    def get(self, p: int, demo_id: bytes) -> PendingDemo | None:
        return self.demos.get(p, {}).get(demo_id)

    def open(self, p: int, offset: int, header: DemoHeader, now: float) -> PendingDemo | None:
        """Open a pending demonstration; None if it is pending already (a duplicate header)."""
        demos = self.demos.setdefault(p, {})
        if header.demo_id in demos:
            return None
        d = PendingDemo(header, p, offset, now)
        demos[header.demo_id] = d
        return d

    def wants(self, p: int, demo_id: bytes, employee_key: str, sha: str) -> PendingDemo | None:
        """The pending demonstration a frame is to be stored for, or None (discard)."""
        d = self.get(p, demo_id)
        if d is None or d.header.employee_key != employee_key or sha not in d.header.expected:
            return None
        return d

    def close(self, d: PendingDemo) -> None:
        demos = self.demos.get(d.partition, {})
        if demos.get(d.header.demo_id) is d:
            del demos[d.header.demo_id]

    def is_tracked(self, d: PendingDemo) -> bool:
        return self.demos.get(d.partition, {}).get(d.header.demo_id) is d

    def advance(self, p: int, offset: int) -> None:
        """Message ``offset`` of partition ``p`` has been handled."""
        self.position[p] = max(self.position.get(p, 0), offset + 1)

    def expired(self, now: float, hold_s: float) -> list[PendingDemo]:
        return [d for demos in self.demos.values() for d in demos.values() if now - d.opened_at >= hold_s]

    def commit_offset(self, p: int) -> int | None:
        """The offset partition ``p`` may commit now (None: nothing read)."""
        if p not in self.position:
            return None
        return safe_commit(self.position[p], (d.first_offset for d in self.demos.get(p, {}).values()))

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget revoked partitions (their pending demonstrations are replayed by the next owner)."""
        for p in partitions:
            self.demos.pop(p, None)
            self.position.pop(p, None)

    def other_keys(self, d: PendingDemo) -> set[str]:
        """Object keys that other pending demonstrations of the same person have stored."""
        return {d2.header.expected[s] for demos in self.demos.values() for d2 in demos.values()
                if d2 is not d and d2.header.employee_key == d.header.employee_key for s in d2.stored}

    def count(self) -> int:
        return sum(len(v) for v in self.demos.values())


# ------------------------------------------------------------------ ClickHouse side


class DemoTables(Protocol):
    """What the writer needs from ClickHouse."""

    def is_complete(self, employee_key: str, demo_id: bytes) -> bool:
        """Whether a ``complete`` row of this demonstration is stored."""
        ...

    def insert(self, table: str, rows: pa.Table, token: str) -> None:
        """Insert ``rows`` (whole) into ``table`` with ``insert_deduplication_token = token``."""
        ...

    def referenced(self, employee_key: str, keys: list[str]) -> set[str]:
        """Which of ``keys`` a stored ``frames`` row names."""
        ...

    def discard(self, employee_key: str, demo_id: bytes) -> None:
        """Delete the frames and events rows of a demonstration (its insert was refused)."""
        ...


class ClickHouseTables:
    """DemoTables on a clickhouse-connect client (server or embedded)."""

    def __init__(self, client: Any, database: str) -> None:
        self.client = client
        self.db = database

    def is_complete(self, employee_key: str, demo_id: bytes) -> bool:
        rows = self.client.query(
            f"SELECT count() FROM {self.db}.demonstrations WHERE employee_key = %(e)s "
            f"AND demonstration_id = toUUID(%(d)s) AND status = 'complete'",
            parameters={"e": employee_key, "d": str(uuid.UUID(bytes=demo_id))}).result_rows
        return bool(rows[0][0])

    def insert(self, table: str, rows: pa.Table, token: str) -> None:
        self.client.raw_insert(f"{self.db}.{table}", list(rows.schema.names), ipc_stream(rows, "lz4"),
                               fmt="ArrowStream",
                               settings={"insert_deduplicate": 1, "insert_deduplication_token": token})

    def referenced(self, employee_key: str, keys: list[str]) -> set[str]:
        if not keys:
            return set()
        rows = self.client.query(
            f"SELECT DISTINCT object_key FROM {self.db}.frames WHERE employee_key = %(e)s "
            f"AND object_key IN %(k)s", parameters={"e": employee_key, "k": keys}).result_rows
        return {r[0] for r in rows}

    def discard(self, employee_key: str, demo_id: bytes) -> None:
        for table in ("frames", "demonstration_events"):
            self.client.command(
                f"ALTER TABLE {self.db}.{table} DELETE WHERE employee_key = %(e)s "
                f"AND demonstration_id = toUUID(%(d)s) SETTINGS mutations_sync = 1",
                parameters={"e": employee_key, "d": str(uuid.UUID(bytes=demo_id))})


_Refused = RowsRefused  # ClickHouse refuses the rows for good (errors.retry_clickhouse)


# ------------------------------------------------------------------ the writer


class DemoWriter:
    """Consumes accepted demonstrations and stores them (see the module docstring)."""

    def __init__(self, settings: Settings, tables: DemoTables, store: FrameStore, *,
                 clock: Callable[[], float] = time.monotonic, group_id: str | None = None) -> None:
        self.settings = settings
        self.tables = tables
        self.store = store
        self.clock = clock
        self.topic = Topics.from_settings(settings.topics).demonstrations_accepted
        self.group_id = group_id or settings.demo.sink_group_id
        self.pending = Pending()
        self.committed: dict[int, int] = {}
        self.stored: list[bytes] = []  # ids stored complete by this writer (tests, logs)
        self._stop = threading.Event()
        self._consumer: Consumer | None = None
        self._revoked: set[int] = set()

    @classmethod
    def on_clickhouse(cls, settings: Settings, client: Any, store: FrameStore, **kw: Any) -> DemoWriter:
        """A writer on a clickhouse-connect client (migrations applied first)."""
        migrate(client, settings.clickhouse.database, settings.warehouse.retention, layout_of(settings.clickhouse))
        return cls(settings, ClickHouseTables(client, settings.clickhouse.database), store, **kw)

    # -------------------------------------------------------------- messages

    def handle(self, p: int, offset: int, headers: Any,
               value: bytes | None) -> None:
        """One accepted message (header or frame); ``Stopped`` if the writer stops meanwhile."""
        part = _header(headers, "ht-part")
        try:
            if part == b"demonstration":
                self._on_header(p, offset, parse_header(headers, value))
            elif part == b"frame":
                self._on_frame(p, headers, value)
            else:
                raise InvalidMessage("no ht-part")
        except InvalidMessage as e:
            outcome = metrics.DEMO_FRAMES if part == b"frame" else metrics.DEMONSTRATIONS
            outcome.labels("invalid").inc()
            log.warning("invalid demonstration message at %s/%s: %s (skipped)", p, offset, e)
        self.pending.advance(p, offset)
        metrics.DEMO_PENDING.set(self.pending.count())

    def _on_header(self, p: int, offset: int, h: DemoHeader) -> None:
        if self.pending.get(p, h.demo_id) is not None:
            metrics.DEMONSTRATIONS.labels("duplicate").inc()
            return
        if self._ch("stored check", lambda: self.tables.is_complete(h.employee_key, h.demo_id)):
            metrics.DEMONSTRATIONS.labels("already_stored").inc()
            return
        events_table(h)  # refuse a header whose events are not ours before anything is stored
        d = self.pending.open(p, offset, h, self.clock())
        assert d is not None  # noqa: S101 -- checked just above
        if d.done:  # a demonstration without frames
            self._complete(d)

    def _on_frame(self, p: int, headers: Any, value: bytes | None) -> None:
        demo_id, employee_key, sha, _fmt = parse_frame(headers)
        d = self.pending.wants(p, demo_id, employee_key, sha)
        if d is None:
            metrics.DEMO_FRAMES.labels("discarded").inc()
            return
        if sha in d.stored:
            metrics.DEMO_FRAMES.labels("duplicate").inc()
            return
        data = value or b""
        if hashlib.sha256(data).hexdigest() != sha:
            raise InvalidMessage("frame bytes do not match their sha256")
        self._put(d.header.expected[sha], data)
        if not self.pending.is_tracked(d):
            return  # its partition was revoked while the store was retried: the new owner replays it
        d.stored.add(sha)
        metrics.DEMO_FRAMES.labels("stored").inc()
        if d.done:
            self._complete(d)

    # -------------------------------------------------------------- outcomes

    def _complete(self, d: PendingDemo) -> None:
        """Every manifest frame is stored: frames rows, events rows, the demonstration row last."""
        h = d.header
        try:
            events = events_table(h)
            frames = frames_table(h)
            if frames.num_rows:
                self._insert("frames", frames, dedup_token(h.demo_id, "frames"))
            if events.num_rows:
                self._insert("demonstration_events", events, dedup_token(h.demo_id, "demonstration_events"))
            self._insert("demonstrations", demonstration_table(h, COMPLETE, events.num_rows, 0),
                         dedup_token(h.demo_id, "demonstrations"))
        except _Refused as e:
            log.warning("demonstration rows refused by ClickHouse (%s): recorded incomplete", e.reason)
            self._ch("discard", lambda: self.tables.discard(h.employee_key, h.demo_id))
            self._give_up(d, f"refused:{e.reason}")
            return
        self.pending.close(d)
        self.stored.append(h.demo_id)
        metrics.DEMONSTRATIONS.labels("complete").inc()
        metrics.DEMO_PENDING.set(self.pending.count())

    def expire(self) -> int:
        """Record every demonstration pending longer than ``demo.hold_s`` as incomplete; returns
        how many."""
        due = self.pending.expired(self.clock(), self.settings.demo.hold_s)
        for d in due:
            self._give_up(d, HOLD_EXPIRED)
        return len(due)

    def _give_up(self, d: PendingDemo, reason: str) -> None:
        """Objects first (deleted unless a stored frames row or another pending demonstration of
        the same person uses them), then the ``incomplete`` row: a crash in between replays the
        demonstration, which ends here again."""
        h = d.header
        keys = sorted(set(h.expected.values()))
        keep = self._ch("referenced check", lambda: self.tables.referenced(h.employee_key, keys))
        keep |= self.pending.other_keys(d)
        for key in keys:
            if key not in keep and self._store_call("delete", lambda k=key: self.store.delete(k)):  # type: ignore[misc]
                metrics.DEMO_OBJECTS_DELETED.inc()
        events = 0
        try:
            events = events_table(h).num_rows
        except InvalidMessage:
            pass
        row = demonstration_table(h, INCOMPLETE, events, len(d.missing), reason)
        try:
            self._insert("demonstrations", row, dedup_token(h.demo_id, "demonstrations", INCOMPLETE))
        except _Refused as e:  # our own row refused: nothing more we can store; say so loudly
            log.error("incomplete row of a demonstration refused by ClickHouse (%s)", e.reason)
        self.pending.close(d)
        metrics.DEMONSTRATIONS.labels("incomplete").inc()
        metrics.DEMO_PENDING.set(self.pending.count())
        log.info("demonstration recorded incomplete (%s): %d of %d frames missing", reason,
                 len(d.missing), len(h.expected))

    # -------------------------------------------------------------- I/O with retries

    def _put(self, key: str, data: bytes) -> None:
        """Write one object, retried with backoff until it is stored or the writer stops."""
        self._store_call("write", lambda: self.store.put(key, data), retries_metric=True)

    def _store_call(self, what: str, fn: Callable[[], Any], retries_metric: bool = False) -> Any:
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 -- the store is away: wait, never skip the object
                if retries_metric:
                    metrics.DEMO_OBJECT_RETRIES.inc()
                log.warning("frame store %s failed (%s); retrying", what, type(e).__name__)
                self._backoff(attempt)
                attempt += 1

    def _insert(self, table: str, rows: pa.Table, token: str) -> None:
        self._ch(f"insert into {table}", lambda: self.tables.insert(table, rows, token), refusable=True)

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

    def _commit(self, stopping: bool = False) -> None:
        c = self._consumer
        if c is None:
            return
        offsets = []
        for p in list(self.pending.position):
            at = self.pending.commit_offset(p)
            if at is not None and at > self.committed.get(p, -1):
                offsets.append(TopicPartition(self.topic, p, at))
        if not offsets:
            return
        try:
            if stopping:  # not waited for: a commit that does not make it only means a replay
                c.commit(offsets=offsets, asynchronous=True)
            else:
                c.commit(offsets=offsets, asynchronous=False)
            for tp in offsets:
                self.committed[tp.partition] = tp.offset
        except KafkaException as e:
            log.warning("demonstration offset commit failed: %s (retried)", e)

    def _on_assign(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        for tp in parts:
            self._revoked.discard(tp.partition)
            self.committed.pop(tp.partition, None)

    def _on_revoke(self, _c: Consumer, parts: list[TopicPartition]) -> None:
        self._commit(stopping=self._stop.is_set())  # never past a pending demonstration (safe_commit)
        ps = [tp.partition for tp in parts]
        self._revoked.update(ps)
        self.pending.drop(ps)
        for p in ps:
            self.committed.pop(p, None)
        metrics.DEMO_PENDING.set(self.pending.count())

    def consumer_config(self) -> dict[str, Any]:
        """Consumer settings: fetches large enough for ``demo.max_frame_bytes`` messages."""
        frame = self.settings.demo.max_frame_bytes
        fetch = max(64 * 1024 * 1024, 2 * frame)
        return {
            **self.settings.kafka.librdkafka(),
            "group.id": self.group_id,
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": int(self.settings.sink.session_timeout_s * 1000),
            "heartbeat.interval.ms": int(min(3.0, self.settings.sink.session_timeout_s / 3) * 1000),
            "fetch.max.bytes": fetch,
            "max.partition.fetch.bytes": 2 * frame,
            "receive.message.max.bytes": fetch + 1024 * 1024,
            "log_level": 3,
            **static_consumer_conf(self.settings.sink.partitions),
        }

    def run(self, stop: threading.Event, on_tick: Callable[[DemoWriter], None] | None = None) -> None:
        """Consume until ``stop`` is set; commit what is safe and leave (pending demonstrations
        are replayed on the next start)."""
        self._stop = stop
        self._revoked = set()
        c = Consumer(self.consumer_config())
        self._consumer = c
        try:
            # sink.partitions (separate embedded data dirs): the same partitions of this topic.
            take_partitions(c, self.topic, self.settings.sink.partitions, self._on_assign, self._on_revoke,
                            strict=False, stop=stop)
            while not stop.is_set():
                for m in c.consume(num_messages=32, timeout=0.2):
                    err = m.error()
                    if err is not None:
                        if err.code() not in (KafkaError._PARTITION_EOF, KafkaError.UNKNOWN_TOPIC_OR_PART):
                            log.warning("consumer error: %s", err)
                        continue
                    p = m.partition() or 0
                    if p in self._revoked:
                        continue
                    self.handle(p, m.offset() or 0, m.headers(), m.value())
                self.expire()
                self._commit()
                if on_tick is not None:
                    on_tick(self)
        except Stopped:
            log.info("demonstration writer stopped mid-demonstration; it is replayed on the next start")
        finally:
            try:
                self._commit(stopping=True)
                c.close()
            finally:
                self._consumer = None
