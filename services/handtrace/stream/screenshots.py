"""Screenshots through the same rules as events: the stream proves for every image what the agent
promised on the laptop.

An agent sends each screenshot as its own message on ``<prefix>.screenshots.raw`` (key: employee
id; value: the WebP/JPEG bytes; headers: ``ht-event-id``, ``ht-captured-at-us``, ``ht-device-id``,
``ht-app-id``, ``ht-url``, ``ht-sha256``, ``ht-format``). Here each micro-batch of them becomes a
one-row-per-image frame and runs through the event pipeline's own exemption, pause, allowlist and
pseudonymisation steps (same instances, same policy and controls), so an image is published to
``<prefix>.screenshots.accepted`` only if an event captured at the same moment in the same window
would be stored -- keyed and labelled by pseudonyms, never the raw ids. Fails closed: a message
without the headers a decision needs is dropped (``screenshot_invalid``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl

from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.steps import BatchContext

STEP_NAMES = ("exemption", "pause", "allowlist", "pseudonymise")
INVALID = "screenshot_invalid"


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
            rows.append({
                "_i": i,
                "employee_id": m.message.key.decode(),
                "device_id": h["ht-device-id"].decode(),
                "batch_id": h["ht-event-id"],
                "event_id": h["ht-event-id"],
                "kind": "screenshot",
                "captured_at_us": int(h["ht-captured-at-us"]),
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
    }).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))
    for step in steps:
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
                   ("ht-app-id", (r["app_id"] or "").encode()), ("ht-url", (r["url"] or "").encode())]
        headers += [(k, h[k]) for k in ("ht-sha256", "ht-format") if k in h]
        out.append(AcceptedScreenshot(m.message.partition, r["employee_key"].encode(), m.message.payload, headers))
    return out, dropped
