"""Stream scale-out benchmark (issue #15): events/s with 1, 2 and 3 Faust workers on one topic set,
in ONE run on this machine, ratios against 1 worker.

    python -m bench.stream_scaleout [--events 1000000] [--workers 1 2 3] [--partitions 6]

Reuses bench/stream_throughput.py (broker, workload, worker processes, in-process sink, lag and
CPU meters). For each worker count, on fresh topics and a fresh embedded ClickHouse:

1. the sink (one, in a thread of this process) and N worker processes are started on empty topics
   and the benchmark waits until the stream's consumer group is stable with N members, so worker
   start-up and the joins' rebalances are outside the measurement;
2. the same workload (the synthetic pool, replayed as later windows, as in stream_throughput) is
   produced; the run ends when the stream's and the sink's groups have no lag;
3. rates: **stream** = events / (the moment the stream group's lag reached 0 − the first row's
   ``received_at``), what the workers sustain; **end to end** = events / (last ``stored_at`` −
   first ``received_at``), bounded by the one sink too. CPU-seconds per process in the window.

On a 2-core machine shared with the broker, the sink and other sessions, more workers cannot add
cores: expect ratios near 1 (the point is that N workers on one topic set are correct -- see
tests/integration/test_scale_out.py -- and the per-worker figure for docs/scaling.md).
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from bench.stream_throughput import (
    _US,
    CpuMeter,
    GroupLag,
    RunningSink,
    Worker,
    bench_policy,
    build_pool,
    machine_info,
    make_messages,
    make_settings,
    produce_all,
    publish_policy,
    start_broker,
    us_span,
)
from handtrace.core import clickhouse
from handtrace.core.admin import ensure_topics
from handtrace.core.clock import now_us
from handtrace.core.localbroker import LocalBroker
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics


def wait_group_stable(s: Settings, group: str, members: int, workers: list[Worker], timeout_s: float) -> float:
    """Seconds until ``group`` is Stable with ``members`` members (the workers have joined and
    been assigned); raises when a worker dies or on timeout."""
    admin = AdminClient(s.kafka.librdkafka())
    t = time.monotonic()
    while time.monotonic() - t < timeout_s:
        for w in workers:
            w.check()
        try:
            desc = admin.describe_consumer_groups([group])[group].result(timeout=10)
            if str(desc.state).endswith("STABLE") and len(desc.members) == members \
                    and all(m.assignment.topic_partitions for m in desc.members):
                return time.monotonic() - t
        except Exception:  # noqa: BLE001,S110 -- not created yet / coordinator loading
            pass
        time.sleep(0.5)
    raise RuntimeError(f"group {group} not stable with {members} members after {timeout_s:.0f}s:\n"
                       + "\n".join(w.tail(15) for w in workers))


def run_one(root: Path, bootstrap: str, tag: str, n: int, a: argparse.Namespace, msgs: list[Any],
            n_events: int, cutoff_us: int, meter: CpuMeter) -> dict[str, Any]:
    s = make_settings(root, bootstrap, tag, a.partitions, f"w{n}")
    topics = Topics.from_settings(s.topics)
    ensure_topics(s.kafka, s.topics)
    policy_path = root / f"policy-{n}.json"
    bench_policy(policy_path)
    publish_policy(s, policy_path)
    dsn = s.clickhouse_dsn()
    client = clickhouse.connect(dsn)
    sink = RunningSink(s, client)
    workers = [Worker("handtrace.stream", s, root / f"worker-{n}-{i}.log") for i in range(n)]
    lags = [GroupLag(s, s.stream.app_id, topics.events), GroupLag(s, s.sink.group_id, topics.stored)]
    try:
        for i, w in enumerate(workers):
            w.start()
            meter.watch(f"worker{i}", w.proc.pid if w.proc else None)
        joined = wait_group_stable(s, s.stream.app_id, n, workers, a.timeout)
        print(f"  {n} worker(s) joined and assigned in {joined:.1f} s", flush=True)
        produce_s, _ = produce_all(s, topics.events, msgs)
        t_stream = 0
        deadline = time.monotonic() + a.timeout
        while time.monotonic() < deadline:
            for w in workers:
                w.check()
            sink.check()
            if not t_stream and lags[0]() == 0:
                t_stream = now_us()
            if t_stream and lags[1]() == 0 and sink.sink.rows_inserted >= 1:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{n} worker(s): not drained after {a.timeout:.0f}s")
        time.sleep(1.0)  # the last flush's rows
        meter.sample()
        db = s.clickhouse.database
        rows, lo, hi = us_span(client, f"SELECT count(), toUnixTimestamp64Micro(min(received_at)), "
                                       f"toUnixTimestamp64Micro(max(stored_at)) FROM {db}.events "
                                       f"WHERE captured_at < fromUnixTimestamp64Micro({cutoff_us})")
        cpu = meter.between(lo, hi)
        return {"workers": n, "events": n_events, "rows": rows, "produce_s": produce_s,
                "stream_s": (t_stream - lo) / _US, "e2e_s": (hi - lo) / _US,
                "stream_eps": n_events / ((t_stream - lo) / _US), "e2e_eps": n_events / ((hi - lo) / _US),
                "cpu": {k: v for k, v in cpu.items() if v > 0}, "load": os.getloadavg()}
    finally:
        for w in workers:
            w.stop()
        for i in range(n):
            meter.unwatch(f"worker{i}")
        for lag in lags:
            lag.close()
        sink.stop()
        clickhouse.close(dsn)


def report(info: str, a: argparse.Namespace, res: list[dict[str, Any]]) -> str:
    base = res[0]
    lines = [info, "",
             f"workload: {base['events']:,} events, {a.partitions} partitions, one sink (in process); "
             "rates exclude worker start-up and group joins (workers joined before the data was produced)",
             "",
             "| workers | stream events/s | ÷ 1 worker | end-to-end events/s | ÷ 1 worker | stream events/s per worker "
             "| worker CPU-s | events per worker CPU-s | all CPU-s | load avg (1 min) after |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res:
        wcpu = sum(v for k, v in r["cpu"].items() if k.startswith("worker"))
        lines.append(
            f"| {r['workers']} | {r['stream_eps']:,.0f} | {r['stream_eps'] / base['stream_eps']:.2f}× | "
            f"{r['e2e_eps']:,.0f} | {r['e2e_eps'] / base['e2e_eps']:.2f}× | {r['stream_eps'] / r['workers']:,.0f} | "
            f"{wcpu:.1f} | {r['events'] / wcpu if wcpu else 0:,.0f} | {sum(r['cpu'].values()):.1f} | "
            f"{r['load'][0]:.2f} |")
    lines += ["", "Notes: " + "; ".join(
        f"{r['workers']} worker(s): produced in {r['produce_s']:.1f} s, stream drained {r['stream_s']:.1f} s, "
        f"stored {r['e2e_s']:.1f} s after the first micro-batch, {r['rows']:,} rows stored" for r in res)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_scaleout", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=1_000_000, help="events per worker count")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3],
                    help="worker counts (the first is the baseline)")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of every keyed topic")
    ap.add_argument("--devices", type=int, default=100, help="synthetic devices (one employee each)")
    ap.add_argument("--pool-events", type=int, default=300_000, help="distinct events generated, then replayed")
    ap.add_argument("--batch-seconds", type=float, default=30.0, help="activity per batch (one device)")
    ap.add_argument("--timeout", type=float, default=600.0, help="longest wait for a run to drain, seconds")
    a = ap.parse_args(argv)
    if any(n < 1 or n > a.partitions for n in a.workers):
        ap.error(f"worker counts must be between 1 and --partitions ({a.partitions})")

    info = machine_info()
    print(info, flush=True)
    root = Path(tempfile.mkdtemp(prefix="ht-scaleout-"))
    tag = uuid.uuid4().hex[:6]
    meter = CpuMeter()
    meter.watch("bench", os.getpid())
    broker: LocalBroker | None = None
    try:
        broker = start_broker(root, heap="1g")
        meter.watch("broker", broker.pid())
        print(f"broker {broker.bootstrap} up", flush=True)
        pool_events = min(a.pool_events, a.events)
        est_span = math.ceil(pool_events / (a.devices * 300) + 1) * a.batch_seconds * _US
        t0 = now_us() - (math.ceil(a.events / pool_events) + 1) * int(est_span) - 3600 * _US
        t0 -= t0 % (1000 * _US)
        pool, span = build_pool(a.devices, pool_events, a.batch_seconds, t0)
        msgs = make_messages(pool, span, a.events)
        n_events = sum(m.events for m in msgs)
        cutoff = now_us() - 60 * _US
        print(f"workload: {n_events:,} events in {len(msgs):,} batches", flush=True)
        res = []
        for n in a.workers:
            print(f"{n} worker(s)...", flush=True)
            r = run_one(root, broker.bootstrap, tag, n, a, msgs, n_events, cutoff, meter)
            print(f"  stream {r['stream_eps']:,.0f} events/s, end to end {r['e2e_eps']:,.0f} events/s", flush=True)
            res.append(r)
        print()
        print(report(info, a, res))
        return 0
    finally:
        meter.close()
        if broker is not None:
            broker.stop()


if __name__ == "__main__":
    raise SystemExit(main())
