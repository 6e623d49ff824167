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
import ssl
from pathlib import Path
from types import MappingProxyType
from typing import Any

import faust
from prometheus_client import start_http_server

from handtrace.core import signing
from handtrace.core.clock import now_us
from handtrace.core.controls import POLICY_KEY
from handtrace.core.rows import HEADER_ROWS, HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION, to_ipc
from handtrace.core.settings import SecurityProtocol, Settings, load_settings
from handtrace.core.signing import Refused, Verifier
from handtrace.core.topics import Topics
from handtrace.stream import metrics
from handtrace.stream.controls import (
    ControlAuth,
    ControlMessage,
    DeviceRegistry,
    dumps,
    employee_of_message,
    fold,
    loads,
    message_of,
    sender_offset,
)
from handtrace.stream.controls import decode as decode_controls
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
    """What every worker follows from the control plane, each reading all of it (no consumer
    group): the global policy (compacted policy topic) and the enrolled devices (compacted devices
    topic). ``ready`` is set once both have been read to their end at start-up, so no batch is
    judged by a policy older than the latest and no control by a stale device list.

    Only control-plane-signed records count (docs/adr/0009-authentic-controls.md): a policy is
    honoured when its version is greater than the one in force; ``history`` keeps recent
    policies as (broker append time µs, policy), newest last: those published within
    ``max_event_age_s`` of the stream's clock, the one in force at that horizon, and always the
    current one."""

    def __init__(self, verifier: Verifier, *, max_clock_offset_s: float = 86_400.0,
                 max_event_age_s: float = 7 * 86_400.0) -> None:
        self.verifier = verifier
        self.max_offset_us = int(max_clock_offset_s * 1_000_000)
        self.max_age_us = int(max_event_age_s * 1_000_000)
        self.policy = Policy()
        self.history: tuple[tuple[int, Policy], ...] = ()
        self.devices = DeviceRegistry()
        self.ready = asyncio.Event()
        self._sync_waiters: list[asyncio.Future[None]] = []
        self._last_sync = float("-inf")

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyState:
        """From settings; refuses (KeyConfigError, a clear message) without control-plane
        public keys outside dev_mode: nothing could be verified."""
        return cls(signing.verifier(settings), max_clock_offset_s=settings.stream.max_clock_offset_s,
                   max_event_age_s=settings.stream.max_event_age_s)

    def apply(self, msg: ControlMessage | bytes, now: int | None = None) -> str:
        """Apply one policy-topic record; returns ``policy_update`` or the refusal reason
        (counted in handtrace_stream_controls_rejected_total)."""
        if isinstance(msg, bytes):
            msg = ControlMessage(msg, POLICY_KEY)
        now = now_us() if now is None else now
        try:
            sig = self.verifier.verify(msg.headers, "policy", msg.key, msg.value)
            if sig.kind != signing.CONTROL_PLANE:
                raise Refused("not_permitted")
            offset = sender_offset(sig, msg, self.max_offset_us)
            rec = decode_controls(msg.value, "control_event")
            if rec["kind"] != "policy_update" or rec.get("policy") is None:
                raise Refused("not_permitted")
            new = Policy.from_record(rec["policy"])
            if new.version <= self.policy.version:
                raise Refused("stale_version")
        except Refused as r:
            metrics.CONTROLS_REJECTED.labels("policy", r.reason).inc()
            return r.reason
        self.policy = new
        at = msg.appended_us if msg.appended_us is not None else sig.sent_at_us + offset
        # Kept: every policy published within max_event_age (the oldest capture time accepted)
        # and the one in force at that horizon -- all an accepted event's capture time can need.
        entries = (*self.history, (at, new))
        horizon = now - self.max_age_us
        at_horizon = [i for i, (t, _) in enumerate(entries) if t <= horizon]
        self.history = entries[at_horizon[-1] if at_horizon else 0:]
        metrics.POLICY_VERSION.set(new.version)
        metrics.CONTROLS.labels("policy_update").inc()
        return "policy_update"

    def apply_device(self, msg: ControlMessage) -> str:
        """Apply one devices-topic record; returns ``enrolled``/``revoked`` or the refusal reason."""
        try:
            outcome = self.devices.apply(msg, self.verifier, self.max_offset_us)
        except Refused as r:
            metrics.CONTROLS_REJECTED.labels("devices", r.reason).inc()
            return r.reason
        metrics.CONTROLS.labels(f"device_{outcome}").inc()
        return outcome

    async def sync(self, timeout_s: float = 5.0) -> None:
        """Wait (bounded) until the followers have read what the topics held when called: a
        device-signed control may arrive just after its device's enrollment."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._last_sync < 2.0:
            return  # at most one wait every 2 s: forged device records cannot stall the fold
        self._last_sync = loop.time()
        fut: asyncio.Future[None] = loop.create_future()
        self._sync_waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), timeout_s)
        except TimeoutError:
            pass

    async def follow(self, settings: Settings, topic: str) -> None:
        """Follow the policy ``topic`` and the devices topic of ``settings`` (until cancelled)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        devices_topic = Topics.from_settings(settings.topics).devices
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap(), enable_auto_commit=False, group_id=None,
            **_aiokafka_security(settings),
        )
        await consumer.start()
        try:
            tps = [TopicPartition(t, p) for t in (topic, devices_topic)
                   for p in (consumer.partitions_for_topic(t) or {0})]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            end = await consumer.end_offsets(tps)
            while True:
                waiters, self._sync_waiters = self._sync_waiters, []
                if waiters:
                    end = await consumer.end_offsets(tps)
                batch = await consumer.getmany(timeout_ms=500)
                for tp, records in batch.items():
                    for r in records:
                        m = message_of(r)
                        if tp.topic == topic:
                            self.apply(m)
                        else:
                            self.apply_device(m)
                positions = {tp: await consumer.position(tp) for tp in tps}
                caught_up = all(positions[tp] >= end[tp] for tp in tps)
                if caught_up:
                    self.ready.set()
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
                else:
                    self._sync_waiters = waiters + self._sync_waiters
        finally:
            await consumer.stop()


def _aiokafka_security(settings: Settings) -> dict[str, Any]:
    k = settings.kafka
    if k.security_protocol is SecurityProtocol.PLAINTEXT:
        return {}
    opts: dict[str, Any] = {"security_protocol": k.security_protocol.value}
    if k.security_protocol in (SecurityProtocol.SSL, SecurityProtocol.SASL_SSL):
        ctx = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            ctx.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
        opts["ssl_context"] = ctx
    if k.sasl_mechanism:
        opts.update(sasl_mechanism=k.sasl_mechanism.value, sasl_plain_username=k.sasl_username,
                    sasl_plain_password=k.sasl_password.get_secret_value() if k.sasl_password else None)
    return opts


def _broker_credentials(settings: Settings) -> Any:
    k = settings.kafka
    if k.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
        ctx = None
        if k.security_protocol is SecurityProtocol.SASL_SSL:
            ctx = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        mech = k.sasl_mechanism.value if k.sasl_mechanism else "PLAIN"
        pw = k.sasl_password.get_secret_value() if k.sasl_password else ""
        if mech == "PLAIN":
            return faust.SASLCredentials(username=k.sasl_username, password=pw, ssl_context=ctx)
        return faust.SASLCredentials(username=k.sasl_username, password=pw, ssl_context=ctx,
                                     mechanism=mech)
    if k.security_protocol is SecurityProtocol.SSL:
        ctx = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
        if k.ssl_certfile:
            ctx.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
        return faust.SSLCredentials(ctx)
    return None


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app and its agent for these settings."""
    topics = Topics.from_settings(settings.topics)
    parts = settings.topics.partitions
    settings.state_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        settings.stream.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka.bootstrap().split(",")],
        broker_credentials=_broker_credentials(settings),
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
    policy_state = PolicyState.from_settings(settings)
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
        # Only authentic records change anyone's state (docs/adr/0009-authentic-controls.md);
        # refusals are counted by reason, never logged with the employee id.
        max_offset_us = int(settings.stream.max_clock_offset_s * 1_000_000)
        async for event in stream.events():
            if not policy_state.ready.is_set():
                await policy_state.ready.wait()  # enrolled devices known before judging anything
            msg = message_of(event.message)
            employee = employee_of_message(msg)
            auth = ControlAuth(policy_state.verifier, policy_state.devices, parts, max_offset_us)
            state = loads(controls_table.get(employee)) if employee else loads(None)
            result = fold(state, msg, auth, now_us=now_us())
            if result.outcome == "device_not_enrolled":
                await policy_state.sync()  # the enrollment may be just behind: look once more
                result = fold(state, msg, auth, now_us=now_us())
            if not result.applied:
                metrics.CONTROLS_REJECTED.labels("controls", result.outcome).inc()
                continue
            controls_table[employee] = dumps(result.state)
            metrics.CONTROLS.labels(result.outcome).inc()
            if result.clamped:
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
