"""What the API does to the world, behind three Protocols: Controls (publish signed control
records), State (fold them back into each employee's capture state, the policy in force) and
Audit (the trail). ``kafka_services`` are the real ones; ``memory_services`` hold everything in
memory (unit tests, the portal's page tests)."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import Request

from handtrace.core.clock import now_us

if TYPE_CHECKING:
    from handtrace.control.api.auth import Principal
    from handtrace.control.api.tail import Message, TopicTail
    from handtrace.core.settings import Settings

DEVICE_KINDS = ("pause_start", "pause_end", "exemption_request")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
EMPLOYEE_KINDS = ("pause_start", "pause_end", "exemption_request", "exemption_grant", "exemption_revoke")


class StateUnavailable(RuntimeError):
    """The controls, policy or audit topic could not be read in time (the API answers 503)."""


class Controls(Protocol):
    """The only way the API issues anything."""

    def publish(self, record: dict[str, Any]) -> None:
        """Sign and send one control record (schemas/control_event); raises ControlError."""

    def resign(self, *, actor: str, reason: str) -> dict[str, Any]:
        """Key rotation: re-publish the policy in force (version + 1), every enrolled device and
        every exemption in force, signed with the current key. Returns {key_id, policy_version
        (None: no policy), devices, exemptions}; raises ControlError."""


class State(Protocol):
    """What the controls say now."""

    def employee(self, employee_id: str) -> dict[str, Any]:
        """{employee_id, mode, paused_until, exempt_since, pending_request}."""

    def pending_requests(self) -> list[dict[str, Any]]:
        """Exemption requests not answered by a later grant, deny or revoke, oldest first."""

    def policy(self) -> dict[str, Any] | None:
        """The signed policy in force (None: none published)."""


class Audit(Protocol):
    """The trail of every change and every refusal."""

    def record(self, entry: dict[str, Any]) -> None:
        """Append one entry (see :func:`audit_entry`)."""

    def entries(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first."""


class WarehouseUnavailable(RuntimeError):
    """ClickHouse could not be reached (on the embedded engine: no process serves its data dir);
    the API answers 503 with the message, pages show it in place of the section."""


class Warehouse(Protocol):
    """What the API reads from ClickHouse (and the one thing it writes there: a withdrawal).
    Keys are HMAC pseudonyms (``employee_key``): the API derives the caller's own with the
    pseudonym key (control/api/warehouse.py); nobody is ever looked up by another's raw id here.
    Implementations: ``warehouse.ClickHouseWarehouse`` and ``warehouse.MemoryWarehouse``."""

    def captured(self, employee_key: str, since_us: int, until_us: int) -> dict[str, Any]:
        """What was stored about one person in [since, until): {"total": int, "by_app_kind":
        [{"app_id", "kind", "events"}] (descending), "demonstrations": int, "frames": [{
        "demonstration_id", "step", "captured_at", "sha256", "reason"}] (newest first, <= 12)}."""

    def demonstrations(self, employee_key: str, limit: int) -> list[dict[str, Any]]:
        """One person's demonstrations, newest first: {"demonstration_id", "instruction",
        "status", "started_at", "ended_at", "frames", "events", "apps", "withdrawn": bool,
        "withdrawn_at"}."""

    def frame(self, employee_key: str, demonstration_id: str, step: int) -> dict[str, Any] | None:
        """One stored frame of this person's ({"object_key", "sha256", "format", "width",
        "height"}), None when it is not theirs or does not exist (the same answer either way)."""

    def withdraw(self, *, employee_key: str, demonstration_id: str, actor: str, reason: str) -> str:
        """Withdraw one of this person's demonstrations from training data (a ``withdrawals`` row,
        as ``handtrace dataset withdraw``). Returns the withdrawal id; raises KeyError when the
        demonstration is not theirs or does not exist."""

    def traffic(self, since_us: int, until_us: int) -> Any:
        """What was stored in [since, until) by (app, kind) with episodes and agents, the input of
        the sampling dry run (``dryrun.Traffic``)."""


@dataclass
class Services:
    """The app's collaborators (app.state.services)."""

    controls: Controls
    state: State
    audit: Audit
    warehouse: Warehouse | None = None
    """None: no warehouse configured (the pages say so; the dry run and "captured about me" are
    unavailable)."""

    def close(self) -> None:
        """Release what the services hold (consumers, producers, clients): the app's shutdown."""
        for part in (self.controls, self.state, self.audit, self.warehouse):
            close = getattr(part, "close", None)
            if callable(close):
                close()


def get_services(request: Request) -> Services:
    """FastAPI dependency: the app's Services."""
    services: Services = request.app.state.services
    return services


# ---------------------------------------------------------------- shared, pure


def iso(at_us: int | None) -> str | None:
    """An ISO-8601 UTC time from epoch microseconds."""
    if at_us is None:
        return None
    return datetime.fromtimestamp(at_us / 1e6, UTC).isoformat().replace("+00:00", "Z")


def audit_entry(caller: Principal, *, action: str, target: str | None, reason: str, outcome: str,
                before: Any = None, after: Any = None, detail: str = "", method: str = "",
                path: str = "") -> dict[str, Any]:
    """One audit entry: who (subject, roles), what, on whom, why, before -> after, outcome."""
    at = now_us()
    return {"at": iso(at), "at_us": at, "subject": caller.subject, "name": caller.name,
            "roles": sorted(r.value for r in caller.roles), "action": action, "target": target,
            "reason": reason, "before": before, "after": after, "outcome": outcome, "detail": detail,
            "method": method, "path": path}


def control_id(record: dict[str, Any]) -> str:
    """A control record's id as a UUID string."""
    raw = record["control_id"]
    return str(uuid.UUID(bytes=bytes(raw))) if isinstance(raw, bytes | bytearray) else str(raw)


def _denials(audit: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Employee id -> time of the latest exemption deny in the audit trail."""
    out: dict[str, int] = {}
    for e in audit:
        if e.get("action") == "exemption_deny" and e.get("outcome") == "allowed" and e.get("target"):
            out[e["target"]] = max(out.get(e["target"], 0), int(e.get("at_us") or 0))
    return out


def fold_employee(records: Sequence[dict[str, Any]], employee_id: str, denied_at_us: int = 0,
                  at_us: int | None = None) -> dict[str, Any]:
    """An employee's capture state from their control records (in topic order)."""
    now = at_us if at_us is not None else now_us()
    exempt_since: int | None = None
    erased_since: int | None = None  # an erasure (handtrace erase): no revoke ends it
    paused_until: int | None = None
    request: dict[str, Any] | None = None
    for r in records:
        if r.get("employee_id") != employee_id:
            continue
        kind, at = r["kind"], int(r["occurred_at_us"])
        if kind == "exemption_grant":
            exempt_since, request = r.get("exemption_effective_at_us") or at, None
            if r.get("erasure_id") and erased_since is None:
                erased_since = exempt_since
        elif kind == "exemption_revoke":
            exempt_since, request = erased_since, None
        elif kind == "pause_start":
            paused_until = r.get("pause_ends_at_us")
        elif kind == "pause_end":
            paused_until = None
        elif kind == "exemption_request":
            request = {"employee_id": employee_id, "reason": r.get("reason", ""), "requested_at": iso(at),
                       "requested_at_us": at, "control_id": control_id(r)}
    if request is not None and denied_at_us >= request["requested_at_us"]:
        request = None
    if paused_until is not None and paused_until <= now:
        paused_until = None
    mode = "exempt" if exempt_since is not None else "paused" if paused_until is not None else "capturing"
    return {"employee_id": employee_id, "mode": mode, "paused_until": iso(paused_until),
            "exempt_since": iso(exempt_since), "pending_request": request}


def _exemption(records: Sequence[dict[str, Any]], employee_id: str) -> dict[str, Any]:
    """{exempt_since_us}: the effective time of the employee's exemption in force, else None."""
    since: int | None = None
    erased: int | None = None
    for r in records:
        if r.get("employee_id") == employee_id and r["kind"] == "exemption_grant":
            since = int(r.get("exemption_effective_at_us") or r["occurred_at_us"])
            erased = since if r.get("erasure_id") and erased is None else erased
        elif r.get("employee_id") == employee_id and r["kind"] == "exemption_revoke":
            since = erased
    return {"exempt_since_us": since}


def pending_from(records: Sequence[dict[str, Any]], denials: dict[str, int]) -> list[dict[str, Any]]:
    """Every employee's pending exemption request, oldest first."""
    employees = {r["employee_id"] for r in records if r.get("kind") == "exemption_request" and r.get("employee_id")}
    out = [s["pending_request"] for e in sorted(employees)
           if (s := fold_employee(records, e, denials.get(e, 0)))["pending_request"] is not None]
    return sorted(out, key=lambda p: p["requested_at_us"])


def latest_policy(records: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
    """The highest-version policy among policy_update records."""
    best: dict[str, Any] | None = None
    for r in records:
        pol = r.get("policy")
        if r.get("kind") == "policy_update" and pol and (best is None or pol["version"] > best["version"]):
            best = pol
    return best


# ---------------------------------------------------------------- in memory


@dataclass
class MemoryBackend:
    """Every control and audit entry in lists (thread-safe): what a test or a page test needs."""

    controls: list[dict[str, Any]] = field(default_factory=list)
    audit: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class MemoryControls:
    """Controls kept in a MemoryBackend (validated like the real ones: encodable records)."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend

    def publish(self, record: dict[str, Any]) -> None:
        """Append ``record`` after checking it encodes (schemas/control_event)."""
        from handtrace.core import codec

        codec.encode_record("control_event", record)
        with self.backend.lock:
            self.backend.controls.append(dict(record))

    def resign(self, *, actor: str, reason: str) -> dict[str, Any]:
        """The policy in force again as version + 1 and each exemption in force granted again, as
        the Kafka controls do (the memory backend holds no devices)."""
        from handtrace.core.controls import MAX_POLICY_VERSION, ControlError, control_record

        with self.backend.lock:
            pol = latest_policy(self.backend.controls)
            records = list(self.backend.controls)
        version = None
        if pol is not None:
            version = int(pol["version"]) + 1
            if version > MAX_POLICY_VERSION:
                raise ControlError(f"the policy in force has version {pol['version']}: no room above it")
            self.publish(control_record("policy_update", employee_id=None, actor=actor, role="ops", reason=reason,
                                        policy={**pol, "version": version}))
        exempt = {e: s["exempt_since_us"] for e in sorted({r["employee_id"] for r in records if r.get("employee_id")})
                  if (s := _exemption(records, e))["exempt_since_us"] is not None}
        for employee, since in exempt.items():
            self.publish(control_record("exemption_grant", employee_id=employee, actor=actor, role="hr",
                                        reason=reason, exemption_effective_at_us=since))
        return {"key_id": "memory", "policy_version": version, "devices": 0, "exemptions": len(exempt)}


class MemoryState:
    """State folded from a MemoryBackend."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend

    def employee(self, employee_id: str) -> dict[str, Any]:
        with self.backend.lock:
            records, denials = list(self.backend.controls), _denials(self.backend.audit)
        return fold_employee(records, employee_id, denials.get(employee_id, 0))

    def pending_requests(self) -> list[dict[str, Any]]:
        with self.backend.lock:
            records, denials = list(self.backend.controls), _denials(self.backend.audit)
        return pending_from(records, denials)

    def policy(self) -> dict[str, Any] | None:
        with self.backend.lock:
            return latest_policy(self.backend.controls)


class MemoryAudit:
    """The audit trail in a MemoryBackend."""

    def __init__(self, backend: MemoryBackend) -> None:
        self.backend = backend

    def record(self, entry: dict[str, Any]) -> None:
        with self.backend.lock:
            self.backend.audit.append(json.loads(json.dumps(entry, default=str)))

    def entries(self, limit: int) -> list[dict[str, Any]]:
        with self.backend.lock:
            return list(reversed(self.backend.audit[-limit:])) if limit > 0 else []


def memory_services(backend: MemoryBackend | None = None) -> Services:
    """Services over one in-memory backend (``services.controls.backend`` to inspect it)."""
    b = backend or MemoryBackend()
    return Services(controls=MemoryControls(b), state=MemoryState(b), audit=MemoryAudit(b))


# ---------------------------------------------------------------- Kafka


class KafkaControls:
    """control/publish.publish: signed by the control-plane key, acks=all."""

    def __init__(self, settings: Settings) -> None:
        from handtrace.control.publish import _signer

        self.settings = settings
        self.signer = _signer(settings)  # no signing key outside dev mode: refuse to start

    def publish(self, record: dict[str, Any]) -> None:
        from handtrace.control.publish import publish

        publish(self.settings, record, timeout_s=self.settings.api.read_timeout_s, signer=self.signer)

    def resign(self, *, actor: str, reason: str) -> dict[str, Any]:
        from handtrace.control.publish import resign, resign_exemptions

        version, devices = resign(self.settings, actor=actor, reason=reason)
        exemptions = resign_exemptions(self.settings, actor=actor, reason=reason)
        return {"key_id": self.signer.signer_id.split(":", 1)[1], "policy_version": version, "devices": devices,
                "exemptions": exemptions}


def _audit_entry(m: Message) -> dict[str, Any] | None:
    try:
        doc = json.loads(m.value)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


class KafkaAudit:
    """The audit topic (<prefix>.audit): JSON values keyed by actor subject."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import Producer

        from handtrace.control.api.tail import TopicTail
        from handtrace.core.producer import producer_config
        from handtrace.core.topics import Topics

        self.settings = settings
        self.topic = Topics.from_settings(settings.topics).audit
        self.producer = Producer(producer_config(settings.kafka))
        self.lock = threading.Lock()
        self.tail: TopicTail[dict[str, Any]] = TopicTail(settings, self.topic, _audit_entry)

    def record(self, entry: dict[str, Any]) -> None:
        errors: list[str] = []
        with self.lock:
            self.producer.produce(self.topic, key=str(entry.get("subject", "")).encode(),
                                  value=json.dumps(entry, default=str, sort_keys=True).encode(),
                                  on_delivery=lambda err, _m: errors.append(str(err)) if err else None)
            left = self.producer.flush(self.settings.api.read_timeout_s)
        if left or errors:
            raise StateUnavailable(f"audit entry not delivered to {self.topic}: {errors or 'timed out'}")

    def all(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (unreadable ones skipped)."""
        return self.tail.read(self.settings.api.read_timeout_s)

    def entries(self, limit: int) -> list[dict[str, Any]]:
        return list(reversed(self.all()[-limit:])) if limit > 0 else []

    def close(self) -> None:
        self.tail.close()
        self.producer.flush(1.0)


class KafkaState:
    """The controls topic folded on demand: only records signed by a control-plane key in force,
    or by a laptop enrolled for the record's own employee, count (forged ones change nothing).
    The topics are tailed (control/api/tail.py): each message is read and verified once."""

    def __init__(self, settings: Settings, audit: KafkaAudit) -> None:
        from handtrace.control.api.tail import TopicTail
        from handtrace.control.publish import _control_plane_verifier, control_plane_record
        from handtrace.core.topics import Topics

        self.settings = settings
        self.audit = audit
        self.verifier = _control_plane_verifier(settings)
        topics = Topics.from_settings(settings.topics)

        def signed(role: str, subject: str) -> Callable[[Message], tuple[Any, dict[str, Any]] | None]:
            return lambda m: control_plane_record(self.verifier, role, subject, m.headers, m.key, m.value)

        self.policies = TopicTail(settings, topics.policy, signed("policy", "control_event"))
        self.devices = TopicTail(settings, topics.devices, signed("devices", "device_enrollment"))
        self.controls: TopicTail[Message] = TopicTail(settings, topics.controls, lambda m: m)
        self._verified: dict[tuple[int, int], dict[str, Any] | None] = {}
        self._verified_with: Any = None
        self._lock = threading.Lock()

    def _records(self) -> list[dict[str, Any]]:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        from handtrace.control.publish import devices_enrolled

        timeout = self.settings.api.read_timeout_s
        devices = devices_enrolled(self.devices.read(timeout))
        messages = self.controls.read(timeout)
        # What a device-signed record means depends on the enrolled devices: verify everything
        # again only when they change, otherwise only what is new.
        fingerprint = sorted((d, bytes(r["public_key"]), r["employee_id"]) for d, r in devices.items())
        with self._lock:
            if fingerprint != self._verified_with:
                self._verified, self._verified_with = {}, fingerprint
            keys = {d: Ed25519PublicKey.from_public_bytes(bytes(r["public_key"])) for d, r in devices.items()}
            out = []
            for m in messages:
                pos = (m.partition, m.offset)
                if pos not in self._verified:
                    self._verified[pos] = self._verify(m, devices, keys)
                rec = self._verified[pos]
                if rec is not None:
                    out.append(rec)
        out.sort(key=lambda r: r["occurred_at_us"])
        return out

    def _verify(self, m: Message, devices: dict[str, dict[str, Any]],
                keys: dict[str, Any]) -> dict[str, Any] | None:
        from handtrace.core import codec
        from handtrace.core.signing import CONTROL_PLANE, Refused

        try:
            sig = self.verifier.verify(m.headers, "controls", m.key, m.value, keys)
            rec = codec.decode_record(m.value, "control_event")
        except (Refused, codec.DecodeError):
            return None
        if sig.kind != CONTROL_PLANE and (devices[sig.signer]["employee_id"] != rec.get("employee_id")
                                          or rec["kind"] not in DEVICE_KINDS):
            return None  # a laptop speaks for its own employee, and never grants or revokes (ADR 0009)
        if rec.get("kind") not in EMPLOYEE_KINDS:
            return None
        at = rec["occurred_at_us"]  # timestamp-micros: the decoder gives a datetime
        if isinstance(at, datetime):
            rec["occurred_at_us"] = (at - _EPOCH) // timedelta(microseconds=1)
        return rec

    def records(self) -> list[dict[str, Any]]:
        """Every verified employee control (pauses, exemption requests, grants, revokes), oldest
        first: what ``handtrace subject export`` lists for one person."""
        return self._records()

    def employee(self, employee_id: str) -> dict[str, Any]:
        denials = _denials(self.audit.all())
        return fold_employee(self._records(), employee_id, denials.get(employee_id, 0))

    def pending_requests(self) -> list[dict[str, Any]]:
        return pending_from(self._records(), _denials(self.audit.all()))

    def close(self) -> None:
        for tail in (self.policies, self.devices, self.controls):
            tail.close()

    def policy(self) -> dict[str, Any] | None:
        from handtrace.control.publish import policy_in_force

        return policy_in_force(self.policies.read(self.settings.api.read_timeout_s))


def kafka_services(settings: Settings) -> Services:
    """The real services: signed records on the controls and policy topics, the audit on
    <prefix>.audit. ControlError without a control-plane signing key (outside dev mode)."""
    audit = KafkaAudit(settings)
    warehouse: Warehouse | None = None
    if settings.api.warehouse:
        from handtrace.control.api.warehouse import ClickHouseWarehouse

        warehouse = ClickHouseWarehouse(settings)
    return Services(controls=KafkaControls(settings), state=KafkaState(settings, audit), audit=audit,
                    warehouse=warehouse)
