"""The sink's demonstration writer without I/O: pending manifests, objects before rows, the
demonstrations row last, hold expiry, replays, and the commit watermark (issue #11).

The fakes keep ClickHouse's one promise the writer relies on -- an insert repeating a token is
dropped -- and check the writer's: a frames row is inserted only when its object is stored, and a
``complete`` row only after its frames and events rows."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.framestore import StoreError
from handtrace.core.settings import Settings
from handtrace.sink.demonstrations import (
    COMPLETE,
    HOLD_EXPIRED,
    INCOMPLETE,
    DemoWriter,
    Pending,
    dedup_token,
    parse_header,
    safe_commit,
)
from tests.demo_messages import DemoMessages, make_demo

HOLD_S = 60.0


class Crash(BaseException):
    """Stands in for the process dying (SIGKILL) at a chosen call."""


class FakeStore:
    """A FrameStore in memory that can fail (StoreError) or crash on chosen puts."""

    url = "mem://"

    def __init__(self, fail_puts: int = 0) -> None:
        self.objects: dict[str, bytes] = {}
        self.fail_puts = fail_puts
        self.puts = 0
        self.crash_at_put: int | None = None

    def put(self, key: str, data: bytes) -> None:
        self.puts += 1
        if self.crash_at_put == self.puts:
            raise Crash
        if self.fail_puts > 0:
            self.fail_puts -= 1
            raise StoreError(f"writing {key}: unavailable")
        self.objects[key] = data

    def get(self, key: str) -> bytes:
        return self.objects[key]

    def exists(self, key: str) -> bool:
        return key in self.objects

    def delete(self, key: str) -> bool:
        return self.objects.pop(key, None) is not None

    def list(self, prefix: str) -> Iterator[str]:
        return iter([k for k in self.objects if k.startswith(prefix)])

    def delete_prefix(self, prefix: str) -> int:
        return sum(self.delete(k) for k in list(self.list(prefix)))


class BadData(Exception):  # noqa: N818 -- mimics clickhouse-connect's DatabaseError
    code = 53  # TYPE_MISMATCH: bad data


class FakeTables:
    """DemoTables in memory: inserts deduplicated by token (as ClickHouse does), invariants checked."""

    def __init__(self, store: FakeStore) -> None:
        self.store = store
        self.rows: dict[str, list[dict[str, Any]]] = {"frames": [], "demonstration_events": [], "demonstrations": []}
        self.tokens: set[str] = set()
        self.inserts = 0
        self.crash_at_insert: int | None = None
        self.refuse: set[str] = set()
        self.discarded: list[bytes] = []

    def insert(self, table: str, rows: pa.Table, token: str) -> None:
        self.inserts += 1
        if self.crash_at_insert == self.inserts:
            raise Crash
        if table in self.refuse:
            raise BadData("Code: 53. type mismatch")
        if token in self.tokens:
            return
        new = rows.to_pylist()
        if table == "frames":
            for r in new:  # never a row without its object
                assert r["object_key"] in self.store.objects, "frames row before its object"
                assert hashlib.sha256(self.store.objects[r["object_key"]]).hexdigest() == r["sha256"]
        if table == "demonstrations" and new[0]["status"] == COMPLETE:
            demo = new[0]["demonstration_id"]
            frames = [r for r in self.rows["frames"] if r["demonstration_id"] == demo]
            events = [r for r in self.rows["demonstration_events"] if r["demonstration_id"] == demo]
            assert len(frames) == new[0]["frames"] and len(events) == new[0]["events"], "complete row first"
        self.tokens.add(token)
        self.rows[table] += new

    def is_complete(self, employee_key: str, demo_id: bytes) -> bool:
        return any(r["demonstration_id"] == demo_id and r["status"] == COMPLETE for r in self.rows["demonstrations"])

    def referenced(self, employee_key: str, keys: list[str]) -> set[str]:
        return {r["object_key"] for r in self.rows["frames"]} & set(keys)

    def discard(self, employee_key: str, demo_id: bytes) -> None:
        self.discarded.append(demo_id)
        for t in ("frames", "demonstration_events"):
            self.rows[t] = [r for r in self.rows[t] if r["demonstration_id"] != demo_id]

    def demo_rows(self, demo_id: bytes, table: str = "demonstrations") -> list[dict[str, Any]]:
        return [r for r in self.rows[table] if r["demonstration_id"] == demo_id]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def writer(store: FakeStore, tables: FakeTables, clock: Clock | None = None) -> DemoWriter:
    s = Settings(demo={"hold_s": HOLD_S}, sink={"unknown_error_retries": 1})
    return DemoWriter(s, tables, store, clock=clock or Clock())


def feed(w: DemoWriter, msgs: list[tuple[Any, bytes]], start: int = 0, p: int = 0) -> None:
    for i, (h, v) in enumerate(msgs):
        w.handle(p, start + i, h, v)


def messages(d: DemoMessages) -> list[tuple[Any, bytes]]:
    return [d.header, *d.frames]


def test_a_complete_demonstration_lands_whole_with_the_demonstrations_row_last() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_alice", 4, 6)
    feed(w, messages(d))
    assert w.stored == [d.demo_id]
    (row,) = tables.demo_rows(d.demo_id)
    assert (row["status"], row["frames"], row["events"], row["missing_frames"]) == (COMPLETE, 4, 6, 0)
    assert {r["sha256"] for r in tables.demo_rows(d.demo_id, "frames")} == set(d.shas)
    assert {r["event_id"] for r in tables.demo_rows(d.demo_id, "demonstration_events")} == set(d.event_ids)
    assert sorted(tables.tokens) == sorted(dedup_token(d.demo_id, t) for t in
                                           ("frames", "demonstration_events", "demonstrations"))
    assert len(store.objects) == 4
    assert w.pending.count() == 0 and w.pending.commit_offset(0) == 5


def test_frames_outside_a_pending_manifest_are_discarded_and_duplicates_stored_once() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_bob", 3)
    other = make_demo("pk_bob", 2, seed=9)
    # a frame before its header, a frame of a demonstration never opened, a header twice,
    # a frame twice, a frame under another person's key
    spoofed = ([(k, v if k != "ht-employee-key" else b"pk_eve") for k, v in d.frames[1][0]], d.frames[1][1])
    feed(w, [d.frames[0], other.frames[0], d.header, d.header, d.frames[0], d.frames[0], spoofed,
             d.frames[1], d.frames[2]])
    assert store.puts == 3
    assert len(tables.demo_rows(d.demo_id, "frames")) == 3
    assert tables.demo_rows(other.demo_id) == []
    assert not any(k.startswith("frames/pk_eve/") for k in store.objects)


def test_frame_bytes_must_match_their_sha256() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_bob", 2)
    feed(w, [d.header, (d.frames[0][0], d.frames[0][1] + b"x"), d.frames[1]])
    assert store.puts == 1 and w.pending.count() == 1 and tables.rows["frames"] == []


def test_a_replayed_or_reuploaded_complete_demonstration_is_skipped() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    d = make_demo("pk_carol", 3)
    feed(writer(store, tables), messages(d))
    puts, inserts = store.puts, tables.inserts
    w2 = writer(store, tables)  # a restart, or the agent re-uploading after a kill
    feed(w2, messages(d) + messages(d), start=10)
    assert (store.puts, tables.inserts) == (puts, inserts)
    assert w2.pending.count() == 0 and w2.pending.commit_offset(0) == 18


def test_a_missing_frame_holds_the_demonstration_then_records_it_incomplete_without_its_objects() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    clock = Clock()
    w = writer(store, tables, clock)
    done = make_demo("pk_dan", 2, seed=1)
    d = make_demo("pk_dan", 4, seed=2)
    # the complete demonstration shares an image with the held one: it must survive the deletion
    shared_hdr = parse_header(*done.header)
    shared_key = shared_hdr.expected[done.shas[0]]
    feed(w, messages(done))
    feed(w, [d.header, d.frames[0], d.frames[1], d.frames[3]], start=3)
    store.objects[shared_key] = done.frames[0][1]
    assert w.pending.count() == 1 and w.pending.commit_offset(0) == 3  # held at its header
    clock.now += HOLD_S - 1
    assert w.expire() == 0 and tables.demo_rows(d.demo_id) == []
    clock.now += 1
    assert w.expire() == 1
    (row,) = tables.demo_rows(d.demo_id)
    assert (row["status"], row["missing_frames"], row["reason"]) == (INCOMPLETE, 1, HOLD_EXPIRED)
    assert tables.demo_rows(d.demo_id, "frames") == tables.demo_rows(d.demo_id, "demonstration_events") == []
    held_keys = set(parse_header(*d.header).expected.values())
    assert not held_keys & set(store.objects)
    assert shared_key in store.objects
    assert w.pending.commit_offset(0) == 7


def test_object_writes_are_retried_and_no_row_precedes_its_object() -> None:
    store = FakeStore(fail_puts=3)
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_erin", 2)
    feed(w, messages(d))
    assert store.puts == 5 and w.stored == [d.demo_id]


def test_rows_clickhouse_refuses_leave_an_incomplete_row_and_no_orphans() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    tables.refuse = {"demonstration_events"}
    w = writer(store, tables)
    d = make_demo("pk_fay", 2)
    feed(w, messages(d))
    (row,) = tables.demo_rows(d.demo_id)
    assert row["status"] == INCOMPLETE and row["reason"].startswith("refused:")
    assert tables.discarded == [d.demo_id] and tables.demo_rows(d.demo_id, "frames") == []
    assert store.objects == {}


def test_a_demonstration_without_frames_completes_on_its_header() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_gus", 0, 3)
    feed(w, [d.header])
    assert tables.demo_rows(d.demo_id)[0]["status"] == COMPLETE
    assert len(tables.demo_rows(d.demo_id, "demonstration_events")) == 3


def test_a_header_whose_events_name_another_person_is_refused() -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    d = make_demo("pk_hal", 1)
    other = make_demo("pk_ivy", 1, seed=3)
    feed(w, [(d.header[0], other.header[1]), d.frames[0]])
    assert store.puts == 0 and tables.rows["demonstrations"] == []


# ------------------------------------------------------------------ properties


@given(st.lists(st.tuples(st.sampled_from(["open", "close", "advance"]), st.integers(0, 2), st.integers(0, 5)),
                max_size=60))
def test_the_committed_offset_never_passes_a_pending_demonstrations_first_offset(
        ops: list[tuple[str, int, int]]) -> None:
    pend = Pending()
    offsets = {0: 0, 1: 0, 2: 0}
    for op, p, k in ops:
        if op == "open":
            h = parse_header(*make_demo(f"pk_{k}", 1, 0, seed=k).header)
            pend.open(p, offsets[p], h, 0.0)
            pend.advance(p, offsets[p])
            offsets[p] += 1
        elif op == "advance":
            pend.advance(p, offsets[p])
            offsets[p] += 1
        else:
            demos = list(pend.demos.get(p, {}).values())
            if demos:
                pend.close(demos[k % len(demos)])
        for q in range(3):
            at = pend.commit_offset(q)
            firsts = [d.first_offset for d in pend.demos.get(q, {}).values()]
            if at is None:
                continue
            assert at <= offsets[q]
            assert all(at <= f for f in firsts)
            assert firsts or at == offsets[q]
    assert safe_commit(7, []) == 7 and safe_commit(7, [9, 3]) == 3


_DEMOS = [make_demo(f"pk_{e}", n, 2, seed=s) for e, n, s in
          [("a", 3, 1), ("a", 2, 2), ("b", 1, 3), ("b", 0, 4), ("c", 3, 5)]]


@st.composite
def runs(draw: st.DrawFn) -> tuple[list[tuple[Any, bytes]], dict[bytes, bool], str, int]:
    """Accepted-topic contents: demonstrations interleaved (each in order, header first), some
    with a frame that never arrives, some replayed or re-uploaded; and a crash point."""
    rnd = draw(st.randoms(use_true_random=False))
    chosen = draw(st.lists(st.sampled_from(range(len(_DEMOS))), min_size=1, max_size=4, unique=True))
    streams: list[list[tuple[Any, bytes]]] = []
    complete: dict[bytes, bool] = {}
    for i in chosen:
        d = _DEMOS[i]
        frames = list(d.frames)
        lose = bool(frames) and draw(st.booleans())
        if lose:
            frames.pop(rnd.randrange(len(frames)))
        seq = [d.header, *frames]
        if draw(st.booleans()):  # a duplicate of one message, later
            seq.insert(rnd.randrange(1, len(seq) + 1), rnd.choice(seq))
        if draw(st.booleans()):  # a whole re-upload
            seq += [d.header, *frames]
        streams.append(seq)
        complete[d.demo_id] = not lose
    merged: list[tuple[Any, bytes]] = []
    while any(streams):
        s = rnd.choice([s for s in streams if s])
        merged.append(s.pop(0))
    return merged, complete, draw(st.sampled_from(["put", "insert", "none"])), draw(st.integers(1, 12))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(runs())
def test_crash_anywhere_then_replay_from_the_committed_offset_stores_every_demonstration_exactly_once(
        run: tuple[list[tuple[Any, bytes]], dict[bytes, bool], str, int]) -> None:
    msgs, complete, where, at = run
    store = FakeStore()
    tables = FakeTables(store)
    clock = Clock()
    w1 = writer(store, tables, clock)
    if where == "put":
        store.crash_at_put = at
    elif where == "insert":
        tables.crash_at_insert = at
    committed = 0
    try:
        for off, (h, v) in enumerate(msgs):
            w1.handle(0, off, h, v)
            committed = w1.pending.commit_offset(0) or committed
            firsts = [d.first_offset for d in w1.pending.demos.get(0, {}).values()]
            assert all(committed <= f for f in firsts)
    except Crash:
        pass
    store.crash_at_put = tables.crash_at_insert = None
    w2 = writer(store, tables, clock)
    feed(w2, msgs[committed:], start=committed)
    clock.now += HOLD_S
    w2.expire()
    assert w2.pending.count() == 0
    for demo_id, whole in complete.items():
        rows = tables.demo_rows(demo_id)
        hdr = parse_header(*next(d for d in _DEMOS if d.demo_id == demo_id).header)
        frames = tables.demo_rows(demo_id, "frames")
        events = tables.demo_rows(demo_id, "demonstration_events")
        if whole:
            assert [r["status"] for r in rows] == [COMPLETE]
            assert sorted(r["sha256"] for r in frames) == sorted(hdr.expected)
            assert len(events) == len({r["event_id"] for r in events}) == 2
            for r in frames:
                assert hashlib.sha256(store.objects[r["object_key"]]).hexdigest() == r["sha256"]
        else:
            assert {r["status"] for r in rows} == {INCOMPLETE}
            assert frames == events == []
            assert not set(hdr.expected.values()) & set(store.objects)


def test_every_object_key_is_under_the_persons_pseudonym_prefix() -> None:
    rng = random.Random(4)
    for i in range(20):
        d = make_demo(f"pk_{rng.randrange(10**6)}", 2, seed=i)
        h = parse_header(*d.header)
        assert all(k.startswith(f"frames/{d.employee_key}/") for k in h.expected.values())


@pytest.mark.parametrize("part", [b"bogus", None])
def test_messages_without_a_known_part_are_skipped_and_counted(part: bytes | None) -> None:
    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    headers = [("ht-part", part)] if part else []
    w.handle(0, 0, headers, b"x")
    assert w.pending.commit_offset(0) == 1 and tables.inserts == 0


@pytest.mark.parametrize("frame_mb", [1, 8, 64])
def test_the_consumer_fetches_messages_as_large_as_the_largest_frame(frame_mb: int) -> None:
    s = Settings(demo={"max_frame_bytes": frame_mb * 1024 * 1024})
    conf = DemoWriter(s, FakeTables(FakeStore()), FakeStore()).consumer_config()
    frame = s.demo.max_frame_bytes
    assert conf["max.partition.fetch.bytes"] >= frame and conf["fetch.max.bytes"] >= frame
    assert conf["receive.message.max.bytes"] > conf["fetch.max.bytes"]  # librdkafka requires it
    assert conf["group.id"] == s.demo.sink_group_id and conf["enable.auto.commit"] is False


class FakeConsumer:
    """Records what the writer commits (no broker)."""

    def __init__(self) -> None:
        self.commits: list[tuple[int, int]] = []

    def commit(self, offsets: list[Any], asynchronous: bool) -> None:
        self.commits += [(tp.partition, tp.offset) for tp in offsets]


def test_a_revoked_partition_commits_only_up_to_its_pending_header_and_forgets_it() -> None:
    from confluent_kafka import TopicPartition

    store = FakeStore()
    tables = FakeTables(store)
    w = writer(store, tables)
    consumer = FakeConsumer()
    w._consumer = consumer  # type: ignore[assignment]
    done = make_demo("pk_jo", 1, seed=1)
    held = make_demo("pk_jo", 3, seed=2)
    feed(w, [*messages(done), held.header, held.frames[0]], start=10, p=1)
    feed(w, messages(make_demo("pk_kim", 1, seed=3)), p=2)
    w._on_revoke(w._consumer, [TopicPartition(w.topic, 1)])  # type: ignore[arg-type]
    assert (1, 12) in consumer.commits and all(off <= 12 for p, off in consumer.commits if p == 1)
    assert w.pending.get(1, held.demo_id) is None and 1 not in w.pending.position
    # what the old owner still delivers for it is not stored (the new owner replays from 12)
    puts = store.puts
    feed(w, held.frames[1:], start=14, p=1)
    assert store.puts == puts and tables.demo_rows(held.demo_id) == []
