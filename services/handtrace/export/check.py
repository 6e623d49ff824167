"""The loader check (issue #12, Deliver 5): read an export the way a training job does and
report everything that would make it wrong to train on -- or wrong to publish.

``check_export(out)`` loads ``steps.parquet`` with pyarrow and every ``trajectories/part-NNNNN.jsonl``
(one task per line, and once more with ``pyarrow.json``, the reader HuggingFace ``datasets``
uses), and checks, against the contract in docs/design/export.md:

- **manifest**: a known ``format`` / ``format_version``; ``files`` lists exactly the files present
  (manifest.json itself and the exporter's working folder ``.handtrace-export/`` excluded), each
  with its sha256 and size; ``counts`` (tasks, steps, images, steps_without_image) match the data;
  ``participants`` is the set of the tasks' participants and ``demonstrations`` their ids;
- **images**: every step's image (when not null) is ``images/<task_id>/<index:04d>.png|webp``, exists,
  has the ``image_sha256`` of the JSONL and of steps.parquet, decodes (Pillow) as a PNG of a sane
  size; no image file belongs to no step; a step's ``scrub_status`` agrees with having an image
  (``unscrubbable`` and ``none`` never do);
- **actions**: every ``value.code`` parses (``ast``) as exactly one call of the vocabulary (or
  the drag's ``moveTo`` + ``dragTo`` pair) with literal arguments of the right types, and agrees
  with ``value.action`` and ``value.args``; the last step of a task is ``terminate``, and only the
  last; coordinates (``x``, ``y``, ``x2``, ``y2``) are in [0, 1] with at most 4 decimals;
- **privacy**: the instruction (all three fields), every title and every typed message pass the
  project's PII detectors (``core.pii.unredacted_spans``: the post-condition the stream itself
  applies, so a ``[REDACTED:…]`` token is not a finding); ``url_origin`` is
  ``scheme://host[:port]`` and nothing more (no user info, path, query or fragment);
- **order**: step ``index`` 0..n-1, ``started_at`` non-decreasing, ``ended_at >= started_at``;
  steps.parquet has one row per JSONL step that agrees with it.

Never raises on bad input: every problem is an error sentence naming the file, task and step.
Errors never quote a value a detector flagged (the check must not copy what it found).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
import warnings
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from handtrace.core.pii import DEFAULT_TOKEN, unredacted_spans

FORMAT: Final = "handtrace-trajectories"
FORMAT_VERSIONS: Final = frozenset({1})
"""Format versions this check understands (``FORMAT_VERSION`` of the exporter)."""
WORK_DIR: Final = ".handtrace-export"
"""The exporter's resumable working state (plan, done markers): not part of the dataset."""
MAX_IMAGE_SIDE: Final = 16_384
MAX_CODE_CHARS: Final = 1_000_000
SCRUB_WITH_IMAGE: Final = frozenset({"scrubbed", "clean", "skipped"})
SCRUB_WITHOUT_IMAGE: Final = frozenset({"unscrubbable", "missing", "none"})
IMAGE_FORMATS: Final = ("png", "webp")
"""Image extensions an export may hold (the frame formats of demonstrations)."""
TERMINATE_STATUSES: Final = frozenset({"success", "failure"})
BUTTONS: Final = frozenset({"left", "right", "middle"})
COORDINATES: Final = ("x", "y", "x2", "y2")
ARG_FIELDS: Final = frozenset({"x", "y", "x2", "y2", "clicks", "button", "amount", "message", "keys", "presses",
                               "seconds", "status"})
"""Fields ``value.args`` may carry (the ``args`` struct of ``export.actions.reduce_actions``)."""
CLICKS: Final = {"click": ("left", 1), "doubleClick": ("left", 2), "tripleClick": ("left", 3),
                 "rightClick": ("right", 1), "middleClick": ("middle", 1)}
VOCABULARY: Final = frozenset({*(f"pyautogui.{c}" for c in CLICKS), "pyautogui.moveTo", "pyautogui.dragTo",
                               "pyautogui.scroll", "pyautogui.hscroll", "pyautogui.write", "pyautogui.press",
                               "pyautogui.hotkey", "computer.wait", "computer.terminate"})
PARQUET_COLUMNS: Final = ("task_id", "participant", "cohort", "os", "step", "action", "code", "args",
                          "started_at", "ended_at", "app", "title", "url_origin", "x", "y", "image",
                          "image_sha256", "image_bytes", "frame_sha256", "frame_filled", "scrub_status",
                          "detector_version", "scrub_version", "tesseract_version")
"""The columns of steps.parquet (docs/design/export.md)."""
_PART = re.compile(r"trajectories/part-\d{5}\.jsonl")
_MISSING = object()


@dataclass
class CheckReport:
    """What :func:`check_export` found. ``ok`` is true exactly when ``errors`` is empty."""

    ok: bool = True
    errors: list[str] = field(default_factory=list)
    tasks: int = 0
    steps: int = 0
    images: int = 0


class CodeError(ValueError):
    """An action code that is not a vocabulary call (the message says why)."""


@dataclass(frozen=True)
class ParsedCode:
    """An action code read back: the action it names, the arguments it writes (``given``) and
    the ones its name implies (``implied``: a click's button and click count, a press's count)."""

    action: str
    given: dict[str, Any]
    implied: dict[str, Any]


# ------------------------------------------------------------------ action codes


def _literal(node: ast.expr) -> Any:
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
        raise CodeError("has an argument that is not a literal constant") from e


def _calls(code: str) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """The statements of ``code`` as (``module.function``, positional, keyword) literal calls."""
    if not isinstance(code, str):
        raise CodeError(f"is a {type(code).__name__}, not a string")
    if len(code) > MAX_CODE_CHARS:
        raise CodeError(f"is longer than {MAX_CODE_CHARS} characters")
    try:
        tree = ast.parse(code, mode="exec")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        raise CodeError(f"does not parse as Python ({type(e).__name__})") from e
    calls = []
    for stmt in tree.body:
        if not (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)):
            raise CodeError(f"has a statement that is not a call ({type(stmt).__name__})")
        call, func = stmt.value, stmt.value.func
        if not (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name)):
            raise CodeError("calls something that is not a vocabulary function (module.function)")
        name = f"{func.value.id}.{func.attr}"
        if name not in VOCABULARY:
            raise CodeError(f"calls {name[:80]}, which is not in the vocabulary")
        if any(isinstance(a, ast.Starred) for a in call.args) or any(k.arg is None for k in call.keywords):
            raise CodeError(f"unpacks arguments into {name} (*args or **kwargs)")
        calls.append((name, [_literal(a) for a in call.args],
                      {k.arg: _literal(k.value) for k in call.keywords if k.arg is not None}))
    return calls


def _is_float(v: Any) -> bool:
    return isinstance(v, float)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _signature(name: str, pos: list[Any], kw: dict[str, Any], n_pos: int, allowed: Collection[str],
               required: Collection[str] = ()) -> None:
    if len(pos) != n_pos:
        raise CodeError(f"passes {len(pos)} positional arguments to {name}, which takes {n_pos}")
    unknown = sorted(set(kw) - set(allowed))
    if unknown:
        raise CodeError(f"passes {', '.join(k[:40] for k in unknown)} to {name}, which does not take it")
    missing = sorted(set(required) - set(kw))
    if missing:
        raise CodeError(f"calls {name} without {', '.join(missing)}")


def _point(name: str, kw: dict[str, Any], out: dict[str, Any], xk: str = "x", yk: str = "y") -> None:
    """Optional coordinates: both or neither, floats."""
    has = ("x" in kw, "y" in kw)
    if has == (False, False):
        return
    if has != (True, True):
        raise CodeError(f"gives {name} only one of x and y")
    for src, dst in (("x", xk), ("y", yk)):
        if not _is_float(kw[src]):
            raise CodeError(f"gives {name} {src} as {type(kw[src]).__name__}, not float")
        out[dst] = kw[src]


def _key(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise CodeError(f"gives {name} a key that is not a non-empty string ({type(v).__name__})")
    return v


def parse_code(code: str) -> ParsedCode:
    """Read an action code back; raises :class:`CodeError` unless it is exactly one call of the
    vocabulary (or the drag's two statements ``pyautogui.moveTo(...)`` / ``pyautogui.dragTo(...)``)
    with literal arguments of the right types:

    ``pyautogui.click|doubleClick|tripleClick|rightClick|middleClick(x=float, y=float)`` (point
    optional), ``pyautogui.moveTo(x=, y=)`` + ``pyautogui.dragTo(x=, y=, button=str)``,
    ``pyautogui.scroll|hscroll(int, x=, y=)``, ``pyautogui.write(message=str)``,
    ``pyautogui.press(str, presses=int)``, ``pyautogui.hotkey(str, ...)``,
    ``computer.wait(seconds=float|int)``, ``computer.terminate(status=str)``.
    """
    calls = _calls(code)
    if not calls:
        raise CodeError("has no call")
    names = [c[0] for c in calls]
    if len(calls) == 2 and names == ["pyautogui.moveTo", "pyautogui.dragTo"]:
        (_, mpos, mkw), (_, dpos, dkw) = calls
        _signature("pyautogui.moveTo", mpos, mkw, 0, {"x", "y"})
        _signature("pyautogui.dragTo", dpos, dkw, 0, {"x", "y", "button"}, {"button"})
        given: dict[str, Any] = {}
        _point("pyautogui.moveTo", mkw, given)
        _point("pyautogui.dragTo", dkw, given, "x2", "y2")
        if dkw["button"] not in BUTTONS:
            raise CodeError("gives pyautogui.dragTo a button that is not left, right or middle")
        given["button"] = dkw["button"]
        return ParsedCode("dragTo", given, {"clicks": 1})
    if len(calls) != 1:
        raise CodeError(f"has {len(calls)} statements; a step is one call (or moveTo then dragTo)")
    name, pos, kw = calls[0]
    fn = name.split(".", 1)[1]
    given = {}
    if fn in CLICKS:
        _signature(name, pos, kw, 0, {"x", "y"})
        _point(name, kw, given)
        button, clicks = CLICKS[fn]
        return ParsedCode(fn, given, {"button": button, "clicks": clicks})
    if fn in ("moveTo", "dragTo"):
        raise CodeError(f"calls {name} alone; a drag is pyautogui.moveTo then pyautogui.dragTo")
    if fn in ("scroll", "hscroll"):
        _signature(name, pos, kw, 1, {"x", "y"})
        if not _is_int(pos[0]):
            raise CodeError(f"gives {name} an amount that is a {type(pos[0]).__name__}, not int")
        given["amount"] = pos[0]
        _point(name, kw, given)
        return ParsedCode(fn, given, {})
    if fn == "write":
        _signature(name, pos, kw, 0, {"message"}, {"message"})
        if not isinstance(kw["message"], str):
            raise CodeError(f"gives {name} a message that is a {type(kw['message']).__name__}, not str")
        return ParsedCode(fn, {"message": kw["message"]}, {})
    if fn == "press":
        _signature(name, pos, kw, 1, {"presses"})
        given["keys"] = [_key(name, pos[0])]
        if "presses" in kw:
            if not _is_int(kw["presses"]) or kw["presses"] < 1:
                raise CodeError(f"gives {name} presses that is not a positive int")
            given["presses"] = kw["presses"]
            return ParsedCode(fn, given, {})
        return ParsedCode(fn, given, {"presses": 1})
    if fn == "hotkey":
        if kw:
            raise CodeError(f"passes keywords to {name}, which takes keys only")
        if not pos:
            raise CodeError(f"calls {name} without keys")
        return ParsedCode(fn, {"keys": [_key(name, k) for k in pos]}, {})
    if fn == "wait":
        _signature(name, pos, kw, 0, {"seconds"}, {"seconds"})
        s = kw["seconds"]
        if not (_is_float(s) or _is_int(s)) or not math.isfinite(s) or s < 0:
            raise CodeError(f"gives {name} seconds that is not a finite number >= 0")
        return ParsedCode(fn, {"seconds": s}, {})
    # terminate (the vocabulary has nothing else)
    _signature(name, pos, kw, 0, {"status"}, {"status"})
    if not isinstance(kw["status"], str) or kw["status"] not in TERMINATE_STATUSES:
        raise CodeError(f"gives {name} a status that is not one of {sorted(TERMINATE_STATUSES)}")
    return ParsedCode(fn, {}, {"status": kw["status"]})


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return bool(a == b)


def check_code(code: Any, action: Any, args: Any) -> list[str]:
    """Problems (sentences) of one step's ``value``: ``code`` is a vocabulary call
    (:func:`parse_code`) naming ``action``, and ``args`` (nulls left out) holds exactly what the
    code writes (plus, optionally, what its name implies: button, clicks, presses)."""
    try:
        parsed = parse_code(code)
    except CodeError as e:
        return [f"its code {e}"]
    problems = []
    if action != parsed.action:
        problems.append(f"its code is a {parsed.action} but value.action says {str(action)[:40]!r}")
    if not isinstance(args, Mapping):
        return [*problems, "its value.args is not an object"]
    present = {k: v for k, v in args.items() if v is not None}
    for k in sorted(set(present) - ARG_FIELDS):
        problems.append(f"its value.args has an unknown field {k[:40]!r}")
    for k, v in parsed.given.items():
        if k not in present:
            problems.append(f"its code gives {k} but value.args has none")
        elif not _same(present[k], v):
            problems.append(f"its code and value.args disagree on {k}")
    for k in sorted(set(present) & ARG_FIELDS - set(parsed.given)):
        want = parsed.implied.get(k, _MISSING)
        if want is _MISSING:
            problems.append(f"its value.args has {k}, which its code does not give")
        elif not _same(present[k], want):
            problems.append(f"its value.args says {k}={present[k]!r:.40} but its code implies {want!r}")
    return problems


def coordinate_problems(args: Any) -> list[str]:
    """Coordinates of a step's args outside [0, 1] or with more than 4 decimals."""
    if not isinstance(args, Mapping):
        return []
    problems = []
    for k in COORDINATES:
        v = args.get(k)
        if v is None:
            continue
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            problems.append(f"coordinate {k} is not a finite number")
        elif not 0 <= v <= 1:
            problems.append(f"coordinate {k}={v!r} is outside [0, 1]")
        elif Decimal(repr(float(v))).as_tuple().exponent < -4:  # type: ignore[operator]
            problems.append(f"coordinate {k}={v!r} has more than 4 decimals")
    return problems


def url_origin_problem(value: Any) -> str | None:
    """Why ``value`` is not a bare origin ``scheme://host[:port]`` (None: it is one, or null)."""
    if value is None:
        return None
    if not isinstance(value, str):
        return "url_origin is not a string"
    try:
        u = urlsplit(value)
        port_ok = u.port is None or 0 < u.port < 65536
    except ValueError:
        return "url_origin is not a valid url"
    if "@" in u.netloc:
        return "url_origin carries user info"
    if u.path or u.query or u.fragment or "?" in value or "#" in value:
        return "url_origin carries a path, query or fragment (only scheme://host[:port] may leave)"
    if not (u.scheme and u.hostname and port_ok) or value != f"{u.scheme}://{u.netloc}":
        return "url_origin is not of the form scheme://host[:port]"
    return None


# ------------------------------------------------------------------ the export


class _Errors:
    """Error sentences, at most ``limit`` kept (the rest counted)."""

    def __init__(self, limit: int) -> None:
        self.items: list[str] = []
        self.dropped = 0
        self.limit = limit

    def add(self, msg: str) -> None:
        if len(self.items) < self.limit:
            self.items.append(msg)
        else:
            self.dropped += 1

    def final(self) -> list[str]:
        if self.dropped:
            return [*self.items, f"... and {self.dropped} more errors"]
        return list(self.items)


def _digest(path: Path) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def _present_files(out: Path) -> list[str]:
    return sorted(p.relative_to(out).as_posix() for p in out.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(out).parts[0] != WORK_DIR
                  and p.relative_to(out).as_posix() != "manifest.json")


def _time(v: Any) -> datetime | None:
    if not isinstance(v, str):
        return None
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return None
    return t if t.tzinfo is not None else None


def _obj(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _pii(text: Any, token: str) -> list[str]:
    if not isinstance(text, str):
        return []
    return sorted({k for _, _, k in unredacted_spans(text, token=token)})


@dataclass
class _Step:
    where: str
    task_id: str
    participant: Any
    index: int
    raw: dict[str, Any]


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    with path.open("r", encoding="utf-8", newline="\n") as f:
        yield from enumerate(f, 1)


def check_export(out: Path, *, token: str = DEFAULT_TOKEN, max_errors: int = 1000) -> CheckReport:
    """Check the export in ``out`` (module docstring: what is checked).

    Args:
        out: The export folder (manifest.json, trajectories/, images/, steps.parquet).
        token: The stream's redaction token (``{kind}`` filled in): a value that is nothing but
            tokens is not a PII finding.
        max_errors: Errors listed at most (the rest are counted in a last line).

    Returns:
        A :class:`CheckReport`; ``ok`` when no error was found.
    """
    out = Path(out)
    errs = _Errors(max_errors)
    report = CheckReport()
    if not out.is_dir():
        errs.add(f"{out} is not a folder")
        report.errors, report.ok = errs.final(), False
        return report
    manifest = _manifest(out, errs)
    present = _present_files(out)
    digests: dict[str, tuple[str, int]] = {}
    for rel in present:
        try:
            digests[rel] = _digest(out / rel)
        except OSError as e:
            errs.add(f"{rel} cannot be read ({type(e).__name__})")
    if manifest is not None:
        _check_files(manifest, present, digests, errs)
    parts = [r for r in present if r.startswith("trajectories/")]
    for r in parts:
        if not _PART.fullmatch(r):
            errs.add(f"{r} is not a trajectory part (trajectories/part-NNNNN.jsonl)")
    parts = [r for r in parts if _PART.fullmatch(r)]
    if not parts:
        errs.add("trajectories/ has no part-NNNNN.jsonl")
    tasks: list[tuple[str, dict[str, Any]]] = []
    for rel in parts:
        tasks.extend(_read_part(out, rel, errs))
    steps = _check_tasks(tasks, errs, token)
    referenced = _check_images(out, steps, digests, errs)
    _check_parquet(out, steps, digests, errs)
    report.tasks, report.steps, report.images = len(tasks), len(steps), len(referenced)
    if manifest is not None:
        _check_manifest_data(manifest, tasks, steps, referenced, errs)
    report.errors = errs.final()
    report.ok = not report.errors
    return report


def _manifest(out: Path, errs: _Errors) -> dict[str, Any] | None:
    path = out / "manifest.json"
    if not path.is_file():
        errs.add("manifest.json is missing: the export is incomplete (the manifest is written last)")
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        errs.add(f"manifest.json is not valid JSON ({type(e).__name__})")
        return None
    if not isinstance(manifest, dict):
        errs.add("manifest.json is not a JSON object")
        return None
    if manifest.get("format") != FORMAT:
        errs.add(f"manifest.json: format is {str(manifest.get('format'))[:60]!r}, not {FORMAT!r}")
    fv = manifest.get("format_version")
    if not _is_int(fv) or fv not in FORMAT_VERSIONS:
        errs.add(f"manifest.json: format_version {repr(fv)[:20]} is not one this check knows "
                 f"({sorted(FORMAT_VERSIONS)})")
    return manifest


def _check_files(manifest: dict[str, Any], present: list[str], digests: dict[str, tuple[str, int]],
                 errs: _Errors) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict):
        errs.add("manifest.json: files is not an object of path -> {sha256, bytes}")
        return
    for rel in sorted(set(files) - set(present)):
        errs.add(f"manifest.json lists {rel[:200]}, which is missing from the export")
    for rel in sorted(set(present) - set(files)):
        errs.add(f"{rel} is in the export but not listed in manifest.json")
    for rel in sorted(set(files) & set(digests)):
        entry = files[rel]
        sha, size = digests[rel]
        if not isinstance(entry, dict):
            errs.add(f"manifest.json: the entry of {rel} is not an object")
            continue
        if entry.get("sha256") != sha:
            errs.add(f"{rel}: sha256 differs from manifest.json (file changed or corrupt)")
        if entry.get("bytes") != size:
            errs.add(f"{rel}: size {size} bytes differs from manifest.json ({str(entry.get('bytes'))[:20]})")


def _read_part(out: Path, rel: str, errs: _Errors) -> list[tuple[str, dict[str, Any]]]:
    tasks = []
    longest = 0
    try:
        lines = list(_lines(out / rel))
    except (OSError, UnicodeDecodeError) as e:
        errs.add(f"{rel} cannot be read as UTF-8 text ({type(e).__name__})")
        return []
    for n, line in lines:
        longest = max(longest, len(line))
        where = f"{rel} line {n}"
        if not line.strip():
            errs.add(f"{where} is blank (one task per line)")
            continue
        try:
            task = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as e:
            errs.add(f"{where} is not valid JSON ({type(e).__name__})")
            continue
        if not isinstance(task, dict):
            errs.add(f"{where} is not a JSON object")
            continue
        tasks.append((where, task))
    if lines and not lines[-1][1].endswith("\n"):
        errs.add(f"{rel} does not end with a newline (a cut part?)")
    # the reader HuggingFace datasets' "json" builder uses: nested types must unify across lines
    import pyarrow.json as pj

    try:
        pj.read_json(out / rel, read_options=pj.ReadOptions(block_size=max(1 << 20, 2 * longest + 16)))
    except Exception as e:  # noqa: BLE001 -- any reader failure is a finding, never a crash
        errs.add(f"{rel} cannot be read by pyarrow.json ({type(e).__name__}: {str(e)[:200]})")
    return tasks


def _check_tasks(tasks: list[tuple[str, dict[str, Any]]], errs: _Errors, token: str) -> list[_Step]:
    steps: list[_Step] = []
    seen: set[str] = set()
    for where0, task in tasks:
        tid = task.get("task_id")
        if not isinstance(tid, str) or not tid or "/" in tid or tid in (".", ".."):
            errs.add(f"{where0}: task_id is missing or not a plain string")
            continue
        where = f"{where0} (task {tid})"
        if tid in seen:
            errs.add(f"{where}: task_id appears more than once in the export")
        seen.add(tid)
        instr = [task.get(k) for k in ("instruction", "natural_language_task", "actual_task")]
        for k, v in zip(("instruction", "natural_language_task", "actual_task"), instr, strict=True):
            if not isinstance(v, str):
                errs.add(f"{where}: {k} is not a string")
            elif kinds := _pii(v, token):
                errs.add(f"{where}: {k} has PII the detectors find ({', '.join(kinds)})")
        if len({v for v in instr if isinstance(v, str)}) > 1:
            errs.add(f"{where}: instruction, natural_language_task and actual_task differ")
        if not isinstance(task.get("participant"), str) or not task.get("participant"):
            errs.add(f"{where}: participant is missing")
        traj = task.get("traj")
        if not isinstance(traj, list) or not traj:
            errs.add(f"{where}: traj is missing or empty (every task ends with terminate)")
            continue
        prev_start: datetime | None = None
        last = len(traj) - 1
        for i, step in enumerate(traj):
            sw = f"{where} step {i}"
            if not isinstance(step, dict):
                errs.add(f"{sw}: is not a JSON object")
                continue
            if step.get("index") != i or isinstance(step.get("index"), bool):
                errs.add(f"{sw}: index is {str(step.get('index'))[:20]}, expected {i} (steps are 0..n-1 in order)")
            steps.append(_Step(sw, tid, task.get("participant"), i, step))
            value = step.get("value")
            if not isinstance(value, dict):
                errs.add(f"{sw}: value is not an object with code, action and args")
                continue
            for p in check_code(value.get("code"), value.get("action"), value.get("args")):
                errs.add(f"{sw}: {p}")
            for p in coordinate_problems(value.get("args")):
                errs.add(f"{sw}: {p}")
            is_term = value.get("action") == "terminate"
            if i == last and not is_term:
                errs.add(f"{sw}: the last step is not terminate")
            if i != last and is_term:
                errs.add(f"{sw}: terminate is not the last step")
            if kinds := _pii(_obj(value.get("args")).get("message"), token):
                errs.add(f"{sw}: the typed message has PII the detectors find ({', '.join(kinds)})")
            title = step.get("title")
            if title is not None and not isinstance(title, str):
                errs.add(f"{sw}: title is not a string or null")
            elif kinds := _pii(title, token):
                errs.add(f"{sw}: title has PII the detectors find ({', '.join(kinds)})")
            if (problem := url_origin_problem(step.get("url_origin"))) is not None:
                errs.add(f"{sw}: {problem}")
            start, end = _time(step.get("started_at")), _time(step.get("ended_at"))
            if start is None or end is None:
                errs.add(f"{sw}: started_at and ended_at must be ISO 8601 times with a time zone")
                continue
            if end < start:
                errs.add(f"{sw}: ended_at is before started_at")
            if prev_start is not None and start < prev_start:
                errs.add(f"{sw}: started_at is before the previous step's (steps out of time order)")
            prev_start = start
    return steps


def _check_images(out: Path, steps: list[_Step], digests: dict[str, tuple[str, int]], errs: _Errors) -> set[str]:
    from PIL import Image

    referenced: set[str] = set()
    for s in steps:
        image, sha = s.raw.get("image"), s.raw.get("image_sha256")
        if image is None:
            if sha is not None:
                errs.add(f"{s.where}: image_sha256 is set but image is null")
            continue
        wants = [f"images/{s.task_id}/{s.index:04d}.{ext}" for ext in IMAGE_FORMATS]
        if image not in wants:
            errs.add(f"{s.where}: image is {str(image)[:200]!r}, expected {wants[0]!r} (or .{IMAGE_FORMATS[1]})")
            continue
        referenced.add(image)
        if image not in digests:
            errs.add(f"{s.where}: its image {image} is missing")
            continue
        if sha != digests[image][0]:
            errs.add(f"{s.where}: its image {image} does not match image_sha256")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(out / image) as im:
                    w, h = im.size
                    if im.format != "PNG":
                        errs.add(f"{s.where}: its image {image} is {im.format}, not PNG")
                    if not (0 < w <= MAX_IMAGE_SIDE and 0 < h <= MAX_IMAGE_SIDE):
                        errs.add(f"{s.where}: its image {image} is {w}x{h}, not a sane screen size")
                        continue
                    im.load()
        except Exception as e:  # noqa: BLE001 -- Pillow raises many types on bad input; all are findings
            errs.add(f"{s.where}: its image {image} does not decode ({type(e).__name__})")
    for rel in sorted(r for r in digests if r.startswith("images/") and r not in referenced):
        errs.add(f"{rel} is not the image of any step")
    return referenced


def _check_parquet(out: Path, steps: list[_Step], digests: dict[str, tuple[str, int]], errs: _Errors) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = out / "steps.parquet"
    if not path.is_file():
        errs.add("steps.parquet is missing")
        return
    try:
        schema = pq.read_schema(path)
    except Exception as e:  # noqa: BLE001 -- an unreadable file is a finding
        errs.add(f"steps.parquet cannot be read by pyarrow ({type(e).__name__}: {str(e)[:200]})")
        return
    missing = [c for c in PARQUET_COLUMNS if c not in schema.names]
    if missing:
        errs.add(f"steps.parquet lacks columns {', '.join(missing)}")
    for c in ("started_at", "ended_at"):
        if c in schema.names:
            t = schema.field(c).type
            if not (pa.types.is_timestamp(t) and t.tz in ("UTC", "+00:00", "Etc/UTC")):
                errs.add(f"steps.parquet: {c} is {t}, not a UTC timestamp")
    if "step" in schema.names and not pa.types.is_integer(schema.field("step").type):
        errs.add(f"steps.parquet: step is {schema.field('step').type}, not an integer")
    cols = [c for c in ("task_id", "step", "participant", "action", "code", "image", "image_sha256", "image_bytes",
                        "x", "y", "started_at", "ended_at", "app", "title", "url_origin", "scrub_status")
            if c in schema.names]
    if "task_id" not in cols or "step" not in cols:
        return
    rows: dict[tuple[Any, Any], dict[str, Any]] = {}
    n_rows = 0
    with pq.ParquetFile(path) as pf:
        for batch in pf.iter_batches(columns=cols, batch_size=65_536):
            for row in batch.to_pylist():
                n_rows += 1
                key = (row["task_id"], row["step"])
                if key in rows:
                    errs.add(f"steps.parquet has more than one row for task {key[0]} step {key[1]}")
                rows[key] = row
    jsonl = {(s.task_id, s.index) for s in steps}
    for key in sorted(set(rows) - jsonl, key=str):
        errs.add(f"steps.parquet has a row for task {key[0]} step {key[1]} that no trajectory has")
    for s in steps:
        row = rows.get((s.task_id, s.index))
        if row is None:
            errs.add(f"{s.where}: steps.parquet has no row for it")
            continue
        value = _obj(s.raw.get("value"))
        args = _obj(value.get("args"))
        image = s.raw.get("image")
        expect: dict[str, Any] = {
            "participant": s.participant, "action": value.get("action"), "code": value.get("code"),
            "image": image, "image_sha256": s.raw.get("image_sha256"), "x": args.get("x"), "y": args.get("y"),
            "started_at": _time(s.raw.get("started_at")), "ended_at": _time(s.raw.get("ended_at")),
            "app": s.raw.get("app"), "title": s.raw.get("title"), "url_origin": s.raw.get("url_origin"),
        }
        if isinstance(image, str) and image in digests:
            expect["image_bytes"] = digests[image][1]
            if row.get("image_sha256") is not None and row.get("image_sha256") != digests[image][0]:
                errs.add(f"{s.where}: steps.parquet's image_sha256 does not match the image {image}")
        elif image is None:
            expect["image_bytes"] = None
        differ = [c for c, v in expect.items() if c in row and not _same_cell(row[c], v)]
        if differ:
            errs.add(f"{s.where}: steps.parquet disagrees with the trajectory on {', '.join(differ)}")
        status = row.get("scrub_status", _MISSING)
        if status is _MISSING:
            continue
        if status not in SCRUB_WITH_IMAGE | SCRUB_WITHOUT_IMAGE:
            errs.add(f"{s.where}: steps.parquet: scrub_status {str(status)[:30]!r} is not one the contract names")
        elif image is not None and status in SCRUB_WITHOUT_IMAGE:
            errs.add(f"{s.where}: has an image but scrub_status is {status} (such a frame is never exported)")
        elif image is None and status in SCRUB_WITH_IMAGE:
            errs.add(f"{s.where}: scrub_status is {status} but the step has no image")


def _same_cell(a: Any, b: Any) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return _same(a, b)


def _check_manifest_data(manifest: dict[str, Any], tasks: list[tuple[str, dict[str, Any]]], steps: list[_Step],
                         images: set[str], errs: _Errors) -> None:
    counts = manifest.get("counts")
    if not isinstance(counts, dict):
        errs.add("manifest.json: counts is not an object")
        counts = {}
    actual = {"tasks": len(tasks), "steps": len(steps), "images": len(images),
              "steps_without_image": sum(1 for s in steps if s.raw.get("image") is None)}
    for k, v in actual.items():
        if k not in counts:
            if k != "steps_without_image":
                errs.add(f"manifest.json: counts.{k} is missing")
        elif counts[k] != v or isinstance(counts[k], bool):
            errs.add(f"manifest.json: counts.{k} is {str(counts[k])[:20]}, the data has {v}")
    ids = [t.get("task_id") for _, t in tasks]
    parts = {t.get("participant") for _, t in tasks}
    listed = manifest.get("participants")
    if not isinstance(listed, list):
        errs.add("manifest.json: participants is not a list")
    elif set(map(str, listed)) != parts or len(listed) != len(set(map(str, listed))):
        extra, absent = set(map(str, listed)) - parts, parts - set(map(str, listed))
        errs.add(f"manifest.json: participants differ from the tasks' participants ({len(extra)} listed without a "
                 f"task, {len(absent)} with tasks not listed, {len(listed) - len(set(map(str, listed)))} duplicates)")
    demos = manifest.get("demonstrations")
    if not isinstance(demos, list):
        errs.add("manifest.json: demonstrations is not a list")
    elif sorted(map(str, demos)) != sorted(map(str, ids)):
        unknown, unlisted = set(map(str, demos)) - set(map(str, ids)), set(map(str, ids)) - set(map(str, demos))
        errs.add(f"manifest.json: demonstrations differ from the task ids ({len(unknown)} listed without a task, "
                 f"{len(unlisted)} tasks not listed, or duplicates)")
