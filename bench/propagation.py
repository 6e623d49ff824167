"""Propagation benchmark: how long a control made through the API takes to be applied by a
running stream worker and by a running agent, and what the agent's wakeup interval contributes
(docs/design/control-plane.md part D, docs/adr/0014-how-agents-learn-policy.md).

    python -m bench.propagation [--changes 10] [--intervals 2,10]

One real Kafka broker (started here), one stream worker process (`python -m handtrace.stream`),
the API app in this process over the real topics (`kafka_services`, tokens from the test
identity provider of tests/unit/api_support.py) and, per agent wakeup interval
(``HANDTRACE_AGENT__BATCH_INTERVAL_S``), one agent process (`handtrace agent run`, synthetic
capture). For each interval: N policy changes (sampling rates, ops) and N exemption changes
(grant and revoke in turn, hr), each made at a random phase of the agent's wakeup cycle (a pause
of U(0, interval) before it). Applied = the worker's ``handtrace_stream_policy_version`` gauge /
``handtrace_stream_controls_total{kind=...}`` counter moved; the agent's status socket shows the
new ``policy_version`` / ``mode``. The observers are polled (every 50 ms) from the moment the
request is made, while the API call runs in a thread: latencies are from the request, since the
API answers 202 only after publishing (acks=all) and reading the state back for its audit entry,
and a worker usually applies the change before that (counted).

The agent reads the control plane only at its wakeups: its latency is the wait for the next
wakeup (uniform over the period: period / 2 on average) plus one read (also measured here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from tests.factories import TEST_POLICY
from tests.integration.agentproc import AgentProcess, Api, Sent, first_held
from tests.unit.api_support import ISSUER, jwks

from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import BrokerError, LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings, settings_env
from handtrace.core.signing import generate_key_pair

TIMEOUT_S = 120.0
SHIPPER_IDLE_S = 5.0
"""agent.shipper.Shipper's ``idle_delay_s``: with its spool drained, an agent waits at least this
long before its next wakeup, so its wakeup period is max(batch_interval_s, 5 s)."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(root: Path) -> LocalBroker:
    """A local broker on free ports (one retry on other ports)."""
    for attempt in range(2):
        port = free_port()
        broker = LocalBroker(root / f"kafka{attempt}", port, next(p for p in iter(free_port, None) if p != port))
        try:
            broker.start(timeout_s=120, echo=False)
            return broker
        except BrokerError as e:
            print(f"  broker start failed ({e}); retrying on other ports", flush=True)
    raise RuntimeError("could not start the Kafka broker")


def metric(s: Settings, sample: str) -> float:
    """One sample of the worker's /metrics (-1 when unreachable)."""
    import re
    import urllib.request

    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{s.stream.metrics_port}/metrics", timeout=5).read().decode()  # noqa: S310
    except OSError:
        return -1.0
    m = re.search(rf"^{re.escape(sample)} ([0-9.e+]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def wait(pred: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}")


def machine() -> str:
    cpu = platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def summary(xs: list[float], share: bool = False) -> str:
    if share:
        return f"{sum(xs):.0f} of {len(xs)}"
    return f"p50 {statistics.median(xs):5.2f} s  max {max(xs):5.2f} s" if xs else "n/a"


def measure(s: Settings, api: Api, agent: AgentProcess, interval_s: float, n: int,
            rng: random.Random) -> dict[str, list[float]]:
    """N policy changes and N exemption changes; latencies (s) by series."""
    out: dict[str, list[float]] = {k: [] for k in (
        "policy worker (from request)", "policy worker applied before the 202", "policy agent (from request)",
        "policy agent (from 202)", "exemption worker (from request)", "exemption worker applied before the 202",
        "exemption agent (from request)", "exemption agent (from 202)", "API request to 202")}

    def during(call: Any, predicates: dict[str, Any]) -> tuple[Sent, dict[str, float | None]]:
        """Make the API call in a thread while polling the observers from before the request:
        a worker usually applies the change before the API has answered."""
        done: list[Any] = []
        th = threading.Thread(target=lambda: done.append(call()), daemon=True)
        th.start()
        held = first_held(predicates, TIMEOUT_S)
        th.join(TIMEOUT_S)
        if not done or not isinstance(done[0], Sent):
            raise RuntimeError(f"the API call did not complete: {done}")
        return done[0], held

    def status(key: str) -> Any:
        st = agent.status()
        return st[key] if st else None

    period = max(interval_s, SHIPPER_IDLE_S)
    for i in range(n):
        time.sleep(rng.uniform(0, period))  # a random phase of the agent's wakeup cycle
        version = api.policy_version() + 1
        sent, held = during(
            lambda i=i: api.set_sampling({"*": 1.0, "kind:pointer_move": round(0.5 + 0.01 * i, 2)}),
            {"worker": lambda v=version: metric(s, "handtrace_stream_policy_version") >= v,
             "agent": lambda v=version: (status("policy_version") or 0) >= v})
        if None in held.values():
            raise RuntimeError(f"policy v{version} not applied: {held}\n{agent.tail()}")
        out["policy worker (from request)"].append(held["worker"] - sent.requested)  # type: ignore[operator]
        out["policy worker applied before the 202"].append(float(held["worker"] <= sent.accepted))  # type: ignore[operator]
        out["policy agent (from request)"].append(held["agent"] - sent.requested)  # type: ignore[operator]
        out["policy agent (from 202)"].append(held["agent"] - sent.accepted)  # type: ignore[operator]
        out["API request to 202"].append(sent.accepted - sent.requested)

    for i in range(n):
        time.sleep(rng.uniform(0, period))
        kind, mode = ("exemption_grant", "exempt") if i % 2 == 0 else ("exemption_revoke", "capturing")
        sample = f'handtrace_stream_controls_total{{kind="{kind}"}}'
        before = metric(s, sample)
        call = api.grant if kind == "exemption_grant" else api.revoke
        sent, held = during(lambda c=call: c(agent.employee_id),
                            {"worker": lambda b=before, m=sample: metric(s, m) > b,
                             "agent": lambda m=mode: status("mode") == m})
        if None in held.values():
            raise RuntimeError(f"{kind} not applied: {held}\n{agent.tail()}")
        out["exemption worker (from request)"].append(held["worker"] - sent.requested)  # type: ignore[operator]
        out["exemption worker applied before the 202"].append(float(held["worker"] <= sent.accepted))  # type: ignore[operator]
        out["exemption agent (from request)"].append(held["agent"] - sent.requested)  # type: ignore[operator]
        out["exemption agent (from 202)"].append(held["agent"] - sent.accepted)  # type: ignore[operator]
        out["API request to 202"].append(sent.accepted - sent.requested)
    return out


def measure_reads(s: Settings, root: Path, n: int) -> dict[str, list[float]]:
    """What one agent read costs: ControlPlaneFollower.refresh() as the agent's wakeup calls it
    (a new consumer, metadata, the end offsets of the policy partition and of its controls
    partition, a fetch only when something is new, closed again)."""
    from handtrace.agent.controlplane import ControlPlaneFollower
    from handtrace.core.signing import verifier
    from handtrace.core.topics import Topics

    t = Topics.from_settings(s.topics)
    f = ControlPlaneFollower(s.kafka.librdkafka(), policy_topic=t.policy, controls_topic=t.controls,
                             employee_id="emp-reads", state_path=root / "reads" / "controlplane.json",
                             verifier=verifier(s))
    out: dict[str, list[float]] = {"first read (whole topics)": [], "read with nothing new": []}
    for i in range(n + 1):
        t0 = time.monotonic()
        f.refresh()
        out["first read (whole topics)" if i == 0 else "read with nothing new"].append(time.monotonic() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--changes", type=int, default=10, help="policy changes and exemption changes per interval")
    ap.add_argument("--intervals", default="2,10", help="agent wakeup intervals (s) to measure, comma-separated "
                    "(empty: only the cost of one read)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    intervals = [float(x) for x in args.intervals.split(",") if x.strip()]
    rng = random.Random(args.seed)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ht-propagation-") as tmp:
        root = Path(tmp)
        broker = start_broker(root)
        worker: subprocess.Popen[bytes] | None = None
        agents: list[AgentProcess] = []
        api: Api | None = None
        try:
            priv, pub = generate_key_pair()
            (root / "jwks.json").write_text(json.dumps(jwks()))
            tag = uuid.uuid4().hex[:8]
            s = Settings(state_dir=root / "state", kafka={"bootstrap_servers": broker.bootstrap},
                         topics={"prefix": f"p{tag}", "partitions": 3},
                         stream={"app_id": f"stream-{tag}", "metrics_port": free_port(),
                                 "pseudonym_key": "bench-key-" + "k" * 32},
                         control={"signing_key": priv, "signing_key_id": "api1", "public_keys": {"api1": pub}},
                         api={"jwks_file": str(root / "jwks.json"), "issuer": ISSUER, "read_timeout_s": 20})
            ensure_topics(s.kafka, s.topics)
            from handtrace.control.publish import control_record, publish

            publish(s, control_record("policy_update", employee_id=None, actor="bench", role="ops",
                                      policy=TEST_POLICY))
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s)}
            with open(root / "worker.log", "ab") as log:
                worker = spawn_owned([sys.executable, "-m", "handtrace.stream"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
            wait(lambda: metric(s, "handtrace_stream_policy_version") >= 1, 180, "the worker to start")
            api = Api.of(s)
            reads = measure_reads(s, root, args.changes)
            print("one agent read of the control plane (in this process):", flush=True)
            for name, xs in reads.items():
                print(f"  {name:40s} {summary(xs)}", flush=True)
            results: dict[float, dict[str, list[float]]] = {}
            for interval in intervals:
                agent = AgentProcess(s, f"emp-{int(interval)}", root / f"laptop-{interval:g}",
                                     batch_interval_s=interval)
                agents.append(agent)
                agent.start()
                version = api.policy_version()
                wait(lambda a=agent, v=version: (a.status() or {}).get("policy_version") == v, 120,
                     f"the agent (interval {interval:g} s) to apply the policy in force")
                print(f"agent wakeup interval {interval:g} s: {args.changes} policy + {args.changes} "
                      "exemption changes ...", flush=True)
                results[interval] = measure(s, api, agent, interval, args.changes, rng)
                agent.stop()
        finally:
            for a in agents:
                a.stop()
            if api is not None:
                api.close()
            if worker is not None and worker.poll() is None:
                worker.terminate()
                try:
                    worker.wait(30)
                except subprocess.TimeoutExpired:
                    worker.kill()
            broker.stop()

    print(f"\nlatency of a control made through the API ({args.changes} of each kind per interval)")
    for interval, series in results.items():
        print(f"\nagent wakeup interval {interval:g} s (wakeup period {max(interval, SHIPPER_IDLE_S):g} s)")
        for name, xs in series.items():
            print(f"  {name:40s} {summary(xs, share='before the 202' in name)}")
        agent_all = series["policy agent (from request)"] + series["exemption agent (from request)"]
        print(f"  {'agent, all (from request)':40s} {summary(agent_all)}  "
              f"(p50 / period = {statistics.median(agent_all) / max(interval, SHIPPER_IDLE_S):.2f})")


if __name__ == "__main__":
    main()
