"""docs/scaling.md is the capacity model's output, and every measured input it divides by is still
written in docs/BENCHMARKS.md under the heading it cites (a re-measured number breaks this test until
bench/capacity.py is updated to it)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from bench import capacity

ROOT = Path(__file__).resolve().parents[2]


def _sections(md: str) -> dict[str, str]:
    """Each heading's text (without the #s) -> the text up to the next heading of the same or a
    higher level (subsections included)."""
    heads = [(m.start(), len(m.group(1)), m.group(2).strip())
             for m in re.finditer(r"^(#{1,6}) (.+)$", md, flags=re.M)]
    out: dict[str, str] = {}
    for i, (start, level, title) in enumerate(heads):
        end = next((s for s, lv, _ in heads[i + 1:] if lv <= level), len(md))
        out[title] = md[start:end]
    return out


def test_scaling_doc_is_generated_and_current() -> None:
    doc = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    assert doc == capacity.render(), "docs/scaling.md is stale: python -m bench.capacity > docs/scaling.md"


@pytest.mark.parametrize("name", sorted(capacity.MEASURED))
def test_every_measured_input_is_in_benchmarks(name: str) -> None:
    m = capacity.MEASURED[name]
    sections = _sections((ROOT / "docs" / "BENCHMARKS.md").read_text(encoding="utf-8"))
    assert m.section in sections, f"{name}: no section {m.section!r} in docs/BENCHMARKS.md"
    assert re.search(rf"(?<![\d.,]){re.escape(m.text)}(?![\d]|[.,]\d)", sections[m.section]), (
        f"{name}: {m.text!r} is no longer written under {m.section!r} in docs/BENCHMARKS.md")
    assert float(m.text.replace(",", "")) == pytest.approx(m.value), f"{name}: value and text disagree"


def test_no_placeholder_assumptions() -> None:
    for name, a in capacity.ASSUMED.items():
        assert a.value > 0 and "PLACEHOLDER" not in a.why, f"{name} is not a real figure yet"


def test_figures_grow_with_the_fleet() -> None:
    small, mid, big = (capacity.plan(n) for n in capacity.FLEETS)
    assert small.events_s_avg * 10 == pytest.approx(mid.events_s_avg)
    assert mid.events_s_avg * 10 == pytest.approx(big.events_s_avg)
    for attr in ("workers", "partitions", "sinks", "brokers", "shards"):
        assert getattr(small, attr) <= getattr(mid, attr) <= getattr(big, attr), attr
    assert big.partitions >= big.workers, "a worker needs a partition of its own"
    assert big.clickhouse_tb > 0
