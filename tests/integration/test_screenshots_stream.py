"""Screenshots through the real Faust worker: only images an event would be stored for reach the
accepted topic, under pseudonyms and with their url redacted; paused, exempt and
non-allowlisted ones never do."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, TopicPartition

from handtrace.control.publish import control_record, pause_record, publish
from handtrace.core import ids
from handtrace.core.clock import now_us
from tests.factories import TEST_APP, TEST_URL
from tests.integration.conftest import producer, topic_records, topics_of, wait_for

S = 1_000_000
# The url an image is sent with carries an address (percent-encoded, fullwidth) and a token in its
# path: the accepted topic's ht-url must not (issue #10).
SECRET_URL = TEST_URL + "/ada%40acme.com/\uff42ob\uff20acme.com/glpat-x7Yz9AbCdEf1GhIjKlMn/edit"


def url_headers(bootstrap: str, topic: str, n: int) -> list[bytes]:
    """The ``ht-url`` headers of the first ``n`` records of ``topic``."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"check-{uuid.uuid4().hex[:8]}",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
    c.assign([TopicPartition(topic, p, 0) for p in parts])
    urls: list[bytes] = []
    deadline = time.monotonic() + 60
    while len(urls) < n and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is None or m.error():
            continue
        urls.append(dict(m.headers() or ())["ht-url"])
    c.close()
    return urls


def test_worker_publishes_only_allowed_screenshots_under_pseudonyms(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker
) -> None:
    s = settings_factory()
    t = topics_of(s)
    worker = stream_worker(s)
    t0 = now_us() - 300 * S
    publish(s, control_record("exemption_grant", employee_id="emp-x", actor="hr-1", role="hr",
                              reason="test", at_us=t0))
    publish(s, pause_record("emp-p", 1, actor="emp-p", at_us=t0))
    p = producer(s)
    sent = {}
    for name, emp, app, at in (("ok", "emp-ok", TEST_APP, t0 + 10 * S), ("paused", "emp-p", TEST_APP, t0 + 10 * S),
                               ("exempt", "emp-x", TEST_APP, t0 + 10 * S), ("other", "emp-ok", "telegram", t0),
                               ("after-pause", "emp-p", TEST_APP, t0 + 120 * S)):
        eid = ids.uuid7_bytes(at // 1000)
        sent[eid] = name
        p.produce(t.screenshots, key=emp.encode(), value=f"image {name}".encode(), headers=[
            ("ht-event-id", eid), ("ht-captured-at-us", str(at).encode()), ("ht-device-id", f"dev-{emp}".encode()),
            ("ht-app-id", app.encode()), ("ht-url", SECRET_URL.encode()), ("ht-sha256", b"00" * 32),
            ("ht-format", b"webp")])
    p.flush(30)

    def accepted() -> list[bytes]:
        return topic_records(s.kafka.bootstrap(), t.screenshots_accepted)

    wait_for(lambda: len(accepted()) >= 2, 90, "the worker to publish the allowed screenshots", worker.tail)
    got = sorted(v.decode() for v in accepted())
    assert got == ["image after-pause", "image ok"]
    urls = url_headers(s.kafka.bootstrap(), t.screenshots_accepted, 2)
    assert len(urls) == 2
    for u in urls:
        assert u.startswith(TEST_URL.encode() + b"/") and u.count(b"[REDACTED:") == 3, u
        for gone in (b"ada", b"acme", "\uff20".encode(), b"glpat", b"x7Yz9AbCdEf1GhIjKlMn"):
            assert gone not in u, u
