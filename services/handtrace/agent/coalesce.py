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

How much goes depends on the OS's sampling rate: the synthetic user's 60 Hz moves shrink ~2.6x
(docs/BENCHMARKS.md, agent footprint); the Balabit traces, recorded at ~9 Hz median, ~20%.
"""

from __future__ import annotations

from handtrace.agent.capture import Event


def _sed_keep(t: list[int], x: list[int], y: list[int], eps: float) -> list[bool]:
    """Which points TD-TR keeps (first and last always). Plain Python: a laptop produces at most
    a few hundred moves a second, and numpy alone would double the agent's memory."""
    n = len(t)
    keep = [False] * n
    keep[0] = keep[-1] = True
    eps2 = eps * eps
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        ta, xa, ya = t[a], x[a], y[a]
        span = t[b] - ta
        dx, dy = x[b] - xa, y[b] - ya
        worst, worst_i = -1.0, -1
        for i in range(a + 1, b):
            f = (t[i] - ta) / span if span > 0 else 0.0
            ex, ey = x[i] - (xa + dx * f), y[i] - (ya + dy * f)
            d2 = ex * ex + ey * ey
            if d2 > worst:
                worst, worst_i = d2, i
        if worst > eps2:
            keep[worst_i] = True
            stack.append((a, worst_i))
            stack.append((worst_i, b))
    return keep


def _coalesce_run(run: list[Event], bin_us: int, eps: float) -> list[Event]:
    if len(run) <= 1:
        return run
    # 1. rate cap: last move of each bin (and the last of the run).
    capped: list[Event] = []
    for i, ev in enumerate(run):
        nxt = run[i + 1] if i + 1 < len(run) else None
        if nxt is None or nxt["captured_at_us"] // bin_us != ev["captured_at_us"] // bin_us:
            capped.append(ev)
    if eps <= 0 or len(capped) <= 2:
        return capped
    keep = _sed_keep([e["captured_at_us"] for e in capped], [e["x"] for e in capped],
                     [e["y"] for e in capped], eps)
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
