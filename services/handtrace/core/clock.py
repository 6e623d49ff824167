"""Time in one unit everywhere: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

import time


def now_us() -> int:
    """Wall-clock now in microseconds (the unit of every *_us field in the schemas)."""
    return time.time_ns() // 1_000


def us_to_s(us: int) -> float:
    """Microseconds to seconds."""
    return us / 1_000_000
