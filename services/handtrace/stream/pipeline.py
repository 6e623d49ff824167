"""One source message in, one outcome out: decode the batch, run the configured steps in order,
shape the accepted rows for storage. Fails closed: any error sends the whole message to the
dead-letter topic with a reason; nothing unfiltered passes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl
import pyarrow as pa

from handtrace.core.codec import DecodeError, decode_event_batch
from handtrace.core.rows import STORED_SCHEMA
from handtrace.stream.steps import BatchContext, Step


@dataclass(frozen=True)
class Outcome:
    """What became of one message: stored rows, or a dead-letter reason."""

    rows: pa.Table | None
    events_in: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    deadletter_reason: str | None = None
    detail: str = ""

    @classmethod
    def deadletter(cls, reason: str, detail: str, events_in: int = 0) -> Outcome:
        return cls(None, events_in, {}, reason, detail)


_EVENT_COLUMNS = [
    "x", "y", "button", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text",
    "text_masked", "app_id", "window_title", "url", "screenshot_bytes", "screenshot_format",
    "screenshot_width", "screenshot_height",
]


def to_stored(frame: pl.DataFrame, ctx: BatchContext) -> pa.Table:
    """Shape accepted rows as STORED_SCHEMA. Raises if pseudonymisation has not run."""
    missing = {"employee_key", "device_key"} - set(frame.columns)
    if missing:
        raise ValueError(f"refusing to store rows without {sorted(missing)} (pseudonymise step missing)")
    out = frame.select(
        pl.col("event_id"),
        pl.lit(ctx.batch_id, pl.Binary).alias("batch_id"),
        pl.col("employee_key"),
        pl.col("device_key"),
        pl.col("kind"),
        pl.col("captured_at_us").alias("captured_at"),
        pl.lit(ctx.received_at_us).cast(pl.Datetime("us", "UTC")).alias("received_at"),
        *[pl.col(c) for c in _EVENT_COLUMNS[:13]],
        pl.col("screenshot_sha256").bin.encode("hex").alias("screenshot_sha256"),
        *[pl.col(c) for c in _EVENT_COLUMNS[13:]],
        pl.lit(ctx.agent_version).alias("agent_version"),
        pl.lit(ctx.os).alias("os"),
        pl.lit(ctx.source_partition, pl.Int32).alias("source_partition"),
        pl.lit(ctx.source_offset, pl.Int64).alias("source_offset"),
    ).to_arrow()
    return out.cast(STORED_SCHEMA)


class BatchPipeline:
    """Decode → steps in order → stored rows."""

    def __init__(self, steps: Sequence[Step], max_batch_events: int = 100_000) -> None:
        self.steps = list(steps)
        self.max_batch_events = max_batch_events

    def process(self, payload: bytes, partition: int, offset: int, received_at_us: int) -> Outcome:
        """Process one message; never raises for bad input."""
        try:
            decoded = decode_event_batch(payload)
        except DecodeError as e:
            return Outcome.deadletter(e.reason, e.detail)
        h = decoded.header
        n = decoded.events.height
        if not h["employee_id"] or not h["device_id"]:
            return Outcome.deadletter("invalid_header", "empty employee_id or device_id", n)
        if n > self.max_batch_events:
            return Outcome.deadletter("oversized", f"{n} events > {self.max_batch_events}", n)
        sent = h["sent_at_us"]
        ctx = BatchContext(
            employee_id=h["employee_id"],
            device_id=h["device_id"],
            batch_id=h["batch_id"],
            agent_version=h["agent_version"],
            os=h["os"],
            sent_at_us=sent if isinstance(sent, int) else int(sent.timestamp() * 1_000_000),
            received_at_us=received_at_us,
            source_partition=partition,
            source_offset=offset,
        )
        frame = decoded.events
        dropped: Counter[str] = Counter()
        step_name = "shape"
        try:
            for step in self.steps:
                step_name = step.name
                result = step(frame, ctx)
                frame = result.frame
                dropped.update(result.dropped)
            step_name = "shape"
            rows = to_stored(frame, ctx)
        except Exception as e:  # noqa: BLE001 -- fail closed: whatever broke, nothing passes
            return Outcome.deadletter(f"step_error_{step_name}", f"{type(e).__name__}: {e}", n)
        return Outcome(rows, n, dict(dropped))
