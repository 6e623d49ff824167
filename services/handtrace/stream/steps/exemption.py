"""Exemptions: from its effective time (until a revoke, if any), nothing of an exempt employee
is stored. Decided on the event's capture time, so late or replayed events are dropped too.
No skew margin shortens an exemption: it is widened backwards by the margin (fails closed).
An erased employee (``handtrace erase``: EmployeeControls.erasures) has nothing stored whatever
the capture time, on any clock: their rows are dropped as ``erased`` (docs/adr/0015-erasure.md)."""

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
        erased = [employee for employee, c in ctx.controls.items() if c.erasures]
        if not erased:
            return self.drop(frame, spans, "exempt")
        gone = pl.col("employee_id").is_in(erased)
        kept = frame.filter(~gone)
        res = self.drop(kept, spans, "exempt")
        n = frame.height - kept.height
        return StepResult(res.frame, {**res.dropped, "erased": n} if n else res.dropped)
