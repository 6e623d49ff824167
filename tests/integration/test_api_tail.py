"""The API's topic tails (control/api/tail.py) on the real broker: each message is read once, a
read always reaches the topic's end at the time of the call, and a tail whose broker went away
answers StateUnavailable and recovers when it is back."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from handtrace.control.api.services import StateUnavailable
from handtrace.control.api.tail import Message, TopicTail
from handtrace.core.settings import Settings
from tests.integration.conftest import producer, topics_of


def _send(s: Settings, topic: str, values: list[dict[str, int]]) -> None:
    p = producer(s)
    for v in values:
        p.produce(topic, key=b"k", value=json.dumps(v).encode())
    assert p.flush(30) == 0


def _decode(m: Message) -> dict[str, int] | None:
    doc = json.loads(m.value)
    return doc if doc.get("n", -1) >= 0 else None


def test_a_tail_reads_each_message_once_and_always_to_the_end(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory()
    topic = topics_of(s).audit
    tail: TopicTail[dict[str, int]] = TopicTail(s, topic, _decode)
    try:
        assert tail.read(30) == []
        _send(s, topic, [{"n": i} for i in range(5)] + [{"n": -1}])
        first = tail.read(30)
        assert [d["n"] for d in first] == [0, 1, 2, 3, 4]  # the skipped one is not kept
        assert tail.messages == 6
        _send(s, topic, [{"n": 5}, {"n": 6}])
        second = tail.read(30)
        assert [d["n"] for d in second] == [0, 1, 2, 3, 4, 5, 6]
        assert tail.messages == 8  # only the two new ones were fetched
        assert tail.read(30) == second and tail.messages == 8
    finally:
        tail.close()


def test_a_tail_of_a_missing_topic_is_unavailable_not_empty(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory()
    tail: TopicTail[Message] = TopicTail(s, "handtrace.no-such-topic", lambda m: m)
    try:
        with pytest.raises(StateUnavailable):
            tail.read(5)
    finally:
        tail.close()
