"""The portal under test: the pages router on a bare FastAPI app, in-memory Services that fold the
published control records the way the controls topic is folded, and session cookies.

Re-pointing to the api branch at merge happens here only: ``session_cookie`` (mint a real token)
and ``portal_app`` (``create_app`` with these services).
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI

from handtrace.control.api import pages
from handtrace.control.api.actions import iso
from handtrace.control.api.services import Services, get_services
from handtrace.core.clock import now_us

TEST_POLICY_DOC = {"version": 7, "allowed_apps": ["code", "firefox"], "allowed_domains": ["example.com"],
                   "sampling": {"kind:pointer_move": 0.25}, "text_capture": {"*": "masked"}}


@dataclass
class MemoryState:
    """State folded from the published records (and the audit trail, for denies)."""

    records: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    policy_doc: dict[str, Any] | None = field(default_factory=lambda: dict(TEST_POLICY_DOC))

    def employee(self, employee_id: str) -> dict[str, Any]:
        """{employee_id, mode, paused_until, exempt_since, pending_request} as GET /me/state has it."""
        paused_until: int | None = None
        exempt_since: int | None = None
        for rec in self.records:
            if rec.get("employee_id") != employee_id:
                continue
            kind = rec["kind"]
            if kind == "pause_start":
                paused_until = rec["pause_ends_at_us"]
            elif kind == "pause_end":
                paused_until = None
            elif kind == "exemption_grant":
                exempt_since = rec.get("exemption_effective_at_us") or rec["occurred_at_us"]
            elif kind == "exemption_revoke":
                exempt_since = None
        if paused_until is not None and paused_until <= now_us():
            paused_until = None
        mode = "exempt" if exempt_since is not None else "paused" if paused_until is not None else "capturing"
        pending = next((r for r in self.pending_requests() if r["employee_id"] == employee_id), None)
        return {"employee_id": employee_id, "mode": mode, "paused_until": iso(paused_until),
                "exempt_since": iso(exempt_since), "pending_request": pending}

    def pending_requests(self) -> list[dict[str, Any]]:
        """Requests not answered by a later grant (a record) or deny (an audit entry)."""
        pending: dict[str, dict[str, Any]] = {}
        events = [(r["occurred_at_us"], "record", r) for r in self.records]
        events += [(e["_at_us"], "audit", e) for e in self.audit if e.get("action") == "exemption_deny"
                   and e.get("outcome") == "allowed"]
        for _at, source, ev in sorted(events, key=lambda t: t[0]):
            if source == "audit":
                pending.pop(ev["target"], None)
            elif ev["kind"] == "exemption_request":
                pending[ev["employee_id"]] = {"employee_id": ev["employee_id"], "reason": ev["reason"],
                                              "requested_at": iso(ev["occurred_at_us"]),
                                              "control_id": ev["control_id"].hex()}
            elif ev["kind"] == "exemption_grant":
                pending.pop(ev["employee_id"], None)
        return list(pending.values())

    def policy(self) -> dict[str, Any] | None:
        return self.policy_doc


@dataclass
class MemoryControls:
    state: MemoryState

    def publish(self, record: dict[str, Any]) -> None:
        self.state.records.append(record)


@dataclass
class MemoryAudit:
    state: MemoryState

    @property
    def all(self) -> list[dict[str, Any]]:
        return self.state.audit

    def record(self, entry: dict[str, Any]) -> None:
        self.state.audit.append({**entry, "_at_us": now_us()})

    def entries(self, limit: int) -> list[dict[str, Any]]:
        return list(reversed(self.state.audit))[:limit]


def memory_services() -> Services:
    """Fresh in-memory Services (controls, state and audit share one fold)."""
    state = MemoryState()
    return Services(controls=MemoryControls(state), state=state, audit=MemoryAudit(state))


def portal_app(services: Services) -> FastAPI:
    """The portal (pages router + HTML errors) acting through ``services``."""
    app = FastAPI()
    app.state.services = services
    app.dependency_overrides[get_services] = lambda: services
    pages.install(app)
    return app


def session_cookie(subject: str, roles: list[str], employee_id: str | None = None,
                   name: str | None = None) -> dict[str, str]:
    """The ``ht_token`` session cookie for a principal (the stub's unsigned token)."""
    doc = {"subject": subject, "employee_id": employee_id, "roles": roles, "name": name or subject}
    return {"ht_token": base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")}
