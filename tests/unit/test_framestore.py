"""The frame store without a server: LocalStore's contract (atomic, idempotent writes; keys that
cannot leave the root), the key layout, the store URL, and S3Store's retry policy driven by a
stub client (the S3 wire itself is tested against real SeaweedFS in
tests/integration/test_framestore_backends.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.core import framestore
from handtrace.core.framestore import (
    LocalStore,
    S3Store,
    StoreError,
    frame_key,
    open_store,
    parse_store_url,
    person_prefix,
)
from handtrace.core.settings import Settings

SHA = hashlib.sha256(b"frame").hexdigest()


# -- key layout ---------------------------------------------------------------------------------


def test_frame_key_layout() -> None:
    assert frame_key("p_1-A", SHA, "png") == f"frames/p_1-A/{SHA[:2]}/{SHA}.png"
    assert frame_key("p", SHA, "webp").startswith(person_prefix("p"))


@pytest.mark.parametrize("person", ["", "a/b", "..", "a b", "é", "x" * 129, "a\x00"])
def test_frame_key_refuses_a_non_pseudonym(person: str) -> None:
    with pytest.raises(ValueError, match="pseudonym"):
        frame_key(person, SHA, "png")
    with pytest.raises(ValueError, match="pseudonym"):
        person_prefix(person)


@pytest.mark.parametrize("sha", ["", SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, "../" + SHA[3:]])
def test_frame_key_refuses_a_non_sha256(sha: str) -> None:
    with pytest.raises(ValueError, match="sha256"):
        frame_key("p", sha, "png")


@pytest.mark.parametrize("fmt", ["", "PNG", "jpeg", "png/..", "webp "])
def test_frame_key_refuses_other_formats(fmt: str) -> None:
    with pytest.raises(ValueError, match="format"):
        frame_key("p", SHA, fmt)


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=140))
def test_person_prefix_is_a_directory_of_exactly_that_person(person: str) -> None:
    """No pseudonym's prefix is a prefix of another's keys (``alice/`` never matches ``alice-2``)."""
    try:
        prefix = person_prefix(person)
    except ValueError:
        return
    assert prefix == f"frames/{person}/" and "/" not in person and ".." not in prefix


# -- LocalStore -----------------------------------------------------------------------------------


def test_local_put_get_exists_delete_idempotent(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    key = frame_key("p", SHA, "png")
    assert not s.exists(key)
    with pytest.raises(KeyError):
        s.get(key)
    s.put(key, b"frame")
    s.put(key, b"frame")  # the same content-addressed write again: harmless
    assert s.get(key) == b"frame" and s.exists(key)
    assert list(s.list("")) == [key]
    assert s.delete(key) is True and s.delete(key) is False
    assert not s.exists(key)


def test_local_directories_are_not_objects(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    s.put("frames/p/aa/x.png", b"x")
    assert not s.exists("frames/p")
    with pytest.raises(KeyError):
        s.get("frames/p")
    assert s.delete("frames/p") is False
    with pytest.raises(KeyError):
        s.get("frames/p/aa/x.png/deeper")  # a path through a file


def test_local_put_is_atomic_when_the_write_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails before its rename leaves the old object (or none) and no partial file."""
    s = LocalStore(tmp_path)
    s.put("frames/p/aa/old.png", b"old")

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(framestore.os, "replace", broken_replace)
    with pytest.raises(StoreError, match=r"frames/p/aa/new\.png.*No space left"):
        s.put("frames/p/aa/new.png", b"new")
    with pytest.raises(StoreError):
        s.put("frames/p/aa/old.png", b"changed")
    monkeypatch.undo()
    assert not s.exists("frames/p/aa/new.png")
    assert s.get("frames/p/aa/old.png") == b"old"
    assert sorted(p.name for p in (tmp_path / "frames/p/aa").iterdir()) == ["old.png"]


def test_local_temp_files_of_writes_in_progress_are_never_listed(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    s.put("frames/p/aa/done.png", b"x")
    (tmp_path / "frames/p/aa/.half.png.123.abc.tmp").write_bytes(b"partial")  # a killed writer's
    assert list(s.list("frames/")) == ["frames/p/aa/done.png"]
    assert s.delete_prefix("frames/p/") == 1
    with pytest.raises(ValueError):
        s.get("frames/p/aa/.half.png.123.abc.tmp")  # not addressable as a key either


def test_local_concurrent_writers_of_one_key(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    data = os.urandom(200_000)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for _ in range(20):
                s.put("frames/p/aa/k.png", data)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert s.get("frames/p/aa/k.png") == data
    assert os.listdir(tmp_path / "frames/p/aa") == ["k.png"]


def test_local_disk_failure_is_a_store_error(tmp_path: Path) -> None:
    (tmp_path / "frames").write_bytes(b"a file where a directory should be")
    with pytest.raises(StoreError, match="frames/p/aa/k.png"):
        LocalStore(tmp_path).put("frames/p/aa/k.png", b"x")


def test_local_list_and_delete_prefix(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    alice = [frame_key("alice", hashlib.sha256(bytes([i])).hexdigest(), "png") for i in range(6)]
    alice2 = [frame_key("alice-2", SHA, "webp")]
    for k in alice + alice2:
        s.put(k, k.encode())
    assert sorted(s.list(person_prefix("alice"))) == sorted(alice)
    assert sorted(s.list("frames/alice")) == sorted(alice + alice2)  # a plain string prefix
    assert list(s.list("frames/nobody/")) == []
    assert s.delete_prefix(person_prefix("alice")) == 6
    assert sorted(s.list("")) == alice2
    assert list(LocalStore(tmp_path / "missing").list("")) == []


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../../b", "..", "a//b", "a/", "./a", "a/.x",
                                 "a\x00b"])
def test_local_invalid_keys(tmp_path: Path, key: str) -> None:
    s = LocalStore(tmp_path)
    for op in (lambda: s.put(key, b"x"), lambda: s.get(key), lambda: s.exists(key), lambda: s.delete(key)):
        with pytest.raises(ValueError):
            op()
    assert list(tmp_path.iterdir()) == []


_PART = st.sampled_from(["", ".", "..", "...", "a", ".a", "b.", "~", "\\", "..\\..", " ", "%2e%2e", "\x00"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_PART, min_size=1, max_size=6), st.booleans())
def test_no_key_escapes_the_root(tmp_path_factory: pytest.TempPathFactory, parts: list[str], absolute: bool) -> None:
    """Whatever the key, a write either is refused (ValueError) or lands inside the root."""
    key = ("/" if absolute else "") + "/".join(parts)
    base = tmp_path_factory.mktemp("escape")
    root = base / "root"
    s = LocalStore(root)
    try:
        s.put(key, b"x")
    except ValueError:
        assert not any(p.is_file() for p in base.rglob("*"))
        return
    written = [p for p in base.rglob("*") if p.is_file()]
    assert len(written) == 1
    assert written[0].resolve().is_relative_to(root.resolve())
    assert list(s.list("")) == [key]


# -- store.url ------------------------------------------------------------------------------------


def _settings(tmp_path: Path, **store: Any) -> Settings:
    return Settings(state_dir=tmp_path, store=store)


def test_open_store_default_is_a_directory_under_state_dir(tmp_path: Path) -> None:
    s = open_store(_settings(tmp_path))
    assert isinstance(s, LocalStore) and s.root == (tmp_path / "frames").resolve()


@pytest.mark.parametrize(("url", "parsed"), [
    ("file:///var/lib/handtrace/frames", ("file", "/var/lib/handtrace/frames", "")),
    ("file://localhost/srv/f", ("file", "/srv/f", "")),
    ("s3://frames-bucket", ("s3", "frames-bucket", "")),
    ("s3://frames-bucket/", ("s3", "frames-bucket", "")),
    ("s3://frames.example.com/prod/handtrace/", ("s3", "frames.example.com", "prod/handtrace")),
])
def test_store_url_forms(url: str, parsed: tuple[str, str, str]) -> None:
    assert parse_store_url(url) == parsed


@pytest.mark.parametrize(("url", "message"), [
    ("file://relative/path", "absolute"),
    ("file:relative", "absolute"),
    ("file:///a/../etc", r"\.\."),
    ("/abs/path", "unknown scheme"),
    ("frames", "unknown scheme"),
    ("gs://bucket", "unknown scheme 'gs'"),
    ("http://minio:9000/bucket", "unknown scheme 'http'"),
    ("s3://", "missing bucket"),
    ("s3:///prefix", "missing bucket"),
    ("s3://Upper_Case", "not a valid bucket"),
    ("s3://ab", "not a valid bucket"),
    ("s3://b..c", "not a valid bucket"),
    ("s3://bucket/a//b", "invalid key prefix"),
    ("s3://bucket/a/../b", "invalid key prefix"),
    ("s3://bucket/p?versionId=1", "query"),
])
def test_store_url_errors_say_what_is_wrong(tmp_path: Path, url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as e:
        open_store(_settings(tmp_path, url=url))
    assert "store.url" in str(e.value)


def test_open_store_s3_uses_the_s3_settings(tmp_path: Path) -> None:
    s = open_store(_settings(tmp_path, url="s3://frames-bucket/prod", s3_endpoint_url="http://127.0.0.1:1",
                             s3_access_key_id="AK", s3_secret_access_key="SK",  # noqa: S106
                             s3_addressing_style="path",
                             s3_region="eu-central-1", retries=7))
    assert isinstance(s, S3Store)
    assert (s.bucket, s.prefix, s.retries) == ("frames-bucket", "prod/", 7)
    assert (s.url, s.endpoint_url) == ("s3://frames-bucket/prod", "http://127.0.0.1:1")
    cfg = s._client.meta.config
    assert cfg.s3 == {"addressing_style": "path"} and cfg.region_name == "eu-central-1"
    assert cfg.retries["total_max_attempts"] == 1  # our retries, not botocore's on top


def test_the_file_store_never_imports_boto3(tmp_path: Path) -> None:
    """The agent opens no S3 store and ships without boto3: the import must be lazy."""
    code = ("import sys; from pathlib import Path; from handtrace.core.settings import Settings; "
            "from handtrace.core.framestore import open_store; "
            f"open_store(Settings(state_dir=Path({str(tmp_path)!r}))).put('a/b', b'x'); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('boto3', 'botocore')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.stdout.strip() == "[]"


# -- S3Store's retry policy (stub client; the wire is tested against SeaweedFS) --------------------


def _client_error(status: int, code: str) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} says no"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


class _Flaky:
    """put_object fails with the given errors in turn, then succeeds."""

    def __init__(self, *errors: Exception) -> None:
        self.errors, self.calls = list(errors), 0

    def put_object(self, **kw: Any) -> dict[str, Any]:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return {}


def _store(client: Any, retries: int = 3) -> tuple[S3Store, list[float]]:
    sleeps: list[float] = []
    s = S3Store("b", "p", endpoint_url="http://127.0.0.1:1", access_key_id="a", secret_access_key="s",  # noqa: S106
                retries=retries, retry_backoff_s=0.1, sleep=sleeps.append)
    s._client = client
    return s, sleeps


def test_transient_errors_are_retried_with_growing_backoff() -> None:
    from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

    client = _Flaky(_client_error(503, "SlowDown"), EndpointConnectionError(endpoint_url="http://x"),
                    ReadTimeoutError(endpoint_url="http://x"), )
    s, sleeps = _store(client)
    s.put("frames/p/aa/k.png", b"x")
    assert client.calls == 4 and len(sleeps) == 3
    for n, slept in enumerate(sleeps):  # 0.1 * 2**n, with jitter in [50 %, 100 %]
        assert 0.05 * 2 ** n <= slept <= 0.1 * 2 ** n


def test_retries_exhausted_name_the_key_and_cause() -> None:
    client = _Flaky(*[_client_error(500, "InternalError")] * 10)
    s, sleeps = _store(client, retries=2)
    with pytest.raises(StoreError, match=r"writing frames/p/aa/k\.png .*InternalError.*after 3 attempts"):
        s.put("frames/p/aa/k.png", b"x")
    assert client.calls == 3 and len(sleeps) == 2


@pytest.mark.parametrize(("status", "code"), [(403, "AccessDenied"), (403, "SignatureDoesNotMatch"),
                                              (404, "NoSuchBucket"), (400, "InvalidRequest")])
def test_permanent_errors_fail_at_once(status: int, code: str) -> None:
    client = _Flaky(_client_error(status, code))
    s, sleeps = _store(client)
    with pytest.raises(StoreError, match=f"{code}.*not retried"):
        s.put("frames/p/aa/k.png", b"x")
    assert client.calls == 1 and sleeps == []


def test_throttling_by_code_is_transient_even_as_a_4xx() -> None:
    client = _Flaky(_client_error(429, "TooManyRequests"), _client_error(400, "RequestTimeout"))
    s, sleeps = _store(client)
    s.put("frames/p/aa/k.png", b"x")
    assert client.calls == 3 and len(sleeps) == 2


def test_the_s3_test_server_is_the_version_setup_builds() -> None:
    """deploy/seaweedfs.sh builds and caches one version; the fixture must look for that one."""
    import re

    from tests.integration.s3server import DEFAULT_SEAWEEDFS_VERSION

    script = (Path(__file__).resolve().parents[2] / "deploy" / "seaweedfs.sh").read_text()
    m = re.search(r'VERSION="\$\{HANDTRACE_SEAWEEDFS_VERSION:-([^}]+)\}"', script)
    assert m is not None and m.group(1) == DEFAULT_SEAWEEDFS_VERSION


def test_a_missing_seaweedfs_binary_fails_with_the_build_command(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Never a skip: the S3 tests fail and say how to build the server."""
    from tests.integration.s3server import require_weed

    monkeypatch.setenv("HANDTRACE_CACHE", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match=r"deploy/seaweedfs\.sh"):
        require_weed()
