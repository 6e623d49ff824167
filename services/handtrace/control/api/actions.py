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
from typing import Any

from handtrace.control.api.auth import Principal
from handtrace.control.api.roles import Role
from handtrace.control.api.services import Services
from handtrace.core.clock import now_us
from handtrace.core.controls import MAX_PAUSE_MINUTES, ControlError, control_record, pause_record

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


class Refused(PermissionError):
    """The caller may not do this (403); the refusal is already in the audit trail."""


def iso(at_us: int | None) -> str | None:
    """Microseconds since the epoch as an ISO 8601 UTC string."""
    return None if at_us is None else datetime.fromtimestamp(at_us / 1e6, UTC).isoformat()


def audit_entry(who: Principal, action: str, *, target: str | None, reason: str = "", before: Any = None,
                after: Any = None, outcome: str = "allowed", control_id: bytes | None = None) -> dict[str, Any]:
    """One audit entry, in the same shape as the JSON API's (``services.audit_entry``), plus the
    control's id when one was published."""
    from handtrace.control.api.services import audit_entry as entry

    return {**entry(who, action=action, target=target, reason=reason, outcome=outcome, before=before, after=after),
            "control_id": control_id.hex() if control_id else None}


def _refuse(services: Services, who: Principal, action: str, target: str | None, why: str) -> Refused:
    services.audit.record(audit_entry(who, action, target=target, outcome="refused", reason=why))
    return Refused(why)


def _reason(reason: str, *, required: bool) -> str:
    reason = (reason or "").strip()
    if required and not reason:
        raise Invalid("reason", "a reason is required")
    if len(reason) > MAX_REASON_CHARS:
        raise Invalid("reason", f"at most {MAX_REASON_CHARS} characters (got {len(reason)})")
    return reason


def _self(services: Services, who: Principal, action: str) -> str:
    if not who.employee_id:
        raise _refuse(services, who, action, None, "your account is not linked to an employee id")
    return who.employee_id


def _mode(state: dict[str, Any]) -> dict[str, Any]:
    return {k: state.get(k) for k in ("mode", "paused_until", "exempt_since")}


def pause_self(services: Services, who: Principal, minutes: float, reason: str = "") -> dict[str, Any]:
    """Pause the caller's own capture for ``minutes`` (more than 0, at most 30); returns the record."""
    employee_id = _self(services, who, "pause_start")
    reason = _reason(reason, required=False)
    try:
        record = pause_record(employee_id, minutes, actor=who.subject, role="employee", reason=reason)
    except ControlError as e:
        raise Invalid("minutes", f"between 1 and {MAX_PAUSE_MINUTES} minutes") from e
    before = _mode(services.state.employee(employee_id))
    services.controls.publish(record)
    services.audit.record(audit_entry(
        who, "pause_start", target=employee_id, reason=reason, before=before,
        after={"mode": "paused", "paused_until": iso(record["pause_ends_at_us"])}, control_id=record["control_id"]))
    return record


def resume_self(services: Services, who: Principal, reason: str = "") -> dict[str, Any]:
    """End the caller's own pause now."""
    employee_id = _self(services, who, "pause_end")
    reason = _reason(reason, required=False)
    state = services.state.employee(employee_id)
    now = now_us()
    record = control_record("pause_end", employee_id=employee_id, actor=who.subject, role="employee",
                            reason=reason, at_us=now, pause_ends_at_us=now)
    services.controls.publish(record)
    services.audit.record(audit_entry(who, "pause_end", target=employee_id, reason=reason, before=_mode(state),
                                      after={"mode": "exempt" if state.get("mode") == "exempt" else "capturing",
                                             "paused_until": None},
                                      control_id=record["control_id"]))
    return record


def request_exemption(services: Services, who: Principal, reason: str) -> dict[str, Any]:
    """The caller asks HR for an exemption for themself (a reason is required)."""
    employee_id = _self(services, who, "exemption_request")
    reason = _reason(reason, required=True)
    record = control_record("exemption_request", employee_id=employee_id, actor=who.subject, role="employee",
                            reason=reason)
    before = services.state.employee(employee_id).get("pending_request")
    services.controls.publish(record)
    services.audit.record(audit_entry(who, "exemption_request", target=employee_id, reason=reason,
                                      before={"pending_request": before},
                                      after={"pending_request": {"reason": reason}}, control_id=record["control_id"]))
    return record


def _decider(services: Services, who: Principal, action: str, employee_id: str) -> None:
    # The routes check the role with auth.require; this second check keeps a caller that forgot it safe.
    if not who.roles & EXEMPTION_DECIDERS:
        raise _refuse(services, who, action, employee_id, "only hr or admin decide exemptions")


def grant_exemption(services: Services, who: Principal, employee_id: str, reason: str) -> dict[str, Any]:
    """HR (or admin) grants ``employee_id`` an exemption from now on (a reason is required)."""
    _decider(services, who, "exemption_grant", employee_id)
    reason = _reason(reason, required=True)
    now = now_us()
    record = control_record("exemption_grant", employee_id=employee_id, actor=who.subject, role="hr",
                            reason=reason, at_us=now, exemption_effective_at_us=now)
    before = _mode(services.state.employee(employee_id))
    services.controls.publish(record)
    services.audit.record(audit_entry(who, "exemption_grant", target=employee_id, reason=reason, before=before,
                                      after={"mode": "exempt", "exempt_since": iso(now), "paused_until": None},
                                      control_id=record["control_id"]))
    return record


def deny_exemption(services: Services, who: Principal, employee_id: str, reason: str) -> dict[str, Any]:
    """HR (or admin) denies ``employee_id``'s pending request: nothing is published, the audit
    entry (action ``exemption_deny``) is the decision. Returns that entry."""
    _decider(services, who, "exemption_deny", employee_id)
    reason = _reason(reason, required=True)
    pending = services.state.employee(employee_id).get("pending_request")
    entry = audit_entry(who, "exemption_deny", target=employee_id, reason=reason,
                        before={"pending_request": pending}, after={"pending_request": None})
    services.audit.record(entry)
    return entry
