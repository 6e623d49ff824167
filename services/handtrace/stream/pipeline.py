"""Many source messages in, accepted rows per partition out.

A micro-batch of Kafka messages is parsed message by message (cheap: header and block framing),
then ALL their events are decoded in one columnar call, every configured step runs once over
the whole frame, and the accepted rows are split by source partition. Fails closed: a message
that cannot be parsed, or whose rows make a step fail, goes to the dead-letter topic with a
reason; nothing unfiltered passes on. A failure on the combined frame is isolated by re-running
message by message, so one bad message never holds back the others.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import polars as pl
import pyarrow as pa

from handtrace.core.codec import DecodeError, ParsedBatch, decode_batches, parse_event_batch
from handtrace.core.partitioning import partition_for_key
from handtrace.core.rows import STORED_SCHEMA
from handtrace.stream.policy import EmployeeControls, Policy
from handtrace.stream.steps import BatchContext, Step, StepResult


@dataclass(frozen=True)
class SourceMessage:
    """One consumed Kafka message (key: the employee id the agent keyed it by; timestamp_us: the
    broker's append time when the topic uses LogAppendTime; headers as received)."""

    payload: bytes
    partition: int
    offset: int
    key: bytes | None = None
    timestamp_us: int | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class DeadLetter:
    """A message set aside, with why."""

    message: SourceMessage
    reason: str
    detail: str
    events: int = 0


@dataclass
class BatchOutcome:
    """What became of a micro-batch."""

    rows: dict[int, pa.Table] = field(default_factory=dict)
    deadletters: list[DeadLetter] = field(default_factory=list)
    events_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    redacted: Counter[str] = field(default_factory=Counter)
    sampling: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def stored(self) -> int:
        return sum(t.num_rows for t in self.rows.values())

    def add_counts(self, other: BatchOutcome | StepResult) -> None:
        """Add ``other``'s drop, redaction and sampling counts to this outcome's."""
        self.dropped.update(other.dropped)
        self.redacted.update(other.redacted)
        self.sampling.update(other.sampling)


_HEADER_COLUMNS = {
    "employee_id": pl.String, "device_id": pl.String, "batch_id": pl.Binary,
    "agent_version": pl.String, "os": pl.String, "cohort": pl.String, "sent_at_us": pl.Int64,
    "source_partition": pl.Int32, "source_offset": pl.Int64,
}

_STORED_SELECT = [
    pl.col("event_id"), pl.col("batch_id"), pl.col("employee_key"), pl.col("device_key"),
    pl.col("kind"), pl.col("captured_at_us").alias("captured_at"), pl.col("received_at"),
    *[pl.col(c) for c in ("x", "y", "button", "pressed", "scroll_dx", "scroll_dy", "key_code",
                          "modifiers", "text", "text_masked", "app_id", "window_title", "url")],
    pl.col("screenshot_sha256").bin.encode("hex"),
    *[pl.col(c) for c in ("screenshot_bytes", "screenshot_format", "screenshot_width",
                          "screenshot_height", "agent_version", "os", "source_partition",
                          "source_offset")],
]


def _sent_at_us(value: object) -> int:
    if isinstance(value, int):
        return value
    return int(value.timestamp() * 1_000_000)  # type: ignore[attr-defined]


def split_by_source(table: pa.Table, max_rows: int) -> list[pa.Table]:
    """Cut stored rows into chunks of at most ``max_rows`` (so every Kafka message stays well under
    the broker's size limit) -- but only between source messages: the sink deduplicates replays by
    source offset and relies on all rows of one source message travelling in one message. A
    single source message larger than ``max_rows`` stays whole."""
    n = table.num_rows
    if n <= max_rows:
        return [table]
    src = table.column("source_offset").to_numpy()
    starts = np.flatnonzero(np.diff(src)) + 1  # first row of each source message after the first
    chunks = []
    begin = 0
    while begin < n:
        limit = begin + max_rows
        if limit >= n:
            end = n
        else:
            # last source boundary within the limit, else the first one after it
            i = np.searchsorted(starts, limit, side="right")
            cands = starts[:i][starts[:i] > begin]
            end = int(cands[-1]) if len(cands) else int(starts[i]) if i < len(starts) else n
        chunks.append(table.slice(begin, end - begin))
        begin = end
    return chunks


def transport_problem(m: SourceMessage, employee_id: str, partitions: int | None) -> tuple[str, str] | None:
    """Why ``m`` did not arrive the way its employee's messages must, or None (issue #10, class 4).

    Pauses and exemptions are looked up by key in the worker that holds the key's partition (the
    controls table is co-partitioned), so a message is judged correctly only if it is keyed by its
    batch's employee id (``key_mismatch``) and sits in that key's partition under the murmur2
    partitioner every producer uses (``wrong_partition``). With ``partitions`` set, a message
    without a key is refused too (``missing_key``); unset (tools and tests that feed the pipeline
    directly), only a key that is present is checked. Details name no id."""
    if m.key is None:
        return ("missing_key", "message has no key") if partitions is not None else None
    if m.key != employee_id.encode():
        # Controls are looked up (and co-partitioned) by key: a batch keyed by someone else could
        # dodge its employee's pause or exemption.
        return "key_mismatch", "message key is not the batch's employee_id"
    if partitions is not None and m.partition != (want := partition_for_key(m.key, partitions)):
        return "wrong_partition", f"in partition {m.partition}, its key's partition is {want} of {partitions}"
    return None


@dataclass
class Packed:
    """Accepted rows of one partition as messages: (rows, encoded payload) in source-offset order,
    and the source offsets whose rows alone do not fit in one message (row_too_large)."""

    messages: list[tuple[pa.Table, bytes]] = field(default_factory=list)
    too_large: list[int] = field(default_factory=list)


def pack_by_source(table: pa.Table, max_rows: int, max_bytes: int,
                   encode: Callable[[pa.Table], bytes]) -> Packed:
    """Encode one partition's stored rows as messages of at most ``max_rows`` rows (split_by_source)
    AND at most ``max_bytes`` encoded bytes, cut only between source messages.

    The encoded size is measured, not estimated (lz4 makes any estimate loose): a chunk whose
    payload is too large is halved at the source boundary nearest its middle row and both halves
    are encoded again, so the common case encodes each chunk once. The rows of a single source
    message that alone exceed ``max_bytes`` are not produced (their offset is returned in
    ``too_large``: the caller dead-letters the source message). Rows are put in source-offset
    order first if they are not (the sink skips rows at or below the highest offset it has seen).
    """
    src = table.column("source_offset").to_numpy()
    if len(src) > 1 and bool((np.diff(src) < 0).any()):
        order = np.argsort(src, kind="stable")
        table, src = table.take(order), src[order]
    out = Packed()
    todo = list(reversed(split_by_source(table, max_rows)))
    while todo:
        chunk = todo.pop()
        payload = encode(chunk)
        if len(payload) <= max_bytes:
            out.messages.append((chunk, payload))
            continue
        offs = chunk.column("source_offset").to_numpy()
        starts = np.flatnonzero(np.diff(offs)) + 1
        if not len(starts):
            out.too_large.append(int(offs[0]))
            continue
        cut = int(starts[np.argmin(np.abs(starts - len(offs) // 2))])
        todo += [chunk.slice(cut), chunk.slice(0, cut)]  # popped first half first
    return out


def by_partition(table: pa.Table) -> dict[int, pa.Table]:
    """Stored rows split by ``source_partition``, keeping row order within each partition:
    zero-copy slices when each partition's rows are contiguous (the pipeline orders messages
    that way), one stable sort first otherwise."""
    parts = table.column("source_partition").to_numpy()
    starts = np.flatnonzero(np.diff(parts)) + 1
    if len(starts) + 1 != len(np.unique(parts)):
        order = np.argsort(parts, kind="stable")
        table, parts = table.take(order), parts[order]
        starts = np.flatnonzero(np.diff(parts)) + 1
    bounds = [0, *starts.tolist(), len(parts)]
    return {int(parts[lo]): table.slice(lo, hi - lo) for lo, hi in zip(bounds, bounds[1:], strict=False)}


def to_stored(frame: pl.DataFrame, received_at_us: int) -> pa.Table:
    """Shape accepted rows as STORED_SCHEMA. Refuses rows that still carry raw ids."""
    raw = {"employee_id", "device_id"} & set(frame.columns)
    if raw or not {"employee_key", "device_key"} <= set(frame.columns):
        raise ValueError("refusing to store rows without pseudonymisation (raw ids present or keys missing)")
    received = pl.lit(received_at_us).cast(pl.Datetime("us", "UTC")).alias("received_at")
    return frame.with_columns(received).select(_STORED_SELECT).to_arrow().cast(STORED_SCHEMA)


class BatchPipeline:
    """Parse → decode all events at once → steps in order → stored rows by partition."""

    def __init__(self, steps: Sequence[Step], max_batch_events: int = 100_000, *,
                 partitions: int | None = None, max_payload_bytes: int | None = None) -> None:
        """``partitions``: the source topic's partition count; set (as the worker does), every
        message must carry its employee's key in that key's partition (transport_problem).
        ``max_payload_bytes``: larger payloads are dead-lettered (payload_too_large)."""
        self.steps = list(steps)
        self.max_batch_events = max_batch_events
        self.partitions = partitions
        self.max_payload_bytes = max_payload_bytes

    def process_many(self, messages: Sequence[SourceMessage], received_at_us: int, *,
                     policy: Policy | None = None,
                     controls: Mapping[str, EmployeeControls] | None = None) -> BatchOutcome:
        """Process a micro-batch under ``policy`` and the employees' ``controls``; never raises
        for bad input."""
        ctx = BatchContext(received_at_us, policy or Policy(), MappingProxyType(dict(controls or {})))
        out = BatchOutcome()
        parsed: list[tuple[SourceMessage, ParsedBatch]] = []
        for m in messages:
            if self.max_payload_bytes is not None and len(m.payload) > self.max_payload_bytes:
                # No conforming agent sends this (librdkafka refuses a message larger than its
                # message.max.bytes before compression); its rows could not be bounded either.
                detail = f"{len(m.payload)} bytes > {self.max_payload_bytes}"
                out.deadletters.append(DeadLetter(m, "payload_too_large", detail))
                continue
            try:
                pb = parse_event_batch(m.payload)
            except DecodeError as e:
                out.deadletters.append(DeadLetter(m, e.reason, e.detail))
                continue
            h = pb.header
            problem = transport_problem(m, h["employee_id"], self.partitions)
            if problem is not None:
                out.deadletters.append(DeadLetter(m, *problem, pb.count))
            elif not h["employee_id"] or not h["device_id"]:
                out.deadletters.append(DeadLetter(m, "invalid_header", "empty employee_id or device_id", pb.count))
            elif pb.count > self.max_batch_events:
                detail = f"{pb.count} events > {self.max_batch_events}"
                out.deadletters.append(DeadLetter(m, "oversized", detail, pb.count))
            else:
                parsed.append((m, pb))
        out.events_in = sum(pb.count for _, pb in parsed) + sum(d.events for d in out.deadletters)
        # Partition by partition (offsets in order within each), so each partition's accepted
        # rows end up contiguous and are sliced out without a copy (by_partition).
        parsed.sort(key=lambda mp: (mp[0].partition, mp[0].offset))
        if not parsed:
            return out
        try:
            frame = self._frame(parsed)
            kept, counts = self._run_steps(frame, ctx)
        except Exception:  # noqa: BLE001 -- isolate the culprit message by message
            if len(parsed) == 1:
                m, pb = parsed[0]
                try:
                    kept, counts = self._run_steps(self._frame(parsed), ctx)
                except DecodeError as e:
                    out.deadletters.append(DeadLetter(m, e.reason, e.detail, pb.count))
                    return out
                except Exception as e:  # noqa: BLE001 -- fail closed
                    out.deadletters.append(DeadLetter(m, "step_error", f"{type(e).__name__}: {e}", pb.count))
                    return out
            else:
                for one in parsed:
                    sub = self.process_many([one[0]], received_at_us, policy=ctx.policy, controls=ctx.controls)
                    out.deadletters += sub.deadletters
                    out.add_counts(sub)
                    for p, t in sub.rows.items():
                        out.rows[p] = pa.concat_tables([out.rows[p], t]) if p in out.rows else t
                return out
        out.add_counts(counts)
        if kept.height:
            out.rows = by_partition(to_stored(kept, received_at_us))
        return out

    def _frame(self, parsed: list[tuple[SourceMessage, ParsedBatch]]) -> pl.DataFrame:
        """All events of all parsed messages, with their batch header broadcast per row."""
        fps = {pb.fingerprint for _, pb in parsed if pb.frame is None}
        frames: list[pl.DataFrame] = []
        # Events of each writer version decode in one call; versions are conformed to the newest.
        order: list[tuple[SourceMessage, ParsedBatch]] = []
        for fp in sorted(fps):
            group = [(m, pb) for m, pb in parsed if pb.frame is None and pb.fingerprint == fp]
            frames.append(decode_batches(fp, [pb for _, pb in group]))
            order += group
        for m, pb in parsed:
            if pb.frame is not None:
                frames.append(pb.frame)
                order.append((m, pb))
        events = pl.concat(frames, how="vertical") if len(frames) > 1 else frames[0]
        counts = np.array([pb.count for _, pb in order], dtype=np.int64)
        idx = pl.Series("_msg", np.repeat(np.arange(len(order), dtype=np.uint32), counts))
        headers = pl.DataFrame(
            {
                "employee_id": [pb.header["employee_id"] for _, pb in order],
                "device_id": [pb.header["device_id"] for _, pb in order],
                "batch_id": [pb.header["batch_id"] for _, pb in order],
                "agent_version": [pb.header["agent_version"] for _, pb in order],
                "os": [pb.header["os"] for _, pb in order],
                # v2 header; the codec reads older batches with cohort "default".
                "cohort": [pb.header["cohort"] for _, pb in order],
                "sent_at_us": [_sent_at_us(pb.header["sent_at_us"]) for _, pb in order],
                "source_partition": [m.partition for m, _ in order],
                "source_offset": [m.offset for m, _ in order],
            },
            schema=_HEADER_COLUMNS,
        )
        return events.with_columns(headers.select(pl.all().gather(idx)))

    def _run_steps(self, frame: pl.DataFrame, ctx: BatchContext) -> tuple[pl.DataFrame, BatchOutcome]:
        """The rows every step kept, and the steps' counts (applied only if all steps succeed)."""
        counts = BatchOutcome()
        for step in self.steps:
            result = step(frame, ctx)
            frame = result.frame
            counts.add_counts(result)
        to_stored(frame.head(0), ctx.received_at_us)  # fail closed before anything is published
        return frame, counts

    def process(self, payload: bytes, partition: int, offset: int, received_at_us: int) -> BatchOutcome:
        """One message (convenience for tests and tools)."""
        return self.process_many([SourceMessage(payload, partition, offset)], received_at_us)
