"""SampleStep and PointerDecimateStep: rates, precedence, whole episodes, replay determinism,
keyed decisions, decimation bounds. Pure frames, no I/O."""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from fractions import Fraction
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.codec import _current_event_columns, parse_event_batch
from handtrace.stream.pipeline import _HEADER_COLUMNS, BatchPipeline, SourceMessage
from handtrace.stream.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.sample import (
    DECIMATED,
    INVALID_RATE,
    SAMPLED_OUT,
    PointerDecimateStep,
    SampleStep,
    sampling_problems,
)
from tests.factories import make_batch

KEY = b"sample-test-key-0123456789abcdef"
S = 1_000_000
EPISODE_S = 600
W0 = 2_916_666  # a 600 s window index in 2025: windows W0.. are epoch-aligned
SCHEMA = pl.Schema({**_current_event_columns(), **_HEADER_COLUMNS})
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def make_frame(rows: list[dict[str, Any]], *, cohort: bool = False) -> pl.DataFrame:
    """A frame with the pipeline's exact dtypes. Row keys: employee_id, device_id, ts_us, kind,
    and optionally app_id, batch_id, cohort; event ids are the row's position (unique)."""
    cols: dict[str, list[Any]] = {name: [None] * len(rows) for name in SCHEMA}
    for i, r in enumerate(rows):
        cols["event_id"][i] = r.get("event_id", i.to_bytes(16, "big"))
        cols["captured_at_us"][i] = r["ts_us"]
        cols["kind"][i] = r["kind"]
        cols["app_id"][i] = r.get("app_id")
        cols["employee_id"][i] = r["employee_id"]
        cols["device_id"][i] = r["device_id"]
        cols["batch_id"][i] = r.get("batch_id", f"{r['device_id']}-b0".encode())
        cols["button"][i], cols["screenshot_format"][i], cols["text_masked"][i] = "none", "none", False
        cols["agent_version"][i], cols["os"][i] = "test", "synthetic"
        cols["sent_at_us"][i], cols["source_partition"][i], cols["source_offset"][i] = r["ts_us"] + S, 0, 0
    frame = pl.DataFrame(
        {n: pl.Series(n, cols[n], dtype=pl.Int64 if n == "captured_at_us" else t) for n, t in SCHEMA.items()}
    ).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))
    assert frame.schema == SCHEMA
    if cohort:
        frame = frame.with_columns(pl.Series("cohort", [r.get("cohort") for r in rows], dtype=pl.String))
    return frame


def episodes_frame(n_emp: int = 100, n_dev: int = 2, n_win: int = 10, per: int = 3,
                   kinds: tuple[str, ...] = ("pointer_move", "click", "key_down")) -> pl.DataFrame:
    """n_emp * n_dev * n_win episodes of ``per`` rows each, spread over their window."""
    rows = []
    for e in range(n_emp):
        for d in range(n_dev):
            for w in range(n_win):
                for j in range(per):
                    ts = (W0 + w) * EPISODE_S * S + j * (EPISODE_S * S // per) + e
                    rows.append({"employee_id": f"emp-{e}", "device_id": f"dev-{e}-{d}", "ts_us": ts,
                                 "kind": kinds[j % len(kinds)]})
    return make_frame(rows)


def run(step: Any, frame: pl.DataFrame, sampling: dict[str, Any] | None = None) -> Any:
    return step(frame, BatchContext(received_at_us=0, policy=Policy(sampling=sampling or {})))


def episode_of(frame: pl.DataFrame) -> pl.Expr:
    return pl.struct("employee_id", "device_id", pl.col("captured_at_us").dt.epoch("us") // (EPISODE_S * S))


def kept_ids(frame: pl.DataFrame) -> set[bytes]:
    return set(frame.get_column("event_id").to_list())


def assert_rows_untouched(before: pl.DataFrame, after: pl.DataFrame) -> None:
    """Same columns and dtypes, and exactly the original rows for the ids kept, in order."""
    assert after.schema == before.schema
    assert after.equals(before.filter(pl.col("event_id").is_in(after.get_column("event_id").implode())))


# ---------------------------------------------------------------------------------- SampleStep

@FAST
@given(rate=st.floats(0.05, 0.95), key=st.binary(min_size=16, max_size=64))
def test_stored_fraction_matches_rate(rate: float, key: bytes) -> None:
    frame = episodes_frame()  # 2000 episodes
    res = run(SampleStep(key=key), frame, {"*": rate})
    eps = frame.select(episode_of(frame).n_unique()).item()
    kept_eps = res.frame.select(episode_of(res.frame).n_unique()).item() if res.frame.height else 0
    assert eps == 2000
    assert abs(kept_eps / eps - rate) < 0.05  # sd ~ 0.011: > 4 sd
    assert res.dropped.get(SAMPLED_OUT, 0) == frame.height - res.frame.height
    assert_rows_untouched(frame, res.frame)


def test_rate_zero_stores_nothing_and_one_everything() -> None:
    frame = episodes_frame(n_emp=20)
    none = run(SampleStep(key=KEY), frame, {"*": 0.0})
    assert none.frame.height == 0 and none.frame.schema == frame.schema
    assert none.dropped == {SAMPLED_OUT: frame.height}
    for sampling in ({"*": 1.0}, {}, {"kind:pointer_move": 1}, {"app:nothing-matches": 0.0}):
        everything = run(SampleStep(key=KEY), frame, sampling)
        assert everything.frame.equals(frame) and everything.dropped == {}


@FAST
@given(rate=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_episodes_are_kept_whole(rate: float, seed: int) -> None:
    frame = episodes_frame(n_emp=30, per=5).sample(fraction=1.0, shuffle=True, seed=seed)
    res = run(SampleStep(key=KEY), frame, {"*": rate})
    kept = kept_ids(res.frame)
    per_episode = (
        frame.with_columns(pl.col("event_id").is_in(list(kept)).alias("kept"), episode_of(frame).alias("ep"))
        .group_by("ep").agg(pl.col("kept").all().alias("all"), pl.col("kept").any().alias("any"))
    )
    assert per_episode.filter(pl.col("all") != pl.col("any")).height == 0


def test_mixed_rates_in_an_episode_are_nested() -> None:
    """Kept iff u(episode) < rate(row): a kept row's rate is above every dropped row's rate."""
    sampling = {"kind:pointer_move": 0.3, "kind:click": 0.6, "*": 0.8}
    frame = episodes_frame(n_emp=100, per=6, kinds=("pointer_move", "click", "key_down"))
    res = run(SampleStep(key=KEY), frame, sampling)
    kept = kept_ids(res.frame)
    rate = pl.col("kind").replace_strict({"pointer_move": 0.3, "click": 0.6}, default=0.8)
    per_episode = (
        frame.with_columns(pl.col("event_id").is_in(list(kept)).alias("kept"), rate.alias("rate"),
                           episode_of(frame).alias("ep"))
        .group_by("ep").agg(pl.col("rate").filter("kept").min().alias("kept_min"),
                            pl.col("rate").filter(~pl.col("kept")).max().alias("dropped_max"))
    )
    assert per_episode.filter(pl.col("kept_min") <= pl.col("dropped_max")).height == 0
    # pointer trajectories of 30% of episodes, clicks of 60%, keys of 80% (2000 episodes each)
    n_eps = 2000
    for kind, r in (("pointer_move", 0.3), ("click", 0.6), ("key_down", 0.8)):
        got = res.frame.filter(pl.col("kind") == kind).select(episode_of(res.frame).n_unique()).item()
        assert abs(got / n_eps - r) < 0.05


# Each row its own episode (different employees), so only its own rate decides.
PRECEDENCE_FRAME = make_frame([
    {"employee_id": "a", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "focus_change", "app_id": "slack",
     "cohort": "eng"},
    {"employee_id": "b", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "focus_change", "app_id": "code",
     "cohort": "eng"},
    {"employee_id": "c", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "pointer_move", "cohort": "eng"},
    {"employee_id": "e", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "key_down", "cohort": "eng"},
    {"employee_id": "f", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "key_down", "cohort": "ops"},
    {"employee_id": "g", "device_id": "d", "ts_us": W0 * EPISODE_S * S, "kind": "key_down"},
], cohort=True)
PRECEDENCE_SAMPLING = {"*": 0.0, "cohort:eng": 1.0, "kind:focus_change": 1.0, "kind:pointer_move": 0.0,
                       "app:slack": 0.0}


def test_precedence_app_over_kind_over_cohort_over_default() -> None:
    frame, sampling = PRECEDENCE_FRAME, PRECEDENCE_SAMPLING
    res = run(SampleStep(key=KEY), frame, sampling)
    # a: app:slack 0 beats kind:focus_change 1; b: kind:focus_change 1 (app:code unset);
    # c: kind:pointer_move 0 beats cohort:eng 1; e: cohort:eng 1 beats *; f, g: * = 0
    assert res.frame.get_column("employee_id").to_list() == ["b", "e"]
    assert res.dropped == {SAMPLED_OUT: 4}
    assert_rows_untouched(frame, res.frame)
    # Without a cohort column, cohort selectors are ignored: e falls back to `*`.
    res = run(SampleStep(key=KEY), frame.drop("cohort"), sampling)
    assert res.frame.get_column("employee_id").to_list() == ["b"]
    # No matching selector at all: rate 1.
    res = run(SampleStep(key=KEY), frame, {"app:slack": 0.0})
    assert res.frame.get_column("employee_id").to_list() == ["b", "c", "e", "f", "g"]


def test_each_row_is_counted_once_under_the_selector_that_decided_it() -> None:
    frame, sampling = PRECEDENCE_FRAME, PRECEDENCE_SAMPLING
    res = run(SampleStep(key=KEY), frame, sampling)
    assert res.sampling == {("app:slack", "dropped"): 1, ("kind:focus_change", "kept"): 1,
                            ("kind:pointer_move", "dropped"): 1, ("cohort:eng", "kept"): 1, ("*", "dropped"): 2}
    # All rates 1: still counted (an effective rate of 1 is a rate too); rows no selector
    # decides are not counted.
    res = run(SampleStep(key=KEY), frame, {"kind:key_down": 1.0})
    assert res.sampling == {("kind:key_down", "kept"): 3}


@FAST
@given(rate=st.floats(0.05, 0.95), seed=st.integers(0, 2**32))
def test_selector_counts_add_up_to_the_rows_kept_and_dropped(rate: float, seed: int) -> None:
    frame = episodes_frame(n_emp=30, n_win=4)
    res = SampleStep(key=seed.to_bytes(8, "big") * 2, episode_s=EPISODE_S)(
        frame, BatchContext(received_at_us=0, policy=Policy(sampling={"*": rate, "kind:click": 1.0})))
    kept = sum(n for (_, o), n in res.sampling.items() if o == "kept")
    dropped = sum(n for (_, o), n in res.sampling.items() if o == "dropped")
    assert kept == res.frame.height and dropped == frame.height - res.frame.height
    clicks = frame.filter(pl.col("kind") == "click").height
    assert res.sampling[("kind:click", "kept")] == clicks and ("kind:click", "dropped") not in res.sampling


@FAST
@given(seed=st.integers(0, 2**32), n_parts=st.integers(1, 8), rate=st.floats(0.1, 0.9))
def test_replay_decides_identically_across_splits_and_orders(seed: int, n_parts: int, rate: float) -> None:
    frame = episodes_frame(n_emp=30, n_win=4, per=4)
    sampling = {"*": rate, "kind:click": rate / 2}
    whole = run(SampleStep(key=KEY), frame, sampling)
    rng = random.Random(seed)
    idx = list(range(frame.height))
    rng.shuffle(idx)
    cuts = sorted(rng.sample(range(1, frame.height), n_parts - 1))
    kept: set[bytes] = set()
    dropped: Counter[str] = Counter()
    for lo, hi in zip([0, *cuts], [*cuts, frame.height], strict=True):
        part = run(SampleStep(key=KEY), frame[idx[lo:hi]], sampling)
        kept |= kept_ids(part.frame)
        dropped.update(part.dropped)
    assert kept == kept_ids(whole.frame)
    assert dropped == Counter(whole.dropped)


def test_different_keys_give_different_decisions() -> None:
    frame = episodes_frame(per=1)  # 2000 episodes of one row
    a = kept_ids(run(SampleStep(key=KEY), frame, {"*": 0.5}).frame)
    b = kept_ids(run(SampleStep(key=b"another-key-0123456789"), frame, {"*": 0.5}).frame)
    a_again = kept_ids(run(SampleStep(key=KEY), frame, {"*": 0.5}).frame)
    assert a == a_again
    differ = len(a ^ b) / frame.height  # independent draws: ~50% differ
    assert 0.4 < differ < 0.6


def test_episode_windows_are_epoch_aligned() -> None:
    """Rows either side of a window boundary are different episodes; episode_s sets the width."""
    step = SampleStep(key=KEY, episode_s=60)
    w = W0 * 10  # a 60 s window index
    assert step.episode_draw("e", "d", w) != step.episode_draw("e", "d", w + 1)
    rows = [{"employee_id": "e", "device_id": "d", "ts_us": (w * 60 + s) * S, "kind": "click"}
            for s in range(0, 600, 7)]
    frame = make_frame(rows)
    res = run(step, frame, {"*": 0.5})
    for minute, group in frame.with_columns(pl.col("event_id").is_in(list(kept_ids(res.frame))).alias("k")).group_by(
        pl.col("captured_at_us").dt.epoch("us") // (60 * S)
    ):
        expected = step.episode_draw("e", "d", minute[0]) < 0.5
        assert group.get_column("k").to_list() == [expected] * group.height


def test_invalid_rates_fail_closed_and_are_reported() -> None:
    frame = episodes_frame(n_emp=10, per=3, kinds=("pointer_move", "click", "key_down"))
    for bad in (float("nan"), -0.1, 1.5, "0.5", None, True):
        res = run(SampleStep(key=KEY), frame, {"kind:click": bad, "*": 1.0})
        assert res.frame.filter(pl.col("kind") == "click").height == 0
        assert res.frame.height == frame.height - frame.filter(pl.col("kind") == "click").height
        assert res.dropped == {INVALID_RATE: frame.filter(pl.col("kind") == "click").height}
    assert sampling_problems({"*": 0.5, "kind:click": 1.5, "host:x": 0.1, "app:": 0.2}) == [
        "invalid rate 1.5 for 'kind:click' (treated as 0)",
        "unknown selector 'host:x' (ignored)",
        "unknown selector 'app:' (ignored)",
    ]
    assert sampling_problems({"*": 0, "app:slack": 1, "cohort:eng": 0.25}) == []


def test_config_is_validated() -> None:
    with pytest.raises(ValueError):
        SampleStep(key=b"short")
    with pytest.raises(ValueError):
        SampleStep(key="a-str-key-that-is-long-enough")  # type: ignore[arg-type]
    for bad in (0, -600, 1.5, True):
        with pytest.raises(ValueError):
            SampleStep(key=KEY, episode_s=bad)  # type: ignore[arg-type]
    assert "key" not in repr(SampleStep(key=KEY)).replace("episode", "")


def test_after_pseudonymisation_uses_keys_and_null_times_fail_closed() -> None:
    frame = episodes_frame(n_emp=20)
    pseudo = PseudonymiseStep(key=b"p" * 32)(frame, BatchContext(0)).frame
    res = run(SampleStep(key=KEY), pseudo, {"*": 0.5})
    assert 0 < res.frame.height < pseudo.height
    assert res.frame.schema == pseudo.schema
    nulls = frame.head(4).with_columns(pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("captured_at_us"))
    assert run(SampleStep(key=KEY), nulls, {"*": 0.5}).dropped == {SAMPLED_OUT: 4}
    assert run(SampleStep(key=KEY), nulls, {"*": 1.0}).frame.height == 4


def test_works_on_a_decoded_pipeline_frame() -> None:
    parsed = []
    for i in range(20):
        payload, _ = make_batch(f"emp-{i}", 70, seed=i, t0_us=(W0 + i % 3) * EPISODE_S * S + 1000)
        parsed.append((SourceMessage(payload, 0, i), parse_event_batch(payload)))
    frame = BatchPipeline([])._frame(parsed)
    res = run(SampleStep(key=KEY), frame, {"*": 0.5})
    assert_rows_untouched(frame, res.frame)
    assert res.frame.height % 70 == 0  # each batch lies inside one episode: all or nothing
    dec = run(PointerDecimateStep(max_hz=30), frame)
    assert_rows_untouched(frame, dec.frame)



def test_cohort_selectors_apply_to_the_batch_header_cohort() -> None:
    """The agent's cohort (EventBatch v2 header) reaches every row, so ops can sample a canary
    cohort differently; v1 batches (older agents) are cohort `default`."""
    parsed = []
    for i in range(12):
        cohort = "canary" if i % 3 == 0 else "default"
        payload, _ = make_batch(f"emp-{i}", 20, seed=i, t0_us=W0 * EPISODE_S * S + 1000, cohort=cohort,
                                version=1 if i == 11 else None)
        parsed.append((SourceMessage(payload, 0, i), parse_event_batch(payload)))
    frame = BatchPipeline([])._frame(parsed)
    assert frame.get_column("cohort").value_counts(sort=True).rows() == [("default", 160), ("canary", 80)]
    res = run(SampleStep(key=KEY), frame, {"cohort:canary": 0.0, "*": 1.0})
    assert res.frame.height == 160 and set(res.frame.get_column("cohort")) == {"default"}
    assert res.dropped == {SAMPLED_OUT: 80}

# ------------------------------------------------------------------------- PointerDecimateStep

def moves_frame(times: dict[str, list[int]], *, batch_us: int | None = None) -> pl.DataFrame:
    """Pointer moves per device at the given offsets (us) plus a click and a key after each
    third move; ``batch_us``: a new batch every that many microseconds (else one per device)."""
    t0 = W0 * EPISODE_S * S
    rows = []
    for dev, offsets in times.items():
        for j, off in enumerate(sorted(offsets)):
            b = f"{dev}-b{off // batch_us if batch_us else 0}".encode()
            base = {"employee_id": "emp", "device_id": dev, "batch_id": b}
            rows.append({**base, "ts_us": t0 + off, "kind": "pointer_move"})
            if j % 3 == 0:
                rows.append({**base, "ts_us": t0 + off, "kind": "click"})
                rows.append({**base, "ts_us": t0 + off + 1, "kind": "key_down"})
    return make_frame(rows)


offsets = st.lists(st.integers(0, 3 * S), min_size=1, max_size=400)


@FAST
@given(times=st.dictionaries(st.sampled_from(["d1", "d2", "d3"]), offsets, min_size=1),
       max_hz=st.sampled_from([1, 10, 30, 60, 120]))
def test_decimation_bounds_rate_and_leaves_other_kinds(times: dict[str, list[int]], max_hz: int) -> None:
    frame = moves_frame(times)
    res = run(PointerDecimateStep(max_hz=max_hz), frame)
    assert_rows_untouched(frame, res.frame)
    others = pl.col("kind") != "pointer_move"
    assert res.frame.filter(others).equals(frame.filter(others))
    t = pl.col("captured_at_us").dt.epoch("us")
    moves = res.frame.filter(~others)
    per_second = moves.group_by("device_id", t // S).len().get_column("len")
    assert per_second.max() <= max_hz  # type: ignore[operator]
    # exactly one (the earliest) move kept per occupied bin
    all_moves = frame.filter(~others).with_columns((t * max_hz // S).alias("bin"))
    first = all_moves.sort("captured_at_us", "event_id").group_by("device_id", "bin", maintain_order=True).first()
    assert kept_ids(moves) == kept_ids(first)
    assert res.dropped.get(DECIMATED, 0) == all_moves.height - first.height


@FAST
@given(times=st.dictionaries(st.sampled_from(["d1", "d2"]), offsets, min_size=1),
       seed=st.integers(0, 2**32), n_parts=st.integers(1, 6))
def test_decimation_is_independent_of_frame_grouping(times: dict[str, list[int]], seed: int, n_parts: int) -> None:
    frame = moves_frame(times, batch_us=S + 10_007)  # batch boundaries fall inside bins
    step = PointerDecimateStep(max_hz=30)
    whole = run(step, frame)
    batches = frame.partition_by("batch_id")
    rng = random.Random(seed)
    rng.shuffle(batches)
    kept: set[bytes] = set()
    for i in range(n_parts):
        group = batches[i::n_parts]
        if group:
            part = pl.concat(group).sample(fraction=1.0, shuffle=True, seed=seed)
            kept |= kept_ids(run(step, part).frame)
    assert kept == kept_ids(whole.frame)


def test_decimation_per_device_and_batch_boundaries() -> None:
    t = [i * 1000 for i in range(2000)]  # 1 kHz for 2 s
    frame = moves_frame({"d1": t, "d2": t})
    res = run(PointerDecimateStep(max_hz=30), frame)
    counts = res.frame.filter(pl.col("kind") == "pointer_move").group_by("device_id").len()
    assert sorted(counts.get_column("len").to_list()) == [60, 60]
    # Bins are per batch: the bin straddling the boundary (1.010007 s) keeps one move from each
    # batch, whether the two batches arrive in one frame or in two -- the documented +1.
    split = moves_frame({"d1": t}, batch_us=S + 10_007)
    step = PointerDecimateStep(max_hz=30)
    together = kept_ids(run(step, split).frame.filter(pl.col("kind") == "pointer_move"))
    apart = set().union(*(kept_ids(run(step, b).frame.filter(pl.col("kind") == "pointer_move"))
                          for b in split.partition_by("batch_id")))
    assert len(together) == 61 and together == apart


def test_non_integer_rates_and_exact_bins() -> None:
    frame = moves_frame({"d": [i * 100_000 for i in range(100)]})  # 10 Hz for 10 s, start epoch-aligned
    res = run(PointerDecimateStep(max_hz=0.5), frame)
    assert res.frame.filter(pl.col("kind") == "pointer_move").height == 5  # one per 2 s
    assert run(PointerDecimateStep(max_hz=2.5), frame).frame.filter(pl.col("kind") == "pointer_move").height == 25


@settings(max_examples=200, deadline=None)
@given(ts=st.integers(0, 4_102_444_800 * S), hz=st.floats(0.001, 10_000))
def test_bin_expr_is_exact_integer_arithmetic(ts: int, hz: float) -> None:
    step = PointerDecimateStep(max_hz=hz)
    got = pl.select(pl.lit(ts).cast(pl.Datetime("us", "UTC")).alias("captured_at_us")).select(step.bin_expr()).item()
    written = Fraction(repr(hz))  # the decimal an operator wrote, not the binary float
    f = written.limit_denominator(1000)
    if f > written:
        f = Fraction(math.floor(written * 1000), 1000)
    assert 0 < f <= written and written - f < Fraction(1, 1000)
    assert got == math.floor(Fraction(ts) * f / S)


def test_decimate_config_is_validated() -> None:
    for bad in (0, -1, float("nan"), float("inf"), 1e9, True, "30"):
        with pytest.raises(ValueError):
            PointerDecimateStep(max_hz=bad)  # type: ignore[arg-type]
    empty = make_frame([])
    assert run(PointerDecimateStep(), empty).frame.equals(empty)
    assert run(SampleStep(key=KEY), empty, {"*": 0.5}).frame.equals(empty)


def test_no_python_loop_per_event() -> None:
    """Draws are computed per distinct episode, not per row."""
    calls: defaultdict[str, int] = defaultdict(int)

    class Counting(SampleStep):
        def episode_draw(self, employee: str, device: str, window: int) -> float:
            calls["n"] += 1
            return super().episode_draw(employee, device, window)

    frame = episodes_frame(n_emp=10, per=50)
    run(Counting(key=KEY), frame, {"*": 0.5})
    assert calls["n"] == 10 * 2 * 10
