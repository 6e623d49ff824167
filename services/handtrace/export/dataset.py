"""Training-data export (issue #12, Deliver 2 and 4): complete demonstrations leave ClickHouse and
the frame store as trajectories in the AgentNet/OpenCUA layout, with scrubbed images, one row per
step in ``steps.parquet`` and a manifest with the sha256 of every file (docs/design/export.md is
the contract; docs/export.md the guide).

Batches, not events: a batch of demonstrations is read with three queries (demonstrations,
their events, their frames) as Arrow, reduced to steps by :func:`handtrace.export.actions.
reduce_actions` (polars), and written as one JSONL part and one staged parquet file. Python runs
per step only to hand frame bytes to the scrubbing pool and write image files.

Resumable: the plan (export id, time, filters, the ordered demonstration ids, the batch size) is
saved first; a batch is recorded done only after its files are in place (images, then the part,
renamed into place), so an interrupted export resumes at its first batch not done and ends with
the same files.

Withdrawals: a demonstration withdrawn, or any demonstration of a participant withdrawn (or
erased), is never exported, checked at plan time and again when each batch is read; exports made
before a withdrawal are *stale* (:func:`stale_exports`) until :func:`reissue` replaces them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from handtrace.core import pii
from handtrace.core.framestore import FrameStore, StoreError
from handtrace.core.ids import uuid7
from handtrace.core.settings import Settings
from handtrace.export.actions import reduce_actions

FORMAT = "handtrace-trajectories"
FORMAT_VERSION = 1
SCHEMA_VERSION = "demonstration/v1"
STATE_DIR = ".handtrace-export"
MANIFEST = "manifest.json"
STEPS = "steps.parquet"
_TS = pl.Datetime("us", "UTC")
_ISO = "%Y-%m-%dT%H:%M:%S%.6fZ"


class ExportError(RuntimeError):
    """The export cannot run or continue; the message says why and what to do."""


@dataclass(frozen=True)
class ExportFilters:
    """Which demonstrations an export contains. Stored as JSON in the plan, the manifest and
    ``dataset_exports`` (a reissue reads them back)."""

    since: str | None = None
    """ISO time: demonstrations started at or after it."""
    until: str | None = None
    """ISO time: demonstrations started before it."""
    apps: tuple[str, ...] = ()
    """Any of these apps seen during the demonstration (``demonstrations.apps``)."""
    cohorts: tuple[str, ...] = ()
    participants: tuple[str, ...] = ()
    """employee_key pseudonyms."""
    min_steps: int | None = None
    max_steps: int | None = None
    """Bounds on the steps of a trajectory (all steps: waits and terminate included)."""
    demonstrations: tuple[str, ...] = ()
    """Only these demonstration ids (a reissue keeps the original set)."""

    def __post_init__(self) -> None:
        for name in ("since", "until"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _parse_time(v, name))
        for name in ("demonstrations",):
            object.__setattr__(self, name, tuple(str(uuid.UUID(str(d))) for d in getattr(self, name)))
        for name in ("apps", "cohorts", "participants"):
            object.__setattr__(self, name, tuple(str(v) for v in getattr(self, name)))
        if self.min_steps is not None and self.max_steps is not None and self.min_steps > self.max_steps:
            raise ValueError(f"min_steps ({self.min_steps}) exceeds max_steps ({self.max_steps})")

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ExportFilters:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown filters: {', '.join(sorted(unknown))}")
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items()})  # type: ignore[arg-type]

    def only(self, demonstrations: Sequence[str]) -> ExportFilters:
        """The same filters restricted to ``demonstrations``."""
        return ExportFilters.from_json({**self.to_json(), "demonstrations": list(demonstrations)})


def _parse_time(v: str, name: str) -> str:
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{name}: {v!r} is not an ISO time (e.g. 2026-11-30 or 2026-11-30T09:00:00Z)") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class ExportProgress:
    """What :func:`export_dataset` reports while it runs."""

    batches_done: int
    batches_total: int
    tasks: int
    steps: int
    frames_done: int
    frames_in_batch: int


@dataclass
class ExportResult:
    export_id: str
    out: Path
    tasks: int
    steps: int
    images: int
    bytes: int
    frames_filled: int
    boxes_filled: int
    frames_unscrubbable: int
    participants: list[str]
    seconds: float
    batches_resumed: int
    ocr_cpu_seconds: float
    manifest: dict[str, Any] = field(repr=False)


# ------------------------------------------------------------------ SQL helpers


def _lit(s: str) -> str:
    """A ClickHouse string literal."""
    return "'" + s.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _lits(values: Sequence[str]) -> str:
    return ", ".join(_lit(v) for v in values)


def _not_withdrawn(db: str) -> str:
    return (f"employee_key NOT IN (SELECT employee_key FROM {db}.withdrawals WHERE kind = 'participant') "
            f"AND demonstration_id NOT IN (SELECT assumeNotNull(demonstration_id) FROM {db}.withdrawals "
            "WHERE kind = 'demonstration' AND demonstration_id IS NOT NULL)")


def _where(f: ExportFilters, db: str) -> str:
    cond = ["status = 'complete'", _not_withdrawn(db)]
    if f.since:
        cond.append(f"started_at >= parseDateTime64BestEffort({_lit(f.since)}, 6, 'UTC')")
    if f.until:
        cond.append(f"started_at < parseDateTime64BestEffort({_lit(f.until)}, 6, 'UTC')")
    if f.apps:
        cond.append(f"hasAny(apps, [{_lits(f.apps)}])")
    if f.cohorts:
        cond.append(f"cohort IN ({_lits(f.cohorts)})")
    if f.participants:
        cond.append(f"employee_key IN ({_lits(f.participants)})")
    if f.demonstrations:
        cond.append(f"demonstration_id IN ({_lits(f.demonstrations)})")
    return " AND ".join(cond)


def _arrow(client: Any, sql: str) -> pl.DataFrame:
    df = pl.from_arrow(client.query_arrow(sql))
    if not isinstance(df, pl.DataFrame):  # a table always converts to a frame
        raise TypeError(f"expected a table from ClickHouse, got {type(df).__name__}")
    return df


# ------------------------------------------------------------------ files


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False, sort_keys=False) + "\n").encode()


# ------------------------------------------------------------------ plan


@dataclass(frozen=True)
class _Plan:
    export_id: str
    created_at: str
    filters: ExportFilters
    demonstrations: list[str]
    batch_size: int
    scrub: bool
    actor: str
    replaces: str | None

    def batches(self) -> list[list[str]]:
        n = self.batch_size
        return [self.demonstrations[i:i + n] for i in range(0, len(self.demonstrations), n)]

    def to_json(self) -> dict[str, Any]:
        return {"export_id": self.export_id, "created_at": self.created_at, "filters": self.filters.to_json(),
                "demonstrations": self.demonstrations, "batch_size": self.batch_size, "scrub": self.scrub,
                "actor": self.actor, "replaces": self.replaces}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> _Plan:
        return cls(d["export_id"], d["created_at"], ExportFilters.from_json(d["filters"]), list(d["demonstrations"]),
                   int(d["batch_size"]), bool(d["scrub"]), str(d.get("actor") or ""), d.get("replaces"))


def _load_or_plan(client: Any, db: str, out: Path, filters: ExportFilters, *, batch_size: int, scrub: bool,
                  resume: bool, actor: str, replaces: str | None) -> tuple[_Plan, bool]:
    state = out / STATE_DIR
    plan_file = state / "plan.json"
    if plan_file.exists():
        _lock(state)
        plan = _Plan.from_json(json.loads(plan_file.read_text()))
        if not resume:
            raise ExportError(f"{out} holds an unfinished export ({plan.export_id}); continue it with --resume, "
                              "or choose another output directory")
        if plan.filters != filters or plan.scrub != scrub:
            raise ExportError(f"{out} holds an unfinished export with other filters or scrubbing "
                              f"({json.dumps(plan.filters.to_json())}, scrub={plan.scrub}); resume it with the same "
                              "options, or choose another output directory")
        return plan, True
    if (out / MANIFEST).exists():
        raise ExportError(f"{out} already holds a finished export ({MANIFEST}); choose another output directory")
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty and holds no export to resume; choose an empty or new directory")
    ids = _arrow(client, f"SELECT toString(demonstration_id) AS id FROM {db}.demonstrations FINAL "
                         f"WHERE {_where(filters, db)} ORDER BY started_at, demonstration_id")
    if ids.height == 0:
        raise ExportError("no complete demonstration matches the filters (withdrawn ones are never exported)")
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    plan = _Plan(str(uuid7()), now, filters, ids.get_column("id").to_list(), batch_size, scrub, actor, replaces)
    state.mkdir(parents=True, exist_ok=True)
    _lock(state)
    (out / "trajectories").mkdir(exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    _write_atomic(plan_file, _json_bytes(plan.to_json()))
    return plan, False


_held: dict[str, int] = {}


def _lock(state: Path) -> None:
    """One exporter per output directory: a second one (another terminal, a retry while the
    first still runs) is refused instead of interleaving files. Released when the process ends."""
    _unlock(state)  # held by an earlier, interrupted export of this process
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ExportError(f"another export is writing to {state.parent} right now; wait for it, or stop it and "
                          "--resume") from None
    _held[str(state)] = fd


def _unlock(state: Path) -> None:
    fd = _held.pop(str(state), None)
    if fd is not None:
        os.close(fd)


# ------------------------------------------------------------------ one batch


_EVENT_COLS = ("captured_at, kind, x, y, button, pressed, scroll_dx, scroll_dy, key_code, modifiers, text, "
               "text_masked, app_id, window_title, url")
_ORIGIN = r"^([A-Za-z][A-Za-z0-9+.\-]*)://(?:[^/?#]*@)?([^/?#@\\]*)"  # userinfo up to the authority's last @


def _read_batch(client: Any, db: str, ids: list[str]) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    idl = _lits(ids)
    demos = _arrow(client, f"""
        SELECT toString(demonstration_id) AS demonstration_id, employee_key, cohort, instruction, os,
               started_at, ended_at, screen_width, screen_height, screen_scale, apps, consent_version,
               policy_version
        FROM {db}.demonstrations FINAL
        WHERE status = 'complete' AND demonstration_id IN ({idl}) AND {_not_withdrawn(db)}
        ORDER BY started_at, demonstration_id""")  # the plan's order: tasks keep it in every run
    events = _arrow(client, f"""
        SELECT toString(demonstration_id) AS demonstration_id, {_EVENT_COLS}
        FROM {db}.demonstration_events FINAL
        WHERE demonstration_id IN ({idl})
        ORDER BY demonstration_id, captured_at, event_id""")
    frames = _arrow(client, f"""
        SELECT toString(demonstration_id) AS demonstration_id, step, sha256, object_key, format, width, height,
               captured_at, reason, action_started_at
        FROM {db}.frames FINAL
        WHERE demonstration_id IN ({idl})
        ORDER BY demonstration_id, step""")
    kept = demos.get_column("demonstration_id").to_list()
    return demos, events.filter(pl.col("demonstration_id").is_in(kept)), frames.filter(
        pl.col("demonstration_id").is_in(kept))


def _context(acts: pl.DataFrame, events: pl.DataFrame) -> pl.DataFrame:
    """The window title and URL origin of each step: the last event at or before its start that
    carried either (one as-of join over the batch)."""
    ctx = (events.filter(pl.col("window_title").is_not_null() | pl.col("url").is_not_null())
           .select("demonstration_id", pl.col("captured_at").cast(_TS).alias("_t"), "window_title", "url")
           .sort("_t"))
    left = acts.with_row_index("_row").sort("started_at")
    joined = left.join_asof(ctx, left_on="started_at", right_on="_t", by="demonstration_id", strategy="backward",
                           check_sortedness=False)  # both sorted by time just above
    return joined.sort("_row").select(pl.col("window_title").alias("title"), url_origin("url").alias("url_origin"))


def url_origin(col: str) -> pl.Expr:
    """``scheme://host[:port]`` of the URLs in ``col``, lower case; credentials, path, query and
    fragment never kept; null when the value has no ``scheme://host``."""
    parts = pl.col(col).str.extract_groups(_ORIGIN)
    return (pl.when(parts.struct.field("1").is_not_null() & (parts.struct.field("2") != ""))
            .then(pl.format("{}://{}", parts.struct.field("1").str.to_lowercase(),
                            parts.struct.field("2").str.to_lowercase()))
            .otherwise(None))


def _steps(demos: pl.DataFrame, events: pl.DataFrame, frames: pl.DataFrame, s: Settings,
           f: ExportFilters) -> pl.DataFrame:
    screens = demos.select("demonstration_id", "screen_width", "screen_height")
    ev = events.with_columns(pl.col("captured_at").cast(_TS))
    acts = reduce_actions(ev.drop("window_title", "url"), frames, screens, s.export)
    acts = pl.concat([acts, _context(acts, ev)], how="horizontal")
    n = acts.group_by("demonstration_id").len("_n")
    keep = pl.lit(True)
    if f.min_steps is not None:
        keep = keep & (pl.col("_n") >= f.min_steps)
    if f.max_steps is not None:
        keep = keep & (pl.col("_n") <= f.max_steps)
    acts = acts.join(n.filter(keep), on="demonstration_id", how="semi")
    order = demos.select("demonstration_id", "employee_key", "cohort", "os").with_row_index("_task")
    fr = frames.select("demonstration_id", pl.col("sha256").alias("frame_sha256"), "object_key", "format").unique(
        ["demonstration_id", "frame_sha256"], keep="first", maintain_order=True)
    return (acts.join(order, on="demonstration_id", how="inner")
            .join(fr, on=["demonstration_id", "frame_sha256"], how="left")
            .sort("_task", "step"))


@dataclass
class _FrameOut:
    """What became of one stored frame (no pixels: they are written as they arrive)."""

    status: str
    filled: list[dict[str, Any]]
    detector_version: int | None
    scrub_version: int | None
    tesseract_version: str | None
    image_sha256: str | None = None
    image_bytes: int | None = None
    cpu_seconds: float = 0.0


FETCH_THREADS = 4
"""Frame objects fetched concurrently (an S3 store is latency-bound; at most twice this many
fetched frames wait in memory)."""


def _fetch(store: FrameStore, key: str, sha: str) -> bytes | None:
    try:
        data = store.get(key)
    except (StoreError, KeyError, FileNotFoundError):
        return None
    return data if hashlib.sha256(data).hexdigest() == sha else None


def _frame_bytes(store: FrameStore, keys: list[tuple[str, str]]) -> Iterator[bytes | None]:
    """The stored bytes of each (object_key, sha256) in order, None when missing or not matching
    its hash; fetched ahead by a few threads."""
    window = 2 * FETCH_THREADS
    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="export-fetch") as pool:
        pending: deque[Future[bytes | None]] = deque()
        for key, sha in keys:
            pending.append(pool.submit(_fetch, store, key, sha))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _outcomes(store: FrameStore, keys: list[tuple[str, str]], *, scrub: bool,
              workers: int) -> Iterator[tuple[bytes | None, _FrameOut]]:
    """(image to export or None, what became of it) per (object_key, sha256), in order, one at
    a time: a batch never holds all its frames in memory. An image left as stored keeps its sha."""
    from handtrace.export import scrub as scrubber

    if not scrub:
        for (_key, sha), data in zip(keys, _frame_bytes(store, keys), strict=True):
            if data is None:
                yield None, _FrameOut("missing", [], None, None, None)
            else:
                yield data, _FrameOut("skipped", [], None, None, None, sha, len(data))
        return
    missing: set[int] = set()

    def present() -> Iterator[bytes]:
        for i, data in enumerate(_frame_bytes(store, keys)):
            if data is None:
                missing.add(i)
                yield b""  # decodes to nothing: reported unscrubbable, then marked missing below
            else:
                yield data

    for (i, o), (_key, sha) in zip(enumerate(scrubber.scrub_many(present(), workers=workers)), keys, strict=True):
        if i in missing:
            yield None, _FrameOut("missing", [], None, None, None)
        elif not o.ok or o.image is None:
            yield None, _FrameOut("unscrubbable", [], o.detector_version, o.scrub_version, o.tesseract_version,
                                  cpu_seconds=o.cpu_seconds)
        else:
            digest = hashlib.sha256(o.image).hexdigest() if o.filled else sha  # clean: returned byte for byte
            yield o.image, _FrameOut("scrubbed" if o.filled else "clean", o.filled, o.detector_version,
                                     o.scrub_version, o.tesseract_version, digest, len(o.image), o.cpu_seconds)


_FILLED = pl.List(pl.Struct({"x": pl.Int32, "y": pl.Int32, "width": pl.Int32, "height": pl.Int32,
                             "kind": pl.String}))
_OUT_SCHEMA: dict[str, Any] = {"object_key": pl.String, "scrub_status": pl.String, "frame_filled": _FILLED,
               "detector_version": pl.Int32, "scrub_version": pl.Int32, "tesseract_version": pl.String,
               "_sha": pl.String, "_bytes": pl.Int64}


def _image_col() -> pl.Expr:
    return pl.format("images/{}/{}.{}", pl.col("demonstration_id"), pl.col("step").cast(pl.String).str.zfill(4),
                     pl.coalesce(pl.col("format"), pl.lit("png")))


def _write_batch(out: Path, k: int, steps: pl.DataFrame, demos: pl.DataFrame, store: FrameStore, *,
                 scrub: bool, workers: int, on_frame: Callable[[int, int], None]) -> dict[str, Any]:
    """Images, then ``trajectories/part-k.jsonl``, then the staged steps parquet; returns the
    batch's record (files with hashes, counts) for ``done-k.json``."""
    state = out / STATE_DIR
    for task in demos.get_column("demonstration_id").to_list():  # a redone batch starts clean
        shutil.rmtree(out / "images" / task, ignore_errors=True)
    steps = steps.with_columns(_image_col().alias("_path"))
    with_frame = steps.filter(pl.col("object_key").is_not_null())
    targets = with_frame.group_by("object_key", maintain_order=True).agg(
        pl.first("frame_sha256"), pl.col("_path"))
    keys = list(targets.select("object_key", "frame_sha256").iter_rows())
    paths: list[list[str]] = targets.get_column("_path").to_list()
    for task in with_frame.get_column("demonstration_id").unique().to_list():
        (out / "images" / task).mkdir(parents=True, exist_ok=True)
    metas: list[_FrameOut] = []
    for n, (image, meta) in enumerate(_outcomes(store, keys, scrub=scrub, workers=workers)):
        if image is not None:
            for rel in paths[n]:
                (out / rel).write_bytes(image)
        metas.append(meta)
        on_frame(n + 1, len(keys))
    outs = pl.DataFrame({
        "object_key": [key for key, _ in keys], "scrub_status": [m.status for m in metas],
        "frame_filled": [m.filled for m in metas], "detector_version": [m.detector_version for m in metas],
        "scrub_version": [m.scrub_version for m in metas], "tesseract_version": [m.tesseract_version for m in metas],
        "_sha": [m.image_sha256 for m in metas], "_bytes": [m.image_bytes for m in metas],
    }, schema=_OUT_SCHEMA)
    steps = steps.join(outs, on="object_key", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("_sha").is_not_null()).then(pl.col("_path")).alias("image"),
        pl.col("_sha").alias("image_sha256"), pl.col("_bytes").alias("image_bytes"),
        pl.col("scrub_status").fill_null("none"), pl.col("frame_filled").fill_null([]),
    ).drop("_path", "_sha", "_bytes")
    images = steps.filter(pl.col("image").is_not_null())
    files: dict[str, dict[str, Any]] = {
        rel: {"sha256": sha, "bytes": size}
        for rel, sha, size in images.select("image", "image_sha256", "image_bytes").iter_rows()}
    part = f"trajectories/part-{k:05d}.jsonl"
    data = _jsonl(steps, demos)
    _write_atomic(out / part, data)
    files[part] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    table = _steps_table(steps)
    tmp = state / f".steps-{k:05d}.parquet"
    pq.write_table(table, tmp)
    tmp.replace(state / f"steps-{k:05d}.parquet")
    tasks = steps.get_column("demonstration_id").unique(maintain_order=True).to_list()
    exported = demos.filter(pl.col("demonstration_id").is_in(tasks))
    return {
        "batch": k, "files": files, "tasks": tasks,
        "participants": sorted(set(exported.get_column("employee_key").to_list())),
        "policy_versions": sorted(set(exported.get_column("policy_version").to_list())),
        "consent_versions": sorted(set(exported.get_column("consent_version").to_list())),
        "counts": {
            "tasks": len(tasks), "steps": steps.height, "images": images.height, "frames": len(metas),
            "frames_filled": sum(1 for m in metas if m.filled), "boxes_filled": sum(len(m.filled) for m in metas),
            "frames_unscrubbable": sum(1 for m in metas if m.status == "unscrubbable"),
            "frames_missing": sum(1 for m in metas if m.status == "missing"),
            "steps_without_image": steps.height - images.height,
            "demonstrations_skipped": demos.height - len(tasks),
        },
        "ocr_cpu_seconds": round(sum(m.cpu_seconds for m in metas), 3),
        "tesseract_versions": sorted({m.tesseract_version for m in metas if m.tesseract_version}),
    }


def _iso(c: str) -> pl.Expr:
    return pl.col(c).cast(_TS).dt.strftime(_ISO)


def _jsonl(steps: pl.DataFrame, demos: pl.DataFrame) -> bytes:
    """One line per task, built as polars structs and encoded by polars."""
    step = pl.struct(
        pl.col("step").alias("index"), "image", "image_sha256",
        pl.struct("code", "action", "args").alias("value"),
        pl.col("app_id").alias("app"), "title", "url_origin",
        _iso("started_at").alias("started_at"), _iso("ended_at").alias("ended_at"),
        "frame_filled", "scrub_status",
    ).alias("step")
    traj = steps.select("demonstration_id", step).group_by("demonstration_id", maintain_order=True).agg(
        pl.col("step").alias("traj"))
    task = demos.join(traj, on="demonstration_id", how="inner", maintain_order="right").select(
        pl.struct(
            pl.col("demonstration_id").alias("task_id"), "instruction",
            pl.col("instruction").alias("natural_language_task"), pl.col("instruction").alias("actual_task"),
            pl.lit(True).alias("task_completed"), "os",
            pl.struct(pl.col("screen_width").alias("width"), pl.col("screen_height").alias("height"),
                      pl.col("screen_scale").cast(pl.Float64).round(4).alias("scale")).alias("screen"),
            pl.col("employee_key").alias("participant"), "cohort",
            _iso("started_at").alias("started_at"), _iso("ended_at").alias("ended_at"),
            "apps", "consent_version", "policy_version", "traj",
        ).struct.json_encode().alias("line"))
    lines = task.get_column("line").to_list()
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _steps_table(steps: pl.DataFrame) -> pa.Table:
    return steps.select(
        pl.col("demonstration_id").alias("task_id"), pl.col("employee_key").alias("participant"), "cohort", "os",
        pl.col("step").cast(pl.Int32), "action", "code", "args", pl.col("started_at").cast(_TS),
        pl.col("ended_at").cast(_TS), pl.col("app_id").alias("app"), "title", "url_origin",
        pl.col("x").cast(pl.Float64), pl.col("y").cast(pl.Float64), "image", "image_sha256", "image_bytes",
        "frame_sha256", "frame_filled", "scrub_status", "detector_version", "scrub_version", "tesseract_version",
    ).to_arrow()


# ------------------------------------------------------------------ the export


def _check_scrub_possible(scrub: bool, settings: Settings) -> None:
    if not scrub:
        if settings.export.require_scrub:
            raise ExportError("exports must be scrubbed (HANDTRACE_EXPORT__REQUIRE_SCRUB=true, the default): "
                              "drop --no-scrub")
        return
    if shutil.which("tesseract") is None:
        raise ExportError("scrubbing needs Debian's tesseract-ocr (apt-get install tesseract-ocr); "
                          "frames are never exported unscrubbed")


def export_dataset(client: Any, store: FrameStore, out: Path, filters: ExportFilters, *, settings: Settings,
                   scrub: bool = True, workers: int = 1, batch_size: int = 50, resume: bool = False,
                   actor: str = "", replaces: str | None = None,
                   progress: Callable[[ExportProgress], None] | None = None) -> ExportResult:
    """Export the complete, not withdrawn demonstrations matching ``filters`` to ``out``
    (module docstring; layout in docs/design/export.md). Raises :class:`ExportError`."""
    if batch_size < 1:
        raise ExportError("batch size must be at least 1")
    _check_scrub_possible(scrub, settings)
    t0 = time.perf_counter()
    db = settings.clickhouse.database
    out = Path(out)
    plan, resumed = _load_or_plan(client, db, out, filters, batch_size=batch_size, scrub=scrub, resume=resume,
                                  actor=actor, replaces=replaces)
    state = out / STATE_DIR
    batches = plan.batches()
    records: list[dict[str, Any]] = []
    tasks = steps_n = 0
    skipped = 0
    for k, ids in enumerate(batches):
        done_file = state / f"done-{k:05d}.json"
        if done_file.exists():
            rec = json.loads(done_file.read_text())
            skipped += 1
        else:
            demos, events, frames = _read_batch(client, db, ids)
            steps = _steps(demos, events, frames, settings, plan.filters)

            def on_frame(d: int, total: int, k: int = k, tasks: int = tasks, steps_n: int = steps_n) -> None:
                if progress is not None:
                    progress(ExportProgress(k, len(batches), tasks, steps_n, d, total))

            rec = _write_batch(out, k, steps, demos, store, scrub=plan.scrub, workers=workers, on_frame=on_frame)
            _write_atomic(done_file, _json_bytes(rec))
        records.append(rec)
        tasks += rec["counts"]["tasks"]
        steps_n += rec["counts"]["steps"]
        if progress is not None:
            progress(ExportProgress(k + 1, len(batches), tasks, steps_n, 0, 0))
    manifest = _finish(client, db, out, plan, records, settings)
    c = manifest["counts"]
    return ExportResult(plan.export_id, out, c["tasks"], c["steps"], c["images"], manifest["bytes"],
                        c["frames_filled"], c["boxes_filled"], c["frames_unscrubbable"], manifest["participants"],
                        time.perf_counter() - t0, skipped if resumed else 0,
                        sum(r.get("ocr_cpu_seconds", 0.0) for r in records), manifest)


def _finish(client: Any, db: str, out: Path, plan: _Plan, records: list[dict[str, Any]],
            settings: Settings) -> dict[str, Any]:
    state = out / STATE_DIR
    if not any(r["counts"]["tasks"] for r in records):
        raise ExportError("no demonstration matched the filters after reduction (see --min-steps/--max-steps); "
                          f"nothing exported; remove {out} before trying other filters")
    tables = [pq.read_table(state / f"steps-{r['batch']:05d}.parquet") for r in records if r["counts"]["tasks"]]
    schema = tables[0].schema
    tmp = out / f".{STEPS}.tmp"
    with pq.ParquetWriter(tmp, schema) as w:
        for t in tables:
            w.write_table(t.cast(schema))
    tmp.replace(out / STEPS)
    files: dict[str, dict[str, Any]] = {}
    for r in records:
        files.update(r["files"])
    files[STEPS] = {"sha256": _sha256(out / STEPS), "bytes": (out / STEPS).stat().st_size}
    counts: dict[str, int] = {}
    for r in records:
        for key, v in r["counts"].items():
            counts[key] = counts.get(key, 0) + int(v)
    participants = sorted({p for r in records for p in r["participants"]})
    demonstrations = [t for r in records for t in r["tasks"]]
    tess = sorted({t for r in records for t in r.get("tesseract_versions", [])})
    from handtrace.export import scrub as scrubber

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "schema_version": SCHEMA_VERSION,
        "export_id": plan.export_id, "created_at": plan.created_at,
        "finished_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        "actor": plan.actor, "replaces": plan.replaces,
        "filters": plan.filters.to_json(), "settings": settings.export.model_dump(mode="json"),
        "policy_versions": sorted({v for r in records for v in r["policy_versions"]}),
        "consent_versions": sorted({v for r in records for v in r["consent_versions"]}),
        "redaction": {"scrubbed": plan.scrub, "detector_version": pii.DETECTOR_VERSION,
                      "scrub_version": scrubber.SCRUB_VERSION if plan.scrub else None,
                      "tesseract_version": ", ".join(tess) or None},
        "counts": counts,
        "participants": participants, "demonstrations": demonstrations,
        "files": dict(sorted(files.items())),
    }
    manifest["bytes"] = sum(int(f["bytes"]) for f in files.values())
    body = _json_bytes(manifest)
    _write_atomic(out / MANIFEST, body)
    _record(client, db, out, plan, manifest, hashlib.sha256(body).hexdigest())
    _unlock(state)
    shutil.rmtree(state)
    return manifest


def _record(client: Any, db: str, out: Path, plan: _Plan, m: dict[str, Any], manifest_sha: str) -> None:
    c = m["counts"]

    def ts(v: str) -> datetime:
        return datetime.fromisoformat(v.replace("Z", "+00:00"))

    row = [uuid.UUID(plan.export_id), ts(plan.created_at), ts(m["finished_at"]), plan.actor, str(out.resolve()),
           json.dumps(plan.filters.to_json(), sort_keys=True), FORMAT_VERSION, m["participants"],
           [uuid.UUID(d) for d in m["demonstrations"]], c["tasks"], c["steps"], c["images"], m["bytes"],
           c["frames_filled"], c["frames_unscrubbable"], uuid.UUID(plan.replaces) if plan.replaces else None,
           manifest_sha]
    client.insert(f"{db}.dataset_exports", [row], column_names=[
        "export_id", "created_at", "finished_at", "actor", "output", "filters", "format_version", "participants",
        "demonstration_ids", "tasks", "steps", "images", "bytes", "frames_filled", "frames_unscrubbable",
        "replaces", "manifest_sha256"])


# ------------------------------------------------------------------ withdrawals, staleness, reissue


def withdraw(client: Any, database: str, *, employee_key: str | None = None, demonstration_id: str | None = None,
             actor: str, reason: str) -> str:
    """Record that a participant (``employee_key``) or one demonstration is withdrawn from
    training data. Every later export leaves them out; exports containing them become stale.
    Returns the withdrawal id."""
    if (employee_key is None) == (demonstration_id is None):
        raise ExportError("withdraw either a participant or a demonstration")
    if not actor.strip() or not reason.strip():
        raise ExportError("a withdrawal needs an actor and a reason (they are kept with it)")
    if demonstration_id is not None:
        did = str(uuid.UUID(demonstration_id))
        found = client.query(f"SELECT employee_key FROM {database}.demonstrations WHERE demonstration_id = "
                             f"{_lit(did)} LIMIT 1").result_rows
        if not found:
            raise ExportError(f"no demonstration {did}")
        key, kind, demo = str(found[0][0]), "demonstration", uuid.UUID(did)
    else:
        key, kind, demo = str(employee_key), "participant", None
    wid = uuid7()
    client.insert(f"{database}.withdrawals",
                  [[wid, kind, key, demo, datetime.now(UTC), actor.strip(), reason.strip()]],
                  column_names=["withdrawal_id", "kind", "employee_key", "demonstration_id", "withdrawn_at",
                                "actor", "reason"])
    return str(wid)


@dataclass
class StaleExport:
    export_id: str
    output: str
    finished_at: datetime
    participants: list[str]
    """Withdrawn participants it contains."""
    demonstrations: list[str]
    """Withdrawn demonstrations it contains (of participants not withdrawn as a whole)."""


def list_exports(client: Any, database: str) -> pl.DataFrame:
    """Every recorded export, newest first, with who replaced it (if any)."""
    return _arrow(client, f"""
        SELECT toString(e.export_id) AS export_id, e.created_at, e.finished_at, e.actor, e.output, e.filters,
               e.tasks, e.steps, e.images, e.bytes, length(e.participants) AS participants,
               if(isNull(e.replaces), '', toString(e.replaces)) AS replaces,
               ifNull(r.by, '') AS replaced_by
        FROM {database}.dataset_exports AS e FINAL
        LEFT JOIN (SELECT toString(assumeNotNull(replaces)) AS old, any(toString(export_id)) AS by
                   FROM {database}.dataset_exports FINAL WHERE replaces IS NOT NULL GROUP BY old) AS r
          ON toString(e.export_id) = r.old
        ORDER BY e.finished_at DESC""")


def stale_exports(client: Any, database: str) -> list[StaleExport]:
    """Exports that contain a withdrawn participant or demonstration and are not yet replaced."""
    rows = client.query(f"""
        SELECT toString(e.export_id), e.output, e.finished_at,
               arrayFilter(p -> has(wp, p), e.participants) AS gone_people,
               arrayMap(d -> toString(d), arrayFilter(d -> has(wd, d), e.demonstration_ids)) AS gone_demos
        FROM {database}.dataset_exports AS e FINAL
        CROSS JOIN (SELECT groupUniqArrayIf(employee_key, kind = 'participant') AS wp,
                           groupUniqArrayIf(assumeNotNull(demonstration_id), kind = 'demonstration') AS wd
                    FROM {database}.withdrawals) AS w
        WHERE (length(gone_people) > 0 OR length(gone_demos) > 0)
          AND e.export_id NOT IN (SELECT assumeNotNull(replaces) FROM {database}.dataset_exports
                                  WHERE replaces IS NOT NULL)
        ORDER BY e.finished_at""").result_rows
    return [StaleExport(str(r[0]), str(r[1]), r[2], list(r[3]), list(r[4])) for r in rows]


def reissue(client: Any, store: FrameStore, export_id: str, out: Path, *, settings: Settings,
            **kw: Any) -> ExportResult:
    """A replacement of export ``export_id`` without what was withdrawn since: the same filters,
    restricted to the demonstrations it contained; withdrawn ones are left out by the plan."""
    db = settings.clickhouse.database
    eid = str(uuid.UUID(export_id))
    rows = client.query(f"SELECT filters, arrayMap(d -> toString(d), demonstration_ids) "
                        f"FROM {db}.dataset_exports FINAL WHERE export_id = {_lit(eid)}").result_rows
    if not rows:
        raise ExportError(f"no export {eid} is recorded (handtrace dataset list)")
    filters = ExportFilters.from_json(json.loads(rows[0][0])).only(rows[0][1])
    return export_dataset(client, store, out, filters, settings=settings, replaces=eid, **kw)
