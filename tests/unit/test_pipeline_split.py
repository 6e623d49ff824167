"""Accepted rows are cut into messages only between source messages (the sink's replay
deduplication relies on a source message's rows travelling together); split by partition
without losing or reordering rows; and the sink's joined ArrowStream holds every row."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.core.rows import from_ipc, ipc_stream, join_ipc
from handtrace.stream.pipeline import by_partition, split_by_source


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=0, max_size=40), st.integers(1, 100))
def test_chunks_keep_source_messages_whole_and_bounded(sizes: list[int], max_rows: int) -> None:
    src = [off for off, n in enumerate(sizes) for _ in range(n)]
    table = pa.table({"source_offset": pa.array(src, pa.int64()), "row": pa.array(range(len(src)))})
    chunks = split_by_source(table, max_rows)
    assert pa.concat_tables(chunks).equals(table) if chunks else table.num_rows == 0
    seen: set[int] = set()
    for c in chunks:
        offsets = set(c.column("source_offset").to_pylist())
        assert not offsets & seen, "a source message was split across chunks"
        seen |= offsets
        if c.num_rows > max_rows:
            assert len(offsets) == 1, "only a single oversized source message may exceed the bound"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=80))
def test_by_partition_keeps_every_row_in_order(partitions: list[int]) -> None:
    table = pa.table({"source_partition": pa.array(partitions, pa.int32()), "row": pa.array(range(len(partitions)))})
    parts = by_partition(table)
    assert set(parts) == set(partitions)
    for p, t in parts.items():
        assert set(t.column("source_partition").to_pylist()) == {p}
        expected = [i for i, q in enumerate(partitions) if q == p]
        assert t.column("row").to_pylist() == expected, "rows of a partition must keep their order"


def _stream(table: pa.Table, compression: str | None = "lz4") -> bytes:
    return ipc_stream(table, compression)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=6))
def test_join_ipc_holds_every_row_of_every_stream(sizes: list[int]) -> None:
    tables = []
    n = 0
    for size in sizes:
        tables.append(pa.table({"a": pa.array(range(n, n + size), pa.int64()),
                                "s": pa.array([f"v{i}" if i % 3 else None for i in range(n, n + size)], pa.string())}))
        n += size
    joined = join_ipc([_stream(t) for t in tables])
    assert from_ipc(joined).equals(pa.concat_tables(tables))


def test_join_ipc_copies_compressed_buffers_and_refuses_mixed_schemas() -> None:
    t = pa.table({"s": pa.array(["same text"] * 5000)})
    one = _stream(t)
    joined = join_ipc([one, one])
    assert len(joined) <= 2 * len(one), "record batches are copied, not re-encoded"
    assert len(joined) < len(_stream(pa.concat_tables([t, t]), None)) / 1.5, "buffers must stay compressed"
    assert from_ipc(joined).num_rows == 10_000
    other = _stream(pa.table({"x": pa.array([1])}))
    with pytest.raises(ValueError, match="different schemas"):
        join_ipc([one, other])
    with pytest.raises(ValueError, match="nothing"):
        join_ipc([])
