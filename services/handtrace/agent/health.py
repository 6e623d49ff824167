"""The agent's measure of its own cost, sent as Heartbeat records (schemas/heartbeat): battery,
CPU seconds, RSS, bytes sent, events captured / sent / dropped by reason, spool depth and radio
wakeups. These feed the fleet-impact metrics (handtrace.fleet)."""

from __future__ import annotations

import platform
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil

from handtrace import __version__
from handtrace.core import codec, ids


@dataclass
class AgentCounters:
    """Monotonic counters since the agent started (thread-safe increments via ``add``)."""

    events_captured: int = 0
    events_sent: int = 0
    payload_bytes_sent: int = 0
    wire_bytes_sent: int = 0
    radio_wakeups: int = 0
    batches_sealed: int = 0
    screenshots_taken: int = 0
    events_dropped: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def drop(self, reason: str, n: int = 1) -> None:
        """Count ``n`` events not kept, by reason (paused, exempt, not_allowlisted_app, ...)."""
        if n:
            with self._lock:
                self.events_dropped[reason] += n

    def add(self, **deltas: int) -> None:
        """Add to counters by name."""
        with self._lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)


def os_name() -> str:
    """linux | macos | windows (the heartbeat's ``os``)."""
    return {"Darwin": "macos", "Windows": "windows"}.get(platform.system(), platform.system().lower())


def battery() -> tuple[float | None, bool | None]:
    """(percent, charging) or (None, None) where the machine has no battery (desktops, VMs)."""
    try:
        b = psutil.sensors_battery()
    except (NotImplementedError, OSError):  # pragma: no cover -- platform without sensors
        b = None
    if b is None:
        return None, None
    return float(b.percent), bool(b.power_plugged)


def on_battery() -> bool:
    """True when running on battery (longer batch intervals, fewer wakeups)."""
    _pct, charging = battery()
    return charging is False


class HeartbeatBuilder:
    """Builds encoded Heartbeat records for one device."""

    def __init__(self, *, employee_id: str, device_id: str, cohort: str, os: str, started_at_us: int,
                 battery_fn: Any = battery) -> None:
        self.employee_id = employee_id
        self.device_id = device_id
        self.cohort = cohort
        self.os = os
        self.started_at_us = started_at_us
        self._battery = battery_fn
        self._proc = psutil.Process()

    def cpu_seconds(self) -> float:
        """CPU time (user + system) this process used so far."""
        t = self._proc.cpu_times()
        return float(t.user + t.system)

    def rss_bytes(self) -> int:
        """Resident set size now."""
        return int(self._proc.memory_info().rss)

    def record(self, *, at_us: int, state: str, counters: AgentCounters, spool_events: int,
               spool_bytes: int, spool_dropped: dict[str, int] | None = None) -> dict[str, Any]:
        """A Heartbeat record (a dict per the schema). ``spool_dropped``: what the spool lost
        (events dropped at its bound by reason, ``spool_full``; corrupt records quarantined,
        ``spool_quarantined``, counted in records since their events are unknown) -- merged into
        ``events_dropped`` so nothing is lost silently."""
        pct, charging = self._battery()
        with counters._lock:
            dropped = {k: int(v) for k, v in counters.events_dropped.items() if v}
        for k, v in (spool_dropped or {}).items():
            if v:
                dropped[k] = dropped.get(k, 0) + int(v)
            snap = (counters.payload_bytes_sent, counters.wire_bytes_sent, counters.events_captured,
                    counters.events_sent, counters.radio_wakeups)
        return {
            "heartbeat_id": ids.uuid7_bytes(at_us // 1000),
            "employee_id": self.employee_id,
            "device_id": self.device_id,
            "sent_at_us": at_us,
            "agent_started_at_us": self.started_at_us,
            "agent_version": __version__,
            "os": self.os,
            "cohort": self.cohort,
            "state": state,
            "battery_percent": pct,
            "charging": charging,
            "cpu_seconds": self.cpu_seconds(),
            "rss_bytes": self.rss_bytes(),
            "payload_bytes_sent": snap[0],
            "wire_bytes_sent": snap[1],
            "events_captured": snap[2],
            "events_sent": snap[3],
            "events_dropped": dropped,
            "spool_depth_events": spool_events,
            "spool_depth_bytes": spool_bytes,
            "radio_wakeups": snap[4],
        }

    def encode(self, **kw: Any) -> bytes:
        """The encoded Heartbeat (Avro single-object encoding)."""
        return codec.encode_record("heartbeat", self.record(**kw))
