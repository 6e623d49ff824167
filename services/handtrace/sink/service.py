"""Run the sink as a service: open ClickHouse (the embedded engine is owned by this process),
migrate, consume until stopped.

Stopping (issue #10, class 8): SIGTERM/SIGINT set the stop event, which every wait of the sink
watches (insert retries, the ledger, dead-letter sends, keep-alive polls); what is held is
flushed if ClickHouse takes it at once. A deadline of ``sink.stop_grace_s`` backs this up for
calls that cannot be interrupted (an insert or a Kafka close against a server that does not
answer): the process then exits without committing anything more -- exactly what a crash does,
which the ledger replays exactly once on the next start (tests/integration/test_sink_sigkill.py).

Demonstrations (issue #11) are written by a second thread of the same process, the
``DemoWriter`` (sink/demonstrations.py), with its own consumer group and its own ClickHouse client
(on the embedded engine: a second client of this process's engine, which holds the data dir's
lock). One process, so ``python -m handtrace.sink`` keeps owning the embedded data dir alone. The
two share the stop event; if either dies, the other is stopped and the process exits non-zero (a
supervisor restarts both; each replays what it had not committed).

The control-plane audit trail (issue #13) is a third thread the same way: the ``AuditWriter``
(sink/audit.py), group ``sink.audit_group_id``, into ``control_audit``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

import clickhouse_connect
from prometheus_client import start_http_server

from handtrace.core import chserve, clickhouse
from handtrace.core.framestore import open_store
from handtrace.core.settings import Settings, load_settings
from handtrace.sink.assignment import SinkConfigError
from handtrace.sink.audit import AuditWriter
from handtrace.sink.demonstrations import DemoWriter
from handtrace.sink.writer import Sink

log = logging.getLogger("handtrace.sink")


def open_sink(settings: Settings) -> Sink:
    """Connect to ClickHouse and build the sink (raises ClickHouseLocked with a clear message)."""
    return Sink(settings, clickhouse.connect(settings.clickhouse_dsn()))


def demo_client(settings: Settings) -> Any:
    """A ClickHouse client of the demonstration writer's own (a client is not shared between
    threads). For the embedded engine, call after ``clickhouse.connect`` (which takes the data
    dir's lock for this process)."""
    dsn = settings.clickhouse_dsn()
    path = clickhouse.embedded_path(dsn)
    return clickhouse_connect.get_client(dsn=f"chdb://{path.resolve()}" if path is not None else dsn)


def open_demo_writer(settings: Settings, client: Any) -> DemoWriter:
    """The demonstration writer on ``client`` and the configured frame store."""
    return DemoWriter.on_clickhouse(settings, client, open_store(settings))


def serve_queries(settings: Settings, stop: threading.Event) -> chserve.Server | None:
    """Serve the embedded data dir this process owns to other processes (``handtrace query``,
    the dataset CLI, the API) until ``stop``; None for a ClickHouse server, which serves itself."""
    dsn = settings.clickhouse_dsn()
    if clickhouse.embedded_path(dsn) is None:
        return None
    from handtrace.sink.schema import ERASABLE

    return chserve.serve(dsn, stop, erasable=ERASABLE, database=settings.clickhouse.database,
                         k_anonymity=settings.warehouse.k_anonymity,
                         endpoint_groups={str(r): g for r, g in settings.warehouse.endpoint_groups.items()})


def _exit_after(grace_s: float) -> None:
    """Exit the process ``grace_s`` from now unless it has exited by then."""
    def expire() -> None:
        sys.stderr.write(f"handtrace sink: not stopped {grace_s:.0f}s after the signal; exiting now "
                         "(unfinished flushes are replayed from the ledger on the next start)\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(grace_s, expire)
    timer.daemon = True
    timer.start()


def install_stop_handlers(stop: threading.Event, grace_s: float) -> None:
    """SIGTERM/SIGINT: set ``stop`` and arm the exit deadline (once)."""
    def on_signal(signum: int, _frame: FrameType | None) -> None:
        if not stop.is_set():
            stop.set()
            _exit_after(grace_s)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def main() -> None:
    """Run until SIGTERM/SIGINT; then flush, commit and release the data dir (within
    ``sink.stop_grace_s``)."""
    settings = load_settings()
    if clickhouse.embedded_path(settings.clickhouse_dsn()) is not None:  # before anything is opened
        chserve.group_ids({str(r): g for r, g in settings.warehouse.endpoint_groups.items()})
    stop = threading.Event()
    install_stop_handlers(stop, settings.sink.stop_grace_s)
    sink = open_sink(settings)
    client = demo_client(settings)
    demo = open_demo_writer(settings, client)
    if settings.sink.metrics_port:
        start_http_server(settings.sink.metrics_port, addr=settings.metrics_host)
    audit_client = demo_client(settings)
    audit = AuditWriter.on_clickhouse(settings, audit_client)
    # the embedded dir is this process's alone: serve it to the CLI and the API meanwhile
    server = serve_queries(settings, stop)
    failed: list[BaseException] = []

    def thread(name: str, run: Callable[[threading.Event], None]) -> threading.Thread:
        def target() -> None:
            try:
                run(stop)
            except BaseException as e:  # noqa: BLE001 -- reported below; the events sink stops too
                log.exception("%s writer failed; stopping the sink", name)
                failed.append(e)
                stop.set()

        th = threading.Thread(target=target, name=name, daemon=True)
        th.start()
        return th

    threads = [thread("demonstrations", demo.run), thread("audit", audit.run)]
    config_error: SinkConfigError | None = None
    try:
        sink.run(stop)
    except SinkConfigError as e:  # e.g. sink.partitions the topic lacks: nothing was consumed
        config_error = e
    finally:
        stop.set()
        deadline = time.monotonic() + settings.sink.stop_grace_s
        for th in threads:
            th.join(max(deadline - time.monotonic(), 0.1))
        try:
            if server is not None:
                server.stop()
            client.close()
            audit_client.close()
        finally:
            clickhouse.close(settings.clickhouse_dsn())
    if config_error is not None:
        sys.stderr.write(f"handtrace sink: {config_error}\n")
        sys.exit(2)
    if failed:
        sys.exit(1)
