"""Before an erasure deletes anything: wait until the pipeline holds nothing more of the person
that it could still store (docs/adr/0015-erasure.md, "in flight").

Once the erasure control is on the controls topic, three things may still bring the person's
rows into ClickHouse after a deletion: (1) the worker has not folded the control yet; (2) it
enforced a micro-batch of theirs before folding it; (3) such accepted rows are still on the
accepted topics, not yet written by the sink. Everything of one person lives in one partition
number on every topic (raw topics keyed by employee id, controls co-partitioned, accepted topics
keep the source partition), so three waits on committed offsets of that partition close all three:

1. the stream's group has committed past the erasure control on the controls topic (folded);
2. then it has committed up to what the raw topics held at that moment (everything produced
   before the fold is enforced -- after the fold it is dropped);
3. then the sink's groups have committed up to what the accepted topics held after step 2.

A worker commits an offset only after its sends were acknowledged (stream/app.py), and the sink
only after its insert: when the three hold, a later deletion is final. Each wait is bounded; a
pipeline that is stopped or far behind is reported (the caller records ``settled = false``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from confluent_kafka import Consumer, KafkaException, TopicPartition

from handtrace.core.settings import Settings
from handtrace.core.topics import Topics


@dataclass(frozen=True)
class Mark:
    """``group`` must have committed at least ``offset`` on ``topic`` / ``partition``."""

    group: str
    topic: str
    partition: int
    offset: int


def _consumer(settings: Settings, group: str) -> Consumer:
    # Never subscribes: only reads the group's committed offsets (it does not join the group).
    return Consumer({**settings.kafka.librdkafka(), "group.id": group, "enable.auto.commit": False,
                     "log_level": 3})


def committed(settings: Settings, group: str, topic: str, partition: int, timeout_s: float = 5.0) -> int:
    """The offset ``group`` committed on one partition (-1: none)."""
    c = _consumer(settings, group)
    try:
        (tp,) = c.committed([TopicPartition(topic, partition)], timeout=timeout_s)
        return int(tp.offset)
    finally:
        c.close()


def end_offset(settings: Settings, topic: str, partition: int, timeout_s: float = 5.0) -> int:
    """The high watermark (next offset to be written) of one partition."""
    c = _consumer(settings, "handtrace-settle")
    try:
        _lo, hi = c.get_watermark_offsets(TopicPartition(topic, partition), timeout=timeout_s, cached=False)
        return int(hi)
    finally:
        c.close()


def wait_marks(settings: Settings, marks: Sequence[Mark], deadline: float, poll_s: float = 0.5) -> list[Mark]:
    """Wait until every mark is reached or ``deadline`` (monotonic) passes; the marks not reached."""
    left = list(marks)
    while True:
        try:
            left = [m for m in left if committed(settings, m.group, m.topic, m.partition) < m.offset]
        except KafkaException:
            pass  # a coordinator moving: ask again
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(poll_s)


def settle_after_suppression(settings: Settings, partition: int, control_offset: int, timeout_s: float,
                             progress: Callable[[str], None] = lambda _m: None) -> bool:
    """The three waits of the module docstring for the person in ``partition`` whose erasure
    control is at ``control_offset`` on the controls topic. True when all were reached within
    ``timeout_s``; False otherwise (progress says which)."""
    t = Topics.from_settings(settings.topics)
    deadline = time.monotonic() + timeout_s
    stream, sink, demo_sink = settings.stream.app_id, settings.sink.group_id, settings.demo.sink_group_id
    steps: list[tuple[str, Callable[[], list[Mark]]]] = [
        ("the stream applied the suppression", lambda: [Mark(stream, t.controls, partition, control_offset + 1)]),
        ("the stream enforced what the raw topics held of them",
         lambda: [Mark(stream, topic, partition, end_offset(settings, topic, partition))
                  for topic in (t.events, t.demonstrations)]),
        ("the sink wrote what the stream had accepted of them",
         lambda: [Mark(sink, t.stored, partition, end_offset(settings, t.stored, partition)),
                  Mark(demo_sink, t.demonstrations_accepted, partition,
                       end_offset(settings, t.demonstrations_accepted, partition))]),
    ]
    for what, marks_of in steps:
        try:
            marks = [m for m in marks_of() if m.offset > 0]
        except KafkaException as e:
            progress(f"warning: cannot read the pipeline's offsets ({e})")
            return False
        left = wait_marks(settings, marks, deadline)
        if left:
            behind = ", ".join(f"{m.group} on {m.topic}[{m.partition}] < {m.offset}" for m in left)
            progress(f"warning: not settled within {timeout_s:g} s: {behind} -- rows in flight may be stored "
                     "after the deletion; run handtrace erase again once the pipeline has caught up")
            return False
        progress(f"{what}")
    return True
