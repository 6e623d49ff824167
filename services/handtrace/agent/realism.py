"""Activity statistics of pointer traces, to check a synthetic source against real human data.

The statistics look at pointer events only (``pointer_move``, ``click``, ``scroll``):

- *move interval*: time between consecutive ``pointer_move`` events while the pointer is moving
  (gaps up to ``move_gap_s``), after coalescing moves that share a timestamp (keep the last);
  recorders with a coarse clock stamp several moves with one tick;
- *speed*: distance over time for those same consecutive move pairs, in px/s;
- *pause*: a gap between consecutive pointer events longer than ``pause_s``; typing, reading and
  time away all count as pauses, since only the pointer is looked at;
- *movement shape*: for each movement (a run of at least ``min_moves`` moves with no gap over
  ``move_gap_s``), the peak speed over the mean speed, and when the peak comes as a fraction of
  the movement's duration; speeds are smoothed over 3 intervals against timestamp jitter.
  Human movements peak early (a fast ballistic phase, then slow homing); constant-velocity
  motion peaks anywhere;
- *click rate*: presses (``click`` with ``pressed`` true) per minute of trace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


@dataclass(frozen=True)
class ActivityStats:
    """Distributions and rates of one pointer trace (or of several, pooled).

    Attributes:
        move_intervals_s: Intervals between consecutive moves while moving, in seconds.
        speeds_px_s: Pointer speed over those intervals, in pixels per second.
        pauses_s: Gaps between pointer events longer than the pause threshold, in seconds.
        clicks: Number of button presses.
        duration_s: Time covered by the trace(s), in seconds.
        n_moves: Number of ``pointer_move`` events after coalescing.
        peak_to_mean: Per movement, peak speed over mean speed.
        time_to_peak: Per movement, when the peak speed comes, as a fraction of its duration.
    """

    move_intervals_s: np.ndarray
    speeds_px_s: np.ndarray
    pauses_s: np.ndarray
    clicks: int
    duration_s: float
    n_moves: int
    peak_to_mean: np.ndarray
    time_to_peak: np.ndarray

    @property
    def clicks_per_min(self) -> float:
        """Button presses per minute of trace."""
        return 60.0 * self.clicks / self.duration_s if self.duration_s > 0 else 0.0

    def summary(self) -> dict[str, float]:
        """Medians and rates as a flat dict, for logs and assertions."""
        return {
            "median_move_interval_s": _median(self.move_intervals_s),
            "median_speed_px_s": _median(self.speeds_px_s),
            "median_pause_s": _median(self.pauses_s),
            "median_peak_to_mean": _median(self.peak_to_mean),
            "median_time_to_peak": _median(self.time_to_peak),
            "pauses_per_min": 60.0 * len(self.pauses_s) / self.duration_s
            if self.duration_s > 0
            else 0.0,
            "clicks_per_min": self.clicks_per_min,
            "moves_per_s": self.n_moves / self.duration_s if self.duration_s > 0 else 0.0,
        }


def _median(a: np.ndarray) -> float:
    return float(np.median(a)) if len(a) else float("nan")


def pointer_stats(
    t_s: Sequence[float] | np.ndarray,
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    kinds: Sequence[str] | np.ndarray,
    pressed: Sequence[bool | None] | np.ndarray | None = None,
    *,
    move_gap_s: float = 0.3,
    pause_s: float = 1.0,
    min_moves: int = 6,
) -> ActivityStats:
    """Statistics of one pointer trace given as parallel arrays in capture order.

    Args:
        t_s: Event times in seconds (any origin), non-decreasing.
        x: Pointer x per event (ignored for non-move events).
        y: Pointer y per event.
        kinds: Event kind per event; kinds other than pointer_move/click/scroll are ignored.
        pressed: ``pressed`` per event; when None every click counts as a press.
        move_gap_s: Longest interval between two moves that still counts as moving.
        pause_s: Shortest gap between pointer events that counts as a pause.
        min_moves: Fewest moves in a movement for its shape statistics.

    Returns:
        The trace's ActivityStats.
    """
    t = np.asarray(t_s, dtype=np.float64)
    k = np.asarray(kinds, dtype=object)
    pointer = np.isin(k, ("pointer_move", "click", "scroll"))
    if not pointer.any():
        empty = np.empty(0)
        return ActivityStats(empty, empty, empty, 0, 0.0, 0, empty, empty)
    tp = t[pointer]
    gaps = np.diff(tp)
    pauses = gaps[gaps > pause_s]

    is_click = k == "click"
    if pressed is not None:
        is_click &= np.fromiter((bool(p) for p in pressed), dtype=bool, count=len(k))
    clicks = int(is_click.sum())

    mv = k == "pointer_move"
    tm = t[mv]
    xm = _floats(x, mv)
    ym = _floats(y, mv)
    last_of_tick = np.r_[np.diff(tm) > 0, True] if len(tm) else np.empty(0, dtype=bool)
    tm, xm, ym = tm[last_of_tick], xm[last_of_tick], ym[last_of_tick]
    dt = np.diff(tm)
    moving = dt <= move_gap_s
    dist = np.hypot(np.diff(xm), np.diff(ym))
    peak_to_mean, time_to_peak = _movement_shapes(tm, dt, dist, moving, min_moves)
    return ActivityStats(
        move_intervals_s=dt[moving],
        speeds_px_s=dist[moving] / dt[moving],
        pauses_s=pauses,
        clicks=clicks,
        duration_s=float(tp[-1] - tp[0]),
        n_moves=len(tm),
        peak_to_mean=peak_to_mean,
        time_to_peak=time_to_peak,
    )


def _floats(values: Sequence[float | None] | np.ndarray, mask: np.ndarray) -> np.ndarray:
    out: np.ndarray = np.asarray(values)[mask].astype(np.float64)
    return out


def _movement_shapes(
    t: np.ndarray, dt: np.ndarray, dist: np.ndarray, moving: np.ndarray, min_moves: int
) -> tuple[np.ndarray, np.ndarray]:
    bounds = np.r_[0, np.nonzero(~moving)[0] + 1, len(t)]
    ratios: list[float] = []
    peaks: list[float] = []
    window = np.ones(3)
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        if b - a < max(min_moves, 5):
            continue
        seg_dt, seg_d = dt[a : b - 1], dist[a : b - 1]
        total_t, total_d = seg_dt.sum(), seg_d.sum()
        if total_d <= 0:
            continue
        speed = np.convolve(seg_d, window, "valid") / np.convolve(seg_dt, window, "valid")
        i = int(np.argmax(speed))
        ratios.append(float(speed[i] / (total_d / total_t)))
        peaks.append(float((t[a + i] + t[a + i + 3]) / 2 - t[a]) / total_t)
    return np.asarray(ratios), np.asarray(peaks)


def stats_from_events(
    events: Iterable[Mapping[str, Any]], *, move_gap_s: float = 0.3, pause_s: float = 1.0
) -> ActivityStats:
    """Statistics of Event dicts (per the Event schema) in capture order.

    Args:
        events: Event dicts; only captured_at_us, kind, x, y and pressed are read.
        move_gap_s: See :func:`pointer_stats`.
        pause_s: See :func:`pointer_stats`.

    Returns:
        The trace's ActivityStats.
    """
    cols: tuple[list[Any], ...] = ([], [], [], [], [])
    t, x, y, kinds, pressed = cols
    for e in events:
        t.append(e["captured_at_us"] / 1e6)
        x.append(e.get("x") or 0)
        y.append(e.get("y") or 0)
        kinds.append(e["kind"])
        pressed.append(e.get("pressed"))
    return pointer_stats(t, x, y, kinds, pressed, move_gap_s=move_gap_s, pause_s=pause_s)


def pool(stats: Iterable[ActivityStats]) -> ActivityStats:
    """Pool several traces' statistics (distributions concatenated, counts and time summed)."""
    items = list(stats)
    return ActivityStats(
        move_intervals_s=np.concatenate([s.move_intervals_s for s in items]),
        speeds_px_s=np.concatenate([s.speeds_px_s for s in items]),
        pauses_s=np.concatenate([s.pauses_s for s in items]),
        clicks=sum(s.clicks for s in items),
        duration_s=sum(s.duration_s for s in items),
        n_moves=sum(s.n_moves for s in items),
        peak_to_mean=np.concatenate([s.peak_to_mean for s in items]),
        time_to_peak=np.concatenate([s.time_to_peak for s in items]),
    )


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    if not len(a) or not len(b):
        return float("nan")
    a = np.sort(a)
    b = np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, grid, side="right") / len(a)
    cdf_b = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


@dataclass(frozen=True)
class MetricComparison:
    """One distribution (or rate) of two traces side by side.

    Attributes:
        name: Metric name, with its unit.
        synth: Quantiles (``QUANTILES``) of the synthetic trace; one value for a rate.
        real: Same for the real trace.
        ks: Two-sample KS statistic, or None for rates.
    """

    name: str
    synth: tuple[float, ...]
    real: tuple[float, ...]
    ks: float | None = None

    @property
    def median_ratio(self) -> float:
        """Synthetic median (or rate) over the real one."""
        i = len(self.synth) // 2
        return self.synth[i] / self.real[i] if self.real[i] else float("inf")


@dataclass(frozen=True)
class RealismReport:
    """Synthetic versus real statistics, metric by metric."""

    metrics: dict[str, MetricComparison] = field(default_factory=dict)

    def __getitem__(self, name: str) -> MetricComparison:
        return self.metrics[name]

    def format(self) -> str:
        """A plain-text table: quantiles q10..q90 (or the rate), median ratio and KS."""
        head = "q" + "/".join(f"{int(q * 100)}" for q in QUANTILES)
        lines = [f"{'metric':<22} {'source':<6} {head:<44} {'ratio':>6} {'KS':>6}"]
        for m in self.metrics.values():
            ks = f"{m.ks:6.3f}" if m.ks is not None else f"{'':>6}"
            for label, vals in (("synth", m.synth), ("real", m.real)):
                cells = " ".join(f"{v:8.3g}" for v in vals)
                tail = f"{m.median_ratio:6.2f} {ks}" if label == "synth" else ""
                lines.append(f"{m.name:<22} {label:<6} {cells:<44} {tail}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _quantiles(a: np.ndarray) -> tuple[float, ...]:
    if not len(a):
        return tuple(float("nan") for _ in QUANTILES)
    return tuple(float(v) for v in np.quantile(a, QUANTILES))


def compare(synth: ActivityStats, real: ActivityStats) -> RealismReport:
    """Compare a synthetic trace's statistics with a real one's.

    Args:
        synth: Statistics of the synthetic source.
        real: Statistics of real human traces (e.g. :func:`pool` of several sessions).

    Returns:
        A RealismReport with quantiles side by side, median ratios, and KS statistics for the
        move interval, speed, pause and movement-shape distributions.
    """
    metrics = {}
    for name, attr in (
        ("move_interval_s", "move_intervals_s"),
        ("speed_px_s", "speeds_px_s"),
        ("pause_s", "pauses_s"),
        ("peak_to_mean_speed", "peak_to_mean"),
        ("time_to_peak", "time_to_peak"),
    ):
        a, b = getattr(synth, attr), getattr(real, attr)
        metrics[name] = MetricComparison(name, _quantiles(a), _quantiles(b), ks_statistic(a, b))
    for name in ("clicks_per_min",):
        metrics[name] = MetricComparison(
            name, (getattr(synth, name),), (getattr(real, name),), None
        )
    return RealismReport(metrics)
