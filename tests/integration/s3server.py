"""A real S3-compatible server for the frame-store tests: SeaweedFS (``weed server -s3``).

``weed`` is built once from the Go module proxy by ``deploy/seaweedfs.sh`` (``deploy/setup.sh``
runs it) and cached; a missing binary is a test failure that names the command to build it, never
a skip. The server (master + volume + filer + S3 gateway in one process) listens on loopback on
ports from the OS, keeps its data in a directory the caller owns (so a restart finds the objects
again) and authenticates requests with one access key that may do everything. It is started
through :func:`handtrace.core.procs.spawn_owned` (dies with the test process) and stopped with
SIGKILL: it ignores SIGTERM for many seconds (``-volume.preStopSeconds`` and friends), and the
tests want it gone at once anyway.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from handtrace.core.procs import spawn_owned
from tests.conftest import free_port

DEFAULT_SEAWEEDFS_VERSION = "v0.0.0-20261109003541-7506e5f91cd6"
"""The version deploy/seaweedfs.sh builds by default (tests/unit/test_framestore.py keeps them in step)."""
SEAWEEDFS_VERSION = os.environ.get("HANDTRACE_SEAWEEDFS_VERSION", DEFAULT_SEAWEEDFS_VERSION)

BUILD_COMMAND = "deploy/seaweedfs.sh   # or: make setup (needs Go; ~8 min the first time)"


def weed_binary() -> Path:
    """The cached ``weed`` binary, where deploy/seaweedfs.sh puts it."""
    cache = os.environ.get("HANDTRACE_CACHE") or str(
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "handtrace")
    return Path(cache) / f"seaweedfs-{SEAWEEDFS_VERSION}" / "weed"


def require_weed() -> Path:
    """The binary, or a test failure that says how to build it."""
    path = weed_binary()
    if not os.access(path, os.X_OK):
        pytest.fail(f"SeaweedFS (the S3 server the frame-store tests need) is not built: {path} is "
                    f"missing. Build it with:\n  {BUILD_COMMAND}", pytrace=False)
    return path


def rss_mb(pid: int) -> float:
    """Resident set size of a process in MB (from /proc; 0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class S3Server:
    """One ``weed server -s3`` process on loopback; :meth:`start` again after :meth:`kill` reuses
    the data dir and ports, so objects written before survive a restart."""

    data_dir: Path
    access_key: str = field(default_factory=lambda: "HT" + secrets.token_hex(8).upper())
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(30))
    region: str = "us-east-1"
    proc: subprocess.Popen[bytes] | None = None
    startup_s: float = 0.0
    ports: dict[str, int] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint URL (path-style addressing)."""
        return f"http://127.0.0.1:{self.ports['s3']}"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def log_tail(self, lines: int = 40) -> str:
        """The last lines the server wrote (for error messages)."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def client(self, **overrides: Any) -> Any:
        """A boto3 S3 client for this server (keys and endpoint overridable, e.g. wrong keys)."""
        import boto3
        from botocore.config import Config

        kw: dict[str, Any] = {
            "endpoint_url": self.endpoint, "region_name": self.region,
            "aws_access_key_id": self.access_key, "aws_secret_access_key": self.secret_key,
            "config": Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                             connect_timeout=2, read_timeout=10),
        }
        kw.update(overrides)
        return boto3.client("s3", **kw)

    def store_config(self, bucket: str, prefix: str = "", **overrides: Any) -> dict[str, Any]:
        """``store`` settings for this server: ``Settings(store=server.store_config(b))``, or
        the same keys as HANDTRACE_STORE__* variables. Few, quick retries (tests stay fast)."""
        cfg: dict[str, Any] = {
            "url": f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}",
            "s3_endpoint_url": self.endpoint, "s3_region": self.region,
            "s3_access_key_id": self.access_key, "s3_secret_access_key": self.secret_key,
            "s3_addressing_style": "path", "retries": 2, "retry_backoff_s": 0.05, "timeout_s": 5,
        }
        cfg.update(overrides)
        return cfg

    def fresh_bucket(self) -> str:
        """Create an empty bucket with a unique name and return its name."""
        name = f"ht-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def _argv(self, weed: Path) -> list[str]:
        p = self.ports
        identities = {"identities": [{
            "name": "handtrace-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(identities))
        config.chmod(0o600)
        # One volume per bucket (a bucket is a collection; the default grows 7 at once) and no
        # hold on the first volume allocation (meant for rebuilt production masters).
        (self.data_dir / "master.toml").write_text(
            '[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n'
            'allocation_deferral = "0s"\n')
        return [
            # Logs to stderr (our log file), not glog files in /tmp.
            str(weed), "-logtostderr", f"-config_dir={self.data_dir}", "server",
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.data_dir / 'data'}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            "-master.telemetry=false", "-master.electionTimeout=1s",
            "-master.volumeSizeLimitMB=16", "-master.volumePreallocate=false",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-volume.max=200", "-volume.preStopSeconds=0", "-volume.index=memory",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
            "-s3.autoCreateBucket=false",  # as AWS: a PUT into a missing bucket is NoSuchBucket
            f"-filer.localSocket={self._socket('filer')}", f"-s3.localSocket={self._socket('s3')}",
        ]

    def _socket(self, name: str) -> str:
        # Unix socket paths are limited to 108 bytes, too short for pytest's tmp dirs.
        return f"/tmp/seaweedfs-{name}-{self.ports[name]}.sock"  # noqa: S108

    def _remove_sockets(self) -> None:
        """weed leaves unix sockets in /tmp named by port (master/volume gRPC ones have no flag)."""
        for name, port in self.ports.items():
            kind = name.replace("_", "-")
            for path in (f"/tmp/seaweedfs-{kind}-{port}.sock", f"/tmp/seaweedfs-{name}-{port}.sock"):  # noqa: S108
                Path(path).unlink(missing_ok=True)

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server and wait until an authenticated S3 request succeeds."""
        weed = require_weed()
        (self.data_dir / "data").mkdir(parents=True, exist_ok=True)
        if not self.ports:
            taken: set[int] = set()
            for name in ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc",
                         "s3", "s3_grpc"):
                port = free_port()
                while port in taken:
                    port = free_port()
                taken.add(port)
                self.ports[name] = port
        log = open(self.log_path, "ab")  # noqa: SIM115 -- handed to the child
        t0 = time.monotonic()
        env = {**os.environ, "GOMAXPROCS": "2", "GOMEMLIMIT": "256MiB"}
        self.proc = spawn_owned(self._argv(weed), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=self.data_dir)
        log.close()
        # Short timeouts: a request that reaches the gateway before the volume server has
        # registered waits for it; better to ask again.
        from botocore.config import Config

        client = self.client(config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                           connect_timeout=1, read_timeout=2))
        last: Exception | None = None
        while time.monotonic() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited with {self.proc.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                # An authenticated write and read through the S3 gateway, the filer, the master
                # and a volume prove the whole chain is up (list_buckets answers before the volume
                # server has registered). One probe bucket: each bucket is a collection with its
                # own volumes.
                if "ht-ready" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
                    client.create_bucket(Bucket="ht-ready")
                client.put_object(Bucket="ht-ready", Key="ready", Body=b"ok")
                if client.get_object(Bucket="ht-ready", Key="ready")["Body"].read() != b"ok":
                    raise RuntimeError("probe object read back wrong")
                self.startup_s = time.monotonic() - t0
                return
            except Exception as e:  # noqa: BLE001 -- any failure means "not ready yet"
                last = e
                time.sleep(0.25)
        self.kill()
        raise RuntimeError(f"weed server not ready within {timeout_s:.0f}s (last error: {last!r}); "
                           f"log tail:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the server and reap it (idempotent)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        self.proc = None
        self._remove_sockets()

    def rss_mb(self) -> float:
        """The server's resident memory now, in MB."""
        return rss_mb(self.proc.pid) if self.proc is not None else 0.0
