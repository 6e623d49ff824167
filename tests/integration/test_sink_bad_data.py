"""Issue #10, class 2 (sink side) and class 8: one batch cannot stop the sink, and the sink stops
promptly. Real broker, real embedded ClickHouse, the accepted topic fed with what the stream
publishes (Arrow IPC of STORED_SCHEMA rows, one message per source offset).

- good rows of several employees with one agent batch whose capture times span 3 years of
  months: the good rows are stored exactly once, the batch's rows are not stored and are on
  ``events.rejected`` with a reason, later messages keep flowing;
- a crash at each step of that split (before a piece's insert, before and after the dead-letter
  copy) and a restart: the same outcome (the ledger's decisions are replayed);
- the sink process stops within 10 s of SIGTERM with the broker gone, and commits nothing it
  did not insert; in-process, ``run`` returns promptly while every insert fails.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from clickhouse_connect.driver.exceptions import DatabaseError

from handtrace.core import clickhouse
from handtrace.core.admin import ensure_topics, group_lag
from handtrace.core.clock import now_us
from handtrace.core.localbroker import LocalBroker
from handtrace.core.rows import (
    HEADER_ROWS,
    HEADER_SOURCE_OFFSET,
    HEADER_SOURCE_PARTITION,
    STORED_SCHEMA,
    from_ipc,
    to_ipc,
)
from handtrace.core.settings import Settings
from handtrace.sink.errors import BAD_DATA_CODES, RETRYABLE_CODES, TOO_MANY_PARTITIONS
from handtrace.sink.schema import migrate
from handtrace.sink.writer import Sink
from handtrace.stream.pipeline import BatchPipeline
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.validate import ValidateStep
from tests.factories import make_batch
from tests.integration.conftest import (
    kill_sink_mid_stream,
    producer,
    run_sink_until,
    start_outage_broker,
    start_sink_process,
    topic_messages,
    topics_of,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

HOSTILE = 12  # the source offset of the batch whose events span 3 years


class Crash(BaseException):
    """Stands in for the process dying at a chosen point."""


def _accepted(off: int, employee: str, n: int, *, span_months: int = 0) -> tuple[bytes, list[bytes]]:
    """The stream's accepted-rows message for source offset ``off`` (partition 0); with
    ``span_months`` its capture times are spread over that many months, one per row."""
    pipe = BatchPipeline([ValidateStep(), PseudonymiseStep(b"k" * 32)])
    payload, ids = make_batch(employee, n, seed=off)
    out = pipe.process(payload, 0, off, now_us())
    assert out.stored == n and not out.deadletters
    rows = out.rows[0]
    if span_months:
        start = dt.datetime(2023, 1, 15, tzinfo=dt.UTC)
        caps = [start.replace(year=2023 + (i % span_months) // 12, month=(i % span_months) % 12 + 1)
                for i in range(rows.num_rows)]
        i = rows.schema.get_field_index("captured_at")
        field = STORED_SCHEMA.field("captured_at")
        rows = rows.set_column(i, field, pa.array(caps, field.type))
    return to_ipc(rows), ids


def _publish(s: Settings, offsets: range, per_batch: int = 40,
             hostile_offsets: frozenset[int] = frozenset({HOSTILE})) -> tuple[list[bytes], list[bytes]]:
    """Publish accepted messages for ``offsets`` (employees interleaved); returns (good ids,
    ids of the hostile batches among them)."""
    p = producer(s)
    good: list[bytes] = []
    hostile: list[bytes] = []
    for off in offsets:
        if off in hostile_offsets:
            value, ids = _accepted(off, "emp-x", 36, span_months=36)
            hostile += ids
        else:
            value, ids = _accepted(off, f"emp-{off % 4}", per_batch)
            good += ids
        p.produce(topics_of(s).stored, value=value, partition=0, headers=[
            (HEADER_SOURCE_PARTITION, b"0"), (HEADER_SOURCE_OFFSET, str(off).encode()),
            (HEADER_ROWS, str(len(ids)).encode())])
    assert p.flush(30) == 0
    return good, hostile


def _stored_ids(s: Settings) -> list[bytes]:
    c = clickhouse.connect(s.clickhouse_dsn())
    return [r[0].bytes for r in c.query(f"SELECT event_id FROM {s.clickhouse.database}.events").result_rows]


def _rejected(s: Settings) -> list[tuple[dict[str, str], Any]]:
    """Every message on events.rejected: (headers, rows), or (headers, bytes) for a message
    that was not valid Arrow rows."""
    out: list[tuple[dict[str, str], Any]] = []
    for m in topic_messages(s.kafka.librdkafka(), topics_of(s).rejected):
        headers = {k: v.decode(errors="replace") for k, v in m.headers() or []}
        out.append((headers, m.value() if headers.get("ht-reason") == "invalid_message" else from_ipc(m.value())))
    return out




def _assert_outcome(s: Settings, good: list[bytes], hostile: list[bytes]) -> None:
    stored = _stored_ids(s)
    assert len(stored) == len(set(stored)), "a row was stored twice"
    assert set(stored) == set(good), f"{len(set(good) - set(stored))} good rows missing"
    assert not set(stored) & set(hostile), "a rejected row was stored"
    dead = [(h, rows) for h, rows in _rejected(s) if h["ht-reason"] != "invalid_message"]
    assert dead, "nothing on the dead-letter topic"
    dead_ids = {bytes(b) for _, rows in dead for b in rows.column("event_id").to_pylist()}
    assert dead_ids == set(hostile)
    for headers, rows in dead:
        assert headers["ht-stage"] == "sink" and headers["ht-reason"] == TOO_MANY_PARTITIONS
        assert headers["ht-source-partition"] == "0"
        assert headers["ht-source-offset-first"] == headers["ht-source-offset-last"] == str(HOSTILE)
        assert "36" in headers["ht-detail"] and int(headers["ht-rows"]) == rows.num_rows
        assert headers["ht-token"]


def _stop_merges(s: Settings) -> None:
    clickhouse.connect(s.clickhouse_dsn()).command(f"SYSTEM STOP MERGES {s.clickhouse.database}.events")


def test_a_batch_spanning_years_is_dead_lettered_and_the_rest_flows(settings_factory) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory(sink={"flush_rows": 10_000, "flush_interval_s": 0.5})
    good, hostile = _publish(s, range(30))
    # Messages that are not the stream's rows at all: garbage, a tombstone, rows whose
    # non-nullable source_offset is null (Arrow does not enforce nullability on read).
    value, _ = _accepted(40, "emp-n", 3)
    rows = from_ipc(value)
    nulls = rows.set_column(rows.schema.get_field_index("source_offset"), STORED_SCHEMA.field("source_offset"),
                            pa.nulls(rows.num_rows, pa.int64()))
    p = producer(s)
    for junk in (b"not arrow at all", None, to_ipc(nulls)):
        p.produce(topics_of(s).stored, value=junk, key=b"k", partition=0, headers=[("h", b"v")])
    assert p.flush(30) == 0
    sink = Sink(s, clickhouse.connect(s.clickhouse_dsn()))
    _stop_merges(s)
    stop = threading.Event()
    th = threading.Thread(target=sink.run, args=(stop,), daemon=True)
    th.start()
    try:
        wait_for(lambda: sink.rows_inserted >= len(good), 90, "the good rows of the first 30 batches")
        # Later messages of everyone keep flowing: no stall behind the refused batch.
        later, _ = _publish(s, range(30, 40))
        wait_for(lambda: sink.rows_inserted >= len(good) + len(later), 60, "later batches to be stored")
        wait_for(lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0, 30, "commits")
    finally:
        stop.set()
        th.join(30)
    assert not th.is_alive()
    try:
        _assert_outcome(s, good + later, hostile)
        assert sink.rows_rejected == len(hostile)
        invalid = [(h, v) for h, v in _rejected(s) if h["ht-reason"] == "invalid_message"]
        assert sorted((v or b"")[:8] for _, v in invalid) == sorted([b"", b"not arro", to_ipc(nulls)[:8]])
        assert all(h["h"] == "v" and h["ht-stage"] == "sink" and h["ht-accepted-offset"] for h, _ in invalid)
        assert any("source_offset" in h["ht-detail"] for h, _ in invalid)
        # A restart (same group) changes nothing: no replay stores or rejects anything again.
        again = Sink(s, clickhouse.connect(s.clickhouse_dsn()))
        assert run_sink_until(again, lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0) is None
        _assert_outcome(s, good + later, hostile)
        assert len(_rejected(s)) == 1 + 3
    finally:
        clickhouse.close(s.clickhouse_dsn())


@pytest.mark.parametrize("crash_point", ["piece_insert", "before_dead_letter", "after_dead_letter"])
def test_a_crash_during_the_split_replays_to_the_same_outcome(settings_factory, crash_point: str) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory(sink={"flush_rows": 10_000, "flush_interval_s": 2.0})
    good, hostile = _publish(s, range(30))
    client = clickhouse.connect(s.clickhouse_dsn())
    try:
        first = Sink(s, client)
        _stop_merges(s)
        if crash_point == "piece_insert":
            landed: list[str] = []

            class Crashing:
                def __getattr__(self, name: str) -> Any:
                    real = getattr(client, name)
                    if name != "raw_insert":
                        return real

                    def insert(*a: Any, **k: Any) -> Any:
                        token = k["settings"]["insert_deduplication_token"]
                        if "#" in token and first.flushes == 0:
                            if len(landed) >= 2:  # two pieces went in, the third does not
                                raise Crash
                            landed.append(token)
                        return real(*a, **k)
                    return insert

            first.client = Crashing()
        else:
            real_publish = first._publish_rejected

            def publish(*a: Any, **k: Any) -> None:
                if crash_point == "before_dead_letter":
                    raise Crash
                real_publish(*a, **k)
                raise Crash
            first._publish_rejected = publish  # type: ignore[method-assign]
        first._on_revoke = lambda *_a: None  # type: ignore[method-assign]  # a dead process runs no callback
        crashed = run_sink_until(first, lambda: False)
        assert isinstance(crashed, Crash), f"expected the simulated crash, got {crashed!r}"
        assert group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) > 0, "the split flush is uncommitted"
        before = _stored_ids(s)
        assert not set(before) & set(hostile)
        if crash_point == "piece_insert":
            assert 0 < len(before) < len(good), "some pieces landed before the crash"

        second = Sink(s, client)
        assert run_sink_until(second, lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0) is None
        _assert_outcome(s, good, hostile)
        copies = len(_rejected(s))
        # The dead-letter copy is at-least-once: a crash between the send and its ledger record
        # sends it again; otherwise exactly one copy.
        assert copies == (2 if crash_point == "after_dead_letter" else 1)
    finally:
        clickhouse.close(s.clickhouse_dsn())


def test_error_names_match_the_real_engine(settings_factory) -> None:  # type: ignore[no-untyped-def]
    """The classification table names every code as the ClickHouse engine in use does."""
    s = settings_factory()
    c = clickhouse.connect(s.clickhouse_dsn())
    try:
        codes = {**RETRYABLE_CODES, **BAD_DATA_CODES}
        got = dict(c.query("SELECT number, errorCodeToName(number) FROM numbers(1100) "
                           f"WHERE number IN ({','.join(map(str, codes))})").result_rows)
        assert got == codes
        # ... and the embedded engine raises the code the classifier keys on.
        with pytest.raises(DatabaseError) as err:
            c.raw_insert(f"{s.clickhouse.database}.nope", ["a"], b"garbage", fmt="ArrowStream")
        assert err.value.code in RETRYABLE_CODES  # UNKNOWN_TABLE: an operator problem, not the rows
    finally:
        clickhouse.close(s.clickhouse_dsn())


def test_run_returns_promptly_while_every_insert_fails(settings_factory) -> None:  # type: ignore[no-untyped-def]
    """ClickHouse keeps failing (a retryable error): the sink retries, stores and commits
    nothing, and returns within seconds of the stop event."""
    s = settings_factory(sink={"flush_interval_s": 0.2})
    good, _ = _publish(s, range(3))
    client = clickhouse.connect(s.clickhouse_dsn())
    try:
        sink = Sink(s, client)
        calls = []

        class Failing:
            def __getattr__(self, name: str) -> Any:
                if name != "raw_insert":
                    return getattr(client, name)

                def insert(*_a: Any, **_k: Any) -> None:
                    calls.append(time.monotonic())
                    raise DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded", code=241)
                return insert

        sink.client = Failing()
        stop = threading.Event()
        th = threading.Thread(target=sink.run, args=(stop,), daemon=True)
        th.start()
        wait_for(lambda: len(calls) >= 4, 60, "inserts to be retried")
        t0 = time.monotonic()
        stop.set()
        th.join(15)
        assert not th.is_alive(), "run did not return after stop"
        assert time.monotonic() - t0 < 5
        assert sink.rows_inserted == 0 and not _stored_ids(s)
        assert group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 3, "nothing committed"
    finally:
        clickhouse.close(s.clickhouse_dsn())


# ---------------------------------------------------------------- the process, broker gone




def test_sink_process_stops_within_10s_of_sigterm_with_the_broker_gone(
        outage_broker: LocalBroker, tmp_path: Path) -> None:
    """The sink holds unflushed rows when its broker goes away and SIGTERM arrives: it exits
    within 10 s; whatever it could not commit is replayed, exactly once, by the next start."""
    start_outage_broker(outage_broker)
    tag = uuid.uuid4().hex[:8]
    s = Settings(state_dir=tmp_path / "state", kafka={"bootstrap_servers": outage_broker.bootstrap},
                 topics={"prefix": f"o{tag}", "partitions": 3},
                 sink={"group_id": f"sink-{tag}", "flush_interval_s": 0.3, "metrics_port": 0})
    ensure_topics(s.kafka, s.topics)
    first, _ = _publish(s, range(5))
    log = tmp_path / "sink.log"
    proc = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0, 90,
                 "the sink to store and commit", lambda: log.read_text()[-3000:])
        # Rows it consumes but holds (next flush far away), then the broker goes away.
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        held = s.model_copy(update={"sink": s.sink.model_copy(update={"flush_interval_s": 60.0})})
        later, _ = _publish(s, range(5, 10))
        proc = start_sink_process(held, log)
        time.sleep(8)  # joins the group, reads the 5 new messages, holds them
        outage_broker.stop()
        time.sleep(2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("the sink did not exit within 10 s of SIGTERM with the broker gone\n"
                        + log.read_text()[-3000:])
        assert time.monotonic() - t0 < 10
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # Back with a broker: the next start replays what was not committed, and stores nothing twice.
    start_outage_broker(outage_broker)
    proc = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0, 90,
                 "the restarted sink to catch up", lambda: log.read_text()[-3000:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    stored = _stored_ids(s)
    assert len(stored) == len(set(stored)) and set(stored) == set(first + later)
    clickhouse.close(s.clickhouse_dsn())


def test_the_exit_deadline_ends_a_sink_stuck_in_an_uninterruptible_call(tmp_path: Path) -> None:
    """If a call cannot be interrupted (an insert a server never answers), the deadline armed
    by SIGTERM still ends the process, before 10 s."""
    code = ("import threading, time\n"
            "from handtrace.sink.service import install_stop_handlers\n"
            "install_stop_handlers(threading.Event(), 2.0)\n"
            "print('ready', flush=True)\n"
            "while True:\n    time.sleep(3600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        assert 1.5 < time.monotonic() - t0 < 10
        assert proc.returncode == 1
        assert proc.stderr is not None and b"exiting now" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_a_flush_over_the_servers_partition_limit_is_split_before_it_is_sent(settings_factory) -> None:  # type: ignore[no-untyped-def]
    """Each batch in a month of its own, more months in one flush than the server allows per
    insert block: every row is stored, and ClickHouse never had to refuse an insert."""
    from handtrace.sink import metrics

    # Ten months of 2025 lie past the default retention of raw events (the sink's TTL would drop
    # them at the first merge): this test is about partitions per insert, so no retention here.
    s = settings_factory(sink={"flush_rows": 10_000, "flush_interval_s": 1.0},
                         warehouse={"retention": {"events_days": 0}})
    p = producer(s)
    ids: list[bytes] = []
    for off in range(10):
        value, got = _accepted(off, f"emp-{off % 3}", 20, span_months=1)
        rows = from_ipc(value)
        field = STORED_SCHEMA.field("captured_at")
        month = dt.datetime(2025, off + 1, 3, tzinfo=dt.UTC)
        rows = rows.set_column(rows.schema.get_field_index("captured_at"), field,
                               pa.array([month] * rows.num_rows, field.type))
        p.produce(topics_of(s).stored, value=to_ipc(rows), partition=0)
        ids += got
    assert p.flush(30) == 0
    client = clickhouse.connect(s.clickhouse_dsn())
    client.set_client_setting("max_partitions_per_insert_block", 4)
    try:
        refused = metrics.INSERT_ERRORS.labels("bad_data")._value.get()
        sink = Sink(s, client)
        assert sink.max_partitions_per_insert == 4
        assert run_sink_until(sink, lambda: group_lag(s.kafka, s.sink.group_id, topics_of(s).stored) == 0) is None
        stored = _stored_ids(s)
        assert sorted(stored) == sorted(ids)
        assert metrics.INSERT_ERRORS.labels("bad_data")._value.get() == refused
        assert sink.rows_rejected == 0
    finally:
        client.set_client_setting("max_partitions_per_insert_block", 100)
        clickhouse.close(s.clickhouse_dsn())


def test_sigkilled_sink_with_hostile_batches_stores_the_same_result(settings_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Kill -9 the sink process again and again while it splits flushes around hostile batches,
    then let it finish: every good row once, no hostile row stored, all of them dead-lettered."""
    s = settings_factory(sink={"flush_rows": 150, "flush_interval_s": 0.2, "poll_messages": 3})
    hostile_offsets = frozenset(range(7, 80, 9))
    good, hostile = _publish(s, range(80), per_batch=30, hostile_offsets=hostile_offsets)
    t = topics_of(s)
    c = clickhouse.connect(s.clickhouse_dsn())
    migrate(c, s.clickhouse.database)
    # No merges: a duplicate row would stay visible instead of being collapsed by the engine.
    c.command(f"ALTER TABLE {s.clickhouse.database}.events MODIFY SETTING "
              "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1")
    clickhouse.close(s.clickhouse_dsn())
    log = tmp_path / "sink.log"
    # somewhere in a split, an insert, a dead-letter send
    kills = kill_sink_mid_stream(s, log, 5, lambda k: 0.1 * (k + 1))
    assert kills >= 2, "the sink should have been killed mid-stream at least twice"
    final = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 120, "the sink to catch up",
                 lambda: log.read_text()[-3000:])
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(15)
    stored = _stored_ids(s)
    try:
        assert len(stored) == len(set(stored)), "a row was stored twice"
        assert not set(stored) - set(good), "a row that is not good was stored"
        c = clickhouse.connect(s.clickhouse_dsn())
        ledger = c.query(f"SELECT first_source_offset, last_source_offset, piece, outcome, reason "
                         f"FROM {s.clickhouse.database}.sink_ledger ORDER BY written_at").result_rows
        assert set(stored) == set(good), (f"{len(set(good) - set(stored))} good rows missing; ledger:\n"
                                          + "\n".join(map(str, ledger)) + log.read_text()[-4000:])
        dead = _rejected(s)
        dead_ids = {bytes(b) for _, rows in dead for b in rows.column("event_id").to_pylist()}
        assert dead_ids == set(hostile), (f"{len(set(hostile) - dead_ids)} hostile rows not dead-lettered; "
                                          f"{[h for h, _ in dead]}\nledger:\n" + "\n".join(map(str, ledger)))
        assert {h["ht-source-offset-first"] for h, _ in dead} == {str(o) for o in hostile_offsets}
    finally:
        clickhouse.close(s.clickhouse_dsn())
