"""What the agent learns from the control plane, read at its own wakeups (never a wakeup of its own):
the global policy (compacted policy topic) and this employee's exemption grants and revokes (the
controls topic, only the partition its key maps to, only records with its key).

The last policy and exemption state are cached on disk, so a laptop that starts offline applies
the policy it last had; a laptop that never had one captures nothing (fails closed).

Only what the control plane signed is honoured (docs/adr/0009-authentic-controls.md): a policy
must carry a valid control-plane signature and a version greater than the one in force; an
exemption grant or revoke must be control-plane-signed, from a sender clock within the offset
bound of the broker's append time, and new (by control id). Refused records are counted by reason
in ``ControlState.refused`` (an unsigned grant would only make the laptop capture less, but it is
still not the control plane's word).

Reading the whole controls partition filters other employees' records on the laptop: fine for a
pilot, but production deployments should serve each agent its own controls through a small
authenticated endpoint (ACLs cannot restrict Kafka reads by key) -- recorded in docs/adr.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, TIMESTAMP_LOG_APPEND_TIME, Consumer, KafkaError, TopicPartition

from handtrace.core import codec
from handtrace.core.clock import clock_offset_us
from handtrace.core.codec import DecodeError
from handtrace.core.controls import POLICY_KEY
from handtrace.core.partitioning import partition_for_key
from handtrace.core.policy import Policy
from handtrace.core.signing import CONTROL_PLANE, Refused, Verifier

_SEEN_MAX = 256


@dataclass
class ControlState:
    """The agent's view of its controls: policy record and exemption, with read positions."""

    policy: dict[str, Any] | None = None
    exempt_from_us: int | None = None
    policy_offset: int = 0
    controls_offset: int = 0
    undecodable: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    """Records not honoured, by reason (unsigned, bad_signature, unknown_key, stale_version, ...)."""
    seen: list[str] = field(default_factory=list)
    """Control ids of the last grants and revokes applied (a replay is applied once)."""
    erased_from_us: int | None = None
    """Set by an erasure (an exemption grant with an erasure id, ``handtrace erase``): capture stays
    off for good -- no revoke ends it (docs/adr/0015-erasure.md)."""
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        d = {k: v for k, v in self.__dict__.items() if k != "errors"}
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ControlState:
        d = json.loads(text)
        return cls(**{k: d[k] for k in ("policy", "exempt_from_us", "policy_offset", "controls_offset",
                                         "undecodable", "refused", "seen", "erased_from_us") if k in d})


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _us(value: Any) -> int | None:
    """A timestamp field as integer microseconds (fastavro gives datetimes for timestamp-micros)."""
    if isinstance(value, datetime):
        return (value - _EPOCH) // timedelta(microseconds=1)
    return int(value) if value is not None else None


def _jsonable(rec: Any) -> Any:
    if isinstance(rec, dict):
        return {k: _jsonable(v) for k, v in rec.items()}
    if isinstance(rec, list):
        return [_jsonable(v) for v in rec]
    if isinstance(rec, bytes):
        return rec.hex()
    return rec


class ControlPlaneFollower:
    """Reads new policy and controls up to the end of their partitions, on demand."""

    def __init__(self, consumer_conf: dict[str, Any], *, policy_topic: str, controls_topic: str,
                 employee_id: str, state_path: Path, verifier: Verifier,
                 max_clock_offset_s: float = 86_400.0) -> None:
        self._conf = {**consumer_conf, "group.id": f"handtrace-agent-{os.getpid()}",
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "auto.offset.reset": "earliest"}
        self.policy_topic = policy_topic
        self.controls_topic = controls_topic
        self.key = employee_id.encode()
        self.verifier = verifier
        self.max_offset_us = int(max_clock_offset_s * 1_000_000)
        self.state_path = state_path
        self.state = ControlState()
        if state_path.exists():
            try:
                self.state = ControlState.from_json(state_path.read_text())
            except (OSError, ValueError, TypeError, KeyError):
                self.state = ControlState()  # a damaged cache is rebuilt from the topics
        self._consumer: Consumer | None = None

    @property
    def policy(self) -> Policy | None:
        """The newest policy known, or None."""
        return Policy.from_record(self.state.policy) if self.state.policy else None

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None

    def _partition_of_key(self, consumer: Consumer, timeout_s: float) -> int:
        md = consumer.list_topics(self.controls_topic, timeout=timeout_s)
        parts = sorted(md.topics[self.controls_topic].partitions)
        if not parts:
            raise RuntimeError(f"topic {self.controls_topic} has no partitions")
        # Java-compatible murmur2, as every handtrace producer partitions keys.
        return int(parts[partition_for_key(self.key, len(parts))])

    def refresh(self, timeout_s: float = 5.0) -> bool:
        """Read what is new; True when the policy or exemption changed. Errors (broker down)
        are recorded in ``state.errors`` and leave the cached state in force."""
        before = (self.state.policy, self.state.exempt_from_us)
        try:
            if self._consumer is None:
                self._consumer = Consumer(self._conf)
            c = self._consumer
            part = self._partition_of_key(c, timeout_s)
            self._read(c, TopicPartition(self.policy_topic, 0, self.state.policy_offset or OFFSET_BEGINNING),
                       self._on_policy, timeout_s)
            self._read(c, TopicPartition(self.controls_topic, part,
                                         self.state.controls_offset or OFFSET_BEGINNING),
                       self._on_control, timeout_s)
        except Exception as e:  # noqa: BLE001 -- offline is normal for a laptop
            self.state.errors.append(str(e))
            del self.state.errors[:-10]
            self.close()
            return False
        # Closed until the next wakeup: an idle consumer would keep connections (and the radio)
        # busy with metadata refreshes between wakeups.
        self.close()
        self._save()
        return (self.state.policy, self.state.exempt_from_us) != before

    def _read(self, c: Consumer, tp: TopicPartition, handle: Any, timeout_s: float) -> None:
        _low, high = c.get_watermark_offsets(tp, timeout=timeout_s)
        start = tp.offset if tp.offset >= 0 else 0
        if start >= high:
            return
        c.assign([tp])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = c.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    break
                raise RuntimeError(err.str())
            handle(msg)
            offset = msg.offset()
            if offset is not None and offset + 1 >= high:
                break
        c.unassign()

    def _refuse(self, reason: str) -> None:
        self.state.refused[reason] = self.state.refused.get(reason, 0) + 1

    def _verified(self, msg: Any, role: str) -> dict[str, Any] | None:
        """The decoded record if the control plane signed it (from a clock within bounds), else
        None (counted by reason)."""
        value = msg.value() or b""
        try:
            sig = self.verifier.verify(msg.headers() or (), role, msg.key(), value)
            if sig.kind != CONTROL_PLANE:
                raise Refused("not_permitted")
            ts_type, ts_ms = msg.timestamp()
            appended = ts_ms * 1000 if ts_type == TIMESTAMP_LOG_APPEND_TIME and ts_ms > 0 else None
            if clock_offset_us(sig.sent_at_us, appended, self.max_offset_us) is None:
                raise Refused("clock_offset")
        except Refused as r:
            self._refuse(r.reason)
            return None
        try:
            return codec.decode_record(value, "control_event")
        except DecodeError:
            self.state.undecodable += 1
            return None

    def _on_policy(self, msg: Any) -> None:
        self.state.policy_offset = msg.offset() + 1
        if msg.key() != POLICY_KEY:
            self._refuse("key_mismatch")
            return
        rec = self._verified(msg, "policy")
        if rec is None:
            return
        pol = rec.get("policy")
        if rec.get("kind") != "policy_update" or pol is None:
            self._refuse("not_permitted")
        elif self.state.policy is None or int(pol["version"]) > int(self.state.policy["version"]):
            self.state.policy = _jsonable(pol)
        else:
            self._refuse("stale_version")

    def _on_control(self, msg: Any) -> None:
        self.state.controls_offset = msg.offset() + 1
        if msg.key() != self.key:
            return
        rec = self._verified(msg, "controls")
        if rec is None:
            return
        kind = rec.get("kind")
        if kind not in ("exemption_grant", "exemption_revoke"):
            return
        cid = bytes(rec["control_id"]).hex()
        if cid in self.state.seen:
            self._refuse("replay")
            return
        self.state.seen = [*self.state.seen, cid][-_SEEN_MAX:]
        at = _us(rec.get("exemption_effective_at_us")) or _us(rec.get("occurred_at_us"))
        if kind == "exemption_grant" and at is not None:
            self.state.exempt_from_us = at
            if rec.get("erasure_id") and self.state.erased_from_us is None:
                self.state.erased_from_us = at
        elif kind == "exemption_revoke":
            self.state.exempt_from_us = self.state.erased_from_us

    def _save(self) -> None:
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(self.state.to_json())
        os.replace(tmp, self.state_path)
