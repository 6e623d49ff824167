"""Fixtures for integration tests: the real Kafka broker (started here, or an existing cluster
named by HANDTRACE_TEST_BOOTSTRAP), the real embedded ClickHouse engine, a real Faust worker
subprocess. A missing service is a test failure with a clear message, never a skip."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from handtrace.control.publish import control_record, device_record, publish, publish_device
from handtrace.core import clickhouse
from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import BrokerError, LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.producer import producer_config
from handtrace.core.settings import Settings, settings_env
from handtrace.core.signing import Signer, device_signer, public_key_b64
from handtrace.core.topics import Topics
from handtrace.sink.writer import Sink
from tests.conftest import free_port
from tests.factories import TEST_POLICY
from tests.xvfb import WindowFactory, XvfbServer, open_windows, xvfb_server

# The integration marker is applied by path in tests/conftest.py (pytestmark here would not be).


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Bootstrap servers of a real broker: HANDTRACE_TEST_BOOTSTRAP, or our own on free ports."""
    external = os.environ.get("HANDTRACE_TEST_BOOTSTRAP")
    if external:
        from confluent_kafka.admin import AdminClient

        try:
            AdminClient({"bootstrap.servers": external}).list_topics(timeout=15)
        except Exception as e:  # noqa: BLE001
            pytest.fail(f"HANDTRACE_TEST_BOOTSTRAP={external} is not reachable: {e}")
        yield external
        return
    # Ports come from the OS; another process may grab one before the JVM binds it, so a
    # start that fails is retried once on fresh ports before the tests fail.
    errors = []
    for _attempt in range(2):
        port = free_port()
        broker = LocalBroker(tmp_path_factory.mktemp("kafka"), port,
                             next(p for p in iter(free_port, None) if p != port))
        try:
            broker.start(timeout_s=120, echo=False)
            break
        except BrokerError as e:
            errors.append(str(e))
    else:
        pytest.fail("could not start the real Kafka broker for integration tests:\n" + "\n---\n".join(errors))
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


@pytest.fixture
def settings_factory(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., Settings]]:
    """Settings with a unique topic prefix, consumer groups and state dir per test. At teardown
    the embedded engine of each is closed (a no-op when the test closed it): chdb holds one data
    path per process, so a test that failed before its own close would make every later test
    fail to open its own."""
    made: list[Settings] = []

    def make(**overrides: Any) -> Settings:
        tag = uuid.uuid4().hex[:10]
        base: dict[str, Any] = {
            "state_dir": tmp_path / f"state-{tag}",
            # Development mode: the control-plane key pair is generated once under the test's
            # state dir; publish() signs with it and the worker (same state dir) verifies with it.
            "dev_mode": True,
            "kafka": {"bootstrap_servers": kafka_bootstrap},
            "topics": {"prefix": f"t{tag}", "partitions": 3},
            "stream": {"app_id": f"stream-{tag}", "metrics_port": free_port(),
                       "pseudonym_key": "test-key-" + "k" * 32, "log_level": "info"},
            "sink": {"group_id": f"sink-{tag}", "flush_interval_s": 0.5, "metrics_port": 0},
        }
        for k, v in overrides.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
        s = Settings(**base)
        ensure_topics(s.kafka, s.topics, retention=s.warehouse.retention)
        made.append(s)
        return s

    yield make
    for s in made:
        clickhouse.close(s.clickhouse_dsn())


class StreamWorker:
    """A real Faust worker subprocess for one test (owned: it dies with the test process)."""

    module = "handtrace.stream"

    def __init__(self, settings: Settings, log: Path) -> None:
        self.settings = settings
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")},
               **settings_env(self.settings)}
        with open(self.log, "ab") as out:
            # Owned: killed by the kernel if the test run dies by SIGKILL (core/procs.py).
            self.proc = spawn_owned([sys.executable, "-m", self.module], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-40:]) if self.log.exists() else ""


def publish_policy(s: Settings, policy: dict[str, Any]) -> None:
    """Publish a global policy, signed by the control plane's (development) key (workers read
    the policy topic to its end before enforcing)."""
    publish(s, control_record("policy_update", employee_id=None, actor="test", role="ops", policy=policy))


def enroll_device(s: Settings, employee: str, device: str) -> Signer:
    """Enroll a new device key for ``employee`` (signed by the control plane); its signer signs
    that employee's own pauses as the agent's shipper does."""
    key = Ed25519PrivateKey.generate()
    publish_device(s, device_record(employee, device, public_key_b64(key), actor="it-test"))
    return device_signer(device, key)


@pytest.fixture
def stream_worker(tmp_path: Path) -> Iterator[Callable[..., StreamWorker]]:
    """Factory: start a Faust worker for given settings, after publishing ``policy`` (default: the
    policy that allows tests/factories.py events; None: publish nothing). Stopped at teardown."""
    workers: list[StreamWorker] = []
    published: set[str] = set()

    def start(s: Settings, policy: dict[str, Any] | None = TEST_POLICY) -> StreamWorker:
        if policy is not None and s.topics.prefix not in published:
            publish_policy(s, policy)
            published.add(s.topics.prefix)
        w = StreamWorker(s, tmp_path / f"worker-{len(workers)}.log")
        w.start()
        workers.append(w)
        return w

    yield start
    for w in workers:
        w.stop()


class RunningSink:
    """The sink in a thread of this process (it owns the embedded ClickHouse dir)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.sink = Sink(settings, clickhouse.connect(settings.clickhouse_dsn()))
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sink.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "sink did not stop"


@pytest.fixture
def api_client() -> Iterator[Callable[[Settings], TestClient]]:
    """The control-plane API on the real services (signed records on the real broker), as a
    TestClient whose app is started and shut down (its consumers closed) around the test."""
    from handtrace.control.api.app import create_app
    from handtrace.control.api.services import kafka_services

    with contextlib.ExitStack() as stack:
        yield lambda s: stack.enter_context(TestClient(create_app(s, kafka_services(s))))


@pytest.fixture
def sink_factory() -> Iterator[Callable[[Settings], RunningSink]]:
    """Factory: run a sink for given settings; stopped (and ClickHouse closed) at teardown."""
    sinks: list[RunningSink] = []

    def start(s: Settings) -> RunningSink:
        r = RunningSink(s)
        sinks.append(r)
        return r

    yield start
    for r in sinks:
        r.stop()
    for r in sinks:
        clickhouse.close(r.settings.clickhouse_dsn())


def producer(s: Settings) -> Producer:
    """An idempotent producer like the agent's."""
    return Producer(producer_config(s.kafka, **{"compression.type": "zstd", "linger.ms": 10}))


def stream_metric(s: Settings, sample: str) -> float:
    """The value of one sample (name with labels, as exposed) of the worker's /metrics: 0.0 when
    absent, -1.0 when the endpoint cannot be reached (not up yet)."""
    import re
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.stream.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    except OSError:
        return -1.0
    m = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def topic_messages(conf: dict[str, Any], topic: str, timeout_s: float = 60) -> list[Any]:
    """Every message of ``topic`` from the beginning to its end (confluent Messages), read with
    the client options ``conf``; fails the test when the end is not reached in ``timeout_s``."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer({**conf, "group.id": f"check-{uuid.uuid4().hex[:8]}", "enable.partition.eof": True,
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        out: list[Any] = []
        eof: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while len(eof) < len(parts) and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None:
                continue
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    eof.add(m.partition())
                    continue
                pytest.fail(str(m.error()))
            out.append(m)
    finally:
        c.close()
    if len(eof) < len(parts):
        pytest.fail(f"{topic} not read to its end in {timeout_s:g} s ({len(out)} messages so far)")
    return out


def topic_records(bootstrap: str, topic: str) -> list[bytes]:
    """The values of every message of ``topic`` (see topic_messages)."""
    return [m.value() for m in topic_messages({"bootstrap.servers": bootstrap}, topic)]


def run_sink_until(sink: Sink, done: Callable[[], bool], timeout: float = 90) -> BaseException | None:
    """Run ``sink`` in a thread until ``done()`` or it raises (a simulated crash); returns what
    it raised. Fails the test if it does not stop afterwards."""
    stop = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            sink.run(stop)
        except BaseException as e:  # noqa: BLE001 -- the simulated crash ends the thread
            failure.append(e)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    wait_for(lambda: bool(failure) or done(), timeout, "the sink to finish or crash")
    stop.set()
    th.join(30)
    assert not th.is_alive(), "the sink did not stop"
    return failure[0] if failure else None


def start_sink_process(s: Settings, log: Path) -> subprocess.Popen[bytes]:
    """``python -m handtrace.sink`` for ``s`` as an owned child (dies with the test), output to ``log``."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s)}
    with open(log, "ab") as out:
        return spawn_owned([sys.executable, "-m", "handtrace.sink"], env=env, stdout=out,
                           stderr=subprocess.STDOUT, start_new_session=True)


def kill_sink_mid_stream(s: Settings, log: Path, rounds: int, pause_s: Callable[[int], float]) -> int:
    """Start the sink process and SIGKILL it once it has made progress (after ``pause_s(kills)``
    more seconds: somewhere in a flush), up to ``rounds`` times or until the accepted topic is
    consumed; returns how many times it was killed."""
    import signal

    from handtrace.core.admin import group_lag

    stored_topic = Topics.from_settings(s.topics).stored
    kills = 0
    for _ in range(rounds):
        before = group_lag(s.kafka, s.sink.group_id, stored_topic)
        if before == 0:
            break
        proc = start_sink_process(s, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and group_lag(s.kafka, s.sink.group_id, stored_topic) >= before:
            time.sleep(0.05)
        time.sleep(pause_s(kills))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        kills += 1
    return kills


def wait_for(
    predicate: Callable[[], bool], timeout_s: float, what: str, on_fail: Callable[[], str] = lambda: ""
) -> None:
    """Poll until ``predicate`` holds; fail the test with ``what`` after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{on_fail()}")


def topics_of(s: Settings) -> Topics:
    return Topics.from_settings(s.topics)


class FleetExporterProcess(StreamWorker):
    """The fleet exporter (`python -m handtrace.fleet`) as a subprocess for one test: it opens
    its own embedded ClickHouse dir (<state_dir>/clickhouse-fleet), so the sink can run too."""

    module = "handtrace.fleet"


@pytest.fixture
def fleet_exporter(tmp_path: Path) -> Iterator[Callable[[Settings], FleetExporterProcess]]:
    """Factory: start a fleet exporter for given settings; stopped (SIGTERM, then kill) at teardown."""
    exporters: list[FleetExporterProcess] = []

    def start(s: Settings) -> FleetExporterProcess:
        e = FleetExporterProcess(s, tmp_path / f"fleet-{len(exporters)}.log")
        e.start()
        exporters.append(e)
        return e

    yield start
    for e in exporters:
        e.stop()


# ---------------------------------------------------------------- brokers that go away, X servers


def start_outage_broker(broker: LocalBroker) -> None:
    """Start (or restart, same ports and data) a dedicated broker; a failure fails the test."""
    try:
        broker.start(timeout_s=120, echo=False)
    except BrokerError as e:
        pytest.fail(f"the dedicated Kafka broker for an outage test did not start: {e}")


@pytest.fixture(scope="module")
def outage_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    """A broker of the module's own on fixed free ports, so a test can stop and restart it (an
    outage) with its address and data kept; the session broker is never touched."""
    port = free_port()
    broker = LocalBroker(tmp_path_factory.mktemp("outage-kafka"), port,
                         next(p for p in iter(free_port, None) if p != port))
    start_outage_broker(broker)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def xvfb() -> Iterator[XvfbServer]:
    """A fresh Xvfb (1280x800x24) for one test."""
    with xvfb_server() as server:
        yield server


@pytest.fixture
def windows(xvfb: XvfbServer) -> Iterator[WindowFactory]:
    """Opens real windows on the test's Xvfb; closes them at the end."""
    with open_windows(xvfb) as make:
        yield make


# --- the frame store's real S3 server (issue #11) -------------------------------------------

@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real SeaweedFS S3 server on loopback (tests/integration/s3server.py): ``.endpoint``,
    ``.access_key``, ``.secret_key``, ``.region``, ``.fresh_bucket()`` (a new empty bucket's name),
    ``.store_config(bucket, prefix="")`` (the ``store`` settings for it), ``.client()`` (boto3);
    fails (never skips) when the ``weed`` binary is not built."""
    from tests.integration.s3server import S3Server, require_weed

    require_weed()
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
    except RuntimeError as e:
        pytest.fail(f"could not start SeaweedFS for the frame-store tests: {e}", pytrace=False)
    try:
        yield server
    finally:
        server.kill()


# ---------------------------------------------------------------- the portal in a real browser
# (test_portal_browser*.py; each module defines its own ``services`` fixture)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium through Playwright (tests/browser.py: fails loudly when missing)."""
    from tests.browser import chromium

    with chromium() as b:
        yield b


@pytest.fixture
def base_url(services: Any) -> Iterator[str]:
    """The portal over the module's ``services``, served by uvicorn on a loopback port."""
    from tests.browser import live_server
    from tests.portal_support import portal_app

    with live_server(portal_app(services)) as url:
        yield url


@pytest.fixture
def open_as(browser: Any, base_url: str) -> Iterator[Any]:
    """``open_as(cookie, path="/", javascript=True)`` -> a signed-in page (tests/browser.py)."""
    from tests.browser import signed_in_pages

    with signed_in_pages(browser, base_url) as open_:
        yield open_
