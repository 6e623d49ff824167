"""Propagation of controls (docs/design/control-plane.md part D, docs/adr/0014): a policy change
and an exemption grant made through the API (real kafka_services, signed with the control-plane
key) are applied by a running stream worker within 10 s of the request (not of the 202: the API
answers only after publishing and reading its state, and a worker may apply the change before
that) and by a running agent process within 10 s of the 202 (the agent's bound is its wakeup
period; the API's own time, ~2.5 s for a grant on a loaded machine, is not propagation); an
agent that was off when they were made applies them at its next start before it captures
anything; a forged and an unsigned policy record written straight to the policy topic change
nothing on either.

The agent reads the control plane only at its wakeups (every ``agent.batch_interval_s``: no
wakeup of its own, for the battery). Its bound is therefore its wakeup period plus one read
(~0.1 s): the agents here have a 2 s batch interval, floored to a 5 s period by the shipper's idle
delay once their spool is drained; at the default 30 s (120 s on battery) the bound is that
interval (docs/BENCHMARKS.md, "Propagation"; docs/adr/0014-how-agents-learn-policy.md). What
the agent captures meanwhile still reaches a worker that already honours the change (the first
bound), so nothing it excludes is stored."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from handtrace.control.publish import control_record, publish
from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.controls import POLICY_KEY
from handtrace.core.producer import producer_config
from handtrace.core.signing import control_plane_signer, generate_key_pair, private_key_from_b64
from tests.factories import TEST_POLICY, make_event
from tests.integration.agentproc import AgentProcess, Api, first_held
from tests.integration.conftest import producer, stream_metric, topics_of, wait_for
from tests.unit.api_support import ISSUER, jwks

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

BOUND_S = 10.0
AGENT_INTERVAL_S = 2.0
S = 1_000_000


def _batch(employee: str, n: int, seed: int) -> bytes:
    """``n`` clicks in TEST_APP captured from now on (after the change being checked)."""
    rng = random.Random(seed)
    t0 = now_us() + 50_000
    events = [make_event("click", t0 + i * S // 20, rng) for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": f"d-{employee}",
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": now_us()}
    return codec.encode_event_batch(header, events)


def _produce(s: Any, employee: str, n: int, seed: int) -> None:
    p = producer(s)
    p.produce(topics_of(s).events, key=employee.encode(), value=_batch(employee, n, seed))
    assert p.flush(30) == 0


def _decisions(s: Any, decision: str) -> float:
    return stream_metric(s, f'handtrace_stream_events_total{{decision="{decision}"}}')


def _controls_metrics(s: Any) -> str:
    import urllib.request

    url = f"http://127.0.0.1:{s.stream.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310
    return "\n".join(line for line in text.splitlines() if "controls" in line or "policy" in line)


def _version(agent: AgentProcess) -> int:
    st = agent.status()
    return int(st["policy_version"]) if st else -1


def _mode(agent: AgentProcess) -> str | None:
    st = agent.status()
    return st["mode"] if st else None


def _start_and_watch(agent: AgentProcess, applied: Any, timeout_s: float) -> tuple[float | None, list[dict[str, Any]]]:
    """Start ``agent`` and read its status every 50 ms until ``applied(status)`` has held for two
    wakeups; returns (seconds from start to applied, every status seen)."""
    seen: list[dict[str, Any]] = []
    t0 = time.monotonic()
    agent.start()
    applied_at = None
    deadline = t0 + timeout_s
    while time.monotonic() < deadline:
        st = agent.status()
        if st is not None:
            seen.append(st)
            if applied_at is None and applied(st):
                applied_at = time.monotonic()
            if applied_at is not None and time.monotonic() - applied_at > 2 * AGENT_INTERVAL_S:
                break
        time.sleep(0.05)
    return (applied_at - t0 if applied_at is not None else None), seen


def _cache(agent: AgentProcess) -> dict[str, Any]:
    path = Path(agent.settings.state_dir) / "agent" / "controlplane.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_api_controls_reach_a_running_worker_and_agent_within_10_s_and_an_offline_agent_at_start(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, tmp_path: Path
) -> None:
    priv, pub = generate_key_pair()
    jwks_file = tmp_path / "jwks.json"
    jwks_file.write_text(json.dumps(jwks()))
    s = settings_factory(control={"signing_key": priv, "signing_key_id": "api1", "public_keys": {"api1": pub}},
                         api={"jwks_file": str(jwks_file), "issuer": ISSUER, "read_timeout_s": 20})
    worker = stream_worker(s)  # publishes TEST_POLICY (v1, TEST_APP allowed)
    a = AgentProcess(s, "emp-a", tmp_path / "laptop-a", batch_interval_s=AGENT_INTERVAL_S)
    b = AgentProcess(s, "emp-b", tmp_path / "laptop-b", batch_interval_s=AGENT_INTERVAL_S)
    latencies: dict[str, float] = {}
    api: Api | None = None
    try:
        a.start()
        b.start()
        wait_for(lambda: stream_metric(s, "handtrace_stream_policy_version") >= 1, 120,
                 "the worker to start and fold the policy", worker.tail)
        wait_for(lambda: _version(a) == 1 and _version(b) == 1, 60, "both agents to apply policy v1",
                 lambda: a.tail() + "\n---\n" + b.tail())
        api = Api.of(s)
        b.stop()  # laptop b is off while the controls change

        # 1. An allowlist change (TEST_APP no longer allowed) through the API.
        sent = api.set_allowlist(["code"], TEST_POLICY["allowed_domains"])
        held = first_held({"worker": lambda: stream_metric(s, "handtrace_stream_policy_version") == 2,
                           "agent": lambda: _version(a) == 2}, BOUND_S)
        assert held["worker"] is not None, f"worker did not apply policy v2 within {BOUND_S} s\n{worker.tail()}"
        assert held["agent"] is not None, f"agent did not apply policy v2 within {BOUND_S} s\n{a.tail()}"
        latencies |= {"policy/worker": held["worker"] - sent.requested,
                      "policy/agent": held["agent"] - sent.accepted}
        stored_before = _decisions(s, "stored")
        _produce(s, "emp-ok", 20, seed=1)  # captured after the change: dropped, not stored
        wait_for(lambda: _decisions(s, "not_allowlisted_app") >= 20, 30,
                 "TEST_APP's events dropped as no longer allowlisted", worker.tail)
        assert _decisions(s, "stored") == stored_before

        # 2. Laptop b starts again: policy v2 is in force before it captures anything.
        took, seen = _start_and_watch(b, lambda st: st["policy_version"] == 2, 30)
        assert took is not None and took < BOUND_S, (took, b.tail())
        latencies["policy/offline agent, from its start"] = took
        under_old = [st for st in seen if st["policy_version"] != 2]
        assert all(st["events_captured"] == 0 for st in under_old), under_old
        assert seen[-1]["events_captured"] > 0  # it does capture (under v2)
        b.stop()

        # 3. Exemption grants through the API: b's while it is off, then a's.
        api.grant("emp-b")
        wait_for(lambda: stream_metric(s, 'handtrace_stream_controls_total{kind="exemption_grant"}') >= 1,
                 BOUND_S, "the worker to honour b's grant", worker.tail)
        grants_before = stream_metric(s, 'handtrace_stream_controls_total{kind="exemption_grant"}')
        sent = api.grant("emp-a")
        held = first_held({"worker": lambda: stream_metric(
            s, 'handtrace_stream_controls_total{kind="exemption_grant"}') >= grants_before + 1,
            "agent": lambda: _mode(a) == "exempt"}, BOUND_S)
        assert held["worker"] is not None, f"worker did not honour the grant within {BOUND_S} s\n{worker.tail()}"
        assert held["agent"] is not None, f"agent not exempt within {BOUND_S} s\n{a.tail()}"
        latencies |= {"grant/worker": held["worker"] - sent.requested,
                      "grant/agent": held["agent"] - sent.accepted}
        captured = a.status()["events_captured"]  # type: ignore[index]
        _produce(s, "emp-a", 20, seed=2)
        wait_for(lambda: _decisions(s, "exempt") >= 20, 30, "emp-a's events dropped as exempt", worker.tail)
        time.sleep(2 * AGENT_INTERVAL_S)
        assert a.status()["events_captured"] == captured  # type: ignore[index]  # capture is off

        # 4. Laptop b starts again: exempt before it captures anything.
        took, seen = _start_and_watch(b, lambda st: st["mode"] == "exempt", 30)
        assert took is not None and took < BOUND_S, (took, b.tail())
        latencies["grant/offline agent, from its start"] = took
        assert [st["events_captured"] for st in seen] == [0] * len(seen), seen

        # 5. A forged (a key that is not the control plane's, same key id) and an unsigned
        #    policy record, each a newer version allowing TEST_APP again: nothing changes.
        _other_priv, _ = generate_key_pair()
        forged = control_record("policy_update", employee_id=None, actor="mallory", role="ops",
                                policy={**TEST_POLICY, "version": 98})
        publish(s, forged, signer=control_plane_signer("api1", private_key_from_b64(_other_priv)))
        unsigned = control_record("policy_update", employee_id=None, actor="mallory", role="ops",
                                  policy={**TEST_POLICY, "version": 99})
        p = Producer(producer_config(s.kafka))
        p.produce(topics_of(s).policy, key=POLICY_KEY, value=codec.encode_record("control_event", unsigned))
        assert p.flush(30) == 0

        def rejected(reason: str) -> float:
            return stream_metric(s, f'handtrace_stream_controls_rejected_total{{reason="{reason}",topic="policy"}}')

        wait_for(lambda: rejected("bad_signature") >= 1 and rejected("unsigned") >= 1, BOUND_S,
                 "the worker to refuse both records", lambda: _controls_metrics(s))
        for agent in (a, b):
            wait_for(lambda agent=agent: {"bad_signature", "unsigned"} <= set(_cache(agent).get("refused", {})),
                     BOUND_S, f"{agent.employee_id} to refuse both records", agent.tail)
        assert stream_metric(s, "handtrace_stream_policy_version") == 2
        assert _version(a) == 2 and _version(b) == 2 and _cache(a)["policy"]["version"] == 2
        assert api.policy_version() == 2  # the API does not take them either
        dropped = _decisions(s, "not_allowlisted_app")
        _produce(s, "emp-ok", 20, seed=3)
        wait_for(lambda: _decisions(s, "not_allowlisted_app") >= dropped + 20, 30,
                 "TEST_APP still not allowlisted after the forged records", worker.tail)
        assert _decisions(s, "stored") == stored_before
    finally:
        a.stop()
        b.stop()
        if api is not None:
            api.close()
        print("propagation latencies (s):", {k: round(v, 2) for k, v in latencies.items()})
    assert all(v < BOUND_S for v in latencies.values()), latencies
