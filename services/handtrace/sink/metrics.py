"""Every metric the sink exports (the one inventory; names carry their unit)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ROWS_INSERTED = Counter("handtrace_sink_rows_inserted_total", "Rows inserted into ClickHouse.")
MESSAGES = Counter(
    "handtrace_sink_messages_total",
    "Accepted-row messages consumed, by outcome (buffered, replayed, duplicate, invalid).",
    ["outcome"],
)
DUPLICATE_ROWS = Counter(
    "handtrace_sink_duplicate_rows_total",
    "Rows skipped because their source offset was already stored (stream replays).",
)
INSERT_SECONDS = Histogram(
    "handtrace_sink_insert_seconds",
    "Duration of one ClickHouse insert (one partition flush).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
INSERT_ROWS = Histogram(
    "handtrace_sink_insert_rows",
    "Rows per ClickHouse insert.",
    buckets=(10, 100, 1000, 5000, 10000, 25000, 50000, 100000, 250000),
)
INSERT_ERRORS = Counter(
    "handtrace_sink_insert_errors_total",
    "Failed ClickHouse inserts by class: retryable (an outage: retried, nothing lost), bad_data "
    "(rows refused: the flush is split and the offending rows dead-lettered), unknown (retried "
    "a bounded number of times, then treated as bad data).",
    ["class"],
)
for _class in ("retryable", "bad_data", "unknown"):  # every series exists from the start (alerts see 0)
    INSERT_ERRORS.labels(_class)
SPLITS = Counter(
    "handtrace_sink_splits_total",
    "Flush pieces split to isolate rows ClickHouse refuses or to bound partitions per insert, by "
    "reason (ClickHouse error name, TOO_MANY_PARTITIONS, isolate_wide_batch).",
    ["reason"],
)
ROWS_DEADLETTERED = Counter(
    "handtrace_sink_rows_deadlettered_total",
    "Rows not stored but published to the events.rejected topic, by reason (ClickHouse error "
    "name or TOO_MANY_PARTITIONS). Counted again if a crash makes the sink re-publish them.",
    ["reason"],
)
END_TO_END_SECONDS = Histogram(
    "handtrace_sink_end_to_end_seconds",
    "Capture to queryable, per stored event (agent clock to sink clock).",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
LAG_MESSAGES = Gauge(
    "handtrace_sink_consumer_lag_messages",
    "Messages between the sink's position and the end of its partitions.",
)

# -------------------------------------------------------------- demonstrations (issue #11)
DEMONSTRATIONS = Counter(
    "handtrace_sink_demonstrations_total",
    "Demonstration headers handled by the demonstration writer, by outcome: complete (stored "
    "whole), incomplete (held past demo.hold_s or refused: only an 'incomplete' row, objects "
    "deleted), already_stored (a replay or re-upload of a complete one: skipped), duplicate (a "
    "second header while pending), invalid (not ours: skipped).",
    ["outcome"],
)
for _outcome in ("complete", "incomplete", "already_stored", "duplicate", "invalid"):
    DEMONSTRATIONS.labels(_outcome)
DEMO_FRAMES = Counter(
    "handtrace_sink_demonstration_frames_total",
    "Frame messages handled, by outcome: stored (object written for a pending manifest), "
    "duplicate (already stored for that pending demonstration), discarded (in no pending "
    "manifest: a replay, or a frame the stream accepted but the manifest does not list), "
    "invalid (bad headers or bytes that do not match their sha256).",
    ["outcome"],
)
for _outcome in ("stored", "duplicate", "discarded", "invalid"):
    DEMO_FRAMES.labels(_outcome)
DEMO_OBJECT_RETRIES = Counter(
    "handtrace_sink_demonstration_object_write_retries_total",
    "Frame object writes that failed and were retried (the frame store was unavailable).",
)
DEMO_OBJECTS_DELETED = Counter(
    "handtrace_sink_demonstration_objects_deleted_total",
    "Frame objects deleted because their demonstration was recorded incomplete.",
)
DEMO_PENDING = Gauge(
    "handtrace_sink_demonstrations_pending",
    "Demonstrations whose header has arrived but not yet every manifest frame (they hold back "
    "their partition's offset commits).",
)

# -------------------------------------------------------------- control-plane audit (issue #13)
AUDIT_ENTRIES = Counter(
    "handtrace_sink_audit_entries_total",
    "Audit topic messages handled by the audit writer, by outcome: stored (an audit entry, in "
    "control_audit), invalid (not a valid entry: stored with action 'invalid' and the message in "
    "detail, never dropped), duplicate (already stored: a replay after a crash or restart).",
    ["outcome"],
)
for _outcome in ("stored", "invalid", "duplicate"):
    AUDIT_ENTRIES.labels(_outcome)
