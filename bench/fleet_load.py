"""Fleet load test (issue #15, capacity model): the largest fleet of simulated laptops this machine
sustains with bounded consumer lag, through the real broker, the real stream worker (subprocess)
and the sink (embedded ClickHouse, a thread of this process).

    python -m bench.fleet_load [--start-agents 1000] [--step-seconds 90] [--confirm-seconds 600]
                               [--plugged-share 0.5] [--json out.json]
    python -m bench.fleet_load --quick      # ~20 s of traffic from 40 laptops, the integration test's run

The laptop. Every simulated laptop sends what the agent sends in docs/BENCHMARKS.md "Agent
footprint": 26,516 events per hour (7.37 events/s, the synthetic user after coalescing), sealed
into a batch every ``durable_after_s`` (5 s) and shipped at each wakeup -- every 120 s on battery,
every 30 s on mains (the agent's settings ``battery_batch_interval_s`` and ``batch_interval_s``;
``--battery-interval`` / ``--plugged-interval`` / ``--plugged-share`` set the mix). A battery
laptop's wakeup is 24 messages of ~37 events, a plugged one's 6 (with an interval shorter than
the seal, one batch of that interval's events per wakeup). Wakeups of the fleet are spread evenly
over the interval (laptops are not synchronised), capture times lie in the 5-s window each batch
covers before its wakeup, ``sent_at`` and the ``ht-sent-at`` header are the wall clock at send.

The generator. The per-event Python simulator (``handtrace.agent.simulator``, one
SyntheticActivity per laptop, events generated one by one) generates and encodes ~22,000 events
per CPU-second (2,000-3,000 laptops per core before producing anything): on a 2-core machine it would
take the CPU the pipeline under test needs; it cannot stand for the fleet. Instead a pool of
real encoded batches of the synthetic user (``bench.stream_throughput.build_pool``, its batch
length calibrated so the mean batch holds 7.37 x 5 s events) is built once and replayed:
each message is a pool batch restamped (``restamp``: new UUIDv7 event ids, capture times, the
laptop's employee/device id and seq) -- numpy on whole batches. The generator runs as its own
process (``--produce``), paced on the wall clock, so its CPU is not the sink's; it reports how far
behind schedule it fell, and a step where it could not keep up is not counted as sustained.
The stream drops what the policy excludes (the synthetic user's leisure apps and domains, ~10 %):
stored < offered.

The search. Steps of ``--step-seconds`` (after ``--warmup-seconds`` not measured) at N laptops,
doubling from ``--start-agents`` until a step fails, then bisecting until the bracket is within
``--resolution``; then the largest N that held runs again for ``--confirm-seconds`` (10 minutes).
Between steps the backlog is drained (not measured). The worker and sink run through the whole
search (the warehouse grows as it would).

Bounded lag, the rule. Lag of the stream's group (raw topic) and of the sink's group (accepted
topic), in messages, sampled every second. Per group, over the measured window:
  1. p99 of the lag <= the messages that topic receives in one shipping interval (the fleet's
     shortest, ``--max-lag-s`` to override): the pipeline is never a whole wakeup cycle behind;
  2. not growing: the least-squares slope over the window's last ``--trend-seconds`` (60 s),
     extrapolated over 10 minutes, stays below that bound;
  3. the generator offered >= 97 % of the target events and no send failed.

Everything (broker JVM, worker, sink + embedded ClickHouse, the generator) shares this machine's
cores with whatever else runs: the load average is recorded; on a shared machine the N found is a
floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pickle  # noqa: S403 -- our own pool file, written by this process moments before
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, KafkaException, TopicPartition

from bench.stream_throughput import (
    REPO,
    CpuMeter,
    GroupLag,
    PoolBatch,
    RunningSink,
    Worker,
    bench_policy,
    build_pool,
    fast_producer,
    machine_info,
    make_settings,
    publish_policy,
    restamp,
    start_broker,
    wait_drained,
)
from handtrace.core import clickhouse
from handtrace.core.admin import ensure_topics
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.localbroker import LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.rows import HEADER_ROWS
from handtrace.core.settings import Settings, settings_env
from handtrace.core.topics import Topics
from handtrace.sink.schema import migrate

_US = 1_000_000
#: docs/BENCHMARKS.md "Agent footprint (issue #3)": events sent per hour by one laptop.
EVENTS_PER_HOUR = 26_516
LAPTOP_EPS = EVENTS_PER_HOUR / 3600
#: The agent's default seal (durable_after_s), battery and mains wakeup intervals.
_AGENT = Settings().agent
SEAL_S = _AGENT.durable_after_s
BATTERY_S = _AGENT.battery_batch_interval_s
PLUGGED_S = _AGENT.batch_interval_s
#: The synthetic user's raw event rate before coalescing (same benchmark: 41,553 raw events/hour).
SYNTHETIC_RAW_EPS = 41_553 / 3600


# ----------------------------------------------------------------------------- the fleet


@dataclass(frozen=True)
class LaptopClass:
    """Laptops sharing one wakeup interval."""

    name: str
    agents: int
    interval_s: float

    @property
    def batch_s(self) -> float:
        """Capture time per message: the seal, or the whole interval when that is shorter."""
        return min(SEAL_S, self.interval_s)

    @property
    def messages_per_wakeup(self) -> int:
        return max(1, round(self.interval_s / self.batch_s))


def fleet_classes(agents: int, plugged_share: float, battery_s: float, plugged_s: float) -> list[LaptopClass]:
    plugged = round(agents * plugged_share)
    return [c for c in (LaptopClass("battery", agents - plugged, battery_s), LaptopClass("plugged", plugged, plugged_s))
            if c.agents > 0]


def calibrated_pool(batch_s: float, devices: int, pool_events: int, t0_us: int) -> list[PoolBatch]:
    """Pool batches whose mean holds ``LAPTOP_EPS * batch_s`` events (the synthetic user is idle
    at times, so the window is calibrated on a first pool rather than computed)."""
    target = LAPTOP_EPS * batch_s
    window = batch_s * LAPTOP_EPS / SYNTHETIC_RAW_EPS
    pool: list[PoolBatch] = []
    for _ in range(3):
        pool, _span = build_pool(devices, pool_events, window, t0_us)
        mean = sum(b.count for b in pool) / len(pool)
        if abs(mean / target - 1) < 0.03:
            break
        window *= target / mean
    return pool


@dataclass
class ProduceConfig:
    """What one generator process does (passed as JSON on its command line)."""

    agents: int
    seconds: float
    plugged_share: float
    battery_s: float
    plugged_s: float
    pools: str  # pickle file: {batch_s: [PoolBatch]}
    status: str  # JSON file written every second and at the end
    step: int
    seed: int = 1


def produce_fleet(cfg: ProduceConfig, s: Settings) -> dict[str, Any]:
    """Send the fleet's messages on the wall clock for ``cfg.seconds``; returns the counts and a
    per-second series of what was sent."""
    with open(cfg.pools, "rb") as f:
        pools: dict[float, list[PoolBatch]] = pickle.load(f)  # noqa: S301 -- our own file
    topics = Topics.from_settings(s.topics)
    p = fast_producer(s, linger_ms=20)
    rng = np.random.default_rng(cfg.seed * 1000 + cfg.step)
    classes = fleet_classes(cfg.agents, cfg.plugged_share, cfg.battery_s, cfg.plugged_s)
    counts = {"sent_msgs": 0, "sent_events": 0, "delivered_msgs": 0, "delivered_events": 0, "failed": 0}
    errors: list[str] = []

    def on_delivery(n: int) -> Any:
        def cb(err: Any, _m: Any) -> None:
            if err is None:
                counts["delivered_msgs"] += 1
                counts["delivered_events"] += n
            else:
                counts["failed"] += 1
                if len(errors) < 5:
                    errors.append(str(err))
        return cb

    # Laptop k of a class wakes at k*I/n + m*I: the j-th wakeup of the class is laptop j % n at j*I/n.
    woken = [0] * len(classes)
    cursor = {c.batch_s: 0 for c in classes}
    seqs = np.zeros(cfg.agents, dtype=np.int64)
    first_id = [0, *np.cumsum([c.agents for c in classes]).tolist()]
    series: list[tuple[float, int, int]] = []
    behind_max = 0.0
    t0 = time.time()
    target_events = cfg.agents * LAPTOP_EPS * cfg.seconds
    next_status = t0

    def status(done: bool) -> dict[str, Any]:
        doc = {"t0": t0, "agents": cfg.agents, "target_events": target_events, "behind_max_s": behind_max,
               "errors": errors, "done": done, "series": series, **counts}
        tmp = cfg.status + ".tmp"
        Path(tmp).write_text(json.dumps(doc))
        os.replace(tmp, cfg.status)
        return doc

    while True:
        now = time.time()
        elapsed = now - t0
        if elapsed >= cfg.seconds:
            break
        sent_any = False
        for ci, c in enumerate(classes):
            due = math.floor(elapsed * c.agents / c.interval_s) + 1
            while woken[ci] < due:
                j = woken[ci]
                wake_at = t0 + j * c.interval_s / c.agents
                behind_max = max(behind_max, now - wake_at)
                agent = first_id[ci] + j % c.agents
                emp, dev = f"fleet-emp-{agent:06d}", f"fleet-dev-{agent:06d}"
                pool = pools[c.batch_s]
                sent_us = now_us()
                for k in range(c.messages_per_wakeup):
                    b = pool[cursor[c.batch_s] % len(pool)]
                    cursor[c.batch_s] += 1
                    end_us = sent_us - int((c.messages_per_wakeup - 1 - k) * c.batch_s * _US)
                    ts = b.ts - b.window_end_us + end_us
                    seqs[agent] += 1
                    payload = restamp(replace(b, employee_id=emp, device_id=dev), ts, rng,
                                      seq=cfg.step * 10_000_000 + int(seqs[agent]), sent_at_us=sent_us)
                    while True:
                        try:
                            p.produce(topics.events, key=emp.encode(), value=payload, on_delivery=on_delivery(b.count),
                                      headers=[(HEADER_SENT_AT, str(now_us()).encode())])
                            break
                        except BufferError:
                            p.poll(0.05)
                    counts["sent_msgs"] += 1
                    counts["sent_events"] += b.count
                woken[ci] += 1
                sent_any = True
        p.poll(0)
        if now >= next_status:
            series.append((now, counts["sent_events"], counts["sent_msgs"]))
            status(False)
            next_status += 1.0
        if not sent_any:
            nxt = min(t0 + (woken[ci]) * c.interval_s / c.agents for ci, c in enumerate(classes))
            time.sleep(min(max(nxt - time.time(), 0.0), 0.02))
    series.append((time.time(), counts["sent_events"], counts["sent_msgs"]))
    left = p.flush(120)
    if left:
        errors.append(f"{left} messages undelivered after 120 s")
    return status(True)


class Generator:
    """The generator process of one step (``python -m bench.fleet_load --produce CONFIG``)."""

    def __init__(self, cfg: ProduceConfig, s: Settings, log: Path) -> None:
        self.cfg = cfg
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        Path(cfg.status).unlink(missing_ok=True)
        self.log = log
        with open(log, "ab") as out:
            self.proc = spawn_owned([sys.executable, "-m", "bench.fleet_load", "--produce", json.dumps(cfg.__dict__)],
                                    env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def status(self) -> dict[str, Any] | None:
        try:
            return json.loads(Path(self.cfg.status).read_text())  # type: ignore[no-any-return]
        except (OSError, ValueError):
            return None

    def wait(self, timeout_s: float) -> dict[str, Any]:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError("the generator did not finish") from None
        st = self.status()
        if rc != 0 or st is None or not st.get("done"):
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"the generator exited with {rc}:\n{tail}")
        return st

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ----------------------------------------------------------------------------- sampling


def high_watermarks(lag: GroupLag) -> int:
    """Sum of the end offsets of the lag's topic (messages ever written)."""
    return sum(lag.c.get_watermark_offsets(tp, timeout=10, cached=False)[1] for tp in lag.tps)


@dataclass
class Sample:
    t: float
    stream_lag: int
    sink_lag: int
    raw_end: int
    accepted_end: int
    stored_rows: int
    load: float  # 1-minute load average


class Sampler:
    """Lag of both groups, topic ends and rows stored, every ``period_s``, in a thread."""

    def __init__(self, s: Settings, sink: RunningSink, period_s: float = 1.0) -> None:
        topics = Topics.from_settings(s.topics)
        self.stream = GroupLag(s, s.stream.app_id, topics.events)
        self.sink_lag = GroupLag(s, s.sink.group_id, topics.stored)
        self.sink = sink
        self.period_s = period_s
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="lag-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        nxt = time.time()
        while not self._stop.is_set():
            t = time.time()
            try:
                smp = Sample(t, self.stream(), self.sink_lag(), high_watermarks(self.stream),
                             high_watermarks(self.sink_lag), self.sink.sink.rows_inserted, os.getloadavg()[0])
            except KafkaException:
                smp = None
            if smp is not None:
                with self._lock:
                    self.samples.append(smp)
            nxt += self.period_s
            self._stop.wait(max(nxt - time.time(), 0.0))

    def between(self, t0: float, t1: float) -> list[Sample]:
        with self._lock:
            return [x for x in self.samples if t0 <= x.t <= t1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        self.stream.close()
        self.sink_lag.close()


# ----------------------------------------------------------------------------- one step


@dataclass
class Step:
    agents: int
    seconds: float
    kind: str  # "warm-up", "search" or "confirm"
    target_eps: float = 0.0
    offered_eps: float = 0.0
    stored_eps: float = 0.0
    behind_max_s: float = 0.0
    failed_sends: int = 0
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core over the window
    load: tuple[float, float] = (0.0, 0.0)  # 1-minute load average at start and end
    load_mean: float = 0.0  # ... its mean over the measured window
    held: bool = False
    why: list[str] = field(default_factory=list)


def group_stats(xs: np.ndarray, ts: np.ndarray, ends: np.ndarray, bound_s: float, trend_s: float) -> dict[str, float]:
    """Lag statistics of one group and its verdict inputs (lag in messages)."""
    dt = float(ts[-1] - ts[0]) if len(ts) > 1 else 0.0
    in_rate = float(ends[-1] - ends[0]) / dt if dt > 0 else 0.0  # messages/s into the topic
    bound = max(in_rate * bound_s, 1.0)
    last = ts >= ts[-1] - trend_s
    slope = float(np.polyfit(ts[last] - ts[0], xs[last], 1)[0]) if last.sum() >= 3 else 0.0
    p99 = float(np.percentile(xs, 99)) if len(xs) else math.nan
    return {"p50": float(np.percentile(xs, 50)) if len(xs) else math.nan, "p99": p99,
            "max": float(xs.max()) if len(xs) else math.nan, "in_msgs_per_s": in_rate, "bound": bound,
            "p99_s": p99 / in_rate if in_rate else math.nan, "slope_per_s": slope,
            "growth_10min": slope * 600, "samples": float(len(xs))}


@dataclass
class Run:
    """Everything one fleet-load run shares between steps."""

    s: Settings
    root: Path
    sampler: Sampler
    meter: CpuMeter
    worker: Worker
    sink: RunningSink
    pools_path: Path
    a: argparse.Namespace
    steps: list[Step] = field(default_factory=list)
    generators: int = 0

    @property
    def shortest_interval(self) -> float:
        share = self.a.plugged_share
        return min(([self.a.battery_interval] if share < 1 else []) + ([self.a.plugged_interval] if share > 0 else []))

    def check(self) -> None:
        self.worker.check()
        self.sink.check()

    def step(self, agents: int, seconds: float, kind: str) -> Step:
        a = self.a
        warm = a.warmup_seconds
        self.generators += 1
        cfg = ProduceConfig(agents=agents, seconds=warm + seconds, plugged_share=a.plugged_share,
                            battery_s=a.battery_interval, plugged_s=a.plugged_interval, pools=str(self.pools_path),
                            status=str(self.root / f"gen-{self.generators}.json"), step=self.generators,
                            seed=a.seed)
        load0 = os.getloadavg()[0]
        gen = Generator(cfg, self.s, self.root / f"gen-{self.generators}.log")
        self.meter.watch("generator", gen.proc.pid)
        try:
            t_print = time.time() + 10
            while gen.proc.poll() is None:
                self.check()
                time.sleep(0.5)
                if time.time() >= t_print:
                    t_print += 10
                    st, smp = gen.status(), self.sampler.between(time.time() - 3, time.time())
                    if st and smp:
                        el = time.time() - st["t0"]
                        print(f"    {el:5.0f}/{cfg.seconds:.0f} s  sent {st['sent_events'] / max(el, 1):9,.0f} events/s"
                              f"  lag stream {smp[-1].stream_lag:7,}  sink {smp[-1].sink_lag:5,} msgs"
                              f"  behind {st['behind_max_s']:.2f} s", flush=True)
            st = gen.wait(30)
        finally:
            gen.stop()
        self.meter.sample()
        self.meter.unwatch("generator")
        t_lo, t_hi = st["t0"] + warm, st["t0"] + warm + seconds
        res = Step(agents, seconds, kind, target_eps=agents * LAPTOP_EPS, load=(load0, os.getloadavg()[0]))
        ser = np.array(st["series"], dtype=np.float64)
        sent = np.interp([t_lo, t_hi], ser[:, 0], ser[:, 1])
        res.offered_eps = float(sent[1] - sent[0]) / seconds
        res.behind_max_s, res.failed_sends = float(st["behind_max_s"]), int(st["failed"])
        smp = self.sampler.between(t_lo, t_hi)
        if len(smp) < max(3, seconds * 0.5):
            raise RuntimeError(f"only {len(smp)} lag samples in a {seconds:.0f} s window")
        ts = np.array([x.t for x in smp])
        res.load_mean = float(np.mean([x.load for x in smp]))
        res.stored_eps = (smp[-1].stored_rows - smp[0].stored_rows) / float(ts[-1] - ts[0])
        bound_s = a.max_lag_s or self.shortest_interval
        for name, lag_of, end_of in (("stream", "stream_lag", "raw_end"), ("sink", "sink_lag", "accepted_end")):
            ok = [x for x in smp if getattr(x, lag_of) >= 0]
            res.groups[name] = group_stats(np.array([getattr(x, lag_of) for x in ok], dtype=np.float64),
                                           np.array([x.t for x in ok]), np.array([getattr(x, end_of) for x in ok]),
                                           bound_s, a.trend_seconds)
        res.cpu = {k: v / seconds for k, v in self.meter.between(int(t_lo * _US), int(t_hi * _US)).items()}
        # The verdict (the rule in the module docstring).
        for name, g in res.groups.items():
            if g["p99"] > g["bound"]:
                res.why.append(f"{name} lag p99 {g['p99']:,.0f} > bound {g['bound']:,.0f} msgs "
                               f"({bound_s:g} s of input)")
            if g["growth_10min"] > g["bound"]:
                res.why.append(f"{name} lag growing {g['slope_per_s']:,.1f} msgs/s")
        if res.offered_eps < 0.97 * res.target_eps:
            res.why.append(f"generator offered {res.offered_eps:,.0f} of {res.target_eps:,.0f} events/s")
        if res.failed_sends or st["errors"]:
            res.why.append(f"{res.failed_sends} sends failed: {st['errors'][:2]}")
        res.held = not res.why
        self.steps.append(res)
        g1, g2 = res.groups["stream"], res.groups["sink"]
        print(f"  {kind} {agents:,} laptops, {seconds:.0f} s: offered {res.offered_eps:,.0f} events/s, stored "
              f"{res.stored_eps:,.0f}; lag p99 stream {g1['p99']:,.0f} msgs ({g1['p99_s']:.1f} s), sink "
              f"{g2['p99']:,.0f} msgs ({g2['p99_s']:.1f} s); "
              + ("HELD" if res.held else "NOT HELD: " + "; ".join(res.why)), flush=True)
        return res

    def drain(self, timeout_s: float) -> bool:
        """Wait until both groups have no lag (between steps; not measured)."""
        topics = Topics.from_settings(self.s.topics)
        lags = [GroupLag(self.s, self.s.stream.app_id, topics.events),
                GroupLag(self.s, self.s.sink.group_id, topics.stored)]
        try:
            return wait_drained(lags, lambda: self.sink.sink.rows_inserted, self.check, timeout_s,
                                "the backlog to drain")
        finally:
            for lag in lags:
                lag.close()


def search(run: Run, deadline: float) -> int:
    """Doubling then bisection; returns the largest N that held (0: none did)."""
    a = run.a
    lo, hi, n = 0, 0, a.start_agents
    cost = a.warmup_seconds + a.step_seconds + 20
    while time.time() + cost < deadline and len([x for x in run.steps if x.kind == "search"]) < a.max_steps:
        print(f"step: {n:,} laptops ({n * LAPTOP_EPS:,.0f} events/s)", flush=True)
        res = run.step(n, a.step_seconds, "search")
        if not run.drain(a.drain_timeout):
            print("  ! the backlog did not drain; search stops here", flush=True)
            if res.held:
                lo = max(lo, n)
            break
        if res.held:
            lo = n
            n = n * 2 if not hi else (lo + hi) // 2
        else:
            hi = n
            n = n // 2 if not lo else (lo + hi) // 2
        if lo and hi and hi <= lo * (1 + a.resolution):
            break
        if n < 1:
            break
    return lo


# ----------------------------------------------------------------------------- verification


def accepted_rows(s: Settings) -> int:
    """Rows the stream accepted: the ``ht-rows`` header of every message on the accepted topic."""
    topic = Topics.from_settings(s.topics).stored
    c = Consumer({**s.kafka.librdkafka(), "group.id": f"fleet-verify-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "log_level": 3})
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)]
        ends = {tp.partition: c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps}
        todo = {p for p, e in ends.items() if e > 0}
        c.assign([TopicPartition(topic, tp.partition, -2) for tp in tps])
        rows, idle = 0, 0
        while todo and idle < 30:
            msgs = c.consume(num_messages=5000, timeout=1.0)
            idle = 0 if msgs else idle + 1
            for m in msgs:
                if m.error() is not None:
                    continue
                rows += int(dict(m.headers() or [])[HEADER_ROWS])
                if m.offset() >= ends[m.partition()] - 1:
                    todo.discard(m.partition())
        if todo:
            raise RuntimeError(f"could not read the accepted topic to its end (partitions {sorted(todo)})")
        return rows
    finally:
        c.close()


# ----------------------------------------------------------------------------- report


def _cpu(step: Step, name: str) -> str:
    v = step.cpu.get(name)
    return f"{100 * v:.0f} %" if v is not None else "–"


def _per_cpu(step: Step, name: str) -> str:
    """Stored events per CPU-second of one process: less sensitive to other load than events/s."""
    v = step.cpu.get(name)
    return f"{step.stored_eps / v:,.0f}" if v else "–"


def report(run: Run, info: str, best: int, verify: dict[str, Any] | None) -> str:
    a = run.a
    classes = fleet_classes(max(best, 1000), a.plugged_share, a.battery_interval, a.plugged_interval)
    mix = ", ".join(f"{c.name} {c.agents / max(best, 1000):.0%} (wakeup every {c.interval_s:g} s, "
                    f"{c.messages_per_wakeup} messages of {LAPTOP_EPS * c.batch_s:.0f} events)" for c in classes)
    lines = [info, "",
             f"laptop: {EVENTS_PER_HOUR:,} events/hour ({LAPTOP_EPS:.2f} events/s); mix {mix}; "
             f"{a.partitions} partitions; bound = {a.max_lag_s or run.shortest_interval:g} s of input, trend over the "
             f"last {a.trend_seconds:g} s extrapolated to 10 min; warm-up {a.warmup_seconds:g} s per step not measured",
             "",
             "| step | laptops | s | events/s target | offered | stored | stream lag p99 / max msgs (s of input) "
             "| sink lag p99 / max msgs (s of input) | CPU worker | CPU sink+CH | CPU broker | CPU generator "
             "| stored events per CPU-s worker / sink+CH "
             "| load 1-min mean (start→end) | held |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for st in run.steps:
        g1, g2 = st.groups["stream"], st.groups["sink"]
        lines.append(
            f"| {st.kind} | {st.agents:,} | {st.seconds:.0f} | {st.target_eps:,.0f} | {st.offered_eps:,.0f} | "
            f"{st.stored_eps:,.0f} | {g1['p99']:,.0f} / {g1['max']:,.0f} ({g1['p99_s']:.1f}) | "
            f"{g2['p99']:,.0f} / {g2['max']:,.0f} ({g2['p99_s']:.1f}) | {_cpu(st, 'worker')} | {_cpu(st, 'bench')} | "
            f"{_cpu(st, 'broker')} | {_cpu(st, 'generator')} | {_per_cpu(st, 'worker')} / {_per_cpu(st, 'bench')} | "
            f"{st.load_mean:.1f} ({st.load[0]:.1f}→{st.load[1]:.1f}) | "
            + ("yes" if st.held else "no: " + "; ".join(st.why)) + " |")
    conf = [x for x in run.steps if x.kind == "confirm"]
    lines.append("")
    if conf:
        c = conf[-1]
        lines.append(f"result: {c.agents:,} laptops for {c.seconds:.0f} s: "
                     + ("HELD" if c.held else "NOT HELD (" + "; ".join(c.why) + ")")
                     + f"; offered {c.offered_eps:,.0f} events/s, stored {c.stored_eps:,.0f} events/s; lag p99 "
                     f"stream {c.groups['stream']['p99']:,.0f} msgs, sink {c.groups['sink']['p99']:,.0f} msgs")
    else:
        lines.append(f"result: largest fleet that held in the search: {best:,} laptops (no confirm run)")
    if verify:
        lines.append(f"verify: {verify['accepted']:,} events accepted by the stream (accepted topic), "
                     f"{verify['stored']:,} rows stored ({verify['distinct']:,} distinct event ids) of "
                     f"{verify['delivered']:,} delivered: " + ("every accepted event stored once" if verify["ok"]
                                                              else "MISMATCH"))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet_load", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="40 laptops for ~20 s, no search, then verify (the integration test's run)")
    ap.add_argument("--start-agents", type=int, default=1000, help="first step of the search")
    ap.add_argument("--step-seconds", type=float, default=90.0, help="measured length of a search step")
    ap.add_argument("--warmup-seconds", type=float, default=20.0, help="unmeasured start of every step")
    ap.add_argument("--confirm-seconds", type=float, default=600.0, help="measured length of the confirm run (0: none)")
    ap.add_argument("--agents", type=int, default=0, help="no search: run this many laptops for --confirm-seconds")
    ap.add_argument("--search-minutes", type=float, default=30.0, help="no search step starts after this")
    ap.add_argument("--max-steps", type=int, default=12, help="search steps at most")
    ap.add_argument("--resolution", type=float, default=0.1, help="stop bisecting when hi <= lo * (1 + this)")
    ap.add_argument("--plugged-share", type=float, default=0.5, help="share of laptops on mains power (0..1)")
    ap.add_argument("--battery-interval", type=float, default=BATTERY_S, help="wakeup interval on battery, s")
    ap.add_argument("--plugged-interval", type=float, default=PLUGGED_S, help="wakeup interval on mains, s")
    ap.add_argument("--max-lag-s", type=float, default=0.0,
                    help="lag bound in seconds of input (default: the fleet's shortest wakeup interval)")
    ap.add_argument("--trend-seconds", type=float, default=60.0, help="window of the growth check")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of every keyed topic")
    ap.add_argument("--drain-timeout", type=float, default=300.0, help="longest wait for the backlog between steps")
    ap.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                    help="at the end, check stored rows against the accepted topic (default: on with --quick)")
    ap.add_argument("--bootstrap", default=None, help="use this Kafka cluster instead of starting a local broker")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument("--json", type=Path, default=None, help="also write the steps as JSON here")
    ap.add_argument("--produce", default=None, help=argparse.SUPPRESS)  # the generator process
    a = ap.parse_args(argv)
    if a.produce:
        produce_fleet(ProduceConfig(**json.loads(a.produce)), Settings())
        return 0
    if not 0 <= a.plugged_share <= 1:
        ap.error("--plugged-share must be between 0 and 1")
    if a.start_agents < 1 or a.agents < 0 or a.step_seconds < 10:
        ap.error("--start-agents must be >= 1, --agents >= 0, --step-seconds >= 10")
    if a.quick:
        a.agents = a.agents or 40
        a.confirm_seconds, a.warmup_seconds = 15.0, 5.0
        a.verify = True if a.verify is None else a.verify
    return run_main(a)


def run_main(a: argparse.Namespace) -> int:
    info = machine_info()
    print(info, flush=True)
    t_start = time.time()
    root = Path(tempfile.mkdtemp(prefix="ht-fleet-"))
    tag = uuid.uuid4().hex[:6]
    broker: LocalBroker | None = None
    worker: Worker | None = None
    sink: RunningSink | None = None
    sampler: Sampler | None = None
    dsn: str | None = None
    meter = CpuMeter()
    meter.watch("bench", os.getpid())
    try:
        if a.bootstrap:
            bootstrap = a.bootstrap
        else:
            broker = start_broker(root, heap="1g")
            bootstrap = broker.bootstrap
            meter.watch("broker", broker.pid())
            print(f"broker {bootstrap} up", flush=True)
        s = make_settings(root, bootstrap, tag, a.partitions, "fleet")
        ensure_topics(s.kafka, s.topics)
        policy_path = root / "policy.json"
        bench_policy(policy_path)
        publish_policy(s, policy_path)

        t = time.perf_counter()
        lengths = {c.batch_s for c in fleet_classes(1000, a.plugged_share, a.battery_interval, a.plugged_interval)}
        t0 = now_us() - 7 * 24 * 3600 * _US  # the pool's own times do not matter: every message is restamped
        pools = {bs: calibrated_pool(bs, 50, 20_000, t0) for bs in sorted(lengths)}
        pools_path = root / "pools.pkl"
        pools_path.write_bytes(pickle.dumps(pools))
        print("pool: " + ", ".join(f"{len(p):,} batches of {bs:g} s, mean {np.mean([b.count for b in p]):.1f} events "
                                   f"(target {LAPTOP_EPS * bs:.1f})" for bs, p in pools.items())
              + f", built in {time.perf_counter() - t:.1f} s", flush=True)

        dsn = s.clickhouse_dsn()
        client = clickhouse.connect(dsn)
        migrate(client, s.clickhouse.database)
        sink = RunningSink(s, client)
        worker = Worker("handtrace.stream", s, root / "worker.log")
        worker.start()
        meter.watch("worker", worker.proc.pid if worker.proc else None)
        sampler = Sampler(s, sink)
        run = Run(s, root, sampler, meter, worker, sink, pools_path, a)

        # Warm-up: the worker joins its group and the first batches flow (not reported as a step).
        print("warm-up: 20 laptops until the first rows are stored", flush=True)
        warm = run.step(20, 10, "warm-up")
        if not run.drain(180) or sink.sink.rows_inserted == 0:
            raise RuntimeError("the pipeline did not store the warm-up traffic")
        run.steps.remove(warm)

        best = a.agents
        if not a.agents:
            best = search(run, t_start + a.search_minutes * 60)
            print(f"search: largest fleet that held: {best:,} laptops", flush=True)
        if best and a.confirm_seconds > 0:
            print(f"confirm: {best:,} laptops for {a.confirm_seconds:.0f} s", flush=True)
            run.step(best, a.confirm_seconds, "confirm")
        verify = None
        if a.verify:
            if not run.drain(a.drain_timeout):
                raise RuntimeError("the backlog did not drain before verification")
            db = s.clickhouse.database
            stored, distinct = client.query(f"SELECT count(), uniqExact(event_id) FROM {db}.events").result_rows[0]
            delivered = sum(int(json.loads(p.read_text())["delivered_events"]) for p in root.glob("gen-*.json"))
            acc = accepted_rows(s)
            verify = {"accepted": acc, "stored": int(stored), "distinct": int(distinct), "delivered": delivered,
                      "ok": acc == int(stored) == int(distinct) and 0 < acc <= delivered}
        out = report(run, info, best, verify)
        print("\n" + out, flush=True)
        if a.json:
            a.json.write_text(json.dumps({"info": info, "best": best, "verify": verify,
                                          "steps": [st.__dict__ for st in run.steps], "args": vars(a)},
                                         indent=2, default=str))
        print(f"total run time {time.time() - t_start:.0f} s")
        conf = [x for x in run.steps if x.kind == "confirm"]
        return 0 if (verify is None or verify["ok"]) and (not conf or conf[-1].held or a.quick) else 1
    except (RuntimeError, KafkaException, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        if worker is not None:
            print(f"--- worker log tail:\n{worker.tail()}", file=sys.stderr)
        return 1
    finally:
        if sampler is not None:
            sampler.close()
        meter.close()
        if worker is not None:
            worker.stop()
        if sink is not None:
            sink.stop()
        if dsn is not None:
            with contextlib.suppress(Exception):
                clickhouse.close(dsn)
        if broker is not None:
            broker.stop()
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
