"""X11Source under a real Xvfb: real input from xdotool (XTEST), captured through RECORD.

Each test ends its input with a sentinel on the same device (a move to a far corner for the
pointer, F12 for the keyboard) and waits for it: RECORD delivers one context's events in order,
so once the sentinel is in, everything before it is too, and the events before it can be
compared exactly -- no fixed sleeps.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator

import pytest
import Xlib.X

from handtrace.agent.capture import CaptureUnavailable, Event, WindowInfo
from handtrace.agent.sources import open_source, platform_source_name
from handtrace.agent.sources.macos import MacOSSource
from handtrace.agent.sources.windows import WindowsSource
from handtrace.agent.sources.x11 import X11Source
from tests.xvfb import (
    WindowFactory,
    XvfbServer,
    XWindow,
    set_net_active_window,
    xdotool,
    xvfb_server,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]

DELIVERY_TIMEOUT_S = 10.0
KEYSYM_F12 = 0xFFC9
KEYSYM_SHIFT_L, KEYSYM_CONTROL_L = 0xFFE1, 0xFFE3
SENTINEL_XY = (1279, 799)


class Recorder:
    """A thread-safe ``emit`` that tests can wait on."""

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._cond = threading.Condition()

    def __call__(self, event: Event) -> None:
        with self._cond:
            self._events.append(event)
            self._cond.notify_all()

    def snapshot(self) -> list[Event]:
        with self._cond:
            return list(self._events)

    def clear(self) -> None:
        with self._cond:
            self._events.clear()

    def until(self, sentinel: Callable[[Event], bool], what: str) -> list[Event]:
        """Wait (with a deadline) for an event matching ``sentinel``; the events before it."""
        deadline = time.monotonic() + DELIVERY_TIMEOUT_S
        with self._cond:
            while True:
                for i, e in enumerate(self._events):
                    if sentinel(e):
                        return list(self._events[:i])
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"{what} not captured within {DELIVERY_TIMEOUT_S} s; got {self._events}")
                self._cond.wait(left)


def pointer_sentinel(server: XvfbServer, rec: Recorder) -> list[Event]:
    xdotool(server, "mousemove", *map(str, SENTINEL_XY))
    return rec.until(lambda e: e["kind"] == "pointer_move" and (e["x"], e["y"]) == SENTINEL_XY, "the pointer sentinel")


def key_sentinel(server: XvfbServer, rec: Recorder) -> list[Event]:
    xdotool(server, "key", "F12")
    return rec.until(lambda e: e["kind"] == "key_down" and e["key_code"] == KEYSYM_F12, "the F12 sentinel")


def strip(events: list[Event]) -> list[Event]:
    """Events without their timestamps, after checking each has a sane one."""
    out = []
    for e in events:
        e = dict(e)
        assert isinstance(e.pop("captured_at_us"), int)
        out.append(e)
    return out


@pytest.fixture
def editor(windows: WindowFactory) -> XWindow:
    """A focused 'code' window, as VS Code names itself in WM_CLASS."""
    return windows(wm_class=("code", "Code"), title="capture.py — handtrace — Visual Studio Code",
                            geometry=(100, 120, 800, 500))


@pytest.fixture
def capture(xvfb: XvfbServer, editor: XWindow) -> Iterator[tuple[X11Source, Recorder]]:
    """A started X11Source on the test's Xvfb, with the editor focused; stopped at the end, and
    no thread of it left behind."""
    before = set(threading.enumerate())
    source = X11Source(display=xvfb.display)
    rec = Recorder()
    source.start(rec)
    yield source, rec
    source.stop()
    leftover = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert leftover == [], f"threads left running after stop(): {leftover}"


def test_pointer_moves_are_captured_exactly(xvfb: XvfbServer, capture: tuple[X11Source, Recorder]) -> None:
    _, rec = capture
    t0 = time.time_ns() // 1000
    targets = [(100, 200), (640, 10), (0, 0), (1000, 700)]
    for x, y in targets:
        xdotool(xvfb, "mousemove", str(x), str(y))
    events = pointer_sentinel(xvfb, rec)
    t1 = time.time_ns() // 1000
    assert strip(events) == [{"kind": "pointer_move", "x": x, "y": y} for x, y in targets]
    stamps = [e["captured_at_us"] for e in events]
    assert stamps == sorted(stamps) and t0 <= stamps[0] and stamps[-1] <= t1


def test_clicks_arrive_as_press_release_pairs(xvfb: XvfbServer, capture: tuple[X11Source, Recorder]) -> None:
    _, rec = capture
    xdotool(xvfb, "mousemove", "300", "400")
    rec.until(lambda e: e["kind"] == "pointer_move", "the move to 300,400")
    rec.clear()
    for button in ("1", "3", "2", "8"):
        xdotool(xvfb, "click", button)
    events = pointer_sentinel(xvfb, rec)
    expected = []
    for name in ("left", "right", "middle", "other"):
        for pressed in (True, False):
            expected.append({"kind": "click", "x": 300, "y": 400, "button": name, "pressed": pressed})
    assert strip(events) == expected


def test_wheel_becomes_scroll_notches_positive_towards_the_end(
    xvfb: XvfbServer, capture: tuple[X11Source, Recorder]
) -> None:
    _, rec = capture
    xdotool(xvfb, "mousemove", "500", "300")
    rec.until(lambda e: e["kind"] == "pointer_move", "the move to 500,300")
    rec.clear()
    # X buttons: 4 wheel up, 5 wheel down, 6 wheel left, 7 wheel right; a wheel release is no event.
    for button in ("5", "5", "4", "6", "7"):
        xdotool(xvfb, "click", button)
    events = pointer_sentinel(xvfb, rec)
    assert [(e["kind"], e["x"], e["y"], e["scroll_dx"], e["scroll_dy"]) for e in events] == [
        ("scroll", 500, 300, 0, 1),
        ("scroll", 500, 300, 0, 1),
        ("scroll", 500, 300, 0, -1),
        ("scroll", 500, 300, -1, 0),
        ("scroll", 500, 300, 1, 0),
    ]


def test_typed_text_is_reconstructed_from_key_downs(xvfb: XvfbServer, capture: tuple[X11Source, Recorder]) -> None:
    _, rec = capture
    typed = "Hello, World 42!"
    xdotool(xvfb, "type", "--delay", "5", typed)
    events = key_sentinel(xvfb, rec)
    downs = [e for e in events if e["kind"] == "key_down"]
    ups = [e for e in events if e["kind"] == "key_up"]
    assert "".join(e["text"] for e in downs if e["text"] is not None) == typed
    assert all(e["text"] is None for e in ups)
    # Every key that went down came up with the same keysym, even when shift was released first.
    assert sorted(e["key_code"] for e in downs) == sorted(e["key_code"] for e in ups)
    chars = [e for e in downs if e["text"] is not None]
    assert [e["key_code"] for e in chars] == [ord(c) for c in typed]
    for e in chars:
        assert e["modifiers"] == (1 if e["text"] in "HW!" else 0), e
    shift_downs = [e for e in downs if e["key_code"] == KEYSYM_SHIFT_L]
    assert len(shift_downs) == 3 and all(e["modifiers"] == 0 and e["text"] is None for e in shift_downs)


def test_ctrl_s_is_a_shortcut_with_ctrl_on_the_s(xvfb: XvfbServer, capture: tuple[X11Source, Recorder]) -> None:
    _, rec = capture
    xdotool(xvfb, "key", "ctrl+s")
    events = strip(key_sentinel(xvfb, rec))
    assert {"kind": "key_down", "key_code": KEYSYM_CONTROL_L, "modifiers": 0, "text": None} in events
    assert {"kind": "key_down", "key_code": ord("s"), "modifiers": 2, "text": None} in events
    assert {"kind": "key_up", "key_code": KEYSYM_CONTROL_L, "modifiers": 0, "text": None} in events
    assert [e["kind"] for e in events if e["key_code"] == ord("s")] == ["key_down", "key_up"]
    assert len(events) == 4
    # ctrl is up again: the sentinel key carries no modifier
    f12 = [e for e in rec.snapshot() if e["key_code"] == KEYSYM_F12]
    assert f12[0]["kind"] == "key_down" and f12[0]["modifiers"] == 0


def test_emit_failure_does_not_stop_capture(xvfb: XvfbServer, editor: XWindow) -> None:
    rec = Recorder()
    failed = []

    def flaky(event: Event) -> None:
        if not failed:
            failed.append(event)
            raise RuntimeError("agent bug")
        rec(event)

    source = X11Source(display=xvfb.display)
    source.start(flaky)
    try:
        xdotool(xvfb, "mousemove", "10", "10")
        pointer_sentinel(xvfb, rec)
        assert source.emit_errors == 1 and failed[0]["x"] == 10
    finally:
        source.stop()


def test_focused_window_reports_the_client_and_follows_focus(
    xvfb: XvfbServer, capture: tuple[X11Source, Recorder], editor: XWindow,
    windows: WindowFactory,
) -> None:
    source, _ = capture
    assert source.focused_window() == WindowInfo(
        app_id="code", title="capture.py — handtrace — Visual Studio Code",
        geometry=(100, 120, 800, 500), window_id=editor.id,
    )
    chat = windows(wm_class=("slack", "Slack"), title="eng-platform (Channel) - Acme - Slack",
                            geometry=(300, 50, 600, 400), net_wm_name=False)
    info = source.focused_window()
    assert info is not None
    assert (info.app_id, info.title, info.geometry, info.window_id) == (
        "slack", "eng-platform (Channel) - Acme - Slack", (300, 50, 600, 400), chat.id
    )
    editor.focus()
    info = source.focused_window()
    assert info is not None and info.window_id == editor.id and info.app_id == "code"


def test_focused_window_finds_the_client_inside_a_frame(
    xvfb: XvfbServer, windows: WindowFactory
) -> None:
    term = windows(wm_class=("gnome-terminal-server", "Gnome-terminal"), title="ada@laptop: ~",
                           geometry=(200, 150, 500, 300), framed=True)
    source = X11Source(display=xvfb.display)
    try:
        info = source.focused_window()
    finally:
        source.stop()
    assert info == WindowInfo(app_id="gnome-terminal-server", title="ada@laptop: ~",
                              geometry=(200, 150, 500, 300), window_id=term.id)


def test_focused_window_prefers_ewmh_active_window(
    xvfb: XvfbServer, windows: WindowFactory
) -> None:
    editor = windows(wm_class=("code", "Code"), title="a", geometry=(0, 0, 300, 300))
    browser = windows(wm_class=("google-chrome", "Google-chrome"), title="b",
                               geometry=(400, 0, 300, 300), focus=False)
    source = X11Source(display=xvfb.display)
    try:
        assert source.focused_window().window_id == editor.id  # type: ignore[union-attr]
        set_net_active_window(xvfb, browser.id)
        assert source.focused_window().app_id == "google-chrome"  # type: ignore[union-attr]
        set_net_active_window(xvfb, 0)  # a WM saying "none": fall back to the input focus
        assert source.focused_window().window_id == editor.id  # type: ignore[union-attr]
    finally:
        source.stop()


def test_focused_window_none_and_pointer_root(xvfb: XvfbServer, windows: WindowFactory) -> None:
    win = windows(wm_class=("code", "Code"), title="a", geometry=(100, 100, 300, 300))
    source = X11Source(display=xvfb.display)
    try:
        win.conn.set_input_focus(Xlib.X.NONE, Xlib.X.RevertToNone, Xlib.X.CurrentTime)
        win.conn.sync()
        assert source.focused_window() is None
        win.conn.set_input_focus(Xlib.X.PointerRoot, Xlib.X.RevertToPointerRoot, Xlib.X.CurrentTime)
        win.conn.sync()
        xdotool(xvfb, "mousemove", "150", "150")
        assert source.focused_window().window_id == win.id  # type: ignore[union-attr]
        xdotool(xvfb, "mousemove", "1000", "700")  # over the bare root
        assert source.focused_window() is None
    finally:
        source.stop()


def test_display_argument_wins_over_environment_and_environment_is_restored(
    xvfb: XvfbServer, editor: XWindow, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISPLAY", ":65001")  # no such server
    source = open_source("x11", display=xvfb.display)
    rec = Recorder()
    source.start(rec)
    try:
        assert os.environ["DISPLAY"] == ":65001"
        xdotool(xvfb, "mousemove", "5", "6")
        assert strip(pointer_sentinel(xvfb, rec)) == [{"kind": "pointer_move", "x": 5, "y": 6}]
    finally:
        source.stop()
        source.stop()  # idempotent


def test_server_without_record_is_capture_unavailable() -> None:
    with xvfb_server(extra_args=("-extension", "RECORD")) as server:
        source = X11Source(display=server.display)
        with pytest.raises(CaptureUnavailable, match="lacks the RECORD extension"):
            source.start(lambda e: None)
        source.stop()


def test_no_display_is_capture_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(CaptureUnavailable, match="no X display"):
        X11Source().start(lambda e: None)
    with pytest.raises(CaptureUnavailable, match="cannot open X display :65002"):
        X11Source(display=":65002").start(lambda e: None)


def test_open_source_by_name() -> None:
    assert isinstance(open_source("x11", display=":0"), X11Source)
    assert open_source("auto", display=":0").name == platform_source_name()
    assert [platform_source_name(p) for p in ("linux", "darwin", "win32")] == ["x11", "macos", "windows"]
    for name, cls in (("macos", MacOSSource), ("windows", WindowsSource)):
        stub = open_source(name)
        assert isinstance(stub, cls) and stub.name == name and stub.focused_window() is None
        with pytest.raises(CaptureUnavailable, match="not implemented yet"):
            stub.start(lambda e: None)
        stub.stop()
    with pytest.raises(ValueError, match="known: auto, x11, macos, windows"):
        open_source("wayland")
    with pytest.raises(ValueError, match="synthetic source is built by the agent"):
        open_source("synthetic")
