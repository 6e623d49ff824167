"""What a person does through the control plane, shared by the JSON routes (routes.py) and the
portal's forms (pages.py), so both issue the same records and the same audit trail.

Each action validates its input (:class:`Invalid`, naming the field), builds the control record
with core/controls.py, publishes it through ``Services.controls`` and writes exactly one audit
entry; an action on someone the caller may not act on writes one ``refused`` entry and raises
:class:`Refused` (403). A deny changes nothing for the employee: it is only an audit entry
(docs/design/control-plane.md, "Services").
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, TypedDict

from handtrace.control.api.auth import Principal, valid_employee_id
from handtrace.control.api.roles import Role
from handtrace.control.api.services import Services
from handtrace.core.clock import now_us
from handtrace.core.controls import (
    MAX_PAUSE_MINUTES,
    MAX_POLICY_VERSION,
    ControlError,
    control_record,
    pause_record,
    policy_problems,
    policy_update,
)

MAX_REASON_CHARS = 500
"""A reason is a sentence for a person to read, not a document."""

EXEMPTION_DECIDERS = frozenset({Role.hr, Role.admin})
"""Who may grant, deny or revoke an exemption (the role matrix)."""


class Invalid(ValueError):
    """Input refused before anything was published; ``field`` names the form or JSON field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class Problems(Invalid):
    """Several fields refused at once (the JSON API answers 422 with all of them); ``field`` and
    ``message`` are the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        super().__init__(*problems[0])
        self.args = ("; ".join(f"{f}: {m}" for f, m in problems),)
        self.problems = problems


class Refused(PermissionError):
    """The caller may not do this (403); the refusal is already in the audit trail."""


def iso(at_us: int | None) -> str | None:
    """Microseconds since the epoch as an ISO 8601 UTC string."""
    return None if at_us is None else datetime.fromtimestamp(at_us / 1e6, UTC).isoformat()


def audit_entry(who: Principal, action: str, *, target: str | None, reason: str = "", before: Any = None,
                after: Any = None, outcome: str = "allowed", control_id: bytes | None = None, method: str = "",
                path: str = "") -> dict[str, Any]:
    """One audit entry, in the same shape as the JSON API's (``services.audit_entry``), plus the
    control's id when one was published."""
    from handtrace.control.api.services import audit_entry as entry

    return {**entry(who, action=action, target=target, reason=reason, outcome=outcome, before=before, after=after,
                    method=method, path=path),
            "control_id": control_id.hex() if control_id else None}


def _refuse(services: Services, who: Principal, action: str, target: str | None, why: str, at: Where) -> Refused:
    services.audit.record(audit_entry(who, action, target=target, outcome="refused", reason=why, **at))
    return Refused(why)


class Where(TypedDict):
    """The request's method and path, kept with its audit entry (empty for calls that come from
    no request)."""

    method: str
    path: str


def where(method: str = "", path: str = "") -> Where:
    return {"method": method, "path": path}


def _reason(reason: str, *, required: bool) -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise Invalid("reason", "is required (kept in the audit trail)")
    if len(reason) > MAX_REASON_CHARS:
        raise Invalid("reason", f"at most {MAX_REASON_CHARS} characters (got {len(reason)})")
    return reason


def _self(services: Services, who: Principal, action: str, at: Where) -> str:
    if not who.employee_id:
        raise _refuse(services, who, action, None, "your account is not linked to an employee id", at)
    return who.employee_id


def _mode(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state.get(k) for k in ("mode", "paused_until", "exempt_since")}


def _issue(services: Services, who: Principal, action: str, record: dict[str, Any], *, target: str, reason: str,
           before: Any, after: Any, at: Where) -> dict[str, Any]:
    """Publish ``record`` (ControlError when it was not issued: nothing is audited as done), then
    write its one audit entry."""
    services.controls.publish(record)
    services.audit.record(audit_entry(who, action, target=target, reason=reason, before=before, after=after,
                                      control_id=record["control_id"], **at))
    return record


def pause_self(services: Services, who: Principal, minutes: float, reason: str = "", *,
               at: Where | None = None) -> dict[str, Any]:
    """Pause the caller's own capture for ``minutes`` (1 to 30); returns the record."""
    at = at or where()
    employee_id = _self(services, who, "pause_start", at)
    reason = _reason(reason, required=False)
    if not 1 <= minutes <= MAX_PAUSE_MINUTES:
        raise Invalid("minutes", f"must be between 1 and {MAX_PAUSE_MINUTES}")
    try:
        record = pause_record(employee_id, minutes, actor=who.subject, role="employee", reason=reason)
    except ControlError as e:
        raise Invalid("minutes", f"must be between 1 and {MAX_PAUSE_MINUTES}") from e
    before = _mode(services.state.employee(employee_id))
    return _issue(services, who, "pause_start", record, target=employee_id, reason=reason, before=before,
                  after={"mode": "paused", "paused_until": iso(record["pause_ends_at_us"])}, at=at)


def resume_self(services: Services, who: Principal, reason: str = "", *, at: Where | None = None) -> dict[str, Any]:
    """End the caller's own pause now."""
    at = at or where()
    employee_id = _self(services, who, "pause_end", at)
    reason = _reason(reason, required=False)
    state = services.state.employee(employee_id)
    now = now_us()
    record = control_record("pause_end", employee_id=employee_id, actor=who.subject, role="employee",
                            reason=reason, at_us=now, pause_ends_at_us=now)
    return _issue(services, who, "pause_end", record, target=employee_id, reason=reason, before=_mode(state),
                  after={"mode": "exempt" if state.get("mode") == "exempt" else "capturing", "paused_until": None},
                  at=at)


def request_exemption(services: Services, who: Principal, reason: str, *, at: Where | None = None) -> dict[str, Any]:
    """The caller asks HR for an exemption for themself (a reason is required)."""
    at = at or where()
    employee_id = _self(services, who, "exemption_request", at)
    reason = _reason(reason, required=True)
    record = control_record("exemption_request", employee_id=employee_id, actor=who.subject, role="employee",
                            reason=reason)
    before = services.state.employee(employee_id).get("pending_request")
    return _issue(services, who, "exemption_request", record, target=employee_id, reason=reason,
                  before={"pending_request": before}, after={"pending_request": {"reason": reason}}, at=at)


def _decider(services: Services, who: Principal, action: str, employee_id: str, reason: str, at: Where) -> str:
    # The routes check the role with auth.require; this second check keeps a caller that forgot it safe.
    if not who.roles & EXEMPTION_DECIDERS:
        raise _refuse(services, who, action, employee_id, "only hr or admin decide exemptions", at)
    problems = []
    if not valid_employee_id(employee_id):
        problems.append(("employee_id", "is not an employee id (1..128 printable characters, no spaces)"))
    try:
        reason = _reason(reason, required=True)
    except Invalid as e:
        problems.append((e.field, e.message))
    if problems:
        raise Problems(problems)
    return reason


def grant_exemption(services: Services, who: Principal, employee_id: str, reason: str, *,
                    at: Where | None = None) -> dict[str, Any]:
    """HR (or admin) grants ``employee_id`` an exemption from now on (a reason is required)."""
    at = at or where()
    reason = _decider(services, who, "exemption_grant", employee_id, reason, at)
    now = now_us()
    record = control_record("exemption_grant", employee_id=employee_id, actor=who.subject, role="hr",
                            reason=reason, at_us=now, exemption_effective_at_us=now)
    before = _mode(services.state.employee(employee_id))
    return _issue(services, who, "exemption_grant", record, target=employee_id, reason=reason, before=before,
                  after={"mode": "exempt", "exempt_since": iso(now), "paused_until": None}, at=at)


def revoke_exemption(services: Services, who: Principal, employee_id: str, reason: str, *,
                     at: Where | None = None) -> dict[str, Any]:
    """HR (or admin) ends ``employee_id``'s exemption: capture is stored again from now on."""
    at = at or where()
    reason = _decider(services, who, "exemption_revoke", employee_id, reason, at)
    record = control_record("exemption_revoke", employee_id=employee_id, actor=who.subject, role="hr",
                            reason=reason)
    before = _mode(services.state.employee(employee_id))
    return _issue(services, who, "exemption_revoke", record, target=employee_id, reason=reason, before=before,
                  after={"mode": "capturing", "exempt_since": None}, at=at)


def deny_exemption(services: Services, who: Principal, employee_id: str, reason: str, *,
                   at: Where | None = None) -> dict[str, Any]:
    """HR (or admin) denies ``employee_id``'s pending request: nothing is published, the audit
    entry (action ``exemption_deny``) is the decision. Returns that entry. Invalid when there is
    no pending request."""
    at = at or where()
    reason = _decider(services, who, "exemption_deny", employee_id, reason, at)
    pending = services.state.employee(employee_id).get("pending_request")
    if pending is None:
        raise Invalid("employee_id", "has no pending exemption request to deny")
    entry = audit_entry(who, "exemption_deny", target=employee_id, reason=reason,
                        before={"pending_request": pending}, after={"pending_request": None}, **at)
    services.audit.record(entry)
    return entry


# ---------------------------------------------------------------- the policy (ops, security)

EMPTY_POLICY: dict[str, Any] = {"version": 0, "allowed_apps": [], "allowed_domains": [], "sampling": {},
                                "text_capture": {}}
"""The policy before any was published (allows nothing: fails closed)."""


def plan_policy(services: Services, change: dict[str, Any], reason: str, *, rename: dict[str, str] | None = None,
                check_reason: bool = True) -> tuple[dict[str, Any], dict[str, Any], list[tuple[str, str]]]:
    """The policy in force, the document that ``change`` (sections replaced whole) would publish as
    version + 1, and every problem of it at once -- the CLI's validation (core/controls.py), fields
    named as the caller's input names them (``rename``: policy section -> input name)."""
    rename = rename or {}
    current = services.state.policy() or EMPTY_POLICY
    version = int(current["version"]) + 1
    doc = {**{k: current[k] for k in EMPTY_POLICY}, **change, "version": version}
    problems = []
    for field, message in policy_problems(doc):
        head, dot, rest = field.partition(".")
        problems.append((rename.get(head, head) + dot + rest, message))
    if version > MAX_POLICY_VERSION:
        problems.append(("version", "the policy in force leaves no room above it"))
    if check_reason:
        if not reason.strip():
            problems.append(("reason", "is required (kept in the audit trail)"))
        elif len(reason) > MAX_REASON_CHARS:
            problems.append(("reason", f"at most {MAX_REASON_CHARS} characters (got {len(reason)})"))
    return current, doc, problems


def change_policy(services: Services, who: Principal, action: str, reason: str, change: dict[str, Any], *,
                  rename: dict[str, str] | None = None, method: str = "", path: str = "") -> dict[str, Any]:
    """Publish the policy in force with ``change`` applied as version + 1 (the JSON routes
    ``PUT /api/v1/policy/...`` and the ops and security pages both call this). :class:`Problems`
    with every problem, before anything is published; ControlError when publishing fails. One
    audit entry (``action``; before and after hold the version and the changed sections).
    Returns the published record."""
    current, doc, problems = plan_policy(services, change, reason, rename=rename)
    if problems:
        raise Problems(problems)
    record = policy_update(doc, actor=who.subject, reason=reason)
    services.controls.publish(record)
    services.audit.record(audit_entry(
        who, action, target="policy", reason=reason,
        before={"version": current["version"], **{k: current[k] for k in change}},
        after={"version": doc["version"], **{k: record["policy"][k] for k in change}},
        control_id=record["control_id"], method=method, path=path))
    return record
