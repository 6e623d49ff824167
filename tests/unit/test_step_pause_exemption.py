"""Invariants of the pause and exemption steps and of the control fold, over generated data:
nothing inside a (widened) pause window or exemption is kept, nothing outside is dropped,
and the decision does not depend on how rows are split into frames (late data, replays)."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.stream.controls import apply_control, dumps, loads
from handtrace.stream.policy import MAX_PAUSE_US, EmployeeControls, Exemption, PauseWindow
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.exemption import ExemptionStep
from handtrace.stream.steps.pause import PauseStep

T0 = 1_800_000_000_000_000
EMPLOYEES = ["ana", "bo", "cy"]
MIN = 60_000_000


def frame(rows: list[tuple[str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"employee_id": [e for e, _ in rows], "captured_at_us": [t for _, t in rows], "n": list(range(len(rows)))},
        schema={"employee_id": pl.String, "captured_at_us": pl.Int64, "n": pl.Int64},
    ).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))


events = st.lists(st.tuples(st.sampled_from(EMPLOYEES), st.integers(T0, T0 + 240 * MIN)), max_size=300)
windows = st.lists(
    st.tuples(st.sampled_from(EMPLOYEES), st.integers(T0, T0 + 240 * MIN), st.integers(0, 30 * MIN)), max_size=6
)


def controls_from(ws: list[tuple[str, int, int]]) -> dict[str, EmployeeControls]:
    out: dict[str, list[PauseWindow]] = {}
    for e, start, length in ws:
        out.setdefault(e, []).append(PauseWindow(start, start + length))
    return {e: EmployeeControls(pauses=tuple(p)) for e, p in out.items()}


@settings(max_examples=150, deadline=None)
@given(events, windows, st.floats(0, 10))
def test_nothing_inside_a_pause_window_is_kept_and_nothing_outside_is_dropped(rows, ws, margin_s) -> None:  # type: ignore[no-untyped-def]
    ctx = BatchContext(1, controls=controls_from(ws))
    out = PauseStep(skew_margin_s=margin_s)(frame(rows), ctx)
    m = int(margin_s * 1_000_000)

    def inside(e: str, t: int) -> bool:
        return any(e == we and s - m <= t < s + n + m for we, s, n in ws)

    kept = set(out.frame.get_column("n").to_list())
    for i, (e, t) in enumerate(rows):
        assert (i in kept) == (not inside(e, t))
    assert out.dropped.get("paused", 0) == len(rows) - len(kept)


@settings(max_examples=80, deadline=None)
@given(events, windows, st.integers(1, 7))
def test_decisions_do_not_depend_on_how_rows_are_split(rows, ws, parts) -> None:  # type: ignore[no-untyped-def]
    ctx = BatchContext(1, controls=controls_from(ws))
    whole = set(PauseStep()(frame(rows), ctx).frame.get_column("n").to_list())
    f = frame(rows)
    pieces = [f.slice(i, max(1, len(rows) // parts + 1)) for i in range(0, max(len(rows), 1), len(rows) // parts + 1)]
    split = set().union(*[set(PauseStep()(p, ctx).frame.get_column("n").to_list()) for p in reversed(pieces)])
    assert whole == split


@settings(max_examples=150, deadline=None)
@given(events, st.sampled_from(EMPLOYEES), st.integers(T0, T0 + 240 * MIN),
       st.one_of(st.none(), st.integers(0, 240 * MIN)))
def test_nothing_of_an_exempt_employee_is_kept_from_the_effective_time(rows, who, start, length) -> None:  # type: ignore[no-untyped-def]
    until = None if length is None else start + length
    ctx = BatchContext(1, controls={who: EmployeeControls(exemptions=(Exemption(start, until),))})
    out = ExemptionStep(skew_margin_s=0)(frame(rows), ctx)
    kept = set(out.frame.get_column("n").to_list())
    for i, (e, t) in enumerate(rows):
        exempt = e == who and t >= start and (until is None or t < until)
        assert (i in kept) == (not exempt)


def _rec(kind: str, at: int, **kw: object) -> dict[str, object]:
    return {"kind": kind, "occurred_at_us": at, **kw}


def test_pause_longer_than_30_minutes_is_clamped_and_counted() -> None:
    state, clamped = apply_control(EmployeeControls(), _rec("pause_start", T0, pause_ends_at_us=T0 + 45 * MIN),
                                   now_us=T0)
    assert clamped
    assert state.pauses == (PauseWindow(T0, T0 + MAX_PAUSE_US),)


def test_pause_without_end_lasts_30_minutes_and_early_resume_shortens_it() -> None:
    state, clamped = apply_control(EmployeeControls(), _rec("pause_start", T0), now_us=T0)
    assert not clamped and state.pauses == (PauseWindow(T0, T0 + MAX_PAUSE_US),)
    state, _ = apply_control(state, _rec("pause_end", T0 + 5 * MIN), now_us=T0)
    assert state.pauses == (PauseWindow(T0, T0 + 5 * MIN),)


def test_exemption_grant_then_revoke_and_state_round_trips() -> None:
    state, _ = apply_control(EmployeeControls(), _rec("exemption_grant", T0, exemption_effective_at_us=T0 + MIN),
                             now_us=T0)
    assert state.exemptions == (Exemption(T0 + MIN, None),)
    state, _ = apply_control(state, _rec("exemption_revoke", T0 + 9 * MIN), now_us=T0)
    assert state.exemptions == (Exemption(T0 + MIN, T0 + 9 * MIN),)
    assert loads(dumps(state)) == state
    assert loads(None) == EmployeeControls()


def test_old_windows_are_pruned_but_recent_ones_kept() -> None:
    state, _ = apply_control(EmployeeControls(), _rec("pause_start", T0), now_us=T0)
    later = T0 + 9 * 24 * 3600 * 1_000_000
    state, _ = apply_control(state, _rec("pause_start", later), now_us=later)  # the stream's clock prunes
    assert state.pauses == (PauseWindow(later, later + MAX_PAUSE_US),)
