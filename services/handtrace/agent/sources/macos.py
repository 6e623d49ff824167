"""macOS capture backend -- not implemented yet; the structure a real one fills in.

A real backend would use:

- input: a Quartz event tap (``CGEventTapCreate`` on ``kCGSessionEventTap``, listen-only, for
  mouse moved/down/up/dragged, scroll wheel, key down/up and flags changed), run on its own
  ``CFRunLoop`` thread; it needs the Input Monitoring (and for key text, Accessibility)
  permission, which :meth:`MacOSSource.start` must detect and report as
  :class:`CaptureUnavailable`. ``key_code`` must still be an X11 keysym (map from the virtual
  key code and the characters ``CGEventKeyboardGetUnicodeString`` returns); scroll deltas come in
  lines with the natural-scrolling sign to undo;
- focused window: ``NSWorkspace.sharedWorkspace().frontmostApplication()`` (``bundleIdentifier``
  as ``app_id``) and ``CGWindowListCopyWindowInfo`` for the frontmost window's title and bounds
  (the title needs the Screen Recording permission).
"""

from __future__ import annotations

from handtrace.agent.capture import CaptureUnavailable, Emit, WindowInfo


class MacOSSource:
    """Placeholder macOS backend: :meth:`start` raises :class:`CaptureUnavailable`."""

    name = "macos"

    def __init__(self) -> None:
        """Nothing to prepare yet."""

    def start(self, emit: Emit) -> None:
        """Always raises: the macOS backend does not exist yet."""
        raise CaptureUnavailable(
            "the macOS capture backend is not implemented yet; see docs (services/handtrace/agent/"
            "sources/macos.py: Quartz CGEventTap + NSWorkspace) or run the agent with the synthetic source"
        )

    def stop(self) -> None:
        """Nothing to release; idempotent."""

    def focused_window(self) -> WindowInfo | None:
        """Unknown without a backend: None."""
        return None
