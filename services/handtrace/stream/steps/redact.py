"""Redaction: PII and secrets are removed from window titles, urls and typed text, and typed text
is masked per app as the policy says. Rows are never dropped here, only rewritten.

Detectors (each can be switched off):

- ``email``: ``local@domain.tld``;
- ``phone``: international (``+`` or ``00``, country code, 8-15 digits in all, spaces, dots,
  dashes and parentheses allowed), North American ``(415) 555-2671`` / ``415-555-2671`` /
  ``1 415 555 2671`` (separators required), and national numbers with a trunk ``0``:
  ``020 7946 0958``, ``01 23 45 67 89``, ``030-12345678`` (10-11 digits, one kind of
  separator) or ``07700900123``; short numbers, versions, dates and times are left alone;
- ``card``: 13-19 digits, optionally grouped by single spaces or dashes, passing the Luhn check
  (the check runs in Python on regex candidates only; a run of groups is also tried group-window
  by group-window, so a card followed by more digits is still found);
- ``national_id``: US SSN ``ddd-dd-dddd`` (or with spaces), UK National Insurance numbers
  ``AB 12 34 56 C`` (any case, spaces optional);
- ``secret``: AWS access key ids (``AKIA...``), GitHub tokens (``ghp_``, ``gho_``, ``ghu_``,
  ``ghs_``, ``ghr_``, ``github_pat_``), Slack tokens (``xoxb-`` ...), JWTs (``eyJ...``),
  ``Bearer <token>``, PEM private keys (header to footer, or to the end), and assignments such
  as ``password=...``, ``api_key: ...``, ``DB_PASSWORD="..."`` (the value only).

Where: ``window_title`` and ``url`` are redacted value by value (once per distinct value in the
frame; a url is also checked percent-decoded, and stored decoded when that found something);
each found span becomes the token, ``[REDACTED:email]`` by default. Typed text arrives one
character (or a few) per key event, so PII spans many rows: per batch, the stored ``text`` of
the rows (in frame order, which is capture order) is joined, PII spans are found in the joined
string, and every row with a character inside a span loses its text. Spans are mapped back to
rows through cumulative character offsets, vectorised.

Typed text per app (``policy.text_capture_for(app_id)``; the app context is filled within the
batch as in the allowlist step; rows whose app is unknown, or with a mode that is not one of
the three, count as ``none`` -- fail closed):

- ``full``: kept, subject to the PII redaction above;
- ``masked``: every character becomes ``•``;
- ``none``: text removed.

Password fields count as ``none`` whatever the app's mode: the window title in force (of the
latest focus change in the batch) has a word such as ``password``, ``passphrase``, ``passcode``,
``passwort``, ``kennwort``, ``PIN``, or the app is a password manager or PIN entry.

Meaning of the columns afterwards: ``text_masked`` is true when the row had text and the stored
``text`` is not what was typed (bullets, or removed: null). Shortcuts (``modifiers`` with ctrl,
alt or meta) stay shortcuts: ``key_code`` and ``modifiers`` are kept; outside ``full`` their
text, if any, is removed. ``key_code`` is an X11 keysym and so spells the character too: for a
character key (not a shortcut) whose text is masked or removed, on key_down and on its matching
key_up (the latest earlier press of the same key in the batch), it becomes ``MASKED_KEYSYM``
(the keysym of ``•``); Return, Backspace, Tab, arrows, modifiers and function keys are kept.

Counts: ``StepResult.redacted`` (never ``dropped``: no row is dropped) maps a detector name to
the PII occurrences removed (a title or url occurrence once per row that carries it, a typed
span once), plus ``policy_none``, ``policy_masked`` and ``password_field`` (rows whose text was
removed or masked by the app's mode or a password context) and ``key_code_masked``.

Limits: redaction is per batch, so PII typed across a batch boundary may be split; typed text is
joined as stored, without replaying Backspace, so a number typed with a corrected typo may not
be recognised; a password typed before the first focus change of a batch is only protected by
the app's mode.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import unquote

import numpy as np
import polars as pl

from handtrace.core.pii import (
    DETECTORS,
    MASK_CHAR,
    MASKED_KEYSYM,
    PASSWORD_APP,
    PASSWORD_TITLE,
    find_spans,
    redact_text,
)
from handtrace.stream.steps import BatchContext, StepResult, latest_row
from handtrace.stream.steps.allowlist import fill_app_context

SHORTCUT_MODIFIERS = 2 | 4 | 8
_KEY_KINDS = ("key_down", "key_up")
_MODES = ("none", "masked", "full")

# ------------------------------------------------------------------ the step

def _printable_keysym(code: pl.Expr) -> pl.Expr:
    """X11 keysyms that stand for a character (Latin-1, legacy sets, keypad digits and
    operators, Unicode); not Return, Backspace, arrows, modifiers, function keys."""
    return (
        (code < 0xFF00)
        | (code == 0xFF80)
        | code.is_between(0xFFAA, 0xFFBD)
        | code.is_between(0x01000000, 0x0110FFFF)
    )


@dataclass(frozen=True)
class RedactStep:
    """Redacts PII in titles, urls and typed text, and masks typed text per app policy.

    Config: ``detectors`` switched on (a subset of ``DETECTORS``; unknown names fail at
    start-up), the replacement ``token`` (``{kind}`` is the detector's name).
    """

    detectors: frozenset[str] = field(default_factory=lambda: frozenset(DETECTORS))
    token: str = "[REDACTED:{kind}]"  # noqa: S105
    name: str = "redact"

    def __post_init__(self) -> None:
        unknown = set(self.detectors) - set(DETECTORS)
        if unknown:
            raise ValueError(f"unknown detectors: {sorted(unknown)}")
        self.token.format(kind="x")

    @property
    def _kinds(self) -> tuple[str, ...]:
        return tuple(k for k in DETECTORS if k in self.detectors)

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        if frame.height == 0:
            return StepResult(frame)
        counts: Counter[str] = Counter()
        f = frame.with_row_index("_row")

        # App context and title in force per row, within each batch.
        app = (
            fill_app_context(f.select("batch_id", "app_id"), ("app_id",))
            .get_column("app_id").alias("_app")
        )
        f = f.with_columns(app)
        changed = (pl.col("_app") != pl.col("_app").shift(1)).fill_null(True)
        starts = (pl.col("kind") == "focus_change") | pl.col("window_title").is_not_null() | changed

        # Modes and password contexts are worked out per distinct app and title, then mapped to
        # rows: the title in force is the one of the row that started the row's title segment.
        modes = {}
        apps = f.get_column("_app").drop_nulls().unique()
        for a in apps.to_list():
            m = ctx.policy.text_capture_for(a)
            modes[a] = m if m in _MODES else "none"
        titles = f.get_column("window_title").drop_nulls().unique()
        password_titles = titles.filter(titles.str.contains(PASSWORD_TITLE)).implode()
        password_apps = apps.filter(apps.str.contains(PASSWORD_APP)).implode()
        titled_password = pl.col("window_title").is_in(password_titles).fill_null(False)
        password = (
            titled_password.gather(latest_row(starts))
            | pl.col("_app").is_in(password_apps).fill_null(False)
        )
        mode = pl.col("_app").replace_strict(modes, default="none", return_dtype=pl.String)
        f = f.with_columns(
            pl.when(password).then(pl.lit("none")).otherwise(mode).alias("_mode"),
            password.alias("_password"),
            ((pl.col("modifiers").fill_null(0) & SHORTCUT_MODIFIERS) != 0).alias("_shortcut"),
        )

        # Typed PII: join the stored text of each batch, find spans, map them back to rows.
        pii_rows = self._typed_pii_rows(f, counts)
        if pii_rows.len():
            pii = pl.col("_row").is_in(pii_rows.implode())
            press = (
                pl.when(pl.col("kind") == "key_down").then(pl.col("_row"))
                .forward_fill().over(["batch_id", "key_code"])
            )
            pii_release = (pl.col("kind") == "key_up") & press.is_in(pii_rows.implode())
        else:
            pii = pii_release = pl.lit(False)

        text = pl.col("text")
        has_text = text.is_not_null()
        none, masked = pl.col("_mode") == "none", pl.col("_mode") == "masked"
        hide_code = (
            pl.col("kind").is_in(_KEY_KINDS)
            & _printable_keysym(pl.col("key_code")).fill_null(False)
            & ~pl.col("_shortcut")
            & (none | masked | pii | pii_release)
        )
        f = f.with_columns(
            pl.when(~has_text | pii | none | (masked & pl.col("_shortcut"))).then(None)
            .when(masked).then(text.str.replace_all(r"(?s).", MASK_CHAR))
            .otherwise(text).alias("_text"),
            (pl.col("text_masked") | (has_text & (pii | none | masked))).alias("_text_masked"),
            pl.when(hide_code).then(pl.lit(MASKED_KEYSYM, pl.Int32)).otherwise(pl.col("key_code"))
            .alias("_key_code"),
            (has_text & none & ~pl.col("_password")).alias("_n_none"),
            (has_text & masked).alias("_n_masked"),
            (has_text & pl.col("_password")).alias("_n_password"),
            (hide_code & (pl.col("key_code") != MASKED_KEYSYM)).alias("_n_code"),
        )
        sums = f.select(pl.col("_n_none", "_n_masked", "_n_password", "_n_code").sum()).row(0)
        for key, n in zip(("policy_none", "policy_masked", "password_field", "key_code_masked"), sums,
                          strict=True):
            if n:
                counts[key] += int(n)

        out = f.with_columns(
            pl.col("_text").alias("text"),
            pl.col("_text_masked").alias("text_masked"),
            pl.col("_key_code").alias("key_code"),
            self._field(f, "window_title", counts, decode=False),
            self._field(f, "url", counts, decode=True),
        ).select(frame.columns)
        return StepResult(out, redacted=dict(counts))

    def _typed_pii_rows(self, f: pl.DataFrame, counts: Counter[str]) -> pl.Series:
        """Rows (``_row``) of stored typed text that fall, wholly or partly, in a PII span."""
        empty = pl.Series("_row", [], dtype=pl.UInt32)
        kinds = self._kinds
        if not kinds:
            return empty
        t = f.filter((pl.col("_mode") == "full") & pl.col("text").is_not_null()).select(
            "_row", "batch_id", "text", pl.col("text").str.len_chars().cast(pl.Int64).alias("_len")
        )
        if t.height == 0:
            return empty
        t = t.with_columns(pl.col("_len").cum_sum().over("batch_id").alias("_end"))
        joined = t.group_by("batch_id", maintain_order=True).agg(pl.col("text").str.join(""))
        joined = joined.with_columns(
            pl.col("text").str.len_chars().cast(pl.Int64).cum_sum().shift(1, fill_value=0)
            .alias("_base")
        )
        starts: list[int] = []
        ends: list[int] = []
        for base, s in zip(joined.get_column("_base").to_list(), joined.get_column("text").to_list(),
                           strict=True):
            for a, b, k in find_spans(s, kinds):
                starts.append(base + a)
                ends.append(base + b)
                counts[k] += 1
        if not starts:
            return empty
        t = t.join(joined.select("batch_id", "_base"), on="batch_id", how="left")
        row_end = (t.get_column("_base") + t.get_column("_end")).to_numpy()
        row_start = row_end - t.get_column("_len").to_numpy()
        span_start, span_end = np.asarray(starts), np.asarray(ends)  # sorted, disjoint
        idx = np.searchsorted(span_end, row_start, side="right")
        hit = idx < len(span_start)
        hit[hit] = span_start[idx[hit]] < row_end[hit]
        return t.get_column("_row").filter(pl.Series(hit))

    def _field(self, f: pl.DataFrame, column: str, counts: Counter[str], *, decode: bool) -> pl.Expr:
        """``column`` with PII redacted, worked out once per distinct value."""
        kinds = self._kinds
        mapping: dict[str, str] = {}
        per_value: dict[str, Counter[str]] = {}
        if kinds:
            for v in f.get_column(column).drop_nulls().unique().to_list():
                new, c = v, Counter[str]()
                if decode and "%" in v:
                    new, c = redact_text(unquote(v), kinds, self.token)
                if not c:
                    new, c = redact_text(v, kinds, self.token)
                if c:
                    mapping[v] = new
                    per_value[v] = c
        if not mapping:
            return pl.col(column)
        keys = pl.Series(list(mapping), dtype=pl.String).implode()
        hits = f.filter(pl.col(column).is_in(keys)).group_by(column).len()
        for v, n in hits.iter_rows():
            for k, per_row in per_value[v].items():
                counts[k] += per_row * n
        return pl.col(column).replace(mapping)
