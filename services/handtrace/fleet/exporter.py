"""The fleet exporter: heartbeats -> bounded-cardinality Prometheus metrics (+ ClickHouse rows).

One consumer group reads the heartbeats topic. Each heartbeat is folded into FleetState, which
turns cumulative counters into per-interval rates; the rates are observed in fleet histograms
(metrics.py) and the heartbeat with its rates is buffered for the ``heartbeats`` table. Offsets
are committed only after the buffered rows were inserted (at-least-once; the table is a
ReplacingMergeTree keyed by heartbeat id, so a replay stores nothing twice). While ClickHouse is
unavailable the partitions are paused (backpressure), never a crash loop.

Two side threads fill gaps the stream and sink cannot report about themselves: the committed
lag of the stream, sink and fleet consumer groups read from the brokers, and the sampling rates
of the policy in force read from the (compacted) policy topic.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from handtrace.core.admin import group_lag
from handtrace.core.cluster import layout_of
from handtrace.core.codec import DecodeError, decode_record
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics
from handtrace.fleet import metrics as m
from handtrace.fleet.energy import EnergyModel
from handtrace.fleet.state import AGENT_STATES, FleetState, Observation
from handtrace.fleet.store import COLUMNS, heartbeat_row, migrate

log = logging.getLogger("handtrace.fleet")

SHUTDOWN_BUDGET_S = 4.0
"""Seconds from SIGTERM to exit, whatever the broker does: within a 10 s grace period
(Kubernetes' default is 30 s) with room for the flush and closing ClickHouse."""
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(t: datetime) -> int:
    """Microseconds since the epoch, exactly (no float rounding)."""
    d = t - _EPOCH
    return (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds


class FleetExporter:
    """Consumes heartbeats until stopped; see the module docstring. ``client``: a
    clickhouse-connect client for the heartbeats table, or None to store nothing."""

    def __init__(self, settings: Settings, client: Any | None = None) -> None:
        self.settings = settings
        self.topics = Topics.from_settings(settings.topics)
        fs = settings.fleet
        self.state = FleetState(EnergyModel.from_settings(fs), fs.max_label_values)
        self.lock = threading.Lock()
        self.client = client
        self.database = settings.clickhouse.database
        if client is not None:
            migrate(client, self.database, settings.warehouse.retention, layout_of(settings.clickhouse))
        self.rows: list[list[Any]] = []
        self.lag: dict[str, int] = {}
        self.lag_failed: dict[str, bool] = {}
        self.policy_version = 0
        self.sampling: dict[str, float] = {}
        self.applied = 0

    # --- heartbeats ------------------------------------------------------------------------

    def handle(self, payload: bytes, received_s: float) -> Observation | None:
        """Decode, fold in, record metrics and buffer the row for one heartbeat message."""
        try:
            hb = decode_record(payload, "heartbeat")
        except DecodeError:
            m.HEARTBEATS.labels("invalid").inc()
            return None
        for key in ("sent_at_us", "agent_started_at_us"):  # fastavro gives logical timestamps
            if isinstance(hb[key], datetime):
                hb[key] = _micros(hb[key])
        with self.lock:
            obs = self.state.observe(hb, received_s)
        m.HEARTBEATS.labels(obs.outcome).inc()
        for label in obs.overflowed:
            m.LABEL_OVERFLOW.labels(label).inc()
        if obs.outcome == "stale":
            return obs
        self._record(hb, obs)
        if self.client is not None:
            self.rows.append(heartbeat_row(hb, obs, received_s))
        return obs

    def _record(self, hb: dict[str, Any], obs: Observation) -> None:
        lv = obs.labels.values()
        m.RSS.labels(*lv).observe(hb["rss_bytes"])
        m.SPOOL_BYTES.labels(*lv).observe(hb["spool_depth_bytes"])
        if obs.outcome == "restart":
            m.RESTARTS.labels(*lv).inc()
        iv = obs.interval
        if iv is None:
            return
        self.applied += 1
        m.UPLOAD_BYTES.labels(*lv).inc(iv.wire_bytes)
        m.PAYLOAD_BYTES.labels(*lv).inc(iv.payload_bytes)
        m.AGENT_SECONDS.labels(*lv).inc(iv.seconds)
        m.CPU_SECONDS.labels(*lv).inc(iv.cpu_seconds)
        m.ENERGY.labels(*lv).inc(iv.joules)
        m.RADIO_WAKEUPS.labels(*lv).inc(iv.radio_wakeups)
        m.EVENTS.labels(*lv, "captured").inc(iv.events_captured)
        m.EVENTS.labels(*lv, "sent").inc(iv.events_sent)
        for reason, n in iv.dropped.items():
            with self.lock:
                label, overflow = self.state.reason_guard(reason)
            if overflow:
                m.LABEL_OVERFLOW.labels("reason").inc()
            m.EVENTS_DROPPED.labels(label).inc(n)
        if iv.seconds <= 0:
            return
        m.CPU_PERCENT.labels(*lv).observe(iv.cpu_percent)
        m.UPLOAD_RATE.labels(*lv).observe(iv.upload_bytes_per_hour)
        if iv.agent_drain_percent_per_hour is not None:
            m.AGENT_DRAIN.labels(*lv).observe(iv.agent_drain_percent_per_hour)
        if iv.device_drain_percent_per_hour is not None:
            m.DEVICE_DRAIN.labels(*lv).observe(iv.device_drain_percent_per_hour)

    def flush(self) -> bool:
        """Insert the buffered rows; True when nothing is left buffered."""
        if not self.rows or self.client is None:
            return True
        try:
            self.client.insert(f"{self.database}.heartbeats", self.rows, column_names=COLUMNS)
        except Exception as e:  # noqa: BLE001 -- any ClickHouse failure: keep rows, retry later
            m.STORE_ERRORS.inc()
            log.warning("heartbeat insert failed (%d rows kept): %s", len(self.rows), e)
            return False
        m.STORE_ROWS.inc(len(self.rows))
        self.rows = []
        return True

    def run(self, stop: threading.Event, shutdown_budget_s: float = SHUTDOWN_BUDGET_S) -> None:
        """Consume until ``stop`` is set; then flush, and commit and leave the group within
        ``shutdown_budget_s`` (an unreachable broker cannot hold the exit up: see
        :meth:`_shut_down`)."""
        side = [threading.Thread(target=self._watch_lag, args=(stop,), name="fleet-lag", daemon=True),
                threading.Thread(target=self._follow_policy, args=(stop,), name="fleet-policy", daemon=True)]
        for t in side:
            t.start()
        c = Consumer({**self.settings.kafka.librdkafka(), "group.id": self.settings.fleet.group_id,
                      "enable.auto.commit": False, "auto.offset.reset": "earliest",
                      "session.timeout.ms": 10_000, "log_level": 3})
        c.subscribe([self.topics.heartbeats])
        interval = self.settings.fleet.flush_interval_s
        last_flush = time.monotonic()
        dirty = paused = False
        try:
            while not stop.is_set():
                for msg in c.consume(500, timeout=0.25):
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("consumer error: %s", err)
                        continue
                    self.handle(msg.value() or b"", time.time())  # a tombstone counts as invalid
                    dirty = True
                if time.monotonic() - last_flush >= interval:
                    last_flush = time.monotonic()
                    if self.flush():
                        if paused:
                            c.resume(c.assignment())
                            paused = False
                        if dirty:
                            # Asynchronous: a synchronous commit waits for an unreachable
                            # coordinator and would keep this loop from seeing ``stop``. A lost
                            # commit replays heartbeats the table deduplicates.
                            c.commit(asynchronous=True)
                            dirty = False
                    elif not paused:
                        c.pause(c.assignment())  # backpressure until ClickHouse is back
                        paused = True
        finally:
            self._shut_down(c, dirty, side, shutdown_budget_s)

    def _shut_down(self, c: Consumer, dirty: bool, side: list[threading.Thread], budget_s: float) -> None:
        """Flush, then commit and close the consumer in a helper thread that gets what is left of
        ``budget_s``: librdkafka's synchronous commit and close wait for the group coordinator,
        which an unreachable broker never answers. Past the budget the exporter leaves without
        that commit (the heartbeats since the last one are replayed; the table deduplicates them)."""
        deadline = time.monotonic() + budget_s
        flushed = self.flush()

        def commit_and_close() -> None:
            try:
                if flushed and dirty:
                    c.commit(asynchronous=False)
            except KafkaException as e:
                log.warning("final commit failed (heartbeats since the last commit will be replayed): %s", e)
            finally:
                c.close()

        closer = threading.Thread(target=commit_and_close, name="fleet-close", daemon=True)
        closer.start()
        for t in (closer, *side):
            t.join(max(deadline - time.monotonic(), 0.0))
        if closer.is_alive():
            log.warning("the broker did not answer within %.0f s of shutdown: leaving without the final "
                        "commit (heartbeats since the last commit will be replayed)", budget_s)

    # --- pipeline gaps: lag and configured sampling ----------------------------------------

    def consumer_groups(self) -> list[tuple[str, str, str]]:
        """(consumer role, group id, topic) of every pipeline consumer group."""
        s, t = self.settings, self.topics
        return [("stream", s.stream.app_id, t.events), ("sink", s.sink.group_id, t.stored),
                ("fleet", s.fleet.group_id, t.heartbeats)]

    def read_lag(self) -> None:
        """Read every group's committed lag from the brokers once."""
        for role, group, topic in self.consumer_groups():
            try:
                lag = group_lag(self.settings.kafka, group, topic)
            except Exception as e:  # noqa: BLE001 -- a broker hiccup must not kill the thread
                log.warning("lag of %s (%s) unavailable: %s", role, group, e)
                with self.lock:
                    self.lag_failed[role] = True
                continue
            with self.lock:
                self.lag[role] = lag
                self.lag_failed[role] = False

    def _watch_lag(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self.read_lag()
            stop.wait(self.settings.fleet.lag_interval_s)

    def apply_policy(self, payload: bytes) -> None:
        """Take the sampling rates of a newer global policy from one policy-topic message."""
        try:
            rec = decode_record(payload, "control_event")
        except DecodeError:
            return
        policy = rec.get("policy")
        if rec.get("kind") != "policy_update" or policy is None:
            return
        with self.lock:
            if policy["version"] >= self.policy_version:
                self.policy_version = policy["version"]
                items = sorted(policy.get("sampling", {}).items())[: m.MAX_SELECTORS]
                self.sampling = {k: float(v) for k, v in items}

    def _follow_policy(self, stop: threading.Event) -> None:
        c = Consumer({**self.settings.kafka.librdkafka(), "group.id": f"{self.settings.fleet.group_id}-policy",
                      "enable.auto.commit": False, "log_level": 3})
        try:
            md = c.list_topics(self.topics.policy, timeout=10).topics.get(self.topics.policy)
            parts = sorted(md.partitions) if md is not None and md.partitions else [0]
            c.assign([TopicPartition(self.topics.policy, p, OFFSET_BEGINNING) for p in parts])
            while not stop.is_set():
                msg = c.poll(0.5)
                value = msg.value() if msg is not None and msg.error() is None else None
                if value is not None:
                    self.apply_policy(value)
        except Exception as e:  # noqa: BLE001 -- sampling gauges are optional; metrics go on
            log.warning("not following the policy topic: %s", e)
        finally:
            c.close()


class FleetCollector(Collector):
    """Emits the scrape-time gauges declared in metrics.py from an exporter's state."""

    def __init__(self, exporter: FleetExporter) -> None:
        self.exporter = exporter

    def describe(self) -> Iterator[Metric]:
        for g in m.SCRAPE_GAUGES:
            yield GaugeMetricFamily(g.name, g.help, labels=list(g.labels))

    def collect(self) -> Iterator[Metric]:
        e, fs = self.exporter, self.exporter.settings.fleet
        fam = {g.name: GaugeMetricFamily(g.name, g.help, labels=list(g.labels)) for g in m.SCRAPE_GAUGES}
        with e.lock:
            online, silent = e.state.census(time.time(), fs.online_window_s, fs.forget_after_s,
                                            fs.max_heartbeat_age_s)
            combos = {k[:3] for k in online} | set(silent)
            # Zeros for every known label combination, so sums are 0 (not "no data") when
            # nobody is silent or paused.
            for combo in sorted(combos):
                for state in AGENT_STATES:
                    fam[m.AGENTS_ONLINE.name].add_metric([*combo, state], online.get((*combo, state), 0))
                fam[m.AGENTS_SILENT.name].add_metric(list(combo), silent.get(combo, 0))
            fam[m.LAST_HEARTBEAT.name].add_metric([], e.state.last_received_s)
            for role, _group, _topic in e.consumer_groups():
                if role in e.lag:
                    fam[m.CONSUMER_LAG.name].add_metric([role], e.lag[role])
                fam[m.LAG_READ_ERRORS.name].add_metric([role], 1.0 if e.lag_failed.get(role) else 0.0)
            for selector, rate in e.sampling.items():
                fam[m.SAMPLING_RATE.name].add_metric([selector], rate)
            fam[m.POLICY_VERSION.name].add_metric([], e.policy_version)
        fam[m.BATTERY_BUDGET.name].add_metric([], fs.battery_budget_percent_per_hour)
        fam[m.UPLOAD_BUDGET.name].add_metric([], fs.upload_budget_bytes_per_hour)
        yield from fam.values()
