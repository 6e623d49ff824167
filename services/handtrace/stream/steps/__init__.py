"""Processing steps: each one small component with a typed config and a pure function over a
whole batch, ``(frame, ctx) -> StepResult`` -- rows are dropped, never mutated behind the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import polars as pl


@dataclass(frozen=True)
class BatchContext:
    """What a step may know about the batch besides its rows (from the EventBatch header and the
    Kafka message it came in)."""

    employee_id: str
    device_id: str
    batch_id: bytes
    agent_version: str
    os: str
    sent_at_us: int
    received_at_us: int
    source_partition: int
    source_offset: int


@dataclass(frozen=True)
class StepResult:
    """Rows kept, and how many were dropped for which reason."""

    frame: pl.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)


class Step(Protocol):
    """One processing step."""

    name: str

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult: ...
