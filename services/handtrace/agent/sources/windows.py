"""Windows capture backend -- not implemented yet; the structure a real one fills in.

A real backend would use:

- input: low-level hooks, ``SetWindowsHookEx(WH_MOUSE_LL)`` and ``SetWindowsHookEx(WH_KEYBOARD_LL)``,
  installed from a thread that runs a ``GetMessage`` loop (the hooks are called on it, and must
  return fast or Windows drops them). ``key_code`` must still be an X11 keysym (map from the
  virtual-key code and ``ToUnicodeEx``'s character); wheel deltas come in multiples of
  ``WHEEL_DELTA`` (120) with positive = away from the user, so the sign flips to our convention;
- focused window: ``GetForegroundWindow`` with ``GetWindowTextW`` for the title,
  ``GetWindowThreadProcessId`` + ``QueryFullProcessImageNameW`` for the exe name as ``app_id``,
  and ``DwmGetWindowAttribute(DWMWA_EXTENDED_FRAME_BOUNDS)`` for the geometry.
"""

from __future__ import annotations

from handtrace.agent.capture import CaptureUnavailable, Emit, WindowInfo


class WindowsSource:
    """Placeholder Windows backend: :meth:`start` raises :class:`CaptureUnavailable`."""

    name = "windows"

    def __init__(self) -> None:
        """Nothing to prepare yet."""

    def start(self, emit: Emit) -> None:
        """Always raises: the Windows backend does not exist yet."""
        raise CaptureUnavailable(
            "the Windows capture backend is not implemented yet; see docs (services/handtrace/agent/"
            "sources/windows.py: SetWindowsHookEx + GetForegroundWindow) or run the agent with the synthetic source"
        )

    def stop(self) -> None:
        """Nothing to release; idempotent."""

    def focused_window(self) -> WindowInfo | None:
        """Unknown without a backend: None."""
        return None
