"""Action reduction on events captured from real X input: xdotool drives a scripted task on a
real Xvfb, the X11 capture source records it through RECORD, and the reduced actions must equal
the script (issue #12: clicks at the right normalised positions, the drag, typing kept or
masked, the hotkey, the scroll).

Coordinates are multiples of a tenth of the 1280x800 screen so the expected normalised values
are exact. The script ends with F12 as a sentinel (tests/integration/test_x11_capture.py): once
it is captured, every event before it is too.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import polars as pl
import pytest

from handtrace.agent.sources.x11 import X11Source
from handtrace.core.pii import MASK_CHAR, MASKED_KEYSYM
from handtrace.core.settings import ExportSettings
from handtrace.export.actions import label_events, reduce_actions
from tests.integration.test_x11_capture import Recorder, key_sentinel
from tests.xvfb import WindowFactory, XvfbServer, xdotool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

SCHEMA = {
    "demonstration_id": pl.String, "captured_at": pl.Int64, "kind": pl.String, "x": pl.Int32, "y": pl.Int32,
    "button": pl.String, "pressed": pl.Boolean, "scroll_dx": pl.Int32, "scroll_dy": pl.Int32,
    "key_code": pl.Int32, "modifiers": pl.Int32, "text": pl.String, "text_masked": pl.Boolean,
    "app_id": pl.String,
}
SCREEN = pl.DataFrame({"demonstration_id": ["demo"], "screen_width": [1280], "screen_height": [800]})
TYPED = "Hi there"
# No wait steps whatever the machine's load between xdotool runs: waits have their own unit test.
SETTINGS = ExportSettings(wait_threshold_s=120)


@pytest.fixture
def captured(xvfb: XvfbServer, windows: WindowFactory) -> Iterator[list[dict[str, Any]]]:
    """Run the scripted task under a started X11Source; the raw events it captured, as stored rows."""
    windows(wm_class=("gedit", "Gedit"), title="notes.txt - gedit", geometry=(0, 0, 1280, 800))
    before = set(threading.enumerate())
    source = X11Source(display=xvfb.display)
    rec = Recorder()
    source.start(rec)
    try:
        script = [
            ("mousemove", "128", "160"), ("click", "1"),                       # click
            ("mousemove", "384", "240"), ("click", "--repeat", "2", "--delay", "80", "1"),  # double click
            ("mousemove", "640", "400"), ("click", "3"),                       # right click
            ("mousemove", "256", "480"), ("mousedown", "1"), ("mousemove", "384", "520"),
            ("mousemove", "512", "560"), ("mouseup", "1"),                     # drag
            ("type", "--delay", "40", TYPED),                                  # typing (with shift for H)
            ("key", "ctrl+s"),                                                 # hotkey
            ("mousemove", "768", "320"), ("click", "--repeat", "3", "--delay", "40", "5"),  # 3 notches down
            ("key", "Return"),                                                 # a named key
        ]
        for args in script:
            xdotool(xvfb, *args)
        events = key_sentinel(xvfb, rec)
    finally:
        source.stop()
    assert [t for t in set(threading.enumerate()) - before if t.is_alive()] == []
    rows = []
    for e in events:
        row = dict.fromkeys(SCHEMA)
        row.update({k: v for k, v in e.items() if k in SCHEMA})
        row.update(demonstration_id="demo", captured_at=e["captured_at_us"], app_id="gedit",
                   text_masked=False, button=e.get("button") or "none")
        rows.append(row)
    yield rows


def expected(message: str) -> list[str]:
    return [
        "pyautogui.click(x=0.1, y=0.2)",
        "pyautogui.doubleClick(x=0.3, y=0.3)",
        "pyautogui.rightClick(x=0.5, y=0.5)",
        'pyautogui.moveTo(x=0.2, y=0.6)\npyautogui.dragTo(x=0.4, y=0.7, button="left")',
        f'pyautogui.write(message="{message}")',
        'pyautogui.hotkey("ctrl", "s")',
        "pyautogui.scroll(-3, x=0.6, y=0.4)",
        'pyautogui.press("enter")',
        'computer.terminate(status="success")',
    ]


def test_scripted_task_reduces_to_the_script(captured: list[dict[str, Any]]) -> None:
    events = pl.DataFrame(captured, schema=SCHEMA)
    out = reduce_actions(events, None, SCREEN, SETTINGS)
    assert out["code"].to_list() == expected(TYPED)
    assert out["action"].to_list() == ["click", "doubleClick", "rightClick", "dragTo", "write", "hotkey",
                                       "scroll", "press", "terminate"]
    assert out["step"].to_list() == list(range(9))
    assert (out["app_id"].head(8) == "gedit").all()
    # time ranges follow the capture and never overlap
    assert (out["ended_at"].head(-1) <= out["started_at"].tail(-1)).all()
    # every captured event is in exactly one step; the moves before each click fold into it
    labels = label_events(events, SETTINGS)
    assert labels["step"].null_count() == 0 and labels.height == len(captured)
    clicks = labels.filter(pl.col("kind") == "click")["step"].to_list()
    assert clicks == [0, 0, 1, 1, 1, 1, 2, 2, 3, 3]  # press/release pairs; the wheel makes scroll events
    assert out["event_count"].sum() == events.filter(pl.col("kind") != "pointer_move").height


def test_masked_typing_stays_masked(captured: list[dict[str, Any]]) -> None:
    # the stored form of typing under a `masked` text policy (stream/steps/redact.py): bullets,
    # the masked keysym on the character keys' downs and ups, text_masked set
    chars = {e["key_code"] for e in captured if e["kind"] == "key_down" and e["text"] is not None
             and not (e["modifiers"] or 0) & 14}
    for e in captured:
        if e["kind"] in ("key_down", "key_up") and e["key_code"] in chars:
            e["key_code"] = MASKED_KEYSYM
            e["text_masked"] = e["kind"] == "key_down"
            if e["text"] is not None:
                e["text"] = MASK_CHAR * len(e["text"])
    out = reduce_actions(pl.DataFrame(captured, schema=SCHEMA), None, SCREEN, SETTINGS)
    assert out["code"].to_list() == expected(MASK_CHAR * len(TYPED))
    assert out["args"][4]["message"] == MASK_CHAR * len(TYPED)
    assert not any(TYPED in code or "Hi" in code for code in out["code"])
