"""The Faust application: consume EventBatch messages, run the pipeline, publish accepted rows
to ``events.accepted`` in the SAME partition number (the sink's exactly-once bookkeeping relies
on it), and set rejected messages aside on the dead-letter topic with reason headers.

At-least-once: Faust flushes the producer before committing source offsets, so a crash replays
messages; the sink drops replays by source offset (services/handtrace/sink/writer.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
from pathlib import Path
from types import MappingProxyType
from typing import Any

import faust
from prometheus_client import start_http_server

from handtrace.core.clock import now_us
from handtrace.core.codec import DecodeError, decode_record
from handtrace.core.kafka_security import aiokafka_security, faust_credentials
from handtrace.core.rows import HEADER_ROWS, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, to_ipc
from handtrace.core.settings import Settings, load_settings
from handtrace.core.topics import Topics
from handtrace.stream import metrics
from handtrace.stream.controls import apply_control, dumps, loads
from handtrace.stream.pipeline import BatchPipeline, SourceMessage, split_by_source
from handtrace.stream.policy import Policy
from handtrace.stream.screenshots import ScreenshotMessage, screenshot_steps
from handtrace.stream.screenshots import enforce as enforce_screenshot_batch
from handtrace.stream.steps import BatchContext, Step
from handtrace.stream.steps.allowlist import AllowlistStep
from handtrace.stream.steps.exemption import ExemptionStep
from handtrace.stream.steps.pause import PauseStep
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.redact import RedactStep
from handtrace.stream.steps.sample import PointerDecimateStep, SampleStep
from handtrace.stream.steps.validate import ValidateStep

log = logging.getLogger("handtrace.stream")


def pseudonym_key(settings: Settings) -> bytes:
    """The configured HMAC key, or (development) one generated once under state_dir/secrets."""
    if settings.stream.pseudonym_key is not None:
        return settings.stream.pseudonym_key.get_secret_value().encode()
    path = settings.state_dir / "secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        log.warning(
            "generated a development pseudonym key at %s; set HANDTRACE_STREAM__PSEUDONYM_KEY in production", path
        )
    return Path(path).read_text().strip().encode()


_LOG_APPEND_TIME = 1  # Kafka's timestamp type of a record stamped by the broker at append


def source_message(message: Any) -> SourceMessage:
    """A consumed Faust message as the pipeline sees it: the broker's append time only when the
    topic stamps it (LogAppendTime; a producer's own CreateTime proves nothing), headers kept."""
    ts = message.timestamp
    appended = int(ts * 1_000_000) if ts and message.timestamp_type == _LOG_APPEND_TIME else None
    headers = tuple((k, bytes(v)) for k, v in (message.headers or ()))
    return SourceMessage(message.value, message.partition, message.offset, message.key, appended, headers)


def build_pipeline(settings: Settings) -> BatchPipeline:
    """The steps in order, from settings. Order matters: drop what must not be stored
    (exempt, paused) before anything else looks at it; pseudonymise last."""
    st = settings.stream
    key = pseudonym_key(settings)
    steps: list[Step] = [
        ValidateStep(st.max_future_skew_s, st.max_distinct_values_per_batch),
        ExemptionStep(skew_margin_s=st.clock_skew_margin_s),
        PauseStep(skew_margin_s=st.clock_skew_margin_s),
        AllowlistStep(),
        # Sampling decisions are keyed by a key derived from the pseudonym key, so they cannot be
        # predicted (or steered) without it, and replays decide identically.
        SampleStep(key=hashlib.sha256(b"handtrace-sampling:" + key).digest(), episode_s=st.episode_s),
    ]
    if st.pointer_max_hz:
        steps.append(PointerDecimateStep(max_hz=st.pointer_max_hz))
    steps += [RedactStep(), PseudonymiseStep(key)]
    return BatchPipeline(steps, max_batch_events=st.max_batch_events)


class PolicyState:
    """The global policy in force, followed from the compacted policy topic by every worker
    (no consumer group: each worker reads all of it). ``ready`` is set once the topic has been
    read to its end at start-up, so no batch is judged by a policy older than the latest."""

    def __init__(self) -> None:
        self.policy = Policy()
        self.ready = asyncio.Event()

    def apply(self, payload: bytes) -> None:
        try:
            rec = decode_record(payload, "control_event")
        except DecodeError as e:
            metrics.CONTROLS.labels(f"invalid_{e.reason}").inc()
            return
        if rec["kind"] != "policy_update" or rec.get("policy") is None:
            return
        new = Policy.from_record(rec["policy"])
        if new.version >= self.policy.version:
            self.policy = new
            metrics.POLICY_VERSION.set(new.version)

    async def follow(self, settings: Settings, topic: str) -> None:
        from aiokafka import AIOKafkaConsumer, TopicPartition

        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap(), enable_auto_commit=False, group_id=None,
            **aiokafka_security(settings.kafka),
        )
        await consumer.start()
        try:
            tps = [TopicPartition(topic, p) for p in (consumer.partitions_for_topic(topic) or {0})]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    for r in records:
                        self.apply(r.value)
                if not self.ready.is_set():
                    positions = {tp: await consumer.position(tp) for tp in tps}
                    if all(positions[tp] >= end[tp] for tp in tps):
                        self.ready.set()
        finally:
            await consumer.stop()


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app and its agent for these settings."""
    topics = Topics.from_settings(settings.topics)
    parts = settings.topics.partitions
    settings.state_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        settings.stream.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka.bootstrap().split(",")],
        broker_credentials=faust_credentials(settings.kafka),
        value_serializer="raw",
        key_serializer="raw",
        web_enabled=False,
        store="memory://",
        topic_partitions=parts,
        consumer_auto_offset_reset="earliest",
        broker_commit_interval=1.0,
        broker_session_timeout=settings.stream.session_timeout_s,
        broker_heartbeat_interval=min(3.0, settings.stream.session_timeout_s / 3),
        producer_max_request_size=settings.topics.max_message_bytes,
        consumer_max_fetch_size=settings.topics.max_message_bytes,
        producer_compression_type=None,  # accepted rows are lz4-compressed Arrow IPC already
        producer_linger_ms=5,
        datadir=str(settings.state_dir / "faust"),
    )
    source = app.topic(topics.events, value_type=bytes, key_type=bytes, partitions=parts)
    control_topic = app.topic(topics.controls, value_type=bytes, key_type=bytes, partitions=parts)
    # Per-employee pauses and exemptions, co-partitioned with the events (same key, same
    # partition count); a changelog topic rebuilds it after a restart.
    controls_table = app.Table("employee-controls", default=None, partitions=parts,
                               key_type=str, value_type=str, help="pauses and exemptions by employee")
    policy_state = PolicyState()
    accepted = app.topic(topics.stored, value_type=bytes, key_type=bytes, partitions=parts)
    deadletter = app.topic(topics.deadletter, value_type=bytes, key_type=bytes, partitions=parts)
    pipeline = build_pipeline(settings)

    @app.agent(source)
    async def enforce(stream: Any) -> None:
        # Micro-batches: per-message Python and per-call polars overhead dominate small agent
        # batches, so whole groups of messages are decoded and enforced at once.
        async for events in stream.take_events(settings.stream.micro_batch_messages,
                                               within=settings.stream.micro_batch_wait_s):
            if not policy_state.ready.is_set():
                # Never enforce before the policy in force is known. Waiting here, inside the
                # iteration, not before it: a Faust agent that has not started iterating when
                # table recovery completes was seen to never receive messages after a restart.
                await policy_state.ready.wait()
            msgs = [source_message(e.message) for e in events]
            employees = {m.key.decode(errors="replace") for m in msgs if m.key}
            controls = {emp: loads(controls_table.get(emp)) for emp in employees}
            with metrics.PROCESS_SECONDS.time():
                outcome = pipeline.process_many(msgs, now_us(), policy=policy_state.policy, controls=controls)
                payloads = [(p, to_ipc(chunk), chunk) for p, t in outcome.rows.items()
                            for chunk in split_by_source(t, settings.stream.max_rows_per_message)]
            metrics.BATCH_EVENTS.observe(outcome.events_in)
            for reason, count in outcome.dropped.items():
                metrics.EVENTS.labels(reason).inc(count)
            for kind, count in outcome.redacted.items():
                metrics.REDACTED.labels(kind).inc(count)
            for (selector, decision), count in outcome.sampling.items():
                metrics.SAMPLING_ROWS.labels(metrics.selector_label(selector), decision).inc(count)
            for d in outcome.deadletters:
                metrics.MESSAGES.labels("deadlettered").inc()
                metrics.DEADLETTERS.labels(d.reason).inc()
                metrics.EVENTS.labels(f"deadlettered_{d.reason}").inc(d.events)
                await deadletter.send(
                    key=None, value=d.message.payload, partition=d.message.partition, force=True,
                    headers=[(HEADER_SOURCE_PARTITION, str(d.message.partition).encode()),
                             (HEADER_SOURCE_OFFSET, str(d.message.offset).encode()),
                             ("ht-reason", d.reason.encode()), ("ht-detail", d.detail[:1000].encode())],
                )
            metrics.MESSAGES.labels("accepted").inc(len(msgs) - len(outcome.deadletters))
            metrics.EVENTS.labels("stored").inc(outcome.stored)
            for partition, payload, table in payloads:
                # Same partition number as the source: the sink's per-partition offset
                # bookkeeping (writer.py) relies on it.
                await accepted.send(
                    key=None, value=payload, partition=partition, force=True,
                    headers=[(HEADER_SOURCE_PARTITION, str(partition).encode()),
                             (HEADER_ROWS, str(table.num_rows).encode())],
                )

    shot_topic = app.topic(topics.screenshots, value_type=bytes, key_type=bytes, partitions=parts)
    shots_accepted = app.topic(topics.screenshots_accepted, value_type=bytes, key_type=bytes, partitions=parts)
    shot_steps = screenshot_steps(pipeline.steps)

    @app.agent(shot_topic)
    async def enforce_screenshots(stream: Any) -> None:
        # The event pipeline's own steps decide for every image (handtrace.stream.screenshots).
        async for events in stream.take_events(100, within=0.5):
            if not policy_state.ready.is_set():
                await policy_state.ready.wait()
            batch = [ScreenshotMessage(m := source_message(e.message), dict(m.headers)) for e in events]
            employees = {m.message.key.decode(errors="replace") for m in batch if m.message.key}
            controls = {emp: loads(controls_table.get(emp)) for emp in employees}
            ctx = BatchContext(now_us(), policy_state.policy, MappingProxyType(controls))
            accepted_shots, dropped = enforce_screenshot_batch(batch, shot_steps, ctx)
            for reason, count in dropped.items():
                metrics.EVENTS.labels(reason).inc(count)
            metrics.EVENTS.labels("screenshot_stored").inc(len(accepted_shots))
            for a in accepted_shots:
                await shots_accepted.send(key=a.key, value=a.value, partition=a.partition, force=True,
                                          headers=a.headers)

    @app.agent(control_topic)
    async def fold_controls(stream: Any) -> None:
        async for event in stream.events():
            try:
                rec = decode_record(event.message.value, "control_event")
            except DecodeError as e:
                metrics.CONTROLS.labels(f"invalid_{e.reason}").inc()
                continue
            employee = rec.get("employee_id")
            if not employee or rec["kind"] == "policy_update":
                metrics.CONTROLS.labels("ignored").inc()
                continue
            state, clamped = apply_control(loads(controls_table.get(employee)), rec)
            controls_table[employee] = dumps(state)
            metrics.CONTROLS.labels(rec["kind"]).inc()
            if clamped:
                metrics.PAUSES_CLAMPED.inc()

    @app.task
    async def _follow_policy() -> None:
        await policy_state.follow(settings, topics.policy)

    @app.task
    async def _expose_metrics() -> None:
        if settings.stream.metrics_port:
            start_http_server(settings.stream.metrics_port, addr=settings.metrics_host)

    return app


def run_worker(app: faust.App, settings: Settings) -> None:
    """Run ``app`` as a Faust worker with our log level and no Faust web server (blocks)."""
    import sys

    sys.argv = [sys.argv[0], "worker", "-l", settings.stream.log_level, "--without-web"]
    app.main()


def main() -> None:
    """Run one stream worker (blocks until stopped by SIGTERM/SIGINT)."""
    settings = load_settings()
    run_worker(create_app(settings), settings)
