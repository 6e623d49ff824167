"""Validation: rows that violate the Event contract's per-kind rules are dropped and counted.

Avro guarantees types; this step checks meaning: a pointer event has coordinates, a key event a
key code, a focus change an app, a screenshot a hash; capture time is not implausibly far in the
future of its batch's send time; an event id appears once.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from handtrace.stream.steps import BatchContext, StepResult

EARLIEST_CAPTURE_US = 1_577_836_800_000_000  # 2020-01-01: older timestamps are clock garbage

_POINTER = ("pointer_move", "click", "scroll")
_KEYS = ("key_down", "key_up")


@dataclass(frozen=True)
class ValidateStep:
    """Drops rows that break the per-kind rules. Config: allowed clock skew into the future."""

    max_future_skew_s: float = 300.0
    name: str = "validate"

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        kind = pl.col("kind")
        ts_us = pl.col("captured_at_us").dt.epoch("us")
        latest = pl.col("sent_at_us") + int(self.max_future_skew_s * 1_000_000)
        rules: dict[str, pl.Expr] = {
            "invalid_coordinates": kind.is_in(_POINTER) & (pl.col("x").is_null() | pl.col("y").is_null()),
            "invalid_click": (kind == "click") & (pl.col("pressed").is_null() | (pl.col("button") == "none")),
            "invalid_key": kind.is_in(_KEYS) & pl.col("key_code").is_null(),
            "invalid_focus": (kind == "focus_change") & pl.col("app_id").is_null(),
            "invalid_screenshot": (kind == "screenshot") & pl.col("screenshot_sha256").is_null(),
            "invalid_time": (ts_us < EARLIEST_CAPTURE_US) | (ts_us > latest),
            "duplicate_event_id": ~pl.col("event_id").is_first_distinct(),
        }
        # First failing rule names the reason, so each dropped row is counted once.
        reason = pl.when(rules["invalid_coordinates"]).then(pl.lit("invalid_coordinates"))
        for name, cond in list(rules.items())[1:]:
            reason = reason.when(cond).then(pl.lit(name))
        tagged = frame.with_columns(reason.otherwise(None).alias("_reject"))
        bad = tagged.filter(pl.col("_reject").is_not_null())
        if bad.height == 0:
            return StepResult(frame)
        counts = dict(bad.group_by("_reject").len().iter_rows())
        kept = tagged.filter(pl.col("_reject").is_null()).drop("_reject")
        return StepResult(kept, counts)
