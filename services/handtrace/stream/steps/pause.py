"""Pause windows: an event captured inside a pause window of its employee is dropped -- whenever
it arrives (late, out of order, after a restart), because the decision depends only on the
event's capture time and the employee's recorded windows, not on arrival.

Each window is at most 30 minutes (longer requests were clamped when the control was recorded)
and is widened by a configurable clock-skew margin on both sides. A row is judged on its own
device's clock and on the broker's (handtrace.stream.steps._spans), so a pause taken on one
laptop covers the person's other devices even when their clocks disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult
from handtrace.stream.steps._spans import SpanStep


@dataclass(frozen=True)
class PauseStep(SpanStep):
    """Drops rows inside a (widened) pause window. Config: skew margin in seconds (>= 0)."""

    name: str = "pause"

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        m = self.margin_us
        spans = [(employee, w.starts_at_us - m, w.ends_at_us + m, w.offset_us)
                 for employee, c in ctx.controls.items() for w in c.pauses]
        return self.drop(frame, spans, "paused")
