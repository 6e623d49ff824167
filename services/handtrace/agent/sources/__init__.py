"""The OS capture backends behind :class:`handtrace.agent.capture.CaptureSource`, one module per OS.

Modules are imported only when their backend is opened: the X11 backend needs python-xlib and
pynput, which must not be loaded on a laptop that runs another OS.
"""

from __future__ import annotations

import sys
from typing import Any

from handtrace.agent.capture import CaptureSource

KNOWN_SOURCES = ("auto", "x11", "macos", "windows")
"""Names :func:`open_source` accepts; ``synthetic`` is built by the agent itself."""


def platform_source_name(platform: str = sys.platform) -> str:
    """The backend name for a ``sys.platform`` value: ``macos``, ``windows``, else ``x11``."""
    if platform == "darwin":
        return "macos"
    if platform in ("win32", "cygwin"):
        return "windows"
    return "x11"


def open_source(name: str, **kw: Any) -> CaptureSource:
    """A capture backend by name; ``auto`` picks the one for this OS.

    Args:
        name: ``auto | x11 | macos | windows``.
        **kw: Passed to the backend's constructor (e.g. ``display=":1"`` for x11; with ``auto``
            a ``display`` is dropped when the backend picked is not x11).

    Raises:
        ValueError: ``name`` is not a known backend.
    """
    if name == "auto":
        name = platform_source_name()
        if name != "x11":
            kw.pop("display", None)
    if name == "x11":
        from handtrace.agent.sources.x11 import X11Source

        return X11Source(**kw)
    if name == "macos":
        from handtrace.agent.sources.macos import MacOSSource

        return MacOSSource(**kw)
    if name == "windows":
        from handtrace.agent.sources.windows import WindowsSource

        return WindowsSource(**kw)
    hint = " (the synthetic source is built by the agent, not here)" if name == "synthetic" else ""
    raise ValueError(f"unknown capture source {name!r}{hint}; known: {', '.join(KNOWN_SOURCES)}")
