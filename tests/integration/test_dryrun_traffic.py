"""``dryrun.traffic`` on the real embedded ClickHouse engine (the sink's migrations, seeded event
and demonstration rows): rows, bytes and episodes by (app, kind), agents, demonstrations, only
inside the window -- checked against the seed computed in Python, then fed to the estimate.
(An integration test, not a unit one: it opens a chdb data dir.)"""

from __future__ import annotations

import random
import uuid
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from handtrace.control.api.dryrun import FIXED_ROW_BYTES, estimate, traffic
from handtrace.core import clickhouse
from handtrace.sink.schema import migrate

DB = "handtrace"
S = 1_000_000
EPISODE_S = 600
T0 = 1_780_000_200 * S  # on a 600 s boundary
WINDOW = (T0, T0 + 3600 * S)
COLUMNS = ["event_id", "batch_id", "employee_key", "device_key", "kind", "captured_at", "received_at", "app_id",
           "window_title", "text_masked", "source_partition", "source_offset"]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Any]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    c = clickhouse.connect(dsn)
    migrate(c, DB)
    yield c
    clickhouse.close(dsn)


def at(us: int) -> datetime:
    return datetime.fromtimestamp(us / S, UTC)


def seed(c: Any) -> list[tuple[str, str, str, int, str | None, str]]:
    rng = random.Random(7)
    rows = []
    for _ in range(600):
        emp, dev = rng.choice([("e1", "d1"), ("e1", "d2"), ("e2", "d3")])
        app = rng.choice(["code", "mail", None])
        kind = rng.choice(["key_down", "pointer_move"])
        t = T0 - 1800 * S + rng.randrange(0, 5400 * S)  # half an hour before the window to its end
        title = "x" * (40 if app == "mail" else 5)
        rows.append((emp, dev, kind, t, app, title))
    data = [[uuid.uuid4(), uuid.uuid4(), e, d, k, at(t), at(t), a, w, False, 0, i]
            for i, (e, d, k, t, a, w) in enumerate(rows)]
    c.insert(f"{DB}.events", data, column_names=COLUMNS)
    demos = [[uuid.uuid4(), "e1", "d1", "complete", at(t), at(t + S)]
             for t in (T0 - 10 * S, T0 + 10 * S, T0 + 20 * S, WINDOW[1] + S)]
    c.insert(f"{DB}.demonstrations", demos,
             column_names=["demonstration_id", "employee_key", "device_key", "status", "started_at", "ended_at"])
    return rows


def test_traffic_counts_what_the_window_stored(client: Any) -> None:
    rows = seed(client)
    inside = [r for r in rows if WINDOW[0] <= r[3] < WINDOW[1]]
    want_rows: dict[tuple[str | None, str], int] = defaultdict(int)
    want_eps: dict[tuple[str | None, str], set[tuple[str, str, int]]] = defaultdict(set)
    for e, d, k, t, a, _w in inside:
        want_rows[(a, k)] += 1
        want_eps[(a, k)].add((e, d, t // (EPISODE_S * S)))

    got = traffic(client, DB, *WINDOW, episode_s=EPISODE_S)

    assert {(g.app_id, g.kind): g.rows for g in got.groups} == dict(want_rows)
    assert {(g.app_id, g.kind): g.episodes for g in got.groups} == {k: len(v) for k, v in want_eps.items()}
    assert got.episodes == len({(e, d, t // (EPISODE_S * S)) for e, d, _k, t, _a, _w in inside})
    assert got.agents == len({d for _e, d, *_ in inside}) == 3
    assert got.demonstrations == 2  # started inside the window only
    assert got.rows == len(inside) < len(rows)
    # bytes follow the row's strings: a mail row (40-char title) weighs more than a code row
    per_row = {(g.app_id, g.kind): g.bytes / g.rows for g in got.groups}
    assert per_row[("mail", "key_down")] > per_row[("code", "key_down")] > 0
    assert str(FIXED_ROW_BYTES) in got.bytes_basis and "system.parts" in got.bytes_basis

    e = estimate(got, {"*": 1.0}, {"kind:pointer_move": 0.5})
    moves = sum(n for (_a, k), n in want_rows.items() if k == "pointer_move")
    assert e.metric("events_per_s").after == pytest.approx((len(inside) - moves / 2) / 3600)
    assert e.basis["agents"] == 3 and e.basis["rows_seen"] == len(inside)


def test_an_empty_window_is_zero_not_an_error(client: Any) -> None:
    got = traffic(client, DB, *WINDOW, episode_s=EPISODE_S)
    assert (got.groups, got.episodes, got.agents, got.demonstrations) == ((), 0, 0, 0)
