"""One way to reach ClickHouse: a DSN. ``chdb:///dir`` opens the embedded engine (real
ClickHouse in this process); ``http(s)://`` reaches a server. Same client API either way.

Only one process may open an embedded data directory. We take an advisory lock first so the
second process gets a clear message naming the holder, not an engine stack trace.
"""

from __future__ import annotations

import fcntl
import os
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect


class ClickHouseLocked(RuntimeError):
    """The embedded data directory is open in another process."""


class ClickHouseUnavailable(RuntimeError):
    """ClickHouse could not be reached or opened."""


_clients: dict[str, Any] = {}
_locks: dict[str, int] = {}
_mutex = threading.Lock()


def embedded_path(dsn: str) -> Path | None:
    """The data dir of a ``chdb://`` DSN, else None."""
    if not dsn.startswith("chdb://"):
        return None
    return Path(urlparse(dsn).path or dsn[len("chdb://"):])


def _holder(lock_file: Path) -> str:
    try:
        pid = int(lock_file.read_text().strip())
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return f"process {pid} ({cmd.strip()[:120]})"
    except (OSError, ValueError):
        return "another process"


def _lock(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    lock_file = path / "handtrace.lock"
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ClickHouseLocked(
            f"the embedded ClickHouse data dir {path} is open in {_holder(lock_file)}. "
            "Only one process may open it: stop that process (e.g. the sink or the demo) and "
            "retry, or point HANDTRACE_CLICKHOUSE__DSN at a ClickHouse server."
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    _locks[str(path)] = fd


def _normalise(dsn: str) -> str:
    path = embedded_path(dsn)
    return f"chdb://{path.resolve()}" if path is not None else dsn


def connect(dsn: str) -> Any:
    """A clickhouse-connect client for ``dsn`` (one per DSN per process)."""
    key = _normalise(dsn)
    with _mutex:
        if key in _clients:
            return _clients[key]
        path = embedded_path(key)
        if path is not None:
            _lock(path)
        try:
            client = clickhouse_connect.get_client(dsn=key)
        except Exception as e:
            if path is not None:
                os.close(_locks.pop(str(path)))
            raise ClickHouseUnavailable(f"cannot open ClickHouse at {key}: {e}") from e
        _clients[key] = client
        return client


def close(dsn: str) -> None:
    """Close the client for ``dsn`` and release the embedded lock."""
    key = _normalise(dsn)
    with _mutex:
        client = _clients.pop(key, None)
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001,S110 -- closing a dead client is fine
                pass
        path = embedded_path(key)
        if path is not None:
            fd = _locks.pop(str(path), None)
            if fd is not None:
                os.close(fd)


def reader(dsn: str) -> Any:
    """A client that only reads (and records through ``insert`` into ``chserve.WRITABLE``); it
    never takes the embedded lock. A server DSN: the normal client. ``chdb://``: a
    ``chserve.RemoteClient`` to the process that owns the dir, or ClickHouseUnavailable when no
    process serves it."""
    path = embedded_path(dsn)
    if path is None:
        return connect(dsn)
    from handtrace.core.chserve import RemoteClient

    return RemoteClient.for_dir(path.resolve())


def open_for_cli(dsn: str) -> Any:
    """For commands that only read or record: the owner's endpoint when the embedded dir is
    served, else the dir opened by this process (``connect``; ClickHouseLocked if another
    process holds it without serving it)."""
    path = embedded_path(dsn)
    if path is not None and _normalise(dsn) not in _clients:
        from handtrace.core.chserve import RemoteClient, endpoint_of

        try:
            endpoint = endpoint_of(path.resolve())
        except ClickHouseUnavailable:
            endpoint = None  # left by a dead owner: the dir is free unless someone else holds it
        if endpoint is not None:
            return RemoteClient(path.resolve(), endpoint, follow=True)
    return connect(dsn)


def opened_here(dsn: str) -> bool:
    """True when this process has the embedded dir of ``dsn`` open (it owns it)."""
    return _normalise(dsn) in _clients


def is_remote(client: Any) -> bool:
    """True for a client that reaches an embedded dir through its owner (no DDL through it)."""
    from handtrace.core.chserve import RemoteClient

    return isinstance(client, RemoteClient)
