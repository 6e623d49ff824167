"""Topic names and their configuration: the one place that says what each topic is for.

All keyed topics share one partition count so that events, controls and the stream's output
for one employee land in the same partition number.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from handtrace.core.retention import days_for, topic_retention_ms
from handtrace.core.settings import DemoSettings, RetentionSettings, TopicSettings


@dataclass(frozen=True)
class TopicSpec:
    """A topic the project creates, with explicit partitions and configs."""

    name: str
    partitions: int
    configs: dict[str, str] = field(default_factory=dict)
    doc: str = ""


@dataclass(frozen=True)
class Topics:
    """Names of every handtrace topic for one prefix."""

    events: str
    controls: str
    policy: str
    devices: str
    heartbeats: str
    stored: str
    deadletter: str
    rejected: str
    screenshots: str
    screenshots_accepted: str
    demonstrations: str
    demonstrations_accepted: str
    audit: str

    @classmethod
    def from_settings(cls, s: TopicSettings) -> Topics:
        p = s.prefix
        return cls(
            events=f"{p}.events.raw",
            controls=f"{p}.controls",
            policy=f"{p}.policy",
            devices=f"{p}.devices",
            heartbeats=f"{p}.heartbeats",
            stored=f"{p}.events.accepted",
            deadletter=f"{p}.events.deadletter",
            rejected=f"{p}.events.rejected",
            screenshots=f"{p}.screenshots.raw",
            screenshots_accepted=f"{p}.screenshots.accepted",
            demonstrations=f"{p}.demonstrations.raw",
            demonstrations_accepted=f"{p}.demonstrations.accepted",
            audit=f"{p}.audit",
        )


RETENTION_CLASS: dict[str, str] = {
    "events.raw": "events", "events.accepted": "events", "events.deadletter": "events",
    "events.rejected": "events", "screenshots.raw": "events", "screenshots.accepted": "events",
    "demonstrations.raw": "demonstrations", "demonstrations.accepted": "demonstrations",
    "heartbeats": "heartbeats", "audit": "audit",
}
"""Topic (name after the prefix) -> the retention class it carries (core/retention.py): its
``retention.ms`` is the shorter of its own and the class's policy. Compacted topics (controls,
policy, devices) hold state, not a class: no time retention."""


def topic_specs(s: TopicSettings, demo: DemoSettings | None = None,
                retention: RetentionSettings | None = None) -> list[TopicSpec]:
    """Every topic with partitions and configs (compaction for state, retention for events);
    ``retention`` (default: the default policy) caps each topic's retention.ms by its class."""
    specs = _transport_specs(s, demo)
    policy = retention or RetentionSettings()
    out = []
    for spec in specs:
        klass = RETENTION_CLASS.get(spec.name[len(s.prefix) + 1:])
        if klass is not None and "retention.ms" in spec.configs:
            ms = topic_retention_ms(int(spec.configs["retention.ms"]), days_for(policy, klass))
            spec = TopicSpec(spec.name, spec.partitions, {**spec.configs, "retention.ms": str(ms)}, spec.doc)
        out.append(spec)
    return out


def _transport_specs(s: TopicSettings, demo: DemoSettings | None = None) -> list[TopicSpec]:
    """Every topic with its own (transport) configs, before the retention policy."""
    t = Topics.from_settings(s)
    # The broker stamps what agents and the control plane write with its own clock at append
    # (LogAppendTime): the stream compares it with the sender's ``ht-sent-at`` header to place
    # every sender's clock on one timeline (handtrace.core.clock.clock_offset_us).
    broker_time = {"message.timestamp.type": "LogAppendTime"}
    hours = s.events_retention_hours * 3600 * 1000
    max_msg = str(s.max_message_bytes)
    frame_max = (demo or DemoSettings()).max_frame_bytes
    return [
        TopicSpec(
            t.events,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": max_msg, "compression.type": "producer",
             **broker_time},
            "EventBatch messages from agents, keyed by employee id (raw: restricted access).",
        ),
        TopicSpec(
            t.controls,
            s.partitions,
            {"cleanup.policy": "compact", "min.compaction.lag.ms": str(7 * 24 * 3600 * 1000), **broker_time},
            "ControlEvent (pause, exemption) keyed by employee id; compacted, co-partitioned.",
        ),
        TopicSpec(
            t.policy,
            1,
            # History kept for 8 days (longer than the stream accepts late events): a widened
            # policy is judged against the one in force when backlog was captured.
            {"cleanup.policy": "compact", "min.compaction.lag.ms": str(8 * 24 * 3600 * 1000), **broker_time},
            "Global policy (allowlists, sampling, masking), keyed by scope; compacted.",
        ),
        TopicSpec(
            t.devices,
            1,
            {"cleanup.policy": "compact", **broker_time},
            "DeviceEnrollment (a laptop's public key bound to one employee, or revoked), keyed by "
            "device id, signed by the control plane; compacted, read to its end by every worker.",
        ),
        TopicSpec(
            t.screenshots,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": max_msg, "compression.type": "producer",
             **broker_time},
            "Screenshot images from agents (WebP/JPEG of allowlisted windows only), keyed by "
            "employee id; the batch's `screenshot` event carries the sha256 that names the image "
            "(raw: restricted access).",
        ),
        TopicSpec(
            t.screenshots_accepted,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": max_msg},
            "Screenshots that passed the stream's exemption, pause and allowlist rules, keyed and "
            "labelled by pseudonyms (partition = source partition).",
        ),
        TopicSpec(
            t.demonstrations,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": str(frame_max),
             "compression.type": "producer", **broker_time},
            "Submitted demonstrations from agents, keyed by employee id: a Demonstration header "
            "(instruction, frame manifest, events) then one message per frame image "
            "(docs/design/demonstrations.md; raw: restricted access).",
        ),
        TopicSpec(
            t.demonstrations_accepted,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": str(frame_max)},
            "Demonstrations and frames that passed the stream's rules, keyed by the employee "
            "pseudonym (partition = source partition); read by the sink's demonstration writer.",
        ),
        TopicSpec(
            t.audit,
            1,
            {"retention.ms": "-1", **broker_time},
            "The control-plane API's audit trail (JSON: who, role, action, target, reason, before -> "
            "after, allowed or refused), keyed by actor; kept forever, written only by the API "
            "(docs/design/control-plane.md).",
        ),
        TopicSpec(
            t.heartbeats,
            s.partitions,
            {"retention.ms": str(7 * 24 * 3600 * 1000)},
            "Agent Heartbeat messages keyed by device id.",
        ),
        TopicSpec(
            t.stored,
            s.partitions,
            {"retention.ms": str(hours), "max.message.bytes": max_msg},
            "Accepted, pseudonymised rows (Arrow IPC), partition = source partition of events.",
        ),
        TopicSpec(
            t.deadletter,
            s.partitions,
            {"retention.ms": str(30 * 24 * 3600 * 1000), "max.message.bytes": max_msg},
            "Messages the stream could not accept, with reason headers.",
        ),
        TopicSpec(
            t.rejected,
            s.partitions,
            {"retention.ms": str(30 * 24 * 3600 * 1000), "max.message.bytes": max_msg},
            "Accepted rows ClickHouse refused or the sink would not insert (Arrow IPC like "
            "events.accepted, pseudonymised), with ht-stage=sink, ht-reason and source-offset "
            "headers; partition = the accepted partition. At-least-once (dedup by ht-token).",
        ),
    ]
