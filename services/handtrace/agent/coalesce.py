"""Pointer-move coalescing at the source: the biggest saving of battery and bandwidth, because
pointer moves are most of what a person produces (60-1000 Hz from the OS).

Two passes over each run of consecutive ``pointer_move`` events (runs are cut by any other event,
so the position at a click, scroll or key is never moved):

1. rate cap: at most ``max_hz`` moves per second -- the *last* move of each ``1/max_hz`` bin is
   kept (the freshest position), and the last move of the run always;
2. path simplification with the synchronized Euclidean distance (TD-TR, Meratnia & de By 2004):
   Douglas-Peucker where a point's error is its distance to where the simplified path says the
   pointer was *at that time* -- so both the path and the speed profile stay within
   ``epsilon_px``; straight constant-speed stretches collapse, the bell-shaped speed of a real
   reach and every stop are kept.

Typical human traces (the Balabit set at ~60 Hz) shrink 3-5x; docs/BENCHMARKS.md has numbers.
"""

from __future__ import annotations

import numpy as np

from handtrace.agent.capture import Event


def _sed_keep(t: np.ndarray, x: np.ndarray, y: np.ndarray, eps: float) -> np.ndarray:
    """Boolean mask of points TD-TR keeps (first and last always)."""
    n = len(t)
    keep = np.zeros(n, dtype=bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        span = t[b] - t[a]
        seg = slice(a + 1, b)
        frac = (t[seg] - t[a]) / span if span > 0 else np.zeros(b - a - 1)
        ex = x[a] + (x[b] - x[a]) * frac
        ey = y[a] + (y[b] - y[a]) * frac
        err = np.hypot(x[seg] - ex, y[seg] - ey)
        i = int(np.argmax(err))
        if err[i] > eps:
            m = a + 1 + i
            keep[m] = True
            stack.append((a, m))
            stack.append((m, b))
    return keep


def _coalesce_run(run: list[Event], bin_us: int, eps: float) -> list[Event]:
    if len(run) <= 2:
        return run
    # 1. rate cap: last move of each bin (and the last of the run).
    capped: list[Event] = []
    for i, ev in enumerate(run):
        nxt = run[i + 1] if i + 1 < len(run) else None
        if nxt is None or nxt["captured_at_us"] // bin_us != ev["captured_at_us"] // bin_us:
            capped.append(ev)
    if eps <= 0 or len(capped) <= 2:
        return capped
    t = np.fromiter((e["captured_at_us"] for e in capped), dtype=np.float64, count=len(capped))
    x = np.fromiter((e["x"] for e in capped), dtype=np.float64, count=len(capped))
    y = np.fromiter((e["y"] for e in capped), dtype=np.float64, count=len(capped))
    keep = _sed_keep(t, x, y, eps)
    return [e for e, k in zip(capped, keep, strict=True) if k]


def coalesce_moves(events: list[Event], *, max_hz: float, epsilon_px: float) -> list[Event]:
    """``events`` (capture order) with runs of pointer moves rate-capped and simplified; other
    events untouched and in place."""
    bin_us = max(1, int(1_000_000 / max_hz))
    out: list[Event] = []
    run: list[Event] = []
    for ev in events:
        if ev["kind"] == "pointer_move":
            run.append(ev)
            continue
        if run:
            out.extend(_coalesce_run(run, bin_us, epsilon_px))
            run = []
        out.append(ev)
    if run:
        out.extend(_coalesce_run(run, bin_us, epsilon_px))
    return out
