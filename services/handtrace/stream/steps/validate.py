"""Validation: rows that violate the Event contract's per-kind rules are dropped and counted.

Avro guarantees types; this step checks meaning: a pointer event has coordinates, a key event a
key code, a focus change an app, a screenshot a hash; an event id appears once; and its capture
time is plausible (``invalid_time``): not before 2020, not later than its batch's send time plus
``max_future_skew_s``, and -- placed on the broker's clock with its message's clock offset
(``clock_offset_us``, handtrace.core.clock.clock_offset_us) -- neither more than
``max_future_skew_s`` after the stream received it nor more than ``max_event_age_s`` before.
The last bound is the stream's own clock: an agent's send time alone bounds nothing (a batch
stamped with a send time months back could carry events spanning months, which would also make
one ClickHouse insert touch too many partitions).

And a bound on hostile input: a batch with more than ``max_distinct_per_batch`` distinct window
titles or URLs is dropped whole (``too_many_distinct_values``). Later steps do Python work per
distinct title and URL (URL parsing, PII regexes); a person produces a few dozen in a batch, an
agent sending a new one with every event could otherwise slow every worker (32k rows/s measured
when every title differs, docs/BENCHMARKS.md). Fails closed: the batch's rows are not stored.

And a bound on size (issue #10, class 1): free strings longer than ``max_field_chars`` (window
title, URL, text, app id) or ``MAX_LABEL_CHARS`` (the batch's agent version, OS, cohort, repeated
on every row) are truncated to it, counted per field as ``truncated_<field>`` in the redacted
tally -- so no agent-sent string can make an accepted message outgrow the broker's limit. Later
steps (allowlist, redaction) see the truncated value. A screenshot hash must be 32 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
from polars.expr.whenthen import ChainedThen, Then

from handtrace.stream.steps import BatchContext, StepResult

EARLIEST_CAPTURE_US = 1_577_836_800_000_000  # 2020-01-01: older timestamps are clock garbage

MAX_LABEL_CHARS = 128  # agent_version, os, cohort: short labels by contract
FREE_TEXT = ("window_title", "url", "text", "app_id")
LABELS = ("agent_version", "os", "cohort")
SHA256_BYTES = 32

_POINTER = ("pointer_move", "click", "scroll")
_KEYS = ("key_down", "key_up")


@dataclass(frozen=True)
class ValidateStep:
    """Drops rows that break the per-kind rules. Config: allowed clock skew into the future."""

    max_future_skew_s: float = 300.0
    max_distinct_per_batch: int = 2000
    max_event_age_s: float = 7 * 86_400.0
    max_field_chars: int = 2048
    name: str = "validate"

    def _truncate(self, frame: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
        """Free strings cut to their bound (characters), and how many values were cut per field.
        Vectorised; the common case reads only the byte lengths (no string is touched)."""
        limits = {c: self.max_field_chars for c in FREE_TEXT if c in frame.columns}
        limits |= {c: MAX_LABEL_CHARS for c in LABELS if c in frame.columns}
        # bytes >= chars: only a column with a value over the bound in bytes needs a closer look
        over_bytes = frame.select([(pl.col(c).str.len_bytes() > n).any().alias(c) for c, n in limits.items()])
        suspects = [c for c in limits if over_bytes.get_column(c)[0]]
        if not suspects:
            return frame, {}
        counts = frame.select([(pl.col(c).str.len_chars() > limits[c]).sum().alias(c) for c in suspects]).row(0)
        cut = {c: int(n) for c, n in zip(suspects, counts, strict=True) if n}
        if not cut:
            return frame, {}
        frame = frame.with_columns([pl.col(c).str.slice(0, limits[c]) for c in cut])
        return frame, {f"truncated_{c}": n for c, n in cut.items()}

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
        future_us = int(self.max_future_skew_s * 1_000_000)
        latest = pl.col("sent_at_us") + future_us
        # Capture time on the broker's clock against the stream's receive time.
        at = ts_us + (pl.col("clock_offset_us") if "clock_offset_us" in frame.columns else 0)
        received = ctx.received_at_us
        implausible_now = (at > received + future_us) | (at < received - int(self.max_event_age_s * 1_000_000))
        flooded = self._flooded_batches(frame)
        rules: dict[str, pl.Expr] = {
            "too_many_distinct_values": pl.col("batch_id").is_in(flooded.implode()) if flooded is not None
            else pl.lit(False),
            "invalid_coordinates": kind.is_in(_POINTER) & (pl.col("x").is_null() | pl.col("y").is_null()),
            "invalid_click": (kind == "click") & (pl.col("pressed").is_null() | (pl.col("button") == "none")),
            "invalid_key": kind.is_in(_KEYS) & pl.col("key_code").is_null(),
            "invalid_focus": (kind == "focus_change") & pl.col("app_id").is_null(),
            "invalid_screenshot": ((kind == "screenshot") & pl.col("screenshot_sha256").is_null())
            | (pl.col("screenshot_sha256").bin.size() != SHA256_BYTES).fill_null(False),
            "invalid_time": (ts_us < EARLIEST_CAPTURE_US) | (ts_us > latest) | implausible_now,
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
            kept, counts = frame, {}
        else:
            counts = dict(bad.group_by("_reject").len().iter_rows())
            kept = tagged.filter(pl.col("_reject").is_null()).drop("_reject")
        kept, truncated = self._truncate(kept)
        return StepResult(kept, counts, truncated)
