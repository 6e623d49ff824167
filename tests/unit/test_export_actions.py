"""Action reduction (export/actions.py): each rule on hand-built events, the frame link, and
properties over generated events -- including equality with the per-event reference reducer
(export/reference.py), an independent implementation of the same rules."""

from __future__ import annotations

import ast
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from handtrace.core.pii import MASK_CHAR, MASKED_KEYSYM
from handtrace.core.settings import ExportSettings
from handtrace.export.actions import ACTION_COLUMNS, label_events, reduce_actions
from handtrace.export.reference import reduce_reference

SCHEMA = {
    "demonstration_id": pl.String, "captured_at": pl.Int64, "kind": pl.String, "x": pl.Int32, "y": pl.Int32,
    "button": pl.String, "pressed": pl.Boolean, "scroll_dx": pl.Int32, "scroll_dy": pl.Int32,
    "key_code": pl.Int32, "modifiers": pl.Int32, "text": pl.String, "text_masked": pl.Boolean,
    "app_id": pl.String,
}
FRAME_SCHEMA = {"demonstration_id": pl.String, "step": pl.UInt32, "sha256": pl.String, "width": pl.UInt32,
                "height": pl.UInt32, "captured_at": pl.Int64, "reason": pl.String, "action_started_at": pl.Int64}
SCREEN = pl.DataFrame({"demonstration_id": ["d"], "screen_width": [1000], "screen_height": [500]})
SHIFT_L, CONTROL_L, RETURN, BACKSPACE, TAB, ISO_LEFT_TAB = 0xFFE1, 0xFFE3, 0xFF0D, 0xFF08, 0xFF09, 0xFE20
VOCABULARY = {"click", "doubleClick", "tripleClick", "rightClick", "middleClick", "moveTo", "dragTo", "scroll",
              "hscroll", "write", "press", "hotkey", "wait", "terminate"}


def ev(ms: float, kind: str, demo: str = "d", **kw: Any) -> dict[str, Any]:
    """One raw event at ``ms`` milliseconds."""
    row: dict[str, Any] = dict.fromkeys(SCHEMA)
    row.update(demonstration_id=demo, captured_at=int(ms * 1000), kind=kind, button="none", text_masked=False,
               app_id="code")
    row.update(kw)
    return row


def press(ms: float, x: int, y: int, button: str = "left") -> dict[str, Any]:
    return ev(ms, "click", x=x, y=y, button=button, pressed=True)


def release(ms: float, x: int, y: int, button: str = "left") -> dict[str, Any]:
    return ev(ms, "click", x=x, y=y, button=button, pressed=False)


def move(ms: float, x: int, y: int) -> dict[str, Any]:
    return ev(ms, "pointer_move", x=x, y=y)


def key(ms: float, code: int, text: str | None = None, mods: int = 0, up: bool = False,
        masked: bool = False) -> dict[str, Any]:
    return ev(ms, "key_up" if up else "key_down", key_code=code, text=None if up else text, modifiers=mods,
              text_masked=masked)


def typed(ms: float, chars: str, step_ms: float = 50) -> list[dict[str, Any]]:
    out = []
    for i, c in enumerate(chars):
        out += [key(ms + i * step_ms, ord(c), c), key(ms + i * step_ms + 10, ord(c), up=True)]
    return out


def frame(events: list[dict[str, Any]]) -> pl.DataFrame:
    return pl.DataFrame(events, schema=SCHEMA)


def reduce(events: list[dict[str, Any]], frames: pl.DataFrame | None = None, **kw: Any) -> pl.DataFrame:
    return reduce_actions(frame(events), frames, SCREEN, ExportSettings(**kw))


def codes(events: list[dict[str, Any]], **kw: Any) -> list[str]:
    return reduce(events, **kw)["code"].to_list()


TERM = 'computer.terminate(status="success")'

# ------------------------------------------------------------------ one test per rule


def test_click_is_normalised_to_the_screen_with_four_decimals() -> None:
    out = reduce([move(0, 5, 5), press(100, 123, 457), release(150, 123, 457)])
    assert out["code"].to_list() == ["pyautogui.click(x=0.123, y=0.914)", TERM]
    assert out.columns == list(ACTION_COLUMNS)
    row = out.row(0, named=True)
    assert (row["x"], row["y"], row["event_count"], row["app_id"]) == (0.123, 0.914, 2, "code")
    assert row["args"]["clicks"] == 1 and row["args"]["button"] == "left"
    odd = reduce([press(0, 1, 1), release(10, 1, 1)], frames=None)  # 1/1000 = 0.001
    assert odd["x"][0] == 0.001
    third = reduce_actions(frame([press(0, 1, 1), release(10, 1, 1)]), None,
                           pl.DataFrame({"demonstration_id": ["d"], "screen_width": [3], "screen_height": [7]}))
    assert (third["x"][0], third["y"][0]) == (0.3333, 0.1429)
    half = reduce_actions(frame([press(0, 828, 0), release(10, 828, 0)]), None,
                          pl.DataFrame({"demonstration_id": ["d"], "screen_width": [1920], "screen_height": [1080]}))
    assert half["code"][0] == "pyautogui.click(x=0.4313, y=0.0)"  # 0.43125: half up, exactly


def test_input_order_does_not_matter() -> None:
    evs = [*typed(0, "ab"), press(500, 10, 10), release(550, 10, 10), ev(600, "scroll", x=1, y=1, scroll_dy=1)]
    for e in evs[:3]:
        e["demonstration_id"] = "c"
    shuffled = [evs[i] for i in (5, 0, 6, 3, 1, 4, 2)]
    assert reduce(shuffled).rows() == reduce(evs).rows()


def test_repeat_left_clicks_merge_into_double_and_triple_clicks() -> None:
    base = [press(0, 100, 50), release(60, 100, 50), press(200, 102, 51), release(260, 102, 51)]
    assert codes(base) == ["pyautogui.doubleClick(x=0.1, y=0.1)", TERM]
    triple = [*base, press(400, 99, 49), release(450, 99, 49)]
    assert codes(triple) == ["pyautogui.tripleClick(x=0.1, y=0.1)", TERM]
    four = [*triple, press(600, 100, 50), release(650, 100, 50)]
    assert codes(four) == ["pyautogui.tripleClick(x=0.1, y=0.1)", "pyautogui.click(x=0.1, y=0.1)", TERM]
    too_far = [press(0, 100, 50), release(60, 100, 50), press(200, 106, 50), release(260, 106, 50)]
    assert [c.split("(")[0] for c in codes(too_far)] == ["pyautogui.click", "pyautogui.click", "computer.terminate"]
    too_slow = [press(0, 100, 50), release(60, 100, 50), press(501, 100, 50), release(560, 100, 50)]
    assert codes(too_slow)[:2] == ["pyautogui.click(x=0.1, y=0.1)"] * 2
    assert codes(too_slow, double_click_interval_s=0.6)[0] == "pyautogui.doubleClick(x=0.1, y=0.1)"
    # another action in between breaks the chain
    broken = [press(0, 100, 50), release(60, 100, 50), key(100, RETURN), press(200, 100, 50), release(260, 100, 50)]
    assert [c.split("(")[0] for c in codes(broken)][:3] == ["pyautogui.click", "pyautogui.press", "pyautogui.click"]


def test_right_and_middle_clicks_never_merge() -> None:
    evs = [press(0, 10, 10, "right"), release(50, 10, 10, "right"), press(100, 10, 10, "right"),
           release(150, 10, 10, "right"), press(200, 10, 10, "middle"), release(250, 10, 10, "middle"),
           press(300, 10, 10, "other"), release(350, 10, 10, "other")]
    assert codes(evs) == ["pyautogui.rightClick(x=0.01, y=0.02)"] * 2 + ["pyautogui.middleClick(x=0.01, y=0.02)", TERM]
    # the 'other' button (back/forward) has no pyautogui call: it folds into terminate
    assert reduce(evs)["event_count"].to_list() == [2, 2, 2, 2]


def test_press_move_release_beyond_the_threshold_is_a_drag() -> None:
    evs = [press(0, 100, 100), move(50, 300, 100), release(100, 400, 200)]
    out = reduce(evs)
    assert out["code"][0] == 'pyautogui.moveTo(x=0.1, y=0.2)\npyautogui.dragTo(x=0.4, y=0.4, button="left")'
    assert out["action"][0] == "dragTo" and out["args"][0]["x2"] == 0.4
    assert (out["started_at"][0].timestamp(), out["ended_at"][0].timestamp()) == (0.0, 0.1)
    wiggle = [press(0, 100, 100), move(50, 105, 95), release(100, 103, 100)]
    assert codes(wiggle)[0] == "pyautogui.click(x=0.1, y=0.2)"
    # a drag does not merge with a click before it, nor a click after it with the drag
    mixed = [press(0, 100, 100), release(20, 100, 100), press(100, 100, 100), move(150, 200, 100),
             release(200, 200, 100), press(300, 200, 100), release(320, 200, 100)]
    assert reduce(mixed)["action"].to_list() == ["click", "dragTo", "click", "terminate"]


def test_scroll_bursts_merge_per_direction_with_pyautogui_signs() -> None:
    down = [ev(t, "scroll", x=500, y=250, scroll_dx=0, scroll_dy=1) for t in (0, 100, 200)]
    assert codes(down) == ["pyautogui.scroll(-3, x=0.5, y=0.5)", TERM]
    up = [ev(0, "scroll", x=500, y=250, scroll_dx=0, scroll_dy=-2)]
    assert codes(up)[0] == "pyautogui.scroll(2, x=0.5, y=0.5)"
    right = [ev(0, "scroll", x=0, y=0, scroll_dx=1, scroll_dy=0), ev(50, "scroll", x=0, y=0, scroll_dx=1, scroll_dy=0)]
    assert codes(right)[0] == "pyautogui.hscroll(2, x=0.0, y=0.0)"
    reversal = [*down, ev(300, "scroll", x=500, y=250, scroll_dx=0, scroll_dy=-1)]
    assert codes(reversal)[:2] == ["pyautogui.scroll(-3, x=0.5, y=0.5)", "pyautogui.scroll(1, x=0.5, y=0.5)"]
    gap = [*down, ev(1201, "scroll", x=500, y=250, scroll_dx=0, scroll_dy=1)]
    assert codes(gap)[:2] == ["pyautogui.scroll(-3, x=0.5, y=0.5)", "pyautogui.scroll(-1, x=0.5, y=0.5)"]
    # moves between notches do not break a burst
    assert codes([down[0], move(50, 1, 1), *down[1:]])[0] == "pyautogui.scroll(-3, x=0.5, y=0.5)"


def test_typing_runs_become_one_write_with_shifted_characters() -> None:
    evs = [key(0, SHIFT_L), key(10, ord("H"), "H", mods=1), key(20, SHIFT_L, up=True), key(30, ord("H"), up=True),
           *typed(100, 'i "x"\\')]
    out = reduce(evs)
    assert out["code"][0] == r'pyautogui.write(message="Hi \"x\"\\")'
    assert ast.literal_eval(ast.parse(out["code"][0]).body[0].value.keywords[0].value) == 'Hi "x"\\'  # type: ignore[attr-defined]
    assert out["started_at"][0].timestamp() == 0.01  # the first character, not the shift before it
    split = [*typed(0, "ab"), *typed(1200, "cd")]
    assert codes(split) == ['pyautogui.write(message="ab")', 'pyautogui.write(message="cd")', TERM]


def test_masked_text_stays_masked() -> None:
    evs = [key(0, MASKED_KEYSYM, MASK_CHAR, masked=True), key(50, MASKED_KEYSYM, None, masked=True),
           key(100, ord("p"), "pw", masked=True),  # a malformed masked row: its text is still not shown
           key(150, ord("q"), None)]  # a character key whose text was never stored
    out = reduce(evs)
    assert out["code"][0] == f'pyautogui.write(message="{MASK_CHAR * 5}")'
    assert "p" not in out["args"][0]["message"] and "q" not in out["code"][0]


def test_named_keys_are_presses_and_repeats_merge() -> None:
    evs = [*typed(0, "hi"), key(200, RETURN), key(210, RETURN, up=True), *typed(300, "yo")]
    assert codes(evs) == ['pyautogui.write(message="hi")', 'pyautogui.press("enter")',
                          'pyautogui.write(message="yo")', TERM]
    bs = [key(t, BACKSPACE) for t in (0, 100, 200)] + [key(300, TAB), key(2000, TAB)]
    assert codes(bs) == ['pyautogui.press("backspace", presses=3)', 'pyautogui.press("tab")',
                         'pyautogui.press("tab")', TERM]
    assert reduce(bs)["args"][0]["presses"] == 3


def test_modifier_chords_are_hotkeys() -> None:
    evs = [key(0, CONTROL_L), key(10, ord("s"), mods=2), key(20, ord("s"), mods=2, up=True),
           key(30, CONTROL_L, up=True),
           key(100, CONTROL_L), key(105, SHIFT_L, mods=2), key(110, ord("S"), mods=3),
           key(200, SHIFT_L), key(210, ISO_LEFT_TAB, mods=1),
           key(300, ord("'"), mods=4 | 8)]
    out = reduce(evs)
    assert out["code"].to_list() == ['pyautogui.hotkey("ctrl", "s")', 'pyautogui.hotkey("ctrl", "shift", "s")',
                                     'pyautogui.hotkey("shift", "tab")', 'pyautogui.hotkey("alt", "win", "\'")',
                                     TERM]
    assert out["args"][1]["keys"] == ["ctrl", "shift", "s"]
    assert out["event_count"].to_list()[:2] == [4, 3]  # the Control press folds into its chord


def test_long_gaps_become_waits() -> None:
    evs = [press(0, 10, 10), release(50, 10, 10), press(4250, 10, 10), release(4300, 10, 10)]
    out = reduce(evs)
    assert out["code"].to_list() == ["pyautogui.click(x=0.01, y=0.02)", "computer.wait(seconds=4.2)",
                                     "pyautogui.click(x=0.01, y=0.02)", TERM]
    assert out["step"].to_list() == [0, 1, 2, 3]
    w = out.row(1, named=True)
    assert (w["started_at"].timestamp(), w["ended_at"].timestamp(), w["event_count"]) == (0.05, 4.25, 0)
    assert codes(evs, wait_threshold_s=5)[1] == "pyautogui.click(x=0.01, y=0.02)"


def test_every_demonstration_ends_with_terminate() -> None:
    evs = [move(0, 1, 1), move(10, 2, 2), ev(20, "focus_change", demo="e"), *typed(0, "a")]
    for e in evs[:2]:
        e["demonstration_id"] = "e"
    out = reduce_actions(frame(evs), None, SCREEN)
    assert out.select("demonstration_id", "step", "action").rows() == [
        ("d", 0, "write"), ("d", 1, "terminate"), ("e", 0, "terminate")]
    assert out["event_count"].to_list() == [2, 0, 1]


def test_pointer_moves_and_modifiers_fold_into_the_following_action() -> None:
    evs = [move(0, 1, 1), key(5, SHIFT_L), move(10, 50, 50), press(20, 50, 50), release(30, 50, 50), move(40, 9, 9),
           key(50, SHIFT_L, up=True), key(60, RETURN), move(70, 3, 3)]
    lab = label_events(frame(evs))
    assert lab["step"].to_list() == [0, 0, 0, 0, 0, 1, 0, 1, 2]
    assert lab["captured_at"].to_list() == [e["captured_at"] for e in evs]


def test_frame_link_exact_then_latest_before_then_end() -> None:
    evs = [press(1000, 100, 100), release(1050, 100, 100), key(2000, RETURN), *typed(3000, "a")]
    frames = pl.DataFrame([
        ("d", 0, "f0", 2000, 1000, 900_000, "click", 1_000_000),
        ("d", 1, "f1", 2000, 1000, 1_500_000, "typing", 3_000_000),  # the agent's frame for the typing
        ("d", 2, "f2", 2000, 1000, 1_500_000, "typing", None),
        ("d", 3, "fe", 2000, 1000, 9_000_000, "end", None),
    ], schema=FRAME_SCHEMA, orient="row")
    out = reduce_actions(frame(evs), frames, SCREEN)
    assert out.select("action", "frame_sha256", "frame_step").rows() == [
        ("click", "f0", 0), ("press", "f1", 1), ("write", "f1", 1), ("terminate", "fe", 3)]
    # the frame's own size normalises, not the screen's
    assert (out["x"][0], out["y"][0]) == (0.05, 0.1)
    early = pl.DataFrame([("d", 0, "late", 2000, 1000, 1_200_000, "click", None)], schema=FRAME_SCHEMA, orient="row")
    out = reduce_actions(frame(evs), early, None)
    assert out["frame_sha256"].to_list() == [None, "late", "late", "late"]  # never a frame from after the action
    assert out["x"][0] == 0.05  # no frame before it: the demonstration's largest frame gives the size


def test_unknown_size_gives_calls_without_coordinates() -> None:
    out = reduce_actions(frame([press(0, 1, 1), release(1, 1, 1)]))
    assert out["code"][0] == "pyautogui.click()" and out["x"][0] is None


def test_empty_input_and_datetime_timestamps() -> None:
    empty = pl.DataFrame([], schema=SCHEMA)
    assert reduce_actions(empty).columns == list(ACTION_COLUMNS) and reduce_actions(empty).height == 0
    assert label_events(empty).height == 0
    stamped = frame([press(0, 1, 1), release(5, 1, 1)]).with_columns(
        pl.col("captured_at").cast(pl.Datetime("us", "UTC")).dt.cast_time_unit("ms"))
    out = reduce_actions(stamped, None, SCREEN)
    assert out["ended_at"].dt.epoch("us").to_list() == [5000, 5000]
    with pytest.raises(ValueError, match="lack columns"):
        reduce_actions(empty.drop("text_masked"))


def test_wait_threshold_must_exceed_the_bursts() -> None:
    with pytest.raises(ValidationError, match="typing_gap_s"):
        ExportSettings(wait_threshold_s=1.0)


def test_every_code_is_one_vocabulary_call_that_parses() -> None:
    evs = [press(0, 1, 1), release(5, 1, 1), press(100, 1, 1), move(110, 300, 300), release(120, 300, 300),
           ev(200, "scroll", x=1, y=1, scroll_dx=0, scroll_dy=1), *typed(300, "ok"), key(500, RETURN),
           key(600, ord("c"), mods=2), press(9000, 1, 1, "right")]
    for c in reduce(evs)["code"]:
        for stmt in ast.parse(c).body:
            call = stmt.value  # type: ignore[attr-defined]
            assert isinstance(call, ast.Call) and call.func.attr in VOCABULARY  # type: ignore[attr-defined]

# ------------------------------------------------------------------ properties

HIDDEN_CHARS = "ΣΨΩ"  # only ever typed masked
DEMOS = ("a", "b")


@st.composite
def raw_events(draw: st.DrawFn) -> list[dict[str, Any]]:
    n = draw(st.integers(0, 40))
    t = 0
    out = []
    for _ in range(n):
        t += draw(st.sampled_from([0, 30, 120, 400, 700, 1100, 3500]))
        demo = draw(st.sampled_from(DEMOS))
        kind = draw(st.sampled_from(["pointer_move", "click", "click", "scroll", "key_down", "key_down", "key_up",
                                     "focus_change"]))
        x, y = draw(st.integers(-5, 30)), draw(st.integers(0, 30))
        e = ev(t, kind, demo=demo, app_id=draw(st.sampled_from(["code", None])))
        if kind in ("pointer_move", "click", "scroll"):
            e.update(x=x, y=y)
        if kind == "click":
            e.update(button=draw(st.sampled_from(["left", "left", "right", "middle", "other"])),
                     pressed=draw(st.booleans()))
        if kind == "scroll":
            e.update(scroll_dx=draw(st.integers(-2, 2)), scroll_dy=draw(st.integers(-2, 2)))
        if kind in ("key_down", "key_up"):
            masked = draw(st.booleans())
            code = draw(st.sampled_from([ord("a"), ord("B"), 0x20, MASKED_KEYSYM, RETURN, BACKSPACE, SHIFT_L,
                                         CONTROL_L, ISO_LEFT_TAB, 0xFFC9, 0x1008FF11]))
            text = (draw(st.sampled_from([None, "", "Σ", "ΨΩ"])) if masked
                    else draw(st.sampled_from([None, "a", '"', "\\", "\n", "é"])))
            e.update(key_code=code, modifiers=draw(st.sampled_from([0, 0, 1, 2, 5, 8])), text_masked=masked,
                     text=text if kind == "key_down" else None)
        out.append(e)
    return out


@st.composite
def frames_for(draw: st.DrawFn, events: list[dict[str, Any]]) -> pl.DataFrame:
    times = sorted({e["captured_at"] for e in events})
    rows = []
    for demo in DEMOS:
        for step in range(draw(st.integers(0, 4))):
            c = draw(st.integers(-1000, (times[-1] if times else 0) + 1000))
            a = draw(st.one_of(st.none(), st.sampled_from(times))) if times else None
            reason = draw(st.sampled_from(["click", "typing", "end"]))
            rows.append((demo, step, f"{demo}{step}", draw(st.sampled_from([20, 31])), 25, c, reason, a))
    return pl.DataFrame(rows, schema=FRAME_SCHEMA, orient="row")


def _compare_rows(df: pl.DataFrame) -> list[tuple[Any, ...]]:
    return df.select("demonstration_id", "step", "action", "code", "app_id", "x", "y", "frame_sha256",
                     "frame_step", "event_count").rows()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), evs=raw_events())
def test_reduction_equals_the_per_event_reference(data: st.DataObject, evs: list[dict[str, Any]]) -> None:
    frames = data.draw(frames_for(evs))
    screens = {"a": (24, 24)}
    got = reduce_actions(frame(evs), frames, pl.DataFrame({"demonstration_id": ["a"], "screen_width": [24],
                                                          "screen_height": [24]}))
    ref = reduce_reference(evs, frames.to_dicts(), screens)
    want = [(r["demonstration_id"], r["step"], r["action"], r["code"], r["app_id"], r["x"], r["y"],
             r["frame_sha256"], r["frame_step"], r["event_count"]) for r in ref]
    assert _compare_rows(got) == want
    assert got["started_at"].dt.epoch("us").to_list() == [r["started_at"] for r in ref]
    assert got["ended_at"].dt.epoch("us").to_list() == [r["ended_at"] for r in ref]
    # the structured arguments too (seconds compared in tenths: a float)
    fields = ("x2", "y2", "button", "amount", "message", "keys", "presses")
    args = [(*(a[f] for f in fields), None if a["seconds"] is None else round(a["seconds"] * 10))
            for a in got["args"].to_list()]
    assert args == [(*(r.get(f) for f in fields), r.get("deciseconds")) for r in ref]


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), evs=raw_events())
def test_invariants(data: st.DataObject, evs: list[dict[str, Any]]) -> None:
    frames = data.draw(frames_for(evs))
    out = reduce_actions(frame(evs), frames, None)
    lab = label_events(frame(evs))
    # every event (moves too) belongs to exactly one action of its demonstration, never a wait
    assert lab.height == len(evs) and lab["step"].null_count() == 0
    kinds = {(r[0], r[1]): r[2] for r in out.select("demonstration_id", "step", "action").rows()}
    assert all(kinds[(d, s)] != "wait" for d, s in lab.select("demonstration_id", "step").rows())
    non_moves = lab.filter(pl.col("kind") != "pointer_move").group_by("demonstration_id", "step").len()
    counted = out.filter(pl.col("event_count") > 0).select("demonstration_id", "step",
                                                           pl.col("event_count").cast(pl.UInt32).alias("len"))
    assert sorted(non_moves.rows()) == sorted(counted.rows())
    # actions are time-ordered and do not overlap; steps are 0.. per demonstration; terminate last
    for demo in out["demonstration_id"].unique():
        d = out.filter(pl.col("demonstration_id") == demo)
        assert d["step"].to_list() == list(range(d.height)) and d["action"][-1] == "terminate"
        assert (d["ended_at"] >= d["started_at"]).all()
        assert (d["ended_at"].head(-1) <= d["started_at"].tail(-1)).all()
    # masked text never shows in code or arguments; coordinates within [0, 1]; codes parse
    for c in out["code"]:
        assert not set(c) & set(HIDDEN_CHARS), c
        for stmt in ast.parse(c).body:
            assert stmt.value.func.attr in VOCABULARY  # type: ignore[attr-defined]
    msgs = [m for m in out["args"].struct.field("message").to_list() if m]
    assert not set("".join(msgs)) & set(HIDDEN_CHARS)
    for col in ("x", "y"):
        vals = out[col].drop_nulls()
        assert ((vals >= 0) & (vals <= 1)).all()
    assert set(out["action"]) <= VOCABULARY


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), evs=raw_events())
def test_chunked_input_reduces_like_one_chunk(data: st.DataObject, evs: list[dict[str, Any]]) -> None:
    # ClickHouse delivers rows in blocks: the reduction gathers from many chunks and must not care
    whole = frame(evs).sort("demonstration_id", "captured_at", maintain_order=True)
    cuts = sorted(set(data.draw(st.lists(st.integers(0, whole.height), max_size=6))))
    bounds = [0, *cuts, whole.height]
    chunked = pl.concat([whole.slice(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)], rechunk=False)
    frames = data.draw(frames_for(evs))
    assert reduce_actions(chunked, frames, SCREEN).rows() == reduce_actions(whole, frames, SCREEN).rows()
    assert label_events(chunked).rows() == label_events(whole).rows()
