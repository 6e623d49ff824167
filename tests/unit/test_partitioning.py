"""Our murmur2 partitioner must agree with aiokafka's (Faust) and so with librdkafka's
``murmur2_random`` and the Java client: otherwise an agent would read the wrong controls
partition for its own key."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner, murmur2
from hypothesis import given
from hypothesis import strategies as st

from handtrace.core import partitioning


@given(key=st.binary(min_size=1, max_size=64), n=st.integers(1, 256))
def test_agrees_with_aiokafka(key: bytes, n: int) -> None:
    assert partitioning.murmur2(key) == murmur2(key)
    parts = list(range(n))
    assert partitioning.partition_for_key(key, n) == DefaultPartitioner()(key, parts, parts)


def test_known_java_values() -> None:
    # Values from the Java client's test suite (Utils.murmur2 of these strings, as signed ints).
    assert partitioning.murmur2(b"21") & 0xFFFFFFFF == (-973932308) & 0xFFFFFFFF
    assert partitioning.murmur2(b"foobar") & 0xFFFFFFFF == (-790332482) & 0xFFFFFFFF
