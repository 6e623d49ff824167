"""Screenshots through the same rules as events: the stream proves for every image what the agent
promised on the laptop.

An agent sends each screenshot as its own message on ``<prefix>.screenshots.raw`` (key: employee
id; value: the WebP/JPEG bytes; headers: ``ht-event-id``, ``ht-captured-at-us``, ``ht-device-id``,
``ht-app-id``, ``ht-url``, ``ht-sha256``, ``ht-format``). Here each micro-batch of them becomes a
one-row-per-image frame and runs through the event pipeline's own exemption, pause, allowlist,
redaction and pseudonymisation steps (same instances, same policy and controls), so an image is
published to ``<prefix>.screenshots.accepted`` only if an event captured at the same moment in the
same window would be stored -- keyed and labelled by pseudonyms, never the raw ids, and with its
url redacted exactly as an event's (issue #10: the url sent with an image skipped the detectors).

Fails closed:

- a message without the headers a decision needs, or whose forwarded headers are not what they
  claim (an event id of 16 bytes, a sha256 of 64 hex digits, a known image format), is dropped
  (``screenshot_invalid``): no free text of the agent's is forwarded unexamined;
- a url the redaction step could not process (it raised), or in which a detector still finds
  something after redaction (raw, percent- or form-decoded), drops its image
  (``screenshot_unredactable``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, unquote_plus

import polars as pl

from handtrace.core.pii import DEFAULT_TOKEN, unredacted_spans
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.steps import BatchContext

STEP_NAMES = ("exemption", "pause", "allowlist", "redact", "pseudonymise")
INVALID = "screenshot_invalid"
UNREDACTABLE = "screenshot_unredactable"
FORMATS = frozenset({b"webp", b"jpeg", b"png"})
_SHA256 = re.compile(rb"[0-9a-f]{64}")


@dataclass(frozen=True)
class ScreenshotMessage:
    """A consumed screenshot message."""

    message: SourceMessage
    headers: dict[str, bytes]


@dataclass(frozen=True)
class AcceptedScreenshot:
    """An image that passed, with the pseudonymous headers it is published with."""

    partition: int
    key: bytes
    value: bytes
    headers: list[tuple[str, bytes]]


def screenshot_steps(steps: Sequence[Any]) -> list[Any]:
    """The event pipeline's steps that apply to screenshots, in pipeline order."""
    chosen = [s for s in steps if s.name in STEP_NAMES]
    names = [s.name for s in chosen]
    if sorted(names) != sorted(STEP_NAMES):
        raise ValueError(f"the pipeline lacks steps screenshots need: {sorted(set(STEP_NAMES) - set(names))}")
    return chosen


def enforce(batch: Sequence[ScreenshotMessage], steps: Sequence[Any],
            ctx: BatchContext) -> tuple[list[AcceptedScreenshot], Counter[str]]:
    """The images of ``batch`` that may be stored, and why the others were dropped."""
    dropped: Counter[str] = Counter()
    rows: list[dict[str, Any]] = []
    for i, m in enumerate(batch):
        h = m.headers
        if not m.message.key:
            dropped[INVALID] += 1
            continue
        try:
            if (len(h["ht-event-id"]) != 16 or not _SHA256.fullmatch(h.get("ht-sha256", b""))
                    or h.get("ht-format") not in FORMATS):
                raise ValueError("forwarded header out of its format")
            captured = h["ht-captured-at-us"]
            if not (captured.isdigit() and len(captured) < 20):  # ASCII digits only (int() takes more)
                raise ValueError("capture time is not a number")
            rows.append({
                "_i": i,
                "employee_id": m.message.key.decode(),
                "device_id": h["ht-device-id"].decode(),
                "batch_id": h["ht-event-id"],
                "event_id": h["ht-event-id"],
                "kind": "screenshot",
                "captured_at_us": int(captured),
                "app_id": h["ht-app-id"].decode() if h.get("ht-app-id") else None,
                "url": h["ht-url"].decode() if h.get("ht-url") else None,
                "window_title": None,
            })
        except (KeyError, ValueError, UnicodeDecodeError):
            dropped[INVALID] += 1
    if not rows:
        return [], dropped
    frame = pl.DataFrame(rows, schema={
        "_i": pl.Int64, "employee_id": pl.String, "device_id": pl.String, "batch_id": pl.Binary,
        "event_id": pl.Binary, "kind": pl.String, "captured_at_us": pl.Int64, "app_id": pl.String,
        "url": pl.String, "window_title": pl.String,
    }).with_columns(
        pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")),
        # What the redaction step reads of an event that carries no typed text.
        pl.lit(None, pl.String).alias("text"), pl.lit(False).alias("text_masked"),  # noqa: FBT003
        pl.lit(None, pl.Int32).alias("modifiers"), pl.lit(None, pl.Int32).alias("key_code"),
    )
    for step in steps:
        if step.name == "redact":
            try:
                res = step(frame, ctx)
            except Exception:  # noqa: BLE001 -- fail closed: no image whose url was not redacted
                dropped[UNREDACTABLE] += frame.height
                return [], dropped
            frame = _drop_unredacted(res.frame, getattr(step, "token", DEFAULT_TOKEN), dropped)
            continue
        res = step(frame, ctx)
        frame = res.frame
        dropped.update({f"screenshot_{k}": v for k, v in res.dropped.items()})
    if {"employee_id", "device_id"} & set(frame.columns):
        raise ValueError("refusing to publish screenshots without pseudonymisation")
    out = []
    for r in frame.select("_i", "employee_key", "device_key", "app_id", "url").iter_rows(named=True):
        m = batch[r["_i"]]
        h = m.headers
        headers = [("ht-employee-key", r["employee_key"].encode()), ("ht-device-key", r["device_key"].encode()),
                   ("ht-event-id", h["ht-event-id"]), ("ht-captured-at-us", h["ht-captured-at-us"]),
                   ("ht-app-id", (r["app_id"] or "").encode()), ("ht-url", (r["url"] or "").encode()),
                   ("ht-sha256", h["ht-sha256"]), ("ht-format", h["ht-format"])]
        out.append(AcceptedScreenshot(m.message.partition, r["employee_key"].encode(), m.message.payload, headers))
    return out, dropped


def _drop_unredacted(frame: pl.DataFrame, token: str, dropped: Counter[str]) -> pl.DataFrame:
    """``frame`` without the rows whose redacted url a detector still finds something in, raw,
    percent-decoded or form-decoded (once per distinct url)."""
    bad = [u for u in frame.get_column("url").drop_nulls().unique().to_list()
           if any(unredacted_spans(view, token=token) for view in {u, unquote(u), unquote_plus(u)})]
    if not bad:
        return frame
    keep = ~pl.col("url").is_in(pl.Series(bad, dtype=pl.String).implode()).fill_null(False)
    out = frame.filter(keep)
    dropped[UNREDACTABLE] += frame.height - out.height
    return out
