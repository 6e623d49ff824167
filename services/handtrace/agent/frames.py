"""Action-aligned frames for demonstrations: the full screen, masked at grab time, kept in a small
ring of visually distinct frames, encoded lossless only when an action selects one (issue #11,
docs/design/demonstrations.md "Frames", ADR 0011).

What :class:`FrameCapturer` guarantees:

- **Masking at grab time, fail closed.** The window list is read before and after each grab; if
  it changed, the grab is discarded (a window that moved or appeared mid-grab could otherwise
  show through a rectangle computed for another window). Windows are painted bottom-to-top in
  stacking order: an allowlisted window (``decide(w)[0]``) un-fills its rectangle clipped to the
  screen, any other window fills it, and where no window is (desktop, panels without a window)
  stays filled. A window that reports ``password_field`` is filled whatever ``decide`` says.
  A window list that cannot be told (``None``), or a non-allowlisted window without geometry
  (we cannot know where it is), fills the **whole** frame: we keep such a frame rather than drop
  it, so that an action still has a frame -- an honest, fully filled one -- and the step stays
  aligned. Filled means one solid colour (:data:`FILL_RGB`), never blur (blur is reversible).
- **Metadata that describes the pixels.** ``windows`` and ``filled`` are disjoint rectangles
  whose union is the whole screen: ``windows`` are the unfilled parts (each tagged with its
  window's ``app_id`` and ``url``; a window partly covered by another contributes one rectangle
  per visible piece, in stacking order), ``filled`` the rest.
- **Distinct frames only.** A grab whose dHash (:func:`handtrace.agent.screenshots.dhash`, of the
  *masked* image) is within ``hash_distance`` bits of the last kept frame is dropped before it is
  encoded. Kept frames stay raw in memory (``ring`` of them); encoding (lossless PNG or WebP)
  happens only when :meth:`FrameCapturer.frame_before` or :meth:`FrameCapturer.final_frame`
  selects a frame, and is cached per ring slot (two actions sharing a frame encode it once).
- **No future leakage.** A frame's ``captured_at_us`` is read from the clock *after* the grab and
  the second window-list read completed, so every pixel of it predates that time;
  ``frame_before(t)`` returns the newest kept frame with ``captured_at_us < t`` (strictly).

Coordinates: window geometries and frame pixels share one system, the virtual screen whose
top-left is ``(0, 0)`` (X11 root coordinates; :class:`ScreenGrab` grabs that box).
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from handtrace.agent.capture import WindowInfo
from handtrace.agent.localpolicy import LocalPolicy
from handtrace.agent.screenshots import dhash, hamming
from handtrace.core.clock import now_us

Rect = tuple[int, int, int, int]
"""``(x, y, width, height)``, width and height > 0."""

FILL_RGB: tuple[int, int, int] = (0, 0, 0)
"""The one colour of every filled pixel."""

Decide = Callable[[WindowInfo], tuple[bool, str | None]]
"""``decide(w) -> (allowed, url)``: whether the window may be seen, and its URL to record (the
recorder wraps ``LocalPolicy.window``)."""

_HASH_REDUCE = 8  # dHash is taken from image.reduce(8): 240x135 at 1080p, ~1 ms


class FrameConfig(BaseModel):
    """How frames are grabbed and kept (the ``frame_*`` fields of ``DemoSettings``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    interval_s: float = Field(1.0, ge=0.01, le=60, description="Grab every this many seconds.")
    ring: int = Field(2, ge=1, le=32, description="Distinct frames kept in memory.")
    hash_distance: int = Field(0, ge=0, le=64, description="0: any change of the reduced image is "
                               "distinct; above 0: a grab within this many dHash bits of the last "
                               "kept frame is discarded unencoded.")
    format: Literal["png", "webp"] = Field("png", description="Lossless encoding (ADR 0011).")

    @classmethod
    def from_settings(cls, demo: Any) -> FrameConfig:
        """The config from a ``DemoSettings``."""
        return cls(interval_s=demo.frame_interval_s, ring=demo.frame_ring,
                   hash_distance=demo.frame_hash_distance, format=demo.frame_format)


@dataclass(frozen=True)
class CapturedFrame:
    """One selected, encoded frame (the contract's fields, plus ``scale``)."""

    image: bytes
    """The encoded image (``fmt``, lossless)."""
    fmt: str
    """``png`` | ``webp``."""
    sha256: bytes
    """32 bytes, SHA-256 of ``image``."""
    width: int
    """Logical pixels."""
    height: int
    captured_at_us: int
    """Clock after the grab completed: every pixel predates it."""
    windows: list[dict[str, Any]]
    """Unfilled, visible rectangles: ``{"app_id", "url", "x", "y", "width", "height"}``."""
    filled: list[dict[str, Any]]
    """Filled rectangles: ``{"x", "y", "width", "height"}``; disjoint from ``windows``, and
    together they cover the screen."""
    scale: float = 1.0
    """Physical pixels per logical pixel of the grab (1.0 on X11, see :class:`ScreenGrab`)."""


# ---------------------------------------------------------------------------------------- masking


def clip(r: Rect, screen: Rect) -> Rect | None:
    """``r`` intersected with ``screen``; None when they do not overlap."""
    x0, y0 = max(r[0], screen[0]), max(r[1], screen[1])
    x1 = min(r[0] + r[2], screen[0] + screen[2])
    y1 = min(r[1] + r[3], screen[1] + screen[3])
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1 - x0, y1 - y0)


def subtract(r: Rect, cut: Rect) -> list[Rect]:
    """``r`` minus ``cut`` as at most four disjoint rectangles (top, bottom, left, right bands)."""
    inter = clip(cut, r)
    if inter is None:
        return [r]
    x, y, w, h = r
    ix, iy, iw, ih = inter
    out: list[Rect] = []
    if iy > y:
        out.append((x, y, w, iy - y))
    if iy + ih < y + h:
        out.append((x, iy + ih, w, y + h - iy - ih))
    if ix > x:
        out.append((x, iy, ix - x, ih))
    if ix + iw < x + w:
        out.append((ix + iw, iy, x + w - ix - iw, ih))
    return out


Label = tuple[str | None, str | None] | None
"""None: filled; else ``(app_id, url)`` of the window seen there."""


@dataclass(frozen=True)
class Mask:
    """The masking of one frame: disjoint rectangles covering the screen."""

    visible: list[tuple[Rect, str | None, str | None]]
    """Unfilled rectangles with the ``app_id`` and ``url`` of the window seen there."""
    filled: list[Rect]

    def windows_meta(self) -> list[dict[str, Any]]:
        """``visible`` as the contract's dicts."""
        return [{"app_id": a, "url": u, "x": r[0], "y": r[1], "width": r[2], "height": r[3]}
                for r, a, u in self.visible]

    def filled_meta(self) -> list[dict[str, Any]]:
        """``filled`` as the contract's dicts."""
        return [{"x": r[0], "y": r[1], "width": r[2], "height": r[3]} for r in self.filled]


def compute_mask(width: int, height: int, windows: Sequence[WindowInfo] | None, decide: Decide) -> Mask:
    """Paint ``windows`` (bottom-to-top) onto a filled ``width x height`` screen: allowlisted ones
    un-fill their rectangle, others fill it (see the module docstring). ``None`` or a
    non-allowlisted window without geometry: everything filled (fail closed)."""
    screen: Rect = (0, 0, width, height)
    everything = Mask([], [screen])
    if windows is None:
        return everything
    pieces: list[tuple[Rect, Label]] = [(screen, None)]
    for w in windows:
        allowed, url = decide(w)
        allowed = allowed and not w.password_field
        g = w.geometry
        if g is None:
            if allowed:
                continue  # nowhere to un-fill: stays as it is (filled, or another window)
            return everything  # it is somewhere we cannot tell: fail closed
        r = clip(g, screen) if g[2] > 0 and g[3] > 0 else None
        if r is None:
            continue
        label: Label = (w.app_id, url) if allowed else None
        nxt: list[tuple[Rect, Label]] = []
        for pr, pl in pieces:
            nxt.extend((s, pl) for s in subtract(pr, r))
        nxt.append((r, label))
        pieces = nxt
    filled = _merge([r for r, lab in pieces if lab is None])
    visible = [(r, lab[0], lab[1]) for r, lab in pieces if lab is not None]
    return Mask(visible, filled)


def _merge(rects: list[Rect]) -> list[Rect]:
    """Join rectangles that share a full edge (fewer, larger filled boxes; still disjoint)."""
    out = sorted(rects, key=lambda r: (r[0], r[2], r[1]))
    merged = True
    while merged and len(out) > 1:
        merged = False
        keep: list[Rect] = []
        for r in out:
            for i, k in enumerate(keep):
                if k[0] == r[0] and k[2] == r[2] and (k[1] + k[3] == r[1] or r[1] + r[3] == k[1]):
                    keep[i] = (k[0], min(k[1], r[1]), k[2], k[3] + r[3])
                    merged = True
                    break
                if k[1] == r[1] and k[3] == r[3] and (k[0] + k[2] == r[0] or r[0] + r[2] == k[0]):
                    keep[i] = (min(k[0], r[0]), k[1], k[2] + r[2], k[3])
                    merged = True
                    break
            else:
                keep.append(r)
        out = keep
    return out


def apply_mask(image: Image.Image, mask: Mask) -> None:
    """Paint every filled rectangle of ``mask`` with :data:`FILL_RGB`, in place."""
    for x, y, w, h in mask.filled:
        image.paste(FILL_RGB, (x, y, x + w, y + h))


def encode(image: Image.Image, fmt: str) -> bytes:
    """Lossless ``png`` or ``webp`` bytes of ``image`` (deterministic for equal pixels)."""
    buf = io.BytesIO()
    if fmt == "png":
        # zlib level 1: half the CPU of level 6 for ~5 % more bytes on screens (ADR 0011).
        image.save(buf, format="PNG", compress_level=1)
    elif fmt == "webp":
        # Lossless; quality and method are effort: the fastest setting (0, 0) is ~2x faster than
        # PNG level 6 and still ~20 % smaller on screens; more effort costs 5-100x the CPU (ADR 0011).
        image.save(buf, format="WEBP", lossless=True, quality=0, method=0)
    else:
        raise ValueError(f"unknown frame format {fmt!r}")
    return buf.getvalue()


def stamp_focused(windows: list[WindowInfo] | None, focused: WindowInfo | None) -> list[WindowInfo] | None:
    """``windows`` with the focused window's ``url`` and ``password_field`` copied onto its entry
    (matched by ``window_id``): backends know those only for the focused window; the others keep
    ``url`` None, so a browser allowed only for some domains stays filled (fail closed)."""
    if windows is None or focused is None or focused.window_id is None:
        return windows
    from dataclasses import replace

    return [replace(w, url=focused.url, password_field=focused.password_field)
            if w.window_id == focused.window_id else w for w in windows]


class PolicyDecide:
    """A :data:`Decide` over the local policy that fails closed where a URL is unknowable.

    Backends know the URL of the focused window only. A window of an app that has been seen
    *with* a URL (a browser) but reports none now -- any non-focused browser window -- cannot be
    checked against the allowed domains, so it is filled, even though ``LocalPolicy.window``
    would allow its app when no URL is given. ``url_apps`` seeds that set (e.g. known browsers);
    :meth:`observe` learns from each focused window.
    """

    def __init__(self, policy: Callable[[], LocalPolicy], url_apps: Iterable[str] = ()) -> None:
        """Args:
            policy: Returns the local policy in force now (it can change while recording).
            url_apps: App ids whose windows always need a URL to be allowed.
        """
        self._policy = policy
        self.url_apps: set[str] = {a.lower() for a in url_apps}  # app ids compared case-insensitively

    def observe(self, focused: WindowInfo | None) -> None:
        """Remember the focused window's app as URL-bearing if it has a URL."""
        if focused is not None and focused.url is not None and focused.app_id:
            self.url_apps.add(focused.app_id.lower())

    def __call__(self, w: WindowInfo) -> tuple[bool, str | None]:
        """``(allowed, url)`` for ``w``."""
        if w.url is None and (w.app_id or "").lower() in self.url_apps:
            return False, None
        d = self._policy().window(w)
        return d.allowed, d.url


# ------------------------------------------------------------------------------------- the grab


class ScreenGrab:
    """The full screen with mss: the bounding box of all monitors (``monitors[0]``), as RGB.

    Scale: on X11 the root window *is* the logical screen -- the X server has no separate
    logical coordinate space; HiDPI there is done by each toolkit drawing larger (GDK_SCALE,
    Xft.dpi), not by the server -- so what mss reads is logical resolution and :attr:`scale` is
    1.0. (macOS/Windows backends would have to grab at, or downscale to, logical size and record
    their own scale.) The pixels are converted once, BGRA -> RGB, straight from mss's buffer.

    One mss instance for every thread: mss >= 10 talks XCB and serialises each instance's calls
    under its own lock, so the end frame (grabbed on the socket thread) reuses the tick thread's
    connection and shared-memory buffer instead of a second ~8 MB set (docs/BENCHMARKS.md).
    """

    scale = 1.0

    def __init__(self, display: str | None = None) -> None:
        self._display = display
        self._sct: Any = None
        self._lock = threading.Lock()

    def _mss(self) -> Any:
        with self._lock:
            if self._sct is None:
                import mss

                self._sct = mss.MSS(display=self._display) if self._display else mss.MSS()
            return self._sct

    def __call__(self) -> Image.Image | None:
        """The whole virtual screen; None when it cannot be grabbed (server gone)."""
        try:
            sct = self._mss()
            shot = sct.grab(sct.monitors[0])
        except Exception:  # noqa: BLE001 -- mss raises ScreenShotError, XError, OSError...
            return None
        return Image.frombuffer("RGB", shot.size, shot.raw, "raw", "BGRX", 0, 1)

    def close(self) -> None:
        """Close the mss instance (its X connection); call when no grab is in progress."""
        with self._lock:
            sct, self._sct = self._sct, None
        if sct is not None:
            sct.close()


# ------------------------------------------------------------------------------------ the ring


@dataclass
class FrameCounters:
    """What the capturer did since start."""

    grabs: int = 0
    kept: int = 0
    not_distinct: int = 0
    """Grabs discarded, unencoded, as within ``hash_distance`` of the last kept frame."""
    unstable: int = 0
    """Grabs discarded because the window list changed during the grab."""
    failed: int = 0
    """Grabs that returned no image."""
    fully_filled: int = 0
    """Kept frames filled entirely because the window list was unknown."""
    encoded: int = 0
    encoded_bytes: int = 0


@dataclass
class _Kept:
    image: Image.Image
    captured_at_us: int
    hash: int
    mask: Mask
    thumb: bytes = b""
    """Digest of the masked image reduced 8x8: any visible change (one typed character is
    enough) changes it, where the 64-bit dHash often does not."""
    encoded: CapturedFrame | None = field(default=None)


class FrameCapturer:
    """Grabs, masks and keeps distinct frames; hands out the frame before an action. Thread-safe
    (poll on the tick thread, selection from the recorder); calls are serialised."""

    def __init__(
        self,
        cfg: FrameConfig,
        grab: Callable[[], Image.Image | None],
        windows: Callable[[], list[WindowInfo] | None],
        decide: Decide,
        clock: Callable[[], int] = now_us,
        *,
        scale: float = 1.0,
    ) -> None:
        """Set up; nothing is grabbed until :meth:`poll` or :meth:`final_frame`.

        Args:
            cfg: Interval, ring size, distinctness, format.
            grab: The full screen as an RGB image whose (0, 0) is the windows' (0, 0), or None.
            windows: Visible top-level windows bottom-to-top, or None when unknown.
            decide: ``(allowed, url)`` per window (the local policy).
            clock: Microseconds since the epoch; read after each grab for its timestamp.
            scale: Recorded in every frame (the grab's physical/logical ratio).
        """
        self.cfg = cfg
        self._grab = grab
        self._windows = windows
        self._decide = decide
        self._clock = clock
        self._scale = scale
        self._ring: deque[_Kept] = deque(maxlen=cfg.ring)
        self._last_hash: int | None = None
        self._last_thumb = b""
        self._last_poll_us: int | None = None
        self._lock = threading.Lock()
        self.counters = FrameCounters()

    def _masked_grab(self) -> _Kept | None:
        before = self._windows()
        image = self._grab()
        after = self._windows()
        t = self._clock()
        c = self.counters
        c.grabs += 1
        if image is None:
            c.failed += 1
            return None
        if before != after:
            c.unstable += 1
            return None
        if image.mode != "RGB":
            image = image.convert("RGB")
        elif getattr(image, "readonly", False):
            image = image.copy()  # frombuffer images share mss's buffer; paint a copy of our own
        mask = compute_mask(image.width, image.height, before, self._decide)
        if before is None:
            c.fully_filled += 1
        apply_mask(image, mask)
        small = image.reduce(_HASH_REDUCE)
        return _Kept(image, t, dhash(small), mask, hashlib.blake2b(small.tobytes(), digest_size=16).digest())

    def poll(self, now_us: int) -> None:
        """Grab if ``interval_s`` has passed since the last poll that grabbed; keep the frame if
        it is distinct from the last kept one (else discard it unencoded)."""
        with self._lock:
            last = self._last_poll_us
            # A clock that went backwards does not stop grabbing until it catches up.
            if last is not None and 0 <= now_us - last < self.cfg.interval_s * 1_000_000:
                return
            self._last_poll_us = now_us
            kept = self._masked_grab()
            if kept is None:
                return
            if self._last_hash is not None and self._same(kept):
                self.counters.not_distinct += 1
                return
            self._ring.append(kept)
            self._last_hash = kept.hash
            self._last_thumb = kept.thumb
            self.counters.kept += 1

    def _same(self, kept: _Kept) -> bool:
        """Whether ``kept`` shows what the last kept frame shows: with ``hash_distance`` 0, any
        change of the 8x-reduced image counts (typing included); above 0, dHash within it."""
        if self.cfg.hash_distance == 0:
            return kept.thumb == self._last_thumb
        return self._last_hash is not None and hamming(self._last_hash, kept.hash) <= self.cfg.hash_distance

    def frame_before(self, t_us: int) -> CapturedFrame | None:
        """The newest kept frame grabbed strictly before ``t_us``, encoded (cached); None when
        the ring holds none that old."""
        with self._lock:
            for k in reversed(self._ring):
                if k.captured_at_us < t_us:
                    if k.encoded is None:
                        k.encoded = self._encode(k)
                    return k.encoded
            return None

    def final_frame(self, now_us: int) -> CapturedFrame | None:
        """A frame grabbed now (the ``end`` frame), whatever its distinctness; retried while the
        window list changes during the grab; None when no stable grab could be made."""
        with self._lock:
            for _ in range(3):
                kept = self._masked_grab()
                if kept is not None:
                    return self._encode(kept)
            return None

    def close(self) -> None:
        """Release the grab's resources (its X connections), if it has any; idempotent."""
        close = getattr(self._grab, "close", None)
        if close is not None:
            close()

    def reset(self) -> None:
        """Drop every kept frame (recording stopped or paused): nothing from before can be
        selected afterwards."""
        with self._lock:
            self._ring.clear()
            self._last_hash = None
            self._last_poll_us = None

    def _encode(self, k: _Kept) -> CapturedFrame:
        data = encode(k.image, self.cfg.format)
        self.counters.encoded += 1
        self.counters.encoded_bytes += len(data)
        return CapturedFrame(
            image=data, fmt=self.cfg.format, sha256=hashlib.sha256(data).digest(),
            width=k.image.width, height=k.image.height, captured_at_us=k.captured_at_us,
            windows=k.mask.windows_meta(), filled=k.mask.filled_meta(), scale=self._scale,
        )
