"""The agent's spool and shipper against a real broker that goes away: a dedicated broker (this
module stops and restarts it; the shared session broker is not touched), a stand-in agent
process that is SIGKILLed, and a check that every event captured before the kill arrives once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from handtrace.agent.shipper import Shipper
from handtrace.agent.spool import HEADER_BYTES, RECORD_OVERHEAD, Spool, SpoolEntry
from handtrace.core import codec
from handtrace.core.localbroker import LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.producer import producer_config
from handtrace.core.settings import KafkaSettings
from tests.factories import make_batch
from tests.integration.conftest import start_outage_broker

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CHILD = REPO / "tests" / "spool_child.py"


@pytest.fixture
def broker(outage_broker: LocalBroker) -> LocalBroker:
    """The dedicated broker, running (a test that failed mid-outage may have left it stopped)."""
    start_outage_broker(outage_broker)
    return outage_broker


def make_topic(broker: LocalBroker, partitions: int = 3, **configs: str) -> str:
    name = f"outage-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": broker.bootstrap, "log_level": 0})
    admin.create_topics([NewTopic(name, partitions, 1, config=configs)])[name].result(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        md = admin.list_topics(name, timeout=5).topics.get(name)
        if md is not None and md.error is None and len(md.partitions) == partitions:
            return name
        time.sleep(0.2)
    pytest.fail(f"topic {name} did not appear in metadata")


def conf(broker: LocalBroker) -> dict:
    return producer_config(KafkaSettings(bootstrap_servers=broker.bootstrap))


def event_ids_in(broker: LocalBroker, topic: str) -> Counter[bytes]:
    """Every event id in ``topic`` (all partitions, from the beginning), with multiplicity."""
    c = Consumer({"bootstrap.servers": broker.bootstrap, "group.id": f"check-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "log_level": 0})
    try:
        parts = c.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10, cached=False)[1]
                for p in parts}
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        seen: Counter[bytes] = Counter()
        done = {p for p, hi in ends.items() if hi == 0}
        deadline = time.monotonic() + 60
        while len(done) < len(ends):
            if time.monotonic() > deadline:
                pytest.fail(f"could not read {topic} to its end: {ends}")
            msg = c.poll(0.5)
            if msg is None or msg.error():
                continue
            batch = codec.decode_event_batch(msg.value())
            seen.update(batch.events["event_id"].to_list())
            if msg.offset() + 1 >= ends[msg.partition()]:
                done.add(msg.partition())
        return seen
    finally:
        c.close()


def ship_all(shipper: Shipper, spool: Spool, timeout_s: float) -> None:
    """Ship until the spool is empty and nothing is in flight (or fail)."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = shipper.ship_once(5.0)
        if spool.stats().depth_entries == 0 and r.in_flight == 0:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"spool not drained in {timeout_s}s: {spool.stats()} last={r} {shipper.stats}")
        time.sleep(min(r.next_delay_s, 0.5))


def captured(log: Path) -> tuple[list[list[bytes]], bool, int]:
    """(event ids of each batch the child logged as durable, whether it logged done,
    how many failed ship attempts it logged)."""
    batches, done, failed = [], False, 0
    # Complete lines only: the log is read while the child writes it (and a SIGKILL can cut a
    # line short), so the text after the last newline may be half a line.
    for line in log.read_text().split("\n")[:-1] if log.exists() else []:
        parts = line.split(" ")
        if parts[0] == "captured" and len(parts) == 3:
            batches.append([bytes.fromhex(h) for h in parts[2].split(",")])
        elif parts[0] == "done":
            done = True
        elif parts[0] == "attempt" and parts[1] == "1":
            failed += 1
    return batches, done, failed


@pytest.mark.timeout(300)
def test_sigkill_during_outage_every_event_arrives_once(broker: LocalBroker, tmp_path: Path) -> None:
    topic = make_topic(broker)
    spool_dir = tmp_path / "spool"
    # 1. Broker up: the agent ships a first lot, which is acked.
    first: list[bytes] = []
    with Spool(spool_dir, max_bytes=64 << 20, segment_bytes=64 << 10) as spool:
        shipper = Shipper(spool, conf(broker), {"events": topic}, delivery_timeout_s=10)
        for i in range(10):
            payload, ids = make_batch("emp-child", 5, seed=i, seq=spool.next_seq, device_id="dev-child")
            spool.append(SpoolEntry("events", b"emp-child", payload, events=len(ids)))
            first += ids
        ship_all(shipper, spool, 60)
        shipper.close()
    # 2. Broker down; the agent captures and tries to ship, and is killed with SIGKILL.
    broker.stop()
    log = tmp_path / "child.log"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = spawn_owned([sys.executable, str(CHILD), str(spool_dir), broker.bootstrap, topic, str(log),
                         "--batches", "40"], env=env, stdout=subprocess.DEVNULL,
                        stderr=open(tmp_path / "child.err", "wb"), start_new_session=True)  # noqa: SIM115
    try:
        deadline = time.monotonic() + 90
        while True:
            batches, done, failed = captured(log)
            if done and failed >= 2:
                break
            if child.poll() is not None:
                pytest.fail(f"the child exited with {child.returncode}:\n{(tmp_path / 'child.err').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"the child did not capture and fail to ship in time: done={done} failed={failed}")
            time.sleep(0.1)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    batches, _, failed = captured(log)
    before_kill = [e for b in batches for e in b]
    assert len(batches) >= 40 and failed >= 2
    # 3. Broker back (same ports, same data); a new agent on the same spool ships everything.
    start_outage_broker(broker)
    with Spool(spool_dir, max_bytes=64 << 20, segment_bytes=64 << 10) as spool:
        st = spool.stats()
        assert st.depth_entries >= len(batches), st
        shipper = Shipper(spool, conf(broker), {"events": topic}, delivery_timeout_s=10)
        ship_all(shipper, spool, 120)
        shipper.close()
        assert not spool.stats().dropped_entries
    seen = event_ids_in(broker, topic)
    dupes = {e.hex(): n for e, n in seen.items() if n > 1}
    assert not dupes, f"{len(dupes)} events arrived more than once"
    missing = [e for e in first + before_kill if e not in seen]
    assert not missing, f"{len(missing)} of {len(first) + len(before_kill)} captured events never arrived"
    # The kill may land between a durable append and its log line: at most one batch extra.
    extra = set(seen) - set(first) - set(before_kill)
    assert len(extra) <= 7, f"{len(extra)} events arrived that the child never logged as captured"


@pytest.mark.timeout(240)
def test_outage_in_process_no_duplicates(broker: LocalBroker, tmp_path: Path) -> None:
    """The same shipper rides out an outage: messages librdkafka gave up on are re-sent from
    the spool once, and none that it still held are sent twice."""
    topic = make_topic(broker)
    expected: list[bytes] = []
    with Spool(tmp_path / "spool", max_bytes=64 << 20, segment_bytes=64 << 10) as spool:
        shipper = Shipper(spool, conf(broker), {"events": topic}, delivery_timeout_s=4,
                          backoff_base_s=0.2, backoff_max_s=1.0, stats_interval_s=0.5)

        def capture(n: int) -> None:
            for _ in range(n):
                payload, ids = make_batch("emp-a", 5, seed=spool.next_seq, seq=spool.next_seq)
                spool.append(SpoolEntry("events", b"emp-a", payload, events=len(ids)))
                expected.extend(ids)

        capture(10)
        ship_all(shipper, spool, 60)
        broker.stop()
        capture(10)
        retries = 0
        deadline = time.monotonic() + 30
        while retries < 3 and time.monotonic() < deadline:  # through librdkafka's own timeout
            r = shipper.ship_once(5.0)
            retries += r.retry
            assert r.entries_sent == 0
            time.sleep(min(r.next_delay_s, 0.5))
        assert retries >= 3 and shipper.stats.errors.get("_MSG_TIMED_OUT", 0) >= 10, shipper.stats
        capture(10)
        start_outage_broker(broker)
        ship_all(shipper, spool, 120)
        shipper.close()
        assert shipper.stats.entries_sent == 30
        assert shipper.stats.producer_restarts == 0
        # librdkafka's own count of bytes on the wire (compressed, with protocol overhead).
        assert shipper.stats.wire_bytes > 0
    seen = event_ids_in(broker, topic)
    assert sorted(seen) == sorted(expected)
    assert set(seen.values()) == {1}


@pytest.mark.timeout(180)
def test_corrupt_record_is_quarantined_and_shipping_goes_on(broker: LocalBroker, tmp_path: Path) -> None:
    topic = make_topic(broker)
    spool_dir = tmp_path / "spool"
    ids_by_seq: dict[int, list[bytes]] = {}
    with Spool(spool_dir, max_bytes=64 << 20, segment_bytes=64 << 10) as spool:
        for _ in range(12):
            payload, ids = make_batch("emp-b", 4, seed=spool.next_seq, seq=spool.next_seq)
            ids_by_seq[spool.append(SpoolEntry("events", b"emp-b", payload, events=4))] = ids
    seg = next(spool_dir.glob("seg-main-*.htsp"))
    data = bytearray(seg.read_bytes())
    # Flip one byte inside the value of the 5th record (a bit rot on disk).
    pos = HEADER_BYTES
    for _ in range(4):
        pos += RECORD_OVERHEAD + int.from_bytes(data[pos : pos + 4], "little")
    data[pos + RECORD_OVERHEAD + 40] ^= 0xFF
    seg.write_bytes(bytes(data))
    with Spool(spool_dir, max_bytes=64 << 20, segment_bytes=64 << 10) as spool:
        assert spool.stats().quarantined == 1
        shipper = Shipper(spool, conf(broker), {"events": topic}, delivery_timeout_s=10)
        ship_all(shipper, spool, 60)
        shipper.close()
        assert shipper.stats.entries_sent == 11
    assert len(list((spool_dir / "quarantine").iterdir())) == 1
    seen = event_ids_in(broker, topic)
    want = [e for s, ids in ids_by_seq.items() if s != 5 for e in ids]
    assert sorted(seen) == sorted(want)


@pytest.mark.timeout(180)
def test_payload_the_broker_rejects_is_dead_lettered(broker: LocalBroker, tmp_path: Path) -> None:
    """MSG_SIZE_TOO_LARGE is not retryable: the entry goes to deadletter/, is counted, and the
    entries after it are delivered (the idempotent producer carries on)."""
    topic = make_topic(broker, partitions=1, **{"max.message.bytes": "20000"})
    with Spool(tmp_path / "spool", max_bytes=64 << 20, segment_bytes=256 << 10) as spool:
        before, before_ids = make_batch("emp-c", 3, seed=1, seq=1)
        spool.append(SpoolEntry("events", b"emp-c", before, events=3))
        spool.append(SpoolEntry("events", b"emp-c", os.urandom(60_000), events=9))
        after, after_ids = make_batch("emp-c", 3, seed=3, seq=3)
        spool.append(SpoolEntry("events", b"emp-c", after, events=3))
        shipper = Shipper(spool, conf(broker) | {"compression.type": "none"}, {"events": topic},
                          delivery_timeout_s=10)
        ship_all(shipper, spool, 60)
        shipper.close()
        st = spool.stats()
        assert st.deadlettered_entries == {"MSG_SIZE_TOO_LARGE": 1}
        assert st.deadlettered_events == 9
        assert shipper.stats.entries_sent == 2
        assert shipper.stats.producer_restarts == 0
    assert (tmp_path / "spool" / "deadletter" / "deadletter.htsp").stat().st_size > 60_000
    assert sorted(event_ids_in(broker, topic)) == sorted(before_ids + after_ids)
