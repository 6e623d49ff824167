"""The frame store's contract, the same test for every backend: a local directory and a real
S3-compatible server (SeaweedFS, started by the ``s3_server`` fixture; no mocks), plus what only
a network store can do wrong: refuse our keys, go away, come back (issue #11, deliverable 5)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from handtrace.core.framestore import FrameStore, LocalStore, S3Store, StoreError, frame_key, open_store, person_prefix
from handtrace.core.settings import Settings
from tests.integration.s3server import S3Server

pytestmark = pytest.mark.timeout(240)


def s3_settings(server: Any, url: str, state_dir: Path, **store: Any) -> Settings:
    """Settings that point store.url at ``url`` on the test server (overridable per field)."""
    return Settings(state_dir=state_dir, store={**server.store_config("unused"), "url": url, **store})


@pytest.fixture(params=["local", "s3", "s3-prefix"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FrameStore]:
    """The same contract over every backend, each opened through ``open_store`` from its URL."""
    if request.param == "local":
        s = open_store(Settings(state_dir=tmp_path, store={"url": f"file://{tmp_path / 'frames'}"}))
        assert isinstance(s, LocalStore)
    else:
        server = request.getfixturevalue("s3_server")
        bucket = server.fresh_bucket()
        url = f"s3://{bucket}/tenant-a/frames" if request.param == "s3-prefix" else f"s3://{bucket}"
        s = open_store(s3_settings(server, url, tmp_path))
        assert isinstance(s, S3Store)
    yield s


def frame(i: int, person: str = "p-1") -> tuple[str, bytes]:
    data = f"frame {i}".encode() * 3
    return frame_key(person, hashlib.sha256(data).hexdigest(), "png"), data


def test_put_get_exists_delete(store: FrameStore) -> None:
    key, data = frame(1)
    assert not store.exists(key)
    with pytest.raises(KeyError):
        store.get(key)
    store.put(key, data)
    assert store.exists(key)
    assert store.get(key) == data
    store.put(key, data)  # idempotent: the same content-addressed write again
    assert store.get(key) == data
    assert list(store.list("frames/")) == [key]
    assert store.delete(key) is True
    assert store.delete(key) is False
    assert not store.exists(key)
    with pytest.raises(KeyError):
        store.get(key)
    assert list(store.list("")) == []


def test_a_key_prefix_is_not_an_object(store: FrameStore) -> None:
    """SeaweedFS keeps keys as filer paths: its directories must not look like objects."""
    store.put("frames/p-1/aa/x.png", b"x")
    for d in ("frames", "frames/p-1", "frames/p-1/aa"):
        assert not store.exists(d)
        with pytest.raises(KeyError):
            store.get(d)
        assert store.delete(d) is False
    assert store.get("frames/p-1/aa/x.png") == b"x"
    assert list(store.list("")) == ["frames/p-1/aa/x.png"]


def test_binary_and_empty_objects_round_trip(store: FrameStore) -> None:
    blob = bytes(range(256)) * 1000  # a realistic frame size (256 kB), every byte value
    store.put("frames/p-1/aa/blob.png", blob)
    store.put("frames/p-1/aa/empty.png", b"")
    assert store.get("frames/p-1/aa/blob.png") == blob
    assert store.get("frames/p-1/aa/empty.png") == b""


def test_list_and_delete_prefix_by_person(store: FrameStore) -> None:
    mine = [frame(i, "alice")[0] for i in range(5)]
    theirs = [frame(i, "alice-2")[0] for i in range(3)]  # a pseudonym that extends another
    for k in mine + theirs:
        store.put(k, b"x")
    assert sorted(store.list(person_prefix("alice"))) == sorted(mine)
    assert sorted(store.list("frames/")) == sorted(mine + theirs)
    assert store.delete_prefix(person_prefix("alice")) == 5
    assert list(store.list(person_prefix("alice"))) == []
    assert sorted(store.list("frames/")) == sorted(theirs)
    assert all(store.exists(k) for k in theirs)
    assert store.delete_prefix(person_prefix("alice")) == 0


def test_pagination_over_a_thousand_keys(store: FrameStore) -> None:
    """1,100 objects: S3 lists and deletes at most 1,000 per request, so both must paginate."""
    keys = [frame(i, "bulk")[0] for i in range(1100)]
    t0 = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # boto3 clients are thread-safe; 1,100 serial PUTs are slow
        list(pool.map(lambda k: store.put(k, b"."), keys))
    put_s = time.monotonic() - t0
    listed = list(store.list(person_prefix("bulk")))
    assert len(listed) == 1100 and set(listed) == set(keys), put_s
    assert store.delete_prefix(person_prefix("bulk")) == 1100
    assert list(store.list(person_prefix("bulk"))) == []


def test_invalid_keys_are_refused_before_any_request(store: FrameStore) -> None:
    for bad in ("", "/abs", "a/../b", "a//b", "../x", "a/./b", "a/.hidden"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")
    assert list(store.list("")) == []


# -- what only a network store can get wrong ---------------------------------------------------


def test_wrong_credentials_fail_at_once_with_a_clear_error(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.fresh_bucket()
    s = open_store(s3_settings(s3_server, f"s3://{bucket}", tmp_path, s3_secret_access_key="wrong" * 8,
                               retries=5, retry_backoff_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(StoreError) as e:
        s.put(frame(1)[0], b"x")
    assert time.monotonic() - t0 < 3, "a permanent error must not be retried"
    msg = str(e.value)
    assert frame(1)[0] in msg and "not retried" in msg
    assert "SignatureDoesNotMatch" in msg or "AccessDenied" in msg or "InvalidAccessKeyId" in msg, msg


def test_missing_bucket_fails_at_once(s3_server: Any, tmp_path: Path) -> None:
    s = open_store(s3_settings(s3_server, "s3://no-such-bucket-ht", tmp_path, retries=5, retry_backoff_s=1.0))
    t0 = time.monotonic()
    with pytest.raises(StoreError, match="NoSuchBucket"):
        s.put(frame(1)[0], b"x")
    assert time.monotonic() - t0 < 3


def test_server_down_exhausts_retries_in_bounded_time_then_recovers(tmp_path: Path) -> None:
    """Own server (the session one must not die): objects written before a SIGKILL survive it;
    while it is down a put fails with StoreError after its retries, in bounded time; after the
    restart (same data dir) the retried put succeeds."""
    server = S3Server(tmp_path / "weed")
    server.start()
    try:
        bucket = server.fresh_bucket()
        s = open_store(s3_settings(server, f"s3://{bucket}/p", tmp_path, retries=3, retry_backoff_s=0.1,
                                   timeout_s=2))
        before = {frame(i)[0]: frame(i)[1] for i in range(20)}
        for k, v in before.items():
            s.put(k, v)
        server.kill()

        key, data = frame(99)
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            s.put(key, data)
        took = time.monotonic() - t0
        assert key in str(e.value) and "gave up after 4 attempts" in str(e.value), str(e.value)
        # 4 refused connections + backoffs of at most 0.1+0.2+0.4 s: well under the bound
        assert took < 4 * 2 + 0.7 + 1, took

        server.start()
        put_retry(s, key, data)
        assert s.get(key) == data
        assert {k: s.get(k) for k in before} == before
        assert sorted(s.list("frames/")) == sorted([*before, key])
    finally:
        server.kill()


def put_retry(s: FrameStore, key: str, data: bytes, deadline_s: float = 30) -> None:
    """What a caller does with a StoreError: try again later (the sink holds the demonstration)."""
    end = time.monotonic() + deadline_s
    while True:
        try:
            s.put(key, data)
            return
        except StoreError:
            if time.monotonic() > end:
                raise
            time.sleep(0.5)


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "handtrace.cli", *args], capture_output=True, text=True,
                          timeout=60, cwd=cwd, env={**os.environ, **env, "COLUMNS": "200"})


def test_cli_store_check_and_ls_against_s3(s3_server: Any, tmp_path: Path) -> None:
    bucket = s3_server.fresh_bucket()
    env = {"HANDTRACE_STATE_DIR": str(tmp_path), "HANDTRACE_STORE__URL": f"s3://{bucket}/ops",
           "HANDTRACE_STORE__S3_ENDPOINT_URL": s3_server.endpoint,
           "HANDTRACE_STORE__S3_ACCESS_KEY_ID": s3_server.access_key,
           "HANDTRACE_STORE__S3_SECRET_ACCESS_KEY": s3_server.secret_key,
           "HANDTRACE_STORE__S3_ADDRESSING_STYLE": "path", "HANDTRACE_STORE__RETRIES": "1"}
    ok = _cli(["store", "check"], env, tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert f"s3://{bucket}/ops at {s3_server.endpoint}: put " in ok.stdout and " ms" in ok.stdout, ok.stdout
    s = open_store(s3_settings(s3_server, f"s3://{bucket}/ops", tmp_path))
    assert list(s.list("")) == [], "the probe object must be deleted"
    keys = sorted(frame(i, "p-9")[0] for i in range(3))
    for k in keys:
        s.put(k, b"x")
    ls = _cli(["store", "ls", person_prefix("p-9")], env, tmp_path)
    assert ls.returncode == 0, ls.stderr
    assert sorted(ls.stdout.split()) == keys and "3 keys" in ls.stderr
    bad = _cli(["store", "check"], {**env, "HANDTRACE_STORE__S3_SECRET_ACCESS_KEY": "wrong" * 8}, tmp_path)
    assert bad.returncode == 1 and "frame store check failed" in bad.stderr and "not retried" in bad.stderr, bad.stderr


def test_list_dated_gives_every_key_with_its_time(store: FrameStore) -> None:
    """Retention (core/retention.py) needs each object's age: same keys as ``list``, times of now."""
    keys = [frame(i, "dated")[0] for i in range(4)]
    before = time.time() - 120  # clocks of the server and this host may differ a little
    for k in keys:
        store.put(k, b"x")
    dated = dict(store.list_dated(person_prefix("dated")))  # type: ignore[attr-defined]
    assert set(dated) == set(keys) == set(store.list(person_prefix("dated")))
    assert all(before <= t <= time.time() + 120 for t in dated.values()), dated
