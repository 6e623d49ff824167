"""ControlEvent records (schemas/control_event): pause, exemption and policy controls with who,
when and why -- built the same way by the control plane (ops, HR) and by the agent (an employee's
own pause and exemption request)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from handtrace.core import ids
from handtrace.core.clock import now_us
from handtrace.core.domains import domain_entry_problems, normalised_domains

POLICY_KEY = b"global"
MAX_PAUSE_MINUTES = 30
MAX_POLICY_VERSION = 2**53
"""Policy versions stay exact in every JSON reader (and far from 2**63-1): a version cannot be
published that leaves no room above it."""


class ControlError(ValueError):
    """A control request that is refused; the message says why."""


def control_record(kind: str, *, employee_id: str | None, actor: str, role: str, reason: str = "",
                   at_us: int | None = None, **fields: Any) -> dict[str, Any]:
    """A ControlEvent record (schemas/control_event)."""
    return {"control_id": ids.uuid7_bytes(), "kind": kind, "employee_id": employee_id,
            "occurred_at_us": at_us if at_us is not None else now_us(), "actor": actor,
            "actor_role": role, "reason": reason, **fields}


def pause_record(employee_id: str, minutes: float, *, actor: str, role: str = "employee",
                 reason: str = "", at_us: int | None = None) -> dict[str, Any]:
    """A pause of ``minutes`` (refused above 30: capture auto-resumes within 30 minutes)."""
    if not 0 < minutes <= MAX_PAUSE_MINUTES:
        raise ControlError(f"a pause lasts more than 0 and at most {MAX_PAUSE_MINUTES} minutes (asked {minutes:g})")
    start = at_us if at_us is not None else now_us()
    return control_record("pause_start", employee_id=employee_id, actor=actor, role=role, reason=reason,
                          at_us=start, pause_starts_at_us=start, pause_ends_at_us=start + int(minutes * 60e6))


def policy_record(path: Path, *, actor: str, reason: str = "") -> dict[str, Any]:
    """A policy_update from a JSON file: {version, allowed_apps, allowed_domains, sampling,
    text_capture}. Every problem is reported at once."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ControlError(f"{path}: {e}") from e
    problems = []
    if not isinstance(doc.get("version"), int) or not 1 <= doc["version"] <= MAX_POLICY_VERSION:
        problems.append(f"version must be an integer from 1 to {MAX_POLICY_VERSION} (2**53)")
    for name in ("allowed_apps", "allowed_domains"):
        if not all(isinstance(x, str) and x for x in doc.get(name, [])):
            problems.append(f"{name} must be a list of non-empty strings")
        elif name == "allowed_domains":
            problems += [f"allowed_domains: {p}" for p in domain_entry_problems(doc.get(name, []))]
    for sel, rate in (doc.get("sampling") or {}).items():
        if not isinstance(rate, int | float) or not 0 <= rate <= 1:
            problems.append(f"sampling[{sel!r}] must be a number in [0, 1]")
    for app, mode in (doc.get("text_capture") or {}).items():
        if mode not in ("none", "masked", "full"):
            problems.append(f"text_capture[{app!r}] must be none, masked or full")
    unknown = set(doc) - {"version", "allowed_apps", "allowed_domains", "sampling", "text_capture"}
    if unknown:
        problems.append(f"unknown keys: {sorted(unknown)}")
    if problems:
        raise ControlError(f"{path}: " + "; ".join(problems))
    policy = {"version": doc["version"], "allowed_apps": doc.get("allowed_apps", []),
              "allowed_domains": list(normalised_domains(doc.get("allowed_domains", []))),
              "sampling": {k: float(v) for k, v in (doc.get("sampling") or {}).items()},
              "text_capture": doc.get("text_capture") or {}}
    return control_record("policy_update", employee_id=None, actor=actor, role="ops", reason=reason, policy=policy)
