"""Screenshotter without a display: synthetic images through an injected grab."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from handtrace.agent.capture import WindowInfo
from handtrace.agent.screenshots import (
    Screenshot,
    ScreenshotConfig,
    Screenshotter,
    dhash,
    fit_size,
    hamming,
)

S = 1_000_000
T0 = 1_700_000_000 * S


def scene(width: int = 1280, height: int = 800, seed: int = 0) -> Image.Image:
    """A structured picture: a gradient with a few solid blocks placed by ``seed``."""
    rng = np.random.default_rng(seed)
    px = np.zeros((height, width, 3), np.uint8)
    px[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    px[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    for _ in range(6):
        x, y = int(rng.integers(0, width - width // 4)), int(rng.integers(0, height - height // 4))
        px[y : y + height // 4, x : x + width // 4] = rng.integers(0, 256, 3)
    return Image.fromarray(px)


class FakeScreen:
    """An injected grab: returns whatever image is 'on screen', records what was asked."""

    def __init__(self, image: Image.Image | None) -> None:
        self.image = image
        self.calls: list[tuple[int, int, int, int]] = []

    def __call__(self, geometry: tuple[int, int, int, int]) -> Image.Image | None:
        self.calls.append(geometry)
        return None if self.image is None else self.image.copy()


def window(app: str = "code", wid: int = 1, size: tuple[int, int] = (1280, 800), **kw: object) -> WindowInfo:
    return WindowInfo(app_id=app, title="t", geometry=(10, 20, *size), window_id=wid, **kw)  # type: ignore[arg-type]


def shooter(image: Image.Image | None, **cfg: object) -> tuple[Screenshotter, FakeScreen]:
    screen = FakeScreen(image)
    return Screenshotter(ScreenshotConfig(**cfg), grab=screen), screen  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("size", "limits", "expected"),
    [
        ((1280, 800), (960, 960), (960, 600)),
        ((1920, 1080), (960, 960), (960, 540)),
        ((800, 1600), (960, 960), (480, 960)),
        ((300, 200), (960, 960), (300, 200)),  # never upscaled
        ((5000, 3), (960, 960), (960, 1)),  # never zero
    ],
)
def test_downscale_keeps_aspect_and_fits(
    size: tuple[int, int], limits: tuple[int, int], expected: tuple[int, int]
) -> None:
    assert fit_size(*size, *limits) == expected
    s, _ = shooter(scene(*size), max_width=limits[0], max_height=limits[1])
    shot = s.maybe_capture(window(size=size), "focus_change", T0)
    assert shot is not None
    assert (shot.width, shot.height) == expected
    assert Image.open(io.BytesIO(shot.image)).size == expected


@pytest.mark.parametrize("fmt", ["webp", "jpeg"])
def test_encoding_magic_bytes_hash_and_fields(fmt: str) -> None:
    s, screen = shooter(scene(), format=fmt, quality=50)
    shot = s.maybe_capture(window(), "click", T0)
    assert isinstance(shot, Screenshot)
    if fmt == "webp":
        assert shot.image[:4] == b"RIFF" and shot.image[8:12] == b"WEBP"
    else:
        assert shot.image[:3] == b"\xff\xd8\xff"
    decoded = Image.open(io.BytesIO(shot.image))
    assert decoded.format == fmt.upper()
    assert shot.fmt == fmt
    assert shot.sha256 == hashlib.sha256(shot.image).digest()
    assert (shot.captured_at_us, shot.reason) == (T0, "click")
    assert screen.calls == [(10, 20, 1280, 800)]  # only the window's geometry is grabbed
    assert s.counters.taken == 1 and s.counters.bytes_total == len(shot.image)


def test_unchanged_screen_is_skipped_changed_is_kept() -> None:
    s, screen = shooter(scene(seed=1), min_interval_s=1)
    assert s.maybe_capture(window(), "focus_change", T0) is not None
    assert s.maybe_capture(window(), "click", T0 + 2 * S) is None
    assert s.counters.skipped_unchanged == 1
    screen.image = scene(seed=2)
    assert s.maybe_capture(window(), "click", T0 + 4 * S) is not None
    assert s.counters.taken == 2


def test_a_typed_character_is_not_a_meaningful_change() -> None:
    base = scene(seed=3)
    typed = base.copy()
    typed.paste((0, 0, 0), (600, 400, 608, 414))  # one glyph-sized blot
    assert hamming(dhash(base), dhash(typed)) <= ScreenshotConfig().hash_distance
    s, screen = shooter(base, min_interval_s=0)
    assert s.maybe_capture(window(), "focus_change", T0) is not None
    screen.image = typed
    assert s.maybe_capture(window(), "click", T0 + S) is None
    assert s.counters.skipped_unchanged == 1


def test_unchanged_is_per_window() -> None:
    s, _ = shooter(scene(seed=4), min_interval_s=0)
    assert s.maybe_capture(window(wid=1), "focus_change", T0) is not None
    assert s.maybe_capture(window(wid=2), "focus_change", T0 + 1) is not None
    assert s.maybe_capture(window(app="slack", wid=1), "focus_change", T0 + 2) is not None
    assert s.maybe_capture(window(wid=1), "click", T0 + 3) is None
    assert (s.counters.taken, s.counters.skipped_unchanged) == (3, 1)


def test_rate_limit_drops_without_grabbing() -> None:
    s, screen = shooter(scene(seed=5), min_interval_s=10)
    assert s.maybe_capture(window(), "focus_change", T0) is not None
    screen.image = scene(seed=6)
    assert s.maybe_capture(window(app="slack", wid=9), "focus_change", T0 + 9 * S) is None
    assert s.counters.skipped_rate_limited == 1
    assert len(screen.calls) == 1  # a rate-limited request never touches the screen
    assert s.maybe_capture(window(app="slack", wid=9), "focus_change", T0 + 10 * S) is not None
    assert s.counters.taken == 2


def test_unchanged_shots_do_not_reset_the_rate_limit_clock() -> None:
    s, screen = shooter(scene(seed=7), min_interval_s=10)
    assert s.maybe_capture(window(), "focus_change", T0) is not None
    assert s.maybe_capture(window(), "click", T0 + 11 * S) is None  # unchanged
    screen.image = scene(seed=8)
    assert s.maybe_capture(window(), "click", T0 + 12 * S) is not None


def test_clock_going_backwards_does_not_block_screenshots() -> None:
    s, screen = shooter(scene(seed=9), min_interval_s=10)
    assert s.maybe_capture(window(), "focus_change", T0) is not None
    screen.image = scene(seed=10)
    assert s.maybe_capture(window(), "focus_change", T0 - 3600 * S) is not None


def test_hash_distance_threshold_is_inclusive() -> None:
    a, b = scene(640, 400, seed=11), scene(640, 400, seed=12)  # small enough not to be downscaled
    d = hamming(dhash(a), dhash(b))
    assert 0 < d < 64
    for threshold, kept in ((d, False), (d - 1, True)):
        s, screen = shooter(a, min_interval_s=0, hash_distance=threshold)
        assert s.maybe_capture(window(size=(640, 400)), "focus_change", T0) is not None
        screen.image = b
        assert (s.maybe_capture(window(size=(640, 400)), "click", T0 + 1) is not None) is kept


def test_dhash_is_stable_under_rescaling_and_lossy_noise() -> None:
    img = scene(seed=13)
    assert dhash(img) == dhash(img.copy())
    assert hamming(dhash(img), dhash(img.resize((640, 400)))) <= 2
    noisy = np.asarray(img).astype(np.int16) + np.random.default_rng(0).integers(-3, 4, (800, 1280, 3))
    assert hamming(dhash(img), dhash(Image.fromarray(noisy.clip(0, 255).astype(np.uint8)))) <= 2
    assert dhash(Image.new("RGB", (50, 50), (80, 80, 80))) == 0


@pytest.mark.parametrize(
    "win",
    [None, WindowInfo(app_id="code", title="t"), WindowInfo(app_id="code", title="t", geometry=(0, 0, 0, 10))],
)
def test_no_window_or_geometry_is_skipped_without_grabbing(win: WindowInfo | None) -> None:
    s, screen = shooter(scene())
    assert s.maybe_capture(win, "focus_change", T0) is None
    assert s.counters.skipped_no_window == 1 and screen.calls == []


def test_window_off_screen_is_skipped() -> None:
    s, _ = shooter(None)
    assert s.maybe_capture(window(), "focus_change", T0) is None
    assert s.counters.skipped_no_window == 1 and s.counters.taken == 0


def test_password_field_is_never_grabbed() -> None:
    s, screen = shooter(scene())
    assert s.maybe_capture(window(password_field=True), "focus_change", T0) is None
    assert s.counters.skipped_password_field == 1 and screen.calls == []


def test_rgba_input_is_encoded_as_rgb() -> None:
    s, _ = shooter(scene(320, 200).convert("RGBA"), format="jpeg")
    shot = s.maybe_capture(window(size=(320, 200)), "click", T0)
    assert shot is not None and Image.open(io.BytesIO(shot.image)).mode == "RGB"


def test_config_reports_every_error_at_once_and_is_frozen() -> None:
    with pytest.raises(ValidationError) as err:
        ScreenshotConfig(max_width=0, format="png", quality=101, min_interval_s=-1, hash_distance=65)  # type: ignore[arg-type]
    assert {e["loc"][0] for e in err.value.errors()} == {
        "max_width", "format", "quality", "min_interval_s", "hash_distance"
    }
    with pytest.raises(ValidationError):
        ScreenshotConfig(colour=True)  # type: ignore[call-arg]
    cfg = ScreenshotConfig()
    with pytest.raises(ValidationError):
        cfg.quality = 10  # type: ignore[misc]


@settings(max_examples=60, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 30 * S), st.integers(1, 3), st.integers(0, 2)), min_size=1, max_size=25
    ),
    interval_s=st.sampled_from([0.0, 2.5, 10.0]),
)
def test_kept_shots_respect_the_interval_and_never_repeat_a_window_state(
    steps: list[tuple[int, int, int]], interval_s: float
) -> None:
    """Whatever the sequence of requests: kept shots are at least min_interval_s apart, and a
    window showing the same picture as its last kept shot is never shot again."""
    images = [scene(96, 60, seed=i) for i in range(3)]
    s, screen = shooter(images[0], min_interval_s=interval_s)
    now = T0
    kept_at: list[int] = []
    last_kept: dict[int, int] = {}
    for gap, wid, img in steps:
        now += gap
        screen.image = images[img]
        shot = s.maybe_capture(window(wid=wid, size=(96, 60)), "click", now)
        if shot is not None:
            assert last_kept.get(wid) != img
            kept_at.append(now)
            last_kept[wid] = img
    assert all(b - a >= interval_s * S for a, b in zip(kept_at, kept_at[1:], strict=False))
    c = s.counters
    assert c.taken + c.skipped_unchanged + c.skipped_rate_limited == len(steps)
