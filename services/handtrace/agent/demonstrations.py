"""Demonstrations on the laptop (issue #11): task recordings the employee starts with an
instruction, stops, reviews (list / show / trim / delete) and submits. Nothing of a recording
leaves the laptop before submit (agent/demo_upload.py sends only ``submitted`` ones).

What is recorded is exactly what passive capture would keep, *before* sampling: the Agent hands
the recorder the events its tick kept after the local policy (pause, exemption, allowlist,
masking, password fields) -- the same objects, so a demonstration never holds what passive
capture would refuse. Pause or exemption during a recording: the recorder is suspended from the
pause start (anything on disk from then on is removed, the frame ring is reset) and nothing is
recorded until capture resumes; an exemption ends the recording at its effective time.

Actions and frames: kept events are fed to an action segmenter (agent/actions.py); at each
action start the frame capturer (agent/frames.py) gives the last distinct frame grabbed strictly
before it; at stop one ``end`` frame. Both are injected (factories), so this module runs and is
tested without a display.

On disk, under ``demo.dir`` (directory 0700, files 0600), one directory per recording named by
its id (32 hex):

- ``meta.json``: instruction, identity, times, status, steps (once stopped) -- rewritten
  atomically (temp file, fsync, rename, fsync of the directory);
- ``events.jsonl``: one JSON object per kept event, appended at every tick (flushed at once: a
  kill -9 loses nothing already handed over; fsync every few seconds against power loss);
- ``steps.jsonl``: while recording, one line per action (folded into meta.json at stop);
- ``frames/<sha256>.<fmt>``: the images, content-addressed (a frame shared by two steps is one
  file).

Status: ``recording -> stopped -> submitted -> uploaded`` (then deleted). A recording found
``recording`` at start-up (kill -9, power loss) is stopped at its last event.
"""

from __future__ import annotations

import bisect
import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from handtrace import __version__
from handtrace.agent.capture import Event
from handtrace.agent.coalesce import coalesce_moves
from handtrace.agent.runtime import AgentError
from handtrace.core import ids
from handtrace.core.clock import now_us
from handtrace.core.settings import DemoSettings

META_FORMAT = 1
ACTION_KINDS = ("click", "drag", "scroll", "typing", "hotkey")
FRAME_FORMATS = ("png", "webp")
_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_US = 1_000_000
_FSYNC_EVERY_US = 5 * _US
_EXPIRY_CHECK_US = 10 * 60 * _US
_RECENT_CHUNKS = 8
_FRAME_HEADROOM = 64 * 1024  # a frame message carries headers too; the broker limit is the message
_PASSIVE_ONLY_KINDS = ("screenshot",)  # passive screenshots travel on their own topic, not here


class DemoError(AgentError):
    """A demonstration request the agent refuses; the message says why (shown to the employee)."""


# --------------------------------------------------------------------- injected collaborators
class CapturedFrameLike(Protocol):
    """``agent.frames.CapturedFrame`` as the recorder reads it."""

    image: bytes
    fmt: str
    sha256: bytes
    width: int
    height: int
    captured_at_us: int
    windows: list[dict[str, Any]]
    filled: list[dict[str, Any]]


class FrameCapturerLike(Protocol):
    """``agent.frames.FrameCapturer`` (docs/design/demonstrations.md)."""

    def poll(self, now_us: int) -> None: ...
    def frame_before(self, t_us: int) -> CapturedFrameLike | None: ...
    def final_frame(self, now_us: int) -> CapturedFrameLike | None: ...
    def reset(self) -> None: ...


class ActionLike(Protocol):
    """One action start from ``agent.actions.ActionSegmenter``: ``kind`` (click, drag, scroll,
    typing, hotkey; a click may turn into a drag until the next action starts) and
    ``started_at_us`` (its first event's capture time)."""

    kind: str
    started_at_us: int


class SegmenterLike(Protocol):
    """``agent.actions.ActionSegmenter``: fed kept events in capture order, chunk by chunk;
    returns the actions they started."""

    def feed_all(self, events: list[Event]) -> Sequence[ActionLike]: ...


# --------------------------------------------------------------------- files
def _write_private(path: Path, data: bytes, *, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, rename), 0600."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        if fsync:
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:  # pragma: no cover -- platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _mkdir_private(d: Path) -> None:
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)


def event_to_json(ev: Event) -> dict[str, Any]:
    """A kept event as stored in events.jsonl (bytes as hex)."""
    out = {k: v for k, v in ev.items() if v is not None and not k.startswith("screenshot_")}
    eid = out.get("event_id")
    if isinstance(eid, bytes | bytearray):
        out["event_id"] = bytes(eid).hex()
    return out


def event_from_json(d: dict[str, Any]) -> Event:
    """Back from events.jsonl: an Event record (event_id as 16 bytes)."""
    ev = dict(d)
    if isinstance(ev.get("event_id"), str):
        ev["event_id"] = bytes.fromhex(ev["event_id"])
    return ev


def frame_meta(f: CapturedFrameLike) -> dict[str, Any]:
    """What meta.json keeps of a frame (the image is its own file)."""
    return {"sha256": f.sha256.hex(), "format": f.fmt, "bytes": len(f.image), "width": int(f.width),
            "height": int(f.height), "captured_at_us": int(f.captured_at_us),
            "scale": float(getattr(f, "scale", 1.0) or 1.0),
            "windows": [{"app_id": w.get("app_id"), "url": w.get("url"), "x": int(w["x"]), "y": int(w["y"]),
                         "width": int(w["width"]), "height": int(w["height"])} for w in f.windows],
            "filled": [{"x": int(b["x"]), "y": int(b["y"]), "width": int(b["width"]),
                        "height": int(b["height"])} for b in f.filled]}


class DemoStore:
    """The recordings on disk. Thread-safe for the recorder and the uploader (one lock)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        _mkdir_private(root)
        self.lock = threading.RLock()
        self.busy: set[str] = set()
        """Recordings being uploaded right now (delete waits; trim is refused anyway)."""

    # paths
    def path(self, rid: str) -> Path:
        return self.root / rid

    def ids(self) -> list[str]:
        """Every recording id on disk (oldest first: ids are UUIDv7)."""
        try:
            return sorted(p.name for p in self.root.iterdir() if _ID_RE.match(p.name) and p.is_dir())
        except FileNotFoundError:
            return []

    def resolve(self, prefix: str) -> str:
        """The one recording whose id starts with ``prefix`` (DemoError otherwise)."""
        p = (prefix or "").strip().lower()
        if not p or not re.fullmatch(r"[0-9a-f-]+", p):
            raise DemoError(f"not a recording id: {prefix!r} (`handtrace record list` shows them)")
        p = p.replace("-", "")
        hits = [i for i in self.ids() if i.startswith(p)]
        if not hits:
            raise DemoError(f"no recording {prefix!r} on this laptop (`handtrace record list` shows them)")
        if len(hits) > 1:
            raise DemoError(f"{prefix!r} matches {len(hits)} recordings ({', '.join(h[:12] for h in hits)}): "
                            "give more characters of the id")
        return hits[0]

    # meta
    def load_meta(self, rid: str) -> dict[str, Any]:
        meta: dict[str, Any] = json.loads((self.path(rid) / "meta.json").read_text())
        return meta

    def save_meta(self, rid: str, meta: dict[str, Any]) -> None:
        _write_private(self.path(rid) / "meta.json", json.dumps(meta, separators=(",", ":")).encode())

    # events / steps
    def read_events(self, rid: str) -> list[dict[str, Any]]:
        """The stored events (JSON form). A torn last line (kill -9 mid-write) is ignored."""
        return _read_jsonl(self.path(rid) / "events.jsonl")

    def rewrite_events(self, rid: str, events: Iterable[dict[str, Any]]) -> None:
        data = "".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events).encode()
        _write_private(self.path(rid) / "events.jsonl", data)

    # frames
    def frame_path(self, rid: str, sha_hex: str, fmt: str) -> Path:
        return self.path(rid) / "frames" / f"{sha_hex}.{fmt}"

    def write_frame(self, rid: str, f: CapturedFrameLike) -> None:
        p = self.frame_path(rid, f.sha256.hex(), f.fmt)
        if not p.exists():
            _write_private(p, f.image, fsync=False)  # rename-atomic; power loss: re-checked at upload

    def read_frame(self, rid: str, sha_hex: str, fmt: str) -> bytes:
        return self.frame_path(rid, sha_hex, fmt).read_bytes()

    def prune_frames(self, rid: str, meta: dict[str, Any]) -> int:
        """Delete frame files no step (nor the end frame) references; returns how many."""
        keep = {f"{f['sha256']}.{f['format']}" for f in referenced_frames(meta)}
        n = 0
        fdir = self.path(rid) / "frames"
        for p in fdir.iterdir() if fdir.exists() else ():
            if p.name not in keep:
                p.unlink(missing_ok=True)
                n += 1
        return n

    def disk_bytes(self, rid: str) -> int:
        total = 0
        for dirpath, _dirs, files in os.walk(self.path(rid)):
            for name in files:
                with contextlib.suppress(OSError):
                    total += os.stat(os.path.join(dirpath, name)).st_size
        return total

    def delete(self, rid: str) -> None:
        """Remove everything of a recording (renamed away first: a crash mid-delete leaves a
        ``.deleting-`` directory that the next start removes, never half a recording)."""
        src = self.path(rid)
        if not src.exists():
            return
        gone = self.root / f".deleting-{rid}"
        os.replace(src, gone)
        _fsync_dir(self.root)
        shutil.rmtree(gone, ignore_errors=True)

    def sweep(self) -> None:
        """Start-up cleanup: half-deleted directories, directories without meta.json (a crash
        while creating), leftover temp files."""
        for p in list(self.root.iterdir()):
            if p.name.startswith(".deleting-"):
                shutil.rmtree(p, ignore_errors=True)
            elif _ID_RE.match(p.name) and p.is_dir() and not (p / "meta.json").exists():
                shutil.rmtree(p, ignore_errors=True)


def _load_steps(path: Path) -> list[dict[str, Any]]:
    """steps.jsonl: one line per step, plus ``{"patch": index, "kind": ...}`` lines (a click
    that turned out to be a drag once the pointer moved with the button held)."""
    steps: list[dict[str, Any]] = []
    for line in _read_jsonl(path):
        if "patch" in line:
            if 0 <= line["patch"] < len(steps):
                steps[line["patch"]]["kind"] = line["kind"]
        else:
            steps.append(line)
    return steps


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line torn by kill -9 (only ever the last one)
    return out


def referenced_frames(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Every frame the recording references (steps in order, then the end frame)."""
    out = [s["frame"] for s in meta.get("steps", []) if s.get("frame")]
    if meta.get("end_frame"):
        out.append(meta["end_frame"])
    return out


def step_ranges(meta: dict[str, Any]) -> list[tuple[int, int]]:
    """Per step, ``[start, end)``: from its action start to the next action's start (the last one
    to the end of the recording, inclusive)."""
    steps = meta.get("steps", [])
    end = int(meta.get("ended_at_us") or meta["started_at_us"]) + 1
    out = []
    for i, s in enumerate(steps):
        nxt = steps[i + 1]["started_at_us"] if i + 1 < len(steps) else max(end, s["started_at_us"] + 1)
        out.append((int(s["started_at_us"]), int(nxt)))
    return out


# --------------------------------------------------------------------- the recorder
@dataclass
class _Active:
    rid: str
    meta: dict[str, Any]
    events_fh: Any
    steps_fh: Any
    capturer: FrameCapturerLike | None
    segmenter: SegmenterLike | None
    blocked_from: int | None = None
    last_event_us: int = 0
    last_fsync_us: int = 0
    n_events: int = 0
    n_steps: int = 0
    apps: set[str] = field(default_factory=set)
    recent: list[dict[int, tuple[bytes, str | None]]] = field(default_factory=list)
    frames_dropped: dict[str, int] = field(default_factory=dict)
    open_action: tuple[int, Any, str] | None = None
    """(step index, the segmenter's action, kind written): a click may still become a drag."""


class DemoRecorder:
    """Demonstration mode of one agent. The Agent calls :meth:`record` (kept events of a tick),
    :meth:`poll` (every tick), :meth:`suspend` / :meth:`capture_resumed` (pause) and
    :meth:`exempt`; the local socket calls the commands (start, stop, list, show, trim,
    delete, submit)."""

    def __init__(self, cfg: DemoSettings, root: Path, *, employee_id: str, device_id: str,
                 os_name: str, cohort: str = "default",
                 capturer_factory: Callable[[], FrameCapturerLike | None] | None = None,
                 segmenter_factory: Callable[[], SegmenterLike | None] | None = None,
                 mode_fn: Callable[[], str] = lambda: "capturing",
                 policy_version_fn: Callable[[], int] = lambda: 0,
                 clock: Callable[[], int] = now_us, pointer_max_hz: float = 25.0,
                 pointer_simplify_px: float = 1.0, on_submit: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.store = DemoStore(root)
        self.identity = {"employee_id": employee_id, "device_id": device_id, "os": os_name, "cohort": cohort}
        self.capturer_factory = capturer_factory
        self.segmenter_factory = segmenter_factory
        self.mode_fn = mode_fn
        self.policy_version_fn = policy_version_fn
        self.clock = clock
        self.pointer_max_hz = pointer_max_hz
        self.pointer_simplify_px = pointer_simplify_px
        self.on_submit = on_submit
        self._lock = self.store.lock
        self._active: _Active | None = None
        self._next_expiry_us = 0
        self.frames_note: str | None = None
        """Why frames are not captured (no capturer available), shown in status."""
        self.recover()
        self.expire(clock())

    # ------------------------------------------------------------ start-up
    def recover(self) -> list[str]:
        """Stop recordings left ``recording`` by a crash at their last event, finish deletes of
        ``uploaded`` ones, remove unreferenced frames. Returns the recovered ids."""
        recovered = []
        with self._lock:
            self.store.sweep()
            for rid in self.store.ids():
                try:
                    meta = self.store.load_meta(rid)
                except (OSError, ValueError):
                    shutil.rmtree(self.store.path(rid), ignore_errors=True)  # unreadable: never sent
                    continue
                if meta.get("status") == "uploaded":
                    self.store.delete(rid)
                    continue
                if meta.get("status") == "recording":
                    self._finish(rid, meta, ended_at=None, reason="agent_restart")
                    recovered.append(rid)
                self.store.prune_frames(rid, self.store.load_meta(rid))
        return recovered

    # ------------------------------------------------------------ commands
    @property
    def recording(self) -> bool:
        """Whether a recording is running (the Agent collects events for it only then)."""
        return self._active is not None

    def start(self, instruction: str) -> dict[str, Any]:
        """Start recording the task ``instruction``; returns the new recording's summary."""
        text = (instruction or "").strip()
        if not self.cfg.enabled:
            raise DemoError("demonstrations are disabled on this laptop (HANDTRACE_DEMO__ENABLED=false)")
        if not text:
            raise DemoError('a recording needs a task instruction: handtrace record start "what you will do"')
        if len(text) > self.cfg.instruction_max_chars:
            raise DemoError(f"the instruction is {len(text)} characters long; at most "
                            f"{self.cfg.instruction_max_chars} are accepted")
        if any(ord(c) < 32 and c not in "\t\n" for c in text):
            raise DemoError("the instruction contains control characters")
        mode = self.mode_fn()
        if mode == "paused":
            raise DemoError("capture is paused: nothing would be recorded. `handtrace resume` first, "
                            "then start the recording")
        if mode == "exempt":
            raise DemoError("capture is off on this laptop (an exemption is in force): nothing can be recorded")
        if self.policy_version_fn() <= 0:
            raise DemoError("no capture policy has reached this laptop yet: nothing would be recorded")
        now = self.clock()
        self.expire(now)
        with self._lock:
            if self._active is not None:
                raise DemoError(f"a recording is already running ({self._active.rid[:12]}): "
                                "`handtrace record stop` first")
            rid = ids.uuid7_bytes(now // 1000).hex()
            d = self.store.path(rid)
            _mkdir_private(d)
            _mkdir_private(d / "frames")
            meta: dict[str, Any] = {"format": META_FORMAT, "id": rid, "instruction": text, "status": "recording",
                    "started_at_us": now, "ended_at_us": None, "stop_reason": None, "submitted_at_us": None,
                    **self.identity, "agent_version": __version__,
                    "consent_version": self.cfg.consent_version, "policy_version": self.policy_version_fn(),
                    "screen": None, "steps": [], "end_frame": None, "events": 0, "apps": [], "gaps": [],
                    "trimmed": []}
            self.store.save_meta(rid, meta)
            self.frames_note = None
            capturer = self._make(self.capturer_factory, "frames")
            segmenter = self._make(self.segmenter_factory, "actions")
            if self.frames_note:
                self.frames_note += ": steps or frames are not recorded, events are"
            self._active = _Active(rid, meta, _open_append(d / "events.jsonl"), _open_append(d / "steps.jsonl"),
                                   capturer, segmenter, last_fsync_us=now)
            return self._summary(rid, meta)

    def _make(self, factory: Callable[[], Any] | None, what: str) -> Any:
        """One collaborator for a new recording; what is missing is said in ``frames_note``."""
        try:
            made = None if factory is None else factory()
            why = "not in this agent" if made is None and factory is None else "none on this display"
        except Exception as e:  # noqa: BLE001 -- frames are best effort; events are still recorded
            made, why = None, f"{type(e).__name__}: {e}"
        if made is None:
            note = f"{what} unavailable ({why})"
            self.frames_note = f"{self.frames_note}; {note}" if self.frames_note else note
        return made

    def stop(self, *, reason: str = "stopped", ended_at: int | None = None) -> dict[str, Any]:
        """Stop the running recording (the end frame is grabbed now, unless capture is paused)."""
        with self._lock:
            a = self._active
            if a is None:
                raise DemoError("no recording is running (`handtrace record list` shows the stopped ones)")
            now = self.clock()
            end = now if ended_at is None else ended_at
            if a.capturer is not None and a.blocked_from is None and reason != "exempt" \
                    and self.mode_fn() == "capturing":
                try:
                    final = a.capturer.final_frame(now)
                except Exception:  # noqa: BLE001 -- no end frame rather than no recording
                    final = None
                if final is not None and ended_at is None:
                    # The grab takes a moment: the recording ends when its end frame was taken.
                    end = max(end, final.captured_at_us)
                if final is not None and self._frame_fits(a, final) and final.captured_at_us <= end:
                    self.store.write_frame(a.rid, final)
                    a.meta["end_frame"] = frame_meta(final)
                    a.meta["screen"] = a.meta["screen"] or _screen(final)
            if a.capturer is not None:
                with contextlib.suppress(Exception):
                    a.capturer.reset()
                    close = getattr(a.capturer, "close", None)
                    if close is not None:
                        close()
            self._patch_open(a)
            self._active = None
            for fh in (a.events_fh, a.steps_fh):
                with contextlib.suppress(OSError):
                    fh.flush()
                    os.fsync(fh.fileno())
                    fh.close()
            if a.meta["gaps"] and a.meta["gaps"][-1][1] is None:
                a.meta["gaps"][-1][1] = end
            self._finish(a.rid, a.meta, ended_at=end, reason=reason, frames_dropped=a.frames_dropped)
            return self._summary(a.rid, self.store.load_meta(a.rid))

    def _finish(self, rid: str, meta: dict[str, Any], *, ended_at: int | None, reason: str,
                frames_dropped: dict[str, int] | None = None) -> None:
        """Fold steps.jsonl and the events' facts into meta.json and mark the recording stopped."""
        d = self.store.path(rid)
        steps = meta.get("steps") or _load_steps(d / "steps.jsonl")
        events = self.store.read_events(rid)
        last = max((e["captured_at_us"] for e in events), default=meta["started_at_us"])
        if ended_at is None:  # a crash: the recording ends at the last thing it holds
            ended_at = max([last, *(s["started_at_us"] for s in steps)])
        end = max(int(ended_at), meta["started_at_us"])
        # Nothing after the end (an exemption effective in the past ends it there).
        if any(e["captured_at_us"] > end for e in events):
            events = [e for e in events if e["captured_at_us"] <= end]
            self.store.rewrite_events(rid, events)
        steps = [s for s in steps if s["started_at_us"] <= end]
        for s in steps:
            if s.get("frame") and s["frame"]["captured_at_us"] > end:
                s["frame"] = None
        for i, s in enumerate(steps):
            s["index"] = i
        meta.update(status="stopped", ended_at_us=end, stop_reason=reason, steps=steps, events=len(events),
                    apps=sorted({e["app_id"] for e in events if e.get("app_id")}))
        if frames_dropped:
            meta["frames_dropped"] = dict(frames_dropped)
        if not meta.get("screen"):
            first = next(iter(referenced_frames(meta)), None)
            meta["screen"] = _screen_of_meta(first) if first else None
        self.store.save_meta(rid, meta)
        (d / "steps.jsonl").unlink(missing_ok=True)
        self.store.prune_frames(rid, meta)

    def recordings(self) -> list[dict[str, Any]]:
        """Every recording on this laptop, oldest first."""
        with self._lock:
            out = []
            for rid in self.store.ids():
                try:
                    meta = self._meta(rid)
                except (OSError, ValueError):
                    continue
                out.append(self._summary(rid, meta))
            return out

    def show(self, prefix: str) -> dict[str, Any]:
        """One recording with its steps (index, action, time range, app, frame, events)."""
        with self._lock:
            rid = self.store.resolve(prefix)
            meta = self._meta(rid)
            events = self.store.read_events(rid) if meta["status"] != "recording" else []
            times = sorted(e["captured_at_us"] for e in events)
            ranges = step_ranges(meta) if meta["status"] != "recording" else \
                [(s["started_at_us"], s["started_at_us"]) for s in meta["steps"]]
            steps = []
            t0 = meta["started_at_us"]
            for s, (a, b) in zip(meta["steps"], ranges, strict=True):
                f = s.get("frame")
                steps.append({"index": s["index"], "action": s["kind"], "from_s": (a - t0) / _US,
                              "to_s": (b - t0) / _US, "app_id": s.get("app_id"),
                              "events": bisect.bisect_left(times, b) - bisect.bisect_left(times, a),
                              "frame": None if not f else {"sha256": f["sha256"], "format": f["format"],
                                                            "bytes": f["bytes"], "width": f["width"],
                                                            "height": f["height"],
                                                            "captured_at_s": (f["captured_at_us"] - t0) / _US}})
            out = self._summary(rid, meta)
            out["steps_detail"] = steps
            out["end_frame"] = meta.get("end_frame") and {k: meta["end_frame"][k]
                                                          for k in ("sha256", "format", "bytes", "width", "height")}
            out["gaps"] = [[(g[0] - t0) / _US, None if g[1] is None else (g[1] - t0) / _US] for g in meta["gaps"]]
            out["apps"] = meta.get("apps", [])
            return out

    def trim(self, prefix: str, *, steps: Sequence[int] | None = None, from_s: float | None = None,
             to_s: float | None = None) -> dict[str, Any]:
        """Drop steps (by index) or a time range (seconds from the start; open ends allowed):
        their events and frames are deleted from disk, remaining steps renumbered."""
        if steps is None and from_s is None and to_s is None:
            raise DemoError("trim needs steps (--steps 3,5) or a time range (--from/--to, seconds from the start)")
        if steps is not None and (from_s is not None or to_s is not None):
            raise DemoError("trim either steps or a time range, not both at once")
        with self._lock:
            rid = self.store.resolve(prefix)
            meta = self._meta(rid)
            st = meta["status"]
            if st == "recording":
                raise DemoError("the recording is still running: `handtrace record stop` first")
            if st != "stopped":
                raise DemoError(f"the recording is {st}: it can no longer be trimmed (it was submitted)")
            t0, t_end = meta["started_at_us"], meta["ended_at_us"]
            ranges: list[tuple[int, int]] = []
            drop_steps: set[int] = set()
            n = len(meta["steps"])
            if steps is not None:
                bad = sorted({i for i in steps if not 0 <= i < n})
                if bad or not steps:
                    valid = f"its steps are 0..{n - 1}" if n else "it has no steps"
                    raise DemoError(f"no step {', '.join(map(str, bad)) or '(none given)'} in this recording "
                                    f"({valid})")
                sr = step_ranges(meta)
                drop_steps = set(steps)
                ranges = [sr[i] for i in sorted(drop_steps)]
            else:
                a = t0 if from_s is None else t0 + int(round(from_s * _US))
                b = t_end + 1 if to_s is None else t0 + int(round(to_s * _US))
                if from_s is not None and from_s < 0 or to_s is not None and to_s < 0:
                    raise DemoError("--from/--to are seconds from the start of the recording (>= 0)")
                if b <= a:
                    raise DemoError("the time range is empty: --to must be after --from")
                ranges = [(a, b)]
                drop_steps = {i for i, s in enumerate(meta["steps"]) if a <= s["started_at_us"] < b}

            def removed(t: int) -> bool:
                return any(a <= t < b for a, b in ranges)

            events = self.store.read_events(rid)
            kept = [e for e in events if not removed(e["captured_at_us"])]
            new_steps = []
            frames_removed = 0
            for i, s in enumerate(meta["steps"]):
                if i in drop_steps:
                    frames_removed += bool(s.get("frame"))
                    continue
                f = s.get("frame")
                if f and removed(f["captured_at_us"]):
                    s["frame"] = None  # it shows the screen during the removed time
                    frames_removed += 1
                new_steps.append(s)
            for i, s in enumerate(new_steps):
                s["index"] = i
            ef = meta.get("end_frame")
            if ef and removed(ef["captured_at_us"]):
                meta["end_frame"] = None
                frames_removed += 1
            self.store.rewrite_events(rid, kept)
            meta["steps"] = new_steps
            meta["events"] = len(kept)
            meta["apps"] = sorted({e["app_id"] for e in kept if e.get("app_id")})
            meta["trimmed"] = [*meta.get("trimmed", []), [[a - t0, b - t0] for a, b in ranges]]
            self.store.save_meta(rid, meta)
            self.store.prune_frames(rid, meta)
            out = self._summary(rid, meta)
            out.update(steps_removed=len(drop_steps), events_removed=len(events) - len(kept),
                       frames_removed=frames_removed)
            return out

    def delete(self, prefix: str) -> dict[str, Any]:
        """Remove a recording and everything of it from disk (a running one is stopped first)."""
        with self._lock:
            rid = self.store.resolve(prefix)
            if self._active is not None and self._active.rid == rid:
                self.stop(reason="deleted")
            if rid in self.store.busy:
                raise DemoError("the recording is being uploaded right now; it was submitted")
            meta = self._meta(rid)
            self.store.delete(rid)
            return {"id": rid, "status_was": meta["status"]}

    def submit(self, prefix: str) -> dict[str, Any]:
        """Mark a stopped recording for upload (it can no longer be trimmed)."""
        with self._lock:
            rid = self.store.resolve(prefix)
            meta = self._meta(rid)
            st = meta["status"]
            if st == "recording":
                raise DemoError("the recording is still running: `handtrace record stop` first, review it, "
                                "then submit")
            if st != "stopped":
                raise DemoError(f"the recording was already submitted ({st})")
            if not meta["events"]:  # an end frame alone is no demonstration
                raise DemoError("nothing was recorded (no activity in allowlisted apps): delete it instead")
            size = len(encode_header(self.store, rid, meta, sent_at_us=self.clock()))
            if size > self.cfg.max_frame_bytes - _FRAME_HEADROOM:
                raise DemoError(f"the recording's events are too large to send in one message ({size:,} "
                                f"bytes, at most {self.cfg.max_frame_bytes - _FRAME_HEADROOM:,}): trim it")
            meta["status"] = "submitted"
            meta["submitted_at_us"] = self.clock()
            self.store.save_meta(rid, meta)
            out = self._summary(rid, meta)
        if self.on_submit is not None:
            self.on_submit()
        return out

    def close(self) -> None:
        """Agent shutdown: a running recording is stopped (no end frame)."""
        with self._lock:
            if self._active is not None:
                self._active.capturer = None
                self.stop(reason="agent_stopped")

    # ------------------------------------------------------------ from the Agent
    def record(self, events: Sequence[Event], now: int) -> None:
        """The events one tick kept (after the local policy, before sampling), any order."""
        if self._active is None or not events:
            return
        with self._lock:
            a = self._active
            if a is None:
                return
            lo, hi = a.meta["started_at_us"], a.blocked_from
            chunk: list[Event] = []
            for ev in events:
                t = ev["captured_at_us"]
                if t < lo or (hi is not None and t >= hi) or ev["kind"] in _PASSIVE_ONLY_KINDS:
                    continue
                chunk.append(dict(ev))  # a copy: passive capture stamps its own event ids later
            if not chunk:
                return
            chunk.sort(key=lambda e: e["captured_at_us"])
            stored = coalesce_moves(chunk, max_hz=self.pointer_max_hz, epsilon_px=self.pointer_simplify_px)
            recent: dict[int, tuple[bytes, str | None]] = {}
            for e in stored:  # ids only for what is kept (most raw pointer moves are not)
                e["event_id"] = ids.uuid7_bytes(e["captured_at_us"] // 1000)
                if e["kind"] not in ("pointer_move", "focus_change"):
                    recent.setdefault(e["captured_at_us"], (e["event_id"], e.get("app_id")))
            a.recent = [*a.recent[-(_RECENT_CHUNKS - 1):], recent]
            a.events_fh.write("".join(json.dumps(event_to_json(e), separators=(",", ":")) + "\n" for e in stored))
            a.events_fh.flush()  # in the OS now: a kill -9 loses nothing from here
            a.n_events += len(stored)
            a.last_event_us = max(a.last_event_us, stored[-1]["captured_at_us"])
            a.apps.update(e["app_id"] for e in stored if e.get("app_id"))
            if now - a.last_fsync_us >= _FSYNC_EVERY_US:
                os.fsync(a.events_fh.fileno())
                a.last_fsync_us = now
            if a.segmenter is None:
                return
            actions = a.segmenter.feed_all(chunk)
            self._patch_open(a)
            for act in actions:
                self._step(a, act)

    def _patch_open(self, a: _Active) -> None:
        """The last action's kind may have changed since its step was written (click -> drag)."""
        if a.open_action is None:
            return
        idx, act, kind = a.open_action
        if act.kind != kind and act.kind in ACTION_KINDS:
            a.steps_fh.write(json.dumps({"patch": idx, "kind": act.kind}) + "\n")
            a.steps_fh.flush()
            a.open_action = (idx, act, act.kind)

    def _step(self, a: _Active, act: ActionLike) -> None:
        t = int(act.started_at_us)
        if t < a.meta["started_at_us"] or (a.blocked_from is not None and t >= a.blocked_from):
            return
        # The action's first event: the segmenter names it by time (its ids are ours, stamped in
        # record()); an action reported a few chunks late is still found.
        eid, app = next((r[t] for r in reversed(a.recent) if t in r), (None, None))
        kind = act.kind if act.kind in ACTION_KINDS else "click"
        frame = None
        if a.capturer is not None:
            try:
                f = a.capturer.frame_before(t)
            except Exception:  # noqa: BLE001 -- a step without a frame rather than a lost step
                f = None
                a.frames_dropped["error"] = a.frames_dropped.get("error", 0) + 1
            if f is not None and f.captured_at_us < t and self._frame_fits(a, f):
                self.store.write_frame(a.rid, f)
                frame = frame_meta(f)
                a.meta["screen"] = a.meta["screen"] or _screen(f)
            elif f is None:
                a.frames_dropped["none"] = a.frames_dropped.get("none", 0) + 1
        step = {"index": a.n_steps, "kind": kind, "started_at_us": t,
                "event_id": eid.hex() if isinstance(eid, bytes | bytearray) else None,
                "app_id": app, "frame": frame}
        self._patch_open(a)  # the previous action is final now
        a.steps_fh.write(json.dumps(step, separators=(",", ":")) + "\n")
        a.steps_fh.flush()
        a.open_action = (a.n_steps, act, kind)
        a.n_steps += 1

    def _frame_fits(self, a: _Active, f: CapturedFrameLike) -> bool:
        if f.fmt not in FRAME_FORMATS or len(f.sha256) != 32:
            a.frames_dropped["bad_format"] = a.frames_dropped.get("bad_format", 0) + 1
            return False
        if len(f.image) > self.cfg.max_frame_bytes - _FRAME_HEADROOM:
            a.frames_dropped["too_large"] = a.frames_dropped.get("too_large", 0) + 1
            return False
        return True

    def poll(self, now: int, *, capturing: bool = True) -> None:
        """Every tick: auto-stop after ``max_minutes``, grab a frame when due (only while
        capturing), expire old recordings now and then."""
        if self._active is not None:
            with self._lock:
                a = self._active
                if a is not None:
                    if now - a.meta["started_at_us"] >= self.cfg.max_minutes * 60 * _US:
                        self.stop(reason="max_minutes",
                                  ended_at=a.meta["started_at_us"] + int(self.cfg.max_minutes * 60 * _US))
                    elif capturing and a.blocked_from is None and a.capturer is not None:
                        try:
                            a.capturer.poll(now)
                        except Exception:  # noqa: BLE001 -- a failed grab is no frame, never a crash
                            a.frames_dropped["grab_error"] = a.frames_dropped.get("grab_error", 0) + 1
        if now >= self._next_expiry_us:
            self.expire(now)

    def suspend(self, start_us: int) -> None:
        """Capture paused from ``start_us``: nothing of the recording from then on (already on
        disk: removed), the frame ring dropped, until :meth:`capture_resumed`."""
        with self._lock:
            a = self._active
            if a is None:
                return
            a.blocked_from = start_us if a.blocked_from is None else min(a.blocked_from, start_us)
            if a.capturer is not None:
                with contextlib.suppress(Exception):
                    a.capturer.reset()
            if not a.meta["gaps"] or a.meta["gaps"][-1][1] is not None:
                a.meta["gaps"].append([start_us, None])
                self.store.save_meta(a.rid, a.meta)
            if a.last_event_us >= start_us or a.n_steps:
                self._cut_from(a, start_us)

    def _cut_from(self, a: _Active, start_us: int) -> None:
        d = self.store.path(a.rid)
        a.events_fh.close()
        events = self.store.read_events(a.rid)
        kept = [e for e in events if e["captured_at_us"] < start_us]
        if len(kept) != len(events):
            self.store.rewrite_events(a.rid, kept)
        a.events_fh = _open_append(d / "events.jsonl")
        a.n_events = len(kept)
        a.last_event_us = max((e["captured_at_us"] for e in kept), default=0)
        a.steps_fh.close()
        steps = _load_steps(d / "steps.jsonl")
        kept_steps = [s for s in steps if s["started_at_us"] < start_us]
        for s in kept_steps:
            if s.get("frame") and s["frame"]["captured_at_us"] >= start_us:
                s["frame"] = None
        if kept_steps != steps:
            _write_private(d / "steps.jsonl", "".join(json.dumps(s, separators=(",", ":")) + "\n"
                                                      for s in kept_steps).encode())
            self.store.prune_frames(a.rid, {"steps": kept_steps})
        a.steps_fh = _open_append(d / "steps.jsonl")
        a.n_steps = len(kept_steps)
        if a.open_action is not None and a.open_action[0] >= a.n_steps:
            a.open_action = None

    def capture_resumed(self) -> None:
        """The pause ended: record again from now."""
        with self._lock:
            a = self._active
            if a is None or a.blocked_from is None:
                return
            a.blocked_from = None
            if a.meta["gaps"] and a.meta["gaps"][-1][1] is None:
                a.meta["gaps"][-1][1] = self.clock()
                self.store.save_meta(a.rid, a.meta)

    def exempt(self, since_us: int) -> None:
        """An exemption is in force from ``since_us``: the running recording ends there (one
        that started after it is deleted whole)."""
        with self._lock:
            a = self._active
            if a is None:
                return
            self.suspend(since_us)
            if since_us <= a.meta["started_at_us"]:
                self._active = None
                for fh in (a.events_fh, a.steps_fh):
                    with contextlib.suppress(OSError):
                        fh.close()
                self.store.delete(a.rid)
                return
            self.stop(reason="exempt", ended_at=since_us - 1)

    def expire(self, now: int) -> list[str]:
        """Delete recordings not submitted within ``expire_hours`` of their start."""
        limit = int(self.cfg.expire_hours * 3600 * _US)
        gone = []
        with self._lock:
            self._next_expiry_us = now + _EXPIRY_CHECK_US
            active = self._active.rid if self._active else None
            for rid in self.store.ids():
                if rid == active:
                    continue
                try:
                    meta = self.store.load_meta(rid)
                except (OSError, ValueError):
                    continue
                if meta.get("status") in ("stopped", "recording") and now - meta["started_at_us"] >= limit:
                    self.store.delete(rid)
                    gone.append(rid)
        return gone

    # ------------------------------------------------------------ views
    def _meta(self, rid: str) -> dict[str, Any]:
        a = self._active
        if a is not None and a.rid == rid:
            meta = dict(a.meta)
            meta["steps"] = _load_steps(self.store.path(rid) / "steps.jsonl")
            meta["events"] = a.n_events
            meta["apps"] = sorted(a.apps)
            return meta
        return self.store.load_meta(rid)

    def _summary(self, rid: str, meta: dict[str, Any]) -> dict[str, Any]:
        end = meta.get("ended_at_us")
        frames = referenced_frames(meta)
        expires = None
        if meta["status"] in ("recording", "stopped"):
            expires = meta["started_at_us"] + int(self.cfg.expire_hours * 3600 * _US)
        return {"id": rid, "status": meta["status"], "instruction": meta["instruction"],
                "started_at_us": meta["started_at_us"], "ended_at_us": end,
                "duration_s": ((end or self.clock()) - meta["started_at_us"]) / _US,
                "steps": len(meta.get("steps", [])), "frames": len(frames),
                "frame_bytes": sum(f["bytes"] for f in frames), "events": meta.get("events", 0),
                "stop_reason": meta.get("stop_reason"), "expires_at_us": expires,
                "max_minutes": self.cfg.max_minutes}

    def status(self) -> dict[str, Any]:
        """For `handtrace status`: the running recording, and how many wait for review or upload."""
        with self._lock:
            counts: dict[str, int] = {}
            for rid in self.store.ids():
                try:
                    st = self._meta(rid)["status"]
                except (OSError, ValueError):
                    continue
                counts[st] = counts.get(st, 0) + 1
            a = self._active
            return {"enabled": self.cfg.enabled,
                    "recording": None if a is None else {**self._summary(a.rid, self._meta(a.rid)),
                                                          "suspended": a.blocked_from is not None},
                    "to_review": counts.get("stopped", 0), "submitted": counts.get("submitted", 0),
                    "frames_note": self.frames_note}


def _open_append(path: Path) -> Any:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8")


def _screen(f: CapturedFrameLike) -> dict[str, Any]:
    return {"width": int(f.width), "height": int(f.height), "scale": float(getattr(f, "scale", 1.0) or 1.0)}


def _screen_of_meta(f: dict[str, Any]) -> dict[str, Any]:
    return {"width": f["width"], "height": f["height"], "scale": f.get("scale", 1.0)}


# --------------------------------------------------------------------- what goes on the wire
def manifest(meta: dict[str, Any]) -> list[dict[str, Any]]:
    """The Demonstration record's ``frames``: one per step frame (step = its index, contiguous),
    then the end frame (step = number of steps)."""
    out = []
    steps = meta.get("steps", [])
    for s in steps:
        f = s.get("frame")
        if f:
            out.append(_manifest_frame(f, s["index"], s["kind"], s["started_at_us"],
                                       bytes.fromhex(s["event_id"]) if s.get("event_id") else None))
    if meta.get("end_frame"):
        out.append(_manifest_frame(meta["end_frame"], len(steps), "end", None, None))
    return out


def _manifest_frame(f: dict[str, Any], step: int, reason: str, started: int | None,
                    event_id: bytes | None) -> dict[str, Any]:
    return {"sha256": bytes.fromhex(f["sha256"]), "format": f["format"], "bytes": f["bytes"],
            "width": f["width"], "height": f["height"], "step": step, "reason": reason,
            "captured_at_us": f["captured_at_us"], "action_started_at_us": started,
            "action_event_id": event_id, "windows": f["windows"], "filled": f["filled"]}


def header_record(store: DemoStore, rid: str, meta: dict[str, Any], *, sent_at_us: int) -> dict[str, Any]:
    """The Demonstration record (schemas/demonstration/v1.avsc) of a stopped recording."""
    screen = meta.get("screen") or {"width": 0, "height": 0, "scale": 1.0}
    return {"demonstration_id": bytes.fromhex(rid), "employee_id": meta["employee_id"],
            "device_id": meta["device_id"], "agent_version": meta.get("agent_version", __version__),
            "os": meta["os"], "cohort": meta.get("cohort", "default"), "instruction": meta["instruction"],
            "started_at_us": meta["started_at_us"], "ended_at_us": meta["ended_at_us"],
            "sent_at_us": sent_at_us, "consent_version": meta["consent_version"],
            "policy_version": int(meta["policy_version"]),
            "screen": {"width": int(screen["width"]), "height": int(screen["height"]),
                       "scale": float(screen.get("scale", 1.0))},
            "apps": list(meta.get("apps", [])), "frames": manifest(meta),
            "events": [event_from_json(e) for e in store.read_events(rid)]}


def encode_header(store: DemoStore, rid: str, meta: dict[str, Any], *, sent_at_us: int) -> bytes:
    """The header message's value (Avro single-object encoding)."""
    from handtrace.core import codec

    rec = header_record(store, rid, meta, sent_at_us=sent_at_us)
    events = rec.pop("events")
    # The events as one size-prefixed block after the header: the stream's columnar decode path.
    return codec.encode_event_batch(rec, events, subject="demonstration")


def frame_sha_ok(data: bytes, sha_hex: str) -> bool:
    """Whether a frame file still holds the bytes it was named after."""
    return hashlib.sha256(data).hexdigest() == sha_hex
