"""The validation step's bound on hostile input: a batch with too many distinct titles or URLs
is dropped whole, others are untouched, and the common case does no per-batch grouping."""

from __future__ import annotations

import random

from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.stream.pipeline import BatchPipeline, SourceMessage
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.validate import ValidateStep
from tests.factories import make_batch, make_event


def flood_batch(n: int, distinct: int, column: str) -> bytes:
    """A batch whose ``column`` takes ``distinct`` different values over ``n`` focus changes."""
    rng = random.Random(7)
    t0 = now_us() - 10_000_000
    events = []
    for i in range(n):
        e = make_event("focus_change", t0 + i * 100, rng)
        e[column] = f"https://x{i % distinct}.google.com/" if column == "url" else f"title {i % distinct}"
        events.append(e)
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": "emp-flood", "device_id": "dev-flood",
              "agent_version": "test", "os": "linux", "seq": 1, "sent_at_us": t0 + n * 100}
    return codec.encode_event_batch(header, events)


def frame_of(payloads: list[bytes]):  # type: ignore[no-untyped-def]
    parsed = [(SourceMessage(p, 0, i), codec.parse_event_batch(p)) for i, p in enumerate(payloads)]
    return BatchPipeline([])._frame(parsed)


def test_a_flooding_batch_is_dropped_whole_and_others_kept() -> None:
    normal = [make_batch(f"emp-{i}", 50, seed=i)[0] for i in range(3)]
    for column in ("window_title", "url"):
        frame = frame_of([*normal, flood_batch(300, 250, column)])
        res = ValidateStep(max_distinct_per_batch=200)(frame, BatchContext(now_us()))
        assert res.dropped == {"too_many_distinct_values": 300}
        assert res.frame.height == 150
        assert set(res.frame.get_column("employee_id")) == {"emp-0", "emp-1", "emp-2"}


def test_at_the_bound_nothing_is_dropped() -> None:
    frame = frame_of([flood_batch(300, 200, "window_title"), flood_batch(300, 200, "url")])
    res = ValidateStep(max_distinct_per_batch=200)(frame, BatchContext(now_us()))
    assert res.dropped == {} and res.frame.height == 600
