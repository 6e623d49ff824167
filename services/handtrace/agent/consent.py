"""The employee's consent step on a laptop (issue #15, ADR 0019).

The packaged agent (the .deb) never captures before the employee has read what is captured and
accepted it on that laptop: ``handtrace-agent consent`` shows :func:`consent_text` and, on an
explicit "yes", writes :func:`consent_path`. The systemd unit starts only when that file exists
(``ConditionPathExists``), and the agent itself refuses to start without it when
``HANDTRACE_AGENT__REQUIRE_CONSENT=true`` (the package sets it), so starting it by hand does not
skip the step either. Withdrawing deletes the file; the unit then no longer starts.

The file records what was accepted (the text's SHA-256), by whom, on which device and when; it
holds nothing captured and stays on the laptop.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handtrace.core.settings import Settings

CONSENT_FORMAT = 1


class ConsentError(Exception):
    """No valid consent on this laptop (the agent refuses to start)."""


def consent_path(settings: Settings) -> Path:
    """Where the employee's acceptance is recorded (under the agent's state dir)."""
    return settings.state_dir / "agent" / "consent.json"


def _policy_lines(settings: Settings) -> list[str]:
    from handtrace.agent.runtime import AgentError
    from handtrace.agent.service import initial_policy

    try:
        pol = initial_policy(settings)
    except AgentError as e:  # shown to the employee; the agent's start refuses it anyway
        return [f"  (the policy file cannot be read: {e})"]
    if pol is None:
        return ["  Which apps and sites are captured is set by your organisation's policy, which the",
                "  agent receives from the control plane; until it arrives nothing is captured."]
    apps = ", ".join(sorted(pol.allowed_apps)) or "none"
    sites = ", ".join(pol.allowed_domains) or "none"
    typed = ", ".join(f"{app}: {mode}" for app, mode in sorted(pol.text_capture.items())) or "none"
    return [f"  Policy v{pol.version} (your organisation can change it; `handtrace-agent status` shows the "
            "one in force):",
            f"    apps captured:  {apps}",
            f"    web sites:      {sites}",
            f"    typed text:     {typed}  (full: the characters; masked: only the rhythm; none: nothing)"]


def consent_text(settings: Settings) -> str:
    """What the agent captures on this laptop, in words, from the settings in force."""
    a = settings.agent
    shots = (f"yes: one picture of an allowed window on a click or window change, at most one per "
             f"{a.screenshot_min_interval_s:g} s, downscaled to {a.screenshot_max_width} px wide"
             if a.screenshots else "no")
    lines = [
        "handtrace captures how you use this computer, as training data for computer-use agents.",
        "",
        f"  employee id:    {a.employee_id or '(not set: ask IT; the agent does not start without one)'}",
        "  captured:       mouse moves, clicks, scrolls and key presses, and the title and address",
        "                  of the window they went to -- only in the apps and web sites allowed below;",
        "                  everything else is dropped on this laptop before it is stored.",
        f"  screenshots:    {shots}",
        "  health:         battery state, CPU and memory of the agent, upload volume (heartbeats)",
        f"  sent to:        {settings.kafka.bootstrap_servers or '(not configured: ask IT)'} "
        "(batched; kept on this laptop until sent)",
        *_policy_lines(settings),
        "",
        "  Your controls, at any time:",
        "    handtrace-agent pause 30m     stop capturing for a while (takes effect at once)",
        "    handtrace-agent status        what is captured right now",
        "    handtrace-agent exemption request --reason ...   ask HR to stop capture for you",
        "    handtrace-agent consent --withdraw               withdraw: capture stops on this laptop",
        "  Removing the package deletes everything captured that was not sent yet.",
    ]
    return "\n".join(lines) + "\n"


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Consent:
    """One recorded acceptance."""

    employee_id: str
    device_id: str
    accepted_at_s: float
    text_sha256: str


def record_consent(settings: Settings, text: str, *, device_id: str, now_s: float | None = None) -> Consent:
    """Write the acceptance of ``text`` (atomically, 0600); the caller has asked the employee."""
    if not settings.agent.employee_id:
        raise ConsentError("no employee id: set HANDTRACE_AGENT__EMPLOYEE_ID (ask IT)")
    c = Consent(settings.agent.employee_id, device_id, time.time() if now_s is None else now_s, text_sha256(text))
    path = consent_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"format": CONSENT_FORMAT, "employee_id": c.employee_id, "device_id": c.device_id,
                   "accepted_at_s": c.accepted_at_s, "text_sha256": c.text_sha256}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return c


def read_consent(settings: Settings) -> Consent:
    """The recorded acceptance for the employee in force; raises :class:`ConsentError` when there
    is none, it is unreadable, or it was given for another employee (fails closed)."""
    path = consent_path(settings)
    try:
        rec: Any = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConsentError(f"no consent recorded on this laptop ({path}): run `handtrace-agent consent`") from None
    except (OSError, ValueError) as e:
        raise ConsentError(f"{path}: unreadable consent record ({e}): run `handtrace-agent consent` again") from None
    if not isinstance(rec, dict) or rec.get("format") != CONSENT_FORMAT:
        raise ConsentError(f"{path}: not a consent record of format {CONSENT_FORMAT}: run `handtrace-agent consent`")
    try:
        c = Consent(str(rec["employee_id"]), str(rec["device_id"]), float(rec["accepted_at_s"]),
                    str(rec["text_sha256"]))
    except (KeyError, TypeError, ValueError) as e:
        raise ConsentError(f"{path}: incomplete consent record ({e}): run `handtrace-agent consent`") from None
    if c.employee_id != settings.agent.employee_id:
        raise ConsentError(f"the consent on this laptop was given by {c.employee_id!r}, not "
                           f"{settings.agent.employee_id!r}: run `handtrace-agent consent`")
    return c


def withdraw_consent(settings: Settings) -> bool:
    """Delete the acceptance; True if there was one."""
    try:
        consent_path(settings).unlink()
    except FileNotFoundError:
        return False
    return True
