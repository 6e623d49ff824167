"""ClickHouse tables the sink owns, created by ordered, idempotent migrations.

``events`` is the analyst-facing table: pseudonymous keys only, never a raw employee id.
``sink_ledger`` records every flush *before* its insert (write-ahead), which is what makes a
crash between insert and offset commit harmless (see writer.py).
"""

from __future__ import annotations

from typing import Any

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "events table",
        """
        CREATE TABLE IF NOT EXISTS {db}.events
        (
            event_id UUID,
            batch_id UUID,
            employee_key String COMMENT 'HMAC pseudonym of the employee (never the raw id)',
            device_key String COMMENT 'HMAC pseudonym of the device',
            kind LowCardinality(String),
            captured_at DateTime64(6, 'UTC') COMMENT 'agent clock at capture',
            received_at DateTime64(6, 'UTC') COMMENT 'stream clock when the batch was processed',
            stored_at DateTime64(6, 'UTC') DEFAULT now64(6),
            x Nullable(Int32),
            y Nullable(Int32),
            button LowCardinality(String),
            pressed Nullable(Bool),
            scroll_dx Nullable(Int32),
            scroll_dy Nullable(Int32),
            key_code Nullable(Int32),
            modifiers Nullable(Int32),
            text Nullable(String),
            text_masked Bool,
            app_id LowCardinality(Nullable(String)),
            window_title Nullable(String),
            url Nullable(String),
            screenshot_sha256 Nullable(String),
            screenshot_bytes Nullable(Int32),
            screenshot_format LowCardinality(String),
            screenshot_width Nullable(Int32),
            screenshot_height Nullable(Int32),
            agent_version LowCardinality(String),
            os LowCardinality(String),
            source_partition Int32,
            source_offset Int64
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(captured_at)
        ORDER BY (employee_key, captured_at, event_id)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),
    (
        2,
        "sink ledger",
        """
        CREATE TABLE IF NOT EXISTS {db}.sink_ledger
        (
            topic String,
            partition Int32,
            first_source_offset Int64,
            last_source_offset Int64,
            rows UInt64,
            token String,
            written_at DateTime64(3, 'UTC') DEFAULT now64(3)
        )
        ENGINE = MergeTree
        ORDER BY (topic, partition, last_source_offset)
        """,
    ),
    (
        3,
        "sink ledger decisions about pieces of a flush",
        # A flush row has piece = '' and outcome = ''. When a flush is split (bad data, too many
        # partitions), each decision -- split a piece, reject it, its dead-letter copy is out --
        # is a row of its own, written before it is acted on (sink/split.py).
        """
        ALTER TABLE {db}.sink_ledger
            ADD COLUMN IF NOT EXISTS piece String DEFAULT '',
            ADD COLUMN IF NOT EXISTS outcome LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS reason LowCardinality(String) DEFAULT '',
            ADD COLUMN IF NOT EXISTS detail String DEFAULT ''
        """,
    ),
]


def migrate(client: Any, database: str) -> list[int]:
    """Apply pending migrations; returns the ids applied now."""
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(id UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY id"
    )
    done = {r[0] for r in client.query(f"SELECT id FROM {database}.schema_migrations").result_rows}
    applied = []
    for mid, name, ddl in MIGRATIONS:
        if mid in done:
            continue
        client.command(ddl.format(db=database))
        client.insert(f"{database}.schema_migrations", [[mid, name]], column_names=["id", "name"])
        applied.append(mid)
    return applied
