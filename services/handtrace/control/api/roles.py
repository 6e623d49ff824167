"""Roles and the role matrix: one table that the routes enforce, docs/api.md prints and the
tests walk (docs/design/control-plane.md, "Roles")."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    """A caller's role, from the token's roles claim (unknown names are ignored)."""

    employee = "employee"
    hr = "hr"
    ops = "ops"
    security = "security"
    auditor = "auditor"
    admin = "admin"


class Action(StrEnum):
    """What a route does, as the matrix names it."""

    own = "own"
    other_state = "other_state"
    exemptions = "exemptions"
    read_policy = "read_policy"
    sampling = "sampling"
    allowlist = "allowlist"
    audit = "audit"
    rotate_key = "rotate_key"
    own_data = "own_data"


@dataclass(frozen=True)
class Rule:
    """Who may do ``action``: ``self_only`` roles act on their own employee id only."""

    action: Action
    label: str
    roles: frozenset[Role]
    self_only: bool = False


ALL = frozenset(Role)

MATRIX: dict[Action, Rule] = {r.action: r for r in (
    Rule(Action.own, "see own state, pause/resume self, request exemption for self", ALL, self_only=True),
    Rule(Action.other_state, "see another employee's state", frozenset({Role.hr, Role.admin})),
    Rule(Action.exemptions, "list exemption requests, grant/deny/revoke exemptions",
         frozenset({Role.hr, Role.admin})),
    Rule(Action.read_policy, "read policy", ALL),
    Rule(Action.sampling, "set sampling rates (policy.sampling)", frozenset({Role.ops, Role.admin})),
    Rule(Action.allowlist, "set allowlists and masking (allowed_apps/domains, text_capture)",
         frozenset({Role.security, Role.admin})),
    Rule(Action.audit, "read the audit trail", frozenset({Role.auditor, Role.admin})),
    Rule(Action.rotate_key, "re-sign the policy and device enrollments with the API's key (key rotation)",
         frozenset({Role.admin})),
    Rule(Action.own_data, "see what is stored about oneself (events, frames, demonstrations), withdraw one's "
         "demonstrations", ALL, self_only=True),
)}
"""The role matrix: every route names one of these actions and is guarded by its rule."""


def allowed(action: Action, roles: frozenset[Role]) -> bool:
    """Whether any of ``roles`` may do ``action`` (on themself, for a self-only rule)."""
    return bool(MATRIX[action].roles & roles)


def actor_role(action: Action) -> str:
    """The control record's ``actor_role`` (schemas/control_event: employee | hr | ops | system)
    for a change made under ``action``; the true role is kept in the audit entry."""
    if action in (Action.own, Action.own_data):
        return "employee"
    if action is Action.exemptions:
        return "hr"
    return "ops"


def matrix_markdown() -> str:
    """The role matrix as a Markdown table (docs/api.md)."""
    roles = list(Role)
    lines = ["| action | " + " | ".join(r.value for r in roles) + " |",
             "|---|" + "---|" * len(roles)]
    for rule in MATRIX.values():
        cells = [("self" if rule.self_only else "yes") if r in rule.roles else "-" for r in roles]
        lines.append(f"| {rule.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
