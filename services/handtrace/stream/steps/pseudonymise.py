"""Pseudonymisation: raw employee and device ids become keyed HMAC-SHA256 pseudonyms.

The raw id never leaves this step towards analyst tables. One batch holds one device of one
employee, so this is two HMACs per batch, not per event. Key rotation: docs/operations.md.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult


def pseudonym(key: bytes, namespace: str, raw_id: str) -> str:
    """Stable pseudonym of ``raw_id``: 32 hex chars of HMAC-SHA256(key, namespace:id)."""
    return hmac.new(key, f"{namespace}:{raw_id}".encode(), hashlib.sha256).hexdigest()[:32]


@dataclass(frozen=True)
class PseudonymiseStep:
    """Adds employee_key and device_key columns. Config: the HMAC key (fails closed if empty)."""

    key: bytes = field(repr=False)
    name: str = "pseudonymise"

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        return StepResult(
            frame.with_columns(
                pl.lit(pseudonym(self.key, "employee", ctx.employee_id)).alias("employee_key"),
                pl.lit(pseudonym(self.key, "device", ctx.device_id)).alias("device_key"),
            )
        )
