"""Shared by the pause and exemption steps: drop rows that fall inside an employee's time spans,
widened by a clock-skew margin (widening only ever drops more: fails closed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import StepResult


def drop_rows_in_spans(frame: pl.DataFrame, spans: Sequence[tuple[str, int, int]]) -> pl.DataFrame:
    """``frame`` without rows whose capture time lies in [from, to) of a span of their employee.

    Vectorised: rows are joined with their employee's spans (a handful per employee).
    """
    if not spans or frame.height == 0:
        return frame
    table = pl.DataFrame(list(spans), schema={"employee_id": pl.String, "_from": pl.Int64, "_to": pl.Int64},
                         orient="row")
    row = pl.int_range(pl.len(), dtype=pl.UInt32)
    hits = (
        frame.select(pl.col("captured_at_us").dt.epoch("us").alias("_ts"), pl.col("employee_id"), row.alias("_row"))
        .join(table, on="employee_id", how="inner")
        .filter((pl.col("_ts") >= pl.col("_from")) & (pl.col("_ts") < pl.col("_to")))
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

    def drop(self, frame: pl.DataFrame, spans: Sequence[tuple[str, int, int]], reason: str) -> StepResult:
        """Rows outside ``spans``; the dropped ones counted under ``reason``."""
        kept = drop_rows_in_spans(frame, spans)
        dropped = frame.height - kept.height
        return StepResult(kept, {reason: dropped} if dropped else {})
