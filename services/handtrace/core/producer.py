"""Producer settings every handtrace producer shares."""

from __future__ import annotations

from typing import Any

from handtrace.core.settings import KafkaSettings


def producer_config(kafka: KafkaSettings, **extra: Any) -> dict[str, Any]:
    """Idempotent, acks=all, and the Java-compatible murmur2 partitioner: events (agents),
    controls (control plane) and Faust (aiokafka, murmur2 too) must agree on which partition a
    key lands in, or an employee's events and controls would not be co-partitioned."""
    return {
        **kafka.librdkafka(),
        "enable.idempotence": True,
        "acks": "all",
        "partitioner": "murmur2_random",
        "log_level": 3,
        **extra,
    }
