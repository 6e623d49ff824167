"""The portal under test: the real app (``create_app``: the API and the pages) over the API's
in-memory Services, with session cookies holding tokens minted by the test's identity provider
(tests/unit/api_support.py)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from handtrace.control.api.app import create_app
from handtrace.control.api.services import MemoryBackend, Services
from handtrace.control.api.services import memory_services as api_memory_services
from handtrace.core.controls import policy_update
from handtrace.core.settings import Settings
from tests.unit.api_support import api_settings, mint

TEST_POLICY_DOC = {"version": 7, "allowed_apps": ["code", "firefox"], "allowed_domains": ["example.com"],
                   "sampling": {"kind:pointer_move": 0.25}, "text_capture": {"*": "masked"}}
_JWKS_DIR = Path(tempfile.mkdtemp(prefix="portal-jwks-"))


def backend(services: Services) -> MemoryBackend:
    """The in-memory backend behind ``services`` (its published controls and audit entries)."""
    b = services.controls.backend  # type: ignore[attr-defined]
    assert isinstance(b, MemoryBackend)
    return b


def records(services: Services) -> list[dict[str, Any]]:
    """The employee control records published so far (not the seeded policy), oldest first."""
    return [r for r in backend(services).controls if r["kind"] != "policy_update"]


def memory_services(policy: dict[str, Any] | None = TEST_POLICY_DOC) -> Services:
    """Fresh in-memory Services with ``policy`` in force (None: no policy published yet)."""
    services = api_memory_services()
    if policy is not None:
        backend(services).controls.append(policy_update(dict(policy), actor="test", reason="test policy"))
    return services


def portal_settings() -> Settings:
    """The settings ``portal_app`` serves with (the test's identity provider, a pseudonym key,
    the frame store under the same temporary state dir)."""
    return api_settings(_JWKS_DIR)


def portal_app(services: Services) -> FastAPI:
    """The control plane (API and portal pages) acting through ``services``."""
    return create_app(portal_settings(), services)


def session_cookie(subject: str, roles: list[str], employee_id: str | None = None,
                   name: str | None = None) -> dict[str, str]:
    """The ``ht_token`` session cookie of a principal: a token from the test's identity provider,
    valid for a day (test modules mint them at import; the whole suite takes longer than the
    10 minutes of a default test token)."""
    extra: dict[str, Any] = {"name": name or subject, "exp": int(time.time()) + 24 * 3600}
    if employee_id is not None:
        extra["employee_id"] = employee_id
    return {"ht_token": mint(subject, roles, **extra)}
