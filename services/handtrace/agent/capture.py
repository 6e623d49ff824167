"""The one interface every capture backend implements (X11, macOS, Windows, synthetic).

A backend is a *tiny* loop that turns OS input into raw event dicts and hands each one to the
``emit`` callback as soon as it happens. Everything heavy -- local policy (pause, exemption,
allowlist, keystroke masking), coalescing, batching, the spool and delivery -- is shared code in
``handtrace.agent`` that is testable without an OS.

Raw events are dicts per the ``Event`` record of ``schemas/event_batch/v1.avsc`` with these keys
set by the backend:

- always: ``kind`` (``pointer_move | click | scroll | key_down | key_up``) and ``captured_at_us``
  (wall clock, microseconds since the epoch, ``handtrace.core.clock.now_us``);
- pointer events: ``x``, ``y`` (screen pixels); click: ``button`` (``left | right | middle |
  other``), ``pressed``; scroll: ``scroll_dx``, ``scroll_dy`` (notches, positive = towards the end
  of the document / right);
- key events: ``key_code`` (X11 keysym on Linux), ``modifiers`` (bitmask of the modifier keys
  held *other than the key itself*: 1 shift, 2 ctrl, 4 alt, 8 meta) and ``text`` (the character
  the key produced, or None for non-printing keys).

Backends do NOT set ``event_id``, ``app_id``, ``window_title`` or ``url``: the agent stamps those
after the local policy has decided the event may exist at all. ``focus_change`` events are made
by the agent from :meth:`CaptureSource.focused_window`, not by the backend.

``emit`` is called from the backend's own thread(s); it is cheap and thread-safe. A backend must
not block or buffer events itself.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

Event = dict[str, Any]
Emit = Callable[[Event], None]


class CaptureUnavailable(RuntimeError):
    """The backend cannot run here (no display, unsupported OS, missing permission); the
    message says what to do."""


@dataclass(frozen=True)
class WindowInfo:
    """The focused top-level window, as the OS describes it."""

    app_id: str | None
    """Stable application id: X11 WM_CLASS instance part (``code``, ``google-chrome``), macOS
    bundle id, Windows exe name."""
    title: str | None
    url: str | None = None
    """The focused tab's URL when the app is a browser and the backend can tell; else None."""
    password_field: bool = False
    """True when the backend can tell the focus is in a password field (keystrokes then are
    never recorded, whatever the policy says)."""
    geometry: tuple[int, int, int, int] | None = None
    """``(x, y, width, height)`` of the window on the screen, for screenshots of that window."""
    window_id: int | None = None
    """Backend-specific handle, only to notice that focus moved between windows of one app."""


class CaptureSource(Protocol):
    """A capture backend: input events pushed to ``emit``; the focused window on demand."""

    name: str
    """``x11 | macos | windows | synthetic``; also what the batch header's ``os`` says."""

    # Optional: ``focus_changes: int`` -- a counter the backend increments whenever it *observes*
    # the focus move (an OS notification, not a poll). With it the agent also notices a switch
    # away and back between two of its polls (events in between are dropped as ambiguous);
    # without it such a round trip within one poll interval cannot be seen.

    # Optional: ``visible_windows() -> list[WindowInfo] | None`` -- the viewable top-level
    # windows bottom-to-top in stacking order, each with ``geometry`` (its outer rectangle in
    # screen coordinates, the frame grab's coordinates) and ``app_id``; ``url`` is None (only
    # the focused window's URL can be known: ``agent.frames.stamp_focused``). None when the
    # list cannot be told. Demonstration frames mask the screen with it (``agent.frames``);
    # a backend without it gets fully filled frames (fail closed).

    def start(self, emit: Emit) -> None:
        """Begin delivering raw events to ``emit``; returns once listening (events may follow
        at once). Raises :class:`CaptureUnavailable` with a clear message if it cannot."""
        ...

    def stop(self) -> None:
        """Stop listening and release OS resources; idempotent."""
        ...

    def focused_window(self) -> WindowInfo | None:
        """The window that has the input focus now, or None when there is none (or it cannot
        be told). Called by the agent on every event batch boundary and periodically; must be
        fast (a few X round trips, no screenshots)."""
        ...
