"""Topics the API reads again and again (controls, audit, policy, devices), each read once: a
``TopicTail`` keeps one consumer per topic and the messages seen so far, and every ``read`` fetches
only what was appended since the last one, up to the end of the topic at the time of the call
(so a page that follows a change sees it: read-your-writes within this process and across
replicas alike, since the end is asked of the broker each time).

Before this, every page load created four consumers and re-read four topics from the beginning:
time and broker load grew with the trail. A tail that fails (broker gone, timeout) is closed and
rebuilt from scratch on the next call; the caller gets ``StateUnavailable`` for this one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from handtrace.control.api.services import StateUnavailable

if TYPE_CHECKING:
    from handtrace.core.settings import Settings

T = TypeVar("T")


@dataclass(frozen=True)
class Message:
    """What the API keeps of a Kafka message (confluent's Message objects are not kept)."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def _headers(raw: Any) -> list[tuple[str, bytes]]:
    items = raw.items() if isinstance(raw, dict) else (raw or [])
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in items]


class TopicTail(Generic[T]):
    """Every message of one topic, read incrementally, each turned once into a ``T`` by
    ``convert`` (None: skipped, e.g. a forged record). Thread-safe."""

    def __init__(self, settings: Settings, topic: str, convert: Callable[[Message], T | None]) -> None:
        self.settings = settings
        self.topic = topic
        self.convert = convert
        self.items: list[T] = []
        self.messages = 0
        self._next: dict[int, int] = {}
        self._consumer: Any = None
        self._lock = threading.Lock()

    def read(self, timeout_s: float) -> list[T]:
        """The converted messages up to the topic's current end, in partition-then-offset order
        of arrival (callers sort by their own time field)."""
        from confluent_kafka import KafkaError, KafkaException

        transient = {KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE,
                     KafkaError._TRANSPORT, KafkaError._TIMED_OUT}

        deadline = time.monotonic() + timeout_s
        with self._lock:
            try:
                while True:
                    try:
                        self._catch_up(max(deadline - time.monotonic(), 0.1))
                        break
                    except KafkaException as e:  # a leader moving, a topic just created: again
                        err = e.args[0]
                        if not (err.retriable() or err.code() in transient) or time.monotonic() + 0.2 >= deadline:
                            raise
                        time.sleep(0.2)
            except StateUnavailable:
                self._reset()
                raise
            except Exception as e:  # noqa: BLE001 -- any client failure: rebuild next time
                self._reset()
                raise StateUnavailable(f"cannot read {self.topic}: {e}") from e
            return list(self.items)

    def _reset(self) -> None:
        self.close_consumer()
        self.items, self.messages, self._next = [], 0, {}

    def close_consumer(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()
            except Exception:  # noqa: BLE001,S110 -- closing a broken consumer
                pass
            self._consumer = None

    def close(self) -> None:
        with self._lock:
            self.close_consumer()

    def _catch_up(self, timeout_s: float) -> None:
        from confluent_kafka import Consumer, TopicPartition

        from handtrace.core import ids

        deadline = time.monotonic() + timeout_s
        if self._consumer is None:
            self._consumer = Consumer({**self.settings.kafka.librdkafka(),
                                       "group.id": f"handtrace-api-{ids.uuid7_bytes().hex()}",
                                       "enable.auto.commit": False, "enable.partition.eof": False})
        c = self._consumer
        meta = c.list_topics(self.topic, timeout=timeout_s).topics.get(self.topic)
        if meta is None or meta.error is not None:
            raise StateUnavailable(f"topic {self.topic} is not available")
        ends: dict[int, int] = {}
        starts = []
        for p in sorted(meta.partitions):
            low, high = c.get_watermark_offsets(TopicPartition(self.topic, p), timeout=timeout_s)
            start = max(self._next.get(p, low), low)
            if high > start:
                ends[p] = high
                starts.append(TopicPartition(self.topic, p, start))
        if not starts:
            return
        c.assign(starts)
        fresh: list[Message] = []
        while ends:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StateUnavailable(f"timed out reading {self.topic}")
            for m in c.consume(500, min(left, 1.0)):
                if m.error() is not None:
                    continue
                p, off = m.partition(), m.offset() or 0
                if p not in ends or off < self._next.get(p, 0):
                    continue
                fresh.append(Message(p, off, m.key(), m.value() or b"", _headers(m.headers())))
                self._next[p] = off + 1
                if off + 1 >= ends[p]:
                    del ends[p]
        c.unassign()
        for msg in fresh:
            item = self.convert(msg)
            if item is not None:
                self.items.append(item)
        self.messages += len(fresh)
