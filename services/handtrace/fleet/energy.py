"""Battery drain attributable to the agent: a documented, deliberately simple energy model.

A heartbeat carries cumulative counters, not power readings (the OS's per-process energy
estimates are unavailable or incomparable across Linux, macOS and Windows). Between two
heartbeats of one agent we therefore estimate the energy the agent *added* to the laptop's draw:

    E [J] = cpu_watts_per_core   * Δcpu_seconds        (CPU: J per core-second busy)
          + radio_wakeup_joules  * Δradio_wakeups      (each send burst wakes the radio, plus tail)
          + radio_joules_per_mb  * Δwire_bytes / 1e6   (transfer itself)

    drain [%/h] = (E / Δt) [W] / battery_capacity_wh [Wh] * 100

Δt is the agent-clock interval between the two heartbeats. The parameters are settings
(HANDTRACE_FLEET__CPU_WATTS_PER_CORE, ...; defaults: a typical 55 Wh laptop on Wi-Fi); the
model errs towards over-estimating (every CPU-second at full incremental core power), which is
the safe side for a budget. docs/adr/0006-fleet-heartbeat-store.md says why no measured value
is used; the whole-device drain that heartbeats do report (battery_percent) is exported
alongside, so the model's share of it can be sanity-checked on real fleets.
"""

from __future__ import annotations

from dataclasses import dataclass

from handtrace.core.settings import FleetSettings


@dataclass(frozen=True)
class EnergyModel:
    """Parameters of the CPU-time + radio-wakeup energy model (see the module docstring)."""

    cpu_watts_per_core: float = 2.5
    radio_wakeup_joules: float = 0.6
    radio_joules_per_mb: float = 0.1
    battery_capacity_wh: float = 55.0

    @classmethod
    def from_settings(cls, s: FleetSettings) -> EnergyModel:
        """The model configured by the fleet settings."""
        return cls(s.cpu_watts_per_core, s.radio_wakeup_joules, s.radio_joules_per_mb, s.battery_capacity_wh)

    def joules(self, cpu_seconds: float, radio_wakeups: float, wire_bytes: float) -> float:
        """Energy (J) the agent added over an interval with these counter increases."""
        return (self.cpu_watts_per_core * max(cpu_seconds, 0.0)
                + self.radio_wakeup_joules * max(radio_wakeups, 0.0)
                + self.radio_joules_per_mb * max(wire_bytes, 0.0) / 1e6)

    def drain_percent_per_hour(self, joules: float, seconds: float) -> float:
        """Battery percent per hour that ``joules`` spent over ``seconds`` represent."""
        if seconds <= 0:
            raise ValueError("interval must be positive")
        watts = joules / seconds
        return watts / self.battery_capacity_wh * 100.0
