"""ClickHouse tables the sink owns, created by ordered, idempotent migrations.

``events`` is the analyst-facing table: pseudonymous keys only, never a raw employee id.
``sink_ledger`` records every flush *before* its insert (write-ahead), which is what makes a
crash between insert and offset commit harmless (see writer.py).
``demonstrations``, ``frames`` and ``demonstration_events`` hold submitted demonstrations
(sink/demonstrations.py; docs/design/demonstrations.md): a demonstration's frames and events rows
count only once its ``demonstrations`` row says ``complete``.
``control_audit`` is the control-plane API's audit trail (sink/audit.py).
``access_audit`` records every query run through the access tiers (warehouse/tiers.py).
``retention_applied`` logs every TTL change made from the retention settings (core/retention.py).
"""

from __future__ import annotations

from typing import Any

from handtrace.core.cluster import ClusterLayout, apply_migrations
from handtrace.core.retention import TableRetention, TtlChange, apply_ttls
from handtrace.core.settings import RetentionSettings

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
    (
        4,
        "demonstrations table",
        # One row per demonstration, inserted LAST (after its frames and events rows): a
        # 'complete' row is what makes a demonstration's other rows exportable. ReplacingMergeTree
        # by stored_at: a re-upload that completes a demonstration first recorded 'incomplete'
        # supersedes that row (a complete one is never followed by another: its id is skipped).
        """
        CREATE TABLE IF NOT EXISTS {db}.demonstrations
        (
            demonstration_id UUID,
            employee_key String COMMENT 'HMAC pseudonym of the employee (never the raw id)',
            device_key String COMMENT 'HMAC pseudonym of the device',
            instruction String
                COMMENT 'the task as the employee worded it, after redaction (may describe their work)',
            status LowCardinality(String)
                COMMENT 'complete: every frame and event stored; incomplete: nothing else of it stored',
            started_at DateTime64(6, 'UTC'),
            ended_at DateTime64(6, 'UTC'),
            sent_at DateTime64(6, 'UTC') COMMENT 'agent clock at upload',
            received_at DateTime64(6, 'UTC') COMMENT 'stream clock when the header was processed',
            stored_at DateTime64(6, 'UTC') DEFAULT now64(6),
            screen_width UInt32,
            screen_height UInt32,
            screen_scale Float32,
            apps Array(String) COMMENT 'allowlisted apps seen during the demonstration',
            consent_version LowCardinality(String),
            policy_version LowCardinality(String),
            agent_version LowCardinality(String),
            os LowCardinality(String),
            frames UInt32 COMMENT 'frames in the accepted manifest',
            events UInt32,
            missing_frames UInt32 COMMENT 'manifest frames never received (incomplete only)',
            frames_dropped Map(String, UInt32) COMMENT 'frames the stream removed, by reason',
            events_dropped Map(String, UInt32) COMMENT 'events the stream removed, by reason',
            reason LowCardinality(String) COMMENT 'why incomplete (empty when complete)'
        )
        ENGINE = ReplacingMergeTree(stored_at)
        PARTITION BY toYYYYMM(started_at)
        ORDER BY (employee_key, demonstration_id)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),
    (
        5,
        "frames table",
        # One row per stored frame; its object is in the frame store under object_key (written
        # before the row). Pixels of non-allowlisted windows were filled at capture (`filled`).
        """
        CREATE TABLE IF NOT EXISTS {db}.frames
        (
            demonstration_id UUID,
            employee_key String COMMENT 'HMAC pseudonym of the employee (never the raw id)',
            step UInt32,
            sha256 String COMMENT 'hex SHA-256 of the image bytes (names the object)',
            object_key String COMMENT 'key in the frame store: frames/<employee_key>/..',
            format LowCardinality(String),
            bytes UInt32,
            width UInt32,
            height UInt32,
            captured_at DateTime64(6, 'UTC') COMMENT 'agent clock at grab',
            reason LowCardinality(String) COMMENT 'what the frame precedes (click, drag, scroll, typing, hotkey, end)',
            action_started_at Nullable(DateTime64(6, 'UTC')),
            action_event_id Nullable(UUID),
            windows Array(Tuple(app_id Nullable(String), url Nullable(String), x Int32, y Int32,
                                width Int32, height Int32))
                COMMENT 'visible (allowlisted, unfilled) windows; urls after redaction',
            filled Array(Tuple(x Int32, y Int32, width Int32, height Int32))
                COMMENT 'rectangles painted solid at capture (not allowlisted)',
            stored_at DateTime64(6, 'UTC') DEFAULT now64(6)
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(captured_at)
        ORDER BY (employee_key, demonstration_id, step, sha256)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),
    (
        6,
        "demonstration events table",
        # The events of demonstrations, enforced like passive ones except sampling: the events
        # columns plus demonstration_id (source_* = the header message's).
        """
        CREATE TABLE IF NOT EXISTS {db}.demonstration_events
        (
            demonstration_id UUID,
            event_id UUID,
            batch_id UUID,
            employee_key String COMMENT 'HMAC pseudonym of the employee (never the raw id)',
            device_key String COMMENT 'HMAC pseudonym of the device',
            kind LowCardinality(String),
            captured_at DateTime64(6, 'UTC') COMMENT 'agent clock at capture',
            received_at DateTime64(6, 'UTC') COMMENT 'stream clock when the header was processed',
            stored_at DateTime64(6, 'UTC') DEFAULT now64(6),
            x Nullable(Int32),
            y Nullable(Int32),
            button LowCardinality(String),
            pressed Nullable(Bool),
            scroll_dx Nullable(Int32),
            scroll_dy Nullable(Int32),
            key_code Nullable(Int32),
            modifiers Nullable(Int32),
            text Nullable(String) COMMENT 'typed text after masking and redaction',
            text_masked Bool,
            app_id LowCardinality(Nullable(String)),
            window_title Nullable(String) COMMENT 'after redaction',
            url Nullable(String) COMMENT 'after redaction',
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
        ORDER BY (employee_key, demonstration_id, captured_at, event_id)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),
    (
        7,
        "demonstrations cohort",
        # The header always carried the agent's cohort; stored now so exports can filter on it.
        """
        ALTER TABLE {db}.demonstrations
            ADD COLUMN IF NOT EXISTS cohort LowCardinality(String) DEFAULT '' AFTER device_key
        """,
    ),
    (
        8,
        "dataset exports",
        # One row per finished training-data export (export/dataset.py; docs/design/export.md):
        # what went out, to where, under which filters, containing whom. Erasure and withdrawals
        # find the exports they make stale here.
        """
        CREATE TABLE IF NOT EXISTS {db}.dataset_exports
        (
            export_id UUID,
            created_at DateTime64(6, 'UTC') COMMENT 'when the export was planned',
            finished_at DateTime64(6, 'UTC'),
            actor String COMMENT 'who ran it',
            output String COMMENT 'where it was written (path or URL)',
            filters String COMMENT 'the filters, JSON',
            format_version UInt16,
            participants Array(String) COMMENT 'employee_key of every participant in it',
            demonstration_ids Array(UUID),
            tasks UInt32,
            steps UInt32,
            images UInt32,
            bytes UInt64,
            frames_filled UInt32 COMMENT 'frames in which scrubbing filled text',
            frames_unscrubbable UInt32 COMMENT 'frames left out because they could not be scrubbed',
            replaces Nullable(UUID) COMMENT 'the stale export this one reissues',
            manifest_sha256 String
        )
        ENGINE = ReplacingMergeTree(finished_at)
        ORDER BY export_id
        """,
    ),
    (
        9,
        "withdrawals",
        # A participant (erasure, withdrawal of consent) or one demonstration withdrawn from
        # training data. Every later export leaves them out; exports that contain them are stale.
        """
        CREATE TABLE IF NOT EXISTS {db}.withdrawals
        (
            withdrawal_id UUID,
            kind LowCardinality(String) COMMENT 'participant | demonstration',
            employee_key String COMMENT 'HMAC pseudonym of the employee',
            demonstration_id Nullable(UUID) COMMENT 'set for kind = demonstration',
            withdrawn_at DateTime64(6, 'UTC'),
            actor String,
            reason String
        )
        ENGINE = MergeTree
        ORDER BY (employee_key, withdrawn_at)
        """,
    ),
    (
        10,
        "control-plane audit trail",
        # One row per entry of the audit topic (sink/audit.py): every change and every refusal
        # the control-plane API made (issue #13, "Audit"). MergeTree, not Replacing: an audit
        # trail never collapses rows; exactly once comes from the ledger and the dedup token.
        # No PARTITION BY: one part per insert, so an insert is all or nothing.
        """
        CREATE TABLE IF NOT EXISTS {db}.control_audit
        (
            at DateTime64(6, 'UTC') COMMENT 'when the API decided (the broker time for invalid entries)',
            subject String COMMENT 'who: the subject of the caller token',
            name String,
            roles Array(String) COMMENT 'roles of the caller (the true role, not the actor_role of a control)',
            action LowCardinality(String) COMMENT 'what (pause, exemption_grant, ...); invalid: not an entry',
            target Nullable(String) COMMENT 'on whom or what',
            reason String COMMENT 'why, as the caller gave it',
            before String COMMENT 'JSON',
            after String COMMENT 'JSON',
            outcome LowCardinality(String) COMMENT 'allowed | refused | invalid',
            detail String COMMENT 'for invalid entries: the message as it was (cut at 64 KiB)',
            method LowCardinality(String),
            path String,
            source_partition Int32,
            source_offset Int64,
            stored_at DateTime64(6, 'UTC') DEFAULT now64(6)
        )
        ENGINE = MergeTree
        ORDER BY (at, source_offset)
        SETTINGS non_replicated_deduplication_window = 10000
        """,
    ),    # 11 is erasure (part E, branch erase).
    (
        12,
        "access audit",
        # One row per query run through the access tiers (warehouse/tiers.py; docs/warehouse.md):
        # who asked what under which role and purpose, what it touched, and whether it was
        # answered. Written for refusals too. MergeTree: an audit trail never collapses rows.
        """
        CREATE TABLE IF NOT EXISTS {db}.access_audit
        (
            at DateTime64(6, 'UTC') COMMENT 'when the query was decided',
            actor String COMMENT 'who: --actor, else the OS user',
            os_user String COMMENT 'the OS user that ran it (whatever --actor says)',
            role LowCardinality(String) COMMENT 'analyst | researcher | auditor | admin',
            purpose String COMMENT 'the stated purpose (researcher: required)',
            query String COMMENT 'the text as given (cut at 64 KiB)',
            executed String COMMENT 'the statement run (with the k-anonymity clause for analysts)',
            tables Array(String) COMMENT 'tables read (database.table), as ClickHouse resolved them',
            columns Array(String) COMMENT 'columns read (database.table.column)',
            rows UInt64 COMMENT 'rows returned',
            outcome LowCardinality(String) COMMENT 'allowed | refused | failed',
            reason String COMMENT 'why refused or failed'
        )
        ENGINE = MergeTree
        ORDER BY at
        """,
    ),
    (
        11,
        "erasure receipts",
        # One row per verified erasure (handtrace erase, core/erasure.py, issue #14 part E): who
        # asked, why, when, what was removed, and when a re-query found nothing left. Written only
        # after that re-query; kept after the erasure (the controller must be able to show it).
        """
        CREATE TABLE IF NOT EXISTS {db}.erasure_receipts
        (
            receipt_id UUID,
            employee_key String COMMENT 'HMAC pseudonym of the erased employee (never the raw id)',
            actor String,
            reason String,
            requested_at DateTime64(6, 'UTC'),
            verified_at DateTime64(6, 'UTC') COMMENT 'when the re-query found 0 rows and 0 objects',
            rows_removed Map(String, UInt64) COMMENT 'table -> rows deleted',
            objects_removed UInt64 COMMENT 'frame store objects deleted',
            erasure_control_id String COMMENT 'erasure_id of the signed suppression on the controls topic',
            withdrawal_id UUID COMMENT 'the withdrawals row that marks exports containing them stale',
            settled Bool COMMENT 'the pipeline held nothing more of them before the deletion (control/settle.py)'
        )
        ENGINE = MergeTree
        ORDER BY (requested_at, receipt_id)
        """,
    ),
    (
        13,
        "retention changes",
        # Retention (issue #14 part R, core/retention.py): after the numbered migrations,
        # `migrate(..., retention=policy)` sets every table's TTL from the settings (RETENTION
        # below) and logs each change here; only tables whose TTL differs are altered.
        """
        CREATE TABLE IF NOT EXISTS {db}.retention_applied
        (
            at DateTime64(6, 'UTC') COMMENT 'when the TTL was changed',
            table String,
            data_class LowCardinality(String) COMMENT 'events | demonstrations | heartbeats | rollups | audit',
            days UInt32 COMMENT 'the policy (0 = forever: TTL removed)',
            before String COMMENT 'the TTL in force before (empty: none)',
            after String COMMENT 'the TTL in force after (empty: none)'
        )
        ENGINE = MergeTree
        ORDER BY at
        """,
    ),
]

RETENTION: dict[str, TableRetention] = {
    "events": TableRetention("events", "captured_at"),
    "demonstrations": TableRetention("demonstrations", "started_at"),
    "demonstration_events": TableRetention("demonstrations", "captured_at"),
    "frames": TableRetention("demonstrations", "captured_at"),
    "control_audit": TableRetention("audit", "at"),
    "access_audit": TableRetention("audit", "at"),
    "rollup_app_activity_hourly": TableRetention("rollups", "hour"),
    "rollup_shortcuts_hourly": TableRetention("rollups", "hour"),
    "rollup_demonstrations_daily": TableRetention("rollups", "day"),
    "rollup_demonstration_drops_hourly": TableRetention("rollups", "hour"),
}
"""The data class of each table and the column its TTL counts from (core/retention.py). Every
migrated table is here or in :data:`NEVER_EXPIRED` (a unit test fails otherwise). Rollups: add
their tables with class ``rollups``."""

NEVER_EXPIRED: dict[str, str] = {
    "sink_ledger": "the sink's write-ahead ledger (topic, partition, offsets, counts; no captured data): "
                   "exactly-once replay reads it",
    "dataset_exports": "the register of what training data went where and with whom in it: erasure and "
                       "withdrawals find the stale exports here",
    "withdrawals": "obligations: every later export must leave the person or demonstration out",
    "erasure_receipts": "the proof that an erasure was done (pseudonym only, no captured data)",
    "retention_applied": "the log of retention changes themselves",
    "schema_migrations": "applied migrations",
}
"""Migrated tables that no retention class expires, and why."""

# ------------------------------------------------------------------ rollups (issue #14 item 7)
#
# Each rollup is a target table plus a materialized view that feeds it from every insert into
# its source, created by three migrations: the target, a backfill of what the source already
# holds (only while the target is empty, so a re-run after a crash between the insert and its
# schema_migrations row does not count twice), then the view. Migrations run when the sink or
# the demo starts, before they write, so no insert falls between the backfill and the view.
# Rollups count rows as inserted: the sink's exactly-once writes (ledger + dedup tokens) are what
# make them equal to the raw counts (a block ClickHouse drops as a duplicate never reaches a view).
# Rollups of people's activity keep ``employee_key`` as a key column: erasure deletes a person's
# rows from them (ERASABLE) and the analyst tier's k-anonymity condition
# (``uniqExact(employee_key) >= k``) applies to them as to the raw tables. docs/cookbook.md.

ROLLUP_SOURCES: dict[str, tuple[str, str]] = {}
"""Rollup table -> (its source table, the SELECT that turns source rows into rollup rows)."""


def _rollup(first_id: int, name: str, table_ddl: str, source: str, select: str) -> list[tuple[int, str, str]]:
    ROLLUP_SOURCES[name] = (source, select)
    body = select.format(src=f"{{db}}.{source}")
    return [
        (first_id, f"rollup {name}", table_ddl),
        (first_id + 1, f"rollup {name}: backfill",
         f"INSERT INTO {{db}}.{name} SELECT * FROM ({body}) "
         f"WHERE (SELECT count() FROM {{db}}.{name}) = 0"),
        (first_id + 2, f"rollup {name}: view",
         f"CREATE MATERIALIZED VIEW IF NOT EXISTS {{db}}.{name}_mv TO {{db}}.{name} AS {body}"),
    ]


# Keysyms of the modifier keys themselves (Shift_L .. Hyper_R): pressing ctrl then alt is not a chord.
_MODIFIER_KEYSYMS = "key_code NOT BETWEEN 65505 AND 65518"

MIGRATIONS += _rollup(14, "rollup_app_activity_hourly", """
    CREATE TABLE IF NOT EXISTS {db}.rollup_app_activity_hourly
    (
        hour DateTime('UTC') COMMENT 'hour of capture (agent clock)',
        app_id LowCardinality(String) COMMENT 'empty: no allowlisted app focused',
        kind LowCardinality(String),
        employee_key String COMMENT 'HMAC pseudonym (erasure; analysts may only count it)',
        events UInt64
    )
    ENGINE = SummingMergeTree
    PARTITION BY toYYYYMM(hour)
    ORDER BY (hour, app_id, kind, employee_key)
    """, "events", """
    SELECT toStartOfHour(captured_at) AS hour, ifNull(app_id, '') AS app_id, kind, employee_key,
           count() AS events
    FROM {src}
    GROUP BY hour, app_id, kind, employee_key
    """)

MIGRATIONS += _rollup(17, "rollup_shortcuts_hourly", """
    CREATE TABLE IF NOT EXISTS {db}.rollup_shortcuts_hourly
    (
        hour DateTime('UTC') COMMENT 'hour of capture (agent clock)',
        app_id LowCardinality(String),
        modifiers UInt8 COMMENT 'modifier keys held: 1 shift, 2 ctrl, 4 alt, 8 meta',
        key_code Int32 COMMENT 'X11 keysym of the key pressed with them',
        employee_key String COMMENT 'HMAC pseudonym (erasure; analysts may only count it)',
        presses UInt64
    )
    ENGINE = SummingMergeTree
    PARTITION BY toYYYYMM(hour)
    ORDER BY (hour, app_id, modifiers, key_code, employee_key)
    """, "events", f"""
    SELECT toStartOfHour(captured_at) AS hour, ifNull(app_id, '') AS app_id,
           toUInt8(assumeNotNull(modifiers)) AS modifiers, assumeNotNull(key_code) AS key_code, employee_key,
           count() AS presses
    FROM {{src}}
    WHERE kind = 'key_down' AND bitAnd(ifNull(modifiers, 0), 14) != 0 AND key_code IS NOT NULL
      AND {_MODIFIER_KEYSYMS}
    GROUP BY hour, app_id, modifiers, key_code, employee_key
    """)
# bitAnd(.., 14): ctrl, alt or meta held; shift alone is typing, not a shortcut.

MIGRATIONS += _rollup(20, "rollup_demonstrations_daily", """
    CREATE TABLE IF NOT EXISTS {db}.rollup_demonstrations_daily
    (
        day Date COMMENT 'day the demonstration started (agent clock, UTC)',
        app_id LowCardinality(String) COMMENT 'one row per app seen in it (empty: none)',
        employee_key String COMMENT 'HMAC pseudonym (erasure; analysts may only count it)',
        demonstrations UInt64,
        seconds Float64 COMMENT 'summed duration (ended_at - started_at)',
        events UInt64,
        frames UInt64
    )
    ENGINE = SummingMergeTree
    PARTITION BY toYYYYMM(day)
    ORDER BY (day, app_id, employee_key)
    """, "demonstrations", """
    SELECT toDate(started_at) AS day, arrayJoin(if(empty(apps), [''], apps)) AS app_id, employee_key,
           count() AS demonstrations,
           sum(toFloat64(dateDiff('microsecond', started_at, ended_at)) / 1e6) AS seconds,
           sum(toUInt64(events)) AS events, sum(toUInt64(frames)) AS frames
    FROM {src}
    WHERE status = 'complete'
    GROUP BY day, app_id, employee_key
    """)
# status = 'complete' only: an 'incomplete' row can be superseded by a complete re-upload of the
# same demonstration (ReplacingMergeTree), and a complete one is never followed by another.

MIGRATIONS += _rollup(23, "rollup_demonstration_drops_hourly", """
    CREATE TABLE IF NOT EXISTS {db}.rollup_demonstration_drops_hourly
    (
        hour DateTime('UTC') COMMENT 'hour the demonstration started (agent clock)',
        what LowCardinality(String) COMMENT 'events | frames',
        reason LowCardinality(String) COMMENT 'why the stream removed them',
        dropped UInt64
    )
    ENGINE = SummingMergeTree
    PARTITION BY toYYYYMM(hour)
    ORDER BY (hour, what, reason)
    """, "demonstrations", """
    SELECT toStartOfHour(started_at) AS hour, d.1 AS what, d.2 AS reason, sum(d.3) AS dropped
    FROM {src}
    ARRAY JOIN arrayConcat(
        arrayMap((r, n) -> ('events', r, toUInt64(n)), mapKeys(events_dropped), mapValues(events_dropped)),
        arrayMap((r, n) -> ('frames', r, toUInt64(n)), mapKeys(frames_dropped), mapValues(frames_dropped))) AS d
    WHERE status = 'complete'
    GROUP BY hour, what, reason
    """)
# No employee_key: pipeline counts by reason (like the stream's Prometheus counters), not anyone's
# activity; an erasure leaves these totals as they are. Drops of passive events are counted only
# by the stream's Prometheus metrics (handtrace_stream_events_total by decision), never stored in
# ClickHouse; the agent's own drops are cumulative counters in the fleet store's heartbeats.

# ------------------------------------------------------------------ schema for scale (issue #14 item 9)
#
# Per-column codecs of the two event tables, chosen by measurement on simulator-shaped data
# (bench/warehouse_scale.py --candidates; docs/adr/0017-schema-for-scale.md has the table).
# ``ALTER ... MODIFY COLUMN c CODEC(..)`` changes metadata only: new parts are written with it,
# existing parts take it when they are merged. Re-running it is harmless (idempotent).

EVENT_CODECS: dict[str, str] = {
    "event_id": "ZSTD(3)",
    "batch_id": "ZSTD(1)",
    "employee_key": "ZSTD(3)",
    "device_key": "ZSTD(3)",
    "kind": "ZSTD(1)",
    "captured_at": "Delta, ZSTD(1)",
    "received_at": "ZSTD(1)",
    "stored_at": "ZSTD(1)",
    "x": "Delta, ZSTD(1)",
    "y": "Delta, ZSTD(1)",
    "button": "ZSTD(1)",
    "pressed": "ZSTD(1)",
    "scroll_dx": "ZSTD(1)",
    "scroll_dy": "T64, ZSTD(1)",
    "key_code": "T64, ZSTD(1)",
    "modifiers": "T64, ZSTD(1)",
    "text": "ZSTD(1)",
    "text_masked": "ZSTD(1)",
    "app_id": "ZSTD(1)",
    "window_title": "ZSTD(1)",
    "url": "ZSTD(3)",
    "screenshot_sha256": "ZSTD(1)",
    "screenshot_bytes": "ZSTD(1)",
    "screenshot_format": "ZSTD(1)",
    "screenshot_width": "ZSTD(1)",
    "screenshot_height": "ZSTD(1)",
    "agent_version": "ZSTD(1)",
    "os": "ZSTD(1)",
    "source_partition": "ZSTD(1)",
    "source_offset": "Delta, ZSTD(1)",
}
"""Column -> codec of ``events`` and ``demonstration_events`` (the smallest candidate of each column;
``demonstration_id`` keeps LZ4)."""


def _codecs(table: str) -> str:
    return f"ALTER TABLE {{db}}.{table} " + ", ".join(
        f"MODIFY COLUMN {c} CODEC({codec})" for c, codec in EVENT_CODECS.items())


MIGRATIONS += [
    (26, "events codecs for scale", _codecs("events")),
    (27, "demonstration events codecs for scale", _codecs("demonstration_events")),
]

ERASABLE: tuple[str, ...] = ("events", "demonstrations", "frames", "demonstration_events",
                             "rollup_app_activity_hourly", "rollup_shortcuts_hourly", "rollup_demonstrations_daily")
"""Tables whose rows of a person ``handtrace erase`` deletes (by ``employee_key``). A table with an
``employee_key`` column must be here or in :data:`KEPT_AFTER_ERASURE` (a unit test fails
otherwise), so a new table cannot be forgotten. Rollups keyed by person belong here too."""

KEPT_AFTER_ERASURE: dict[str, str] = {
    "withdrawals": "the record that the person was withdrawn: later exports leave them out, older ones are stale",
    "erasure_receipts": "the proof of the erasure itself (pseudonym only, no captured data)",
}
"""Tables with an ``employee_key`` column that keep the person's pseudonym after an erasure, and why."""


def migrate(client: Any, database: str, retention: RetentionSettings | None = None,
            cluster: ClusterLayout | None = None) -> list[int]:
    """Apply pending migrations; returns the ids applied now. With ``retention``, then make every
    table's TTL match it (:func:`apply_retention`; None leaves TTLs as they are). With
    ``cluster``, every statement is rendered for it (core/cluster.py, docs/cluster.md)."""
    return apply_migrations(client, database, MIGRATIONS, "schema_migrations", cluster,
                            after=(lambda: apply_retention(client, database, retention, cluster))
                            if retention is not None else None)


def apply_retention(client: Any, database: str, retention: RetentionSettings,
                    cluster: ClusterLayout | None = None) -> list[TtlChange]:
    """Set the TTL of every table in :data:`RETENTION` from the policy (only where it differs),
    logging each change in ``retention_applied``. DDL: the owner of the database only."""
    return apply_ttls(client, database, RETENTION, retention, log_table="retention_applied", cluster=cluster)
