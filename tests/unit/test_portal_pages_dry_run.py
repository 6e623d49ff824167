"""The ops page's estimate (TestClient, no browser): the preview shows what the new rates would
store -- metric, now, after, change, with its basis in words -- before the Apply button; without a
warehouse it says why; the fleet impact summary shows what the rates in force store. Nothing is
published or audited by a preview."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from handtrace.control.api.dryrun import Group, Traffic
from handtrace.control.api.services import Services
from handtrace.control.api.warehouse import MemoryWarehouse
from tests.portal_support import backend, memory_services, portal_app, session_cookie

OPS = session_cookie("olga", ["ops"], name="Olga Ops")


class FakeWarehouse(MemoryWarehouse):
    """An hour of traffic for the dry run; the rest of the Warehouse (own data) empty."""

    def __init__(self, fail: Exception | None = None) -> None:
        super().__init__()
        self.fail = fail

    def traffic(self, since_us: int, until_us: int) -> Traffic:
        if self.fail is not None:
            raise self.fail
        return Traffic(since_us=since_us, until_us=until_us, episode_s=600, episodes=40, agents=4,
                       demonstrations=3, bytes_basis="bytes: test model",
                       groups=(Group("code", "key_down", 3600, 3_600_000.0, 40),
                               Group("code", "pointer_move", 14_400, 7_200_000.0, 10)))


@pytest.fixture
def services() -> Services:
    s = memory_services()  # policy version 7: {"kind:pointer_move": 0.25}
    s.warehouse = FakeWarehouse()
    return s


def client(services: Services) -> TestClient:
    c = TestClient(portal_app(services), follow_redirects=False)
    c.cookies.update(OPS)
    return c


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def section(html: str, element_id: str) -> str:
    m = re.search(rf'<section aria-labelledby="[^"]+" id="{element_id}">(.*?)</section>', html, re.S)
    assert m is not None, f"no section {element_id}"
    return m.group(1)


def preview(services: Services, rows: list[tuple[str, str]]) -> Any:
    data = {"intent": "preview", "reason": "", "base_version": "7"}
    for i, (sel, rate) in enumerate(rows):
        data[f"selector_{i}"], data[f"rate_{i}"] = sel, rate
    return client(services).post("/portal/ops/sampling", data=data)


def test_the_preview_shows_the_estimate_before_apply(services: Services) -> None:
    r = preview(services, [("kind:pointer_move", "0.5")])
    assert r.status_code == 200
    html = section(r.text, "sampling-estimate")
    t = text(html)
    # 3600 + 14400 rows an hour now; pointer_move doubles (0.25 -> 0.5): 3600 + 28800 after
    assert "Events stored per second 5 events/s 9 events/s x1.8" in t
    assert "Bytes stored per hour per agent 2.7 MB/h 4.5 MB/h x1.67" in t
    assert "Share of demonstrations kept 100% 100% unchanged" in t
    assert re.search(r"<caption>Estimated effect of these rates, from the last 1 hour of stored events</caption>",
                     html)
    assert '<th scope="col">Metric</th>' in html and '<th scope="row">Events stored per second</th>' in html
    assert ("Based on 18000 events stored in the last 1 hour from 4 agents, in 40 episodes of 10 minutes and "
            "2 app and event-kind groups; 3 demonstrations started in it (never sampled).") in t
    assert r.text.index('id="sampling-estimate"') < r.text.index('id="apply-button"')
    assert [p["policy"]["version"] for p in backend(services).controls if p["kind"] == "policy_update"] == [7]
    assert services.audit.entries(100) == []


def test_the_basis_names_what_is_not_estimated(services: Services) -> None:
    r = preview(services, [("kind:pointer_move", "0.25"), ("cohort:pilot", "0.5"), ("app:mail", "1")])
    t = text(section(r.text, "sampling-estimate"))
    assert "Stored events carry no cohort, so cohort:pilot is ignored by this estimate." in t
    # pointer moves at rate 0 in force: its stored rows (from before) cannot be scaled, and what
    # raising it would keep is unseen
    applied = client(services).post("/portal/ops/sampling", data={
        "intent": "apply", "reason": "stop pointer moves", "base_version": "7",
        "selector_0": "kind:pointer_move", "rate_0": "0"})
    assert applied.status_code == 303
    t = text(section(preview(services, [("kind:pointer_move", "0.5")]).text, "sampling-estimate"))
    assert "Not estimated (nothing stored under the rate now to scale from): code / pointer_move." in t
    assert "Rows of kind:pointer_move are not stored now (rate 0)" in t and "lower bound" in t


def test_no_warehouse_says_why_in_place_of_the_estimate(services: Services) -> None:
    services.warehouse = None
    r = preview(services, [("kind:pointer_move", "0.5")])
    assert r.status_code == 200
    t = text(section(r.text, "sampling-estimate"))
    assert t.startswith("Estimated effect No estimate is available: no warehouse is configured")
    assert 'id="apply-button"' in r.text  # the dry run never blocks the change


def test_an_unreadable_warehouse_says_why(services: Services) -> None:
    services.warehouse = FakeWarehouse(RuntimeError("not being served: start the sink"))
    t = text(section(preview(services, [("*", "0.5")]).text, "sampling-estimate"))
    assert "the warehouse could not be read: not being served: start the sink" in t


def test_an_invalid_form_shows_no_estimate(services: Services) -> None:
    r = preview(services, [("*", "1.5")])
    assert r.status_code == 422 and 'id="sampling-estimate"' not in r.text


def test_the_fleet_impact_summary_shows_what_is_stored_now(services: Services) -> None:
    html = client(services).get("/ops").text
    t = text(section(html, "fleet-impact"))
    assert "Events stored per second 5 events/s" in t
    assert "Agents seen 4" in t
    assert "Bytes stored per hour per agent 2.7 MB/h" in t
    assert 'id="sampling-estimate"' not in html  # the estimate is the preview's
    services.warehouse = None
    assert "Not available: no warehouse" in text(section(client(services).get("/ops").text, "fleet-impact"))
