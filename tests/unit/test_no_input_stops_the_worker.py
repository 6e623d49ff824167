"""No message can make the stream raise: the worker stops (and replays the micro-batch) on any
exception while enforcing, so an input that raised would stop it on every replay, for good.
Tombstones (no value), empty values and arbitrary bytes are dead-lettered with a reason, and the
good messages of the same micro-batch are still stored; a tombstone on the controls or policy
topic is refused like any unsigned record."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.partitioning import partition_for_key
from handtrace.core.settings import Settings
from handtrace.stream.app import worker_pipeline
from handtrace.stream.controls import message_of
from handtrace.stream.deadletter import deadletter_record
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.policy import Policy
from tests.factories import TEST_POLICY, make_batch

PARTS = 3
POLICY = Policy(version=1, allowed_apps=frozenset(TEST_POLICY["allowed_apps"]),
                allowed_domains=tuple(TEST_POLICY["allowed_domains"]), text_capture={"*": "full"})


def _pipeline(tmp: Path):  # type: ignore[no-untyped-def]
    return worker_pipeline(Settings(state_dir=tmp, dev_mode=True, stream={"pseudonym_key": "k" * 40},
                                    topics={"partitions": PARTS}))


def _msg(value: bytes | None, key: bytes | None, offset: int) -> SourceMessage:
    part = partition_for_key(key, PARTS) if key else 0
    now = now_us()
    return SourceMessage(value, part, offset, key, now, ((HEADER_SENT_AT, str(now).encode()),))  # type: ignore[arg-type]


def test_tombstones_and_empty_values_are_dead_lettered_and_the_rest_stored(tmp_path: Path) -> None:
    pipe = _pipeline(tmp_path)
    good, ids = make_batch("emp-ok", 20)
    msgs = [_msg(None, b"emp-a", 0), _msg(b"", b"emp-b", 1), _msg(good, b"emp-ok", 2)]
    out = pipe.process_many(msgs, now_us(), policy=POLICY)
    assert sorted(d.reason for d in out.deadletters) == ["empty_value", "empty_value"]
    assert out.stored == len(ids)
    tomb = next(d for d in out.deadletters if d.message.payload is None)
    rec = deadletter_record(tomb, 1 << 20, "events")
    assert rec.value == b"" and ("ht-null-value", b"1") in rec.headers and rec.key == b"emp-a"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), st.binary(max_size=300),
                          st.binary(max_size=300).map(lambda b: b"\xc3\x01" + b)), min_size=1, max_size=8),
       st.sampled_from([None, b"emp-x", b"\x00\xff"]))
def test_no_bytes_make_the_pipeline_raise(tmp_path_factory, values, key) -> None:  # type: ignore[no-untyped-def]
    pipe = _pipeline(tmp_path_factory.mktemp("s"))
    good, ids = make_batch("emp-ok", 5)
    msgs = [_msg(v, key, i) for i, v in enumerate(values)] + [_msg(good, b"emp-ok", len(values))]
    out = pipe.process_many(msgs, now_us(), policy=POLICY)
    assert len(out.deadletters) == len(values)  # every bad one set aside with a reason
    assert all(d.reason for d in out.deadletters)
    assert out.stored == len(ids)  # and the good one stored


def test_a_tombstone_on_a_control_topic_reads_as_an_empty_record() -> None:
    class Msg:
        value = None
        key = b"emp-a"
        partition = 0
        headers = None
        timestamp = None
        timestamp_type = None

    m = message_of(Msg())
    assert m.value == b"" and m.key == b"emp-a"
