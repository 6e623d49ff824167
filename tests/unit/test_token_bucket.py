"""The hourly bandwidth budget (a token bucket on a fake clock), and the shipper's use of it:
screenshots yield first, events always flow (their overdraft is counted). The shipper runs on
a spool in a temporary directory with an in-memory stand-in for the librdkafka producer; the
real broker is exercised in tests/integration/test_shipper_outage.py."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError

from handtrace.agent.shipper import Shipper, TokenBucket
from handtrace.agent.spool import Spool, SpoolEntry

pytestmark = pytest.mark.timeout(60)

HOUR = 3600.0


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_starts_full_and_refills_at_the_hourly_rate() -> None:
    clock = FakeClock()
    b = TokenBucket(rate_bytes_per_hour=3600, burst_bytes=100, clock=clock)  # 1 byte/s
    assert b.available() == 100
    assert b.try_take(60) and not b.try_take(60)
    assert b.available() == 40
    clock.t += 10
    assert b.available() == 50
    clock.t += HOUR
    assert b.available() == 100  # never above the burst
    assert b.try_take(100) and b.available() == 0


def test_an_item_larger_than_the_burst_passes_only_when_full() -> None:
    clock = FakeClock()
    b = TokenBucket(3600, 100, clock=clock)
    assert b.try_take(250)  # full: let through, leaving a debt
    assert b.available() == -150
    assert not b.try_take(1)
    assert b.seconds_until(250) == pytest.approx(250)  # back to full
    clock.t += 249
    assert not b.try_take(250)
    clock.t += 1
    assert b.try_take(250)


def test_take_always_succeeds_and_reports_the_overdraft() -> None:
    clock = FakeClock()
    b = TokenBucket(3600, 100, clock=clock)
    assert b.take(70) == 0
    assert b.take(50) == 20
    assert b.take(10) == 10  # already in debt: all of it is overdraft
    assert b.available() == -30
    assert b.seconds_until(10) == pytest.approx(40)


def test_clock_going_backwards_does_not_mint_tokens() -> None:
    clock = FakeClock()
    b = TokenBucket(3600, 100, clock=clock)
    b.take(100)
    clock.t -= 50
    assert b.available() == 0
    clock.t += 60  # only 10 s past the last reading
    assert b.available() == pytest.approx(10)


def test_invalid_budget_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(0, 100)
    with pytest.raises(ValueError):
        TokenBucket(100, 0)


# ---------------------------------------------------------------- the shipper under a budget


class _Msg:
    def __init__(self, topic: str, value: bytes) -> None:
        self._topic, self._value = topic, value

    def topic(self) -> str:
        return self._topic

    def value(self) -> bytes:
        return self._value


class FakeProducer:
    """Delivers (or fails, per ``fail``) every message on the next flush/poll."""

    def __init__(self, conf: dict[str, Any]) -> None:
        self.conf = conf
        self.queue: list[tuple[Any, _Msg]] = []
        self.sent: list[tuple[str, bytes, bytes]] = []
        self.fail: KafkaError | None = None

    def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        self.queue.append((on_delivery, _Msg(topic, value)))
        self.sent.append((topic, key, value))

    def _serve(self) -> int:
        q, self.queue = self.queue, []
        for cb, msg in q:
            cb(self.fail, msg)
        return 0

    def flush(self, timeout: float = 0) -> int:
        return self._serve()

    def poll(self, timeout: float = 0) -> int:
        return self._serve()

    def purge(self, **_kw: Any) -> None:
        self.queue.clear()


TOPICS = {"events": "ev", "heartbeats": "hb", "controls": "ct", "screenshots": "ss"}


def make_shipper(tmp_path: Path, budget: TokenBucket | None, clock: FakeClock) -> tuple[Spool, Shipper, FakeProducer]:
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=64 << 10, fsync=False)
    made: list[FakeProducer] = []

    def factory(conf: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(conf))
        return made[-1]

    sh = Shipper(spool, {"bootstrap.servers": "unused:1"}, TOPICS, budget=budget, clock=clock,
                 rng=random.Random(1), producer_factory=factory, stats_interval_s=None)  # type: ignore[arg-type]
    return spool, sh, made[0]


def test_screenshots_yield_first_events_always_flow(tmp_path: Path) -> None:
    clock = FakeClock()
    budget = TokenBucket(rate_bytes_per_hour=36_000, burst_bytes=12_000, clock=clock)  # 10 B/s
    spool, sh, prod = make_shipper(tmp_path, budget, clock)
    for _ in range(3):
        spool.append(SpoolEntry("screenshots", b"emp", bytes(5_000), 0))
    for _ in range(10):
        spool.append(SpoolEntry("events", b"emp", bytes(1_000), 20))
    spool.append(SpoolEntry("heartbeats", b"dev", bytes(100), 0))

    r = sh.ship_once(1.0)
    # Events and the heartbeat go despite the budget (10 KB of a 12 KB bucket), then one
    # screenshot does not fit what is left and waits -- the older screenshots with it.
    assert r.events_sent == 200 and r.entries_sent == 11
    assert r.deferred_screenshots == 3
    assert [t for t, _, _ in prod.sent] == ["ev"] * 10 + ["hb"]
    # The bucket holds 12_000 - 10 * 1_003 - 103 = 1_867 bytes; a screenshot is 5_003.
    assert budget.available() == pytest.approx(1_867)
    assert r.next_delay_s == pytest.approx((5_003 - 1_867) / 10)
    assert sh.stats.wakeups == 1 and sh.stats.budget_overdraft_bytes == 0

    # New events keep flowing into an empty bucket: counted as overdraft, never held back.
    spool.append(SpoolEntry("events", b"emp", bytes(3_000), 5))
    r = sh.ship_once(1.0)
    assert r.events_sent == 5 and r.deferred_screenshots == 3
    assert sh.stats.budget_overdraft_bytes > 0

    clock.t += HOUR  # an hour later the bucket is full again (12_000): two screenshots fit
    r = sh.ship_once(1.0)
    assert r.entries_sent == 2 and r.deferred_screenshots == 1
    assert spool.stats().depth_by_role["screenshots"] == 1
    assert sh.stats.wakeups == 3


def test_no_budget_ships_everything_oldest_first(tmp_path: Path) -> None:
    clock = FakeClock()
    spool, sh, prod = make_shipper(tmp_path, None, clock)
    spool.append(SpoolEntry("screenshots", b"emp", b"s1", 0))
    spool.append(SpoolEntry("events", b"emp", b"e1", 3))
    spool.append(SpoolEntry("controls", b"emp", b"c1", 0))
    r = sh.ship_once(1.0)
    assert r.entries_sent == 3 and spool.stats().depth_entries == 0
    assert [v for _, _, v in prod.sent] == [b"e1", b"c1", b"s1"]  # non-screenshots first
    assert r.next_delay_s == sh.idle_delay_s
    r = sh.ship_once(1.0)
    assert r.entries_sent == 0 and sh.stats.wakeups == 1  # nothing sent: no wakeup


def test_retryable_failure_backs_off_with_jitter_and_keeps_entries(tmp_path: Path) -> None:
    clock = FakeClock()
    spool, sh, prod = make_shipper(tmp_path, None, clock)
    spool.append(SpoolEntry("events", b"emp", b"e1", 3))
    prod.fail = KafkaError(KafkaError._MSG_TIMED_OUT)
    delays = []
    for _ in range(5):
        r = sh.ship_once(1.0)
        assert r.retry and r.entries_sent == 0 and r.errors == {"_MSG_TIMED_OUT": 1}
        delays.append(r.next_delay_s)
        assert sh.ship_once(1.0).entries_sent == 0  # still backing off: nothing produced
        clock.t += r.next_delay_s
    for i, d in enumerate(delays):  # equal jitter: between half and all of base * 2**i
        assert sh.backoff_base_s * 2**i / 2 <= d <= sh.backoff_base_s * 2**i
    assert len(prod.sent) == 5 and spool.stats().depth_entries == 1
    prod.fail = None
    r = sh.ship_once(1.0)
    assert r.entries_sent == 1 and not r.retry and spool.stats().depth_entries == 0


def test_non_retryable_failure_is_isolated_then_dead_lettered(tmp_path: Path) -> None:
    clock = FakeClock()
    spool, sh, prod = make_shipper(tmp_path, None, clock)
    for i in range(3):
        spool.append(SpoolEntry("events", b"emp", b"e%d" % i, 1))
    prod.fail = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)
    r = sh.ship_once(1.0)  # the whole request batch was rejected: nobody is blamed yet
    assert r.deadlettered == 0 and spool.stats().depth_entries == 3
    prod.fail = None
    real_produce = prod.produce

    def produce(topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
        prod.fail = KafkaError(KafkaError.MSG_SIZE_TOO_LARGE) if value == b"e1" else None
        real_produce(topic, value, key, headers, on_delivery)

    prod.produce = produce  # type: ignore[method-assign]
    for _ in range(3):  # each suspect alone: only e1 is the culprit
        sh.ship_once(1.0)
    assert spool.stats().depth_entries == 0
    assert spool.stats().deadlettered_entries == {"MSG_SIZE_TOO_LARGE": 1}
    assert sh.stats.entries_sent == 2 and sh.stats.deadlettered == 1


def test_producer_is_always_idempotent_with_acks_all(tmp_path: Path) -> None:
    clock = FakeClock()
    spool = Spool(tmp_path, max_bytes=1 << 24, segment_bytes=64 << 10, fsync=False)
    made: list[FakeProducer] = []
    Shipper(spool, {"bootstrap.servers": "x:1", "enable.idempotence": False, "acks": 1}, TOPICS,
            clock=clock, producer_factory=lambda c: made.append(FakeProducer(c)) or made[-1])  # type: ignore[arg-type,func-returns-value]
    conf = made[0].conf
    assert conf["enable.idempotence"] is True and conf["acks"] == "all"
    assert conf["message.timeout.ms"] == 20_000
    with pytest.raises(ValueError, match="unknown topic roles"):
        Shipper(spool, {}, {"events": "e", "pictures": "p"}, producer_factory=FakeProducer)  # type: ignore[arg-type]
