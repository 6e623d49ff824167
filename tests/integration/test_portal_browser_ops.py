"""The ops, security and auditor pages in a real headless Chromium (Debian's, driven by Playwright;
tests/browser.py) against the app served by uvicorn on a loopback port: ops previews a sampling
change, sees the estimate of what it would store (from a fake warehouse's traffic) before the
Apply button, and applies it (the policy version goes up), security is shown `co.uk` refused next to the
field and then applies a valid domain, the auditor sees those changes, an employee is refused each
page; labels, contrast and a laptop-sized screen. Screenshots land in tests/artifacts/portal/."""

from __future__ import annotations

import re
from typing import Any

import pytest

from handtrace.control.api.services import Services
from tests.browser import CONTRAST_JS, LABELS_JS, screenshot
from tests.portal_support import memory_services, session_cookie
from tests.unit.test_portal_pages_dry_run import FakeWarehouse

OPS = session_cookie("olga", ["ops"], name="Olga Ops")
SEC = session_cookie("sam", ["security"], name="Sam Security")
AUDITOR = session_cookie("ada", ["auditor"], name="Ada Auditor")
ALICE = session_cookie("alice", ["employee"], "e-alice", "Alice Martin")


@pytest.fixture
def services() -> Services:
    s = memory_services()
    s.warehouse = FakeWarehouse()  # an hour of 3600 key presses and 14400 pointer moves, 4 agents
    return s


def squash(s: str) -> str:
    return re.sub(r"\s+", " ", s).strip()


def policy_version(services: Services) -> int:
    policy = services.state.policy()
    assert policy is not None
    return int(policy["version"])


def change_sampling(page: Any) -> None:
    """On /ops: pointer moves from 0.25 to 0.1 and a new `*` rate of 0.5, previewed then applied."""
    page.get_by_label("Rate, row 1", exact=True).fill("0.1")
    page.get_by_label("Selector, row 2", exact=True).fill("*")
    page.get_by_label("Rate, row 2", exact=True).fill("0.5")
    page.get_by_label("Reason for the change (kept in the audit trail)").fill("storage cost")
    page.get_by_role("button", name="Show what this changes").click()
    page.wait_for_url(re.compile(r"/portal/ops/sampling$"))


def test_ops_previews_what_a_sampling_change_does_then_applies_it(open_as: Any, services: Services) -> None:
    page = open_as(OPS, "/ops", javascript=False)  # plain HTML forms: no JavaScript needed
    assert page.last_status == 200
    assert squash(page.locator("#ops-policy-version").inner_text()).startswith("Policy version 7")
    assert squash(page.locator("#fleet-summary").inner_text()) == (
        "Events stored per second 5 events/s Agents seen 4 Bytes stored per hour per agent 2.7 MB/h")
    screenshot(page, "portal", "ops")
    selector, rate = (page.get_by_label(f"{n}, row 1", exact=True).bounding_box() for n in ("Selector", "Rate"))
    assert selector and rate and abs(selector["y"] - rate["y"]) < 2 and rate["x"] > selector["x"]  # one row
    change_sampling(page)
    summary = page.locator("#sampling-summary")
    assert summary.is_visible()
    rows = [squash(r.inner_text()) for r in summary.get_by_role("row").all()[1:]]
    assert rows == ["* - (all kept) 0.5 - → 0.5 (added)", "kind:pointer_move 0.25 0.1 0.25 → 0.1 (changed)"], rows
    estimate = page.locator("#estimate-table")
    assert estimate.is_visible()
    assert squash(estimate.locator("caption").inner_text()) == (
        "Estimated effect of these rates, from the last 1 hour of stored events")
    lines = [squash(r.inner_text()) for r in estimate.get_by_role("row").all()]
    # key presses fall to `*` 0.5 (from 1), pointer moves 0.25 -> 0.1: (1800 + 5760) / 3600 s
    assert lines[:2] == ["Metric Now After Change", "Events stored per second 5 events/s 2.1 events/s x0.42"], lines
    assert lines[-1] == "Share of demonstrations kept 100% 100% unchanged", lines
    assert "from 4 agents" in page.locator("#estimate-basis").inner_text()
    apply_box, estimate_box = page.locator("#apply-button").bounding_box(), estimate.bounding_box()
    assert apply_box and estimate_box and estimate_box["y"] < apply_box["y"]  # read before applying
    assert policy_version(services) == 7  # a preview publishes nothing
    screenshot(page, "portal", "ops-preview")

    page.get_by_role("button", name="Apply as version 8").click()
    page.wait_for_url(re.compile(r"/ops$"))
    assert page.get_by_role("status").inner_text().strip() == "Sampling rates applied: policy version 8."
    assert squash(page.locator("#ops-policy-version").inner_text()).startswith("Policy version 8")
    in_force = [squash(r.inner_text()) for r in page.locator("#rates-in-force").get_by_role("row").all()[1:]]
    assert in_force == ["* 0.5 50.0%", "kind:pointer_move 0.1 10.0%"]
    assert policy_version(services) == 8
    assert services.state.policy()["sampling"] == {"kind:pointer_move": 0.1, "*": 0.5}  # type: ignore[index]
    screenshot(page, "portal", "ops-applied")


def test_ops_sees_a_rate_of_1_5_refused_next_to_that_row(open_as: Any, services: Services) -> None:
    page = open_as(OPS, "/ops")
    page.get_by_label("Rate, row 1", exact=True).fill("1.5")
    page.get_by_role("button", name="Show what this changes").click()
    page.wait_for_url(re.compile(r"/portal/ops/sampling$"))
    rate = page.get_by_label("Rate, row 1", exact=True)
    assert rate.get_attribute("aria-invalid") == "true"
    described = page.locator(f"#{rate.get_attribute('aria-describedby')}")
    assert described.inner_text().strip() == "must be a number in [0, 1]" and described.is_visible()
    assert page.get_by_role("button", name=re.compile("^Apply")).count() == 0
    assert policy_version(services) == 7
    screenshot(page, "portal", "ops-invalid-rate")


def test_security_sees_co_uk_refused_inline_then_applies_a_valid_domain(open_as: Any, services: Services) -> None:
    page = open_as(SEC, "/security", javascript=False)
    assert page.last_status == 200
    screenshot(page, "portal", "security")
    domains = page.get_by_label("Allowed web sites")
    domains.fill("example.com\nco.uk")
    page.get_by_label("Reason for the allowlist change").fill("UK office")
    page.get_by_role("button", name="Apply allowlists").click()
    page.wait_for_url(re.compile(r"/portal/security/allowlist$"))
    domains = page.get_by_label("Allowed web sites")
    assert domains.get_attribute("aria-invalid") == "true"
    assert domains.input_value() == "example.com\nco.uk"  # what was typed is kept
    error = page.locator("#allowed-domains-error")
    assert error.is_visible() and "co.uk" in error.inner_text() and "public suffix" in error.inner_text()
    assert "allowed-domains-error" in (domains.get_attribute("aria-describedby") or "")
    # next to the field: the error sits between the label and the textarea
    label_box, error_box, field_box = (page.locator(s).bounding_box() for s in
                                       ('label[for="allowed-domains"]', "#allowed-domains-error", "#allowed-domains"))
    assert label_box and error_box and field_box
    assert label_box["y"] < error_box["y"] < field_box["y"] and error_box["y"] - label_box["y"] < 150
    assert policy_version(services) == 7
    screenshot(page, "portal", "security-invalid-domain")

    domains.fill("example.com\nexample.co.uk")
    page.get_by_role("button", name="Apply allowlists").click()
    page.wait_for_url(re.compile(r"/security$"))
    assert page.get_by_role("status").inner_text().strip() == "Allowlists applied: policy version 8."
    assert page.get_by_label("Allowed web sites").input_value() == "example.com\nexample.co.uk"
    assert policy_version(services) == 8
    assert services.state.policy()["allowed_domains"] == ["example.com", "example.co.uk"]  # type: ignore[index]
    screenshot(page, "portal", "security-applied")


def test_the_auditor_sees_the_changes_newest_first_and_filters_refusals(open_as: Any, services: Services) -> None:
    ops = open_as(OPS, "/ops")
    change_sampling(ops)
    ops.get_by_role("button", name="Apply as version 8").click()
    ops.wait_for_url(re.compile(r"/ops$"))
    sec = open_as(SEC, "/security")
    sec.get_by_label("Allowed web sites").fill("example.com\nexample.co.uk")
    sec.get_by_label("Reason for the allowlist change").fill("UK office")
    sec.get_by_role("button", name="Apply allowlists").click()
    sec.wait_for_url(re.compile(r"/security$"))
    assert open_as(ALICE, "/audit").last_status == 403  # one refused entry

    page = open_as(AUDITOR, "/audit")
    assert page.last_status == 200
    rows = [squash(r.inner_text()) for r in page.locator("#audit-trail tbody tr").all()]
    assert len(rows) == 3, rows
    assert "Alice Martin (alice)" in rows[0] and "refused" in rows[0]
    assert all(s in rows[1] for s in ("Sam Security (sam)", "security", "policy_allowlist", "UK office",
                                      '"version": 8}', '"version": 9}', "example.co.uk", "allowed")), rows[1]
    assert all(s in rows[2] for s in ("Olga Ops (olga)", "ops", "policy_sampling", "storage cost",
                                      '"kind:pointer_move": 0.25',
                                      '"kind:pointer_move": 0.1', '"version": 7}')), rows[2]
    screenshot(page, "portal", "audit")

    page.get_by_label("Outcome").select_option("refused")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_url(re.compile(r"/audit\?outcome=refused$"))
    rows = [squash(r.inner_text()) for r in page.locator("#audit-trail tbody tr").all()]
    assert len(rows) == 1 and "alice" in rows[0]
    screenshot(page, "portal", "audit-refused")


def test_an_employee_is_refused_each_page_and_sees_no_link_to_them(open_as: Any, services: Services) -> None:
    home = open_as(ALICE, "/")
    nav = home.get_by_role("navigation", name="Portal")
    assert [a.inner_text().strip() for a in nav.get_by_role("link").all()] == ["My capture"]
    for path in ("/ops", "/security", "/audit"):
        page = open_as(ALICE, path)
        assert page.last_status == 403, path
        assert page.get_by_role("heading", name="Not allowed").is_visible()
        screenshot(page, "portal", f"employee-on-{path.strip('/')}-403")
    for path, form in (("/portal/ops/sampling", {"selector_0": "*", "rate_0": "0", "intent": "apply",
                                                 "reason": "x", "base_version": "7"}),
                       ("/portal/security/allowlist", {"allowed_apps": "x", "allowed_domains": "", "reason": "x"}),
                       ("/portal/security/text-capture", {"app_0": "*", "mode_0": "full", "reason": "x"})):
        assert home.request.post(path, form=form, max_redirects=0).status == 403
    assert policy_version(services) == 7
    refused = services.audit.entries(100)
    assert len(refused) == 6 and all(e["outcome"] == "refused" and e["subject"] == "alice" for e in refused)


def test_the_new_pages_label_every_control_meet_contrast_and_fit_a_laptop(open_as: Any) -> None:
    admin = session_cookie("root", ["admin"], name="Root Admin")
    nav = open_as(admin, "/").get_by_role("navigation", name="Portal")
    assert [a.inner_text().strip() for a in nav.get_by_role("link").all()] == [
        "My capture", "Exemption requests", "Sampling", "Allowlists and masking", "Audit trail"]
    ops_preview = open_as(OPS, "/ops")
    change_sampling(ops_preview)
    pages = {"ops": open_as(OPS, "/ops"), "ops-preview": ops_preview, "security": open_as(SEC, "/security"),
             "audit": open_as(AUDITOR, "/audit")}
    for name, page in pages.items():
        controls = page.evaluate(LABELS_JS)
        assert len(controls) >= 1, name
        for control in controls:
            assert control["labels"], f"{name}: #{control['id']} has no label"
            located = page.get_by_label(control["labels"][0], exact=True)
            assert located.count() == 1 and located.get_attribute("id") == control["id"], control
        for button in page.get_by_role("button").all():
            assert button.inner_text().strip(), f"{name}: a button without a name"
        contrast = page.evaluate(CONTRAST_JS)
        assert contrast["checked"] >= 5 and not contrast["low"], (name, contrast)
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} scrolls sideways"
    page = pages["ops"]
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Skip to main content"
    for _ in range(40):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "preview-button":
            break
    else:
        pytest.fail("the preview button is not reachable with Tab")
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"
