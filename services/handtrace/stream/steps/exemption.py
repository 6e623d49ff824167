"""Exemptions: from its effective time (until a revoke, if any), nothing of an exempt employee
is stored. Decided on the event's capture time, so late or replayed events are dropped too.
No skew margin shortens an exemption: it is widened backwards by the margin (fails closed)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult
from handtrace.stream.steps._spans import drop_rows_in_spans

_FOREVER = 2**62


@dataclass(frozen=True)
class ExemptionStep:
    """Drops rows of employees exempt at capture time. Config: skew margin in seconds."""

    skew_margin_s: float = 2.0
    name: str = "exemption"

    def __post_init__(self) -> None:
        if self.skew_margin_s < 0:
            raise ValueError("skew_margin_s must be >= 0")

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        margin = int(self.skew_margin_s * 1_000_000)
        rows = [
            (employee, e.from_us - margin, _FOREVER if e.until_us is None else e.until_us + margin)
            for employee, c in ctx.controls.items()
            for e in c.exemptions
        ]
        kept = drop_rows_in_spans(frame, rows)
        dropped = frame.height - kept.height
        return StepResult(kept, {"exempt": dropped} if dropped else {})
