"""``ClickHouseWarehouse`` on the real embedded ClickHouse (docs/design/control-plane.md, Part 3
B): two participants' demonstrations (``export.simulate.seed_demonstrations``) and passive events
(tests/demo_messages ``events_ipc``, the stream's STORED_SCHEMA); each person sees only their own
counts, frames and demonstrations, checked against an oracle computed in polars over the whole
tables; a withdrawal writes its row (the one ``handtrace dataset withdraw`` writes) and shows; a
demonstration of another person is refused exactly like an unknown one; ClickHouse errors become
WarehouseUnavailable."""

from __future__ import annotations

import hashlib
import random
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest

from handtrace.control.api.services import WarehouseUnavailable
from handtrace.control.api.warehouse import RECENT_FRAMES, ClickHouseWarehouse
from handtrace.core import clickhouse
from handtrace.core.framestore import LocalStore
from handtrace.core.rows import from_ipc, to_ipc
from handtrace.core.settings import Settings
from handtrace.export import simulate
from handtrace.export.dataset import withdraw
from handtrace.sink.schema import migrate
from tests.demo_messages import events_ipc

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

T0 = 1_790_000_000_000_000  # 2026-09
DAY = 24 * 3600 * 10**6
DB = "handtrace"


class Seeded:
    def __init__(self, settings: Settings, client: Any, store: LocalStore, result: simulate.SeedResult) -> None:
        self.settings, self.client, self.store, self.result = settings, client, store, result
        self.a, self.b = result.participants

    def warehouse(self) -> ClickHouseWarehouse:
        return ClickHouseWarehouse(self.settings, client_factory=lambda: self.client)

    def table(self, name: str) -> pl.DataFrame:
        frame = pl.from_arrow(self.client.query_arrow(f"SELECT * FROM {DB}.{name}"))
        assert isinstance(frame, pl.DataFrame)
        return frame


def _passive(key: str, kind: str, app: str, n: int, offset: int, t0_us: int) -> bytes:
    """``n`` stored passive events of ``key`` (the stream's rows) with ``kind`` and ``app``."""
    table = from_ipc(events_ipc(key, "dev-" + key[:8], n, random.Random(offset), offset, t0_us)[0])
    for name, value in (("kind", kind), ("app_id", app)):
        i = table.schema.get_field_index(name)
        table = table.set_column(i, table.schema.field(i), pa.array([value] * n, pa.string()))
    return to_ipc(table)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Seeded]:
    tmp = tmp_path_factory.mktemp("warehouse")
    settings = Settings(state_dir=tmp / "state", clickhouse={"dsn": f"chdb://{tmp / 'ch'}", "database": DB},
                        store={"url": f"file://{tmp / 'store'}"}, stream={"pseudonym_key": "k" * 40})
    dsn = settings.clickhouse_dsn()
    client = clickhouse.connect(dsn)
    try:
        migrate(client, DB)
        store = LocalStore(tmp / "store")
        result = simulate.seed_demonstrations(client, DB, store, n=6, steps=4, participants=2, seed=5, t0_us=T0,
                                              frame_kind="plain", workers=1, batch_size=3)
        a, b = result.participants
        for i, (key, kind, app, n, t0) in enumerate([
                (a, "click", "code", 7, T0 + 1000), (a, "key", "org.example.OnlyA", 3, T0 + 2000),
                (b, "click", "code", 11, T0 + 3000), (a, "click", "code", 5, T0 - 2 * DAY)]):
            client.raw_insert(f"{DB}.events", None, _passive(key, kind, app, n, 100 + i, t0), fmt="ArrowStream")
        yield Seeded(settings, client, store, result)
    finally:
        clickhouse.close(dsn)


def oracle_counts(s: Seeded, key: str, since: int, until: int) -> list[dict[str, Any]]:
    """Counts by (app, kind) computed over the whole tables in polars, independently of the SQL."""
    both = pl.concat([s.table(t).select("employee_key", "app_id", "kind", "captured_at")
                      for t in ("events", "demonstration_events")])
    lo, hi = (pl.lit(v).cast(pl.Datetime("us", "UTC")) for v in (since, until))
    got = (both.filter((pl.col("employee_key") == key) & (pl.col("captured_at") >= lo) & (pl.col("captured_at") < hi))
           .group_by(pl.col("app_id").fill_null(""), "kind").len()
           .sort(["len", "app_id", "kind"], descending=[True, False, False]))
    return [{"app_id": r["app_id"], "kind": r["kind"], "events": r["len"]} for r in got.iter_rows(named=True)]


def test_each_person_sees_only_their_own_counts(seeded: Seeded) -> None:
    w = seeded.warehouse()
    since, until = T0 - 3600 * 10**6, T0 + DAY
    for key in (seeded.a, seeded.b):
        got = w.captured(key, since, until)
        expected = oracle_counts(seeded, key, since, until)
        assert expected, "the seed wrote rows for everyone"
        assert got["by_app_kind"] == expected
        assert got["total"] == sum(r["events"] for r in expected)
        assert got["demonstrations"] == 3
    a = w.captured(seeded.a, since, until)["by_app_kind"]
    assert {"app_id": "org.example.OnlyA", "kind": "key", "events": 3} in a
    b = w.captured(seeded.b, since, until)["by_app_kind"]
    assert not any(r["app_id"] == "org.example.OnlyA" for r in b)
    # the window: 2 days earlier only the 5 old passive clicks of a
    old = w.captured(seeded.a, T0 - 2 * DAY, T0 - DAY)
    assert old["by_app_kind"] == [{"app_id": "code", "kind": "click", "events": 5}] and old["frames"] == []
    assert w.captured("0" * 64, since, until) == {"total": 0, "by_app_kind": [], "demonstrations": 0, "frames": []}


def test_recent_frames_are_the_newest_of_ones_own(seeded: Seeded) -> None:
    w = seeded.warehouse()
    frames = seeded.table("frames")
    mine_ids = set(seeded.result.demonstration_ids[0::2])
    for key in (seeded.a, seeded.b):
        got = w.captured(key, T0 - DAY, T0 + DAY)["frames"]
        theirs = frames.filter(pl.col("employee_key") == key).sort(["captured_at", "step"], descending=True)
        assert len(got) == min(RECENT_FRAMES, theirs.height) > 0
        assert [f["sha256"] for f in got] == theirs.get_column("sha256").to_list()[:RECENT_FRAMES]
        assert ({f["demonstration_id"] for f in got} <= mine_ids) == (key == seeded.a)


def test_frame_lookup_is_self_only(seeded: Seeded) -> None:
    w = seeded.warehouse()
    a_demo, b_demo = seeded.result.demonstration_ids[0], seeded.result.demonstration_ids[1]
    meta = w.frame(seeded.a, a_demo, 0)
    assert meta is not None and meta["format"] in ("png", "webp")
    data = seeded.store.get(meta["object_key"])
    assert hashlib.sha256(data).hexdigest() == meta["sha256"]
    assert w.frame(seeded.a, b_demo, 0) is None  # bob's: as if it did not exist
    assert w.frame(seeded.b, b_demo, 0) is not None
    assert w.frame(seeded.a, str(uuid.UUID(int=1)), 0) is None
    assert w.frame(seeded.a, "not-a-uuid", 0) is None
    assert w.frame(seeded.a, a_demo, 10_000) is None


def test_demonstrations_and_withdrawal(seeded: Seeded) -> None:
    """The only test that writes (the others read what the fixture seeded)."""
    w = seeded.warehouse()
    ids = seeded.result.demonstration_ids
    a_demos = w.demonstrations(seeded.a, 100)
    assert [d["demonstration_id"] for d in a_demos] == list(reversed(ids[0::2]))  # newest first, only a's
    assert [d["demonstration_id"] for d in w.demonstrations(seeded.b, 100)] == list(reversed(ids[1::2]))
    assert all(d["status"] == "complete" and d["frames"] > 0 and not d["withdrawn"] for d in a_demos)
    assert len(w.demonstrations(seeded.a, 2)) == 2

    before = seeded.table("withdrawals").height
    for not_mine in (ids[1], str(uuid.UUID(int=2)), "nope"):
        with pytest.raises(KeyError):
            w.withdraw(employee_key=seeded.a, demonstration_id=not_mine, actor="alice", reason="mine?")
    assert seeded.table("withdrawals").height == before  # nothing written for a refusal

    wid = w.withdraw(employee_key=seeded.a, demonstration_id=ids[2], actor="alice", reason="shows a customer")
    rows = pl.from_arrow(seeded.client.query_arrow(
        f"SELECT toString(withdrawal_id) AS wid, kind, employee_key, toString(demonstration_id) AS demo, actor, reason "
        f"FROM {DB}.withdrawals"))
    assert isinstance(rows, pl.DataFrame)
    assert rows.filter(pl.col("wid") == wid).rows() == [
        (wid, "demonstration", seeded.a, ids[2], "alice", "shows a customer")]
    after = {d["demonstration_id"]: d for d in w.demonstrations(seeded.a, 100)}
    assert after[ids[2]]["withdrawn"] and after[ids[2]]["withdrawn_at"]
    assert [i for i, d in after.items() if d["withdrawn"]] == [ids[2]]
    assert not any(d["withdrawn"] for d in w.demonstrations(seeded.b, 100))

    # `handtrace dataset withdraw --participant` (erasure, consent withdrawn) shows on every one of
    # that person's demonstrations, and on nobody else's.
    withdraw(seeded.client, DB, employee_key=seeded.b, actor="dpo", reason="consent withdrawn")
    theirs = w.demonstrations(seeded.b, 100)
    assert theirs and all(d["withdrawn"] and d["withdrawn_at"] for d in theirs)
    assert [d["demonstration_id"] for d in w.demonstrations(seeded.a, 100) if d["withdrawn"]] == [ids[2]]


def test_clickhouse_errors_are_warehouse_unavailable(seeded: Seeded, tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, clickhouse={"dsn": seeded.settings.clickhouse_dsn(), "database": "missing_db"},
                 stream={"pseudonym_key": "k" * 40})
    w = ClickHouseWarehouse(s, client_factory=lambda: seeded.client)
    with pytest.raises(WarehouseUnavailable, match="could not be read"):
        w.captured(seeded.a, 0, T0)
    with pytest.raises(WarehouseUnavailable, match="could not be read"):
        w.demonstrations(seeded.a, 10)

    def down() -> Any:
        raise clickhouse.ClickHouseUnavailable("not being served: start the sink (handtrace sink run)")

    w = ClickHouseWarehouse(s, client_factory=down)
    with pytest.raises(WarehouseUnavailable, match="start the sink"):
        w.frame(seeded.a, seeded.result.demonstration_ids[0], 0)

