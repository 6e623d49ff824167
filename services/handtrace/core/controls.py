"""ControlEvent records (schemas/control_event): pause, exemption and policy controls with who,
when and why -- built the same way by the control plane (ops, HR) and by the agent (an employee's
own pause and exemption request)."""

from __future__ import annotations

import json
import re
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


def erasure_record(employee_id: str, erasure_id: str, *, actor: str, reason: str,
                   at_us: int | None = None) -> dict[str, Any]:
    """The suppression of an erasure (``handtrace erase``): an exemption grant carrying
    ``erasure_id``, which the stream applies to every capture time and no revoke ends
    (docs/adr/0015-erasure.md)."""
    if not employee_id or not erasure_id:
        raise ControlError("an erasure needs an employee id and an erasure id")
    at = at_us if at_us is not None else now_us()
    return control_record("exemption_grant", employee_id=employee_id, actor=actor, role="hr", reason=reason,
                          at_us=at, exemption_effective_at_us=at, erasure_id=erasure_id)


POLICY_FIELDS = ("version", "allowed_apps", "allowed_domains", "sampling", "text_capture")
TEXT_CAPTURE_MODES = ("none", "masked", "full")
SAMPLING_LEVELS = ("app", "kind", "cohort")
"""Sampling selector prefixes (stream/steps/sample.py): ``*`` or ``<level>:<value>``."""


APP_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+@-]{0,127}")
"""A well-formed app id (X11 WM_CLASS instance, a bundle id, an exe name): 1..128 letters, digits
and ``. _ + @ -``, starting with a letter or digit. Stricter than what a window may report, which
fails closed: an app id that cannot be written here is never allowlisted."""
APP_ID_MESSAGE = "is not a well-formed app id (1..128 letters, digits and . _ + @ -, e.g. code or org.mozilla.firefox)"


def policy_problems(doc: object) -> list[tuple[str, str]]:
    """Every problem of a policy document {version, allowed_apps, allowed_domains, sampling,
    text_capture} at once, as (field, message) pairs -- the one validation the CLI and the API
    share (empty: valid)."""
    if not isinstance(doc, dict):
        return [("policy", "must be a JSON object")]
    problems: list[tuple[str, str]] = []
    version = doc.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_POLICY_VERSION:
        problems.append(("version", f"must be an integer from 1 to {MAX_POLICY_VERSION} (2**53)"))
    for name in ("allowed_apps", "allowed_domains"):
        entries = doc.get(name, [])
        if not isinstance(entries, list) or not all(isinstance(x, str) and x for x in entries):
            problems.append((name, "must be a list of non-empty strings"))
        elif name == "allowed_domains":
            problems += [(f"allowed_domains.{i}", p) for i, e in enumerate(entries)
                         for p in domain_entry_problems([e])]
        else:
            problems += [(f"allowed_apps.{i}", f"`{a}` {APP_ID_MESSAGE}") for i, a in enumerate(entries)
                         if not APP_ID_RE.fullmatch(a)]
    sampling = doc.get("sampling") or {}
    if not isinstance(sampling, dict):
        problems.append(("sampling", "must be an object of selector -> rate"))
    else:
        for sel, rate in sampling.items():
            prefix, sep, rest = str(sel).partition(":")
            if sel != "*" and (not sep or prefix not in SAMPLING_LEVELS or not rest):
                problems.append((f"sampling.{sel}", "unknown selector: use *, app:<app id>, kind:<event "
                                 "kind> or cohort:<name>"))
            elif prefix == "app" and not APP_ID_RE.fullmatch(rest):
                problems.append((f"sampling.{sel}", f"unknown selector: `{rest}` {APP_ID_MESSAGE}"))
            if not isinstance(rate, int | float) or isinstance(rate, bool) or not 0 <= rate <= 1:
                problems.append((f"sampling.{sel}", "must be a number in [0, 1]"))
    text_capture = doc.get("text_capture") or {}
    if not isinstance(text_capture, dict):
        problems.append(("text_capture", "must be an object of app id -> none, masked or full"))
    else:
        for app, mode in text_capture.items():
            if app != "*" and not APP_ID_RE.fullmatch(str(app)):
                problems.append((f"text_capture.{app}", f"`{app}` {APP_ID_MESSAGE} or *"))
            if mode not in TEXT_CAPTURE_MODES:
                problems.append((f"text_capture.{app}", "must be none, masked or full"))
    unknown = set(doc) - set(POLICY_FIELDS)
    if unknown:
        problems.append(("policy", f"unknown keys: {sorted(unknown)}"))
    return problems


def policy_update(doc: dict[str, Any], *, actor: str, reason: str = "") -> dict[str, Any]:
    """A policy_update from a validated policy document (ControlError with every problem
    otherwise); domains normalised and deduplicated."""
    problems = policy_problems(doc)
    if problems:
        raise ControlError("; ".join(f"{f} {m}" for f, m in problems))
    policy = {"version": doc["version"], "allowed_apps": doc.get("allowed_apps", []),
              "allowed_domains": list(normalised_domains(doc.get("allowed_domains", []))),
              "sampling": {k: float(v) for k, v in (doc.get("sampling") or {}).items()},
              "text_capture": doc.get("text_capture") or {}}
    return control_record("policy_update", employee_id=None, actor=actor, role="ops", reason=reason, policy=policy)


def policy_record(path: Path, *, actor: str, reason: str = "") -> dict[str, Any]:
    """A policy_update from a JSON file: {version, allowed_apps, allowed_domains, sampling,
    text_capture}. Every problem is reported at once."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ControlError(f"{path}: {e}") from e
    try:
        return policy_update(doc, actor=actor, reason=reason)
    except ControlError as e:
        raise ControlError(f"{path}: {e}") from None
