"""The same action reduction as ``actions.py``, written the straightforward way: a Python loop
over events, one dict per event. Never used on a data path: it is the independent oracle the
unit tests compare ``reduce_actions`` with, and the baseline ``bench/action_reduction.py``
measures against (issue #12: >= 10x).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from typing import Any

from handtrace.core.pii import MASK_CHAR
from handtrace.core.settings import ExportSettings
from handtrace.export.actions import (
    ALT,
    COMMAND,
    CTRL,
    KEY_NAMES,
    META,
    MODIFIER_KEYSYMS,
    SHIFT,
    T_CLICK,
    T_HOT,
    T_KEY,
    T_SCROLL,
    T_TYPE,
)

_MODKEYS = frozenset(MODIFIER_KEYSYMS)
_CLICKS = ("click", "doubleClick", "tripleClick", "rightClick", "middleClick")


def _lit(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def _classify(e: dict[str, Any]) -> tuple[int, str | None]:
    kind = e["kind"]
    if kind == "click":
        return (T_CLICK, None) if e.get("pressed") and e.get("button") in ("left", "right", "middle") else (0, None)
    if kind == "scroll":
        return T_SCROLL, None
    if kind != "key_down":
        return 0, None
    code, mods = e.get("key_code"), e.get("modifiers") or 0
    if code in _MODKEYS:
        return 0, None
    char = code is not None and (0x20 <= code <= 0x7E or 0xA0 <= code <= 0xFF or 0x01000020 <= code <= 0x0110FFFF)
    if not mods & COMMAND and (e.get("text") is not None or e.get("text_masked") or char):
        return T_TYPE, None
    name = KEY_NAMES.get(code) if code is not None else None
    if name is None:
        return 0, None
    return (T_KEY if mods == 0 else T_HOT), name


def reduce_reference(
    events: list[dict[str, Any]], frames: list[dict[str, Any]] | None = None,
    screens: dict[Any, tuple[int, int]] | None = None, settings: ExportSettings | None = None,
) -> list[dict[str, Any]]:
    """Actions as dicts (keys of ``actions.ACTION_COLUMNS`` but ``args``; times in µs)."""
    s = settings or ExportSettings()
    by_demo: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for e in events:
        by_demo[e["demonstration_id"]].append(e)
    frames_by: dict[Any, list[dict[str, Any]]] = defaultdict(list)
    for f in frames or []:
        frames_by[f["demonstration_id"]].append(f)
    out: list[dict[str, Any]] = []
    for demo in sorted(by_demo):
        evs = sorted(by_demo[demo], key=lambda e: e["captured_at"])
        out += _demo(demo, evs, frames_by.get(demo, []), (screens or {}).get(demo), s)
    return out


def _demo(demo: Any, evs: list[dict[str, Any]], frames: list[dict[str, Any]], screen: tuple[int, int] | None,
          s: ExportSettings) -> list[dict[str, Any]]:
    # pass 1: each press's drag distance and end point
    drag: dict[int, list[Any]] = {}
    open_press: int | None = None
    for i, e in enumerate(evs):
        btn_ok = e.get("button") in ("left", "right", "middle")
        if e["kind"] == "click" and btn_ok and e.get("pressed"):
            open_press = i
            drag[i] = [0, None, None]
        elif open_press is not None and (e["kind"] == "pointer_move" or (e["kind"] == "click" and btn_ok)):
            p, d = evs[open_press], drag[open_press]
            x, y = e.get("x"), e.get("y")
            if x is not None and y is not None and p.get("x") is not None and p.get("y") is not None:
                d[0] = max(d[0], abs(x - p["x"]), abs(y - p["y"]))
            if x is not None:
                d[1] = x
            if y is not None:
                d[2] = y
            if e["kind"] == "click":
                open_press = None
    # pass 2: tokens into actions, other events folded
    acts: list[dict[str, Any]] = []
    pending = 0  # non-move events waiting for the next action
    prev: dict[str, Any] | None = None  # previous token
    chain = 0
    open_press = None
    for i, e in enumerate(evs):
        cls, name = _classify(e)
        t, kind = e["captured_at"], e["kind"]
        if cls:
            dx, dy = e.get("scroll_dx") or 0, e.get("scroll_dy") or 0
            vertical = abs(dy) >= abs(dx)
            tok = {"cls": cls, "t": t, "x": e.get("x"), "y": e.get("y"), "button": e.get("button"), "key": name,
                   "drag": cls == T_CLICK and drag[i][0] > s.drag_threshold_px, "vertical": vertical,
                   "dir": (dy > 0) - (dy < 0) if vertical else (dx > 0) - (dx < 0)}
            cont = False
            if prev is not None and prev["cls"] == cls:
                dt = t - prev["t"]
                rad = s.double_click_radius_px
                if cls == T_CLICK:
                    cont = (tok["button"] == "left" and prev["button"] == "left" and not tok["drag"]
                            and not prev["drag"] and dt <= int(s.double_click_interval_s * 1e6)
                            and None not in (tok["x"], tok["y"], prev["x"], prev["y"])
                            and abs(tok["x"] - prev["x"]) <= rad and abs(tok["y"] - prev["y"]) <= rad)
                elif cls == T_SCROLL:
                    cont = (tok["vertical"] == prev["vertical"] and tok["dir"] == prev["dir"]
                            and dt <= int(s.scroll_burst_gap_s * 1e6))
                elif cls == T_TYPE:
                    cont = dt <= int(s.typing_gap_s * 1e6)
                elif cls == T_KEY:
                    cont = name == prev["key"] and dt <= int(s.typing_gap_s * 1e6)
            chain = chain + 1 if cont else 0
            if not cont or (cls == T_CLICK and chain % 3 == 0):
                acts.append({"cls": cls, "started_at": t, "ended_at": t, "app_id": e.get("app_id"), "n": 0,
                             "first": tok, "drag_end": drag.get(i), "dx": 0, "dy": 0, "msg": [],
                             "mods": e.get("modifiers") or 0, "events": 0})
            a = acts[-1]
            a["n"] += 1
            a["events"] += 1 + pending  # events folded forward join the token's action
            pending = 0
            a["ended_at"] = max(a["ended_at"], t)
            a["dx"] += e.get("scroll_dx") or 0
            a["dy"] += e.get("scroll_dy") or 0
            if cls == T_TYPE:
                text = e.get("text")
                if e.get("text_masked"):
                    a["msg"].append(MASK_CHAR * len(text) if text is not None else MASK_CHAR)
                else:
                    a["msg"].append(text if text is not None else MASK_CHAR)
            if cls == T_CLICK:
                open_press = i
            prev = tok
            continue
        is_move = kind == "pointer_move"
        release = kind == "click" and e.get("button") in ("left", "right", "middle") and not e.get("pressed")
        back = (is_move and open_press is not None) or release or kind == "key_up"
        if release:
            open_press = None
        if back and acts:
            acts[-1]["ended_at"] = max(acts[-1]["ended_at"], t)
            acts[-1]["events"] += not is_move
        else:
            pending += not is_move
    rows: list[dict[str, Any]] = []
    for a in acts:
        rows.append(_named(a))
    end_t = evs[-1]["captured_at"]
    rows.append({"action": "terminate", "started_at": end_t, "ended_at": end_t, "app_id": None,
                 "event_count": pending})
    with_waits: list[dict[str, Any]] = []
    for r in rows:
        if with_waits and r["started_at"] - with_waits[-1]["ended_at"] > int(s.wait_threshold_s * 1e6):
            gap = r["started_at"] - with_waits[-1]["ended_at"]
            with_waits.append({"action": "wait", "started_at": with_waits[-1]["ended_at"], "ended_at": r["started_at"],
                               "app_id": None, "event_count": 0, "deciseconds": (gap + 50_000) // 100_000})
        with_waits.append(r)
    index = _Frames(frames)
    for step, r in enumerate(with_waits):
        r["demonstration_id"], r["step"] = demo, step
        _frame(r, index, screen)
        r["code"] = _code(r)
    return with_waits


def _named(a: dict[str, Any]) -> dict[str, Any]:
    f, cls, n = a["first"], a["cls"], a["n"]
    r: dict[str, Any] = {"started_at": a["started_at"], "ended_at": a["ended_at"], "app_id": a["app_id"],
                         "event_count": a["events"]}
    if cls == T_CLICK:
        r["px"], r["py"], r["button"] = f["x"], f["y"], f["button"]
        if f["drag"]:
            r["action"], r["px2"], r["py2"] = "dragTo", a["drag_end"][1], a["drag_end"][2]
        else:
            b = f["button"]
            r["action"] = ("rightClick" if b == "right" else "middleClick" if b == "middle"
                           else ["click", "doubleClick", "tripleClick"][min(n, 3) - 1])
    elif cls == T_SCROLL:
        r["px"], r["py"] = f["x"], f["y"]
        r["action"], r["amount"] = ("scroll", -a["dy"]) if f["vertical"] else ("hscroll", a["dx"])
    elif cls == T_TYPE:
        r["action"], r["message"] = "write", "".join(a["msg"])
    elif cls == T_KEY:
        r["action"], r["keys"], r["presses"] = "press", [f["key"]], n
    else:
        m = a["mods"]
        mods = [k for bit, k in ((CTRL, "ctrl"), (ALT, "alt"), (SHIFT, "shift"), (META, "win")) if m & bit]
        r["action"], r["keys"] = "hotkey", [*mods, f["key"]]
    return r


class _Frames:
    """One demonstration's frames, indexed once: by action start, by capture time, the end frame."""

    def __init__(self, frames: list[dict[str, Any]]) -> None:
        by_step = sorted(frames, key=lambda f: f["step"])
        self.exact: dict[int, dict[str, Any]] = {}
        self.end: dict[str, Any] | None = None
        first_at: dict[int, dict[str, Any]] = {}
        for f in by_step:
            if f.get("action_started_at") is not None:
                self.exact.setdefault(f["action_started_at"], f)
            if f.get("reason") == "end" and self.end is None:
                self.end = f
            first_at.setdefault(f["captured_at"], f)
        self.times = sorted(first_at)
        self.at = [first_at[t] for t in self.times]
        self.w = max((f["width"] for f in frames), default=None)
        self.h = max((f["height"] for f in frames), default=None)

    def before(self, t: int) -> dict[str, Any] | None:
        i = bisect.bisect_left(self.times, t)
        return self.at[i - 1] if i else None


def _frame(r: dict[str, Any], frames: _Frames, screen: tuple[int, int] | None) -> None:
    t = r["started_at"]
    chosen = frames.end if r["action"] == "terminate" else frames.exact.get(t)
    if chosen is None:
        chosen = frames.before(t)
    r["frame_sha256"] = chosen["sha256"] if chosen else None
    r["frame_step"] = chosen["step"] if chosen else None
    w = chosen["width"] if chosen else (screen[0] if screen else frames.w)
    h = chosen["height"] if chosen else (screen[1] if screen else frames.h)
    for k, px, size in (("x", "px", w), ("y", "py", h), ("x2", "px2", w), ("y2", "py2", h)):
        v = r.pop(px, None)
        r[k] = (min(max(v, 0), size) * 20_000 + size) // (2 * size) / 10_000 if v is not None and size else None


def _code(r: dict[str, Any]) -> str:
    a = r["action"]
    xy = f"x={r['x']}, y={r['y']}" if r.get("x") is not None and r.get("y") is not None else ""
    if a in _CLICKS:
        return f"pyautogui.{a}({xy})"
    if a == "dragTo":
        xy2 = f"x={r['x2']}, y={r['y2']}, " if r.get("x2") is not None and r.get("y2") is not None else ""
        return f"pyautogui.moveTo({xy})\npyautogui.dragTo({xy2}button={_lit(r['button'])})"
    if a in ("scroll", "hscroll"):
        return f"pyautogui.{a}({r['amount']}{', ' + xy if xy else ''})"
    if a == "write":
        return f"pyautogui.write(message={_lit(r['message'])})"
    if a == "press":
        n = r["presses"]
        return f"pyautogui.press({_lit(r['keys'][0])}{f', presses={n}' if n > 1 else ''})"
    if a == "hotkey":
        return f"pyautogui.hotkey({', '.join(_lit(k) for k in r['keys'])})"
    if a == "wait":
        d = r["deciseconds"]
        return f"computer.wait(seconds={d // 10}.{d % 10})"
    return 'computer.terminate(status="success")'
