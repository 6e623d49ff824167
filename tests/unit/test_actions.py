"""ActionSegmenter: every rule with hand-built event sequences."""

from __future__ import annotations

from typing import Any

from handtrace.agent.actions import ActionSegmenter
from handtrace.core.pii import MASKED_KEYSYM

MS = 1000
T0 = 1_700_000_000_000_000
SHIFT, CTRL, ALT, META = 1, 2, 4, 8


def press(t: int, x: int = 10, y: int = 10) -> dict[str, Any]:
    return {"kind": "click", "captured_at_us": T0 + t * MS, "x": x, "y": y, "button": "left", "pressed": True}


def release(t: int, x: int = 10, y: int = 10) -> dict[str, Any]:
    return {"kind": "click", "captured_at_us": T0 + t * MS, "x": x, "y": y, "button": "left", "pressed": False}


def move(t: int, x: int, y: int) -> dict[str, Any]:
    return {"kind": "pointer_move", "captured_at_us": T0 + t * MS, "x": x, "y": y}


def scroll(t: int) -> dict[str, Any]:
    return {"kind": "scroll", "captured_at_us": T0 + t * MS, "x": 5, "y": 5, "scroll_dx": 0, "scroll_dy": 1}


def key(t: int, char: str | None, code: int | None = None, mods: int = 0, up: bool = False,
        **kw: Any) -> dict[str, Any]:
    code = code if code is not None else (ord(char) if char else 0xFF0D)
    return {"kind": "key_up" if up else "key_down", "captured_at_us": T0 + t * MS, "key_code": code,
            "modifiers": mods, "text": None if up or mods & (CTRL | ALT | META) else char, **kw}


def run(events: list[dict[str, Any]]) -> list[tuple[str, int, int, int]]:
    seg = ActionSegmenter()
    seg.feed_all(events)
    return [(a.kind, (a.started_at_us - T0) // MS, (a.ended_at_us - T0) // MS, a.first_event) for a in seg.actions]


def test_press_release_in_place_is_a_click() -> None:
    assert run([move(0, 9, 9), press(10), move(20, 12, 13), release(30, 12, 13)]) == [("click", 10, 30, 1)]


def test_moving_further_than_a_few_px_while_pressed_makes_a_drag() -> None:
    seg = ActionSegmenter(drag_px=5)
    started = seg.feed(press(10))
    assert started is not None and started.kind == "click"
    seg.feed(move(20, 14, 10))
    assert started.kind == "click"  # 4 px: still a click
    seg.feed(move(30, 60, 40))
    seg.feed(release(40, 60, 40))
    assert (started.kind, started.started_at_us, started.ended_at_us) == ("drag", T0 + 10 * MS, T0 + 40 * MS)


def test_release_far_from_the_press_without_moves_is_a_drag() -> None:
    assert run([press(0), release(50, 100, 10)])[0][0] == "drag"


def test_moves_after_release_do_not_make_a_drag() -> None:
    assert run([press(0), release(10), move(20, 300, 300)]) == [("click", 0, 10, 0)]


def test_each_press_is_an_action() -> None:
    assert [a[0] for a in run([press(0), release(5), press(100), release(110)])] == ["click", "click"]


def test_a_scroll_burst_is_one_action_until_a_gap() -> None:
    got = run([scroll(0), scroll(300), move(500, 1, 1), scroll(900), scroll(2500)])
    assert got == [("scroll", 0, 900, 0), ("scroll", 2500, 2500, 4)]


def test_another_action_between_scrolls_starts_a_new_burst() -> None:
    got = run([scroll(0), press(100), release(120), scroll(200)])
    assert [a[0] for a in got] == ["scroll", "click", "scroll"]


def test_typing_burst_starts_at_the_first_printable_key() -> None:
    got = run([key(0, None, 0xFF52), key(100, "h"), key(150, "h", up=True), key(300, "i"), key(2000, "x")])
    assert got == [("typing", 100, 300, 1), ("typing", 2000, 2000, 4)]


def test_non_printing_keys_extend_but_do_not_start_a_burst() -> None:
    got = run([key(0, None, 0xFF0D), key(100, "a"), key(900, None, 0xFF08), key(1800, "b")])
    assert got == [("typing", 100, 1800, 1)]


def test_masked_keys_count_as_typing() -> None:
    got = run([key(0, None, MASKED_KEYSYM, text_masked=True), key(100, "•", MASKED_KEYSYM)])
    assert got == [("typing", 0, 100, 0)]


def test_shift_is_not_an_action_and_shifted_keys_are_typing() -> None:
    got = run([key(0, None, 0xFFE1), key(50, "H", mods=SHIFT), key(120, None, 0xFFE1, up=True), key(200, "i")])
    assert got == [("typing", 50, 200, 1)]


def test_modifier_chord_is_a_hotkey_and_modifier_only_presses_are_not_actions() -> None:
    got = run([key(0, None, 0xFFE3), key(50, "s", mods=CTRL), key(80, "s", mods=CTRL, up=True),
               key(400, None, 0xFFE9), key(450, "\t", 0xFF09, mods=ALT), key(600, None, 0xFFEB)])
    assert got == [("hotkey", 50, 50, 1), ("hotkey", 450, 450, 4)]


def test_hotkey_breaks_a_typing_burst() -> None:
    got = run([key(0, "a"), key(100, "c", mods=CTRL), key(200, "b")])
    assert [a[0] for a in got] == ["typing", "hotkey", "typing"]


def test_meta_held_is_a_hotkey() -> None:
    assert run([key(0, "l", mods=META)])[0][0] == "hotkey"


def test_click_between_keys_starts_a_new_typing_burst() -> None:
    got = run([key(0, "a"), press(100), release(110), key(200, "b")])
    assert got == [("typing", 0, 0, 0), ("click", 100, 110, 1), ("typing", 200, 200, 3)]


def test_feed_returns_only_starts() -> None:
    seg = ActionSegmenter()
    assert seg.feed(scroll(0)) is not None
    assert seg.feed(scroll(100)) is None
    assert seg.feed(move(200, 1, 1)) is None
