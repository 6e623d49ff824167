"""The real agent process (`handtrace agent run`, synthetic backend) through a broker outage and a
kill -9: every event the agent had captured into its spool before the kill arrives exactly once
after both come back; and the employee controls work over the local socket against a live agent.

The broker here is a dedicated one (stopped and restarted by the test), not the session broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from handtrace.agent.spool import Spool
from handtrace.core import codec
from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import KafkaSettings, TopicSettings
from handtrace.core.topics import Topics
from tests.integration.conftest import start_outage_broker, topic_records

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Everything the synthetic user does is allowed: the test is about delivery, not the allowlist.
ALLOW_ALL = {"version": 1, "allowed_apps": ["code", "google-chrome", "slack", "gnome-terminal-server", "spotify"],
             "allowed_domains": ["google.com", "github.com", "atlassian.net", "youtube.com", "reddit.com",
                                 "amazon.com", "bbc.com"], "sampling": {}, "text_capture": {"*": "full"}}


class AgentProc:
    """`handtrace agent run` as a subprocess with its own state dir and topics."""

    def __init__(self, state: Path, bootstrap: str, prefix: str, employee: str) -> None:
        self.state = state
        policy = state / "policy.json"
        policy.write_text(json.dumps(ALLOW_ALL))
        self.env = {**os.environ, "HANDTRACE_STATE_DIR": str(state),
                    "HANDTRACE_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "HANDTRACE_TOPICS__PREFIX": prefix,
                    "HANDTRACE_TOPICS__PARTITIONS": "2", "HANDTRACE_AGENT__EMPLOYEE_ID": employee,
                    "HANDTRACE_AGENT__DEVICE_ID": f"dev-{employee}",
                    "HANDTRACE_AGENT__SOURCE": "synthetic", "HANDTRACE_AGENT__POLICY_FILE": str(policy),
                    "HANDTRACE_AGENT__BATCH_INTERVAL_S": "2", "HANDTRACE_AGENT__DURABLE_AFTER_S": "1",
                    "HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE": "false", "HANDTRACE_AGENT__SCREENSHOTS": "false"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = (self.state / "agent.log").open("ab")
        self.proc = spawn_owned([sys.executable, "-m", "handtrace.cli", "agent", "run"], env=self.env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        log.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"the agent exited early ({self.proc.returncode}):\n{self.log()}")
            if self.cli("status", "--json", check=False).returncode == 0:
                return
            time.sleep(0.3)
        pytest.fail(f"the agent did not answer on its control socket:\n{self.log()}")

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")[-3000:]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([sys.executable, "-m", "handtrace.cli", *args], env=self.env, capture_output=True,
                           text=True, timeout=60)
        if check and r.returncode != 0:
            pytest.fail(f"handtrace {' '.join(args)} failed: {r.stdout}{r.stderr}")
        return r

    def status(self) -> dict:
        out = self.cli("status", "--json").stdout
        return json.loads(out)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)




def event_ids(values: list[bytes]) -> Counter[bytes]:
    ids: Counter[bytes] = Counter()
    for v in values:
        ids.update(codec.decode_event_batch(v).events.get_column("event_id").to_list())
    return ids


def spooled_event_ids(spool_dir: Path) -> set[bytes]:
    spool = Spool(spool_dir, max_bytes=200 << 20, segment_bytes=4 << 20)
    try:
        out: set[bytes] = set()
        for _seq, e in spool.pending(1_000_000, 1 << 40, roles=["events"]):
            out.update(codec.decode_event_batch(e.value).events.get_column("event_id").to_list())
        return out
    finally:
        spool.close()


def test_kill9_during_broker_outage_every_spooled_event_arrives_exactly_once(outage_broker: LocalBroker,
                                                                            tmp_path: Path) -> None:
    prefix = f"ag-{uuid.uuid4().hex[:6]}"
    ts = TopicSettings(prefix=prefix, partitions=2)
    ensure_topics(KafkaSettings(bootstrap_servers=outage_broker.bootstrap), ts)
    topics = Topics.from_settings(ts)
    agent = AgentProc(tmp_path, outage_broker.bootstrap, prefix, "emp-outage")
    agent.start()
    try:
        # Shipping works while the broker is up.
        deadline = time.monotonic() + 90
        while agent.status()["events_sent"] == 0:
            if time.monotonic() > deadline:
                pytest.fail(f"the agent sent nothing with the broker up: {agent.status()}\n{agent.log()}")
            time.sleep(0.5)
        outage_broker.stop()
        time.sleep(8)  # the agent keeps capturing; batches pile up in the spool
        st = agent.status()
        assert st["spool_events"] > 0, f"nothing spooled during the outage: {st}"
        agent.kill9()
        pending = spooled_event_ids(tmp_path / "agent" / "spool")
        assert pending, "the spool lost its entries in the kill"
        start_outage_broker(outage_broker)
        agent.start()
        deadline = time.monotonic() + 120
        while True:
            st = agent.status()
            sent_all = st["events_sent"] > 0 and st["spool_events"] == 0
            if sent_all:
                break
            if time.monotonic() > deadline:
                pytest.fail(f"the restarted agent did not drain its spool: {st}\n{agent.log()}")
            time.sleep(0.5)
    finally:
        agent.stop()
    arrived = event_ids(topic_records(outage_broker.bootstrap, topics.events))
    missing = pending - set(arrived)
    assert not missing, f"{len(missing)} of {len(pending)} spooled events never arrived"
    dups = {k: n for k, n in arrived.items() if n > 1}
    assert not dups, f"{len(dups)} events arrived more than once"
    controls = topic_records(outage_broker.bootstrap, topics.heartbeats)
    assert controls, "no heartbeat arrived"


def test_employee_controls_against_a_live_agent(outage_broker: LocalBroker, tmp_path: Path) -> None:
    prefix = f"ag-{uuid.uuid4().hex[:6]}"
    ts = TopicSettings(prefix=prefix, partitions=2)
    ensure_topics(KafkaSettings(bootstrap_servers=outage_broker.bootstrap), ts)
    topics = Topics.from_settings(ts)
    agent = AgentProc(tmp_path, outage_broker.bootstrap, prefix, "emp-controls")
    agent.start()
    try:
        refused = agent.cli("pause", "45m", check=False)
        assert refused.returncode != 0 and "at most 30 minutes" in refused.stderr
        t0 = time.time()
        agent.cli("pause", "10m", "--reason", "private call")
        st = agent.status()
        assert time.time() - t0 < 5 and st["mode"] == "paused"
        assert 9.5 * 60 < st["paused_until_us"] / 1e6 - t0 < 10.5 * 60
        time.sleep(3)
        before = agent.status()["events_dropped"].get("paused", 0)
        assert before > 0, "the synthetic user kept working during the pause: its input must be dropped"
        agent.cli("resume")
        agent.cli("exemption", "request", "--reason", "works council member")
        st = agent.status()
        assert st["mode"] == "capturing" and st["exemption_requested"] is True
        deadline = time.monotonic() + 30
        kinds: list[str] = []
        while time.monotonic() < deadline:
            kinds = [codec.decode_record(v, "control_event")["kind"]
                     for v in topic_records(outage_broker.bootstrap, topics.controls)]
            if len(kinds) >= 3:
                break
            time.sleep(1)
        assert sorted(kinds) == ["exemption_request", "pause_end", "pause_start"]
    finally:
        agent.stop()
    # A clean stop removes the socket: the CLI then says no agent runs.
    r = agent.cli("status", check=False)
    assert r.returncode != 0 and "no handtrace agent is running" in r.stderr
