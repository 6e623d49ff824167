"""Stream throughput benchmark: handtrace end to end against the raw Kafka → ClickHouse limit and a
per-event Faust baseline, plus capture → queryable latency, in ONE run on this machine with the
Kafka broker co-located.

    python -m bench.stream_throughput [--events 2000000] [--baseline-events 150000]
                                      [--latency-seconds 30] [--devices 100]

The defaults take about 2 minutes on the 2-core dev machine (broker start included); run it with
the machine otherwise quiet. ``--events 200000 --baseline-events 30000 --latency-seconds 10`` is a
~45 s smoke run whose rates are dominated by fixed delays (sink flush interval), not a measurement.

Phases (each cleans up after itself; the broker is started on free ports and stopped at the end):

0. Workload, before any timing: a pool of distinct batches from the synthetic source (one device's
   activity over ``--batch-seconds`` = 30 s, ~360 events per batch, ``--devices`` devices), each
   encoded once as the agent does. The pool is replayed as further time windows of the same devices
   to reach ``--events``: each copy gets new unique UUIDv7 event ids and capture times shifted by
   the pool's span, patched into the encoded bytes (event_id and captured_at_us are the first two
   fields of every Event record; a microsecond timestamp's varint is 8 bytes for any date from 1979
   to 3111, so the patch never changes a length). Then all messages are produced to the raw events topic
   (confluent-kafka, idempotent, zstd, keyed by employee id, murmur2 like the agents).
   Then, in this process and untimed relative to the rest: processing alone on the first
   ``--in-process-events`` events, one thread, no I/O -- handtrace's ``BatchPipeline`` in
   micro-batches vs the baseline's per-event rules -- and a check that both keep exactly the same
   rows with the same values (so the baseline really implements the same rules).
1. raw limit (2 variants): a confluent-kafka consumer reads the same raw-topic bytes and inserts
   them into ClickHouse as Arrow with no processing at all --
   (a) **rows** (the reference of the ratio): the minimum needed to have rows: each group of
       ``--raw-group-messages`` messages is parsed, its event blocks decoded in one polars call and
       the batch header's ids broadcast per row; a second thread inserts each group with
       ``insert_arrow`` into a MergeTree table ordered like ``events`` (decode and insert overlap,
       as the stream and the sink do);
   (b) **opaque bytes**: one row per message (partition, offset, key, payload), same grouping:
       the cost of moving the bytes alone (events counted are the events inside the messages).
2. handtrace: the sink runs in a thread of this process (embedded ClickHouse in a temp dir), then
   the real Faust worker (``python -m handtrace.stream``, HANDTRACE_* env with unique topics, app id
   and state dir) is started on the backlog, after a policy that allows the synthetic work apps was
   published. Done when the stream's and the sink's consumer groups have no lag and the stored row
   count is stable. Rate = events consumed / (last row's ``stored_at`` − first row's
   ``received_at``): ``received_at`` is stamped by the worker when it hands its first micro-batch
   to the pipeline, so the worker's start-up (process start, group join, table recovery, policy
   read) is excluded; it is reported separately.
3. latency (same worker and sink, now idle): batches are produced at a fixed rate (half the rate
   of phase 2 unless ``--latency-rate``; one producer thread, paced) with every event's
   ``captured_at`` = the moment it is sent; per stored row, queryable − captured_at, where
   queryable is when the sink's insert holding the row returned (noted by the sink's
   ``on_insert`` hook); p50/p99/p99.9/max. ClickHouse's own ``stored_at − captured_at``
   (``stored_at`` is stamped while the insert runs, so slightly earlier) is printed too.
4. per-event Faust baseline (``bench/baseline_faust_app.py``): same rules, per event, fastavro
   decode and ``client.insert`` of Python rows, as a Faust worker subprocess with its own embedded
   ClickHouse, on the first ``--baseline-events`` events (its own topic); rate measured the same way
   (its rows' first ``received_at`` to last ``stored_at``) -- compare rates, not totals.

Machine note: everything (broker JVM, Faust worker, sink, ClickHouse engine) shares the same cores.
CPU-seconds used in each measured window by this process (sink thread, embedded ClickHouse, raw
consumer), the worker subprocess and the broker JVM are reported too (sampled with psutil every
0.2 s, interpolated to the window): events per CPU-second is less sensitive than a wall-clock rate
to other load on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from handtrace.agent import synthetic
from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import clickhouse, codec, ids
from handtrace.core.admin import ensure_topics
from handtrace.core.clock import now_us
from handtrace.core.localbroker import KAFKA_VERSION, BrokerError, LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.producer import producer_config
from handtrace.core.rows import ipc_stream
from handtrace.core.settings import Settings, settings_env
from handtrace.core.topics import Topics
from handtrace.sink.schema import migrate
from handtrace.sink.writer import Sink

REPO = Path(__file__).resolve().parents[1]
_US = 1_000_000


# ----------------------------------------------------------------------------- helpers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(root: Path, **kw: Any) -> LocalBroker:
    """A local broker on free ports under ``root`` (one retry on other ports: another process
    may take a port between our check and the JVM's bind)."""
    for attempt in range(2):
        port = free_port()
        broker = LocalBroker(root / f"kafka{attempt}", port, next(p for p in iter(free_port, None) if p != port),
                             **kw)
        try:
            broker.start(timeout_s=120, echo=False)
            return broker
        except BrokerError as e:
            print(f"  broker start failed ({e}); retrying on other ports", flush=True)
    raise RuntimeError("could not start the Kafka broker")


def machine_info() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    import chdb
    import confluent_kafka
    import faust

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"machine: {cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, load avg at start {load}\n"
            f"Python {platform.python_version()}, faust {faust.__version__}, polars {pl.__version__}, "
            f"pyarrow {pa.__version__}, chdb {chdb.__version__}, confluent-kafka {confluent_kafka.version()[0]}, "
            f"Apache Kafka {KAFKA_VERSION} (KRaft, single node, same machine)")


class Worker:
    """A Faust worker subprocess (its own process group), log to a file."""

    def __init__(self, module: str, settings: Settings, log: Path) -> None:
        self.module, self.settings, self.log = module, settings, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")},
               **settings_env(self.settings),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        with open(self.log, "ab") as out:
            # Owned: it dies with the benchmark, even when that is killed with SIGKILL.
            self.proc = spawn_owned([sys.executable, "-m", self.module], env=env, cwd=REPO,
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def check(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.module} exited with {self.proc.returncode}:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:]) if self.log.exists() else ""


class GroupLag:
    """Uncommitted messages of a consumer group on a topic (does not join the group)."""

    def __init__(self, s: Settings, group: str, topic: str) -> None:
        self.c = Consumer({**s.kafka.librdkafka(), "group.id": group, "enable.auto.commit": False,
                           "log_level": 3})
        md = self.c.list_topics(topic, timeout=10).topics[topic]
        self.tps = [TopicPartition(topic, p) for p in sorted(md.partitions)]

    def committed(self) -> dict[int, int]:
        for attempt in range(5):
            try:
                return {tp.partition: tp.offset for tp in self.c.committed(self.tps, timeout=10)}
            except KafkaException:
                if attempt == 4:
                    raise
                time.sleep(1)
        return {}

    def __call__(self) -> int:
        """The lag, or -1 when the broker could not tell just now (e.g. NOT_COORDINATOR while the
        group coordinator loads): never 0 by mistake."""
        lag = 0
        try:
            for tp in self.c.committed(self.tps, timeout=10):
                lo, hi = self.c.get_watermark_offsets(tp, timeout=10, cached=False)
                lag += max(hi - (tp.offset if tp.offset >= 0 else lo), 0)
        except KafkaException:
            return -1
        return lag

    def close(self) -> None:
        self.c.close()


class CpuMeter:
    """CPU time of named processes (this one, the worker, the broker) sampled in a background
    thread, so that CPU can be attributed to a measured window by interpolation."""

    def __init__(self, period_s: float = 0.2) -> None:
        self.period_s = period_s
        self.pids: dict[str, int] = {}
        self.samples: dict[str, list[tuple[int, float]]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._thread.start()

    def watch(self, name: str, pid: int | None) -> None:
        if pid:
            with self._lock:
                self.pids[name] = pid
                self.samples[name] = []

    def unwatch(self, name: str) -> None:
        with self._lock:
            self.pids.pop(name, None)

    def sample(self) -> None:
        import psutil

        with self._lock:
            pids = dict(self.pids)
        for name, pid in pids.items():
            try:
                t = psutil.Process(pid).cpu_times()
            except Exception:  # noqa: BLE001,S112 -- the process is gone
                continue
            with self._lock:
                if name in self.samples:
                    self.samples[name].append((now_us(), float(t.user + t.system)))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.sample()

    def between(self, t0_us: int, t1_us: int) -> dict[str, float]:
        """CPU-seconds each watched process used in [t0, t1] (linear between samples)."""
        out = {}
        with self._lock:
            for name, pts in self.samples.items():
                if len(pts) >= 2:
                    ts, vs = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
                    out[name] = float(np.interp(t1_us, ts, vs) - np.interp(t0_us, ts, vs))
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def wait_drained(lags: list[GroupLag], progress: Callable[[], int] | None, check: Callable[[], None],
                 timeout_s: float, what: str) -> bool:
    """Until every lag (in order) is 0 and ``progress`` is unchanged over two polls; False on timeout."""
    deadline = time.monotonic() + timeout_s
    last, stable = -1, 0
    while time.monotonic() < deadline:
        check()
        if all(lag() == 0 for lag in lags):
            cur = progress() if progress else 0
            stable = stable + 1 if cur == last else 0
            last = cur
            if stable >= 2:
                return True
        else:
            stable = 0
        time.sleep(0.5)
    print(f"  ! timed out after {timeout_s:.0f}s waiting for {what}", flush=True)
    return False


def quiesce(client: Any, timeout_s: float = 20.0) -> None:
    """Let ClickHouse's background merges of the previous phase finish before the next one."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if int(client.query("SELECT count() FROM system.merges").result_rows[0][0]) == 0:
            return
        time.sleep(0.5)


def us_span(client: Any, sql: str) -> tuple[int, int, int]:
    """(count, first received_at µs, last stored_at µs) of a query returning those three."""
    n, lo, hi = client.query(sql).result_rows[0]
    return int(n), int(lo), int(hi)


# ----------------------------------------------------------------------------- workload


@dataclass
class PoolBatch:
    """One encoded batch of the pool and where its event ids and capture times sit."""

    employee_id: str
    device_id: str
    block: np.ndarray  # uint8, the events block as encode_events_block wrote it
    offsets: np.ndarray  # int64, start of each Event record (its event_id)
    ts: np.ndarray  # int64, captured_at_us of each event
    id_tail: np.ndarray  # (n, 2) uint8: bytes 6-7 of each event id (version + rank)
    window_end_us: int
    window: int

    @property
    def count(self) -> int:
        return len(self.offsets)


def _varint8(values: np.ndarray) -> np.ndarray:
    """Avro zig-zag varints of non-negative timestamps in [2**48, 2**55) µs: exactly 8 bytes each."""
    zz = values.astype(np.uint64) << np.uint64(1)
    if len(zz) and (zz.min() < np.uint64(1 << 49) or zz.max() >= np.uint64(1 << 56)):
        raise ValueError("timestamp outside the 8-byte varint range")
    out = np.empty((len(zz), 8), dtype=np.uint8)
    for k in range(7):
        out[:, k] = ((zz >> np.uint64(7 * k)) & np.uint64(0x7F)) | np.uint64(0x80)
    out[:, 7] = zz >> np.uint64(49)
    return out


def build_pool(devices: int, pool_events: int, batch_s: float, t0_us: int) -> tuple[list[PoolBatch], int]:
    """Distinct batches: window by window, every device's activity; returns (pool, span in µs)."""
    step = int(batch_s * _US)
    acts = [SyntheticActivity(seed=1000 + i) for i in range(devices)]
    pool: list[PoolBatch] = []
    n, w = 0, 0
    while n < pool_events:
        for i, a in enumerate(acts):
            events = a.events_between(t0_us + w * step, t0_us + (w + 1) * step)
            if not events:
                continue
            block = codec.encode_events_block(events)
            offsets = np.empty(len(events), dtype=np.int64)
            pos = 0
            for j, e in enumerate(events):
                o = block.find(e["event_id"], pos)
                assert o >= pos, "event id not found in its block"
                offsets[j] = o
                pos = o + 16
            arr = np.frombuffer(block, dtype=np.uint8)
            ts = np.array([e["captured_at_us"] for e in events], dtype=np.int64)
            idx = offsets[:, None] + np.arange(16, 24)
            assert (arr[idx] == _varint8(ts)).all(), "captured_at_us is not where expected"
            id_tail = arr[offsets[:, None] + np.arange(6, 8)].copy()
            pool.append(PoolBatch(f"emp-{i:05d}", f"dev-{i:05d}", arr, offsets, ts, id_tail,
                                  t0_us + (w + 1) * step, w))
            n += len(events)
        w += 1
    return pool, w * step


def restamp(b: PoolBatch, ts: np.ndarray, rng: np.random.Generator, seq: int, sent_at_us: int) -> bytes:
    """The batch as a new message: new unique UUIDv7 event ids for capture times ``ts``."""
    arr = b.block.copy()
    n = b.count
    ms = (ts // 1000).astype(">u8").view(np.uint8).reshape(n, 8)[:, 2:]
    lo = (rng.integers(0, 1 << 62, size=n, dtype=np.uint64) | np.uint64(2 << 62)).astype(">u8")
    ids_ = np.concatenate([ms, b.id_tail, lo.view(np.uint8).reshape(n, 8)], axis=1)
    arr[b.offsets[:, None] + np.arange(16)] = ids_
    arr[b.offsets[:, None] + np.arange(16, 24)] = _varint8(ts)
    header = {"batch_id": ids.uuid7_bytes(sent_at_us // 1000), "employee_id": b.employee_id,
              "device_id": b.device_id, "agent_version": "bench", "os": "linux", "seq": seq,
              "sent_at_us": sent_at_us}
    return codec.encode_event_batch(header, block=arr.tobytes(), count=n)


@dataclass
class Message:
    key: bytes
    value: bytes
    events: int


def make_messages(pool: list[PoolBatch], span_us: int, total_events: int, seed: int = 7) -> list[Message]:
    """Copies of the pool as successive time windows of the same devices, until total_events."""
    rng = np.random.default_rng(seed)
    out: list[Message] = []
    n, k = 0, 0
    while n < total_events:
        shift = k * span_us
        for b in pool:
            if n >= total_events:
                break
            payload = restamp(b, b.ts + shift, rng, seq=k * 1_000_000 + b.window, sent_at_us=b.window_end_us + shift)
            out.append(Message(b.employee_id.encode(), payload, b.count))
            n += b.count
        k += 1
    return out


@dataclass
class Delivery:
    errors: list[str] = field(default_factory=list)
    placed: list[tuple[int, int, int]] = field(default_factory=list)  # partition, offset, events


def fast_producer(s: Settings, linger_ms: int) -> Producer:
    return Producer(producer_config(s.kafka, **{
        "compression.type": "zstd", "linger.ms": linger_ms, "batch.size": 4_000_000,
        "message.max.bytes": s.topics.max_message_bytes, "queue.buffering.max.kbytes": 2_000_000,
        "queue.buffering.max.messages": 1_000_000}))


def produce_all(s: Settings, topic: str, msgs: list[Message]) -> tuple[float, Delivery]:
    """Produce every message, wait for the acks; returns (seconds, deliveries)."""
    p = fast_producer(s, linger_ms=20)
    d = Delivery()

    def cb(n: int) -> Callable[[Any, Any], None]:
        def on(err: Any, m: Any) -> None:
            if err is not None:
                d.errors.append(str(err))
            else:
                d.placed.append((m.partition(), m.offset(), n))
        return on

    t = time.perf_counter()
    for m in msgs:
        while True:
            try:
                p.produce(topic, key=m.key, value=m.value, on_delivery=cb(m.events))
                break
            except BufferError:
                p.poll(0.05)
        p.poll(0)
    left = p.flush(120)
    dt = time.perf_counter() - t
    if left or d.errors:
        raise RuntimeError(f"produce failed: {left} undelivered, errors {d.errors[:3]}")
    return dt, d


def bench_policy(path: Path) -> dict[str, Any]:
    """deploy/policy.example.json with every synthetic *work* app allowed."""
    doc = json.loads((REPO / "deploy" / "policy.example.json").read_text())
    work = [a.app_id for a in synthetic.DEFAULT_APPS if a.work]
    doc["allowed_apps"] = sorted(set(doc["allowed_apps"]) | set(work))
    for a in work:
        doc["text_capture"].setdefault(a, doc["text_capture"].get("*", "masked"))
    path.write_text(json.dumps(doc))
    return doc


def publish_policy(s: Settings, path: Path) -> None:
    from handtrace.control.publish import policy_record, publish

    publish(s, policy_record(path, actor="bench", reason="stream throughput benchmark"))


# ----------------------------------------------------------------------------- phases

RAW_DDL = """
CREATE TABLE IF NOT EXISTS {db}.bench_raw_events
(
    event_id UUID, captured_at_us DateTime64(6, 'UTC'), kind LowCardinality(String),
    x Nullable(Int32), y Nullable(Int32), button LowCardinality(String), pressed Nullable(Bool),
    scroll_dx Nullable(Int32), scroll_dy Nullable(Int32), key_code Nullable(Int32), modifiers Nullable(Int32),
    text Nullable(String), text_masked Bool, app_id LowCardinality(Nullable(String)),
    window_title Nullable(String), url Nullable(String), screenshot_sha256 Nullable(String),
    screenshot_bytes Nullable(Int32), screenshot_format LowCardinality(String),
    screenshot_width Nullable(Int32), screenshot_height Nullable(Int32),
    employee_id String, device_id String, batch_id UUID,
    stored_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree ORDER BY (employee_id, captured_at_us, event_id)
"""

BYTES_DDL = """
CREATE TABLE IF NOT EXISTS {db}.bench_raw_bytes
(
    partition Int32, offset Int64, key String, payload String,
    stored_at DateTime64(6, 'UTC') DEFAULT now64(6)
)
ENGINE = MergeTree ORDER BY (partition, offset)
"""


def _raw_consumer(s: Settings, topic: str) -> Consumer:
    c = Consumer({**s.kafka.librdkafka(), "group.id": f"bench-raw-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024,
                  "max.partition.fetch.bytes": s.topics.max_message_bytes * 2, "log_level": 3})
    md = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, -2) for p in md.partitions])  # -2: OFFSET_BEGINNING
    return c


def _rows_table(msgs: list[Any]) -> pa.Table:
    """Decode a group of messages' events in one call, header ids broadcast per row."""
    parsed = [codec.parse_event_batch(m.value()) for m in msgs]
    fp = parsed[0].fingerprint
    assert all(p.fingerprint == fp and p.frame is None for p in parsed)
    events = codec.decode_batches(fp, parsed)  # the stream's own decoder
    idx = np.repeat(np.arange(len(parsed), dtype=np.uint32), [p.count for p in parsed])
    hdr = pl.DataFrame({"employee_id": [p.header["employee_id"] for p in parsed],
                        "device_id": [p.header["device_id"] for p in parsed],
                        "batch_id": [p.header["batch_id"] for p in parsed]})
    t = events.with_columns(hdr.select(pl.all().gather(idx))).to_arrow()
    fixed = {"event_id", "batch_id"}
    return t.cast(pa.schema([pa.field(f.name, pa.binary(16) if f.name in fixed else f.type) for f in t.schema]))


RAW_INSERTS = ("arrow", "stream", "stream-lz4")


def phase_raw(s: Settings, client: Any, meter: CpuMeter, topic: str, n_msgs: int, n_events: int, *,
              opaque: bool, group_messages: int, insert: str = "arrow") -> dict[str, Any]:
    """Consume the raw topic from the start and insert as Arrow; decode/build in this thread, the
    inserts in a second one (pipelined, as the stream and sink are). ``insert``: ``arrow`` is
    clickhouse-connect's insert_arrow (Arrow file format, uncompressed); ``stream`` and
    ``stream-lz4`` serialise an ArrowStream (uncompressed, lz4 buffers) and raw_insert it -- the
    way the handtrace sink inserts."""
    if insert not in RAW_INSERTS:
        raise ValueError(f"insert must be one of {RAW_INSERTS}")
    db = s.clickhouse.database
    table = f"{db}.bench_raw_bytes" if opaque else f"{db}.bench_raw_events"
    c = _raw_consumer(s, topic)
    q: queue.Queue[pa.Table | None] = queue.Queue(maxsize=4)
    failed: list[BaseException] = []

    def inserter() -> None:
        while (t := q.get()) is not None:
            try:
                if failed:
                    continue
                if insert == "arrow":
                    client.insert_arrow(table, t)
                else:
                    data = ipc_stream(t, "lz4" if insert == "stream-lz4" else None)
                    client.raw_insert(table, t.schema.names, data, fmt="ArrowStream")
            except BaseException as e:  # noqa: BLE001 -- reported by the consuming thread
                failed.append(e)

    th = threading.Thread(target=inserter, name="raw-insert", daemon=True)
    th.start()
    got = 0
    t_first: int | None = None
    pending: list[Any] = []
    try:
        while got < n_msgs and not failed:
            want = min(group_messages - len(pending), n_msgs - got)  # never wait for messages that will not come
            batch = [m for m in c.consume(num_messages=want, timeout=1.0) if m.error() is None]
            if batch and t_first is None:
                t_first = now_us()
            got += len(batch)
            pending += batch
            if len(pending) >= group_messages or (got >= n_msgs and pending):
                if opaque:
                    q.put(pa.table({
                        "partition": pa.array([m.partition() for m in pending], pa.int32()),
                        "offset": pa.array([m.offset() for m in pending], pa.int64()),
                        "key": pa.array([m.key() for m in pending], pa.binary()),
                        "payload": pa.array([m.value() for m in pending], pa.binary())}))
                else:
                    q.put(_rows_table(pending))
                pending = []
    finally:
        q.put(None)
        th.join(300)
        c.close()
    meter.sample()
    if failed:
        raise RuntimeError(f"raw insert failed: {failed[0]}")
    n, hi = client.query(f"SELECT count(), toUnixTimestamp64Micro(max(stored_at)) FROM {table}").result_rows[0]
    assert t_first is not None
    expect = n_msgs if opaque else n_events
    assert int(n) == expect, f"{table}: {n} rows, expected {expect}"
    elapsed = (int(hi) - t_first) / _US
    return {"events": n_events, "rows": int(n), "seconds": elapsed, "eps": n_events / elapsed,
            "cpu": meter.between(t_first, int(hi))}


class InsertTimes:
    """When each of the sink's inserts returned (its rows are queryable from then on), with the
    capture times of its rows; fed by the sink's ``on_insert`` hook."""

    def __init__(self) -> None:
        self.record = False
        self.done: list[tuple[int, np.ndarray]] = []

    def __call__(self, tables: list[pa.Table]) -> None:
        if self.record and tables:
            t = now_us()
            self.done.append((t, np.concatenate([pc.cast(tb.column("captured_at"), pa.int64()).to_numpy()
                                                 for tb in tables])))


class RunningSink:
    """The handtrace sink in a thread of this process (it owns the embedded ClickHouse)."""

    def __init__(self, s: Settings, client: Any) -> None:
        self.client = client
        self.inserts = InsertTimes()
        self.sink = Sink(s, client, on_insert=self.inserts)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sink.run, args=(self.stop_event,), name="sink", daemon=True)
        self.thread.start()

    def check(self) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the sink thread died")

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)


def phase_handtrace(s: Settings, client: Any, meter: CpuMeter, worker: Worker, sink: RunningSink,
                    n_events: int, cutoff_us: int, timeout_s: float) -> dict[str, Any]:
    topics = Topics.from_settings(s.topics)
    lags = [GroupLag(s, s.stream.app_id, topics.events), GroupLag(s, s.sink.group_id, topics.stored)]
    t_launch = now_us()
    worker.start()
    meter.watch("worker", worker.proc.pid if worker.proc else None)

    def check() -> None:
        worker.check()
        sink.check()

    try:
        ok = wait_drained(lags, lambda: sink.sink.rows_inserted, check, timeout_s, "handtrace to drain")
    finally:
        for lag in lags:
            lag.close()
    t_drained = now_us()
    meter.sample()
    db = s.clickhouse.database
    n, lo, hi = us_span(client, f"SELECT count(), toUnixTimestamp64Micro(min(received_at)), "
                                f"toUnixTimestamp64Micro(max(stored_at)) FROM {db}.events "
                                f"WHERE captured_at < fromUnixTimestamp64Micro({cutoff_us})")
    elapsed = (hi - lo) / _US
    return {"events": n_events, "rows": n, "seconds": elapsed, "eps": n_events / elapsed,
            "startup_s": (lo - t_launch) / _US, "wall_s": (t_drained - t_launch) / _US, "drained": ok,
            "cpu": meter.between(lo, hi), "sink_flushes": sink.sink.flushes}


def phase_latency(s: Settings, client: Any, meter: CpuMeter, worker: Worker, sink: RunningSink,
                  pool: list[PoolBatch], rate: float, seconds: float) -> dict[str, Any]:
    topics = Topics.from_settings(s.topics)
    p = fast_producer(s, linger_ms=5)
    rng = np.random.default_rng(11)
    errors: list[str] = []
    sink.inserts.done.clear()
    sink.inserts.record = True
    start = now_us()
    t0 = time.perf_counter()
    sent, i = 0, 0
    next_at = t0
    while True:
        now = time.perf_counter()
        if now - t0 >= seconds:
            break
        if now < next_at:
            time.sleep(min(next_at - now, 0.05))
            continue
        b = pool[i % len(pool)]
        i += 1
        t = now_us()
        ts = t - np.arange(b.count - 1, -1, -1, dtype=np.int64)  # captured now, in order
        p.produce(topics.events, key=b.employee_id.encode(), value=restamp(b, ts, rng, seq=10**9 + i, sent_at_us=t),
                  on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
        p.poll(0)
        sent += b.count
        next_at += b.count / rate
        if i % 200 == 0:
            worker.check()
    produce_s = time.perf_counter() - t0
    p.flush(60)
    end = now_us()
    if errors:
        raise RuntimeError(f"latency produce errors: {errors[:3]}")
    lags = [GroupLag(s, s.stream.app_id, topics.events), GroupLag(s, s.sink.group_id, topics.stored)]
    try:
        wait_drained(lags, lambda: sink.sink.rows_inserted, lambda: (worker.check(), sink.check()), 120,
                     "the latency phase to drain")
    finally:
        for lag in lags:
            lag.close()
    sink.inserts.record = False
    # Queryable: when the insert holding the row returned, minus its capture time.
    lat_s = np.concatenate([done - cap[cap >= start] for done, cap in sink.inserts.done] or [np.zeros(0)]) / _US
    db = s.clickhouse.database
    lat = "(toUnixTimestamp64Micro(stored_at) - toUnixTimestamp64Micro(captured_at)) / 1e6"
    n, q = client.query(
        f"SELECT count(), quantilesExact(0.5, 0.99)({lat}) FROM {db}.events "
        f"WHERE captured_at >= fromUnixTimestamp64Micro({start})").result_rows[0]
    if len(lat_s) != int(n):
        print(f"  ! {len(lat_s):,} rows timed at insert, {int(n):,} rows stored", flush=True)
    p50, p99, p999 = np.percentile(lat_s, [50, 99, 99.9]) if len(lat_s) else (math.nan,) * 3
    return {"target_eps": rate, "achieved_eps": sent / produce_s, "events": sent, "rows": int(n),
            "p50": float(p50), "p99": float(p99), "p999": float(p999),
            "max": float(lat_s.max()) if len(lat_s) else math.nan, "stored_at_p50": q[0], "stored_at_p99": q[1],
            "seconds": produce_s, "cpu": meter.between(start, end)}


def phase_in_process(s: Settings, policy_path: Path, msgs: list[Message]) -> dict[str, Any]:
    """Processing alone, one thread, no Kafka and no ClickHouse: handtrace's pipeline in micro-batches
    vs the baseline's per-event rules on the same messages -- and a check that both keep exactly
    the same rows with the same values (the baseline implements the same rules)."""
    from bench.baseline_faust_app import COLUMNS, Rules
    from handtrace.control.publish import policy_record
    from handtrace.stream.app import build_pipeline
    from handtrace.stream.pipeline import SourceMessage
    from handtrace.stream.policy import EmployeeControls, Policy

    policy = Policy.from_record(policy_record(policy_path, actor="bench")["policy"])
    src = [SourceMessage(m.value, i % s.topics.partitions, i, m.key) for i, m in enumerate(msgs)]
    n = sum(m.events for m in msgs)
    pipe = build_pipeline(s)
    step = s.stream.micro_batch_messages
    t = time.perf_counter()
    tables = [tb for i in range(0, len(src), step)
              for tb in pipe.process_many(src[i:i + step], now_us(), policy=policy, controls={}).rows.values()]
    ht_s = time.perf_counter() - t
    assert s.stream.pseudonym_key is not None
    rules = Rules(s, policy, s.stream.pseudonym_key.get_secret_value().encode())
    t = time.perf_counter()
    rows = [r for m in src for r in rules.process_message(m.payload, m.partition, m.offset, EmployeeControls())]
    base_s = time.perf_counter() - t
    # Same rows, same stored values?
    ht = {r["event_id"]: r for tb in tables for r in tb.to_pylist()}
    cols = ("employee_key", "device_key", "kind", "x", "y", "button", "pressed", "key_code", "modifiers", "text",
            "text_masked", "app_id", "window_title", "url", "screenshot_sha256")
    mismatched = 0
    for r in rows:
        b = dict(zip(COLUMNS, r, strict=True))
        h = ht.get(b["event_id"].bytes)
        if h is None or any(h[c] != b[c] for c in cols):
            mismatched += 1
    same = mismatched == 0 and len(rows) == len(ht)
    return {"events": n, "handtrace_rows": len(ht), "baseline_rows": len(rows), "same_rows": same,
            "mismatched": mismatched, "handtrace_eps": n / ht_s, "baseline_eps": n / base_s}


def _query_subprocess(dsn: str, sql: str) -> list[Any]:
    """Query an embedded ClickHouse dir from a fresh process (this one has another dir open)."""
    code = ("import json, sys\nfrom handtrace.core import clickhouse\n"
            "c = clickhouse.connect(sys.argv[1])\n"
            "print(json.dumps([list(r) for r in c.query(sys.argv[2]).result_rows], default=str))\n"
            "clickhouse.close(sys.argv[1])\n")
    out = subprocess.run([sys.executable, "-c", code, dsn, sql], capture_output=True, text=True, check=True,
                         timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def phase_baseline(s: Settings, meter: CpuMeter, msgs: list[Message], policy_path: Path, worker: Worker,
                   timeout_s: float) -> dict[str, Any]:
    topics = Topics.from_settings(s.topics)
    ensure_topics(s.kafka, s.topics)
    publish_policy(s, policy_path)
    _, delivered = produce_all(s, topics.events, msgs)
    n_events = sum(m.events for m in msgs)
    lag = GroupLag(s, s.stream.app_id, topics.events)
    t_launch = now_us()
    worker.start()
    meter.watch("worker", worker.proc.pid if worker.proc else None)
    try:
        ok = wait_drained([lag], None, worker.check, timeout_s, "the baseline to drain")
        consumed = n_events
        if not ok:  # rate from what it committed
            committed = lag.committed()
            consumed = sum(n for p, o, n in delivered.placed if o < committed.get(p, -1))
        t_drained = now_us()
        meter.sample()
    finally:
        lag.close()
        worker.stop()
    db = s.clickhouse.database
    n, lo, hi = _query_subprocess(
        s.clickhouse_dsn(), f"SELECT count(), toUnixTimestamp64Micro(min(received_at)), "
                            f"toUnixTimestamp64Micro(max(stored_at)) FROM {db}.events")[0]
    lo, hi = int(lo), int(hi)
    elapsed = (hi - lo) / _US
    return {"events": consumed, "rows": int(n), "seconds": elapsed, "eps": consumed / elapsed,
            "startup_s": (lo - t_launch) / _US, "wall_s": (t_drained - t_launch) / _US,
            "drained": ok, "cpu": meter.between(lo, hi)}


# ----------------------------------------------------------------------------- main


def make_settings(root: Path, bootstrap: str, tag: str, partitions: int, name: str) -> Settings:
    return Settings(
        state_dir=root / f"state-{name}",
        dev_mode=True,  # a generated control-plane key pair signs the policy (ADR 0009)
        kafka={"bootstrap_servers": bootstrap},
        topics={"prefix": f"bench{tag}{name}", "partitions": partitions},
        stream={"app_id": f"bench-{name}-{tag}", "metrics_port": 0,
                "pseudonym_key": "bench-pseudonym-key-" + "k" * 32, "log_level": "warn"},
        sink={"group_id": f"bench-sink-{name}-{tag}", "metrics_port": 0},
    )


def _fmt(x: float) -> str:
    return f"{x:,.0f}"


def _cpu(r: dict[str, Any]) -> float:
    return sum(r.get("cpu", {}).values())


NAMES = {
    "raw_rows": ("raw limit: consume → decode to Arrow → insert as Arrow (fastest of three ways), "
                 "no processing (**reference**)"),
    "raw_bytes": "raw, opaque bytes: consume → payloads as binary rows → insert_arrow",
    "handtrace": "**handtrace end to end**: Faust worker → accepted topic → sink → ClickHouse",
    "baseline": "per-event Faust baseline: fastavro dicts → Python rules → client.insert rows",
}


def report(a: argparse.Namespace, info: str, prep: dict[str, Any], res: dict[str, Any]) -> str:
    st = prep["settings"]
    lines = [info, "",
             f"workload: {prep['events']:,} events in {prep['messages']:,} batches "
             f"({prep['events'] / prep['messages']:.0f} events/batch = {a.batch_seconds:g} s of one device; "
             f"{a.devices} devices; {prep['pool_events']:,} distinct events generated, replayed as later "
             f"windows with new ids), {prep['bytes'] / prep['events']:.1f} B/event Avro, {a.partitions} partitions; "
             f"produced before timing in {prep['produce_s']:.1f} s "
             f"({prep['events'] / prep['produce_s']:,.0f} events/s, zstd)",
             f"handtrace steps: {prep['steps']}; micro-batch {st.stream.micro_batch_messages} messages / "
             f"{st.stream.micro_batch_wait_s:g} s; sink flush {st.sink.flush_rows:,} rows / "
             f"{st.sink.flush_interval_s:g} s",
             "",
             "| measurement | events | rows stored | seconds | events/s | CPU-s (all processes) | events per CPU-s |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for k, name in NAMES.items():
        r = res.get(k)
        if r is None:
            continue
        cpu = _cpu(r)
        lines.append(f"| {name} | {r['events']:,} | {r['rows']:,} | {r['seconds']:.1f} | {_fmt(r['eps'])} | "
                     f"{cpu:.1f} | {_fmt(r['events'] / cpu) if cpu else '–'} |")
    ip = res.get("in_process")
    if ip:
        lines.append(f"| in process, one thread, no I/O: handtrace pipeline (micro-batches of "
                     f"{st.stream.micro_batch_messages}) | {ip['events']:,} | {ip['handtrace_rows']:,} | – | "
                     f"{_fmt(ip['handtrace_eps'])} | – | – |")
        lines.append(f"| in process, one thread, no I/O: baseline's per-event rules (fastavro + Python) | "
                     f"{ip['events']:,} | {ip['baseline_rows']:,} | – | {_fmt(ip['baseline_eps'])} | – | – |")
    lines += ["", "| ratio | value | target |", "|---|---:|---:|"]
    ht, raw, base, lat = res.get("handtrace"), res.get("raw_rows"), res.get("baseline"), res.get("latency")
    if ht and raw:
        lines.append(f"| raw limit (rows) ÷ handtrace, events/s: handtrace is this many times slower | "
                     f"{raw['eps'] / ht['eps']:.2f}× | ≤ 3× |")
    if ht and res.get("raw_bytes"):
        lines.append(f"| raw opaque bytes ÷ handtrace, events/s | "
                     f"{res['raw_bytes']['eps'] / ht['eps']:.2f}× | (info) |")
    if ht and base:
        lines.append(f"| handtrace ÷ per-event baseline, events/s | {ht['eps'] / base['eps']:.1f}× | ≥ 10× |")
        if _cpu(ht) and _cpu(base):
            lines.append(f"| handtrace ÷ per-event baseline, events per CPU-second | "
                         f"{(ht['events'] / _cpu(ht)) / (base['events'] / _cpu(base)):.1f}× | (info) |")
    if ip:
        lines.append(f"| in process: handtrace pipeline ÷ per-event rules (processing alone) | "
                     f"{ip['handtrace_eps'] / ip['baseline_eps']:.1f}× | (info) |")
    if lat:
        lines.append(f"| latency capture → queryable, p99 at {_fmt(lat['achieved_eps'])} events/s | "
                     f"{lat['p99']:.2f} s | ≤ 5 s |")
    lines += ["", "Notes:"]
    if raw:
        variants = ", ".join(f"{m} {_fmt(v)}" for m, v in raw.get("variants", {}).items())
        lines.append(f"- raw: one consumer thread decodes groups of {a.raw_group_messages} messages (parse + one "
                     "polars Avro call + header ids broadcast), a second thread inserts each group into a "
                     "MergeTree table ordered like `events`; timed from the first consumed message to the last "
                     "row's stored_at. Measured with each way of inserting Arrow (events/s: "
                     f"{variants}; `arrow` = insert_arrow, `stream`/`stream-lz4` = an ArrowStream through "
                     f"raw_insert, as the sink does); the fastest, `{raw.get('insert', 'arrow')}`, is the reference.")
    if ht:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in ht["cpu"].items())
        lines.append(f"- handtrace: timed from the worker's first micro-batch (min received_at) to the last row's "
                     f"stored_at; worker start-up {ht['startup_s']:.1f} s excluded (launch → drained wall clock "
                     f"{ht['wall_s']:.1f} s); {ht['events'] - ht['rows']:,} events dropped by the policy "
                     f"(leisure apps and domains); {ht['sink_flushes']} sink flushes; CPU-s: {cpu} "
                     "(bench = sink thread + embedded ClickHouse + polling).")
    if base:
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in base["cpu"].items())
        lines.append(f"- baseline: the first {base['events']:,} events of the same workload on its own topic, "
                     f"own embedded ClickHouse; timed the same way, start-up {base['startup_s']:.1f} s excluded; "
                     f"CPU-s: {cpu}" + ("" if base["drained"] else "; TIMED OUT: rate from committed offsets") + ".")
    if ip:
        verdict = ("identical (same event ids, same stored values)" if ip["same_rows"] else
                   f"DIFFERENT ({ip['mismatched']:,} rows differ; {ip['handtrace_rows']:,} vs {ip['baseline_rows']:,})")
        lines.append(f"- same rules: on the first {ip['events']:,} events the baseline's rows and handtrace's are "
                     f"{verdict}.")
    if lat:
        lines.append(f"- latency: {lat['events']:,} events in {lat['seconds']:.0f} s, paced at "
                     f"{_fmt(lat['target_eps'])} events/s (achieved {_fmt(lat['achieved_eps'])}), captured_at = send "
                     f"time; {lat['rows']:,} rows stored; queryable (the sink's insert holding the row returned) − "
                     f"captured_at: p50 {lat['p50']:.2f} s, p99 {lat['p99']:.2f} s, p99.9 {lat['p999']:.2f} s, "
                     f"max {lat['max']:.2f} s (ClickHouse's stored_at − captured_at: p50 {lat['stored_at_p50']:.2f} s, "
                     f"p99 {lat['stored_at_p99']:.2f} s); CPU-s: "
                     + ", ".join(f"{k} {v:.1f}" for k, v in lat["cpu"].items()) + ".")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.stream_throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=2_000_000, help="events for the raw and handtrace phases")
    ap.add_argument("--baseline-events", type=int, default=150_000,
                    help="events for the per-event baseline (slow; its rate is compared, not its total)")
    ap.add_argument("--in-process-events", type=int, default=50_000,
                    help="events for the in-process comparison of processing alone (and the same-rows check)")
    ap.add_argument("--devices", type=int, default=100, help="synthetic devices (one employee each)")
    ap.add_argument("--pool-events", type=int, default=300_000,
                    help="distinct events generated and encoded; replayed with new ids to reach --events")
    ap.add_argument("--batch-seconds", type=float, default=30.0, help="activity per batch (one device)")
    ap.add_argument("--partitions", type=int, default=6, help="partitions of every keyed topic")
    ap.add_argument("--raw-group-messages", type=int, default=100,
                    help="messages decoded and inserted together in the raw phase")
    ap.add_argument("--latency-seconds", type=float, default=30.0, help="length of the latency phase")
    ap.add_argument("--latency-rate", type=float, default=0.0,
                    help="events/s of the latency phase (default: half the handtrace rate)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["raw", "latency", "baseline"],
                    help="phases to leave out (baseline also leaves out the in-process comparison)")
    ap.add_argument("--timeout", type=float, default=600.0, help="longest wait for a phase to drain, seconds")
    ap.add_argument("--bootstrap", default=None, help="use this Kafka cluster instead of starting a local broker")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data) for inspection")
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    a = ap.parse_args(argv)

    info = machine_info()
    print(info, flush=True)
    root = Path(tempfile.mkdtemp(prefix="ht-bench-"))
    tag = uuid.uuid4().hex[:6]
    broker: LocalBroker | None = None
    workers: list[Worker] = []
    sink: RunningSink | None = None
    dsns: list[str] = []
    meter = CpuMeter()
    meter.watch("bench", os.getpid())
    res: dict[str, Any] = {}
    t_all = time.perf_counter()
    try:
        if a.bootstrap:
            bootstrap = a.bootstrap
        else:
            broker = start_broker(root, heap="1g")
            bootstrap = broker.bootstrap
            meter.watch("broker", broker.pid())
            print(f"broker {broker.bootstrap} up", flush=True)
        s = make_settings(root, bootstrap, tag, a.partitions, "ht")
        topics = Topics.from_settings(s.topics)
        ensure_topics(s.kafka, s.topics)
        policy_path = root / "policy.json"
        bench_policy(policy_path)
        publish_policy(s, policy_path)

        # ---- workload (not timed)
        t = time.perf_counter()
        pool_events = min(a.pool_events, a.events)
        # All data lies in the past; the replayed copies follow each other in time.
        est_span = math.ceil(pool_events / (a.devices * 300) + 1) * a.batch_seconds * _US
        t0 = now_us() - (math.ceil(a.events / pool_events) + 1) * int(est_span) - 3600 * _US
        t0 -= t0 % (1000 * _US)
        pool, span = build_pool(a.devices, pool_events, a.batch_seconds, t0)
        msgs = make_messages(pool, span, a.events)
        cutoff = now_us() - 60 * _US
        assert pool[-1].window_end_us + (len(msgs) // len(pool) + 1) * span < cutoff, "workload must lie in the past"
        n_events = sum(m.events for m in msgs)
        from handtrace.stream.app import build_pipeline

        steps = ", ".join(st.name for st in build_pipeline(s).steps)
        prep = {"events": n_events, "messages": len(msgs), "pool_events": sum(b.count for b in pool),
                "bytes": sum(len(m.value) for m in msgs), "prep_s": time.perf_counter() - t, "steps": steps,
                "settings": s}
        print(f"workload: {n_events:,} events, {len(msgs):,} batches, prepared in {prep['prep_s']:.1f} s", flush=True)
        prep["produce_s"], _ = produce_all(s, topics.events, msgs)
        print(f"produced in {prep['produce_s']:.1f} s", flush=True)

        # ---- 0. processing alone, in this process (not timed with the rest)
        if "baseline" not in a.skip:
            sample, k = [], 0
            for m in msgs:
                if k >= a.in_process_events:
                    break
                sample.append(m)
                k += m.events
            res["in_process"] = phase_in_process(s, policy_path, sample)
            ip = res["in_process"]
            print(f"in process: handtrace pipeline {ip['handtrace_eps']:,.0f} events/s, per-event rules "
                  f"{ip['baseline_eps']:,.0f} events/s; same rows: {ip['same_rows']}", flush=True)

        dsn = s.clickhouse_dsn()
        dsns.append(dsn)
        client = clickhouse.connect(dsn)
        migrate(client, s.clickhouse.database)

        # ---- 1. raw limit
        if "raw" not in a.skip:
            client.command(RAW_DDL.format(db=s.clickhouse.database))
            client.command(BYTES_DDL.format(db=s.clickhouse.database))
            quiesce(client)
            # Every way of inserting Arrow we have; the fastest is the reference.
            variants: dict[str, dict[str, Any]] = {}
            for mode in RAW_INSERTS:
                client.command(f"TRUNCATE TABLE {s.clickhouse.database}.bench_raw_events")
                quiesce(client)
                variants[mode] = phase_raw(s, client, meter, topics.events, len(msgs), n_events, opaque=False,
                                           group_messages=a.raw_group_messages, insert=mode)
                print(f"raw limit (rows, {mode}): {variants[mode]['eps']:,.0f} events/s", flush=True)
            best = max(variants, key=lambda m: variants[m]["eps"])
            res["raw_rows"] = {**variants[best], "insert": best,
                               "variants": {m: v["eps"] for m, v in variants.items()}}
            print(f"raw limit (rows): {res['raw_rows']['eps']:,.0f} events/s ({best})", flush=True)
            quiesce(client)
            res["raw_bytes"] = phase_raw(s, client, meter, topics.events, len(msgs), n_events, opaque=True,
                                         group_messages=a.raw_group_messages)
            print(f"raw opaque bytes: {res['raw_bytes']['eps']:,.0f} events/s", flush=True)
            quiesce(client)

        # ---- 2. handtrace end to end
        sink = RunningSink(s, client)
        worker = Worker("handtrace.stream", s, root / "worker-handtrace.log")
        workers.append(worker)
        res["handtrace"] = phase_handtrace(s, client, meter, worker, sink, n_events, cutoff, a.timeout)
        print(f"handtrace: {res['handtrace']['eps']:,.0f} events/s", flush=True)

        # ---- 3. latency at half the maximum rate
        if "latency" not in a.skip:
            rate = a.latency_rate or res["handtrace"]["eps"] / 2
            res["latency"] = phase_latency(s, client, meter, worker, sink, pool, rate, a.latency_seconds)
            print(f"latency: p99 {res['latency']['p99']:.2f} s at {res['latency']['achieved_eps']:,.0f} events/s",
                  flush=True)
        worker.stop()
        meter.unwatch("worker")
        sink.stop()
        sink = None

        # ---- 4. per-event Faust baseline
        if "baseline" not in a.skip:
            sb = make_settings(root, bootstrap, tag, a.partitions, "base")
            dsns.append(sb.clickhouse_dsn())
            take, n = [], 0
            for m in msgs:
                if n >= a.baseline_events:
                    break
                take.append(m)
                n += m.events
            bworker = Worker("bench.baseline_faust_app", sb, root / "worker-baseline.log")
            workers.append(bworker)
            res["baseline"] = phase_baseline(sb, meter, take, policy_path, bworker, a.timeout)
            print(f"baseline: {res['baseline']['eps']:,.0f} events/s", flush=True)

        print(f"\ntotal run time {time.perf_counter() - t_all:.0f} s\n")
        out = report(a, info, prep, res)
        print(out)
        if a.json:
            prep.pop("settings")
            a.json.write_text(json.dumps({"prep": prep, "results": res}, indent=2, default=str))
        return 0
    except (RuntimeError, KafkaException, AssertionError, subprocess.CalledProcessError) as e:
        print(f"error: {e}", file=sys.stderr)
        for w in workers:
            print(f"--- {w.module} log tail:\n{w.tail()}", file=sys.stderr)
        return 1
    finally:
        meter.close()
        for w in workers:
            w.stop()
        if sink is not None:
            sink.stop()
        for d in dsns:
            clickhouse.close(d)
        if broker is not None:
            broker.stop()
        if a.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
