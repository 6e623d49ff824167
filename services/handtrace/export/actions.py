"""Action reduction: raw demonstration events -> actions in AgentNet / OpenCUA's pyautogui
vocabulary (issue #12, Deliver 1). Vectorised: polars expressions over whole demonstrations,
never a Python object per event (``reference.py`` is the per-event twin, for the oracle test and
the benchmark only).

Input: rows of ``demonstration_events`` (columns of ``core.rows.STORED_SCHEMA`` plus
``demonstration_id``; ``captured_at`` as a UTC datetime or integer microseconds), optionally the
``frames`` rows of the same demonstrations and their screen sizes. Events are ordered by
(demonstration, ``captured_at``), ties in input order. Thresholds come from
:class:`handtrace.core.settings.ExportSettings` (defaults in brackets).

Tokens. Only these events start or extend an action (a *token*):

- a press of the left, right or middle button (``click`` with ``pressed``);
- a ``scroll`` event;
- a *typing key*: ``key_down`` of a non-modifier key without ctrl/alt/meta that carries text, is
  masked (``text_masked``, or the masked keysym) or has a character keysym;
- a *named key*: any other ``key_down`` whose keysym has a pyautogui name (Return -> ``enter``,
  BackSpace, Tab, Escape, Delete, arrows, Home/End, Page Up/Down, Insert, F1-F24, keypad, and, in
  a chord, characters).

Every other event folds into an action: pointer moves, modifier key downs (Shift, Control, ...),
``focus_change``, ``screenshot``, presses of ``other`` buttons and unnamed keys fold into the
**following** action (the last ones of a demonstration into ``terminate``); a button release and
the pointer moves while a button is held, key releases and a release without its press fold into
the **preceding** action (the first action if none precedes). So every event belongs to exactly
one action (``label_events``).

Rules (examples: ``t`` in ms, screen 1000x500):

1. **click family.** A press and its release: ``click`` at the press point, ``rightClick`` /
   ``middleClick`` for those buttons. Left presses that follow the previous token (a left click)
   within ``double_click_interval_s`` [0.5 s, press to press] and ``double_click_radius_px``
   [5 px, each axis] merge: 2 -> ``doubleClick``, 3 -> ``tripleClick``; a fourth starts a new
   click. Press (100,50) t=0, release t=60, press (102,51) t=200, release t=260 ->
   ``pyautogui.doubleClick(x=0.1, y=0.1)``. Right and middle clicks never merge.
2. **drag.** A press whose pointer (moves while held, or the release) gets more than
   ``drag_threshold_px`` [5 px, either axis] from the press point: ``dragTo`` with code
   ``pyautogui.moveTo(x=..., y=...)`` + newline + ``pyautogui.dragTo(x=..., y=..., button="left")``
   (start = press point, end = release point). Press (100,100), move (300,100), release (400,200)
   -> ``moveTo(x=0.1, y=0.2)`` / ``dragTo(x=0.4, y=0.4, button="left")``. A drag never merges.
3. **scroll / hscroll.** Scroll events of one axis (vertical when ``|dy| >= |dx|``) and one
   direction, each within ``scroll_burst_gap_s`` [1 s] of the previous token, merge. Sign: the
   capture counts notches positive *towards the end of the document / right*; pyautogui's
   ``scroll`` is positive *up*, ``hscroll`` positive *right*: ``scroll(-sum(dy))``,
   ``hscroll(sum(dx))``, at the first event's pointer. Three notches down at (500,250) ->
   ``pyautogui.scroll(-3, x=0.5, y=0.5)``; a reversal starts a new action.
4. **write.** Typing keys each within ``typing_gap_s`` [1 s] of the previous token form one
   ``write``; the message is the stored ``text`` of each key, in order. **Masked text stays
   masked**: a key whose ``text_masked`` is set contributes ``•`` per stored character (one if
   its text was removed) -- the characters are never recovered (not from the keysym either);
   an unmasked character key without text also gives ``•``. ``h``,``i`` -> ``pyautogui.write(
   message="hi")``; masked ``s``,``3`` -> ``write(message="••")``. Shift does not break a run
   (``H`` is typed with shift). Strings are written as JSON string literals, which Python
   parses (``ast``) to the same string.
5. **press.** A named key without modifiers: ``pyautogui.press("enter")``; repeats of one key
   each within ``typing_gap_s`` merge: BackSpace x3 -> ``press("backspace", presses=3)``. A
   press ends a write run (``hi<Return>yo`` -> write, press, write).
6. **hotkey.** A named key with modifiers (ctrl/alt/meta, or shift on a non-character key):
   ``pyautogui.hotkey("ctrl", "s")`` (modifiers ordered ctrl, alt, shift, win; letters lower
   case: ctrl+shift+S -> ``hotkey("ctrl", "shift", "s")``). Each chord is its own action.
7. **wait.** Between two consecutive actions of a demonstration whose gap (end of one to start
   of the next) exceeds ``wait_threshold_s`` [3 s]: ``computer.wait(seconds=4.2)`` spanning the
   gap (seconds to 0.1).
8. **terminate.** Every demonstration ends with ``computer.terminate(status="success")`` at its
   last event (a submitted demonstration is a finished task).

Time ranges: ``started_at`` is the action's first token, ``ended_at`` its last token or
preceding-folded event (release, key up); events folded in from before (moves, modifiers, a
focus change) belong to the action but precede its range. Hence actions are time-ordered and
never overlap (``ended_at <= next started_at``). ``step`` numbers a demonstration's actions
(waits and terminate included) 0.. in time order.

Frame of an action (``frames`` table, same demonstration): (a) the frame whose
``action_started_at`` equals the action's ``started_at`` (the agent chose it for this very action
start: click, drag, first scroll or typing key, hotkey), lowest ``step`` on ties; else (b) the
frame with the greatest ``captured_at`` strictly before ``started_at`` (the screen as last saved
before the action; lowest step on ties) -- no frame from the future; for ``terminate``, the
``end`` frame first. None when no frame precedes. Coordinates are divided by that frame's
``width``/``height`` (else the demonstration's screen size from ``screens``, else its largest
frame), clipped to [0, 1] and rounded half up to 4 decimals (exactly, in integers: 828/1920 =
0.43125 -> 0.4313); unknown size: null coordinates and calls without them.

Input order: events already ordered by (demonstration, ``captured_at``) -- as ClickHouse returns
them -- are not sorted again.
"""

from __future__ import annotations

import json
from typing import Final

import polars as pl

from handtrace.core.pii import MASK_CHAR
from handtrace.core.settings import ExportSettings

SHIFT, CTRL, ALT, META = 1, 2, 4, 8
COMMAND: Final = CTRL | ALT | META
MODIFIER_KEYSYMS: Final = (0xFFE1, 0xFFE2, 0xFFE3, 0xFFE4, 0xFFE5, 0xFFE6, 0xFFE7, 0xFFE8, 0xFFE9,
                           0xFFEA, 0xFFEB, 0xFFEC, 0xFFED, 0xFFEE, 0xFE03)
"""Shift, Control, Caps/Shift Lock, Meta, Alt, Super, Hyper (L/R), ISO_Level3_Shift."""

_NAMED: dict[int, str] = {
    0xFF08: "backspace", 0xFF09: "tab", 0xFE20: "tab", 0xFF0D: "enter", 0xFF8D: "enter",
    0xFF13: "pause", 0xFF14: "scrolllock", 0xFF1B: "esc", 0xFFFF: "delete", 0xFF9F: "delete",
    0xFF50: "home", 0xFF51: "left", 0xFF52: "up", 0xFF53: "right", 0xFF54: "down",
    0xFF55: "pageup", 0xFF56: "pagedown", 0xFF57: "end", 0xFF61: "printscreen", 0xFF63: "insert",
    0xFF67: "apps", 0xFF7F: "numlock", 0xFFAA: "multiply", 0xFFAB: "add", 0xFFAD: "subtract",
    0xFFAE: "decimal", 0xFFAF: "divide", 0xFF95: "home", 0xFF96: "left", 0xFF97: "up",
    0xFF98: "right", 0xFF99: "down", 0xFF9A: "pageup", 0xFF9B: "pagedown", 0xFF9C: "end",
    0xFF9E: "insert", 0x20: "space",
}
_NAMED |= {0xFFB0 + n: f"num{n}" for n in range(10)}
_NAMED |= {0xFFBE + n: f"f{n + 1}" for n in range(24)}
_NAMED |= {c: chr(c).lower() for c in range(0x21, 0x7F)}
KEY_NAMES: Final[dict[int, str]] = _NAMED
"""X11 keysym -> pyautogui key name (characters only matter in chords: a typed character is a
typing key)."""

# Token classes.
T_CLICK, T_SCROLL, T_TYPE, T_KEY, T_HOT = 1, 2, 3, 4, 5

ACTION_COLUMNS: Final = ("demonstration_id", "step", "action", "code", "args", "started_at",
                         "ended_at", "app_id", "x", "y", "frame_sha256", "frame_step", "event_count")
"""Columns of :func:`reduce_actions`, in order."""

_EVENT_COLUMNS = ("demonstration_id", "captured_at", "kind", "x", "y", "button", "pressed",
                  "scroll_dx", "scroll_dy", "key_code", "modifiers", "text", "text_masked", "app_id")
_TS = pl.Datetime("us", "UTC")
_KEY_LIST: Final = sorted(set(KEY_NAMES.values()))
_KEY_IDS: Final = pl.Series([_KEY_LIST.index(KEY_NAMES[c]) if c in KEY_NAMES else None for c in range(0x10000)],
                            dtype=pl.Int16)
"""Keysym (all named ones are below 0x10000) -> a number per key name (keysyms of one name, e.g.
Return and KP_Enter, are one key), by lookup."""
_KEY_TEXT: Final = pl.Series(_KEY_LIST, dtype=pl.String)
_KEY_LITERALS: Final = pl.Series([json.dumps(n) for n in _KEY_LIST], dtype=pl.String)
"""Key names (by key number) as Python/JSON string literals."""
_ACTIONS: Final = ("click", "doubleClick", "tripleClick", "rightClick", "middleClick", "dragTo", "scroll",
                   "hscroll", "write", "press", "hotkey", "wait", "terminate")
# actions are numbers (their index here) until the end, and strings only by one lookup
A_DRAG, A_WAIT, A_TERMINATE = _ACTIONS.index("dragTo"), _ACTIONS.index("wait"), _ACTIONS.index("terminate")
_HEADS: Final = {
    **{a: f"pyautogui.{a}(" for a in ("click", "doubleClick", "tripleClick", "rightClick", "middleClick",
                                        "scroll", "hscroll", "press", "hotkey")},
    "dragTo": "pyautogui.moveTo(", "write": "pyautogui.write(message=", "wait": "computer.wait(seconds=",
    "terminate": 'computer.terminate(status="success"',
}
"""Each action's code up to its first argument (``_code`` appends arguments and the parenthesis)."""
_ACTION_TEXT: Final = pl.Series(_ACTIONS, dtype=pl.String)
_ACTION_HEADS: Final = pl.Series([_HEADS[a] for a in _ACTIONS], dtype=pl.String)
_ACTION_MIDS: Final = pl.Series([")\npyautogui.dragTo(" if a == "dragTo" else None for a in _ACTIONS], dtype=pl.String)
_BUTTON_TEXT: Final = pl.Series([None, "left", "right", "middle"], dtype=pl.String)
_US = 1_000_000
# n / 10_000 for n in 0..10_000, and as Python prints it: coordinates are rounded to 4 decimals in
# integers and looked up here (polars divides by a constant as a multiplication by its reciprocal:
# 3333 / 10000 -> 0.33330000000000004, not the nearest double to 0.3333)
_DECIMALS: Final = pl.Series([n / 10_000 for n in range(10_001)], dtype=pl.Float64)
_DECIMALS_TEXT: Final = [repr(n / 10_000) for n in range(10_001)]
_X_TEXT: Final = pl.Series([f"x={v}" for v in _DECIMALS_TEXT] + [f", x={v}" for v in _DECIMALS_TEXT])
_Y_TEXT: Final = pl.Series([f", y={v}" for v in _DECIMALS_TEXT])
_Y2_TEXT: Final = pl.Series([f", y={v}, " for v in _DECIMALS_TEXT])
_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', **{chr(c): json.dumps(chr(c))[1:-1] for c in range(0x20)}}
"""What ``json.dumps(ensure_ascii=False)`` escapes in a string."""
_ENGINE: Final = "in-memory"
"""polars' streaming engine (the default since 2.0) splits the events into morsels: slower here, on
one thread, for running sums and fills over ordered events (measured: bench/action_reduction.py)."""


def _us(df: pl.DataFrame, col: str) -> pl.Expr:
    """``col`` as integer microseconds (datetime or integer input)."""
    dtype = df.schema[col]
    return pl.col(col).dt.epoch("us") if isinstance(dtype, pl.Datetime) else pl.col(col).cast(pl.Int64)


def _prev(c: str) -> pl.Expr:
    return pl.col(c).shift(1)


def _events(events: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, pl.Series]]:
    """The events in reduction order, classified: one pass over all of them keeps the rows that
    matter (every event but pointer moves, and each demonstration's first and last); the rest
    works on those (about a quarter), the moves between them are ranges of rows.

    Returns the kept rows and the events' columns (in reduction order) to gather from. Columns
    of the rows: ``idx`` (row among all events), ``r`` (among the kept ones), ``t`` (µs),
    ``t_before`` (of the event just before), ``new_demo`` / ``demo_end`` (first / last event of
    its demonstration), ``cls`` (token class, 0: none), ``btn`` (+1/+2/+3 a press of the
    left/right/middle button, negative its release, 0 anything else), ``held`` (a button is held
    before it), ``gap_held`` (and so in the pointer moves after it), ``fold_back`` (folds into the
    preceding action), ``is_move``, the numeric event columns, inclusive running counts of non-move
    non-token events (``fb``): ``F`` folding forward, ``B`` folding back; ``LB`` / ``LBt``: row and
    time of the last event folding back so far (held moves included).
    """
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events lack columns: {missing}")
    d, kind = pl.col("demonstration_id"), pl.col("kind")

    def kept(ev: pl.DataFrame) -> pl.DataFrame:
        # lazy throughout: an eager operation on chunked input would first copy it into one chunk
        t = _us(ev, "captured_at")
        new_demo = (d != d.shift(1)).fill_null(True)  # noqa: FBT003
        return ev.lazy().with_row_index("idx").select(
            pl.col("idx").cast(pl.Int64), t.alias("t"), t.shift(1).alias("t_before"), new_demo.alias("new_demo"),
            new_demo.shift(-1).fill_null(True).alias("demo_end"),  # noqa: FBT003
            (~new_demo & (t < t.shift(1))).any().alias("_unordered"),
            (kind == "pointer_move").alias("is_move"), (kind == "click").alias("is_click"),
            (kind == "key_down").alias("is_down"), (kind == "key_up").alias("is_up"),
            (kind == "scroll").alias("is_scroll"), pl.col("text").is_not_null().alias("has_text"),
            "x", "y", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text_masked",
        ).filter(~pl.col("is_move") | pl.col("new_demo") | pl.col("demo_end")).collect(engine=_ENGINE).rechunk()

    df = kept(events)
    # ClickHouse returns them ordered (ORDER BY demonstration_id, captured_at): no sort then
    firsts = events.get_column("demonstration_id").gather(df.filter("new_demo")["idx"])
    if (df.height and df["_unordered"][0]) or not firsts.is_sorted() or firsts.n_unique() != firsts.len():
        events = (events.lazy().with_columns(_us(events, "captured_at").alias("_t"))
                  .sort("demonstration_id", "_t", maintain_order=True).collect(engine=_ENGINE))
        df = kept(events)
    # in one chunk: a gather from many chunks is 10x slower than the copy
    cols = {c: events.get_column(c).rechunk() if c in ("button", "text", "app_id", "x", "y") else events.get_column(c)
            for c in ("demonstration_id", "captured_at", "kind", "button", "text", "app_id", "x", "y")}
    df = df.drop("_unordered").with_row_index("r").with_columns(pl.col("r").cast(pl.Int64))
    # clicks and key downs: classified apart, the result scattered back
    clicks = df.filter("is_click").select("r", "idx", "pressed")
    b = pl.lit(cols["button"].gather(clicks["idx"]))
    pressed = pl.col("pressed").fill_null(False)  # noqa: FBT003
    clicks = clicks.select("r", (pl.when(b == "left").then(1).when(b == "right").then(2).when(b == "middle").then(3)
                                 .otherwise(0) * pl.when(pressed).then(1).otherwise(-1)).cast(pl.Int8).alias("btn"))
    code = pl.col("key_code")
    mods = pl.col("modifiers").fill_null(0)
    masked = pl.col("text_masked").fill_null(False)  # noqa: FBT003
    modkey = code.is_in(list(MODIFIER_KEYSYMS)).fill_null(False)  # noqa: FBT003
    char_sym = ((code >= 0x20) & (code <= 0x7E)) | ((code >= 0xA0) & (code <= 0xFF)) | (
        (code >= 0x01000020) & (code <= 0x0110FFFF))
    printable = pl.col("has_text") | masked | char_sym.fill_null(False)  # noqa: FBT003
    typing = ~modkey & ((mods & COMMAND) == 0) & printable
    named = ~modkey & ~typing & code.is_in(list(KEY_NAMES)).fill_null(False)  # noqa: FBT003
    downs = df.lazy().filter("is_down").select(
        "r", pl.when(typing).then(T_TYPE).when(named & (mods == 0)).then(T_KEY).when(named).then(T_HOT)
        .otherwise(0).cast(pl.Int8).alias("cls")).filter(pl.col("cls") != 0).collect(engine=_ENGINE)
    btn = pl.zeros(df.height, pl.Int8, eager=True).scatter(clicks["r"], clicks["btn"])
    cls = pl.zeros(df.height, pl.Int8, eager=True).scatter(downs["r"], downs["cls"])
    # a button is held while the last press/release before the event (same demonstration) is a press;
    # the kept rows hold every press and release, so the moves between two rows share the first's state
    pressed_after = pl.when(pl.col("btn") != 0).then(pl.col("btn") > 0).when("new_demo").then(False).forward_fill()  # noqa: FBT003
    held = pl.when("new_demo").then(False).otherwise(pl.col("_after").shift(1)).fill_null(False)  # noqa: FBT003
    idx = pl.col("idx")
    gap_held = pl.col("_after") & ~pl.col("demo_end") & ((idx.shift(-1) - idx) > 1)
    is_move, tok = pl.col("is_move"), pl.col("cls") != 0
    fold_back = ~tok & ((pl.col("held") & is_move) | pl.col("is_up") | (pl.col("btn") < 0))
    fb = ~is_move & ~tok
    held_gap_before = pl.col("gap_held").shift(1).fill_null(False)  # noqa: FBT003
    return (df.lazy().with_columns(btn.alias("btn"), cls.alias("cls")).with_columns(
        pl.when("is_scroll").then(pl.lit(T_SCROLL, pl.Int8)).when(pl.col("btn") > 0).then(pl.lit(T_CLICK, pl.Int8))
        .otherwise("cls").alias("cls"), pressed_after.alias("_after"),
    ).with_columns(held.alias("held"), gap_held.fill_null(False).alias("gap_held")).with_columns(  # noqa: FBT003
        fold_back.alias("fold_back"), fb.alias("fb")).with_columns(
        (pl.col("fb") & ~pl.col("fold_back")).cum_sum().cast(pl.Int64).alias("F"),
        (pl.col("fb") & pl.col("fold_back")).cum_sum().cast(pl.Int64).alias("B"),
        # the last fold-back event: this row, else the last (held) move before it
        pl.when("fold_back").then(idx).when(held_gap_before).then(idx - 1).forward_fill().alias("LB"),
        pl.when("fold_back").then("t").when(held_gap_before).then("t_before").forward_fill().alias("LBt"),
    ).drop("_after").collect(engine=_ENGINE)), cols


def _drags(df: pl.DataFrame, cols: dict[str, pl.Series]) -> pl.DataFrame:
    """Per press (``pidx``): how far the pointer got while the button was held, and where."""
    press = pl.col("btn") > 0
    kept = df.lazy().select("idx", "x", "y", press.alias("press"),
                            (pl.col("held") & (pl.col("is_move") | (pl.col("btn") < 0))).alias("h")).filter(
        pl.col("press") | pl.col("h")).drop("h")
    # the moves between kept rows while a button is held: ranges of rows
    spans = df.lazy().select("idx", pl.col("idx").shift(-1).alias("_next"), "gap_held").filter("gap_held").select(
        pl.int_ranges(pl.col("idx") + 1, "_next", dtype=pl.Int64).alias("idx")).explode("idx").collect(engine=_ENGINE)
    moves = spans.with_columns(cols["x"].gather(spans["idx"]).alias("x"), cols["y"].gather(spans["idx"]).alias("y"),
                               pl.lit(False).alias("press"))  # noqa: FBT003
    held = pl.concat([kept, moves.lazy()], how="vertical_relaxed").sort("idx")
    return (held.with_columns(pl.when("press").then(c).forward_fill().alias(f"p{c}") for c in ("idx", "x", "y"))
            .filter(~pl.col("press")).group_by("pidx").agg(
                pl.max_horizontal((pl.col("x") - pl.col("px")).abs(), (pl.col("y") - pl.col("py")).abs())
                .max().alias("dist"),
                pl.col("x").drop_nulls().last().alias("x2"), pl.col("y").drop_nulls().last().alias("y2"))
            .collect(engine=_ENGINE))


def _marks(df: pl.DataFrame) -> pl.DataFrame:
    """Tokens and the first and last event of each demonstration, with what each token takes
    from the events around it: ``count`` (itself, the non-move events folding forward into it
    since the previous token, those folding back into it before the next token), ``ended``
    (its last in-range event) and, on a demonstration's last event, ``term_count`` (events
    folding into terminate)."""
    e = df.lazy().select("idx", "r", "t", "cls", "btn", "new_demo", "demo_end", "x", "y", "scroll_dx", "scroll_dy",
                         "key_code", "modifiers", "text_masked", "F", "B", "fb", "LB", "LBt").filter(
        (pl.col("cls") != 0) | pl.col("new_demo") | pl.col("demo_end"))
    tok = pl.col("cls") != 0
    p_tok = tok.shift(1).fill_null(False)  # noqa: FBT003
    nd, de = pl.col("new_demo"), pl.col("demo_end")
    F, B = pl.col("F"), pl.col("B")  # noqa: N806
    FB = F + B  # noqa: N806
    FBx = FB - pl.col("fb").cast(pl.Int64)  # noqa: N806
    # the previous / next mark is in the same demonstration unless this is its first / last event
    fwd = pl.when(nd).then(0).when(~p_tok).then(FBx - FBx.shift(1)).otherwise(F - F.shift(1))
    bwd = pl.when(de).then(0).otherwise(B.shift(-1) - B)
    last_back = pl.when(~de).then(pl.col("LB").shift(-1))
    return e.with_columns(
        (1 + fwd + bwd).alias("count"),
        pl.when(last_back > pl.col("idx")).then(pl.col("LBt").shift(-1)).otherwise("t").alias("ended"),
        pl.when(tok).then(0).when(nd).then(FB - FBx).when(p_tok).then(F - F.shift(1))
        .otherwise(FB - FBx.shift(1)).alias("term_count"),
        nd.cum_sum().cast(pl.Int64).alias("demo_no"),
    ).drop("F", "B", "LB", "LBt", "fb").collect(engine=_ENGINE)


def _tokens(e: pl.DataFrame, drags: pl.DataFrame, s: ExportSettings) -> pl.DataFrame:
    """One row per token with its action number (merges per the module rules)."""
    tok = (e.lazy().filter(pl.col("cls") != 0)
           .join(drags.lazy(), left_on="idx", right_on="pidx", how="left", maintain_order="left"))
    dx, dy = pl.col("scroll_dx").fill_null(0), pl.col("scroll_dy").fill_null(0)
    vertical = dy.abs() >= dx.abs()
    tok = tok.with_columns(
        ((pl.col("cls") == T_CLICK) & (pl.col("dist").fill_null(0) > s.drag_threshold_px)).alias("drag"),
        vertical.alias("vertical"),
        pl.when(vertical).then(dy.sign()).otherwise(dx.sign()).alias("dir"),
        dx.alias("scroll_dx"), dy.alias("scroll_dy"),
        pl.lit(_KEY_IDS).gather(pl.when(pl.col("key_code").is_between(0, 0xFFFF)).then("key_code")).alias("key"),
    )
    cls, dt = pl.col("cls"), pl.col("t") - _prev("t")
    same = (cls == _prev("cls")) & (pl.col("demo_no") == _prev("demo_no"))
    r = s.double_click_radius_px
    click = ((cls == T_CLICK) & (pl.col("btn") == 1) & (_prev("btn") == 1)
             & ~pl.col("drag") & ~_prev("drag") & (dt <= int(s.double_click_interval_s * _US))
             & ((pl.col("x") - _prev("x")).abs() <= r) & ((pl.col("y") - _prev("y")).abs() <= r))
    scroll = ((cls == T_SCROLL) & (pl.col("vertical") == _prev("vertical")) & (pl.col("dir") == _prev("dir"))
              & (dt <= int(s.scroll_burst_gap_s * _US)))
    typing_us = int(s.typing_gap_s * _US)
    typing = (cls == T_TYPE) & (dt <= typing_us)
    key = (cls == T_KEY) & (pl.col("key") == _prev("key")) & (dt <= typing_us)
    cont = (same & (click | scroll | typing | key)).fill_null(False)  # noqa: FBT003
    ti = pl.int_range(pl.len(), dtype=pl.Int64)
    tok = tok.with_columns(cont.alias("cont"), ti.alias("ti"))
    chain = pl.when(~pl.col("cont")).then("ti").forward_fill()
    start = ~pl.col("cont") | ((cls == T_CLICK) & ((pl.col("ti") - chain) % 3 == 0))
    return tok.with_columns(start.alias("start")).with_columns(
        pl.col("start").cum_sum().cast(pl.Int64).alias("action_no"),
        pl.col("start").shift(-1).fill_null(True).alias("last"),  # noqa: FBT003
        pl.col("count").cum_sum().alias("_cc"), pl.col("scroll_dx").cum_sum().alias("_cx"),
        pl.col("scroll_dy").cum_sum().alias("_cy"),
    ).collect(engine=_ENGINE)


def _actions(texts: dict[str, pl.Series], tok: pl.DataFrame, terms: pl.DataFrame, s: ExportSettings) -> pl.DataFrame:
    """Action rows (without frames), waits and terminates included: name, arguments, time range;
    not yet in order (``order`` sorts them, :func:`_ordered`)."""
    first = tok.select("action_no", "idx", "demo_no", "t", "cls", "btn", "x", "y", "drag", "x2", "y2", "vertical",
                       "key", "modifiers", "count", "scroll_dx", "scroll_dy", "ti", "_cc", "_cx", "_cy",
                       "start").filter("start")
    last = tok.select("ended", "ti", "_cc", "_cx", "_cy", "last").filter("last")
    typed = tok.select("action_no", "text_masked", "idx", "cls").filter(pl.col("cls") == T_TYPE)
    text = pl.col("text")
    # a masked key shows one mask character per stored character (a regex replace is 4x slower)
    masked = pl.lit("").str.pad_start(text.str.len_chars().fill_null(1), MASK_CHAR)
    chars = pl.when(pl.col("text_masked").fill_null(False)).then(masked).otherwise(text.fill_null(MASK_CHAR))  # noqa: FBT003
    # collected as lists and joined: 4x faster than str.join as an aggregation
    msg = (typed.lazy().with_columns(pl.lit(texts["text"].gather(typed["idx"])).alias("text"))
           .select("action_no", chars.alias("c")).group_by("action_no", maintain_order=True).agg("c")
           .select("action_no", pl.col("c").list.join("").alias("message")))
    cls, b = pl.col("cls"), pl.col("btn")
    n = (last["ti"] - first["ti"] + 1).cast(pl.UInt32)
    mods = pl.col("modifiers").fill_null(0)
    # the action as its number in _ACTIONS: strings only once, by lookup
    name = (pl.when(cls == T_CLICK).then(
                pl.when("drag").then(A_DRAG).when(b == 2).then(3).when(b == 3).then(4).when(n == 2).then(1)
                .when(n >= 3).then(2).otherwise(0))
            .when(cls == T_SCROLL).then(pl.when("vertical").then(6).otherwise(7))
            .when(cls == T_TYPE).then(8).when(cls == T_KEY).then(9).otherwise(10)).cast(pl.Int8)
    key_name = pl.lit(_KEY_TEXT).gather("key")
    key_lit = pl.lit(_KEY_LITERALS).gather("key")
    modifiers = ((CTRL, "ctrl"), (ALT, "alt"), (SHIFT, "shift"), (META, "win"))
    # joined as a string and split once: list expressions per row are slow in polars
    keys = pl.concat_str(*(pl.when((mods & bit) != 0).then(pl.lit(f"{m}\x1f")) for bit, m in modifiers),
                         key_name, ignore_nulls=True)
    keys_lit = pl.concat_str(*(pl.when((mods & bit) != 0).then(pl.lit(f'"{m}", ')) for bit, m in modifiers),
                             key_lit, ignore_nulls=True)
    demo_ids = texts["demonstration_id"].gather(terms["idx"])  # demo_no - 1 -> demonstration_id
    sdx = last["_cx"] - first["_cx"] + first["scroll_dx"]
    sdy = last["_cy"] - first["_cy"] + first["scroll_dy"]
    acts = first.lazy().select(
        "action_no", "demo_no", pl.lit(demo_ids).gather(pl.col("demo_no") - 1).alias("demonstration_id"),
        pl.col("t").alias("started_at"), last["ended"].alias("ended_at"), name.alias("_a"),
        pl.when(cls <= T_SCROLL).then("x").alias("x"), pl.when(cls <= T_SCROLL).then("y").alias("y"),
        pl.when(pl.col("drag")).then("x2").alias("x2"), pl.when(pl.col("drag")).then("y2").alias("y2"),
        pl.when(cls == T_CLICK).then(pl.when("drag").then(1).otherwise(n)).alias("clicks"),
        pl.when(cls == T_CLICK).then(pl.lit(_BUTTON_TEXT).gather(b)).alias("button"),
        pl.when(cls == T_SCROLL).then(pl.when("vertical").then(-sdy).otherwise(sdx)).alias("amount"),
        pl.when(cls == T_KEY).then(key_name).when(cls == T_HOT).then(keys).str.split("\x1f").alias("keys"),
        pl.when(cls == T_KEY).then(key_lit).when(cls == T_HOT).then(keys_lit).alias("_keys_lit"),
        pl.when(cls == T_KEY).then(n).alias("presses"),
        pl.lit(texts["app_id"].gather(first["idx"])).alias("app_id"),
        (last["_cc"] - first["_cc"] + first["count"]).cast(pl.UInt32).alias("event_count"),
        (pl.col("idx") * 4 + 1).alias("order"),
    ).join(msg, on="action_no", how="left", maintain_order="left").collect(engine=_ENGINE).lazy()  # once, not per use
    # terminate: one per demonstration, at its last event (events folded into it counted)
    term = terms.lazy().select(
        "demo_no", pl.lit(demo_ids).alias("demonstration_id"),
        pl.col("t").alias("started_at"), pl.col("t").alias("ended_at"), pl.lit(A_TERMINATE, pl.Int8).alias("_a"),
        pl.col("term_count").cast(pl.UInt32).alias("event_count"), (pl.col("idx") * 4 + 3).alias("order"),
    )
    times = ["demo_no", "started_at", "ended_at", "order"]
    seq = pl.concat([acts.select(times), term.select(times)]).sort("order")
    gap = pl.col("started_at") - _prev("ended_at")
    waits = seq.with_columns(gap.alias("gap"), _prev("ended_at").alias("_pe"), _prev("demo_no").alias("_pd")).filter(
        (pl.col("gap") > int(s.wait_threshold_s * _US)) & (pl.col("demo_no") == pl.col("_pd"))).select(
        "demo_no", pl.col("_pe").alias("started_at"), pl.col("started_at").alias("ended_at"),
        pl.lit(A_WAIT, pl.Int8).alias("_a"), pl.lit(0, pl.UInt32).alias("event_count"),
        (pl.col("order") - 1).alias("order"),
        ((pl.col("gap") + 50_000) // 100_000).alias("deciseconds")).collect(engine=_ENGINE)
    waits = waits.with_columns(demo_ids.gather(waits["demo_no"] - 1).alias("demonstration_id"))
    return (pl.concat([acts, term, waits.lazy()], how="diagonal_relaxed")
            .with_columns(pl.lit(_ACTION_TEXT).gather("_a").alias("action")).collect(engine=_ENGINE))


def _ordered(acts: pl.DataFrame) -> pl.DataFrame:
    """``acts`` in output order (demonstration, time) with their ``step``."""
    acts = acts.sort("order")
    first_row = pl.when(pl.col("demo_no") != _prev("demo_no").fill_null(-1)).then("_r").forward_fill()
    return acts.lazy().with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("_r")).with_columns(
        (pl.col("_r") - first_row).cast(pl.UInt32).alias("step")).drop("_r").collect(engine=_ENGINE)


def _frames(acts: pl.DataFrame, frames: pl.DataFrame | None, screens: pl.DataFrame | None,
            demos: pl.DataFrame) -> pl.DataFrame:
    """Link each action's frame and find the size its coordinates are normalised by (``demos``:
    demonstration_id and demo_no of each demonstration)."""
    sizes = demos
    keep = ["f_step", "f_sha", "f_w", "f_h"]
    if frames is not None and frames.height:
        fr = frames.select(
            "demonstration_id", pl.col("step").cast(pl.UInt32).alias("f_step"), pl.col("sha256").alias("f_sha"),
            pl.col("width").cast(pl.Int64).alias("f_w"), pl.col("height").cast(pl.Int64).alias("f_h"),
            _us(frames, "captured_at").alias("c"), pl.col("reason"),
            _us(frames, "action_started_at").alias("a"),
        ).join(demos, on="demonstration_id", how="inner").with_row_index("fid")

        def first_per(key: str) -> pl.LazyFrame:
            # the lowest step per (demonstration, key), by sorting: sorted is what the asof join needs
            k = pl.col(key)
            return (fr.lazy().filter(k.is_not_null()).sort("demo_no", key, "f_step", maintain_order=True)
                    .filter((pl.col("demo_no") != _prev("demo_no")) | (k != _prev(key)).fill_null(True))  # noqa: FBT003
                    .select("demo_no", key, "fid"))

        end = (fr.lazy().filter(pl.col("reason") == "end").sort("demo_no", "f_step", maintain_order=True)
               .unique("demo_no", keep="first", maintain_order=True).select("demo_no", pl.col("fid").alias("_end")))
        sizes = sizes.join(fr.group_by("demo_no").agg(pl.col("f_w").max().alias("_fw"),
                                                      pl.col("f_h").max().alias("_fh")), on="demo_no", how="left")
        # actions are in time order per demonstration: the asof joins' by-groups need only that; the
        # joins pick frame rows (fid), their columns are gathered once
        probe = acts.lazy().select("demo_no", "started_at", (pl.col("started_at") - 1).alias("_p"), "_a")
        exact = (probe.join_asof(first_per("a"), left_on="started_at", right_on="a", by="demo_no", strategy="backward",
                                 check_sortedness=False)
                 .with_columns(pl.when(pl.col("a") == pl.col("started_at")).then("fid").alias("_exact")).drop("fid")
                 .join_asof(first_per("c"), left_on="_p", right_on="c", by="demo_no", strategy="backward",
                            check_sortedness=False)
                 .join(end, on="demo_no", how="left", maintain_order="left"))
        pick = pl.when(pl.col("_a") == A_TERMINATE).then("_end").otherwise("_exact").fill_null(pl.col("fid"))
        fid = exact.select(pick).collect(engine=_ENGINE).to_series()
        acts = acts.with_columns(fr.get_column(c).gather(fid) for c in keep)
    else:
        acts = acts.with_columns(pl.lit(None, pl.UInt32).alias("f_step"), pl.lit(None, pl.String).alias("f_sha"),
                                 pl.lit(None, pl.Int64).alias("f_w"), pl.lit(None, pl.Int64).alias("f_h"))
        sizes = sizes.with_columns(pl.lit(None, pl.Int64).alias("_fw"), pl.lit(None, pl.Int64).alias("_fh"))
    if screens is not None and screens.height:
        sc = screens.select("demonstration_id", pl.col("screen_width").cast(pl.Int64).alias("_sw"),
                            pl.col("screen_height").cast(pl.Int64).alias("_sh")).unique(
            "demonstration_id", keep="first", maintain_order=True)
        sizes = sizes.join(sc, on="demonstration_id", how="left")
    else:
        sizes = sizes.with_columns(pl.lit(None, pl.Int64).alias("_sw"), pl.lit(None, pl.Int64).alias("_sh"))
    sizes = sizes.select("demo_no", pl.coalesce("_sw", "_fw").alias("_dw"), pl.coalesce("_sh", "_fh").alias("_dh"))
    acts = acts.join(sizes, on="demo_no", how="left", maintain_order="left")
    w = pl.coalesce("f_w", "_dw")
    h = pl.coalesce("f_h", "_dh")
    w = pl.when(w > 0).then(w)
    h = pl.when(h > 0).then(h)

    def norm(c: str, size: pl.Expr) -> pl.Expr:
        # exact rational rounding (half up) in integers: identical wherever it is recomputed
        v = pl.col(c).cast(pl.Int64).clip(0, size)
        return ((v * 20_000 + size) // (2 * size)).alias(f"_n{c}")

    coords = ("x", "y", "x2", "y2")
    n = {c: pl.col(f"_n{c}") for c in coords}
    is_scroll = pl.col("_a").is_between(_ACTIONS.index("scroll"), _ACTIONS.index("hscroll"))
    return acts.lazy().with_columns(
        norm("x", w), norm("y", h), norm("x2", w), norm("y2", h),
        pl.col("f_sha").alias("frame_sha256"), pl.col("f_step").alias("frame_step"),
    ).with_columns(
        *(pl.lit(_DECIMALS).gather(n[c]).alias(c) for c in coords),
        # the call's text of the point, only with both coordinates ("x=0.1, y=0.2"; a scroll: ", x=...")
        pl.lit(_X_TEXT).gather(pl.when(n["y"].is_not_null()).then(n["x"] + pl.when(is_scroll).then(10_001)
                                                                  .otherwise(0))).alias("_x_text"),
        pl.lit(_Y_TEXT).gather(pl.when(n["x"].is_not_null()).then(n["y"])).alias("_y_text"),
        pl.lit(_X_TEXT).gather(pl.when(n["y2"].is_not_null()).then(n["x2"])).alias("_x2_text"),
        pl.lit(_Y2_TEXT).gather(pl.when(n["x2"].is_not_null()).then(n["y2"])).alias("_y2_text"),
    ).drop(*keep, "_dw", "_dh", *(f"_n{c}" for c in coords)).collect(engine=_ENGINE)


def _code(acts: pl.DataFrame) -> pl.DataFrame:
    """The pyautogui call of each action: its head, then the arguments that are not null (a
    concat_str of a literal and a null is null: no string is built for an absent argument)."""
    d, a = pl.col("deciseconds"), pl.col("_a")
    code = pl.concat_str(
        pl.lit(_ACTION_HEADS).gather(a),
        pl.col("amount").cast(pl.String),
        # a JSON string literal, as json.dumps(ensure_ascii=False) writes it: Python's ast reads it back
        pl.concat_str(pl.lit('"'), pl.col("message").str.replace_many(_ESCAPES), pl.lit('"')),
        "_keys_lit",
        pl.concat_str((d // 10).cast(pl.String), pl.lit("."), (d % 10).cast(pl.String)),
        "_x_text", "_y_text",
        pl.lit(_ACTION_MIDS).gather(a), "_x2_text", "_y2_text",
        pl.concat_str(pl.lit('button="'), pl.when(a == A_DRAG).then("button"), pl.lit('"')),
        pl.concat_str(pl.lit(", presses="), pl.when(pl.col("presses") > 1).then("presses").cast(pl.String)),
        pl.lit(")"), ignore_nulls=True)
    # seconds parsed from the same decimal the code writes: polars' ``/ 10`` is not correctly
    # rounded (39 / 10 -> 3.9000000000000004), so args and code disagreed (the loader check found it)
    seconds = pl.concat_str((d // 10).cast(pl.String), pl.lit("."), (d % 10).cast(pl.String)).cast(pl.Float64)
    args = pl.struct("x", "y", "x2", "y2", "clicks", "button", "amount", "message", "keys", "presses",
                     seconds.alias("seconds"))
    return acts.lazy().with_columns(code.alias("code"), args.alias("args")).collect(engine=_ENGINE)


def _reduce(events: pl.DataFrame, settings: ExportSettings) -> tuple[
        pl.DataFrame, dict[str, pl.Series], pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """Events (classified) and their strings, tokens, actions in order (no frames yet),
    demonstrations (id and number)."""
    df, texts = _events(events)
    marks = _marks(df)
    tok = _tokens(marks, _drags(df, texts), settings)
    ends = marks.filter("demo_end")
    acts = _ordered(_actions(texts, tok, ends, settings))
    for c in ("x", "y", "x2", "y2", "clicks", "button", "amount", "message", "keys", "_keys_lit", "presses",
              "deciseconds", "app_id"):
        if c not in acts.columns:
            acts = acts.with_columns(pl.lit(None).alias(c))
    return df, texts, tok, acts, ends.select(pl.lit(texts["demonstration_id"].gather(ends["idx"])), "demo_no")


def reduce_actions(events: pl.DataFrame, frames: pl.DataFrame | None = None, screens: pl.DataFrame | None = None,
                   settings: ExportSettings | None = None) -> pl.DataFrame:
    """Reduce demonstration events to actions, one row per action (module docstring: the rules).

    Args:
        events: ``demonstration_events`` rows of one or many demonstrations.
        frames: Their ``frames`` rows (demonstration_id, step, sha256, width, height, captured_at,
            reason, action_started_at); None: no frame links, sizes from ``screens``.
        screens: demonstration_id, screen_width, screen_height (the ``demonstrations`` rows).
        settings: Thresholds; default ``ExportSettings()``.

    Returns:
        Columns :data:`ACTION_COLUMNS`, ordered by demonstration and step.
    """
    _, _, _, acts, demos = _reduce(events, settings or ExportSettings())
    return _code(_frames(acts, frames, screens, demos)).select(
        "demonstration_id", "step", "action", "code", "args",
        pl.col("started_at").cast(_TS), pl.col("ended_at").cast(_TS), "app_id", "x", "y",
        "frame_sha256", "frame_step", "event_count",
    )


def label_events(events: pl.DataFrame, settings: ExportSettings | None = None) -> pl.DataFrame:
    """The events in reduction order with the ``step`` of the action each belongs to (columns:
    demonstration_id, captured_at (µs), kind, step)."""
    df, cols, tok, acts, _ = _reduce(events, settings or ExportSettings())
    # the kept rows (tokens among them: scatter their action numbers back), then the moves after each
    own = pl.repeat(None, df.height, dtype=pl.Int64, eager=True).scatter(tok["r"], tok["action_no"])
    own_no, demo_no = pl.col("action_no"), pl.col("demo_no")
    tok_demo = pl.when(own_no.is_not_null()).then(demo_no)
    prev = pl.when(tok_demo.forward_fill() == demo_no).then(own_no.forward_fill())
    nxt = pl.when(tok_demo.backward_fill() == demo_no).then(own_no.backward_fill())
    kept = df.lazy().select("idx", "fold_back", "gap_held", own.alias("action_no"),
                            pl.col("new_demo").cum_sum().cast(pl.Int64).alias("demo_no")).with_columns(
        prev.alias("_prev"), nxt.alias("_next")).with_columns(
        pl.coalesce(own_no, pl.when("fold_back").then("_prev"), "_next").alias("_own"),
        # moves after a kept row: held ones fold back, the others forward (same demonstration: the next
        # kept row is in it, or this row was the demonstration's last and no move follows)
        pl.when("gap_held").then(pl.coalesce("_prev", pl.col("_next").shift(-1)))
        .otherwise(pl.col("_next").shift(-1)).alias("_gap"),
    ).collect(engine=_ENGINE)
    n = cols["kind"].len()
    at = pl.repeat(None, n, dtype=pl.Int64, eager=True).scatter(kept["idx"], pl.int_range(kept.height, eager=True))
    pos = at.forward_fill()
    action = pl.select(pl.when(at.is_not_null()).then(kept["_own"].gather(pos))
                       .otherwise(kept["_gap"].gather(pos))).to_series()
    steps = acts.select("demo_no", "action_no", "step")
    labelled = pl.DataFrame({"action": action, "demo_no": kept["demo_no"].gather(pos)}).join(
        steps.filter(pl.col("action_no").is_not_null()), left_on="action", right_on="action_no", how="left",
        maintain_order="left")
    # waits have no action_no either; terminate is the demonstration's last step
    term = steps.filter(pl.col("action_no").is_null()).group_by("demo_no").agg(pl.col("step").max().alias("_ts"))
    labelled = labelled.join(term, on="demo_no", how="left", maintain_order="left")
    times = pl.DataFrame({"captured_at": cols["captured_at"]})
    return labelled.select(pl.lit(cols["demonstration_id"]).alias("demonstration_id"),
                           pl.lit(times.select(_us(times, "captured_at")).to_series()).alias("captured_at"),
                           pl.lit(cols["kind"]).alias("kind"), pl.coalesce("step", "_ts").alias("step"))
