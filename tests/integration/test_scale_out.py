"""Scale-out on the real broker (issue #15, ADR 0020): three stream workers and two sink processes
on one topic set; once the three share the partitions, data flows, one worker is SIGKILLed
mid-stream and another added. Every accepted event is
stored exactly once (the union of the two sinks' embedded data dirs, merges disabled so a
duplicate would stay visible) and pauses and exemptions still hold after the rebalance, for
employees on every partition (so whichever partitions moved, some carry controlled people).

Embedded engine: each sink has its own data dir and owns a fixed set of partitions
(``sink.partitions``), because a partition's exactly-once ledger lives in the dir that wrote it.
"""

from __future__ import annotations

import random
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handtrace.control.publish import control_record, pause_record, publish
from handtrace.core import clickhouse, codec, ids
from handtrace.core.admin import group_lag
from handtrace.core.clock import now_us
from handtrace.core.partitioning import partition_for_key
from handtrace.core.rows import from_ipc
from handtrace.core.settings import Settings
from handtrace.sink.schema import migrate
from handtrace.stream.steps.pseudonymise import pseudonym
from tests.conftest import free_port
from tests.factories import TEST_POLICY, make_event
from tests.integration.conftest import (
    StreamWorker,
    producer,
    publish_policy,
    start_sink_process,
    stream_metric,
    topic_messages,
    topics_of,
    wait_for,
)

# Broker start (shared), six processes on two cores, two rebalances: longer than the default 300 s.
pytestmark = pytest.mark.timeout(600)

S = 1_000_000
PARTITIONS = 6
SINK_PARTITIONS = ([0, 1, 2], [3, 4, 5])
BULK_EMPLOYEES = 17
BULK_BATCHES = 150
PER_BATCH = 120


def _batch(employee: str, t0: int, n: int, step_us: int, seed: int) -> tuple[bytes, list[bytes], list[int]]:
    """(payload, event ids, capture times) of ``n`` events from ``t0`` every ``step_us``."""
    rng = random.Random(seed)
    events = [make_event(("pointer_move", "click", "scroll")[i % 3], t0 + i * step_us, rng) for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": f"d-{employee}",
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": t0 + n * step_us}
    return (codec.encode_event_batch(header, events), [e["event_id"] for e in events],
            [e["captured_at_us"] for e in events])


def _one_per_partition(prefix: str) -> list[str]:
    """Employee ids whose keys land on every partition (the first found for each)."""
    found: dict[int, str] = {}
    i = 0
    while len(found) < PARTITIONS:
        name = f"{prefix}{i}"
        found.setdefault(partition_for_key(name.encode(), PARTITIONS), name)
        i += 1
    return [found[p] for p in range(PARTITIONS)]


def _variant(s: Settings, **parts: dict[str, Any]) -> Settings:
    """``s`` with some fields of its sections replaced (one process's own ports, dirs...)."""
    update: dict[str, Any] = {}
    for section, fields in parts.items():
        if section == "state_dir":
            update["state_dir"] = fields
        else:
            update[section] = getattr(s, section).model_copy(update=fields)
    return s.model_copy(update=update)


_GROUP_SEEN: list[str] = []  # the last describe of the stream's group, for the failure message


def _stable_members(s: Settings, topic: str) -> int:
    """Members of the stream's group holding partitions of ``topic`` once it is Stable (else 0)."""
    from confluent_kafka.admin import AdminClient

    _GROUP_SEEN[:] = []
    # The client must outlive the request: a temporary AdminClient is destroyed as soon as
    # describe_consumer_groups returns, and its future then never completes (TimeoutError every
    # time: the "stall" of runs 6, 7 and 8 in ADR 0020 was this probe, not the group).
    admin = AdminClient(s.kafka.librdkafka())
    try:
        desc = admin.describe_consumer_groups([s.stream.app_id])[s.stream.app_id].result(timeout=10)
    except Exception as e:  # noqa: BLE001 -- the coordinator may still be loading
        _GROUP_SEEN.append(f"describe failed: {type(e).__name__}: {e}")
        return 0
    holding = sum(1 for m in desc.members if any(tp.topic == topic for tp in m.assignment.topic_partitions))
    _GROUP_SEEN.append(f"group {desc.state}, {len(desc.members)} members, {holding} holding {topic}")
    if not str(desc.state).endswith("STABLE"):
        return 0
    return holding


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[dict[str, list[Any]]]:
    """Workers and sink processes started by the test; all stopped at teardown (they are owned
    children too: core/procs.spawn_owned kills them if the test process dies)."""
    owned: dict[str, list[Any]] = {"workers": [], "sinks": []}
    yield owned
    for w in owned["workers"]:
        w.stop()
    for proc in owned["sinks"]:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)


def test_three_workers_two_sinks_a_kill_and_a_join_store_every_event_once(  # type: ignore[no-untyped-def]
    settings_factory, processes, tmp_path
) -> None:
    s = settings_factory(topics={"partitions": PARTITIONS}, stream={"micro_batch_messages": 2},
                         sink={"flush_interval_s": 0.3, "poll_messages": 50})
    t = topics_of(s)
    db = s.clickhouse.database
    key = s.stream.pseudonym_key.get_secret_value().encode()

    # Two sinks, each with its own embedded data dir and its own partitions.
    sinks = [_variant(s, state_dir=tmp_path / f"sink-{i}", sink={"partitions": parts})
             for i, parts in enumerate(SINK_PARTITIONS)]
    for ss in sinks:
        dsn = ss.clickhouse_dsn()
        c = clickhouse.connect(dsn)
        migrate(c, db)
        # No merges: a duplicate row would stay visible instead of being collapsed by the engine.
        c.command(f"ALTER TABLE {db}.events MODIFY SETTING "
                  "max_bytes_to_merge_at_max_space_in_pool = 1, max_bytes_to_merge_at_min_space_in_pool = 1")
        clickhouse.close(dsn)
    sink_logs = [tmp_path / f"sink-{i}.log" for i in range(len(sinks))]
    processes["sinks"] += [start_sink_process(ss, log) for ss, log in zip(sinks, sink_logs, strict=True)]

    # Controls before any data: a pause and an exemption for an employee on every partition.
    publish_policy(s, TEST_POLICY)
    t0 = now_us() - 600 * S  # ten minutes ago: all data below is "late"
    paused, exempt = _one_per_partition("emp-p"), _one_per_partition("emp-x")
    for e in exempt:
        publish(s, control_record("exemption_grant", employee_id=e, actor="hr-1", role="hr", reason="test",
                                  at_us=t0 + 5 * S))
    for e in paused:
        publish(s, pause_record(e, 10 / 60, actor=e, at_us=t0 + 10 * S))  # [t0+10s, t0+20s)

    def start_worker() -> tuple[StreamWorker, Settings]:
        ws = _variant(s, stream={"metrics_port": free_port()})
        w = StreamWorker(ws, tmp_path / f"worker-{len(processes['workers'])}.log")
        w.start()
        processes["workers"].append(w)
        return w, ws

    workers = [start_worker() for _ in range(3)]

    def tails() -> str:
        out = [f"--- {w.log.name}\n{w.tail()}" for w, _ in workers]
        out += [f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-20:])
                for log in sink_logs if log.exists()]
        return "\n".join(out)

    def folded(kind: str) -> float:
        return sum(max(stream_metric(ws, f'handtrace_stream_controls_total{{kind="{kind}"}}'), 0.0)
                   for w, ws in workers if w.proc and w.proc.poll() is None)

    wait_for(lambda: folded("pause_start") >= PARTITIONS and folded("exemption_grant") >= PARTITIONS, 120,
             "the workers to fold every pause and exemption", tails)
    # All three in the group with partitions before any data: the rebalances under test are the
    # kill and the join below (ADR 0020 records every run).
    wait_for(lambda: _stable_members(s, t.events) == 3, 120, "the three workers to share the partitions",
             lambda: f"last seen: {_GROUP_SEEN}\n{tails()}")

    margin = int(s.stream.clock_skew_margin_s * S)
    accepted: list[bytes] = []
    # (partition, offset) of every raw batch that has rows to store, for the diagnosis below.
    placed: dict[tuple[int, int], int] = {}

    def produce(emp: str, payload: bytes, keep: int) -> None:
        def on(err: Any, m: Any) -> None:
            assert err is None, err
            placed[(m.partition(), m.offset())] = keep
        p.produce(t.events, key=emp.encode(), value=payload, on_delivery=on)

    stored_times: dict[str, list[int]] = {}  # expected capture times of the controlled employees
    p = producer(s)

    def send_controlled(wave: int) -> None:
        """Batches of the paused and exempt employees: wave 0 spans the windows, wave 1 (after the
        rebalance) is late data inside the pause and after the exemption (all dropped)."""
        for i, e in enumerate(paused):
            start = t0 if wave == 0 else t0 + 12 * S
            payload, ids_, times = _batch(e, start, 300 if wave == 0 else 50, S // 10, 1000 * wave + i)
            keep = [(x, i_) for x, i_ in zip(times, ids_, strict=True)
                    if not (t0 + 10 * S - margin <= x < t0 + 20 * S + margin)]
            produce(e, payload, len(keep))
            stored_times.setdefault(e, []).extend(x for x, _ in keep)
            accepted.extend(i_ for _, i_ in keep)
        for i, e in enumerate(exempt):
            start = t0 if wave == 0 else t0 + 30 * S
            payload, ids_, times = _batch(e, start, 100 if wave == 0 else 40, S // 10, 2000 + 1000 * wave + i)
            keep = [(x, i_) for x, i_ in zip(times, ids_, strict=True) if x < t0 + 5 * S - margin]
            produce(e, payload, len(keep))
            stored_times.setdefault(e, []).extend(x for x, _ in keep)
            accepted.extend(i_ for _, i_ in keep)

    def send_bulk(first: int, n: int) -> None:
        for b in range(first, first + n):
            emp = f"emp-{b % BULK_EMPLOYEES}"
            payload, ids_, _ = _batch(emp, now_us() - 5 * S, PER_BATCH, 1000, 10_000 + b)
            produce(emp, payload, len(ids_))
            accepted.extend(ids_)

    send_controlled(0)
    send_bulk(0, BULK_BATCHES)
    p.flush(30)

    # SIGKILL one worker once the three have made progress (mid-stream), then add a fourth.
    before = group_lag(s.kafka, s.stream.app_id, t.events)
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) < before * 0.8, 120,
             "the workers to make progress", tails)
    victim, _ = workers[0]
    victim.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    victim.proc.wait(10)  # type: ignore[union-attr]
    assert group_lag(s.kafka, s.stream.app_id, t.events) > 0, "killed too late: the stream had caught up"
    workers.append(start_worker())

    # Late data for the controlled employees and more bulk, after the kill and the join.
    send_controlled(1)
    send_bulk(BULK_BATCHES, BULK_BATCHES // 3)
    p.flush(30)

    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
             and group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 300, "stream and sinks to catch up", tails)
    time.sleep(1.0)  # the sinks' last flushes are committed before their offsets; let them settle
    # Which raw batches with rows to store reached the accepted topic (tells a stream loss from a sink one).
    published = {(int(sp), int(so)) for m in topic_messages({"bootstrap.servers": s.kafka.bootstrap()}, t.stored)
                 for sp, so in zip(*(from_ipc(m.value()).column(c).to_pylist()
                                     for c in ("source_partition", "source_offset")), strict=True)}
    never_published = sorted(k for k, n in placed.items() if n and k not in published)
    for proc in processes["sinks"]:
        proc.send_signal(signal.SIGTERM)
    for proc in processes["sinks"]:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a sink did not stop on SIGTERM\n{tails()}")

    # The union over the two data dirs: every accepted event exactly once, each dir only its partitions.
    rows: list[tuple[Any, ...]] = []
    for ss, parts in zip(sinks, SINK_PARTITIONS, strict=True):
        dsn = ss.clickhouse_dsn()
        c = clickhouse.connect(dsn)
        try:
            got = c.query(f"SELECT event_id, employee_key, toUnixTimestamp64Micro(captured_at), source_partition "
                          f"FROM {db}.events").result_rows
            active = c.query(f"SELECT count() FROM system.parts WHERE database = '{db}' AND table = 'events' "
                             "AND active").result_rows[0][0]
        finally:
            clickhouse.close(dsn)
        assert got, f"the sink of partitions {parts} stored nothing"
        assert {r[3] for r in got} <= set(parts), f"a sink stored rows of partitions it does not own: {parts}"
        assert active > 1, "merges were meant to be off"
        rows += got
    assert not never_published, (
        f"the stream committed {len(never_published)} raw batches with accepted rows without publishing them "
        f"(partition, offset): {never_published[:40]}\n{tails()}")
    ids_stored = [r[0].bytes for r in rows]
    assert len(ids_stored) == len(set(ids_stored)), f"{len(ids_stored) - len(set(ids_stored))} duplicate rows"
    assert set(ids_stored) == set(accepted), (f"{len(set(accepted) - set(ids_stored))} accepted events missing, "
                                              f"{len(set(ids_stored) - set(accepted))} unexpected")

    # Pauses and exemptions held on every partition, before and after the rebalance.
    by_key: dict[str, list[int]] = {}
    for _id, k, ts, _p in rows:
        by_key.setdefault(k, []).append(ts)
    for e in paused + exempt:
        got_times = sorted(by_key.get(pseudonym(key, "employee", e), []))
        assert got_times == sorted(stored_times[e]), f"{e}: stored capture times differ from the controls' verdict"
    for e in paused:
        inside = [x for x in by_key.get(pseudonym(key, "employee", e), []) if t0 + 10 * S <= x < t0 + 20 * S]
        assert not inside, f"{e}: events inside the pause stored"
    for e in exempt:
        assert not [x for x in by_key.get(pseudonym(key, "employee", e), []) if x >= t0 + 5 * S], \
            f"{e}: events after the exemption stored"


def test_a_sink_listing_a_partition_the_topic_lacks_stops_at_start(settings_factory, tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()  # 3 partitions
    bad = _variant(s, sink={"partitions": [2, 7]})
    log = tmp_path / "sink.log"
    proc = start_sink_process(bad, log)
    try:
        code = proc.wait(120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = log.read_text(errors="replace")
    assert code == 2, out[-2000:]
    assert f"handtrace sink: sink.partitions [7] not in topic {topics_of(s).stored} (it has 3 partitions)" in out
    assert "Traceback" not in out
