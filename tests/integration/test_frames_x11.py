"""Demonstration frames from a real X server: real overlapping windows under Xvfb, the real
full-screen grab (mss), X11Source.visible_windows and the local policy's decision."""

from __future__ import annotations

import io

import numpy as np
import pytest
import Xlib.X
from PIL import Image

from handtrace.agent.capture import WindowInfo
from handtrace.agent.frames import FILL_RGB, FrameCapturer, FrameConfig, ScreenGrab, stamp_focused
from handtrace.agent.localpolicy import LocalPolicy
from handtrace.agent.sources.x11 import X11Source
from handtrace.core.policy import Policy
from tests.xvfb import WindowFactory, XvfbServer

pytestmark = pytest.mark.timeout(120)

EDITOR = ("editor", "Editor")
CHAT = ("chat", "Chat")
EDITOR_RGB = (240, 240, 230)
CHAT_RGB = (200, 30, 30)


def decide_with(policy: LocalPolicy):  # noqa: ANN201
    def decide(w: WindowInfo) -> tuple[bool, str | None]:
        d = policy.window(w)
        return d.allowed, d.url
    return decide


def pixels(frame_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(frame_bytes)).convert("RGB"))


def region(px: np.ndarray, r: tuple[int, int, int, int]) -> np.ndarray:
    x, y, w, h = r
    return px[y:y + h, x:x + w]


def test_visible_windows_are_bottom_to_top_with_root_geometry(xvfb: XvfbServer, windows: WindowFactory) -> None:
    a = windows(wm_class=EDITOR, title="doc", geometry=(100, 100, 640, 400))
    b = windows(wm_class=CHAT, title="chat", geometry=(500, 300, 500, 350), framed=True)
    src = X11Source(display=xvfb.display)
    try:
        got = src.visible_windows()
        assert got is not None
        assert [(w.app_id, w.window_id, w.geometry) for w in got] == [
            ("editor", a.id, (100, 100, 640, 400)),
            # framed: the outer rectangle of the frame (decorations included), the client's app
            ("chat", b.id, (500 - 7, 300 - 23, 500 + 14, 350 + 30)),
        ]
        # raise the editor: it becomes the last (top) entry
        a.window.configure(stack_mode=Xlib.X.Above)  # type: ignore[attr-defined]
        a.conn.sync()
        assert [w.app_id for w in src.visible_windows() or []] == ["chat", "editor"]
        # unmapped windows are not visible
        b.frame.unmap()  # type: ignore[union-attr]
        b.conn.sync()
        assert [w.app_id for w in src.visible_windows() or []] == ["editor"]
    finally:
        src.stop()


def test_frame_fills_the_non_allowlisted_window_over_an_allowlisted_one(
    xvfb: XvfbServer, windows: WindowFactory
) -> None:
    editor = windows(wm_class=EDITOR, title="doc", geometry=(100, 100, 640, 400), background=EDITOR_RGB)
    editor.fill((20, 90, 200), (10, 10, 200, 30))  # some content, not the fill colour
    windows(wm_class=CHAT, title="chat", geometry=(500, 300, 500, 350), background=CHAT_RGB)
    src = X11Source(display=xvfb.display)
    grab = ScreenGrab(xvfb.display)
    local = LocalPolicy(Policy(version=1, allowed_apps=frozenset({"editor"})))
    t = [1_700_000_000_000_000]
    cap = FrameCapturer(FrameConfig(format="png"), grab,
                        lambda: stamp_focused(src.visible_windows(), src.focused_window()),
                        decide_with(local), clock=lambda: t[0])
    try:
        cap.poll(t[0])
        frame = cap.frame_before(t[0] + 1)
        assert frame is not None
        assert (frame.width, frame.height) == (xvfb.width, xvfb.height)
        px = pixels(frame.image)
        chat = region(px, (500, 300, 500, 350))
        assert (chat == FILL_RGB).all(), "the non-allowlisted window's pixels must be the fill colour"
        visible_editor = region(px, (100, 100, 400, 400))  # left of the chat window
        assert not (visible_editor == FILL_RGB).all(axis=-1).all()
        assert (region(px, (100, 100, 400, 200)) != FILL_RGB).any(axis=-1).all()
        assert (region(px, (120, 120, 100, 20)) == (20, 90, 200)).all()
        # the desktop is filled
        assert (region(px, (0, 0, 100, 800)) == FILL_RGB).all()
        # metadata: the editor's visible pieces (not under the chat window) and the filled rest
        assert {w["app_id"] for w in frame.windows} == {"editor"}
        assert all(w["url"] is None for w in frame.windows)
        area = sum(r["width"] * r["height"] for r in frame.windows + frame.filled)
        assert area == xvfb.width * xvfb.height
        assert sum(w["width"] * w["height"] for w in frame.windows) == 640 * 400 - 240 * 200
        for w in frame.windows:
            assert not (region(px, (w["x"], w["y"], w["width"], w["height"])) == FILL_RGB).all()
        for r in frame.filled:
            assert (region(px, (r["x"], r["y"], r["width"], r["height"])) == FILL_RGB).all()
    finally:
        grab.close()
        src.stop()


def test_allowlisting_nothing_fills_the_whole_screen(xvfb: XvfbServer, windows: WindowFactory) -> None:
    windows(wm_class=EDITOR, title="doc", geometry=(0, 0, 1280, 800), background=EDITOR_RGB)
    src = X11Source(display=xvfb.display)
    grab = ScreenGrab(xvfb.display)
    cap = FrameCapturer(FrameConfig(format="webp"), grab, src.visible_windows,
                        decide_with(LocalPolicy(None)), clock=lambda: 1)
    try:
        frame = cap.final_frame(1)
        assert frame is not None and frame.fmt == "webp" and frame.windows == []
        assert (pixels(frame.image) == FILL_RGB).all()
    finally:
        grab.close()
        src.stop()
