"""Shared by the pause and exemption steps: drop rows that fall inside an employee's time spans,
widened by a clock-skew margin (widening only ever drops more: fails closed).

Clocks: a span is stamped by whoever issued it (the employee's device for their own pause, the
control plane for HR's and ops' controls), a row by the device that captured it -- for a person
with two laptops, possibly another device with another clock. Each message's clock offset to
the broker's append time is known (``clock_offset_us`` per row, ``offset_us`` per span: see
handtrace.core.clock.clock_offset_us), so a row is dropped when it falls in the span on EITHER
timeline: its own clock against the span as stamped (exact when one device stamped both), or
both placed on the broker's clock when their clocks disagree by more than the skew margin (a
pause taken on one device covers the person's other devices however far their clocks drift, up
to ``stream.max_clock_offset_s``; beyond it the stream refuses the message). Checking both only
ever drops more. The broker-clock comparison is off by the two messages' produce latencies
(usually milliseconds; more during a broker outage), which the margin covers; clocks that agree
within the margin are compared on their own, so latency never drops rows next to a window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import StepResult

Span = tuple[str, int, int, int]
"""(employee_id, from_us, to_us, offset_us): [from, to) on the issuer's clock, and that clock's
offset to the broker's."""


def drop_rows_in_spans(frame: pl.DataFrame, spans: Sequence[Span], agree_us: int = 0) -> pl.DataFrame:
    """``frame`` without rows whose capture time lies in [from, to) of a span of their employee,
    on either timeline (module docstring). The broker-clock comparison applies only when the
    row's and the span's clocks disagree by more than ``agree_us`` (the skew margin the spans
    are already widened by): when they agree, the own-clock comparison covers the span, and the
    produce latencies in the offsets would only drop rows next to it.

    Vectorised: rows are joined with their employee's spans (a handful per employee).
    """
    if not spans or frame.height == 0:
        return frame
    table = pl.DataFrame(list(spans), schema={"employee_id": pl.String, "_from": pl.Int64, "_to": pl.Int64,
                                              "_off": pl.Int64}, orient="row")
    row = pl.int_range(pl.len(), dtype=pl.UInt32)
    row_offset = pl.col("clock_offset_us") if "clock_offset_us" in frame.columns else pl.lit(0, pl.Int64)
    ts, off = pl.col("_ts"), pl.col("_row_off")
    on_own_clock = (ts >= pl.col("_from")) & (ts < pl.col("_to"))
    on_broker_clock = ((ts + off >= pl.col("_from") + pl.col("_off")) & (ts + off < pl.col("_to") + pl.col("_off"))
                       & ((off - pl.col("_off")).abs() > agree_us))
    hits = (
        frame.select(pl.col("captured_at_us").dt.epoch("us").alias("_ts"), pl.col("employee_id"), row.alias("_row"),
                     row_offset.alias("_row_off"))
        .join(table, on="employee_id", how="inner")
        .filter(on_own_clock | on_broker_clock)
        .get_column("_row")
        .unique()
    )
    if hits.len() == 0:
        return frame
    return frame.filter(~row.is_in(hits.implode()))


@dataclass(frozen=True)
class SpanStep:
    """Base of the pause and exemption steps. Config: skew margin in seconds (>= 0)."""

    skew_margin_s: float = 2.0

    def __post_init__(self) -> None:
        if self.skew_margin_s < 0:
            raise ValueError("skew_margin_s must be >= 0")

    @property
    def margin_us(self) -> int:
        return int(self.skew_margin_s * 1_000_000)

    def drop(self, frame: pl.DataFrame, spans: Sequence[Span], reason: str) -> StepResult:
        """Rows outside ``spans``; the dropped ones counted under ``reason``."""
        kept = drop_rows_in_spans(frame, spans, self.margin_us)
        dropped = frame.height - kept.height
        return StepResult(kept, {reason: dropped} if dropped else {})
