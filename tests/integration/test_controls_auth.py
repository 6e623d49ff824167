"""Authentic controls through the real broker and the real Faust worker (issue #10, class 3):
forged revokes, resumes, self-granted exemptions and misrouted grants written straight to the
controls topic change nothing -- events in a genuine pause are still dropped, an exempt
employee's events are still not stored -- while genuine records (the control plane's, and an
enrolled device's pause for its own employee) apply."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from handtrace.control.publish import control_record, pause_record, publish
from handtrace.core import clickhouse, codec, ids
from handtrace.core.admin import group_lag
from handtrace.core.clock import now_us
from handtrace.core.partitioning import partition_for_key
from handtrace.core.settings import ControlSettings, settings_env
from handtrace.core.signing import DEV_KEY_ID, Refused, Signer, generate_key_pair, issuer_signer, public_key_b64
from handtrace.stream.app import PolicyState
from handtrace.stream.steps.pseudonymise import pseudonym
from tests.factories import make_event
from tests.integration.conftest import enroll_device, producer, topics_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

S = 1_000_000
OFF_GRID = 50_000  # events sit 50 ms off the 100 ms grid: far from every window edge


def _batch(employee: str, t0: int, n: int, seed: int) -> tuple[bytes, list[int]]:
    rng = random.Random(seed)
    events = [make_event("pointer_move", t0 + i * S // 10 + OFF_GRID, rng) for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": f"d-{employee}",
              "agent_version": "test", "os": "linux", "seq": seed, "sent_at_us": t0 + n * S // 10 + S}
    return codec.encode_event_batch(header, events), [e["captured_at_us"] for e in events]


def _control_metrics(s: Any) -> str:
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.stream.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    except OSError as e:
        return f"metrics unreachable: {e}"
    return "\n".join(line for line in text.splitlines() if "controls" in line and not line.startswith("#"))


def _metric_sum(s: Any, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (any label order)."""
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


def test_forged_controls_change_nothing_and_genuine_ones_apply(  # type: ignore[no-untyped-def]
    settings_factory, stream_worker, sink_factory
) -> None:
    s = settings_factory()
    t = topics_of(s)
    parts = s.topics.partitions
    key = s.stream.pseudonym_key.get_secret_value().encode()
    device_s = enroll_device(s, "emp-s", "dev-s")  # emp-s's own laptop
    device_d = enroll_device(s, "emp-d", "dev-d")  # emp-d's own laptop
    worker = stream_worker(s)
    sink = sink_factory(s)
    t0 = now_us() - 600 * S

    # Genuine, through the control plane: HR pauses emp-p for [t0+10 s, t0+20 s) and exempts emp-x
    # from t0+5 s.
    publish(s, pause_record("emp-p", 10 / 60, actor="hr-1", role="hr", at_us=t0 + 10 * S))
    publish(s, control_record("exemption_grant", employee_id="emp-x", actor="hr-1", role="hr",
                              exemption_effective_at_us=t0 + 5 * S))

    p = producer(s)

    def put(rec: dict[str, Any], signer: Signer | None, *, partition: int | None = None) -> None:
        k = rec["employee_id"].encode()
        value = codec.encode_record("control_event", rec)
        headers = signer.headers("controls", k, value) if signer else None
        p.produce(t.controls, key=k, value=value, headers=headers,
                  partition=partition if partition is not None else partition_for_key(k, parts))

    attacker = Signer(f"cp:{DEV_KEY_ID}", Ed25519PrivateKey.generate())  # claims the real key id
    # 1. an unsigned revoke of emp-x's exemption
    put(control_record("exemption_revoke", employee_id="emp-x", actor="hr-1", role="hr",
                       exemption_effective_at_us=t0), None)
    # 2. a pause_end for emp-p signed by a key that is not the control plane's
    put(control_record("pause_end", employee_id="emp-p", actor="hr-1", role="hr",
                       pause_ends_at_us=t0 + 10 * S), attacker)
    # 3. emp-s grants itself an exemption with its own, enrolled device key
    put(control_record("exemption_grant", employee_id="emp-s", actor="emp-s", role="hr",
                       exemption_effective_at_us=t0), device_s)
    # 4. emp-s's device ends emp-p's pause
    put(control_record("pause_end", employee_id="emp-p", actor="emp-p", role="employee",
                       pause_ends_at_us=t0 + 10 * S), device_s)
    # 5. a genuinely signed grant for emp-ok on a partition other than its key's
    right = partition_for_key(b"emp-ok", parts)
    put(control_record("exemption_grant", employee_id="emp-ok", actor="hr-1", role="hr",
                       exemption_effective_at_us=t0), issuer_signer(s), partition=(right + 1) % parts)
    # Genuine: emp-d's enrolled laptop pauses emp-d for [t0+10 s, t0+20 s).
    put(pause_record("emp-d", 10 / 60, actor="emp-d", at_us=t0 + 10 * S), device_d)
    p.flush(30)

    wanted = {"unsigned": 1, "bad_signature": 1, "not_permitted": 1, "device_not_enrolled": 1,
              "wrong_partition": 1}

    def folded() -> bool:
        return (all(_metric_sum(s, "handtrace_stream_controls_rejected_total", topic="controls", reason=r) >= n
                    for r, n in wanted.items())
                and _metric_sum(s, "handtrace_stream_controls_total", kind="pause_start") >= 2
                and _metric_sum(s, "handtrace_stream_controls_total", kind="exemption_grant") >= 1)

    wait_for(folded, 120, "the worker to fold the genuine controls and refuse the forged ones",
             lambda: f"{_control_metrics(s)}\n{worker.tail()}")
    assert _metric_sum(s, "handtrace_stream_controls_total", kind="exemption_revoke") == 0
    assert _metric_sum(s, "handtrace_stream_controls_total", kind="pause_end") == 0

    margin = int(s.stream.clock_skew_margin_s * S)
    batches = {emp: _batch(emp, t0, n, seed) for seed, (emp, n) in
               enumerate((("emp-p", 300), ("emp-d", 300), ("emp-x", 100), ("emp-s", 100), ("emp-ok", 100)))}
    for emp, (payload, _) in batches.items():
        p.produce(t.events, key=emp.encode(), value=payload)
    p.flush(30)

    def outside_pause(times: list[int]) -> list[int]:
        return [x for x in times if not (t0 + 10 * S - margin <= x < t0 + 20 * S + margin)]

    expected = {
        "emp-p": outside_pause(batches["emp-p"][1]),
        "emp-d": outside_pause(batches["emp-d"][1]),
        "emp-x": [x for x in batches["emp-x"][1] if x < t0 + 5 * S - margin],
        "emp-s": batches["emp-s"][1],    # the self-grant was refused: stored as before
        "emp-ok": batches["emp-ok"][1],  # the misrouted grant was refused
    }
    total = sum(len(v) for v in expected.values())
    wait_for(lambda: sink.sink.rows_inserted >= total, 120, f"{total} rows", worker.tail)
    wait_for(lambda: group_lag(s.kafka, s.stream.app_id, t.events) == 0
             and group_lag(s.kafka, s.sink.group_id, t.stored) == 0, 60, "stream and sink to catch up")

    c = clickhouse.connect(s.clickhouse_dsn())
    rows = c.query(f"SELECT employee_key, toUnixTimestamp64Micro(captured_at) FROM {s.clickhouse.database}.events"
                   ).result_rows
    by_key: dict[str, list[int]] = {}
    for k, ts in rows:
        by_key.setdefault(k, []).append(ts)
    for emp, times in expected.items():
        assert sorted(by_key.get(pseudonym(key, "employee", emp), [])) == sorted(times), emp
    assert set(by_key) <= {pseudonym(key, "employee", e) for e in expected}


def _cli(s: Any, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}
    return subprocess.run([sys.executable, "-m", "handtrace.cli", *args], capture_output=True, text=True,
                          timeout=120, env={**base, **settings_env(s), **env})


def test_the_cli_signs_refuses_without_a_key_and_keeps_policy_versions_monotonic(  # type: ignore[no-untyped-def]
    settings_factory, tmp_path
) -> None:
    s = settings_factory()
    t = topics_of(s)
    policy = {"version": 3, "allowed_apps": ["code"], "allowed_domains": [], "sampling": {}, "text_capture": {}}
    path = tmp_path / "policy.json"

    def write(version: int) -> None:
        path.write_text(json.dumps({**policy, "version": version}))

    write(3)
    r = _cli(s, "control", "policy", "set", str(path), "--actor", "ops-1", HANDTRACE_DEV_MODE="false")
    assert r.returncode != 0 and "HANDTRACE_CONTROL__SIGNING_KEY" in r.stderr
    assert _cli(s, "control", "policy", "set", str(path), "--actor", "ops-1").returncode == 0
    for version in (3, 2):
        write(version)
        r = _cli(s, "control", "policy", "set", str(path), "--actor", "ops-1")
        assert r.returncode != 0 and "use version 4" in r.stderr.replace("\n", " "), r.stderr
    write(2**53 + 1)
    r = _cli(s, "control", "policy", "set", str(path), "--actor", "ops-1")
    text = r.stderr.replace("\n", " ")
    assert r.returncode != 0 and "2**53" in text and "use version 4" in text, text
    write(4)
    assert _cli(s, "control", "policy", "set", str(path), "--actor", "ops-1").returncode == 0
    # Enrollment through the CLI: a signed record on the devices topic that the worker's registry takes.
    key = Ed25519PrivateKey.generate()
    r = _cli(s, "control", "device", "enroll", "emp-1", "dev-1", public_key_b64(key), "--actor", "it-1")
    assert r.returncode == 0, r.stderr
    from confluent_kafka import Consumer, TopicPartition

    from handtrace.core.signing import verifier
    from handtrace.stream.controls import DeviceRegistry, message_of_confluent

    c = Consumer({**s.kafka.librdkafka(), "group.id": "t", "enable.partition.eof": True})
    c.assign([TopicPartition(t.devices, 0, 0), TopicPartition(t.policy, 0, 0)])
    got: dict[str, list[Any]] = {t.devices: [], t.policy: []}
    deadline = time.monotonic() + 30
    while (len(got[t.devices]) < 1 or len(got[t.policy]) < 2) and time.monotonic() < deadline:
        m = c.poll(1)
        if m is not None and not m.error():
            got[m.topic()].append(message_of_confluent(m))
    c.close()
    reg = DeviceRegistry()
    assert reg.apply(got[t.devices][0], verifier(s), 3_600_000_000) == "enrolled"
    assert reg.employee_of("dev-1") == "emp-1"
    # Every policy on the topic is signed; the versions published are 3 then 4.
    ps = PolicyState(verifier(s))
    assert [ps.apply(m) for m in got[t.policy]] == ["policy_update", "policy_update"]
    assert ps.policy.version == 4

    # Key rotation: the control plane switches to a new key and re-signs the policy in force and
    # the enrollments; with the old key id retired, workers still have both.
    old_pub = public_key_b64(issuer_signer(s).private_key)
    new_priv, new_pub = generate_key_pair()
    rotated = s.model_copy(update={"dev_mode": False, "control": ControlSettings(
        signing_key=new_priv, signing_key_id="cp2", public_keys={"dev": old_pub, "cp2": new_pub})})
    r = _cli(rotated, "control", "resign", "--actor", "ops-1")
    assert r.returncode == 0 and "policy v5, 1 devices" in r.stdout.replace("\n", " "), r.stdout + r.stderr
    retired = rotated.model_copy(update={"control": ControlSettings(
        public_keys={"dev": old_pub, "cp2": new_pub}, retired_key_ids=["dev"])})
    c = Consumer({**s.kafka.librdkafka(), "group.id": "t2", "enable.partition.eof": True})
    c.assign([TopicPartition(t.devices, 0, 0), TopicPartition(t.policy, 0, 0)])
    got = {t.devices: [], t.policy: []}
    deadline = time.monotonic() + 30
    while (len(got[t.devices]) < 2 or len(got[t.policy]) < 3) and time.monotonic() < deadline:
        m = c.poll(1)
        if m is not None and not m.error():
            got[m.topic()].append(message_of_confluent(m))
    c.close()
    ps = PolicyState(verifier(retired))
    assert [ps.apply(m) for m in got[t.policy]] == ["retired_key", "retired_key", "policy_update"]
    assert ps.policy.version == 5 and ps.policy.allowed_apps == frozenset({"code"})
    reg = DeviceRegistry()
    outcomes = []
    for m in got[t.devices]:
        try:
            outcomes.append(reg.apply(m, verifier(retired), 3_600_000_000))
        except Refused as e:
            outcomes.append(e.reason)
    assert outcomes == ["retired_key", "enrolled"] and reg.employee_of("dev-1") == "emp-1"
