"""ClickHouse cluster mode: every migration's SQL rendered for a sharded, replicated layout.

Migrations are written once, for one node (sink/schema.py, fleet/store.py). With
``clickhouse.cluster`` set, :func:`render` turns each statement into its cluster form at migrate
time, so a migration added later is covered without a second copy (docs/adr/0020):

- ``CREATE TABLE {db}.t (...) ENGINE = XMergeTree(args) ...`` becomes ``{db}.t_local`` ``ON
  CLUSTER`` with ``ReplicatedXMergeTree('<zk path>', '{replica}', args)``, plus ``{db}.t`` ``ON
  CLUSTER`` as ``Distributed(cluster, db, t_local, <sharding key>)``: everything that reads or
  writes keeps using the name ``t``;
- ``ALTER TABLE {db}.t ...`` is run ``ON CLUSTER`` on ``t_local`` and then on ``t``;
- ``CREATE MATERIALIZED VIEW {db}.v TO {db}.t AS SELECT .. FROM {db}.s`` is created ``ON CLUSTER``
  on the local tables (a view fires on the insert into the shard's own ``s_local``);
- ``INSERT`` (backfills) is left as it is: it runs once, through the Distributed tables;
- anything else is refused (ValueError), so a new kind of statement fails the test that renders
  every migration (tests/unit/test_cluster_ddl.py) instead of silently running on one node.

The sharding key is deterministic (never ``rand()``): a retried insert through a Distributed
table must split into the same per-shard blocks, or the shards' deduplication by
``insert_deduplication_token`` would drop the wrong rows (the sink's exactly-once, ADR 0020).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handtrace.core.settings import ClickHouseSettings, Sharding

LOCAL_SUFFIX = "_local"
DEFAULT_ZOOKEEPER_PATH = "/clickhouse/tables/{shard}/{database}/{table}"

# Inserts the sink and migrate rely on reading back at once (the ledger, the migrations table):
# acknowledged only once a majority of the shard's replicas has them, and written through the
# Distributed table synchronously (the shard has the rows when the insert returns). Reads of
# them use SELECT_CONSISTENT. ADR 0020.
INSERT_CONSISTENT: dict[str, Any] = {"insert_quorum": "auto", "insert_quorum_parallel": 0,
                           "insert_distributed_sync": 1}
SELECT_CONSISTENT: dict[str, Any] = {"select_sequential_consistency": 1}

_CREATE_TABLE = re.compile(
    r"^\s*CREATE\s+TABLE\s+IF\s+NOT\s+EXISTS\s+(?P<db>\{db\}|\w+)\.(?P<name>\w+)\s*(?P<body>\(.*)$",
    re.S | re.I)
_ENGINE = re.compile(r"\bENGINE\s*=\s*(?P<engine>(?:Replacing|Summing|Aggregating|Collapsing)?MergeTree)\b"
                     r"(?P<args>\s*\([^()]*\))?", re.I)
_ORDER_BY = re.compile(r"\bORDER\s+BY\s+(?P<key>\([^()]*\)|[\w.]+)", re.I)
_ALTER = re.compile(r"^\s*ALTER\s+TABLE\s+(?P<db>\{db\}|\w+)\.(?P<name>\w+)\s+(?P<rest>.*)$", re.S | re.I)
_VIEW = re.compile(
    r"^\s*CREATE\s+MATERIALIZED\s+VIEW\s+IF\s+NOT\s+EXISTS\s+(?P<db>\{db\}|\w+)\.(?P<name>\w+)\s+"
    r"TO\s+(?P=db)\.(?P<target>\w+)\s+AS\s+(?P<select>.*)$", re.S | re.I)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\s", re.I)
_CREATE_DATABASE = re.compile(r"^\s*CREATE\s+DATABASE\s+IF\s+NOT\s+EXISTS\s+(?P<db>\w+)\s*$", re.I)


SHARD_BY: dict[str, str] = {
    # A Kafka partition's ledger on one shard: the sink reads it back as a whole (its last flush
    # and that flush's decisions), from one replica set, with sequential consistency.
    "sink_ledger": "cityHash64(topic, partition)",
}
"""Sharding keys that differ from the rule of :meth:`ClusterLayout.sharding_key`, and why."""


@dataclass(frozen=True)
class ClusterLayout:
    """Where and how tables live on a ClickHouse cluster (from ``clickhouse.cluster`` and friends)."""

    cluster: str
    sharding: Sharding = "person"
    zookeeper_path: str = DEFAULT_ZOOKEEPER_PATH

    def on_cluster(self) -> str:
        """The ``ON CLUSTER`` clause (the name quoted as an identifier)."""
        return f"ON CLUSTER `{self.cluster}`"

    @staticmethod
    def local(table: str) -> str:
        """The replicated table that holds a shard's rows of ``table`` (the Distributed one)."""
        return table + LOCAL_SUFFIX

    def sharding_key(self, table: str, body: str) -> str:
        """The Distributed sharding key of a table created with ``body`` (columns .. settings):
        the person (``cityHash64(employee_key)``) for tables that have one and ``sharding =
        person``, else a hash of the sorting key. Both deterministic (see the module docstring)."""
        columns = body.split("ENGINE", 1)[0]
        if table in SHARD_BY:
            return SHARD_BY[table]
        if self.sharding == "person" and re.search(r"^\s*employee_key\s", columns, re.M):
            return "cityHash64(employee_key)"
        m = _ORDER_BY.search(body)
        if m is None:
            raise ValueError("cluster mode: a table without ORDER BY has no sharding key")
        key = m.group("key")
        return f"cityHash64{key}" if key.startswith("(") else f"cityHash64({key})"


def replicated_engine(engine: str, args: str | None, zookeeper_path: str) -> str:
    """``ReplacingMergeTree(v)`` -> ``ReplicatedReplacingMergeTree('<path>', '{replica}', v)``."""
    inner = (args or "").strip()[1:-1].strip() if args else ""
    params = [f"'{zookeeper_path}'", "'{replica}'"] + ([inner] if inner else [])
    return f"Replicated{engine}({', '.join(params)})"


def _local_names(sql: str, db: str, tables: set[str]) -> str:
    """``{db}.t`` -> ``{db}.t_local`` for every ``t`` in ``tables`` (whole names only)."""
    if not tables:
        return sql
    names = "|".join(sorted((re.escape(t) for t in tables), key=len, reverse=True))
    return re.sub(rf"(?<![\w.]){re.escape(db)}\.({names})\b", lambda m: f"{db}.{m.group(1)}{LOCAL_SUFFIX}", sql)


def render(sql: str, layout: ClusterLayout | None, *, db: str, tables: set[str] | None = None) -> list[str]:
    """The statements that apply one migration's ``sql`` on ``layout`` (``[sql]`` for one node).

    ``sql`` is the migration formatted for database ``db`` (render after ``.format(db=..)``: the
    replication path holds braces of its own). ``tables``: the names of the tables created so far, so that
    a view's ``FROM`` can be pointed at their local tables (default: every ``{db}.name`` the view
    mentions). Raises ValueError for a statement it does not know how to render."""
    if layout is None:
        return [sql]
    oc = layout.on_cluster()
    if m := _CREATE_DATABASE.match(sql):
        return [f"CREATE DATABASE IF NOT EXISTS {m.group('db')} {oc}"]
    if m := _CREATE_TABLE.match(sql):
        d, name, body = m.group("db"), m.group("name"), m.group("body")
        e = _ENGINE.search(body)
        if e is None:
            raise ValueError(f"cluster mode: no MergeTree engine in CREATE TABLE {name}")
        engine = replicated_engine(e.group("engine"), e.group("args"), layout.zookeeper_path)
        local_body = body[:e.start()] + f"ENGINE = {engine}" + body[e.end():]
        # Replicated tables deduplicate inserts in Keeper; the non-replicated window means nothing there.
        local_body = re.sub(r"\bnon_replicated_deduplication_window\b", "replicated_deduplication_window",
                            local_body)
        key = layout.sharding_key(name, body)
        local = layout.local(name)
        return [
            f"CREATE TABLE IF NOT EXISTS {d}.{local} {oc}\n{local_body}",
            f"CREATE TABLE IF NOT EXISTS {d}.{name} {oc} AS {d}.{local}\n"
            f"ENGINE = Distributed(`{layout.cluster}`, {d}, {local}, {key})",
        ]
    if m := _ALTER.match(sql):
        d, name, rest = m.group("db"), m.group("name"), m.group("rest")
        return [f"ALTER TABLE {d}.{layout.local(name)} {oc} {rest}", f"ALTER TABLE {d}.{name} {oc} {rest}"]
    if m := _VIEW.match(sql):
        d, name, target, select = m.group("db"), m.group("name"), m.group("target"), m.group("select")
        sources = set(re.findall(rf"(?<![\w.]){re.escape(d)}\.(\w+)", select))
        sources = sources & tables if tables is not None else sources
        return [f"CREATE MATERIALIZED VIEW IF NOT EXISTS {d}.{name} {oc} TO {d}.{layout.local(target)} AS "
                + _local_names(select, d, sources)]
    if _INSERT.match(sql):
        return [sql]  # once, through the Distributed tables
    raise ValueError(f"cluster mode cannot render this statement (add it to core/cluster.py): {sql.strip()[:120]}")


def render_migrations(migrations: list[tuple[int, str, str]], layout: ClusterLayout | None,
                      db: str) -> list[tuple[int, str, list[str]]]:
    """Every migration formatted for database ``db`` and rendered for ``layout``; raises
    ValueError naming the first migration that cannot be rendered."""
    out = []
    for mid, name, sql in migrations:
        try:
            out.append((mid, name, render(sql.format(db=db), layout, db=db)))
        except ValueError as e:
            raise ValueError(f"migration {mid} ({name}): {e}") from e
    return out


def bookkeeping_ddl(database: str, table: str, layout: ClusterLayout | None) -> list[str]:
    """The migrations bookkeeping table (replicated and distributed in cluster mode, so that a
    migrate run from any node sees what was applied)."""
    sql = (f"CREATE TABLE IF NOT EXISTS {database}.{table} "
           "(id UInt32, name String, applied_at DateTime DEFAULT now()) ENGINE = MergeTree ORDER BY id")
    return render(sql, layout, db=database)


def layout_of(settings: ClickHouseSettings) -> ClusterLayout | None:
    """The layout configured in ``clickhouse.*`` (None: one node)."""
    if not settings.cluster:
        return None
    return ClusterLayout(settings.cluster, settings.sharding, settings.zookeeper_path)


def apply_migrations(client: Any, database: str, migrations: list[tuple[int, str, str]], bookkeeping: str,
                     cluster: ClusterLayout | None, after: Callable[[], object] | None = None) -> list[int]:
    """Apply the pending ``migrations`` (ordered by the list, recorded in table ``bookkeeping``),
    each rendered for ``cluster`` (one node when None); then ``after()``. Returns the ids applied."""
    for stmt in render(f"CREATE DATABASE IF NOT EXISTS {database}", cluster, db=database):
        client.command(stmt)
    for stmt in bookkeeping_ddl(database, bookkeeping, cluster):
        client.command(stmt)
    done = {r[0] for r in client.query(f"SELECT id FROM {database}.{bookkeeping}",
                                       **({"settings": SELECT_CONSISTENT} if cluster is not None else {})
                                       ).result_rows}
    applied = []
    for mid, name, ddl in migrations:
        if mid in done:
            continue
        for stmt in render(ddl.format(db=database), cluster, db=database):
            client.command(stmt)
        client.insert(f"{database}.{bookkeeping}", [[mid, name]], column_names=["id", "name"],
                      **({"settings": INSERT_CONSISTENT} if cluster is not None else {}))
        applied.append(mid)
    if after is not None:
        after()
    return applied
