"""Property-based fuzzing of the API from its own OpenAPI document (issue #13, "Tests that a
user would trust": no 5xx, no schema violations). schemathesis walks every operation of
``/openapi.json`` with generated parameters and bodies (valid and invalid ones), as an admin
(every route allowed) and as a plain employee (most refused), against ``create_app`` over
in-memory services; each response must be no server error, a documented status code, the
documented content type, and a body matching the documented schema."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from handtrace.control.api.app import create_app
from handtrace.control.api.services import MemoryBackend, memory_services
from handtrace.control.api.warehouse import MemoryWarehouse
from handtrace.core.controls import control_record
from tests.unit.api_support import api_settings, bearer, mint

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# A bounded budget per operation (17 operations x 2 roles stay well under a minute on 2 cores).
BUDGET = settings(max_examples=25, deadline=None, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.function_scoped_fixture])


def _app() -> Any:
    """The API over in-memory services with state to read: a policy, a pending request, an
    exemption (so GETs return full documents, not only empty ones)."""
    backend = MemoryBackend()
    services = memory_services(backend)
    services.controls.publish(control_record(
        "policy_update", employee_id=None, actor="ops-0", role="ops",
        policy={"version": 1, "allowed_apps": ["code"], "allowed_domains": ["github.com"], "sampling": {"*": 0.5},
                "text_capture": {"*": "masked"}}))
    services.controls.publish(control_record("exemption_request", employee_id="bob", actor="bob", role="employee",
                                             reason="works council"))
    services.controls.publish(control_record("exemption_grant", employee_id="eve", actor="hr-0", role="hr",
                                             reason="approved", exemption_effective_at_us=1))
    services.warehouse = MemoryWarehouse()  # own-data routes answer (empty) rather than 503
    # The test's identity provider's JWKS is written once to a private temporary directory.
    return create_app(api_settings(Path(tempfile.mkdtemp(prefix="handtrace-fuzz-"))), services)


APP = _app()
CLIENT = TestClient(APP, raise_server_exceptions=False)  # a crash must surface as the 500 a caller sees
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def call_and_validate(case: schemathesis.Case, headers: dict[str, str]) -> None:
    """Send ``case`` through Starlette's TestClient and run the checks on the response.
    (schemathesis' own ASGI transport goes through ``requests``, whose connection accounting
    fails against the installed urllib3 2.8: ``'TrafficPolice' object has no attribute 'keys'``.)"""
    kw = case.as_transport_kwargs(base_url="http://testserver", headers=headers)
    body: dict[str, Any] = {}
    if "json" in kw:
        body["json"] = kw.pop("json")
    data = kw.pop("data", None)
    if isinstance(data, bytes | str):
        body["content"] = data
    elif data is not None:
        body["data"] = data
    response = CLIENT.request(kw["method"], kw["url"], headers=kw.get("headers"), params=kw.get("params") or None,
                              **body)
    case.validate_response(response, checks=CHECKS, headers=kw.get("headers"))


@schema.parametrize()
@BUDGET
def test_fuzz_as_admin(case: schemathesis.Case) -> None:
    call_and_validate(case, bearer(mint("root", ["admin"])))


@schema.parametrize()
@BUDGET
def test_fuzz_as_an_employee(case: schemathesis.Case) -> None:
    call_and_validate(case, bearer(mint("carol", ["employee"])))



class _Crashing:
    """State that fails in a way the app does not expect (a bug, not StateUnavailable)."""

    def employee(self, employee_id: str) -> dict[str, Any]:
        raise RuntimeError("bug")


def test_the_checks_catch_a_server_error_and_an_off_schema_body() -> None:
    """The checks can fail: a crash (500) and a body off the documented schema are reported."""
    services = memory_services()
    services.state = _Crashing()  # type: ignore[assignment]
    crashing = TestClient(create_app(api_settings(Path(tempfile.mkdtemp(prefix="handtrace-fuzz-"))), services),
                          raise_server_exceptions=False)
    off_schema = FastAPI()
    off_schema.add_api_route("/api/v1/me/state", lambda: JSONResponse({"employee_id": 7, "mode": "asleep"}))
    case = schema["/api/v1/me/state"]["GET"].Case()
    headers = bearer(mint("carol", ["employee"]))
    crashed = crashing.get("/api/v1/me/state", headers=headers)
    assert crashed.status_code == 500
    with pytest.raises(FailureGroup, match="Server error"):
        case.validate_response(crashed, checks=CHECKS)
    with pytest.raises(FailureGroup, match="Response violates schema"):
        case.validate_response(TestClient(off_schema).get("/api/v1/me/state"), checks=CHECKS)
