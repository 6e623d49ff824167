"""Issue #15, capacity model: the fleet load test's quick mode through the real broker, the real
stream worker and the real sink (embedded ClickHouse), so that ``bench/fleet_load.py`` cannot rot.

``python -m bench.fleet_load --quick``: 40 simulated laptops (the per-laptop rate of
docs/BENCHMARKS.md "Agent footprint") for ~20 s of traffic, lag of both groups sampled every
second, then every accepted event checked stored exactly once. The quick run's lag verdict is not
asserted (the shared machine may be busy); that it was measured is.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench.fleet_load import LAPTOP_EPS, main

pytestmark = [pytest.mark.integration]


@pytest.mark.timeout(600)
def test_fleet_load_quick(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "fleet.json"
    rc = main(["--quick", "--bootstrap", kafka_bootstrap, "--json", str(out), "--partitions", "3"])
    assert rc == 0, "the quick fleet run failed (see its output above)"
    doc = json.loads(out.read_text())
    steps = doc["steps"]
    assert [s["kind"] for s in steps] == ["confirm"] and steps[0]["agents"] == 40
    step = steps[0]
    # It produced at the fleet's rate (paced on the wall clock, not a burst) ...
    assert step["target_eps"] == pytest.approx(40 * LAPTOP_EPS)
    assert 0.8 * step["target_eps"] <= step["offered_eps"] <= 1.3 * step["target_eps"], step
    assert step["failed_sends"] == 0
    # ... stored every accepted event exactly once ...
    v = doc["verify"]
    assert v["ok"], v
    assert v["accepted"] > 0 and v["accepted"] == v["stored"] == v["distinct"]
    # the policy drops the synthetic user's leisure apps: some, not most
    assert 0.5 * v["delivered"] < v["accepted"] <= v["delivered"], v
    assert step["stored_eps"] > 0
    # ... and reported the lag of both groups from samples taken every second.
    for group in ("stream", "sink"):
        g = step["groups"][group]
        assert g["samples"] >= 10, g
        assert g["p99"] >= 0 and g["max"] >= g["p99"] and g["bound"] > 0, g
        assert g["in_msgs_per_s"] > 0, g
    assert set(step["cpu"]) >= {"worker", "bench", "generator"}, step["cpu"]
    assert step["cpu"]["worker"] > 0 and step["cpu"]["generator"] > 0
