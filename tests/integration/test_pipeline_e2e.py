"""Batches through the real broker, the real Faust worker and the sink into real ClickHouse."""

from __future__ import annotations

import urllib.request
import uuid

from confluent_kafka import Consumer

from handtrace.core import clickhouse, codec, schemas
from tests.factories import make_batch
from tests.integration.conftest import producer, topics_of, wait_for


def _stored_ids(s) -> list[bytes]:  # type: ignore[no-untyped-def]
    c = clickhouse.connect(s.clickhouse_dsn())
    rows = c.query(f"SELECT event_id FROM {s.clickhouse.database}.events").result_rows
    return [r[0].bytes for r in rows]


def test_every_event_lands_exactly_once(settings_factory, stream_worker, sink_factory) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)
    sink = sink_factory(s)
    p = producer(s)
    sent: list[bytes] = []
    for b in range(60):
        payload, event_ids = make_batch(f"emp-{b % 9}", 250, seed=b, seq=b)
        p.produce(t.events, key=f"emp-{b % 9}".encode(), value=payload)
        sent += event_ids
    p.flush(30)

    wait_for(lambda: sink.sink.rows_inserted >= len(sent), 120, f"{len(sent)} rows in ClickHouse",
             worker.tail)
    stored = _stored_ids(s)
    assert len(stored) == len(sent)
    assert len(set(stored)) == len(stored), "duplicate event ids stored"
    assert set(stored) == set(sent)

    # Analyst table carries pseudonyms only.
    c = clickhouse.connect(s.clickhouse_dsn())
    keys = {r[0] for r in c.query(f"SELECT DISTINCT employee_key FROM {s.clickhouse.database}.events").result_rows}
    assert len(keys) == 9
    assert not any(k.startswith("emp-") for k in keys)


def test_malformed_messages_are_set_aside_and_the_worker_keeps_going(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, sink_factory
) -> None:
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)
    sink = sink_factory(s)
    p = producer(s)
    good, good_ids = make_batch("emp-1", 100, seed=1)
    unknown = b"\xc3\x01" + (0x1234567890ABCDEF).to_bytes(8, "little") + good[10:]
    control = codec.encode_record("control_event", {
        "control_id": uuid.uuid4().bytes, "kind": "pause_start", "employee_id": "emp-1",
        "occurred_at_us": 1, "actor": "emp-1", "actor_role": "employee", "reason": "",
    })
    bad = {
        "garbage": b"\x00garbage bytes, not avro at all",
        "truncated": good[: len(good) // 2],
        "unknown_schema": unknown,
        "wrong_subject": control,
    }
    assert schemas.by_fingerprint().get(0x1234567890ABCDEF) is None
    for name, payload in bad.items():
        p.produce(t.events, key=b"emp-1", value=payload, headers=[("case", name.encode())])
    after, after_ids = make_batch("emp-2", 100, seed=2)
    p.produce(t.events, key=b"emp-1", value=good)
    p.produce(t.events, key=b"emp-2", value=after)
    p.flush(30)

    wait_for(lambda: sink.sink.rows_inserted >= 200, 120, "the good batches around the bad ones", worker.tail)
    assert sorted(_stored_ids(s)) == sorted(good_ids + after_ids)

    consumer = Consumer({**s.kafka.librdkafka(), "group.id": f"dlq-{uuid.uuid4().hex}",
                         "auto.offset.reset": "earliest"})
    consumer.subscribe([t.deadletter])
    reasons: dict[str, str] = {}
    deadline_msgs = []
    for _ in range(60):
        for m in consumer.consume(10, timeout=1.0):
            if m.error() is None:
                deadline_msgs.append(m)
        if len(deadline_msgs) >= len(bad):
            break
    consumer.close()
    for m in deadline_msgs:
        h = dict(m.headers() or [])
        reasons[h["ht-reason"].decode()] = h.get("ht-detail", b"").decode()
        assert m.value() in bad.values(), "dead letter keeps the original bytes"
    assert set(reasons) == {"bad_magic", "truncated", "unknown_schema", "wrong_subject"}, reasons

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{s.stream.metrics_port}/metrics", timeout=10).read().decode()  # noqa: S310
    for reason in reasons:
        assert f'handtrace_stream_deadletters_total{{reason="{reason}"}} 1.0' in metrics
    assert worker.proc is not None and worker.proc.poll() is None, "worker must still run"
