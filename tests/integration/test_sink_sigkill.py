"""SIGKILL the sink process mid-stream, again and again, then let it finish: every accepted
event id is stored exactly once (real broker, real Faust worker, real embedded ClickHouse, merges
disabled so duplicates could not hide in a ReplacingMergeTree merge)."""

from __future__ import annotations

import signal
import time

from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.sink.schema import migrate
from tests.factories import make_batch
from tests.integration.conftest import kill_sink_mid_stream, producer, start_sink_process, topics_of, wait_for

BATCHES = 80
PER_BATCH = 250




def test_sigkilled_sink_stores_every_event_exactly_once(settings_factory, stream_worker, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory(sink={"flush_rows": 1500, "flush_interval_s": 0.2, "poll_messages": 3},
                         stream={"micro_batch_messages": 2})
    t = topics_of(s)
    dsn = s.clickhouse_dsn()
    c = clickhouse.connect(dsn)
    migrate(c, s.clickhouse.database)
    # No merges: a duplicate row would stay visible instead of being collapsed by the engine.
    c.command(f"ALTER TABLE {s.clickhouse.database}.events MODIFY SETTING "
              "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1")
    clickhouse.close(dsn)

    worker = stream_worker(s)
    p = producer(s)
    sent: list[bytes] = []
    for b in range(BATCHES):
        payload, ids_ = make_batch(f"emp-{b % 11}", PER_BATCH, seed=b, seq=b)
        p.produce(t.events, key=f"emp-{b % 11}".encode(), value=payload)
        sent += ids_
    p.flush(30)
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0, 120, "the stream to process all",
             worker.tail)
    total = group_lag(s.kafka, s.sink.group_id, t.stored)
    assert total >= 20, "the stream should have published many accepted-row messages"

    log = tmp_path / "sink.log"
    # each kill lands somewhere between an insert and its commit, or mid-flush
    kills = kill_sink_mid_stream(s, log, 4, lambda _k: 0.15)
    assert kills >= 2, "the sink should have been killed mid-stream at least twice"

    final = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 120, "the sink to catch up",
                 lambda: log.read_text()[-3000:])
        time.sleep(0.5)
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(30)

    c = clickhouse.connect(dsn)
    try:
        db = s.clickhouse.database
        count, unique = c.query(f"SELECT count(), uniqExact(event_id) FROM {db}.events").result_rows[0]
        assert (count, unique) == (len(sent), len(sent)), f"{count} rows, {unique} distinct, {len(sent)} sent"
        got = {r[0].bytes for r in c.query(f"SELECT event_id FROM {db}.events").result_rows}
        assert got == set(sent)
        parts = c.query(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'events' "
                        "AND active").result_rows[0][0]
        assert parts > 1, "merges were meant to be off"
    finally:
        clickhouse.close(dsn)
