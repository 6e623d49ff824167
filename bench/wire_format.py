"""Wire-format benchmark: bytes/event and decode rate of candidate batch encodings, measured
in one run on the same realistic batches, with ratios against the per-record baseline.

    python -m bench.wire_format [--devices 40] [--batch-seconds 2 30] [--repeat 3]

Batches come from the synthetic activity source (one device's events over N seconds, as the
agent sends them). Wire size: each message zstd-compressed on its own (an agent's produce
request usually carries one batch), excluding Kafka's ~70-byte record-batch framing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass

import fastavro
import polars as pl
import zstandard

from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import codec, ids, schemas
from handtrace.core.clock import now_us


@dataclass
class Candidate:
    name: str
    encode: Callable[[dict, list[dict]], bytes]
    decode: Callable[[bytes], int] | None = None
    decode_many: Callable[[list[bytes]], int] | None = None

    def decode_all(self, msgs: list[bytes]) -> int:
        if self.decode_many is not None:
            return self.decode_many(msgs)
        assert self.decode is not None
        return sum(self.decode(m) for m in msgs)


def _micro_batches(msgs: list[bytes], size: int = 500) -> int:
    """What the stream does: parse each message, decode a micro-batch's blocks in one call."""
    n = 0
    for i in range(0, len(msgs), size):
        parsed = [codec.parse_event_batch(m) for m in msgs[i : i + size]]
        blocks = [b for p in parsed for b in p.blocks]
        n += codec.decode_blocks(parsed[0].fingerprint, blocks, sum(p.count for p in parsed)).height
    return n


def _event_schema():  # type: ignore[no-untyped-def]
    # polars rejects non-null defaults in a container's schema; decoding does not need them.
    return fastavro.parse_schema(codec.container_event_schema())


def _defaults() -> dict:
    fields = schemas.latest("event_batch").raw["fields"][-1]["type"]["items"]["fields"]
    return {f["name"]: f["default"] for f in fields if "default" in f}


def _container(codec_name: str) -> Callable[[dict, list[dict]], bytes]:
    schema, defaults = _event_schema(), _defaults()

    def enc(_h: dict, events: list[dict]) -> bytes:
        buf = io.BytesIO()
        fastavro.writer(buf, schema, [{**defaults, **e} for e in events], codec=codec_name)
        return buf.getvalue()
    return enc


def _fastavro_dicts(payload: bytes) -> int:
    sv = codec.writer_schema(payload, "event_batch")
    return len(fastavro.schemaless_reader(io.BytesIO(payload[codec.PREFIX_LEN:]), sv.parsed, None)["events"])


def _polars_container(payload: bytes) -> int:
    return pl.read_avro(io.BytesIO(payload)).height


def _json_lines(h: dict, events: list[dict]) -> bytes:
    def conv(v):  # type: ignore[no-untyped-def]
        return v.hex() if isinstance(v, bytes) else v
    return "\n".join(json.dumps({k: conv(v) for k, v in {**e, "employee_id": h["employee_id"]}.items()})
                     for e in events).encode()


def _json_decode(payload: bytes) -> int:
    return len([json.loads(line) for line in payload.splitlines()])


CANDIDATES = [
    Candidate("handtrace: single-object + sized block, micro-batches of 500 msgs → polars (chosen)",
              codec.encode_event_batch, decode_many=_micro_batches),
    Candidate("same bytes, one polars call per message",
              codec.encode_event_batch, lambda p: codec.decode_event_batch(p).events.height),
    Candidate("same bytes, fastavro per-record decode to dicts (baseline)",
              codec.encode_event_batch, lambda p: _fastavro_dicts(p)),
    Candidate("same bytes, fastavro per record, then a DataFrame",
              codec.encode_event_batch, lambda p: codec.decode_event_batch_per_record(p).events.height),
    Candidate("Avro container per batch, null codec → polars", _container("null"), _polars_container),
    Candidate("Avro container per batch, deflate → polars", _container("deflate"), _polars_container),
    Candidate("JSON lines, json.loads per event", _json_lines, _json_decode),
]


def make_batches(devices: int, batch_seconds: float, total_events: int) -> list[tuple[dict, list[dict]]]:
    """Realistic batches: each device's activity cut into windows of ``batch_seconds``."""
    out = []
    t0 = now_us() - 3_600_000_000
    step = int(batch_seconds * 1_000_000)
    acts = [SyntheticActivity(seed=i) for i in range(devices)]
    n = 0
    w = 0
    while n < total_events:
        for i, a in enumerate(acts):
            events = a.events_between(t0 + w * step, t0 + (w + 1) * step)
            if not events:
                continue
            header = {"batch_id": ids.uuid7_bytes(), "employee_id": f"emp-{i:05d}",
                      "device_id": f"dev-{i:05d}", "agent_version": "bench", "os": "linux",
                      "seq": w, "sent_at_us": t0 + (w + 1) * step}
            out.append((header, events))
            n += len(events)
        w += 1
    return out


def run(devices: int, batch_seconds: float, total_events: int, repeat: int) -> list[dict]:
    batches = make_batches(devices, batch_seconds, total_events)
    n_events = sum(len(e) for _, e in batches)
    zc = zstandard.ZstdCompressor(level=3)
    rows = []
    for c in CANDIDATES:
        msgs = [c.encode(h, e) for h, e in batches]
        payload = sum(len(m) for m in msgs)
        wire = sum(len(zc.compress(m)) for m in msgs)
        best = float("inf")
        for _ in range(repeat):
            t = time.perf_counter()
            decoded = c.decode_all(msgs)
            best = min(best, time.perf_counter() - t)
        assert decoded == n_events, (c.name, decoded, n_events)
        rows.append({"name": c.name, "events": n_events, "batches": len(batches),
                     "payload_bpe": payload / n_events, "wire_bpe": wire / n_events,
                     "decode_eps": n_events / best})
    base = next(r for r in rows if "baseline" in r["name"])
    for r in rows:
        r["ratio"] = r["decode_eps"] / base["decode_eps"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=40)
    ap.add_argument("--batch-seconds", type=float, nargs="+", default=[2.0, 30.0])
    ap.add_argument("--events", type=int, default=200_000, help="events per batch-size run")
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"Python {platform.python_version()}, polars {pl.__version__}, fastavro {fastavro.__version__}")
    print(f"schema event_batch v{schemas.latest('event_batch').version}; one decode thread\n")
    for bs in a.batch_seconds:
        rows = run(a.devices, bs, a.events, a.repeat)
        r0 = rows[0]
        print(f"batches of {bs:g} s of one device's activity: {r0['batches']} batches, "
              f"{r0['events'] / r0['batches']:.0f} events/batch, {r0['events']:,} events")
        print("| encoding | payload B/event | wire B/event (zstd) | decode events/s | vs baseline |")
        print("|---|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['name']} | {r['payload_bpe']:.1f} | {r['wire_bpe']:.1f} | "
                  f"{r['decode_eps']:,.0f} | {r['ratio']:.1f}× |")
        print()


if __name__ == "__main__":
    main()
