"""Validation: rows that violate the Event contract's per-kind rules are dropped and counted.

Avro guarantees types; this step checks meaning: a pointer event has coordinates, a key event a
key code, a focus change an app, a screenshot a hash; capture time is not implausibly far in the
future of its batch's send time; an event id appears once.

And a bound on hostile input: a batch with more than ``max_distinct_per_batch`` distinct window
titles or URLs is dropped whole (``too_many_distinct_values``). Later steps do Python work per
distinct title and URL (URL parsing, PII regexes); a person produces a few dozen in a batch, an
agent sending a new one with every event could otherwise slow every worker (32k rows/s measured
when every title differs, docs/BENCHMARKS.md). Fails closed: the batch's rows are not stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from polars.expr.whenthen import ChainedThen, Then

from handtrace.stream.steps import BatchContext, StepResult

EARLIEST_CAPTURE_US = 1_577_836_800_000_000  # 2020-01-01: older timestamps are clock garbage

_POINTER = ("pointer_move", "click", "scroll")
_KEYS = ("key_down", "key_up")


@dataclass(frozen=True)
class ValidateStep:
    """Drops rows that break the per-kind rules. Config: allowed clock skew into the future."""

    max_future_skew_s: float = 300.0
    max_distinct_per_batch: int = 2000
    name: str = "validate"

    def _flooded_batches(self, frame: pl.DataFrame) -> pl.Series | None:
        """batch_ids with too many distinct titles or urls (None: none; the common case costs two
        n_unique over the whole frame, no grouping)."""
        cap = self.max_distinct_per_batch
        cols = [c for c in ("window_title", "url") if c in frame.columns]
        if not cols or all(frame.get_column(c).n_unique() <= cap for c in cols):
            return None
        per = frame.group_by("batch_id").agg([pl.col(c).n_unique() for c in cols])
        bad = per.filter(pl.any_horizontal([pl.col(c) > cap for c in cols])).get_column("batch_id")
        return bad if bad.len() else None

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        kind = pl.col("kind")
        ts_us = pl.col("captured_at_us").dt.epoch("us")
        latest = pl.col("sent_at_us") + int(self.max_future_skew_s * 1_000_000)
        flooded = self._flooded_batches(frame)
        rules: dict[str, pl.Expr] = {
            "too_many_distinct_values": pl.col("batch_id").is_in(flooded.implode()) if flooded is not None
            else pl.lit(False),
            "invalid_coordinates": kind.is_in(_POINTER) & (pl.col("x").is_null() | pl.col("y").is_null()),
            "invalid_click": (kind == "click") & (pl.col("pressed").is_null() | (pl.col("button") == "none")),
            "invalid_key": kind.is_in(_KEYS) & pl.col("key_code").is_null(),
            "invalid_focus": (kind == "focus_change") & pl.col("app_id").is_null(),
            "invalid_screenshot": (kind == "screenshot") & pl.col("screenshot_sha256").is_null(),
            "invalid_time": (ts_us < EARLIEST_CAPTURE_US) | (ts_us > latest),
            "duplicate_event_id": ~pl.col("event_id").is_first_distinct(),
        }
        # First failing rule names the reason, so each dropped row is counted once.
        first, *rest = rules.items()
        reason: Then | ChainedThen = pl.when(first[1]).then(pl.lit(first[0]))
        for name, cond in rest:
            reason = reason.when(cond).then(pl.lit(name))
        tagged = frame.with_columns(reason.otherwise(None).alias("_reject"))
        bad = tagged.filter(pl.col("_reject").is_not_null())
        if bad.height == 0:
            return StepResult(frame)
        counts = dict(bad.group_by("_reject").len().iter_rows())
        kept = tagged.filter(pl.col("_reject").is_null()).drop("_reject")
        return StepResult(kept, counts)
