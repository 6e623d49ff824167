"""Topic retention follows the retention policy through the real broker (issue #14 part R): topics
are created with retention.ms capped by their class's policy, an existing topic's retention.ms is
changed when the policy changes (its other configs left alone), and `handtrace db retention`
reports and (--apply) fixes a topic that differs."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from confluent_kafka.admin import AdminClient
from confluent_kafka.admin._config import ConfigResource
from confluent_kafka.admin._resource import ResourceType
from typer.testing import CliRunner

from handtrace.core import clickhouse
from handtrace.core.admin import admin_client, ensure_topics, topic_retention
from handtrace.core.settings import RetentionSettings, Settings, settings_env
from handtrace.core.topics import RETENTION_CLASS, Topics

DAY_MS = 86_400_000


def configs(admin: AdminClient, topic: str) -> dict[str, str]:
    (fut,) = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)]).values()
    return {k: v.value for k, v in fut.result().items()}


def classed(s: Settings) -> list[str]:
    return [f"{s.topics.prefix}.{suffix}" for suffix in RETENTION_CLASS]


def test_topics_follow_the_policy_and_change_with_it(settings_factory: Callable[..., Settings],
                                                     tmp_path: Path) -> None:
    s = settings_factory(warehouse={"retention": {"events_days": 1, "demonstrations_days": 2,
                                                  "heartbeats_days": 3, "audit_days": 400}})
    admin = admin_client(s.kafka)
    t = Topics.from_settings(s.topics)
    got = topic_retention(admin, classed(s))
    assert got[t.events] == got[t.stored] == got[t.screenshots] == got[t.deadletter] == DAY_MS
    assert got[t.demonstrations] == got[t.demonstrations_accepted] == 2 * DAY_MS
    assert got[t.heartbeats] == 3 * DAY_MS and got[t.audit] == 400 * DAY_MS
    max_before = configs(admin, t.events)["max.message.bytes"]

    # the policy changes: existing topics follow, nothing is created, other configs stay
    longer = RetentionSettings(events_days=2, demonstrations_days=2, heartbeats_days=3, audit_days=0)
    assert ensure_topics(s.kafka, s.topics, retention=longer) == []
    got = topic_retention(admin, classed(s))
    assert got[t.events] == got[t.rejected] == 2 * DAY_MS
    assert got[t.audit] == -1  # audit forever
    assert got[t.heartbeats] == 3 * DAY_MS
    assert configs(admin, t.events)["max.message.bytes"] == max_before
    assert configs(admin, t.controls)["cleanup.policy"] == "compact"
    assert ensure_topics(s.kafka, s.topics, retention=longer) == []  # idempotent
    assert topic_retention(admin, classed(s)) == got

    # the CLI: settings say 1 day for events again -> topics differ -> exit 1; --apply fixes them
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}
    env.update(settings_env(s))
    env["HANDTRACE_CLICKHOUSE__DSN"] = f"chdb://{tmp_path / 'ch'}"
    runner = CliRunner()
    try:
        check_cli(runner, env, t)
    finally:
        clickhouse.close(env["HANDTRACE_CLICKHOUSE__DSN"])
    assert topic_retention(admin, [t.events, t.audit]) == {t.events: DAY_MS, t.audit: 400 * DAY_MS}


def check_cli(runner: CliRunner, env: dict[str, str], t: Topics) -> None:
    from handtrace.cli import app

    res = runner.invoke(app, ["db", "retention", "--json"], env=env)
    rep = json.loads(res.stdout)
    assert res.exit_code == 1, res.output
    by_topic = {r["topic"]: r for r in rep["topics"]}
    assert by_topic[t.events]["matches"] is False and by_topic[t.events]["retention_ms"] == 2 * DAY_MS
    assert by_topic[t.events]["wanted_ms"] == DAY_MS
    assert by_topic[t.demonstrations]["matches"] is True

    res = runner.invoke(app, ["db", "retention", "--apply", "--json"], env=env)
    rep = json.loads(res.stdout)
    assert rep["topic_changes"][t.events] == {"before_ms": 2 * DAY_MS, "after_ms": DAY_MS}
    assert all(r["matches"] for r in rep["topics"]), rep["topics"]
    assert res.exit_code == 0, res.output
