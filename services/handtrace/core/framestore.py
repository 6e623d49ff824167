"""The durable frame store: demonstration images, content-addressed, behind one setting.

``store.url`` picks the backend: ``file:///abs/path`` (a local directory: the embedded default,
like chdb) or ``s3://bucket`` / ``s3://bucket/prefix`` (any S3-compatible service; boto3 is
imported only then, the agent never needs it). Both implement :class:`FrameStore`.

Keys are laid out so that one person's frames can be found and deleted by prefix::

    frames/<employee pseudonym>/<sha256[:2]>/<sha256>.<png|webp>

The name is the SHA-256 of the bytes, so a write is idempotent (the same key always holds the
same bytes) and a replay after a crash rewrites nothing new.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import os
import random
import re
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from handtrace.core.settings import Settings, StoreSettings

T = TypeVar("T")

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
    """Keys are relative ``/``-paths of non-empty parts; a part may not start with ``.`` (that
    excludes ``.``/``..`` and keeps the names temporary files use) and no NUL byte."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\x00" in key or any(not p or p.startswith(".") for p in parts):
        raise ValueError(f"invalid object key {key!r}")


def _check_prefix(prefix: str) -> None:
    """A listing prefix: empty, or a key's beginning (its directory parts valid as in a key)."""
    if prefix:
        _check_key(prefix.rstrip("/") or ".")
        if prefix.endswith("//"):
            raise ValueError(f"invalid prefix {prefix!r}")


class LocalStore:
    """A directory on local disk. Writes go to a temporary file, are fsynced and renamed, so a
    reader sees the old object, or the whole new one; temporary files (``.``-names) are never
    listed."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.url = f"file://{self.root.resolve()}"

    def _path(self, key: str) -> Path:
        _check_key(key)
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        # Unique per writer (process *and* thread), so concurrent writers of one key never share
        # a temporary file; the last rename wins, and both wrote the same bytes.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
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
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError(f"writing {key} to {self.url}: {e}") from e

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise KeyError(key) from None
        except OSError as e:
            raise StoreError(f"reading {key} from {self.url}: {e}") from e

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            return False
        except IsADirectoryError:
            return False
        except OSError as e:
            raise StoreError(f"deleting {key} from {self.url}: {e}") from e
        return True

    def list(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        # Walk only below the prefix's directory part, not the whole store.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # a temporary file of a write in progress
                rel = os.path.relpath(os.path.join(dirpath, name), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    yield rel

    def delete_prefix(self, prefix: str) -> int:
        return sum(self.delete(k) for k in list(self.list(prefix)))

    def list_dated(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, last modified as epoch seconds) under ``prefix`` (retention; core/retention.py)."""
        for key in self.list(prefix):
            try:
                yield key, self._path(key).stat().st_mtime
            except FileNotFoundError:
                continue  # deleted meanwhile


# S3 error codes that are worth asking again (besides any 5xx): throttling and timeouts.
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "TooManyRequests",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestThrottled", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "PriorRequestNotComplete",
    "BandwidthLimitExceeded", "EC2ThrottledException",
})
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_BACKOFF_CAP_S = 10.0
_DELETE_BATCH = 1000  # the S3 DeleteObjects limit


class S3Store:
    """A bucket (and optional key prefix) of any S3-compatible service.

    Each operation is tried once plus up to ``retries`` times on transient failures (connection
    errors, timeouts, 5xx, throttling) with exponential backoff and jitter; then
    :class:`StoreError` names the key and the cause. Permanent failures (AccessDenied, a wrong
    key, NoSuchBucket, any other 4xx) raise at once. botocore's own retries are off, so the time an
    operation can take is bounded by ``(retries + 1) * timeout + backoffs``.
    """

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 region: str = "us-east-1", access_key_id: str | None = None,
                 secret_access_key: str | None = None, addressing_style: str = "auto",
                 retries: int = 5, timeout_s: float = 30.0, retry_backoff_s: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        import boto3
        import botocore.exceptions
        from botocore.config import Config

        if prefix and not prefix.endswith("/"):
            prefix += "/"
        self.bucket, self.prefix = bucket, prefix
        self.url = f"s3://{bucket}/{prefix.rstrip('/')}" if prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url
        # Error messages name the endpoint too: a bucket name alone is ambiguous across servers.
        self._where = f"{self.url} ({endpoint_url})" if endpoint_url else self.url
        self.retries, self.retry_backoff_s, self._sleep = retries, retry_backoff_s, sleep
        self._exc = botocore.exceptions
        config = Config(
            region_name=region, connect_timeout=min(timeout_s, 10.0), read_timeout=timeout_s,
            retries={"total_max_attempts": 1, "mode": "standard"},  # we retry, with our bounds
            s3={"addressing_style": addressing_style},
            # Checksums only where S3 requires them: many S3-compatible servers reject the
            # trailing CRC checksums botocore >= 1.36 sends by default; Content-MD5 is sent instead.
            request_checksum_calculation="when_required", response_checksum_validation="when_required",
        )
        self._client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key, config=config)

    # -- retry machinery ------------------------------------------------------------------

    def _transient(self, e: BaseException) -> bool:
        exc = self._exc
        if isinstance(e, exc.ClientError):
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            code = str(e.response.get("Error", {}).get("Code", ""))
            return status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES
        return isinstance(e, (exc.ConnectionError, exc.HTTPClientError))

    def _describe(self, e: BaseException) -> str:
        if isinstance(e, self._exc.ClientError):
            err = e.response.get("Error", {})
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            return f"{err.get('Code', '?')} (HTTP {status}): {err.get('Message') or e}"
        return f"{type(e).__name__}: {e}"

    def _call(self, what: str, key: str, fn: Callable[[], T],
              ok: Callable[[BaseException], T | None] | None = None) -> T:
        """Run ``fn`` with retries; ``ok`` may turn an error into a result (e.g. 404 -> False)."""
        attempt = 0
        while True:
            try:
                return fn()
            except (self._exc.BotoCoreError, self._exc.ClientError) as e:
                if ok is not None and (handled := ok(e)) is not None:
                    return handled
                if isinstance(e, self._exc.NoCredentialsError):
                    raise StoreError(f"{what} {key} at {self._where}: no S3 credentials (set "
                                     "store.s3_access_key_id/s3_secret_access_key or the AWS "
                                     "credential chain)") from e
                if not self._transient(e):
                    raise StoreError(f"{what} {key} at {self._where}: {self._describe(e)} "
                                     "(not retried)") from e
                if attempt >= self.retries:
                    raise StoreError(f"{what} {key} at {self._where}: {self._describe(e)} "
                                     f"(gave up after {attempt + 1} attempts)") from e
                delay = min(_BACKOFF_CAP_S, self.retry_backoff_s * 2 ** attempt)
                self._sleep(delay * (0.5 + random.random() / 2))  # noqa: S311 -- jitter, not crypto
                attempt += 1

    def _is_not_found(self, e: BaseException) -> bool:
        if not isinstance(e, self._exc.ClientError):
            return False
        code = str(e.response.get("Error", {}).get("Code", ""))
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code in _NOT_FOUND_CODES or (status == 404 and code != "NoSuchBucket")

    # -- FrameStore -------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        _check_key(key)
        # Content-MD5 lets the server refuse a body damaged in transit; a PUT replaces the
        # object atomically, and the same key always gets the same bytes (content-addressed).
        md5 = base64.b64encode(hashlib.md5(data, usedforsecurity=False).digest()).decode()
        self._call("writing", key, lambda: self._client.put_object(
            Bucket=self.bucket, Key=self.prefix + key, Body=data, ContentMD5=md5))

    def get(self, key: str) -> bytes:
        _check_key(key)

        def read() -> bytes:
            body: bytes = self._client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()
            return body

        def missing(e: BaseException) -> bytes | None:
            if self._is_not_found(e):
                raise KeyError(key) from None
            return None

        return self._call("reading", key, read, missing)

    def exists(self, key: str) -> bool:
        _check_key(key)

        def head() -> bool:
            self._client.head_object(Bucket=self.bucket, Key=self.prefix + key)
            return True

        return self._call("checking", key, head, lambda e: False if self._is_not_found(e) else None)

    def delete(self, key: str) -> bool:
        _check_key(key)
        # S3 DELETE succeeds whether or not the key existed; ask first to report which.
        existed = self.exists(key)
        if existed:
            self._call("deleting", key, lambda: self._client.delete_object(
                Bucket=self.bucket, Key=self.prefix + key))
        return existed

    def _pages(self, prefix: str) -> Iterator[list[dict[str, Any]]]:
        """The objects (``Key`` in full, ``LastModified``, ...) under ``prefix``, one page (<= 1000)
        at a time, each page call retried."""
        token: str | None = None
        while True:
            kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": self.prefix + prefix}
            if token:
                kw["ContinuationToken"] = token
            page: dict[str, Any] = self._call("listing", prefix or "(all)",
                                              functools.partial(self._client.list_objects_v2, **kw))
            yield list(page.get("Contents", []))
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise StoreError(f"listing {prefix} at {self._where}: truncated page without a "
                                 "continuation token")

    def list(self, prefix: str) -> Iterator[str]:
        _check_prefix(prefix)
        n = len(self.prefix)
        for page in self._pages(prefix):
            yield from (o["Key"][n:] for o in page)

    def list_dated(self, prefix: str) -> Iterator[tuple[str, float]]:
        """(key, LastModified as epoch seconds) under ``prefix`` (retention; core/retention.py)."""
        _check_prefix(prefix)
        n = len(self.prefix)
        for page in self._pages(prefix):
            yield from ((o["Key"][n:], o["LastModified"].timestamp()) for o in page)

    def delete_prefix(self, prefix: str) -> int:
        _check_prefix(prefix)
        # Collect first, then delete: deleting while paginating can skip keys on some servers.
        keys = [o["Key"] for page in self._pages(prefix) for o in page]
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i:i + _DELETE_BATCH]
            resp: dict[str, Any] = self._call(
                "deleting", f"{len(batch)} keys under {prefix}", functools.partial(
                    self._client.delete_objects, Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}))
            if errors := resp.get("Errors"):
                first = errors[0]
                raise StoreError(f"deleting under {prefix} at {self._where}: {len(errors)} keys failed, "
                                 f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}")
        return len(keys)


_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_store_url(url: str) -> tuple[str, str, str]:
    """Split a ``store.url`` into ``("file", abs_path, "")`` or ``("s3", bucket, prefix)``
    (prefix without slashes at the ends, may be empty). ValueError says what is wrong."""
    where = f"store.url {url!r}"
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if parts.query or parts.fragment:
        raise ValueError(f"{where}: no query or fragment allowed")
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"{where}: the path must be absolute, file:///abs/path (got host "
                             f"{parts.netloc!r}: a relative path?)")
        if not parts.path.startswith("/"):
            raise ValueError(f"{where}: the path must be absolute, file:///abs/path")
        if any(p in (".", "..") for p in parts.path.split("/")):
            raise ValueError(f"{where}: the path may not contain . or .. parts")
        return "file", parts.path, ""
    if parts.scheme == "s3":
        bucket = parts.netloc
        if not bucket:
            raise ValueError(f"{where}: missing bucket, expected s3://bucket or s3://bucket/prefix")
        if not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise ValueError(f"{where}: {bucket!r} is not a valid bucket name (3-63 of a-z 0-9 . -)")
        prefix = parts.path.strip("/")
        if prefix:
            try:
                _check_key(prefix)
            except ValueError:
                raise ValueError(f"{where}: invalid key prefix {prefix!r} (empty, . or .. parts)") from None
        return "s3", bucket, prefix
    raise ValueError(f"{where}: unknown scheme {parts.scheme or '(none)'!r}; expected file:///abs/path, "
                     "s3://bucket or s3://bucket/prefix")


def s3_store(bucket: str, prefix: str, cfg: StoreSettings) -> S3Store:
    """An :class:`S3Store` configured by ``store.*``."""
    secret = cfg.s3_secret_access_key.get_secret_value() if cfg.s3_secret_access_key else None
    return S3Store(bucket, prefix, endpoint_url=cfg.s3_endpoint_url, region=cfg.s3_region,
                   access_key_id=cfg.s3_access_key_id, secret_access_key=secret,
                   addressing_style=cfg.s3_addressing_style, retries=cfg.retries,
                   timeout_s=cfg.timeout_s, retry_backoff_s=cfg.retry_backoff_s)


def open_store(settings: Settings) -> FrameStore:
    """The store ``settings.store.url`` names (default: ``file://<state_dir>/frames``).

    ``file:///abs/path`` -> :class:`LocalStore`; ``s3://bucket[/prefix]`` -> :class:`S3Store`
    (keys under the prefix). Anything else (a relative path, no bucket, another scheme) is a
    ValueError that says what is wrong. Opening touches nothing: errors of access show on use
    (``handtrace store check`` tries a write).
    """
    url = settings.store.url or f"file://{(settings.state_dir / 'frames').resolve()}"
    kind, where, prefix = parse_store_url(url)
    if kind == "file":
        return LocalStore(Path(where))
    return s3_store(where, prefix, settings.store)
