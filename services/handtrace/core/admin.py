"""Create and check the project's topics on any cluster (local or configured)."""

from __future__ import annotations

import logging
import time

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import AlterConfigOpType, ConfigEntry, ConfigResource  # not re-exported
from confluent_kafka.admin._resource import ResourceType
from confluent_kafka.cimpl import NewTopic  # what confluent_kafka.admin re-exports (not in its __all__)

from handtrace.core.settings import KafkaSettings, RetentionSettings, TopicSettings
from handtrace.core.topics import TopicSpec, topic_specs

log = logging.getLogger("handtrace.admin")


class TopicError(RuntimeError):
    """A topic exists with the wrong shape, or could not be created."""


def admin_client(kafka: KafkaSettings) -> AdminClient:
    """An AdminClient for the configured cluster."""
    return AdminClient({**kafka.librdkafka(), "log_level": 3})


def ensure_topics(kafka: KafkaSettings, topics: TopicSettings, timeout_s: float = 30.0, *,
                  retention: RetentionSettings | None = None) -> list[str]:
    """Create every missing handtrace topic; check partition counts of existing ones and set their
    ``retention.ms`` to the policy's (``retention``: default policy when None).

    Returns the names created now. Raises TopicError listing every problem at once.
    """
    specs = topic_specs(topics, retention=retention)
    return ensure_specs(kafka, specs, topics.replication_factor, timeout_s)


def ensure_specs(kafka: KafkaSettings, specs: list[TopicSpec], replication: int = 1,
                 timeout_s: float = 30.0) -> list[str]:
    """Create the given topics if missing and wait until metadata shows them."""
    admin = admin_client(kafka)
    existing = admin.list_topics(timeout=timeout_s).topics
    problems = [
        f"{s.name} has {len(existing[s.name].partitions)} partitions, expected {s.partitions}"
        for s in specs
        if s.name in existing and len(existing[s.name].partitions) != s.partitions
    ]
    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, replication, config=dict(s.configs)) for s in missing],
            operation_timeout=timeout_s,
        )
        for name, fut in futures.items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as e:
                if e.args[0].name() != "TOPIC_ALREADY_EXISTS":
                    problems.append(f"{name}: {e.args[0].str()}")
    present = [s for s in specs if s.name in existing]
    if present:
        try:
            for name, (before, after) in align_retention(admin, present, timeout_s).items():
                log.warning("topic %s: retention.ms %s -> %s (retention policy)", name, before, after)
        except TopicError as e:
            problems.append(str(e))
    if problems:
        raise TopicError("topic problems:\n  " + "\n  ".join(problems))
    deadline = time.monotonic() + timeout_s
    names = {s.name for s in specs}
    while time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout_s).topics
        if all(n in md and md[n].error is None and md[n].partitions for n in names):
            return created
        time.sleep(0.2)
    raise TopicError(f"topics not visible in metadata after {timeout_s}s: {sorted(names)}")


def group_lag(kafka: KafkaSettings, group_id: str, topic: str, timeout_s: float = 5.0) -> int:
    """Messages in ``topic`` not yet committed by consumer group ``group_id`` (all partitions)."""
    from confluent_kafka import Consumer, TopicPartition

    c = Consumer({**kafka.librdkafka(), "group.id": group_id, "enable.auto.commit": False,
                  "log_level": 3})
    try:
        md = c.list_topics(topic, timeout=timeout_s).topics[topic]
        tps = [TopicPartition(topic, p) for p in md.partitions]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                committed = c.committed(tps, timeout=timeout_s)
                break
            except KafkaException:  # e.g. NOT_COORDINATOR while a new group's coordinator loads
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        lag = 0
        for tp in committed:
            lo, hi = c.get_watermark_offsets(tp, timeout=timeout_s, cached=False)
            pos = tp.offset if tp.offset >= 0 else lo
            lag += max(hi - pos, 0)
        return lag
    finally:
        c.close()


def topic_retention(admin: AdminClient, names: list[str], timeout_s: float = 30.0) -> dict[str, int]:
    """The ``retention.ms`` in force of each existing topic (-1: forever)."""
    if not names:
        return {}
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in names],
                                     request_timeout=timeout_s)
    out: dict[str, int] = {}
    for res, fut in futures.items():
        try:
            entries = fut.result()
        except KafkaException as e:
            raise TopicError(f"{res.name}: describing configs failed: {e.args[0].str()}") from None
        out[res.name] = int(entries["retention.ms"].value)
    return out


def align_retention(admin: AdminClient, specs: list[TopicSpec], timeout_s: float = 30.0) -> dict[str, tuple[int, int]]:
    """Set ``retention.ms`` of existing topics whose value differs from their spec (only that
    config: incremental, the topic's other configs are left alone) and wait until the brokers show
    it. Returns {name: (before, after)}."""
    wanted = {s.name: int(s.configs["retention.ms"]) for s in specs if "retention.ms" in s.configs}
    current = topic_retention(admin, list(wanted), timeout_s)
    changes = {n: (current[n], ms) for n, ms in wanted.items() if n in current and current[n] != ms}
    if not changes:
        return {}
    resources = [ConfigResource(ResourceType.TOPIC, n, incremental_configs=[
        ConfigEntry("retention.ms", str(after), incremental_operation=AlterConfigOpType.SET)])
        for n, (_before, after) in changes.items()]
    problems = []
    for res, fut in admin.incremental_alter_configs(resources, request_timeout=timeout_s).items():
        try:
            fut.result()
        except KafkaException as e:
            problems.append(f"{res.name}: setting retention.ms failed: {e.args[0].str()}")
    if problems:
        raise TopicError("; ".join(problems))
    # The controller accepted the change; brokers apply it from the metadata log a moment later:
    # wait until describing shows it, so callers (and a re-run) see the policy in force.
    deadline = time.monotonic() + timeout_s
    while (pending := [n for n, ms in topic_retention(admin, list(changes), timeout_s).items()
                       if ms != changes[n][1]]):
        if time.monotonic() > deadline:
            raise TopicError(f"retention.ms of {pending} not in force after {timeout_s}s")
        time.sleep(0.1)
    return changes
