"""``handtrace db retention``: every table, topic and the frame store against the retention policy
(core/retention.py has the mechanisms; docs/operations.md, "Retention", the why).

``apply`` makes things match: TTLs (only in the process that owns the database: on the embedded
engine while the sink runs, the sink does it at its start), topic retention.ms, and deletes frame
objects no live ``frames`` row references.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from handtrace.core import retention as r
from handtrace.core.settings import RetentionSettings, Settings


@dataclass
class RetentionReport:
    """What ``handtrace db retention`` shows (``as_dict`` is its --json)."""

    policy: dict[str, int]
    tables: list[r.TableReport] = field(default_factory=list)
    ttl_changes: list[r.TtlChange] = field(default_factory=list)
    topics: list[dict[str, Any]] = field(default_factory=list)
    topic_changes: dict[str, tuple[int, int]] = field(default_factory=dict)
    objects: r.ObjectsReport | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy_days": self.policy,
            "tables": [t.as_dict() for t in self.tables],
            "ttl_changes": [c.__dict__ for c in self.ttl_changes],
            "topics": self.topics,
            "topic_changes": {k: {"before_ms": b, "after_ms": a} for k, (b, a) in self.topic_changes.items()},
            "frame_objects": self.objects.as_dict() if self.objects else None,
            "notes": self.notes,
        }

    @property
    def past_policy(self) -> int:
        """Rows still stored beyond their policy (0 once merges ran)."""
        return sum(t.past_policy for t in self.tables)


def policy_days(policy: RetentionSettings) -> dict[str, int]:
    return {c: r.days_for(policy, c) for c in r.CLASSES}


def warehouse_part(report: RetentionReport, client: Any, database: str, policy: RetentionSettings, *,
                   owner: bool, apply: bool) -> None:
    """The sink's tables (and TTL changes with ``apply`` when this process owns the database)."""
    from handtrace.sink.schema import RETENTION, apply_retention

    if apply and owner:
        report.ttl_changes += apply_retention(client, database, policy)
    elif apply:
        report.notes.append("TTLs not changed here: the sink owns the embedded database and applies the "
                            "retention settings at its start (restart it with the new settings, or stop it "
                            "and run `handtrace db retention --apply`).")
    report.tables += r.table_reports(client, database, RETENTION, policy, store="warehouse")


def fleet_part(report: RetentionReport, client: Any, database: str, policy: RetentionSettings, *,
               apply: bool) -> None:
    """The fleet store's heartbeats (its own store; see fleet/store.py)."""
    from handtrace.fleet.store import RETENTION, apply_retention

    if apply:
        report.ttl_changes += apply_retention(client, database, policy)
    report.tables += r.table_reports(client, database, RETENTION, policy, store="fleet")


def topics_part(report: RetentionReport, settings: Settings, *, apply: bool, timeout_s: float = 5.0) -> None:
    """retention.ms of every classed topic against the policy (the broker must answer)."""
    from confluent_kafka import KafkaException

    from handtrace.core.admin import TopicError, admin_client, align_retention, topic_retention
    from handtrace.core.topics import RETENTION_CLASS, topic_specs

    specs = [s for s in topic_specs(settings.topics, settings.demo, settings.warehouse.retention)
             if s.name[len(settings.topics.prefix) + 1:] in RETENTION_CLASS]
    try:
        admin = admin_client(settings.kafka)
        existing = admin.list_topics(timeout=timeout_s).topics
        present = [s for s in specs if s.name in existing]
        if apply:
            report.topic_changes = align_retention(admin, present, timeout_s)
        current = topic_retention(admin, [s.name for s in present], timeout_s)
    except (KafkaException, TopicError) as e:
        report.notes.append(f"topics not checked: the broker did not answer ({e})")
        return
    for s in specs:
        want = int(s.configs["retention.ms"])
        have = current.get(s.name)
        report.topics.append({"topic": s.name, "data_class": RETENTION_CLASS[s.name[len(settings.topics.prefix) + 1:]],
                              "wanted_ms": want, "retention_ms": have,
                              "matches": have == want if have is not None else None})


def objects_part(report: RetentionReport, client: Any, database: str, store: Any, policy: RetentionSettings, *,
                 apply: bool, progress: Callable[[str], None] = lambda _m: None) -> None:
    report.objects = r.expire_frame_objects(client, database, store, policy, apply=apply, progress=progress)
