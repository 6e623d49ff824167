# STUB for the portal branch: the api branch's version replaces this file
"""Principal and the auth dependencies (docs/design/control-plane.md, "Auth"). In this stub the
``ht_token`` cookie is base64url(JSON {subject, employee_id, roles, name?}) -- no signature, tests only."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from fastapi import Depends, HTTPException, Request

from handtrace.control.api.roles import Role
from handtrace.control.api.services import Services, get_services


@dataclass(frozen=True)
class Principal:
    subject: str
    employee_id: str | None
    roles: frozenset[Role]
    name: str


def principal(request: Request) -> Principal:
    """The caller, from the ``ht_token`` cookie; 401 when absent or unreadable."""
    raw = request.cookies.get("ht_token")
    unauthorized = HTTPException(401, "not authenticated", headers={"WWW-Authenticate": "Bearer"})
    if not raw:
        raise unauthorized
    try:
        doc = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        return Principal(subject=doc["subject"], employee_id=doc.get("employee_id"),
                         roles=frozenset(Role(r) for r in doc.get("roles", [])),
                         name=doc.get("name") or doc["subject"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise unauthorized from None


def require(*roles: Role) -> Callable[..., Principal]:
    """Dependency factory: the caller when they hold one of ``roles``; else one audit entry and 403."""

    def dependency(request: Request, who: Principal = Depends(principal),  # noqa: B008
                   services: Services = Depends(get_services)) -> Principal:  # noqa: B008
        if who.roles & set(roles):
            return who
        services.audit.record({"subject": who.subject, "roles": sorted(who.roles), "action": request.url.path,
                               "target": request.path_params.get("employee_id"), "reason": "",
                               "before": None, "after": None, "outcome": "refused",
                               "at": datetime.now(UTC).isoformat()})
        raise HTTPException(403, "not allowed for your role")

    return dependency
