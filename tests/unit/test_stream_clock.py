"""Time on the stream's terms (issue #10, classes 2 and 6 and the widening-policy rule):

- capture times are judged against the stream's own clock, so a batch cannot reach months back
  (or ahead) whatever its agent claims as its send time;
- a sender whose clock is further from the broker's than the bound is dead-lettered, a garbage
  send stamp too;
- a pause or exemption holds across a person's devices whatever their clocks say (up to the
  bound): a row is judged on its own clock and on the broker's;
- a policy that widens admits nothing captured before it was published; one that narrows
  applies at once.
"""

from __future__ import annotations

import random

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.core import codec, ids
from handtrace.core.clock import HEADER_SENT_AT
from handtrace.stream.pipeline import BatchPipeline, SourceMessage
from handtrace.stream.policy import EmployeeControls, Exemption, PauseWindow, Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.allowlist import AllowlistStep
from handtrace.stream.steps.exemption import ExemptionStep
from handtrace.stream.steps.pause import PauseStep
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.sample import SampleStep
from handtrace.stream.steps.validate import ValidateStep
from tests.factories import make_event

NOW = 1_800_000_000_000_000  # the stream's clock in these tests (2027)
S = 1_000_000
MIN = 60 * S
DAY = 86_400 * S


def batch(employee: str, times: list[int], *, sent_at: int, device: str | None = None,
          app: str = "firefox") -> bytes:
    rng = random.Random(len(times))
    events = []
    for t in times:
        e = make_event("click", t, rng)
        e["app_id"] = app
        events.append(e)
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": device or f"dev-{employee}",
              "agent_version": "test", "os": "linux", "cohort": "default", "seq": 1, "sent_at_us": sent_at}
    return codec.encode_event_batch(header, events)


def msg(payload: bytes, employee: str, *, appended: int | None, sent_header: int | bytes | None = None,
        offset: int = 0) -> SourceMessage:
    headers: tuple[tuple[str, bytes], ...] = ()
    if sent_header is not None:
        raw = sent_header if isinstance(sent_header, bytes) else str(sent_header).encode()
        headers = ((HEADER_SENT_AT, raw),)
    return SourceMessage(payload, 0, offset, employee.encode(), appended, headers)


POLICY = Policy(version=1, allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",))


def pipeline(*steps: object, max_offset_s: int = 3600) -> BatchPipeline:
    return BatchPipeline([ValidateStep(max_event_age_s=7 * 86_400), *steps, PseudonymiseStep(b"k" * 32)],  # type: ignore[list-item]
                         max_clock_offset_us=max_offset_s * S)


def stored_times(out: object) -> list[int]:
    rows = out.rows  # type: ignore[attr-defined]
    return sorted(t for tab in rows.values() for t in pl.from_arrow(tab).get_column("captured_at")
                  .dt.epoch("us").to_list())


# ------------------------------------------------------------------ capture times vs the stream


def test_a_batch_cannot_reach_months_back_with_a_send_time_to_match() -> None:
    # The agent claims it sent the batch three years ago, in step with its events: plausible
    # against its own send time, not against the stream's clock.
    old = NOW - 3 * 365 * DAY
    times = [old + i * 30 * DAY for i in range(36)]  # one event a month for three years
    p = batch("ana", times, sent_at=times[-1] + S)
    out = pipeline().process_many([msg(p, "ana", appended=None)], NOW, policy=POLICY)
    assert out.stored == 0
    assert out.dropped["invalid_time"] == 36


def test_recent_events_are_kept_and_old_or_future_ones_dropped_on_the_stream_clock() -> None:
    times = [NOW - 8 * DAY, NOW - 6 * DAY, NOW - MIN, NOW + 10 * MIN]
    p = batch("ana", times, sent_at=NOW + 10 * MIN)  # the agent's send stamp covers its future event
    out = pipeline().process_many([msg(p, "ana", appended=None)], NOW, policy=POLICY)
    assert stored_times(out) == [NOW - 6 * DAY, NOW - MIN]
    assert out.dropped["invalid_time"] == 2


def test_a_skewed_clock_is_placed_on_the_broker_clock_before_the_age_check() -> None:
    # A laptop whose clock runs 20 minutes fast: its events look 'future' on their own clock but
    # its send stamp says how far off it is, so they are judged where they really are.
    skew = 20 * MIN
    times = [NOW - MIN + skew, NOW - 30 * S + skew]
    p = batch("ana", times, sent_at=NOW + skew)
    out = pipeline().process_many([msg(p, "ana", appended=NOW, sent_header=NOW + skew)], NOW, policy=POLICY)
    assert stored_times(out) == times


def test_a_sender_clock_beyond_the_bound_or_a_garbage_stamp_is_dead_lettered() -> None:
    p = batch("ana", [NOW - MIN], sent_at=NOW)
    pipe = pipeline(max_offset_s=3600)
    far = pipe.process_many([msg(p, "ana", appended=NOW, sent_header=NOW - 2 * 3600 * S)], NOW, policy=POLICY)
    junk = pipe.process_many([msg(p, "ana", appended=NOW, sent_header=b"soon")], NOW, policy=POLICY)
    behind = batch("ana", [NOW - 3000 * S - MIN], sent_at=NOW - 3000 * S)  # 50 minutes behind: within
    ok = pipe.process_many([msg(behind, "ana", appended=NOW, sent_header=NOW - 3000 * S)], NOW, policy=POLICY)
    assert [d.reason for d in far.deadletters] == ["clock_offset"] and far.stored == 0
    assert [d.reason for d in junk.deadletters] == ["clock_offset"] and junk.stored == 0
    assert ok.stored == 1 and not ok.deadletters


# ------------------------------------------------------------------ pauses across devices


offsets = st.integers(-3600 * S, 3600 * S)


@settings(max_examples=120, deadline=None)
@given(pause_dev_skew=offsets, event_dev_skew=offsets, start=st.integers(0, 60 * MIN),
       length=st.integers(S, 30 * MIN), rel=st.lists(st.integers(-10 * MIN, 40 * MIN), min_size=1, max_size=40),
       margin_s=st.floats(0, 5))
def test_a_pause_on_one_device_covers_another_whatever_their_clocks(pause_dev_skew, event_dev_skew, start,  # type: ignore[no-untyped-def]
                                                                    length, rel, margin_s) -> None:
    """True times: the pause covers [T, T+length); device A (skew a) stamped it, device B (skew b)
    captured events at true times T+r. Every event whose true time is inside the window is
    dropped. Offsets are exact here (zero produce latency); the margin covers real latency."""
    t_start = NOW - 2 * 3600 * S + start
    window = PauseWindow(t_start + pause_dev_skew, t_start + length + pause_dev_skew, offset_us=-pause_dev_skew)
    true_times = [t_start + r for r in rel]
    rows = pl.DataFrame({
        "employee_id": ["ana"] * len(rel),
        "captured_at_us": [t + event_dev_skew for t in true_times],
        "clock_offset_us": [-event_dev_skew] * len(rel),
        "n": list(range(len(rel))),
    }).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))
    ctx = BatchContext(NOW, controls={"ana": EmployeeControls(pauses=(window,))})
    kept = set(PauseStep(skew_margin_s=margin_s)(rows, ctx).frame.get_column("n").to_list())
    for i, t in enumerate(true_times):
        if t_start <= t < t_start + length:
            assert i not in kept, f"event at true time +{(t - t_start) / S:.1f}s inside the pause was kept"


@settings(max_examples=80, deadline=None)
@given(skew=offsets, rel=st.lists(st.integers(-10 * MIN, 10 * MIN), min_size=1, max_size=40))
def test_an_exemption_covers_every_device_whatever_its_clock(skew, rel) -> None:  # type: ignore[no-untyped-def]
    granted = NOW - 3600 * S  # control plane clock == broker clock (offset 0)
    true_times = [granted + r for r in rel]
    rows = pl.DataFrame({
        "employee_id": ["ana"] * len(rel),
        "captured_at_us": [t + skew for t in true_times],
        "clock_offset_us": [-skew] * len(rel),
        "n": list(range(len(rel))),
    }).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))
    ctx = BatchContext(NOW, controls={"ana": EmployeeControls(exemptions=(Exemption(granted),))})
    kept = set(ExemptionStep(skew_margin_s=0)(rows, ctx).frame.get_column("n").to_list())
    assert kept.isdisjoint({i for i, t in enumerate(true_times) if t >= granted})


def test_same_device_pause_is_still_judged_on_its_own_clock() -> None:
    # One device stamps both: a pause with an unknown offset (0) and rows with a large one still
    # drop by the device's own clock.
    window = PauseWindow(NOW - 10 * MIN, NOW - 5 * MIN)
    rows = pl.DataFrame({"employee_id": ["ana"], "captured_at_us": [NOW - 7 * MIN],
                         "clock_offset_us": [3000 * S], "n": [0]}).with_columns(
        pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))
    ctx = BatchContext(NOW, controls={"ana": EmployeeControls(pauses=(window,))})
    assert PauseStep(skew_margin_s=0)(rows, ctx).frame.height == 0


def test_a_skewed_device_of_a_paused_person_is_dropped_through_the_pipeline() -> None:
    # Device A paused 10:00-10:20 (true); device B's clock is 45 minutes slow, so its events
    # of 10:05-10:15 carry 09:20-09:30 -- outside the window on B's clock.
    t0 = NOW - 3600 * S
    pause = PauseWindow(t0, t0 + 20 * MIN)  # A's clock is right (offset 0)
    slow = -45 * MIN
    times = [t0 + 5 * MIN + slow + i * MIN for i in range(11)]
    p = batch("ana", times, sent_at=NOW + slow, device="laptop-b")
    controls = {"ana": EmployeeControls(pauses=(pause,))}
    pipe = pipeline(PauseStep(skew_margin_s=2))
    out = pipe.process_many([msg(p, "ana", appended=NOW, sent_header=NOW + slow)], NOW, policy=POLICY,
                            controls=controls)
    assert out.stored == 0 and out.dropped["paused"] == 11
    # Without the send stamp the stream can't place B's clock: the rows are judged on B's own
    # clock only (older agents) -- which is why agents stamp every message.
    old_agent = pipe.process_many([msg(p, "ana", appended=None)], NOW, policy=POLICY, controls=controls)
    assert old_agent.stored == 11


# ------------------------------------------------------------------ widening and narrowing


NARROW = Policy(version=1, allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",))
WIDE = Policy(version=2, allowed_apps=frozenset({"firefox", "slack"}), allowed_domains=("google.com",))


def test_a_widening_policy_admits_nothing_captured_before_it_was_published() -> None:
    published = NOW - 10 * MIN
    before = [published - 2 * MIN, published - MIN]
    after = [published + MIN, published + 2 * MIN]
    p = batch("ana", before + after, sent_at=NOW, app="slack")
    pipe = pipeline(AllowlistStep())
    history = ((NOW - DAY, NARROW), (published, WIDE))
    out = pipe.process_many([msg(p, "ana", appended=NOW, sent_header=NOW)], NOW, policy=WIDE,
                            policy_history=history)
    assert stored_times(out) == after
    assert out.dropped["not_allowlisted_app"] == 2


def test_a_narrowing_policy_applies_at_once_to_backlog() -> None:
    published = NOW - 10 * MIN
    times = [published - 2 * MIN, published + MIN]
    p = batch("ana", times, sent_at=NOW, app="slack")
    history = ((NOW - DAY, WIDE), (published, NARROW))
    out = pipeline(AllowlistStep()).process_many([msg(p, "ana", appended=NOW, sent_header=NOW)], NOW,
                                                 policy=NARROW, policy_history=history)
    assert out.stored == 0 and out.dropped["not_allowlisted_app"] == 2


def test_a_raised_sampling_rate_does_not_resample_backlog() -> None:
    published = NOW - 10 * MIN
    times = [published - 9 * MIN + i * S for i in range(120)]  # all before the rise
    p = batch("ana", times, sent_at=NOW)
    low = Policy(version=1, allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",),
                 sampling={"*": 0.0})
    high = Policy(version=2, allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",),
                  sampling={"*": 1.0})
    pipe = pipeline(AllowlistStep(), SampleStep(key=b"s" * 32, episode_s=60))
    out = pipe.process_many([msg(p, "ana", appended=NOW, sent_header=NOW)], NOW, policy=high,
                            policy_history=((NOW - DAY, low), (published, high)))
    assert out.stored == 0 and out.dropped["sampled_out"] == 120
    now_rows = batch("ana", [published + i * S for i in range(5)], sent_at=NOW)
    later = pipe.process_many([msg(now_rows, "ana", appended=NOW, sent_header=NOW)], NOW, policy=high,
                              policy_history=((NOW - DAY, low), (published, high)))
    assert later.stored == 5


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(-60, 60), st.sampled_from(["firefox", "slack", "code"])), min_size=1,
                max_size=60),
       st.lists(st.frozensets(st.sampled_from(["firefox", "slack", "code"])), min_size=1, max_size=4))
def test_a_row_is_kept_iff_the_policy_at_its_capture_and_the_current_one_allow_it(rows, app_sets) -> None:  # type: ignore[no-untyped-def]
    # Policies published every 15 minutes; rows captured around them (minutes relative to NOW-1h).
    base = NOW - 3600 * S
    history = tuple((base + i * 15 * MIN, Policy(version=i + 1, allowed_apps=apps, allowed_domains=("google.com",)))
                    for i, apps in enumerate(app_sets))
    payloads = []
    for j, (minute, app) in enumerate(rows):
        payloads.append(msg(batch("ana", [base + minute * MIN + j], sent_at=NOW, app=app), "ana",
                            appended=NOW, sent_header=NOW, offset=j))
    out = pipeline(AllowlistStep()).process_many(payloads, NOW, policy=history[-1][1], policy_history=history)

    def in_force(t: int) -> Policy:
        earlier = [p for at, p in history if at <= t]
        return earlier[-1] if earlier else history[0][1]

    expected = sorted(base + minute * MIN + j for j, (minute, app) in enumerate(rows)
                      if app in in_force(base + minute * MIN + j).allowed_apps and app in history[-1][1].allowed_apps)
    assert stored_times(out) == expected


def test_a_batch_sealed_in_the_future_is_dead_lettered_even_without_a_send_stamp() -> None:
    # An agent claiming 2041 whose events span 2020-2041: one of them may look recent on the
    # stream's clock, but a batch sealed a decade ahead has no clock worth placing anything by.
    t2041 = 2_250_000_000 * S
    times = [NOW - 2 * DAY + i * 30 * DAY for i in range(3)]  # one recent event, two 'future'
    p = batch("ana", times, sent_at=t2041)
    out = pipeline().process_many([msg(p, "ana", appended=NOW)], NOW, policy=POLICY)
    assert [d.reason for d in out.deadletters] == ["clock_offset"] and out.stored == 0
    out = pipeline().process_many([msg(p, "ana", appended=None)], NOW, policy=POLICY)
    assert [d.reason for d in out.deadletters] == ["clock_offset"] and out.stored == 0
