"""Accepted rows are cut into messages only between source messages (the sink's replay
deduplication relies on a source message's rows travelling together)."""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.stream.pipeline import split_by_source


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
