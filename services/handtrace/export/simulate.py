"""Simulated demonstrations, stored exactly as the sink stores them (issue #12: the exporter's
tests and the export benchmark, "1,000 simulated demonstrations of ~50 steps each").

:func:`seed_demonstrations` writes ``n`` complete demonstrations straight into ``frames``,
``demonstration_events`` and ``demonstrations`` (that order, the ``complete`` row last, as
``sink/demonstrations.py`` does) and their PNG frames into the frame store at
``framestore.frame_key`` (objects before rows: never a row without its object).

What a demonstration looks like (docs/design/demonstrations.md; rules of ``export/actions.py``):

- a plan of ``steps - 1`` actions drawn from click, doubleClick, rightClick, dragTo, scroll /
  hscroll, write (some masked: ``•`` and ``MASKED_KEYSYM`` as the stream stores them), press
  (Return right after typing, BackSpace x n, Tab, Escape, arrows), hotkey (ctrl/alt chords) and
  wait (a pause over ``wait_threshold_s``); reduction adds ``terminate``, so reducing the events
  gives exactly ``steps`` actions, named as ``SeedResult.actions`` says;
- pointer moves (an eased path, ~60 Hz) before pointer actions, focus changes (app, title or
  none, browser URLs with path and query) between some; every event carries its window's
  ``app_id`` and ``url`` (``window_title`` only on ``focus_change``), as the agent stamps them;
- gaps between actions of 1.1-2.6 s (over every merge window: double click 0.5 s, bursts 1 s;
  under the 3 s wait threshold), waits of 3.6-9 s; timestamps strictly increase;
- one frame per action start as the agent's ``ActionSegmenter`` sees it (click -- each press of
  a double click --, drag, scroll burst, typing burst, hotkey): grabbed shortly before, its
  ``action_started_at`` the token's time and ``action_event_id`` its event; plus the ``end``
  frame. A press of a double click reuses the first press's frame (same sha256, as the agent's
  "last distinct frame" does).

Frames are synthetic screens (Pillow, DejaVu fonts): tiled windows (title bar, URL bar for
browsers, text lines or a terminal), the top strip filled solid as the agent fills what is no
window; per step the focused window's status line (clock of the grab), a highlight and the
pointer at the target, the last typed text (bullets when masked) and, with probability
``pii_frames``, a panel with an email address, a card number and/or an API key, kept clear of the
pointer so OCR can read every string (``SeedResult.pii``: sha256 -> the strings drawn; a frame
whose pointer leaves no room shows none, so the share is a little under ``pii_frames``).
Speed: the PNG is assembled from deflate
streams of 16-row bands (each flushed to a byte boundary, so they concatenate); a demonstration's
base screen is compressed once, a frame recompresses only the bands it changes.

Columns, not objects: events are written into preallocated numpy columns a slice per action
(never a Python object per event) and inserted per batch of demonstrations as Arrow.

Re-running with the same arguments (and ``t0_us``) writes the same ids, rows and objects; inserts
carry deterministic ``insert_deduplication_token``s, so a repeated seed does not add rows.

Bench entry: ``python -m handtrace.export.simulate --dsn chdb:///tmp/x --store file:///tmp/y -n 1000``.
"""

from __future__ import annotations

import argparse
import hashlib
import struct
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageDraw, ImageFont

from handtrace.core.framestore import FrameStore, frame_key
from handtrace.core.pii import MASK_CHAR, MASKED_KEYSYM
from handtrace.core.rows import (
    DEMONSTRATION_EVENTS_SCHEMA,
    DEMONSTRATIONS_SCHEMA,
    FRAMES_SCHEMA,
    TS,
    UUID_BYTES,
    ipc_stream,
)

# ------------------------------------------------------------------ tables (as the sink writes them)

EVENTS_SCHEMA = DEMONSTRATION_EVENTS_SCHEMA
"""The tables' Arrow schemas are ``core.rows``' (shared with the sink)."""

# ------------------------------------------------------------------ vocabulary of the simulation

DEFAULT_APPS = ("org.gnome.TextEditor", "firefox", "org.gnome.Terminal", "libreoffice-calc",
                "thunderbird", "code")
BROWSERS = frozenset({"firefox", "chromium", "google-chrome", "Navigator", "microsoft-edge"})
CONSENT_VERSION = "2026-01"
POLICY_VERSION = "7"
AGENT_VERSION = "0.1.0"
DEMO_SPACING_US = 15 * 60 * 1_000_000
"""Demonstration i starts at ``t0 + i * 15 min`` (one takes 2-4 min)."""

INSTRUCTIONS = (
    "Rename the quarterly report and share it with the team",
    "File the travel expense for the Berlin trip",
    "Close the resolved support tickets in the queue",
    "Update the onboarding checklist in the wiki",
    "Sort the budget sheet by department and save it",
    "Reply to the vendor about the delivery date",
    "Run the test suite and fix the failing lint check",
    "Archive last month's newsletters",
    "Add the new laptop models to the inventory sheet",
    "Change the meeting room booking to Thursday",
    "Export the sales dashboard as a spreadsheet",
    "Move the design notes into the shared folder",
)
TEXT_LINES = (
    "Meeting notes for the quarterly review", "Revenue grew in every region this year",
    "Action items are listed at the end of the page", "The new process starts next month",
    "Please review the attached figures before Friday", "Inventory counts were checked twice",
    "Budget requests go through the finance portal", "The release is planned for the spring",
    "Customer feedback improved after the update", "Training sessions are booked for all teams",
    "Open questions remain about the vendor contract", "Draft version two with comments resolved",
    "Summary of the support queue for this week", "Shipping times fell by a third",
)
TYPED = (
    "quarterly report final", "travel expense Berlin", "resolved", "onboarding checklist",
    "department", "delivery date confirmed", "make lint", "newsletter archive", "ThinkPad X1 Carbon",
    "Thursday 10:00", "sales dashboard", "design notes", "Thanks, see you then", "status update",
)
URLS = (
    "https://intranet.example.com/wiki/Travel_policy?tab=history",
    "https://crm.example.net/accounts/4821/edit?section=billing",
    "https://docs.example.org/handbook/onboarding#laptops",
    "https://tickets.example.com/queue/support?status=open&sort=age",
    "https://sheets.example.com/d/budget-2026/edit?gid=3",
)
TITLES: dict[str, tuple[str | None, ...]] = {
    "org.gnome.TextEditor": ("report.txt — Text Editor", "notes.md — Text Editor", None),
    "firefox": ("Travel policy — Intranet — Mozilla Firefox", "Support queue — Mozilla Firefox", None),
    "org.gnome.Terminal": ("build — Terminal", None),
    "libreoffice-calc": ("budget.ods — LibreOffice Calc", None),
    "thunderbird": ("Inbox — Mail", None),
    "code": ("main.py — project — Visual Studio Code", None),
}
PII_EMAILS = ("ada.lovelace@example.com", "grace.hopper@example.org", "alan.turing@example.net",
              "katherine.johnson@example.com")
PII_CARDS = ("4111 1111 1111 1111", "5555 5555 5555 4444", "4012 8888 8888 1881")
_ALNUM = np.frombuffer(b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnpqrstuvwxyz23456789", dtype=np.uint8)
"""Key characters without the ones OCR confuses (I l 1, O o 0): tests compare OCR with them."""

ACTION_WEIGHTS: dict[str, float] = {
    "click": 0.28, "doubleClick": 0.05, "rightClick": 0.03, "dragTo": 0.06, "scroll": 0.10,
    "hscroll": 0.02, "write": 0.18, "press": 0.08, "hotkey": 0.08, "wait": 0.06, "tripleClick": 0.01,
}
"""Shares of planned actions (reduction names; ``terminate`` is added by reduction)."""

KINDS = ("pointer_move", "click", "scroll", "key_down", "key_up", "focus_change")
MOVE, CLICK, SCROLL, KEY_DOWN, KEY_UP, FOCUS = range(6)
BUTTONS = ("none", "left", "right", "middle")
SHIFT, CTRL, ALT = 1, 2, 4
K_SHIFT, K_CTRL, K_ALT = 0xFFE1, 0xFFE3, 0xFFE9
_HOTKEYS = ((CTRL, ord("s")), (CTRL, ord("c")), (CTRL, ord("v")), (CTRL, ord("z")), (CTRL | SHIFT, ord("t")),
            (ALT, 0xFF09), (CTRL, ord("f")), (CTRL, 0xFF0D))
_PRESS_KEYS = (0xFF09, 0xFF1B, 0xFF54, 0xFF52, 0xFF08)  # Tab, Escape, Down, Up, BackSpace
_RETURN, _BACKSPACE = 0xFF0D, 0xFF08
_TEXT_TABLE = pa.array([chr(c) for c in range(0x20, 0x7F)] + [MASK_CHAR])
_MASK_TEXT = 0x7F - 0x20
_NULL = np.iinfo(np.int32).min
FRAME_KINDS = ("text", "plain")
WORKSPACES = 24
"""Distinct screen arrangements per seeding (each demonstration uses one; base screens cached)."""


@dataclass
class SeedResult:
    """What :func:`seed_demonstrations` wrote."""

    demonstration_ids: list[str]
    """UUID strings, in start order."""
    participants: list[str]
    """Employee keys (pseudonyms: 64 hex) of the participants."""
    events: int
    """``demonstration_events`` rows."""
    frames: int
    """``frames`` rows."""
    bytes: int
    """Bytes of the distinct frame objects written."""
    pii: dict[str, list[str]]
    """sha256 of a frame -> the PII strings drawn on it."""
    seconds: float
    objects: int = 0
    """Distinct frame objects written."""
    actions: dict[str, list[str]] = field(default_factory=dict)
    """Demonstration id -> the action names reduction must give (``terminate`` last)."""
    cohorts: dict[str, str] = field(default_factory=dict)
    """Employee key -> cohort."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds per phase: events (simulation + Arrow), images (render + encode + hash), store
    (waiting for the object writes), insert (ClickHouse)."""

    def summary(self) -> str:
        """One line for logs and the bench."""
        s = max(self.seconds, 1e-9)
        return (f"{len(self.demonstration_ids)} demonstrations, {len(self.participants)} participants, "
                f"{self.events} events, {self.frames} frames ({self.objects} objects, "
                f"{self.bytes / 1e6:.1f} MB), {len(self.pii)} frames with PII in {self.seconds:.1f} s: "
                f"{len(self.demonstration_ids) / s:.1f} demonstrations/s, {self.events / s:,.0f} events/s, "
                f"{self.frames / s:.0f} frames/s; "
                + ", ".join(f"{k} {v:.1f} s" for k, v in self.timings.items()))


# ------------------------------------------------------------------ ids


def uuid7s(t_us: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """UUIDv7 of each time (ms prefix, random tail) as an (n, 16) uint8 array."""
    n = len(t_us)
    out = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    ms = (np.asarray(t_us, dtype=np.int64) // 1000).astype(">u8").view(np.uint8).reshape(n, 8)[:, 2:]
    out[:, :6] = ms
    out[:, 6] = (out[:, 6] & 0x0F) | 0x70
    out[:, 8] = (out[:, 8] & 0x3F) | 0x80
    return out


def _fixed16(a: np.ndarray) -> pa.Array:
    """(n, 16) uint8 -> Arrow fixed_size_binary(16) without a Python object per row."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    return pa.Array.from_buffers(UUID_BYTES, len(a), [None, pa.py_buffer(a.tobytes())])


def _uuid_str(b: bytes) -> str:
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# ------------------------------------------------------------------ PNG from deflated bands

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
BAND = 16
_ADLER_BASE = 65521


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _adler_combine(a1: int, a2: int, len2: int) -> int:
    """zlib's adler32_combine: the Adler-32 of A+B from those of A and B (and B's length)."""
    rem = len2 % _ADLER_BASE
    s1 = a1 & 0xFFFF
    s2 = (rem * s1) % _ADLER_BASE
    s1 += (a2 & 0xFFFF) + _ADLER_BASE - 1
    s2 += (a1 >> 16) + (a2 >> 16) + _ADLER_BASE - rem
    s1 %= _ADLER_BASE
    s2 %= _ADLER_BASE
    return s1 | (s2 << 16)


@dataclass
class _Band:
    comp: bytes   # raw deflate, ends on a byte boundary (sync flush), never final
    adler: int    # adler32 of the filtered rows
    size: int     # length of the filtered rows


def _bands(rgb: np.ndarray, level: int) -> list[_Band]:
    """Bands (BAND rows, the last may be shorter) of ``rgb`` rows, filter type 0 (None)."""
    h, w, _ = rgb.shape
    rows = np.empty((h, 1 + 3 * w), dtype=np.uint8)
    rows[:, 0] = 0
    rows[:, 1:] = rgb.reshape(h, 3 * w)
    out = []
    for i in range(0, h, BAND):
        raw = rows[i:i + BAND].tobytes()
        c = zlib.compressobj(level, zlib.DEFLATED, -15, 9)
        out.append(_Band(c.compress(raw) + c.flush(zlib.Z_SYNC_FLUSH), zlib.adler32(raw), len(raw)))
    return out


def _png(width: int, height: int, bands: Sequence[_Band]) -> bytes:
    adler = 1
    for b in bands:
        adler = _adler_combine(adler, b.adler, b.size)
    # 0x78 0x01: zlib header; 0x03 0x00: an empty final fixed-Huffman block ends the stream.
    idat = b"".join([b"\x78\x01", *(b.comp for b in bands), b"\x03\x00", struct.pack(">I", adler)])
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _PNG_SIG + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


# ------------------------------------------------------------------ screens

FONT_DIR = "/usr/share/fonts/truetype/dejavu"
SANS, MONO = f"{FONT_DIR}/DejaVuSans.ttf", f"{FONT_DIR}/DejaVuSansMono.ttf"
FILL_RGB = (0, 0, 0)
TOP = 28
"""Height of the top strip (panel): no window there, so filled at capture."""


@lru_cache(maxsize=16)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@dataclass(frozen=True)
class _Win:
    app_id: str
    url: str | None
    x: int
    y: int
    w: int
    h: int

    @property
    def body_top(self) -> int:
        return self.y + 26 + (30 if self.url else 0)

    @property
    def status(self) -> tuple[int, int, int, int]:
        return (self.x + 1, self.y + self.h - 24, self.x + self.w - 1, self.y + self.h - 1)

    def meta(self) -> dict[str, Any]:
        return {"app_id": self.app_id, "url": self.url, "x": self.x, "y": self.y, "width": self.w,
                "height": self.h}


def _layout(kind: int, n_windows: int, w: int, h: int) -> list[tuple[int, int, int, int]]:
    """Tiled window rectangles below the top strip (windows + the strip cover the screen)."""
    hh = h - TOP
    if n_windows == 1:
        return [(0, TOP, w, hh)]
    split = int(w * (0.5 + 0.1 * (kind % 2)))
    if n_windows == 2:
        return [(0, TOP, split, hh), (split, TOP, w - split, hh)]
    half = hh // 2
    return [(0, TOP, split, hh), (split, TOP, w - split, half), (split, TOP + half, w - split, hh - half)]


def _terminal(app_id: str) -> bool:
    return "terminal" in app_id.lower() or app_id in ("code", "xterm", "konsole")


Op = tuple[int, int, Callable[[Image.Image, int], None]]
"""A drawing on a screen: rows [y0, y1] it touches, draw(image, dy) with y shifted by dy."""


@lru_cache(maxsize=8192)
def _glyph(path: str, size: int, ch: str) -> tuple[Image.Image | None, int, int, float]:
    """One character's coverage mask, its offset from the pen and its advance."""
    font = _font(path, size)
    adv = float(font.getlength(ch))
    x0, y0, x1, y1 = (int(v) for v in font.getbbox(ch))
    if x1 <= x0 or y1 <= y0:
        return None, 0, 0, adv
    mask = Image.new("L", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(mask).text((-x0, -y0), ch, font=font, fill=255)
    return mask, x0, y0, adv


@lru_cache(maxsize=2048)
def _string_mask(path: str, size: int, s: str) -> tuple[Image.Image, int]:
    """The coverage mask of ``s`` set from cached glyphs (no kerning) and its top offset."""
    glyphs = [_glyph(path, size, ch) for ch in s]
    top = min((g[2] for g in glyphs if g[0] is not None), default=0)
    bottom = max((g[2] + g[0].height for g in glyphs if g[0] is not None), default=1)
    width = int(sum(g[3] for g in glyphs)) + size
    mask = Image.new("L", (max(1, width), max(1, bottom - top)), 0)
    pen = 0.0
    for m, ox, oy, adv in glyphs:
        if m is not None:
            mask.paste(255, (round(pen) + ox, oy - top), m)
        pen += adv
    return mask, top


def draw_text(img: Image.Image, x: int, y: int, s: str, path: str, size: int, ink: tuple[int, int, int]) -> None:
    """``s`` at (x, y) (top-left, as ``ImageDraw.text``): one paste of a cached string mask --
    FreeType per call dominated frame time."""
    if s:
        mask, top = _string_mask(path, size, s)
        img.paste(ink, (x, y + top), mask)


class _Screen:
    """A rendered screen: the Pillow image and its compressed bands."""

    def __init__(self, img: Image.Image, bands: list[_Band]) -> None:
        self.img = img
        self.bands = bands

    @classmethod
    def render(cls, size: tuple[int, int], wins: list[_Win], frame_kind: str, variant: int) -> _Screen:
        img = Image.new("RGB", size, FILL_RGB)
        d = ImageDraw.Draw(img)
        for k, win in enumerate(wins):
            dark = _terminal(win.app_id)
            body = (30, 32, 36) if dark else (250, 250, 250)
            ink = (215, 215, 215) if dark else (25, 25, 25)
            d.rectangle((win.x, win.y, win.x + win.w - 1, win.y + win.h - 1), fill=body, outline=(90, 90, 90))
            d.rectangle((win.x, win.y, win.x + win.w - 1, win.y + 25), fill=(48, 52, 60))
            draw_text(img, win.x + 10, win.y + 5, win.app_id, SANS, 13, (235, 235, 235))
            if win.url:
                d.rectangle((win.x + 8, win.y + 30, win.x + win.w - 9, win.y + 52), fill=(232, 234, 238),
                            outline=(180, 180, 190))
                draw_text(img, win.x + 14, win.y + 33, win.url, SANS, 13, (40, 40, 40))
            d.rectangle(win.status, fill=(225, 227, 231) if not dark else (50, 52, 58))
            if frame_kind != "text":
                continue
            y = win.body_top + 30
            i = variant * 3 + k
            while y < win.y + win.h - 150:
                line = TEXT_LINES[i % len(TEXT_LINES)]
                if dark:
                    draw_text(img, win.x + 14, y, f"$ {line.lower().replace(' ', '_')[:40]}", MONO, 14, ink)
                else:
                    draw_text(img, win.x + 18, y, line, SANS, 15, ink)
                y += 26
                i += 1
        return cls(img, _bands(np.asarray(img, dtype=np.uint8), 6))

    def with_ops(self, ops: list[Op], level: int = 1) -> tuple[list[_Band], dict[int, Image.Image]]:
        """The bands after ``ops`` drawn over copies of the rows they touch (other bands are
        shared), and those copies by first row."""
        bands = list(self.bands)
        h = self.img.height
        dirty = sorted({b for y0, y1, _ in ops for b in range(max(0, y0) // BAND, min(h - 1, max(0, y1)) // BAND + 1)})
        runs: list[list[int]] = []
        for b in dirty:
            if runs and runs[-1][-1] == b - 1:
                runs[-1].append(b)
            else:
                runs.append([b])
        crops: dict[int, Image.Image] = {}
        for run in runs:
            y0, y1 = run[0] * BAND, min(h, (run[-1] + 1) * BAND)
            crop = self.img.crop((0, y0, self.img.width, y1))
            for oy0, oy1, fn in ops:
                if oy1 >= y0 and oy0 < y1:
                    fn(crop, -y0)
            bands[run[0]:run[-1] + 1] = _bands(np.asarray(crop, dtype=np.uint8), level)
            crops[y0] = crop
        return bands, crops

    def derive(self, ops: list[Op]) -> _Screen:
        """A new screen: this one with ``ops`` drawn (compressed as the base is)."""
        bands, crops = self.with_ops(ops, level=6)
        img = self.img.copy()
        for y0, crop in crops.items():
            img.paste(crop, (0, y0))
        return _Screen(img, bands)


def _cursor(x: int, y: int) -> Op:
    def draw(img: Image.Image, dy: int) -> None:
        pts = [(x, y + dy), (x, y + 17 + dy), (x + 4, y + 13 + dy), (x + 7, y + 19 + dy), (x + 9, y + 18 + dy),
               (x + 6, y + 12 + dy), (x + 11, y + 12 + dy)]
        ImageDraw.Draw(img).polygon(pts, fill=(0, 0, 0), outline=(255, 255, 255))
    return y, y + 20, draw


def _rect(box: tuple[int, int, int, int], fill: tuple[int, int, int] | None,
          outline: tuple[int, int, int] | None = None) -> Op:
    x0, y0, x1, y1 = box

    def draw(img: Image.Image, dy: int) -> None:
        ImageDraw.Draw(img).rectangle((x0, y0 + dy, x1, y1 + dy), fill=fill, outline=outline)
    return y0, y1, draw


def _text(x: int, y: int, s: str, path: str, size: int, ink: tuple[int, int, int]) -> Op:
    def draw(img: Image.Image, dy: int) -> None:
        draw_text(img, x, y + dy, s, path, size, ink)
    return y, y + size + 6, draw


# ------------------------------------------------------------------ event columns


class _Columns:
    """The events of a batch as preallocated numpy columns, filled one slice per action."""

    INT32 = ("x", "y", "sdx", "sdy", "key", "mods", "text", "win", "title")
    x: np.ndarray
    y: np.ndarray
    sdx: np.ndarray
    sdy: np.ndarray
    key: np.ndarray
    mods: np.ndarray
    text: np.ndarray
    win: np.ndarray
    title: np.ndarray

    def __init__(self, cap: int = 1 << 16) -> None:
        self.n = 0
        self.cap = 0
        self.t = np.empty(0, np.int64)
        self.demo = np.empty(0, np.int32)
        self.kind = np.empty(0, np.int8)
        self.button = np.empty(0, np.int8)
        self.pressed = np.empty(0, np.int8)
        self.masked = np.empty(0, np.bool_)
        for c in self.INT32:
            setattr(self, c, np.empty(0, np.int32))
        self._grow(cap)

    def _grow(self, cap: int) -> None:
        def ext(a: np.ndarray, fill: Any) -> np.ndarray:
            b = np.full(cap, fill, dtype=a.dtype)
            b[: self.n] = a[: self.n]
            return b
        self.t, self.demo, self.kind = ext(self.t, 0), ext(self.demo, 0), ext(self.kind, 0)
        self.button, self.pressed, self.masked = ext(self.button, 0), ext(self.pressed, -1), ext(self.masked, False)
        for c in self.INT32:
            setattr(self, c, ext(getattr(self, c), -1 if c in ("text", "title") else _NULL))
        self.cap = cap

    def add(self, m: int, **cols: Any) -> int:
        """Append ``m`` events (columns: scalars or length-``m`` arrays); returns the first row."""
        if self.n + m > self.cap:
            self._grow(max(2 * self.cap, self.n + m))
        s = slice(self.n, self.n + m)
        for k, v in cols.items():
            getattr(self, k)[s] = v
        first = self.n
        self.n += m
        return first


# ------------------------------------------------------------------ one demonstration


@dataclass
class _FramePlan:
    step: int
    reason: str
    captured_at: int
    action_started_at: int | None
    event_row: int | None       # batch row of the token event (action_event_id)
    x: int
    y: int
    win: int                    # index into the demo's windows
    typed: str | None           # the text field's content (bullets when masked)
    reuse: bool = False         # same image as the previous frame (a double click's 2nd press)


@dataclass
class _Demo:
    index: int
    demo_id: bytes
    employee_key: str
    device_key: str
    cohort: str
    instruction: str
    started_at: int
    ended_at: int
    wins: list[_Win]
    titles: list[str | None]
    layout: int
    variant: int
    first_row: int              # its events: batch rows [first_row, last_row)
    last_row: int
    frames: list[_FramePlan]
    actions: list[str]


def _plan(rng: np.random.Generator, k: int) -> list[str]:
    names = list(ACTION_WEIGHTS)
    p = np.array([ACTION_WEIGHTS[a] for a in names])
    plan = [names[i] for i in rng.choice(len(names), size=k, p=p / p.sum())]
    for i, a in enumerate(plan):  # a wait is a gap between two actions: never first, last or doubled
        if a == "wait" and (i == 0 or i == k - 1 or plan[i - 1] == "wait"):
            plan[i] = "click"
    if plan and plan[0] == "press":  # the agent grabs no frame for a lone key press: none before it
        plan[0] = "click"
    return plan


class _Simulator:
    """Builds the events, frames and rows of a batch of demonstrations."""

    def __init__(self, rng: np.random.Generator, screen: tuple[int, int], apps: Sequence[str],
                 frame_kind: str, pii_frames: float) -> None:
        self.rng = rng
        self.screen = screen
        self.apps = list(apps)
        self.frame_kind = frame_kind
        self.pii_frames = pii_frames
        self._screens: dict[tuple[Any, ...], _Screen] = {}
        self.workspaces = [self._workspace() for _ in range(WORKSPACES)]
        self.cols = _Columns()
        self.win_table: dict[tuple[str, str | None], int] = {}
        self.title_table: dict[str, int] = {}

    def _workspace(self) -> tuple[int, list[_Win], int]:
        """A screen arrangement: 1-3 tiled windows of distinct apps (browsers with a URL)."""
        rng = self.rng
        n_w = min(int(rng.integers(1, 4)), len(self.apps))
        apps = [self.apps[i] for i in rng.choice(len(self.apps), size=n_w, replace=False)]
        layout = int(rng.integers(0, 2))
        rects = _layout(layout, n_w, *self.screen)
        wins = [_Win(a, URLS[int(rng.integers(len(URLS)))] if a in BROWSERS else None, *r)
                for a, r in zip(apps, rects, strict=True)]
        return layout, wins, int(rng.integers(4))

    def reset(self) -> None:
        self.cols = _Columns(self.cols.cap)
        self.win_table = {}
        self.title_table = {}

    # -- helpers ----------------------------------------------------------------------------

    def _u(self, lo: float, hi: float) -> float:
        return float(self.rng.uniform(lo, hi))

    def _ms(self, lo: float, hi: float) -> int:
        """A duration in µs, uniform in [lo, hi] milliseconds."""
        return int(self.rng.uniform(lo, hi) * 1000)

    def _wid(self, w: _Win) -> int:
        return self.win_table.setdefault((w.app_id, w.url), len(self.win_table))

    def _title(self, title: str | None) -> int:
        """Index of a window title in the batch's title table; -1 for none."""
        return -1 if title is None else self.title_table.setdefault(title, len(self.title_table))

    def _target(self, w: _Win) -> tuple[int, int]:
        return (int(self.rng.integers(w.x + 20, w.x + w.w - 20)),
                int(self.rng.integers(w.body_top + 10, w.y + w.h - 40)))

    # -- event runs ------------------------------------------------------------------------

    def _moves(self, d: int, win: int, t0: int, t1: int, p0: tuple[int, int], p1: tuple[int, int]) -> None:
        """Pointer moves from p0 to p1 over (t0, t1): ~60 Hz, fast then slow (ease out)."""
        m = max(2, (t1 - t0) // 16_000)
        f = np.arange(1, m + 1) / m
        e = 1 - (1 - f) ** 3
        w, h = self.screen
        jitter = self.rng.normal(0, 1.5, size=(2, m)) * (1 - f)
        x = np.clip(np.rint(p0[0] + (p1[0] - p0[0]) * e + jitter[0]), 0, w - 1).astype(np.int32)
        y = np.clip(np.rint(p0[1] + (p1[1] - p0[1]) * e + jitter[1]), 0, h - 1).astype(np.int32)
        x[-1], y[-1] = p1
        t = t0 + np.rint((t1 - t0) * f).astype(np.int64)
        self.cols.add(m, t=t, demo=d, kind=MOVE, x=x, y=y, win=win)

    def _keys(self, d: int, win: int, t: int, codes: np.ndarray, mods: np.ndarray | int,
              text: np.ndarray | int, masked: bool, gap: tuple[float, float]) -> tuple[int, int]:
        """key_down/key_up pairs of ``codes`` typed from ``t`` (intervals ``gap`` ms); returns
        (first row, time of the last key_up)."""
        n = len(codes)
        steps = self.rng.uniform(*gap, size=n) * 1000
        steps[0] = 0
        downs = t + np.cumsum(steps).astype(np.int64)
        ups = downs + (self.rng.uniform(25, 70, size=n) * 1000).astype(np.int64)
        tt = np.empty(2 * n, np.int64)
        tt[0::2], tt[1::2] = downs, ups
        kind = np.empty(2 * n, np.int8)
        kind[0::2], kind[1::2] = KEY_DOWN, KEY_UP
        key = np.repeat(codes.astype(np.int32), 2)
        mm = np.repeat(np.broadcast_to(np.asarray(mods, np.int32), n), 2)
        tx = np.full(2 * n, -1, np.int32)
        tx[0::2] = text
        mk = np.zeros(2 * n, np.bool_)
        if masked:
            mk[0::2] = True
        first = self.cols.add(2 * n, t=tt, demo=d, kind=kind, key=key, mods=mm, text=tx, masked=mk, win=win)
        return first, int(ups[-1])

    # -- a demonstration --------------------------------------------------------------------

    def demo(self, d: int, demo_id: bytes, employee_key: str, device_key: str, cohort: str,
             start: int, steps: int) -> _Demo:
        """Plan one demonstration and append its events (batch index ``d``) to the columns."""
        rng = self.rng
        layout, wins, variant = self.workspaces[int(rng.integers(len(self.workspaces)))]
        n_w = len(wins)
        apps = [w.app_id for w in wins]
        titles = [(TITLES.get(a) or (f"{a} — Document", None))[int(rng.integers(len(TITLES.get(a) or (0, 0))))]
                  for a in apps]
        wid = [self._wid(w) for w in wins]
        plan = _plan(rng, steps - 1)
        c = self.cols
        first_row = c.n
        t = start + self._ms(300, 1000)
        cur = int(rng.integers(n_w))
        c.add(1, t=t, demo=d, kind=FOCUS, win=wid[cur],
              title=self._title(titles[cur]))
        pos = self._target(wins[cur])
        frames: list[_FramePlan] = []
        typed: str | None = None
        prev = "start"
        end = t
        for a in plan:
            if a == "wait":
                t = end + self._ms(3600, 9000)
                prev = a
                continue
            gap_end = (end if prev != "wait" else t) + self._ms(1100, 2600)
            if a == "press" and prev == "write":
                gap_end = end + self._ms(150, 400)  # Return right after typing
            t_focus = end + self._ms(150, 400)
            if n_w > 1 and a != "press" and rng.random() < 0.15:
                cur = (cur + 1 + int(rng.integers(n_w - 1))) % n_w
                c.add(1, t=t_focus, demo=d, kind=FOCUS, win=wid[cur],
                      title=self._title(titles[cur]))
            w = wins[cur]
            tok = gap_end
            pointer = a in ("click", "doubleClick", "tripleClick", "rightClick", "dragTo", "scroll", "hscroll")
            target = self._target(w) if pointer else pos
            if pointer:
                m0 = max(t_focus + 20_000, tok - self._ms(250, 800))
                self._moves(d, wid[cur], m0, tok - self._ms(8, 30), pos, target)
                pos = target
            grab = tok - self._ms(20, 150)
            x, y = pos
            if a in ("click", "doubleClick", "tripleClick", "rightClick"):
                n = {"click": 1, "doubleClick": 2, "tripleClick": 3, "rightClick": 1}[a]
                button = 2 if a == "rightClick" else 1
                tt = tok
                for i in range(n):
                    px = min(max(x + (int(rng.integers(-2, 3)) if i else 0), 0), self.screen[0] - 1)
                    py = min(max(y + (int(rng.integers(-2, 3)) if i else 0), 0), self.screen[1] - 1)
                    up = tt + self._ms(50, 110)
                    row = c.add(2, t=np.array([tt, up]), demo=d, kind=CLICK, x=px, y=py, button=button,
                                pressed=np.array([1, 0], np.int8), win=wid[cur])
                    frames.append(_FramePlan(0, "click", grab, tt, row, x, y, cur, typed, reuse=i > 0))
                    end = up
                    tt = up + self._ms(90, 140)
            elif a == "dragTo":
                row = c.add(1, t=tok, demo=d, kind=CLICK, x=x, y=y, button=1, pressed=1, win=wid[cur])
                frames.append(_FramePlan(0, "drag", grab, tok, row, x, y, cur, typed))
                dest = self._target(w)
                while max(abs(dest[0] - x), abs(dest[1] - y)) <= 20:
                    dest = self._target(w)
                t_up = tok + self._ms(350, 900)
                self._moves(d, wid[cur], tok + 16_000, t_up - 16_000, (x, y), dest)
                c.add(1, t=t_up, demo=d, kind=CLICK, x=dest[0], y=dest[1], button=1, pressed=0, win=wid[cur])
                pos, end = dest, t_up
            elif a in ("scroll", "hscroll"):
                k = int(rng.integers(2, 9))
                sign = 1 if rng.random() < 0.7 else -1
                ts = tok + np.concatenate([[0], np.cumsum(rng.uniform(60, 200, size=k - 1) * 1000)]).astype(np.int64)
                vertical = a == "scroll"
                row = c.add(k, t=ts, demo=d, kind=SCROLL, x=x, y=y, sdx=0 if vertical else sign,
                            sdy=sign if vertical else 0, win=wid[cur])
                frames.append(_FramePlan(0, "scroll", grab, tok, row, x, y, cur, typed))
                end = int(ts[-1])
            elif a == "write":
                s = TYPED[int(rng.integers(len(TYPED)))]
                masked = bool(rng.random() < 0.3)
                cps = np.frombuffer(s.encode("ascii"), dtype=np.uint8).astype(np.int32)
                if masked:
                    row, end = self._keys(d, wid[cur], tok, np.full(len(cps), MASKED_KEYSYM), 0, _MASK_TEXT,
                                          True, (90, 220))
                else:
                    shifted = np.where((cps >= 0x41) & (cps <= 0x5A), SHIFT, 0)
                    row, end = self._keys(d, wid[cur], tok, cps, shifted, cps - 0x20, False, (90, 220))
                frames.append(_FramePlan(0, "typing", grab, tok, row, x, y, cur, typed))
                typed = MASK_CHAR * len(s) if masked else s
            elif a == "press":
                if prev == "write":
                    codes = np.array([_RETURN])
                elif rng.random() < 0.3:
                    codes = np.full(int(rng.integers(2, 5)), _BACKSPACE)
                else:
                    codes = np.array([_PRESS_KEYS[int(rng.integers(len(_PRESS_KEYS)))]])
                _, end = self._keys(d, wid[cur], tok, codes, 0, -1, False, (110, 180))
            elif a == "hotkey":
                mods, key = _HOTKEYS[int(rng.integers(len(_HOTKEYS)))]
                held = [k for bit, k in ((CTRL, K_CTRL), (ALT, K_ALT), (SHIFT, K_SHIFT)) if mods & bit]
                seq_t = tok - self._ms(60, 120) * np.arange(len(held), 0, -1)
                c.add(len(held), t=seq_t, demo=d, kind=KEY_DOWN, key=np.array(held), win=wid[cur],
                      mods=np.array([sum(b for b, k in ((CTRL, K_CTRL), (ALT, K_ALT), (SHIFT, K_SHIFT))
                                         if k in held[:i]) for i in range(len(held))]))
                row = c.add(1, t=tok, demo=d, kind=KEY_DOWN, key=key, mods=mods, win=wid[cur])
                up = tok + self._ms(60, 110)
                c.add(1, t=up, demo=d, kind=KEY_UP, key=key, mods=mods, win=wid[cur])
                rel = up + self._ms(30, 80) * np.arange(1, len(held) + 1)
                c.add(len(held), t=rel, demo=d, kind=KEY_UP, key=np.array(held[::-1]), mods=0, win=wid[cur])
                frames.append(_FramePlan(0, "hotkey", grab, tok, row, x, y, cur, typed))
                end = int(rel[-1])
            prev = a
        # idle to the end: a few moves (under the wait threshold)
        t_last = end + self._ms(400, 1500)
        self._moves(d, wid[cur], end + 100_000, t_last, pos, self._target(wins[cur]))
        ended = t_last + self._ms(300, 1200)
        for i, f in enumerate(frames):
            f.step = i
        frames.append(_FramePlan(len(frames), "end", ended - self._ms(20, 80), None, None, *pos, cur, typed))
        names = [*plan, "terminate"]  # the planned names are reduction's names
        return _Demo(d, demo_id, employee_key, device_key, cohort, INSTRUCTIONS[int(rng.integers(len(INSTRUCTIONS)))],
                     start, ended, wins, titles, layout, variant, first_row, c.n, frames, names)

    # -- frames -----------------------------------------------------------------------------

    def base(self, demo: _Demo) -> _Screen:
        """The demonstration's screen before any step: its workspace (rendered once per seeding)
        with the task line of this demonstration."""
        key = (demo.layout, tuple((w.app_id, w.url) for w in demo.wins), demo.variant)
        s = self._screens.get(key)
        if s is None:
            s = self._screens[key] = _Screen.render(self.screen, demo.wins, self.frame_kind, demo.variant)
        first = demo.wins[0]
        ink = (200, 170, 90) if _terminal(first.app_id) else (90, 60, 20)
        return s.derive([_text(first.x + 18, first.body_top + 4, "Task: " + demo.instruction, SANS, 13, ink)])

    def images(self, demo: _Demo) -> list[tuple[bytes, list[str]]]:
        """The PNG and the PII strings of each planned frame."""
        base = self.base(demo)
        out: list[tuple[bytes, list[str]]] = []
        prev: tuple[bytes, list[str]] | None = None
        for f in demo.frames:
            if f.reuse and prev is not None:
                out.append(prev)
                continue
            w = demo.wins[f.win]
            dark = _terminal(w.app_id)
            ops: list[Op] = []
            sx0, sy0, _sx1, _sy1 = w.status
            clock = time.strftime("%H:%M:%S", time.gmtime(f.captured_at // 1_000_000))
            ops.append(_rect(w.status, (225, 227, 231) if not dark else (50, 52, 58)))
            ink = (200, 200, 200) if dark else (60, 60, 60)
            ops.append(_text(sx0 + 10, sy0 + 4, w.app_id, SANS, 13, ink))
            ops.append(_text(sx0 + 250, sy0 + 4, f"Ln {f.step + 1}, Col {f.x % 80 + 1}", SANS, 13, ink))
            ops.append(_text(sx0 + 380, sy0 + 4, f"saved {clock}", SANS, 13, ink))
            if f.typed:
                fy = sy0 - 40
                ops.append(_rect((w.x + 12, fy, w.x + min(w.w - 12, 420), fy + 26), (255, 255, 255), (150, 150, 170)))
                ops.append(_text(w.x + 18, fy + 4, f.typed, SANS, 16, (20, 20, 20)))
            pii: list[str] = []
            if self.pii_frames > 0 and self.rng.random() < self.pii_frames:
                strings = self._pii()
                ph = 24 + 30 * len(strings)
                # a panel clear of the pointer and its highlight (they would hide ink from OCR),
                # above the typed-text field
                for py in (w.body_top + 34, sy0 - 56 - ph):
                    if py >= w.body_top + 34 and (f.y - 14 > py + ph or f.y + 24 < py):
                        break
                else:
                    py = -1
                if py >= 0:
                    pii = strings
                    px = w.x + 16
                    ops.append(_rect((px, py, px + min(w.w - 32, 600), py + ph), (255, 255, 255), (170, 170, 170)))
                    for i, s in enumerate(pii):
                        label = "To: " if "@" in s else "Card number " if s[0].isdigit() else "token = "
                        ops.append(_text(px + 12, py + 12 + 30 * i, label + s, SANS, 16, (15, 15, 15)))
            hx0, hx1 = max(w.x + 2, f.x - 60), min(w.x + w.w - 3, f.x + 60)
            if f.reason != "end" and hx0 < hx1:  # a hover highlight at the target
                ops.append(_rect((hx0, f.y - 12, hx1, f.y + 12), None, (70, 130, 220)))
            ops.append(_cursor(f.x, f.y))
            bands, _ = base.with_ops(ops)
            png = _png(*self.screen, bands)
            prev = (png, pii)
            out.append(prev)
        return out

    def _pii(self) -> list[str]:
        rng = self.rng
        kinds = [k for k in range(3) if rng.random() < 0.6] or [int(rng.integers(3))]
        out = []
        for k in kinds:
            if k == 0:
                out.append(PII_EMAILS[int(rng.integers(len(PII_EMAILS)))])
            elif k == 1:
                out.append(PII_CARDS[int(rng.integers(len(PII_CARDS)))])
            else:
                out.append("ghp_" + _ALNUM[rng.integers(0, len(_ALNUM), size=36)].tobytes().decode())
        return out


# ------------------------------------------------------------------ Arrow tables


def _const(value: str, n: int) -> pa.Array:
    return pc.take(pa.array([value]), pa.array(np.zeros(n, np.int8)))


def _events_table(sim: _Simulator, demos: list[_Demo], agent_version: str, os_name: str) -> tuple[
        pa.Table, np.ndarray]:
    c = sim.cols
    n = c.n
    order = np.lexsort((c.t[:n], c.demo[:n]))
    if not np.array_equal(order, np.arange(n)):
        raise AssertionError("simulated events are not in time order")  # a bug here, not bad input
    t = c.t[:n]
    if n > 1:
        same = c.demo[1:n] == c.demo[: n - 1]
        if np.any(same & (np.diff(t) <= 0)):
            raise AssertionError("simulated events share a timestamp")
    demo = c.demo[:n]
    by_demo = np.zeros(max(d.index for d in demos) + 1, np.int64)
    received = np.array([d.ended_at + 60_000_000 + 700_000 for d in demos], np.int64)
    by_demo[[d.index for d in demos]] = np.arange(len(demos))
    di = pa.array(by_demo[demo])
    demo_ids = _fixed16(np.frombuffer(b"".join(d.demo_id for d in demos), np.uint8).reshape(-1, 16))
    batch_ids = _fixed16(uuid7s(received, sim.rng))
    emp = pa.array([d.employee_key for d in demos])
    dev = pa.array([d.device_key for d in demos])

    def i32(a: np.ndarray) -> pa.Array:
        return pa.array(a[:n], pa.int32(), mask=a[:n] == _NULL)

    windows = list(sim.win_table)
    app_t = pa.array([w[0] for w in windows], pa.string())
    url_t = pa.array([w[1] for w in windows], pa.string())
    win = pa.array(c.win[:n])
    title_t = pa.array(list(sim.title_table), pa.string())
    tidx = pa.array(c.title[:n], pa.int32(), mask=c.title[:n] < 0)
    text = pa.array(c.text[:n], pa.int32(), mask=c.text[:n] < 0)
    press = c.pressed[:n]
    cols = {
        "demonstration_id": pc.take(demo_ids, di),
        "event_id": _fixed16(uuid7s(t, sim.rng)),
        "batch_id": pc.take(batch_ids, di),
        "employee_key": pc.take(emp, di),
        "device_key": pc.take(dev, di),
        "kind": pc.take(pa.array(KINDS), pa.array(c.kind[:n])),
        "captured_at": pa.array(t, pa.int64()).cast(TS),
        "received_at": pa.array(received[by_demo[demo]], pa.int64()).cast(TS),
        "x": i32(c.x), "y": i32(c.y),
        "button": pc.take(pa.array(BUTTONS), pa.array(c.button[:n])),
        "pressed": pa.array(press == 1, pa.bool_(), mask=press < 0),
        "scroll_dx": i32(c.sdx), "scroll_dy": i32(c.sdy),
        "key_code": i32(c.key), "modifiers": i32(c.mods),
        "text": pc.take(_TEXT_TABLE, text),
        "text_masked": pa.array(c.masked[:n]),
        "app_id": pc.take(app_t, win),
        "window_title": pc.take(title_t, tidx) if len(title_t) else pa.nulls(n, pa.string()),
        "url": pc.take(url_t, win),
        "screenshot_sha256": pa.nulls(n, pa.string()),
        "screenshot_bytes": pa.nulls(n, pa.int32()),
        "screenshot_format": _const("none", n),
        "screenshot_width": pa.nulls(n, pa.int32()),
        "screenshot_height": pa.nulls(n, pa.int32()),
        "agent_version": _const(agent_version, n),
        "os": _const(os_name, n),
        "source_partition": pa.array((by_demo[demo] % 3).astype(np.int32)),
        "source_offset": pa.array((np.array([d.index for d in demos], np.int64))[by_demo[demo]]),
    }
    ids_out = cols["event_id"]
    table = pa.table(cols, schema=EVENTS_SCHEMA)
    return table, np.frombuffer(ids_out.buffers()[1], np.uint8)[: 16 * n].reshape(n, 16)


def _frames_table(demos: list[_Demo], shas: list[list[tuple[str, str, int]]], event_ids: np.ndarray,
                  screen: tuple[int, int]) -> pa.Table:
    """The ``frames`` rows (one per planned frame; bounded by frames, not events)."""
    cols: dict[str, list[Any]] = {f.name: [] for f in FRAMES_SCHEMA}
    for demo, objs in zip(demos, shas, strict=True):
        windows = [w.meta() for w in demo.wins]
        filled = [{"x": 0, "y": 0, "width": screen[0], "height": TOP}]
        for f, (sha, key, size) in zip(demo.frames, objs, strict=True):
            cols["demonstration_id"].append(demo.demo_id)
            cols["employee_key"].append(demo.employee_key)
            cols["step"].append(f.step)
            cols["sha256"].append(sha)
            cols["object_key"].append(key)
            cols["format"].append("png")
            cols["bytes"].append(size)
            cols["width"].append(screen[0])
            cols["height"].append(screen[1])
            cols["captured_at"].append(f.captured_at)
            cols["reason"].append(f.reason)
            cols["action_started_at"].append(f.action_started_at)
            cols["action_event_id"].append(None if f.event_row is None else event_ids[f.event_row].tobytes())
            cols["windows"].append(windows)
            cols["filled"].append(filled)
    return pa.table(cols, schema=FRAMES_SCHEMA)


def _demonstrations_table(demos: list[_Demo], events: list[int], screen: tuple[int, int],
                          agent_version: str, os_name: str) -> pa.Table:
    rows: dict[str, list[Any]] = {
        "demonstration_id": [d.demo_id for d in demos],
        "employee_key": [d.employee_key for d in demos],
        "device_key": [d.device_key for d in demos],
        "instruction": [d.instruction for d in demos],
        "status": ["complete"] * len(demos),
        "started_at": [d.started_at for d in demos],
        "ended_at": [d.ended_at for d in demos],
        "sent_at": [d.ended_at + 60_000_000 for d in demos],
        "received_at": [d.ended_at + 60_700_000 for d in demos],
        "screen_width": [screen[0]] * len(demos),
        "screen_height": [screen[1]] * len(demos),
        "screen_scale": [1.0] * len(demos),
        "apps": [sorted({w.app_id for w in d.wins}) for d in demos],
        "consent_version": [CONSENT_VERSION] * len(demos),
        "policy_version": [POLICY_VERSION] * len(demos),
        "agent_version": [agent_version] * len(demos),
        "os": [os_name] * len(demos),
        "frames": [len(d.frames) for d in demos],
        "events": events,
        "missing_frames": [0] * len(demos),
        "frames_dropped": [[] for _ in demos],
        "events_dropped": [[] for _ in demos],
        "reason": [""] * len(demos),
        "cohort": [d.cohort for d in demos],
    }
    return pa.table(rows, schema=DEMONSTRATIONS_SCHEMA)


def _insert(client: Any, database: str, table: str, rows: pa.Table, token: str) -> None:
    """One ArrowStream insert, deduplicated by ``token`` as the sink's are."""
    client.raw_insert(f"{database}.{table}", list(rows.schema.names), ipc_stream(rows, "lz4"), fmt="ArrowStream",
                      settings={"insert_deduplicate": 1, "insert_deduplication_token": token})


def participant_keys(seed: int, participants: int) -> list[str]:
    """The pseudonyms (64 hex, like the stream's HMAC) of the simulated participants."""
    return [hashlib.sha256(f"handtrace-simulate/{seed}/participant/{p}".encode()).hexdigest()
            for p in range(participants)]


def seed_demonstrations(client: Any, database: str, store: FrameStore, *, n: int, steps: int = 50,
                        participants: int = 5, seed: int = 0, t0_us: int | None = None,
                        screen: tuple[int, int] = (1280, 800), cohorts: Sequence[str] = ("eng", "support"),
                        apps: Sequence[str] = DEFAULT_APPS, pii_frames: float = 0.0, frame_kind: str = "text",
                        batch_size: int = 50, workers: int = 4, agent_version: str = AGENT_VERSION,
                        os_name: str = "linux",
                        progress: Callable[[int, int], None] | None = None) -> SeedResult:
    """Write ``n`` complete simulated demonstrations (module docstring) into ``database``'s
    ``frames``, ``demonstration_events`` and ``demonstrations`` tables (migrations 4-7 applied)
    and their frames into ``store``, in batches of ``batch_size`` demonstrations.

    Args:
        n: Demonstrations; participant ``i % participants`` records demonstration ``i``.
        steps: Actions each reduces to (``export.actions.reduce_actions``), ``terminate`` included.
        t0_us: Start of the first demonstration (one every 15 min after it); default: so that the
            last one ends before now (pass it for reproducible output).
        cohorts: Participant ``p``'s cohort is ``cohorts[p % len(cohorts)]``.
        apps: App ids the demonstrations use (1-3 tiled windows each); browsers get URLs.
        pii_frames: Probability that a frame shows PII (email, card number, API key).
        frame_kind: ``text`` (windows with text lines) or ``plain`` (no text lines: smaller).
        workers: Threads writing objects to the store.
        progress: Called with (demonstrations written, n) after each batch.
    """
    if n < 0 or steps < 3 or participants < 1 or not cohorts or not apps or batch_size < 1:
        raise ValueError("need n >= 0, steps >= 3, participants >= 1, batch_size >= 1, cohorts and apps")
    if not 0.0 <= pii_frames <= 1.0:
        raise ValueError(f"pii_frames must be in [0, 1], got {pii_frames}")
    if frame_kind not in FRAME_KINDS:
        raise ValueError(f"frame_kind must be one of {FRAME_KINDS}, got {frame_kind!r}")
    if screen[0] < 400 or screen[1] < 300:
        raise ValueError(f"screen too small for the simulated windows: {screen}")
    began = time.perf_counter()
    if t0_us is None:
        now = int(time.time()) // 3600 * 3600 * 1_000_000
        t0_us = now - (n + 4 * 24) * DEMO_SPACING_US
    rng = np.random.default_rng(seed)
    keys = participant_keys(seed, participants)
    devices = [hashlib.sha256(f"handtrace-simulate/{seed}/device/{p}".encode()).hexdigest()
               for p in range(participants)]
    cohort_of = {k: cohorts[p % len(cohorts)] for p, k in enumerate(keys)}
    sim = _Simulator(rng, (int(screen[0]), int(screen[1])), apps, frame_kind, pii_frames)
    result = SeedResult([], keys, 0, 0, 0, {}, 0.0, cohorts=cohort_of)
    written: set[str] = set()
    clock = dict.fromkeys(("events", "images", "store", "insert"), 0.0)
    mark = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        clock[phase] += now - mark
        mark = now
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="simulate-put") as pool:
        for b0 in range(0, n, batch_size):
            sim.reset()
            demos: list[_Demo] = []
            for i in range(b0, min(n, b0 + batch_size)):
                p = i % participants
                start = t0_us + i * DEMO_SPACING_US
                demo_id = uuid7s(np.array([start]), rng)[0].tobytes()
                demos.append(sim.demo(i - b0, demo_id, keys[p], devices[p], cohorts[p % len(cohorts)], start, steps))
            events, event_ids = _events_table(sim, demos, agent_version, os_name)
            lap("events")
            puts: list[Future[None]] = []
            objs: list[list[tuple[str, str, int]]] = []
            for demo in demos:
                mine = []
                for png, pii in sim.images(demo):
                    sha = hashlib.sha256(png).hexdigest()
                    key = frame_key(demo.employee_key, sha, "png")
                    if key not in written:
                        written.add(key)
                        puts.append(pool.submit(store.put, key, png))
                        result.objects += 1
                        result.bytes += len(png)
                    if pii:
                        result.pii[sha] = pii
                    mine.append((sha, key, len(png)))
                objs.append(mine)
            lap("images")
            for fut in puts:  # objects first: never a row without its object
                fut.result()
            lap("store")
            frames = _frames_table(demos, objs, event_ids, sim.screen)
            per_demo = np.bincount(sim.cols.demo[: sim.cols.n], minlength=len(demos)).tolist()
            token = f"simulate/{demos[0].demo_id.hex()}/{len(demos)}"
            _insert(client, database, "frames", frames, f"{token}/frames")
            _insert(client, database, "demonstration_events", events, f"{token}/demonstration_events")
            _insert(client, database, "demonstrations",
                    _demonstrations_table(demos, per_demo, sim.screen, agent_version, os_name),
                    f"{token}/demonstrations")
            lap("insert")
            for d in demos:
                ident = _uuid_str(d.demo_id)
                result.demonstration_ids.append(ident)
                result.actions[ident] = d.actions
            result.events += events.num_rows
            result.frames += frames.num_rows
            if progress is not None:
                progress(len(result.demonstration_ids), n)
    result.seconds = time.perf_counter() - began
    result.timings = {k: round(v, 3) for k, v in clock.items()}
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m handtrace.export.simulate``: seed a ClickHouse + frame store for the bench."""
    # The tables are the sink's (its migrations create them); this tool only runs them.
    from handtrace.core import clickhouse
    from handtrace.core.framestore import open_store
    from handtrace.core.settings import Settings, StoreSettings
    from handtrace.sink.schema import migrate

    ap = argparse.ArgumentParser(prog="python -m handtrace.export.simulate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dsn", required=True, help="ClickHouse DSN, e.g. chdb:///tmp/x")
    ap.add_argument("--store", required=True, help="frame store URL, e.g. file:///tmp/y")
    ap.add_argument("--database", default=None, help="database (default: clickhouse.database)")
    ap.add_argument("-n", type=int, default=1000, help="demonstrations")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--participants", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--t0-us", type=int, default=None)
    ap.add_argument("--pii-frames", type=float, default=0.0)
    ap.add_argument("--frame-kind", choices=FRAME_KINDS, default="text")
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--workers", type=int, default=4)
    args = ap.parse_args(argv)
    settings = Settings(store=StoreSettings(url=args.store))
    database = args.database or settings.clickhouse.database
    client = clickhouse.connect(args.dsn)
    try:
        migrate(client, database)
        began = time.perf_counter()

        def progress(done: int, total: int) -> None:
            print(f"  {done}/{total} demonstrations ({time.perf_counter() - began:.1f} s)", flush=True)

        result = seed_demonstrations(client, database, open_store(settings), n=args.n, steps=args.steps,
                                     participants=args.participants, seed=args.seed, t0_us=args.t0_us,
                                     pii_frames=args.pii_frames, frame_kind=args.frame_kind,
                                     batch_size=args.batch_size, workers=args.workers, progress=progress)
    finally:
        clickhouse.close(args.dsn)
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
