"""The control plane's write side: pause, exemption, policy and device-enrollment records on
Kafka, with who, when and why -- each signed with the control plane's key at produce time
(docs/adr/0009-authentic-controls.md). Employee controls go to the controls topic keyed by
employee id (co-partitioned with their events); policy updates to the compacted policy topic;
enrollments to the compacted devices topic keyed by device id."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.controls import (
    MAX_PAUSE_MINUTES,
    MAX_POLICY_VERSION,
    POLICY_KEY,
    ControlError,
    control_record,
    erasure_record,
    pause_record,
    policy_record,
)
from handtrace.core.producer import producer_config
from handtrace.core.settings import Settings
from handtrace.core.signing import (
    CONTROL_PLANE,
    KeyConfigError,
    Refused,
    Signature,
    Signer,
    Verifier,
    issuer_signer,
    verifier,
)
from handtrace.core.topics import Topics

__all__ = ["MAX_PAUSE_MINUTES", "MAX_POLICY_VERSION", "POLICY_KEY", "ControlError", "active_exemptions",
           "control_record", "current_policy", "current_policy_version", "device_record", "enrolled_devices",
           "erasure_record", "erasures_in_force",
           "pause_record", "policy_record", "publish", "publish_device", "resign", "resign_exemptions"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _signer(settings: Settings) -> Signer:
    try:
        return issuer_signer(settings)
    except KeyConfigError as e:
        raise ControlError(str(e)) from None


def _send(settings: Settings, topic: str, role: str, key: bytes, value: bytes, timeout_s: float,
          signer: Signer | None = None) -> tuple[int, int]:
    signer = signer or _signer(settings)
    errors: list[str] = []
    delivered: list[tuple[int, int]] = []

    def report(err: Any, msg: Any) -> None:
        if err:
            errors.append(str(err))
        else:
            delivered.append((int(msg.partition()), int(msg.offset())))

    p = Producer(producer_config(settings.kafka))
    # Signed as late as possible: ht-sent-at is compared with the broker's append time.
    headers: list[tuple[str, str | bytes | None]] = list(signer.headers(role, key, value))
    p.produce(topic, key=key, value=value, headers=headers, on_delivery=report)
    remaining = p.flush(timeout_s)
    if remaining or errors or not delivered:
        raise ControlError(f"control not delivered to {topic}: {errors or 'timed out'}")
    return delivered[0]


def publish(settings: Settings, record: dict[str, Any], timeout_s: float = 30.0,
            signer: Signer | None = None) -> tuple[int, int]:
    """Sign one control and send it; wait until the broker has it (acks=all) and return its
    (partition, offset). Refused (ControlError) without a signing key outside dev mode."""
    topics = Topics.from_settings(settings.topics)
    if record["kind"] == "policy_update":
        topic, key, role = topics.policy, POLICY_KEY, "policy"
    else:
        if not record.get("employee_id"):
            raise ControlError(f"{record['kind']} needs an employee id")
        topic, key, role = topics.controls, record["employee_id"].encode(), "controls"
    return _send(settings, topic, role, key, codec.encode_record("control_event", record), timeout_s, signer)


def device_record(employee_id: str, device_id: str, public_key: str | bytes | None, *, actor: str,
                  reason: str = "", revoke: bool = False) -> dict[str, Any]:
    """A DeviceEnrollment (schemas/device_enrollment): ``public_key`` is what `handtrace agent
    device-key` printed (base64 of 32 bytes); a revoke needs none."""
    if not employee_id or not device_id:
        raise ControlError("an enrollment needs an employee id and a device id")
    raw = b""
    if isinstance(public_key, bytes):
        raw = public_key
    elif public_key:
        try:
            raw = base64.b64decode(public_key.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise ControlError("the device public key is not base64 (copy it from `handtrace agent "
                               "device-key` on the laptop)") from None
    if not revoke and len(raw) != 32:
        raise ControlError(f"a device public key is 32 bytes (Ed25519), got {len(raw)}")
    return {"enrollment_id": ids.uuid7_bytes(), "device_id": device_id, "employee_id": employee_id,
            "public_key": raw, "status": "revoked" if revoke else "enrolled", "occurred_at_us": now_us(),
            "actor": actor, "reason": reason}


def publish_device(settings: Settings, record: dict[str, Any], timeout_s: float = 30.0,
                   signer: Signer | None = None) -> None:
    """Sign one DeviceEnrollment and send it to the devices topic (keyed by device id)."""
    topics = Topics.from_settings(settings.topics)
    _send(settings, topics.devices, "devices", record["device_id"].encode(),
          codec.encode_record("device_enrollment", record), timeout_s, signer)


def _control_plane_verifier(settings: Settings) -> Verifier:
    """The configured public keys plus the control plane's own (it needs no verifier settings)."""
    own = _signer(settings)
    try:
        configured = verifier(settings)
    except KeyConfigError:
        configured = Verifier()
    return Verifier({**configured.keys, own.signer_id.split(":", 1)[1]: own.private_key.public_key()},
                    configured.retired)


def _signed_records(settings: Settings, topic: str, role: str, subject: str,
                    timeout_s: float) -> list[tuple[Signature, dict[str, Any]]]:
    """Every record of ``topic`` that a current control-plane key signed, partition by partition,
    each in order (forged or broken ones are skipped)."""
    check = _control_plane_verifier(settings)
    c = Consumer({**settings.kafka.librdkafka(), "group.id": f"handtrace-cli-{ids.uuid7_bytes().hex()}",
                  "enable.auto.commit": False, "enable.partition.eof": True})
    out: list[tuple[Signature, dict[str, Any]]] = []
    try:
        meta = c.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ControlError(f"cannot read {topic}: {meta.error if meta else 'no such topic'}")
        for partition in sorted(meta.partitions):
            _read_partition(c, check, topic, partition, role, subject, timeout_s, out)
    except ControlError:
        raise
    except Exception as e:
        raise ControlError(f"cannot read {topic}: {e}") from e
    finally:
        c.close()
    return out


def control_plane_record(check: Verifier, role: str, subject: str, headers: list[tuple[str, bytes]],
                         key: bytes | None, value: bytes) -> tuple[Signature, dict[str, Any]] | None:
    """(signature, decoded record) when a current control-plane key signed this message, else None
    (a forged or broken record counts for nothing)."""
    try:
        sig = check.verify(headers, role, key, value)
        if sig.kind == CONTROL_PLANE:
            return sig, codec.decode_record(value, subject)
    except (Refused, codec.DecodeError):
        pass
    return None


def _read_partition(c: Consumer, check: Verifier, topic: str, partition: int, role: str, subject: str,
                    timeout_s: float, out: list[tuple[Signature, dict[str, Any]]]) -> None:
    tp = TopicPartition(topic, partition)
    low, high = c.get_watermark_offsets(tp, timeout=timeout_s)
    if high <= low:
        return
    c.assign([TopicPartition(topic, partition, low)])
    while True:
        msg = c.poll(timeout_s)
        if msg is None:
            raise ControlError(f"timed out reading {topic}")
        err = msg.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                break
            raise ControlError(f"{topic}: {err.str()}")
        raw_headers = msg.headers() or []
        headers = [(k, v if isinstance(v, bytes) else (v or "").encode())
                   for k, v in (raw_headers.items() if isinstance(raw_headers, dict) else raw_headers)]
        signed = control_plane_record(check, role, subject, headers, msg.key(), msg.value() or b"")
        if signed is not None:
            out.append(signed)
        if (msg.offset() or 0) + 1 >= high:
            break


def current_policy(settings: Settings, timeout_s: float = 15.0) -> dict[str, Any] | None:
    """The policy in force: the highest control-plane-signed version on the policy topic."""
    topic = Topics.from_settings(settings.topics).policy
    return policy_in_force(_signed_records(settings, topic, "policy", "control_event", timeout_s))


def policy_in_force(records: Iterable[tuple[Signature, dict[str, Any]]]) -> dict[str, Any] | None:
    """The highest-versioned policy among control-plane-signed policy records (None: none)."""
    best: dict[str, Any] | None = None
    for _sig, rec in records:
        pol = rec.get("policy")
        if rec.get("kind") == "policy_update" and pol and (best is None or pol["version"] > best["version"]):
            best = pol
    return best


def current_policy_version(settings: Settings, timeout_s: float = 15.0) -> int:
    """The version of the policy in force (0 when there is none). What workers honour next must
    be greater."""
    pol = current_policy(settings, timeout_s)
    return int(pol["version"]) if pol else 0


def enrolled_devices(settings: Settings, timeout_s: float = 15.0) -> dict[str, dict[str, Any]]:
    """Device id -> its current DeviceEnrollment (control-plane-signed, newest per device), enrolled
    devices only."""
    topic = Topics.from_settings(settings.topics).devices
    return devices_enrolled(_signed_records(settings, topic, "devices", "device_enrollment", timeout_s))


def devices_enrolled(records: Iterable[tuple[Signature, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Device id -> its newest control-plane-signed enrollment, enrolled devices only."""
    latest: dict[str, tuple[int, dict[str, Any]]] = {}
    for sig, rec in records:
        d = rec["device_id"]
        if d not in latest or sig.sent_at_us > latest[d][0]:
            latest[d] = (sig.sent_at_us, rec)
    return {d: rec for d, (_t, rec) in latest.items() if rec["status"] == "enrolled"}


def resign(settings: Settings, *, actor: str, reason: str = "key rotation") -> tuple[int | None, int]:
    """Key rotation: re-publish the policy in force as version + 1 and every enrolled device, signed
    with the current signing key, so that the old key id can then be retired. Returns (new policy
    version or None, devices re-enrolled)."""
    pol = current_policy(settings)
    devices = enrolled_devices(settings)
    version = None
    if pol is not None:
        version = int(pol["version"]) + 1
        if version > MAX_POLICY_VERSION:
            raise ControlError(f"the policy in force has version {pol['version']}: no room above it")
        publish(settings, control_record("policy_update", employee_id=None, actor=actor, role="ops", reason=reason,
                                         policy={**pol, "version": version}))
    for rec in devices.values():
        publish_device(settings, device_record(rec["employee_id"], rec["device_id"], bytes(rec["public_key"]),
                                               actor=actor, reason=reason))
    return version, len(devices)


def active_exemptions(settings: Settings, timeout_s: float = 15.0) -> dict[str, int]:
    """Employee id -> effective time (µs) of their exemption in force: a control-plane-signed
    grant not followed by a revoke on the controls topic (keyed by employee: one partition each).
    Erasures are not exemptions here (:func:`erasures_in_force`)."""
    topic = Topics.from_settings(settings.topics).controls
    active: dict[str, int] = {}
    for _sig, rec in _signed_records(settings, topic, "controls", "control_event", timeout_s):
        employee, kind = rec.get("employee_id"), rec.get("kind")
        if not employee or rec.get("erasure_id"):
            continue
        if kind == "exemption_grant":
            active[employee] = _epoch_us(rec.get("exemption_effective_at_us") or rec["occurred_at_us"])
        elif kind == "exemption_revoke":
            active.pop(employee, None)
    return active


def erasures_in_force(settings: Settings, timeout_s: float = 15.0) -> dict[str, list[dict[str, Any]]]:
    """Employee id -> the control-plane-signed erasure suppressions on the controls topic (no
    revoke ends them)."""
    topic = Topics.from_settings(settings.topics).controls
    out: dict[str, list[dict[str, Any]]] = {}
    for _sig, rec in _signed_records(settings, topic, "controls", "control_event", timeout_s):
        if rec.get("kind") == "exemption_grant" and rec.get("employee_id") and rec.get("erasure_id"):
            out.setdefault(rec["employee_id"], []).append(rec)
    return out


def _epoch_us(at: Any) -> int:
    """A timestamp-micros field (the decoder gives a datetime) as epoch microseconds."""
    if isinstance(at, datetime):
        return (at - _EPOCH) // timedelta(microseconds=1)
    return int(at)


def resign_exemptions(settings: Settings, *, actor: str, reason: str = "key rotation") -> int:
    """Key rotation: grant every exemption in force again, with its original effective time,
    signed with the current key -- so that what was granted under the old key still counts for
    whoever folds the controls topic from its start once that key is retired (a new stream
    deployment, the API's state view). Returns how many were re-published. A worker that already
    holds the exemption folds a second, identical one: a later revoke ends both."""
    exemptions = active_exemptions(settings)
    for employee, effective_at_us in sorted(exemptions.items()):
        publish(settings, control_record("exemption_grant", employee_id=employee, actor=actor, role="hr",
                                         reason=reason, exemption_effective_at_us=effective_at_us))
    # Erasures too, with their erasure id (each applied once per id by the workers).
    erasures = erasures_in_force(settings)
    for employee, recs in sorted(erasures.items()):
        for erasure_id in dict.fromkeys(str(r["erasure_id"]) for r in recs):
            publish(settings, erasure_record(employee, erasure_id, actor=actor, reason=reason))
    return len(exemptions) + len(erasures)
