"""Screenshots of the focused window, only at meaningful moments and only when the screen changed.

Contract with the caller (the agent): **the caller decides whether a screenshot may exist at
all** -- capture not paused, employee not exempt, the window's app (and URL) allowlisted for
screenshots, not a password field -- *before* it calls :meth:`Screenshotter.maybe_capture`.
The screenshotter knows no policy. What it guarantees:

- it grabs only the given window's geometry, never the whole screen (whatever is drawn inside
  that rectangle is in the shot, including a popup of another app that overlaps it);
- it refuses a window that reports ``password_field`` (a second line of defence) and one with
  no geometry;
- at most one screenshot per ``min_interval_s``, for the whole agent;
- a shot whose perceptual hash is within ``hash_distance`` of the last kept shot of the same
  window is dropped before it is encoded: nothing new is stored or sent for an unchanged screen;
- images are downscaled (aspect kept) before hashing and encoding, so the full-resolution pixels
  never leave this function.

The hash is a 64-bit dHash: the image in grayscale, box-resized to 9x8, one bit per horizontally
adjacent pair (left darker than right). Typing a few characters does not move it; switching
documents, scrolling a page or opening a dialog does. Its blind spot: changes without horizontal
structure (a full-width band appearing, a uniform colour change) keep the same hash.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from handtrace.agent.capture import WindowInfo

Geometry = tuple[int, int, int, int]
Grab = Callable[[Geometry], Image.Image | None]
"""Returns the screen pixels of ``(x, y, width, height)`` (clipped to the screen), or None when
no part of it is on the screen."""

_KEEP_HASHES_OF = 64  # windows whose last kept hash we remember (least recently shot dropped)


class ScreenshotConfig(BaseModel):
    """How screenshots are taken; every field validated at start-up, all errors reported at once."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_width: int = Field(960, ge=16, le=7680, description="Downscale to at most this width in pixels, keeping "
                           "the aspect ratio; never upscaled.")
    max_height: int = Field(960, ge=16, le=4320, description="Downscale to at most this height in pixels, keeping "
                            "the aspect ratio; never upscaled.")
    format: Literal["webp", "jpeg"] = Field("webp", description="Encoding of the stored image.")
    quality: int = Field(60, ge=1, le=100, description="Encoder quality, 1 (smallest) to 100 (best).")
    min_interval_s: float = Field(10.0, ge=0, le=86_400, description="At most one screenshot per this many "
                                  "seconds for the whole agent; requests in between are dropped, not queued.")
    hash_distance: int = Field(5, ge=0, le=64, description="A shot whose 64-bit dHash differs from the last kept "
                               "shot of the same window in at most this many bits is dropped as unchanged "
                               "(0 drops only identical hashes).")


@dataclass(frozen=True)
class Screenshot:
    """One kept, encoded screenshot."""

    image: bytes
    """The encoded image (``fmt``)."""
    fmt: Literal["webp", "jpeg"]
    width: int
    height: int
    sha256: bytes
    """SHA-256 of ``image`` (the Event's ``screenshot_sha256``)."""
    captured_at_us: int
    reason: str
    """Why it was taken, as the caller said (e.g. ``focus_change``, ``click``)."""
    dhash: int
    """The 64-bit perceptual hash it was compared by."""


@dataclass
class ScreenshotCounters:
    """What :meth:`Screenshotter.maybe_capture` did, since start."""

    taken: int = 0
    skipped_unchanged: int = 0
    skipped_rate_limited: int = 0
    skipped_no_window: int = 0
    skipped_password_field: int = 0
    bytes_total: int = 0
    """Sum of the encoded sizes of the shots taken."""


def dhash(image: Image.Image) -> int:
    """64-bit difference hash: grayscale, box-resized to 9x8, bit set where left < right."""
    # Plain Python over 72 pixels: numpy would add ~12 MB to the agent's memory for this alone.
    px = image.convert("L").resize((9, 8), Image.Resampling.BOX).tobytes()
    h = 0
    for row in range(8):
        r = px[row * 9:(row + 1) * 9]
        for i in range(8):
            h = (h << 1) | (r[i + 1] > r[i])
    return h


def hamming(a: int, b: int) -> int:
    """Number of differing bits."""
    return (a ^ b).bit_count()


def fit_size(width: int, height: int, max_width: int, max_height: int) -> tuple[int, int]:
    """``(width, height)`` scaled down to fit ``max_width x max_height``, aspect kept, never up."""
    scale = min(1.0, max_width / width, max_height / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


class MssGrab:
    """Grabs screen regions with mss: one mss instance per calling thread (an X connection is not
    to be shared between threads), all closed by :meth:`close`."""

    def __init__(self, display: str | None = None) -> None:
        """Connect lazily, per thread, on first grab.

        Args:
            display: X display name for mss (e.g. ``":1"``); None means ``$DISPLAY`` (Linux only).
        """
        self._display = display
        self._local = threading.local()
        self._all: list[Any] = []
        self._lock = threading.Lock()

    def _mss(self) -> Any:
        sct = getattr(self._local, "sct", None)
        if sct is None:
            import mss

            sct = mss.MSS(display=self._display) if self._display else mss.MSS()
            self._local.sct = sct
            with self._lock:
                self._all.append(sct)
        return sct

    def __call__(self, geometry: Geometry) -> Image.Image | None:
        """The pixels of ``geometry`` clipped to the screen; None when none of it is on screen."""
        sct = self._mss()
        screen = sct.monitors[0]  # bounding box of all monitors
        x, y, w, h = geometry
        left, top = max(x, screen["left"]), max(y, screen["top"])
        right = min(x + w, screen["left"] + screen["width"])
        bottom = min(y + h, screen["top"] + screen["height"])
        if right <= left or bottom <= top:
            return None
        shot = sct.grab({"left": left, "top": top, "width": right - left, "height": bottom - top})
        return Image.frombytes("RGB", shot.size, shot.bgra, "raw", "BGRX")

    def close(self) -> None:
        """Close every mss instance; call when no grab is in progress."""
        with self._lock:
            instances, self._all = self._all, []
        for sct in instances:
            sct.close()
        self._local = threading.local()


class Screenshotter:
    """Decides, grabs, deduplicates and encodes screenshots of a window (see the module docstring
    for what the caller must have checked first). Thread-safe; calls are serialised."""

    def __init__(
        self,
        config: ScreenshotConfig | None = None,
        grab: Grab | None = None,
        *,
        display: str | None = None,
    ) -> None:
        """Set up; nothing is grabbed or connected until the first :meth:`maybe_capture`.

        Args:
            config: The settings; defaults to ``ScreenshotConfig()``.
            grab: Returns the pixels of a geometry; defaults to :class:`MssGrab` on ``display``.
                Tests inject one to run without a display.
            display: X display for the default grab; None means ``$DISPLAY``.
        """
        self.config = config or ScreenshotConfig()
        self._own_grab = MssGrab(display) if grab is None else None
        self._grab: Grab = grab or self._own_grab  # type: ignore[assignment]
        self.counters = ScreenshotCounters()
        self._lock = threading.Lock()
        self._last_taken_us: int | None = None
        self._last_hash: OrderedDict[tuple[str | None, int | None], int] = OrderedDict()

    def maybe_capture(self, window: WindowInfo | None, reason: str, now_us: int) -> Screenshot | None:
        """A screenshot of ``window`` now, or None when it is rate-limited, has no geometry, is a
        password field, or looks unchanged since the last kept shot of that window.

        Args:
            window: The focused window, already allowed by the policy (the caller's job).
            reason: Why now (``focus_change``, ``click``, ...), carried into the result.
            now_us: Capture time, microseconds since the epoch (``handtrace.core.clock.now_us``).
        """
        cfg = self.config
        c = self.counters
        with self._lock:
            geometry = window.geometry if window is not None else None
            if window is None or geometry is None or geometry[2] <= 0 or geometry[3] <= 0:
                c.skipped_no_window += 1
                return None
            if window.password_field:
                c.skipped_password_field += 1
                return None
            last = self._last_taken_us
            # A clock that went backwards does not block screenshots until it catches up.
            if last is not None and 0 <= now_us - last < cfg.min_interval_s * 1_000_000:
                c.skipped_rate_limited += 1
                return None
            image = self._grab(geometry)
            if image is None:
                c.skipped_no_window += 1
                return None
            size = fit_size(image.width, image.height, cfg.max_width, cfg.max_height)
            if image.mode != "RGB":
                image = image.convert("RGB")
            if size != image.size:
                # Integer box reduction first (in place of LANCZOS's own pre-reduction): the same
                # quality at this scale and ~4 MB less peak memory for a 1080p window.
                factor = min(image.width // size[0], image.height // size[1])
                if factor >= 2:
                    image = image.reduce(factor)
                if image.size != size:
                    image = image.resize(size, Image.Resampling.LANCZOS)
            h = dhash(image)
            key = (window.app_id, window.window_id)
            previous = self._last_hash.get(key)
            if previous is not None and hamming(previous, h) <= cfg.hash_distance:
                c.skipped_unchanged += 1
                return None
            data = self._encode(image)
            self._last_taken_us = now_us
            self._last_hash[key] = h
            self._last_hash.move_to_end(key)
            while len(self._last_hash) > _KEEP_HASHES_OF:
                self._last_hash.popitem(last=False)
            c.taken += 1
            c.bytes_total += len(data)
            return Screenshot(
                image=data,
                fmt=cfg.format,
                width=image.width,
                height=image.height,
                sha256=hashlib.sha256(data).digest(),
                captured_at_us=now_us,
                reason=reason,
                dhash=h,
            )

    def _encode(self, image: Image.Image) -> bytes:
        buf = io.BytesIO()
        if self.config.format == "webp":
            image.save(buf, format="WEBP", quality=self.config.quality, method=4)
        else:
            image.save(buf, format="JPEG", quality=self.config.quality)
        return buf.getvalue()

    def close(self) -> None:
        """Release the default grab's X connections; idempotent."""
        if self._own_grab is not None:
            self._own_grab.close()
