"""The API's routes over in-memory services: self-only employees, validation (every field error
at once, the CLI's own rules), state folding, policy versions, the audit trail."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.control.api.app import create_app
from handtrace.control.api.services import (
    MemoryBackend,
    Services,
    StateUnavailable,
    fold_employee,
    memory_services,
)
from handtrace.core import codec
from handtrace.core.controls import control_record, pause_record, policy_problems
from tests.unit.api_support import Api, api_settings, make_api


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def _fields(r: Any) -> dict[str, str]:
    assert r.status_code == 422, r.text
    return {p["field"]: p["message"] for p in r.json()["detail"]}


# ---------------------------------------------------------------- self only


def test_an_employee_sees_and_acts_on_themself_only(api: Api) -> None:
    alice = api.as_("alice")
    assert api.client.post("/api/v1/me/pause", headers=alice, json={"minutes": 10}).status_code == 202
    assert api.client.get("/api/v1/me/state", headers=alice).json()["mode"] == "paused"
    assert api.client.get("/api/v1/employees/alice/state", headers=alice).status_code == 200
    r = api.client.get("/api/v1/employees/bob/state", headers=alice)
    assert r.status_code == 403
    assert (api.audit()[-1]["outcome"], api.audit()[-1]["target"]) == ("refused", "bob")
    assert [rec["employee_id"] for rec in api.backend.controls] == ["alice"]


def test_reading_another_persons_state_is_a_data_access_in_the_trail(api: Api) -> None:
    api.client.get("/api/v1/me/state", headers=api.as_("alice"))
    api.client.get("/api/v1/employees/alice/state", headers=api.as_("alice"))
    assert api.audit() == [], "reading one's own state is not audited"
    assert api.client.get("/api/v1/employees/bob/state", headers=api.as_("hanna", "hr")).status_code == 200
    (entry,) = api.audit()
    assert (entry["subject"], entry["action"], entry["target"], entry["outcome"], entry["method"]) == (
        "hanna", "other_state", "bob", "allowed", "GET")


def test_refusal_does_not_reveal_whether_the_employee_exists(api: Api) -> None:
    api.client.post("/api/v1/me/pause", headers=api.as_("bob"), json={"minutes": 10})
    alice = api.as_("alice")
    known = api.client.get("/api/v1/employees/bob/state", headers=alice)
    unknown = api.client.get("/api/v1/employees/nobody-at-all/state", headers=alice)
    assert (known.status_code, unknown.status_code) == (403, 403)
    assert known.json()["detail"] == unknown.json()["detail"]


@pytest.mark.parametrize("field", ["employee_id", "actor", "role", "until"])
def test_a_body_cannot_name_someone_else(api: Api, field: str) -> None:
    r = api.client.post("/api/v1/me/pause", headers=api.as_("alice"), json={"minutes": 5, field: "bob"})
    assert field in _fields(r)
    assert api.backend.controls == []


def test_pause_records_are_the_agents_own_shape(api: Api) -> None:
    r = api.client.post("/api/v1/me/pause", headers=api.as_("alice"), json={"minutes": 30, "reason": "1:1"})
    rec = api.backend.controls[-1]
    expected = pause_record("alice", 30, actor="alice", reason="1:1", at_us=rec["occurred_at_us"])
    assert {k: v for k, v in rec.items() if k != "control_id"} == {
        k: v for k, v in expected.items() if k != "control_id"}
    assert codec.decode_record(codec.encode_record("control_event", rec), "control_event")["kind"] == "pause_start"
    assert r.json()["paused_until"].startswith(api.client.get(
        "/api/v1/me/state", headers=api.as_("alice")).json()["paused_until"][:16])


def test_resume_ends_the_pause(api: Api) -> None:
    alice = api.as_("alice")
    api.client.post("/api/v1/me/pause", headers=alice, json={"minutes": 10})
    assert api.client.post("/api/v1/me/resume", headers=alice).status_code == 202
    assert api.client.get("/api/v1/me/state", headers=alice).json() == {
        "employee_id": "alice", "mode": "capturing", "paused_until": None, "exempt_since": None,
        "pending_request": None}


# ---------------------------------------------------------------- exemptions


def test_request_grant_revoke_and_deny(api: Api) -> None:
    hr = api.as_("harriet", "hr")
    for who in ("bob", "carol"):
        assert api.client.post("/api/v1/me/exemption-requests", headers=api.as_(who),
                               json={"reason": f"{who} asks"}).status_code == 202
    pending = api.client.get("/api/v1/exemption-requests", headers=hr).json()
    assert [(p["employee_id"], p["reason"]) for p in pending] == [("bob", "bob asks"), ("carol", "carol asks")]
    assert api.client.post("/api/v1/exemptions/bob/grant", headers=hr, json={"reason": "ok"}).status_code == 202
    assert api.client.post("/api/v1/exemptions/carol/deny", headers=hr, json={"reason": "no"}).status_code == 202
    assert api.client.get("/api/v1/exemption-requests", headers=hr).json() == []
    assert api.client.get("/api/v1/employees/bob/state", headers=hr).json()["mode"] == "exempt"
    assert api.client.get("/api/v1/employees/carol/state", headers=hr).json()["mode"] == "capturing"
    # a deny issues no control (nothing changes for carol); it is an audit entry
    assert [r["kind"] for r in api.backend.controls] == ["exemption_request", "exemption_request",
                                                          "exemption_grant"]
    assert [e["action"] for e in api.audit()] == ["exemption_request", "exemption_request", "exemption_grant",
                                                  "exemption_deny", "other_state", "other_state"]
    grant = api.backend.controls[-1]
    assert grant["exemption_effective_at_us"] == grant["occurred_at_us"]
    api.client.post("/api/v1/exemptions/bob/revoke", headers=hr, json={"reason": "left the union"})
    assert api.client.get("/api/v1/employees/bob/state", headers=hr).json()["mode"] == "capturing"
    revoked = [e for e in api.audit() if e["action"] == "exemption_revoke"][-1]
    assert revoked["before"]["mode"] == "exempt" and revoked["after"]["mode"] == "capturing"


def test_a_request_after_a_deny_is_pending_again(api: Api) -> None:
    hr = api.as_("harriet", "hr")
    api.client.post("/api/v1/me/exemption-requests", headers=api.as_("bob"), json={"reason": "1"})
    api.client.post("/api/v1/exemptions/bob/deny", headers=hr, json={"reason": "no"})
    api.client.post("/api/v1/me/exemption-requests", headers=api.as_("bob"), json={"reason": "2"})
    assert [p["reason"] for p in api.client.get("/api/v1/exemption-requests", headers=hr).json()] == ["2"]


def test_deny_without_a_pending_request_is_refused(api: Api) -> None:
    r = api.client.post("/api/v1/exemptions/bob/deny", headers=api.as_("h", "hr"), json={"reason": "no"})
    assert "employee_id" in _fields(r)
    assert api.audit() == []


def test_hr_decisions_need_a_reason(api: Api) -> None:
    for verb in ("grant", "deny", "revoke"):
        r = api.client.post(f"/api/v1/exemptions/bob/{verb}", headers=api.as_("h", "hr"), json={"reason": " "})
        assert "reason" in _fields(r)
    assert api.backend.controls == []


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(("body", "fields"), [
    ({"minutes": 0}, {"minutes"}),
    ({"minutes": 31}, {"minutes"}),
    ({"minutes": "soon"}, {"minutes"}),
    ({}, {"minutes"}),
    ({"minutes": "x", "reason": 7}, {"minutes", "reason"}),
])
def test_pause_validation(api: Api, body: dict[str, Any], fields: set[str]) -> None:
    assert set(_fields(api.client.post("/api/v1/me/pause", headers=api.as_("alice"), json=body))) == fields
    assert api.backend.controls == [] and api.audit() == []


def test_sampling_reports_every_problem_at_once(api: Api) -> None:
    r = api.client.put("/api/v1/policy/sampling", headers=api.as_("olga", "ops"), json={
        "rates": {"*": 0.5, "kind:click": 1.5, "app:code": "high", "pointer": 0.1, "kind:key": True}, "reason": ""})
    fields = _fields(r)
    assert set(fields) == {"rates.kind:click", "rates.app:code", "rates.pointer", "rates.kind:key", "reason"}
    assert "between 0 and 1" in fields["rates.kind:click"] or "[0, 1]" in fields["rates.kind:click"]
    assert "selector" in fields["rates.pointer"]
    assert api.backend.controls == []


def test_allowlist_uses_the_clis_domain_rules(api: Api) -> None:
    r = api.client.put("/api/v1/policy/allowlist", headers=api.as_("sam", "security"), json={
        "allowed_apps": ["code", ""], "allowed_domains": ["github.com", "co.uk", "*.acme.io", "github.io"],
        "reason": "widen"})
    fields = _fields(r)
    assert set(fields) == {"allowed_apps", "allowed_domains.1", "allowed_domains.2", "allowed_domains.3"}
    assert "public suffix" in fields["allowed_domains.1"] and "wildcard" in fields["allowed_domains.2"]


def test_text_capture_modes(api: Api) -> None:
    r = api.client.put("/api/v1/policy/text-capture", headers=api.as_("sam", "security"), json={
        "text_capture": {"*": "masked", "slack": "everything", "code": None}, "reason": "x"})
    assert set(_fields(r)) == {"text_capture.slack", "text_capture.code"}


def test_unknown_body_fields_are_refused_with_their_name(api: Api) -> None:
    r = api.client.put("/api/v1/policy/sampling", headers=api.as_("olga", "ops"),
                       json={"rates": {"*": 1}, "reason": "x", "version": 99})
    assert "version" in _fields(r)


# ---------------------------------------------------------------- policy


def test_policy_changes_build_on_the_policy_in_force(api: Api) -> None:
    ops, sec, anyone = api.as_("olga", "ops"), api.as_("sam", "security"), api.as_("alice")
    assert api.client.get("/api/v1/policy", headers=anyone).json() is None
    r = api.client.put("/api/v1/policy/allowlist", headers=sec, json={
        "allowed_apps": ["code"], "allowed_domains": ["GitHub.com.", "bücher.de"], "reason": "start"})
    assert r.status_code == 202 and r.json()["version"] == 1
    r = api.client.put("/api/v1/policy/sampling", headers=ops, json={"rates": {"*": 0.25, "kind:click": 1},
                                                                      "reason": "cost"})
    assert r.json()["version"] == 2
    assert api.client.get("/api/v1/policy", headers=anyone).json() == {
        "version": 2, "allowed_apps": ["code"], "allowed_domains": ["github.com", "xn--bcher-kva.de"],
        "sampling": {"*": 0.25, "kind:click": 1.0}, "text_capture": {}}
    last = api.audit()[-1]
    assert last["before"] == {"version": 1, "sampling": {}}
    assert last["after"] == {"version": 2, "sampling": {"*": 0.25, "kind:click": 1.0}}
    assert last["reason"] == "cost" and last["action"] == "policy_sampling"


# ---------------------------------------------------------------- audit


def test_audit_is_newest_first_and_limited(api: Api) -> None:
    for minutes in (1, 2, 3):
        api.client.post("/api/v1/me/pause", headers=api.as_("alice"), json={"minutes": minutes})
    api.client.get("/api/v1/audit", headers=api.as_("alice"))  # refused: one more entry
    r = api.client.get("/api/v1/audit", params={"limit": 2}, headers=api.as_("aud", "auditor"))
    entries = r.json()
    assert [e["outcome"] for e in entries] == ["refused", "allowed"]
    assert entries[1]["action"] == "pause_start" and entries[1]["after"]["mode"] == "paused"
    assert api.client.get("/api/v1/audit", params={"limit": 0}, headers=api.as_("aud", "auditor")).status_code == 422


# ---------------------------------------------------------------- failure of the backing services


class _Down:
    def employee(self, employee_id: str) -> dict[str, Any]:
        raise StateUnavailable("controls topic unreachable")

    def pending_requests(self) -> list[dict[str, Any]]:
        raise StateUnavailable("controls topic unreachable")

    def policy(self) -> dict[str, Any] | None:
        raise StateUnavailable("policy topic unreachable")


def test_unreadable_state_is_503_not_a_guess(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.unit.api_support import bearer, mint

    mem = memory_services(MemoryBackend())
    app = create_app(api_settings(tmp_path), Services(controls=mem.controls, state=_Down(), audit=mem.audit))
    c = TestClient(app)
    h = bearer(mint("olga", ["ops", "hr"]))
    assert c.get("/api/v1/me/state", headers=h).status_code == 503
    assert c.put("/api/v1/policy/sampling", headers=h, json={"rates": {"*": 1}, "reason": "x"}).status_code == 503
    assert c.get("/api/v1/exemption-requests", headers=h).status_code == 503


class _AuditDown:
    def record(self, entry: dict[str, Any]) -> None:
        raise StateUnavailable("audit topic unreachable")

    def entries(self, limit: int) -> list[dict[str, Any]]:
        raise StateUnavailable("audit topic unreachable")


def test_an_unrecordable_refusal_is_503_not_500(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.unit.api_support import bearer, mint

    mem = memory_services(MemoryBackend())
    app = create_app(api_settings(tmp_path), Services(controls=mem.controls, state=mem.state, audit=_AuditDown()))
    c = TestClient(app, raise_server_exceptions=False)
    assert c.get("/api/v1/audit", headers=bearer(mint("alice", []))).status_code == 503
    assert c.get("/api/v1/audit", headers=bearer(mint("aud", ["auditor"]))).status_code == 503


json_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
json_any = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c,
                                                                                       max_size=3), max_leaves=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/api/v1/policy/sampling", "/api/v1/policy/allowlist", "/api/v1/policy/text-capture"]),
       body=st.one_of(json_any, st.fixed_dictionaries({}, optional={
           "rates": json_any, "allowed_apps": json_any, "allowed_domains": json_any, "text_capture": json_any,
           "reason": json_any})))
def test_arbitrary_policy_bodies_are_202_or_422_never_5xx(api: Api, path: str, body: Any) -> None:
    """Whatever JSON arrives, the answer is a change (published, valid) or every problem."""
    before = len(api.backend.controls)
    r = api.client.put(path, headers=api.as_("root", "admin"), content=json.dumps(body, allow_nan=True))
    assert r.status_code in (202, 422), (body, r.status_code, r.text)
    if r.status_code == 422:
        assert r.json()["detail"] and all(set(p) == {"field", "message"} for p in r.json()["detail"])
        assert len(api.backend.controls) == before
    else:
        assert policy_problems(api.backend.controls[-1]["policy"]) == []


def test_openapi_is_published(api: Api) -> None:
    spec = api.client.get("/openapi.json").json()
    assert "/api/v1/policy/sampling" in spec["paths"]
    assert spec["paths"]["/api/v1/policy/sampling"]["put"]["x-roles"] == ["admin", "ops"]


# ---------------------------------------------------------------- the fold, as a property


kinds = st.sampled_from(["pause_start", "pause_end", "exemption_request", "exemption_grant", "exemption_revoke"])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(kinds, st.integers(1, 30), st.sampled_from(["alice", "bob"])), max_size=20))
def test_fold_matches_a_step_by_step_oracle(steps: list[tuple[str, int, str]]) -> None:
    """The folded state equals a direct replay: the last grant/revoke decides exemption, the last
    pause start/end decides the pause (if it has not run out), a request is pending until answered."""
    t, records = 1_000_000_000_000, []
    exempt, paused_until, pending = False, None, False
    for kind, minutes, who in steps:
        t += 60_000_000
        if kind == "pause_start":
            records.append(pause_record(who, minutes, actor=who, at_us=t))
        else:
            records.append(control_record(kind, employee_id=who, actor=who, role="hr", at_us=t))
        if who != "alice":
            continue
        if kind == "pause_start":
            paused_until = t + minutes * 60_000_000
        elif kind == "pause_end":
            paused_until = None
        elif kind == "exemption_request":
            pending = True
        else:
            exempt, pending = kind == "exemption_grant", False
    now = t + 1
    state = fold_employee(records, "alice", at_us=now)
    expected_mode = "exempt" if exempt else "paused" if paused_until and paused_until > now else "capturing"
    assert state["mode"] == expected_mode
    assert (state["pending_request"] is not None) == pending
