"""The query endpoint of the embedded ClickHouse (core/chserve.py, control plane part 3 A).

A real chdb data dir is opened by an owner subprocess (migrated with the real schema, filled
with generateRandom rows of every table, then served); this process never opens the dir and
compares what it reads through the endpoint with what the owner read locally.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import stat
import string
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import pytz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core import chserve, clickhouse

SERVICES = str(Path(__file__).resolve().parents[2] / "services")
DB = "handtrace"

# Queries the owner also runs locally; the endpoint must give the same values (repr equal:
# types, tz-awareness and tzinfo classes included).
TYPED = ("SELECT toDecimal64(-12.3456, 4) AS d, toDecimal128('1.5', 20) AS d2, toUUID('8f5e0c3a-8c1e-4b8e-9d5b-"
         "6a2c3f1e0d9a') AS u, toDateTime64('2024-05-06 07:08:09.123456', 6, 'UTC') AS t_utc, "
         "toDateTime('2024-05-06 07:08:09', 'Europe/Berlin') AS t_ber, toDateTime('2024-05-06 07:08:09') AS t_naive, "
         "toDate('2024-02-29') AS day, [1, 2, 3] AS arr, (1, 'a', [NULL, 2]) AS tup, map('k', [1.5], 'l', []) AS m, "
         "NULL AS n, true AS b, toFloat32(1.25) AS f, nan AS fnan, toIPv4('10.1.2.3') AS ip4, "
         "toIPv6('::1') AS ip6, toFixedString('ab', 3) AS fs, CAST('x', 'Enum8(\\'x\\' = 1)') AS e, "
         "toInt128(-170141183460469231731687303715884105728) AS big, 'it''s %' AS pct")
PARAMS = ("SELECT %(s)s AS s, %(u)s AS u, %(t)s AS t, %(l)s AS l", {
    "s": "it's %(x)s", "u": uuid.UUID("8f5e0c3a-8c1e-4b8e-9d5b-6a2c3f1e0d9a"),
    "t": datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "l": [1, 2]})
SERVER_PARAMS = ("SELECT {s:String} AS s, {n:UInt32} + 1 AS n", {"s": "a'b", "n": 41})

OWNER = r"""
import pickle, signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.sink.schema import migrate

dsn, db, out = sys.argv[1:4]
typed, params, server_params = pickle.loads(bytes.fromhex(sys.argv[4]))
client = clickhouse.connect(dsn)
migrate(client, db)
tables = [r[0] for r in client.query(
    "SELECT name FROM system.tables WHERE database = {d:String} AND engine LIKE '%MergeTree' ORDER BY name",
    parameters={"d": db}).result_rows]
local = {}
for t in tables:
    cols = client.query("SELECT name, type FROM system.columns WHERE database = {d:String} AND table = {t:String} "
                        "AND default_kind NOT IN ('MATERIALIZED', 'ALIAS') ORDER BY position",
                        parameters={"d": db, "t": t}).result_rows
    structure = ", ".join(f"`{n}` {ty}" for n, ty in cols).replace("\\", "\\\\").replace("'", "\\'")
    names = ", ".join(f"`{n}`" for n, _ in cols)
    client.command(f"INSERT INTO {db}.{t} ({names}) SELECT * FROM generateRandom('{structure}', 7, 12, 3) LIMIT 5")
    sql = f"SELECT * FROM {db}.{t}"
    r = client.query(sql)
    local[sql] = (r.column_names, r.result_rows, client.query_arrow(sql))
for sql, p in [(typed, None), params, server_params]:
    r = client.query(sql, parameters=p)
    local[sql] = (r.column_names, r.result_rows, client.query_arrow(sql, parameters=p))
client.command(f"CREATE TABLE IF NOT EXISTS {db}.canary (x UInt8) ENGINE = MergeTree ORDER BY x")
if client.command(f"SELECT count() FROM {db}.canary") == 0:
    client.command(f"INSERT INTO {db}.canary VALUES (1)")
with open(out, "wb") as f:
    pickle.dump(local, f)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""


def _start_owner(data: Path, local_file: Path) -> subprocess.Popen[bytes]:
    arg = pickle.dumps((TYPED, PARAMS, SERVER_PARAMS)).hex()
    env = {**os.environ, "PYTHONPATH": SERVICES}
    proc = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB, str(local_file), arg], env=env,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (data / chserve.ENDPOINT_FILE).exists():
        if proc.poll() is not None:
            raise AssertionError(f"the owner died: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the owner did not serve within 120 s")
        time.sleep(0.2)
    return proc


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    # a long path on purpose: the transport must not depend on it
    data = tmp_path_factory.mktemp("chserve") / ("d" * 90) / "clickhouse"
    local_file = data.parent / "local.pickle"
    proc = _start_owner(data, local_file)
    try:
        with local_file.open("rb") as f:
            local = pickle.load(f)  # noqa: S301 -- written by our own owner subprocess
        yield data, local
    finally:
        _stop(proc)


@pytest.fixture
def remote(owner: tuple[Path, dict[str, Any]]) -> chserve.RemoteClient:
    client = clickhouse.reader(f"chdb://{owner[0]}")
    assert isinstance(client, chserve.RemoteClient)
    return client


def _rows(rows: Any) -> list[str]:
    return sorted(repr(tuple(r)) for r in rows)


def test_the_endpoint_file_is_private(owner: tuple[Path, dict[str, Any]]) -> None:
    mode = stat.S_IMODE((owner[0] / chserve.ENDPOINT_FILE).stat().st_mode)
    assert mode == 0o600


def test_every_table_of_the_schema_reads_the_same_as_locally(owner: tuple[Path, dict[str, Any]],
                                                            remote: chserve.RemoteClient) -> None:
    _, local = owner
    tables = [sql for sql in local if sql.startswith(f"SELECT * FROM {DB}.")]
    assert len(tables) >= 8  # events, demonstrations, withdrawals, dataset_exports, control_audit, ...
    for sql in tables:
        names, rows, _ = local[sql]
        got = remote.query(sql)
        assert got.column_names == tuple(names), sql
        assert got.row_count == len(rows) >= 5, sql
        assert _rows(got.result_rows) == _rows(rows), sql


@pytest.mark.parametrize("which", ["typed", "client-side parameters", "server-side parameters"])
def test_values_and_parameters_are_the_same_as_locally(owner: tuple[Path, dict[str, Any]],
                                                      remote: chserve.RemoteClient, which: str) -> None:
    sql, params = {"typed": (TYPED, None), "client-side parameters": PARAMS,
                   "server-side parameters": SERVER_PARAMS}[which]
    names, rows, arrow = owner[1][sql]
    got = remote.query(sql, parameters=params)
    assert got.column_names == tuple(names)
    assert repr(got.result_rows) == repr(rows)
    assert got.first_row == got.result_rows[0]
    assert list(got.named_results()) == [dict(zip(names, r, strict=True)) for r in rows] or which == "typed"
    assert got.first_item == dict(zip(names, rows[0], strict=True)) or which == "typed"  # nan != nan
    table = remote.query_arrow(sql, parameters=params)
    assert table.schema.equals(arrow.schema)
    assert repr(table.to_pylist()) == repr(arrow.to_pylist())


def test_tz_awareness_survives(owner: tuple[Path, dict[str, Any]], remote: chserve.RemoteClient) -> None:
    names, rows, _ = owner[1][TYPED]
    local = dict(zip(names, rows[0], strict=True))
    row = remote.query(TYPED).first_item
    for col in ("t_utc", "t_ber", "t_naive"):
        assert row[col] == local[col]
        assert type(row[col].tzinfo) is type(local[col].tzinfo), col
    assert row["n"] is None and row["b"] is True and isinstance(row["tup"], tuple)


@given(st.one_of(
    st.datetimes(timezones=st.sampled_from([UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York"),
                                            timezone(timedelta(hours=5, minutes=30), "IST"),
                                            pytz.timezone("Asia/Tokyo")])),
    st.datetimes(), st.dates(), st.uuids(), st.decimals(allow_nan=False), st.binary(max_size=8),
    st.lists(st.tuples(st.integers(), st.none() | st.text(max_size=5)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.lists(st.floats(allow_nan=False)), max_size=3)))
def test_the_wire_codec_keeps_values_and_types(value: Any) -> None:
    back = chserve.decode(json.loads(json.dumps(chserve.encode(value))))
    assert repr(back) == repr(value)
    if isinstance(value, datetime):
        assert back.utcoffset() == value.utcoffset() and type(back.tzinfo) is type(value.tzinfo)


def test_command_reads(remote: chserve.RemoteClient) -> None:
    assert remote.command(f"SELECT count() FROM {DB}.canary") == 1
    assert remote.command("EXISTS TABLE {d:Identifier}.canary", parameters={"d": DB}) == 1
    assert ("canary",) in remote.query(f"SHOW TABLES FROM {DB}").result_rows
    assert remote.query(f"DESCRIBE TABLE {DB}.canary").first_row[0] == "x"
    assert remote.query("WITH 2 AS x SELECT x * 3").first_row == (6,)
    assert remote.query("EXPLAIN SELECT 1").row_count >= 1


REFUSED = [
    (f"DROP TABLE {DB}.canary", "DROP"),
    (f"CREATE TABLE {DB}.x (a UInt8) ENGINE = Memory", "CREATE"),
    (f"ALTER TABLE {DB}.canary DELETE WHERE 1", "ALTER"),
    (f"DELETE FROM {DB}.canary WHERE 1", "DELETE"),
    (f"TRUNCATE TABLE {DB}.canary", "TRUNCATE"),
    (f"INSERT INTO {DB}.canary VALUES (2)", "INSERT"),
    (f"INSERT INTO {DB}.withdrawals (kind) VALUES ('participant')", "INSERT"),
    (f"SELECT 1; DROP TABLE {DB}.canary", "Multi-statements"),
    ("SYSTEM FLUSH LOGS", "SYSTEM"),
    ("SET readonly = 0", "SET"),
    (f"OPTIMIZE TABLE {DB}.canary FINAL", "OPTIMIZE"),
    ("KILL QUERY WHERE 1", "KILL"),
    ("§§ not sql ((", "Syntax error"),
    ("", "Empty query"),
    ("SELECT 1 INTO OUTFILE '/tmp/handtrace-chserve-outfile'", "INTO OUTFILE"),
]


@pytest.mark.parametrize(("sql", "named"), REFUSED)
def test_writes_are_refused_with_the_statement_kind(owner: tuple[Path, dict[str, Any]],
                                                    remote: chserve.RemoteClient, sql: str, named: str) -> None:
    for call in (remote.query, remote.command, remote.query_arrow):
        with pytest.raises(chserve.StatementRefused, match=named):
            call(sql)
    assert remote.command(f"SELECT count() FROM {DB}.canary") == 1


def test_readonly_sessions_stop_what_parses_as_a_read(remote: chserve.RemoteClient) -> None:
    with pytest.raises(chserve.RemoteError, match="readonly"):
        remote.query("SELECT * FROM file('/etc/hostname', 'LineAsString')")
    with pytest.raises(chserve.RemoteError, match="readonly"):
        remote.query("SELECT 1 SETTINGS readonly = 0")


def test_clickhouse_errors_come_back_with_their_message(remote: chserve.RemoteClient) -> None:
    with pytest.raises(chserve.RemoteError, match="UNKNOWN_TABLE|does not exist"):
        remote.query(f"SELECT * FROM {DB}.no_such_table")


def test_insert_only_into_writable_tables(remote: chserve.RemoteClient) -> None:
    wid = uuid.uuid4()
    before = remote.command(f"SELECT count() FROM {DB}.withdrawals WHERE withdrawal_id = %(w)s", parameters={"w": wid})
    assert before == 0
    n = remote.insert(f"{DB}.withdrawals", [[wid, "participant", "ek", None, datetime.now(UTC), "me", "why"]],
                      column_names=["withdrawal_id", "kind", "employee_key", "demonstration_id", "withdrawn_at",
                                    "actor", "reason"])
    assert n == 1
    got = remote.query(f"SELECT kind, employee_key, demonstration_id, actor FROM {DB}.withdrawals "
                       "WHERE withdrawal_id = %(w)s", parameters={"w": wid})
    assert got.result_rows == [("participant", "ek", None, "me")]
    for table in (f"{DB}.canary", f"{DB}.events", "events", f"{DB}.withdrawals; DROP TABLE x",
                  f"other.{DB}.withdrawals", "`withdrawals`"):
        with pytest.raises(chserve.StatementRefused, match="INSERT"):
            remote.insert(table, [[2]], column_names=["x"])
    with pytest.raises(chserve.StatementRefused, match="column names"):
        remote.insert(f"{DB}.withdrawals", [[1]], column_names=["kind) SELECT 1 --"])
    assert remote.command(f"SELECT count() FROM {DB}.canary") == 1


def test_open_for_cli_uses_the_endpoint_and_an_unserved_dir_is_named(owner: tuple[Path, dict[str, Any]],
                                                                     tmp_path: Path) -> None:
    assert isinstance(clickhouse.open_for_cli(f"chdb://{owner[0]}"), chserve.RemoteClient)
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="not being served: start the sink"):
        clickhouse.reader(f"chdb://{tmp_path / 'nothing'}")


def test_a_wrong_token_is_refused(owner: tuple[Path, dict[str, Any]]) -> None:
    ep = chserve.endpoint_of(owner[0])
    assert ep is not None
    client = chserve.RemoteClient(owner[0], {**ep, "token": "guess"})
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="token"):
        client.query("SELECT 1")


def test_a_killed_owner_leaves_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    data = tmp_path / "clickhouse"
    proc = _start_owner(data, tmp_path / "local.pickle")
    try:
        client = clickhouse.reader(f"chdb://{data}")
        assert client.command("SELECT 1") == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert (data / chserve.ENDPOINT_FILE).exists()  # left behind by the dead owner
        for call in (lambda: clickhouse.reader(f"chdb://{data}"), lambda: client.query("SELECT 1")):
            t0 = time.monotonic()
            with pytest.raises(clickhouse.ClickHouseUnavailable, match="not being served"):
                call()
            assert time.monotonic() - t0 < 2
    finally:
        _stop(proc)


def test_a_clean_stop_removes_the_endpoint(tmp_path: Path) -> None:
    data = tmp_path / "clickhouse"
    proc = _start_owner(data, tmp_path / "local.pickle")
    try:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not (data / chserve.ENDPOINT_FILE).exists()
        with pytest.raises(clickhouse.ClickHouseUnavailable, match="not being served"):
            clickhouse.reader(f"chdb://{data}")
    finally:
        _stop(proc)


# ------------------------------------------------------------------ the classifier as a property

_NAME = st.sampled_from(["canary", f"{DB}.canary", "`canary`", f"{DB}.events", "withdrawals"])
_PREFIX = st.sampled_from(["", " ", "\n", "/* c */ ", "-- c\n", "SELECT 1;", "(", "WITH 1 AS x "])
_WRITE = st.one_of(
    _NAME.map(lambda t: f"DROP TABLE {t}"),
    _NAME.map(lambda t: f"TRUNCATE TABLE {t}"),
    _NAME.map(lambda t: f"ALTER TABLE {t} DELETE WHERE 1"),
    _NAME.map(lambda t: f"ALTER TABLE {t} UPDATE x = 2 WHERE 1"),
    _NAME.map(lambda t: f"DELETE FROM {t} WHERE 1"),
    _NAME.map(lambda t: f"INSERT INTO {t} VALUES (9)"),
    _NAME.map(lambda t: f"INSERT INTO {t} SELECT 9"),
    _NAME.map(lambda t: f"RENAME TABLE {t} TO {DB}.gone"),
    _NAME.map(lambda t: f"OPTIMIZE TABLE {t} FINAL"),
    _NAME.map(lambda t: f"CREATE TABLE {t}2 AS {t}"),
    st.sampled_from(["SYSTEM STOP MERGES", "SET readonly = 0", "KILL QUERY WHERE 1", f"DROP DATABASE {DB}",
                     f"DETACH TABLE {DB}.canary", "SYSTEM DROP DNS CACHE", "USE system"]),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prefix=_PREFIX, stmt=_WRITE, suffix=st.sampled_from(["", ";", " ; ", "; SELECT 1", "\n-- end"]))
def test_no_write_statement_is_ever_executed(remote: chserve.RemoteClient, prefix: str, stmt: str,
                                             suffix: str) -> None:
    sql = prefix + stmt + suffix
    with pytest.raises((chserve.StatementRefused, chserve.RemoteError)):
        remote.query(sql)
    assert remote.command(f"SELECT count() FROM {DB}.canary") == 1
    assert remote.command(f"SELECT count() FROM {DB}.canary WHERE x = 9") == 0


@given(st.sampled_from(["SELECT", "WITH", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS"]),
       st.sampled_from(["INSERT", "DROP", "ALTER", "SYSTEM", "SET", "CREATE", "DELETE", "OPTIMIZE", "GRANT"]),
       st.text(alphabet=string.ascii_letters + " ,*()'.", max_size=40))
def test_the_kind_is_the_formatters_first_keyword(read: str, write: str, rest: str) -> None:
    assert chserve.check_read(f"{read} {rest}") == f"{read} {rest}"
    with pytest.raises(chserve.StatementRefused, match=write):
        chserve.check_read(f"{write} {rest}")


def test_a_reader_follows_a_restarted_owner(tmp_path: Path) -> None:
    data = tmp_path / "clickhouse"
    proc = _start_owner(data, tmp_path / "local.pickle")
    try:
        client = clickhouse.reader(f"chdb://{data}")
        assert client.command("SELECT 1") == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        with pytest.raises(clickhouse.ClickHouseUnavailable, match="not being served"):
            client.command("SELECT 1")
        proc = _start_owner(data, tmp_path / "local2.pickle")
        assert client.command("SELECT 2") == 2  # a new port and token, read from the endpoint file
    finally:
        _stop(proc)
