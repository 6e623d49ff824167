"""Every metric the stream service exports (the one inventory; names carry their unit)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

MESSAGES = Counter(
    "handtrace_stream_messages_total",
    "Event-batch messages consumed, by outcome (accepted, deadlettered).",
    ["outcome"],
)
EVENTS = Counter(
    "handtrace_stream_events_total",
    "Events by decision: stored, or the reason they were not.",
    ["decision"],
)
DEADLETTERS = Counter(
    "handtrace_stream_deadletters_total",
    "Messages set aside on the dead-letter topic, by reason.",
    ["reason"],
)
BATCH_EVENTS = Histogram(
    "handtrace_stream_batch_events",
    "Events per consumed batch message.",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 50000),
)
PROCESS_SECONDS = Histogram(
    "handtrace_stream_batch_process_seconds",
    "Time to decode, check and re-encode one batch message.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
CONTROLS = Counter(
    "handtrace_stream_controls_total",
    "Control events folded into employee state, by kind (or invalid_<reason>, ignored).",
    ["kind"],
)
PAUSES_CLAMPED = Counter(
    "handtrace_stream_pauses_clamped_total", "Pause requests longer than 30 minutes, clamped to 30."
)
POLICY_VERSION = Gauge("handtrace_stream_policy_version", "Version of the global policy in force.")
REDACTED = Counter(
    "handtrace_stream_fields_redacted_total",
    "Values redacted or masked in stored rows, by kind (email, phone, card, national_id, secret, "
    "policy_none, policy_masked, password_field, key_code_masked).",
    ["kind"],
)
