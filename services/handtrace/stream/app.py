"""The Faust application: consume EventBatch messages, run the pipeline, publish accepted rows
to ``events.accepted`` in the SAME partition number (the sink's exactly-once bookkeeping relies
on it), and set rejected messages aside on the dead-letter topic with reason headers.

At-least-once, and a send that fails never lets an offset advance (issue #10, class 1). What
this relies on in faust-streaming (0.15, read from its source):

- ``Stream.take_events`` acks the events of a micro-batch in the ``finally`` of its generator,
  i.e. when the agent asks for the next micro-batch -- and ALSO when the generator is closed:
  after the agent raised (the asyncio async-generator finaliser runs ``aclose()``) or at stop
  (``Stream.on_stop`` closes it explicitly). An ack is ``Message.ack``: the message's refcount
  drops, and at zero the offset is marked committable (``Consumer.ack``).
- The consumer commits marked offsets every ``broker_commit_interval``, on stop, on rebalance
  and on an agent's error (``App._on_agent_error`` -> ``Consumer.on_task_error`` -> commit);
  before committing it only *flushes* the producer (``Consumer._commit_offsets``), which waits
  for the aiokafka accumulator to drain but does not fail when a send failed. A send's failure
  surfaces only on the future ``Topic.send`` returns (aiokafka's delivery future; Faust merely
  logs it in ``Topic._on_published``) -- or as ``ProducerSendError`` from ``send`` itself when
  aiokafka refuses a record before sending (``MessageSizeTooLargeError``).
- So before this change an oversized send crashed the agent, the finaliser acked the whole
  micro-batch, the error handler committed it: other employees' good batches were lost.

Hence ``Delivery``: every event of a micro-batch is *pinned* (``Message.incref``) before
anything is sent, so no ack -- from take_events, a crash or a stop -- can reach zero; its sends
are gathered (delivery confirmed by the broker: acks=all) and only then are the pins released
(``Event.ack``). Any failure (a send, or a bug while processing) stops the process at once with
``os._exit`` (EXIT_UNDELIVERED): the pins are never released, nothing past them is committed,
a restart replays the micro-batch, and the sink drops what it already stored by source offset.
What is committed is not Faust's decision for these topics: Faust also acks messages it *skips*
during a rebalance, so a confirmed micro-batch is *confirmed* to a ``CommitGate`` and only runs of
confirmed offsets from the broker's committed offset are committed; and every micro-batch first
goes through ``GatedConsumer.admit`` (each partition in offset order, none missing; a skipped
message is fetched again). See stream/commits.py and ADR 0020.
Micro-batch N+1 is processed while N's sends are in flight, but sent only once N's are
confirmed; within one micro-batch a partition's messages go out in rounds, one per partition
per round. So a partition's accepted messages are produced strictly in source-offset order and
never one past a failed one: the sink skips rows at or below the highest source offset it has
stored, so a later message stored before an earlier failed one would hide the earlier rows'
replay.

Controls are judged in order with the data, across topics: pauses and exemptions (the controls
topic, folded by their own agent into the controls table), the policy and the enrolled devices
(followed by ``PolicyState``) are other topics than the events, screenshots and demonstrations,
and Faust runs each topic's agent on its own. So before enforcing a micro-batch each data agent
waits (``in_force``) until every record those topics held after the micro-batch was fetched is
in force -- the controls fold confirms through the gate (``GatedConsumer.reach``), the followers
through their positions (``PolicyState.reach``). Without it a batch fetched with a pause
still queued behind other controls was judged without the pause.

Sizes are bounded so that no hostile message can make a send fail: raw payloads larger than the
topic's limit, and rows of one source message that alone do not fit, are dead-lettered; accepted
rows are cut into messages by rows and measured bytes (pipeline.pack_by_source); dead-letter
copies are compressed or truncated to fit (stream/deadletter.py).

After SIGTERM/SIGINT the worker stops gracefully within ``stream.stop_deadline_s`` or exits at
once (a broker that is gone blocks Faust's stop); since only confirmed offsets are ever marked,
that hard exit replays, never loses. Faust, aiokafka and mode never log below INFO, and their
log lines are cut before message contents (raw ids): see ``RawIdsOutOfLogs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import secrets
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn, cast

import faust
from faust.types import TP
from prometheus_client import start_http_server

from handtrace.core import signing
from handtrace.core.clock import now_us
from handtrace.core.controls import POLICY_KEY
from handtrace.core.kafka_security import aiokafka_security, faust_credentials
from handtrace.core.pii import redact_text
from handtrace.core.rows import HEADER_ROWS, HEADER_SOURCE_PARTITION, to_ipc
from handtrace.core.settings import Settings, load_settings
from handtrace.core.signing import Refused, Verifier
from handtrace.core.topics import Topics
from handtrace.stream import metrics
from handtrace.stream.commits import CommitGate, GatedConsumer
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
from handtrace.stream.deadletter import OutRecord, deadletter_record, message_budget, record_size
from handtrace.stream.demonstrations import DemonstrationEnforcer
from handtrace.stream.demonstrations import export_counts as export_demonstration_counts
from handtrace.stream.pipeline import (
    BatchOutcome,
    BatchPipeline,
    DeadLetter,
    SourceMessage,
    pack_by_source,
    transport_problem,
)
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


class MissingSecret(RuntimeError):
    """A secret the worker needs is not configured (and dev_mode is off)."""


def pseudonym_key(settings: Settings) -> bytes:
    """The configured HMAC key; only in dev_mode, one generated once under state_dir/secrets.
    Raises MissingSecret otherwise: two workers with their own generated keys would give one
    person two pseudonyms (issue #10, class 7)."""
    if settings.stream.pseudonym_key is not None:
        return settings.stream.pseudonym_key.get_secret_value().encode()
    if not settings.dev_mode:
        raise MissingSecret("no pseudonym key: set HANDTRACE_STREAM__PSEUDONYM_KEY (32+ characters, the same "
                            "on every worker), or HANDTRACE_DEV_MODE=true for a generated development key")
    path = settings.state_dir / "secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
        log.warning("dev_mode: generated a pseudonym key at %s", path)
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
        ValidateStep(st.max_future_skew_s, st.max_distinct_values_per_batch, st.max_event_age_s,
                     max_field_chars=st.max_field_chars),
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
    return BatchPipeline(steps, max_batch_events=st.max_batch_events,
                         max_clock_offset_us=int(st.max_clock_offset_s * 1_000_000))


def worker_pipeline(settings: Settings) -> BatchPipeline:
    """build_pipeline as the worker runs it: transport verified (key present, equal to the
    batch's employee id, in the key's partition) and raw payloads bounded by the topic limit."""
    pipe = build_pipeline(settings)
    pipe.partitions = settings.topics.partitions
    pipe.max_payload_bytes = settings.topics.max_message_bytes
    return pipe


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
        self._offsets: Any = None  # a consumer that never fetches: end offsets without waiting on a fetch
        self.applied: dict[TP, int] = {}  # per followed partition: the offset below which all is applied
        self._moved = asyncio.Event()

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

    async def end_offsets(self, extra: Sequence[TP]) -> dict[TP, int]:
        """The end offsets, now, of every partition of the policy and devices topics and of
        ``extra``, in one request on a connection of their own: a consumer that fetches queues
        such a request behind its long-poll fetch (the broker answers a connection's requests in
        order), ~0.5 s each."""
        from aiokafka import TopicPartition

        tps = [TopicPartition(t, p) for t, p in (*self.applied, *extra)]
        return {TP(tp.topic, tp.partition): x for tp, x in (await self._offsets.end_offsets(tps)).items()}

    async def reach(self, ends: Mapping[TP, int]) -> None:
        """Wait until the followers have applied every record below ``ends`` of the policy and
        devices topics (the caller has waited for ``ready``); other partitions are ignored."""
        started = warned = time.monotonic()
        while any(self.applied.get(p, x) < x for p, x in ends.items()):
            now = time.monotonic()
            if now - warned >= 60:
                warned = now
                log.warning("held for %.0f s until the policy and devices topics are read", now - started)
            moved = self._moved
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(moved.wait(), 1.0)

    async def follow(self, settings: Settings, topic: str) -> None:
        """Follow the policy ``topic`` and the devices topic of ``settings`` (until cancelled)."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        devices_topic = Topics.from_settings(settings.topics).devices
        consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap(), enable_auto_commit=False, group_id=None,
            **aiokafka_security(settings.kafka),
        )
        offsets = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka.bootstrap(), enable_auto_commit=False, group_id=None,
            **aiokafka_security(settings.kafka),
        )
        await consumer.start()
        await offsets.start()
        self._offsets = offsets
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
                self.applied = {TP(tp.topic, tp.partition): x for tp, x in positions.items()}
                self._moved.set()
                self._moved = asyncio.Event()
                caught_up = all(positions[tp] >= end[tp] for tp in tps)
                if caught_up:
                    self.ready.set()
                    for w in waiters:
                        if not w.done():
                            w.set_result(None)
                else:
                    self._sync_waiters = waiters + self._sync_waiters
        finally:
            await offsets.stop()
            await consumer.stop()


DEMO_MICRO_BATCH_MESSAGES = 16  # frames are up to demo.max_frame_bytes: bounds a micro-batch's memory
EXIT_UNDELIVERED = 75  # EX_TEMPFAIL: a send was not confirmed; a restart replays the micro-batch
EXIT_STOP_DEADLINE = 128 + signal.SIGTERM


def fail_stop(what: str, exc: BaseException) -> NoReturn:
    """Stop the process NOW, committing nothing more: the micro-batch's events stay pinned (never
    acked), so a restart replays them. No await between the failure and the exit, so no commit
    can run in between."""
    # Only the broker's and the clients' own errors are described (they never quote a record);
    # any other exception's text might quote a value (a raw id): its type only.
    from aiokafka.errors import KafkaError
    from faust.exceptions import ProducerSendError

    described = isinstance(exc, KafkaError | ProducerSendError)
    text = redact_text(f"{type(exc).__name__}: {exc}"[:300])[0] if described else type(exc).__name__
    log.critical("stopping: %s failed (%s); its source offsets are not committed and will be replayed", what, text)
    for h in logging.getLogger().handlers:
        h.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_UNDELIVERED)


class Delivery:
    """The sends of one micro-batch and the source events they came from: the events are pinned
    (refcount +1) from construction until every send is confirmed, so no ack can make their
    offsets committable before (module docstring); then they are confirmed to ``gate``, which
    alone decides what is committed (stream/commits.py)."""

    def __init__(self, events: Sequence[Any], gate: CommitGate | None = None) -> None:
        self.events = list(events)
        self.gate = gate
        for e in self.events:
            e.message.incref()

    def drop(self) -> None:
        """Release the pins without confirming anything (a rebalance came in): nothing at or past
        these offsets is committed, the next owner processes them."""
        for event in self.events:
            event.ack()

    async def send(self, rounds: Sequence[Sequence[tuple[Any, OutRecord]]]) -> None:
        """Send round by round, each confirmed before the next; then release the pins. A failure
        stops the process (fail_stop); a cancellation (stop) leaves the pins in place."""
        try:
            for batch in rounds:
                futures = [await topic.send(key=r.key, value=r.value, partition=r.partition, headers=r.headers,
                                            force=True) for topic, r in batch]
                await asyncio.gather(*futures)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- any unconfirmed send stops the worker
            fail_stop(f"a send of a micro-batch of {len(self.events)} messages", exc)
        if self.gate is not None:
            self.gate.confirm(e.message for e in self.events)
        for event in self.events:
            event.ack()


class Sender:
    """At most one micro-batch's sends in flight, in order (survives an agent restart)."""

    def __init__(self) -> None:
        self.inflight: asyncio.Future[None] | None = None

    async def submit(self, delivery: Delivery, rounds: Sequence[Sequence[tuple[Any, OutRecord]]]) -> None:
        """Wait until the previous micro-batch's sends are confirmed, then start this one's."""
        if self.inflight is not None:
            await asyncio.shield(self.inflight)
        self.inflight = asyncio.ensure_future(delivery.send(rounds))


Rounds = list[list[tuple[Any, OutRecord]]]  # (topic, record) sent together; each round confirmed before the next


def outbound(outcome: BatchOutcome, msgs: Sequence[SourceMessage], settings: Settings,
             accepted: Any, deadletter: Any, source_topic: str = "") -> tuple[Rounds, int, list[DeadLetter]]:
    """The micro-batch's records in send rounds (dead letters and each partition's first message,
    then each partition's next, ...), the rows they store, and all dead letters -- including the
    source messages whose rows alone exceed the message limit (row_too_large)."""
    budget = message_budget(settings.topics.max_message_bytes)
    by_source = {(m.partition, m.offset): m for m in msgs}
    deadletters = list(outcome.deadletters)
    per_partition: list[list[tuple[Any, OutRecord]]] = []
    stored = 0
    for p, table in outcome.rows.items():
        packed = pack_by_source(table, settings.stream.max_rows_per_message, budget - 256, to_ipc)
        records = []
        for rows, payload in packed.messages:
            headers = [(HEADER_SOURCE_PARTITION, str(p).encode()), (HEADER_ROWS, str(rows.num_rows).encode())]
            records.append((accepted, OutRecord(p, None, payload, headers)))
            stored += rows.num_rows
        per_partition.append(records)
        for off in packed.too_large:
            n = int((table.column("source_offset").to_numpy() == off).sum())
            deadletters.append(DeadLetter(by_source[(p, off)], "row_too_large",
                                          f"{n} accepted rows exceed the {budget} byte message limit", n))
    rounds: Rounds = [
        [(deadletter, deadletter_record(d, settings.topics.max_message_bytes, source_topic)) for d in deadletters]]
    for i in range(max((len(r) for r in per_partition), default=0)):
        batch = [r[i] for r in per_partition if i < len(r)]
        if i == 0:
            rounds[0] += batch
        else:
            rounds.append(batch)
    return [r for r in rounds if r], stored, deadletters


# Where third-party log lines start to show message contents (keys and values are raw ids).
_CONTENTS = re.compile(r"\bk=|\bkey=|\bv=|\bvalue=|\bheaders=|message <|<Event\b|<\w*Message\b|ConsumerRecord\(")
_THIRD_PARTY = ("faust", "aiokafka", "mode", "kafka")


class RawIdsOutOfLogs(logging.Filter):
    """Keeps message contents out of the logs: Faust, aiokafka and mode records below INFO are
    dropped (Faust logs every send's key and value at debug, ``Topic.publish_message``), and
    their other records are cut where message contents would start (``Topic._on_published``
    prints the whole pending message on a send error). Installed on the root handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] not in _THIRD_PARTY:
            return True
        if record.levelno < logging.INFO:
            return False
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 -- a filter must never raise into the caller
            record.msg, record.args = f"[unformattable {record.name} record withheld]", None
            return True
        if (m := _CONTENTS.search(text)) is not None:
            record.msg, record.args = text[:m.start()] + "[message contents withheld]", None
        return True


def quiet_third_party_loggers(root: logging.Logger) -> None:
    """RawIdsOutOfLogs on every root handler; third-party loggers no lower than INFO."""
    for h in root.handlers:
        if not any(isinstance(f, RawIdsOutOfLogs) for f in h.filters):
            h.addFilter(RawIdsOutOfLogs())
    for name in _THIRD_PARTY:
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.INFO:
            lg.setLevel(logging.INFO)


class Worker(faust.Worker):
    """Faust's worker with the logs kept free of raw ids and a hard stop deadline."""

    stop_deadline_s: float = 8.0

    def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
        """Faust's own set-up, then RawIdsOutOfLogs on the handlers it created."""
        super().on_setup_root_logger(logger, level)
        quiet_third_party_loggers(logger)

    def _schedule_shutdown(self, signum: signal.Signals) -> None:
        # mode stops the services one by one; with the broker gone the consumer's commit and the
        # producer's flush wait for request timeouts (minutes). Only confirmed offsets are ever
        # marked committable, so exiting without them loses nothing (issue #10, class 8).
        if not self._signal_stop_time:
            timer = threading.Timer(self.stop_deadline_s, _stop_deadline_passed, args=(self.stop_deadline_s,))
            timer.daemon = True
            timer.start()
        super()._schedule_shutdown(signum)


def _stop_deadline_passed(deadline_s: float) -> None:
    sys.stderr.write(f"handtrace.stream: not stopped {deadline_s:g}s after the signal; exiting now "
                     "(unconfirmed offsets were never committed: they are replayed)\n")
    sys.stderr.flush()
    os._exit(EXIT_STOP_DEADLINE)


def export_counts(outcome: BatchOutcome, stored: int, deadletters: Sequence[DeadLetter], messages: int) -> None:
    """A micro-batch's counts into the metrics (the one place, so every path counts alike)."""
    metrics.BATCH_EVENTS.observe(outcome.events_in)
    for reason, count in outcome.dropped.items():
        metrics.EVENTS.labels(reason).inc(count)
    for kind, count in outcome.redacted.items():
        if kind.startswith("truncated_"):
            metrics.FIELDS_TRUNCATED.labels(kind.removeprefix("truncated_")).inc(count)
        else:
            metrics.REDACTED.labels(kind).inc(count)
    for (selector, decision), count in outcome.sampling.items():
        metrics.SAMPLING_ROWS.labels(metrics.selector_label(selector), decision).inc(count)
    for d in deadletters:
        metrics.DEADLETTERS.labels(d.reason).inc()
        metrics.EVENTS.labels(f"deadlettered_{d.reason}").inc(d.events)
    refused = len({(d.message.partition, d.message.offset) for d in deadletters})
    metrics.MESSAGES.labels("deadlettered").inc(refused)
    metrics.MESSAGES.labels("accepted").inc(messages - refused)
    metrics.EVENTS.labels("stored").inc(stored)


class App(faust.App):
    """Faust's app whose consumer commits only what ``gate`` says (stream/commits.py)."""

    gate: CommitGate

    def _new_consumer(self) -> GatedConsumer:
        consumer = GatedConsumer(self.transport, callback=self.topics.on_message, loop=self.transport.loop,
                                 on_partitions_revoked=self._on_partitions_revoked,
                                 on_partitions_assigned=self._on_partitions_assigned, beacon=self.beacon)
        consumer.gate = self.gate
        return consumer


def create_app(settings: Settings) -> faust.App:
    """Build the Faust app and its agent for these settings."""
    topics = Topics.from_settings(settings.topics)
    parts = settings.topics.partitions
    settings.state_dir.mkdir(parents=True, exist_ok=True)  # Faust creates only the last level
    app = App(
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
        # Frames of demonstrations are up to demo.max_frame_bytes (the demonstration topics' limit).
        producer_max_request_size=max(settings.topics.max_message_bytes, settings.demo.max_frame_bytes),
        consumer_max_fetch_size=max(settings.topics.max_message_bytes, settings.demo.max_frame_bytes),
        producer_compression_type=None,  # accepted rows are lz4-compressed Arrow IPC already
        producer_linger_ms=5,
        datadir=str(settings.state_dir / "faust"),
        Worker=type("Worker", (Worker,), {"stop_deadline_s": settings.stream.stop_deadline_s}),
    )
    # What the worker processes; a source offset is committed only after every offset before it
    # was confirmed here (stream/commits.py): never on Faust's acks alone.
    gate = app.gate = CommitGate([topics.events, topics.screenshots, topics.demonstrations, topics.controls])

    async def admitted(events: Sequence[Any]) -> list[Any]:
        """The events an agent may process, each partition's in offset order with none missing
        (GatedConsumer.admit); a failure to learn where a partition starts stops the worker."""
        try:
            return await cast(GatedConsumer, app.consumer).admit(list(events))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- nothing of this micro-batch was processed: replayed
            fail_stop("sequencing a micro-batch", e)

    async def in_force(events: Sequence[Any]) -> bool:
        """Wait until every control, policy and device record appended before these events were
        fetched is in force (folded into the controls table, applied by the followers): the
        controls are other topics, read by other agents, so without this an event can be judged
        before the pause or exemption published ahead of it (issue #6: cross-topic order). The
        events' partitions of the controls topic (co-partitioned: same key, same partition) and
        every partition of the policy and devices topics. False: a rebalance came in; the
        micro-batch is dropped unconfirmed (replayed)."""
        epoch = gate.epoch
        consumer = cast(GatedConsumer, app.consumer)
        wanted = [TP(topics.controls, p) for p in sorted({e.message.partition for e in events})]
        with metrics.CONTROLS_WAIT_SECONDS.time():
            ends = await policy_state.end_offsets(wanted)
            await policy_state.reach(ends)
            return await consumer.reach({p: x for p, x in ends.items() if p.topic == topics.controls}, epoch)

    source = app.topic(topics.events, value_type=bytes, key_type=bytes, partitions=parts)
    control_topic = app.topic(topics.controls, value_type=bytes, key_type=bytes, partitions=parts)
    # Per-employee pauses and exemptions, co-partitioned with the events (same key, same
    # partition count); a changelog topic rebuilds it after a restart.
    controls_table = app.Table("employee-controls", default=None, partitions=parts,
                               key_type=str, value_type=str, help="pauses and exemptions by employee")
    policy_state = PolicyState.from_settings(settings)
    accepted = app.topic(topics.stored, value_type=bytes, key_type=bytes, partitions=parts)
    deadletter = app.topic(topics.deadletter, value_type=bytes, key_type=bytes, partitions=parts)
    pipeline = worker_pipeline(settings)
    sender = Sender()

    @app.agent(source)
    async def enforce(stream: Any) -> None:
        # Micro-batches: per-message Python and per-call polars overhead dominate small agent
        # batches, so whole groups of messages are decoded and enforced at once.
        async for events in stream.take_events(settings.stream.micro_batch_messages,
                                               within=settings.stream.micro_batch_wait_s):
            events = await admitted(events)
            if not events:
                continue
            delivery = Delivery(events, gate)  # pinned before anything can fail (module docstring)
            try:
                if not policy_state.ready.is_set():
                    # Never enforce before the policy in force is known. Waiting here, inside the
                    # iteration, not before it: a Faust agent that has not started iterating when
                    # table recovery completes was seen to never receive messages after a restart.
                    await policy_state.ready.wait()
                if not await in_force(events):
                    delivery.drop()
                    continue
                msgs = [source_message(e.message) for e in events]
                employees = {m.key.decode(errors="replace") for m in msgs if m.key}
                controls = {emp: loads(controls_table.get(emp)) for emp in employees}
                with metrics.PROCESS_SECONDS.time():
                    outcome = pipeline.process_many(msgs, now_us(), policy=policy_state.policy, controls=controls,
                                                    policy_history=policy_state.history)
                    rounds, stored, deadletters = outbound(outcome, msgs, settings, accepted, deadletter,
                                                          topics.events)
                export_counts(outcome, stored, deadletters, len(msgs))
                await sender.submit(delivery, rounds)
            except asyncio.CancelledError:
                raise  # stopping: the pins keep these offsets uncommitted
            except Exception as e:  # noqa: BLE001 -- a crash here would let Faust ack and commit them
                fail_stop("enforcing a micro-batch", e)

    shot_topic = app.topic(topics.screenshots, value_type=bytes, key_type=bytes, partitions=parts)
    shots_accepted = app.topic(topics.screenshots_accepted, value_type=bytes, key_type=bytes, partitions=parts)
    shot_steps = screenshot_steps(pipeline.steps)
    shot_sender = Sender()
    budget = message_budget(settings.topics.max_message_bytes)

    @app.agent(shot_topic)
    async def enforce_screenshots(stream: Any) -> None:
        # The event pipeline's own steps decide for every image (handtrace.stream.screenshots).
        async for events in stream.take_events(100, within=0.5):
            events = await admitted(events)
            if not events:
                continue
            delivery = Delivery(events, gate)
            try:
                if not policy_state.ready.is_set():
                    await policy_state.ready.wait()
                if not await in_force(events):
                    delivery.drop()
                    continue
                batch, refused = [], []
                for e in events:
                    m = source_message(e.message)
                    problem = transport_problem(m, (m.key or b"").decode(errors="replace"), parts)
                    if problem is None and record_size(m.key, m.payload, m.headers) * 2 > budget:
                        # accepted headers are derived from these (redaction may lengthen them)
                        problem = ("payload_too_large", f"{len(m.payload)} byte image, message limit {budget}")
                    if problem is not None:
                        refused.append(DeadLetter(m, *problem, 1))
                    else:
                        batch.append(ScreenshotMessage(m, dict(m.headers)))
                employees = {m.message.key.decode(errors="replace") for m in batch if m.message.key}
                controls = {emp: loads(controls_table.get(emp)) for emp in employees}
                ctx = BatchContext(now_us(), policy_state.policy, MappingProxyType(controls), policy_state.history)
                accepted_shots, dropped = enforce_screenshot_batch(batch, shot_steps, ctx) if batch else ([], {})
                records: list[tuple[Any, OutRecord]] = []
                for a in accepted_shots:
                    r = OutRecord(a.partition, a.key, a.value, a.headers)
                    if record_size(r.key, r.value, r.headers) > budget:
                        dropped["screenshot_too_large"] = dropped.get("screenshot_too_large", 0) + 1
                    else:
                        records.append((shots_accepted, r))
                for reason, count in dropped.items():
                    metrics.EVENTS.labels(reason).inc(count)
                metrics.EVENTS.labels("screenshot_stored").inc(len(records))
                for d in refused:
                    metrics.DEADLETTERS.labels(f"screenshot_{d.reason}").inc()
                records += [(deadletter, deadletter_record(d, settings.topics.max_message_bytes, topics.screenshots))
                            for d in refused]
                await shot_sender.submit(delivery, [records] if records else [])
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                fail_stop("enforcing a micro-batch of screenshots", e)

    # Demonstrations (issue #11): headers and frames through the event pipeline's own steps, no
    # sampling (handtrace.stream.demonstrations). Small micro-batches: a frame is up to
    # demo.max_frame_bytes. Delivery/Sender as above: nothing is acked before its sends are confirmed.
    demo_topic = app.topic(topics.demonstrations, value_type=bytes, key_type=bytes, partitions=parts)
    demo_accepted = app.topic(topics.demonstrations_accepted, value_type=bytes, key_type=bytes, partitions=parts)
    demo_enforcer = DemonstrationEnforcer(
        pipeline.steps, partitions=parts, max_frame_bytes=settings.demo.max_frame_bytes,
        max_deadletter_bytes=settings.topics.max_message_bytes, max_batch_events=settings.stream.max_batch_events,
        max_clock_offset_us=int(settings.stream.max_clock_offset_s * 1_000_000), source_topic=topics.demonstrations)
    demo_sender = Sender()

    @app.agent(demo_topic)
    async def enforce_demonstrations(stream: Any) -> None:
        async for events in stream.take_events(DEMO_MICRO_BATCH_MESSAGES, within=0.5):
            events = await admitted(events)
            if not events:
                continue
            delivery = Delivery(events, gate)
            try:
                if not policy_state.ready.is_set():
                    await policy_state.ready.wait()
                if not await in_force(events):
                    delivery.drop()
                    continue
                msgs = [source_message(e.message) for e in events]
                employees = {m.key.decode(errors="replace") for m in msgs if m.key}
                controls = {emp: loads(controls_table.get(emp)) for emp in employees}
                ctx = BatchContext(now_us(), policy_state.policy, MappingProxyType(controls), policy_state.history)
                outcome = demo_enforcer.enforce(msgs, ctx)
                export_demonstration_counts(outcome)
                await demo_sender.submit(delivery, outcome.rounds(demo_accepted, deadletter))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001
                fail_stop("enforcing a micro-batch of demonstrations", e)

    @app.agent(control_topic)
    async def fold_controls(stream: Any) -> None:
        # Only authentic records change anyone's state (docs/adr/0009-authentic-controls.md);
        # refusals are counted by reason, never logged with the employee id.
        max_offset_us = int(settings.stream.max_clock_offset_s * 1_000_000)
        async for event in stream.events():
            if not await admitted([event]):
                continue
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
                gate.confirm([event.message])
                continue
            controls_table[employee] = dumps(result.state)
            metrics.CONTROLS.labels(result.outcome).inc()
            if result.clamped:
                metrics.PAUSES_CLAMPED.inc()
            gate.confirm([event.message])

    @app.timer(interval=5.0)
    async def _refetch_stalled() -> None:
        # A partition whose every fetched message Faust skipped in a rebalance (stream/commits.py).
        if app.rebalancing:
            return
        try:
            await cast(GatedConsumer, app.consumer).refetch_stalled()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 -- a net, not a path: the next tick tries again
            log.warning("checking for stalled partitions failed (%s)", type(e).__name__)

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
    sys.argv = [sys.argv[0], "worker", "-l", settings.stream.log_level, "--without-web"]
    app.main()


def main() -> None:
    """Run one stream worker (blocks until stopped by SIGTERM/SIGINT); exits 2 with one line
    naming what to set when a secret is missing."""
    settings = load_settings()
    # Every missing secret at once (one line each), before anything starts.
    problems = []
    for check in (pseudonym_key, signing.verifier):
        try:
            check(settings)
        except (MissingSecret, signing.KeyConfigError) as e:
            problems.append(f"handtrace.stream: {e}")
    if problems:
        sys.stderr.write("\n".join(problems) + "\n")
        raise SystemExit(2)
    run_worker(create_app(settings), settings)
