"""The warehouse at scale (issue #14, "Measure"; docs/design/warehouse.md part X; ADR 0017).

``PYTHONPATH=services:. python -m bench.warehouse_scale [--events 1e8] [--people 10000]
[--dir /tmp] [--candidates] [--sink-rows 500000]``

One embedded ClickHouse (a temporary dir under ``--dir``, deleted at the end) holding two
databases migrated with the real migrations: ``ht_old`` (migrations before the scale schema, the
baseline) and ``ht_new`` (all of them). Both are loaded with the same simulator-shaped data:

- a *sample* of ``SAMPLE_STRETCHES`` stretches of synthetic activity (``agent.synthetic``: the
  same model as the demo's simulated users -- Fitts-law pointer paths at ~60 Hz, clicks,
  scrolls, typing bursts with shortcuts, app switches with window titles and urls), each
  ``STRETCH_S`` seconds, is stored once;
- it is expanded inside ClickHouse (``numbers()`` x the sample, an INSERT ... SELECT): each
  *unit* is one stretch replayed by one of ``--people`` employees on one working day of the
  month at an office hour, with that employee's pseudonyms (64-hex HMAC-shaped keys), UUIDv7
  event ids carrying the capture millisecond (as the agent makes them), batch ids per 2 s,
  received/stored times after the batch, typed text masked (every character ``•``) in the chat
  app as the redact step's ``masked`` mode stores it;
- ``--demo-share`` of the events go to ``demonstration_events`` instead (one demonstration per
  unit, with its ``demonstrations`` row), the rest to ``events``; the materialized views fill
  the rollups as in production.

Why in ClickHouse and not through the sink's Arrow insert path: the sink path (measured here
too, ``--sink-rows`` rows through ``raw_insert`` of lz4 ArrowStream with the sink's own insert
settings, as ``sink/writer.py`` does) needs the rows built in Python first; expansion in the
engine needs no Python per row and loads 100 M rows in minutes on this machine.

Then, for each database: load rate, bytes per event on disk (``system.parts``), every cookbook
recipe (docs/cookbook.md, through its access tier, p50 of ``--reps``; the fleet store's recipe
is not a warehouse table and is left out), and the erasure of one person (``bench.erasure``'s
``timed_erasure``: delete, re-query to verified 0, receipt). Ratios new / old.

``--candidates`` measures what ADR 0017 chose from instead: every column under each candidate
codec (compressed bytes from ``system.columns``), and ORDER BY / PARTITION BY variants of
``events`` (bytes and the access paths: one person, one day of all people, one person's month).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from tests.unit.test_cookbook import bind, recipes

from bench.erasure import timed_erasure
from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import clickhouse
from handtrace.core.rows import STORED_SCHEMA, to_ipc
from handtrace.sink import schema
from handtrace.sink.writer import _COLUMNS as SINK_COLUMNS
from handtrace.sink.writer import _INSERT_SETTINGS as SINK_INSERT_SETTINGS
from handtrace.warehouse import tiers

SAMPLE_STRETCHES = 48
STRETCH_S = 30
WINDOW_S = 3
"""Each stretch is cut in windows of WINDOW_S seconds: a unit replays one window (~1,000 events),
so 100 M events are ~10 units per person of 10,000."""
SCALE_MIGRATIONS = 26
"""The first migration of the scale schema: ``ht_old`` gets the ones before it."""
MASKED_APPS = ("slack",)
OS = ("linux", "darwin", "windows")
K = 5
PART_ROWS = 10_000_000
"""Rows per INSERT ... SELECT (one part per month partition per block, merged in the background)."""

SAMPLE_COLUMNS = ["kind", "x", "y", "button", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text",
                  "app_id", "window_title", "url", "screenshot_sha256", "screenshot_bytes", "screenshot_format",
                  "screenshot_width", "screenshot_height"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------ the sample


def sample() -> pl.DataFrame:
    """SAMPLE_STRETCHES stretches of synthetic activity of STRETCH_S seconds, columns of ``events``
    plus ``stretch`` (the window's number) and ``rel_us`` (microseconds since the window's start)."""
    stretches, seconds = SAMPLE_STRETCHES, STRETCH_S
    t0 = int(datetime(2026, 1, 5, 9, tzinfo=UTC).timestamp() * 1_000_000)
    frames = []
    for s in range(stretches):
        ev = SyntheticActivity(seed=1000 + s).events_between(t0, t0 + seconds * 1_000_000)
        df = pl.DataFrame(ev, infer_schema_length=None)
        for c in SAMPLE_COLUMNS:
            if c not in df.columns:
                df = df.with_columns(pl.lit(None).alias(c))
        if df.schema["screenshot_sha256"] == pl.Binary:
            df = df.with_columns(pl.col("screenshot_sha256").bin.encode("hex"))
        w = (pl.col("captured_at_us") - t0) // (WINDOW_S * 1_000_000)
        frames.append(df.select(
            (w + s * 100_000).alias("stretch"),
            (pl.col("captured_at_us") - t0 - w * WINDOW_S * 1_000_000).alias("rel_us"),
            pl.int_range(df.height, dtype=pl.UInt32).alias("seq"),
            *[pl.col(c) for c in SAMPLE_COLUMNS]).with_columns(
                pl.col("button").cast(pl.String).fill_null("none"),
                pl.col("screenshot_format").cast(pl.String).fill_null("none"),
                *[pl.col(c).cast(pl.Int32) for c in ("x", "y", "scroll_dx", "scroll_dy", "key_code", "modifiers",
                                                     "screenshot_bytes", "screenshot_width", "screenshot_height")],
                *[pl.col(c).cast(pl.String) for c in ("kind", "text", "app_id", "window_title", "url",
                                                      "screenshot_sha256")],
                pl.col("pressed").cast(pl.Boolean)))
    out = pl.concat(frames)  # windows numbered 0.. (an idle window has no events, hence no number)
    return out.with_columns((pl.col("stretch").rank("dense") - 1).cast(pl.UInt32))


SAMPLE_DDL = """
CREATE TABLE IF NOT EXISTS bench.sample
(
    stretch UInt32, rel_us Int64, seq UInt32, kind String, x Nullable(Int32), y Nullable(Int32), button String,
    pressed Nullable(Bool), scroll_dx Nullable(Int32), scroll_dy Nullable(Int32), key_code Nullable(Int32),
    modifiers Nullable(Int32), text Nullable(String), app_id Nullable(String), window_title Nullable(String),
    url Nullable(String), screenshot_sha256 Nullable(String), screenshot_bytes Nullable(Int32),
    screenshot_format String, screenshot_width Nullable(Int32), screenshot_height Nullable(Int32)
)
ENGINE = MergeTree ORDER BY (stretch, seq)
"""


def store_sample(client: Any, df: pl.DataFrame) -> dict[str, float]:
    client.command("CREATE DATABASE IF NOT EXISTS bench")
    client.command(SAMPLE_DDL)
    client.command("TRUNCATE TABLE bench.sample")
    client.insert("bench.sample", df.rows(), column_names=df.columns)
    n, units, per, span = client.query("SELECT count(), uniqExact(stretch), count() / uniqExact(stretch), max(rel_us) "
                                       "FROM bench.sample").first_row
    if units != df["stretch"].max() + 1:  # type: ignore[operator]
        raise RuntimeError(f"sample windows are not 0..{units - 1}")
    return {"rows": n, "units": units, "per_stretch": per, "span_us": span}


# ------------------------------------------------------------------ expansion in the engine


def _uuid7(ms: str, rnd: str) -> str:
    """SQL: a UUIDv7 whose time is ``ms`` (UInt64 milliseconds) and whose random bits come from
    the UInt64 expression ``rnd`` (deterministic, so a re-run makes the same ids)."""
    t, r = f"leftPad(hex(toUInt64({ms})), 16, '0')", f"leftPad(hex({rnd}), 16, '0')"
    return (f"toUUID(lower(concat(substring({t}, 5, 8), '-', substring({t}, 13, 4), "
            f"'-7', substring({r}, 1, 3), '-', substring('89ab', 1 + ({rnd}) % 4, 1), "
            f"substring({r}, 4, 3), '-', substring({r}, 5, 12))))")


def _units(first: int, count: int, people: int, month: datetime, days: int, salt: str, windows: int) -> str:
    """SQL: units ``first .. first+count`` -- one stretch replayed by one employee on one working
    day at an office hour, with the employee's keys and the unit's start time."""
    m_us = int(month.timestamp() * 1_000_000)
    return f"""
        SELECT number AS u, u % {people} AS e, toUInt32((cityHash64(u, '{salt}') % {windows})) AS st,
               lower(hex(SHA256(concat('employee-', toString(e))))) AS employee_key,
               lower(hex(SHA256(concat('device-', toString(e))))) AS device_key,
               ((intDiv(u, {people}) * 7 + e) % {days}) AS d,
               toInt64({m_us}) + toInt64(d + intDiv(d, 5) * 2) * 86400000000
                 + toInt64(8 * 3600 + cityHash64(u, 'h{salt}') % (9 * 3600)) * 1000000 AS t0_us
        FROM numbers({first}, {count})"""


def _row_select(units: str, extra: str = "") -> str:
    t = "(units.t0_us + s.rel_us)"
    batch_us = f"(intDiv({t}, 2000000) * 2000000)"
    recv = f"({batch_us} + 2000000 + 300000 + cityHash64(units.u, {batch_us}) % 700000)"
    masked = "(s.app_id IN (" + ",".join(f"'{a}'" for a in MASKED_APPS) + ") AND s.text IS NOT NULL)"
    return f"""
        SELECT {extra}
               {_uuid7(f'intDiv({t}, 1000)', 'cityHash64(units.u, s.seq)')} AS event_id,
               {_uuid7(f'intDiv({batch_us}, 1000)', f'cityHash64(units.e, {batch_us})')} AS batch_id,
               units.employee_key AS employee_key, units.device_key AS device_key, s.kind AS kind,
               fromUnixTimestamp64Micro({t}, 'UTC') AS captured_at,
               fromUnixTimestamp64Micro({recv}, 'UTC') AS received_at,
               fromUnixTimestamp64Micro({recv} + 400000 + cityHash64(units.u) % 3000000, 'UTC') AS stored_at,
               s.x AS x, s.y AS y, s.button AS button, s.pressed AS pressed, s.scroll_dx AS scroll_dx,
               s.scroll_dy AS scroll_dy, s.key_code AS key_code, s.modifiers AS modifiers,
               if({masked}, repeat('•', lengthUTF8(s.text)), s.text) AS text, {masked} AS text_masked,
               s.app_id AS app_id, s.window_title AS window_title, s.url AS url,
               s.screenshot_sha256 AS screenshot_sha256, s.screenshot_bytes AS screenshot_bytes,
               s.screenshot_format AS screenshot_format, s.screenshot_width AS screenshot_width,
               s.screenshot_height AS screenshot_height, '0.1.0' AS agent_version,
               ['{"','".join(OS)}'][1 + units.e % {len(OS)}] AS os,
               toInt32(units.e % 12) AS source_partition, toInt64(intDiv(units.u, 12)) AS source_offset
        FROM ({units}) AS units
        INNER JOIN bench.sample AS s ON s.stretch = units.st"""


EVENT_COLUMNS = ("event_id, batch_id, employee_key, device_key, kind, captured_at, received_at, stored_at, x, y, "
                 "button, pressed, scroll_dx, scroll_dy, key_code, modifiers, text, text_masked, app_id, "
                 "window_title, url, screenshot_sha256, screenshot_bytes, screenshot_format, screenshot_width, "
                 "screenshot_height, agent_version, os, source_partition, source_offset")
DEMO_ID = _uuid7("intDiv(units.t0_us, 1000)", "cityHash64(units.u, 'demo')")


def load(client: Any, db: str, *, events: int, demo_events: int, people: int, month: datetime,
         per_stretch: float, span_us: int, windows: int, progress: Callable[[str], None] = log) -> dict[str, float]:
    """Expand the sample into ``db``: ``events`` rows of passive events, ``demo_events`` rows of
    demonstrations (with their ``demonstrations`` rows). Returns rows and seconds."""
    days = 21  # working days of a month (weekends skipped)
    out: dict[str, float] = {}
    settings = {"max_insert_block_size": 2_000_000, "min_insert_block_size_rows": 2_000_000,
                "max_threads": 2}
    for table, target, salt in (("events", events, "p"), ("demonstration_events", demo_events, "d")):
        units_total = max(1, round(target / per_stretch))
        per_insert = max(1, round(PART_ROWS / per_stretch))
        t = time.perf_counter()
        first = 0 if salt == "p" else 10**12
        done_units = 0
        while done_units < units_total:
            n = min(per_insert, units_total - done_units)
            units = _units(first + done_units, n, people, month, days, salt, windows)
            if table == "events":
                client.command(f"INSERT INTO {db}.events ({EVENT_COLUMNS}) {_row_select(units)}", settings=settings)
            else:
                client.command(f"INSERT INTO {db}.demonstration_events (demonstration_id, {EVENT_COLUMNS}) "
                               f"{_row_select(units, f'{DEMO_ID} AS demonstration_id,')}", settings=settings)
                client.command(f"""
                    INSERT INTO {db}.demonstrations (demonstration_id, employee_key, device_key, cohort, instruction,
                        status, started_at, ended_at, sent_at, received_at, screen_width, screen_height,
                        screen_scale, apps, consent_version, policy_version, agent_version, os, frames, events,
                        missing_frames, frames_dropped, events_dropped, reason)
                    SELECT {DEMO_ID}, units.employee_key, units.device_key, 'eng', 'bench task', 'complete',
                           fromUnixTimestamp64Micro(units.t0_us, 'UTC'),
                           fromUnixTimestamp64Micro(units.t0_us + {span_us}, 'UTC'),
                           fromUnixTimestamp64Micro(units.t0_us + {span_us} + 5000000, 'UTC'),
                           fromUnixTimestamp64Micro(units.t0_us + {span_us} + 7000000, 'UTC'),
                           1920, 1080, 1.0, a.apps, '2026-01', '7', '0.1.0', 'linux', 0, a.n, 0,
                           map(), map(), ''
                    FROM ({units}) AS units
                    INNER JOIN (SELECT stretch, groupUniqArrayIf(assumeNotNull(app_id), app_id IS NOT NULL) AS apps,
                                       toUInt32(count()) AS n FROM bench.sample GROUP BY stretch) AS a
                        ON a.stretch = units.st""", settings=settings)
            done_units += n
            progress(f"{db}.{table}: {done_units * per_stretch / 1e6:,.1f} M of ~{target / 1e6:,.1f} M rows "
                     f"({time.perf_counter() - t:.0f} s)")
        out[f"{table}_s"] = time.perf_counter() - t
        out[f"{table}_rows"] = client.query(f"SELECT count() FROM {db}.{table}").first_row[0]
    return out


# ------------------------------------------------------------------ the sink's own insert path


def sink_rate(client: Any, df: pl.DataFrame, rows: int, flush_rows: int = 20_000) -> float:
    """Rows per second through the sink's insert (lz4 ArrowStream, raw_insert, the sink's settings
    and a dedup token per flush) into a migrated database of its own; the flushes are prepared
    before the clock starts (the stream builds them, not the sink)."""
    db = "ht_sink"
    schema.migrate(client, db)
    base = df.select(*SAMPLE_COLUMNS, "rel_us")
    flushes = []
    t0 = int(datetime(2026, 11, 2, 9, tzinfo=UTC).timestamp() * 1_000_000)
    made, i = 0, 0
    while made < rows:
        n = min(flush_rows, rows - made)
        chunk = pl.concat([base] * (n // base.height + 1)).head(n)
        at = pl.from_epoch(pl.col("rel_us") + t0 + i * 60_000_000, time_unit="us").dt.replace_time_zone("UTC")
        t = chunk.with_columns(
            employee_key=pl.lit(f"{i % 97:02x}" * 32), device_key=pl.lit(f"{i % 89:02x}" * 32), captured_at=at,
            received_at=at, text_masked=pl.lit(False), agent_version=pl.lit("0.1.0"), os=pl.lit("linux"),  # noqa: FBT003
            source_partition=pl.lit(0, pl.Int32), source_offset=pl.lit(i, pl.Int64)).to_arrow()
        ids = {"event_id": pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), n,
                                                                 [None, pa.py_buffer(os.urandom(16 * n))]),
               "batch_id": pa.array([os.urandom(16)] * n, pa.binary(16))}
        arrays = [ids[f.name] if f.name in ids else t[f.name].cast(f.type) for f in STORED_SCHEMA]
        flushes.append(to_ipc(pa.Table.from_arrays(arrays, schema=STORED_SCHEMA)))
        made, i = made + n, i + 1
    t = time.perf_counter()
    for j, body in enumerate(flushes):
        client.raw_insert(f"{db}.events", SINK_COLUMNS, body, fmt="ArrowStream",
                          settings=SINK_INSERT_SETTINGS | {"insert_deduplication_token": f"bench-{j}"})
    rate = rows / (time.perf_counter() - t)
    got = client.query(f"SELECT count() FROM {db}.events").first_row[0]
    if got != rows:
        raise RuntimeError(f"sink path stored {got} rows of {rows}")
    client.command(f"DROP DATABASE {db} SYNC")
    return rate


# ------------------------------------------------------------------ measurements


def disk(client: Any, db: str) -> dict[str, tuple[int, int, int]]:
    """table -> (rows, bytes on disk, active parts) from system.parts."""
    return {t: (r, b, p) for t, r, b, p in client.query(
        "SELECT table, sum(rows), sum(bytes_on_disk), count() FROM system.parts "
        "WHERE database = {db:String} AND active GROUP BY table", parameters={"db": db}).result_rows}


def cookbook(client: Any, db: str, reps: int) -> dict[str, tuple[float, int]]:
    """Every warehouse recipe of docs/cookbook.md through its tier: name -> (p50 seconds, rows)."""
    demo, app = client.query(
        f"SELECT demonstration_id, app_id FROM {db}.demonstration_events WHERE app_id != '' "
        "GROUP BY demonstration_id, app_id ORDER BY count() DESC, demonstration_id LIMIT 1").first_row
    month = client.command(f"SELECT toString(toStartOfMonth(min(captured_at))) FROM {db}.events")
    params = {"demonstration_id": str(demo), "app_id": app, "at_least": 3, "month": f"{month} 00:00:00",
              "allowed_apps": ["code", "google-chrome", "slack", "gimp"]}
    out = {}
    for r in recipes().values():
        if r.role is None:
            continue  # the fleet store's recipe: not a warehouse table
        sql = bind(r.sql, params).replace("handtrace.", f"{db}.")
        times, n = [], 0
        for _ in range(reps):
            t = time.perf_counter()
            answer = tiers.run(client, sql, role=r.role, database=db, k=K, actor="bench",
                               purpose="bench" if r.role == "researcher" else None)
            times.append(time.perf_counter() - t)
            n = len(answer.rows)
        out[r.name] = (statistics.median(times), n)
    return out


def measure(client: Any, db: str, tmp: Path, reps: int) -> dict[str, Any]:
    res: dict[str, Any] = {"disk": disk(client, db), "queries": cookbook(client, db, reps)}
    key = client.command(f"SELECT employee_key FROM {db}.events WHERE employee_key = "
                         "lower(hex(SHA256('employee-7'))) LIMIT 1")
    lines, total_s, receipt = timed_erasure(client, db, tmp / f"frames-{db}", key)
    res["erasure"] = (total_s, receipt.rows_removed, lines)
    return res


# ------------------------------------------------------------------ candidates (ADR 0017)


CODECS = {
    "time": ["LZ4", "ZSTD(1)", "Delta, ZSTD(1)", "DoubleDelta, ZSTD(1)", "DoubleDelta", "T64, ZSTD(1)",
             "Gorilla, ZSTD(1)"],
    "int": ["LZ4", "ZSTD(1)", "T64, ZSTD(1)", "Delta, ZSTD(1)", "Gorilla, ZSTD(1)"],
    "other": ["LZ4", "ZSTD(1)", "ZSTD(3)"],
}
KIND = {"captured_at": "time", "received_at": "time", "stored_at": "time", "x": "int", "y": "int",
        "scroll_dx": "int", "scroll_dy": "int", "key_code": "int", "modifiers": "int", "screenshot_bytes": "int",
        "screenshot_width": "int", "screenshot_height": "int", "source_partition": "int", "source_offset": "int"}

ORDERINGS = {
    "current: ORDER BY (employee_key, captured_at, event_id), monthly": None,
    "hour first: ORDER BY (toStartOfHour(captured_at), employee_key, captured_at, event_id), monthly":
        ("toYYYYMM(captured_at)", "(toStartOfHour(captured_at), employee_key, captured_at, event_id)"),
    "app first: ORDER BY (ifNull(app_id, ''), employee_key, captured_at, event_id), monthly":
        ("toYYYYMM(captured_at)", "(ifNull(app_id, ''), employee_key, captured_at, event_id)"),
    "current, daily partitions: PARTITION BY toDate(captured_at)":
        ("toDate(captured_at)", "(employee_key, captured_at, event_id)"),
}


ONE_BLOCK = {"max_threads": 2, "max_insert_block_size": 10**9, "min_insert_block_size_rows": 10**9,
             "min_insert_block_size_bytes": 10**11}
"""An INSERT ... SELECT as one block: one sorted part per partition, as merges would leave it."""


def _codec_ok(client: Any, typ: str, codec: str) -> bool:
    try:
        client.command(f"CREATE TABLE bench.probe (c {typ} CODEC({codec})) ENGINE = MergeTree ORDER BY tuple()")
    except Exception:  # noqa: BLE001 -- a codec this type does not take (T64 on UUID, ...)
        return False
    client.command("DROP TABLE bench.probe")
    return True


def codec_candidates(client: Any, db: str) -> list[tuple[str, str, int]]:
    """(column, codec, compressed bytes) of every column of ``db.events`` under every candidate."""
    cols = client.query("SELECT name, type FROM system.columns WHERE database = {db:String} AND table = 'events' "
                        "ORDER BY position", parameters={"db": db}).result_rows
    out = []
    for name, typ in cols:
        codecs = [c for c in CODECS[KIND.get(name, "other")] if _codec_ok(client, typ, c)]
        defs = ", ".join(f"c{i} {typ} CODEC({c})" for i, c in enumerate(codecs))
        client.command("DROP TABLE IF EXISTS bench.codec")
        client.command(f"CREATE TABLE bench.codec (employee_key String, captured_at DateTime64(6, 'UTC'), "
                       f"event_id UUID, {defs}) ENGINE = MergeTree PARTITION BY toYYYYMM(captured_at) "
                       "ORDER BY (employee_key, captured_at, event_id) SETTINGS min_bytes_for_wide_part = 0")
        client.command(f"INSERT INTO bench.codec SELECT employee_key, captured_at, event_id, "
                       f"{', '.join(name for _ in codecs)} FROM {db}.events", settings=ONE_BLOCK)
        sizes = dict(client.query("SELECT name, data_compressed_bytes FROM system.columns WHERE database = 'bench' "
                                  "AND table = 'codec'").result_rows)
        out += [(name, c, sizes[f"c{i}"]) for i, c in enumerate(codecs)]
    client.command("DROP TABLE IF EXISTS bench.codec")
    return out


def ordering_candidates(client: Any, db: str, reps: int) -> list[tuple[str, int, dict[str, float]]]:
    """(variant, bytes on disk, access path -> p50 s) for each ORDER BY / PARTITION BY of events,
    with ``db.events``' codecs."""
    ddl = client.query(f"SHOW CREATE TABLE {db}.events").first_row[0]
    key = client.command(f"SELECT any(employee_key) FROM {db}.events")
    day = client.command(f"SELECT toString(toDate(min(captured_at)) + 7) FROM {db}.events")
    paths = {
        "one person (erasure re-query)": "SELECT count() FROM bench.ordering WHERE employee_key = {k:String}",
        "one person's month, in order": "SELECT kind, x, y, key_code FROM bench.ordering "
                                        "WHERE employee_key = {k:String} ORDER BY captured_at",
        "one day of everyone, per app and hour": "SELECT toStartOfHour(captured_at) AS h, app_id, count(), "
                                                 "uniqExact(employee_key) FROM bench.ordering "
                                                 "WHERE captured_at >= {d:DateTime} AND captured_at < {d:DateTime} "
                                                 "+ INTERVAL 1 DAY GROUP BY h, app_id",
    }
    out = []
    for variant, change in ORDERINGS.items():
        d = re.sub(r"CREATE TABLE \S+", "CREATE TABLE bench.ordering", ddl)
        if change is not None:
            d = re.sub(r"PARTITION BY .*\n", f"PARTITION BY {change[0]}\n", d)
            d = re.sub(r"ORDER BY .*\n", f"ORDER BY {change[1]}\n", d)
        client.command("DROP TABLE IF EXISTS bench.ordering")
        client.command(d)
        client.command(f"INSERT INTO bench.ordering SELECT * FROM {db}.events", settings={"max_threads": 2})
        client.command("OPTIMIZE TABLE bench.ordering FINAL")
        size = client.query("SELECT sum(bytes_on_disk) FROM system.parts WHERE database = 'bench' "
                            "AND table = 'ordering' AND active").first_row[0]
        times = {}
        for name, sql in paths.items():
            ts = []
            for _ in range(reps):
                t = time.perf_counter()
                client.query(sql, parameters={"k": key, "d": f"{day} 00:00:00"})
                ts.append(time.perf_counter() - t)
            times[name] = statistics.median(ts)
        out.append((variant, size, times))
    client.command("DROP TABLE IF EXISTS bench.ordering")
    return out


# ------------------------------------------------------------------ main


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB"


def report(args: argparse.Namespace, loads: dict[str, dict[str, float]], res: dict[str, dict[str, Any]],
           sink: float | None) -> None:
    print(f"machine: {os.cpu_count()} cores; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"(at the end)")
    for db in res:
        ld = loads[db]
        print(f"\n== {db}: {ld['events_rows']:,} events + {ld['demonstration_events_rows']:,} demonstration events, "
              f"{args.people:,} people")
        print(f"load: events {ld['events_rows'] / ld['events_s']:,.0f} rows/s ({ld['events_s']:.0f} s), "
              f"demonstration_events {ld['demonstration_events_rows'] / ld['demonstration_events_s']:,.0f} rows/s "
              "(materialized views included)")
        for t, (rows, b, parts) in sorted(res[db]["disk"].items()):
            if t in ("events", "demonstration_events", "rollup_app_activity_hourly", "rollup_shortcuts_hourly"):
                print(f"  {t:32s} {rows:>13,} rows {_mb(b):>12} {b / max(rows, 1):6.1f} B/row {parts:4d} parts")
    old, new = "ht_old", "ht_new"
    if old in res and new in res:
        print("\n== new / old")
        for t in ("events", "demonstration_events", "rollup_app_activity_hourly"):
            bo, bn = res[old]["disk"][t][1], res[new]["disk"][t][1]
            ro = res[old]["disk"][t][0]
            print(f"  {t:32s} bytes/event {bo / ro:6.1f} -> {bn / res[new]['disk'][t][0]:6.1f}  ({bn / bo:.2f}x)")
        lo, ln = loads[old], loads[new]
        print(f"  {'load (events)':32s} {lo['events_rows'] / lo['events_s']:,.0f} -> "
              f"{ln['events_rows'] / ln['events_s']:,.0f} rows/s "
              f"({(ln['events_rows'] / ln['events_s']) / (lo['events_rows'] / lo['events_s']):.2f}x)")
    print(f"\n{'recipe (p50 of ' + str(args.reps) + ')':28s}" + "".join(f"{db:>16s}" for db in res) +
          ("       new/old" if len(res) == 2 else ""))
    for name in next(iter(res.values()))["queries"]:
        cells = [res[db]["queries"][name] for db in res]
        line = f"{name:28s}" + "".join(f"{s * 1000:11.0f} ms {n:3d}" for s, n in cells)
        if len(cells) == 2:
            line += f"   {cells[1][0] / cells[0][0]:8.2f}x"
        print(line)
    for db in res:
        total_s, removed, _lines = res[db]["erasure"]
        print(f"erasure of one person ({db}): {total_s:.1f} s to the verified receipt; "
              f"rows removed: {removed.get('events', 0):,} events, {removed.get('demonstration_events', 0):,} "
              "demonstration events")
    if sink is not None:
        print(f"\nsink insert path (lz4 ArrowStream, 20k-row flushes, dedup tokens): {sink:,.0f} rows/s; "
              f"engine expansion: {loads[new]['events_rows'] / loads[new]['events_s']:,.0f} rows/s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=float, default=1e8, help="events in all (default 1e8)")
    ap.add_argument("--demo-share", type=float, default=0.1, help="share in demonstration_events (default 0.1)")
    ap.add_argument("--people", type=int, default=10_000)
    ap.add_argument("--month", default="2026-11", help="YYYY-MM of the data (default 2026-11)")
    ap.add_argument("--reps", type=int, default=5, help="runs of each query, p50 reported (default 5)")
    ap.add_argument("--dir", default=tempfile.gettempdir(),
                    help="where the temporary data dir goes (default: the system's, /tmp)")
    ap.add_argument("--only", choices=["old", "new"], help="one schema only")
    ap.add_argument("--candidates", action="store_true", help="measure codec and ordering candidates (ADR 0017)")
    ap.add_argument("--sink-rows", type=int, default=0, help="also measure the sink's insert path on this many rows")
    args = ap.parse_args(argv)
    try:
        month = datetime.strptime(args.month, "%Y-%m").replace(tzinfo=UTC)
    except ValueError:
        print(f"warehouse_scale: --month {args.month!r} is not YYYY-MM", file=sys.stderr)
        return 2
    if args.events < 1000 or args.people < 10 or not 0 < args.demo_share < 1 or args.reps < 1:
        print("warehouse_scale: need --events >= 1000, --people >= 10, 0 < --demo-share < 1, --reps >= 1",
              file=sys.stderr)
        return 2
    demo = int(args.events * args.demo_share)
    dbs = {"old": "ht_old", "new": "ht_new"}
    wanted = [dbs[args.only]] if args.only else list(dbs.values())
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="warehouse-scale-") as tmp:
        dsn = f"chdb://{Path(tmp) / 'ch'}"
        client = clickhouse.connect(dsn)
        try:
            log("sampling the simulator")
            df = sample()
            smp = store_sample(client, df)
            log(f"sample: {smp['rows']:,} events in {SAMPLE_STRETCHES} stretches of {STRETCH_S} s "
                f"({smp['units']} windows of {WINDOW_S} s)")
            all_migrations = list(schema.MIGRATIONS)
            loads, res = {}, {}
            for db in wanted:
                schema.MIGRATIONS[:] = [m for m in all_migrations if db == "ht_new" or m[0] < SCALE_MIGRATIONS]
                try:
                    schema.migrate(client, db)
                finally:
                    schema.MIGRATIONS[:] = all_migrations
                loads[db] = load(client, db, events=int(args.events) - demo, demo_events=demo, people=args.people,
                                 month=month, per_stretch=smp["per_stretch"], span_us=smp["span_us"],
                                 windows=smp["units"])
            for db in wanted:
                log(f"measuring {db}")
                res[db] = measure(client, db, Path(tmp), args.reps)
            sink = sink_rate(client, df, args.sink_rows) if args.sink_rows else None
            report(args, loads, res, sink)
            if args.candidates:
                src = wanted[0]
                log("codec candidates")
                print(f"\n== codec candidates (compressed bytes per event, {src}.events, "
                      f"{loads[src]['events_rows']:,} rows, inserted as one block: one sorted part per month)")
                rows = loads[src]["events_rows"]
                by_col: dict[str, list[tuple[str, int]]] = {}
                for col, codec, size in codec_candidates(client, src):
                    by_col.setdefault(col, []).append((codec, size))
                for col, cands in by_col.items():
                    best = min(cands, key=lambda c: c[1])
                    print(f"  {col:20s} " + "  ".join(f"{c}={s / rows:.2f}" for c, s in cands) + f"   best: {best[0]}")
                log("ordering candidates")
                print(f"\n== ordering candidates ({wanted[-1]}.events' codecs, after OPTIMIZE FINAL; p50 of "
                      f"{args.reps})")
                for variant, size, times in ordering_candidates(client, wanted[-1], args.reps):
                    print(f"  {variant}\n      {size / rows:.1f} B/event; " +
                          "; ".join(f"{p}: {s * 1000:.0f} ms" for p, s in times.items()))
        finally:
            clickhouse.close(dsn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
