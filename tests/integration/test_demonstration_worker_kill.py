"""kill -9 of the stream worker while it forwards submitted demonstrations (issue #11): after a
restart, every demonstration is stored whole and exactly once -- every frame and event once, no
frame or event row without its complete demonstration, every frame row with its object -- even
though the killed worker's micro-batches are replayed onto the accepted topic (real broker,
worker, sink process and embedded ClickHouse; merges disabled so that duplicates would show)."""

from __future__ import annotations

import hashlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.clock import now_us
from handtrace.core.framestore import open_store
from handtrace.core.settings import Settings
from handtrace.sink.schema import migrate
from tests.factories import demo_frame, frame_message, make_demonstration
from tests.integration.conftest import start_sink_process, topics_of, wait_for
from tests.integration.test_demonstrations_stream import big_producer, send

DEMOS = 6
FRAMES = 12
TABLES = ("demonstrations", "frames", "demonstration_events")


def test_kill_9_of_the_worker_mid_submission_stores_every_demonstration_once(
        settings_factory: Callable[..., Settings], stream_worker: Callable[..., Any], tmp_path: Path) -> None:
    s = settings_factory(stream={"micro_batch_messages": 4})
    t = topics_of(s)
    dsn, db = s.clickhouse_dsn(), s.clickhouse.database
    c = clickhouse.connect(dsn)
    migrate(c, db)
    for table in TABLES:
        c.command(f"ALTER TABLE {db}.{table} MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1, "
                  "max_bytes_to_merge_at_min_space_in_pool = 1")
    clickhouse.close(dsn)

    p = big_producer(s)
    t0 = now_us() - 600_000_000
    expected: dict[bytes, set[str]] = {}
    for d in range(DEMOS):
        emp = f"emp-k{d % 3}"
        start = t0 + d * 70_000_000
        frames = [demo_frame(start + (i + 1) * 4_000_000, seed=d * 100 + i, step=i, size=300_000,
                             reason="end" if i == FRAMES - 1 else "click") for i in range(FRAMES)]
        header = make_demonstration(emp, frames, t0_us=start, n_events=200, device_id=f"dev-{emp}")
        demo_id = dict(header[1])["ht-demo-id"]
        send(p, t.demonstrations, [header, *(frame_message(f, demo_id, f"dev-{emp}") for f in frames)], key=emp)
        expected[demo_id] = {hashlib.sha256(f["image"]).hexdigest() for f in frames}

    kills = 0
    for _ in range(3):
        before = group_lag(s.kafka, s.stream.app_id, t.demonstrations)
        if before == 0:
            break
        worker = stream_worker(s)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and group_lag(s.kafka, s.stream.app_id, t.demonstrations) >= before:
            time.sleep(0.05)
        time.sleep(0.3)  # some sends of the next micro-batch in flight, their offsets uncommitted
        worker.kill()
        kills += 1
    assert kills >= 1
    final = stream_worker(s)
    log = tmp_path / "sink.log"
    sink = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.demonstrations) == 0
                 and group_lag(s.kafka, s.demo.sink_group_id, t.demonstrations_accepted) == 0,
                 240, "stream and sink to catch up",
                 lambda: f"{final.tail()}\n{log.read_text(errors='replace')[-3000:]}")
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(60)

    c = clickhouse.connect(dsn)
    try:
        def q(sql: str) -> list[tuple[Any, ...]]:
            return [tuple(r) for r in c.query(sql.format(db=db)).result_rows]

        demos = q("SELECT demonstration_id, status, frames, events FROM {db}.demonstrations")
        assert len(demos) == DEMOS, demos  # one row each: no replay wrote a second
        assert {r[1] for r in demos} == {"complete"}
        assert {r[0].bytes for r in demos} == set(expected)
        for table, key in (("frames", "demonstration_id, step"), ("demonstration_events", "event_id")):
            (n, distinct), = q(f"SELECT count(), uniqExact({key}) FROM {{db}}.{table}")
            assert n == distinct, f"duplicates in {table}: {n} rows, {distinct} distinct"
        assert q("SELECT count() FROM {db}.frames") == [(DEMOS * FRAMES,)]
        orphans = q("SELECT count() FROM {db}.frames WHERE demonstration_id NOT IN "
                    "(SELECT demonstration_id FROM {db}.demonstrations WHERE status = 'complete')")
        orphans += q("SELECT count() FROM {db}.demonstration_events WHERE demonstration_id NOT IN "
                     "(SELECT demonstration_id FROM {db}.demonstrations WHERE status = 'complete')")
        assert orphans == [(0,), (0,)]
        store = open_store(s)
        for demo_id, sha, key in q("SELECT demonstration_id, sha256, object_key FROM {db}.frames"):
            assert sha in expected[demo_id.bytes]
            assert hashlib.sha256(store.get(key)).hexdigest() == sha
    finally:
        clickhouse.close(dsn)
