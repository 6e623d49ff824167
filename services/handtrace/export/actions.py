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


def _us(df: pl.DataFrame, col: str) -> pl.Expr:
    """``col`` as integer microseconds (datetime or integer input)."""
    dtype = df.schema[col]
    return pl.col(col).dt.epoch("us") if isinstance(dtype, pl.Datetime) else pl.col(col).cast(pl.Int64)


def _prev(c: str) -> pl.Expr:
    return pl.col(c).shift(1)


def _pystr(expr: pl.Expr) -> pl.Expr:
    """A string as a double-quoted literal that JSON and Python (``ast``) both read back."""
    return (pl.struct(expr.alias("v")).struct.json_encode()
            .str.strip_prefix('{"v":').str.strip_suffix("}"))


def _num(expr: pl.Expr) -> pl.Expr:
    return expr.cast(pl.String)


def _classified(events: pl.DataFrame) -> pl.DataFrame:
    """Events sorted per demonstration, with token class and fold direction."""
    missing = [c for c in _EVENT_COLUMNS if c not in events.columns]
    if missing:
        raise ValueError(f"events lack columns: {missing}")
    df = events.select(*(c for c in _EVENT_COLUMNS if c != "captured_at"), _us(events, "captured_at").alias("t"))
    d, t = pl.col("demonstration_id"), pl.col("t")
    ordered = df.select(((d > d.shift(1)) | ((d == d.shift(1)) & (t >= t.shift(1)))).fill_null(True).all()).item()  # noqa: FBT003
    if not ordered:  # ClickHouse returns them ordered (ORDER BY demonstration_id, captured_at): no sort then
        df = df.with_row_index("_in").sort(["demonstration_id", "t", "_in"]).drop("_in")
    df = df.with_row_index("idx").with_columns(pl.col("idx").cast(pl.Int64))
    kind, code = pl.col("kind"), pl.col("key_code")
    mods = pl.col("modifiers").fill_null(0)
    pressed = pl.col("pressed").fill_null(False)  # noqa: FBT003
    button_ok = pl.col("button").is_in(["left", "right", "middle"])
    down = kind == "key_down"
    modkey = code.is_in(list(MODIFIER_KEYSYMS)).fill_null(False)  # noqa: FBT003
    masked = pl.col("text_masked").fill_null(False)  # noqa: FBT003
    char_sym = ((code >= 0x20) & (code <= 0x7E)) | ((code >= 0xA0) & (code <= 0xFF)) | (
        (code >= 0x01000020) & (code <= 0x0110FFFF))
    printable = pl.col("text").is_not_null() | masked | char_sym.fill_null(False)  # noqa: FBT003
    typing = down & ~modkey & ((mods & COMMAND) == 0) & printable
    name = code.replace_strict(KEY_NAMES, default=None, return_dtype=pl.String)
    named = down & ~modkey & ~typing & name.is_not_null()
    is_press = (kind == "click") & pressed & button_ok
    is_release = (kind == "click") & ~pressed & button_ok
    df = df.with_columns(
        (pl.col("demonstration_id") != _prev("demonstration_id")).fill_null(True).alias("new_demo"),  # noqa: FBT003
        is_press.alias("is_press"), is_release.alias("is_release"),
        pl.when(is_press).then(T_CLICK).when(kind == "scroll").then(T_SCROLL).when(typing).then(T_TYPE)
        .when(named & (mods == 0)).then(T_KEY).when(named).then(T_HOT).otherwise(0)
        .cast(pl.Int8).alias("cls"),
        name.alias("key"),
    )
    idx = pl.col("idx")
    df = df.with_columns(
        pl.col("new_demo").cum_sum().cast(pl.Int64).alias("demo_no"),
        pl.when("new_demo").then(idx).forward_fill().alias("demo_first"),
        pl.when("is_press").then(idx).forward_fill().alias("p_idx"),
        pl.when("is_release").then(idx).forward_fill().shift(1).alias("r_prev"),
        pl.when("is_press").then("x").forward_fill().alias("px"),
        pl.when("is_press").then("y").forward_fill().alias("py"),
    )
    held = ((pl.col("p_idx") >= pl.col("demo_first"))
            & (pl.col("r_prev").is_null() | (pl.col("r_prev") < pl.col("p_idx")))).fill_null(False)  # noqa: FBT003
    return df.with_columns(
        held.alias("held"),
        ((pl.col("cls") == 0) & ((held & (kind == "pointer_move")) | (kind == "key_up") | pl.col("is_release")))
        .alias("fold_back"),
        (kind == "pointer_move").alias("is_move"),
    )


def _tokens(df: pl.DataFrame, s: ExportSettings) -> pl.DataFrame:
    """One row per token with its action number (merges per the module rules)."""
    held = df.filter(pl.col("held") & (pl.col("is_move") | pl.col("is_release")))
    drag = held.group_by("p_idx").agg(
        pl.max_horizontal((pl.col("x") - pl.col("px")).abs(), (pl.col("y") - pl.col("py")).abs())
        .max().alias("dist"),
        pl.col("x").drop_nulls().last().alias("x2"), pl.col("y").drop_nulls().last().alias("y2"),
    )
    tok = (df.filter(pl.col("cls") != 0)
           .select("idx", "demo_no", "demonstration_id", "t", "cls", "button", "x", "y", "scroll_dx",
                   "scroll_dy", "key", "modifiers", "text", "text_masked", "app_id")
           .join(drag, left_on="idx", right_on="p_idx", how="left", maintain_order="left"))
    dx, dy = pl.col("scroll_dx").fill_null(0), pl.col("scroll_dy").fill_null(0)
    vertical = dy.abs() >= dx.abs()
    masked = pl.col("text_masked").fill_null(False)  # noqa: FBT003
    tok = tok.with_columns(
        pl.when(pl.col("cls") != T_TYPE).then(None).when(masked)
        .then(pl.col("text").str.replace_all(r"(?s).", MASK_CHAR).fill_null(MASK_CHAR))
        .otherwise(pl.col("text").fill_null(MASK_CHAR)).alias("chr"),
        ((pl.col("cls") == T_CLICK) & (pl.col("dist").fill_null(0) > s.drag_threshold_px)).alias("drag"),
        vertical.alias("vertical"),
        pl.when(vertical).then(dy.sign()).otherwise(dx.sign()).alias("dir"),
    ).with_row_index("ti").with_columns(pl.col("ti").cast(pl.Int64))
    cls, dt = pl.col("cls"), pl.col("t") - _prev("t")
    same = (cls == _prev("cls")) & (pl.col("demo_no") == _prev("demo_no"))
    r = s.double_click_radius_px
    click = ((cls == T_CLICK) & (pl.col("button") == "left") & (_prev("button") == "left")
             & ~pl.col("drag") & ~_prev("drag") & (dt <= int(s.double_click_interval_s * 1e6))
             & ((pl.col("x") - _prev("x")).abs() <= r) & ((pl.col("y") - _prev("y")).abs() <= r))
    scroll = ((cls == T_SCROLL) & (pl.col("vertical") == _prev("vertical")) & (pl.col("dir") == _prev("dir"))
              & (dt <= int(s.scroll_burst_gap_s * 1e6)))
    typing_us = int(s.typing_gap_s * 1e6)
    typing = (cls == T_TYPE) & (dt <= typing_us)
    key = (cls == T_KEY) & (pl.col("key") == _prev("key")) & (dt <= typing_us)
    cont = (same & (click | scroll | typing | key)).fill_null(False)  # noqa: FBT003
    tok = tok.with_columns(cont.alias("cont"))
    tok = tok.with_columns(pl.when(~pl.col("cont")).then("ti").forward_fill().alias("chain"))
    start = ~pl.col("cont") | ((cls == T_CLICK) & ((pl.col("ti") - pl.col("chain")) % 3 == 0))
    return tok.with_columns(start.cum_sum().cast(pl.Int64).alias("action_no"))


def _assign(df: pl.DataFrame, tok: pl.DataFrame) -> pl.DataFrame:
    """Every event's action number (null: the demonstration's terminate) and whether it counts
    in the action's time range."""
    # tokens are rows of df (idx = row position): scatter their action numbers back, no join
    own_no = pl.repeat(None, df.height, dtype=pl.Int64, eager=True).scatter(tok["idx"], tok["action_no"])
    df = df.with_columns(own_no.alias("action_no"))
    own = pl.col("action_no")
    tok_demo = pl.when(own.is_not_null()).then("demo_no")
    prev_ok = tok_demo.forward_fill() == pl.col("demo_no")
    next_ok = tok_demo.backward_fill() == pl.col("demo_no")
    action = (pl.when(own.is_not_null()).then(own)
              .when(pl.col("fold_back") & prev_ok).then(own.forward_fill())
              .when(next_ok).then(own.backward_fill())
              .otherwise(None))
    in_range = own.is_not_null() | (pl.col("fold_back") & prev_ok).fill_null(False)  # noqa: FBT003
    return df.with_columns(action.alias("action"), in_range.alias("in_range"))


def _actions(df: pl.DataFrame, tok: pl.DataFrame, s: ExportSettings) -> pl.DataFrame:
    """Action rows (without frames): name, arguments, time range, step."""
    per_action = (df.select("action", pl.when("in_range").then("t").alias("ended_at"),
                            (~pl.col("is_move")).cast(pl.UInt32).alias("event_count"))
                  .group_by("action").agg(pl.col("ended_at").max(), pl.col("event_count").sum()))
    ended = per_action.select("action", "ended_at")
    counts = per_action.select("action", "event_count")
    acts = tok.group_by("action_no", maintain_order=True).agg(
        pl.col("demo_no").first(), pl.col("demonstration_id").first(), pl.col("t").first().alias("started_at"),
        pl.col("cls").first(), pl.col("button").first(), pl.col("x").first(), pl.col("y").first(),
        pl.col("drag").first(), pl.col("x2").first(), pl.col("y2").first(), pl.len().alias("n"),
        pl.col("scroll_dx").sum().alias("sdx"), pl.col("scroll_dy").sum().alias("sdy"),
        pl.col("vertical").first(), pl.col("chr").str.join("").alias("message"),
        pl.col("key").first(), pl.col("modifiers").first().fill_null(0).alias("mods"),
        pl.col("app_id").first(),
    ).join(ended, left_on="action_no", right_on="action", how="left", maintain_order="left")
    cls, n, b = pl.col("cls"), pl.col("n"), pl.col("button")
    mods = pl.col("mods")
    name = (pl.when(cls == T_CLICK).then(
                pl.when("drag").then(pl.lit("dragTo")).when(b == "right").then(pl.lit("rightClick"))
                .when(b == "middle").then(pl.lit("middleClick")).when(n == 2).then(pl.lit("doubleClick"))
                .when(n >= 3).then(pl.lit("tripleClick")).otherwise(pl.lit("click")))
            .when(cls == T_SCROLL).then(pl.when("vertical").then(pl.lit("scroll")).otherwise(pl.lit("hscroll")))
            .when(cls == T_TYPE).then(pl.lit("write")).when(cls == T_KEY).then(pl.lit("press"))
            .otherwise(pl.lit("hotkey")))
    # joined as a string and split once: list expressions per row are slow in polars
    keys = pl.concat_str(
        pl.when((mods & CTRL) != 0).then(pl.lit("ctrl\x1f")), pl.when((mods & ALT) != 0).then(pl.lit("alt\x1f")),
        pl.when((mods & SHIFT) != 0).then(pl.lit("shift\x1f")), pl.when((mods & META) != 0).then(pl.lit("win\x1f")),
        pl.col("key"), ignore_nulls=True,
    )
    acts = acts.with_columns(
        name.alias("action"),
        pl.when(cls == T_CLICK).then(pl.when("drag").then(1).otherwise(n)).alias("clicks"),
        pl.when(cls == T_SCROLL).then(pl.when("vertical").then(-pl.col("sdy")).otherwise(pl.col("sdx")))
        .alias("amount"),
        pl.when(cls == T_TYPE).then("message").alias("message"),
        pl.when(cls == T_KEY).then("key").when(cls == T_HOT).then(keys).str.split("\x1f").alias("keys"),
        pl.when(cls == T_KEY).then(n).alias("presses"),
        pl.when(cls == T_CLICK).then(b).alias("button"),
        pl.when(pl.col("drag")).then("x2").alias("x2"), pl.when(pl.col("drag")).then("y2").alias("y2"),
        pl.when(cls.is_in([T_CLICK, T_SCROLL])).then("x").alias("x"),
        pl.when(cls.is_in([T_CLICK, T_SCROLL])).then("y").alias("y"),
        (pl.col("action_no") * 2).alias("order"),
    ).drop("sdx", "sdy", "vertical", "drag", "key", "mods", "n")
    # terminate: one per demonstration, at its last event (events folded into it counted)
    last = df.filter(pl.col("new_demo").shift(-1).fill_null(True))  # noqa: FBT003
    term = last.select(
        "demo_no", "demonstration_id", pl.col("t").alias("started_at"), pl.col("t").alias("ended_at"),
        pl.lit("terminate").alias("action"), pl.lit(2**62, pl.Int64).alias("order"),
    )
    acts = pl.concat([acts, term], how="diagonal_relaxed").sort(["demo_no", "order"], maintain_order=True)
    gap = pl.col("started_at") - _prev("ended_at")
    wait_us = int(s.wait_threshold_s * 1e6)
    waits = acts.with_columns(gap.alias("gap"), _prev("ended_at").alias("_pe"),
                              (pl.col("demo_no") == _prev("demo_no")).alias("_sd")).filter(
        (pl.col("gap") > wait_us) & pl.col("_sd")).select(
        "demo_no", "demonstration_id", pl.col("_pe").alias("started_at"), pl.col("started_at").alias("ended_at"),
        pl.lit("wait").alias("action"), (pl.col("order") - 1).alias("order"),
        ((pl.col("gap") + 50_000) // 100_000).alias("deciseconds"),
    )
    acts = pl.concat([acts, waits], how="diagonal_relaxed").sort(["demo_no", "order"], maintain_order=True)
    acts = acts.with_row_index("_r").with_columns(pl.col("_r").cast(pl.Int64))
    first = pl.when(pl.col("demo_no") != _prev("demo_no").fill_null(-1)).then("_r").forward_fill()
    acts = acts.with_columns((pl.col("_r") - first).cast(pl.UInt32).alias("step"))
    return acts.join(counts, left_on="action_no", right_on="action", how="left", maintain_order="left",
                     nulls_equal=False)


def _terminate_counts(df: pl.DataFrame) -> pl.DataFrame:
    return (df.filter(pl.col("action").is_null() & ~pl.col("is_move")).group_by("demo_no")
            .agg(pl.len().alias("_tc")))


def _frames(acts: pl.DataFrame, frames: pl.DataFrame | None, screens: pl.DataFrame | None) -> pl.DataFrame:
    """Link each action's frame and find the size its coordinates are normalised by."""
    acts = acts.with_columns(pl.lit(None, pl.String).alias("frame_sha256"), pl.lit(None, pl.UInt32).alias("frame_step"),
                             pl.lit(None, pl.Int64).alias("w"), pl.lit(None, pl.Int64).alias("h"))
    if frames is not None and frames.height:
        fr = frames.select(
            "demonstration_id", pl.col("step").cast(pl.UInt32).alias("f_step"), pl.col("sha256").alias("f_sha"),
            pl.col("width").cast(pl.Int64).alias("f_w"), pl.col("height").cast(pl.Int64).alias("f_h"),
            _us(frames, "captured_at").alias("c"), pl.col("reason"),
            _us(frames, "action_started_at").alias("a"),
        ).sort(["f_step"])
        keep = ["f_step", "f_sha", "f_w", "f_h"]
        exact = (fr.filter(pl.col("a").is_not_null())
                 .unique(["demonstration_id", "a"], keep="first", maintain_order=True))
        end = fr.filter(pl.col("reason") == "end").unique(["demonstration_id"], keep="first", maintain_order=True)
        asof_fr = fr.unique(["demonstration_id", "c"], keep="first", maintain_order=True).sort("c")
        acts = acts.with_row_index("_k")
        e = acts.join(exact.select("demonstration_id", "a", *keep), left_on=["demonstration_id", "started_at"],
                      right_on=["demonstration_id", "a"], how="left", maintain_order="left")
        t = acts.join(end.select("demonstration_id", *keep), on="demonstration_id", how="left", maintain_order="left")
        probe = acts.select("_k", "demonstration_id", (pl.col("started_at") - 1).alias("_p")).sort("_p")
        a = probe.join_asof(asof_fr.select("demonstration_id", "c", *keep), left_on="_p", right_on="c",
                            by="demonstration_id", strategy="backward", check_sortedness=False).sort("_k")
        is_term = pl.col("action") == "terminate"
        picked = [
            pl.when(is_term).then(pl.coalesce(t[c], a[c])).otherwise(pl.coalesce(e[c], a[c])).alias(c) for c in keep
        ]
        acts = acts.with_columns(*picked).with_columns(
            pl.col("f_sha").alias("frame_sha256"), pl.col("f_step").alias("frame_step"),
            pl.col("f_w").alias("w"), pl.col("f_h").alias("h")).drop(*keep, "_k")
        largest = frames.group_by("demonstration_id").agg(pl.col("width").max().cast(pl.Int64).alias("_fw"),
                                                          pl.col("height").max().cast(pl.Int64).alias("_fh"))
        acts = acts.join(largest, on="demonstration_id", how="left", maintain_order="left")
    else:
        acts = acts.with_columns(pl.lit(None, pl.Int64).alias("_fw"), pl.lit(None, pl.Int64).alias("_fh"))
    if screens is not None and screens.height:
        sc = screens.select("demonstration_id", pl.col("screen_width").cast(pl.Int64).alias("_sw"),
                            pl.col("screen_height").cast(pl.Int64).alias("_sh")).unique("demonstration_id")
        acts = acts.join(sc, on="demonstration_id", how="left", maintain_order="left")
    else:
        acts = acts.with_columns(pl.lit(None, pl.Int64).alias("_sw"), pl.lit(None, pl.Int64).alias("_sh"))
    w = pl.coalesce("w", "_sw", "_fw")
    h = pl.coalesce("h", "_sh", "_fh")
    w = pl.when(w > 0).then(w)
    h = pl.when(h > 0).then(h)

    def norm(c: str, size: pl.Expr) -> pl.Expr:
        # exact rational rounding (half up) in integers: identical wherever it is recomputed
        # (polars' float division is not correctly rounded: 3333 / 10000 -> 0.33330000000000004;
        # parsing the decimal string is)
        v = pl.col(c).cast(pl.Int64).clip(0, size)
        n = (v * 20_000 + size) // (2 * size)
        return pl.format("{}.{}", n // 10_000, (n % 10_000).cast(pl.String).str.zfill(4)).cast(pl.Float64).alias(c)

    return acts.with_columns(norm("x", w), norm("y", h), norm("x2", w), norm("y2", h)).drop("w", "h", "_fw", "_fh",
                                                                                          "_sw", "_sh")


def _code(acts: pl.DataFrame) -> pl.DataFrame:
    a = pl.col("action")
    xy = pl.when(pl.col("x").is_not_null() & pl.col("y").is_not_null()).then(
        pl.format("x={}, y={}", _num(pl.col("x")), _num(pl.col("y")))).otherwise(pl.lit(""))
    xy2 = pl.when(pl.col("x2").is_not_null() & pl.col("y2").is_not_null()).then(
        pl.format("x={}, y={}, ", _num(pl.col("x2")), _num(pl.col("y2")))).otherwise(pl.lit(""))
    tail = pl.when(xy != "").then(pl.format(", {}", xy)).otherwise(pl.lit(""))
    keys = (pl.struct(pl.col("keys").alias("v")).struct.json_encode()
            .str.strip_prefix('{"v":[').str.strip_suffix("]}").str.replace_all('","', '", "', literal=True))
    first_key = _pystr(pl.col("keys").list.first())
    code = (pl.when(a.is_in(["click", "doubleClick", "tripleClick", "rightClick", "middleClick"]))
            .then(pl.format("pyautogui.{}({})", a, xy))
            .when(a == "dragTo").then(pl.format('pyautogui.moveTo({})\npyautogui.dragTo({}button={})',
                                                xy, xy2, _pystr(pl.col("button"))))
            .when(a.is_in(["scroll", "hscroll"])).then(pl.format("pyautogui.{}({}{})", a, _num(pl.col("amount")), tail))
            .when(a == "write").then(pl.format("pyautogui.write(message={})", _pystr(pl.col("message"))))
            .when(a == "press").then(
                pl.when(pl.col("presses") > 1)
                .then(pl.format("pyautogui.press({}, presses={})", first_key, _num(pl.col("presses"))))
                .otherwise(pl.format("pyautogui.press({})", first_key)))
            .when(a == "hotkey").then(pl.format("pyautogui.hotkey({})", keys))
            .when(a == "wait").then(pl.format("computer.wait(seconds={}.{})", _num(pl.col("deciseconds") // 10),
                                              _num(pl.col("deciseconds") % 10)))
            .otherwise(pl.lit('computer.terminate(status="success")')))
    # seconds parsed from the same decimal the code writes: polars' ``/ 10`` is not correctly
    # rounded (39 / 10 -> 3.9000000000000004), so args and code disagreed (the loader check found it)
    seconds = pl.format("{}.{}", _num(pl.col("deciseconds") // 10), _num(pl.col("deciseconds") % 10))
    args = pl.struct("x", "y", "x2", "y2", "clicks", "button", "amount", "message", "keys", "presses",
                     seconds.cast(pl.Float64).alias("seconds"))
    return acts.with_columns(code.alias("code"), args.alias("args"))


def _reduce(events: pl.DataFrame, frames: pl.DataFrame | None, screens: pl.DataFrame | None,
            settings: ExportSettings) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = _classified(events)
    tok = _tokens(df, settings)
    df = _assign(df, tok)
    acts = _actions(df, tok, settings)
    tc = _terminate_counts(df)
    acts = acts.join(tc, on="demo_no", how="left", maintain_order="left").with_columns(
        pl.when(pl.col("action") == "terminate").then(pl.col("_tc").fill_null(0))
        .when(pl.col("action") == "wait").then(0).otherwise("event_count").cast(pl.UInt32).alias("event_count"),
    ).drop("_tc")
    for c in ("x2", "y2", "clicks", "amount", "presses", "deciseconds"):
        if c not in acts.columns:
            acts = acts.with_columns(pl.lit(None).alias(c))
    acts = _frames(acts, frames, screens)
    acts = _code(acts)
    return df, acts


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
    _, acts = _reduce(events, frames, screens, settings or ExportSettings())
    return acts.select(
        "demonstration_id", "step", "action", "code", "args",
        pl.col("started_at").cast(_TS), pl.col("ended_at").cast(_TS), "app_id", "x", "y",
        "frame_sha256", "frame_step", "event_count",
    )


def label_events(events: pl.DataFrame, settings: ExportSettings | None = None) -> pl.DataFrame:
    """The events in reduction order with the ``step`` of the action each belongs to (columns:
    demonstration_id, captured_at (µs), kind, step)."""
    df, acts = _reduce(events, None, None, settings or ExportSettings())
    steps = acts.select("demo_no", "action_no", "step")
    own = df.join(steps.filter(pl.col("action_no").is_not_null()), left_on="action", right_on="action_no",
                  how="left", maintain_order="left")
    term = steps.filter(pl.col("action_no").is_null()).select("demo_no", pl.col("step").alias("_ts"))
    # waits have no action_no either; terminate is the demonstration's last step
    term = term.group_by("demo_no").agg(pl.col("_ts").max())
    own = own.join(term, on="demo_no", how="left", maintain_order="left")
    return own.select("demonstration_id", pl.col("t").alias("captured_at"), "kind",
                      pl.coalesce("step", "_ts").alias("step"))
