"""Run the sink as a service: open ClickHouse (the embedded engine is owned by this process),
migrate, consume until stopped."""

from __future__ import annotations

import signal
import threading

from prometheus_client import start_http_server

from handtrace.core import clickhouse
from handtrace.core.settings import Settings, load_settings
from handtrace.sink.writer import Sink


def open_sink(settings: Settings) -> Sink:
    """Connect to ClickHouse and build the sink (raises ClickHouseLocked with a clear message)."""
    return Sink(settings, clickhouse.connect(settings.clickhouse_dsn()))


def main() -> None:
    """Run until SIGTERM/SIGINT; then flush, commit and release the data dir."""
    settings = load_settings()
    sink = open_sink(settings)
    if settings.sink.metrics_port:
        start_http_server(settings.sink.metrics_port, addr=settings.metrics_host)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        sink.run(stop)
    finally:
        clickhouse.close(settings.clickhouse_dsn())
