"""Dataset export benchmark (issue #12, "Measure"): export 1,000 simulated demonstrations of ~50
steps each, without and with OCR scrubbing, in one run: steps/s, bytes per step, OCR seconds per
frame.

    PYTHONPATH=services:. python -m bench.dataset_export [--demos 1000] [--steps 50]
        [--ocr-demos 8] [--workers 2] [--batch-size 50]

1. Seeds ``--demos`` complete demonstrations into a fresh embedded ClickHouse and a local frame
   store (``handtrace.export.simulate``: realistic event streams, one 1280x800 PNG frame per
   action start, as the sink stores them).
2. ``no OCR``: exports all of them with scrubbing off (``export.require_scrub=false``): the cost
   of reading ClickHouse, reducing, copying frames and writing JSONL/parquet.
3. ``OCR``: exports the first ``--ocr-demos`` of them with scrubbing on (``--workers`` tesseract
   processes), and projects the whole set from the measured rate: OCR of every frame of 1,000
   demonstrations takes hours on this machine, which is the point of reporting it per frame.
Ratios are between the two exports of this run.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from handtrace.core import clickhouse
from handtrace.core.framestore import LocalStore
from handtrace.core.settings import Settings
from handtrace.export.dataset import ExportFilters, export_dataset
from handtrace.export.simulate import seed_demonstrations
from handtrace.sink.schema import migrate


def _tree_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demos", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--ocr-demos", type=int, default=8)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--batch-size", type=int, default=50)
    ap.add_argument("--pii-frames", type=float, default=0.05, help="share of frames showing PII text")
    ap.add_argument("--keep", action="store_true", help="keep the work directory")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        s = Settings(state_dir=work / "state", dev_mode=True, clickhouse={"dsn": f"chdb://{work / 'ch'}"},
                     store={"url": f"file://{work / 'store'}"}, export={"require_scrub": False})
        client = clickhouse.connect(s.clickhouse_dsn())
        migrate(client, s.clickhouse.database)
        store = LocalStore(work / "store")
        print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}; "
              f"demos={args.demos} steps~{args.steps} workers={args.workers} batch={args.batch_size}")
        t0 = time.perf_counter()
        seeded = seed_demonstrations(client, s.clickhouse.database, store, n=args.demos, steps=args.steps,
                                     pii_frames=args.pii_frames)
        seed_s = time.perf_counter() - t0
        print(f"seeded {len(seeded.demonstration_ids)} demonstrations, {seeded.events:,} events, "
              f"{seeded.frames:,} frames ({seeded.bytes / 1e6:.0f} MB) in {seed_s:.1f} s")

        r0 = export_dataset(client, store, work / "plain", ExportFilters(), settings=s, scrub=False,
                            batch_size=args.batch_size)
        plain_bytes = _tree_bytes(work / "plain")
        plain_rate = r0.steps / r0.seconds
        print(f"no OCR : {r0.tasks} tasks, {r0.steps:,} steps, {r0.images:,} images in {r0.seconds:.1f} s -> "
              f"{plain_rate:,.0f} steps/s, {plain_bytes / r0.steps / 1e3:.1f} kB/step "
              f"({plain_bytes / 1e6:.0f} MB)")
        shutil.rmtree(work / "plain")

        if args.ocr_demos <= 0:
            return
        subset = ExportFilters(demonstrations=tuple(seeded.demonstration_ids[:args.ocr_demos]))
        r1 = export_dataset(client, store, work / "ocr", subset, settings=s, scrub=True, workers=args.workers,
                            batch_size=args.batch_size)
        ocr_bytes = _tree_bytes(work / "ocr")
        frames = r1.manifest["counts"]["frames"]  # distinct stored frames read and scrubbed
        distinct = r1.images
        ocr_rate = r1.steps / r1.seconds
        per_frame_cpu = r1.ocr_cpu_seconds / max(1, frames)
        print(f"OCR    : {r1.tasks} tasks, {r1.steps:,} steps, {distinct:,} images in {r1.seconds:.1f} s -> "
              f"{ocr_rate:,.1f} steps/s, {ocr_bytes / r1.steps / 1e3:.1f} kB/step; "
              f"{frames} frames OCR'd: {per_frame_cpu:.2f} CPU s/frame, {r1.seconds / max(1, frames):.2f} wall s/frame "
              f"with {args.workers} workers; filled {r1.frames_filled} frames, {r1.boxes_filled} boxes")
        whole = r0.steps / ocr_rate
        print(f"ratio  : OCR export is {plain_rate / ocr_rate:,.0f}x slower per step; the {r0.steps:,} steps of "
              f"all {r0.tasks} demonstrations with OCR: ~{whole / 3600:.1f} h on this machine "
              f"({args.workers} workers)")
    finally:
        clickhouse.close(f"chdb://{work / 'ch'}")
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
