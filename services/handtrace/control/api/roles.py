# STUB for the portal branch: the api branch's version replaces this file
"""Roles of the control plane (docs/design/control-plane.md, "Roles")."""

from __future__ import annotations

from enum import StrEnum


class Role(StrEnum):
    """A role a principal holds (from the token's roles claim)."""

    employee = "employee"
    hr = "hr"
    ops = "ops"
    security = "security"
    auditor = "auditor"
    admin = "admin"
