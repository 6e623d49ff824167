"""What the exporter knows about each agent: its last heartbeat, so cumulative counters can be
turned into per-interval rates; and who is online or silent. Pure (no I/O, no metrics): the
exporter feeds it decoded heartbeats with the receive time and records what it returns.

Memory is bounded by the active fleet: agents silent for longer than ``forget_after_s`` are
dropped. Counters are cumulative since agent start (schemas/heartbeat/v1.avsc); a change of
``agent_started_at_us`` is a restart and starts a new baseline, as does a counter that went
backwards (an agent that lost its state without saying so). A heartbeat not newer than the
last one of its agent (a replay or reordering) is ``stale`` and changes nothing.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from handtrace.fleet.energy import EnergyModel

OTHER = "other"
KNOWN_OS = ("linux", "macos", "windows", "synthetic")
AGENT_STATES = ("capturing", "paused", "exempt", "idle", "stopped")
_LABEL_OK = re.compile(r"^[A-Za-z0-9._+-]{1,64}$")
_OS_ALIASES = {"darwin": "macos", "mac": "macos", "osx": "macos", "win32": "windows", "win": "windows"}
MIN_INTERVAL_S = 1.0


class LabelGuard:
    """Caps the distinct values of one label: the first ``limit`` valid values are kept, any
    later or malformed value becomes ``other`` (and is reported, so it can be counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.seen: set[str] = set()

    def __call__(self, value: str) -> tuple[str, bool]:
        """(label value to use, whether it overflowed)."""
        if value in self.seen:
            return value, False
        if not _LABEL_OK.match(value) or len(self.seen) >= self.limit:
            return OTHER, True
        self.seen.add(value)
        return value, False


def normalise_os(os_name: str) -> str:
    """Lower-case OS family; unknown families become ``other`` (OS is a closed set)."""
    v = os_name.strip().lower()
    v = _OS_ALIASES.get(v, v)
    return v if v in KNOWN_OS else OTHER


@dataclass(frozen=True)
class Labels:
    """The bounded fleet labels of one agent."""

    os: str
    agent_version: str
    cohort: str

    def values(self) -> tuple[str, str, str]:
        return self.os, self.agent_version, self.cohort


@dataclass(frozen=True)
class Interval:
    """Rates of one agent between two consecutive heartbeats of the same agent run."""

    seconds: float
    cpu_seconds: float
    cpu_percent: float
    wire_bytes: int
    payload_bytes: int
    upload_bytes_per_hour: float
    radio_wakeups: int
    joules: float
    events_captured: int
    events_sent: int
    dropped: dict[str, int]
    agent_drain_percent_per_hour: float | None  # None unless on battery at both ends
    device_drain_percent_per_hour: float | None


@dataclass(frozen=True)
class Observation:
    """What one heartbeat told: its outcome, labels and (when there is a baseline) an interval."""

    outcome: str  # applied | first | restart | stale
    labels: Labels
    interval: Interval | None = None
    overflowed: tuple[str, ...] = ()


@dataclass
class _Agent:
    labels: Labels
    state: str
    hb: dict[str, Any]
    received_s: float


@dataclass
class FleetState:
    """Last heartbeat per device, keyed by device id (in memory only; never exported as a label)."""

    model: EnergyModel
    max_label_values: int = 32
    agents: dict[str, _Agent] = field(default_factory=dict)
    last_received_s: float = 0.0

    def __post_init__(self) -> None:
        self._guards = {name: LabelGuard(self.max_label_values) for name in ("agent_version", "cohort")}
        self.reason_guard = LabelGuard(self.max_label_values)

    def labels_of(self, hb: Mapping[str, Any]) -> tuple[Labels, tuple[str, ...]]:
        """Bounded labels for a heartbeat, and the names of labels that overflowed."""
        overflowed = []
        os_label = normalise_os(str(hb.get("os", "")))
        if os_label == OTHER:
            overflowed.append("os")
        version, o1 = self._guards["agent_version"](str(hb.get("agent_version", "")))
        cohort, o2 = self._guards["cohort"](str(hb.get("cohort", "")))
        overflowed += [name for name, o in (("agent_version", o1), ("cohort", o2)) if o]
        return Labels(os_label, version, cohort), tuple(overflowed)

    def observe(self, hb: Mapping[str, Any], received_s: float) -> Observation:
        """Fold one decoded heartbeat in; ``received_s`` is the exporter's wall clock (Unix s)."""
        device = hb["device_id"]
        labels, overflowed = self.labels_of(hb)
        prev = self.agents.get(device)
        state = hb.get("state") or "capturing"
        if prev is not None:
            p = prev.hb
            same_run = p["agent_started_at_us"] == hb["agent_started_at_us"]
            if (same_run and hb["sent_at_us"] <= p["sent_at_us"]) or (
                    hb["agent_started_at_us"] < p["agent_started_at_us"]):
                return Observation("stale", labels, overflowed=overflowed)
        self.last_received_s = max(self.last_received_s, received_s)
        record = _Agent(labels, state if state in AGENT_STATES else "capturing", dict(hb), received_s)
        self.agents[device] = record
        if prev is None:
            return Observation("first", labels, overflowed=overflowed)
        if not same_run:
            return Observation("restart", labels, overflowed=overflowed)
        interval = self._interval(prev.hb, hb)
        if interval is None:  # counters went backwards: a silent reset, new baseline
            return Observation("restart", labels, overflowed=overflowed)
        return Observation("applied", labels, interval, overflowed)

    def _interval(self, p: Mapping[str, Any], h: Mapping[str, Any]) -> Interval | None:
        seconds = (h["sent_at_us"] - p["sent_at_us"]) / 1e6
        d = {k: h[k] - p[k] for k in ("cpu_seconds", "wire_bytes_sent", "payload_bytes_sent",
                                      "radio_wakeups", "events_captured", "events_sent")}
        if any(v < 0 for v in d.values()):
            return None
        if seconds < MIN_INTERVAL_S:
            # Too short to be a rate; still a valid baseline move, but observe nothing.
            seconds = 0.0
        prev_dropped = p.get("events_dropped") or {}
        dropped = {r: max(n - prev_dropped.get(r, 0), 0) for r, n in (h.get("events_dropped") or {}).items()}
        joules = self.model.joules(d["cpu_seconds"], d["radio_wakeups"], d["wire_bytes_sent"])
        on_battery = (h.get("battery_percent") is not None and p.get("battery_percent") is not None
                      and h.get("charging") is False and p.get("charging") is False)
        agent_drain = device_drain = None
        if seconds > 0 and on_battery:
            agent_drain = self.model.drain_percent_per_hour(joules, seconds)
            fall = p["battery_percent"] - h["battery_percent"]
            device_drain = max(fall, 0.0) / seconds * 3600.0
        rate = (lambda x: x / seconds) if seconds > 0 else (lambda x: 0.0)
        return Interval(
            seconds=seconds, cpu_seconds=d["cpu_seconds"], cpu_percent=rate(d["cpu_seconds"]) * 100.0,
            wire_bytes=d["wire_bytes_sent"], payload_bytes=d["payload_bytes_sent"],
            upload_bytes_per_hour=rate(d["wire_bytes_sent"]) * 3600.0, radio_wakeups=d["radio_wakeups"],
            joules=joules, events_captured=d["events_captured"], events_sent=d["events_sent"],
            dropped={r: n for r, n in dropped.items() if n}, agent_drain_percent_per_hour=agent_drain,
            device_drain_percent_per_hour=device_drain,
        )

    def census(self, now_s: float, online_window_s: float, forget_after_s: float,
               max_heartbeat_age_s: float) -> tuple[dict[tuple[str, ...], int], dict[tuple[str, ...], int]]:
        """(online agents by labels+state, silent agents by labels); forgets long-silent agents.

        Online needs a heartbeat received within the window *and* sent (agent clock) within
        ``max_heartbeat_age_s``: a replayed backlog is history, not presence.
        """
        online: dict[tuple[str, ...], int] = {}
        silent: dict[tuple[str, ...], int] = {}
        for device in list(self.agents):
            a = self.agents[device]
            age = now_s - a.received_s
            if age > forget_after_s:
                del self.agents[device]
                continue
            fresh = now_s - a.hb["sent_at_us"] / 1e6 <= max_heartbeat_age_s
            if age <= online_window_s and fresh:
                key = (*a.labels.values(), a.state)
                online[key] = online.get(key, 0) + 1
            else:
                labels = a.labels.values()
                silent[labels] = silent.get(labels, 0) + 1
        return online, silent
