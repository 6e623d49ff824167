"""The JSON API, /api/v1 (docs/design/control-plane.md, "Routes"). Every route names one action
of the role matrix (roles.py); every change and every refusal is one audit entry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from handtrace.control.api import actions, dryrun, own
from handtrace.control.api.actions import Problems
from handtrace.control.api.auth import Principal, refuse, require, valid_employee_id
from handtrace.control.api.roles import MATRIX, Action
from handtrace.control.api.services import (
    Services,
    StateUnavailable,
    WarehouseUnavailable,
    audit_entry,
    control_id,
    get_services,
    iso,
)
from handtrace.core.controls import (
    MAX_PAUSE_MINUTES,
    ControlError,
)


class FieldProblem(BaseModel):
    field: str
    message: str


class ValidationProblems(BaseModel):
    """422: every problem of the request at once, each with the field it concerns."""

    detail: list[FieldProblem]


class ErrorOut(BaseModel):
    detail: str


router = APIRouter(prefix="/api/v1", responses={
    400: {"model": ErrorOut, "description": "The body could not be parsed (e.g. not UTF-8 JSON)."},
    401: {"model": ErrorOut, "description": "Missing, invalid or expired bearer token."},
    403: {"model": ErrorOut, "description": "The caller's roles may not do this (audited)."},
    422: {"model": ValidationProblems, "description": "Every validation problem at once."},
    503: {"model": ErrorOut, "description": "The control topics could not be read or written in time."},
})


def allow(action: Action) -> Any:
    """The dependency guarding a route with ``action``'s rule of the role matrix."""
    return Depends(require(*MATRIX[action].roles, action=action))


def _rule(action: Action) -> dict[str, Any]:
    """The route's rule of the role matrix, published in the OpenAPI document (docs/api.md)."""
    rule = MATRIX[action]
    return {"x-action": action.value, "x-roles": sorted(r.value for r in rule.roles),
            "x-self-only": rule.self_only}


Services_ = Annotated[Services, Depends(get_services)]


# ---------------------------------------------------------------- models


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Me(BaseModel):
    subject: str
    employee_id: str | None
    roles: list[str]
    name: str


class PendingRequest(BaseModel):
    employee_id: str
    reason: str
    requested_at: str
    control_id: str


class EmployeeState(BaseModel):
    employee_id: str
    mode: Literal["capturing", "paused", "exempt"]
    paused_until: str | None
    exempt_since: str | None
    pending_request: PendingRequest | None


class PauseIn(_Body):
    minutes: int = Field(description=f"How long, 1..{MAX_PAUSE_MINUTES} minutes (capture resumes by itself).")
    reason: str = Field(default="", max_length=500)


class ReasonIn(_Body):
    reason: str = Field(default="", max_length=500, description="Why (kept in the audit trail).")


class Accepted(BaseModel):
    control_id: str | None = None
    paused_until: str | None = None
    version: int | None = None


class Policy(BaseModel):
    version: int
    allowed_apps: list[str]
    allowed_domains: list[str]
    sampling: dict[str, float]
    text_capture: dict[str, str]


class SamplingIn(_Body):
    rates: dict[str, Any] = Field(description="Rate in [0, 1] by selector (`*`, `app:<id>`, `kind:<kind>`, "
                                  "`cohort:<name>`); replaces the sampling map.")
    reason: str = Field(default="", max_length=500)


class AllowlistIn(_Body):
    allowed_apps: list[Any] = Field(description="App ids that may be captured (empty allows nothing).")
    allowed_domains: list[Any] = Field(description="Registrable domains (no public suffixes, no wildcards).")
    reason: str = Field(default="", max_length=500)


class TextCaptureIn(_Body):
    text_capture: dict[str, Any] = Field(description="App id (or `*`) -> none | masked | full.")
    reason: str = Field(default="", max_length=500)


class AuditEntry(BaseModel):
    model_config = ConfigDict(extra="allow")
    at: str
    subject: str
    roles: list[str]
    action: str
    target: str | None
    reason: str
    before: Any = None
    after: Any = None
    outcome: Literal["allowed", "refused"]


# ---------------------------------------------------------------- helpers


def _state(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except StateUnavailable as e:
        raise HTTPException(status_code=503, detail=f"control state unavailable: {e}") from None


def _at(request: Request) -> actions.Where:
    return actions.where(request.method, request.url.path)


def _reason_required(reason: str) -> list[tuple[str, str]]:
    return [] if reason.strip() else [("reason", "is required (kept in the audit trail)")]


def _own(caller: Principal) -> str:
    if caller.employee_id is None:  # pragma: no cover - auth always sets one
        raise HTTPException(status_code=403, detail="no employee id in the token")
    return caller.employee_id


EmployeeId = Annotated[str, Path(min_length=1, max_length=128, description="Employee id.")]


def _employee(employee_id: str) -> str:
    if not valid_employee_id(employee_id):
        raise Problems([("employee_id", "is not an employee id (1..128 printable characters, no spaces)")])
    return employee_id


# ---------------------------------------------------------------- employee (self)


@router.get("/me", response_model=Me, tags=["employee"],
             openapi_extra=_rule(Action.own))
def me(caller: Annotated[Principal, allow(Action.own)]) -> Me:
    """Who the caller is."""
    return Me(subject=caller.subject, employee_id=caller.employee_id, roles=sorted(r.value for r in caller.roles),
              name=caller.name)


@router.get("/me/state", response_model=EmployeeState, tags=["employee"],
             openapi_extra=_rule(Action.own))
def my_state(caller: Annotated[Principal, allow(Action.own)], services: Services_) -> dict[str, Any]:
    """The caller's capture state: capturing, paused until, or exempt."""
    return dict(_state(services.state.employee, _own(caller)))


@router.post("/me/pause", response_model=Accepted, status_code=202, tags=["employee"],
             openapi_extra=_rule(Action.own))
def pause(body: PauseIn, request: Request, caller: Annotated[Principal, allow(Action.own)],
          services: Services_) -> Accepted:
    """Pause capture of the caller for 1..30 minutes: nothing captured in it is stored."""
    rec = actions.pause_self(services, caller, body.minutes, body.reason, at=_at(request))
    return Accepted(control_id=control_id(rec), paused_until=iso(rec["pause_ends_at_us"]))


@router.post("/me/resume", response_model=Accepted, status_code=202, tags=["employee"],
             openapi_extra=_rule(Action.own))
def resume(request: Request, caller: Annotated[Principal, allow(Action.own)], services: Services_,
           body: ReasonIn | None = None) -> Accepted:
    """End the caller's pause now."""
    rec = actions.resume_self(services, caller, body.reason if body else "", at=_at(request))
    return Accepted(control_id=control_id(rec))


@router.post("/me/exemption-requests", response_model=Accepted, status_code=202, tags=["employee"],
             openapi_extra=_rule(Action.own))
def request_exemption(body: ReasonIn, request: Request, caller: Annotated[Principal, allow(Action.own)],
                      services: Services_) -> Accepted:
    """Ask HR for an exemption from capture (HR grants or denies it)."""
    rec = actions.request_exemption(services, caller, body.reason, at=_at(request))
    return Accepted(control_id=control_id(rec))


# ---------------------------------------------------------------- hr


@router.get("/employees/{employee_id}/state", response_model=EmployeeState, tags=["hr"],
             openapi_extra=_rule(Action.other_state))
def employee_state(employee_id: EmployeeId, request: Request,
                   caller: Annotated[Principal, allow(Action.own)], services: Services_) -> dict[str, Any]:
    """An employee's capture state (hr, admin; anyone for themself)."""
    _employee(employee_id)
    if employee_id == caller.employee_id:
        return dict(_state(services.state.employee, employee_id))
    if not caller.roles & MATRIX[Action.other_state].roles:
        refuse(request, caller, Action.other_state.value, target=employee_id,
               why="only hr and admin see another employee")
    state = dict(_state(services.state.employee, employee_id))
    # Reading one named person's data, not one's own, is a data access: it is in the trail.
    services.audit.record(audit_entry(caller, action=Action.other_state.value, target=employee_id, reason="",
                                      outcome="allowed", method=request.method, path=request.url.path))
    return state


@router.get("/exemption-requests", response_model=list[PendingRequest], tags=["hr"],
             openapi_extra=_rule(Action.exemptions))
def exemption_requests(_caller: Annotated[Principal, allow(Action.exemptions)], services: Services_,
                       status: Annotated[Literal["pending"], Query()] = "pending") -> list[dict[str, Any]]:
    """Exemption requests not yet answered, oldest first."""
    return list(_state(services.state.pending_requests))


_DECISIONS = {"grant": actions.grant_exemption, "deny": actions.deny_exemption, "revoke": actions.revoke_exemption}


def _decide(kind: Literal["grant", "deny", "revoke"], employee_id: str, body: ReasonIn, request: Request,
            caller: Principal, services: Services) -> Accepted:
    out = _DECISIONS[kind](services, caller, employee_id, body.reason, at=_at(request))
    # A deny publishes nothing (its audit entry is the decision): no control id.
    return Accepted() if kind == "deny" else Accepted(control_id=control_id(out))


@router.post("/exemptions/{employee_id}/grant", response_model=Accepted, status_code=202, tags=["hr"],
             openapi_extra=_rule(Action.exemptions))
def grant(employee_id: EmployeeId, body: ReasonIn, request: Request,
          caller: Annotated[Principal, allow(Action.exemptions)], services: Services_) -> Accepted:
    """Grant an exemption: from now on nothing of the employee is stored."""
    return _decide("grant", employee_id, body, request, caller, services)


@router.post("/exemptions/{employee_id}/deny", response_model=Accepted, status_code=202, tags=["hr"],
             openapi_extra=_rule(Action.exemptions))
def deny(employee_id: EmployeeId, body: ReasonIn, request: Request,
         caller: Annotated[Principal, allow(Action.exemptions)], services: Services_) -> Accepted:
    """Deny a pending exemption request (audit only: capture is unchanged)."""
    return _decide("deny", employee_id, body, request, caller, services)


@router.post("/exemptions/{employee_id}/revoke", response_model=Accepted, status_code=202, tags=["hr"],
             openapi_extra=_rule(Action.exemptions))
def revoke(employee_id: EmployeeId, body: ReasonIn, request: Request,
           caller: Annotated[Principal, allow(Action.exemptions)], services: Services_) -> Accepted:
    """End an exemption: capture is stored again from now on."""
    return _decide("revoke", employee_id, body, request, caller, services)


# ---------------------------------------------------------------- policy


@router.get("/policy", response_model=Policy | None, tags=["policy"],
             openapi_extra=_rule(Action.read_policy))
def policy(_caller: Annotated[Principal, allow(Action.read_policy)], services: Services_) -> Any:
    """The signed policy in force (null: none published yet)."""
    return _state(services.state.policy)


def _change_policy(request: Request, caller: Principal, services: Services, action: str, reason: str,
                   change: dict[str, Any], rename: dict[str, str]) -> Accepted:
    """Publish the policy in force with ``change`` applied as version + 1 (actions.change_policy,
    which the ops and security pages call too)."""
    try:
        rec = actions.change_policy(services, caller, action, reason, change, rename=rename, method=request.method,
                                    path=request.url.path)
    except ControlError as e:
        raise HTTPException(status_code=503, detail=f"control not issued: {e}") from None
    return Accepted(control_id=control_id(rec), version=rec["policy"]["version"])


class DryRunOut(BaseModel):
    estimate: dict[str, Any] = Field(description="`{available: true, metrics: [{metric, label, unit, now, after}], "
                                     "groups, basis: {window_s, rows_seen, agents, groups, unknown_groups, "
                                     "unseen_selectors, ignored_selectors, bytes, ...}, notes}` or `{available: "
                                     "false, why}` when no warehouse can be read (control/api/dryrun.py).")


@router.put("/policy/sampling", response_model=Accepted, status_code=202, tags=["policy"],
             openapi_extra=_rule(Action.sampling),
             responses={200: {"model": DryRunOut, "description": "`dry_run=true`: the estimate; nothing is "
                              "published and no change is audited."}})
def set_sampling(body: SamplingIn, request: Request, caller: Annotated[Principal, allow(Action.sampling)],
                 services: Services_, dry_run: Annotated[bool, Query(
                     description="Validate as a real change, then answer 200 with the estimate of what these "
                     "rates would store (from the last `api.dry_run_window_s` of stored events) instead of "
                     "publishing.")] = False) -> Any:
    """Replace the sampling rates (ops, admin); workers apply the new version live. With
    `dry_run=true`: the same validation (422), then the estimate, nothing published."""
    if dry_run:
        current, _doc, problems = actions.plan_policy(services, {"sampling": body.rates}, body.reason,
                                                      rename={"sampling": "rates"})
        if problems:
            raise Problems(problems)
        window_s = request.app.state.settings.api.dry_run_window_s
        return JSONResponse(status_code=200, content={"estimate": dryrun.dry_run(
            services.warehouse, current["sampling"], body.rates, window_s=window_s)})
    return _change_policy(request, caller, services, "policy_sampling", body.reason, {"sampling": body.rates},
                          {"sampling": "rates"})


@router.put("/policy/allowlist", response_model=Accepted, status_code=202, tags=["policy"],
             openapi_extra=_rule(Action.allowlist))
def set_allowlist(body: AllowlistIn, request: Request, caller: Annotated[Principal, allow(Action.allowlist)],
                  services: Services_) -> Accepted:
    """Replace the app and domain allowlists (security, admin)."""
    return _change_policy(request, caller, services, "policy_allowlist", body.reason,
                          {"allowed_apps": body.allowed_apps, "allowed_domains": body.allowed_domains}, {})


@router.put("/policy/text-capture", response_model=Accepted, status_code=202, tags=["policy"],
             openapi_extra=_rule(Action.allowlist))
def set_text_capture(body: TextCaptureIn, request: Request, caller: Annotated[Principal, allow(Action.allowlist)],
                     services: Services_) -> Accepted:
    """Replace typed-content capture by app (security, admin)."""
    return _change_policy(request, caller, services, "policy_text_capture", body.reason,
                          {"text_capture": body.text_capture}, {})


# ---------------------------------------------------------------- auditor


@router.get("/audit", response_model=list[AuditEntry], tags=["auditor"],
             openapi_extra=_rule(Action.audit))
def audit(_caller: Annotated[Principal, allow(Action.audit)], services: Services_,
          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[dict[str, Any]]:
    """The audit trail, newest first."""
    return list(_state(services.audit.entries, limit))




# ---------------------------------------------------------------- admin


class ResignIn(_Body):
    reason: str = Field(default="", max_length=500, description="Why (kept in the audit trail), e.g. the "
                        "rotation ticket.")


class Resigned(BaseModel):
    key_id: str = Field(description="The key id now signing (the API's `HANDTRACE_CONTROL__SIGNING_KEY_ID`).")
    policy_version: int | None = Field(description="The policy in force, re-published as this version "
                                       "(null: no policy was published).")
    devices: int = Field(description="Device enrollments re-published.")
    exemptions: int = Field(description="Exemptions in force granted again (same effective time).")


@router.post("/admin/resign", response_model=Resigned, status_code=202, tags=["admin"],
             openapi_extra=_rule(Action.rotate_key))
def resign(body: ResignIn, request: Request, caller: Annotated[Principal, allow(Action.rotate_key)],
           services: Services_) -> Resigned:
    """Key rotation, step 4 (docs/operations.md): re-publish the policy in force (version + 1),
    every device enrollment and every exemption in force, signed with the API's current key, so
    the old key id can be retired everywhere."""
    problems = _reason_required(body.reason)
    if problems:
        raise Problems(problems)
    before = (_state(services.state.policy) or {}).get("version")
    try:
        done = services.controls.resign(actor=caller.subject, reason=body.reason)
    except ControlError as e:
        raise HTTPException(status_code=503, detail=f"not re-signed: {e}") from None
    services.audit.record(audit_entry(caller, action="key_resign", target="control-plane-key", reason=body.reason,
                                      outcome="allowed", before={"policy_version": before},
                                      after=dict(done), method=request.method, path=request.url.path))
    return Resigned(**done)


# ---------------------------------------------------------------- employee: own data (Part 3 B)


class CapturedCount(BaseModel):
    app_id: str = Field(description="The app (empty: events without an app).")
    kind: str
    events: int


class CapturedFrame(BaseModel):
    demonstration_id: str
    step: int
    captured_at: str
    sha256: str
    reason: str = Field(description="What the frame precedes (click, drag, scroll, typing, hotkey, end).")


class Captured(BaseModel):
    day: str = Field(description="The UTC day counted.")
    total: int = Field(description="Events stored about the caller that day (passive and demonstrations).")
    by_app_kind: list[CapturedCount]
    demonstrations: int = Field(description="Demonstrations the caller started that day.")
    frames: list[CapturedFrame] = Field(description="The newest frames (at most 12). Passive screenshots are "
                                        "not kept as images, only their hashes: none to show.")


class Demonstration(BaseModel):
    demonstration_id: str
    instruction: str
    status: str
    started_at: str | None
    ended_at: str | None
    frames: int
    events: int
    apps: list[str]
    withdrawn: bool
    withdrawn_at: str | None


class Withdrawn(BaseModel):
    withdrawal_id: str


class WithdrawIn(_Body):
    reason: str = Field(default="", max_length=500, description="Why (required; kept with the withdrawal and in "
                        "the audit trail).")


def _own_data(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an own-data function: 503 when the warehouse is unavailable, the same 404 for another
    person's and an unknown demonstration, 422 for an invalid field, 403 without an employee id."""
    try:
        return fn(*args, **kwargs)
    except WarehouseUnavailable as e:
        raise HTTPException(status_code=503, detail=f"warehouse unavailable: {e}") from None
    except own.NotFound:
        raise HTTPException(status_code=404, detail=own.NOT_FOUND) from None
    except actions.Refused as e:
        raise HTTPException(status_code=403, detail=f"forbidden: {e}") from None
    except actions.Invalid as e:
        raise Problems([(e.field, e.message)]) from None


_OWN_DATA_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut, "description": "Not the caller's, or no such demonstration/frame (the same answer)."},
    503: {"model": ErrorOut, "description": "No warehouse configured, or ClickHouse/the frame store unreachable."},
}
DemonstrationId = Annotated[str, Path(min_length=1, max_length=64, description="Demonstration id (UUID).")]


@router.get("/me/captured", response_model=Captured, tags=["employee"], responses=_OWN_DATA_ERRORS,
            openapi_extra=_rule(Action.own_data))
def my_captured(request: Request, caller: Annotated[Principal, allow(Action.own_data)], services: Services_,
                day: Annotated[str | None, Query(description="UTC day, YYYY-MM-DD (default: today).")] = None
                ) -> dict[str, Any]:
    """What was stored about the caller on one day: events by app and kind, demonstrations, the
    newest frames."""
    result: dict[str, Any] = _own_data(own.captured, services, request.app.state.settings, caller, day)
    return result


@router.get("/me/demonstrations", response_model=list[Demonstration], tags=["employee"],
            responses=_OWN_DATA_ERRORS, openapi_extra=_rule(Action.own_data))
def my_demonstrations(request: Request, caller: Annotated[Principal, allow(Action.own_data)],
                      services: Services_) -> list[dict[str, Any]]:
    """The caller's demonstrations, newest first (at most 100), with whether each is withdrawn."""
    result: list[dict[str, Any]] = _own_data(own.demonstrations, services, request.app.state.settings, caller)
    return result


@router.post("/me/demonstrations/{demonstration_id}/withdraw", response_model=Withdrawn, status_code=202,
             tags=["employee"], responses=_OWN_DATA_ERRORS, openapi_extra=_rule(Action.own_data))
def withdraw_demonstration(demonstration_id: DemonstrationId, body: WithdrawIn, request: Request,
                           caller: Annotated[Principal, allow(Action.own_data)], services: Services_) -> Withdrawn:
    """Withdraw one of the caller's demonstrations from training data: later exports leave it out,
    exports that contain it become stale. Audited (``demonstration_withdraw``), refusals too."""
    wid = _own_data(own.withdraw, services, request.app.state.settings, caller, demonstration_id, body.reason,
                    method=request.method, path=request.url.path)
    return Withdrawn(withdrawal_id=wid)


@router.get("/me/frames/{demonstration_id}/{step}", tags=["employee"], response_class=Response,
            responses={**_OWN_DATA_ERRORS, 200: {"content": {"image/png": {}, "image/webp": {}},
                                                 "description": "The frame's image bytes."}},
            openapi_extra=_rule(Action.own_data))
def my_frame(demonstration_id: DemonstrationId, step: Annotated[int, Path(ge=0, le=2**32 - 1)], request: Request,
             caller: Annotated[Principal, allow(Action.own_data)], services: Services_) -> Response:
    """One frame of one of the caller's demonstrations, as stored (private: not cached by proxies)."""
    data, media_type = _own_data(own.frame_image, services, request.app.state.settings, caller, demonstration_id,
                                 step)
    return Response(content=data, media_type=media_type,
                    headers={"Cache-Control": "private, max-age=300", "X-Content-Type-Options": "nosniff"})
