"""Policy and control state the enforcement steps read: the global policy (allowlists, sampling,
masking) and, per employee, pause windows and exemptions. Built from ControlEvent records
(schemas/control_event) by the Faust app; plain immutable values here so steps stay pure."""

from __future__ import annotations

from dataclasses import dataclass

from handtrace.core.policy import MAX_PAUSE_US, Policy, TextCapture

__all__ = ["MAX_PAUSE_US", "EmployeeControls", "Exemption", "PauseWindow", "Policy", "TextCapture"]


@dataclass(frozen=True)
class PauseWindow:
    """[starts_at_us, ends_at_us) on the issuer's clock, at most 30 minutes long. ``offset_us``:
    how far that clock was behind the broker's when the record was sent
    (handtrace.core.clock.clock_offset_us), so ``t + offset_us`` is on the broker's clock."""

    starts_at_us: int
    ends_at_us: int
    offset_us: int = 0


@dataclass(frozen=True)
class Exemption:
    """Nothing of the employee is stored from ``from_us`` until ``until_us`` (None: open)."""

    from_us: int
    until_us: int | None = None
    offset_us: int = 0
    """The granting record's sender clock offset (see PauseWindow.offset_us)."""


@dataclass(frozen=True)
class EmployeeControls:
    """Pauses and exemptions of one employee, and the control ids already applied (with the
    broker time they were appended at) so that a replayed record is applied once."""

    pauses: tuple[PauseWindow, ...] = ()
    exemptions: tuple[Exemption, ...] = ()
    seen: tuple[tuple[str, int], ...] = ()
    erasures: tuple[str, ...] = ()
    """Erasure ids (``handtrace erase``) applied to this employee: nothing of them is stored,
    whatever the capture time, and no control ends it (docs/adr/0015-erasure.md)."""
