"""The control plane's write side: pause, exemption and policy controls as ControlEvent records
on Kafka, with who, when and why. Employee controls go to the controls topic keyed by employee
id (co-partitioned with their events); policy updates to the compacted policy topic."""

from __future__ import annotations

from typing import Any

from confluent_kafka import Producer

from handtrace.core import codec
from handtrace.core.controls import (
    MAX_PAUSE_MINUTES,
    POLICY_KEY,
    ControlError,
    control_record,
    pause_record,
    policy_record,
)
from handtrace.core.producer import producer_config
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics

__all__ = ["MAX_PAUSE_MINUTES", "POLICY_KEY", "ControlError", "control_record", "pause_record", "policy_record",
           "publish"]

def publish(settings: Settings, record: dict[str, Any], timeout_s: float = 30.0) -> None:
    """Send one control and wait until the broker has it (acks=all)."""
    topics = Topics.from_settings(settings.topics)
    if record["kind"] == "policy_update":
        topic, key = topics.policy, POLICY_KEY
    else:
        if not record.get("employee_id"):
            raise ControlError(f"{record['kind']} needs an employee id")
        topic, key = topics.controls, record["employee_id"].encode()
    errors: list[str] = []
    p = Producer(producer_config(settings.kafka))
    p.produce(topic, key=key, value=codec.encode_record("control_event", record),
              on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
    remaining = p.flush(timeout_s)
    if remaining or errors:
        raise ControlError(f"control not delivered to {topic}: {errors or 'timed out'}")
