"""Input actions of a demonstration: raw events (``handtrace.agent.capture``) in, action starts out.

Each action gets one frame, the last distinct one grabbed before it started
(``handtrace.agent.frames``). The rules (issue #11):

- a button press starts a ``click``; if the pointer moves more than ``drag_px`` (Chebyshev
  distance, in either axis) from the press point before the release, the action becomes a
  ``drag`` (its start, and so its frame, stay those of the press);
- the first scroll of a burst starts a ``scroll``; the burst goes on while scrolls follow each
  other within ``gap_us`` and no other action starts in between;
- the first printable key of a typing burst starts ``typing`` (printable: it carries text, or
  was masked by the local policy, or its keysym is a character); the burst goes on while keys
  follow within ``gap_us`` with no other action between. Non-printing keys (Return, BackSpace,
  arrows, Tab) and key releases extend a running burst but never start one;
- a key pressed with ctrl, alt or meta held is a ``hotkey``, each press its own action;
- modifier keys on their own (Shift, Control, ...) and pointer moves are not actions and do not
  break a burst.

Feed events in capture order; an :class:`Action`'s ``ended_at_us`` and ``kind`` (click -> drag)
keep changing until the next action starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from handtrace.core.pii import MASKED_KEYSYM

CTRL, ALT, META = 2, 4, 8
_COMMAND = CTRL | ALT | META
_MODIFIER_KEYSYMS = frozenset({
    0xFFE1, 0xFFE2, 0xFFE3, 0xFFE4, 0xFFE5, 0xFFE6, 0xFFE7, 0xFFE8, 0xFFE9, 0xFFEA, 0xFFEB, 0xFFEC,
    0xFFED, 0xFFEE, 0xFE03,  # Shift/Control/Caps/Shift_Lock/Meta/Alt/Super/Hyper, ISO_Level3_Shift
})

ActionKind = Literal["click", "drag", "scroll", "typing", "hotkey"]


def printable_keysym(code: int | None) -> bool:
    """X11 keysyms that stand for a character: Latin-1 graphic range and Unicode keysyms."""
    if code is None:
        return False
    return 0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF or 0x01000020 <= code <= 0x0110FFFF


@dataclass
class Action:
    """One input action (mutable until the next one starts)."""

    kind: ActionKind
    started_at_us: int
    ended_at_us: int
    first_event: int
    """Index, in the order fed, of the event that started it."""


class ActionSegmenter:
    """Turns raw input events into actions (see the module docstring)."""

    def __init__(self, *, gap_us: int = 1_000_000, drag_px: int = 5) -> None:
        """Args:
            gap_us: A scroll or typing burst ends after this long without one of its events.
            drag_px: A press that moves further than this before its release is a drag.
        """
        self.gap_us = gap_us
        self.drag_px = drag_px
        self.actions: list[Action] = []
        self._n = 0
        self._current: Action | None = None
        self._burst_last_us: int | None = None  # last event time of the running scroll/typing burst
        self._press: tuple[int, int] | None = None  # where the held button went down
        self._press_action: Action | None = None

    def feed(self, ev: dict[str, Any]) -> Action | None:
        """Take the next raw event; returns the action it starts, if it starts one."""
        i = self._n
        self._n += 1
        kind = ev.get("kind")
        t = int(ev["captured_at_us"])
        if kind == "click":
            if ev.get("pressed"):
                self._press = (ev.get("x") or 0, ev.get("y") or 0)
                a = self._start("click", t, i)
                self._press_action = a
                return a
            pa = self._press_action
            if pa is not None:
                self._moved(ev)
                pa.ended_at_us = max(pa.ended_at_us, t)
            self._press, self._press_action = None, None
            return None
        if kind == "pointer_move":
            if self._press_action is not None:
                self._moved(ev)
                self._press_action.ended_at_us = max(self._press_action.ended_at_us, t)
            return None
        if kind == "scroll":
            return self._burst("scroll", t, i)
        if kind == "key_down":
            code = ev.get("key_code")
            if code in _MODIFIER_KEYSYMS:
                return None
            if (ev.get("modifiers") or 0) & _COMMAND:
                return self._start("hotkey", t, i)
            printable = (ev.get("text") is not None or bool(ev.get("text_masked"))
                         or code == MASKED_KEYSYM or printable_keysym(code))
            if printable:
                return self._burst("typing", t, i)
            self._extend_typing(t)
            return None
        if kind == "key_up":
            self._extend_typing(t)
        return None

    def feed_all(self, events: list[dict[str, Any]]) -> list[Action]:
        """Feed every event; returns the actions they started, in order."""
        return [a for a in map(self.feed, events) if a is not None]

    def _start(self, kind: ActionKind, t: int, i: int) -> Action:
        a = Action(kind, t, t, i)
        self.actions.append(a)
        self._current = a
        self._burst_last_us = t if kind in ("scroll", "typing") else None
        return a

    def _burst(self, kind: ActionKind, t: int, i: int) -> Action | None:
        cur, last = self._current, self._burst_last_us
        if cur is not None and cur.kind == kind and last is not None and 0 <= t - last <= self.gap_us:
            cur.ended_at_us = t
            self._burst_last_us = t
            return None
        return self._start(kind, t, i)

    def _extend_typing(self, t: int) -> None:
        cur, last = self._current, self._burst_last_us
        if cur is not None and cur.kind == "typing" and last is not None and 0 <= t - last <= self.gap_us:
            cur.ended_at_us = t
            self._burst_last_us = t

    def _moved(self, ev: dict[str, Any]) -> None:
        a, p = self._press_action, self._press
        if a is None or p is None or a.kind == "drag":
            return
        x, y = ev.get("x"), ev.get("y")
        if x is None or y is None:
            return
        if max(abs(x - p[0]), abs(y - p[1])) > self.drag_px:
            a.kind = "drag"
