"""Demonstrations through the same rules as everything else (issue #11; the contract is
docs/design/demonstrations.md, "On the wire" and "In the stream").

A micro-batch of ``<prefix>.demonstrations.raw`` holds two kinds of message (header ``ht-part``):

- **demonstration** (Avro ``demonstration/v1``, events last like EventBatch): admitted exactly as
  an event batch (``BatchPipeline.admit``: framing, key = employee id in its key's partition,
  sender clock); the events of every admitted demonstration are decoded in one columnar call
  (``BatchPipeline.frame_of``) and run through the event pipeline's own step instances EXCEPT
  the volume steps (``sample``, ``decimate``): a demonstration is not sampled. The steps run once
  over the whole micro-batch (``run_steps``, past-policy eras included), in a second pass only
  for a re-upload of the same recording in the same micro-batch (same event ids: not duplicates
  of the first copy). Each demonstration's ``events_dropped`` are its own: a pass that dropped
  rows for several reasons runs the demonstrations that lost rows alone once more (a step
  counts by reason, not by row).
- **frame** (the image bytes): the sha256 is recomputed (must equal ``ht-sha256``), the format
  magic must match ``ht-format``, and the frame is judged on its own headers.

One judge (:func:`judge_frames`) decides every frame, a manifest entry of a header and a frame
message alike: one row per visible window (capture time, app id, url) through the exemption,
pause, allowlist and redaction steps, exactly as a screenshot; a frame passes only if every
row passes, and its urls are kept as enforced (query stripped, PII redacted; a url a detector
still finds something in refuses the frame). A frame with no visible window (all filled) shows
no application's pixels, so it is judged on its time only (exemption, pause). A manifest frame
must also lie within its demonstration's start and end (``invalid_time``).

The demonstration as a whole, and every frame message, are also judged by exemption at their
upload time (``sent_at_us``, ``ht-sent-at``), the demonstration at its start and end too: an
employee exempt at any of these has nothing of it published (exempt only in between: the steps
drop what was captured then, as for events). Its
instruction, agent version and os go through the redaction step (as a window title and the
batch labels) and are checked afterwards: a detector still finding something, or the step
failing, dead-letters the demonstration (``unredactable``); they are first cut to the validation
step's bounds (``stream.max_field_chars``; 128 for the labels), as an event's strings are. App ids
are kept only if the policy in force allowlists them. A demonstration left with no event and no
frame is not published (``empty``).

Fails closed, and what goes where:

- dead-lettered (``<prefix>.events.deadletter``, ``ht-source-topic`` = the raw topic), with a
  reason: whatever ``admit`` refuses (its reasons), ``invalid_headers`` (an ``ht-*`` header
  missing, repeated or out of its format), ``unknown_part``, ``demo_id_mismatch`` (the record's id
  is not ``ht-demo-id``), ``invalid_demonstration`` (times, screen, consent version or manifest out
  of range), ``unredactable``, ``step_error``, ``too_large`` (the accepted message would not fit);
  for frames ``sha256_mismatch`` and ``format_mismatch`` too. A frame's dead-letter copy never
  carries its pixels (``ht-payload-withheld: <bytes>``): they may show what the rules would refuse.
- counted only (``handtrace_stream_demonstration_frames_total``, ``..._demonstrations_total``,
  ``frames_dropped``/``events_dropped`` in the header): what a rule refused, as for events.

Output (``<prefix>.demonstrations.accepted``, key = employee pseudonym, partition = source
partition, in source-offset order per partition): the header as Arrow IPC of the enforced events
(``STORED_SCHEMA``; batch_id = demonstration id) with headers ``ht-part``, ``ht-demo-id``,
``ht-employee-key``, ``ht-device-key``, ``ht-source-offset``, ``ht-demo`` (JSON); a frame as its
bytes with ``ht-part``, ``ht-demo-id``, ``ht-employee-key``, ``ht-sha256``, ``ht-format``,
``ht-source-offset``. No raw id, and no url that did not pass the rules, leaves.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote, unquote_plus

import numpy as np
import polars as pl
import pyarrow as pa

from handtrace.core.clock import HEADER_SENT_AT
from handtrace.core.codec import DecodeError, ParsedBatch, parse_event_batch
from handtrace.core.pii import DEFAULT_TOKEN, unredacted_spans
from handtrace.core.rows import HEADER_SOURCE_OFFSET, STORED_SCHEMA, to_ipc
from handtrace.stream.deadletter import OutRecord, deadletter_record, message_budget, record_size
from handtrace.stream.pipeline import (
    BatchOutcome,
    BatchPipeline,
    DeadLetter,
    SourceMessage,
    message_clock_offset,
    run_steps,
    to_stored,
    transport_problem,
)
from handtrace.stream.steps import BatchContext, Step
from handtrace.stream.steps.validate import EARLIEST_CAPTURE_US, MAX_LABEL_CHARS

SUBJECT = "demonstration"
PART_HEADER, PART_FRAME = b"demonstration", b"frame"
VOLUME_STEPS = frozenset({"sample", "decimate"})
"""Steps a demonstration skips: volume control, not privacy (the agent records before sampling)."""
REQUIRED_STEPS = ("validate", "exemption", "pause", "allowlist", "redact", "pseudonymise")
MAGIC = {b"png": lambda b: b[:8] == b"\x89PNG\r\n\x1a\n", b"webp": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WEBP"}

# Reasons (bounded label sets: metrics and headers).
INVALID_HEADERS = "invalid_headers"
UNKNOWN_PART = "unknown_part"
DEMO_ID_MISMATCH = "demo_id_mismatch"
INVALID_DEMONSTRATION = "invalid_demonstration"
UNREDACTABLE = "unredactable"
UNREDACTABLE_URL = "unredactable_url"
STEP_ERROR = "step_error"
TOO_LARGE = "too_large"
SHA256_MISMATCH = "sha256_mismatch"
FORMAT_MISMATCH = "format_mismatch"
INVALID_TIME = "invalid_time"
EMPTY = "empty"
EXEMPT = "exempt"
NOT_ALLOWLISTED = "not_allowlisted"

_SHA256_HEX = re.compile(rb"[0-9a-f]{64}")
_DIGITS = re.compile(rb"[0-9]{1,19}")
_CONSENT = re.compile(r"[A-Za-z0-9._:+-]{1,64}")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MAX_PIXELS = 100_000  # a logical screen or frame side longer than this is garbage
_HEADER_KEYS = ("ht-part", "ht-demo-id", HEADER_SENT_AT)
_FRAME_KEYS = ("ht-sha256", "ht-format", "ht-captured-at-us", "ht-device-id", "ht-windows")

Window = tuple[str | None, str | None]


def _us(v: Any) -> int:
    """An Avro timestamp-micros as fastavro returns it (datetime, or int), in exact µs."""
    if isinstance(v, datetime):
        return (v - _EPOCH) // timedelta(microseconds=1)
    return int(v)


@dataclass(frozen=True)
class FrameMeta:
    """What a frame is judged on: whose, when (own clock, and its sender's offset to the
    broker's), and the (app id, url) of every window whose pixels it shows."""

    employee_id: str
    device_id: str
    captured_at_us: int
    clock_offset_us: int
    windows: tuple[Window, ...]
    sent_at_us: int | None = None
    """When it was uploaded (sender clock): an employee exempt then has nothing of it published."""


@dataclass(frozen=True)
class FrameVerdict:
    """``reason`` None: the frame passed, and ``windows`` are its windows as enforced."""

    reason: str | None
    windows: tuple[Window, ...] = ()


@dataclass(frozen=True)
class DemoRules:
    """The event pipeline's own step instances as demonstrations use them."""

    events: tuple[Step, ...]
    exemption: Step
    pause: Step
    allowlist: Step
    redact: Step
    pseudonymise: Step
    max_field_chars: int
    max_future_skew_us: int
    max_event_age_us: int
    token: str

    @classmethod
    def from_steps(cls, steps: Sequence[Step]) -> DemoRules:
        """From the event pipeline's steps (in order); ValueError if one the rules need is missing."""
        by_name = {s.name: s for s in steps}
        missing = [n for n in REQUIRED_STEPS if n not in by_name]
        if missing:
            raise ValueError(f"the pipeline lacks steps demonstrations need: {missing}")
        validate = by_name["validate"]
        return cls(
            events=tuple(s for s in steps if s.name not in VOLUME_STEPS),
            exemption=by_name["exemption"], pause=by_name["pause"], allowlist=by_name["allowlist"],
            redact=by_name["redact"], pseudonymise=by_name["pseudonymise"],
            max_field_chars=int(getattr(validate, "max_field_chars", 2048)),
            max_future_skew_us=int(getattr(validate, "max_future_skew_s", 300.0) * 1_000_000),
            max_event_age_us=int(getattr(validate, "max_event_age_s", 7 * 86_400.0) * 1_000_000),
            token=str(getattr(by_name["redact"], "token", DEFAULT_TOKEN)),
        )


def _blank_columns() -> list[pl.Expr]:
    """What the redaction step reads of a row that carries no typed text."""
    return [pl.lit(None, pl.String).alias("text"), pl.lit(False).alias("text_masked"),  # noqa: FBT003
            pl.lit(None, pl.Int32).alias("modifiers"), pl.lit(None, pl.Int32).alias("key_code")]


def _lost(before: pl.DataFrame, after: pl.DataFrame, n: int, by: str = "_f") -> np.ndarray:
    """Which of ``n`` groups (column ``by``) lost rows between ``before`` and ``after``."""
    b = np.bincount(before.get_column(by).to_numpy(), minlength=n)
    a = np.bincount(after.get_column(by).to_numpy(), minlength=n) if after.height else np.zeros(n, dtype=np.int64)
    return np.asarray(a < b)


def _still_finds(value: str, token: str, *, url: bool = False) -> bool:
    """A detector still finds something in an already redacted value (a url also percent- and
    form-decoded)."""
    views = {value, unquote(value), unquote_plus(value)} if url else {value}
    return any(unredacted_spans(v, token=token) for v in views)


def judge_frames(metas: Sequence[FrameMeta], rules: DemoRules, ctx: BatchContext) -> list[FrameVerdict]:
    """Every frame of ``metas`` decided at once: a row per visible window (one time-only row for
    a frame without any) through exemption and pause, window rows through allowlist and redaction
    (past-policy eras included), and its upload time through exemption; a frame passes only if
    all its rows do. Fails closed: a step that
    raises refuses every frame it was deciding."""
    n = len(metas)
    if not n:
        return []
    cap = rules.max_field_chars
    cols: dict[str, list[Any]] = {k: [] for k in ("_f", "_w", "employee_id", "device_id", "captured_at_us",
                                                  "clock_offset_us", "app_id", "url")}
    for i, f in enumerate(metas):
        # _w: the window's index; -1 a frame without windows (time only); -2 its upload time
        # (exemption only).
        rows_of = [(w, f.captured_at_us, app, url) for w, (app, url) in enumerate(f.windows)] or [
            (-1, f.captured_at_us, None, None)]
        if f.sent_at_us is not None:
            rows_of.append((-2, f.sent_at_us, None, None))
        for w, at, app, url in rows_of:
            cols["_f"].append(i)
            cols["_w"].append(w)
            cols["employee_id"].append(f.employee_id)
            cols["device_id"].append(f.device_id)
            cols["captured_at_us"].append(at)
            cols["clock_offset_us"].append(f.clock_offset_us)
            cols["app_id"].append(app[:cap] if app is not None else None)
            cols["url"].append(url[:cap] if url is not None else None)
    rows = pl.DataFrame(cols, schema={
        "_f": pl.UInt32, "_w": pl.Int32, "employee_id": pl.String, "device_id": pl.String,
        "captured_at_us": pl.Int64, "clock_offset_us": pl.Int64, "app_id": pl.String, "url": pl.String,
    }).with_columns(
        pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")),
        # Each row its own batch: a window never inherits another window's app or url.
        pl.int_range(pl.len(), dtype=pl.UInt64).cast(pl.String).cast(pl.Binary).alias("batch_id"),
        pl.lit("screenshot").alias("kind"), pl.lit(None, pl.String).alias("window_title"),
        *_blank_columns(),
    )
    reasons: list[str | None] = [None] * n

    def mark(lost: np.ndarray, reason: str) -> None:
        for i in np.flatnonzero(lost).tolist():
            reasons[i] = reasons[i] or reason

    try:
        for step in (rules.exemption, rules.pause):
            res = step(rows, ctx)
            mark(_lost(rows, res.frame, n), next(iter(res.dropped), step.name))
            rows = res.frame.filter(pl.col("_w") != -2)  # the upload time matters for exemption only
        windows = rows.filter(pl.col("_w") >= 0)
        if windows.height:
            kept, counts = run_steps([rules.allowlist], windows, ctx)
            lost = windows.join(kept.select("batch_id"), on="batch_id", how="anti")
            for reason, frames in _attribute(rules.allowlist, lost, list(counts.dropped), ctx).items():
                mark(np.bincount(frames, minlength=n) > 0, reason)
            windows = kept
    except Exception:  # noqa: BLE001 -- fail closed: nothing is known about these frames
        return [FrameVerdict(STEP_ERROR)] * n
    if windows.height:
        try:
            windows, _ = run_steps([rules.redact], windows, ctx)
        except Exception:  # noqa: BLE001 -- fail closed: no frame whose urls were not redacted
            mark(np.bincount(windows.get_column("_f").to_numpy(), minlength=n) > 0, UNREDACTABLE_URL)
            windows = windows.head(0)
        bad = [u for u in windows.get_column("url").drop_nulls().unique().to_list()
               if _still_finds(u, rules.token, url=True)]
        if bad:
            unredacted = pl.col("url").is_in(pl.Series(bad, dtype=pl.String).implode()).fill_null(False)
            mark(np.bincount(windows.filter(unredacted).get_column("_f").to_numpy(), minlength=n) > 0,
                 UNREDACTABLE_URL)
    enforced: dict[int, list[Window]] = {}
    for f, app, url in windows.sort("_f", "_w").select("_f", "app_id", "url").iter_rows():
        enforced.setdefault(f, []).append((app, url))
    return [FrameVerdict(r) if r else FrameVerdict(None, tuple(enforced.get(i, ()))) for i, r in enumerate(reasons)]


def _attribute(step: Step, lost: pl.DataFrame, reasons: list[str],
               ctx: BatchContext) -> dict[str, np.ndarray]:
    """The ``_f`` of the rows ``step`` dropped, by reason. A step counts its drops by reason but
    does not say which row had which; every window row is its own batch, so a row's verdict does
    not depend on the others and the dropped rows are split in halves, run again, until each part
    has one reason: a few step calls per reason, not one per row."""
    if lost.height == 0:
        return {}
    if len(reasons) <= 1 or lost.height == 1:
        return {reasons[0] if reasons else NOT_ALLOWLISTED: lost.get_column("_f").to_numpy()}
    out: dict[str, np.ndarray] = {}
    half = lost.height // 2
    for part in (lost.head(half), lost.tail(lost.height - half)):
        kept, counts = run_steps([step], part, ctx)
        again = part.join(kept.select("batch_id"), on="batch_id", how="anti")
        for reason, frames in _attribute(step, again, list(counts.dropped), ctx).items():
            out[reason] = np.concatenate([out[reason], frames]) if reason in out else frames
    return out


def pseudonyms(rules: DemoRules, pairs: Iterable[tuple[str, str]],
               ctx: BatchContext) -> dict[tuple[str, str], tuple[str, str]]:
    """(employee_id, device_id) -> (employee_key, device_key), by the pipeline's own step."""
    distinct = sorted(set(pairs))
    if not distinct:
        return {}
    frame = pl.DataFrame({"employee_id": [e for e, _ in distinct], "device_id": [d for _, d in distinct]},
                         schema={"employee_id": pl.String, "device_id": pl.String})
    out = rules.pseudonymise(frame, ctx).frame
    if {"employee_id", "device_id"} & set(out.columns):
        raise ValueError("the pseudonymisation step left raw ids")
    keys = out.select("employee_key", "device_key").rows()
    return dict(zip(distinct, keys, strict=True))


def parse_demonstration(payload: bytes) -> ParsedBatch:
    """A demonstration/v1 message as the pipeline's admission reads a batch: its header (every
    field but the events) with ``batch_id`` = the demonstration id, and the events located."""
    pb = parse_event_batch(payload, SUBJECT)
    return replace(pb, header={**pb.header, "batch_id": pb.header["demonstration_id"]})


@dataclass
class DemoOutcome:
    """What became of a micro-batch: records to publish, dead letters, and the counts."""

    accepted: list[tuple[int, int, OutRecord]] = field(default_factory=list)  # (partition, offset, record)
    deadletters: list[OutRecord] = field(default_factory=list)
    deadletter_reasons: Counter[str] = field(default_factory=Counter)
    demonstrations: Counter[str] = field(default_factory=Counter)  # accepted, or why not
    frames: Counter[tuple[str, str]] = field(default_factory=Counter)  # (manifest|message, outcome)
    events: BatchOutcome = field(default_factory=BatchOutcome)  # steps' counts of the events
    events_stored: int = 0

    def rounds(self, accepted_topic: Any, deadletter_topic: Any) -> list[list[tuple[Any, OutRecord]]]:
        """Send rounds: dead letters and each partition's first record, then each partition's
        next... (a partition's records strictly in source-offset order: a header before its frames)."""
        per_partition: dict[int, list[OutRecord]] = {}
        for p, _off, r in sorted(self.accepted, key=lambda a: (a[0], a[1])):
            per_partition.setdefault(p, []).append(r)
        rounds: list[list[tuple[Any, OutRecord]]] = [[(deadletter_topic, r) for r in self.deadletters]]
        depth = max((len(v) for v in per_partition.values()), default=0)
        for i in range(depth):
            batch = [(accepted_topic, v[i]) for v in per_partition.values() if i < len(v)]
            if i == 0:
                rounds[0] += batch
            else:
                rounds.append(batch)
        return [r for r in rounds if r]


@dataclass
class _Demo:
    """An admitted demonstration on its way through the rules."""

    m: SourceMessage
    pb: ParsedBatch
    offset_us: int
    frames: list[dict[str, Any]]
    verdicts: list[FrameVerdict] = field(default_factory=list)


class DemonstrationEnforcer:
    """Enforces micro-batches of ``<prefix>.demonstrations.raw`` (module docstring)."""

    def __init__(self, steps: Sequence[Step], *, partitions: int | None = None, max_frame_bytes: int = 8 << 20,
                 max_deadletter_bytes: int = 4 << 20, max_batch_events: int = 50_000,
                 max_clock_offset_us: int = 86_400_000_000, source_topic: str = "") -> None:
        """``steps``: the event pipeline's (the same instances); ``partitions``: the raw topic's
        (set: key and partition verified); ``max_frame_bytes``: the demonstration topics'
        message limit; ``max_deadletter_bytes``: the dead-letter topic's."""
        self.rules = DemoRules.from_steps(steps)
        self.pipe = BatchPipeline(self.rules.events, max_batch_events, partitions=partitions,
                                  max_payload_bytes=max_frame_bytes, max_clock_offset_us=max_clock_offset_us)
        self.partitions = partitions
        self.max_frame_bytes = max_frame_bytes
        self.budget = message_budget(max_frame_bytes)
        self.max_deadletter_bytes = max_deadletter_bytes
        self.max_clock_offset_us = max_clock_offset_us
        self.source_topic = source_topic

    # ------------------------------------------------------------------ the micro-batch

    def enforce(self, messages: Sequence[SourceMessage], ctx: BatchContext) -> DemoOutcome:
        """Decide every message of the micro-batch; never raises for bad input."""
        out = DemoOutcome()
        headers: list[SourceMessage] = []
        frames: list[tuple[SourceMessage, dict[str, bytes]]] = []
        for m in messages:
            h, problem = self._common_headers(m)
            if problem is not None:
                self._deadletter(out, m, *problem, part=h.get("ht-part"))
            elif h["ht-part"] == PART_HEADER:
                headers.append(m)
            elif h["ht-part"] == PART_FRAME:
                frames.append((m, h))
            else:
                self._deadletter(out, m, UNKNOWN_PART, "ht-part is neither demonstration nor frame", part=h["ht-part"])
        if headers:
            self._headers(headers, ctx, out)
        if frames:
            self._frames(frames, ctx, out)
        return out

    def _common_headers(self, m: SourceMessage) -> tuple[dict[str, bytes], tuple[str, str] | None]:
        h: dict[str, bytes] = {}
        for k, v in m.headers:
            if k in h and k.startswith("ht-"):
                return h, (INVALID_HEADERS, f"header {k} repeated")
            h[k] = v
        missing = [k for k in _HEADER_KEYS if k not in h]
        if missing:
            return h, (INVALID_HEADERS, f"missing {', '.join(missing)}")
        if len(h["ht-demo-id"]) != 16:
            return h, (INVALID_HEADERS, "ht-demo-id is not 16 bytes")
        if not _DIGITS.fullmatch(h[HEADER_SENT_AT]):
            return h, (INVALID_HEADERS, f"{HEADER_SENT_AT} is not a decimal number")
        return h, None

    def _deadletter(self, out: DemoOutcome, m: SourceMessage, reason: str, detail: str, events: int = 0, *,
                    part: bytes | None = PART_HEADER) -> None:
        """``m`` set aside. Only a demonstration header's copy keeps its bytes: anything else (a
        frame, or a message that does not say what it is) may be pixels the rules would refuse."""
        withheld = len(m.payload or b"") if part != PART_HEADER else None
        if withheld is not None:
            m = replace(m, payload=b"")
        r = deadletter_record(DeadLetter(m, reason, detail, events), self.max_deadletter_bytes, self.source_topic)
        if withheld is not None:
            r.headers.append(("ht-payload-withheld", str(withheld).encode()))
        out.deadletters.append(r)
        out.deadletter_reasons[f"{'frame' if part == PART_FRAME else 'demonstration'}_{reason}"] += 1

    # ------------------------------------------------------------------ header messages

    def _headers(self, msgs: list[SourceMessage], ctx: BatchContext, out: DemoOutcome) -> None:
        admission = BatchOutcome()
        admitted = self.pipe.admit(msgs, ctx.received_at_us, admission, parse=parse_demonstration)
        for dl in admission.deadletters:
            self._deadletter(out, dl.message, dl.reason, dl.detail, dl.events)
        demos: list[_Demo] = []
        for m, pb in admitted:
            hdr = pb.header
            if hdr["demonstration_id"] != dict(m.headers)["ht-demo-id"]:
                self._deadletter(out, m, DEMO_ID_MISMATCH, "the record's id is not ht-demo-id", pb.count)
                continue
            offset = message_clock_offset(m, pb, self.max_clock_offset_us) or 0
            problem = self._invalid(hdr, offset, ctx)
            if problem:
                self._deadletter(out, m, INVALID_DEMONSTRATION, problem, pb.count)
                continue
            demos.append(_Demo(m, pb, offset, list(hdr["frames"])))
        demos = self._judge_headers(demos, ctx, out)
        if not demos:
            return
        events = self._events(demos, ctx, out)
        metas: list[FrameMeta] = []
        for d in demos:
            h = d.pb.header
            for f in d.frames:
                metas.append(FrameMeta(h["employee_id"], h["device_id"], _us(f["captured_at_us"]), d.offset_us,
                                       tuple((w["app_id"], w["url"]) for w in f["windows"]), _us(h["sent_at_us"])))
        verdicts = iter(judge_frames(metas, self.rules, ctx))
        for d in demos:
            started, ended = _us(d.pb.header["started_at_us"]), _us(d.pb.header["ended_at_us"])
            d.verdicts = [FrameVerdict(INVALID_TIME) if not started <= _us(f["captured_at_us"]) <= ended else v
                          for f, v in zip(d.frames, verdicts, strict=False)]
        for d in demos:
            if (d.m.partition, d.m.offset) in events:
                self._publish_header(d, events[(d.m.partition, d.m.offset)], ctx, out)

    def _invalid(self, h: dict[str, Any], offset_us: int, ctx: BatchContext) -> str | None:
        """Why the header's own fields are out of range, or None."""
        started, ended, sent = _us(h["started_at_us"]), _us(h["ended_at_us"]), _us(h["sent_at_us"])
        skew, now = self.rules.max_future_skew_us, ctx.received_at_us
        if not EARLIEST_CAPTURE_US <= started <= ended <= sent + skew:
            return "start, end and send times out of order"
        if started + offset_us < now - self.rules.max_event_age_us or ended + offset_us > now + skew:
            return "times implausible on the broker's clock"
        s = h["screen"]
        if not (0 < s["width"] <= _MAX_PIXELS and 0 < s["height"] <= _MAX_PIXELS
                and math.isfinite(s["scale"]) and 0 < s["scale"] <= 16):
            return "screen out of range"
        if not _CONSENT.fullmatch(h["consent_version"]) or h["policy_version"] < 0:
            return "consent or policy version out of its format"
        for f in h["frames"]:
            if not (0 < f["width"] <= _MAX_PIXELS and 0 < f["height"] <= _MAX_PIXELS
                    and 0 < f["bytes"] <= self.max_frame_bytes and f["step"] >= 0):
                return "a manifest frame out of range"
        return None

    def _judge_headers(self, demos: list[_Demo], ctx: BatchContext, out: DemoOutcome) -> list[_Demo]:
        """The demonstrations whose header may be published (not exempt at start, end or upload;
        the instruction and labels redacted), with their redacted fields and pseudonyms."""
        if not demos:
            return []
        cap = self.rules.max_field_chars
        times = ("started_at_us", "ended_at_us", "sent_at_us")
        rows = pl.DataFrame({
            "_f": [i for i in range(len(demos)) for _ in times],
            "employee_id": [d.pb.header["employee_id"] for d in demos for _ in times],
            "device_id": [d.pb.header["device_id"] for d in demos for _ in times],
            "captured_at_us": [_us(d.pb.header[k]) for d in demos for k in times],
            "clock_offset_us": [d.offset_us for d in demos for _ in times],
            "window_title": [d.pb.header["instruction"][:cap] for d in demos for _ in times],
            "agent_version": [d.pb.header["agent_version"][:MAX_LABEL_CHARS] for d in demos for _ in times],
            "os": [d.pb.header["os"][:MAX_LABEL_CHARS] for d in demos for _ in times],
        }, schema={"_f": pl.UInt32, "employee_id": pl.String, "device_id": pl.String, "captured_at_us": pl.Int64,
                   "clock_offset_us": pl.Int64, "window_title": pl.String, "agent_version": pl.String,
                   "os": pl.String}).with_columns(
            pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")),
            pl.col("_f").cast(pl.String).cast(pl.Binary).alias("batch_id"),
            pl.lit("focus_change").alias("kind"), pl.lit(None, pl.String).alias("app_id"),
            pl.lit(None, pl.String).alias("url"), *_blank_columns(),
        )
        n = len(demos)
        res = self.rules.exemption(rows, ctx)
        exempt = _lost(rows, res.frame, n)
        try:
            redacted = self.rules.redact(rows, ctx).frame
        except Exception:  # noqa: BLE001 -- each on its own: one bad value must not hold back the others
            parts = [self._redact_alone(rows.filter(pl.col("_f") == i), ctx) for i in range(n)]
            redacted = pl.concat(parts)
        fields: dict[int, tuple[str, str, str]] = {}
        for f, title, version, os_ in redacted.unique("_f", keep="first").select(
                "_f", "window_title", "agent_version", "os").iter_rows():
            fields[f] = (title, version, os_)
        keys = pseudonyms(self.rules, ((d.pb.header["employee_id"], d.pb.header["device_id"]) for d in demos), ctx)
        kept = []
        for i, d in enumerate(demos):
            if exempt[i]:
                out.demonstrations[EXEMPT] += 1
                continue
            values = fields.get(i)
            if values is None or any(_still_finds(v, self.rules.token) for v in values):
                self._deadletter(out, d.m, UNREDACTABLE, "instruction or labels not redactable", d.pb.count)
                continue
            d.pb = replace(d.pb, header={**d.pb.header, "instruction": values[0], "agent_version": values[1],
                                         "os": values[2],
                                         "_keys": keys[(d.pb.header["employee_id"], d.pb.header["device_id"])]})
            kept.append(d)
        return kept

    def _redact_alone(self, rows: pl.DataFrame, ctx: BatchContext) -> pl.DataFrame:
        """One demonstration's header rows redacted, or none when the step fails on them (fails
        closed: the demonstration is dead-lettered as unredactable)."""
        try:
            return self.rules.redact(rows, ctx).frame
        except Exception:  # noqa: BLE001
            return rows.head(0)

    def _events(self, demos: list[_Demo], ctx: BatchContext,
                out: DemoOutcome) -> dict[tuple[int, int], tuple[pa.Table | None, dict[str, int]]]:
        """Each demonstration's enforced events (stored rows, None: none) and the reasons its
        events were dropped, by source (partition, offset). The demonstrations of the micro-batch
        are decoded and enforced together, in as many passes as one id repeats (a re-upload in
        the same micro-batch: its events are not duplicates of the first copy's)."""
        result: dict[tuple[int, int], tuple[pa.Table | None, dict[str, int]]] = {}
        for group in _generations(demos):
            self._enforce_events(group, ctx, out, result)
        return result

    def _enforce_events(self, group: list[_Demo], ctx: BatchContext, out: DemoOutcome,
                        result: dict[tuple[int, int], tuple[pa.Table | None, dict[str, int]]], *,
                        counted: bool = True) -> None:
        """The steps once over all of ``group``'s events. A failure is isolated demonstration by
        demonstration (dead-lettered: its reason, or step_error). A step counts its drops by
        reason, not by row: when the pass dropped rows for several reasons, a demonstration that
        lost rows runs alone once more for its own ``events_dropped`` (its rows are decided the
        same: the steps decide within a batch, and a demonstration is one)."""
        group = sorted(group, key=lambda d: (d.m.partition, d.m.offset))
        try:
            kept, counts = run_steps(self.rules.events, self.pipe.frame_of([(d.m, d.pb) for d in group]), ctx)
            table = to_stored(kept, ctx.received_at_us)
        except Exception as e:  # noqa: BLE001 -- isolate the culprit; fail closed for it
            if len(group) > 1:
                for d in group:
                    self._enforce_events([d], ctx, out, result, counted=counted)
            elif isinstance(e, DecodeError):
                self._deadletter(out, group[0].m, e.reason, e.detail, group[0].pb.count)
            else:
                self._deadletter(out, group[0].m, STEP_ERROR, type(e).__name__, group[0].pb.count)
            return
        if counted:
            out.events.add_counts(counts)
        rows = _by_source(table)
        reasons = list(counts.dropped)
        for d in group:
            key = (d.m.partition, d.m.offset)
            mine = rows.get(key)
            lost = d.pb.count - (mine.num_rows if mine is not None else 0)
            if lost and len(reasons) > 1 and len(group) > 1:
                self._enforce_events([d], ctx, out, result, counted=False)
                continue
            result[key] = (mine, {reasons[0]: lost} if lost else {})

    def _publish_header(self, d: _Demo, enforced: tuple[pa.Table | None, dict[str, int]], ctx: BatchContext,
                        out: DemoOutcome) -> None:
        table, events_dropped = enforced
        h = d.pb.header
        kept_frames = [(f, v) for f, v in zip(d.frames, d.verdicts, strict=True) if v.reason is None]
        frames_dropped = Counter(v.reason for v in d.verdicts if v.reason is not None)
        rows = 0 if table is None else table.num_rows
        if not rows and not kept_frames:
            out.demonstrations[EMPTY] += 1
            out.frames.update({("manifest", str(r)): n for r, n in frames_dropped.items()})
            return
        employee_key, device_key = h["_keys"]
        allowed = ctx.policy.allowed_apps
        demo = {
            "demonstration_id": h["demonstration_id"].hex(), "employee_key": employee_key, "device_key": device_key,
            "instruction": h["instruction"], "started_at_us": _us(h["started_at_us"]),
            "ended_at_us": _us(h["ended_at_us"]), "sent_at_us": _us(h["sent_at_us"]),
            "received_at_us": ctx.received_at_us, "consent_version": h["consent_version"],
            "policy_version": h["policy_version"], "agent_version": h["agent_version"], "os": h["os"],
            "cohort": str(h.get("cohort") or "")[:MAX_LABEL_CHARS],
            "screen": {"width": h["screen"]["width"], "height": h["screen"]["height"],
                       "scale": h["screen"]["scale"]},
            "apps": list(dict.fromkeys(a for a in h["apps"] if a in allowed)),
            "frames": [{
                "sha256": f["sha256"].hex(), "format": f["format"], "bytes": f["bytes"], "width": f["width"],
                "height": f["height"], "step": f["step"], "reason": f["reason"],
                "captured_at_us": _us(f["captured_at_us"]), "action_started_at_us": f["action_started_at_us"],
                "action_event_id": f["action_event_id"].hex() if f["action_event_id"] is not None else None,
                "windows": [{"app_id": app, "url": url, "x": w["x"], "y": w["y"], "width": w["width"],
                             "height": w["height"]} for (app, url), w in zip(v.windows, f["windows"], strict=True)],
                "filled": [{"x": b["x"], "y": b["y"], "width": b["width"], "height": b["height"]} for b in f["filled"]],
            } for f, v in kept_frames],
            "frames_dropped": dict(sorted(frames_dropped.items())),
            "events_dropped": dict(sorted(events_dropped.items())),
        }
        value = to_ipc(STORED_SCHEMA.empty_table() if table is None else table)
        headers = [("ht-part", PART_HEADER), ("ht-demo-id", h["demonstration_id"]),
                   ("ht-employee-key", employee_key.encode()), ("ht-device-key", device_key.encode()),
                   (HEADER_SOURCE_OFFSET, str(d.m.offset).encode()),
                   ("ht-demo", json.dumps(demo, separators=(",", ":"), ensure_ascii=False).encode())]
        key = employee_key.encode()
        if record_size(key, value, headers) > self.budget:
            self._deadletter(out, d.m, TOO_LARGE, f"accepted demonstration exceeds {self.budget} bytes", d.pb.count)
            return
        out.accepted.append((d.m.partition, d.m.offset, OutRecord(d.m.partition, key, value, headers)))
        out.demonstrations["accepted"] += 1
        out.frames[("manifest", "accepted")] += len(kept_frames)
        out.frames.update({("manifest", str(r)): n for r, n in frames_dropped.items()})
        out.events_stored += rows

    # ------------------------------------------------------------------ frame messages

    def _frames(self, msgs: list[tuple[SourceMessage, dict[str, bytes]]], ctx: BatchContext,
                out: DemoOutcome) -> None:
        judged: list[tuple[SourceMessage, dict[str, bytes]]] = []
        metas: list[FrameMeta] = []
        for m, h in msgs:
            problem = self._frame_problem(m, h)
            if problem is not None:
                self._deadletter(out, m, *problem, part=PART_FRAME)
                continue
            offset = message_clock_offset(m, None, self.max_clock_offset_us)
            if offset is None:
                self._deadletter(out, m, "clock_offset", "sender clock too far from the broker's", part=PART_FRAME)
                continue
            at = int(h["ht-captured-at-us"])
            now, skew = ctx.received_at_us, self.rules.max_future_skew_us
            if at < EARLIEST_CAPTURE_US or not now - self.rules.max_event_age_us <= at + offset <= now + skew:
                out.frames[("message", INVALID_TIME)] += 1
                continue
            judged.append((m, h))
            metas.append(FrameMeta((m.key or b"").decode(), h["ht-device-id"].decode(), at, offset,
                                   _windows(h["ht-windows"]), int(h[HEADER_SENT_AT])))
        verdicts = judge_frames(metas, self.rules, ctx)
        passed = [(m, h, f) for (m, h), f, v in zip(judged, metas, verdicts, strict=True) if v.reason is None]
        for v in verdicts:
            if v.reason is not None:
                out.frames[("message", v.reason)] += 1
        keys = pseudonyms(self.rules, ((f.employee_id, f.device_id) for _, _, f in passed), ctx)
        for m, h, f in passed:
            employee_key = keys[(f.employee_id, f.device_id)][0].encode()
            headers = [("ht-part", PART_FRAME), ("ht-demo-id", h["ht-demo-id"]), ("ht-employee-key", employee_key),
                       ("ht-sha256", h["ht-sha256"]), ("ht-format", h["ht-format"]),
                       (HEADER_SOURCE_OFFSET, str(m.offset).encode())]
            if record_size(employee_key, m.payload, headers) > self.budget:
                self._deadletter(out, m, TOO_LARGE, f"frame exceeds {self.budget} bytes", part=PART_FRAME)
                continue
            out.accepted.append((m.partition, m.offset, OutRecord(m.partition, employee_key, m.payload, headers)))
            out.frames[("message", "accepted")] += 1

    def _frame_problem(self, m: SourceMessage, h: dict[str, bytes]) -> tuple[str, str] | None:
        """Why a frame message cannot be judged or is not what it claims, or None."""
        if not m.key:
            return "missing_key", "message has no key"
        try:
            employee = m.key.decode()
        except UnicodeDecodeError:
            return "key_mismatch", "key is not UTF-8"
        problem = transport_problem(m, employee, self.partitions)
        if problem is not None:
            return problem
        if not isinstance(m.payload, bytes | bytearray) or not m.payload:
            return "empty_value", "frame without image bytes"
        missing = [k for k in _FRAME_KEYS if k not in h]
        if missing:
            return INVALID_HEADERS, f"missing {', '.join(missing)}"
        if (not _SHA256_HEX.fullmatch(h["ht-sha256"]) or h["ht-format"] not in MAGIC
                or not _DIGITS.fullmatch(h["ht-captured-at-us"])):
            return INVALID_HEADERS, "ht-sha256, ht-format or ht-captured-at-us out of its format"
        try:
            if not h["ht-device-id"].decode():
                return INVALID_HEADERS, "empty ht-device-id"
            _windows(h["ht-windows"])
        except (UnicodeDecodeError, ValueError):
            return INVALID_HEADERS, "ht-device-id or ht-windows out of its format"
        if hashlib.sha256(m.payload).hexdigest().encode() != h["ht-sha256"]:
            return SHA256_MISMATCH, "sha256 of the bytes is not ht-sha256"
        if not MAGIC[h["ht-format"]](bytes(m.payload[:12])):
            return FORMAT_MISMATCH, f"bytes are not {h['ht-format'].decode()}"
        return None


def _generations(demos: list[_Demo]) -> list[list[_Demo]]:
    """``demos`` in groups in which no demonstration id appears twice (usually one group)."""
    groups: list[tuple[set[bytes], list[_Demo]]] = []
    for d in demos:
        demo_id = d.pb.header["demonstration_id"]
        group = next((g for g in groups if demo_id not in g[0]), None)
        if group is None:
            group = (set(), [])
            groups.append(group)
        group[0].add(demo_id)
        group[1].append(d)
    return [g[1] for g in groups]


def _by_source(table: pa.Table) -> dict[tuple[int, int], pa.Table]:
    """Stored rows by source (partition, offset): zero-copy slices of the runs (the rows of a
    demonstration are contiguous; sorted first if they are not)."""
    if table.num_rows == 0:
        return {}
    p = table.column("source_partition").to_numpy()
    o = table.column("source_offset").to_numpy()
    change = np.flatnonzero((p[1:] != p[:-1]) | (o[1:] != o[:-1])) + 1
    bounds = [0, *change.tolist(), len(p)]
    runs = {(int(p[a]), int(o[a])): (a, b) for a, b in zip(bounds, bounds[1:], strict=False)}
    if len(runs) != len(bounds) - 1:  # a source in two runs: put its rows together
        order = np.lexsort((o, p))
        return _by_source(table.take(order))
    return {k: table.slice(a, b - a) for k, (a, b) in runs.items()}


def _windows(raw: bytes) -> tuple[Window, ...]:
    """``ht-windows``: JSON ``[[app_id|null, url|null], ...]``; ValueError otherwise."""
    v = json.loads(raw.decode())
    if not isinstance(v, list):
        raise ValueError("ht-windows is not a list")
    out: list[Window] = []
    for w in v:
        if not (isinstance(w, list) and len(w) == 2 and all(x is None or isinstance(x, str) for x in w)):
            raise ValueError("ht-windows entry is not [app_id, url]")
        out.append((w[0], w[1]))
    return tuple(out)


def export_counts(out: DemoOutcome) -> None:
    """A micro-batch's counts into the metrics (bounded labels: reasons of the steps and of this
    module)."""
    from handtrace.stream import metrics

    for outcome, n in out.demonstrations.items():
        metrics.DEMONSTRATIONS.labels(outcome).inc(n)
    for (part, outcome), n in out.frames.items():
        metrics.DEMONSTRATION_FRAMES.labels(part, outcome).inc(n)
    for reason, n in out.events.dropped.items():
        metrics.DEMONSTRATION_EVENTS.labels(reason).inc(n)
    metrics.DEMONSTRATION_EVENTS.labels("stored").inc(out.events_stored)
    for kind, n in out.events.redacted.items():
        if kind.startswith("truncated_"):
            metrics.FIELDS_TRUNCATED.labels(kind.removeprefix("truncated_")).inc(n)
        else:
            metrics.REDACTED.labels(kind).inc(n)
    for reason, n in out.deadletter_reasons.items():
        metrics.DEADLETTERS.labels(reason).inc(n)
