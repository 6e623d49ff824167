"""The portal's pages and form routes through FastAPI's TestClient (no browser): status codes,
redirects with a flash message, one audit entry per change and per refusal, self-only actions,
inline validation errors, and escaping of whatever people type."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from fastapi.testclient import TestClient

from handtrace.control.api.services import Services
from handtrace.core.clock import now_us
from tests.portal_support import memory_services, portal_app, records, session_cookie

ALICE = session_cookie("alice", ["employee"], "e-alice", "Alice Martin")
BOB = session_cookie("bob", ["employee"], "e-bob")
HANNA = session_cookie("hanna", ["hr"], "e-hanna", "Hanna HR")
ADMIN = session_cookie("root", ["admin"])
OPS = session_cookie("svc-ops", ["ops"])  # every caller is an employee of themself (employee id = sub)


@pytest.fixture
def services() -> Services:
    return memory_services()


def client(services: Services, cookies: dict[str, str] | None) -> TestClient:
    c = TestClient(portal_app(services), follow_redirects=False)
    if cookies:
        c.cookies.update(cookies)
    return c


def audit(services: Services) -> list[dict]:
    return services.audit.entries(1000)[::-1]


def follow(c: TestClient, response) -> str:
    assert response.status_code == 303, response.text
    page = c.get(response.headers["location"])
    assert page.status_code == 200
    return page.text


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_no_session_is_401_page_with_bearer_challenge(services: Services) -> None:
    for path in ("/", "/hr"):
        r = client(services, None).get(path)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert "Sign in needed" in r.text and r.headers["content-type"].startswith("text/html")
    r = client(services, None).post("/portal/pause", data={"minutes": "15"})
    assert r.status_code == 401 and not records(services)


def test_employee_page_shows_capturing_policy_version_and_consent(services: Services) -> None:
    r = client(services, ALICE).get("/")
    assert r.status_code == 200
    t = text(r.text)
    assert "Capturing" in t and "Policy version 7" in t and "Alice Martin" in t
    assert "code, firefox" in t and "example.com" in t
    assert 'lang="en"' in r.text and 'href="#main"' in r.text
    assert "/hr" not in r.text  # no HR link for an employee


def test_pause_publishes_one_record_for_self_audits_and_redirects_with_the_end_time(services: Services) -> None:
    c = client(services, ALICE)
    before = now_us()
    r = c.post("/portal/pause", data={"minutes": "15", "reason": "doctor call", "employee_id": "e-bob"})
    after = now_us()
    [rec] = records(services)
    assert rec["kind"] == "pause_start" and rec["employee_id"] == "e-alice"  # the form's employee_id is ignored
    assert rec["actor"] == "alice" and rec["actor_role"] == "employee" and rec["reason"] == "doctor call"
    assert before + 15 * 60_000_000 <= rec["pause_ends_at_us"] <= after + 15 * 60_000_000
    [entry] = audit(services)
    assert entry["action"] == "pause_start" and entry["outcome"] == "allowed" and entry["target"] == "e-alice"
    assert entry["before"]["mode"] == "capturing" and entry["after"]["mode"] == "paused"
    until = datetime.fromtimestamp(rec["pause_ends_at_us"] / 1e6, UTC).strftime("%H:%M")
    page = text(follow(c, r))
    assert f"Capture paused until {until} UTC." in page  # the flash
    assert f"Paused until {until} UTC" in page
    assert services.state.employee("e-bob")["mode"] == "capturing"
    assert "Capture paused" not in text(c.get("/").text)  # the flash shows once


@pytest.mark.parametrize("minutes", ["", "0", "31", "60", "abc", "15.5", "-5"])
def test_a_pause_outside_the_choices_rerenders_with_the_error_next_to_minutes(services: Services,
                                                                              minutes: str) -> None:
    r = client(services, ALICE).post("/portal/pause", data={"minutes": minutes})
    assert r.status_code == 422
    assert re.search(r'<p class="error" id="pause-minutes-error">choose 5, 15, 30 minutes</p>', r.text)
    assert 'aria-describedby="pause-minutes-error"' in r.text
    assert not records(services) and not audit(services)


def test_resume_ends_the_pause(services: Services) -> None:
    c = client(services, ALICE)
    c.post("/portal/pause", data={"minutes": "5"})
    assert 'id="resume-button"' in c.get("/").text
    page = text(follow(c, c.post("/portal/resume")))
    assert "Capture resumed." in page and "Capturing" in page
    assert [r["kind"] for r in records(services)] == ["pause_start", "pause_end"]
    assert [e["action"] for e in audit(services)] == ["pause_start", "pause_end"]


def test_exemption_request_needs_a_reason_shown_next_to_the_field(services: Services) -> None:
    c = client(services, ALICE)
    r = c.post("/portal/exemption-request", data={"reason": "   "})
    assert r.status_code == 422
    assert '<p class="error" id="exemption-reason-error">is required (kept in the audit trail)</p>' in r.text
    r = c.post("/portal/exemption-request", data={"reason": "x" * 501})
    assert r.status_code == 422 and "at most 500 characters" in r.text
    assert not records(services) and not audit(services)


def test_request_then_hr_grants_then_employee_is_exempt(services: Services) -> None:
    alice, hr = client(services, ALICE), client(services, HANNA)
    assert "Your exemption request was sent to HR." in follow(
        alice, alice.post("/portal/exemption-request", data={"reason": "union representative"}))
    assert "waiting for HR" in alice.get("/").text
    queue = hr.get("/hr")
    assert queue.status_code == 200 and "e-alice" in queue.text and "union representative" in queue.text
    assert 'action="/portal/hr/e-alice/grant"' in queue.text
    page = follow(hr, hr.post("/portal/hr/e-alice/grant", data={"reason": "works council agreement"}))
    assert "Exemption granted to e-alice." in page and "No exemption request is waiting." in page
    grant = records(services)[-1]
    assert (grant["kind"], grant["employee_id"], grant["actor"], grant["actor_role"]) == \
        ("exemption_grant", "e-alice", "hanna", "hr")
    assert grant["exemption_effective_at_us"] == grant["occurred_at_us"]
    entry = audit(services)[-1]
    assert entry["action"] == "exemption_grant" and "hr" in entry["roles"] and entry["reason"] == \
        "works council agreement" and entry["before"]["mode"] == "capturing" and entry["after"]["mode"] == "exempt"
    t = text(alice.get("/").text)
    assert "Exempt since" in t and "Pause capture" not in t and "Request an exemption" not in t


def test_deny_is_an_audit_entry_only_and_clears_the_queue(services: Services) -> None:
    alice, hr = client(services, ALICE), client(services, HANNA)
    alice.post("/portal/exemption-request", data={"reason": "please"})
    n = len(records(services))
    page = follow(hr, hr.post("/portal/hr/e-alice/deny", data={"reason": "role requires capture"}))
    assert "Exemption request of e-alice denied." in page and "No exemption request is waiting." in page
    assert len(records(services)) == n  # nothing published
    entry = audit(services)[-1]
    assert entry["action"] == "exemption_deny" and entry["target"] == "e-alice" and entry["outcome"] == "allowed"
    assert services.state.employee("e-alice")["mode"] == "capturing"


@pytest.mark.parametrize("action", ["grant", "deny"])
def test_hr_decision_needs_a_reason_next_to_that_rows_field(services: Services, action: str) -> None:
    client(services, ALICE).post("/portal/exemption-request", data={"reason": "please"})
    n_rec, n_audit = len(records(services)), len(audit(services))
    r = client(services, HANNA).post(f"/portal/hr/e-alice/{action}", data={"reason": ""})
    assert r.status_code == 422
    assert f'<p class="error" id="{action}-reason-error-1">is required (kept in the audit trail)</p>' in r.text
    assert (len(records(services)), len(audit(services))) == (n_rec, n_audit)


@pytest.mark.parametrize("cookies", [ALICE, OPS], ids=["employee", "ops"])
def test_without_hr_role_hr_page_and_decisions_are_403_and_audited(services: Services,
                                                                   cookies: dict[str, str]) -> None:
    client(services, BOB).post("/portal/exemption-request", data={"reason": "please"})
    n_rec, n_audit = len(records(services)), len(audit(services))
    c = client(services, cookies)
    r = c.get("/hr")
    assert r.status_code == 403 and "Not allowed" in r.text and "e-bob" not in r.text
    for action in ("grant", "deny"):
        r = c.post(f"/portal/hr/e-bob/{action}", data={"reason": "I decide"})
        assert r.status_code == 403
    assert len(records(services)) == n_rec  # nothing published
    refused = audit(services)[n_audit:]
    assert len(refused) == 3 and all(e["outcome"] == "refused" for e in refused)
    assert [e["target"] for e in refused] == ["/hr", "/portal/hr/e-bob/grant", "/portal/hr/e-bob/deny"]
    assert services.state.employee("e-bob")["mode"] == "capturing"
    assert services.state.pending_requests()[0]["employee_id"] == "e-bob"


def test_admin_may_use_the_hr_page(services: Services) -> None:
    client(services, BOB).post("/portal/exemption-request", data={"reason": "please"})
    admin = client(services, ADMIN)
    assert admin.get("/hr").status_code == 200
    assert admin.post("/portal/hr/e-bob/grant", data={"reason": "ok"}).status_code == 303
    assert services.state.employee("e-bob")["mode"] == "exempt"


def test_what_people_type_is_escaped_everywhere(services: Services) -> None:
    evil = '<script>alert("x")</script><img src=x onerror=alert(1)>'
    alice, hr = client(services, ALICE), client(services, HANNA)
    alice.post("/portal/exemption-request", data={"reason": evil})
    queue = hr.get("/hr").text
    assert "<script>alert" not in queue and "<img src=x" not in queue
    assert "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in queue
    # ... in a re-rendered field value, in a flash naming an employee id, and in the path.
    r = alice.post("/portal/pause", data={"minutes": "99", "reason": '"><script>alert(2)</script>'})
    assert r.status_code == 422 and "<script>alert(2)" not in r.text and "&#34;&gt;&lt;script&gt;" in r.text
    weird = "<b>x\"&'<i>"  # a valid employee id (printable, no spaces)
    r = hr.post(f"/portal/hr/{weird}/grant", data={"reason": "ok"})
    assert r.status_code == 303, r.text
    page = hr.get(r.headers["location"])
    assert "<b>x" not in page.text
    assert "Exemption granted to &lt;b&gt;x&#34;&amp;&#39;&lt;i&gt;." in page.text
    # One with a space is not an employee id: refused on the page as in the JSON API.
    r = hr.post("/portal/hr/<img src=x>/grant", data={"reason": "ok"})
    assert r.status_code == 422 and "<img src=x>" not in r.text


def test_policy_absent_says_nothing_is_captured() -> None:
    services = memory_services(policy=None)
    assert "nothing is captured" in client(services, ALICE).get("/").text


def test_expired_pause_shows_capturing(services: Services) -> None:
    client(services, ALICE).post("/portal/pause", data={"minutes": "5"})
    records(services)[-1]["pause_ends_at_us"] = now_us() - 1
    assert "Capturing" in text(client(services, ALICE).get("/").text)


def test_templates_and_stylesheet_ship_inside_the_package() -> None:
    from handtrace.control.api import pages

    package = pages.HERE.parents[2]  # services/handtrace: the wheel's `packages` entry
    for path in (pages.TEMPLATES / "base.html.j2", pages.STATIC / "portal.css"):
        assert path.is_file() and package in path.parents
    css = client(memory_services(), None).get("/static/portal.css")
    assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")
    assert ":focus-visible" in css.text


def test_pause_time_in_flash_matches_the_record_across_an_hour(services: Services) -> None:
    # The flash and the page both say HH:MM of the end, not of the start.
    c = client(services, ALICE)
    r = c.post("/portal/pause", data={"minutes": "30"})
    end = datetime.fromtimestamp(records(services)[-1]["pause_ends_at_us"] / 1e6, UTC)
    assert end - datetime.now(UTC) > timedelta(minutes=29)
    assert f"until {end:%H:%M} UTC" in follow(c, r)


@pytest.mark.parametrize("headers", [
    {"Origin": "https://evil.example"},
    {"Origin": "null"},
    {"Sec-Fetch-Site": "cross-site", "Origin": "http://testserver"},
    {"Sec-Fetch-Site": "same-site"},
], ids=["foreign-origin", "null-origin", "sec-fetch-cross-site", "sec-fetch-same-site"])
def test_a_form_posted_from_another_site_is_refused_and_audited(services: Services, headers: dict) -> None:
    r = client(services, ALICE).post("/portal/pause", data={"minutes": "5"}, headers=headers)
    assert r.status_code == 403 and "Not allowed" in r.text
    r = client(services, HANNA).post("/portal/hr/e-alice/grant", data={"reason": "x"}, headers=headers)
    assert r.status_code == 403
    assert not records(services)
    assert [(e["subject"], e["outcome"]) for e in audit(services)] == [("alice", "refused"), ("hanna", "refused")]


@pytest.mark.parametrize("headers", [{}, {"Origin": "http://testserver"}, {"Sec-Fetch-Site": "same-origin"}],
                         ids=["no-header", "same-origin", "sec-fetch-same-origin"])
def test_a_form_posted_from_the_portal_itself_is_accepted(services: Services, headers: dict) -> None:
    assert client(services, ALICE).post("/portal/pause", data={"minutes": "5"}, headers=headers).status_code == 303
    assert len(records(services)) == 1
