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
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import numpy as np
import polars as pl
import pyarrow as pa

from handtrace.core.clock import HEADER_SENT_AT, clock_offset_us
from handtrace.core.codec import DecodeError, ParsedBatch, decode_batches, parse_event_batch
from handtrace.core.partitioning import partition_for_key
from handtrace.core.rows import STORED_SCHEMA
from handtrace.stream.policy import EmployeeControls, Policy
from handtrace.stream.steps import BatchContext, Step, StepResult
from handtrace.stream.steps.allowlist import fill_app_context


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
    "source_partition": pl.Int32, "source_offset": pl.Int64, "clock_offset_us": pl.Int64,
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


def message_clock_offset(m: SourceMessage, pb: ParsedBatch | None, max_offset_us: int) -> int | None:
    """How far the sending agent's clock is behind the broker's for this message
    (:func:`handtrace.core.clock.clock_offset_us`), from the agent's ``ht-sent-at`` header (its
    clock when it handed the message to its producer) and the broker's append time. 0 when
    either is missing: an agent that does not stamp its sends (older versions) is judged on its
    own clock only, as before -- the batch header's ``sent_at_us`` is when the batch was sealed,
    and a batch that waited in the spool would look far behind, shifting its events into
    windows that began after their capture. None: beyond the bound, or a stamp that is not a
    number."""
    del pb  # the header's seal time is deliberately not used (docstring)
    for k, v in m.headers:
        if k == HEADER_SENT_AT:
            try:
                sent = int(v)
            except ValueError:
                return None  # a send stamp that is not a number: cannot be placed in time
            return clock_offset_us(sent, m.timestamp_us, max_offset_us)
    return 0


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


POLICY_STEPS = frozenset({"allowlist", "sample", "redact"})
"""Steps whose decision depends on the policy: they run once more for rows captured under an
earlier policy (_apply_past_policies)."""


def past_policy_rows(frame: pl.DataFrame, ctx: BatchContext) -> pl.DataFrame | None:
    """Marks, in a ``_era`` column, the rows captured (the earlier of their own time and their
    time on the broker's clock) before the current policy was published, with the index in
    ``ctx.policy_history`` of the policy in force at their capture: the latest one published at
    or before it, or the oldest one known for rows older than all of them (before the first
    policy there is no record of what was in force; the policy topic keeps history for longer
    than the stream accepts late events, so this only happens before a deployment's first
    policy). None, and nothing to do, when every row was captured under the current policy --
    the common case, one min() over a column."""
    hist = ctx.policy_history
    if len(hist) < 2 or frame.height == 0:
        return None
    current_since = hist[-1][0]
    # The earlier of the row's own time and its time on the broker's clock: an offset taken from
    # an old agent's seal-time stamp also holds the time the batch waited in the spool, which
    # would make backlog look recent -- judging by the earlier one only ever applies more policies.
    own = pl.col("captured_at_us").dt.epoch("us")
    at = pl.min_horizontal(own, own + pl.col("clock_offset_us")) if "clock_offset_us" in frame.columns else own
    earliest = frame.select(at.min()).item()
    if earliest is None or earliest >= current_since:
        return None
    starts = pl.Series([h[0] for h in hist], dtype=pl.Int64)
    era = (starts.search_sorted(frame.select(at).to_series(), side="right").cast(pl.Int64) - 1).clip(lower_bound=0)
    current = len(hist) - 1
    return frame.with_columns(pl.when(era < current).then(era).otherwise(None).alias("_era"))


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
                 partitions: int | None = None, max_payload_bytes: int | None = None,
                 max_clock_offset_us: int = 86_400_000_000) -> None:
        """``partitions``: the source topic's partition count; set (as the worker does), every
        message must carry its employee's key in that key's partition (transport_problem).
        ``max_payload_bytes``: larger payloads are dead-lettered (payload_too_large).
        ``max_clock_offset_us``: a sender whose clock is further from the broker's is
        dead-lettered (clock_offset)."""
        self.steps = list(steps)
        self.max_batch_events = max_batch_events
        self.partitions = partitions
        self.max_payload_bytes = max_payload_bytes
        self.max_clock_offset_us = max_clock_offset_us

    def process_many(self, messages: Sequence[SourceMessage], received_at_us: int, *,
                     policy: Policy | None = None,
                     controls: Mapping[str, EmployeeControls] | None = None,
                     policy_history: Sequence[tuple[int, Policy]] = ()) -> BatchOutcome:
        """Process a micro-batch under ``policy`` and the employees' ``controls``; never raises
        for bad input. ``policy_history``: (published at on the broker's clock, policy) of the
        policies recently in force, oldest first, for rows captured before ``policy``
        (:func:`_apply_past_policies`)."""
        ctx = BatchContext(received_at_us, policy or Policy(), MappingProxyType(dict(controls or {})),
                           tuple(policy_history))
        out = BatchOutcome()
        parsed = self.admit(messages, received_at_us, out)
        out.events_in = sum(pb.count for _, pb in parsed) + sum(d.events for d in out.deadletters)
        return self.enforce_parsed(parsed, ctx, out)

    def admit(self, messages: Sequence[SourceMessage], received_at_us: int, out: BatchOutcome,
              parse: Callable[[bytes], ParsedBatch] = parse_event_batch) -> list[tuple[SourceMessage, ParsedBatch]]:
        """The messages whose framing, transport and sender clock pass, parsed by ``parse``;
        the others are added to ``out.deadletters`` with their reason."""
        parsed: list[tuple[SourceMessage, ParsedBatch]] = []
        for m in messages:
            if not isinstance(m.payload, bytes | bytearray | memoryview) or not m.payload:
                # A tombstone (no value) or an empty one: nothing to judge (never a TypeError
                # that would stop the worker on every replay of this micro-batch).
                what = "no value (a tombstone)" if m.payload is None else "an empty value"
                out.deadletters.append(DeadLetter(m, "empty_value", f"message with {what}"))
                continue
            if self.max_payload_bytes is not None and len(m.payload) > self.max_payload_bytes:
                # No conforming agent sends this (librdkafka refuses a message larger than its
                # message.max.bytes before compression); its rows could not be bounded either.
                detail = f"{len(m.payload)} bytes > {self.max_payload_bytes}"
                out.deadletters.append(DeadLetter(m, "payload_too_large", detail))
                continue
            try:
                pb = parse(bytes(m.payload))
            except DecodeError as e:
                out.deadletters.append(DeadLetter(m, e.reason, e.detail))
                continue
            except Exception as e:  # noqa: BLE001 -- a parser bug must not stop the worker: fail closed
                out.deadletters.append(DeadLetter(m, "undecodable", type(e).__name__))
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
            elif (message_clock_offset(m, pb, self.max_clock_offset_us) is None
                  or _sent_at_us(h["sent_at_us"]) > (m.timestamp_us or received_at_us) + self.max_clock_offset_us):
                # The agent's clock is too far from the broker's (or its send stamp is garbage, or
                # the batch claims to have been sealed further in the future than any clock may
                # be off): its capture times cannot be placed against pauses and exemptions of
                # the person's other devices, so nothing of it is judged (fails closed).
                detail = f"sender clock more than {self.max_clock_offset_us // 1_000_000} s from the broker's"
                out.deadletters.append(DeadLetter(m, "clock_offset", detail, pb.count))
            else:
                parsed.append((m, pb))
        return parsed

    def enforce_parsed(self, parsed: list[tuple[SourceMessage, ParsedBatch]], ctx: BatchContext,
                       out: BatchOutcome | None = None) -> BatchOutcome:
        """The steps over the events of all ``parsed`` messages at once (a message whose rows make
        a step fail is isolated and dead-lettered); accepted rows by partition into ``out``."""
        out = BatchOutcome() if out is None else out
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
                    sub = self.enforce_parsed([one], ctx)
                    out.deadletters += sub.deadletters
                    out.add_counts(sub)
                    for p, t in sub.rows.items():
                        out.rows[p] = pa.concat_tables([out.rows[p], t]) if p in out.rows else t
                return out
        out.add_counts(counts)
        if kept.height:
            out.rows = by_partition(to_stored(kept, ctx.received_at_us))
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
                # Rows of a message whose offset is out of bounds never get here (dead-lettered).
                "clock_offset_us": [message_clock_offset(m, pb, self.max_clock_offset_us) or 0 for m, pb in order],
            },
            schema=_HEADER_COLUMNS,
        )
        return events.with_columns(headers.select(pl.all().gather(idx)))

    def process(self, payload: bytes, partition: int, offset: int, received_at_us: int) -> BatchOutcome:
        """One message (convenience for tests and tools)."""
        return self.process_many([SourceMessage(payload, partition, offset)], received_at_us)

    def _run_steps(self, frame: pl.DataFrame, ctx: BatchContext) -> tuple[pl.DataFrame, BatchOutcome]:
        """The rows every step kept, and the steps' counts (applied only if all steps succeed)."""
        frame, counts = run_steps(self.steps, frame, ctx)
        to_stored(frame.head(0), ctx.received_at_us)  # fail closed before anything is published
        return frame, counts

    def frame_of(self, parsed: list[tuple[SourceMessage, ParsedBatch]]) -> pl.DataFrame:
        """All events of all ``parsed`` messages in one frame, decoded in one columnar call per
        writer version, their headers broadcast per row (for callers that run steps themselves:
        demonstrations)."""
        return self._frame(parsed)


def run_steps(steps: Sequence[Step], frame: pl.DataFrame,
              ctx: BatchContext) -> tuple[pl.DataFrame, BatchOutcome]:
    """``steps`` in order over ``frame``; a policy step also runs, under the earlier policy, over
    the rows captured while that one was in force (``_apply_past_policies``). Any frame with
    ``captured_at_us`` (and ``clock_offset_us``) and the columns the steps read."""
    counts = BatchOutcome()
    eras = past_policy_rows(frame, ctx)
    if eras is not None:
        frame = eras
    for step in steps:
        if eras is not None and step.name in POLICY_STEPS:
            frame = _apply_past_policies(step, frame, ctx, counts)
        result = step(frame, ctx)
        frame = result.frame
        counts.add_counts(result)
    if eras is not None:
        frame = frame.drop("_era")
    return frame, counts


def _apply_past_policies(step: Step, frame: pl.DataFrame, ctx: BatchContext,
                         counts: BatchOutcome) -> pl.DataFrame:
    """Run a policy step over the rows captured while an earlier policy was in force, under
    that policy, before the step runs over the whole frame under the current one: a row is
    kept only if BOTH allow it (a widening policy admits nothing captured before it was
    published; a narrowing one applies at once). Row order is kept (batches stay contiguous
    and in capture order)."""
    if step.name == "allowlist":
        # The app context is filled over the whole frame first, so rows split off from the
        # rest of their batch keep the context their batch gave them.
        frame = fill_app_context(frame)
    for era in frame.get_column("_era").drop_nulls().unique().sort().to_list():
        past = ctx.policy_history[era][1]
        if past == ctx.policy:
            continue
        indexed = frame.with_columns(pl.int_range(pl.len(), dtype=pl.UInt32).alias("_pos"))
        mine = (pl.col("_era") == era).fill_null(False)
        result = step(indexed.filter(mine), replace(ctx, policy=past))
        counts.add_counts(result)
        frame = (pl.concat([indexed.filter(~mine), result.frame.select(indexed.columns)])
                 .sort("_pos").drop("_pos"))
    return frame
