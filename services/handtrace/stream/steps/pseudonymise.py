"""Pseudonymisation: raw employee and device ids become keyed HMAC-SHA256 pseudonyms, and the
raw id columns are removed. One HMAC per distinct id in the frame, not per event.
Key rotation: docs/operations.md.
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
    """Replaces employee_id/device_id with employee_key/device_key. Config: the HMAC key
    (at least 16 bytes; fails closed at start-up otherwise)."""

    key: bytes = field(repr=False)
    name: str = "pseudonymise"

    def __post_init__(self) -> None:
        if len(self.key) < 16:
            raise ValueError("pseudonym key must be at least 16 bytes")

    def _mapped(self, frame: pl.DataFrame, column: str, namespace: str, alias: str) -> pl.Expr:
        ids = frame.get_column(column).unique().to_list()
        mapping = {i: pseudonym(self.key, namespace, i) for i in ids}
        return pl.col(column).replace_strict(mapping, return_dtype=pl.String).alias(alias)

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        return StepResult(
            frame.with_columns(
                self._mapped(frame, "employee_id", "employee", "employee_key"),
                self._mapped(frame, "device_id", "device", "device_key"),
            ).drop("employee_id", "device_id")
        )
