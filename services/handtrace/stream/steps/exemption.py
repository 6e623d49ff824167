"""Exemptions: from its effective time (until a revoke, if any), nothing of an exempt employee
is stored. Decided on the event's capture time, so late or replayed events are dropped too.
No skew margin shortens an exemption: it is widened backwards by the margin (fails closed)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult
from handtrace.stream.steps._spans import SpanStep

_FOREVER = 2**62


@dataclass(frozen=True)
class ExemptionStep(SpanStep):
    """Drops rows of employees exempt at capture time. Config: skew margin in seconds (>= 0)."""

    name: str = "exemption"

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        m = self.margin_us
        spans = [(employee, e.from_us - m, _FOREVER if e.until_us is None else e.until_us + m, e.offset_us)
                 for employee, c in ctx.controls.items() for e in c.exemptions]
        return self.drop(frame, spans, "exempt")
