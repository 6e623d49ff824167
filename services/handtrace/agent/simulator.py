"""A simulated fleet: N synthetic agents producing real EventBatch and Heartbeat messages to
Kafka, the way real agents do (batched, zstd-compressed, idempotent, keyed by employee).

Simulated time never runs ahead of the wall clock: with ``speedup`` s over a run of D seconds
the fleet starts D*(s-1) seconds in the past and catches up with now at the end, so capture
timestamps stay plausible and end-to-end latency stays meaningful at speedup 1.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, Producer

from handtrace import __version__
from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import codec, ids
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.producer import producer_config
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics


@dataclass
class FleetStats:
    """Running totals of one simulated fleet."""

    agents: int = 0
    batches: int = 0
    events: int = 0
    events_by_kind: dict[str, int] = field(default_factory=dict)
    payload_bytes: int = 0
    wire_bytes: int = 0
    delivered: int = 0
    failed: int = 0
    heartbeats: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None

    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started


@dataclass
class _Device:
    employee_id: str
    device_id: str
    activity: SyntheticActivity
    seq: int = 0
    last_us: int = 0
    next_heartbeat_us: int = 0
    cohort: str = "default"


@dataclass
class _Health:
    """Simulated device and agent health behind one device's heartbeats."""

    rng: random.Random
    battery: float | None          # percent; None: a desktop
    charging: bool
    device_drain_pct_per_h: float  # whole device on battery (all apps)
    cpu_share: float               # agent CPU in cores (0.006 = 0.6 % of one core)
    rss: float
    exempt: bool
    flaky_network: bool
    state: str = "capturing"
    cpu_seconds: float = 0.0
    payload_bytes: int = 0
    events: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    spool_events: int = 0
    spool_bytes: int = 0
    last_us: int = 0

    @classmethod
    def for_device(cls, device_id: str) -> _Health:
        rng = random.Random(device_id)  # noqa: S311 -- simulation, not security
        desktop = rng.random() < 0.15
        heavy = rng.random() < 0.04  # the odd agent that misbehaves: a worst offender
        return cls(
            rng=rng, battery=None if desktop else rng.uniform(35, 100), charging=rng.random() < 0.3,
            device_drain_pct_per_h=rng.uniform(8, 22), cpu_share=rng.lognormvariate(-5.2, 0.5) * (8 if heavy else 1),
            rss=rng.uniform(70, 160) * 2**20 * (2.5 if heavy else 1), exempt=rng.random() < 0.04,
            flaky_network=rng.random() < 0.08,
        )

    def sent(self, payload_bytes: int, events: int) -> None:
        self.payload_bytes += payload_bytes
        self.events += events
        self.dropped["coalesced"] = self.dropped.get("coalesced", 0) + events // 6

    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def advance(self, dt: float) -> None:
        r = self.rng
        if self.battery is not None and dt > 0:
            if self.charging:
                self.battery = min(100.0, self.battery + 40.0 * dt / 3600)
                self.charging = self.battery < 100.0 or r.random() < 0.5
            else:
                self.battery = max(1.0, self.battery - self.device_drain_pct_per_h * r.uniform(0.7, 1.3) * dt / 3600)
                self.charging = self.battery < 15.0 or r.random() < 0.01
        self.cpu_seconds += self.cpu_share * r.uniform(0.5, 1.5) * dt
        self.rss = min(max(self.rss * r.uniform(0.985, 1.02), 40 * 2**20), 900 * 2**20)
        if self.exempt:
            self.state = "exempt"
        elif self.state == "paused":
            self.state = "paused" if r.random() < 0.6 else "capturing"
        else:
            self.state = "paused" if r.random() < 0.03 else "capturing"
        if self.state == "paused" and dt > 0:
            self.dropped["paused"] = self.dropped.get("paused", 0) + int(dt * r.uniform(5, 20))
        if self.flaky_network and r.random() < 0.5:
            self.spool_events = r.randint(200, 20_000)
            self.spool_bytes = self.spool_events * r.randint(30, 60)
        else:
            self.spool_events = self.spool_bytes = 0


class SimulatedFleet:
    """Drive ``agents`` synthetic devices for ``duration_s`` wall seconds."""

    def __init__(self, settings: Settings, agents: int = 50, *, speedup: float = 1.0,
                 batch_interval_s: float = 2.0, heartbeat_interval_s: float = 30.0,
                 seed: int = 0, employee_prefix: str = "emp") -> None:
        if agents < 1:
            raise ValueError("agents must be >= 1")
        if speedup < 1:
            raise ValueError("speedup must be >= 1")
        self.settings = settings
        self.topics = Topics.from_settings(settings.topics)
        self.speedup = speedup
        self.batch_interval_us = int(batch_interval_s * 1_000_000)
        self.heartbeat_interval_us = int(heartbeat_interval_s * 1_000_000)
        cohorts = ("eng", "support", "sales", "design")
        self.devices = [
            _Device(f"{employee_prefix}-{i:05d}", f"dev-{seed}-{i:05d}",
                    SyntheticActivity(seed=seed * 1_000_003 + i), cohort=cohorts[i % len(cohorts)])
            for i in range(agents)
        ]
        self.stats = FleetStats(agents=agents)
        self._lock = threading.Lock()

    def _producer(self) -> Producer:
        return Producer(producer_config(
            self.settings.kafka,
            **{"compression.type": "zstd", "linger.ms": 50,
               "message.max.bytes": self.settings.topics.max_message_bytes,
               "statistics.interval.ms": 1000, "stats_cb": self._on_stats},
        ))

    def _on_stats(self, raw: str) -> None:
        self.stats.wire_bytes = int(json.loads(raw).get("tx_bytes", 0))

    def _on_delivery(self, err: KafkaError | None, _msg: object) -> None:
        with self._lock:
            if err is None:
                self.stats.delivered += 1
            else:
                self.stats.failed += 1

    def _batch(self, d: _Device, t0: int, t1: int) -> tuple[bytes, int, dict[str, int]]:
        events = d.activity.events_between(t0, t1)
        d.seq += 1
        header = {
            "batch_id": ids.uuid7_bytes(t1 // 1000),
            "employee_id": d.employee_id,
            "device_id": d.device_id,
            "agent_version": __version__,
            "os": "synthetic",
            "cohort": d.cohort,
            "seq": d.seq,
            "sent_at_us": t1,
        }
        kinds: dict[str, int] = {}
        for e in events:
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
        payload = codec.encode_event_batch(header, events)
        self._health(d).sent(len(payload), len(events))  # real per-device sizes for heartbeats
        return payload, len(events), kinds

    def _health(self, d: _Device) -> _Health:
        """The simulated health behind one device's heartbeats (created on first use)."""
        health: dict[str, _Health] = self.__dict__.setdefault("_health_by_device", {})
        if d.device_id not in health:
            health[d.device_id] = _Health.for_device(d.device_id)
        return health[d.device_id]

    def _heartbeat(self, d: _Device, at_us: int, started_us: int) -> bytes:
        """A heartbeat with varied, plausible values: batteries drain on battery power and charge
        when low, CPU seconds accumulate at a per-device rate (a few heavy outliers), bytes sent
        are the device's real payload sizes (wire bytes by the fleet's measured compression
        ratio plus framing), a few agents are exempt or pause now and then, spools back up on
        flaky networks. Deterministic per device id."""
        h = self._health(d)
        dt = max((at_us - h.last_us) / 1e6, 0.0) if h.last_us else 0.0
        h.last_us = at_us
        h.advance(dt)
        s = self.stats
        ratio = s.wire_bytes / s.payload_bytes if s.wire_bytes and s.payload_bytes else 0.45
        wire = int(h.payload_bytes * min(ratio, 1.0)) + d.seq * 90  # ~90 B produce framing per batch
        return codec.encode_record("heartbeat", {
            "heartbeat_id": ids.uuid7_bytes(at_us // 1000),
            "employee_id": d.employee_id,
            "device_id": d.device_id,
            "sent_at_us": at_us,
            "agent_started_at_us": started_us,
            "agent_version": __version__,
            "os": "synthetic",
            "cohort": d.cohort,
            "state": h.state,
            "battery_percent": None if h.battery is None else round(h.battery, 2),
            "charging": None if h.battery is None else h.charging,
            "cpu_seconds": round(h.cpu_seconds, 4),
            "rss_bytes": int(h.rss),
            "payload_bytes_sent": h.payload_bytes,
            "wire_bytes_sent": wire,
            "events_captured": h.events + h.dropped_total(),
            "events_sent": h.events,
            "events_dropped": dict(h.dropped),
            "spool_depth_events": h.spool_events,
            "spool_depth_bytes": h.spool_bytes,
            "radio_wakeups": d.seq,
        })

    def run(self, duration_s: float, stop: threading.Event | None = None,
            on_progress: Callable[[FleetStats], None] | None = None) -> FleetStats:
        """Produce until ``duration_s`` elapses or ``stop`` is set; flushes before returning."""
        stop = stop or threading.Event()
        producer = self._producer()
        wall0 = time.monotonic()
        sim0 = now_us() - int(duration_s * (self.speedup - 1) * 1_000_000)
        n = len(self.devices)
        for i, d in enumerate(self.devices):
            # Stagger first batches so the fleet does not send in lock-step.
            d.last_us = sim0 - int(self.batch_interval_us * (i / n))
            d.next_heartbeat_us = sim0 + int(self.heartbeat_interval_us * (i / n))
        self.stats.started = wall0
        while not stop.is_set():
            elapsed = time.monotonic() - wall0
            if elapsed >= duration_s:
                break
            sim_now = sim0 + int(elapsed * self.speedup * 1_000_000)
            for d in self.devices:
                while d.last_us + self.batch_interval_us <= sim_now and not stop.is_set():
                    t1 = d.last_us + self.batch_interval_us
                    payload, count, kinds = self._batch(d, d.last_us, t1)
                    d.last_us = t1
                    self._produce(producer, self.topics.events, d.employee_id, payload)
                    with self._lock:
                        s = self.stats
                        s.batches += 1
                        s.events += count
                        s.payload_bytes += len(payload)
                        for k, v in kinds.items():
                            s.events_by_kind[k] = s.events_by_kind.get(k, 0) + v
                if d.next_heartbeat_us <= sim_now:
                    self._produce(producer, self.topics.heartbeats, d.device_id,
                                  self._heartbeat(d, d.next_heartbeat_us, sim0))
                    d.next_heartbeat_us += self.heartbeat_interval_us
                    self.stats.heartbeats += 1
            producer.poll(0)
            if on_progress is not None:
                on_progress(self.stats)
            time.sleep(0.05)
        producer.flush(60)
        producer.poll(1.2)  # one more statistics callback with the final byte count
        self.stats.finished = time.monotonic()
        return self.stats

    def _produce(self, producer: Producer, topic: str, key: str, value: bytes) -> None:
        while True:
            try:
                producer.produce(topic, key=key.encode(), value=value, on_delivery=self._on_delivery,
                                 headers=[(HEADER_SENT_AT, str(now_us()).encode())])
                return
            except BufferError:  # local queue full: wait for deliveries, never drop
                producer.poll(0.1)
