"""The portal in a real headless Chromium (Debian's, driven by Playwright; tests/browser.py) against
the app served by uvicorn on a loopback port: what an employee and HR see and do, that an employee
cannot see or act on anyone else, keyboard-only use, labels, contrast and a laptop-sized screen.
Screenshots of each page land in tests/artifacts/portal/."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from handtrace.control.api.services import Services
from tests.browser import CONTRAST_JS, LABELS_JS, live_server, screenshot
from tests.portal_support import memory_services, portal_app, records, session_cookie

ALICE = session_cookie("alice", ["employee"], "e-alice", "Alice Martin")
BOB = session_cookie("bob", ["employee"], "e-bob", "Bob Stone")
HANNA = session_cookie("hanna", ["hr"], "e-hanna", "Hanna HR")

@pytest.fixture
def services() -> Services:
    return memory_services()


def state_text(page: Any) -> str:
    return re.sub(r"\s+", " ", page.locator("#capture-state").inner_text()).strip()


def hhmm(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%H:%M")


def test_employee_pauses_15_minutes_sees_the_end_time_and_resumes(open_as: Any, services: Services) -> None:
    page = open_as(ALICE, javascript=False)  # plain HTML forms: no JavaScript needed
    assert state_text(page).startswith("Capturing")
    screenshot(page, "portal", "employee-capturing")
    page.get_by_label("Pause for").select_option("15")
    page.get_by_label("Reason (optional)").fill("a call with my doctor")
    before = datetime.now(UTC)
    page.get_by_role("button", name="Pause capture").click()
    page.wait_for_url(re.compile(r"/$"))
    after = datetime.now(UTC)
    expected = {hhmm(before + timedelta(minutes=15)), hhmm(after + timedelta(minutes=15))}
    shown = re.match(r"Paused until (\d\d:\d\d) UTC", state_text(page))
    assert shown and shown.group(1) in expected, state_text(page)
    assert page.get_by_role("status").inner_text().strip() == f"Capture paused until {shown.group(1)} UTC."
    [rec] = records(services)
    assert (rec["kind"], rec["employee_id"], rec["reason"]) == ("pause_start", "e-alice", "a call with my doctor")
    screenshot(page, "portal", "employee-paused")

    page.get_by_role("button", name="Resume capture").click()
    page.wait_for_url(re.compile(r"/$"))
    assert state_text(page).startswith("Capturing")
    assert page.get_by_role("status").inner_text().strip() == "Capture resumed."
    assert page.get_by_role("button", name="Resume capture").count() == 0


def test_exemption_requested_by_employee_is_granted_by_hr(open_as: Any, services: Services) -> None:
    alice = open_as(ALICE)
    alice.get_by_label("Why do you ask for an exemption?").fill("I am a works council member")
    alice.get_by_role("button", name="Request an exemption").click()
    alice.wait_for_url(re.compile(r"/$"))
    assert "waiting for HR" in alice.content()

    hr = open_as(HANNA, "/hr")
    row = hr.get_by_role("row").filter(has_text="e-alice")
    assert row.count() == 1 and "I am a works council member" in row.inner_text()
    screenshot(hr, "portal", "hr-queue")
    hr.get_by_label("Reason to grant e-alice").fill("works council agreement, clause 4")
    hr.get_by_role("button", name="Grant exemption of e-alice").click()
    hr.wait_for_url(re.compile(r"/hr$"))
    assert hr.get_by_role("status").inner_text().strip() == "Exemption granted to e-alice."
    assert hr.locator("#no-requests").is_visible()
    screenshot(hr, "portal", "hr-after-grant")

    alice.reload()
    assert state_text(alice).startswith("Exempt since")
    assert alice.get_by_role("button", name="Pause capture").count() == 0
    grant = records(services)[-1]  # type: ignore[attr-defined]
    assert (grant["kind"], grant["employee_id"], grant["actor"], grant["actor_role"]) == \
        ("exemption_grant", "e-alice", "hanna", "hr")
    screenshot(alice, "portal", "employee-exempt")


def test_employee_cannot_open_hr_or_act_on_another_employee(open_as: Any, services: Services) -> None:
    bob = open_as(BOB)
    bob.get_by_label("Why do you ask for an exemption?").fill("personal reasons")
    bob.get_by_role("button", name="Request an exemption").click()
    bob.wait_for_url(re.compile(r"/$"))
    n_records, n_audit = len(records(services)), len(services.audit.entries(1000))  # type: ignore[attr-defined]

    alice = open_as(ALICE)
    assert alice.get_by_role("link", name="Exemption requests").count() == 0
    response = alice.goto("/hr")
    assert response is not None and response.status == 403
    assert alice.get_by_role("heading", name="Not allowed").is_visible()
    assert "e-bob" not in alice.content() and "personal reasons" not in alice.content()
    screenshot(alice, "portal", "employee-on-hr-403")
    for action in ("grant", "deny"):  # the same browser session, forging the HR form
        r = alice.request.post(f"/portal/hr/e-bob/{action}", form={"reason": "let me in"}, max_redirects=0)
        assert r.status == 403
    # A pause form with someone else's id pauses only the sender.
    alice.request.post("/portal/pause", form={"minutes": "5", "employee_id": "e-bob"}, max_redirects=0)
    assert services.state.employee("e-bob")["mode"] == "capturing"
    assert services.state.employee("e-alice")["mode"] == "paused"
    assert services.state.pending_requests()[0]["employee_id"] == "e-bob"
    new_records = records(services)[n_records:]  # type: ignore[attr-defined]
    assert [(r["kind"], r["employee_id"]) for r in new_records] == [("pause_start", "e-alice")]
    refused = [e for e in services.audit.entries(1000)[::-1][n_audit:] if e["outcome"] == "refused"]
    assert len(refused) == 3 and all(e["subject"] == "alice" for e in refused)


def test_keyboard_only_skip_link_then_tab_to_pause_and_press_enter(open_as: Any) -> None:
    page = open_as(ALICE)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to main content"
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    assert outline != "none", "focus must be visible"
    for _ in range(30):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "pause-button":
            break
    else:
        pytest.fail("the pause button is not reachable with Tab")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
    screenshot(page, "portal", "employee-keyboard-focus")
    page.keyboard.press("Enter")
    page.wait_for_url(re.compile(r"/$"))
    assert state_text(page).startswith("Paused until")


def test_every_control_has_a_label_contrast_is_aa_and_fits_a_laptop_screen(open_as: Any) -> None:
    bob = open_as(BOB)
    bob.get_by_label("Why do you ask for an exemption?").fill("please")
    bob.get_by_role("button", name="Request an exemption").click()
    bob.wait_for_url(re.compile(r"/$"))
    pages = {"employee": open_as(ALICE), "hr": open_as(HANNA, "/hr")}
    for name, page in pages.items():
        controls = page.evaluate(LABELS_JS)
        assert len(controls) >= 2, name
        for control in controls:
            assert control["labels"], f"{name}: #{control['id']} has no label"
            located = page.get_by_label(control["labels"][0], exact=True)
            assert located.count() == 1 and located.get_attribute("id") == control["id"], control
        for button in page.get_by_role("button").all():
            assert button.inner_text().strip(), f"{name}: a button without a name"
        contrast = page.evaluate(CONTRAST_JS)
        assert contrast["checked"] >= 5 and not contrast["low"], (name, contrast)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} scrolls sideways"
        assert page.evaluate("document.documentElement.lang") == "en"


def test_live_server_stops_and_frees_its_port(services: Services) -> None:
    import socket
    import threading

    with live_server(portal_app(services)) as url:
        port = int(url.rsplit(":", 1)[1])
        assert any(t.name == f"uvicorn-{port}" for t in threading.enumerate())
    assert not any(t.name == f"uvicorn-{port}" for t in threading.enumerate())
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):
        s.settimeout(2)
        s.connect(("127.0.0.1", port))


def test_employee_sees_what_is_stored_and_withdraws_a_demonstration(open_as: Any, services: Services) -> None:
    """The own-data sections (docs/portal.md): counts by app and kind with a total, a thumbnail
    of a demonstration frame that really loads, and a withdrawal with a reason, audited."""
    import uuid

    from tests.portal_support import portal_settings
    from tests.unit.api_support import own_data_warehouse

    demo = str(uuid.UUID(int=0xA11CE))
    warehouse = own_data_warehouse(portal_settings(), "e-alice", demo)
    warehouse.demos[0]["instruction"] = "file the travel expense"
    services.warehouse = warehouse
    page = open_as(ALICE, javascript=False)
    table = page.locator("#captured-table")
    assert table.get_by_role("row").filter(has_text="code").inner_text().split() == ["code", "click", "2"]
    assert re.sub(r"\s+", " ", table.locator("tfoot").inner_text()).strip() == "Total 2"
    assert "not kept as images" in page.locator("#captured").inner_text()
    thumb = page.get_by_role("img", name=re.compile(r"^Frame 0 of a demonstration, before a click"))
    assert thumb.count() == 1
    thumb.scroll_into_view_if_needed()
    assert page.evaluate("""() => { const i = document.querySelector('ul.thumbs img');
                                    return i.complete && i.naturalWidth > 0; }"""), "the frame image loads"
    contrast = page.evaluate(CONTRAST_JS)
    assert not contrast["low"], contrast
    for control in page.evaluate(LABELS_JS):
        assert control["labels"], f"#{control['id']} has no label"
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), "scrolls sideways"
    screenshot(page, "portal", "employee-own-data")

    page.get_by_label(re.compile(r"^Reason to withdraw “file the travel expense”")).fill("it shows a customer")
    page.get_by_role("button", name=re.compile(r"^Withdraw “file the travel expense”")).click()
    page.wait_for_url(re.compile(r"/(#demonstrations)?$"))
    assert page.get_by_role("status").inner_text().strip().startswith("Demonstration withdrawn")
    row = page.locator("#demonstration-1")
    assert "Yes" in row.inner_text() and row.get_by_role("button").count() == 0
    [w] = warehouse.withdrawals
    assert (w["demonstration_id"], w["actor"], w["reason"]) == (demo, "alice", "it shows a customer")
    [entry] = [e for e in services.audit.entries(100) if e["action"] == "demonstration_withdraw"]
    assert (entry["outcome"], entry["subject"], entry["target"]) == ("allowed", "alice", demo)
    screenshot(page, "portal", "employee-withdrawn")
