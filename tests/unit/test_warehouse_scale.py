"""The schema for scale (migrations 26-27, ADR 0017) and bench/warehouse_scale.py's small mode, so
the bench cannot rot: both schemas loaded, every cookbook recipe run, an erasure verified, the
sink path and the candidates measured, on a few thousand events."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bench import warehouse_scale

from handtrace.core import clickhouse
from handtrace.sink import schema

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    try:
        yield clickhouse.connect(dsn)
    finally:
        clickhouse.close(dsn)


def codecs(client: Any, db: str, table: str) -> dict[str, str]:
    """column -> its codec as written in the migrations (without the widths ClickHouse adds: Delta(8))."""
    rows = client.query("SELECT name, compression_codec FROM system.columns WHERE database = {d:String} "
                        "AND table = {t:String}", parameters={"d": db, "t": table}).result_rows
    return {c: re.sub(r"(Delta|DoubleDelta|Gorilla)\(\d+\)", r"\1", codec) for c, codec in rows}


def test_codec_migrations_apply_to_both_event_tables_and_rerun_cleanly(client: Any) -> None:
    assert schema.migrate(client, "h")[-2:] == [26, 27]
    for table in ("events", "demonstration_events"):
        got = codecs(client, "h", table)
        for col, codec in schema.EVENT_CODECS.items():
            assert got[col] == f"CODEC({codec})", (table, col, got[col])
        assert table == "events" or got["demonstration_id"] == ""  # not named: the default (LZ4)
    # idempotent: the statement itself runs again without harm (a crash before its schema_migrations row)
    client.command(schema.MIGRATIONS[-2][2].format(db="h"))
    assert schema.migrate(client, "h") == []
    # comments and defaults survive a codec-only MODIFY COLUMN
    cols = {c: (d, m) for c, d, m in client.query(
        "SELECT name, default_expression, comment FROM system.columns WHERE database = 'h' AND table = 'events'"
    ).result_rows}
    assert cols["employee_key"][1] == "HMAC pseudonym of the employee (never the raw id)"
    assert cols["stored_at"][0] == "now64(6)"


def test_codec_migrations_on_a_table_with_rows_keep_them(client: Any) -> None:
    every = list(schema.MIGRATIONS)
    schema.MIGRATIONS[:] = [m for m in every if m[0] < 26]
    try:
        schema.migrate(client, "h")
    finally:
        schema.MIGRATIONS[:] = every
    client.command("INSERT INTO h.events (event_id, batch_id, employee_key, device_key, kind, captured_at, "
                   "received_at, x, y, text_masked, source_partition, source_offset) SELECT generateUUIDv4(), "
                   "generateUUIDv4(), 'k', 'd', 'click', now64(6), now64(6), 1, 2, false, 0, number "
                   "FROM numbers(1000)")
    assert schema.migrate(client, "h") == [26, 27]
    client.command("OPTIMIZE TABLE h.events FINAL")
    assert client.query("SELECT count(), sum(x + y) FROM h.events").first_row == (1000, 3000)
    assert codecs(client, "h", "events")["captured_at"] == f"CODEC({schema.EVENT_CODECS['captured_at']})"


def test_bench_small_mode(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                          tmp_path: Path) -> None:
    monkeypatch.setattr(warehouse_scale, "SAMPLE_STRETCHES", 4)
    monkeypatch.setattr(warehouse_scale, "STRETCH_S", 10)
    assert warehouse_scale.main(["--events", "20000", "--people", "40", "--reps", "1", "--dir", str(tmp_path),
                                 "--sink-rows", "5000", "--candidates"]) == 0
    out = capsys.readouterr().out
    assert "load average" in out and "== new / old" in out
    for name, recipe in warehouse_scale.recipes().items():
        if recipe.role is not None:  # the fleet store's recipes are not warehouse tables
            assert re.search(rf"^{name} +\d+ ms +\d+ +\d+ ms +\d+ +[\d.]+x$", out, re.M), name
    assert re.search(r"erasure of one person \(ht_new\): [\d.]+ s to the verified receipt; rows removed: [1-9]", out)
    assert re.search(r"sink insert path .*: [\d,]+ rows/s", out)
    assert re.search(r"^  captured_at .*DoubleDelta, ZSTD\(1\)=[\d.]+ .* best: ", out, re.M)
    assert out.count(" B/event; one person (erasure re-query): ") == len(warehouse_scale.ORDERINGS)
    assert not list(tmp_path.iterdir()), "the bench left its data dir behind"


def test_bench_refuses_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert warehouse_scale.main(["--month", "November"]) == 2
    assert "not YYYY-MM" in capsys.readouterr().err
    assert warehouse_scale.main(["--events", "10"]) == 2
