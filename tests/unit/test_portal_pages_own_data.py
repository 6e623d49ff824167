"""The employee page's own-data sections (docs/portal.md, "What is stored about me") through
FastAPI's TestClient over a MemoryWarehouse: counts by app and kind with a total, thumbnails
linking to the caller's frames, the demonstrations table with a withdraw form, the withdraw flow
(303 + flash, one audit entry, inline error), another person's demonstration = unknown (404),
and a page that still works when the warehouse cannot be read."""

from __future__ import annotations

import re
import uuid

import pytest
from fastapi.testclient import TestClient

from handtrace.control.api.services import Services
from handtrace.control.api.warehouse import MemoryWarehouse
from tests.portal_support import memory_services, portal_app, session_cookie
from tests.unit.api_support import PNG_1PX, own_data_warehouse

ALICE = session_cookie("alice", ["employee"], "e-alice", "Alice Martin")
BOB = session_cookie("bob", ["employee"], "e-bob")
ALICE_DEMO = str(uuid.UUID(int=0xA11CE))
BOB_DEMO = str(uuid.UUID(int=0xB0B))


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


@pytest.fixture
def setup() -> tuple[Services, TestClient, TestClient, MemoryWarehouse]:
    services = memory_services()
    app = portal_app(services)
    settings = app.state.settings
    a = own_data_warehouse(settings, "e-alice", ALICE_DEMO)
    b = own_data_warehouse(settings, "e-bob", BOB_DEMO)
    a.demos[0]["instruction"] = "file the <travel> expense"
    b.demos[0]["instruction"] = "bob's secret task"
    w = MemoryWarehouse(events=a.events + [{**a.events[0], "app_id": "firefox", "kind": "key"}] + b.events * 5,
                        demos=a.demos + b.demos, frames=a.frames + b.frames)
    services.warehouse = w
    alice, bob = TestClient(app, follow_redirects=False), TestClient(app, follow_redirects=False)
    alice.cookies.update(ALICE)
    bob.cookies.update(BOB)
    return services, alice, bob, w


def test_captured_section_shows_counts_total_and_frames(setup: tuple[Services, TestClient, TestClient,
                                                                     MemoryWarehouse]) -> None:
    _s, alice, _bob, _w = setup
    page = alice.get("/")
    assert page.status_code == 200
    html = page.text
    section = html[html.index('id="captured"'):html.index('id="demonstrations"')]
    rows = re.findall(r'<tr><th scope="row">([^<]*)</th><td>([^<]*)</td><td class="num">(\d+)</td></tr>', section)
    assert rows == [("code", "click", "2"), ("firefox", "key", "1")]
    assert "<caption>Events stored about you on" in section
    assert re.search(r'Total</th><td class="num">3</td>', section)
    assert "3 events and 1 demonstration stored about you" in text(section)
    assert "not kept as images" in section  # why no passive screenshots are shown
    src = f"/api/v1/me/frames/{ALICE_DEMO}/0"
    assert f'<a href="{src}"><img src="{src}" alt="Frame 0 of a demonstration, before a click' in section
    assert alice.get(src).content == PNG_1PX  # the thumbnail loads with the session cookie
    assert BOB_DEMO not in html and "secret" not in html


def test_demonstrations_table_and_escaping(setup: tuple[Services, TestClient, TestClient, MemoryWarehouse]) -> None:
    _s, alice, _bob, _w = setup
    html = alice.get("/").text
    table = html[html.index('id="demonstrations-table"'):]
    assert "file the &lt;travel&gt; expense" in table and "<travel>" not in table
    assert re.search(r"<th scope=\"col\">Started</th>.*Instruction.*Status.*Steps.*Withdrawn\?", table, re.S)
    assert f'action="/portal/me/demonstrations/{ALICE_DEMO}/withdraw"' in table
    assert '<label for="withdraw-reason-1">' in table and 'id="withdraw-reason-1" name="reason"' in table
    assert "required" in table[table.index('id="withdraw-reason-1"'):][:300]


def test_withdraw_flow(setup: tuple[Services, TestClient, TestClient, MemoryWarehouse]) -> None:
    services, alice, _bob, w = setup
    r = alice.post(f"/portal/me/demonstrations/{ALICE_DEMO}/withdraw", data={"reason": "shows a customer"})
    assert r.status_code == 303 and r.headers["location"] == "/#demonstrations"
    page = alice.get(r.headers["location"]).text
    assert "Demonstration withdrawn" in page
    assert len(w.withdrawals) == 1 and w.withdrawals[0]["demonstration_id"] == ALICE_DEMO
    entries = services.audit.entries(10)
    assert [(e["action"], e["outcome"], e["target"]) for e in entries] == [
        ("demonstration_withdraw", "allowed", ALICE_DEMO)]
    row = page[page.index('id="demonstration-1"'):]
    row = row[:row.index("</tr>")]
    assert "Yes" in row and "<form" not in row  # withdrawn: no form any more


def test_withdraw_without_reason_is_inline_error(setup: tuple[Services, TestClient, TestClient,
                                                               MemoryWarehouse]) -> None:
    services, alice, _bob, w = setup
    r = alice.post(f"/portal/me/demonstrations/{ALICE_DEMO}/withdraw", data={"reason": " "})
    assert r.status_code == 422
    assert 'id="withdraw-reason-error-1"' in r.text and "is required" in r.text
    assert 'aria-invalid="true" aria-describedby="withdraw-reason-error-1"' in r.text
    assert w.withdrawals == [] and services.audit.entries(10) == []


def test_another_persons_demonstration_is_the_unknown_404(setup: tuple[Services, TestClient, TestClient,
                                                                        MemoryWarehouse]) -> None:
    services, alice, _bob, w = setup
    theirs = alice.post(f"/portal/me/demonstrations/{BOB_DEMO}/withdraw", data={"reason": "x"})
    unknown = alice.post(f"/portal/me/demonstrations/{uuid.UUID(int=7)}/withdraw", data={"reason": "x"})
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.text == unknown.text
    assert w.withdrawals == []
    assert [e["outcome"] for e in services.audit.entries(10)] == ["refused", "refused"]


def test_cross_site_withdraw_is_refused(setup: tuple[Services, TestClient, TestClient, MemoryWarehouse]) -> None:
    _services, alice, _bob, w = setup
    r = alice.post(f"/portal/me/demonstrations/{ALICE_DEMO}/withdraw", data={"reason": "x"},
                   headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403 and w.withdrawals == []


@pytest.mark.parametrize("warehouse", [None, MemoryWarehouse(unavailable="not being served: start the sink")])
def test_sections_show_the_message_and_the_page_still_works(warehouse: MemoryWarehouse | None) -> None:
    services = memory_services()
    services.warehouse = warehouse
    c = TestClient(portal_app(services), follow_redirects=False)
    c.cookies.update(ALICE)
    page = c.get("/")
    assert page.status_code == 200
    expected = "not being served: start the sink" if warehouse else "no warehouse is configured"
    assert page.text.count(expected) == 2  # both sections say why
    assert 'id="captured-unavailable"' in page.text and 'id="demonstrations-unavailable"' in page.text
    assert 'id="pause-button"' in page.text  # the rest of the page works
    r = c.post("/portal/pause", data={"minutes": "15"})
    assert r.status_code == 303
    r = c.post(f"/portal/me/demonstrations/{ALICE_DEMO}/withdraw", data={"reason": "x"})
    assert r.status_code == 503 and expected in r.text
