"""The project's own single-node Apache Kafka broker (KRaft) on 127.0.0.1, for development,
the demo and the tests.

Provisioning resolves ``org.apache.kafka:kafka_2.13`` and its runtime dependencies from Maven
Central with ``mvn`` (deploy/kafka/pom.xml) into a per-user cache; start formats storage on first
use, launches the JVM in its own process group, records a pid file and waits until a real
metadata request succeeds; stop terminates the whole group (no orphans).

A broker started by a parent that owns it (the demo, the test fixtures: ``owned=True``, the
default) is tied to that parent's life: the JVM itself gets SIGKILL when the parent dies, even by
SIGKILL (core/procs.py). ``handtrace kafka up`` starts a detached broker on purpose (``owned=False``)
that runs until ``handtrace kafka down``.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handtrace.core.procs import run_owned, spawn_owned
from handtrace.core.resources import data_file

KAFKA_VERSION = "4.1.1"


class BrokerError(RuntimeError):
    """The local broker could not be provisioned, started or reached; the message says why."""


def cache_dir() -> Path:
    """Where provisioned jars are kept between runs (shared by every checkout of this user)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "handtrace" / f"kafka-{KAFKA_VERSION}"


def provision(echo: bool = True) -> Path:
    """Resolve the broker jars with Maven into the cache (once); return the libs directory."""
    libs = cache_dir() / "libs"
    if libs.is_dir() and any(libs.glob("kafka_2.13-*.jar")):
        return libs
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerError("`mvn` is not installed: run `make setup` (installs maven) or apt-get install maven")
    pom = data_file("deploy", "kafka", "pom.xml")
    libs.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="libs.", dir=libs.parent))
    if echo:
        print(f"provisioning Apache Kafka {KAFKA_VERSION} from Maven Central into {libs} ...", flush=True)
    cmd = [mvn, "-B", "-q", "-f", str(pom), "dependency:copy-dependencies",
           f"-DoutputDirectory={tmp}", "-DincludeScope=runtime", f"-Dkafka.version={KAFKA_VERSION}"]
    proc = run_owned(cmd)
    if proc.returncode != 0 or not any(tmp.glob("kafka_2.13-*.jar")):
        shutil.rmtree(tmp, ignore_errors=True)
        raise BrokerError(f"mvn could not resolve Kafka {KAFKA_VERSION}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    if libs.exists():
        shutil.rmtree(libs)
    tmp.rename(libs)
    return libs


_LOG4J = """\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {log}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = {level}
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = {level}
logger.state.name = state.change.logger
logger.state.level = warn
"""


@dataclass(frozen=True)
class LocalBroker:
    """One local broker: its data directory and ports; ``owned``: the JVM dies with the process
    that starts it (False: it runs detached until stopped)."""

    data_dir: Path
    port: int = 19092
    controller_port: int = 19093
    heap: str = "768m"
    owned: bool = True

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.data_dir / "broker.pid"

    @property
    def log_file(self) -> Path:
        return self.data_dir / "broker.log"

    def _properties(self) -> str:
        logs = self.data_dir / "logs"
        return "\n".join([
            "process.roles=broker,controller",
            "node.id=1",
            f"controller.quorum.voters=1@127.0.0.1:{self.controller_port}",
            f"listeners=PLAINTEXT://127.0.0.1:{self.port},CONTROLLER://127.0.0.1:{self.controller_port}",
            f"advertised.listeners=PLAINTEXT://127.0.0.1:{self.port}",
            "controller.listener.names=CONTROLLER",
            "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "inter.broker.listener.name=PLAINTEXT",
            f"log.dirs={logs}",
            "num.partitions=1",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=6",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "auto.create.topics.enable=false",
            "message.max.bytes=8388608",
            "log.retention.check.interval.ms=60000",
            "",
        ])

    def pid(self) -> int | None:
        """Pid of the running broker started from this data dir, if any."""
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        return pid if b"kafka.Kafka" in cmdline and str(self.data_dir).encode() in cmdline else None

    def _port_free(self, port: int) -> bool:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
        return True

    def start(self, timeout_s: float = 90.0, echo: bool = True) -> bool:
        """Start the broker unless it already runs; wait until it answers. True if started now."""
        if self.pid() is not None:
            self.wait_ready(timeout_s)
            return False
        java = shutil.which("java")
        if java is None:
            raise BrokerError(
                "`java` (17+) is not installed: run `make setup` or apt-get install openjdk-17-jre-headless"
            )
        for p in (self.port, self.controller_port):
            if not self._port_free(p):
                raise BrokerError(
                    f"port {p} on 127.0.0.1 is in use by another process; stop it or set "
                    "HANDTRACE_KAFKA__LOCAL_PORT / HANDTRACE_KAFKA__LOCAL_CONTROLLER_PORT")
        libs = provision(echo=echo)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        props = self.data_dir / "server.properties"
        props.write_text(self._properties())
        log4j = self.data_dir / "log4j2.properties"
        log4j.write_text(_LOG4J.format(log=self.log_file, level="INFO"))
        classpath = f"{libs}/*"
        jvm = [java, f"-Xmx{self.heap}", "-Xms128m", "-XX:+UseG1GC", "-Djava.awt.headless=true",
               f"-Dlog4j2.configurationFile={log4j}", "-cp", classpath]
        if not (self.data_dir / "logs" / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
            # `--cluster-id=ID`, not `-t ID`: a base64url id may start with "-", which argparse
            # would take for an option (1 start in 64 failed to format).
            fmt = run_owned([*jvm, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
                             f"--config={props}"])
            if fmt.returncode != 0:
                raise BrokerError(f"formatting Kafka storage failed:\n{fmt.stdout}{fmt.stderr}")
        out = open(self.data_dir / "broker.out", "ab")  # noqa: SIM115 -- handed to the child
        # The JVM is the direct child (no wrapper script), so with ``owned`` the parent-death
        # signal lands on the JVM itself and nothing is orphaned.
        argv = [*jvm, "kafka.Kafka", str(props)]
        io: dict[str, Any] = {"stdout": out, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL,
                              "start_new_session": True, "cwd": self.data_dir}
        proc = spawn_owned(argv, **io) if self.owned else subprocess.Popen(argv, **io)
        out.close()
        self.pid_file.write_text(str(proc.pid))
        try:
            self.wait_ready(timeout_s, proc=proc)
        except BrokerError:
            self.stop()
            raise
        return True

    def wait_ready(self, timeout_s: float = 90.0, proc: subprocess.Popen[Any] | None = None) -> None:
        """Block until a metadata request to the broker succeeds (or raise BrokerError)."""
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap, "log_level": 0})
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if proc is not None and proc.poll() is not None:
                raise BrokerError(f"the broker exited with {proc.returncode} while starting:\n{self.tail()}")
            try:
                md = admin.list_topics(timeout=2)
                if md.brokers:
                    return
            except Exception as e:  # noqa: BLE001 -- any failure means not ready yet
                last = e
            time.sleep(0.3)
        raise BrokerError(f"the broker did not answer a metadata request within {timeout_s:.0f}s "
                          f"({last}):\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        """Last lines of the broker's log, for error messages."""
        for f in (self.log_file, self.data_dir / "broker.out"):
            if f.exists():
                return "\n".join(f.read_text(errors="replace").splitlines()[-lines:])
        return "(no broker log)"

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Stop the broker and its process group; True if one was running."""
        pid = self.pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        try:
            pgid = os.getpgid(pid)
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pgid = None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)
        if self.pid() is not None and pgid is not None:
            os.killpg(pgid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.1)
        self.pid_file.unlink(missing_ok=True)
        return True


def main(argv: list[str] | None = None) -> int:
    """`python -m handtrace.core.localbroker up|down|status [--data-dir D] [--port P]`."""
    import argparse

    ap = argparse.ArgumentParser(prog="handtrace-broker", description=__doc__)
    ap.add_argument("action", choices=["provision", "up", "down", "status"])
    ap.add_argument("--data-dir", type=Path, default=Path(".handtrace/kafka"))
    ap.add_argument("--port", type=int, default=19092)
    ap.add_argument("--controller-port", type=int, default=19093)
    a = ap.parse_args(argv)
    b = LocalBroker(a.data_dir.resolve(), a.port, a.controller_port, owned=False)  # `up` detaches
    try:
        if a.action == "provision":
            print(provision())
        elif a.action == "up":
            started = b.start()
            print(f"kafka {'started' if started else 'already running'} at {b.bootstrap} (pid {b.pid()})")
        elif a.action == "down":
            print("kafka stopped" if b.stop() else "kafka was not running")
        else:
            pid = b.pid()
            print(f"kafka running at {b.bootstrap} (pid {pid})" if pid else "kafka not running")
            return 0 if pid else 1
    except BrokerError as e:
        print(f"error: {e}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
