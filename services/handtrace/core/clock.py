"""Time in one unit everywhere: integer microseconds since the Unix epoch, UTC."""

from __future__ import annotations

import time


def now_us() -> int:
    """Wall-clock now in microseconds (the unit of every *_us field in the schemas)."""
    return time.time_ns() // 1_000


def us_to_s(us: int) -> float:
    """Microseconds to seconds."""
    return us / 1_000_000


HEADER_SENT_AT = "ht-sent-at"
"""Kafka header on agent and control-plane messages: the sender's clock (decimal µs) at the
moment it handed the message to its producer."""


def clock_offset_us(sent_at_us: int | None, appended_at_us: int | None, max_offset_us: int) -> int | None:
    """How far the sender's clock is behind the broker's: ``appended - sent`` (the broker's
    LogAppendTime minus the sender's send-time stamp), so ``t + offset`` places a time ``t``
    stamped by that sender on the broker's clock. Includes the produce latency, which only
    shifts times later by that much. 0 when either stamp is unknown; None when the offset is
    larger than ``max_offset_us`` either way (the sender's clock cannot be trusted to place
    anything in time)."""
    if sent_at_us is None or appended_at_us is None:
        return 0
    offset = appended_at_us - sent_at_us
    return offset if abs(offset) <= max_offset_us else None
