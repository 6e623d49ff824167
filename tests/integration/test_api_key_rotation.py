"""Key rotation as an API-side procedure, end to end through the real broker and real Faust
workers (issue #13, Deliver 2; docs/operations.md "Rotating the control-plane key").

The API signing with key A (kid cp1) publishes a policy and a grant, which a worker trusting A
and B honours; the API restarted with key B (cp2) re-signs through `POST /admin/resign` (the
policy, the enrollment, the exemption in force); the worker restarted with cp1 retired still has
the policy (now B's), still holds the exemption, honours a new grant the API signs with B, and
refuses records signed with A after the retirement (a grant and a wider policy): they change
nothing."""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.controls import POLICY_KEY, control_record
from handtrace.core.partitioning import partition_for_key
from handtrace.core.settings import ControlSettings, Settings
from handtrace.core.signing import Verifier, control_plane_signer, generate_key_pair, private_key_from_b64
from tests.conftest import free_port
from tests.factories import TEST_APP, make_event
from tests.integration.conftest import enroll_device, producer, stream_metric, topic_messages, topics_of, wait_for
from tests.unit.api_support import ISSUER, bearer, jwks, mint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

S = 1_000_000
PROPAGATION_S = 10.0


def _metric_sum(s: Settings, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (-1: endpoint not up)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.stream.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    except OSError:
        return -1.0
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} ([0-9.e+]+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _rejected(s: Settings, topic: str, reason: str) -> float:
    return _metric_sum(s, "handtrace_stream_controls_rejected_total", topic=topic, reason=reason)


def _batch(employee: str, t0: int, n: int, seed: int, app: str = TEST_APP) -> bytes:
    rng = random.Random(seed)
    events = [{**make_event("click", t0 + i * S // 20, rng), "app_id": app} for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": f"d-{employee}",
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": now_us()}
    return codec.encode_event_batch(header, events)


def _headers(msg: Any) -> list[tuple[str, bytes]]:
    return [(k, v if isinstance(v, bytes) else (v or "").encode()) for k, v in (msg.headers() or [])]


def _with_control(s: Settings, control: ControlSettings, **stream: Any) -> Settings:
    return s.model_copy(update={"control": control, "stream": s.stream.model_copy(update=stream)})


def test_rotation_through_the_api_retires_the_old_key_and_keeps_the_policy(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, api_client, tmp_path: Path
) -> None:
    a_priv, a_pub = generate_key_pair()
    b_priv, b_pub = generate_key_pair()
    both = {"cp1": a_pub, "cp2": b_pub}
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks()))
    # The API holds key A; workers trust A and B (step 2 of the procedure done ahead of time).
    api_a = settings_factory(dev_mode=False,
                             control={"signing_key": a_priv, "signing_key_id": "cp1", "public_keys": both},
                             api={"jwks_file": str(jwks_file), "issuer": ISSUER, "read_timeout_s": 20})
    t = topics_of(api_a)
    worker_s = _with_control(api_a, ControlSettings(public_keys=both))
    admin, security, hr = (bearer(mint("root", ["admin"])), bearer(mint("sec", ["security"])),
                           bearer(mint("harriet", ["hr"])))

    # 1. Under key A: a policy and an exemption through the API, an enrolled laptop.
    client = api_client(api_a)
    # Readiness by a real request: the fresh topics have leaders once the API can read the policy.
    wait_for(lambda: client.get("/api/v1/policy", headers=hr).status_code == 200, 60, "the API to read the policy")
    r = client.put("/api/v1/policy/allowlist", headers=security,
                   json={"allowed_apps": [TEST_APP], "allowed_domains": ["google.com"], "reason": "initial"})
    assert r.status_code == 202 and r.json()["version"] == 1, r.text
    enroll_device(api_a, "emp-d", "dev-d")
    worker = stream_worker(worker_s, policy=None)
    wait_for(lambda: stream_metric(worker_s, "handtrace_stream_policy_version") >= 1, 120,
             "the worker to start and honour the API's policy", worker.tail)
    assert client.post("/api/v1/exemptions/emp-a/grant", headers=hr, json={"reason": "works council"}
                       ).status_code == 202
    wait_for(lambda: _metric_sum(worker_s, "handtrace_stream_controls_total", kind="exemption_grant") >= 1,
             PROPAGATION_S, "the worker to honour the grant signed with A", worker.tail)

    # 2. The API restarted with key B re-signs what workers read from the start at every start.
    api_b = _with_control(api_a, ControlSettings(signing_key=b_priv, signing_key_id="cp2", public_keys=both))
    client = api_client(api_b)
    assert client.post("/api/v1/admin/resign", headers=hr, json={"reason": "CHG-7"}).status_code == 403
    r = client.post("/api/v1/admin/resign", headers=admin, json={"reason": "CHG-7 yearly rotation"})
    assert r.status_code == 202, r.text
    assert r.json() == {"key_id": "cp2", "policy_version": 2, "devices": 1, "exemptions": 1}
    policies = topic_messages(api_a.kafka.librdkafka(), t.policy)
    b_only = Verifier({"cp2": private_key_from_b64(b_priv).public_key()})
    last = policies[-1]
    assert b_only.verify(_headers(last), "policy", last.key(), last.value()).signer == "cp2"
    resigned = codec.decode_record(last.value(), "control_event")
    assert resigned["policy"]["allowed_apps"] == [TEST_APP] and resigned["actor"] == "root"
    audit = [json.loads(m.value()) for m in topic_messages(api_a.kafka.librdkafka(), t.audit)]
    assert [(e["action"], e["outcome"]) for e in audit[-2:]] == [("rotate_key", "refused"), ("key_resign", "allowed")]

    # 3. cp1 retired everywhere: the worker restarted (same app id), the API restarted.
    worker.stop()
    retired_s = _with_control(worker_s, ControlSettings(public_keys=both, retired_key_ids=["cp1"]),
                              metrics_port=free_port())
    worker = stream_worker(retired_s, policy=None)
    wait_for(lambda: stream_metric(retired_s, "handtrace_stream_policy_version") >= 2
             and _rejected(retired_s, "policy", "retired_key") >= 1, 120,
             "the restarted worker to refuse A's policy and honour B's re-signed one", worker.tail)
    assert stream_metric(retired_s, "handtrace_stream_policy_version") == 2
    api_b = _with_control(api_b, ControlSettings(signing_key=b_priv, signing_key_id="cp2", public_keys=both,
                                                 retired_key_ids=["cp1"]))
    client = api_client(api_b)
    assert client.get("/api/v1/policy", headers=hr).json()["version"] == 2
    # emp-a's exemption, granted under A, was granted again under B: the API (which folds the
    # controls topic from its start) still shows it with its original time.
    state = client.get("/api/v1/employees/emp-a/state", headers=hr).json()
    assert state["mode"] == "exempt", state
    grants = _metric_sum(retired_s, "handtrace_stream_controls_total", kind="exemption_grant")

    # A new grant signed with B applies within the propagation bound ...
    granted_at = time.monotonic()
    assert client.post("/api/v1/exemptions/emp-b/grant", headers=hr, json={"reason": "approved"}
                       ).status_code == 202
    wait_for(lambda: _metric_sum(retired_s, "handtrace_stream_controls_total", kind="exemption_grant") >= grants + 1,
             PROPAGATION_S, "the worker to honour the grant signed with B", worker.tail)
    assert time.monotonic() - granted_at < PROPAGATION_S

    # ... while records signed with A after its retirement change nothing: a grant for emp-c and
    # a policy v3 admitting another app.
    old = control_plane_signer("cp1", private_key_from_b64(a_priv))
    p = producer(api_a)
    grant = codec.encode_record("control_event", control_record(
        "exemption_grant", employee_id="emp-c", actor="harriet", role="hr", exemption_effective_at_us=now_us()))
    p.produce(t.controls, key=b"emp-c", value=grant, headers=old.headers("controls", b"emp-c", grant),
              partition=partition_for_key(b"emp-c", api_a.topics.partitions))
    wider = codec.encode_record("control_event", control_record(
        "policy_update", employee_id=None, actor="ops", role="ops",
        policy={"version": 3, "allowed_apps": [TEST_APP, "evil"], "allowed_domains": ["google.com"],
                "sampling": {}, "text_capture": {}}))
    p.produce(t.policy, key=POLICY_KEY, value=wider, headers=old.headers("policy", POLICY_KEY, wider))
    assert p.flush(30) == 0
    wait_for(lambda: _rejected(retired_s, "controls", "retired_key") >= 1
             and _rejected(retired_s, "policy", "retired_key") >= 2, 30,
             "the worker to refuse the records signed with the retired key", worker.tail)
    assert _metric_sum(retired_s, "handtrace_stream_controls_total", kind="exemption_grant") == grants + 1
    assert stream_metric(retired_s, "handtrace_stream_policy_version") == 2

    # What is stored now: emp-a (exempt under A, folded before) and emp-b (exempt under B) nothing;
    # emp-c all of its allowlisted app (the forged grant did nothing) and nothing of "evil" (the
    # forged policy did nothing).
    t0 = now_us() + 50_000
    time.sleep(1.2)
    for seed, (emp, app) in enumerate((("emp-a", TEST_APP), ("emp-b", TEST_APP), ("emp-c", TEST_APP),
                                       ("emp-c", "evil"))):
        p.produce(t.events, key=emp.encode(), value=_batch(emp, t0, 20, seed, app))
    assert p.flush(30) == 0
    wait_for(lambda: _metric_sum(retired_s, "handtrace_stream_events_total") >= 80, 60,
             "the worker to judge the 80 events", worker.tail)
    assert _metric_sum(retired_s, "handtrace_stream_events_total", decision="exempt") == 40
    assert _metric_sum(retired_s, "handtrace_stream_events_total", decision="stored") == 20
