"""Folding ControlEvent records into per-employee control state (pauses, exemptions, erasures) -- only
records that are authentic (docs/adr/0009-authentic-controls.md).

A record on the controls topic is honoured only if

- it is keyed by its own ``employee_id`` and sits in that key's partition (else the state would
  land in a table partition that is not the one of the person's events);
- it is signed by the control plane (any employee control, grant or revoke), or by a device that
  the control plane enrolled for exactly that employee, and then only for what an employee may
  ask for themselves (pause, resume, exemption request);
- its sender's clock (signed ``ht-sent-at``) is within ``max_clock_offset`` of the broker's
  append time: an old record written again is refused, a recent one applied once (by control id).

Everything else is refused, counted by reason, and changes nothing. Pruning of old windows runs
on the stream's clock, never on a time a record claims.

Pure functions and plain values: the Faust app keeps the state in a changelog-backed table
(JSON from :func:`dumps`) and follows the devices topic into a :class:`DeviceRegistry`; the same
fold runs in tests.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from handtrace.core.clock import clock_offset_us
from handtrace.core.codec import DecodeError, decode_record
from handtrace.core.partitioning import partition_for_key
from handtrace.core.signing import CONTROL_PLANE, DEVICE, Refused, Signature, Verifier
from handtrace.stream.policy import MAX_PAUSE_US, EmployeeControls, Exemption, PauseWindow

RETENTION_US = 8 * 24 * 3600 * 1_000_000  # longer than any event can be late (raw retention)
_HOUR_US = 3600 * 1_000_000

EMPLOYEE_KINDS = frozenset({"pause_start", "pause_end", "exemption_request"})
"""What a device may say for its own employee. Grants and revokes are the control plane's."""
CONTROL_PLANE_KINDS = EMPLOYEE_KINDS | {"exemption_grant", "exemption_revoke"}
"""What the control plane may issue on the controls topic (policies go to the policy topic)."""

REJECT_REASONS = ("unsigned", "bad_signature", "unknown_key", "retired_key", "device_not_enrolled",
                  "not_permitted", "stale_version", "clock_offset", "wrong_partition", "key_mismatch",
                  "replay", "invalid")
"""Every reason a control, policy or enrollment is refused (the bounded metrics label)."""


def _us(value: Any) -> int | None:
    if value is None or isinstance(value, int):
        return value
    if isinstance(value, datetime):
        return int(value.timestamp() * 1_000_000)
    return int(value)


@dataclass(frozen=True)
class ControlMessage:
    """One consumed message of the controls, policy or devices topic, as the fold sees it."""

    value: bytes
    key: bytes | None
    partition: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()
    appended_us: int | None = None
    """The broker's append time (LogAppendTime), None when the topic does not stamp it."""


def message_of(message: Any) -> ControlMessage:
    """A consumed Faust/aiokafka message as a ControlMessage (append time only if LogAppendTime)."""
    ts = getattr(message, "timestamp", None)
    ts_type = getattr(message, "timestamp_type", None)
    appended: int | None = None
    if ts and ts_type == 1:
        # Faust gives seconds (float); aiokafka ConsumerRecord gives milliseconds (int).
        appended = int(ts * 1_000_000) if isinstance(ts, float) else int(ts) * 1000
    headers = tuple((k, bytes(v) if v is not None else b"") for k, v in (getattr(message, "headers", None) or ()))
    # A tombstone (no value) is a record like any other here: unsigned, so refused.
    return ControlMessage(bytes(message.value or b""), bytes(message.key) if message.key is not None else None,
                          int(message.partition), headers, appended)


def message_of_confluent(message: Any) -> ControlMessage:
    """A confluent_kafka.Message as a ControlMessage (append time only if LogAppendTime)."""
    ts_type, ts_ms = message.timestamp()
    appended = ts_ms * 1000 if ts_type == 2 and ts_ms > 0 else None  # 2: TIMESTAMP_LOG_APPEND_TIME
    headers = tuple((k, bytes(v) if v is not None else b"") for k, v in (message.headers() or ()))
    return ControlMessage(message.value() or b"", message.key(), int(message.partition()), headers, appended)


def decode(value: bytes, subject: str) -> dict[str, Any]:
    """Decode or refuse as ``invalid``."""
    try:
        return decode_record(value, subject)
    except DecodeError as e:
        raise Refused("invalid", e.reason) from None


def sender_offset(sig: Signature, msg: ControlMessage, max_clock_offset_us: int) -> int:
    """The signer's clock offset against the broker's append time; refused (``clock_offset``)
    when it is further off than ``max_clock_offset_us`` -- also what refuses an old genuine
    record written to the topic again later."""
    offset = clock_offset_us(sig.sent_at_us, msg.appended_us, max_clock_offset_us)
    if offset is None:
        raise Refused("clock_offset")
    return offset


# ---------------------------------------------------------------- enrolled devices


@dataclass(frozen=True)
class Enrollment:
    """A device's standing: enrolled for ``employee_id`` with ``public_key``, or revoked (None).
    ``sent_at_us`` orders the control plane's decisions about one device (a replay of an older
    enrollment after a revoke is refused)."""

    employee_id: str
    public_key: Ed25519PublicKey | None
    sent_at_us: int


@dataclass
class DeviceRegistry:
    """Enrolled devices, followed from the compacted devices topic (every worker reads it all)."""

    devices: dict[str, Enrollment] = field(default_factory=dict)
    _keys: dict[str, Ed25519PublicKey] = field(default_factory=dict, repr=False)

    def public_keys(self) -> Mapping[str, Ed25519PublicKey]:
        """Device id -> public key, enrolled devices only (kept up to date, not rebuilt per call)."""
        return self._keys

    def employee_of(self, device_id: str) -> str | None:
        """The employee a device is enrolled for (None: not enrolled, or revoked)."""
        e = self.devices.get(device_id)
        return e.employee_id if e is not None and e.public_key is not None else None

    def apply(self, msg: ControlMessage, verifier: Verifier, max_clock_offset_us: int) -> str:
        """Apply one devices-topic record; returns ``enrolled``/``revoked`` or raises Refused."""
        sig = verifier.verify(msg.headers, "devices", msg.key, msg.value)
        if sig.kind != CONTROL_PLANE:
            raise Refused("not_permitted")
        sender_offset(sig, msg, max_clock_offset_us)
        rec = decode(msg.value, "device_enrollment")
        device = rec["device_id"]
        if msg.key != device.encode():
            raise Refused("key_mismatch")
        current = self.devices.get(device)
        if current is not None and sig.sent_at_us <= current.sent_at_us:
            raise Refused("stale_version")
        if rec["status"] == "enrolled":
            try:
                pub = Ed25519PublicKey.from_public_bytes(bytes(rec["public_key"]))
            except ValueError:
                raise Refused("invalid", "public_key") from None
            self.devices[device] = Enrollment(rec["employee_id"], pub, sig.sent_at_us)
            self._keys[device] = pub
            return "enrolled"
        self.devices[device] = Enrollment(rec["employee_id"], None, sig.sent_at_us)
        self._keys.pop(device, None)
        return "revoked"


# ---------------------------------------------------------------- the fold


@dataclass(frozen=True)
class ControlAuth:
    """What judging a controls-topic record needs: the control plane's keys, the enrolled devices,
    the topic's partition count and the largest sender clock offset accepted."""

    verifier: Verifier
    devices: DeviceRegistry
    partitions: int
    max_clock_offset_us: int

    @property
    def seen_horizon_us(self) -> int:
        """How long applied control ids are remembered (broker time): a replay is refused by its
        clock offset once its signed sent-at is more than max_clock_offset before its append,
        i.e. at most 2 x max_clock_offset after the original's append; an hour of margin."""
        return 2 * self.max_clock_offset_us + _HOUR_US


@dataclass(frozen=True)
class Admitted:
    """A record that passed every check: decoded, who signed it, its sender clock offset."""

    record: dict[str, Any]
    signature: Signature
    offset_us: int


def admit(msg: ControlMessage, auth: ControlAuth) -> Admitted:
    """Check one controls-topic record; :class:`Refused` with the reason otherwise."""
    rec = decode(msg.value, "control_event")
    employee, kind = rec.get("employee_id"), rec["kind"]
    if not employee or kind not in CONTROL_PLANE_KINDS:
        raise Refused("not_permitted")
    if msg.key != employee.encode():
        raise Refused("key_mismatch")
    if msg.partition != partition_for_key(employee.encode(), auth.partitions):
        raise Refused("wrong_partition")
    sig = auth.verifier.verify(msg.headers, "controls", msg.key, msg.value, devices=auth.devices.public_keys())
    if sig.kind == DEVICE:
        if auth.devices.employee_of(sig.signer) != employee:
            raise Refused("device_not_enrolled")
        if kind not in EMPLOYEE_KINDS:
            raise Refused("not_permitted")
    return Admitted(rec, sig, sender_offset(sig, msg, auth.max_clock_offset_us))


@dataclass(frozen=True)
class FoldResult:
    """State after one record; ``outcome`` is the kind applied or the refusal reason."""

    state: EmployeeControls
    outcome: str
    applied: bool
    clamped: bool = False


def fold(state: EmployeeControls, msg: ControlMessage, auth: ControlAuth, *, now_us: int) -> FoldResult:
    """Apply ``msg`` to ``state`` if it is authentic and new; a refused record changes nothing."""
    try:
        a = admit(msg, auth)
    except Refused as r:
        return FoldResult(state, r.reason, False)
    cid = _control_id(a.record)
    if cid is not None and any(c == cid for c, _ in state.seen):
        return FoldResult(state, "replay", False)
    at = msg.appended_us if msg.appended_us is not None else a.signature.sent_at_us + a.offset_us
    new, clamped = apply_control(state, a.record, now_us=now_us, offset_us=a.offset_us, seen_at_us=at,
                                 seen_horizon_us=auth.seen_horizon_us)
    return FoldResult(new, a.record["kind"], True, clamped)


def employee_of_message(msg: ControlMessage) -> str | None:
    """The employee a controls-topic record is about (its key), for the table lookup."""
    return msg.key.decode(errors="replace") if msg.key else None


def _control_id(rec: Mapping[str, Any]) -> str | None:
    cid = rec.get("control_id")
    return bytes(cid).hex() if cid is not None else None


def apply_control(state: EmployeeControls, rec: Mapping[str, Any], *, now_us: int, offset_us: int = 0,
                  seen_at_us: int | None = None, seen_horizon_us: int = RETENTION_US
                  ) -> tuple[EmployeeControls, bool]:
    """State after one (already admitted) ControlEvent; the flag says a pause was clamped to 30
    minutes. Times of the record are on its sender's clock, ``offset_us`` behind the broker's; a
    pause_end or revoke is compared with each window on the broker's clock. Pruning uses
    ``now_us``, the stream's clock."""
    kind = rec["kind"]
    at = _us(rec["occurred_at_us"]) or 0
    clamped = False
    if kind == "pause_start":
        start = _us(rec.get("pause_starts_at_us")) or at
        end = _us(rec.get("pause_ends_at_us")) or start + MAX_PAUSE_US
        if end - start > MAX_PAUSE_US:
            end, clamped = start + MAX_PAUSE_US, True
        if end < start:
            end = start
        state = replace(state, pauses=(*state.pauses, PauseWindow(start, end, offset_us)))
    elif kind == "pause_end":
        end_b = (_us(rec.get("pause_ends_at_us")) or at) + offset_us
        pauses = list(state.pauses)
        for i in range(len(pauses) - 1, -1, -1):
            w = pauses[i]
            if w.starts_at_us + w.offset_us <= end_b < w.ends_at_us + w.offset_us:
                # early resume shortens the window (kept on its own clock)
                pauses[i] = PauseWindow(w.starts_at_us, end_b - w.offset_us, w.offset_us)
                break
        state = replace(state, pauses=tuple(pauses))
    elif kind == "exemption_grant" and rec.get("erasure_id"):
        # An erasure: every capture time, never revoked (a revoke only closes open exemptions).
        if rec["erasure_id"] not in state.erasures:
            state = replace(state, erasures=(*state.erasures, str(rec["erasure_id"])))
    elif kind == "exemption_grant":
        start = _us(rec.get("exemption_effective_at_us")) or at
        state = replace(state, exemptions=(*state.exemptions, Exemption(start, None, offset_us)))
    elif kind == "exemption_revoke":
        until_b = (_us(rec.get("exemption_effective_at_us")) or at) + offset_us
        ex = [Exemption(e.from_us, until_b - e.offset_us, e.offset_us)
              if e.until_us is None and e.from_us + e.offset_us <= until_b else e
              for e in state.exemptions]
        state = replace(state, exemptions=tuple(ex))
    cid = _control_id(rec)
    if cid is not None and seen_at_us is not None:
        keep = tuple((c, t) for c, t in state.seen if t >= seen_at_us - seen_horizon_us)
        state = replace(state, seen=(*keep, (cid, seen_at_us)))
    return prune(state, now_us), clamped


def prune(state: EmployeeControls, now_us: int) -> EmployeeControls:
    """Forget pause windows that ended longer ago than any event can arrive late, on the
    stream's clock (a record's own claimed time never prunes anything)."""
    horizon = now_us - RETENTION_US
    pauses = tuple(w for w in state.pauses if w.ends_at_us + w.offset_us >= horizon)
    return state if len(pauses) == len(state.pauses) else replace(state, pauses=pauses)


def dumps(state: EmployeeControls) -> str:
    """JSON for the Faust table."""
    return json.dumps({
        "pauses": [[w.starts_at_us, w.ends_at_us, w.offset_us] for w in state.pauses],
        "exemptions": [[e.from_us, e.until_us, e.offset_us] for e in state.exemptions],
        "seen": [[c, t] for c, t in state.seen],
        "erasures": list(state.erasures),
    })


def _window(v: Iterable[Any]) -> tuple[Any, ...]:
    t = tuple(v)
    return t if len(t) >= 3 else (*t, 0)  # written before offsets existed: offset 0


def loads(text: str | None) -> EmployeeControls:
    """Inverse of dumps (empty state for None; older JSON without offsets loads them as 0)."""
    if not text:
        return EmployeeControls()
    d = json.loads(text)
    return EmployeeControls(
        pauses=tuple(PauseWindow(*_window(w)) for w in d.get("pauses", [])),
        exemptions=tuple(Exemption(*_window(e)) for e in d.get("exemptions", [])),
        seen=tuple((str(c), int(t)) for c, t in d.get("seen", [])),
        erasures=tuple(str(e) for e in d.get("erasures", [])),
    )
