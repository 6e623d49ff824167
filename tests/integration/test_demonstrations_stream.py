"""Demonstrations through the real Faust worker and the real broker: the header and its frames
reach the accepted topic under pseudonyms, header first, enforced (a pause inside the
demonstration removes its frames and events end to end, frames up to several MiB pass the
worker's fetch and produce limits), and garbled messages are dead-lettered while the worker
goes on."""

from __future__ import annotations

import json
from typing import Any

from confluent_kafka import Producer

from handtrace.control.publish import pause_record, publish
from handtrace.core.clock import now_us
from handtrace.core.producer import producer_config
from handtrace.core.rows import from_ipc
from handtrace.core.settings import Settings
from tests.factories import demo_frame, frame_message, make_demonstration
from tests.integration.conftest import stream_metric, topic_messages, topics_of, wait_for

S = 1_000_000
EMP, DEV = "emp-demo-4f1a", "dev-demo-77c0"


def big_producer(s: Settings) -> Producer:
    """The agent's upload producer: idempotent, frame-sized messages."""
    return Producer(producer_config(s.kafka, **{"message.max.bytes": s.demo.max_frame_bytes, "linger.ms": 10}))


def send(p: Producer, topic: str, messages: list[tuple[bytes, list[tuple[str, bytes]]]], key: str = EMP) -> None:
    for value, headers in messages:
        p.produce(topic, key=key.encode(), value=value, headers=headers)
    assert p.flush(60) == 0


def accepted(s: Settings) -> list[Any]:
    return topic_messages({"bootstrap.servers": s.kafka.bootstrap()}, topics_of(s).demonstrations_accepted)


def upload(t0: int, frames: list[dict[str, Any]], **kw: Any) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    """The header and frame messages, stamped ``ht-sent-at`` now (the agent's clock is right)."""
    value, headers = make_demonstration(EMP, frames, t0_us=t0, device_id=DEV, span_us=120 * S, n_events=120, **kw)
    demo_id = dict(headers)["ht-demo-id"]
    sent = now_us()
    headers = [(k, str(sent).encode() if k == "ht-sent-at" else v) for k, v in headers]
    return [(value, headers), *(frame_message(f, demo_id, DEV, sent) for f in frames)]


def test_a_demonstration_is_enforced_end_to_end(settings_factory, stream_worker) -> None:  # type: ignore[no-untyped-def]
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)
    t0 = now_us() - 600 * S
    publish(s, pause_record(EMP, 1, actor=EMP, at_us=t0 + 40 * S))  # t0+40 s .. t0+100 s
    wait_for(lambda: stream_metric(s, 'handtrace_stream_controls_total{kind="pause_start"}') >= 1, 90,
             "the worker to fold the pause", worker.tail)
    frames = [demo_frame(t0 + 5 * S, seed=1), demo_frame(t0 + 60 * S, seed=2, step=1),  # the paused one
              demo_frame(t0 + 110 * S, seed=3, step=2, size=5 * 1024 * 1024),  # larger than the events' limit
              demo_frame(t0 + 119 * S, seed=4, step=3, reason="end", fmt="webp")]
    send(big_producer(s), t.demonstrations, upload(t0, frames, instruction="pay invoice 7 for ada@acme.com"))

    wait_for(lambda: len(accepted(s)) >= 4, 120, "the worker to publish the demonstration", worker.tail)
    out = accepted(s)
    assert len(out) == 4
    assert len({m.partition() for m in out}) == 1
    out.sort(key=lambda m: m.offset())
    parts = [dict(m.headers())["ht-part"] for m in out]
    assert parts == [b"demonstration", b"frame", b"frame", b"frame"], "the header comes first"
    head = dict(out[0].headers())
    demo = json.loads(head["ht-demo"])
    kept = [frames[i] for i in (0, 2, 3)]
    assert [f["sha256"] for f in demo["frames"]] == [f["sha256"].hex() for f in kept]
    assert demo["frames_dropped"] == {"paused": 1}
    assert demo["instruction"] == "pay invoice 7 for [REDACTED:email]"
    assert [m.value() for m in out[1:]] == [f["image"] for f in kept]
    assert all(m.key() == head["ht-employee-key"] for m in out)
    rows = from_ipc(out[0].value())
    captured = [(ts.timestamp() * S - t0) / S for ts in rows.column("captured_at").to_pylist()]
    assert 0 < len(captured) < 120 and demo["events_dropped"] == {"paused": 120 - len(captured)}
    assert not any(38 <= c < 102 for c in captured), "an event captured in the pause was stored"
    for m in out:
        blob = (m.key() or b"") + b"".join(k.encode() + (v or b"") for k, v in m.headers())
        assert EMP.encode() not in blob and DEV.encode() not in blob
    assert EMP not in repr(rows.to_pylist()) and DEV not in repr(rows.to_pylist())
    assert worker.proc is not None and worker.proc.poll() is None


def test_garbled_messages_are_dead_lettered_and_the_worker_goes_on(  # type: ignore[no-untyped-def]
        settings_factory, stream_worker) -> None:
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)
    t0 = now_us() - 600 * S
    good = upload(t0, [demo_frame(t0 + 5 * S, seed=1)])
    (value, headers), (image, frame_headers) = good
    p = big_producer(s)
    send(p, t.demonstrations, [
        (b"\xc3\x01" + b"\x00" * 8 + b"not avro", headers),  # a header that does not decode
        (image[:-1] + b"!", frame_headers),  # bytes that are not what ht-sha256 says
        (value, [(k, b"thumbnail" if k == "ht-part" else v) for k, v in headers]),
    ])
    send(p, t.demonstrations, good)
    wait_for(lambda: len(accepted(s)) >= 2, 120, "the worker to publish the good demonstration", worker.tail)
    dead = topic_messages({"bootstrap.servers": s.kafka.bootstrap()}, t.deadletter)
    reasons = sorted(dict(m.headers())["ht-reason"] for m in dead)
    assert reasons == [b"sha256_mismatch", b"unknown_part", b"unknown_schema"]
    for m in dead:
        h = dict(m.headers())
        assert h["ht-source-topic"] == t.demonstrations.encode()
        if h["ht-reason"] != b"unknown_schema":
            assert m.value() in (b"", None) and int(h["ht-payload-withheld"]) > 0, "pixels copied to dead letters"
    assert [dict(m.headers())["ht-part"] for m in sorted(accepted(s), key=lambda m: m.offset())] == [
        b"demonstration", b"frame"]
    assert worker.proc is not None and worker.proc.poll() is None
