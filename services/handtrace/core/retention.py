"""Retention: how long each class of data is kept, applied where the data lives.

One policy (``Settings.warehouse.retention``, days per class, 0 = forever) drives three places:

- ClickHouse: every table that holds a class carries ``TTL toDateTime(<time column>) + INTERVAL n
  DAY`` (:func:`apply_ttls`, run after the numbered migrations by the process that owns the
  database: the sink at start, ``handtrace db migrate`` when no sink runs). ClickHouse deletes
  expired rows when it merges parts (and drops whole monthly partitions once all their rows
  expired); ``ALTER TABLE .. MATERIALIZE TTL`` forces it.
- Kafka: topics that carry a class keep it at most as long (:func:`topic_retention_ms`).
- The frame store: objects no live ``frames`` row references are deleted by
  :func:`expire_frame_objects` (``handtrace db retention --apply``), or by an S3 lifecycle rule.

Which table holds which class is said next to each store's migrations (``sink.schema.RETENTION``,
``fleet.store.RETENTION``); tests fail when a table is in neither that map nor the store's list of
tables that are never expired.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from handtrace.core.settings import RetentionSettings

if TYPE_CHECKING:
    from handtrace.core.cluster import ClusterLayout

CLASSES = ("events", "demonstrations", "heartbeats", "rollups", "audit")
"""The data classes a policy names (fields ``<class>_days`` of RetentionSettings)."""

ORPHAN_GRACE_S = 2 * 86_400
"""A frame object younger than this is never deleted for lack of a row: the sink writes the object
before its row, and a demonstration may wait up to ``demo.hold_s`` for its frames."""

_TTL = re.compile(r"\sTTL\s(.*?)(?:\sSETTINGS\s|$)", re.S)


@dataclass(frozen=True)
class TableRetention:
    """The class a table holds and the column that dates its rows."""

    data_class: str
    time_column: str


def days_for(policy: RetentionSettings, data_class: str) -> int:
    """The policy's days for a class (0 = forever)."""
    if data_class not in CLASSES:
        raise ValueError(f"unknown data class {data_class!r}; one of {CLASSES}")
    return int(getattr(policy, f"{data_class}_days"))


def ttl_expression(time_column: str, days: int) -> str:
    """The TTL as ClickHouse prints it in ``system.tables.engine_full`` ('' for none)."""
    return f"toDateTime({time_column}) + toIntervalDay({days})" if days > 0 else ""


def current_ttl(client: Any, database: str, table: str) -> str | None:
    """The table TTL in force ('' for none), or None when the table does not exist."""
    rows = client.query("SELECT engine_full FROM system.tables WHERE database = {d:String} AND name = {t:String}",
                        parameters={"d": database, "t": table}).result_rows
    if not rows:
        return None
    m = _TTL.search(" " + str(rows[0][0]))
    return m.group(1).strip() if m else ""


@dataclass(frozen=True)
class TtlChange:
    """One ``ALTER TABLE .. MODIFY/REMOVE TTL`` that was run."""

    table: str
    data_class: str
    days: int
    before: str
    after: str


def apply_ttls(client: Any, database: str, tables: Mapping[str, TableRetention], policy: RetentionSettings,
               log_table: str | None = None, cluster: ClusterLayout | None = None) -> list[TtlChange]:
    """Make every table's TTL match the policy; only tables whose TTL differs are altered (so a
    second run changes nothing). Each change is logged in ``log_table`` when given. Needs the
    owner of the database (DDL): a remote client (chserve) refuses it. With ``cluster`` the TTL
    is the replicated local table's, altered ``ON CLUSTER`` (a Distributed table has none)."""
    changes: list[TtlChange] = []
    for table, rule in tables.items():
        physical = cluster.local(table) if cluster is not None else table
        on_cluster = f" {cluster.on_cluster()}" if cluster is not None else ""
        before = current_ttl(client, database, physical)
        if before is None:
            continue  # created by a later migration of this store, or not in this store
        days = days_for(policy, rule.data_class)
        after = ttl_expression(rule.time_column, days)
        if before == after:
            continue
        if after:
            client.command(f"ALTER TABLE {database}.{physical}{on_cluster} MODIFY TTL toDateTime({rule.time_column}) "
                           f"+ INTERVAL {days} DAY")
        else:
            client.command(f"ALTER TABLE {database}.{physical}{on_cluster} REMOVE TTL")
        change = TtlChange(table, rule.data_class, days, before, after)
        changes.append(change)
        if log_table:
            client.insert(f"{database}.{log_table}",
                          [[datetime.now(UTC), table, rule.data_class, days, before, after]],
                          column_names=["at", "table", "data_class", "days", "before", "after"])
    return changes


@dataclass(frozen=True)
class TableReport:
    """One table against its policy."""

    store: str
    table: str
    data_class: str
    policy_days: int
    ttl: str
    ttl_matches: bool
    rows: int
    oldest: str | None
    past_policy: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def table_reports(client: Any, database: str, tables: Mapping[str, TableRetention], policy: RetentionSettings,
                  store: str = "warehouse") -> list[TableReport]:
    """Per table: the policy, the TTL in force, rows, the oldest row's time and the rows older than
    the policy (physically present: no FINAL; 0 once merges ran)."""
    out: list[TableReport] = []
    for table, rule in tables.items():
        ttl = current_ttl(client, database, table)
        if ttl is None:
            continue
        days = days_for(policy, rule.data_class)
        col = rule.time_column
        past = f"countIf(toDateTime({col}) < now() - toIntervalDay({days}))" if days > 0 else "toUInt64(0)"
        rows, oldest, n_past = client.query(
            f"SELECT count(), if(count() = 0, '', toString(min({col}))), {past} FROM {database}.{table}"
        ).result_rows[0]
        out.append(TableReport(store, table, rule.data_class, days, ttl, ttl == ttl_expression(col, days),
                               int(rows), str(oldest) or None, int(n_past)))
    return out


# ------------------------------------------------------------------------------------ Kafka


def topic_retention_ms(transport_ms: int, days: int) -> int:
    """A topic keeps its class no longer than the policy: the shorter of the topic's own
    (transport) retention and the policy; -1 (forever) only when both are forever."""
    policy_ms = days * 86_400_000 if days > 0 else -1
    if transport_ms < 0:
        return policy_ms
    if policy_ms < 0:
        return transport_ms
    return min(transport_ms, policy_ms)


# ------------------------------------------------------------------------------ frame store


def _dated(store: Any, prefix: str) -> Iterator[tuple[str, float]]:
    """(key, last modified, epoch seconds) of every object under ``prefix``."""
    dated = getattr(store, "list_dated", None)
    if dated is None:
        raise TypeError(f"{type(store).__name__} cannot list objects with their times")
    yield from dated(prefix)


@dataclass
class ObjectsReport:
    """Frame store objects against the frames table."""

    objects: int = 0
    oldest: str | None = None
    unreferenced: int = 0
    deleted: int = 0
    young_kept: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def expire_frame_objects(client: Any, database: str, store: Any, policy: RetentionSettings, *, apply: bool,
                         batch: int = 1000, now: float | None = None, grace_s: float = ORPHAN_GRACE_S,
                         progress: Callable[[str], None] = lambda _m: None) -> ObjectsReport:
    """Count the objects under ``frames/`` and find those no live ``frames`` row references (its row
    expired by the demonstrations policy, was deleted, or never came); with ``apply``, delete them.
    Objects younger than ``grace_s`` are kept whatever their rows (written before the row). Works in
    batches of ``batch`` keys: one query per batch, never the whole key set in memory."""
    days = days_for(policy, "demonstrations")
    now = time.time() if now is None else now
    report = ObjectsReport()
    oldest = None
    live = f" AND toDateTime(captured_at) >= now() - toIntervalDay({days})" if days > 0 else ""
    chunk: list[tuple[str, float]] = []

    def flush() -> None:
        keys = [k for k, _ in chunk]
        found = {r[0] for r in client.query(
            f"SELECT DISTINCT object_key FROM {database}.frames WHERE object_key IN {{keys:Array(String)}}{live}",
            parameters={"keys": keys}).result_rows}
        for key, mtime in chunk:
            if key in found:
                continue
            report.unreferenced += 1
            if now - mtime < grace_s:
                report.young_kept += 1
            elif apply and store.delete(key):
                report.deleted += 1
        chunk.clear()

    for key, mtime in _dated(store, "frames/"):
        report.objects += 1
        oldest = mtime if oldest is None else min(oldest, mtime)
        chunk.append((key, mtime))
        if len(chunk) >= batch:
            flush()
            progress(f"frame objects checked: {report.objects}")
    if chunk:
        flush()
    report.oldest = datetime.fromtimestamp(oldest, tz=UTC).isoformat(timespec="seconds") if oldest else None
    return report
