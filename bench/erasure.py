"""Erasure of one person among many (issue #14, "Measure": time to verified 0).

``PYTHONPATH=services:. python -m bench.erasure [--people 10000] [--events 100] [--months 12]``

An embedded ClickHouse in a temporary dir, migrated with the real schema; ``events`` filled with
``--people`` x ``--events`` rows spread over ``--months`` monthly partitions (several parts per
partition, as a sink's flushes leave them), then one person erased with ``core.erasure.erase``
(the suppression stubbed: no broker here; an empty local frame store). Prints the time of each
step and, as a baseline measured in the same run, one full scan of the table
(``SELECT count() ... WHERE employee_key = ..``: the re-query's cost alone).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from handtrace.core import clickhouse
from handtrace.core.erasure import Receipt, count_rows, erase
from handtrace.core.framestore import LocalStore
from handtrace.sink.schema import ERASABLE, migrate

DB = "handtrace"
INSERTS = 8


def seed(client: object, people: int, events: int, months: int) -> int:
    """``people`` x ``events`` rows in ``INSERTS`` inserts (parts); returns the rows written."""
    total = people * events
    per = total // INSERTS
    for i in range(INSERTS):
        client.command(  # type: ignore[attr-defined]
            f"INSERT INTO {DB}.events (event_id, batch_id, employee_key, device_key, kind, captured_at, received_at, "
            "x, y, app_id, source_partition, source_offset) "
            "SELECT generateUUIDv4(), generateUUIDv4(), lower(hex(MD5(toString(n % {p:UInt64})))), 'dev', 'click', "
            "toDateTime64('2026-01-01 00:00:00', 6, 'UTC') + toIntervalSecond((n * 7919) % ({m:UInt64} * 2592000)), "
            "now64(6), toInt32(n % 1920), toInt32(n % 1080), 'code', 0, toInt64(n) "
            "FROM (SELECT number + {o:UInt64} AS n FROM numbers({c:UInt64}))",
            parameters={"p": people, "m": months, "o": i * per, "c": per})
    return per * INSERTS


def timed_erasure(client: object, database: str, frames: Path,
                  key: str) -> tuple[list[tuple[float, str]], float, Receipt]:
    """Erase ``key`` from every erasable table of ``database`` (suppression stubbed, an empty local
    frame store at ``frames``): (progress lines with their seconds, seconds to the receipt, the
    receipt). bench.warehouse_scale uses it too."""
    lines: list[tuple[float, str]] = []
    start = time.perf_counter()
    r = erase(client, database, LocalStore(frames), key, actor="bench", reason="bench",
              tables=ERASABLE, suppress=lambda _e: None,
              progress=lambda m: lines.append((time.perf_counter() - start, m)))
    return lines, time.perf_counter() - start, r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--events", type=int, default=100)
    ap.add_argument("--months", type=int, default=12)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        dsn = f"chdb://{Path(tmp) / 'ch'}"
        client = clickhouse.connect(dsn)
        try:
            migrate(client, DB)
            t = time.perf_counter()
            rows = seed(client, args.people, args.events, args.months)
            load_s = time.perf_counter() - t
            parts = client.command(f"SELECT count() FROM system.parts WHERE database = '{DB}' AND table = 'events' "
                                   "AND active")
            key = client.query("SELECT lower(hex(MD5('42')))").first_row[0]
            t = time.perf_counter()
            count_rows(client, DB, key, ERASABLE)
            scan_s = time.perf_counter() - t
            lines, total_s, r = timed_erasure(client, DB, Path(tmp) / "frames", key)
        finally:
            clickhouse.close(dsn)
    print(f"events: {rows:,} rows of {args.people:,} people over {args.months} months, {parts} active parts "
          f"(loaded in {load_s:.1f} s)")
    for at, m in lines:
        print(f"  {at * 1000:8.1f} ms  {m}")
    print(f"erased {r.rows_removed['events']} rows of one person: {total_s * 1000:.0f} ms to the receipt "
          f"(verified at +{(r.verified_at - r.requested_at).total_seconds() * 1000:.0f} ms); "
          f"baseline, one re-query of every erasable table: {scan_s * 1000:.0f} ms "
          f"(erasure = {total_s / scan_s:.1f}x the re-query)")


if __name__ == "__main__":
    main()
