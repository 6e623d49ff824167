"""The control-plane API through the real broker and a real Faust worker (issue #13, part 1): an
exemption requested and granted through the API (real kafka_services, signed with the
control-plane key) is folded by a running worker within 10 s and its events are no longer
stored; the record on the topic verifies with the control-plane public key (and only with it);
every change is on the audit topic."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest

from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.signing import Refused, Verifier, generate_key_pair, public_key_from_b64
from tests.factories import make_event
from tests.integration.conftest import producer, stream_metric, topic_messages, topics_of, wait_for
from tests.unit.api_support import ISSUER, bearer, jwks, mint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

S = 1_000_000
PROPAGATION_S = 10.0


def _batch(employee: str, t0: int, n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    events = [make_event("click", t0 + i * S // 20, rng) for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": f"d-{employee}",
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": now_us()}
    return codec.encode_event_batch(header, events)


def _headers(msg: Any) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in (msg.headers() or [])]


def test_an_exemption_granted_through_the_api_is_honoured_by_a_running_worker(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, api_client, tmp_path: Path
) -> None:
    priv, pub = generate_key_pair()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks()))
    s = settings_factory(control={"signing_key": priv, "signing_key_id": "api1", "public_keys": {"api1": pub}},
                         api={"jwks_file": str(jwks_file), "issuer": ISSUER, "read_timeout_s": 20})
    t = topics_of(s)
    worker = stream_worker(s)
    wait_for(lambda: stream_metric(s, "handtrace_stream_policy_version") >= 1, 120,
             "the worker to start and fold the policy", worker.tail)

    client = api_client(s)
    hr = bearer(mint("harriet", ["hr"]))
    r = client.post("/api/v1/me/exemption-requests", headers=bearer(mint("emp-x", [])),
                    json={"reason": "works council member"})
    assert r.status_code == 202, r.text
    pending = client.get("/api/v1/exemption-requests", headers=hr)
    assert [p["employee_id"] for p in pending.json()] == ["emp-x"], pending.text

    granted_at = time.monotonic()
    r = client.post("/api/v1/exemptions/emp-x/grant", headers=hr, json={"reason": "approved by HR"})
    assert r.status_code == 202, r.text
    wait_for(lambda: stream_metric(s, 'handtrace_stream_controls_total{kind="exemption_grant"}') >= 1,
             PROPAGATION_S, "the worker to honour the grant", worker.tail)
    assert time.monotonic() - granted_at < PROPAGATION_S
    state = client.get("/api/v1/employees/emp-x/state", headers=hr).json()
    assert state["mode"] == "exempt" and state["pending_request"] is None

    # Events captured after the grant: emp-x's are dropped as exempt, emp-ok's stored.
    t0 = now_us() + 50_000
    time.sleep(1.2)
    p = producer(s)
    for seed, emp in enumerate(("emp-x", "emp-ok")):
        p.produce(t.events, key=emp.encode(), value=_batch(emp, t0, 20, seed))
    assert p.flush(30) == 0
    wait_for(lambda: stream_metric(s, 'handtrace_stream_events_total{decision="exempt"}') >= 20
             and stream_metric(s, 'handtrace_stream_events_total{decision="stored"}') >= 20, 60,
             "emp-x's events dropped as exempt and emp-ok's stored", worker.tail)
    assert stream_metric(s, 'handtrace_stream_events_total{decision="exempt"}') == 20

    # The grant on the topic verifies with the control-plane public key, and with no other.
    grants = [m for m in topic_messages(s.kafka.librdkafka(), t.controls)
              if codec.decode_record(m.value(), "control_event")["kind"] == "exemption_grant"]
    assert len(grants) == 1
    m = grants[0]
    rec = codec.decode_record(m.value(), "control_event")
    assert (rec["employee_id"], rec["actor"], rec["actor_role"], rec["reason"]) == (
        "emp-x", "harriet", "hr", "approved by HR")
    sig = Verifier({"api1": public_key_from_b64(pub)}).verify(_headers(m), "controls", m.key(), m.value())
    assert (sig.kind, sig.signer) == ("cp", "api1")
    _other_priv, other_pub = generate_key_pair()
    with pytest.raises(Refused):
        Verifier({"api1": public_key_from_b64(other_pub)}).verify(_headers(m), "controls", m.key(), m.value())

    # Every change is on the audit topic, keyed by its actor.
    audit = [(m.key(), json.loads(m.value())) for m in topic_messages(s.kafka.librdkafka(), t.audit)]
    assert [(k, e["action"], e["outcome"]) for k, e in audit] == [
        (b"emp-x", "exemption_request", "allowed"), (b"harriet", "exemption_grant", "allowed"),
        (b"harriet", "other_state", "allowed")]  # HR read emp-x's state: a data access, in the trail
    assert audit[1][1]["before"]["mode"] == "capturing" and audit[1][1]["after"]["mode"] == "exempt"
    assert audit[1][1]["roles"] == ["employee", "hr"] and audit[1][1]["reason"] == "approved by HR"
    # ... and read back through the API, newest first (a refusal is one more entry).
    assert client.get("/api/v1/audit", headers=hr).status_code == 403
    trail = client.get("/api/v1/audit", headers=bearer(mint("aud", ["auditor"]))).json()
    assert [e["action"] for e in trail] == ["audit", "other_state", "exemption_grant", "exemption_request"]
