"""SIGKILL the Faust worker mid-stream and restart it: at-least-once replays from the killed
worker must not duplicate or lose a single stored event (real broker, worker, ClickHouse; merges
disabled so that duplicates would stay visible)."""

from __future__ import annotations

import time

from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from tests.factories import make_batch
from tests.integration.conftest import producer, topics_of, wait_for

BATCHES = 120
PER_BATCH = 200


def test_sigkilled_worker_restarts_and_every_event_is_stored_once(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, sink_factory
) -> None:
    s = settings_factory(stream={"micro_batch_messages": 2})
    t = topics_of(s)
    sink = sink_factory(s)
    db = s.clickhouse.database
    clickhouse.connect(s.clickhouse_dsn()).command(
        f"ALTER TABLE {db}.events MODIFY SETTING "
        "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1")
    p = producer(s)
    sent: list[bytes] = []
    for b in range(BATCHES):
        payload, ids_ = make_batch(f"emp-{b % 13}", PER_BATCH, seed=b, seq=b)
        p.produce(t.events, key=f"emp-{b % 13}".encode(), value=payload)
        sent += ids_
    p.flush(30)

    kills = 0
    for _ in range(3):
        before = group_lag(s.kafka, s.stream.app_id, t.events)
        if before == 0:
            break
        worker = stream_worker(s)
        deadline = time.monotonic() + 90
        # Kill once it has made progress (committed some offsets), mid-stream.
        while time.monotonic() < deadline and group_lag(s.kafka, s.stream.app_id, t.events) >= before:
            time.sleep(0.05)
        worker.kill()
        kills += 1
    assert kills >= 1
    final = stream_worker(s)
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
             and group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 180, "stream and sink to catch up",
             final.tail)
    wait_for(lambda: sink.sink.rows_inserted >= len(sent), 30, "all rows")

    c = clickhouse.connect(s.clickhouse_dsn())
    count, unique = c.query(f"SELECT count(), uniqExact(event_id) FROM {db}.events").result_rows[0]
    assert (count, unique) == (len(sent), len(sent)), f"{count} rows, {unique} distinct of {len(sent)}"
    assert {r[0].bytes for r in c.query(f"SELECT event_id FROM {db}.events").result_rows} == set(sent)
