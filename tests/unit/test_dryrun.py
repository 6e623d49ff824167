"""The sampling dry run's estimate (control/api/dryrun.py): the maths on hand-made traffic, the
properties any estimate must have (hypothesis), and that its precedence rule is the stream
step's. ``traffic`` against the real engine is in tests/integration/test_dryrun_traffic.py."""

from __future__ import annotations

import math
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from handtrace.control.api.dryrun import Group, Traffic, change_ratio, dry_run, estimate
from handtrace.stream.steps.sample import _Rules, deciding_selector, rate_for

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TINY = 1.1125369292536007e-308  # hypothesis found it: a subnormal rate now overflowed the scaling (NaN)
HOUR_US = 3600 * 1_000_000
APPS = ("code", "mail", "term")
KINDS = ("key_down", "pointer_move", "focus_change")


def traffic(groups: list[Group], *, agents: int = 2, episodes: int = 10, demos: int = 1) -> Traffic:
    return Traffic(since_us=0, until_us=HOUR_US, episode_s=600, groups=tuple(groups), episodes=episodes,
                   agents=agents, demonstrations=demos, bytes_basis="test")


def test_a_group_scales_by_after_over_now() -> None:
    t = traffic([Group("code", "key_down", 3600, 360_000.0, 6), Group("mail", "pointer_move", 7200, 72_000.0, 3)])
    e = estimate(t, {"*": 0.5}, {"*": 0.5, "kind:pointer_move": 0.25})
    events = e.metric("events_per_s")
    assert events.now == pytest.approx(3.0)  # 10800 rows in an hour
    assert events.after == pytest.approx((3600 + 7200 * 0.5) / 3600)
    b = e.metric("bytes_per_hour_per_agent")
    assert b.now == pytest.approx(432_000 / 2)
    assert b.after == pytest.approx((360_000 + 36_000) / 2)
    assert e.metric("demonstrations_kept").now == e.metric("demonstrations_kept").after == 1.0
    by = {(g["app_id"], g["kind"]): g for g in e.groups}
    assert by[("mail", "pointer_move")]["selector_after"] == "kind:pointer_move"
    assert by[("code", "key_down")]["selector_after"] == "*"


def test_precedence_app_beats_kind_beats_star() -> None:
    t = traffic([Group("code", "pointer_move", 100, 1.0, 1), Group("mail", "pointer_move", 100, 1.0, 1)])
    e = estimate(t, {}, {"*": 0.1, "kind:pointer_move": 0.5, "app:code": 1.0})
    by = {g["app_id"]: g for g in e.groups}
    assert by["code"]["selector_after"] == "app:code" and by["code"]["rate_after"] == 1.0
    assert by["mail"]["selector_after"] == "kind:pointer_move" and by["mail"]["rate_after"] == 0.5


def test_current_rate_0_is_unknown_never_guessed() -> None:
    t = traffic([Group("code", "key_down", 100, 10.0, 2), Group("mail", "key_down", 50, 5.0, 1)])
    e = estimate(t, {"app:mail": 0.0}, {"app:mail": 1.0})
    assert [g["app_id"] for g in e.basis["unknown_groups"]] == ["mail"]
    assert e.metric("events_per_s").now == e.metric("events_per_s").after == pytest.approx(100 / 3600)
    assert e.basis["unseen_selectors"] == ["app:mail"]  # raised from 0: its rows were never stored


def test_cohort_selectors_are_ignored_and_listed() -> None:
    t = traffic([Group("code", "key_down", 100, 10.0, 2)])
    e = estimate(t, {"cohort:pilot": 0.5}, {"cohort:pilot": 0.1, "cohort:beta": 1.0})
    assert e.basis["ignored_selectors"] == ["cohort:beta", "cohort:pilot"]
    assert e.metric("events_per_s").after == e.metric("events_per_s").now


def test_share_of_episodes_kept_follows_the_highest_rate() -> None:
    # key_down is in every episode; pointer_move rarer. Lowering only pointer_move keeps every episode
    # (the nested rule: an episode survives through its highest-rate rows).
    t = traffic([Group(None, "key_down", 1000, 1.0, 6), Group(None, "pointer_move", 5000, 1.0, 3)])
    same = estimate(t, {}, {"kind:pointer_move": 0.1}).metric("episodes_kept")
    assert same.now == pytest.approx(1.0) and same.after == pytest.approx(1.0)
    half = estimate(t, {}, {"*": 0.5}).metric("episodes_kept")
    assert half.after == pytest.approx(0.5)


def test_empty_traffic_has_no_per_agent_or_episode_figures() -> None:
    e = estimate(traffic([], agents=0, episodes=0), {"*": 0.5}, {"*": 1.0})
    assert e.metric("events_per_s").now == 0.0
    assert e.metric("bytes_per_hour_per_agent").now is None
    assert e.metric("episodes_kept").now is None
    assert e.to_dict()["available"] is True


class FakeWarehouse:
    def __init__(self, t: Traffic | Exception) -> None:
        self.t = t
        self.calls: list[tuple[int, int]] = []

    def traffic(self, since_us: int, until_us: int) -> Traffic:
        self.calls.append((since_us, until_us))
        if isinstance(self.t, Exception):
            raise self.t
        return self.t


def test_dry_run_reads_the_window_and_says_why_when_unavailable() -> None:
    w = FakeWarehouse(traffic([Group("code", "key_down", 10, 1.0, 1)]))
    out = dry_run(w, {}, {"*": 0.5}, window_s=600, at_us=HOUR_US)
    assert w.calls == [(HOUR_US - 600_000_000, HOUR_US)]
    assert out["available"] is True and out["metrics"][0]["after"] == pytest.approx(5 / 3600)
    assert dry_run(None, {}, {}, window_s=600)["available"] is False
    down = dry_run(FakeWarehouse(RuntimeError("not being served: start the sink")), {}, {}, window_s=600)
    assert down == {"available": False, "why": "the warehouse could not be read: not being served: start the sink"}


def test_change_ratio() -> None:
    assert change_ratio(2.0, 3.0) == "x1.5"
    assert change_ratio(1.0, 1.0) == "unchanged"
    assert change_ratio(0.0, 2.0) == "+2"
    assert change_ratio(None, 1.0) == "-"


# ---------------------------------------------------------------- properties

selectors = st.sampled_from(["*", *(f"app:{a}" for a in APPS), *(f"kind:{k}" for k in KINDS), "cohort:pilot"])
rates = st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0]) | st.floats(0, 1)
policies = st.dictionaries(selectors, rates, max_size=6)
groups = st.lists(
    st.builds(Group, st.sampled_from([None, *APPS]), st.sampled_from(KINDS), st.integers(1, 10_000),
              st.floats(1, 1e7), st.integers(1, 500)),
    max_size=8, unique_by=lambda g: (g.app_id, g.kind))
traffics = st.builds(traffic, groups, agents=st.integers(0, 50), episodes=st.integers(0, 1000))


def values(e: Any) -> list[float | None]:
    return [v for m in e.metrics for v in (m.now, m.after)]


@FAST
@given(traffics, policies)
@example(traffic([Group(None, "key_down", 1, 1.0, 2)]), {"*": TINY})
def test_no_change_is_the_identity(t: Traffic, policy: dict[str, float]) -> None:
    e = estimate(t, policy, dict(policy))
    for m in e.metrics:
        assert m.now == m.after, m


@FAST
@given(traffics, policies, st.data())
def test_higher_rates_never_estimate_less(t: Traffic, current: dict[str, float], data: st.DataObject) -> None:
    low = {s: data.draw(st.floats(0, 1)) for s in current}
    high = {s: data.draw(st.floats(r, 1)) for s, r in low.items()}
    a, b = estimate(t, current, low), estimate(t, current, high)
    for ma, mb in zip(a.metrics, b.metrics, strict=True):
        if ma.after is not None:
            assert mb.after is not None and mb.after >= ma.after - 1e-9, (ma, mb)


@FAST
@given(traffics, policies)
def test_rate_0_everywhere_stores_nothing(t: Traffic, current: dict[str, float]) -> None:
    e = estimate(t, current, {"*": 0.0})
    assert e.metric("events_per_s").after == 0.0
    assert e.metric("bytes_per_hour_per_agent").after in (0.0, None)
    assert e.metric("episodes_kept").after in (0.0, None)
    assert e.metric("demonstrations_kept").after == 1.0  # never sampled


@FAST
@given(traffics)
def test_rate_1_from_rate_1_is_unchanged(t: Traffic) -> None:
    e = estimate(t, {"*": 1.0}, {"*": 1.0, "kind:key_down": 1.0})
    assert e.metric("events_per_s").after == pytest.approx(t.rows / t.window_s)
    for m in e.metrics:
        assert m.now == m.after


@FAST
@given(traffics, policies, policies)
@example(traffic([Group(None, "key_down", 1, 1.0, 2)]), {"*": TINY}, {"*": 0.0})
@example(traffic([Group(None, "key_down", 1, 1.0, 2)]), {"*": TINY}, {"*": 1.0})
def test_never_negative_or_nan(t: Traffic, current: dict[str, float], new: dict[str, float]) -> None:
    e = estimate(t, current, new)
    for v in values(e):
        assert v is None or (math.isfinite(v) and v >= 0.0)
    for m in e.metrics:
        if m.unit == "share" and m.now is not None:
            assert 0.0 <= m.now <= 1.0 and m.after is not None and 0.0 <= m.after <= 1.0


# ---------------------------------------------------------------- one precedence rule


@FAST
@given(policies, st.lists(st.tuples(st.sampled_from([None, *APPS]), st.sampled_from(KINDS),
                                    st.sampled_from([None, "pilot", "beta"])), min_size=1, max_size=20))
def test_the_steps_frame_rule_and_rate_for_agree(policy: dict[str, float],
                                                   rows: list[tuple[str | None, str, str | None]]) -> None:
    frame = pl.DataFrame(rows, schema={"app_id": pl.String, "kind": pl.String, "cohort": pl.String}, orient="row")
    decided = _Rules.of(policy, set(frame.columns)).decide_frame(frame)
    for (app, kind, cohort), (sel, rate) in zip(rows, decided.iter_rows(), strict=True):
        assert (sel, max(rate, 0.0)) == deciding_selector(policy, app, kind, cohort)
        assert rate_for(policy, app, kind, cohort) == max(rate, 0.0)
