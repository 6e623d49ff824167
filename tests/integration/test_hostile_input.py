"""Issue #10, "Done when": a hostile-input run through the real broker, one real Faust worker and
the real sink -- bad messages of every kind (bench/hostile_input.py KINDS) mixed with good agent
traffic, genuine pauses and exemptions overridden by forged controls -- ends with every good event
stored exactly once, every message-level bad message dead-lettered with a fitting reason, nothing
of the rest stored, no secret stored verbatim, no stall, bounded RSS and prompt stops.

The short mode of ``python -m bench.hostile_input`` (about 45 s of traffic; 2-4 minutes in all on
the 2-core dev machine): the same harness and the same invariants, fewer messages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from bench.hostile_input import KINDS, Config, run

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.timeout(900)
def test_hostile_input_short_run(kafka_bootstrap: str, tmp_path: Path) -> None:
    cfg = Config(minutes=0.75, agents=8, batch_interval_s=2.0, bad_per_minute=1200, partitions=3,
                 drain_timeout_s=180, warmup_timeout_s=240, hard_limit_s=780, bootstrap=kafka_bootstrap,
                 root=tmp_path, seed=20)
    res = run(cfg, log=print)
    print(res.table)
    # The run really exercised every kind and every good category (a harness that sent nothing
    # would pass the invariants vacuously).
    bad = res.numbers.get("bad", {})
    assert set(bad) == set(KINDS), f"kinds not sent: {set(KINDS) - set(bad)}"
    assert all(row["produced"] > 0 for row in bad.values()), bad
    assert sum(row["produced"] for row in bad.values()) >= 500
    good = res.numbers.get("good", {})
    for kind in ("agent", "pii", "idn", "newapp", "agent_selfgrant"):
        assert good.get(kind, [0])[0] > 0, f"no good '{kind}' events were produced: {good}"
    never = res.numbers.get("never", {})
    assert never.get("in_pause", [0])[0] > 0 and never.get("in_exemption", [0])[0] > 0, never
    assert res.failures == [], "\n".join(res.failures)
