"""Sources of human computer-use activity as Event dicts: a synthetic user and a real-trace replay.

Both sources return dicts per the ``Event`` record of ``schemas/event_batch/v1.avsc`` in capture
order, with time-ordered UUIDv7 ``event_id``s whose millisecond matches ``captured_at_us``.
Fields that do not apply to a kind are omitted (the codec writes the schema defaults). Every
synthetic event carries the ``app_id`` of the app focused when it happened, and its ``url`` when
that is a browser page (the allowlist contract of ``handtrace.stream.steps.allowlist``);
``window_title`` comes with focus changes only.

Conventions: ``scroll_dy`` counts wheel notches, positive towards the end of the document (as
DOM ``WheelEvent.deltaY``); ``key_code`` is an X11 keysym; ``modifiers`` holds the modifier keys
down at the event, other than the key itself (1 shift, 2 ctrl, 4 alt, 8 meta).

The synthetic model, calibrated against the Balabit mouse traces (see ``realism``):

- the user works in app *sessions* (heavy-tailed lengths) and switches apps by alt-tab or by
  clicking the task bar, often back to the previous app; browsers also navigate between pages;
- pointer movements follow Fitts' law durations and minimum-jerk (bell-shaped) velocity profiles
  along slightly curved paths with tremor, aimed with an error that corrective sub-movements
  remove; samples come at ~60 Hz (a tenth of frames missed, as real recorders do) and only
  when the integer position changes;
- clicks (mostly left, some double) end many movements; scrolls come in flicks of notches;
  typing comes in bursts of phrases with log-normal inter-key intervals, typos fixed with
  backspace, shifted characters and shortcuts with their modifier key events;
- pauses between actions are log-normal, with occasional Pareto-tailed idle periods;
- a screenshot reference follows some focus changes and a few clicks.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import polars as pl

from handtrace.core.ids import uuid7_array

Event = dict[str, Any]

SHIFT, CTRL, ALT, META = 1, 2, 4, 8
KEYSYM_MODIFIER = {CTRL: 0xFFE3, SHIFT: 0xFFE1, ALT: 0xFFE9, META: 0xFFEB}
KEYSYM_BACKSPACE = 0xFF08
KEYSYM_TAB = 0xFF09
KEYSYM_RETURN = 0xFF0D
_SHIFTED = frozenset('~!@#$%^&*()_+{}|:"<>?')
_NEIGHBOURS = {
    row[i]: row[max(0, i - 1) : i] + row[i + 1 : i + 2]
    for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm")
    for i in range(len(row))
}

_S = 1_000_000
_FRAME_S = 1 / 60
_FRAME_DROP = 0.1
_CREEP = 0.3
_AIM_PLAN = ("aim", "correct", "correct")
_RESUME_AFTER_US = 10 * 60 * _S


class ActivitySource(Protocol):
    """Anything that yields one device's Event dicts window by window."""

    def events_between(self, t0_us: int, t1_us: int) -> list[Event]:
        """Events captured in ``[t0_us, t1_us)``, in capture order."""
        ...


@dataclass(frozen=True)
class App:
    """An application the synthetic user works in.

    Attributes:
        app_id: Application id as the agent reports it (WM_CLASS-like).
        pages: (window title, url or None) pairs; ``{n}`` in either is replaced by a number.
        weight: Relative share of app switches that land here.
        work: Whether it belongs to work (allowlist filters should keep it).
        mix: Relative weights of the actions (point, scroll, type, fidget) within a session.
        session_s: Median length of a session in the app, in seconds.
        phrases: Text the user types here.
        enter_prob: Probability a typing burst ends with Return.
        shortcuts: (modifier mask, key) pairs the user presses here.
        title_suffix: Appended to every window title (e.g. the browser's name).
    """

    app_id: str
    pages: tuple[tuple[str, str | None], ...]
    weight: float = 1.0
    work: bool = True
    mix: tuple[float, float, float, float] = (0.45, 0.15, 0.3, 0.1)
    session_s: float = 60.0
    phrases: tuple[str, ...] = ("ok",)
    enter_prob: float = 0.3
    shortcuts: tuple[tuple[int, str], ...] = ((CTRL, "c"), (CTRL, "v"), (CTRL, "z"))
    title_suffix: str = ""

    @property
    def is_browser(self) -> bool:
        """Whether the app's pages carry URLs."""
        return any(url for _, url in self.pages)


_CHROME = " - Google Chrome"

CODE_EDITOR = App(
    app_id="code",
    pages=(
        ("codec.py - handtrace - Visual Studio Code", None),
        ("synthetic.py - handtrace - Visual Studio Code", None),
        ("test_spool.py - handtrace - Visual Studio Code", None),
        ("README.md - handtrace - Visual Studio Code", None),
    ),
    weight=3.0,
    mix=(0.44, 0.15, 0.28, 0.13),
    session_s=150.0,
    phrases=(
        "def flush(self) -> None:",
        "return batch",
        "events.append(event)",
        "if not self._spool:",
        'raise ValueError("bad seq")',
        "for event in events:",
        "import numpy as np",
        "self.seq += 1",
        "assert decoded.height == len(events)",
    ),
    enter_prob=0.6,
    shortcuts=(
        (CTRL, "s"),
        (CTRL, "s"),
        (CTRL | SHIFT, "p"),
        (CTRL, "p"),
        (CTRL, "z"),
        (CTRL, "c"),
        (CTRL, "v"),
        (CTRL, "/"),
    ),
)
BROWSER_WORK = App(
    app_id="google-chrome",
    pages=(
        ("Q3 roadmap - Google Docs", "https://docs.google.com/document/d/1fK2c{n}Qx/edit"),
        ("Team budget - Google Sheets", "https://docs.google.com/spreadsheets/d/1Zw{n}p/edit"),
        (
            "Add spool compaction by ada · Pull Request #{n} · acme/handtrace",
            "https://github.com/acme/handtrace/pull/{n}",
        ),
        ("acme/handtrace: Consent-first capture", "https://github.com/acme/handtrace"),
        ("[HT-{n}] Batch re-send on reconnect - Jira", "https://acme.atlassian.net/browse/HT-{n}"),
        ("HT board - Jira", "https://acme.atlassian.net/jira/software/projects/HT/boards/{n}"),
        ("Inbox (3) - ada@acme.com - Acme Mail", "https://mail.google.com/mail/u/0/#inbox"),
    ),
    weight=3.0,
    mix=(0.48, 0.3, 0.12, 0.1),
    session_s=90.0,
    phrases=(
        "Looks good to me.",
        "Could we add a test for this?",
        "handtrace spool design",
        "Next steps: ship the agent to the pilot group.",
        "kafka consumer lag",
    ),
    enter_prob=0.2,
    shortcuts=((CTRL, "t"), (CTRL, "l"), (CTRL, "f"), (CTRL, "c"), (CTRL, "v")),
    title_suffix=_CHROME,
)
CHAT = App(
    app_id="slack",
    pages=(
        ("eng-platform (Channel) - Acme - Slack", None),
        ("incidents (Channel) - Acme - Slack", None),
        ("Grace Hopper (DM) - Acme - Slack", None),
    ),
    weight=2.0,
    mix=(0.5, 0.17, 0.25, 0.08),
    session_s=45.0,
    phrases=(
        "sounds good, thanks!",
        "I'll take a look after lunch",
        "can you review my PR?",
        "the deploy is done",
        "lgtm",
        "Yes, on it.",
    ),
    enter_prob=0.8,
    shortcuts=((CTRL, "k"), (CTRL, "c"), (CTRL, "v")),
)
TERMINAL = App(
    app_id="gnome-terminal-server",
    pages=(
        ("ada@laptop: ~/src/handtrace", None),
        ("ada@laptop: ~/src/handtrace/services", None),
    ),
    weight=1.5,
    mix=(0.36, 0.12, 0.42, 0.1),
    session_s=60.0,
    phrases=(
        "git status",
        "git diff",
        "ls -la",
        "pytest -q tests/unit",
        "cd services/handtrace",
        'git commit -m "Fix spool"',
        "kubectl get pods",
    ),
    enter_prob=0.95,
    shortcuts=((CTRL, "c"), (CTRL, "r"), (CTRL, "l"), (CTRL | SHIFT, "c")),
)
BROWSER_LEISURE = App(
    app_id="google-chrome",
    pages=(
        ("Lofi beats to code to - YouTube", "https://www.youtube.com/watch?v=jfKfPfyJ{n}"),
        ("r/programming - Reddit", "https://www.reddit.com/r/programming/"),
        ("Amazon.com: USB-C Hub, 7-in-1", "https://www.amazon.com/dp/B0{n}XQ"),
        ("Football scores - BBC Sport", "https://www.bbc.com/sport/football/scores-fixtures"),
    ),
    weight=0.8,
    work=False,
    mix=(0.45, 0.45, 0.02, 0.08),
    session_s=60.0,
    phrases=("usb-c hub", "hiking boots"),
    enter_prob=0.9,
    shortcuts=((CTRL, "w"),),
    title_suffix=_CHROME,
)
MUSIC = App(
    app_id="spotify",
    pages=(("Spotify Premium", None),),
    weight=0.4,
    work=False,
    mix=(0.8, 0.15, 0.0, 0.05),
    session_s=15.0,
    phrases=("focus",),
    enter_prob=0.9,
)

DEFAULT_APPS: tuple[App, ...] = (CODE_EDITOR, BROWSER_WORK, CHAT, TERMINAL, BROWSER_LEISURE, MUSIC)


class _IdStamper:
    """Assigns UUIDv7 ids to time-ordered events across successive calls.

    Ids within one millisecond are ordered by a per-millisecond rank in rand_a (which
    ``uuid7_array``'s position counter does not guarantee across a 4096-row wrap).
    """

    def __init__(self, rng: np.random.Generator) -> None:
        self._rng = rng
        self._ms = -1
        self._rank = -1

    def stamp(self, events: list[Event]) -> None:
        n = len(events)
        if not n:
            return
        ts = np.fromiter((e["captured_at_us"] for e in events), np.int64, n)
        ids = uuid7_array(ts, self._rng)
        ms = ts // 1000
        pos = np.arange(n)
        first = np.r_[True, ms[1:] != ms[:-1]]
        rank = pos - np.maximum.accumulate(np.where(first, pos, 0))
        if ms[0] == self._ms:
            rank[ms == ms[0]] += self._rank + 1
        if rank.max() > 0xFFF:
            raise ValueError("more than 4096 events in one millisecond")
        ids[:, 6] = 0x70 | (rank >> 8)
        ids[:, 7] = rank & 0xFF
        self._ms, self._rank = int(ms[-1]), int(rank[-1])
        raw = ids.tobytes()
        for i, e in enumerate(events):
            e["event_id"] = raw[16 * i : 16 * i + 16]


def _lognormal(rng: np.random.Generator, median: float, sigma: float, size: Any = None) -> Any:
    return rng.lognormal(math.log(median), sigma, size)


def _clamp(v: float, lo: float, hi: float) -> float:
    return float(min(max(v, lo), hi))


def _min_jerk(tau: np.ndarray) -> np.ndarray:
    out: np.ndarray = tau**3 * (10 - 15 * tau + 6 * tau**2)
    return out


@dataclass
class _Session:
    app: App
    title: str
    url: str | None
    ends_us: int


@dataclass
class _Buffer:
    events: list[Event] = field(default_factory=list)
    times: list[int] = field(default_factory=list)
    last_us: int = -1


class SyntheticActivity:
    """A synthetic user's activity on one device, generated on demand window by window.

    Deterministic for a given seed, screen and app set. The timeline starts at the first
    window's ``t0_us`` with a focus change; windows must not go back in time, and windows that
    tile time return the same events (ids included) however they cut it. A window starting more
    than 10 minutes after the timeline's cursor is treated as the user returning after time
    away: the timeline resumes there with a focus change, and the skipped events are lost.
    """

    def __init__(
        self,
        seed: int,
        screen: tuple[int, int] = (1920, 1080),
        apps: Sequence[App] = DEFAULT_APPS,
    ) -> None:
        """Create the source.

        Args:
            seed: Seed of every random choice, ids included.
            screen: Screen size in pixels (width, height).
            apps: The apps the user switches between; at least one.
        """
        if not apps:
            raise ValueError("apps must not be empty")
        activity_seed, id_seed = np.random.SeedSequence(seed).spawn(2)
        self.screen = (int(screen[0]), int(screen[1]))
        self.apps = tuple(apps)
        self._rng = np.random.default_rng(activity_seed)
        self._ids = _IdStamper(np.random.default_rng(id_seed))
        self._weights = np.array([a.weight for a in self.apps], dtype=np.float64)
        self._buf = _Buffer()
        self._cursor_us = 0
        self._started = False
        self._emitted_until: int | None = None
        self._session: _Session | None = None
        self._previous_app: App | None = None
        w, h = self.screen
        self._x = w / 2.0
        self._y = h / 2.0
        self._diag = math.hypot(w, h)

    def events_between(self, t0_us: int, t1_us: int) -> list[Event]:
        """Events captured in ``[t0_us, t1_us)``, in capture order.

        Args:
            t0_us: Window start, microseconds since the epoch; not before the previous window's
                end.
            t1_us: Window end (exclusive).

        Returns:
            Event dicts with ids, time-ordered and strictly increasing in ``captured_at_us``.
        """
        if t1_us < t0_us:
            raise ValueError("t1_us is before t0_us")
        if self._emitted_until is not None and t0_us < self._emitted_until:
            raise ValueError("windows must not go back in time")
        if not self._started or t0_us - self._cursor_us > _RESUME_AFTER_US:
            self._started = True
            self._buf = _Buffer(last_us=self._buf.last_us)
            self._cursor_us = max(t0_us, self._buf.last_us + 1)
            self._switch_app(via_input=False)
        while self._cursor_us < t1_us:
            self._step()
        buf = self._buf
        lo = bisect.bisect_left(buf.times, t0_us)
        hi = bisect.bisect_left(buf.times, t1_us)
        out = buf.events[lo:hi]
        del buf.events[:hi]
        del buf.times[:hi]
        self._ids.stamp(out)
        self._emitted_until = t1_us
        return out

    def _push(self, events: list[Event]) -> None:
        events.sort(key=lambda e: e["captured_at_us"])
        buf = self._buf
        last = buf.last_us
        session = self._session
        app_id = session.app.app_id if session is not None else None
        url = session.url if session is not None else None
        for e in events:
            if app_id is not None and "app_id" not in e:
                e["app_id"] = app_id
                if url:
                    e["url"] = url
            t = e["captured_at_us"]
            if t <= last:
                t = last + 1
                e["captured_at_us"] = t
            buf.times.append(t)
            last = t
        buf.events.extend(events)
        buf.last_us = last
        self._cursor_us = max(self._cursor_us, last + 1)

    @property
    def _sess(self) -> _Session:
        if self._session is None:
            raise RuntimeError("the timeline has not started")
        return self._session

    def _wait(self, seconds: float) -> None:
        self._cursor_us += max(1, int(seconds * _S))

    def _step(self) -> None:
        if self._cursor_us >= self._sess.ends_us:
            self._switch_app(via_input=True)
        else:
            rng = self._rng
            mix = np.asarray(self._sess.app.mix, dtype=np.float64)
            action = rng.choice(4, p=mix / mix.sum())
            if action == 0:
                if rng.random() < 0.04:
                    self._drag()
                else:
                    self._point(click=rng.random() < 0.72)
            elif action == 1:
                self._scroll()
            elif action == 2:
                self._type()
            else:
                self._fidget()
        self._think()

    def _think(self) -> None:
        rng = self._rng
        if rng.random() < 0.02:
            self._wait(min(5.0 * (1.0 + rng.pareto(1.2)), 1800.0))
        else:
            self._wait(_lognormal(rng, 0.45, 0.9))

    # ------------------------------------------------------------------ app sessions

    def _page(self, app: App) -> tuple[str, str | None]:
        title, url = app.pages[self._rng.integers(len(app.pages))]
        n = str(int(self._rng.integers(100, 4000)))
        return title.replace("{n}", n) + app.title_suffix, url.replace("{n}", n) if url else None

    def _next_app(self) -> App:
        rng = self._rng
        current = self._session.app if self._session else None
        if self._previous_app is not None and current is not None and rng.random() < 0.45:
            return self._previous_app
        w = self._weights.copy()
        if current is not None and len(self.apps) > 1:
            w[[a is current for a in self.apps]] = 0.0
        return self.apps[rng.choice(len(self.apps), p=w / w.sum())]

    def _switch_app(self, *, via_input: bool) -> None:
        rng = self._rng
        app = self._next_app()
        if via_input:
            if rng.random() < 0.5:
                self._shortcut(ALT, "\t")
            else:
                w, h = self.screen
                task_bar = (rng.uniform(0.05, 0.6) * w, h - 1 - rng.uniform(4, 24))
                self._point(click=True, target=task_bar, button="left")
            self._wait(rng.uniform(0.06, 0.25))
        if self._session is not None:
            self._previous_app = self._session.app
        title, url = self._page(app)
        ends = self._cursor_us + int(max(5.0, _lognormal(rng, app.session_s, 1.0)) * _S)
        self._session = _Session(app, title, url, ends)
        self._focus_change()

    def _focus_change(self) -> None:
        s = self._sess
        e: Event = {
            "event_id": None,
            "captured_at_us": self._cursor_us,
            "kind": "focus_change",
            "app_id": s.app.app_id,
            "window_title": s.title,
        }
        if s.url:
            e["url"] = s.url
        self._push([e])
        if self._rng.random() < 0.6:
            self._screenshot()

    def _screenshot(self) -> None:
        rng = self._rng
        w, h = self.screen
        t = self._cursor_us + int(rng.uniform(0.08, 0.4) * _S)
        self._push(
            [
                {
                    "event_id": None,
                    "captured_at_us": t,
                    "kind": "screenshot",
                    "screenshot_sha256": rng.bytes(32),
                    "screenshot_bytes": int(_lognormal(rng, 110_000 * w * h / (1920 * 1080), 0.5)),
                    "screenshot_format": "webp",
                    "screenshot_width": w,
                    "screenshot_height": h,
                }
            ]
        )

    # ------------------------------------------------------------------ pointer

    def _target(self) -> tuple[float, float]:
        rng = self._rng
        w, h = self.screen
        if rng.random() < 0.3:
            return rng.uniform(0.03, 0.97) * w, rng.uniform(0.04, 0.96) * h
        d = _lognormal(rng, 0.07 * self._diag, 0.9)
        a = rng.uniform(0, 2 * math.pi)
        x = self._x + d * math.cos(a)
        y = self._y + d * math.sin(a)
        if not 0 <= x < w:
            x = self._x - d * math.cos(a)
        if not 0 <= y < h:
            y = self._y - d * math.sin(a)
        return _clamp(x, 2, w - 3), _clamp(y, 2, h - 3)

    def _submovement(
        self, x1: float, y1: float, width: float, slow: float
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = self._rng
        x0, y0 = self._x, self._y
        dx, dy = x1 - x0, y1 - y0
        dist = math.hypot(dx, dy)
        duration = (0.1 + 0.12 * math.log2(dist / width + 1)) * slow * _lognormal(rng, 1.0, 0.25)
        n = max(2, int(math.ceil(duration / _FRAME_S)))
        frames = np.clip(rng.normal(_FRAME_S, 0.0007, n), 0.75 * _FRAME_S, 1.3 * _FRAME_S)
        frames[1:][rng.random(n - 1) < _FRAME_DROP] += _FRAME_S
        t = np.cumsum(frames)
        tau = np.minimum(t / t[-1], 1.0) ** rng.uniform(0.55, 0.9)
        s = _min_jerk(tau)
        bend = rng.normal(0.0, 0.1) * dist * np.sin(np.pi * s)
        wobble = np.cumsum(rng.normal(0.0, 0.35, (2, n)), axis=1) * np.sin(np.pi * s)
        ux, uy = (dx / dist, dy / dist) if dist > 0 else (1.0, 0.0)
        xs = x0 + s * dx - bend * uy + wobble[0]
        ys = y0 + s * dy + bend * ux + wobble[1]
        self._x, self._y = x1, y1
        return t, xs, ys

    def _move(
        self, target: tuple[float, float], *, slow: float = 1.0, button: str | None = None
    ) -> None:
        rng = self._rng
        w, h = self.screen
        tx, ty = target
        x_start, y_start = int(round(self._x)), int(round(self._y))
        width = _lognormal(rng, 26.0, 0.5)
        times: list[np.ndarray] = []
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        offset = 0.0
        plan = ("creep", *_AIM_PLAN) if rng.random() < _CREEP else _AIM_PLAN
        for k, phase in enumerate(plan):
            dist = math.hypot(tx - self._x, ty - self._y)
            if dist < 1.0:
                break
            settled = dist < width / 4 or rng.random() < 0.15
            last = k == len(plan) - 1 or (phase != "creep" and settled)
            if last:
                ax, ay, pace = tx, ty, slow
            else:
                ux, uy = (tx - self._x) / dist, (ty - self._y) / dist
                if phase == "creep":
                    along = -dist + _lognormal(rng, 12.0, 0.5)
                    across = rng.normal(0.0, 5.0)
                    pace = slow * 1.6
                else:
                    along = rng.normal(-0.1, 0.07) * dist
                    across = rng.normal(0.0, 0.05) * dist
                    pace = slow if phase == "aim" else slow * 1.3
                ax, ay = tx + along * ux - across * uy, ty + along * uy + across * ux
            t, x, y = self._submovement(_clamp(ax, 0, w - 1), _clamp(ay, 0, h - 1), width, pace)
            times.append(t + offset)
            xs.append(x)
            ys.append(y)
            offset += t[-1] + _lognormal(rng, 0.09, 0.5)
            if last:
                break
        if not times:
            return
        t_us = self._cursor_us + (np.concatenate(times) * _S).astype(np.int64)
        xi = np.clip(np.rint(np.concatenate(xs)), 0, w - 1).astype(np.int64)
        yi = np.clip(np.rint(np.concatenate(ys)), 0, h - 1).astype(np.int64)
        px = np.r_[x_start, xi[:-1]]
        py = np.r_[y_start, yi[:-1]]
        moved = (xi != px) | (yi != py)
        kw = {"button": button} if button else {}
        events = [
            {"event_id": None, "captured_at_us": t, "kind": "pointer_move", "x": x, "y": y, **kw}
            for t, x, y in zip(
                t_us[moved].tolist(), xi[moved].tolist(), yi[moved].tolist(), strict=True
            )
        ]
        self._push(events)
        self._x, self._y = float(xi[-1]), float(yi[-1])

    def _click_events(self, t_us: int, button: str, double: bool) -> list[Event]:
        rng = self._rng
        x, y = int(round(self._x)), int(round(self._y))
        out: list[Event] = []
        for _ in range(2 if double else 1):
            up = t_us + int(_lognormal(rng, 0.1, 0.35) * _S)
            out.append(
                {
                    "event_id": None,
                    "captured_at_us": t_us,
                    "kind": "click",
                    "x": x,
                    "y": y,
                    "button": button,
                    "pressed": True,
                }
            )
            out.append(
                {
                    "event_id": None,
                    "captured_at_us": up,
                    "kind": "click",
                    "x": x,
                    "y": y,
                    "button": button,
                    "pressed": False,
                }
            )
            t_us = up + int(rng.uniform(0.06, 0.15) * _S)
        return out

    def _point(
        self, *, click: bool, target: tuple[float, float] | None = None, button: str | None = None
    ) -> None:
        rng = self._rng
        self._move(target if target is not None else self._target())
        if not click:
            return
        if button is None:
            u = rng.random()
            button = "left" if u < 0.95 else "right" if u < 0.99 else "middle"
        double = button == "left" and rng.random() < 0.12
        press = self._cursor_us + int(_lognormal(rng, 0.15, 0.5) * _S)
        self._push(self._click_events(press, button, double))
        if rng.random() < 0.03:
            self._screenshot()
        session = self._sess
        if session.app.is_browser and button == "left" and rng.random() < 0.12:
            self._wait(rng.uniform(0.15, 0.8))
            session.title, session.url = self._page(session.app)
            self._focus_change()

    def _drag(self) -> None:
        self._move(self._target())
        rng = self._rng
        press, release = self._click_events(
            self._cursor_us + int(_lognormal(rng, 0.15, 0.5) * _S), "left", False
        )
        self._push([press])
        self._wait(_lognormal(self._rng, 0.12, 0.4))
        self._move(self._target(), slow=1.4, button="left")
        release["captured_at_us"] = self._cursor_us + int(_lognormal(rng, 0.1, 0.4) * _S)
        release["x"], release["y"] = int(round(self._x)), int(round(self._y))
        self._push([release])

    def _fidget(self) -> None:
        rng = self._rng
        w, h = self.screen
        d = _lognormal(rng, 25.0, 0.7)
        a = rng.uniform(0, 2 * math.pi)
        target = (
            _clamp(self._x + d * math.cos(a), 0, w - 1),
            _clamp(self._y + d * math.sin(a), 0, h - 1),
        )
        self._move(target, slow=1.3)

    def _scroll(self) -> None:
        rng = self._rng
        if rng.random() < 0.5:
            self._point(click=False)
        x, y = int(round(self._x)), int(round(self._y))
        direction = 1 if rng.random() < 0.75 else -1
        t = self._cursor_us + int(_lognormal(rng, 0.2, 0.5) * _S)
        events: list[Event] = []
        for _ in range(int(rng.geometric(0.35))):
            if rng.random() < 0.15:
                direction = -direction
            for _ in range(int(rng.geometric(0.25))):
                events.append(
                    {
                        "event_id": None,
                        "captured_at_us": t,
                        "kind": "scroll",
                        "x": x,
                        "y": y,
                        "scroll_dx": 0,
                        "scroll_dy": direction,
                    }
                )
                t += int(_lognormal(rng, 0.045, 0.4) * _S)
            t += int(_lognormal(rng, 0.5, 0.6) * _S)
        self._push(events)

    # ------------------------------------------------------------------ keyboard

    @staticmethod
    def _key(t: int, kind: str, code: int, mods: int, text: str | None = None) -> Event:
        e: Event = {
            "event_id": None,
            "captured_at_us": t,
            "kind": kind,
            "key_code": code,
            "modifiers": mods,
        }
        if text is not None:
            e["text"] = text
        return e

    def _shortcut(self, mods: int, key: str) -> None:
        rng = self._rng
        t = self._cursor_us + int(_lognormal(rng, 0.15, 0.4) * _S)
        held = 0
        events: list[Event] = []
        order = [m for m in (CTRL, SHIFT, ALT, META) if mods & m]
        for m in order:
            events.append(self._key(t, "key_down", KEYSYM_MODIFIER[m], held))
            held |= m
            t += int(rng.uniform(0.04, 0.12) * _S)
        code = KEYSYM_TAB if key == "\t" else ord(key)
        events.append(self._key(t, "key_down", code, held))
        t += int(_lognormal(rng, 0.1, 0.3) * _S)
        events.append(self._key(t, "key_up", code, held))
        for m in reversed(order):
            t += int(rng.uniform(0.02, 0.08) * _S)
            held &= ~m
            events.append(self._key(t, "key_up", KEYSYM_MODIFIER[m], held))
        self._push(events)

    def _keystrokes(self, text: str) -> list[tuple[int, str | None]]:
        rng = self._rng
        keys: list[tuple[int, str | None]] = []
        for ch in text:
            near = _NEIGHBOURS.get(ch.lower())
            if near and rng.random() < 0.03:
                typo = near[rng.integers(len(near))]
                typo = typo.upper() if ch.isupper() else typo
                keys.append((ord(typo), typo))
                keys.append((KEYSYM_BACKSPACE, None))
            keys.append((ord(ch), ch))
        return keys

    def _type_text(self, text: str) -> None:
        rng = self._rng
        keys = self._keystrokes(text)
        n = len(keys)
        gaps = _lognormal(rng, 0.18, 0.35, n)
        for i, (code, ch) in enumerate(keys):
            if ch == " ":
                gaps[i] += _lognormal(rng, 0.12, 0.6)
            elif code == KEYSYM_BACKSPACE:
                gaps[i] += _lognormal(rng, 0.3, 0.4)
        down = self._cursor_us + (np.cumsum(gaps) * _S).astype(np.int64)
        up = down + (_lognormal(rng, 0.09, 0.3, n) * _S).astype(np.int64)
        events: list[Event] = []
        shift_up_at = -1
        for i, (code, ch) in enumerate(keys):
            shifted = ch is not None and (ch.isupper() or ch in _SHIFTED)
            td, tu = int(down[i]), int(up[i])
            if shifted:
                if shift_up_at < 0:
                    events.append(
                        self._key(
                            td - int(rng.uniform(0.03, 0.08) * _S),
                            "key_down",
                            KEYSYM_MODIFIER[SHIFT],
                            0,
                        )
                    )
                shift_up_at = tu + int(rng.uniform(0.01, 0.05) * _S)
            elif shift_up_at >= 0:
                events.append(
                    self._key(min(shift_up_at, td - 1), "key_up", KEYSYM_MODIFIER[SHIFT], 0)
                )
                shift_up_at = -1
            mods = SHIFT if shifted else 0
            events.append(self._key(td, "key_down", code, mods, ch))
            events.append(self._key(tu, "key_up", code, mods))
        if shift_up_at >= 0:
            events.append(self._key(shift_up_at, "key_up", KEYSYM_MODIFIER[SHIFT], 0))
        self._push(events)

    def _type(self) -> None:
        rng = self._rng
        app = self._sess.app
        if rng.random() < 0.4:
            self._point(click=True, button="left")
            self._wait(_lognormal(rng, 0.3, 0.5))
        for _ in range(int(rng.geometric(0.6))):
            self._type_text(app.phrases[rng.integers(len(app.phrases))])
            self._wait(_lognormal(rng, 0.8, 0.7))
        if rng.random() < app.enter_prob:
            self._type_return()
        if app.shortcuts and rng.random() < 0.2:
            self._wait(_lognormal(rng, 0.4, 0.5))
            mods, key = app.shortcuts[rng.integers(len(app.shortcuts))]
            self._shortcut(mods, key)

    def _type_return(self) -> None:
        rng = self._rng
        t = self._cursor_us + int(_lognormal(rng, 0.2, 0.4) * _S)
        self._push(
            [
                self._key(t, "key_down", KEYSYM_RETURN, 0),
                self._key(t + int(_lognormal(rng, 0.09, 0.3) * _S), "key_up", KEYSYM_RETURN, 0),
            ]
        )


class BalabitReplay:
    """Replays one Balabit Mouse Dynamics session (gzip CSV) as pointer Event dicts.

    Mapping: Move -> ``pointer_move``; Drag -> ``pointer_move`` with the held button;
    Pressed/Released -> ``click`` with ``pressed`` true/false; Scroll Down/Up -> ``scroll`` with
    ``scroll_dy`` +1/-1 at the last pointer position (the data set logs scrolls at 0,0). Times are
    the client timestamps; moves the recorder stamped with the same clock tick keep that same
    ``captured_at_us`` (their ids still order them). Moves at sentinel coordinates (>= 16384,
    the data set has a few at 65535) are dropped.
    """

    def __init__(self, path: str | Path, *, seed: int = 0) -> None:
        """Load a session.

        Args:
            path: A ``.csv.gz`` (or plain ``.csv``) file of the Balabit data set.
            seed: Seed of the ids' random bits.
        """
        self.path = Path(path)
        df = pl.read_csv(self.path)
        df.columns = ["record_ts", "client_ts", "button", "state", "x", "y"]
        self._t_us = (df["client_ts"].to_numpy() * _S).round().astype(np.int64)
        self._button = df["button"].to_list()
        self._state = df["state"].to_list()
        self._x = df["x"].to_list()
        self._y = df["y"].to_list()
        self._seed = seed
        self._start_us: int | None = None
        self._all: list[Event] = []
        self._times: list[int] = []
        self._pos = 0
        self._ids = _IdStamper(np.random.default_rng(seed))

    @property
    def duration_us(self) -> int:
        """Length of the session, first to last record."""
        return int(self._t_us[-1] - self._t_us[0]) if len(self._t_us) else 0

    def events(self, start_us: int) -> list[Event]:
        """The whole session as Event dicts, its first record at ``start_us``.

        Args:
            start_us: Capture time of the session's first record, microseconds since the epoch.

        Returns:
            Event dicts in capture order, with ids.
        """
        out = self._convert(start_us)
        _IdStamper(np.random.default_rng(self._seed)).stamp(out)
        return out

    def events_between(self, t0_us: int, t1_us: int) -> list[Event]:
        """Events in ``[t0_us, t1_us)``; the first call starts the session at its ``t0_us``.

        Args:
            t0_us: Window start, microseconds since the epoch.
            t1_us: Window end (exclusive).

        Returns:
            Event dicts in capture order, with ids; empty once the session has ended.
        """
        if self._start_us is None:
            self._start_us = t0_us
            self._all = self._convert(t0_us)
            self._times = [e["captured_at_us"] for e in self._all]
        lo = max(self._pos, bisect.bisect_left(self._times, t0_us))
        hi = max(lo, bisect.bisect_left(self._times, t1_us))
        out = self._all[lo:hi]
        self._pos = hi
        self._ids.stamp(out)
        return out

    def _convert(self, start_us: int) -> list[Event]:
        base = start_us - int(self._t_us[0]) if len(self._t_us) else start_us
        out: list[Event] = []
        last_x, last_y = 0, 0
        held: str | None = None
        for t, b, st, x, y in zip(
            self._t_us.tolist(), self._button, self._state, self._x, self._y, strict=True
        ):
            t += base
            if b == "Scroll":
                out.append(
                    {
                        "event_id": None,
                        "captured_at_us": t,
                        "kind": "scroll",
                        "x": last_x,
                        "y": last_y,
                        "scroll_dx": 0,
                        "scroll_dy": 1 if st == "Down" else -1,
                    }
                )
            elif st in ("Move", "Drag"):
                if x >= 16384 or y >= 16384 or x < 0 or y < 0:
                    continue
                last_x, last_y = x, y
                e: Event = {
                    "event_id": None,
                    "captured_at_us": t,
                    "kind": "pointer_move",
                    "x": x,
                    "y": y,
                }
                if st == "Drag":
                    e["button"] = held or "left"
                out.append(e)
            elif st in ("Pressed", "Released"):
                button = {"Left": "left", "Right": "right", "Middle": "middle"}.get(b, "other")
                pressed = st == "Pressed"
                held = button if pressed else None
                if 0 <= x < 16384 and 0 <= y < 16384:
                    last_x, last_y = x, y
                out.append(
                    {
                        "event_id": None,
                        "captured_at_us": t,
                        "kind": "click",
                        "x": last_x,
                        "y": last_y,
                        "button": button,
                        "pressed": pressed,
                    }
                )
        return out
