"""Delivery from the spool to Kafka: idempotent, acks=all, within an hourly bandwidth budget.

One :meth:`Shipper.ship_once` call is one "radio wakeup": it reads the oldest pending spool
entries, produces them, waits (bounded) for the delivery reports and acks in the spool exactly
the entries the broker acknowledged. What happens to the rest depends on the error:

- retryable (broker down, ``_MSG_TIMED_OUT``, ``_TRANSPORT``, leader changes, auth or topic
  problems -- anything that is not the payload's fault): the entries stay in the spool and the
  result asks for a backoff with jitter before the next call;
- non-retryable and caused by the payload (``MSG_SIZE_TOO_LARGE``, ``INVALID_RECORD``, ...): the
  entry goes to the spool's ``deadletter/`` file, is counted and acked, and shipping goes on.
  The broker rejects a whole request batch at once (every message in a batch larger than the
  topic's ``max.message.bytes`` fails with MSG_SIZE_TOO_LARGE, innocent ones included), so an
  entry that failed together with others is first re-sent on its own; only one that fails
  alone is dead-lettered.

Acks are per entry, not a watermark: an entry delivered after an older one failed is acked at
once, so it is not sent again when the older one is retried (order across a retry is restored
downstream by the batch ``seq``).

No duplicates from giving up early: an entry handed to librdkafka is never produced again
until librdkafka has reported its fate (delivered, or failed after ``message.timeout.ms``). A
call that returns before then keeps the entry "in flight" and the next call only collects its
report. librdkafka retries inside that window on its own, and the idempotent producer makes
those retries exactly-once on the broker. The one duplicate left is a message that timed out
while in flight (the broker may have written it) and is re-sent from the spool, or one whose
spool ack did not reach disk before ``kill -9``; downstream deduplicates by event id.

Budget: every entry is charged its payload bytes (key, value, headers; compression makes the
wire smaller). Screenshots yield first: a screenshot is only sent when the bucket covers it,
otherwise it waits in the spool (never dropped for budget here -- if it waits until the spool is
full, the spool's bound drops screenshots first and counts them as ``spool_full``). Events,
heartbeats and controls are never held back: they are charged even past empty (the bucket goes
into debt, counted as ``budget_overdraft_bytes``), which delays the next screenshots.

Signing: with a ``control_signer`` (the laptop's enrolled device key), every controls entry is
signed when it is handed to librdkafka -- ``ht-signer``/``ht-sent-at``/``ht-sig`` headers over
the entry's key and value at that moment (docs/adr/0009-authentic-controls.md); a re-send is
signed again (same control id: the stream applies it once).
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Producer

from handtrace.agent.spool import ROLES, Spool, SpoolEntry
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.signing import Signer

log = logging.getLogger(__name__)

# Errors caused by the payload itself: re-sending cannot help, so the entry is dead-lettered.
NON_RETRYABLE = frozenset({
    "MSG_SIZE_TOO_LARGE", "_MSG_SIZE_TOO_LARGE", "INVALID_RECORD", "CORRUPT_MESSAGE",
    "RECORD_LIST_TOO_LARGE", "INVALID_MSG", "INVALID_MSG_SIZE", "_INVALID_ARG",
    "UNSUPPORTED_FOR_MESSAGE_FORMAT", "INVALID_TIMESTAMP",
})
# Everything else is retried: an unknown topic, a missing ACL or a broker outage are not the
# payload's fault, and dead-lettering every event during one would lose them.


class TokenBucket:
    """Bytes per hour with a burst. Thread-safe.

    ``try_take(n)`` succeeds when the bucket holds ``n``; an item larger than the burst is let
    through when the bucket is full (leaving a debt) so it cannot wait forever. ``take(n)``
    always succeeds and may leave a debt: what must flow regardless of budget (events).
    """

    def __init__(self, rate_bytes_per_hour: float, burst_bytes: int,
                 clock: Callable[[], float] = time.monotonic, *, initial: float | None = None) -> None:
        if rate_bytes_per_hour <= 0 or burst_bytes <= 0:
            raise ValueError("rate_bytes_per_hour and burst_bytes must be > 0")
        self.rate_per_s = rate_bytes_per_hour / 3600.0
        self.burst = float(burst_bytes)
        self._clock = clock
        self._level = self.burst if initial is None else float(initial)
        self._at = clock()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock()
        if now > self._at:
            self._level = min(self.burst, self._level + (now - self._at) * self.rate_per_s)
        self._at = max(self._at, now)

    def available(self) -> float:
        """Bytes that can be taken now (negative while in debt)."""
        with self._lock:
            self._refill()
            return self._level

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if the bucket covers them (or is full and ``n`` exceeds the burst)."""
        with self._lock:
            self._refill()
            if self._level >= n or (n > self.burst and self._level >= self.burst):
                self._level -= n
                return True
            return False

    def take(self, n: int) -> int:
        """Take ``n`` bytes unconditionally; returns the overdraft this take caused (>= 0)."""
        with self._lock:
            self._refill()
            before = max(self._level, 0.0)
            self._level -= n
            return int(max(0.0, n - before))

    def seconds_until(self, n: int) -> float:
        """How long until ``try_take(n)`` would succeed (0 if it would now)."""
        with self._lock:
            self._refill()
            want = min(float(n), self.burst)
            return max(0.0, (want - self._level) / self.rate_per_s)


@dataclass
class ShipResult:
    """What one :meth:`Shipper.ship_once` did."""

    entries_sent: int = 0
    """Entries the broker acknowledged in this call (now acked in the spool)."""
    events_sent: int = 0
    payload_bytes: int = 0
    wire_bytes: int | None = None
    """Bytes librdkafka reported sending since the previous call (``txbytes`` statistics,
    which lag by up to ``statistics.interval.ms``); None with statistics off."""
    deferred_screenshots: int = 0
    """Screenshot entries left in the spool because the budget could not cover them."""
    deadlettered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Failed deliveries by librdkafka error name (retryable and not)."""
    in_flight: int = 0
    """Entries handed to librdkafka whose fate is not known yet (collected by a later call)."""
    retry: bool = False
    """A retryable failure happened: wait ``next_delay_s`` (backoff with jitter)."""
    next_delay_s: float = 0.0
    """Suggested wait before the next call: 0 if more is ready now, the backoff after a
    retryable failure, the budget's wait when only screenshots are left, ``idle_delay_s`` if
    nothing is pending."""


@dataclass
class ShipperStats:
    """Lifetime counters of one shipper."""

    wakeups: int = 0
    """ship_once calls that produced something (each wakes the radio)."""
    entries_sent: int = 0
    events_sent: int = 0
    payload_bytes: int = 0
    wire_bytes: int = 0
    deadlettered: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    """Failed deliveries by librdkafka error name."""
    client_errors: dict[str, int] = field(default_factory=dict)
    """librdkafka's error callback by name (``_TRANSPORT``, ``_ALL_BROKERS_DOWN``, ...)."""
    budget_overdraft_bytes: int = 0
    """Bytes of events/heartbeats/controls sent beyond the budget."""
    screenshots_deferred: int = 0
    """Times a screenshot was held back for budget."""
    producer_restarts: int = 0
    """Producers replaced after a fatal librdkafka error."""


class Shipper:
    """Ships spool entries to their topics. Not thread-safe: call from one thread."""

    def __init__(self, spool: Spool, producer_conf: Mapping[str, Any], topics: Mapping[str, str], *,
                 budget: TokenBucket | None = None, max_batch_bytes: int = 1 << 20,
                 max_batch_entries: int = 500, delivery_timeout_s: float = 20.0,
                 backoff_base_s: float = 1.0, backoff_max_s: float = 300.0, idle_delay_s: float = 5.0,
                 stats_interval_s: float | None = 10.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 producer_factory: Callable[[dict[str, Any]], Producer] = Producer,
                 control_signer: Signer | None = None) -> None:
        unknown = sorted(set(topics) - set(ROLES))
        if unknown:
            raise ValueError(f"unknown topic roles {unknown}; roles are {ROLES}")
        if "events" not in topics:
            raise ValueError("topics must name the events topic")
        self.spool = spool
        self.topics = dict(topics)
        self.budget = budget
        self.max_batch_bytes = max_batch_bytes
        self.max_batch_entries = max_batch_entries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.idle_delay_s = idle_delay_s
        self.stats = ShipperStats()
        self.control_signer = control_signer
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 -- jitter, not security
        self._conf = self._producer_conf(producer_conf, delivery_timeout_s, stats_interval_s)
        self._factory = producer_factory
        self._producer = self._new_producer()
        self._outstanding: dict[int, SpoolEntry] = {}
        self._suspects: set[int] = set()  # failed non-retryably together with others
        self._alone: set[int] = set()  # in flight as the only message of its batch
        self._reports: list[tuple[int, KafkaError | None]] = []
        self._failures = 0
        self._backoff_until = 0.0
        self._fatal: KafkaError | None = None
        self._brokers_down = False
        self._txbytes = 0
        self._txbytes_reported = 0
        # Roles without a topic are not shipped (they wait in the spool; the bound drops them).
        self._roles_main = [r for r in ("events", "heartbeats", "controls") if r in self.topics]
        missing = [r for r in ROLES if r not in self.topics]
        if missing:
            log.warning("no topic for %s: such entries stay in the spool until its bound drops them", missing)

    # ------------------------------------------------------------ setup

    @staticmethod
    def _producer_conf(base: Mapping[str, Any], delivery_timeout_s: float,
                       stats_interval_s: float | None) -> dict[str, Any]:
        conf = dict(base)
        # Exactly-once per partition on the broker, whatever the caller passed.
        conf["enable.idempotence"] = True
        conf["acks"] = "all"
        # A message librdkafka cannot deliver fails within this time, so an outage becomes a
        # retryable failure the spool owns instead of a queue librdkafka keeps forever.
        conf.setdefault("message.timeout.ms", int(delivery_timeout_s * 1000))
        conf.setdefault("compression.type", "zstd")
        conf.setdefault("linger.ms", 50)
        conf.setdefault("logger", log)  # librdkafka's own log lines into Python logging, not stderr
        if stats_interval_s:
            conf.setdefault("statistics.interval.ms", int(stats_interval_s * 1000))
        return conf

    def _new_producer(self) -> Producer:
        conf = {**self._conf, "error_cb": self._on_error}
        if conf.get("statistics.interval.ms"):
            conf["stats_cb"] = self._on_stats
        return self._factory(conf)

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = err
        if err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._brokers_down = True
        self._count(self.stats.client_errors, err.name())

    def _on_stats(self, raw: str) -> None:
        try:
            self._txbytes = int(json.loads(raw).get("tx_bytes", self._txbytes))
        except (ValueError, TypeError):
            pass

    def _on_delivery(self, seq: int, err: KafkaError | None, _msg: Any) -> None:
        self._reports.append((seq, err))

    @staticmethod
    def _count(d: dict[str, int], key: str, n: int = 1) -> None:
        d[key] = d.get(key, 0) + n

    # ------------------------------------------------------------ shipping

    def ship_once(self, timeout_s: float = 5.0) -> ShipResult:
        """Send what the budget allows, wait up to ``timeout_s`` for delivery reports, ack what
        was delivered. Never raises for broker trouble: the result says when to try again."""
        deadline = time.monotonic() + timeout_s  # real time: librdkafka works on it
        res = ShipResult()
        self._producer.poll(0)  # serve stale events before judging this call by them
        self._settle(res)
        if self._fatal is not None:
            self._restart_producer(res)
        self._brokers_down = False
        produced = 0
        if not self._outstanding and self._clock() >= self._backoff_until:
            produced = self._produce_batch(res)
            if produced:
                self.stats.wakeups += 1
        # Wait for the reports; stop early if librdkafka says every broker is down (the
        # messages stay in flight and a later call collects their fate).
        while self._outstanding and not self._brokers_down:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self._producer.flush(min(left, 0.25))
            self._settle(res)
        self._producer.poll(0)
        self._settle(res)
        res.in_flight = len(self._outstanding)
        if self._txbytes:
            res.wire_bytes = self._txbytes - self._txbytes_reported
            self.stats.wire_bytes = self._txbytes
            self._txbytes_reported = self._txbytes
        self._plan_next(res)
        return res

    def _produce_batch(self, res: ShipResult) -> int:
        """Hand the next batch to librdkafka: events etc. first (always), then screenshots the
        budget covers. Returns how many entries were produced."""
        while self._suspects:
            seq = min(self._suspects)
            entry = self.spool.get(seq)
            if entry is None:  # acked, dropped or quarantined meanwhile
                self._suspects.discard(seq)
                continue
            # Rejected together with others: send it alone to learn whether it is the culprit.
            self._alone.add(seq)
            self._produce(seq, entry, res)
            return 1
        room = self.max_batch_bytes
        batch = self.spool.pending(self.max_batch_entries, room, roles=self._roles_main) if self._roles_main else []
        for _seq, entry in batch:
            room -= entry.size
            if self.budget is not None:
                self.stats.budget_overdraft_bytes += self.budget.take(entry.size)
        if "screenshots" in self.topics and room > 0 and len(batch) < self.max_batch_entries:
            shots = self.spool.pending(self.max_batch_entries - len(batch), room, roles=["screenshots"])
            for i, (seq, entry) in enumerate(shots):
                if batch and room - entry.size < 0:
                    break
                if self.budget is not None and not self.budget.try_take(entry.size):
                    self.stats.screenshots_deferred += 1
                    res.deferred_screenshots = self.spool.stats().depth_by_role["screenshots"] - i
                    break
                room -= entry.size
                batch.append((seq, entry))
        if len(batch) == 1:
            self._alone.add(batch[0][0])
        for seq, entry in batch:
            self._produce(seq, entry, res)
        return len(batch)

    def _produce(self, seq: int, entry: SpoolEntry, res: ShipResult) -> None:
        topic = self.topics[entry.topic_role]
        signed = entry.headers
        if entry.topic_role == "controls" and self.control_signer is not None:
            signed = tuple(self.control_signer.resign("controls", entry.key, entry.value, entry.headers))
        else:
            # The send-time stamp lets the stream place this laptop's clock on the broker's
            # (handtrace.core.clock.clock_offset_us): taken now, not when the batch was sealed.
            signed = (*(h for h in entry.headers if h[0] != HEADER_SENT_AT), (HEADER_SENT_AT, str(now_us()).encode()))
        headers: list[tuple[str, str | bytes | None]] = list(signed)
        for _attempt in range(3):
            try:
                self._producer.produce(topic, value=entry.value, key=entry.key,
                                       headers=headers or None,
                                       on_delivery=partial(self._on_delivery, seq))
                self._outstanding[seq] = entry
                return
            except BufferError:  # librdkafka's queue is full: let it drain a little
                self._producer.poll(0.5)
            except KafkaException as e:  # rejected before it left, e.g. _MSG_SIZE_TOO_LARGE
                self._outstanding[seq] = entry
                self._alone.add(seq)
                self._reports.append((seq, e.args[0]))
                return
        self._count(res.errors, "_QUEUE_FULL")

    def _settle(self, res: ShipResult) -> None:
        """Apply the delivery reports collected so far: ack, dead-letter, or leave."""
        if not self._reports:
            return
        reports, self._reports = self._reports, []
        delivered: list[int] = []
        events = size = 0
        retryable = False
        for seq, err in reports:
            entry = self._outstanding.pop(seq, None)
            alone = seq in self._alone
            self._alone.discard(seq)
            if entry is None:
                continue
            if err is None:
                self._suspects.discard(seq)
                delivered.append(seq)
                events += entry.events
                size += entry.size
                continue
            name = err.name()
            self._count(res.errors, name)
            self._count(self.stats.errors, name)
            if name in NON_RETRYABLE and not alone:
                # The broker rejects a whole request batch (e.g. MSG_SIZE_TOO_LARGE against the
                # topic's max.message.bytes), failing every message in it: only the culprit
                # must be dead-lettered, so each is retried on its own first.
                self._suspects.add(seq)
            elif name in NON_RETRYABLE:
                self._suspects.discard(seq)
                self.spool.deadletter(seq, entry, name)
                res.deadlettered += 1
                self.stats.deadlettered += 1
            else:
                retryable = True
        if delivered:
            self.spool.ack(delivered)
            res.entries_sent += len(delivered)
            res.events_sent += events
            res.payload_bytes += size
            self.stats.entries_sent += len(delivered)
            self.stats.events_sent += events
            self.stats.payload_bytes += size
        if retryable:
            res.retry = True

    def _plan_next(self, res: ShipResult) -> None:
        now = self._clock()
        if res.retry or (self._brokers_down and self._outstanding):
            res.retry = True
            self._failures += 1
            cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** min(self._failures - 1, 30))
            delay = self._rng.uniform(cap / 2, cap)  # "equal jitter": spread, but never ~0
            self._backoff_until = now + delay
            res.next_delay_s = delay
            return
        if res.entries_sent:
            self._failures = 0
        if self._backoff_until > now:
            res.next_delay_s = self._backoff_until - now
            return
        if self._outstanding:
            res.next_delay_s = 0.5
            return
        st = self.spool.stats()
        main_left = sum(st.depth_by_role[r] for r in self._roles_main)
        shots_left = st.depth_by_role["screenshots"] if "screenshots" in self.topics else 0
        if main_left:
            res.next_delay_s = 0.0
        elif shots_left:
            if self.budget is None or res.deferred_screenshots == 0:
                res.next_delay_s = 0.0
            else:
                nxt = self.spool.pending(1, 1, roles=["screenshots"])
                res.next_delay_s = self.budget.seconds_until(nxt[0][1].size) if nxt else 0.0
        else:
            res.next_delay_s = self.idle_delay_s

    def _restart_producer(self, res: ShipResult) -> None:
        """A fatal librdkafka error (e.g. the idempotent producer's state is lost): the
        producer cannot go on. Its in-flight entries stay in the spool and are re-sent by a new
        producer (a possible duplicate, deduplicated downstream by event id)."""
        log.warning("producer fatal error %s: starting a new producer", self._fatal)
        try:
            self._producer.purge(in_queue=True, in_flight=True)
            self._producer.poll(0)
        except KafkaException:
            pass
        self._settle(res)
        self._outstanding.clear()
        self._alone.clear()
        self._fatal = None
        self._producer = self._new_producer()
        self.stats.producer_restarts += 1

    def close(self, timeout_s: float = 5.0) -> ShipResult:
        """Collect outstanding reports for up to ``timeout_s``, then purge what is left (it
        stays in the spool and is re-sent by the next shipper)."""
        res = ShipResult()
        deadline = time.monotonic() + timeout_s
        while self._outstanding and time.monotonic() < deadline:
            self._producer.flush(min(0.25, max(0.0, deadline - time.monotonic())))
            self._settle(res)
        if self._outstanding:
            self._producer.purge(in_queue=True, in_flight=True)
            self._producer.flush(0)
            self._settle(res)
        self._outstanding.clear()
        self._alone.clear()
        res.in_flight = 0
        return res
