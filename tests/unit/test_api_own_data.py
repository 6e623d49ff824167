"""The employee's own data through the JSON API (docs/design/control-plane.md, Part 3 B): self
only, another person's demonstration or frame answers exactly like an unknown one, a withdrawal
(and a refused one) is one audit entry, 503 without a warehouse, day validation."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.control.api.warehouse import EMPLOYEE_NAMESPACE, MemoryWarehouse, employee_key
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from tests.unit.api_support import PNG_1PX, PSEUDONYM_KEY, Api, make_api, own_data_warehouse

ALICE_DEMO = str(uuid.UUID(int=0xA11CE))
BOB_DEMO = str(uuid.UUID(int=0xB0B))
UNKNOWN_DEMO = str(uuid.UUID(int=0xDEAD))


def two_employees(tmp_path: Path) -> tuple[Api, MemoryWarehouse]:
    """alice and bob each with one demonstration, one frame and two events today."""
    api = make_api(tmp_path)
    alice = own_data_warehouse(api, "alice", ALICE_DEMO)
    bob = own_data_warehouse(api, "bob", BOB_DEMO)
    bob.events = [{**e, "kind": "key"} for e in bob.events] * 3
    merged = MemoryWarehouse(events=alice.events + bob.events, demos=alice.demos + bob.demos,
                             frames=alice.frames + bob.frames)
    api.services.warehouse = merged
    return api, merged


def test_the_key_is_the_one_the_stream_stores(tmp_path: Path) -> None:
    """employee_key derives exactly what PseudonymiseStep writes into employee_key."""
    import polars as pl

    api = make_api(tmp_path)
    frame = pl.DataFrame({"employee_id": ["alice", "bob"], "device_id": ["d1", "d2"]})
    out = PseudonymiseStep(PSEUDONYM_KEY.encode())(frame, BatchContext(received_at_us=0)).frame
    stored = out.get_column("employee_key").to_list()
    settings_ = api.client.app.state.settings  # type: ignore[attr-defined]
    assert stored == [employee_key(settings_, "alice"), employee_key(settings_, "bob")]
    assert EMPLOYEE_NAMESPACE == "employee"


def test_captured_is_the_callers_only(tmp_path: Path) -> None:
    api, _w = two_employees(tmp_path)
    r = api.client.get("/api/v1/me/captured", headers=api.as_("alice"))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["day"] == datetime.now(UTC).date().isoformat()
    assert body["by_app_kind"] == [{"app_id": "code", "kind": "click", "events": 2}]
    assert body["total"] == 2 and body["demonstrations"] == 1
    assert [f["demonstration_id"] for f in body["frames"]] == [ALICE_DEMO]
    r = api.client.get("/api/v1/me/captured", headers=api.as_("bob"))
    assert r.json()["by_app_kind"] == [{"app_id": "code", "kind": "key", "events": 6}]
    assert api.audit() == []  # reading is not a change


def test_hr_and_admin_see_only_their_own_too(tmp_path: Path) -> None:
    """No role reaches another person's data here: an admin called bob sees bob's, nothing else."""
    api, _w = two_employees(tmp_path)
    r = api.client.get("/api/v1/me/demonstrations", headers=api.as_("bob", "admin", "hr"))
    assert [d["demonstration_id"] for d in r.json()] == [BOB_DEMO]
    # the query string cannot name anyone else
    r = api.client.get("/api/v1/me/captured?employee_id=alice", headers=api.as_("bob", "admin"))
    assert r.json()["total"] == 6


@pytest.mark.parametrize("day", ["2026-13-01", "yesterday", "2026-1-1", "2026-02-30", "20260101", "2026-01-01T00"])
def test_a_bad_day_is_422_with_the_field(tmp_path: Path, day: str) -> None:
    api, _w = two_employees(tmp_path)
    r = api.client.get("/api/v1/me/captured", params={"day": day}, headers=api.as_("alice"))
    assert r.status_code == 422
    assert [p["field"] for p in r.json()["detail"]] == ["day"]


def test_another_day_counts_that_day(tmp_path: Path) -> None:
    api, _w = two_employees(tmp_path)
    r = api.client.get("/api/v1/me/captured", params={"day": "2020-01-01"}, headers=api.as_("alice"))
    assert r.status_code == 200
    assert r.json() == {"day": "2020-01-01", "total": 0, "by_app_kind": [], "demonstrations": 0, "frames": []}


def test_withdraw_own_demonstration_is_audited_once(tmp_path: Path) -> None:
    api, w = two_employees(tmp_path)
    r = api.client.post(f"/api/v1/me/demonstrations/{ALICE_DEMO}/withdraw", headers=api.as_("alice"),
                        json={"reason": "it shows a customer's name"})
    assert r.status_code == 202, r.text
    assert r.json()["withdrawal_id"] == w.withdrawals[0]["withdrawal_id"]
    assert w.withdrawals[0]["demonstration_id"] == ALICE_DEMO and w.withdrawals[0]["actor"] == "alice"
    audit = api.audit()
    assert len(audit) == 1
    assert audit[0]["action"] == "demonstration_withdraw" and audit[0]["outcome"] == "allowed"
    assert audit[0]["target"] == ALICE_DEMO and audit[0]["reason"] == "it shows a customer's name"
    demos = api.client.get("/api/v1/me/demonstrations", headers=api.as_("alice")).json()
    assert demos[0]["withdrawn"] is True and demos[0]["withdrawn_at"]


def _not_found(api: Api, method: str, path: str, body: dict[str, Any] | None) -> tuple[int, bytes, dict[str, str]]:
    r = api.client.request(method, path, headers=api.as_("alice"), json=body)
    headers = {k: v for k, v in r.headers.items() if k not in ("content-length", "date")}
    return r.status_code, r.content, headers


@pytest.mark.parametrize(("method", "template", "body"), [
    ("POST", "/api/v1/me/demonstrations/{}/withdraw", {"reason": "mine?"}),
    ("GET", "/api/v1/me/frames/{}/0", None),
])
def test_another_persons_is_indistinguishable_from_unknown(tmp_path: Path, method: str, template: str,
                                                           body: dict[str, Any] | None) -> None:
    api, w = two_employees(tmp_path)
    theirs = _not_found(api, method, template.format(BOB_DEMO), body)
    unknown = _not_found(api, method, template.format(UNKNOWN_DEMO), body)
    assert theirs[0] == 404
    assert theirs == unknown
    assert w.withdrawals == []  # bob's demonstration untouched
    if method == "POST":  # refused withdrawals are audited, one entry each, the same way
        audit = api.audit()
        assert [(e["action"], e["outcome"], e["detail"]) for e in audit] == [
            ("demonstration_withdraw", "refused", audit[0]["detail"])] * 2
        assert [e["target"] for e in audit] == [BOB_DEMO, UNKNOWN_DEMO]


def test_own_frame_is_served_privately(tmp_path: Path) -> None:
    api, _w = two_employees(tmp_path)
    r = api.client.get(f"/api/v1/me/frames/{ALICE_DEMO}/0", headers=api.as_("alice"))
    assert r.status_code == 200
    assert r.content == PNG_1PX
    assert r.headers["content-type"] == "image/png"
    assert r.headers["cache-control"].startswith("private")
    assert api.client.get(f"/api/v1/me/frames/{ALICE_DEMO}/1", headers=api.as_("alice")).status_code == 404
    assert api.client.get(f"/api/v1/me/frames/{ALICE_DEMO}/0", headers=api.as_("bob")).status_code == 404


def test_a_withdrawal_needs_a_reason(tmp_path: Path) -> None:
    api, w = two_employees(tmp_path)
    r = api.client.post(f"/api/v1/me/demonstrations/{ALICE_DEMO}/withdraw", headers=api.as_("alice"),
                        json={"reason": "  "})
    assert r.status_code == 422 and [p["field"] for p in r.json()["detail"]] == ["reason"]
    assert w.withdrawals == [] and api.audit() == []


@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/v1/me/captured"), ("GET", "/api/v1/me/demonstrations"),
    ("POST", f"/api/v1/me/demonstrations/{ALICE_DEMO}/withdraw"), ("GET", f"/api/v1/me/frames/{ALICE_DEMO}/0"),
])
@pytest.mark.parametrize("why", ["none", "unavailable"])
def test_503_without_a_warehouse(tmp_path: Path, method: str, path: str, why: str) -> None:
    api = make_api(tmp_path)
    if why == "unavailable":
        api.services.warehouse = MemoryWarehouse(unavailable="not being served: start the sink")
    r = api.client.request(method, path, headers=api.as_("alice"), json={"reason": "r"} if method == "POST" else None)
    assert r.status_code == 503
    expected = "not being served: start the sink" if why == "unavailable" else "no warehouse is configured"
    assert expected in r.json()["detail"]
    assert api.audit() == []


def test_503_when_the_api_has_no_pseudonym_key(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from handtrace.control.api.app import create_app
    from handtrace.core.settings import Settings
    from tests.unit.api_support import api_settings

    s = api_settings(tmp_path)
    s = Settings(**{**s.model_dump(), "stream": {**s.stream.model_dump(), "pseudonym_key": None}})
    api = make_api(tmp_path)
    app = create_app(s, api.services)
    api.services.warehouse = MemoryWarehouse()
    r = TestClient(app).get("/api/v1/me/captured", headers=api.as_("alice"))
    assert r.status_code == 503 and "PSEUDONYM_KEY" in r.json()["detail"]


def test_unauthenticated_is_401(tmp_path: Path) -> None:
    api, _w = two_employees(tmp_path)
    assert api.client.get("/api/v1/me/captured").status_code == 401
    assert api.client.get(f"/api/v1/me/frames/{ALICE_DEMO}/0").status_code == 401


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(caller=st.sampled_from(["alice", "bob", "carol"]), target=st.sampled_from([ALICE_DEMO, BOB_DEMO, UNKNOWN_DEMO]),
       step=st.integers(0, 3))
def test_frames_answer_only_their_owner(tmp_path_factory: pytest.TempPathFactory, caller: str, target: str,
                                        step: int) -> None:
    """Property: a frame is 200 exactly when it is the caller's own and exists; otherwise the one 404."""
    api, _w = two_employees(tmp_path_factory.mktemp("own"))
    r = api.client.get(f"/api/v1/me/frames/{target}/{step}", headers=api.as_(caller))
    owner = {ALICE_DEMO: "alice", BOB_DEMO: "bob"}.get(target)
    if owner == caller and step == 0:
        assert r.status_code == 200 and r.content == PNG_1PX
    else:
        assert r.status_code == 404 and r.json() == {"detail": "no such demonstration or frame of yours"}


def test_a_caller_without_an_employee_id_is_refused(tmp_path: Path) -> None:
    """Tokens always carry one (the subject by default); the own-data code still refuses without."""
    from handtrace.control.api import actions, own
    from handtrace.control.api.auth import Principal
    from handtrace.control.api.roles import Role

    api, w = two_employees(tmp_path)
    nobody = Principal(subject="svc", employee_id=None, roles=frozenset({Role.admin}), name="svc")
    settings_ = api.client.app.state.settings  # type: ignore[attr-defined]
    for call in (lambda: own.captured(api.services, settings_, nobody, None),
                 lambda: own.demonstrations(api.services, settings_, nobody),
                 lambda: own.withdraw(api.services, settings_, nobody, ALICE_DEMO, "r"),
                 lambda: own.frame_image(api.services, settings_, nobody, ALICE_DEMO, 0)):
        with pytest.raises(actions.Refused):
            call()
    assert w.withdrawals == []
