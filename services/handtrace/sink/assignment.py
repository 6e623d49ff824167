"""How each writer of the sink process gets its partitions: balanced by its consumer group, or
owned statically (``sink.partitions``) when sinks write separate embedded data dirs, where a
partition's exactly-once ledger lives in the dir that wrote it and must never move (ADR 0020)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from handtrace.sink.split import Stopped

log = logging.getLogger("handtrace.sink")


class SinkConfigError(RuntimeError):
    """Settings the sink cannot run with (reported at start, before anything is consumed)."""


def static_consumer_conf(partitions: list[int]) -> dict[str, Any]:
    """Consumer options for a static assignment (``partitions`` not empty). A consumer that never
    joins its group looks the group coordinator up again only every ``coordinator.query.interval.ms``
    (librdkafka default: 10 minutes): after one NOT_COORDINATOR (a new broker still loading
    ``__consumer_offsets``) its committed-offset fetches and commits failed for minutes (seen in
    test_scale_out). Every 2 s instead."""
    return {"coordinator.query.interval.ms": 2000} if partitions else {}


def take_partitions(c: Consumer, topic: str, partitions: list[int],
                    on_assign: Callable[[Consumer, list[TopicPartition]], Any],
                    on_revoke: Callable[[Consumer, list[TopicPartition]], Any], *, strict: bool,
                    stop: threading.Event | None = None) -> None:
    """Subscribe ``c`` to ``topic`` (empty ``partitions``: the group balances), or assign it
    ``partitions`` for good, calling ``on_assign`` as a rebalance would. Offsets are still
    committed to the group and reading resumes from them (fetched with retries until ``stop``).
    ``strict``: a listed partition the
    topic lacks is a SinkConfigError (fails closed); else only the listed partitions the topic
    has are taken (the demonstration and audit topics may have fewer)."""
    if not partitions:
        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        return
    meta = c.list_topics(topic, timeout=30).topics.get(topic)
    have = set(meta.partitions) if meta is not None and meta.error is None else set()
    missing = sorted(set(partitions) - have)
    if missing and strict:
        raise SinkConfigError(f"sink.partitions {missing} not in topic {topic} (it has {len(have)} partitions)")
    tps = [TopicPartition(topic, p) for p in partitions if p in have]
    on_assign(c, tps)
    # Where to resume: the group's committed offsets, fetched here with retries. Left to
    # librdkafka (assign without offsets), one NOT_COORDINATOR answer while the group's
    # coordinator loads left the partitions unread for minutes (seen in test_scale_out).
    committed = _committed(c, tps, stop)
    c.assign([TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
              for tp in committed])
    log.info("assigned partitions %s of %s statically (sink.partitions)", [tp.partition for tp in tps], topic)


def _committed(c: Consumer, tps: list[TopicPartition], stop: threading.Event | None) -> list[TopicPartition]:
    """The group's committed offsets of ``tps``, retried (with backoff) while the broker cannot
    tell yet; raises Stopped when ``stop`` is set meanwhile."""
    if not tps:
        return []
    delay = 0.2
    while True:
        try:
            return list(c.committed(tps, timeout=10))
        except KafkaException as e:
            log.warning("committed offsets not available yet (%s); retrying", e.args[0] if e.args else e)
        if stop is not None and stop.wait(delay):
            raise Stopped("stopped while fetching committed offsets")
        if stop is None:
            time.sleep(delay)
        delay = min(delay * 2, 5.0)
