"""The durable frame store: demonstration images, content-addressed, behind one setting.

``store.url`` picks the backend: ``file:///path`` (a local directory: the embedded default, like
chdb) or ``s3://bucket/prefix`` (any S3-compatible service). Both implement :class:`FrameStore`.

Keys are laid out so that one person's frames can be found and deleted by prefix::

    frames/<employee pseudonym>/<sha256[:2]>/<sha256>.<png|webp>

The name is the SHA-256 of the bytes, so a write is idempotent (the same key always holds the
same bytes) and a replay after a crash rewrites nothing new.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from handtrace.core.settings import Settings

_PSEUDONYM = re.compile(r"^[A-Za-z0-9_-]{1,128}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
FORMATS = ("png", "webp")


class StoreError(RuntimeError):
    """An object operation failed after its retries; the message names the key and the cause."""


def frame_key(employee_key: str, sha256_hex: str, fmt: str) -> str:
    """The object key of one frame of one person (see the module docstring)."""
    if not _PSEUDONYM.fullmatch(employee_key):
        raise ValueError(f"not a pseudonym: {employee_key!r}")
    if not _SHA256.fullmatch(sha256_hex):
        raise ValueError(f"not a lowercase hex sha256: {sha256_hex!r}")
    if fmt not in FORMATS:
        raise ValueError(f"frame format must be one of {FORMATS}, got {fmt!r}")
    return f"frames/{employee_key}/{sha256_hex[:2]}/{sha256_hex}.{fmt}"


def person_prefix(employee_key: str) -> str:
    """The prefix under which every frame of one person lives (erasure, subject access)."""
    if not _PSEUDONYM.fullmatch(employee_key):
        raise ValueError(f"not a pseudonym: {employee_key!r}")
    return f"frames/{employee_key}/"


class FrameStore(Protocol):
    """What every backend offers. Keys are ``/``-separated relative paths (no ``..``)."""

    url: str

    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` under ``key`` durably and atomically (a reader sees all or nothing);
        overwriting with the same bytes is harmless. Raises :class:`StoreError`."""
        ...

    def get(self, key: str) -> bytes:
        """The bytes under ``key``; KeyError when there is none."""
        ...

    def exists(self, key: str) -> bool:
        """Whether ``key`` holds an object."""
        ...

    def delete(self, key: str) -> bool:
        """Remove ``key``; returns whether it existed."""
        ...

    def list(self, prefix: str) -> Iterator[str]:
        """Every key starting with ``prefix``, in no particular order."""
        ...

    def delete_prefix(self, prefix: str) -> int:
        """Remove every key under ``prefix``; returns how many were removed."""
        ...


def _check_key(key: str) -> None:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid object key {key!r}")


class LocalStore:
    """A directory on local disk. Writes go to a temporary file, are fsynced and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.resolve()}"

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            raise StoreError(f"writing {key} to {self.url}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise KeyError(key) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            return False
        return True

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # a temporary file of a write in progress
                rel = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                if rel.startswith(prefix):
                    yield rel

    def delete_prefix(self, prefix: str) -> int:
        return sum(self.delete(k) for k in list(self.list(prefix)))


def open_store(settings: Settings) -> FrameStore:
    """The store ``settings.store.url`` names (default: ``file://<state_dir>/frames``)."""
    url = settings.store.url or f"file://{(settings.state_dir / 'frames').resolve()}"
    if url.startswith("file://"):
        return LocalStore(Path(url[len("file://"):]))
    raise ValueError(f"store.url {url!r}: expected file:///path or s3://bucket/prefix")
