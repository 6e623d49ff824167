"""POST /api/v1/admin/resign (issue #13, Deliver 2: key rotation is an API-side procedure):
admin only, a reason required, the policy in force re-published unchanged as version + 1,
exactly one audit entry; a failure to publish is 503 with nothing audited as done. The real
broker and workers: tests/integration/test_api_key_rotation.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from handtrace.control.api.services import MemoryBackend, MemoryControls
from handtrace.core.controls import MAX_POLICY_VERSION, ControlError, control_record
from tests.unit.api_support import Api, make_api

POLICY = {"version": 7, "allowed_apps": ["code"], "allowed_domains": ["github.com"], "sampling": {"*": 0.5},
          "text_capture": {"*": "masked"}}


@pytest.fixture
def api(tmp_path: Path) -> Api:
    api = make_api(tmp_path)
    api.services.controls.publish(control_record("policy_update", employee_id=None, actor="ops-0", role="ops",
                                                 policy=POLICY))
    return api


def test_admin_resign_republishes_the_policy_in_force_as_the_next_version(api: Api) -> None:
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("root", "admin"), json={"reason": "CHG-42"})
    assert r.status_code == 202, r.text
    assert r.json() == {"key_id": "memory", "policy_version": 8, "devices": 0, "exemptions": 0}
    rec = api.backend.controls[-1]
    assert rec["kind"] == "policy_update" and rec["actor"] == "root" and rec["reason"] == "CHG-42"
    assert rec["policy"] == {**POLICY, "version": 8}  # same content, only the version moves
    assert api.client.get("/api/v1/policy", headers=api.as_("e", "employee")).json()["version"] == 8
    [entry] = api.audit()
    assert (entry["action"], entry["outcome"], entry["subject"], entry["reason"]) == (
        "key_resign", "allowed", "root", "CHG-42")
    assert entry["before"] == {"policy_version": 7}
    assert entry["after"] == {"key_id": "memory", "policy_version": 8, "devices": 0, "exemptions": 0}


def test_exemptions_in_force_are_granted_again_with_their_effective_time(api: Api) -> None:
    hr = api.as_("harriet", "hr")
    for employee in ("ann", "ben", "cid"):
        assert api.client.post(f"/api/v1/exemptions/{employee}/grant", headers=hr,
                               json={"reason": "ok"}).status_code == 202
    assert api.client.post("/api/v1/exemptions/ben/revoke", headers=hr, json={"reason": "ended"}).status_code == 202
    since = {r["employee_id"]: r["exemption_effective_at_us"] for r in api.backend.controls
             if r["kind"] == "exemption_grant"}
    n = len(api.backend.controls)
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("root", "admin"), json={"reason": "rotation"})
    assert r.status_code == 202 and r.json()["exemptions"] == 2, r.text
    again = [rec for rec in api.backend.controls[n:] if rec["kind"] == "exemption_grant"]
    assert {(g["employee_id"], g["exemption_effective_at_us"], g["actor"]) for g in again} == {
        ("ann", since["ann"], "root"), ("cid", since["cid"], "root")}  # ben's was revoked: not re-granted
    for employee, mode in (("ann", "exempt"), ("ben", "capturing"), ("cid", "exempt")):
        assert api.client.get(f"/api/v1/employees/{employee}/state", headers=hr).json()["mode"] == mode


@pytest.mark.parametrize("role", ["employee", "hr", "ops", "security", "auditor"])
def test_only_admin_may_resign(api: Api, role: str) -> None:
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("mallory", role), json={"reason": "x"})
    assert r.status_code == 403
    assert len(api.backend.controls) == 1  # nothing issued
    [entry] = api.audit()
    assert (entry["action"], entry["outcome"]) == ("rotate_key", "refused")


@pytest.mark.parametrize("body", [{}, {"reason": "   "}])
def test_a_reason_is_required(api: Api, body: dict[str, Any]) -> None:
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("root", "admin"), json=body)
    assert r.status_code == 422 and [p["field"] for p in r.json()["detail"]] == ["reason"]
    assert len(api.backend.controls) == 1 and api.audit() == []


def test_without_a_policy_there_is_nothing_to_republish(tmp_path: Path) -> None:
    api = make_api(tmp_path)
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("root", "admin"), json={"reason": "rotation"})
    assert r.status_code == 202 and r.json()["policy_version"] is None
    assert api.backend.controls == [] and api.audit()[0]["after"]["policy_version"] is None


def test_a_failed_resign_is_503_and_not_audited_as_done(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(**_kw: Any) -> dict[str, Any]:
        raise ControlError("control not delivered to t.policy: timed out")

    monkeypatch.setattr(api.services.controls, "resign", fail)
    r = api.client.post("/api/v1/admin/resign", headers=api.as_("root", "admin"), json={"reason": "rotation"})
    assert r.status_code == 503 and "not re-signed" in r.json()["detail"]
    assert api.audit() == []


def test_no_room_above_the_policy_in_force_is_refused() -> None:
    b = MemoryBackend()
    controls = MemoryControls(b)
    controls.publish(control_record("policy_update", employee_id=None, actor="o", role="ops",
                                    policy={**POLICY, "version": MAX_POLICY_VERSION}))
    with pytest.raises(ControlError, match="no room"):
        controls.resign(actor="root", reason="rotation")
    assert len(b.controls) == 1
