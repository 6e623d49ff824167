"""Processing steps: each one small component with a typed config and a pure function over a
whole frame of events, ``(frame, ctx) -> StepResult`` -- rows are dropped, never mutated behind
the caller's back.

The frame holds the events of many batches at once (a micro-batch of Kafka messages): the Event
columns plus, per row, its batch's header (``employee_id``, ``device_id``, ``batch_id``,
``agent_version``, ``os``, ``sent_at_us``) and origin (``source_partition``, ``source_offset``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

import polars as pl

from handtrace.stream.policy import EmployeeControls, Policy


@dataclass(frozen=True)
class BatchContext:
    """What a step may know besides the rows: when the stream received them, the global policy
    in force, and the controls (pauses, exemption) of the employees in the frame, by raw id."""

    received_at_us: int
    policy: Policy = field(default_factory=Policy)
    controls: Mapping[str, EmployeeControls] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class StepResult:
    """Rows kept, and how many were dropped for which reason; ``redacted`` counts values a step
    redacted or masked in kept rows, by kind (not dropped rows)."""

    frame: pl.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    redacted: dict[str, int] = field(default_factory=dict)


class Step(Protocol):
    """One processing step."""

    name: str

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult: ...
