"""Hand-built training-data exports in the exact layout of docs/design/export.md, for the loader
check's tests and the exporter's (``write_export``; manifest hashes included).

A *task* is a JSONL line as a dict (task_id, instruction, ..., traj); ``sample_tasks`` makes
valid ones covering the whole vocabulary. ``write_export`` writes images (generated PNGs unless
given), fills each step's missing ``image_sha256`` from its image, writes the parts,
steps.parquet (from the tasks, or the caller's table) and, last, manifest.json with the sha256
and size of every file. Tests that want one thing broken change the tasks, the table, or a file
after writing, and call ``refresh_manifest`` when the manifest should stay consistent.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

T0 = datetime(2026, 3, 2, 9, 0, 0, tzinfo=UTC)

ARGS_TYPE = pa.struct([
    ("x", pa.float64()), ("y", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64()),
    ("clicks", pa.int32()), ("button", pa.string()), ("amount", pa.int32()), ("message", pa.string()),
    ("keys", pa.list_(pa.string())), ("presses", pa.int32()), ("seconds", pa.float64()),
])
FILLED_TYPE = pa.list_(pa.struct([("x", pa.int32()), ("y", pa.int32()), ("width", pa.int32()),
                                  ("height", pa.int32()), ("kind", pa.string())]))
TS = pa.timestamp("us", tz="UTC")
STEPS_SCHEMA = pa.schema([
    ("task_id", pa.string()), ("participant", pa.string()), ("cohort", pa.string()), ("os", pa.string()),
    ("step", pa.int32()), ("action", pa.string()), ("code", pa.string()), ("args", ARGS_TYPE),
    ("started_at", TS), ("ended_at", TS), ("app", pa.string()), ("title", pa.string()),
    ("url_origin", pa.string()), ("x", pa.float64()), ("y", pa.float64()), ("image", pa.string()),
    ("image_sha256", pa.string()), ("image_bytes", pa.int64()), ("frame_sha256", pa.string()),
    ("frame_filled", FILLED_TYPE), ("scrub_status", pa.string()), ("detector_version", pa.int32()),
    ("scrub_version", pa.int32()), ("tesseract_version", pa.string()),
])
"""steps.parquet as the contract lists it."""


def png(width: int = 64, height: int = 36, seed: int = 0) -> bytes:
    """A small PNG whose bytes depend on ``seed``."""
    im = Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, (seed * 13) % 256))
    im.putpixel((seed % width, 0), (255, 255, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def iso(t: datetime) -> str:
    return t.isoformat(timespec="microseconds").replace("+00:00", "Z")


def js(s: str) -> str:
    """A string literal as the reducer writes it (JSON, which Python's ``ast`` reads back)."""
    return json.dumps(s, ensure_ascii=False)


# (action, args, code) of a task that uses the whole vocabulary; terminate comes last
VOCABULARY_STEPS: list[tuple[str, dict[str, Any], str]] = [
    ("click", {"x": 0.1, "y": 0.2, "clicks": 1, "button": "left"}, "pyautogui.click(x=0.1, y=0.2)"),
    ("write", {"message": "hello •• world"}, 'pyautogui.write(message="hello •• world")'),
    ("doubleClick", {"x": 0.4313, "y": 0.0, "clicks": 2, "button": "left"}, "pyautogui.doubleClick(x=0.4313, y=0.0)"),
    ("dragTo", {"x": 0.1, "y": 0.2, "x2": 0.4, "y2": 1.0, "clicks": 1, "button": "left"},
     'pyautogui.moveTo(x=0.1, y=0.2)\npyautogui.dragTo(x=0.4, y=1.0, button="left")'),
    ("scroll", {"x": 0.5, "y": 0.5, "amount": -3}, "pyautogui.scroll(-3, x=0.5, y=0.5)"),
    ("hscroll", {"x": 0.0, "y": 0.0, "amount": 2}, "pyautogui.hscroll(2, x=0.0, y=0.0)"),
    ("rightClick", {"x": 0.01, "y": 0.02, "clicks": 1, "button": "right"}, "pyautogui.rightClick(x=0.01, y=0.02)"),
    ("press", {"keys": ["backspace"], "presses": 3}, 'pyautogui.press("backspace", presses=3)'),
    ("press", {"keys": ["enter"], "presses": 1}, 'pyautogui.press("enter")'),
    ("hotkey", {"keys": ["ctrl", "shift", "s"]}, 'pyautogui.hotkey("ctrl", "shift", "s")'),
    ("wait", {"seconds": 4.2}, "computer.wait(seconds=4.2)"),
    ("terminate", {}, 'computer.terminate(status="success")'),
]


def make_step(task_id: str, index: int, action: str, args: dict[str, Any], code: str, *, start: datetime,
              image: bool = True, title: str | None = "report.txt — Text Editor",
              url_origin: str | None = None, app: str | None = "org.gnome.TextEditor") -> dict[str, Any]:
    """One ``traj`` entry (image_sha256 left for ``write_export`` to fill)."""
    return {
        "index": index, "image": f"images/{task_id}/{index:04d}.png" if image else None, "image_sha256": None,
        "value": {"code": code, "action": action, "args": dict(args)},
        "app": app, "title": title, "url_origin": url_origin,
        "started_at": iso(start), "ended_at": iso(start + timedelta(milliseconds=150)),
        "frame_filled": [{"x": 1, "y": 2, "width": 30, "height": 8, "kind": "email"}] if index == 1 else [],
    }


def make_task(task_id: str, *, participant: str = "p-ada", instruction: str = "Rename the report",
              steps: Iterable[tuple[str, dict[str, Any], str]] = VOCABULARY_STEPS, start: datetime = T0,
              first_without_image: bool = True) -> dict[str, Any]:
    """A valid task: the given (action, args, code) steps 1.5 s apart; the first without a frame
    (as when none precedes it) when ``first_without_image``; the browser steps carry an origin."""
    traj = []
    for i, (action, args, code) in enumerate(steps):
        traj.append(make_step(task_id, i, action, args, code, start=start + timedelta(seconds=1.5 * i),
                              image=not (first_without_image and i == 0),
                              url_origin="https://intranet.example.com:8443" if i % 4 == 2 else None))
    return {
        "task_id": task_id, "instruction": instruction, "natural_language_task": instruction,
        "actual_task": instruction, "task_completed": True, "os": "linux",
        "screen": {"width": 64, "height": 36, "scale": 1.0}, "participant": participant,
        "started_at": traj[0]["started_at"], "ended_at": traj[-1]["ended_at"], "cohort": "eng",
        "apps": ["org.gnome.TextEditor"], "consent_version": "2026-01", "policy_version": "7", "traj": traj,
    }


def sample_tasks(n: int = 3) -> list[dict[str, Any]]:
    """``n`` valid tasks of two participants, in time order."""
    return [make_task(f"0190a000-0000-7000-8000-{i:012d}", participant=("p-ada", "p-bob")[i % 2],
                      start=T0 + timedelta(minutes=10 * i)) for i in range(n)]


def _ts(v: str | None) -> datetime | None:
    try:
        return None if v is None else datetime.fromisoformat(v)
    except ValueError:  # a test's broken time: null in the parquet
        return None


def steps_table(tasks: Iterable[Mapping[str, Any]], image_bytes: Mapping[str, int] | None = None) -> pa.Table:
    """steps.parquet's rows for ``tasks`` (one per step), as the contract lays them out."""
    rows = []
    sizes = image_bytes or {}
    for t in tasks:
        for s in t["traj"]:
            args = s["value"]["args"]
            image = s["image"]
            rows.append({
                "task_id": t["task_id"], "participant": t["participant"], "cohort": t.get("cohort"), "os": t.get("os"),
                "step": s["index"], "action": s["value"]["action"], "code": s["value"]["code"],
                "args": {k: args.get(k) for k in ARGS_TYPE.names},
                "started_at": _ts(s["started_at"]), "ended_at": _ts(s["ended_at"]), "app": s["app"],
                "title": s["title"], "url_origin": s["url_origin"], "x": args.get("x"), "y": args.get("y"),
                "image": image, "image_sha256": s["image_sha256"], "image_bytes": sizes.get(image) if image else None,
                "frame_sha256": hashlib.sha256(f"frame {t['task_id']} {s['index']}".encode()).hexdigest()
                if image else None,
                "frame_filled": s.get("frame_filled") or [],
                "scrub_status": ("scrubbed" if s.get("frame_filled") else "clean") if image else "none",
                "detector_version": 2 if image else None, "scrub_version": 1 if image else None,
                "tesseract_version": "tesseract 5.3.0" if image else None,
            })
    return pa.Table.from_pylist(rows, schema=STEPS_SCHEMA)


def file_entries(out: Path) -> dict[str, dict[str, Any]]:
    """``files`` of the manifest: every file but manifest.json (and the exporter's work folder)."""
    files = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_file() and rel != "manifest.json" and not rel.startswith(".handtrace-export/"):
            data = p.read_bytes()
            files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    return files


def refresh_manifest(out: Path) -> None:
    """Rewrite manifest.json's ``files`` from what is on disk now (the rest kept)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"] = file_entries(out)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


def write_parts(out: Path, tasks: list[dict[str, Any]], tasks_per_part: int = 2) -> None:
    """trajectories/part-NNNNN.jsonl, ``tasks_per_part`` lines each (old parts removed)."""
    d = out / "trajectories"
    d.mkdir(parents=True, exist_ok=True)
    for p in d.glob("part-*.jsonl"):
        p.unlink()
    for n, i in enumerate(range(0, len(tasks), tasks_per_part)):
        lines = "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tasks[i:i + tasks_per_part])
        (d / f"part-{n:05d}.jsonl").write_text(lines, encoding="utf-8")


def write_export(out: Path, tasks: list[dict[str, Any]], images: Mapping[str, bytes] | None = None, *,
                 tasks_per_part: int = 2, steps: Callable[[pa.Table], pa.Table] | None = None,
                 manifest: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Write ``tasks`` as an export in ``out``; returns the tasks as written (hashes filled).

    Args:
        out: The export folder (created).
        tasks: JSONL task dicts (not modified: a copy is written).
        images: Image bytes by relative path; every other step image is a generated PNG.
        tasks_per_part: Lines per trajectories part.
        steps: Changes the steps.parquet table before it is written.
        manifest: Top-level manifest fields to override (``counts`` is merged).
    """
    tasks = copy.deepcopy(tasks)
    out.mkdir(parents=True, exist_ok=True)
    given = dict(images or {})
    sizes: dict[str, int] = {}
    for t in tasks:
        for s in t["traj"]:
            if not s.get("image"):
                continue
            data = given.get(s["image"], png(seed=s["index"] + 7 * len(t["task_id"]) + ord(t["task_id"][-1])))
            p = out / s["image"]
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data)
            sizes[s["image"]] = len(data)
            if s.get("image_sha256") is None:
                s["image_sha256"] = hashlib.sha256(data).hexdigest()
    write_parts(out, tasks, tasks_per_part)
    table = steps_table(tasks, sizes)
    if steps is not None:
        table = steps(table)
    pq.write_table(table, out / "steps.parquet")
    n_steps = sum(len(t["traj"]) for t in tasks)
    n_images = sum(1 for t in tasks for s in t["traj"] if s.get("image"))
    doc: dict[str, Any] = {
        "format": "handtrace-trajectories", "format_version": 1, "schema_version": "demonstration/v1",
        "export_id": "0190b000-0000-7000-8000-000000000001", "created_at": iso(T0), "finished_at": iso(T0),
        "replaces": None, "filters": {}, "settings": {}, "policy_versions": ["7"], "consent_versions": ["2026-01"],
        "redaction": {"detector_version": 2, "scrub_version": 1, "tesseract_version": "tesseract 5.3.0",
                      "scrubbed": True},
        "counts": {"tasks": len(tasks), "steps": n_steps, "images": n_images, "frames_filled": 0,
                   "boxes_filled": 0, "frames_unscrubbable": 0, "steps_without_image": n_steps - n_images,
                   "demonstrations_skipped": 0},
        "participants": sorted({t["participant"] for t in tasks}),
        "demonstrations": [t["task_id"] for t in tasks],
    }
    for k, v in (manifest or {}).items():
        doc[k] = {**doc["counts"], **v} if k == "counts" else v
    doc["files"] = file_entries(out)
    (out / "manifest.json").write_text(json.dumps(doc, indent=1))
    return tasks


def read_tasks(out: Path) -> list[dict[str, Any]]:
    """Every task of an export, in part and line order."""
    return [json.loads(line) for p in sorted((out / "trajectories").glob("part-*.jsonl"))
            for line in p.read_text(encoding="utf-8").split("\n") if line.strip()]
