"""Cluster mode (core/cluster.py, ADR 0020): every migration of the sink and of the fleet store,
rendered for a cluster, is parsed by the embedded engine's own parser (``formatQuery``) and has
the cluster layout: ``ON CLUSTER`` on every DDL, Replicated* engines with the shard/replica
macros, a Distributed table per data table with a deterministic sharding key, and materialized
views on the local tables. Migrations added later are covered because the lists are iterated."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from handtrace.core import clickhouse
from handtrace.core.cluster import ClusterLayout, layout_of, render, render_migrations
from handtrace.core.settings import ClickHouseSettings
from handtrace.fleet import store
from handtrace.sink import schema

DB = "handtrace"
LAYOUTS = [ClusterLayout("prod_cluster", "person"), ClusterLayout("prod_cluster", "row")]
STORES = {"sink": schema.MIGRATIONS, "fleet": store.MIGRATIONS}


@pytest.fixture(scope="module")
def parser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    dsn = f"chdb://{tmp_path_factory.mktemp('chparse')}"
    client = clickhouse.connect(dsn)
    try:
        yield client
    finally:
        clickhouse.close(dsn)


def format_query(client: Any, sql: str) -> str:
    return str(client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).first_row[0])


def rendered(layout: ClusterLayout) -> list[tuple[str, int, str, str]]:
    """(store, migration id, name, statement) for every statement of every migration."""
    return [(name, mid, mname, stmt)
            for name, migrations in STORES.items()
            for mid, mname, stmts in render_migrations(migrations, layout, DB)
            for stmt in stmts]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.sharding)
def test_every_rendered_statement_parses_and_keeps_its_form(parser: Any, layout: ClusterLayout) -> None:
    statements = rendered(layout)
    assert len(statements) > sum(len(m) for m in STORES.values()), "tables should have become two statements"
    for store_name, mid, mname, stmt in statements:
        where = f"{store_name} migration {mid} ({mname})"
        try:
            once = format_query(parser, stmt)
        except Exception as e:  # noqa: BLE001 -- report which migration
            pytest.fail(f"{where}: ClickHouse's parser refused the cluster form: {e}\n{stmt}")
        assert format_query(parser, once) == once, f"{where}: the parsed form does not round-trip"
        if stmt.lstrip().upper().startswith("INSERT"):
            assert "ON CLUSTER" not in once
        else:
            assert "ON CLUSTER prod_cluster" in once, f"{where}: DDL without ON CLUSTER:\n{once}"


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda lay: lay.sharding)
def test_tables_are_replicated_locals_behind_distributed_tables(parser: Any, layout: ClusterLayout) -> None:
    for store_name, migrations in STORES.items():
        created: set[str] = set()
        for mid, _name, stmts in render_migrations(migrations, layout, DB):
            for stmt in stmts:
                text = format_query(parser, stmt)
                m = re.match(rf"CREATE TABLE IF NOT EXISTS {DB}\.(\w+) ON CLUSTER prod_cluster", text)
                if m is None:
                    continue
                table = m.group(1)
                if table.endswith("_local"):
                    assert re.search(r"ENGINE = Replicated\w*MergeTree\('/clickhouse/tables/\{shard\}/"
                                     r"\{database\}/\{table\}', '\{replica\}'", text), text
                    assert "non_replicated_deduplication_window" not in text
                    created.add(table)
                else:
                    d = re.search(rf"ENGINE = Distributed\(prod_cluster, {DB}, (\w+), (.+)\)$", text, re.M)
                    assert d is not None, f"{store_name} {mid}: {table} is not Distributed:\n{text}"
                    assert d.group(1) == f"{table}_local" and d.group(1) in created
                    assert "rand" not in d.group(2), "the sharding key must be deterministic (retried inserts)"
                    assert f"AS {DB}.{table}_local" in text
        assert created, store_name


def test_person_sharding_keeps_a_person_on_one_shard() -> None:
    by_table = {}
    for _mid, _name, stmts in render_migrations(schema.MIGRATIONS, LAYOUTS[0], DB):
        for stmt in stmts:
            if m := re.search(rf"Distributed\(`prod_cluster`, {DB}, (\w+)_local, (.+)\)$", stmt, re.M):
                by_table[m.group(1)] = m.group(2)
    for table in ("events", "demonstrations", "frames", "demonstration_events", "rollup_app_activity_hourly"):
        assert by_table[table] == "cityHash64(employee_key)", table
    assert by_table["sink_ledger"] == "cityHash64(topic, partition)", "a partition's ledger on one shard"
    assert by_table["dataset_exports"] == "cityHash64(export_id)"


def test_views_read_and_write_local_tables(parser: Any) -> None:
    views = [stmt for _s, _m, _n, stmt in rendered(LAYOUTS[0]) if "MATERIALIZED VIEW" in stmt]
    assert len(views) >= 5, "four sink rollups and the fleet's, at least"
    for stmt in views:
        text = format_query(parser, stmt)
        target = re.search(rf" TO {DB}\.(\w+)", text)
        sources = re.findall(rf"FROM {DB}\.(\w+)", text)
        assert target and target.group(1).endswith("_local"), text
        assert sources and all(s.endswith("_local") for s in sources), text


def test_alters_touch_the_local_and_the_distributed_table() -> None:
    add = "ADD COLUMN IF NOT EXISTS cohort String DEFAULT ''"
    stmts = render(f"ALTER TABLE {DB}.demonstrations {add}", LAYOUTS[0], db=DB)
    assert stmts == [f"ALTER TABLE {DB}.demonstrations_local ON CLUSTER `prod_cluster` {add}",
                     f"ALTER TABLE {DB}.demonstrations ON CLUSTER `prod_cluster` {add}"]


def test_one_node_is_left_as_written() -> None:
    for migrations in STORES.values():
        for (mid, _n, sql), (mid2, _n2, stmts) in zip(migrations, render_migrations(migrations, None, DB),
                                                      strict=True):
            assert mid == mid2 and stmts == [sql.format(db=DB)]


@pytest.mark.parametrize("sql", [
    f"DROP TABLE {DB}.events",
    f"CREATE TABLE IF NOT EXISTS {DB}.t (a Int32) ENGINE = Log",
    f"RENAME TABLE {DB}.a TO {DB}.b",
])
def test_an_unknown_statement_is_refused_not_run_on_one_node(sql: str) -> None:
    with pytest.raises(ValueError, match="cluster mode"):
        render(sql, LAYOUTS[0], db=DB)


def test_cluster_setting_needs_a_server() -> None:
    assert layout_of(ClickHouseSettings()) is None
    lay = layout_of(ClickHouseSettings(dsn="http://ch:8123", cluster="prod_cluster", sharding="row"))
    assert lay == ClusterLayout("prod_cluster", "row")
    with pytest.raises(ValueError, match="server DSN"):
        ClickHouseSettings(cluster="prod_cluster")
    with pytest.raises(ValueError, match="server DSN"):
        ClickHouseSettings(dsn="chdb:///tmp/x", cluster="prod_cluster")


def test_docs_show_the_rendered_events_table() -> None:
    """docs/cluster.md quotes the cluster form of the events table as this code renders it."""
    doc = (Path(__file__).parents[2] / "docs" / "cluster.md").read_text()
    events = next(stmts for mid, _n, stmts in render_migrations(schema.MIGRATIONS, LAYOUTS[0], DB) if mid == 1)
    for stmt in events:
        first = stmt.splitlines()[0]
        assert first in doc, f"docs/cluster.md is stale: missing {first!r}"
    assert events[1].splitlines()[1] in doc


class _Recorder:
    """Stands in for a ClickHouse client where only the statements sent matter."""

    def __init__(self, rows: list[tuple[str, int]]) -> None:
        self.rows, self.commands = rows, []  # type: list[tuple[str, int]], list[str]

    def query(self, sql: str, parameters: Any = None) -> Any:
        return type("R", (), {"result_rows": self.rows})()

    def command(self, sql: str, parameters: Any = None) -> None:
        self.commands.append(sql)


def test_erasure_mutates_the_local_tables_on_the_cluster() -> None:
    from handtrace.core.erasure import delete_rows

    client = _Recorder([("events", 3), ("frames", 0)])
    before = delete_rows(client, DB, "a" * 64, ["events", "frames"], LAYOUTS[0])
    assert before == {"events": 3, "frames": 0}
    assert client.commands == [f"ALTER TABLE {DB}.events_local ON CLUSTER `prod_cluster` DELETE WHERE "
                               "employee_key = {k:String} SETTINGS mutations_sync = 2"]


def test_sink_partitions_are_distinct_and_sorted() -> None:
    from handtrace.core.settings import SinkSettings

    assert SinkSettings(partitions=[5, 3, 4]).partitions == [3, 4, 5]
    for bad in ([1, 1], [-1]):
        with pytest.raises(ValueError, match="distinct partition numbers"):
            SinkSettings(partitions=bad)
