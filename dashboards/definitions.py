"""The five handtrace dashboards. Every metric named here is declared in a service's metrics.py
inventory or recorded by deploy/prometheus/rules (tests/unit/test_dashboards.py checks), and
every query returns data after a simulated fleet run (tests/integration/test_prometheus.py)."""

from __future__ import annotations

from dashboards.builder import SQL, Dashboard, Panel, Prom, Row, Variable

RI = "$__rate_interval"
F = 'os=~"$os", agent_version=~"$agent_version", cohort=~"$cohort"'
FLEET_VARS = (
    Variable("os", "OS", "handtrace_fleet_agent_rss_bytes_count"),
    Variable("agent_version", "Agent version", "handtrace_fleet_agent_rss_bytes_count"),
    Variable("cohort", "Cohort", "handtrace_fleet_agent_rss_bytes_count"),
)


def q(quantile: float, metric: str, by: str = "le", selector: str = F) -> str:
    """histogram_quantile over the fleet histogram ``metric`` (per-interval observations)."""
    return f"histogram_quantile({quantile}, sum by ({by}) (rate({metric}_bucket{{{selector}}}[{RI}])))"


def hq(quantile: float, metric: str) -> str:
    """histogram_quantile over a pipeline histogram (no fleet labels)."""
    return f"histogram_quantile({quantile}, sum by (le) (rate({metric}_bucket[{RI}])))"


def rate_by(label: str, metric: str, selector: str = "") -> str:
    """Per-second rate of a counter, summed by one label."""
    return f"sum by ({label}) (rate({metric}{{{selector}}}[{RI}]))" if selector else \
        f"sum by ({label}) (rate({metric}[{RI}]))"


def quantiles(metric: str, selector: str = F) -> tuple[Prom, Prom]:
    return Prom(q(0.5, metric, selector=selector), "p50"), Prom(q(0.95, metric, selector=selector), "p95")


DRAIN = "handtrace_fleet_agent_battery_drain_percent_per_hour"
UPLOAD = "handtrace_fleet_agent_upload_bytes_per_hour"

fleet_impact = Dashboard(
    uid="handtrace-fleet-impact",
    title="handtrace / Fleet impact",
    description="What the agent costs the people who run it: battery, bandwidth, CPU, memory, spool. "
    "Distributions are over agent heartbeat intervals; no series names an agent or a person. "
    "Worst offenders come from ClickHouse (table heartbeats).",
    variables=FLEET_VARS,
    rows=(
        Row("Agents", (
            Panel("Online", "stat", (Prom(f"sum(handtrace_fleet_agents_online{{{F}}})"),), width=4, height=4,
                  description="Heartbeat received within the online window."),
            Panel("Paused", "stat", (Prom(f'sum(handtrace_fleet_agents_online{{{F}, state="paused"}})'),),
                  width=4, height=4),
            Panel("Exempt", "stat", (Prom(f'sum(handtrace_fleet_agents_online{{{F}, state="exempt"}})'),),
                  width=4, height=4),
            Panel("Silent", "stat", (Prom(f"sum(handtrace_fleet_agents_silent{{{F}}})"),), width=4, height=4,
                  thresholds=((1, "orange"),), description="Seen in the last day, no heartbeat in the window."),
            Panel("Restarts", "stat", (Prom(f"sum(increase(handtrace_fleet_agent_restarts_total{{{F}}}[$__range]))"),),
                  width=4, height=4, decimals=0),
            Panel("Fleet power by the agent", "stat",
                  (Prom(f"sum(rate(handtrace_fleet_agent_energy_joules_total{{{F}}}[{RI}]))"),),
                  unit="watt", width=4, height=4, description="Energy model, summed over the fleet."),
            Panel("Agents by state", "timeseries", (Prom(f"sum by (state) (handtrace_fleet_agents_online{{{F}}})",
                                                         "{{state}}"),
                                                    Prom(f"sum(handtrace_fleet_agents_silent{{{F}}})", "silent")),
                  width=24, height=7),
        )),
        Row("Battery", (
            Panel("Battery drain attributable to the agent", "timeseries", (
                *quantiles(DRAIN),
                Prom("max(handtrace_fleet_battery_drain_budget_percent_per_hour)", "budget (p95)"),
            ), unit="percent", description="%/hour of a laptop battery, energy model: CPU time + radio "
                  "wakeups + bytes (docs/adr/0006). On battery only."),
            Panel("Agent drain p95 by cohort", "timeseries", (Prom(q(0.95, DRAIN, by="le, cohort"), "{{cohort}}"),),
                  unit="percent"),
            Panel("Whole-device drain (all apps) vs the agent's share", "timeseries", (
                Prom(q(0.5, "handtrace_fleet_device_battery_drain_percent_per_hour"), "device p50"),
                Prom(q(0.5, DRAIN), "agent p50"),
            ), unit="percent", description="Device drain is the reported battery fall; context for the model."),
            Panel("Agent drain p95 by version", "timeseries",
                  (Prom(q(0.95, DRAIN, by="le, agent_version"), "{{agent_version}}"),), unit="percent"),
        )),
        Row("Bandwidth", (
            Panel("Upload per agent-hour", "timeseries", (
                *quantiles(UPLOAD),
                Prom("max(handtrace_fleet_upload_budget_bytes_per_hour)", "budget (p95)"),
            ), unit="decbytes", description="Bytes on the wire per agent-hour, after compression."),
            Panel("Fleet upload", "timeseries",
                  (Prom(rate_by("cohort", "handtrace_fleet_agent_upload_bytes_total", F), "{{cohort}}"),),
                  unit="Bps"),
            Panel("Mean upload per agent-hour", "timeseries", (Prom(
                f"sum(rate(handtrace_fleet_agent_upload_bytes_total{{{F}}}[{RI}])) * 3600 / "
                f"sum(rate(handtrace_fleet_agent_seconds_total{{{F}}}[{RI}]))", "mean"),), unit="decbytes"),
            Panel("Wire bytes per payload byte", "timeseries", (Prom(
                f"sum(rate(handtrace_fleet_agent_upload_bytes_total{{{F}}}[{RI}])) / "
                f"sum(rate(handtrace_fleet_agent_payload_bytes_total{{{F}}}[{RI}]))", "ratio"),),
                  unit="percentunit", description="Compression plus framing; lower is better."),
        )),
        Row("CPU, memory, spool", (
            Panel("Agent CPU", "timeseries", quantiles("handtrace_fleet_agent_cpu_percent"), unit="percent",
                  width=8, description="Percent of one core."),
            Panel("Agent RSS", "timeseries", quantiles("handtrace_fleet_agent_rss_bytes"), unit="bytes", width=8),
            Panel("Spool depth", "timeseries", quantiles("handtrace_fleet_agent_spool_depth_bytes"), unit="bytes",
                  width=8, description="Unsent bytes on disk; growth means a network problem."),
            Panel("Events dropped on the agent, by reason", "timeseries",
                  (Prom(rate_by("reason", "handtrace_fleet_agent_events_dropped_total"), "{{reason}}"),),
                  unit="ops", width=12),
            Panel("Events captured vs sent", "timeseries",
                  (Prom(f"sum by (stage) (rate(handtrace_fleet_agent_events_total{{{F}}}[{RI}]))", "{{stage}}"),),
                  unit="ops", width=12),
        )),
        Row("Worst offenders (ClickHouse)", (
            Panel("Worst offenders", "table", (SQL("""
SELECT device_id, any(os) AS os, any(agent_version) AS agent_version, any(cohort) AS cohort,
       round(avg(agent_drain_percent_per_hour), 3) AS agent_drain_pct_per_hour,
       round(avg(upload_bytes_per_hour) / 1e6, 3) AS upload_mb_per_hour,
       round(avg(cpu_percent), 3) AS cpu_percent,
       max(rss_bytes) AS max_rss_bytes, max(spool_depth_bytes) AS max_spool_bytes, count() AS intervals
FROM handtrace.heartbeats FINAL
WHERE $__timeFilter(sent_at) AND interval_s > 0
GROUP BY device_id
ORDER BY agent_drain_pct_per_hour DESC, upload_mb_per_hour DESC
LIMIT 20"""),), width=24, height=9, description="Devices (not people) whose agent costs most. "
                  "Restricted: SRE only. Also `handtrace fleet offenders`."),
            Panel("Agent drain p95 by version (heartbeats)", "table", (SQL("""
SELECT agent_version, round(quantile(0.95)(agent_drain_percent_per_hour), 3) AS p95_drain_pct_per_hour,
       round(quantile(0.95)(upload_bytes_per_hour) / 1e6, 3) AS p95_upload_mb_per_hour,
       uniqExact(device_id) AS devices
FROM handtrace.heartbeats FINAL
WHERE $__timeFilter(sent_at) AND agent_drain_percent_per_hour IS NOT NULL
GROUP BY agent_version
ORDER BY p95_drain_pct_per_hour DESC"""),), width=24, height=6),
        )),
    ),
)

pipeline_health = Dashboard(
    uid="handtrace-pipeline-health",
    title="handtrace / Pipeline health",
    description="agents -> Kafka -> stream -> sink -> ClickHouse: throughput, lag, dead letters, latency.",
    time_from="now-3h",
    rows=(
        Row("Now", (
            Panel("Events in", "stat", (Prom(f"sum(rate(handtrace_stream_events_total[{RI}]))"),), unit="ops",
                  width=4, height=4),
            Panel("Rows stored", "stat", (Prom(f"sum(rate(handtrace_sink_rows_inserted_total[{RI}]))"),), unit="ops",
                  width=4, height=4),
            Panel("Dead-letter ratio (10m)", "stat", (Prom("handtrace:stream_deadletter_ratio:rate10m"),),
                  unit="percentunit", width=4, height=4, thresholds=((0.01, "red"),)),
            Panel("Max consumer lag", "stat", (Prom("max(handtrace_pipeline_consumer_lag_messages)"),), width=4,
                  height=4, thresholds=((50000, "red"),)),
            Panel("E2E latency p95", "stat", (Prom(
                hq(0.95, "handtrace_sink_end_to_end_seconds")),),
                  unit="s", width=4, height=4, thresholds=((120, "red"),)),
            Panel("Targets up", "stat", (Prom('sum(up{job=~"handtrace-.*"})'),), width=4, height=4),
        )),
        Row("Throughput and lag", (
            Panel("Consumer lag by group", "timeseries", (
                Prom("max by (consumer) (handtrace_pipeline_consumer_lag_messages)", "{{consumer}}"),
                Prom("sum(handtrace_sink_consumer_lag_messages)", "sink (self-reported)"),
            ), description="Uncommitted messages per consumer group, read from the brokers by the fleet exporter."),
            Panel("Stream messages by outcome", "timeseries",
                  (Prom(rate_by("outcome", "handtrace_stream_messages_total"), "{{outcome}}"),), unit="ops"),
            Panel("Sink messages by outcome", "timeseries",
                  (Prom(rate_by("outcome", "handtrace_sink_messages_total"), "{{outcome}}"),), unit="ops"),
            Panel("Dead letters by reason", "timeseries",
                  (Prom(rate_by("reason", "handtrace_stream_deadletters_total"), "{{reason}}"),), unit="ops"),
            Panel("Lag reads failing", "timeseries",
                  (Prom("max by (consumer) (handtrace_pipeline_consumer_lag_errors)", "{{consumer}}"),), height=5),
            Panel("Heartbeats by outcome", "timeseries", (
                Prom(rate_by("outcome", "handtrace_fleet_heartbeats_total"), "{{outcome}}"),
                Prom(f"sum(rate(handtrace_fleet_store_rows_total[{RI}]))", "stored rows"),
                Prom(f"sum(rate(handtrace_fleet_store_errors_total[{RI}]))", "store errors"),
            ), unit="ops", height=5),
        )),
        Row("Latency and work", (
            Panel("Capture to queryable", "timeseries", (
                Prom(hq(0.5, "handtrace_sink_end_to_end_seconds"), "p50"),
                Prom(hq(0.95, "handtrace_sink_end_to_end_seconds"), "p95"),
                Prom(hq(0.99, "handtrace_sink_end_to_end_seconds"), "p99"),
            ), unit="s", width=8),
            Panel("Stream micro-batch processing", "timeseries", (
                Prom(hq(0.5, "handtrace_stream_batch_process_seconds"), "p50"),
                Prom(hq(0.95, "handtrace_stream_batch_process_seconds"), "p95"),
                Prom(hq(0.95, "handtrace_stream_controls_wait_seconds"), "p95 wait for controls ahead"),
            ), unit="s", width=8),
            Panel("Events per batch message", "timeseries", (
                Prom(hq(0.5, "handtrace_stream_batch_events"), "p50"),
            ), width=8),
            Panel("ClickHouse insert duration", "timeseries", (
                Prom(hq(0.95, "handtrace_sink_insert_seconds"), "p95"),
            ), unit="s", width=8),
            Panel("Rows per insert", "timeseries", (
                Prom(hq(0.5, "handtrace_sink_insert_rows"), "p50"),
            ), width=8),
            Panel("Insert errors and replayed duplicates", "timeseries", (
                Prom(f"sum(rate(handtrace_sink_insert_errors_total[{RI}]))", "insert errors"),
                Prom(f"sum(rate(handtrace_sink_duplicate_rows_total[{RI}]))", "duplicate rows skipped"),
            ), unit="ops", width=8),
        )),
    ),
)

privacy_controls = Dashboard(
    uid="handtrace-privacy-controls",
    title="handtrace / Privacy controls",
    description="Pauses, exemptions, allowlists and redaction at work: what was not stored, and why.",
    time_from="now-24h",
    rows=(
        Row("Controls", (
            Panel("Share of events stored", "stat", (Prom(
                f'sum(rate(handtrace_stream_events_total{{decision="stored"}}[{RI}])) / '
                f"sum(rate(handtrace_stream_events_total[{RI}]))"),), unit="percentunit", width=6, height=4),
            Panel("Agents paused / exempt now", "stat", (
                Prom('sum by (state) (handtrace_fleet_agents_online{state=~"paused|exempt"})', "{{state}}"),),
                  width=6, height=4),
            Panel("Policy version in force", "stat", (Prom("max(handtrace_stream_policy_version)"),),
                  width=6, height=4),
            Panel("Pauses clamped to 30 min", "stat",
                  (Prom("sum(increase(handtrace_stream_pauses_clamped_total[$__range]))"),), width=6, height=4,
                  decimals=0),
            Panel("Control events by kind", "timeseries",
                  (Prom("sum by (kind) (increase(handtrace_stream_controls_total[$__range]))", "{{kind}}"),),
                  description="Pauses, resumes, exemption requests/grants/revocations, policy updates."),
            Panel("Events dropped for a pause or an exemption", "timeseries", (Prom(
                f'sum by (decision) (rate(handtrace_stream_events_total{{decision=~"paused|exempt"}}[{RI}]))',
                "{{decision}}"),), unit="ops"),
        )),
        Row("Drops and redaction", (
            Panel("Events not stored, by reason", "timeseries", (Prom(
                f'sum by (decision) (rate(handtrace_stream_events_total{{decision!="stored"}}[{RI}]))',
                "{{decision}}"),), unit="ops"),
            Panel("Values redacted or masked, by kind", "timeseries",
                  (Prom(rate_by("kind", "handtrace_stream_fields_redacted_total"), "{{kind}}"),), unit="ops"),
            Panel("Dropped on the agent (policy, pause) by reason", "bargauge", (Prom(
                "sum by (reason) (increase(handtrace_fleet_agent_events_dropped_total[$__range]))", "{{reason}}"),),
                  width=24, height=6),
        )),
    ),
)

sampling = Dashboard(
    uid="handtrace-sampling",
    title="handtrace / Sampling",
    description="Configured vs effective sampling and what it does to volume. Stream-side sampling "
    "reduces what is stored, not what agents upload: both are shown so a change's effect is visible.",
    time_from="now-24h",
    rows=(
        Row("Rates", (
            Panel("Configured sampling rates (policy in force)", "bargauge",
                  (Prom("max by (selector) (handtrace_pipeline_sampling_rate_configured)", "{{selector}}"),),
                  unit="percentunit", min=0, max=1, description="Read from the policy topic by the fleet exporter. "
                  "Selectors not listed keep rate 1."),
            Panel("Effective keep rate at the sampling step", "timeseries", (Prom(
                f'sum(rate(handtrace_stream_events_total{{decision=~"stored|decimated"}}[{RI}])) / '
                f'sum(rate(handtrace_stream_events_total{{decision=~"stored|decimated|sampled_out|invalid_sampling_rate"}}[{RI}]))',
                "effective"),), unit="percentunit", min=0, max=1,
                  description="Events past sampling over events that reached it."),
            Panel("Effective keep rate by selector", "timeseries", (Prom(
                f'sum by (selector) (rate(handtrace_stream_sampling_rows_total{{outcome="kept"}}[{RI}])) / '
                f'sum by (selector) (rate(handtrace_stream_sampling_rows_total[{RI}]))',
                "{{selector}}"),), unit="percentunit", min=0, max=1,
                  description="Per selector, rows kept over rows it decided (the stream's count). Compare "
                  "with the configured rate: episodes are the sampling unit, so a short window with few "
                  "episodes strays further from the rate."),
            Panel("Sampled out, decimated, invalid rate", "timeseries", (Prom(
                rate_by("decision", "handtrace_stream_events_total",
                        'decision=~"sampled_out|decimated|invalid_sampling_rate"'),
                "{{decision}}"),), unit="ops"),
            Panel("Policy version seen", "timeseries", (
                Prom("max(handtrace_pipeline_policy_version_seen)", "policy"),
                Prom("max(handtrace_stream_policy_version)", "stream in force")),
                  description="A step here marks a sampling change."),
        )),
        Row("Volume effect", (
            Panel("Events received vs rows stored", "timeseries", (
                Prom(f"sum(rate(handtrace_stream_events_total[{RI}]))", "received"),
                Prom(f"sum(rate(handtrace_sink_rows_inserted_total[{RI}]))", "stored"),
            ), unit="ops"),
            Panel("Agent upload (fleet)", "timeseries", (
                Prom(f"sum(rate(handtrace_fleet_agent_upload_bytes_total[{RI}]))", "wire"),
                Prom(f"sum(rate(handtrace_fleet_agent_payload_bytes_total[{RI}]))", "payload"),
            ), unit="Bps", description="Unchanged by stream-side sampling; agent-side coalescing shows here."),
            Panel("Upload per agent-hour p95 vs budget", "timeseries", (
                Prom(q(0.95, UPLOAD, selector=""), "p95"),
                Prom("max(handtrace_fleet_upload_budget_bytes_per_hour)", "budget"),
            ), unit="decbytes", width=24),
        )),
    ),
)

analyst_overview = Dashboard(
    uid="handtrace-analyst-overview",
    title="handtrace / Analyst overview",
    description="What is in handtrace.events (pseudonymous keys only): volume, kinds, apps, freshness.",
    time_from="now-24h",
    refresh="5m",
    rows=(
        Row("Volume", (
            Panel("Events stored by kind", "timeseries", (SQL("""
SELECT $__timeInterval(captured_at) AS time, kind, count() AS events
FROM handtrace.events
WHERE $__timeFilter(captured_at)
GROUP BY time, kind
ORDER BY time""", "time_series"),), width=24),
            Panel("Events by kind", "table", (SQL("""
SELECT kind, count() AS events, uniqExact(employee_key) AS employees, uniqExact(device_key) AS devices
FROM handtrace.events
WHERE $__timeFilter(captured_at)
GROUP BY kind
ORDER BY events DESC"""),)),
            Panel("Top apps", "table", (SQL("""
SELECT app_id, count() AS events, uniqExact(employee_key) AS employees
FROM handtrace.events
WHERE $__timeFilter(captured_at) AND app_id IS NOT NULL
GROUP BY app_id
ORDER BY events DESC
LIMIT 20"""),)),
        )),
        Row("People and content", (
            Panel("Active employees (pseudonyms) per hour", "timeseries", (SQL("""
SELECT toStartOfHour(captured_at) AS time, uniqExact(employee_key) AS employees
FROM handtrace.events
WHERE $__timeFilter(captured_at)
GROUP BY time
ORDER BY time""", "time_series"),), width=8),
            Panel("Typed text: masked vs full", "table", (SQL("""
SELECT countIf(text_masked) AS masked, countIf(text IS NOT NULL AND NOT text_masked) AS full_text,
       countIf(kind IN ('key_down', 'key_up') AND text IS NULL AND NOT text_masked) AS keys_without_text
FROM handtrace.events
WHERE $__timeFilter(captured_at)"""),), width=8),
            Panel("Capture to stored", "table", (SQL("""
SELECT round(quantile(0.5)(dateDiff('millisecond', captured_at, stored_at)) / 1000, 2) AS p50_s,
       round(quantile(0.95)(dateDiff('millisecond', captured_at, stored_at)) / 1000, 2) AS p95_s,
       max(stored_at) AS last_stored
FROM handtrace.events
WHERE $__timeFilter(captured_at)"""),), width=8),
        )),
        Row("Rollups", (
            Panel("Events per app per hour (rollup)", "timeseries", (SQL("""
SELECT hour AS time, app_id, sum(events) AS events
FROM handtrace.rollup_app_activity_hourly
WHERE $__timeFilter(hour) AND app_id != ''
GROUP BY time, app_id
ORDER BY time""", "time_series"),), width=24,
                  description="From the rollup rollup_app_activity_hourly (a materialized view over events): "
                  "cheap over months. docs/cookbook.md"),
        )),
    ),
)

DASHBOARDS = (fleet_impact, pipeline_health, privacy_controls, sampling, analyst_overview)
