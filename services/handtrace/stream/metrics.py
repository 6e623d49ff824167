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
    "Events per micro-batch (the messages enforced together).",
    buckets=(1, 10, 100, 1000, 5000, 10000, 25000, 50000, 100000, 200000, 500000),
)
PROCESS_SECONDS = Histogram(
    "handtrace_stream_batch_process_seconds",
    "Time to decode, enforce and re-encode one micro-batch.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
CONTROLS_WAIT_SECONDS = Histogram(
    "handtrace_stream_controls_wait_seconds",
    "Time a micro-batch waited, before enforcement, for the controls, policy and device records "
    "appended before it to be in force (one offsets request when nothing new arrived).",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 30.0),
)
CONTROLS = Counter(
    "handtrace_stream_controls_total",
    "Authentic control-plane records applied, by kind (pause_start, pause_end, exemption_request, "
    "exemption_grant, exemption_revoke, policy_update, device_enrolled, device_revoked).",
    ["kind"],
)
CONTROLS_REJECTED = Counter(
    "handtrace_stream_controls_rejected_total",
    "Records of the controls, policy and devices topics that were refused and changed nothing, by "
    "topic role and reason (handtrace.stream.controls.REJECT_REASONS: unsigned, bad_signature, "
    "unknown_key, retired_key, device_not_enrolled, not_permitted, stale_version, clock_offset, "
    "wrong_partition, key_mismatch, replay, invalid).",
    ["topic", "reason"],
)
PAUSES_CLAMPED = Counter(
    "handtrace_stream_pauses_clamped_total", "Pause requests longer than 30 minutes, clamped to 30."
)
POLICY_VERSION = Gauge("handtrace_stream_policy_version", "Version of the global policy in force.")
SAMPLING_ROWS = Counter(
    "handtrace_stream_sampling_rows_total",
    "Rows decided by each sampling selector of the policy, kept or dropped (effective rate = kept / "
    "all); at most MAX_SELECTORS selector values, the rest as 'other'.",
    ["selector", "outcome"],
)
MAX_SELECTORS = 50
_selectors_seen: set[str] = set()


def selector_label(selector: str) -> str:
    """``selector``, or ``other`` once MAX_SELECTORS distinct ones have been exported."""
    if selector in _selectors_seen:
        return selector
    if len(_selectors_seen) < MAX_SELECTORS:
        _selectors_seen.add(selector)
        return selector
    return "other"


REDACTED = Counter(
    "handtrace_stream_fields_redacted_total",
    "Values redacted or masked in stored rows, by kind (email, phone, card, national_id, secret, "
    "policy_none, policy_masked, password_field, key_code_masked).",
    ["kind"],
)
FIELDS_TRUNCATED = Counter(
    "handtrace_stream_fields_truncated_total",
    "Values cut to their bound in validation (stream.max_field_chars; 128 for the batch's labels), by "
    "field (window_title, url, text, app_id, agent_version, os, cohort): bounds accepted message sizes.",
    ["field"],
)
DEMONSTRATIONS = Counter(
    "handtrace_stream_demonstrations_total",
    "Demonstration headers by outcome: accepted, exempt (exempt at its start, end or upload), empty "
    "(no event and no frame left); dead-lettered ones count in handtrace_stream_deadletters_total "
    "as demonstration_<reason>.",
    ["outcome"],
)
DEMONSTRATION_FRAMES = Counter(
    "handtrace_stream_demonstration_frames_total",
    "Demonstration frames by where they were judged (manifest: an entry of a header; message: the "
    "image itself) and outcome: accepted, or the rule that refused them (paused, exempt, erased, "
    "no_app_context, not_allowlisted_app, invalid_url, not_allowlisted_domain, unredactable_url, "
    "invalid_time, step_error). A frame is stored only if both passed.",
    ["part", "outcome"],
)
DEMONSTRATION_EVENTS = Counter(
    "handtrace_stream_demonstration_events_total",
    "Events of published demonstrations: stored, or the reason a step dropped them (never sampled).",
    ["decision"],
)
