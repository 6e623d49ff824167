"""A synthetic capture backend: the synthetic user of ``handtrace.agent.synthetic`` entering the
agent at the same point as real OS input (``emit``), for the demo, load tests and the footprint
benchmark. Its focused window is the app the synthetic user works in."""

from __future__ import annotations

import threading
from typing import Any

from handtrace.agent.capture import Emit, Event, WindowInfo
from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core.clock import now_us

_BACKEND_KEYS = ("kind", "captured_at_us", "x", "y", "button", "pressed", "scroll_dx", "scroll_dy",
                 "key_code", "modifiers", "text")


class SyntheticSource:
    """Replays a :class:`SyntheticActivity` in real time (or drives it on demand)."""

    name = "synthetic"

    def __init__(self, seed: int = 0, *, chunk_s: float = 0.05, activity: SyntheticActivity | None = None) -> None:
        self.activity = activity or SyntheticActivity(seed)
        self.chunk_s = chunk_s
        self._window: WindowInfo | None = None
        self.focus_changes = 0
        self._title: str | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def drive(self, t0_us: int, t1_us: int, emit: Emit) -> int:
        """Emit the synthetic user's raw events of ``[t0_us, t1_us)``; returns how many. The
        focused window follows the events as they are emitted."""
        n = 0
        for ev in self.activity.events_between(t0_us, t1_us):
            self._follow(ev)
            if ev["kind"] in ("focus_change", "screenshot"):
                continue  # the agent makes these itself from the focused window
            raw: Event = {k: ev[k] for k in _BACKEND_KEYS if k in ev}
            emit(raw)
            n += 1
        return n

    def _follow(self, ev: dict[str, Any]) -> None:
        app, url = ev.get("app_id"), ev.get("url")
        if ev.get("window_title") is not None:
            self._title = ev["window_title"]
        w = self._window
        if w is None or w.app_id != app or w.url != url or ev["kind"] == "focus_change":
            self.focus_changes += 1
            with self._lock:
                self._window = WindowInfo(app_id=app, title=self._title, url=url,
                                          geometry=(0, 0, *self.activity.screen),
                                          window_id=hash(app) & 0xFFFFFFFF)

    def start(self, emit: Emit) -> None:
        self._stop.clear()
        def run() -> None:
            last = now_us()
            while not self._stop.wait(self.chunk_s):
                now = now_us()
                self.drive(last, now, emit)
                last = now

        self._thread = threading.Thread(target=run, name="synthetic-capture", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def focused_window(self) -> WindowInfo | None:
        with self._lock:
            return self._window

    def visible_windows(self) -> list[WindowInfo]:
        """The synthetic user's one window, full screen (none before its first event)."""
        with self._lock:
            return [] if self._window is None else [self._window]
