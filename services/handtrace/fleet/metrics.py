"""Every metric the fleet exporter exports (the one inventory; names carry their unit).

Cardinality is bounded by construction: no label names an agent, a device or a person. Fleet
labels are ``os``, ``agent_version`` and ``cohort`` (each capped at
HANDTRACE_FLEET__MAX_LABEL_VALUES distinct values, the rest become ``other``), ``state`` (the
heartbeat's closed enum), ``reason`` (capped likewise), ``consumer`` (three pipeline roles) and
``selector`` (the sampling selectors of the policy in force, capped at MAX_SELECTORS). Which
device is the worst offender is a ClickHouse query over the ``heartbeats`` table
(handtrace.fleet.store.WORST_OFFENDERS_SQL), never a label.

Histograms observe one value per agent per heartbeat interval, so
``histogram_quantile(0.95, sum by (le) (rate(X_bucket[15m])))`` is the fleet's p95 over the
agent-intervals of the last 15 minutes.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import Counter, Histogram

FLEET_LABELS = ("os", "agent_version", "cohort")
MAX_SELECTORS = 50

# --- per-interval distributions over the fleet ---------------------------------------------

AGENT_DRAIN = Histogram(
    "handtrace_fleet_agent_battery_drain_percent_per_hour",
    "Battery drain attributable to the agent (energy model: CPU time + radio wakeups + bytes), "
    "per agent interval, on battery only.",
    FLEET_LABELS,
    buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0),
)
DEVICE_DRAIN = Histogram(
    "handtrace_fleet_device_battery_drain_percent_per_hour",
    "Whole-device battery drain reported by the heartbeats (all apps), per agent interval, on "
    "battery only -- context for the agent's modelled share.",
    FLEET_LABELS,
    buckets=(1, 2.5, 5, 7.5, 10, 12.5, 15, 20, 25, 30, 40, 60),
)
UPLOAD_RATE = Histogram(
    "handtrace_fleet_agent_upload_bytes_per_hour",
    "Bytes on the wire per agent-hour (after compression and framing), per agent interval.",
    FLEET_LABELS,
    buckets=(10_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_000_000, 4_000_000, 8_000_000,
             16_000_000, 32_000_000, 64_000_000, 128_000_000),
)
CPU_PERCENT = Histogram(
    "handtrace_fleet_agent_cpu_percent",
    "Agent CPU use in percent of one core, per agent interval.",
    FLEET_LABELS,
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 25, 50, 100),
)
RSS = Histogram(
    "handtrace_fleet_agent_rss_bytes",
    "Agent resident memory, per heartbeat.",
    FLEET_LABELS,
    buckets=tuple(m * 1024 * 1024 for m in (16, 32, 64, 96, 128, 192, 256, 384, 512, 1024)),
)
SPOOL_BYTES = Histogram(
    "handtrace_fleet_agent_spool_depth_bytes",
    "Unsent bytes in the agent's on-disk spool, per heartbeat (0: keeping up).",
    FLEET_LABELS,
    buckets=(0, 64 * 1024, 256 * 1024, 1 << 20, 4 << 20, 16 << 20, 64 << 20, 200 << 20),
)

# --- fleet totals (rates of these are fleet-wide sums) -------------------------------------

UPLOAD_BYTES = Counter(
    "handtrace_fleet_agent_upload_bytes_total", "Bytes on the wire sent by agents.", FLEET_LABELS
)
PAYLOAD_BYTES = Counter(
    "handtrace_fleet_agent_payload_bytes_total",
    "Serialized batch bytes agents handed to their producer (before compression).", FLEET_LABELS,
)
AGENT_SECONDS = Counter(
    "handtrace_fleet_agent_seconds_total",
    "Agent running time covered by heartbeat intervals (rate(bytes)/rate(this)*3600 = bytes per "
    "agent-hour, fleet mean).", FLEET_LABELS,
)
CPU_SECONDS = Counter(
    "handtrace_fleet_agent_cpu_seconds_total", "CPU time used by agents.", FLEET_LABELS
)
ENERGY = Counter(
    "handtrace_fleet_agent_energy_joules_total",
    "Energy attributable to agents by the energy model (rate = fleet watts).", FLEET_LABELS,
)
RADIO_WAKEUPS = Counter(
    "handtrace_fleet_agent_radio_wakeups_total", "Network send bursts of agents.", FLEET_LABELS
)
EVENTS = Counter(
    "handtrace_fleet_agent_events_total",
    "Events counted by agents, by stage (captured, sent).", (*FLEET_LABELS, "stage"),
)
EVENTS_DROPPED = Counter(
    "handtrace_fleet_agent_events_dropped_total",
    "Events agents dropped before sending, by reason (policy, paused, spool_full, coalesced, "
    "budget, ...).", ("reason",),
)
RESTARTS = Counter(
    "handtrace_fleet_agent_restarts_total", "Agent restarts seen (agent_started_at changed).", FLEET_LABELS
)
HEARTBEATS = Counter(
    "handtrace_fleet_heartbeats_total",
    "Heartbeat messages consumed, by outcome (applied, first, restart, stale, invalid).", ("outcome",),
)
LABEL_OVERFLOW = Counter(
    "handtrace_fleet_label_overflow_total",
    "Heartbeats whose label value was replaced by `other` (cardinality cap), by label.", ("label",),
)
STORE_ROWS = Counter("handtrace_fleet_store_rows_total", "Heartbeat rows inserted into ClickHouse.")
STORE_ERRORS = Counter(
    "handtrace_fleet_store_errors_total", "Failed heartbeat inserts (retried; offsets not committed)."
)


# --- computed at scrape time from the exporter's state (see exporter.FleetCollector) -------


@dataclass(frozen=True)
class ScrapeGauge:
    """A gauge the exporter computes when scraped (declared here, emitted by FleetCollector)."""

    name: str
    help: str
    labels: tuple[str, ...] = ()


AGENTS_ONLINE = ScrapeGauge(
    "handtrace_fleet_agents_online",
    "Agents whose last heartbeat arrived within the online window, by reported state "
    "(capturing, paused, exempt, idle, stopped).", (*FLEET_LABELS, "state"),
)
AGENTS_SILENT = ScrapeGauge(
    "handtrace_fleet_agents_silent",
    "Agents seen before but silent for longer than the online window (and not yet forgotten).",
    FLEET_LABELS,
)
LAST_HEARTBEAT = ScrapeGauge(
    "handtrace_fleet_last_heartbeat_received_timestamp_seconds",
    "Unix time the exporter last received a valid heartbeat (0: none yet).",
)
CONSUMER_LAG = ScrapeGauge(
    "handtrace_pipeline_consumer_lag_messages",
    "Messages not yet committed by a pipeline consumer group, read from the brokers "
    "(consumer: stream, sink, fleet).", ("consumer",),
)
LAG_READ_ERRORS = ScrapeGauge(
    "handtrace_pipeline_consumer_lag_errors",
    "1 while the last attempt to read a group's lag failed, else 0.", ("consumer",),
)
SAMPLING_RATE = ScrapeGauge(
    "handtrace_pipeline_sampling_rate_configured",
    "Sampling rate by selector in the global policy in force (read from the policy topic).",
    ("selector",),
)
POLICY_VERSION = ScrapeGauge(
    "handtrace_pipeline_policy_version_seen",
    "Version of the newest global policy on the policy topic (0: none).",
)
BATTERY_BUDGET = ScrapeGauge(
    "handtrace_fleet_battery_drain_budget_percent_per_hour",
    "Budget for the fleet p95 of agent-attributable battery drain (setting).",
)
UPLOAD_BUDGET = ScrapeGauge(
    "handtrace_fleet_upload_budget_bytes_per_hour",
    "Budget for the fleet p95 of bytes uploaded per agent-hour (setting).",
)

SCRAPE_GAUGES = (AGENTS_ONLINE, AGENTS_SILENT, LAST_HEARTBEAT, CONSUMER_LAG, LAG_READ_ERRORS,
                 SAMPLING_RATE, POLICY_VERSION, BATTERY_BUDGET, UPLOAD_BUDGET)
