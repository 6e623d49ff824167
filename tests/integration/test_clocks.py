"""Clocks through the real broker and the real Faust worker (issue #10, class 6 and the
widening-policy rule; docs/adr/0010-clocks.md):

- a pause taken on one laptop whose clock runs 40 minutes fast covers the person's other laptop
  whose clock runs 30 minutes slow: on their own clocks the two never overlap, on the broker's
  clock (each message's send stamp against the broker's append time) they do;
- a policy that newly allows an app admits none of that app's events captured before it was
  published, however late they arrive, and all captured after.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from handtrace.control.publish import pause_record
from handtrace.core import clickhouse, codec, ids
from handtrace.core.admin import group_lag
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.partitioning import partition_for_key
from handtrace.stream.steps.pseudonymise import pseudonym
from tests.factories import TEST_POLICY, make_event
from tests.integration.conftest import enroll_device, producer, publish_policy, stream_metric, topics_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

S = 1_000_000
MIN = 60 * S




def _batch(employee: str, device: str, times: list[int], sent_at: int, app: str = "firefox",
           seed: int = 0) -> bytes:
    rng = random.Random(seed)
    events = []
    for t in times:
        e = make_event("click", t, rng)
        e["app_id"] = app
        events.append(e)
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": device,
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": sent_at}
    return codec.encode_event_batch(header, events)


def _stored(s: Any, employee: str) -> list[int]:
    key = s.stream.pseudonym_key.get_secret_value().encode()
    c = clickhouse.connect(s.clickhouse_dsn())
    rows = c.query(f"SELECT toUnixTimestamp64Micro(captured_at) FROM {s.clickhouse.database}.events "
                   "WHERE employee_key = %(k)s", parameters={"k": pseudonym(key, "employee", employee)}).result_rows
    return sorted(r[0] for r in rows)


def test_a_pause_on_a_fast_laptop_covers_a_slow_laptop_of_the_same_person(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, sink_factory
) -> None:
    s = settings_factory()
    t = topics_of(s)
    fast, slow = 40 * MIN, -30 * MIN  # laptop A's and laptop B's clock errors
    laptop_a = enroll_device(s, "emp-c", "laptop-a")
    worker = stream_worker(s)
    sink = sink_factory(s)
    p = producer(s)
    parts = s.topics.partitions
    key = b"emp-c"

    true_t0 = now_us() - 2 * MIN
    # Laptop A pauses emp-c for [t0+10 s, t0+20 s) true time, stamped on A's (fast) clock and
    # signed when it is sent, at A's "now".
    rec = pause_record("emp-c", 10 / 60, actor="emp-c", at_us=true_t0 + 10 * S + fast)
    value = codec.encode_record("control_event", rec)
    p.produce(t.controls, key=key, value=value, partition=partition_for_key(key, parts),
              headers=laptop_a.headers("controls", key, value, sent_at_us=now_us() + fast))
    p.flush(30)
    wait_for(lambda: stream_metric(s, 'handtrace_stream_controls_total{kind="pause_start"}') >= 1, 90,
             "the worker to fold laptop A's pause", worker.tail)

    # Laptop B (slow clock) captured one click every 500 ms over [t0, t0+30 s) true time; it sends
    # now, stamping its own clock.
    true_times = [true_t0 + i * S // 2 + 50_000 for i in range(60)]
    b_times = [x + slow for x in true_times]
    payload = _batch("emp-c", "laptop-b", b_times, sent_at=now_us() + slow)
    p.produce(t.events, key=key, value=payload, partition=partition_for_key(key, parts),
              headers=[(HEADER_SENT_AT, str(now_us() + slow).encode())])
    p.flush(30)

    margin = int(s.stream.clock_skew_margin_s * S)
    pause = (true_t0 + 10 * S, true_t0 + 20 * S)
    # Produce latency puts broker-clock times a little later; the margin covers it, so only rows
    # clear of the widened window are expected.
    expected = [b for x, b in zip(true_times, b_times, strict=True)
                if not (pause[0] - margin - S <= x < pause[1] + margin + S)]
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
             and sink.sink.rows_inserted >= len(expected), 120, f"{len(expected)} rows of laptop B", worker.tail)
    wait_for(lambda: group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 60, "the sink to catch up")
    stored = _stored(s, "emp-c")
    inside = [b for x, b in zip(true_times, b_times, strict=True) if pause[0] <= x < pause[1]]
    assert not set(stored) & set(inside), "laptop B's events inside laptop A's pause were stored"
    assert set(expected) <= set(stored), "events clear of the pause were lost"
    assert len(stored) >= len(true_times) - len(inside) - 2 * (2 * margin // (S // 2) + 4)


def test_a_widening_policy_admits_no_backlog_captured_before_it(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, sink_factory
) -> None:
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)  # publishes TEST_POLICY v1: firefox only
    sink = sink_factory(s)
    p = producer(s)
    parts = s.topics.partitions
    key = b"emp-w"
    wait_for(lambda: stream_metric(s, "handtrace_stream_policy_version") >= 1, 90, "policy v1", worker.tail)

    captured_before = [now_us() - 20 * S + i * S for i in range(10)]  # slack, while only firefox is allowed
    publish_policy(s, {**TEST_POLICY, "version": 2, "allowed_apps": ["firefox", "slack"]})
    wait_for(lambda: stream_metric(s, "handtrace_stream_policy_version") >= 2, 90, "policy v2", worker.tail)
    captured_after = [now_us() + i * 100_000 for i in range(10)]

    # The backlog arrives only now, after v2 allows slack; then the fresh events.
    for seed, times in ((1, captured_before), (2, captured_after)):
        sent = now_us()
        p.produce(t.events, key=key, value=_batch("emp-w", "d-w", times, sent_at=sent, app="slack", seed=seed),
                  partition=partition_for_key(key, parts), headers=[(HEADER_SENT_AT, str(sent).encode())])
    p.flush(30)
    wait_for(lambda: sink.sink.rows_inserted >= len(captured_after), 120, "the events captured under v2", worker.tail)
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
             and group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 60, "stream and sink to catch up")
    assert _stored(s, "emp-w") == captured_after
    assert stream_metric(s, 'handtrace_stream_events_total{decision="not_allowlisted_app"}') >= len(captured_before)
