"""The ``heartbeats`` table: every heartbeat with the rates derived for its interval, so the
worst offenders are a ClickHouse query (WORST_OFFENDERS_SQL), not a Prometheus label.

Privacy: the table keeps the device id (SREs need it to fix a misbehaving laptop) but never
the employee id; it is operational data with restricted access, and it cannot be joined to the
pseudonymous ``events`` table (device_key there is an HMAC the exporter does not know).

Where it lives: docs/adr/0006-fleet-heartbeat-store.md. With a ClickHouse server the exporter
shares the sink's DSN and database; with the embedded engine it opens its own data dir, because
one process at a time may open an embedded dir and the sink owns the default one.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from handtrace.core.cluster import ClusterLayout, apply_migrations
from handtrace.core.retention import TableRetention, TtlChange, apply_ttls
from handtrace.core.settings import RetentionSettings, Settings
from handtrace.fleet.state import Interval, Observation

MIGRATIONS: list[tuple[int, str, str]] = [
    (
        1,
        "heartbeats table",
        """
        CREATE TABLE IF NOT EXISTS {db}.heartbeats
        (
            heartbeat_id UUID,
            device_id String COMMENT 'device asset id (restricted: SRE remediation); no employee id is stored',
            sent_at DateTime64(6, 'UTC') COMMENT 'agent clock',
            received_at DateTime64(6, 'UTC') COMMENT 'exporter clock',
            agent_started_at DateTime64(6, 'UTC'),
            agent_version LowCardinality(String),
            os LowCardinality(String),
            cohort LowCardinality(String),
            state LowCardinality(String),
            battery_percent Nullable(Float32),
            charging Nullable(Bool),
            cpu_seconds Float64,
            rss_bytes Int64,
            payload_bytes_sent Int64,
            wire_bytes_sent Int64,
            events_captured Int64,
            events_sent Int64,
            events_dropped Map(String, Int64),
            spool_depth_events Int64,
            spool_depth_bytes Int64,
            radio_wakeups Int64,
            interval_s Nullable(Float64) COMMENT 'since the previous heartbeat of the same agent run',
            cpu_percent Nullable(Float64),
            upload_bytes_per_hour Nullable(Float64),
            agent_drain_percent_per_hour Nullable(Float64) COMMENT 'energy model; on battery only',
            device_drain_percent_per_hour Nullable(Float64) COMMENT 'reported battery fall; on battery only'
        )
        ENGINE = ReplacingMergeTree
        PARTITION BY toYYYYMM(sent_at)
        ORDER BY (device_id, sent_at, heartbeat_id)
        TTL toDateTime(sent_at) + INTERVAL 90 DAY
        """,
    ),
]

RETENTION: dict[str, TableRetention] = {"heartbeats": TableRetention("heartbeats", "sent_at"),
                                        "rollup_heartbeats_hourly": TableRetention("rollups", "hour")}
"""The data class of each fleet table (core/retention.py; migration 1's 90-day TTL is replaced by
the policy at the first migrate with one)."""

NEVER_EXPIRED: dict[str, str] = {"fleet_schema_migrations": "applied migrations"}

# The hourly rollup of the fleet's cost (issue #14 item 7; docs/cookbook.md): a target table,
# a backfill of the heartbeats already stored (only while the target is empty, so a re-run after
# a crash does not count twice) and the materialized view that feeds it from every later insert
# (migrations run when the exporter starts, before it writes). Bytes uploaded in an hour are the
# intervals' rates times their lengths (heartbeat counters are cumulative per agent run; the
# exporter derives the interval's rates when it stores the row). Per device, never per employee:
# heartbeats hold no employee id.
_HOURLY_SELECT = """
    SELECT toStartOfHour(sent_at) AS hour, os, agent_version, cohort,
           uniqExactState(device_id) AS devices,
           toUInt64(count()) AS heartbeats,
           sum(ifNull(interval_s, 0)) AS seconds,
           sum(ifNull(upload_bytes_per_hour * interval_s / 3600, 0)) AS upload_bytes,
           avgState(battery_percent) AS battery_percent,
           avgState(cpu_percent) AS cpu_percent,
           avgState(agent_drain_percent_per_hour) AS agent_drain_percent_per_hour,
           avgState(device_drain_percent_per_hour) AS device_drain_percent_per_hour
    FROM {db}.heartbeats
    GROUP BY hour, os, agent_version, cohort
"""

MIGRATIONS += [
    (
        2,
        "rollup heartbeats_hourly",
        """
        CREATE TABLE IF NOT EXISTS {db}.rollup_heartbeats_hourly
        (
            hour DateTime('UTC') COMMENT 'hour of sending (agent clock)',
            os LowCardinality(String),
            agent_version LowCardinality(String),
            cohort LowCardinality(String),
            devices AggregateFunction(uniqExact, String),
            heartbeats SimpleAggregateFunction(sum, UInt64),
            seconds SimpleAggregateFunction(sum, Float64) COMMENT 'summed interval lengths',
            upload_bytes SimpleAggregateFunction(sum, Float64) COMMENT 'bytes uploaded in those intervals',
            battery_percent AggregateFunction(avg, Nullable(Float32)),
            cpu_percent AggregateFunction(avg, Nullable(Float64)),
            agent_drain_percent_per_hour AggregateFunction(avg, Nullable(Float64)) COMMENT 'on battery only',
            device_drain_percent_per_hour AggregateFunction(avg, Nullable(Float64)) COMMENT 'on battery only'
        )
        ENGINE = AggregatingMergeTree
        PARTITION BY toYYYYMM(hour)
        ORDER BY (hour, os, agent_version, cohort)
        """,
    ),
    (3, "rollup heartbeats_hourly: backfill",
     "INSERT INTO {db}.rollup_heartbeats_hourly SELECT * FROM (" + _HOURLY_SELECT + ") "
     "WHERE (SELECT count() FROM {db}.rollup_heartbeats_hourly) = 0"),
    (4, "rollup heartbeats_hourly: view",
     "CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.rollup_heartbeats_hourly_mv TO {db}.rollup_heartbeats_hourly AS "
     + _HOURLY_SELECT),
]

COLUMNS = [
    "heartbeat_id", "device_id", "sent_at", "received_at", "agent_started_at", "agent_version", "os",
    "cohort", "state", "battery_percent", "charging", "cpu_seconds", "rss_bytes", "payload_bytes_sent",
    "wire_bytes_sent", "events_captured", "events_sent", "events_dropped", "spool_depth_events",
    "spool_depth_bytes", "radio_wakeups", "interval_s", "cpu_percent", "upload_bytes_per_hour",
    "agent_drain_percent_per_hour", "device_drain_percent_per_hour",
]

# The devices that cost their owners most over the last {hours} hours (agent clock), worst
# first. Parameters: hours, limit. Used by `handtrace fleet offenders` and the dashboards.
WORST_OFFENDERS_SQL = """
SELECT
    device_id,
    any(os) AS os,
    any(agent_version) AS agent_version,
    any(cohort) AS cohort,
    round(avg(agent_drain_percent_per_hour), 3) AS agent_drain_pct_per_hour,
    round(avg(upload_bytes_per_hour) / 1e6, 3) AS upload_mb_per_hour,
    round(avg(cpu_percent), 3) AS cpu_percent,
    max(rss_bytes) AS max_rss_bytes,
    max(spool_depth_bytes) AS max_spool_bytes,
    count() AS intervals
FROM {db}.heartbeats FINAL
WHERE sent_at >= now64(6) - toIntervalHour({hours}) AND interval_s > 0
GROUP BY device_id
ORDER BY agent_drain_pct_per_hour DESC, upload_mb_per_hour DESC
LIMIT {limit}
"""


def worst_offenders_sql(database: str, hours: int = 24, limit: int = 20) -> str:
    """WORST_OFFENDERS_SQL for a database (identifier validated by settings) and integer bounds."""
    return WORST_OFFENDERS_SQL.format(db=database, hours=int(hours), limit=int(limit))


def fleet_dsn(settings: Settings) -> str:
    """The DSN the exporter stores heartbeats in (see the module docstring)."""
    if settings.fleet.clickhouse_dsn:
        return settings.fleet.clickhouse_dsn
    shared = settings.clickhouse.dsn
    if shared and not shared.startswith("chdb://"):
        return shared
    return f"chdb://{(settings.state_dir / 'clickhouse-fleet').resolve()}"


def migrate(client: Any, database: str, retention: RetentionSettings | None = None,
            cluster: ClusterLayout | None = None) -> list[int]:
    """Apply pending migrations (own bookkeeping table, so it never collides with the sink's);
    with ``retention``, then set the heartbeats TTL from it (only when it differs). With
    ``cluster``, every statement is rendered for it (core/cluster.py)."""
    return apply_migrations(client, database, MIGRATIONS, "fleet_schema_migrations", cluster,
                            after=(lambda: apply_retention(client, database, retention, cluster))
                            if retention is not None else None)


def apply_retention(client: Any, database: str, retention: RetentionSettings,
                    cluster: ClusterLayout | None = None) -> list[TtlChange]:
    """Set the heartbeats TTL from the policy (DDL: the owner of the fleet store only)."""
    return apply_ttls(client, database, RETENTION, retention, cluster=cluster)


def _ts(us: int) -> datetime:
    return datetime.fromtimestamp(us / 1e6, tz=UTC)


def heartbeat_row(hb: dict[str, Any], obs: Observation, received_s: float) -> list[Any]:
    """One ``heartbeats`` row (column order of COLUMNS)."""
    iv: Interval | None = obs.interval if obs.interval is not None and obs.interval.seconds > 0 else None
    return [
        uuid.UUID(bytes=bytes(hb["heartbeat_id"])), hb["device_id"], _ts(hb["sent_at_us"]),
        datetime.fromtimestamp(received_s, tz=UTC), _ts(hb["agent_started_at_us"]), str(hb["agent_version"]),
        str(hb["os"]), str(hb.get("cohort") or ""), hb.get("state") or "capturing", hb.get("battery_percent"),
        hb.get("charging"), float(hb["cpu_seconds"]), int(hb["rss_bytes"]), int(hb["payload_bytes_sent"]),
        int(hb["wire_bytes_sent"]), int(hb["events_captured"]), int(hb["events_sent"]),
        {str(k): int(v) for k, v in (hb.get("events_dropped") or {}).items()},
        int(hb["spool_depth_events"]), int(hb["spool_depth_bytes"]), int(hb["radio_wakeups"]),
        iv.seconds if iv else None, iv.cpu_percent if iv else None,
        iv.upload_bytes_per_hour if iv else None,
        iv.agent_drain_percent_per_hour if iv else None, iv.device_drain_percent_per_hour if iv else None,
    ]
