"""The ops, security and auditor pages through FastAPI's TestClient (no browser): the role matrix
for each page and form, the what-this-changes preview, inline validation errors next to their
row or field, one audit entry per change and per refusal, the same code path as the JSON API,
navigation by role, and escaping."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from handtrace.control.api import actions
from handtrace.control.api.services import Services
from tests.portal_support import backend, memory_services, portal_app, session_cookie
from tests.unit.api_support import bearer, mint

ROLES = ["employee", "hr", "ops", "security", "auditor", "admin"]
PAGES = {"/ops": {"ops", "admin"}, "/security": {"security", "admin"}, "/audit": {"auditor", "admin"}}
POSTS = {
    "/portal/ops/sampling": ({"ops", "admin"}, {"selector_0": "*", "rate_0": "0.5", "reason": "x",
                                                 "intent": "apply", "base_version": "7"}),
    "/portal/security/allowlist": ({"security", "admin"}, {"allowed_apps": "code", "allowed_domains": "example.com",
                                                           "reason": "x"}),
    "/portal/security/text-capture": ({"security", "admin"}, {"app_0": "*", "mode_0": "none", "reason": "x"}),
}
OPS = session_cookie("olga", ["ops"], name="Olga Ops")
SEC = session_cookie("sam", ["security"], name="Sam Security")
AUDITOR = session_cookie("aud", ["auditor"], name="Ada Auditor")


@pytest.fixture
def services() -> Services:
    return memory_services()


def client(services: Services, cookies: dict[str, str] | None) -> TestClient:
    c = TestClient(portal_app(services), follow_redirects=False)
    if cookies:
        c.cookies.update(cookies)
    return c


def as_role(services: Services, role: str) -> TestClient:
    return client(services, session_cookie(f"u-{role}", [role]))


def audit(services: Services) -> list[dict[str, Any]]:
    return services.audit.entries(10_000)[::-1]


def policies(services: Services) -> list[dict[str, Any]]:
    return [r["policy"] for r in backend(services).controls if r["kind"] == "policy_update"]


def text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)).strip()


def error_of(html: str, element_id: str) -> str | None:
    """The text of the inline error ``<... id="element_id">`` (None when absent)."""
    m = re.search(rf'<(p|ul) class="error" id="{re.escape(element_id)}"[^>]*>(.*?)</\1>', html, re.S)
    return text(m.group(2)) if m else None


def sampling_form(rows: list[tuple[str, str]], intent: str = "preview", reason: str = "",
                  base_version: str = "7") -> dict[str, str]:
    data = {"intent": intent, "reason": reason, "base_version": base_version}
    for i, (sel, rate) in enumerate(rows):
        data[f"selector_{i}"], data[f"rate_{i}"] = sel, rate
    return data


# ---------------------------------------------------------------- the role matrix


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("path", sorted(PAGES))
def test_each_page_opens_for_its_roles_only_and_a_refusal_is_one_audit_entry(services: Services, path: str,
                                                                             role: str) -> None:
    r = as_role(services, role).get(path)
    if role in PAGES[path]:
        assert r.status_code == 200, r.text
        assert not audit(services)
    else:
        assert r.status_code == 403 and "Not allowed" in r.text
        [entry] = audit(services)
        assert (entry["subject"], entry["outcome"], entry["target"]) == (f"u-{role}", "refused", path)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("path", sorted(POSTS))
def test_each_form_acts_for_its_roles_only(services: Services, path: str, role: str) -> None:
    allowed, data = POSTS[path]
    r = as_role(services, role).post(path, data=data)
    if role in allowed:
        assert r.status_code == 303, r.text
        assert [p["version"] for p in policies(services)] == [7, 8]
        [entry] = audit(services)
        assert entry["outcome"] == "allowed" and entry["target"] == "policy"
    else:
        assert r.status_code == 403
        assert [p["version"] for p in policies(services)] == [7]  # nothing published
        [entry] = audit(services)
        assert (entry["outcome"], entry["target"], entry["method"]) == ("refused", path, "POST")


@pytest.mark.parametrize("role", ROLES)
def test_navigation_links_only_the_pages_the_role_may_open(services: Services, role: str) -> None:
    html = as_role(services, role).get("/").text
    nav = re.search(r'<nav aria-label="Portal">(.*?)</nav>', html, re.S)
    assert nav is not None
    links = set(re.findall(r'href="([^"]+)"', nav.group(1)))
    expected = {"/"} | {p for p, roles in PAGES.items() if role in roles} | ({"/hr"} if role in {"hr", "admin"}
                                                                             else set())
    assert links == expected


# ---------------------------------------------------------------- ops


def test_ops_page_shows_the_rates_in_force_and_editable_rows_plus_empty_ones(services: Services) -> None:
    html = client(services, OPS).get("/ops").text
    t = text(html)
    assert "Policy version 7" in t and "kind:pointer_move 0.25 25.0%" in t
    assert 'name="selector_0" type="text" value="kind:pointer_move"' in html
    assert 'name="rate_0" type="text" value="0.25"' in html
    for i in (1, 2, 3):  # three empty rows: adding a rate needs no JavaScript
        assert f'name="selector_{i}" type="text" value=""' in html
    assert 'name="selector_4"' not in html
    assert 'id="apply-button"' not in html  # apply comes after the preview


def test_preview_shows_old_to_new_per_selector_and_changes_nothing(services: Services) -> None:
    r = client(services, OPS).post("/portal/ops/sampling", data=sampling_form(
        [("kind:pointer_move", "0.1"), ("*", "0.5"), ("", ""), ("", "")]))
    assert r.status_code == 200
    summary = re.search(r'<section aria-labelledby="summary-heading" id="sampling-summary">(.*?)</section>',
                        r.text, re.S)
    assert summary is not None
    t = text(summary.group(1))
    assert "kind:pointer_move 0.25 0.1 0.25 &rarr; 0.1 (changed)" in t
    assert "* - (all kept) 0.5 - &rarr; 0.5 (added)" in t
    assert "estimate below" in t  # no warehouse here: the estimate says why (test_portal_pages_dry_run.py)
    assert 'id="estimate-unavailable"' in r.text
    assert 'id="apply-button"' in r.text and "Apply as version 8" in r.text
    assert [p["version"] for p in policies(services)] == [7] and not audit(services)


def test_preview_of_a_removed_rate_and_of_no_change(services: Services) -> None:
    c = client(services, OPS)
    r = c.post("/portal/ops/sampling", data=sampling_form([("", ""), ("kind:click", "1")]))
    t = text(r.text)
    assert "kind:pointer_move 0.25 - (all kept) 0.25 &rarr; - (removed)" in t
    r = c.post("/portal/ops/sampling", data=sampling_form([("kind:pointer_move", "0.25")]))
    assert "Nothing changes" in r.text


def test_apply_publishes_version_plus_one_audits_before_after_and_redirects(services: Services) -> None:
    c = client(services, OPS)
    r = c.post("/portal/ops/sampling", data=sampling_form(
        [("kind:pointer_move", "0.1"), ("*", "0.5"), ("", "")], intent="apply", reason="storage cost"))
    assert r.status_code == 303 and r.headers["location"] == "/ops"
    latest = policies(services)[-1]
    assert latest["version"] == 8 and latest["sampling"] == {"kind:pointer_move": 0.1, "*": 0.5}
    assert latest["allowed_apps"] == ["code", "firefox"]  # the other sections stay as they were
    [entry] = audit(services)
    assert (entry["action"], entry["subject"], entry["reason"], entry["outcome"]) == \
        ("policy_sampling", "olga", "storage cost", "allowed")
    assert entry["before"] == {"version": 7, "sampling": {"kind:pointer_move": 0.25}}
    assert entry["after"] == {"version": 8, "sampling": {"kind:pointer_move": 0.1, "*": 0.5}}
    assert entry["path"] == "/portal/ops/sampling" and entry["control_id"]
    page = c.get("/ops")
    t = text(page.text)
    assert "Sampling rates applied: policy version 8." in t and "Policy version 8" in t
    assert "* 0.5 50.0%" in t


@pytest.mark.parametrize(("rows", "row", "field", "message"), [
    ([("kind:pointer_move", "1.5")], 0, "rate", "must be a number in [0, 1]"),
    ([("kind:pointer_move", "0.2"), ("pointer", "0.5")], 1, "selector", "unknown selector"),
    ([("kind:click", "lots")], 0, "rate", "must be a number in [0, 1]"),
    ([("kind:click", "nan")], 0, "rate", "must be a number in [0, 1]"),
    ([("kind:click", "-0.1")], 0, "rate", "must be a number in [0, 1]"),
    ([("app:my app", "0.5")], 0, "selector", "not a well-formed app id"),
    ([("kind:click", "0.5"), ("kind:click", "0.2")], 1, "selector", "already on row 1"),
    ([("", "0.5")], 0, "selector", "a selector is needed"),
    ([("kind:click", "")], 0, "rate", "a rate from 0 to 1 is needed"),
], ids=["rate-1.5", "unknown-selector", "not-a-number", "nan", "negative", "malformed-app", "twice",
        "rate-without-selector", "selector-without-rate"])
@pytest.mark.parametrize("intent", ["preview", "apply"])
def test_a_bad_row_is_shown_next_to_that_rows_field_and_nothing_is_published(
        services: Services, rows: list[tuple[str, str]], row: int, field: str, message: str, intent: str) -> None:
    r = client(services, OPS).post("/portal/ops/sampling", data=sampling_form(rows, intent=intent, reason="why"))
    assert r.status_code == 422
    shown = error_of(r.text, f"{field}-{row}-error")
    assert shown is not None and message in shown, r.text
    assert f'aria-invalid="true" aria-describedby="{field}-{row}-error"' in r.text
    assert 'id="apply-button"' not in r.text and 'id="sampling-summary"' not in r.text
    assert [p["version"] for p in policies(services)] == [7] and not audit(services)


def test_apply_without_a_reason_keeps_the_preview_and_asks_for_one(services: Services) -> None:
    r = client(services, OPS).post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply"))
    assert r.status_code == 422
    assert error_of(r.text, "sampling-reason-error") == "is required (kept in the audit trail)"
    assert 'id="sampling-summary"' in r.text and 'id="apply-button"' in r.text
    assert [p["version"] for p in policies(services)] == [7] and not audit(services)


def test_apply_after_someone_else_changed_the_policy_asks_to_review_again(services: Services) -> None:
    stale = sampling_form([("*", "0.5")], intent="apply", reason="cost", base_version="7")
    client(services, OPS).post("/portal/ops/sampling", data={**stale, "rate_0": "0.9"})  # now version 8
    r = client(services, OPS).post("/portal/ops/sampling", data=stale)
    assert r.status_code == 422 and "now version 8" in (error_of(r.text, "sampling-form-error") or "")
    assert "0.9 &rarr; 0.5 (changed)" in text(r.text)  # the summary against what is in force now
    assert [p["version"] for p in policies(services)] == [7, 8]


def test_page_and_json_api_go_through_the_same_action(services: Services, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, dict[str, Any]]] = []
    real = actions.change_policy

    def spy(svc: Services, who: Any, action: str, reason: str, change: dict[str, Any], **kw: Any) -> dict[str, Any]:
        calls.append((action, change))
        return real(svc, who, action, reason, change, **kw)

    monkeypatch.setattr(actions, "change_policy", spy)
    c = client(services, OPS)
    c.post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply", reason="page"))
    api = TestClient(portal_app(services))
    r = api.put("/api/v1/policy/sampling", headers=bearer(mint("olga", ["ops"])),
                json={"rates": {"*": 0.25}, "reason": "api"})
    assert r.status_code == 202 and r.json()["version"] == 9
    assert calls == [("policy_sampling", {"sampling": {"*": 0.5}}), ("policy_sampling", {"sampling": {"*": 0.25}})]
    page_entry, api_entry = audit(services)
    assert set(page_entry) == set(api_entry)  # one entry shape
    assert (page_entry["path"], api_entry["path"]) == ("/portal/ops/sampling", "/api/v1/policy/sampling")


def test_the_json_api_refuses_a_malformed_app_id_with_its_field(services: Services) -> None:
    api = TestClient(portal_app(services))
    r = api.put("/api/v1/policy/allowlist", headers=bearer(mint("sam", ["security"])),
                json={"allowed_apps": ["code", "my app", "<b>"], "allowed_domains": [], "reason": "x"})
    assert r.status_code == 422
    assert {p["field"] for p in r.json()["detail"]} == {"allowed_apps.1", "allowed_apps.2"}
    r = api.put("/api/v1/policy/text-capture", headers=bearer(mint("sam", ["security"])),
                json={"text_capture": {"*": "masked", "a/b": "full"}, "reason": "x"})
    assert [p["field"] for p in r.json()["detail"]] == ["text_capture.a/b"]


# ---------------------------------------------------------------- security


def test_security_page_shows_apps_domains_and_typed_text_rows(services: Services) -> None:
    html = client(services, SEC).get("/security").text
    assert re.search(r'<textarea id="allowed-apps" name="allowed_apps"[^>]*>code\nfirefox</textarea>', html)
    assert re.search(r'<textarea id="allowed-domains" name="allowed_domains"[^>]*>example.com</textarea>', html)
    assert 'name="app_0" type="text" value="*"' in html
    assert re.search(r'<select id="mode-0" name="mode_0">\s*<option value="masked" selected>', html)
    assert 'name="app_3" type="text" value=""' in html and 'name="app_4"' not in html


@pytest.mark.parametrize("domain", ["co.uk", "com", "*.example.com", "https://example.com", "github.io"])
def test_a_domain_broader_than_a_registrable_domain_is_shown_next_to_the_domains(services: Services,
                                                                                 domain: str) -> None:
    r = client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": "code", "allowed_domains": f"example.org\n{domain}\n", "reason": "widen"})
    assert r.status_code == 422
    shown = error_of(r.text, "allowed-domains-error")
    assert shown is not None and f"`{domain}`" in shown, r.text
    assert error_of(r.text, "allowed-apps-error") is None
    assert f"example.org\n{domain}" in r.text  # what was typed stays in the field
    assert [p["version"] for p in policies(services)] == [7] and not audit(services)


def test_a_malformed_app_id_is_shown_next_to_the_apps(services: Services) -> None:
    r = client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": "code\nmy app\n", "allowed_domains": "example.com", "reason": "x"})
    assert r.status_code == 422
    shown = error_of(r.text, "allowed-apps-error")
    assert shown is not None and "`my app` is not a well-formed app id" in shown
    assert [p["version"] for p in policies(services)] == [7]


def test_a_valid_allowlist_applies_normalised_and_audited(services: Services) -> None:
    c = client(services, SEC)
    r = c.post("/portal/security/allowlist", data={
        "allowed_apps": "code\n\nslack\n", "allowed_domains": "GitHub.com.\nexample.co.uk", "reason": "new team"})
    assert r.status_code == 303 and r.headers["location"] == "/security"
    latest = policies(services)[-1]
    assert (latest["version"], latest["allowed_apps"], latest["allowed_domains"]) == \
        (8, ["code", "slack"], ["github.com", "example.co.uk"])
    assert latest["sampling"] == {"kind:pointer_move": 0.25}
    [entry] = audit(services)
    assert entry["action"] == "policy_allowlist" and entry["reason"] == "new team"
    assert entry["before"] == {"version": 7, "allowed_apps": ["code", "firefox"], "allowed_domains": ["example.com"]}
    assert "Allowlists applied: policy version 8." in text(c.get("/security").text)


def test_allowlist_needs_a_reason(services: Services) -> None:
    r = client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": "code", "allowed_domains": "example.com", "reason": " "})
    assert r.status_code == 422 and error_of(r.text, "allowlist-reason-error") == \
        "is required (kept in the audit trail)"


def test_typed_text_rows_apply_remove_and_add(services: Services) -> None:
    c = client(services, SEC)
    r = c.post("/portal/security/text-capture", data={
        "app_0": "", "mode_0": "masked", "app_1": "code", "mode_1": "full", "app_2": "slack", "mode_2": "none",
        "reason": "code review"})
    assert r.status_code == 303
    assert policies(services)[-1]["text_capture"] == {"code": "full", "slack": "none"}
    [entry] = audit(services)
    assert entry["action"] == "policy_text_capture" and entry["before"]["text_capture"] == {"*": "masked"}


@pytest.mark.parametrize(("row", "field", "message"), [
    ({"app_1": "my app", "mode_1": "full"}, "app", "not a well-formed app id"),
    ({"app_1": "code", "mode_1": "everything"}, "mode", "must be none, masked or full"),
    ({"app_1": "*", "mode_1": "full"}, "app", "already on row 1"),
])
def test_a_bad_typed_text_row_is_shown_next_to_its_field(services: Services, row: dict[str, str], field: str,
                                                         message: str) -> None:
    r = client(services, SEC).post("/portal/security/text-capture", data={
        "app_0": "*", "mode_0": "masked", **row, "reason": "x"})
    assert r.status_code == 422
    shown = error_of(r.text, f"{field}-1-error")
    assert shown is not None and message in shown, r.text
    assert [p["version"] for p in policies(services)] == [7] and not audit(services)


# ---------------------------------------------------------------- audit


def test_audit_page_lists_changes_newest_first_with_who_roles_reason_and_before_after(services: Services) -> None:
    client(services, OPS).post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply",
                                                                          reason="cost"))
    client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": "code", "allowed_domains": "example.com", "reason": "fewer apps"})
    as_role(services, "employee").get("/audit")  # refused: one more entry
    html = client(services, AUDITOR).get("/audit").text
    rows = re.findall(r'<tr class="outcome-(\w+)">(.*?)</tr>', html, re.S)
    assert [o for o, _ in rows] == ["refused", "allowed", "allowed"]
    refused, allowlist, sampling = (text(r) for _, r in rows)
    assert "u-employee" in refused and "/audit" in refused and "refused" in refused
    assert "Sam Security (sam)" in allowlist and "policy_allowlist" in allowlist and "fewer apps" in allowlist
    assert "Olga Ops (olga)" in sampling and "ops" in sampling and "cost" in sampling
    assert '{&#34;sampling&#34;: {&#34;kind:pointer_move&#34;: 0.25}, &#34;version&#34;: 7}' in sampling
    assert '&rarr; {&#34;sampling&#34;: {&#34;*&#34;: 0.5}, &#34;version&#34;: 8}' in sampling
    assert re.search(r"<time datetime=\"[^\"]+\">\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC</time>", rows[0][1])


def test_audit_filter_by_outcome_and_limit(services: Services) -> None:
    for _ in range(3):
        as_role(services, "employee").get("/ops")
    client(services, OPS).post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply",
                                                                          reason="cost"))
    c = client(services, AUDITOR)
    assert re.findall(r'<tr class="outcome-(\w+)"', c.get("/audit", params={"outcome": "refused"}).text) == \
        ["refused"] * 3
    allowed = c.get("/audit", params={"outcome": "allowed"}).text
    assert re.findall(r'<tr class="outcome-(\w+)"', allowed) == ["allowed"]
    assert '<option value="allowed" selected>' in allowed
    r = c.get("/audit", params={"outcome": "everything"})
    assert r.status_code == 422 and error_of(r.text, "outcome-error") == "choose one of all, allowed, refused"
    for _ in range(205):
        services.audit.record({"at": "2026-01-01T00:00:00Z", "subject": "x", "roles": [], "action": "a",
                               "target": None, "reason": "", "outcome": "allowed"})
    assert c.get("/audit").text.count('<tr class="outcome-') == 200
    assert c.get("/audit", params={"outcome": "refused"}).text.count('<tr class="outcome-') == 3


def test_what_people_type_is_escaped_on_the_new_pages(services: Services) -> None:
    evil = '<script>alert("x")</script>'
    ops = client(services, OPS)
    r = ops.post("/portal/ops/sampling", data=sampling_form([(evil, "0.5")], reason=evil))
    assert r.status_code == 422 and "<script>alert" not in r.text and "&lt;script&gt;" in r.text
    ops.post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply", reason=evil))
    r = client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": evil, "allowed_domains": evil, "reason": evil})
    assert r.status_code == 422 and "<script>alert" not in r.text
    html = client(services, AUDITOR).get("/audit").text
    assert "<script>alert" not in html and "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;" in html


def test_no_policy_yet_the_pages_start_from_an_empty_one() -> None:
    services = memory_services(policy=None)
    assert "Policy version 0" in text(client(services, OPS).get("/ops").text)
    r = client(services, SEC).post("/portal/security/allowlist", data={
        "allowed_apps": "code", "allowed_domains": "example.com", "reason": "first"})
    assert r.status_code == 303 and policies(services)[-1]["version"] == 1


def test_a_policy_in_force_that_no_longer_validates_is_named_not_applied_over() -> None:
    services = memory_services()
    backend(services).controls[-1]["policy"]["allowed_apps"] = ["code", "old app", "bad/one"]  # an old record
    r = client(services, OPS).post("/portal/ops/sampling", data=sampling_form([("*", "0.5")], intent="apply",
                                                                              reason="cost"))
    assert r.status_code == 422
    shown = error_of(r.text, "sampling-form-error") or ""
    assert "allowed_apps.1: `old app`" in shown and "allowed_apps.2: `bad/one`" in shown
    assert 'id="apply-button"' not in r.text and [p["version"] for p in policies(services)] == [7]
