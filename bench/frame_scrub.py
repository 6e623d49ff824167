"""Screenshot scrubbing benchmark (issue #12): what OCR scrubbing costs per 1920x1080 frame, with
tesseract's OpenMP threads limited to one (``OMP_THREAD_LIMIT=1``, how the exporter runs it)
against its default (unset), measured in the same run; and the projected time of a 10k-frame
export with 1 and 2 worker processes.

    python -m bench.frame_scrub [--frames 6] [--export-frames 8]

Frames are rendered with real TrueType fonts (DejaVu), text-dense like a working screen: a dark
title bar and menu, an editor with ~40 lines of monospaced code, a mail/chat pane with
proportional text, a dark terminal; a few lines carry PII (an email, a card number, a phone
number, a token), so the fill path runs too. Each frame's text differs (seeded), so nothing is
warm but the page cache.

1. ``single``: :func:`handtrace.export.scrub.scrub_frame` on each frame, one at a time,
   alternating ``OMP_THREAD_LIMIT=1`` and unset (the order swapped every frame): wall ms per frame
   and tesseract's CPU seconds (children's rusage); the ratio unset / limited. A third mode,
   ``limit1-1x``, OCRs without the 2x upscale: the cost of reading small and light-on-dark text.
2. ``pool``: :func:`scrub_many` over ``--export-frames`` frames with 1 and then 2 worker
   processes (limit 1): frames/s, and 10,000 frames at that rate; and CPU-bound (CPU seconds
   per frame / workers), what an idle machine with that many free cores would take: on a
   shared machine the measured rate is the lower bound, not the projection.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import resource
import statistics
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from handtrace.core import pii
from handtrace.export import scrub

FONTS = Path("/usr/share/fonts/truetype/dejavu")
WORDS = ("def return self frame window policy filled allowed event batch stream sink offset "
         "partition key value import from class with for while if else None True False async "
         "await yield lambda travel expense Berlin receipt hotel invoice total amount approve").split()
PII_LINES = ("Contact: ada.lovelace@example.com", "Card 4539 1488 0343 6467 exp 12/29",
             "Call +44 20 7946 0958 after lunch", "token = ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8")


def render(seed: int, size: tuple[int, int] = (1920, 1080)) -> bytes:
    """One text-dense 1080p screen (PNG)."""
    rnd = random.Random(seed)
    mono = ImageFont.truetype(str(FONTS / "DejaVuSansMono.ttf"), 14)
    sans = ImageFont.truetype(str(FONTS / "DejaVuSans.ttf"), 15)
    img = Image.new("RGB", size, (250, 250, 250))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, size[0], 32), fill=(40, 44, 52))
    d.text((12, 8), "Activities   Editor   File  Edit  Selection  View  Go  Run  Terminal  Help", font=sans,
           fill=(230, 230, 230))

    def sentence(n: int) -> str:
        return " ".join(rnd.choice(WORDS) for _ in range(n))

    for i in range(40):  # editor
        indent = "    " * rnd.randint(0, 3)
        d.text((20, 50 + i * 20), f"{i + 1:4d}  {indent}{sentence(rnd.randint(3, 8))}", font=mono, fill=(30, 30, 30))
    d.rectangle((1000, 40, 1900, 640), fill=(255, 255, 255))  # mail / chat
    for i in range(24):
        text = PII_LINES[i // 6] if i % 6 == 3 else sentence(rnd.randint(4, 10)).capitalize() + "."
        d.text((1020, 50 + i * 24), text, font=sans, fill=(20, 20, 20))
    d.rectangle((1000, 660, 1900, 1060), fill=(30, 30, 30))  # terminal
    for i in range(18):
        d.text((1010, 670 + i * 21), f"$ {sentence(rnd.randint(2, 7))}", font=mono, fill=(220, 220, 220))
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def child_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


MODES = (("limit1", 1, scrub.DEFAULT_UPSCALE), ("unset", None, scrub.DEFAULT_UPSCALE), ("limit1-1x", 1, 1))


def single(frames: list[bytes]) -> dict[str, Any]:
    out: dict[str, dict[str, list[float]]] = {k: {"ms": [], "cpu_s": [], "filled": []} for k, _, _ in MODES}
    for i, frame in enumerate(frames):
        for name, limit, upscale in MODES if i % 2 == 0 else MODES[::-1]:
            c0, t0 = child_cpu(), time.perf_counter()
            res = scrub.scrub_frame(frame, omp_thread_limit=limit, upscale=upscale)
            out[name]["ms"].append((time.perf_counter() - t0) * 1000)
            out[name]["cpu_s"].append(child_cpu() - c0)
            out[name]["filled"].append(len(res.filled))
    return out


def pool(frames: list[bytes], workers: int) -> tuple[float, float]:
    """Frames/s, and CPU seconds per frame of the workers and their tesseracts (as each worker
    measured them: the pool's workers are the forkserver's children, not ours)."""
    t0 = time.perf_counter()
    outs = list(scrub.scrub_many(frames, workers=workers))
    dt = time.perf_counter() - t0
    assert all(o.ok for o in outs), [o.error for o in outs if not o.ok]
    return len(frames) / dt, sum(o.cpu_seconds for o in outs) / len(frames)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--frames", type=int, default=6, help="frames for the single-frame comparison")
    p.add_argument("--export-frames", type=int, default=8, help="frames per pool run")
    a = p.parse_args()
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}; {scrub.tesseract_version()}; "
          f"detectors v{pii.DETECTOR_VERSION}, scrub v{scrub.SCRUB_VERSION}, upscale {scrub.DEFAULT_UPSCALE}x")
    frames = [render(seed) for seed in range(a.frames)]
    s = single(frames)
    med = {k: statistics.median(v["ms"]) for k, v in s.items()}
    cpu = {k: statistics.median(v["cpu_s"]) for k, v in s.items()}
    for k, _, _ in MODES:
        print(f"single {k:9s}: median {med[k]:7.0f} ms/frame (min {min(s[k]['ms']):.0f}, max {max(s[k]['ms']):.0f}), "
              f"tesseract CPU {cpu[k]:.2f} s/frame, boxes filled/frame {statistics.mean(s[k]['filled']):.1f}")
    print(f"ratio unset / OMP_THREAD_LIMIT=1: wall {med['unset'] / med['limit1']:.2f}x, "
          f"CPU {cpu['unset'] / cpu['limit1']:.2f}x")
    export = [render(1000 + seed) for seed in range(a.export_frames)]
    for workers in (1, 2):
        fps, cpu_per_frame = pool(export, workers)
        print(f"pool {workers} worker(s): {fps:.2f} frames/s, {1000 / fps:.0f} ms/frame, "
              f"{cpu_per_frame:.2f} CPU s/frame; 10,000 frames: {10_000 / fps / 3600:.2f} h at this rate, "
              f"{10_000 * cpu_per_frame / workers / 3600:.2f} h with {workers} idle core(s)")


if __name__ == "__main__":
    main()
