"""Screenshotter against a real X server: a real window with drawn content, grabbed by mss."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pytest
from PIL import Image

from handtrace.agent.screenshots import ScreenshotConfig, Screenshotter
from handtrace.agent.sources.x11 import X11Source
from tests.xvfb import WindowFactory, XvfbServer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

S = 1_000_000
T0 = 1_700_000_000 * S
RED, BLUE, GREEN, WHITE = (220, 30, 30), (30, 30, 220), (30, 200, 30), (255, 255, 255)


@pytest.fixture
def shooter(xvfb: XvfbServer) -> Iterator[Screenshotter]:
    """A Screenshotter grabbing the test's Xvfb through mss: at most 320 px wide, WebP."""
    s = Screenshotter(ScreenshotConfig(max_width=320, max_height=320, min_interval_s=0, quality=90),
                      display=xvfb.display)
    yield s
    s.close()


def mean_rgb(img: Image.Image, box: tuple[int, int, int, int]) -> np.ndarray:
    return np.asarray(img.crop(box).convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)


def test_window_is_grabbed_downscaled_and_decodable(
    xvfb: XvfbServer, windows: WindowFactory, shooter: Screenshotter
) -> None:
    # Something else on screen next to it must not end up in the shot.
    windows(wm_class=("spotify", "Spotify"), title="music", geometry=(0, 0, 100, 800), background=GREEN, focus=False)
    win = windows(wm_class=("code", "Code"), title="editor", geometry=(100, 150, 640, 400), background=WHITE)
    win.fill(RED, (0, 0, 320, 400))  # left half red
    win.fill(BLUE, (320, 200, 320, 200))  # bottom-right quarter blue
    info = X11Source(display=xvfb.display).focused_window()
    assert info is not None and info.geometry == (100, 150, 640, 400)

    shot = shooter.maybe_capture(info, "focus_change", T0)
    assert shot is not None
    assert (shot.width, shot.height, shot.fmt) == (320, 200, "webp")
    img = Image.open(io.BytesIO(shot.image))
    img.load()
    assert img.size == (320, 200)
    px = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert px.std() > 40, "the screenshot is blank although content was drawn"
    # Quadrant colours survive the downscale and the lossy encoding (sampled away from edges).
    for box, colour in (((20, 20, 140, 180), RED), ((180, 20, 300, 80), WHITE), ((180, 120, 300, 180), BLUE)):
        assert np.abs(mean_rgb(img, box) - colour).max() < 20, (box, mean_rgb(img, box))
    assert shooter.counters.taken == 1 and shooter.counters.bytes_total == len(shot.image)


def test_unchanged_window_is_skipped_changed_is_kept(
    xvfb: XvfbServer, windows: WindowFactory, shooter: Screenshotter
) -> None:
    win = windows(wm_class=("code", "Code"), title="editor", geometry=(200, 100, 640, 400))
    win.fill(RED, (0, 0, 640, 100))
    info = X11Source(display=xvfb.display).focused_window()
    assert shooter.maybe_capture(info, "focus_change", T0) is not None
    assert shooter.maybe_capture(info, "click", T0 + S) is None
    assert shooter.counters.skipped_unchanged == 1
    # A dialog opens. (dHash compares horizontal neighbours only: a full-width band would not
    # change it -- a known blind spot of the 64-bit hash the spec asks for.)
    win.fill(BLUE, (320, 180, 240, 160))
    assert shooter.maybe_capture(info, "click", T0 + 2 * S) is not None
    assert shooter.counters.taken == 2


def test_window_partly_off_screen_is_clipped_and_fully_off_screen_is_skipped(
    xvfb: XvfbServer, windows: WindowFactory, shooter: Screenshotter
) -> None:
    win = windows(wm_class=("code", "Code"), title="editor", geometry=(1000, 600, 640, 400))
    win.fill(RED, (0, 0, 280, 200))
    info = X11Source(display=xvfb.display).focused_window()
    assert info is not None and info.geometry == (1000, 600, 640, 400)
    shot = shooter.maybe_capture(info, "focus_change", T0)
    assert shot is not None and (shot.width, shot.height) == (280, 200)  # only the visible part
    gone = info.__class__(app_id="code", title="x", geometry=(2000, 2000, 100, 100), window_id=1)
    assert shooter.maybe_capture(gone, "focus_change", T0 + S) is None
    assert shooter.counters.skipped_no_window == 1
