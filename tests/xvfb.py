"""A real X server for tests: Xvfb on a display number it picks itself, real top-level windows,
and xdotool to drive real input.

The ``xvfb`` and ``windows`` fixtures over these context managers live in
tests/integration/conftest.py.

A missing Xvfb or xdotool is a test failure with a clear message, never a skip.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import Xlib.display
import Xlib.error
import Xlib.X
import Xlib.Xatom

from handtrace.core.procs import spawn_owned

XVFB_START_TIMEOUT_S = 15.0


@dataclass
class XvfbServer:
    """One running Xvfb."""

    number: int
    width: int
    height: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def display(self) -> str:
        """The display name, e.g. ``":3"``."""
        return f":{self.number}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for a subprocess that should talk to this server."""
        return {**os.environ, "DISPLAY": self.display}

    def connect(self) -> Xlib.display.Display:
        """A new Xlib connection to this server (the caller closes it)."""
        return Xlib.display.Display(self.display)

    def log_tail(self) -> str:
        """The end of Xvfb's own output, for failure messages."""
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Terminate Xvfb's process group and wait for it; idempotent."""
        if self.proc.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def _require(tool: str, package: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed; these tests need a real X server tool: apt-get install {package}")
    return path


@contextmanager
def xvfb_server(
    width: int = 1280, height: int = 800, depth: int = 24, extra_args: Sequence[str] = ()
) -> Iterator[XvfbServer]:
    """Start ``Xvfb -screen 0 WxHxD -nolisten tcp`` on a display number Xvfb picks itself
    (``-displayfd``), wait until a real X connection succeeds, and kill it at the end.

    Args:
        width: Screen width in pixels.
        height: Screen height in pixels.
        depth: Colour depth in bits.
        extra_args: More Xvfb arguments, e.g. ``("-extension", "RECORD")``.
    """
    xvfb = _require("Xvfb", "xvfb")
    log = Path(tempfile.mkstemp(prefix="xvfb-", suffix=".log")[1])
    read_fd, write_fd = os.pipe()
    # -noreset: without it the server resets whenever its last client disconnects, which would
    # wipe windows and properties between two steps of a test.
    with open(log, "wb") as out:
        # Owned (core/procs.py): SIGTERM when the test process dies, even by SIGKILL, so an
        # interrupted run leaves no Xvfb behind despite its own process group.
        proc = spawn_owned(
            [xvfb, "-displayfd", str(write_fd), "-screen", "0", f"{width}x{height}x{depth}",
             "-nolisten", "tcp", "-noreset", *extra_args],
            death_signal=signal.SIGTERM,
            pass_fds=(write_fd,), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    os.close(write_fd)
    server: XvfbServer | None = None
    try:
        deadline = time.monotonic() + XVFB_START_TIMEOUT_S
        digits = b""
        while not digits.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([read_fd], [], [], max(left, 0))
            chunk = os.read(read_fd, 16) if ready else b""
            if not chunk:
                proc.kill()
                pytest.fail(f"Xvfb did not report its display number within {XVFB_START_TIMEOUT_S} s "
                            f"(exit code {proc.poll()}):\n{log.read_text(errors='replace')[-2000:]}")
            digits += chunk
        server = XvfbServer(int(digits), width, height, proc, log)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                server.connect().close()
                break
            except (Xlib.error.DisplayError, OSError) as e:
                last_error = e
                time.sleep(0.05)
        else:
            pytest.fail(f"Xvfb on {server.display} did not accept an X connection: {last_error}\n{server.log_tail()}")
        yield server
    finally:
        os.close(read_fd)
        if server is not None:
            server.stop()
        elif proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.unlink(missing_ok=True)


def xdotool(server: XvfbServer, *args: str) -> None:
    """Run ``xdotool ARGS`` against ``server``; a failure fails the test with xdotool's output."""
    tool = _require("xdotool", "xdotool")
    done = subprocess.run([tool, *args], env=server.env, capture_output=True, timeout=30)
    if done.returncode:
        pytest.fail(f"xdotool {' '.join(args)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}")


@dataclass
class XWindow:
    """A real top-level window owned by its own X client connection (like a real app)."""

    conn: Xlib.display.Display
    window: object
    """The client window (the one carrying WM_CLASS)."""
    wm_class: tuple[str, str]
    title: str
    geometry: tuple[int, int, int, int]
    """The client window in root coordinates."""
    frame: object | None = None
    """A top-level parent without WM_CLASS, as a reparenting window manager makes, if framed."""
    _gcs: dict[int, object] = field(default_factory=dict)

    @property
    def id(self) -> int:
        """The client window's X id."""
        return int(self.window.id)  # type: ignore[attr-defined]

    def focus(self) -> None:
        """Give this window (its frame, if framed) the input focus, as a WM would on click."""
        target = self.frame if self.frame is not None else self.window
        self.conn.set_input_focus(target, Xlib.X.RevertToParent, Xlib.X.CurrentTime)
        self.conn.sync()

    def fill(self, rgb: tuple[int, int, int], rect: tuple[int, int, int, int]) -> None:
        """Fill ``(x, y, w, h)`` of the window (window coordinates) with a solid colour."""
        pixel = (rgb[0] << 16) | (rgb[1] << 8) | rgb[2]
        gc = self._gcs.get(pixel)
        if gc is None:
            gc = self._gcs[pixel] = self.window.create_gc(foreground=pixel)  # type: ignore[attr-defined]
        self.window.fill_rectangle(gc, *rect)  # type: ignore[attr-defined]
        self.conn.sync()

    def close(self) -> None:
        """Destroy the window by closing its client connection."""
        with suppress(Exception):
            self.conn.close()


def open_window(
    server: XvfbServer,
    *,
    wm_class: tuple[str, str],
    title: str,
    geometry: tuple[int, int, int, int] = (100, 100, 640, 400),
    net_wm_name: bool = True,
    background: tuple[int, int, int] = (255, 255, 255),
    framed: bool = False,
    focus: bool = True,
) -> XWindow:
    """Open, map and (by default) focus a top-level window with ``WM_CLASS`` and a title.

    Args:
        server: The X server.
        wm_class: ``(instance, class)``.
        title: Set as ``WM_NAME`` (Latin-1, best effort) and, if ``net_wm_name``, as UTF-8
            ``_NET_WM_NAME``.
        geometry: ``(x, y, width, height)`` of the client window on the screen.
        net_wm_name: Whether to set ``_NET_WM_NAME``.
        background: Background colour painted by the server on map.
        framed: Put the client inside a top-level frame without WM_CLASS at an offset of
            (7, 23), as a reparenting window manager does; ``geometry`` stays the client's.
        focus: Whether to give the window the input focus.
    """
    conn = server.connect()
    screen = conn.screen()
    x, y, w, h = geometry
    pixel = (background[0] << 16) | (background[1] << 8) | background[2]
    frame = None
    parent, cx, cy = screen.root, x, y
    if framed:
        frame = screen.root.create_window(x - 7, y - 23, w + 14, h + 30, 0, screen.root_depth,
                                          background_pixel=screen.black_pixel,
                                          event_mask=Xlib.X.StructureNotifyMask)
        parent, cx, cy = frame, 7, 23
    win = parent.create_window(cx, cy, w, h, 0, screen.root_depth, background_pixel=pixel,
                               event_mask=Xlib.X.StructureNotifyMask | Xlib.X.ExposureMask)
    win.set_wm_class(*wm_class)
    win.set_wm_name(title.encode("latin-1", "replace"))
    if net_wm_name:
        win.change_property(conn.intern_atom("_NET_WM_NAME"), conn.intern_atom("UTF8_STRING"), 8,
                            title.encode("utf-8"))
    win.map()
    if frame is not None:
        frame.map()
    conn.sync()
    _wait_mapped(conn, win)
    window = XWindow(conn, win, wm_class, title, geometry, frame)
    if focus:
        window.focus()
    return window


def _wait_mapped(conn: Xlib.display.Display, win: object, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if win.get_attributes().map_state == Xlib.X.IsViewable:  # type: ignore[attr-defined]
            return
        time.sleep(0.01)
    pytest.fail(f"window {win} was not viewable within {timeout_s} s")


def set_net_active_window(server: XvfbServer, window_id: int) -> None:
    """Set the root's ``_NET_ACTIVE_WINDOW`` as an EWMH window manager would (0 = none)."""
    conn = server.connect()
    try:
        root = conn.screen().root
        root.change_property(conn.intern_atom("_NET_ACTIVE_WINDOW"), Xlib.Xatom.WINDOW, 32, [window_id])
        conn.sync()
    finally:
        conn.close()


WindowFactory = Callable[..., XWindow]
"""Takes :func:`open_window`'s keyword arguments."""


@contextmanager
def open_windows(server: XvfbServer) -> Iterator[WindowFactory]:
    """A factory of real windows on ``server`` (see :func:`open_window`), all closed at the end."""
    windows: list[XWindow] = []

    def make(**kw: object) -> XWindow:
        window = open_window(server, **kw)  # type: ignore[arg-type]
        windows.append(window)
        return window

    try:
        yield make
    finally:
        for window in windows:
            window.close()
