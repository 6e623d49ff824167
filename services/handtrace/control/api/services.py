# STUB for the portal branch: the api branch's version replaces this file
"""What the API acts through (docs/design/control-plane.md, "Services"): the stub keeps only the
Protocols and the dependency; tests bring their own in-memory implementation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from fastapi import Request


class Controls(Protocol):
    def publish(self, record: dict[str, Any]) -> None: ...


class State(Protocol):
    def employee(self, employee_id: str) -> dict[str, Any]: ...
    def pending_requests(self) -> list[dict[str, Any]]: ...
    def policy(self) -> dict[str, Any] | None: ...


class Audit(Protocol):
    def record(self, entry: dict[str, Any]) -> None: ...
    def entries(self, limit: int) -> list[dict[str, Any]]: ...


@dataclass
class Services:
    controls: Controls
    state: State
    audit: Audit


def get_services(request: Request) -> Services:
    """FastAPI dependency: the app's Services."""
    services: Services = request.app.state.services
    return services
