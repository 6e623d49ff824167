"""The JSON API, /api/v1 (docs/design/control-plane.md, "Routes"). Every route names one action
of the role matrix (roles.py); every change and every refusal is one audit entry."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from handtrace.control.api import actions, dryrun
from handtrace.control.api.actions import Problems
from handtrace.control.api.auth import Principal, refuse, require, valid_employee_id
from handtrace.control.api.roles import MATRIX, Action, actor_role
from handtrace.control.api.services import Services, StateUnavailable, audit_entry, control_id, get_services, iso
from handtrace.core.controls import (
    MAX_PAUSE_MINUTES,
    ControlError,
    control_record,
    pause_record,
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


def _issue(request: Request, services: Services, caller: Principal, action: str, record: dict[str, Any], *,
           target: str | None, before: Any, after: Any) -> None:
    """Publish a control record, then audit it (one entry)."""
    try:
        services.controls.publish(record)
    except ControlError as e:
        raise HTTPException(status_code=503, detail=f"control not issued: {e}") from None
    services.audit.record(audit_entry(caller, action=action, target=target, reason=record.get("reason", ""),
                                      outcome="allowed", before=before, after=after, method=request.method,
                                      path=request.url.path))


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
    if not 1 <= body.minutes <= MAX_PAUSE_MINUTES:
        raise Problems([("minutes", f"must be between 1 and {MAX_PAUSE_MINUTES}")])
    me_id = _own(caller)
    rec = pause_record(me_id, body.minutes, actor=caller.subject, role=actor_role(Action.own), reason=body.reason)
    before = _state(services.state.employee, me_id)["mode"]
    until = iso(rec["pause_ends_at_us"])
    _issue(request, services, caller, "pause", rec, target=me_id, before=before, after=f"paused until {until}")
    return Accepted(control_id=control_id(rec), paused_until=until)


@router.post("/me/resume", response_model=Accepted, status_code=202, tags=["employee"],
             openapi_extra=_rule(Action.own))
def resume(request: Request, caller: Annotated[Principal, allow(Action.own)], services: Services_,
           body: ReasonIn | None = None) -> Accepted:
    """End the caller's pause now."""
    me_id = _own(caller)
    rec = control_record("pause_end", employee_id=me_id, actor=caller.subject, role=actor_role(Action.own),
                         reason=body.reason if body else "")
    before = _state(services.state.employee, me_id)["mode"]
    _issue(request, services, caller, "resume", rec, target=me_id, before=before, after="resumed")
    return Accepted(control_id=control_id(rec))


@router.post("/me/exemption-requests", response_model=Accepted, status_code=202, tags=["employee"],
             openapi_extra=_rule(Action.own))
def request_exemption(body: ReasonIn, request: Request, caller: Annotated[Principal, allow(Action.own)],
                      services: Services_) -> Accepted:
    """Ask HR for an exemption from capture (HR grants or denies it)."""
    problems = _reason_required(body.reason)
    if problems:
        raise Problems(problems)
    me_id = _own(caller)
    rec = control_record("exemption_request", employee_id=me_id, actor=caller.subject,
                         role=actor_role(Action.own), reason=body.reason)
    _issue(request, services, caller, "exemption_request", rec, target=me_id, before=None, after="requested")
    return Accepted(control_id=control_id(rec))


# ---------------------------------------------------------------- hr


@router.get("/employees/{employee_id}/state", response_model=EmployeeState, tags=["hr"],
             openapi_extra=_rule(Action.other_state))
def employee_state(employee_id: EmployeeId, request: Request,
                   caller: Annotated[Principal, allow(Action.own)], services: Services_) -> dict[str, Any]:
    """An employee's capture state (hr, admin; anyone for themself)."""
    _employee(employee_id)
    if employee_id != caller.employee_id and not (caller.roles & MATRIX[Action.other_state].roles):
        refuse(request, caller, Action.other_state.value, target=employee_id,
               why="only hr and admin see another employee")
    return dict(_state(services.state.employee, employee_id))


@router.get("/exemption-requests", response_model=list[PendingRequest], tags=["hr"],
             openapi_extra=_rule(Action.exemptions))
def exemption_requests(_caller: Annotated[Principal, allow(Action.exemptions)], services: Services_,
                       status: Annotated[Literal["pending"], Query()] = "pending") -> list[dict[str, Any]]:
    """Exemption requests not yet answered, oldest first."""
    return list(_state(services.state.pending_requests))


def _decide(kind: Literal["grant", "deny", "revoke"], employee_id: str, body: ReasonIn, request: Request,
            caller: Principal, services: Services) -> Accepted:
    problems = _reason_required(body.reason)
    if not valid_employee_id(employee_id):
        problems.insert(0, ("employee_id", "is not an employee id (1..128 printable characters, no spaces)"))
    if problems:
        raise Problems(problems)
    before = _state(services.state.employee, employee_id)
    role = actor_role(Action.exemptions)
    if kind == "deny":
        # Nothing changes for the employee: a deny is an audit entry only (no control kind).
        if before["pending_request"] is None:
            raise Problems([("employee_id", "has no pending exemption request to deny")])
        services.audit.record(audit_entry(caller, action="exemption_deny", target=employee_id, reason=body.reason,
                                          outcome="allowed", before="requested", after="denied",
                                          method=request.method, path=request.url.path))
        return Accepted()
    rec = control_record(f"exemption_{kind}", employee_id=employee_id, actor=caller.subject, role=role,
                         reason=body.reason)
    if kind == "grant":
        rec["exemption_effective_at_us"] = rec["occurred_at_us"]
    _issue(request, services, caller, f"exemption_{kind}", rec, target=employee_id, before=before["mode"],
           after="exempt" if kind == "grant" else "capturing")
    return Accepted(control_id=control_id(rec))


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
