"""The fleet load test's model and its bounded-lag rule (bench/fleet_load.py), without I/O."""

from __future__ import annotations

import numpy as np
import pytest
from bench.fleet_load import EVENTS_PER_HOUR, LAPTOP_EPS, SEAL_S, fleet_classes, group_stats


def test_the_laptop_is_the_measured_one() -> None:
    # docs/BENCHMARKS.md "Agent footprint": 26,516 events sent per hour, sealed every 5 s.
    assert EVENTS_PER_HOUR == 26_516 and LAPTOP_EPS == pytest.approx(7.366, abs=1e-3)
    assert SEAL_S == 5.0


def test_mix_of_battery_and_mains() -> None:
    battery, plugged = fleet_classes(1000, 0.3, 120.0, 30.0)
    assert (battery.name, battery.agents, battery.messages_per_wakeup) == ("battery", 700, 24)
    assert (plugged.name, plugged.agents, plugged.messages_per_wakeup) == ("plugged", 300, 6)
    # A wakeup interval shorter than the seal: one batch of that interval per wakeup.
    (fast,) = fleet_classes(10, 1.0, 120.0, 2.0)
    assert fast.batch_s == 2.0 and fast.messages_per_wakeup == 1
    assert [c.name for c in fleet_classes(10, 0.0, 120.0, 30.0)] == ["battery"]


def _series(lag: np.ndarray, rate: float = 100.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = np.arange(len(lag), dtype=np.float64)
    return lag.astype(np.float64), t, (t * rate).astype(np.int64)


def test_steady_sawtooth_lag_is_bounded() -> None:
    lag, t, ends = _series(np.tile([50, 150, 250, 100], 25))  # 100 s, no trend
    g = group_stats(lag, t, ends, bound_s=30.0, trend_s=60.0)
    assert g["in_msgs_per_s"] == pytest.approx(100.0) and g["bound"] == pytest.approx(3000.0)
    assert g["p99"] == 250 and g["max"] == 250 and g["p99_s"] == pytest.approx(2.5)
    assert abs(g["growth_10min"]) < g["bound"]


def test_growing_lag_fails_the_trend_even_below_the_bound() -> None:
    # 10 messages/s more in than out: 1,000 after 100 s (p99 under the 3,000 bound), but 6,000 more
    # in ten minutes at this trend.
    lag, t, ends = _series(np.arange(100) * 10)
    g = group_stats(lag, t, ends, bound_s=30.0, trend_s=60.0)
    assert g["p99"] < g["bound"]
    assert g["slope_per_s"] == pytest.approx(10.0) and g["growth_10min"] > g["bound"]
