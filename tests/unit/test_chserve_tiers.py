"""The query endpoint carries the access tiers and the audit (issue #14 Part Q; core/chserve.py,
docs/adr/0016-endpoint-tiers.md).

An owner subprocess migrates a real chdb data dir, seeds it (app ``shared``: six people, ``solo``:
one; demonstration events with masked and unmasked text) and serves it with ``/v1/sql``; this
process never opens the dir. Role tokens must reach ``/v1/sql`` and ``/v1/whoami`` only, the tier
rules of tests/unit/test_tiers.py must hold through the endpoint, researchers must read masked
text, and every attempt must be one audit row written by the owner with the OS user of the socket.
"""

from __future__ import annotations

import getpass
import grp
import http.client
import json
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from handtrace.core import chserve, clickhouse
from handtrace.core.settings import Settings
from tests.chserve_support import wait_served
from tests.unit.test_tiers import FORBIDDEN, PER_PERSON

DB = "handtrace"
K = 5
SERVICES = str(Path(__file__).resolve().parents[2] / "services")
# root may give a file any group: use one it is not in, to see the chgrp happen
GROUP = "nogroup" if os.geteuid() == 0 else grp.getgrgid(os.getegid()).gr_name

OWNER = r"""
import json, signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.sink.schema import ERASABLE, migrate

dsn, db, k, groups = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
c = clickhouse.connect(dsn)
migrate(c, db)
c.command(f"INSERT INTO {db}.events (event_id, employee_key, kind, text, text_masked, app_id, window_title) "
          "SELECT generateUUIDv4(), concat('person-', toString(number % 6)), 'key', 'SECRET', 0, "
          "'shared', 'SECRET' FROM numbers(1, 30)")
c.command(f"INSERT INTO {db}.events (event_id, employee_key, kind, app_id) "
          "VALUES (generateUUIDv4(), 'p-x', 'key', 'solo')")
c.command(f"INSERT INTO {db}.demonstration_events (event_id, employee_key, kind, text, text_masked) "
          "VALUES (generateUUIDv4(), 'person-1', 'key', '•', 1), (generateUUIDv4(), 'person-1', 'key', 'SECRET', 0), "
          "(generateUUIDv4(), 'person-2', 'key', NULL, 0)")
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop, erasable=ERASABLE, database=db, k_anonymity=k, endpoint_groups=groups)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""


@pytest.fixture(scope="module")
def owner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    data = tmp_path_factory.mktemp("tiered") / "clickhouse"
    proc = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB, str(K), json.dumps({"analyst": GROUP})],
                            stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": SERVICES})
    try:
        wait_served(proc, data)
        yield data
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert not any(data.glob("query*.endpoint")), "a clean stop removes every token file"


def role_client(data: Path, role: str) -> chserve.RemoteClient:
    c = chserve.RemoteClient.for_role(data, role)
    assert c is not None and c.endpoint_file == chserve.role_endpoint_file(role)
    return c


@pytest.fixture
def admin(owner: Path) -> chserve.RemoteClient:
    return role_client(owner, "admin")


def audit_count(admin: chserve.RemoteClient) -> int:
    return int(admin.query(f"SELECT count() FROM {DB}.access_audit").result_rows[0][0])


def last_audit(admin: chserve.RemoteClient) -> dict[str, Any]:
    r = admin.query(f"SELECT * FROM {DB}.access_audit ORDER BY at DESC LIMIT 1")
    return dict(zip(r.column_names, r.result_rows[0], strict=True))


def raw_post(data: Path, role: str, route: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    ep = json.loads((data / chserve.role_endpoint_file(role)).read_text())
    host, _, port = ep["url"].removeprefix("http://").partition(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request("POST", route, json.dumps(body), {"Authorization": f"Bearer {ep['token']}"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


# ------------------------------------------------------------------ token files


def test_one_token_file_per_role_with_its_mode_and_group(owner: Path) -> None:
    tokens = set()
    admin = os.stat(owner / chserve.ENDPOINT_FILE)
    assert stat.S_IMODE(admin.st_mode) == 0o600
    assert set(json.loads((owner / chserve.ENDPOINT_FILE).read_text())) == {"url", "token", "pid", "dsn"}  # unchanged
    tokens.add(json.loads((owner / chserve.ENDPOINT_FILE).read_text())["token"])
    for role in chserve.TIERED_ROLES:
        f = owner / f"query.{role}.endpoint"
        st = os.stat(f)
        if role == "analyst":
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o640, grp.getgrnam(GROUP).gr_gid)
        else:
            assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o600, os.getegid())
        ep = json.loads(f.read_text())
        assert ep["role"] == role
        tokens.add(ep["token"])
    assert len(tokens) == 4, "every role has its own token"


def test_an_unknown_or_unusable_group_fails_at_start(tmp_path: Path) -> None:
    data = tmp_path / "clickhouse"
    with pytest.raises(ValueError, match="there is no OS group 'no-such-group-x'"):
        chserve.Server(f"chdb://{data}", threading.Event(), endpoint_groups={"analyst": "no-such-group-x"})
    with pytest.raises(ValueError, match="no token file for role.s. admin"):
        chserve.Server(f"chdb://{data}", threading.Event(), endpoint_groups={"admin": GROUP})
    assert not data.exists() or not any(data.iterdir()), "nothing is written or served"
    # the sink checks before it opens anything: exit 2 and one line
    from handtrace.cli import app

    r = CliRunner().invoke(app, ["sink", "run"], env={
        "HANDTRACE_CLICKHOUSE__DSN": f"chdb://{data}", "HANDTRACE_STATE_DIR": str(tmp_path),
        "HANDTRACE_WAREHOUSE__ENDPOINT_GROUPS": '{"auditor": "no-such-group-x"}'})
    assert r.exit_code == 2 and "there is no OS group 'no-such-group-x'" in r.output, r.output
    assert not data.exists() or not any(data.iterdir())
    with pytest.raises(ValidationError, match="analyst"):
        Settings(warehouse={"endpoint_groups": {"admin": "staff"}})  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="not an OS group name"):
        Settings(warehouse={"endpoint_groups": {"analyst": "a b;c"}})  # type: ignore[arg-type]
    s = Settings(warehouse={"endpoint_groups": {"researcher": "ml"}})  # type: ignore[arg-type]
    assert s.warehouse.endpoint_groups == {"researcher": "ml"}


# ------------------------------------------------------------------ what a role token reaches


@pytest.mark.parametrize("role", chserve.TIERED_ROLES)
def test_a_role_token_reaches_only_sql_and_whoami(owner: Path, admin: chserve.RemoteClient, role: str) -> None:
    before = admin.query(f"SELECT count() FROM {DB}.events").result_rows
    for route, body in [("/v1/query", {"sql": f"SELECT count() FROM {DB}.events"}),
                        ("/v1/insert", {"table": "withdrawals", "column_names": ["employee_key"], "rows": [["x"]]}),
                        ("/v1/erase", {"employee_key": "person-1"}),
                        ("/v1/anything", {})]:
        status, err = raw_post(owner, role, route, body)
        assert status == 403 and err["error"] == "forbidden", (route, err)
        assert f"the {role} token (query.{role}.endpoint) reaches only /v1/sql and /v1/whoami" in err["message"]
        assert f"{route} needs the admin token (query.endpoint)" in err["message"]
    c = role_client(owner, role)
    with pytest.raises(chserve.Forbidden, match="needs the admin token"):
        c.query(f"SELECT count() FROM {DB}.events")
    with pytest.raises(chserve.Forbidden):
        c.insert("withdrawals", [["x"]], column_names=["employee_key"])
    with pytest.raises(chserve.Forbidden):
        c.erase("person-1")
    assert admin.query(f"SELECT count() FROM {DB}.events").result_rows == before
    assert admin.query(f"SELECT count() FROM {DB}.withdrawals").result_rows == [(0,)]
    assert c.whoami() == {"role": role, "os_user": getpass.getuser()}


def test_the_role_is_the_tokens_never_the_requests(owner: Path, admin: chserve.RemoteClient) -> None:
    n = audit_count(admin)
    with pytest.raises(chserve.Forbidden, match="this is the analyst token .* not as admin"):
        role_client(owner, "analyst").sql(f"SELECT text FROM {DB}.events", role="admin")
    assert audit_count(admin) == n  # nothing ran
    # the admin token may run any declared role (and is then held to it)
    a = admin.sql(f"SELECT text FROM {DB}.demonstration_events", role="researcher", purpose="check")
    assert sorted(a.rows, key=str) == [("•",), (None,)]
    assert (a.audit["role"], a.audit["outcome"]) == ("researcher", "allowed")
    with pytest.raises(chserve.StatementRefused, match="refused for role analyst"):
        admin.sql(f"SELECT text FROM {DB}.events", role="analyst")


# ------------------------------------------------------------------ the tiers through /v1/sql


@pytest.mark.parametrize(("sql", "fragment"), FORBIDDEN + PER_PERSON, ids=range(len(FORBIDDEN + PER_PERSON)))
def test_the_analyst_tier_refuses_through_the_endpoint(owner: Path, admin: chserve.RemoteClient, sql: str,
                                                       fragment: str) -> None:
    analyst = role_client(owner, "analyst")
    n = audit_count(admin)
    with pytest.raises(chserve.StatementRefused) as e:
        analyst.sql(sql.format(db=DB), actor="ana")
    assert not isinstance(e.value, chserve.Forbidden)
    if fragment in ("table function file()", "SETTINGS"):
        # the analysis itself runs read-only through the endpoint: refused before the tier looks
        fragment = "the sink runs queries for other processes read-only, the analysis included"
    assert fragment in str(e.value), str(e.value)
    assert audit_count(admin) == n + 1
    audit = last_audit(admin)
    assert (audit["outcome"], audit["role"], audit["actor"], audit["os_user"]) == (
        "refused", "analyst", "ana", getpass.getuser())
    assert audit["query"] == sql.format(db=DB) and audit["reason"] == str(e.value)


def test_k_anonymity_holds_through_the_endpoint(owner: Path, admin: chserve.RemoteClient) -> None:
    analyst = role_client(owner, "analyst")
    a = analyst.sql(f"SELECT app_id, count() AS n FROM {DB}.events GROUP BY app_id ORDER BY app_id")
    assert a.rows == [("shared", 30)]  # 'solo' (one person) is suppressed
    assert "HAVING uniqExact(employee_key) >= 5" in a.audit["executed"]
    assert analyst.sql(f"SELECT count() FROM {DB}.events WHERE app_id = 'solo'").rows == []
    audit = last_audit(admin)
    assert (audit["outcome"], audit["rows"], audit["os_user"], audit["actor"]) == (
        "allowed", 0, getpass.getuser(), getpass.getuser())  # no --actor: the socket's user


def test_a_researcher_reads_masked_text_while_served(owner: Path, admin: chserve.RemoteClient) -> None:
    researcher = role_client(owner, "researcher")
    with pytest.raises(chserve.StatementRefused, match="a stated purpose is required"):
        researcher.sql(f"SELECT text FROM {DB}.demonstration_events")
    a = researcher.sql(f"SELECT employee_key, text FROM {DB}.demonstration_events ORDER BY employee_key",
                       purpose="train the form-filling model", actor="rey")
    assert a.rows == [("person-1", "•"), ("person-2", None)]  # the unmasked row is filtered by the engine
    assert researcher.sql(f"SELECT count() FROM (SELECT * FROM {DB}.demonstration_events) WHERE text LIKE "
                          "'%SECRET%'", purpose="p").rows == [(0,)]
    audit = last_audit(admin)
    assert (audit["role"], audit["purpose"], audit["outcome"]) == ("researcher", "p", "allowed")
    with pytest.raises(chserve.StatementRefused, match="table handtrace.events"):
        researcher.sql(f"SELECT count() FROM {DB}.events", purpose="p")


def test_reads_only_even_for_admin_and_failures_are_audited(owner: Path, admin: chserve.RemoteClient) -> None:
    n = audit_count(admin)
    with pytest.raises(chserve.StatementRefused, match="DROP statement refused"):
        admin.sql(f"DROP TABLE {DB}.events")
    with pytest.raises(chserve.StatementRefused, match="INSERT statement refused"):
        admin.sql(f"INSERT INTO {DB}.withdrawals (employee_key) VALUES ('x')")
    with pytest.raises(chserve.RemoteError, match="nope"):
        role_client(owner, "auditor").sql(f"SELECT nope FROM {DB}.access_audit")
    assert audit_count(admin) == n + 3
    outcomes = admin.query(f"SELECT role, outcome FROM {DB}.access_audit ORDER BY at DESC LIMIT 3").result_rows
    assert outcomes == [("auditor", "failed"), ("admin", "refused"), ("admin", "refused")]
    assert admin.query(f"EXISTS TABLE {DB}.events").result_rows == [(1,)]
    a = admin.sql(f"SELECT count() FROM {DB}.events")  # admin reads everything through /v1/sql
    assert a.rows == [(31,)]


def test_errors_of_the_analysis_do_not_quote_what_the_role_may_not_read(owner: Path, admin: chserve.RemoteClient,
                                                                      tmp_path: Path) -> None:
    # EXPLAIN QUERY TREE runs scalar subqueries before the tier sees the tree: their values must not
    # come back in ClickHouse's messages (Cannot parse string '<value>' as UInt64), nor files be read
    probe = tmp_path / "probe.txt"
    probe.write_text("FILE-MARKER\n")
    analyst = role_client(owner, "analyst")
    for sql, error in [
        (f"SELECT count() FROM {DB}.events WHERE app_id = toString(toUInt64(assumeNotNull((SELECT any(text) "
         f"FROM {DB}.events))))", chserve.RemoteError),
        (f"SELECT count() FROM {DB}.events WHERE app_id = toString(toDate(assumeNotNull((SELECT any(window_title) "
         f"FROM {DB}.events))))", chserve.RemoteError),
        (f"SELECT count() FROM numbers(toUInt64(assumeNotNull((SELECT any(line) FROM file('{probe}', "
         "'LineAsString')))))", chserve.StatementRefused)]:
        with pytest.raises(error) as e:
            analyst.sql(sql)
        assert "SECRET" not in str(e.value) and "MARKER" not in str(e.value) and "SECRE" not in str(e.value)
        audit = last_audit(admin)
        assert audit["outcome"] in ("failed", "refused") and "SECRE" not in audit["reason"]
        assert "MARKER" not in audit["reason"]
    # the same value-quoting error is shown whole to admin (the data dir's owner may read it anyway)
    with pytest.raises(chserve.RemoteError, match="Cannot parse string 'SECRET' as UInt64"):
        admin.sql(f"SELECT toUInt64(assumeNotNull((SELECT any(text) FROM {DB}.events)))")
    # names-only errors stay whole for every role
    with pytest.raises(chserve.RemoteError, match="nope.*UNKNOWN_IDENTIFIER"):
        analyst.sql(f"SELECT nope, count() FROM {DB}.events GROUP BY nope")


def test_the_audit_names_the_os_user_of_the_connecting_socket(owner: Path, admin: chserve.RemoteClient) -> None:
    # As root the client runs as 'nobody' (another user than the owner's); otherwise as this user.
    ep = json.loads((owner / "query.auditor.endpoint").read_text())
    script = ("import http.client, json, sys\n"
              "url, token, db = json.loads(sys.stdin.read())\n"
              "host, _, port = url.removeprefix('http://').partition(':')\n"
              "c = http.client.HTTPConnection(host, int(port), timeout=30)\n"
              "c.request('POST', '/v1/sql', json.dumps({'sql': f'SELECT count() FROM {db}.control_audit'}), "
              "{'Authorization': 'Bearer ' + token})\n"
              "r = c.getresponse()\n"
              "print(r.status, r.read().decode())\n")
    user = "nobody" if os.geteuid() == 0 else getpass.getuser()
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
    out = subprocess.run([*prefix, "/usr/bin/python3", "-c", script], input=json.dumps([ep["url"], ep["token"], DB]),
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.startswith("200 "), (out.stdout, out.stderr)
    body = json.loads(out.stdout[4:])
    assert body["rows"] == [[0]] and (body["audit"]["os_user"], body["audit"]["actor"]) == (user, user)
    audit = last_audit(admin)
    assert (audit["role"], audit["os_user"], audit["actor"]) == ("auditor", user, user)


# ------------------------------------------------------------------ the CLI


def invoke(data: Path, *args: str) -> Any:
    from handtrace.cli import app

    env = {"HANDTRACE_CLICKHOUSE__DSN": f"chdb://{data}", "HANDTRACE_STATE_DIR": str(data.parent),
           "COLUMNS": "300"}
    return CliRunner().invoke(app, list(args), env=env)


def test_handtrace_sql_uses_the_owner_when_served(owner: Path, admin: chserve.RemoteClient) -> None:
    assert not clickhouse.opened_here(f"chdb://{owner}")
    r = invoke(owner, "sql", "--role", "researcher", "--purpose", "cli", "--actor", "rey", "--format", "json",
               f"SELECT text FROM {DB}.demonstration_events WHERE text IS NOT NULL")
    assert r.exit_code == 0, r.output
    assert [json.loads(line) for line in r.output.splitlines()] == [{"text": "•"}]
    audit = last_audit(admin)
    assert (audit["role"], audit["actor"], audit["os_user"], audit["purpose"]) == (
        "researcher", "rey", getpass.getuser(), "cli")
    r = invoke(owner, "sql", "--role", "analyst", f"SELECT text, count() FROM {DB}.events GROUP BY text")
    assert r.exit_code == 1 and "column events.text (typed text) is not readable by analysts" in r.output
    r = invoke(owner, "query", f"DROP TABLE {DB}.events")
    assert r.exit_code == 1 and "DROP statement refused" in r.output


def test_without_a_readable_role_file_the_admin_file_is_used(owner: Path, admin: chserve.RemoteClient,
                                                            tmp_path: Path) -> None:
    role_file = owner / "query.auditor.endpoint"
    moved = tmp_path / "moved"
    role_file.rename(moved)
    try:
        c = chserve.RemoteClient.for_role(owner, "auditor")
        assert c is not None and c.endpoint_file == chserve.ENDPOINT_FILE
        r = invoke(owner, "sql", "--role", "auditor", "--format", "csv",
                   f"SELECT count() AS n FROM {DB}.withdrawals")
        assert r.exit_code == 0 and r.output.splitlines() == ["n", "0"], r.output
        assert last_audit(admin)["role"] == "auditor"  # the admin token asked for the auditor tier
    finally:
        moved.rename(role_file)


def test_a_served_dir_whose_files_this_user_cannot_read_is_named(tmp_path: Path) -> None:
    # a directory stands in for an unreadable file (root reads any file whatever its mode)
    (tmp_path / chserve.ENDPOINT_FILE).mkdir()
    (tmp_path / "query.analyst.endpoint").mkdir()
    with pytest.raises(clickhouse.ClickHouseUnavailable, match="may read neither query.analyst.endpoint nor "
                                                                "query.endpoint.*OS group of the analyst tier"):
        chserve.RemoteClient.for_role(tmp_path, "analyst")
    assert chserve.RemoteClient.for_role(tmp_path / "none", "analyst") is None  # not served: opened directly


# ------------------------------------------------------------------ the kernel's socket table


def test_proc_net_addresses() -> None:
    import ipaddress

    assert chserve.proc_net_address("0100007F:1F90") == (ipaddress.ip_address("127.0.0.1"), 8080)
    assert chserve.proc_net_address("0000000000000000FFFF00000100007F:0050") == (
        ipaddress.ip_address("127.0.0.1"), 80)
    assert chserve.proc_net_address("00000000000000000000000001000000:0016") == (ipaddress.ip_address("::1"), 22)
    with pytest.raises(ValueError, match="not an address"):
        chserve.proc_net_address("0100:1F90")


TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1001        0 111 1
   1: 0100007F:1F90 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 112 1
   2: 0100007F:9C41 0100007F:1F91 01 00000000:00000000 00:00000000 00000000  1002        0 113 1
"""
TCP6 = ("  sl  local_address                         remote_address                        st tx_queue rx_queue "
        "tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0000000000000000FFFF00000100007F:9C42 0000000000000000FFFF00000100007F:1F90 01 "
        "00000000:00000000 00:00000000 00000000  1003        0 114 1\n")


def test_the_uid_is_the_client_ends(tmp_path: Path) -> None:
    server = ("127.0.0.1", 8080)
    assert chserve.socket_uid(("127.0.0.1", 40000), server, [TCP, TCP6]) == 1001  # not the server end's 0
    assert chserve.socket_uid(("127.0.0.1", 40001), server, [TCP, TCP6]) is None  # that one goes to :8081
    assert chserve.socket_uid(("127.0.0.1", 40002), server, [TCP, TCP6]) == 1003  # a v4-mapped row of tcp6
    (tmp_path / "tcp").write_text(TCP)
    named = [u.pw_name for u in pwd.getpwall() if u.pw_uid == 1001]
    assert chserve.socket_user(("127.0.0.1", 40000), server, tmp_path) == (named[0] if named else "uid 1001")
    assert chserve.socket_user(("127.0.0.1", 40009), server, tmp_path) == "unknown"
    assert chserve.socket_user(("127.0.0.1", 40000), server, tmp_path / "no-proc") == "unknown"
    assert chserve.socket_user(("10.0.0.2", 40000), server, tmp_path) == "unknown"  # loopback only
