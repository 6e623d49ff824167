"""``PUT /api/v1/policy/sampling?dry_run=true``: the same validation and role rule as the real
change, an estimate from the warehouse's recent traffic, nothing published, no change audited;
without a warehouse the estimate says why (200)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from handtrace.control.api.dryrun import Group, Traffic
from handtrace.control.api.roles import Role
from tests.unit.api_support import Api, make_api

URL = "/api/v1/policy/sampling"
HOUR_US = 3600 * 1_000_000


class FakeWarehouse:
    """Only ``traffic``: the dry run's one read."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.windows: list[tuple[int, int]] = []

    def traffic(self, since_us: int, until_us: int) -> Traffic:
        self.windows.append((since_us, until_us))
        if self.fail is not None:
            raise self.fail
        return Traffic(since_us=since_us, until_us=until_us, episode_s=600, episodes=12, agents=3,
                       demonstrations=2, bytes_basis="fake",
                       groups=(Group("code", "key_down", 7200, 720_000.0, 12),
                               Group("code", "pointer_move", 36_000, 1_800_000.0, 10)))


@pytest.fixture
def api(tmp_path: Path) -> Api:
    a = make_api(tmp_path, dry_run_window_s=1800)
    a.services.warehouse = FakeWarehouse()
    return a


def ops(api: Api) -> dict[str, str]:
    return api.as_("olga", "ops")


def test_a_dry_run_estimates_and_publishes_nothing(api: Api) -> None:
    r = api.client.put(URL + "?dry_run=true", headers=ops(api),
                       json={"rates": {"kind:pointer_move": 0.5}, "reason": "halve pointer traffic"})
    assert r.status_code == 200, r.text
    est = r.json()["estimate"]
    assert est["available"] is True
    metrics = {m["metric"]: m for m in est["metrics"]}
    window_s = 1800  # api.dry_run_window_s
    assert metrics["events_per_s"]["now"] == pytest.approx(43_200 / window_s)
    assert metrics["events_per_s"]["after"] == pytest.approx((7200 + 18_000) / window_s)
    assert metrics["demonstrations_kept"]["after"] == 1.0
    assert est["basis"]["window_s"] == window_s and est["basis"]["agents"] == 3
    since, until = api.services.warehouse.windows[-1]  # type: ignore[union-attr]
    assert until - since == window_s * 1_000_000
    assert api.backend.controls == [] and api.audit() == []


def test_the_real_change_still_publishes(api: Api) -> None:
    r = api.client.put(URL, headers=ops(api), json={"rates": {"*": 0.5}, "reason": "r"})
    assert r.status_code == 202 and len(api.backend.controls) == 1 and len(api.audit()) == 1
    r = api.client.put(URL + "?dry_run=false", headers=ops(api), json={"rates": {"*": 0.25}, "reason": "r"})
    assert r.status_code == 202 and len(api.backend.controls) == 2


def test_the_estimate_starts_from_the_rates_in_force(api: Api) -> None:
    api.client.put(URL, headers=ops(api), json={"rates": {"*": 0.5}, "reason": "r"})
    r = api.client.put(URL + "?dry_run=true", headers=ops(api), json={"rates": {"*": 1.0}, "reason": "r"})
    metrics = {m["metric"]: m for m in r.json()["estimate"]["metrics"]}
    assert metrics["events_per_s"]["after"] == pytest.approx(2 * metrics["events_per_s"]["now"])
    assert len(api.backend.controls) == 1  # only the real change


@pytest.mark.parametrize("body,field", [
    ({"rates": {"*": 1.5}, "reason": "r"}, "rates.*"),
    ({"rates": {"*": "lots"}, "reason": "r"}, "rates.*"),
    ({"rates": {"nonsense": 0.5}, "reason": "r"}, "rates.nonsense"),
    ({"rates": {"*": 0.5}, "reason": " "}, "reason"),
    ({"rates": {"*": 0.5}, "reason": "r", "extra": 1}, "extra"),
])
def test_a_dry_run_validates_like_the_change(api: Api, body: dict[str, Any], field: str) -> None:
    dry = api.client.put(URL + "?dry_run=true", headers=ops(api), json=body)
    real = api.client.put(URL, headers=ops(api), json=body)
    assert dry.status_code == real.status_code == 422
    assert field in {p["field"] for p in dry.json()["detail"]}
    assert dry.json() == real.json()
    assert api.backend.controls == [] and api.audit() == []


@pytest.mark.parametrize("role", list(Role))
def test_the_role_matrix(api: Api, role: Role) -> None:
    r = api.client.put(URL + "?dry_run=true", headers=api.as_("who", role.value),
                       json={"rates": {"*": 0.5}, "reason": "r"})
    if role in (Role.ops, Role.admin):
        assert r.status_code == 200 and api.audit() == []
    else:
        assert r.status_code == 403
        [entry] = api.audit()  # a refused dry run is audited as refused, like every refusal
        assert (entry["outcome"], entry["action"]) == ("refused", "sampling")
    assert api.backend.controls == []


def test_no_token_is_401(api: Api) -> None:
    assert api.client.put(URL + "?dry_run=true", json={"rates": {}, "reason": "r"}).status_code == 401


def test_without_a_warehouse_the_estimate_says_why(api: Api) -> None:
    api.services.warehouse = None
    r = api.client.put(URL + "?dry_run=true", headers=ops(api), json={"rates": {"*": 0.5}, "reason": "r"})
    assert r.status_code == 200
    assert r.json()["estimate"]["available"] is False and "no warehouse" in r.json()["estimate"]["why"]


def test_an_unreadable_warehouse_is_unavailable_not_an_error(api: Api) -> None:
    api.services.warehouse = FakeWarehouse(RuntimeError("chdb not being served: start the sink"))
    r = api.client.put(URL + "?dry_run=true", headers=ops(api), json={"rates": {"*": 0.5}, "reason": "r"})
    assert r.status_code == 200
    assert r.json()["estimate"] == {"available": False,
                                    "why": "the warehouse could not be read: chdb not being served: start the sink"}
    assert api.backend.controls == [] and api.audit() == []
