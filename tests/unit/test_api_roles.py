"""The role matrix (docs/design/control-plane.md, "Roles"): every route x every role answers 2xx
exactly where the contract's table says so, else 403 with exactly one audit entry and nothing
published. The table in roles.py is checked against the contract's, copied here independently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from handtrace.control.api.docs import openapi
from handtrace.control.api.roles import MATRIX, Action, Role, actor_role, allowed, matrix_markdown
from handtrace.core.controls import control_record
from tests.unit.api_support import Api, make_api, own_data_warehouse

# The contract's table, row by row (docs/design/control-plane.md), in role order
# employee, hr, ops, security, auditor, admin.
CONTRACT = {
    Action.own: "self self self self self self",
    Action.other_state: "- yes - - - yes",
    Action.exemptions: "- yes - - - yes",
    Action.read_policy: "yes yes yes yes yes yes",
    Action.sampling: "- - yes - - yes",
    Action.allowlist: "- - - yes - yes",
    Action.audit: "- - - - yes yes",
    Action.rotate_key: "- - - - - yes",
    Action.own_data: "self self self self self self",
}
ROLE_ORDER = [Role.employee, Role.hr, Role.ops, Role.security, Role.auditor, Role.admin]

POLICY = {"version": 1, "allowed_apps": ["code"], "allowed_domains": ["github.com"], "sampling": {"*": 1.0},
          "text_capture": {"*": "masked"}}

CAROL_DEMO = "0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"
"""A demonstration of carol's in the seeded warehouse (the own-data routes act on it)."""

# (action, method, path, body): every route of the API, acting on someone else ("bob") where it
# names an employee.
ROUTES: list[tuple[Action, str, str, dict[str, Any] | None]] = [
    (Action.own, "GET", "/api/v1/me", None),
    (Action.own, "GET", "/api/v1/me/state", None),
    (Action.own, "POST", "/api/v1/me/pause", {"minutes": 15, "reason": "lunch"}),
    (Action.own, "POST", "/api/v1/me/resume", {}),
    (Action.own, "POST", "/api/v1/me/exemption-requests", {"reason": "union rep"}),
    (Action.other_state, "GET", "/api/v1/employees/bob/state", None),
    (Action.exemptions, "GET", "/api/v1/exemption-requests", None),
    (Action.exemptions, "POST", "/api/v1/exemptions/bob/grant", {"reason": "approved"}),
    (Action.exemptions, "POST", "/api/v1/exemptions/bob/deny", {"reason": "not eligible"}),
    (Action.exemptions, "POST", "/api/v1/exemptions/bob/revoke", {"reason": "ended"}),
    (Action.read_policy, "GET", "/api/v1/policy", None),
    (Action.sampling, "PUT", "/api/v1/policy/sampling", {"rates": {"*": 0.5}, "reason": "cost"}),
    (Action.allowlist, "PUT", "/api/v1/policy/allowlist",
     {"allowed_apps": ["code"], "allowed_domains": ["github.com"], "reason": "tighten"}),
    (Action.allowlist, "PUT", "/api/v1/policy/text-capture", {"text_capture": {"*": "none"}, "reason": "pii"}),
    (Action.audit, "GET", "/api/v1/audit", None),
    (Action.rotate_key, "POST", "/api/v1/admin/resign", {"reason": "yearly key rotation"}),
    (Action.own_data, "GET", "/api/v1/me/captured", None),
    (Action.own_data, "GET", "/api/v1/me/demonstrations", None),
    (Action.own_data, "POST", f"/api/v1/me/demonstrations/{CAROL_DEMO}/withdraw", {"reason": "not for training"}),
    (Action.own_data, "GET", f"/api/v1/me/frames/{CAROL_DEMO}/0", None),
]


def seeded(tmp_path: Path) -> Api:
    """An API whose state has bob's pending request and a policy in force."""
    api = make_api(tmp_path)
    api.services.controls.publish(control_record("exemption_request", employee_id="bob", actor="bob",
                                                 role="employee", reason="please"))
    api.services.controls.publish(control_record("policy_update", employee_id=None, actor="ops-0", role="ops",
                                                 policy=POLICY))
    api.services.warehouse = own_data_warehouse(api, "carol", CAROL_DEMO)
    return api


def test_the_matrix_is_the_contracts() -> None:
    assert set(MATRIX) == set(CONTRACT)
    for action, row in CONTRACT.items():
        for role, cell in zip(ROLE_ORDER, row.split(), strict=True):
            assert allowed(action, frozenset({role})) == (cell != "-"), (action, role)
            assert MATRIX[action].self_only == (cell == "self"), (action, role)


def test_every_route_is_in_the_matrix_walk() -> None:
    """ROUTES covers the whole OpenAPI document, and each route's published rule is its action's."""
    spec = openapi()
    published = {(m.upper(), p.replace("{employee_id}", "bob").replace("{demonstration_id}", CAROL_DEMO)
                  .replace("{step}", "0")): op["x-action"]
                 for p, ops in spec["paths"].items() for m, op in ops.items()}
    assert published == {(m, p): a.value for a, m, p, _b in ROUTES}


def test_the_docs_print_the_matrix_from_roles_py() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "api.md").read_text()
    assert matrix_markdown() in doc


@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize(("action", "method", "path", "body"), ROUTES,
                         ids=[f"{m} {p}" for _a, m, p, _b in ROUTES])
def test_route_x_role(tmp_path: Path, role: Role, action: Action, method: str, path: str,
                      body: dict[str, Any] | None) -> None:
    api = seeded(tmp_path)
    published_before = len(api.backend.controls)
    r = api.client.request(method, path, headers=api.as_("carol", role.value), json=body)
    # Carol holds ``role`` (and is an employee of herself); the contract says whether she may.
    may = CONTRACT[action].split()[ROLE_ORDER.index(role)] != "-" or CONTRACT[action].split()[0] != "-"
    audit = api.audit()
    if may:
        assert 200 <= r.status_code < 300, (role, path, r.status_code, r.text)
        changes = len(api.backend.controls) - published_before
        if method == "GET" and path.startswith("/api/v1/employees/"):
            # another named person's data: a data access, in the trail (and nothing changed)
            assert [(e["action"], e["target"], e["outcome"]) for e in audit] == [
                ("other_state", "bob", "allowed")] and changes == 0
        elif method == "GET":
            assert audit == [] and changes == 0
        else:
            assert len(audit) == 1 and audit[0]["outcome"] == "allowed", audit
            assert audit[0]["subject"] == "carol" and role.value in audit[0]["roles"]
            assert changes == (0 if path.endswith(("/deny", "/withdraw")) else 1)
    else:
        assert r.status_code == 403, (role, path, r.status_code, r.text)
        assert len(audit) == 1, audit
        assert audit[0]["outcome"] == "refused" and audit[0]["subject"] == "carol"
        assert audit[0]["action"] == action.value and audit[0]["path"] == path
        assert len(api.backend.controls) == published_before  # nothing issued


@pytest.mark.parametrize(("role", "expected"), [("hr", "hr"), ("admin", "hr")])
def test_exemption_records_carry_the_hr_actor_role(tmp_path: Path, role: str, expected: str) -> None:
    api = seeded(tmp_path)
    api.client.post("/api/v1/exemptions/bob/grant", headers=api.as_("harriet", role), json={"reason": "ok"})
    rec = api.backend.controls[-1]
    assert (rec["kind"], rec["actor"], rec["actor_role"], rec["employee_id"]) == (
        "exemption_grant", "harriet", expected, "bob")
    assert api.audit()[-1]["roles"] == sorted({"employee", role})  # the true role is in the audit


@pytest.mark.parametrize(("role", "path", "body"), [
    ("ops", "/api/v1/policy/sampling", {"rates": {"*": 0.2}, "reason": "r"}),
    ("security", "/api/v1/policy/allowlist", {"allowed_apps": [], "allowed_domains": [], "reason": "r"}),
    ("admin", "/api/v1/policy/text-capture", {"text_capture": {"*": "none"}, "reason": "r"}),
])
def test_policy_records_carry_the_ops_actor_role(tmp_path: Path, role: str, path: str,
                                                 body: dict[str, Any]) -> None:
    api = seeded(tmp_path)
    assert api.client.put(path, headers=api.as_("olga", role), json=body).status_code == 202
    assert api.backend.controls[-1]["actor_role"] == "ops" == actor_role(Action.sampling)


def test_own_actions_carry_the_employee_actor_role(tmp_path: Path) -> None:
    api = seeded(tmp_path)
    api.client.post("/api/v1/me/pause", headers=api.as_("carol", "admin"), json={"minutes": 5})
    assert api.backend.controls[-1]["actor_role"] == "employee"
