"""Access tiers and the access audit (warehouse/tiers.py; issue #14 items 4-5, docs/warehouse.md).

A real embedded ClickHouse (chdb) in a tmp dir, migrated with the real schema and seeded with
eight people: app ``shared`` is used by all eight, ``pair`` by two, ``solo`` by one; every typed
text, window title, URL, instruction and frame key holds the marker ``SECRET``. The analyst tier
must never hand out a ``SECRET`` nor a group of fewer than k people, whatever the query's shape;
every attempt must be a row of ``access_audit`` with the right outcome.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from handtrace.core import clickhouse
from handtrace.sink.schema import migrate
from handtrace.warehouse import tiers
from tests.chserve_support import wait_served

DB = "handtrace"
K = 5
PEOPLE = [f"person-{i}" for i in range(8)]
DOCS = Path(__file__).resolve().parents[2] / "docs"


@pytest.fixture(scope="module")
def dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    path = tmp_path_factory.mktemp("tiers") / "clickhouse"
    dsn = f"chdb://{path}"
    c = clickhouse.connect(dsn)
    migrate(c, DB)
    # 8 people x 10 events in 'shared'; person-0 and person-1 also in 'pair'; person-0 alone in 'solo'.
    c.command(f"""
        INSERT INTO {DB}.events (event_id, batch_id, employee_key, device_key, kind, captured_at, received_at,
                                 x, y, key_code, text, text_masked, app_id, window_title, url)
        SELECT generateUUIDv4(), generateUUIDv4(), concat('person-', toString(number % 8)),
               concat('device-', toString(number % 8)), if(number % 3 = 0, 'key', 'click'),
               toDateTime64('2026-11-02 09:00:00', 6, 'UTC') + number, now64(6), number % 1000, 7, 38,
               concat('SECRET-TEXT-', toString(number)), 0, 'shared',
               concat('SECRET-TITLE-', toString(number)), concat('https://SECRET.example/', toString(number))
        FROM numbers(80)""")
    c.command(f"""
        INSERT INTO {DB}.events (event_id, batch_id, employee_key, device_key, kind, captured_at, received_at,
                                 text, text_masked, app_id, window_title, url)
        SELECT generateUUIDv4(), generateUUIDv4(), concat('person-', toString(number % 2)), 'device-x', 'key',
               toDateTime64('2026-11-02 10:00:00', 6, 'UTC') + number, now64(6), 'SECRET-PAIR', 0,
               if(number < 6, 'pair', 'solo'), 'SECRET-TITLE', 'https://SECRET.example/'
        FROM numbers(9)
        WHERE number < 6 OR number % 2 = 0""")
    c.command(f"""
        INSERT INTO {DB}.demonstrations (demonstration_id, employee_key, device_key, instruction, status,
                                         started_at, ended_at, sent_at, received_at, apps, frames, events)
        SELECT generateUUIDv4(), concat('person-', toString(number % 8)), 'device', 'SECRET-INSTRUCTION',
               'complete', now64(6), now64(6), now64(6), now64(6), ['shared'], 2, 3
        FROM numbers(16)""")
    c.command(f"""
        INSERT INTO {DB}.demonstration_events (demonstration_id, event_id, batch_id, employee_key, device_key, kind,
                                               captured_at, received_at, text, text_masked, app_id, window_title)
        SELECT generateUUIDv4(), generateUUIDv4(), generateUUIDv4(), concat('person-', toString(number % 8)), 'd',
               'key', now64(6), now64(6), if(number % 2 = 0, '•••', 'UNMASKED-SECRET'), number % 2 = 0, 'shared',
               'demo title'
        FROM numbers(16)""")
    c.command(f"""
        INSERT INTO {DB}.frames (demonstration_id, employee_key, step, sha256, object_key, format, bytes, width,
                                 height, captured_at, reason)
        SELECT generateUUIDv4(), concat('person-', toString(number % 8)), number, 'ab', 'frames/SECRET-OBJECT',
               'png', 10, 1, 1, now64(6), 'click'
        FROM numbers(8)""")
    yield dsn
    clickhouse.close(dsn)


@pytest.fixture
def client(dsn: str) -> Any:
    return clickhouse.connect(dsn)


def run(client: Any, sql: str, role: str = "analyst", **kw: Any) -> tiers.Answer:
    return tiers.run(client, sql.format(db=DB), role=role, database=DB, k=K, actor="tester", **kw)


def last_audit(client: Any) -> dict[str, Any]:
    r = client.query(f"SELECT * FROM {DB}.access_audit ORDER BY at DESC LIMIT 1")
    return dict(zip(r.column_names, r.result_rows[0], strict=True))


def assert_refused(client: Any, sql: str, fragment: str, role: str = "analyst", **kw: Any) -> str:
    before = client.query(f"SELECT count() FROM {DB}.access_audit").result_rows[0][0]
    with pytest.raises(tiers.TierRefused) as e:
        run(client, sql, role, **kw)
    assert fragment in str(e.value), str(e.value)
    assert client.query(f"SELECT count() FROM {DB}.access_audit").result_rows[0][0] == before + 1
    audit = last_audit(client)
    assert (audit["outcome"], audit["role"], audit["actor"]) == ("refused", role, "tester")
    assert audit["os_user"] == tiers.os_user() != ""
    assert audit["query"] == sql.format(db=DB) and audit["reason"] == str(e.value) and audit["rows"] == 0
    return str(e.value)


# ------------------------------------------------------------------ the rule table


def test_every_column_of_every_migrated_table_is_classified(client: Any) -> None:
    """A new table or column fails here until it is classified (unclassified ones are refused)."""
    cols: dict[str, set[str]] = {}
    for table, column in client.query(
            "SELECT table, name FROM system.columns WHERE database = {d:String} AND table NOT IN "
            "(SELECT name FROM system.tables WHERE database = {d:String} AND engine = 'MaterializedView')",
            parameters={"d": DB}).result_rows:  # a view stores nothing: its target table is classified
        cols.setdefault(table, set()).add(column)
    assert set(cols) <= set(tiers.TABLES), set(cols) - set(tiers.TABLES)
    for table, names in cols.items():
        rule = tiers.TABLES[table]
        if "*" not in rule.columns:
            assert names == set(rule.columns), (table, names ^ set(rule.columns))


def test_the_docs_show_the_rule_table() -> None:
    assert tiers.rules_markdown() in (DOCS / "warehouse.md").read_text()


# ------------------------------------------------------------------ analyst: forbidden columns by any shape


FORBIDDEN = [
    ("SELECT window_title, count() FROM {db}.events GROUP BY window_title",
     "column events.window_title (window titles) is not readable by analysts"),
    ("SELECT count() FROM (SELECT text FROM {db}.events)", "column events.text (typed text)"),
    ("WITH t AS (SELECT * FROM {db}.events) SELECT count() FROM t WHERE url != ''", "column events.url (URLs)"),
    ("SELECT * FROM {db}.events", "column events.text (typed text)"),
    ("SELECT e.* FROM {db}.events AS e", "column events.window_title (window titles)"),
    ("SELECT COLUMNS('ti') FROM {db}.events", "column events.window_title"),
    ("SELECT count() FROM {db}.events WHERE text LIKE 'SECRET%'", "column events.text (typed text)"),
    ("SELECT count() FROM {db}.events AS e JOIN {db}.demonstrations AS d ON e.app_id = d.os "
     "WHERE d.instruction != ''", "column demonstrations.instruction"),
    ("SELECT arrayJoin([(app_id, window_title)]).2 AS w, count() FROM {db}.events GROUP BY w",
     "column events.window_title"),
    ("SELECT tupleElement(tuple(text), 1) AS t, count() FROM {db}.events GROUP BY t", "column events.text"),
    ("SELECT count() FROM {db}.events WHERE app_id IN (SELECT app_id FROM {db}.events WHERE url LIKE '%a%')",
     "column events.url"),
    ("SELECT text AS app_id, count() FROM {db}.events GROUP BY app_id", "column events.text"),
    ("SELECT count() FROM {db}.events WHERE length(window_title AS kind) > 0", "column events.window_title"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id UNION ALL "
     "SELECT url, count() FROM {db}.events GROUP BY url", "column events.url"),
    ("SELECT count() FROM {db}.events WHERE text.null = 0", "column events.text.null (typed text)"),
    ("SELECT count() FROM {db}.events WHERE isNotNull(screenshot_sha256)",
     "column events.screenshot_sha256"),
    ("SELECT count() FROM {db}.frames", "table handtrace.frames (frames of demonstrations) is not readable"),
    ("SELECT count() FROM {db}.events AS e, {db}.frames AS f WHERE e.app_id = f.format", "table handtrace.frames"),
    ("SELECT count() FROM system.tables", "table system.tables is not readable by analysts"),
    ("SELECT count() FROM merge('{db}', '^events$')", "table function merge()"),
    ("SELECT count() FROM file('/etc/hostname', 'LineAsString')", "table function file()"),
    ("SELECT app_id, any(key_code) FROM {db}.events GROUP BY app_id", "aggregate any()"),
    ("SELECT app_id, groupArray(x) FROM {db}.events GROUP BY app_id", "aggregate groupArray()"),
    ("SELECT app_id, argMax(x, captured_at) FROM {db}.events GROUP BY app_id", "aggregate argMax()"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id HAVING throwIf(count() = 1) = 0",
     "function throwIf()"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id INTO OUTFILE '/tmp/x.csv'", "INTO OUTFILE"),
]


@pytest.mark.parametrize(("sql", "fragment"), FORBIDDEN, ids=range(len(FORBIDDEN)))
def test_analyst_cannot_read_forbidden_columns_by_any_shape(client: Any, sql: str, fragment: str) -> None:
    msg = assert_refused(client, sql, fragment)
    assert msg.startswith("refused for role analyst: ")


def test_select_star_names_every_forbidden_column(client: Any) -> None:
    msg = assert_refused(client, "SELECT * FROM {db}.events", "events.text")
    for col in ("events.employee_key", "events.device_key", "events.window_title", "events.url"):
        assert col in msg


# ------------------------------------------------------------------ analyst: per-person shapes


PER_PERSON = [
    ("SELECT employee_key, count() FROM {db}.events GROUP BY employee_key",
     "column events.employee_key (pseudonyms of people and devices) may only be counted by analysts"),
    ("SELECT app_id, count() FROM {db}.events WHERE employee_key = 'person-3' GROUP BY app_id",
     "column events.employee_key"),
    ("SELECT device_key, count() FROM {db}.events GROUP BY device_key", "column events.device_key"),
    ("SELECT count() FROM {db}.events GROUP BY cityHash64(employee_key)", "column events.employee_key"),
    ("SELECT app_id, x, y FROM {db}.events", "only aggregate queries are answered"),
    ("SELECT kind FROM {db}.events LIMIT 1", "only aggregate queries are answered"),
    ("SELECT 'x' AS employee_key, count() FROM {db}.events", "the k-anonymity condition could not be attached"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id WITH TOTALS", "WITH TOTALS, ROLLUP, CUBE"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY ROLLUP(app_id)", "WITH TOTALS, ROLLUP, CUBE"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY GROUPING SETS ((app_id), ())", "GROUPING SETS"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id SETTINGS max_threads = 1", "SETTINGS"),
    ("SELECT count() FROM (SELECT app_id FROM {db}.events) GROUP BY app_id", "subqueries and CTEs"),
    ("SELECT app_id, count() FROM {db}.events GROUP BY app_id UNION ALL "
     "SELECT app_id, count() FROM {db}.events GROUP BY app_id", "UNION"),
    ("SELECT a, count() FROM {db}.demonstrations ARRAY JOIN apps AS a GROUP BY a", "joins, ARRAY JOIN"),
    ("SELECT 1", "analysts run one aggregate over one table"),
]


@pytest.mark.parametrize(("sql", "fragment"), PER_PERSON, ids=range(len(PER_PERSON)))
def test_analyst_per_person_shapes_are_refused(client: Any, sql: str, fragment: str) -> None:
    assert_refused(client, sql, fragment)


def test_groups_of_fewer_than_k_people_are_suppressed(client: Any) -> None:
    a = run(client, "SELECT app_id, count() AS n, uniqExact(employee_key) AS people FROM {db}.events "
                    "GROUP BY app_id ORDER BY app_id")
    assert a.rows == [("shared", 80, 8)]  # 'pair' (2 people) and 'solo' (1) are not there
    audit = last_audit(client)
    assert (audit["outcome"], audit["rows"], audit["role"]) == ("allowed", 1, "analyst")
    assert "HAVING uniqExact(employee_key) >= 5" in audit["executed"]
    assert audit["tables"] == [f"{DB}.events"]
    assert f"{DB}.events.app_id" in audit["columns"] and f"{DB}.events.employee_key" in audit["columns"]


def test_a_filter_that_isolates_one_person_returns_nothing(client: Any) -> None:
    # person-0 is the only one in 'solo' and at 09:00:00 exactly: both filters single them out
    assert run(client, "SELECT count() FROM {db}.events WHERE app_id = 'solo'").rows == []
    assert run(client, "SELECT kind, count() FROM {db}.events WHERE captured_at = "
                       "toDateTime64('2026-11-02 09:00:00', 6, 'UTC') GROUP BY kind").rows == []
    # the analyst's own HAVING cannot undo it: the k condition comes first
    assert run(client, "SELECT app_id, count() AS n FROM {db}.events GROUP BY app_id HAVING n > 0 OR 1 "
                       "ORDER BY app_id").rows == [("shared", 80)]


def test_allowed_aggregates_over_k_people(client: Any) -> None:
    a = run(client, "SELECT kind, count() AS n, uniq(device_key) AS devices, avg(x) AS ax FROM {db}.events "
                    "WHERE app_id = 'shared' GROUP BY kind ORDER BY kind")
    assert [r[:3] for r in a.rows] == [("click", 53, 8), ("key", 27, 8)]
    d = run(client, "SELECT arrayJoin(apps) AS app, count() FROM {db}.demonstrations GROUP BY app")
    assert d.rows == [("shared", 16)]
    e = run(client, "SELECT count() FROM {db}.demonstration_events AS de WHERE de.kind = 'key'")
    assert e.rows == [(16,)]


# ------------------------------------------------------------------ the other tiers


def test_researcher_needs_a_purpose(client: Any) -> None:
    assert_refused(client, "SELECT demonstration_id FROM {db}.demonstrations", "a stated purpose is required",
                   role="researcher")
    assert_refused(client, "SELECT demonstration_id FROM {db}.demonstrations", "a stated purpose is required",
                   role="researcher", purpose="   ")


def test_researcher_reads_per_person_demonstrations_and_only_masked_text(client: Any) -> None:
    a = run(client, "SELECT employee_key, text FROM {db}.demonstration_events ORDER BY employee_key",
            role="researcher", purpose="train the form-filling model")
    texts = {r[1] for r in a.rows}
    assert texts == {"•••"} and len(a.rows) == 8, a.rows  # the unmasked half is filtered by the engine
    # the filter holds however the text is reached
    b = run(client, "SELECT count() FROM (SELECT * FROM {db}.demonstration_events) WHERE text LIKE '%SECRET%'",
            role="researcher", purpose="p")
    assert b.rows == [(0,)]
    audit = last_audit(client)
    assert (audit["outcome"], audit["purpose"]) == ("allowed", "p")
    # not reading text does not lift the filter: key codes of unmasked typing spell it too
    assert run(client, "SELECT count() FROM {db}.demonstration_events", role="researcher", purpose="p").rows == [(8,)]
    f = run(client, "SELECT object_key, instruction FROM {db}.frames AS f JOIN {db}.demonstrations AS d "
                    "ON f.employee_key = d.employee_key LIMIT 1", role="researcher", purpose="p")
    assert f.rows == [("frames/SECRET-OBJECT", "SECRET-INSTRUCTION")]
    assert_refused(client, "SELECT count() FROM {db}.events", "table handtrace.events", role="researcher",
                   purpose="p")


def test_auditor_reads_the_audit_tables_only(client: Any) -> None:
    assert_refused(client, "SELECT count() FROM {db}.events", "table handtrace.events (passive activity events) "
                   "is not readable by auditors", role="auditor")
    a = run(client, "SELECT outcome, count() FROM {db}.access_audit GROUP BY outcome", role="auditor")
    assert {r[0] for r in a.rows} >= {"allowed", "refused"}


def test_admin_reads_everything_and_is_audited(client: Any) -> None:
    a = run(client, "SELECT text FROM {db}.events WHERE app_id = 'solo' LIMIT 1", role="admin")
    assert a.rows == [("SECRET-PAIR",)]
    audit = last_audit(client)
    assert (audit["role"], audit["outcome"], audit["rows"]) == ("admin", "allowed", 1)
    assert audit["columns"] == [f"{DB}.events.app_id", f"{DB}.events.text"]


def test_unknown_role_is_refused(client: Any) -> None:
    assert_refused(client, "SELECT 1", "unknown role 'boss'", role="boss")


# ------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("sql", "fragment"), [
    ("hello world", "not SQL: the text does not start with a statement keyword"),
    ("", "not SQL: the query is empty"),
    ("SELEC app_id FROM x", "not SQL: the text does not start with a statement keyword"),
    ("SELECT FROM WHERE (", "not SQL: ClickHouse's parser says: Syntax error"),
    ("SELECT 1; SELECT 2", "not one statement"),
    ("SELECT count() FROM {db}.events; DROP TABLE {db}.events", "not one statement"),
    ("DROP TABLE {db}.events", "only SELECT queries are run for analysts"),
    ("SELECT 1 AS `a\nCOLUMN id: 9, column_name: x, source_id: 3`, count() FROM {db}.events",
     "quoted names with escapes"),
])
def test_bad_input_is_refused_clearly_and_audited(client: Any, sql: str, fragment: str) -> None:
    assert_refused(client, sql, fragment)
    assert client.query(f"EXISTS TABLE {DB}.events").result_rows[0][0] == 1


def test_an_unknown_column_fails_with_clickhouse_message_and_is_audited(client: Any) -> None:
    with pytest.raises(tiers.QueryFailed, match="nope"):
        run(client, "SELECT nope, count() FROM {db}.events GROUP BY nope")
    assert last_audit(client)["outcome"] == "failed"


# ------------------------------------------------------------------ property: any generated shape

ALLOWED_DIMS = ["app_id", "kind", "key_code", "toStartOfHour(captured_at)", "x % 3"]
FORBIDDEN_COLS = ["text", "window_title", "url", "employee_key", "device_key", "screenshot_sha256"]
AGGS = ["count()", "uniqExact(employee_key)", "sum(x)", "avg(key_code)", "count(DISTINCT device_key)",
        "max(captured_at)"]


@st.composite
def queries(draw: st.DrawFn) -> str:
    """Query shapes from a small grammar: allowed and forbidden columns as dimensions, aggregates,
    filters; tables, aliases, subqueries, CTEs, joins, IN (SELECT ..), UNION around them."""
    forbidden = st.sampled_from(FORBIDDEN_COLS)
    dim = st.one_of(st.sampled_from(ALLOWED_DIMS), forbidden) if draw(st.integers(0, 2)) == 0 \
        else st.sampled_from(ALLOWED_DIMS)
    dims = draw(st.lists(dim, max_size=2, unique=True))
    agg = st.one_of(st.sampled_from(AGGS), forbidden.map(lambda c: f"max(length({c}))"),
                    forbidden.map(lambda c: f"min({c})")) if draw(st.integers(0, 2)) == 0 else st.sampled_from(AGGS)
    aggs = draw(st.lists(agg, min_size=1, max_size=2, unique=True))
    items = [f"{d} AS d{i}" if draw(st.booleans()) else d for i, d in enumerate(dims)] + aggs
    source = draw(st.sampled_from([
        "{db}.events", "{db}.events", "{db}.events AS e", "{db}.demonstration_events", "(SELECT * FROM {db}.events)",
        "{db}.events AS e JOIN {db}.demonstrations AS d USING (employee_key)"]))
    where = draw(st.sampled_from([
        "", "", "WHERE app_id != 'zz'", "WHERE app_id = 'solo'", "WHERE app_id IN ('solo', 'pair')",
        "WHERE kind = 'key'", "WHERE text LIKE 'SECRET%'", "WHERE employee_key = 'person-0'",
        "WHERE app_id IN (SELECT app_id FROM {db}.events WHERE url != '')"]))
    group = f"GROUP BY {', '.join(dims)}" if dims and draw(st.integers(0, 5)) else ""
    having = draw(st.sampled_from(["", "HAVING count() > 0", "HAVING count() >= 1 OR 1"])) if group else ""
    body = f"SELECT {', '.join(items)} FROM {source} {where} {group} {having}"
    if draw(st.integers(0, 5)) == 0:
        body = f"WITH c AS (SELECT * FROM {{db}}.events) {body}"
    if draw(st.integers(0, 9)) == 0:
        body = f"{body} UNION ALL SELECT app_id, count() FROM {{db}}.events GROUP BY app_id"
    return body


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=queries())
def test_no_generated_query_leaks_a_forbidden_value_or_a_small_group(client: Any, sql: str) -> None:
    before = client.query(f"SELECT count() FROM {DB}.access_audit").result_rows[0][0]
    try:
        a = run(client, sql)
    except (tiers.TierRefused, tiers.QueryFailed):
        outcome = last_audit(client)["outcome"]
        assert outcome in ("refused", "failed")
    else:
        shown = json.dumps(a.rows, default=str)
        assert "SECRET" not in shown and "person-" not in shown and "device-" not in shown, (sql, shown)
        # 'solo' (1 person) and 'pair' (2) never appear: every group counts >= k people
        assert "solo" not in shown and "pair" not in shown, (sql, shown)
        assert last_audit(client)["outcome"] == "allowed"
    assert client.query(f"SELECT count() FROM {DB}.access_audit").result_rows[0][0] == before + 1


@st.composite
def researcher_queries(draw: st.DrawFn) -> str:
    cols = draw(st.lists(st.sampled_from(["text", "key_code", "kind", "employee_key", "upper(text)",
                                          "concat(text, '')", "count()", "groupArray(text)"]),
                         min_size=1, max_size=3, unique=True))
    source = draw(st.sampled_from([
        "{db}.demonstration_events", "(SELECT * FROM {db}.demonstration_events)",
        "{db}.demonstration_events AS de JOIN {db}.frames AS f USING (employee_key)",
        "(SELECT text AS kind, text, key_code, employee_key FROM {db}.demonstration_events)"]))
    where = draw(st.sampled_from(["", "WHERE NOT text_masked", "WHERE text LIKE '%SECRET%'", "WHERE 1"]))
    body = f"SELECT {', '.join(cols)} FROM {source} {where}"
    if any(c in ("count()", "groupArray(text)") for c in cols):
        plain = [c for c in cols if c not in ("count()", "groupArray(text)")]
        body += f" GROUP BY {', '.join(plain)}" if plain else ""
    return body


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sql=researcher_queries())
def test_researchers_never_see_unmasked_text(client: Any, sql: str) -> None:
    try:
        a = run(client, sql, role="researcher", purpose="property")
    except (tiers.TierRefused, tiers.QueryFailed):
        assert last_audit(client)["outcome"] in ("refused", "failed")
    else:
        assert "UNMASKED" not in json.dumps(a.rows, default=str), (sql, a.rows)
        assert last_audit(client)["outcome"] == "allowed"


# ------------------------------------------------------------------ a ClickHouse server


def test_server_grants_parse_with_clickhouse_parser(client: Any) -> None:
    stmts = tiers.server_grants_sql(DB)
    for s in stmts:
        printed = client.query("SELECT formatQuery({q:String})", parameters={"q": s}).first_row[0]
        assert printed.split()[0] in ("CREATE", "GRANT"), printed
    analyst = [s for s in stmts if s.startswith("GRANT") and s.endswith("TO handtrace_analyst")]
    events = next(s for s in analyst if f" ON {DB}.events " in s)
    assert "app_id" in events and "employee_key" in events  # counted (the k rewrite needs it)
    for col in ("text", "window_title", "url", "screenshot_sha256"):
        assert f" {col}," not in events and f"({col}," not in events and f", {col})" not in events
    assert not any(f"{DB}.frames" in s for s in analyst)
    assert (f"CREATE ROW POLICY IF NOT EXISTS handtrace_researcher_masked_text ON {DB}.demonstration_events "
            "FOR SELECT USING (text IS NULL) OR text_masked TO handtrace_researcher") in stmts
    assert (f"CREATE ROW POLICY IF NOT EXISTS handtrace_not_researcher_all_rows ON {DB}.demonstration_events "
            "FOR SELECT USING 1 TO ALL EXCEPT handtrace_researcher") in stmts
    with pytest.raises(ValueError, match="not a database name"):
        tiers.server_grants_sql("x; DROP")


# ------------------------------------------------------------------ the CLI


@pytest.fixture
def cli_env(dsn: str, tmp_path: Path) -> dict[str, str]:
    return {"HANDTRACE_CLICKHOUSE__DSN": dsn, "HANDTRACE_STATE_DIR": str(tmp_path),
            "HANDTRACE_WAREHOUSE__K_ANONYMITY": "5", "COLUMNS": "300"}


def invoke(env: dict[str, str], *args: str) -> Any:
    from handtrace.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def test_cli_sql_refuses_with_a_clear_message(client: Any, cli_env: dict[str, str]) -> None:
    r = invoke(cli_env, "sql", "--role", "analyst", "--actor", "ana",
               f"SELECT window_title, count() FROM {DB}.events GROUP BY window_title")
    assert r.exit_code == 1
    assert ("refused for role analyst: column events.window_title (window titles) is not readable by analysts"
            in " ".join(r.output.split())), r.output
    audit = last_audit(client)
    assert (audit["actor"], audit["role"], audit["outcome"]) == ("ana", "analyst", "refused")


def test_cli_sql_answers_an_aggregate_as_json(client: Any, cli_env: dict[str, str]) -> None:
    r = invoke(cli_env, "sql", "--role", "analyst", "--format", "json",
               f"SELECT app_id, count() AS n FROM {DB}.events GROUP BY app_id ORDER BY app_id")
    assert r.exit_code == 0, r.output
    assert [json.loads(line) for line in r.output.splitlines()] == [{"app_id": "shared", "n": 80}]
    r = invoke(cli_env, "sql", "--role", "researcher", "--purpose", "eval set", "--format", "csv",
               f"SELECT count() AS n FROM {DB}.frames")
    assert r.exit_code == 0 and r.output.splitlines() == ["n", "8"], r.output
    assert last_audit(client)["purpose"] == "eval set"


def test_cli_k_comes_from_settings(client: Any, cli_env: dict[str, str]) -> None:
    r = invoke({**cli_env, "HANDTRACE_WAREHOUSE__K_ANONYMITY": "2"}, "sql", "--role", "analyst", "--format", "csv",
               f"SELECT app_id, count() AS n FROM {DB}.events GROUP BY app_id ORDER BY app_id")
    assert r.output.splitlines() == ["app_id,n", "pair,6", "shared,80"], r.output  # solo (1 person) still out
    assert "uniqExact(employee_key) >= 2" in last_audit(client)["executed"]
    r = invoke({**cli_env, "HANDTRACE_WAREHOUSE__K_ANONYMITY": "1"}, "sql", "--role", "analyst", "SELECT 1")
    assert r.exit_code == 2  # k = 1 would hand out per-person rows: not a valid setting


def test_cli_sql_binds_params_and_reads_a_rollup(client: Any, cli_env: dict[str, str]) -> None:
    """docs/cookbook.md's placeholders: --param NAME=VALUE; the rollup answers like the raw table."""
    sql = (f"SELECT app_id, sum(events) AS n FROM {DB}.rollup_app_activity_hourly "
           "WHERE app_id IN {apps:Array(String)} GROUP BY app_id ORDER BY app_id")
    r = invoke(cli_env, "sql", "--role", "analyst", "--format", "csv", "--param", "apps=['shared','solo']", sql)
    assert r.exit_code == 0 and r.output.splitlines() == ["app_id,n", "shared,80"], r.output  # solo: < k people
    r = invoke(cli_env, "sql", "--role", "analyst", sql)
    assert r.exit_code == 2 and "--param apps=VALUE" in r.output, r.output


def test_cli_query_is_the_admin_form_and_is_audited(client: Any, cli_env: dict[str, str]) -> None:
    r = invoke(cli_env, "query", "--format", "csv", f"SELECT count() AS n FROM {DB}.frames")
    assert r.exit_code == 0 and r.output.splitlines() == ["n", "8"], r.output
    audit = last_audit(client)
    assert (audit["role"], audit["outcome"], audit["rows"]) == ("admin", "allowed", 1)


def test_no_answer_without_an_audit_row(client: Any) -> None:
    """A database without access_audit (not migrated): the query is not answered."""

    class NoAudit:
        def __init__(self, inner: Any) -> None:
            self.client = inner

        def query(self, *a: Any, **kw: Any) -> Any:
            return self.client.query(*a, **kw)

        def insert(self, table: str, *a: Any, **kw: Any) -> Any:
            raise RuntimeError(f"Table {table} does not exist")

    with pytest.raises(tiers.AuditUnavailable, match="the access audit could not be written"):
        tiers.run(NoAudit(client), f"SELECT count() FROM {DB}.events", role="admin", database=DB, k=K)


def test_cli_unknown_role(cli_env: dict[str, str]) -> None:
    r = invoke(cli_env, "sql", "--role", "boss", "SELECT 1")
    assert r.exit_code == 2 and "unknown role 'boss'" in r.output


# ------------------------------------------------------------------ through the sink's query endpoint

OWNER = r"""
import signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.sink.schema import migrate

dsn, db = sys.argv[1:3]
c = clickhouse.connect(dsn)
migrate(c, db)
c.command(f"INSERT INTO {db}.events (event_id, employee_key, kind, text, text_masked, app_id, window_title) "
          "SELECT generateUUIDv4(), concat('person-', toString(number % 6)), 'key', 'SECRET', 0, "
          "'shared', 'SECRET' FROM numbers(1, 30)")
c.command(f"INSERT INTO {db}.events (event_id, employee_key, kind, app_id) "
          "VALUES (generateUUIDv4(), 'p-x', 'key', 'solo')")
c.command(f"INSERT INTO {db}.demonstration_events (event_id, employee_key, kind, text, text_masked) "
          "VALUES (generateUUIDv4(), 'person-1', 'key', '•', 1), (generateUUIDv4(), 'person-1', 'key', 'SECRET', 0)")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    import os
    import subprocess
    import sys


    data = tmp_path_factory.mktemp("served") / "clickhouse"
    proc = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB], stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "services")})
    try:
        wait_served(proc, data)
        remote = clickhouse.reader(f"chdb://{data}")
        assert clickhouse.is_remote(remote)
        yield remote
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait(30)


def test_tiers_and_audit_work_through_the_endpoint(served: Any) -> None:
    a = tiers.run(served, f"SELECT app_id, count() AS n FROM {DB}.events GROUP BY app_id ORDER BY app_id",
                  role="analyst", database=DB, k=K, actor="ana")
    assert a.rows == [("shared", 30)]  # 'solo' (one person) is suppressed
    with pytest.raises(tiers.TierRefused, match="column events.window_title"):
        tiers.run(served, f"SELECT count() FROM (SELECT * FROM {DB}.events) WHERE window_title != ''",
                  role="analyst", database=DB, k=K, actor="ana")
    with pytest.raises(tiers.TierRefused, match="raw query route cannot apply; use handtrace sql"):
        tiers.run(served, f"SELECT text FROM {DB}.demonstration_events", role="researcher", database=DB, k=K,
                  actor="rey", purpose="p")
    with pytest.raises(tiers.TierRefused, match="DROP statement refused"):
        tiers.run(served, f"DROP TABLE {DB}.events", role="admin", database=DB, k=K, actor="root")
    audit = served.query(f"SELECT actor, role, outcome, rows FROM {DB}.access_audit ORDER BY at").result_rows
    assert audit == [("ana", "analyst", "allowed", 1), ("ana", "analyst", "refused", 0),
                     ("rey", "researcher", "refused", 0), ("root", "admin", "refused", 0)]
    assert served.query(f"EXISTS TABLE {DB}.events").result_rows == [(1,)]
