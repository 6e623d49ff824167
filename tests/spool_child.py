"""A stand-in agent for tests/integration/test_shipper_outage.py, run as a subprocess and
killed with SIGKILL: it captures EventBatches into the spool while a shipper thread tries to
deliver them (the broker is down), and logs every batch's event ids once ``append`` returned.

    python tests/spool_child.py SPOOL_DIR BOOTSTRAP TOPIC LOG --batches N [--events-per-batch K]

Log lines (each written and fsynced after the fact it states):
    captured <seq> <event id hex>,...   the batch is durable in the spool
    attempt <retry 0|1> <errors>         one ship_once call returned
    done                                 the first N batches are captured
After ``done`` it keeps capturing (so the kill can land mid-append) until it is killed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from handtrace.agent.shipper import Shipper  # noqa: E402
from handtrace.agent.spool import Spool, SpoolEntry  # noqa: E402
from handtrace.core.producer import producer_config  # noqa: E402
from handtrace.core.settings import KafkaSettings  # noqa: E402
from tests.factories import make_batch  # noqa: E402

SPOOL_MAX_BYTES = 64 * 1024 * 1024
SPOOL_SEGMENT_BYTES = 64 * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("spool_dir", type=Path)
    ap.add_argument("bootstrap")
    ap.add_argument("topic")
    ap.add_argument("log", type=Path)
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--events-per-batch", type=int, default=7)
    ap.add_argument("--employee", default="emp-child")
    a = ap.parse_args()

    spool = Spool(a.spool_dir, max_bytes=SPOOL_MAX_BYTES, segment_bytes=SPOOL_SEGMENT_BYTES)
    conf = producer_config(KafkaSettings(bootstrap_servers=a.bootstrap))
    shipper = Shipper(spool, conf, {"events": a.topic}, delivery_timeout_s=3, backoff_base_s=0.2,
                      backoff_max_s=1.0)
    out = open(a.log, "a", buffering=1)  # noqa: SIM115 -- lives until the kill
    lock = threading.Lock()

    def note(line: str) -> None:
        with lock:
            out.write(line + "\n")
            out.flush()
            os.fsync(out.fileno())

    def ship_forever() -> None:
        while True:
            r = shipper.ship_once(2.0)
            note(f"attempt {int(r.retry)} {sorted(r.errors.items())}")
            time.sleep(min(r.next_delay_s, 0.5))

    threading.Thread(target=ship_forever, daemon=True).start()
    key = a.employee.encode()
    i = 0
    while True:
        ids: list[bytes] = []

        def entry(seq: int, ids: list[bytes] = ids) -> SpoolEntry:
            payload, event_ids = make_batch(a.employee, a.events_per_batch, seed=seq, seq=seq,
                                            device_id="dev-child")
            ids.extend(event_ids)
            return SpoolEntry("events", key, payload, events=len(event_ids))

        seq = spool.append_with(entry)
        note(f"captured {seq} {','.join(e.hex() for e in ids)}")
        i += 1
        if i == a.batches:
            note("done")
        if i >= a.batches:
            time.sleep(0.005)


if __name__ == "__main__":
    main()
