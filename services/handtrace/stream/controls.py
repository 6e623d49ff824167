"""Folding ControlEvent records into per-employee control state (pauses, exemptions).

Pure functions: the Faust app keeps the result in a changelog-backed table, so the state
rebuilds after a restart; the same fold runs in tests.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from handtrace.stream.policy import MAX_PAUSE_US, EmployeeControls, Exemption, PauseWindow

RETENTION_US = 8 * 24 * 3600 * 1_000_000  # longer than any event can be late (raw retention)


def _us(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    return int(value.timestamp() * 1_000_000)


def apply_control(state: EmployeeControls, rec: Mapping[str, Any]) -> tuple[EmployeeControls, bool]:
    """State after one ControlEvent; the flag says a pause was clamped to 30 minutes."""
    kind = rec["kind"]
    at = _us(rec["occurred_at_us"]) or 0
    clamped = False
    if kind == "pause_start":
        start = _us(rec.get("pause_starts_at_us")) or at
        end = _us(rec.get("pause_ends_at_us")) or start + MAX_PAUSE_US
        if end - start > MAX_PAUSE_US:
            end, clamped = start + MAX_PAUSE_US, True
        if end < start:
            end = start
        state = replace(state, pauses=(*state.pauses, PauseWindow(start, end)))
    elif kind == "pause_end":
        end = _us(rec.get("pause_ends_at_us")) or at
        pauses = list(state.pauses)
        for i in range(len(pauses) - 1, -1, -1):
            w = pauses[i]
            if w.starts_at_us <= end < w.ends_at_us:
                pauses[i] = PauseWindow(w.starts_at_us, end)  # early resume shortens the window
                break
        state = replace(state, pauses=tuple(pauses))
    elif kind == "exemption_grant":
        start = _us(rec.get("exemption_effective_at_us")) or at
        state = replace(state, exemptions=(*state.exemptions, Exemption(start)))
    elif kind == "exemption_revoke":
        until = _us(rec.get("exemption_effective_at_us")) or at
        ex = [Exemption(e.from_us, until) if e.until_us is None and e.from_us <= until else e
              for e in state.exemptions]
        state = replace(state, exemptions=tuple(ex))
    return prune(state, at), clamped


def prune(state: EmployeeControls, now_us: int) -> EmployeeControls:
    """Forget pause windows that ended longer ago than any event can arrive late."""
    horizon = now_us - RETENTION_US
    pauses = tuple(w for w in state.pauses if w.ends_at_us >= horizon)
    return state if len(pauses) == len(state.pauses) else replace(state, pauses=pauses)


def dumps(state: EmployeeControls) -> str:
    """JSON for the Faust table."""
    return json.dumps({
        "pauses": [[w.starts_at_us, w.ends_at_us] for w in state.pauses],
        "exemptions": [[e.from_us, e.until_us] for e in state.exemptions],
    })


def loads(text: str | None) -> EmployeeControls:
    """Inverse of dumps (empty state for None)."""
    if not text:
        return EmployeeControls()
    d = json.loads(text)
    return EmployeeControls(
        pauses=tuple(PauseWindow(a, b) for a, b in d.get("pauses", [])),
        exemptions=tuple(Exemption(a, b) for a, b in d.get("exemptions", [])),
    )
