"""The sink's demonstration writer through the real broker, the real embedded ClickHouse and the
local frame store (issue #11): accepted demonstrations land whole or not at all, exactly once.

Messages are produced as the stream publishes them (docs/design/demonstrations.md, "In the
stream"; tests/demo_messages.py): a header (Arrow IPC events + ``ht-demo``) then the frames."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from handtrace.core import clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.framestore import FrameStore, StoreError, open_store, person_prefix
from handtrace.core.settings import Settings
from handtrace.sink import metrics
from handtrace.sink.demonstrations import COMPLETE, INCOMPLETE, DemoWriter
from handtrace.sink.schema import migrate
from tests.demo_messages import DemoMessages, make_demo
from tests.integration.conftest import producer, start_sink_process, topics_of, wait_for

pytestmark = [pytest.mark.timeout(300)]

RAW_ID = "alice.raw@example.com"
TABLES = ("demonstrations", "frames", "demonstration_events")


def demo_settings(settings_factory: Callable[..., Settings], **demo: Any) -> Settings:
    return settings_factory(demo={"sink_group_id": f"demo-{uuid.uuid4().hex[:8]}", **demo})


def with_raw_ids(d: DemoMessages) -> DemoMessages:
    """The header also carries raw identities (fields the contract does not have): none may land."""
    headers, value = d.header
    meta = {**d.meta, "employee_id": RAW_ID, "device_id": RAW_ID}
    d.header = ([(k, json.dumps(meta).encode() if k == "ht-demo" else v) for k, v in headers], value)
    return d


def produce(s: Settings, msgs: list[tuple[Any, bytes]], key: str) -> None:
    p = producer(s)
    topic = topics_of(s).demonstrations_accepted
    for headers, value in msgs:
        p.produce(topic, key=key.encode(), value=value, headers=headers)
    assert p.flush(30) == 0


@pytest.fixture
def running() -> Iterator[Callable[..., tuple[DemoWriter, threading.Event, threading.Thread]]]:
    """Factory: a DemoWriter in a thread of this test (stopped and ClickHouse closed at teardown)."""
    started: list[tuple[DemoWriter, threading.Event, threading.Thread, str]] = []

    def start(s: Settings, store: FrameStore | None = None, on_tick: Callable[[DemoWriter], None] | None = None,
              ) -> tuple[DemoWriter, threading.Event, threading.Thread]:
        w = DemoWriter.on_clickhouse(s, clickhouse.connect(s.clickhouse_dsn()), store or open_store(s))
        stop = threading.Event()
        th = threading.Thread(target=w.run, args=(stop, on_tick), daemon=True)
        th.start()
        started.append((w, stop, th, s.clickhouse_dsn()))
        return w, stop, th

    yield start
    for _w, stop, th, _dsn in started:
        stop.set()
        th.join(30)
        assert not th.is_alive(), "the demonstration writer did not stop"
    for dsn in {x[3] for x in started}:
        clickhouse.close(dsn)


def rows(s: Settings, table: str, cols: str = "*") -> list[tuple[Any, ...]]:
    c = clickhouse.connect(s.clickhouse_dsn())
    return list(c.query(f"SELECT {cols} FROM {s.clickhouse.database}.{table}").result_rows)


def check_whole(s: Settings, store: FrameStore, demos: list[DemoMessages]) -> None:
    """Each demonstration exactly once, complete, with every frame and event once; every frames
    row's object exists with its sha256; no orphan rows; no raw identity anywhere."""
    complete = {r[0].bytes for r in rows(s, "demonstrations", "demonstration_id")}
    assert sorted(r[0] for r in rows(s, "demonstrations", "status")) == [COMPLETE] * len(demos)
    assert complete == {d.demo_id for d in demos}
    frames = rows(s, "frames", "demonstration_id, sha256, object_key, employee_key")
    assert sorted((f[0].bytes, f[1]) for f in frames) == sorted((d.demo_id, sha) for d in demos for sha in d.shas)
    for demo_id, sha, key, employee_key in frames:
        assert key.startswith(person_prefix(employee_key))
        assert hashlib.sha256(store.get(key)).hexdigest() == sha, "object missing or not its sha256"
        assert demo_id.bytes in complete
    events = rows(s, "demonstration_events", "demonstration_id, event_id")
    assert sorted((e[0].bytes, e[1].bytes) for e in events) == sorted(
        (d.demo_id, i) for d in demos for i in d.event_ids)
    for table in TABLES:
        assert RAW_ID not in repr(rows(s, table)), f"a raw identity in {table}"


def test_demonstrations_land_whole_and_exactly_once_despite_replays_and_reuploads(
        settings_factory, running) -> None:  # type: ignore[no-untyped-def]
    s = demo_settings(settings_factory)
    store = open_store(s)
    demos = [with_raw_ids(make_demo("pk_alice", 4, 6, seed=1)), make_demo("pk_alice", 3, 2, seed=2),
             make_demo("pk_bob", 5, 4, seed=3)]
    for d in demos:
        # a duplicate header while pending, a duplicate frame, then a whole re-upload
        produce(s, [d.header, d.header, *d.frames, d.frames[0], d.header, *d.frames], d.employee_key)
    w, stop, th = running(s, store)
    wait_for(lambda: len(w.stored) == 3 and group_lag(s.kafka, s.demo.sink_group_id,
                                                      topics_of(s).demonstrations_accepted) == 0,
             120, "three demonstrations stored and committed")
    stop.set()
    th.join(30)
    check_whole(s, store, demos)

    # the whole topic again, from its start (a new group): nothing more is stored
    again = s.model_copy(update={"demo": s.demo.model_copy(update={"sink_group_id": "again-" + uuid.uuid4().hex})})
    before = metrics.DEMONSTRATIONS.labels("already_stored")._value.get()
    w2, stop2, th2 = running(again, store)
    wait_for(lambda: group_lag(s.kafka, again.demo.sink_group_id, topics_of(s).demonstrations_accepted) == 0,
             120, "the replay to be read")
    assert w2.stored == []
    assert metrics.DEMONSTRATIONS.labels("already_stored")._value.get() - before >= 3
    check_whole(s, store, demos)


def test_a_missing_frame_holds_the_demonstration_then_it_is_recorded_incomplete_without_objects(
        settings_factory, running) -> None:  # type: ignore[no-untyped-def]
    s = demo_settings(settings_factory, hold_s=4.0)
    store = open_store(s)
    d = make_demo("pk_carol", 4, 3, seed=7)
    produce(s, [d.header, d.frames[0], d.frames[1], d.frames[3]], d.employee_key)
    w, stop, th = running(s, store)
    topic = topics_of(s).demonstrations_accepted
    wait_for(lambda: len(list(store.list(person_prefix("pk_carol")))) == 3, 60, "the frames that came")
    # held: nothing in ClickHouse, and the offset is held at the header
    assert rows(s, "demonstrations") == [] and rows(s, "frames") == []
    time.sleep(1.0)  # several commit rounds
    assert group_lag(s.kafka, s.demo.sink_group_id, topic) == 4
    wait_for(lambda: bool(rows(s, "demonstrations")), 60, "the incomplete row")
    (status, missing, reason), = rows(s, "demonstrations", "status, missing_frames, reason")
    assert (status, missing, reason) == (INCOMPLETE, 1, "hold_expired")
    assert rows(s, "frames") == [] and rows(s, "demonstration_events") == []
    assert list(store.list(person_prefix("pk_carol"))) == []
    wait_for(lambda: group_lag(s.kafka, s.demo.sink_group_id, topic) == 0, 60, "the commit past it")


class FlakyStore:
    """The local store, but its first ``fails`` writes fail (an object store outage)."""

    def __init__(self, inner: FrameStore, fails: int) -> None:
        self.inner = inner
        self.url = inner.url
        self.fails = fails
        self.attempts = 0

    def put(self, key: str, data: bytes) -> None:
        self.attempts += 1
        if self.fails > 0:
            self.fails -= 1
            raise StoreError(f"writing {key}: 503 Slow Down")
        self.inner.put(key, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_failing_object_writes_are_retried_and_no_row_ever_lacks_its_object(
        settings_factory, running) -> None:  # type: ignore[no-untyped-def]
    s = demo_settings(settings_factory)
    store = FlakyStore(open_store(s), fails=5)
    demos = [make_demo("pk_dora", 3, 2, seed=11), make_demo("pk_ed", 2, 2, seed=12)]
    for d in demos:
        produce(s, [d.header, *d.frames], d.employee_key)
    violations: list[str] = []

    def every_row_has_its_object(w: DemoWriter) -> None:
        for (key,) in rows(s, "frames", "object_key"):
            if not store.inner.exists(key):
                violations.append(key)

    retries = metrics.DEMO_OBJECT_RETRIES._value.get()
    w, stop, th = running(s, store, every_row_has_its_object)
    wait_for(lambda: len(w.stored) == 2, 120, "both demonstrations stored")
    stop.set()
    th.join(30)
    assert violations == []
    assert store.attempts == 5 + 5 and metrics.DEMO_OBJECT_RETRIES._value.get() - retries == 5
    check_whole(s, store, demos)


def test_kill_9_mid_demonstration_then_restart_stores_every_row_exactly_once(
        settings_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = demo_settings(settings_factory)
    dsn, db = s.clickhouse_dsn(), s.clickhouse.database
    c = clickhouse.connect(dsn)
    migrate(c, db)
    for table in TABLES:  # no merges: a duplicate row stays visible
        c.command(f"ALTER TABLE {db}.{table} MODIFY SETTING max_bytes_to_merge_at_max_space_in_pool = 1, "
                  "max_bytes_to_merge_at_min_space_in_pool = 1")
    clickhouse.close(dsn)
    store = open_store(s)
    demos = [make_demo(f"pk_{e}", 40, 30, seed=20 + i, frame_bytes=150_000)
             for i, e in enumerate(["fred", "gina", "fred", "hugo"])]
    for d in demos:
        produce(s, [d.header, *d.frames], d.employee_key)
    total = sum(len(d.frames) for d in demos)
    topic = topics_of(s).demonstrations_accepted

    def objects() -> int:
        return sum(1 for _ in store.list("frames/"))

    log = tmp_path / "sink.log"
    rng = random.Random(5)
    kills = 0
    at_kill: list[int] = []
    for _ in range(4):
        if group_lag(s.kafka, s.demo.sink_group_id, topic) == 0:
            break
        before = objects()
        proc = start_sink_process(s, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and objects() <= before and proc.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))  # somewhere among the frames, or between the inserts
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
        at_kill.append(objects())
    assert kills >= 2, "the sink should have been killed mid-demonstration at least twice"
    assert any(0 < n < total for n in at_kill), f"no kill among the frames (objects at each kill: {at_kill})"
    print("objects at each kill:", at_kill, "of", total)

    final = start_sink_process(s, log)
    try:
        wait_for(lambda: group_lag(s.kafka, s.demo.sink_group_id, topic) == 0, 180,
                 "the restarted sink to store every demonstration", lambda: log.read_text()[-3000:])
    finally:
        final.send_signal(signal.SIGTERM)
        final.wait(30)
    try:
        check_whole(s, store, demos)
        # exactly once, not merely once each: count rows against distinct keys
        for table, key in (("frames", "demonstration_id, sha256"), ("demonstration_events", "event_id"),
                           ("demonstrations", "demonstration_id")):
            (n, distinct), = rows(s, table, f"count(), uniqExact({key})")
            assert n == distinct, f"duplicates in {table}"
        assert objects() == total
    finally:
        clickhouse.close(dsn)
