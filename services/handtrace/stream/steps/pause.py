"""Pause windows: an event captured inside a pause window of its employee is dropped -- whenever
it arrives (late, out of order, after a restart), because the decision depends only on the
event's capture time and the employee's recorded windows, not on arrival.

Each window is at most 30 minutes (longer requests were clamped when the control was recorded)
and is widened by a configurable clock-skew margin on both sides: the agent's clock stamps both
the window and the events, but a margin covers events stamped by a drifting clock across a
restart.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult
from handtrace.stream.steps._spans import drop_rows_in_spans


@dataclass(frozen=True)
class PauseStep:
    """Drops rows inside a (widened) pause window. Config: skew margin in seconds (>= 0)."""

    skew_margin_s: float = 2.0
    name: str = "pause"

    def __post_init__(self) -> None:
        if self.skew_margin_s < 0:
            raise ValueError("skew_margin_s must be >= 0")

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        margin = int(self.skew_margin_s * 1_000_000)
        rows = [
            (employee, w.starts_at_us - margin, w.ends_at_us + margin)
            for employee, c in ctx.controls.items()
            for w in c.pauses
        ]
        kept = drop_rows_in_spans(frame, rows)
        dropped = frame.height - kept.height
        return StepResult(kept, {"paused": dropped} if dropped else {})
