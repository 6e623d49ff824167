"""Serve the embedded ClickHouse to the other processes of this machine (control plane part 3 A).

Only one process may open a ``chdb://`` data dir (``core/clickhouse.py`` locks it). That process
(the sink, the demo) calls :func:`serve`; the others reach it through :class:`RemoteClient`, which
``clickhouse.reader`` / ``clickhouse.open_for_cli`` hand out.

Transport: HTTP on 127.0.0.1 (a random port) with random bearer tokens, one per role (issue #14,
Part Q; docs/adr/0016-endpoint-tiers.md). ``<datadir>/query.endpoint`` (mode 0600) holds the
admin token: whoever may read that file may read the data dir anyway, so it grants nothing the
file system does not. ``query.<role>.endpoint`` (analyst, researcher, auditor) each hold their own
token: mode 0600, or 0640 with the OS group ``warehouse.endpoint_groups`` names for that role (a
group that does not exist or that this user cannot give fails :class:`Server` at start). The
server maps token -> role; a request never chooses its role, except that the admin token may ask
``/v1/sql`` for any role. A role token reaches ``/v1/sql`` and ``/v1/whoami`` only; every other
route answers 403 naming the admin file. A Unix socket would need a path under 108 bytes, which
long data dirs (pytest's tmp dirs) exceed.

``POST /v1/sql`` ``{sql, role?, purpose, actor, params, format}`` runs ``warehouse.tiers.run`` *in
this process* with an owner client (so the researcher's masked-text row filter,
``additional_table_filters``, can be set per query next to ``readonly = 1``) and writes the
``access_audit`` row itself. The audit's OS user is the owner of the connecting socket, read from
the kernel's table (``/proc/net/tcp`` and ``tcp6``: the client's loopback port -> uid -> user
name, :func:`socket_user`); ``unknown`` when the table cannot be read. The actor is what the
client claims (default: that OS user).

What ``/v1/query`` (admin) runs: one read statement per request. The kind is decided by ClickHouse's own parser:
``formatQuery`` parses the text (it refuses several statements and syntax errors) and prints the
one statement it parsed; its first keyword is the kind, and *that printed statement* is what is
executed, so nothing the parser did not see can run. ``EXPLAIN AST`` on the engine was not used:
it executes a second statement after a ``;`` and reads ``SET x = 1`` as a SELECT. Reads run in
sessions with ``readonly = 1`` (no writes, no settings changes, no ``file()``/``url()`` table
functions) as a second wall. Writes only through :meth:`RemoteClient.insert` into
:data:`WRITABLE`, and through the fixed erase operation (:meth:`RemoteClient.erase`: an employee
key, nothing else; the owner's erasable tables). Values travel as tagged JSON (rows) or Arrow IPC
(``query_arrow``); nothing is ever unpickled.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import grp
import hmac
import http.client
import ipaddress
import json
import logging
import os
import pwd
import queue
import secrets
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import clickhouse_connect
import pyarrow as pa
from clickhouse_connect.driver.binding import bind_query
from clickhouse_connect.driver.exceptions import DatabaseError

from handtrace.core.clickhouse import ClickHouseUnavailable, embedded_path

log = logging.getLogger("handtrace.chserve")

ENDPOINT_FILE = "query.endpoint"
TIERED_ROLES = ("analyst", "researcher", "auditor")
"""Roles with their own token file (``query.<role>.endpoint``); the admin's is :data:`ENDPOINT_FILE`."""
ROLE_ROUTES = ("/v1/sql", "/v1/whoami")
"""The only routes a role token reaches; every other one needs the admin token."""
WRITABLE = ("withdrawals", "dataset_exports", "erasure_receipts", "access_audit")
"""Tables the endpoint inserts into (through ``insert()`` only): withdrawals and export records,
which the dataset CLI records while the sink runs, erasure receipts (``handtrace erase``) and the
access audit of ``handtrace sql``."""
READ_KINDS = ("SELECT", "WITH", "SHOW", "DESCRIBE", "EXPLAIN", "EXISTS")
CONNECT_TIMEOUT_S = 2.0
QUERY_TIMEOUT_S = 3600.0
_ARROW = "application/vnd.apache.arrow.stream"


class StatementRefused(DatabaseError):
    """The endpoint does not run this statement (not a read, several statements, or a write
    outside ``WRITABLE``)."""


class RemoteError(DatabaseError):
    """ClickHouse (in the owner process) failed the statement; the message is ClickHouse's."""


class Forbidden(StatementRefused):
    """The token's role does not reach this route, or the request claimed another role (HTTP 403)."""


class AuditFailed(RemoteError):
    """The owner could not write the access audit row, so it answered nothing (HTTP 503)."""


class EndpointConfigError(ValueError):
    """``warehouse.endpoint_groups`` cannot be applied on this machine (the sink does not start)."""


def role_endpoint_file(role: str) -> str:
    """The token file of ``role`` in the data dir (``query.endpoint`` for admin)."""
    return ENDPOINT_FILE if role == "admin" else f"query.{role}.endpoint"


def group_id(name: str) -> int:
    """The id of the OS group ``name`` that this process may give its files; ValueError (saying
    which and why) when there is no such group or this user is not in it (chgrp would fail)."""
    try:
        gid = grp.getgrnam(name).gr_gid
    except KeyError:
        raise EndpointConfigError(f"warehouse.endpoint_groups: there is no OS group {name!r} on this machine "
                                  "(create it, or remove it from the setting)") from None
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        raise EndpointConfigError(f"warehouse.endpoint_groups: this process's user is not a member of group "
                                  f"{name!r}, so it cannot give the token file that group (add the user to it, "
                                  "or change the setting)")
    return gid


def group_ids(endpoint_groups: Mapping[str, str]) -> dict[str, int]:
    """role -> gid of ``warehouse.endpoint_groups``; EndpointConfigError for a role without a token
    file of its own or a group this process cannot give (the sink checks it before it starts)."""
    unknown = sorted(set(endpoint_groups) - set(TIERED_ROLES))
    if unknown:
        raise EndpointConfigError(f"warehouse.endpoint_groups: no token file for role(s) {', '.join(unknown)} "
                                  f"(one of {', '.join(TIERED_ROLES)}; the admin file stays 0600)")
    return {role: group_id(g) for role, g in endpoint_groups.items()}


# ------------------------------------------------------------------ who is on the other end


def proc_net_address(text: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """An address of ``/proc/net/tcp{,6}`` (``0100007F:1F90``: the address in the kernel's byte
    order, 32-bit words little-endian on x86; the port big-endian hex) as (address, port); an
    IPv4-mapped IPv6 address comes back as IPv4."""
    host, _, port = text.partition(":")
    raw = bytes.fromhex(host)
    if len(raw) not in (4, 16):
        raise ValueError(f"not an address of /proc/net/tcp: {text!r}")
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(words)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr, int(port, 16)


def socket_uid(peer: tuple[str, int], local: tuple[str, int], tables: Sequence[str]) -> int | None:
    """The uid owning the client end of the TCP connection from ``peer`` to ``local`` (this
    server), found in the text of ``/proc/net/tcp`` and ``/proc/net/tcp6`` (``tables``): the row
    whose local address is the peer and whose remote address is us. None when no row matches."""
    want_peer = (ipaddress.ip_address(peer[0]), int(peer[1]))
    want_local = (ipaddress.ip_address(local[0]), int(local[1]))
    for text in tables:
        for line in text.splitlines()[1:]:
            f = line.split()
            if len(f) < 8:
                continue
            try:
                if proc_net_address(f[1]) == want_peer and proc_net_address(f[2]) == want_local:
                    return int(f[7])
            except ValueError:
                continue
    return None


def socket_user(peer: tuple[str, int], local: tuple[str, int], proc_net: Path = Path("/proc/net")) -> str:
    """The OS user name of the process at the other end of a loopback connection (the kernel's
    socket table: the client's port -> its uid -> the name); ``uid N`` when the uid has no name,
    ``unknown`` when the table cannot be read or holds no such connection (another network
    namespace, no /proc). Only a connection of this machine is looked up."""
    if not ipaddress.ip_address(peer[0]).is_loopback:
        return "unknown"
    tables = []
    for name in ("tcp", "tcp6"):
        with contextlib.suppress(OSError):
            tables.append((proc_net / name).read_text())
    uid = socket_uid(peer, local, tables)
    if uid is None:
        return "unknown"
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# ------------------------------------------------------------------ values as tagged JSON


def _tz(tz: dt.tzinfo | None) -> Any:
    if tz is None:
        return None
    if isinstance(tz, ZoneInfo):
        return ["zoneinfo", tz.key]
    zone = getattr(tz, "zone", None)  # pytz
    if isinstance(zone, str):
        return ["pytz", zone]
    offset = tz.utcoffset(None)
    if isinstance(tz, dt.timezone) and offset is not None:
        return ["fixed", offset.total_seconds(), tz.tzname(None)]
    raise TypeError(f"cannot send a time zone of type {type(tz).__name__}")


def _untz(v: Any) -> dt.tzinfo | None:
    if v is None:
        return None
    kind = v[0]
    if kind == "zoneinfo":
        return ZoneInfo(v[1])
    if kind == "pytz":
        import pytz  # clickhouse-connect depends on it

        return pytz.timezone(v[1])  # type: ignore[no-any-return]
    if kind == "fixed":
        off = dt.timedelta(seconds=v[1])
        return dt.UTC if off == dt.timedelta(0) and v[2] == "UTC" else dt.timezone(off, v[2])
    raise ValueError(f"unknown time zone tag {kind!r}")


def encode(v: Any) -> Any:
    """A JSON-able form of ``v`` that :func:`decode` turns back into an equal value of the same
    type (the types clickhouse-connect returns and takes). Unknown types raise TypeError."""
    if v is None or isinstance(v, bool | int | float | str):
        return v
    if isinstance(v, list):
        return [encode(x) for x in v]
    if isinstance(v, tuple):
        return {"$": "tuple", "v": [encode(x) for x in v]}
    if isinstance(v, dict):
        return {"$": "map", "v": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, dt.datetime):
        tz = _tz(v.tzinfo)
        if tz is not None and tz[0] == "pytz":  # pytz's zone objects differ per offset: send the instant
            return {"$": "datetime", "v": v.astimezone(dt.UTC).replace(tzinfo=None).isoformat(), "tz": tz}
        return {"$": "datetime", "v": v.replace(tzinfo=None).isoformat(), "tz": tz, "fold": v.fold}
    if isinstance(v, dt.date):
        return {"$": "date", "v": v.isoformat()}
    if isinstance(v, dt.time):
        return {"$": "time", "v": v.isoformat()}
    if isinstance(v, dt.timedelta):
        return {"$": "timedelta", "v": [v.days, v.seconds, v.microseconds]}
    if isinstance(v, uuid.UUID):
        return {"$": "uuid", "v": str(v)}
    if isinstance(v, Decimal):
        return {"$": "decimal", "v": str(v)}
    if isinstance(v, bytes | bytearray):
        return {"$": "bytes", "v": base64.b64encode(v).decode()}
    if isinstance(v, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return {"$": f"ip{v.version}", "v": str(v)}
    if isinstance(v, set | frozenset):
        return {"$": "set", "v": [encode(x) for x in v]}
    raise TypeError(f"cannot send a value of type {type(v).__name__}")


def decode(v: Any) -> Any:
    """The value :func:`encode` encoded."""
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    tag: Any = v.get("$")
    x: Any = v.get("v")
    if tag == "tuple":
        return tuple(decode(e) for e in x)
    if tag == "map":
        return {decode(k): decode(e) for k, e in x}
    if tag == "datetime":
        tz = _untz(v.get("tz"))
        naive = dt.datetime.fromisoformat(x)
        if v["tz"] is not None and v["tz"][0] == "pytz":
            return tz.fromutc(naive.replace(tzinfo=tz)) if tz is not None else naive
        return naive.replace(tzinfo=tz, fold=int(v.get("fold", 0)))
    if tag == "date":
        return dt.date.fromisoformat(x)
    if tag == "time":
        return dt.time.fromisoformat(x)
    if tag == "timedelta":
        return dt.timedelta(days=x[0], seconds=x[1], microseconds=x[2])
    if tag == "uuid":
        return uuid.UUID(x)
    if tag == "decimal":
        return Decimal(x)
    if tag == "bytes":
        return base64.b64decode(x)
    if tag == "ip4":
        return ipaddress.IPv4Address(x)
    if tag == "ip6":
        return ipaddress.IPv6Address(x)
    if tag == "set":
        return {decode(e) for e in x}
    raise ValueError(f"unknown value tag {tag!r}")


# ------------------------------------------------------------------ the statement classifier


def _identifier(name: str) -> bool:
    return bool(name) and (name[0].isalpha() or name[0] == "_") and all(c.isalnum() or c == "_" for c in name) \
        and name.isascii()


def writable_table(table: str) -> str:
    """``table`` quoted for an INSERT if it is one of :data:`WRITABLE` (optionally qualified with
    a database), else StatementRefused."""
    parts = table.split(".")
    if len(parts) > 2 or not all(_identifier(p) for p in parts) or parts[-1] not in WRITABLE:
        raise StatementRefused(f"INSERT into {table!r} is refused: the query endpoint inserts only into "
                               f"{', '.join(WRITABLE)}")
    return ".".join(f"`{p}`" for p in parts)


def statement_kind(canonical: str) -> str:
    """The kind of a statement as ClickHouse's formatter printed it (its first keyword)."""
    words = canonical.lstrip("( \n").split(None, 1)
    return words[0].upper() if words else ""


def check_read(canonical: str) -> str:
    """``canonical`` (formatQuery's output) if it is a read statement, else StatementRefused
    naming its kind."""
    kind = statement_kind(canonical)
    if kind not in READ_KINDS:
        raise StatementRefused(f"{kind or 'an empty'} statement refused: the query endpoint runs read statements "
                               f"only ({', '.join(READ_KINDS)}); records are written through insert() into "
                               f"{', '.join(WRITABLE)}")
    # The formatter starts each top-level clause on its own line and escapes newlines in
    # literals, so a line starting INTO OUTFILE is the clause (which readonly does not stop).
    if any(line.startswith("INTO OUTFILE") for line in canonical.splitlines()):
        raise StatementRefused("SELECT ... INTO OUTFILE refused: the query endpoint writes no files")
    return canonical


# ------------------------------------------------------------------ the server


class Server:
    """The query endpoint of one data dir, served by a daemon thread of the owner process."""

    def __init__(self, dsn: str, stop: threading.Event, *, erasable: Sequence[str] = (),
                 database: str | None = None, k_anonymity: int = 5,
                 endpoint_groups: Mapping[str, str] | None = None) -> None:
        path = embedded_path(dsn)
        if path is None:
            raise ValueError(f"only an embedded ClickHouse (chdb://) is served, not {dsn}")
        self.gids = group_ids(endpoint_groups or {})  # every bad group fails here, at start
        self.path = path.resolve()
        self.dsn = f"chdb://{self.path}"
        self.token = secrets.token_urlsafe(32)
        self.role_tokens = {role: secrets.token_urlsafe(32) for role in TIERED_ROLES}
        self.endpoint_file = self.path / ENDPOINT_FILE
        self.erasable = tuple(erasable)
        self.database = database
        self.k_anonymity = int(k_anonymity)
        self._readers: queue.LifoQueue[Any] = queue.LifoQueue()
        self._owners: queue.LifoQueue[Any] = queue.LifoQueue()
        self._writer = clickhouse_connect.get_client(dsn=self.dsn)
        self._writer_lock = threading.Lock()
        self._parser = self._reader()
        self._parser_lock = threading.Lock()
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._stopped = False
        for role, token in self.role_tokens.items():
            self._write_endpoint(role_endpoint_file(role), token, {"role": role}, self.gids.get(role))
        self._write_endpoint(ENDPOINT_FILE, self.token)  # last: its presence says "served"
        self._thread = threading.Thread(target=self._http.serve_forever, name="chserve", daemon=True)
        self._thread.start()
        def stop_when_told() -> None:
            stop.wait()
            self.stop()

        self._watch = threading.Thread(target=stop_when_told, name="chserve-stop", daemon=True)
        self._watch.start()

    def _reader(self) -> Any:
        client = clickhouse_connect.get_client(dsn=self.dsn)
        client.command("SET readonly = 1")  # this session only: the sink's clients are not affected
        return client

    @contextlib.contextmanager
    def reader(self) -> Iterator[Any]:
        """A read-only client of this process's engine for one request."""
        try:
            client = self._readers.get_nowait()
        except queue.Empty:
            client = self._reader()
        try:
            yield client
        finally:
            self._readers.put(client)

    @contextlib.contextmanager
    def owner(self) -> Iterator[Any]:
        """A client of this process's engine without the readonly session, for ``/v1/sql``:
        ``tiers.run`` sets ``readonly = 1`` per query itself, together with the researcher's row
        filter (``additional_table_filters``), which a readonly session refuses to take."""
        try:
            client = self._owners.get_nowait()
        except queue.Empty:
            client = clickhouse_connect.get_client(dsn=self.dsn)
        try:
            yield client
        finally:
            self._owners.put(client)

    def _write_endpoint(self, name: str, token: str, extra: Mapping[str, Any] | None = None,
                        gid: int | None = None) -> None:
        tmp = self.path / f".{name}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            if gid is not None:  # group and mode before the token is in the file
                os.fchown(f.fileno(), -1, gid)
                os.fchmod(f.fileno(), 0o640)
            json.dump({"url": self.url, "token": token, "pid": os.getpid(), "dsn": self.dsn, **(extra or {})}, f)
        os.replace(tmp, self.path / name)

    def role_of(self, authorization: str) -> str | None:
        """The role of the bearer token in an ``Authorization`` header (admin for the token of
        ``query.endpoint``); None for a wrong or missing token. Every token is compared."""
        given = authorization.encode()
        found = None
        for role, token in [("admin", self.token), *self.role_tokens.items()]:
            if hmac.compare_digest(given, f"Bearer {token}".encode()):
                found = role
        return found

    def sql(self, token_role: str, body: Mapping[str, Any], os_user: str) -> dict[str, Any]:
        """``POST /v1/sql``: run one query under an access tier in this process (``tiers.run``
        with an owner client) and write its audit row here. The role is the token's; only the
        admin token may name another role (``body["role"]``). Errors: Forbidden (a claimed role
        that is not the token's), StatementRefused (the tier refused it; audited), RemoteError
        (ClickHouse failed it; audited), AuditFailed (no audit row, no answer)."""
        from handtrace.warehouse import tiers

        if self.database is None:
            raise StatementRefused("this endpoint runs no tiered queries (its owner named no database)")
        claimed = body.get("role")
        if token_role == "admin":  # noqa: S105 -- a role name, not a password
            role = str(claimed or "admin")
        elif claimed not in (None, "", token_role):
            raise Forbidden(f"this is the {token_role} token ({role_endpoint_file(token_role)}): it runs queries as "
                            f"{token_role}, not as {claimed}")
        else:
            role = token_role
        fmt = body.get("format", "rows")
        if fmt != "rows":
            raise ValueError(f"format {fmt!r}: /v1/sql answers rows (tagged JSON); the client formats them")
        params = body.get("params") or {}
        if not isinstance(params, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in params.items()):
            raise ValueError("params: an object of name -> value strings ({name:Type} placeholders)")
        sql = tiers.bind_parameters(str(body["sql"]), params)
        actor, purpose = body.get("actor"), body.get("purpose")
        try:
            with self.owner() as client:
                answer = tiers.run(client, sql, role=role, database=self.database, k=self.k_anonymity,
                                   actor=str(actor) if actor else None, purpose=str(purpose) if purpose else None,
                                   os_user=os_user, served=True)
        except tiers.TierRefused as e:
            raise StatementRefused(str(e)) from None
        except tiers.QueryFailed as e:
            raise RemoteError(str(e)) from None
        except tiers.AuditUnavailable as e:
            raise AuditFailed(str(e)) from None
        audit = {k: answer.audit[k] for k in ("actor", "os_user", "role", "outcome", "rows", "executed")}
        return {"column_names": list(answer.column_names), "rows": encode([list(r) for r in answer.rows]),
                "audit": audit}

    def prepare(self, sql: str, parameters: Any) -> tuple[str, Any]:
        """The statement to run (formatQuery's print of the one statement in ``sql``, parameters
        bound as the client would) and the parameters it still needs, or StatementRefused."""
        final, server_binds = bind_query(sql, parameters, None)
        if isinstance(final, bytes):
            raise StatementRefused("binary query parameters are not supported by the query endpoint")
        with self._parser_lock:
            try:
                canonical = self._parser.query("SELECT formatQuery({q:String})", parameters={"q": final}).first_row[0]
            except DatabaseError as e:
                raise StatementRefused(f"statement refused: {_first_line(e)}") from None
        check_read(str(canonical))
        # client-side binding left literals (run without parameters, so a '%' stays a '%');
        # server-side binding left the {name:Type} markers, which formatQuery keeps
        return str(canonical), (parameters if server_binds else None)

    def insert(self, table: str, rows: list[Any], column_names: Sequence[str]) -> int:
        """Insert ``rows`` into a writable table; returns the number of rows written."""
        quoted = writable_table(table)
        if not all(isinstance(c, str) and _identifier(c) for c in column_names):
            raise StatementRefused("INSERT refused: column names must be plain identifiers")
        with self._writer_lock:
            summary = self._writer.insert(quoted, rows, column_names=list(column_names))
        return int(getattr(summary, "written_rows", len(rows)) or len(rows))

    def erase(self, employee_key: str) -> dict[str, int]:
        """The fixed erase operation (``handtrace erase``): delete every row of one employee key
        from the owner's erasable tables; returns the rows each held. Nothing but a pseudonym
        comes from the request: the tables and the database are the owner's."""
        from handtrace.core.erasure import check_employee_key, delete_rows

        if not self.erasable or self.database is None:
            raise StatementRefused("this endpoint does not erase (its owner named no erasable tables)")
        try:
            check_employee_key(employee_key)
        except ValueError as e:
            raise StatementRefused(str(e)) from None
        with self._writer_lock:
            return delete_rows(self._writer, self.database, employee_key, self.erasable)

    def stop(self) -> None:
        """Stop serving and remove the endpoint file (if it is still ours)."""
        if getattr(self, "_stopped", True):
            return
        self._stopped = True
        for role, token in [("admin", self.token), *self.role_tokens.items()]:
            f = self.path / role_endpoint_file(role)
            try:
                if json.loads(f.read_text()).get("token") == token:
                    f.unlink()
            except (OSError, ValueError):
                pass
        self._http.shutdown()
        self._http.server_close()
        for pool in (self._readers, self._owners):
            while not pool.empty():
                with contextlib.suppress(Exception):
                    pool.get_nowait().close()
        for client in (self._parser, self._writer):
            with contextlib.suppress(Exception):
                client.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base signature
            log.debug("chserve: " + format, *args)

        def _send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, kind: str, message: str) -> None:
            self._send(status, json.dumps({"error": kind, "message": message}).encode())

        def _who(self) -> str:
            peer: Any = self.client_address
            local: Any = self.server.server_address
            return socket_user((str(peer[0]), int(peer[1])), (str(local[0]), int(local[1])))

        def _whoami(self, role: str) -> None:
            self._send(200, json.dumps({"role": role, "os_user": self._who()}).encode())

        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            role = server.role_of(self.headers.get("Authorization", ""))
            if role is None:
                self._error(401, "unauthorized", "wrong or missing token")
            elif self.path == "/v1/whoami":
                self._whoami(role)
            else:
                self._error(404, "not_found", f"no route GET {self.path} (GET serves /v1/whoami only)")

        def do_POST(self) -> None:  # noqa: N802 -- http.server's name
            role = server.role_of(self.headers.get("Authorization", ""))
            if role is None:
                self._error(401, "unauthorized", "wrong or missing token (read it from the data dir's "
                                                 f"{ENDPOINT_FILE}, or query.<role>.endpoint)")
                return
            if role != "admin" and self.path not in ROLE_ROUTES:
                # the body is drained unread (a client still sending it would see a reset, not the reason)
                self.rfile.read(int(self.headers.get("Content-Length", "0") or 0))
                self._error(403, "forbidden", f"the {role} token ({role_endpoint_file(role)}) reaches only "
                                              f"{' and '.join(ROLE_ROUTES)} (handtrace sql --role {role}); "
                                              f"{self.path} needs the admin token ({ENDPOINT_FILE})")
                return
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
                if self.path == "/v1/whoami":
                    self._whoami(role)
                    return
                if self.path == "/v1/sql":
                    self._send(200, json.dumps(server.sql(role, body, self._who())).encode())
                    return
                if self.path == "/v1/insert":
                    n = server.insert(str(body["table"]), decode(body["rows"]), list(body["column_names"]))
                    self._send(200, json.dumps({"written_rows": n}).encode())
                    return
                if self.path == "/v1/erase":
                    self._send(200, json.dumps({"rows_removed": server.erase(str(body["employee_key"]))}).encode())
                    return
                if self.path != "/v1/query":
                    self._error(404, "not_found", f"no route {self.path}")
                    return
                sql, params = server.prepare(str(body["sql"]), decode(body.get("parameters")))
                mode = body.get("as", "rows")
                with server.reader() as client:
                    if mode == "arrow":
                        table = client.query_arrow(sql, parameters=params)
                        sink = pa.BufferOutputStream()
                        with pa.ipc.new_stream(sink, table.schema) as w:
                            w.write_table(table)
                        self._send(200, sink.getvalue().to_pybytes(), _ARROW)
                        return
                    if mode == "command":
                        value = client.command(sql, parameters=params)
                        summary = getattr(value, "summary", None)
                        out = {"summary": summary} if summary is not None else {"value": encode(value)}
                        self._send(200, json.dumps(out).encode())
                        return
                    result = client.query(sql, parameters=params)
                    rows = encode(result.result_rows)
                self._send(200, json.dumps({"column_names": list(result.column_names), "rows": rows}).encode())
            except Forbidden as e:
                self._error(403, "forbidden", str(e))
            except StatementRefused as e:
                self._error(403, "refused", str(e))
            except AuditFailed as e:
                self._error(503, "audit", str(e))
            except (DatabaseError, TypeError, ValueError, KeyError) as e:
                self._error(400, "clickhouse", str(e).strip() or repr(e))
            except Exception as e:  # noqa: BLE001 -- the caller gets the message; this thread lives on
                log.exception("chserve request failed")
                self._error(500, "internal", repr(e))

    return Handler


def serve(dsn: str, stop: threading.Event, *, erasable: Sequence[str] = (), database: str | None = None,
          k_anonymity: int = 5, endpoint_groups: Mapping[str, str] | None = None) -> Server:
    """Serve the embedded ClickHouse ``dsn`` (opened by this process) to the processes of this
    machine until ``stop`` is set (or :meth:`Server.stop`). With ``erasable`` tables of
    ``database``, it also runs the fixed erase operation (:meth:`Server.erase`); with
    ``database``, tiered queries (``/v1/sql``, analysts at ``k_anonymity``). ``endpoint_groups``
    (role -> OS group) gives role token files that group and mode 0640 (ValueError at once for
    a group that does not exist or that this user cannot give)."""
    return Server(dsn, stop, erasable=erasable, database=database, k_anonymity=k_anonymity,
                  endpoint_groups=endpoint_groups)


# ------------------------------------------------------------------ the client


def endpoint_of(path: Path, name: str = ENDPOINT_FILE) -> dict[str, Any] | None:
    """The endpoint served for the data dir ``path`` (the admin's, or the token file ``name``):
    None if none is served, ClickHouseUnavailable if the file cannot be read or was left by a
    process that is gone."""
    f = path / name
    try:
        ep = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ClickHouseUnavailable(f"cannot read the query endpoint {f}: {e}") from None
    pid = int(ep.get("pid", 0))
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise ClickHouseUnavailable(
            f"the embedded ClickHouse at {path} is not being served: {f} was left by process {pid}, which is "
            "gone (it did not stop cleanly). Start the sink (handtrace sink run), or stop everything and query "
            "the dir directly.") from None
    except PermissionError:
        pass  # alive, another user's
    return dict(ep)


def _served(path: Path, name: str = ENDPOINT_FILE) -> dict[str, Any]:
    ep = endpoint_of(path, name)
    if ep is None:
        raise ClickHouseUnavailable(
            f"the embedded ClickHouse at {path} is not being served: start the sink (handtrace sink run) "
            "to query it while the pipeline runs, or point HANDTRACE_CLICKHOUSE__DSN at a ClickHouse server")
    return ep


class RemoteResult:
    """The part of clickhouse-connect's QueryResult the code uses."""

    def __init__(self, column_names: Sequence[str], result_rows: list[Any]) -> None:
        self.column_names = tuple(column_names)
        self.result_rows = result_rows

    @property
    def row_count(self) -> int:
        return len(self.result_rows)

    @property
    def first_row(self) -> Any:
        return self.result_rows[0]

    @property
    def first_item(self) -> Any:
        return dict(zip(self.column_names, self.result_rows[0], strict=True))

    def named_results(self) -> Iterator[dict[str, Any]]:
        for row in self.result_rows:
            yield dict(zip(self.column_names, row, strict=True))


class SqlAnswer(RemoteResult):
    """A tiered query's rows and the audit row the owner wrote for it."""

    def __init__(self, column_names: Sequence[str], result_rows: list[Any], audit: dict[str, Any]) -> None:
        super().__init__(column_names, result_rows)
        self.audit = audit

    @property
    def rows(self) -> list[Any]:
        return self.result_rows


class RemoteClient:
    """The subset of the clickhouse-connect client the code uses, run by the data dir's owner."""

    def __init__(self, path: Path, endpoint: dict[str, Any], *, timeout_s: float = QUERY_TIMEOUT_S,
                 follow: bool = False, endpoint_file: str = ENDPOINT_FILE) -> None:
        self.path = path
        self._timeout_s = timeout_s
        self._follow = follow
        self.endpoint_file = endpoint_file
        self._use(endpoint)

    def _use(self, endpoint: dict[str, Any]) -> None:
        url = str(endpoint["url"])
        host, _, port = url.removeprefix("http://").partition(":")
        self._host, self._port, self._token = host, int(port), str(endpoint["token"])

    @classmethod
    def for_dir(cls, path: Path) -> RemoteClient:
        """A client of the owner serving ``path`` (ClickHouseUnavailable if none does). It
        re-reads the endpoint on each call, so it outlives a restart of the sink."""
        return cls(path, _served(path), follow=True)

    @classmethod
    def for_role(cls, path: Path, role: str) -> RemoteClient | None:
        """A client with the token of ``role`` (``query.<role>.endpoint``) when this user may read
        that file, else with the admin's (``query.endpoint``); None when ``path`` is not served
        (no file, or one left by a process that is gone). ClickHouseUnavailable when it is served
        but neither file is readable by this user."""
        names = [role_endpoint_file(role)] if role != "admin" else []
        names.append(ENDPOINT_FILE)
        denied = []
        for name in names:
            try:
                ep = endpoint_of(path, name)
            except ClickHouseUnavailable as e:
                if not (path / name).exists() or "not being served" in str(e):
                    continue
                denied.append(name)
                continue
            if ep is not None:
                return cls(path, ep, follow=True, endpoint_file=name)
        if denied:
            raise ClickHouseUnavailable(
                f"the embedded ClickHouse at {path} is served, but this user may read neither "
                f"{' nor '.join(denied)}: ask its operator to add you to the OS group of the {role} tier "
                "(warehouse.endpoint_groups)")
        return None

    def _post(self, route: str, body: dict[str, Any]) -> tuple[str, bytes]:
        if self._follow:
            self._use(_served(self.path, self.endpoint_file))
        conn = http.client.HTTPConnection(self._host, self._port, timeout=CONNECT_TIMEOUT_S)
        try:
            try:
                conn.connect()
            except OSError as e:
                raise ClickHouseUnavailable(
                    f"the embedded ClickHouse at {self.path} is not being served: its owner does not answer at "
                    f"{self._host}:{self._port} ({e}); start the sink (handtrace sink run)") from None
            assert conn.sock is not None  # noqa: S101 -- connect() set it
            conn.sock.settimeout(self._timeout_s)
            payload = json.dumps(body).encode()
            conn.request("POST", route, payload, {"Authorization": f"Bearer {self._token}",
                                                  "Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as e:
            raise ClickHouseUnavailable(f"the query endpoint of {self.path} failed: {e}") from None
        finally:
            conn.close()
        if resp.status != 200:
            try:
                err = json.loads(data)
                kind, message = str(err.get("error")), str(err.get("message"))
            except ValueError:
                kind, message = "internal", data[:200].decode(errors="replace")
            if kind == "forbidden":
                raise Forbidden(message)
            if kind == "refused":
                raise StatementRefused(message)
            if kind == "audit":
                raise AuditFailed(message)
            if kind == "unauthorized":
                raise ClickHouseUnavailable(f"the query endpoint of {self.path} refused the token: {message}")
            raise RemoteError(message)
        return resp.getheader("Content-Type") or "", data

    def query(self, query: str, parameters: Any = None, **_settings: Any) -> RemoteResult:
        """Run a read statement; rows with the same Python values as a local client."""
        _, data = self._post("/v1/query", {"sql": query, "parameters": encode(parameters), "as": "rows"})
        body = json.loads(data)
        return RemoteResult(body["column_names"], [tuple(r) for r in decode(body["rows"])])

    def query_arrow(self, query: str, parameters: Any = None, **_settings: Any) -> pa.Table:
        """Run a read statement; the result as an Arrow table (Arrow IPC on the wire)."""
        _, data = self._post("/v1/query", {"sql": query, "parameters": encode(parameters), "as": "arrow"})
        with pa.ipc.open_stream(data) as r:
            return r.read_all()

    def command(self, cmd: str, parameters: Any = None, **_settings: Any) -> Any:
        """Run a read statement as clickhouse-connect's ``command`` (its value)."""
        _, data = self._post("/v1/query", {"sql": cmd, "parameters": encode(parameters), "as": "command"})
        body = json.loads(data)
        if "summary" in body:
            from clickhouse_connect.driver.summary import QuerySummary

            return QuerySummary(body["summary"])
        return decode(body["value"])

    def insert(self, table: str, data: Sequence[Sequence[Any]], column_names: Sequence[str] | str = "*",
               **_settings: Any) -> int:
        """Insert rows into one of :data:`WRITABLE`; returns the rows written."""
        if isinstance(column_names, str):
            raise StatementRefused("insert through the query endpoint needs the column names")
        rows = [list(r) for r in data]
        _, out = self._post("/v1/insert", {"table": table, "column_names": list(column_names),
                                           "rows": encode(rows)})
        return int(json.loads(out)["written_rows"])

    def sql(self, sql: str, *, role: str | None = None, purpose: str | None = None, actor: str | None = None,
            params: Mapping[str, str] | None = None) -> SqlAnswer:
        """Have the owner run ``sql`` under an access tier and audit it (``/v1/sql``). The role is
        this client's token's; with the admin token, ``role`` picks one. StatementRefused (the
        tier refused it), RemoteError (ClickHouse failed it), AuditFailed, Forbidden."""
        _, out = self._post("/v1/sql", {"sql": sql, "role": role, "purpose": purpose, "actor": actor,
                                        "params": dict(params or {}), "format": "rows"})
        body = json.loads(out)
        return SqlAnswer(body["column_names"], [tuple(r) for r in decode(body["rows"])], body["audit"])

    def whoami(self) -> dict[str, str]:
        """The role of this client's token and the OS user the owner sees on the connection."""
        _, out = self._post("/v1/whoami", {})
        return {str(k): str(v) for k, v in json.loads(out).items()}

    def erase(self, employee_key: str) -> dict[str, int]:
        """Have the owner delete every row of ``employee_key`` from its erasable tables (the
        fixed erase operation); returns the rows each table held."""
        _, out = self._post("/v1/erase", {"employee_key": employee_key})
        return {str(t): int(n) for t, n in json.loads(out)["rows_removed"].items()}

    def close(self) -> None:
        """Nothing to release (one connection per call)."""
