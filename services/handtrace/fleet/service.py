"""Run the fleet exporter as a service: /metrics, heartbeats consumed until SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import signal
import threading

from prometheus_client import REGISTRY, start_http_server

from handtrace.core import clickhouse
from handtrace.core.settings import Settings, load_settings
from handtrace.fleet.exporter import FleetCollector, FleetExporter
from handtrace.fleet.store import fleet_dsn


def open_exporter(settings: Settings) -> FleetExporter:
    """Connect the heartbeat store (when enabled) and build the exporter; raises
    ClickHouseLocked with a clear message when an embedded dir is held by another process."""
    client = clickhouse.connect(fleet_dsn(settings)) if settings.fleet.store_heartbeats else None
    return FleetExporter(settings, client)


def main() -> None:
    """Run until SIGTERM/SIGINT; then flush, commit and release the data dir."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = load_settings()
    exporter = open_exporter(settings)
    REGISTRY.register(FleetCollector(exporter))
    if settings.fleet.metrics_port:
        start_http_server(settings.fleet.metrics_port, addr=settings.metrics_host)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        exporter.run(stop)
    finally:
        if settings.fleet.store_heartbeats:
            clickhouse.close(fleet_dsn(settings))
