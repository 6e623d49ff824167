"""Screenshot scrubbing before export (issue #12, item 3): text drawn on screen that the
project's PII detectors flag is filled solid before a frame leaves in an export.

How a frame is scrubbed:

1. **OCR.** Debian's ``tesseract`` CLI reads the frame (grayscale, upscaled ``upscale`` times:
   screen text is ~10 px high, and at that size tesseract misreads monospace tokens and loses
   light-on-dark text such as terminals and title bars, both of which it reads at 2x) and writes
   TSV: one row per word with its box and its block/paragraph/line numbers. It runs with
   ``OMP_THREAD_LIMIT=1``: its OpenMP threads make it ~5x slower when cores are shared (measured,
   bench/frame_scrub.py); frames are parallelised across processes instead (:func:`scrub_many`).
2. **Detect.** :func:`handtrace.core.pii.find_spans` (the detectors the stream uses, no regex of
   our own) runs over each OCR'd paragraph (lines joined by a newline) in three views: words
   joined by a space (``+44 20 7946 0958``, ``4111 1111 1111 1111`` span several words), and
   glued where the gap between two words is narrower than 0.85 or 1.2 characters (OCR splits
   long monospace tokens at spurious spaces: ``ghp_A1b2C3d4E5 f6G7h8I9j 0K1l2M3n4O5p6Q7r8``,
   emails at a dot; :data:`GLUE_GAPS`). A secret's fill then extends over a neighbouring piece
   when the same detectors claim it with the space taken out (OCR cuts tokens anywhere). The
   union of the views' spans is filled: a view can only add filling, never remove it.
3. **Fill.** A span maps back to the words it touches; per OCR line the union of those words'
   boxes, padded (OCR boxes are tight; anti-aliased edges and a character OCR dropped at a split
   must not survive), is filled with one solid colour (:data:`FILL_RGB`, never blur: blur is
   reversible).

Fails closed: a frame that cannot be decoded or OCR'd (tesseract missing, crashed, timed out,
unparsable output) raises :class:`UnscrubbableFrame` from :func:`scrub_frame`;
:func:`scrub_many` reports it as a :class:`FrameOutcome` with ``ok=False`` and no image, so an
exporter has nothing it could export by mistake. Every outcome records the detector version
(``pii.DETECTOR_VERSION``), the tesseract version and :data:`SCRUB_VERSION`.

What OCR cannot read it cannot scrub: text tesseract does not see (tiny, stylised, low-contrast,
non-Latin scripts without their traineddata) stays. The masking at capture (agent/frames.py:
only allowlisted windows are unfilled, password fields filled) is the first line; this is the
second.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import resource
import shutil
import subprocess
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image, ImageDraw

from handtrace.core import pii

SCRUB_VERSION = 1
"""Version of this procedure (views, padding, preprocessing); raised when any of them change, so
an export records how its frames were scrubbed next to ``pii.DETECTOR_VERSION``."""
FILL_RGB: tuple[int, int, int] = (0, 0, 0)
"""The one colour of every filled pixel (the same as the agent's masking)."""
TESSERACT = "tesseract"
OCR_TIMEOUT_S = 120.0
"""Longest one frame's OCR may take before the frame is reported unscrubbable."""
DEFAULT_UPSCALE = 2
"""OCR reads the frame upscaled this many times (at 1x, 14 px monospace tokens and light text on
dark bars are misread: tests/integration/test_scrub_ocr.py leaks tokens at 1x)."""
PAD_X = 0.35
PAD_Y = 0.25
"""Padding of a filled box, as a fraction of its line's height (at least 2 frame pixels each side)."""

TSV_HEADER = ("level", "page_num", "block_num", "par_num", "line_num", "word_num",
              "left", "top", "width", "height", "conf", "text")


class UnscrubbableFrame(Exception):
    """The frame could not be scrubbed (undecodable image, OCR failure): it must not be exported."""


@dataclass(frozen=True)
class OcrWord:
    """One word tesseract read, its box in the OCR'd image's pixels, and the line it is on."""

    left: int
    top: int
    width: int
    height: int
    conf: float
    text: str
    block: int
    par: int
    line: int


class ScrubbedFrame(NamedTuple):
    """What :func:`scrub_frame` returns: the image to export, what was filled, by which detectors."""

    image: bytes
    """The scrubbed image (the input bytes unchanged when nothing was filled)."""
    filled: list[dict[str, Any]]
    """``{"x", "y", "width", "height", "kind"}`` per filled box, ``kind`` a ``pii.DETECTORS`` name."""
    detector_version: int


@dataclass
class FrameOutcome:
    """One frame of :func:`scrub_many`. ``ok`` False: unscrubbable, ``image`` is None and the
    exporter must leave the frame (and say so) rather than export it."""

    index: int
    source: str
    ok: bool
    image: bytes | None = None
    filled: list[dict[str, Any]] = field(default_factory=list)
    detector_version: int = pii.DETECTOR_VERSION
    scrub_version: int = SCRUB_VERSION
    tesseract_version: str | None = None
    error: str | None = None
    seconds: float = 0.0
    """Wall seconds the worker spent on the frame."""
    cpu_seconds: float = 0.0
    """CPU seconds of the worker and its tesseract on the frame (what the frame cost)."""


# ------------------------------------------------------------------ OCR output → boxes


def parse_tsv(tsv: str) -> list[OcrWord]:
    """Word rows (level 5 with non-blank text) of tesseract's TSV output. Raises ``ValueError``
    on anything but that format (the caller fails closed)."""
    rows = tsv.splitlines()
    if not rows or tuple(rows[0].split("\t")) != TSV_HEADER:
        raise ValueError(f"not tesseract TSV output: {rows[0][:80] if rows else '(empty)'!r}")
    words: list[OcrWord] = []
    for n, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        cols = row.split("\t")
        if len(cols) == 11:  # a row whose text is empty may lose its last tab
            cols.append("")
        if len(cols) != 12:
            raise ValueError(f"TSV row {n} has {len(cols)} columns")
        if cols[0] != "5" or not cols[11].strip():
            continue
        words.append(OcrWord(left=int(cols[6]), top=int(cols[7]), width=int(cols[8]),
                             height=int(cols[9]), conf=float(cols[10]), text=cols[11].strip(),
                             block=int(cols[2]), par=int(cols[3]), line=int(cols[4])))
    return words


def _paragraphs(words: Sequence[OcrWord]) -> list[list[int]]:
    """Indices of ``words`` grouped by (block, paragraph), in reading order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, w in enumerate(words):
        groups.setdefault((w.block, w.par), []).append(i)
    return list(groups.values())


GLUE_GAPS = (0.0, 0.85, 1.2)
"""The views: two words of a line closer than this many average character widths are read as
one word (0: only overlapping boxes). OCR splits a long monospace token at spurious spaces
0.6-0.95 characters wide; real spaces are 0.9-1.1 characters in a proportional font (digits are
wide) and ~1.4 in a monospace one (measured on DejaVu Sans and Sans Mono, 14-16 px, at 1x and
2x). No one threshold separates them, so each is a view of its own and their spans are united:
a looser view may fill a word next to a value (``ada@example.com about``: the email's
top-level domain runs into ``about``), never less than a tighter one finds."""


def _char_width(w: OcrWord) -> float:
    return w.width / max(1, len(w.text))


def _separator(prev: OcrWord, w: OcrWord, glue: float) -> str:
    if w.line != prev.line:
        return "\n"
    gap = w.left - (prev.left + prev.width)
    return "" if gap < glue * (_char_width(prev) + _char_width(w)) / 2 else " "


def _view(words: Sequence[OcrWord], para: Sequence[int], glue: float) -> tuple[str, list[int]]:
    """The paragraph as text, words closer than ``glue`` characters joined (:data:`GLUE_GAPS`),
    others by a space, lines by a newline; and, per
    character, the index in ``words`` of the word it belongs to (-1 for a separator)."""
    text: list[str] = []
    owner: list[int] = []
    prev: OcrWord | None = None
    for i in para:
        w = words[i]
        if prev is not None:
            s = _separator(prev, w, glue)
            text.append(s)
            owner.extend([-1] * len(s))
        text.append(w.text)
        owner.extend([i] * len(w.text))
        prev = w
    return "".join(text), owner


EXTEND_GAP = 3.0
"""A secret's fill extends over a neighbouring word of its line at most this many characters
away (:func:`_extend_secrets`); farther is another column, not a split."""


def _line_view(words: Sequence[OcrWord], line: Sequence[int], glued: set[int]) -> tuple[str, list[int]]:
    """One line's words joined by a space, except before the positions in ``glued`` (no space)."""
    text: list[str] = []
    owner: list[int] = []
    for k, i in enumerate(line):
        if k and k not in glued:
            text.append(" ")
            owner.append(-1)
        text.append(words[i].text)
        owner.extend([i] * len(words[i].text))
    return "".join(text), owner


def _extend_secrets(words: Sequence[OcrWord], line: Sequence[int], secret: set[int]) -> set[int]:
    """Words of ``line`` next to a word flagged ``secret`` that a secret detector claims too when
    the space between them is taken out (one gap at a time, kept while it holds): OCR cuts long
    tokens where it wants (``Bearer ghp_Alb2C3d4E5f6G7h819j 0K112M3n405p6Q7r8``, the gap wider
    than a space), and the detector that found the first piece decides about the rest. Secrets
    only: an email's top-level domain would run into any next word."""
    found: set[int] = set()
    glued: set[int] = set()
    changed = True
    while changed:
        changed = False
        for k in range(1, len(line)):
            a, b = line[k - 1], line[k]
            if k in glued or ((a in secret) == (b in secret)):
                continue
            wa, wb = words[a], words[b]
            if wb.left - (wa.left + wa.width) >= EXTEND_GAP * (_char_width(wa) + _char_width(wb)) / 2:
                continue
            text, owner = _line_view(words, line, glued | {k})
            if any(kind == "secret" and {a, b} <= set(owner[s:e]) for s, e, kind in pii.find_spans(text)):
                glued.add(k)
                new = b if a in secret else a
                secret.add(new)
                found.add(new)
                changed = True
    return found


def pii_words(words: Sequence[OcrWord]) -> list[tuple[int, str]]:
    """``(index in words, detector kind)`` of every word a PII span touches in any view of its
    paragraph: words joined by a space (``+44 20 7946 0958``), and glued where OCR split a token
    at a spurious space (:data:`GLUE_GAPS`: ``ghp_A1b2C3d4E5 f6G7h8I9j``, ``ada. lovelace@...``);
    then secrets extended over the pieces OCR cut off (:func:`_extend_secrets`). The union,
    sorted: a view can only add filling. Not one view joining every word: a token's neighbours
    keep their spaces in the tighter views, so a detector's "not after a letter" still holds
    there (``Bearer ghp_...``)."""
    out: set[tuple[int, str]] = set()
    for para in _paragraphs(words):
        for glue in GLUE_GAPS:
            text, owner = _view(words, para, glue)
            for s, e, kind in pii.find_spans(text):
                out.update((i, kind) for i in set(owner[s:e]) if i >= 0)
    secret = {i for i, kind in out if kind == "secret"}
    if secret:
        lines: dict[tuple[int, int, int], list[int]] = {}
        for i, w in enumerate(words):
            lines.setdefault((w.block, w.par, w.line), []).append(i)
        for line in lines.values():
            if secret.intersection(line):
                out.update((i, "secret") for i in _extend_secrets(words, line, secret))
    return sorted(out)


def pii_boxes(words: Sequence[OcrWord], *, scale: float = 1.0, size: tuple[int, int] | None = None,
              pad_x: float = PAD_X, pad_y: float = PAD_Y) -> list[dict[str, Any]]:
    """Boxes to fill, in the original image's pixels (OCR coordinates divided by ``scale``):
    per (paragraph line, kind) the union of the flagged words' boxes, padded by ``pad_x`` /
    ``pad_y`` times the line's height (at least 2 px) and clipped to ``size`` (width, height)."""
    hits = pii_words(words)
    groups: dict[tuple[int, int, int, str], list[OcrWord]] = {}
    for i, kind in hits:
        w = words[i]
        groups.setdefault((w.block, w.par, w.line, kind), []).append(w)
    line_height: dict[tuple[int, int, int], int] = {}
    for w in words:
        k = (w.block, w.par, w.line)
        line_height[k] = max(line_height.get(k, 0), w.height)
    boxes: list[dict[str, Any]] = []
    for (block, par, line, kind), ws in groups.items():
        h = line_height[(block, par, line)]
        px, py = max(2.0 * scale, pad_x * h), max(2.0 * scale, pad_y * h)  # >= 2 frame pixels
        x0 = (min(w.left for w in ws) - px) / scale
        y0 = (min(w.top for w in ws) - py) / scale
        x1 = (max(w.left + w.width for w in ws) + px) / scale
        y1 = (max(w.top + w.height for w in ws) + py) / scale
        x0, y0 = max(0, int(x0)), max(0, int(y0))
        x1, y1 = int(-(-x1 // 1)), int(-(-y1 // 1))  # ceil: never shrink a box
        if size is not None:
            x1, y1 = min(x1, size[0]), min(y1, size[1])
        if x1 > x0 and y1 > y0:
            boxes.append({"x": x0, "y": y0, "width": x1 - x0, "height": y1 - y0, "kind": kind})
    boxes.sort(key=lambda b: (b["y"], b["x"], b["kind"]))
    return boxes


# ------------------------------------------------------------------ tesseract


def _ocr_env(omp_thread_limit: int | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("OMP_THREAD_LIMIT", None)
    if omp_thread_limit is not None:
        env["OMP_THREAD_LIMIT"] = str(omp_thread_limit)
    return env


@lru_cache(maxsize=1)
def tesseract_version() -> str:
    """``tesseract --version``'s first line (``tesseract 5.3.0``). Raises
    :class:`UnscrubbableFrame` when tesseract is missing or broken."""
    exe = shutil.which(TESSERACT)
    if exe is None:
        raise UnscrubbableFrame(f"{TESSERACT} not found on PATH (Debian: apt-get install tesseract-ocr)")
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        raise UnscrubbableFrame(f"{TESSERACT} --version failed: {e}") from e
    first = (out.stdout or out.stderr).decode(errors="replace").strip().splitlines()
    if not first:
        raise UnscrubbableFrame(f"{TESSERACT} --version printed nothing")
    return first[0].strip()


def ocr_words(gray: Image.Image, *, timeout_s: float = OCR_TIMEOUT_S,
              omp_thread_limit: int | None = 1, psm: int = 3) -> list[OcrWord]:
    """Words tesseract reads in ``gray`` (an ``L`` image, sent as PGM on stdin). Raises
    :class:`UnscrubbableFrame` on any failure."""
    exe = shutil.which(TESSERACT)
    if exe is None:
        raise UnscrubbableFrame(f"{TESSERACT} not found on PATH (Debian: apt-get install tesseract-ocr)")
    buf = io.BytesIO()
    gray.save(buf, "PPM")  # PGM for mode L: no compression to pay for on either side of the pipe
    try:
        out = subprocess.run([exe, "stdin", "stdout", "--psm", str(psm), "-l", "eng", "tsv"],
                             input=buf.getvalue(), capture_output=True, timeout=timeout_s,
                             env=_ocr_env(omp_thread_limit))
    except subprocess.TimeoutExpired as e:
        raise UnscrubbableFrame(f"OCR timed out after {timeout_s:g} s") from e
    except OSError as e:
        raise UnscrubbableFrame(f"OCR could not run: {e}") from e
    if out.returncode != 0:
        tail = out.stderr.decode(errors="replace").strip()[-300:]
        raise UnscrubbableFrame(f"OCR exited with {out.returncode}: {tail}")
    try:
        return parse_tsv(out.stdout.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UnscrubbableFrame(f"OCR output unreadable: {e}") from e


# ------------------------------------------------------------------ one frame


def _decode(image_bytes: bytes) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(image_bytes))
        img.load()
    except Exception as e:  # noqa: BLE001 -- any decoder error means: cannot scrub (fail closed)
        raise UnscrubbableFrame(f"image cannot be decoded: {type(e).__name__}: {e}") from e
    return img


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "WEBP":
        img.save(buf, "WEBP", lossless=True, quality=0, method=0)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def scrub_frame(image_bytes: bytes, *, upscale: int = DEFAULT_UPSCALE, timeout_s: float = OCR_TIMEOUT_S,
                omp_thread_limit: int | None = 1) -> ScrubbedFrame:
    """The frame with every box of PII text filled solid; the same bytes when nothing was found.
    The output keeps the input's format when it is PNG or WebP (lossless), else PNG. Raises
    :class:`UnscrubbableFrame` when the frame cannot be decoded or OCR'd (fails closed)."""
    img = _decode(image_bytes)
    gray = img.convert("L")
    if upscale != 1:
        gray = gray.resize((gray.width * upscale, gray.height * upscale), Image.Resampling.BICUBIC)
    words = ocr_words(gray, timeout_s=timeout_s, omp_thread_limit=omp_thread_limit)
    boxes = pii_boxes(words, scale=upscale, size=img.size)
    if not boxes:
        return ScrubbedFrame(image_bytes, [], pii.DETECTOR_VERSION)
    fmt = img.format if img.format in ("PNG", "WEBP") else "PNG"
    if img.mode not in ("RGB", "RGBA", "L"):
        img = img.convert("RGBA" if "A" in img.getbands() or "transparency" in img.info else "RGB")
    fill: Any = {"RGB": FILL_RGB, "RGBA": (*FILL_RGB, 255), "L": 0}[img.mode]
    draw = ImageDraw.Draw(img)
    for b in boxes:
        draw.rectangle((b["x"], b["y"], b["x"] + b["width"] - 1, b["y"] + b["height"] - 1), fill=fill)
    return ScrubbedFrame(_encode(img, fmt or "PNG"), boxes, pii.DETECTOR_VERSION)


# ------------------------------------------------------------------ many frames, many processes

Frame = bytes | str | os.PathLike[str]


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (the tesseract runs)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _scrub_one(index: int, frame: Frame, upscale: int, timeout_s: float,
               omp_thread_limit: int | None) -> FrameOutcome:
    """One frame in a worker process: never raises, an error is an outcome with ``ok=False``."""
    source = "<bytes>" if isinstance(frame, bytes) else os.fspath(frame)
    t0, c0 = time.perf_counter(), _cpu()
    try:
        version = tesseract_version()
        data = frame if isinstance(frame, bytes) else Path(frame).read_bytes()
        image, filled, dv = scrub_frame(data, upscale=upscale, timeout_s=timeout_s,
                                        omp_thread_limit=omp_thread_limit)
    except Exception as e:  # noqa: BLE001 -- whatever went wrong, the frame is unscrubbable
        return FrameOutcome(index, source, ok=False, error=f"{type(e).__name__}: {e}",
                            seconds=time.perf_counter() - t0, cpu_seconds=_cpu() - c0)
    return FrameOutcome(index, source, ok=True, image=image, filled=filled, detector_version=dv,
                        tesseract_version=version, seconds=time.perf_counter() - t0, cpu_seconds=_cpu() - c0)


def scrub_many(frames: Iterable[Frame], *, workers: int = 1,
               progress: Callable[[int, int | None], None] | None = None,
               upscale: int = DEFAULT_UPSCALE, timeout_s: float = OCR_TIMEOUT_S,
               omp_thread_limit: int | None = 1, in_flight: int | None = None) -> Iterator[FrameOutcome]:
    """Scrub ``frames`` (encoded images, or paths a worker reads itself) in ``workers`` processes
    (one tesseract thread each); yields one :class:`FrameOutcome` per frame **in input order**,
    with at most ``in_flight`` (default ``4 * workers``) frames pending, so a 10k-frame export
    holds a few images in memory, not all. ``progress(done, total)`` after each frame (``total``
    None when ``frames`` has no length). A frame that fails, or whose worker died, is an outcome
    with ``ok=False`` and no image (fails closed)."""
    total = len(frames) if isinstance(frames, Sequence) else None
    limit = max(1, in_flight or 4 * max(1, workers))
    done = 0
    # forkserver: the exporter may run threads (Kafka, ClickHouse clients); forking them is unsafe.
    ctx = multiprocessing.get_context("forkserver")
    pending: deque[tuple[int, str, Future[FrameOutcome]]] = deque()
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=ctx) as pool:
        def finish() -> FrameOutcome:
            nonlocal done
            i, source, fut = pending.popleft()
            try:
                out = fut.result()
            except Exception as e:  # noqa: BLE001 -- a dead worker: the frame is unscrubbable
                out = FrameOutcome(i, source, ok=False, error=f"worker failed: {type(e).__name__}: {e}")
            done += 1
            if progress is not None:
                progress(done, total)
            return out

        for i, frame in enumerate(frames):
            source = "<bytes>" if isinstance(frame, bytes) else os.fspath(frame)
            pending.append((i, source, pool.submit(_scrub_one, i, frame, upscale, timeout_s, omp_thread_limit)))
            while len(pending) >= limit:
                yield finish()
        while pending:
            yield finish()
