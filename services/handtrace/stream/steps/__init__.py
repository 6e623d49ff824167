"""Processing steps: each one small component with a typed config and a pure function over a
whole frame of events, ``(frame, ctx) -> StepResult`` -- rows are dropped, never mutated behind
the caller's back.

The frame holds the events of many batches at once (a micro-batch of Kafka messages): the Event
columns plus, per row, its batch's header (``employee_id``, ``device_id``, ``batch_id``,
``agent_version``, ``os``, ``sent_at_us``) and origin (``source_partition``, ``source_offset``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import polars as pl


@dataclass(frozen=True)
class BatchContext:
    """What a step may know besides the rows."""

    received_at_us: int


@dataclass(frozen=True)
class StepResult:
    """Rows kept, and how many were dropped for which reason."""

    frame: pl.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)


class Step(Protocol):
    """One processing step."""

    name: str

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult: ...
