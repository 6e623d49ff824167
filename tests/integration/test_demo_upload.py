"""Demonstration uploads through the real broker (issue #11): nothing on demonstrations.raw
before submit; after submit the header then its frames, in order, on one key, decodable, the
manifest matching the frames; deferred on battery; and a kill -9 of the agent process in the
middle of an upload -> the next start re-sends the whole recording with the same ids and deletes
it locally once every message is acknowledged. The recordings are made with the real recorder
and Agent (fake frame capturer and action segmenter: another work package); the uploads are the
real DemoUploader and, for the kill test, the real `handtrace agent run` process."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from handtrace.agent.demo_upload import DemoUploader, NetworkState
from handtrace.agent.service import agent_producer_config, demo_dir
from handtrace.core import codec
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings, settings_env
from tests.integration.conftest import topic_messages, topics_of, wait_for
from tests.integration.test_agent_outage import ALLOW_ALL
from tests.unit.test_demo_recorder import Rig, click, recorded

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

UNMETERED = NetworkState(False, True, "test")


def demo_messages(s: Settings) -> list[Any]:
    msgs = topic_messages(s.kafka.librdkafka(), topics_of(s).demonstrations)
    return sorted(msgs, key=lambda m: (m.partition(), m.offset()))


def check_whole(msgs: list[Any], rid: str, store_frames: dict[str, bytes] | None = None) -> dict[str, Any]:
    """``msgs`` (one partition, in offset order) end with one complete upload of ``rid``: the
    header, then exactly its manifest's frames in manifest order; returns the header record."""
    assert len({m.partition() for m in msgs}) == 1 and len({m.key() for m in msgs}) == 1
    heads = [i for i, m in enumerate(msgs) if dict(m.headers())["ht-part"] == b"demonstration"]
    assert heads, "no header message"
    last = heads[-1]
    h = dict(msgs[last].headers())
    assert h["ht-demo-id"] == bytes.fromhex(rid) and HEADER_SENT_AT in h
    rec = codec.decode_record(msgs[last].value(), "demonstration")
    assert rec["demonstration_id"] == bytes.fromhex(rid) and msgs[last].key() == rec["employee_id"].encode()
    frames = msgs[last + 1:]
    assert int(h["ht-frames"]) == len(rec["frames"]) == len(frames)
    for f, m in zip(rec["frames"], frames, strict=True):
        fh = dict(m.headers())
        assert fh["ht-part"] == b"frame" and fh["ht-demo-id"] == bytes.fromhex(rid)
        assert fh["ht-sha256"] == f["sha256"].hex().encode() == hashlib.sha256(m.value()).hexdigest().encode()
        assert fh["ht-format"] == f["format"].encode() and len(m.value()) == f["bytes"]
        assert json.loads(fh["ht-windows"]) == [[w["app_id"], w["url"]] for w in f["windows"]]
        if store_frames is not None:
            assert store_frames[f["sha256"].hex()] == m.value()
    return rec


def uploader_for(s: Settings, rig: Rig, battery: Callable[[], bool]) -> DemoUploader:
    return DemoUploader(rig.rec.store, s.demo, agent_producer_config(s.kafka), topics_of(s).demonstrations,
                        battery_fn=battery, network_fn=lambda: UNMETERED, clock=now_us)


def test_nothing_before_submit_then_header_and_frames_in_order_deferred_on_battery(
        settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    s = settings_factory()
    rig = Rig(tmp_path)
    rig.clock.t = now_us()
    on_battery = [True]
    up = uploader_for(s, rig, lambda: on_battery[0])
    rid = recorded(rig, clicks=4)
    other = recorded(rig, clicks=1, typing=False)  # never submitted: must never leave
    assert up.upload_pending().waiting == 0
    assert demo_messages(s) == []  # stopped, not submitted: nothing sent
    rig.rec.submit(rid)
    r = up.upload_pending()
    assert r.reason == "battery" and r.uploaded == [] and up.status()["waiting"] == 1
    assert demo_messages(s) == []  # submitted but on battery: deferred
    frames = {p.name.split(".")[0]: p.read_bytes() for p in (rig.root / rid / "frames").iterdir()}
    meta = rig.meta(rid)
    on_battery[0] = False
    assert up.upload_pending().uploaded == [rid]
    msgs = demo_messages(s)
    rec = check_whole(msgs, rid, frames)
    assert len(msgs) == 1 + len(rec["frames"])  # sent once
    assert [f["step"] for f in rec["frames"]] == [*range(len(meta["steps"])), len(meta["steps"])]
    assert len(rec["events"]) == meta["events"] and rec["instruction"] == meta["instruction"]
    assert not (rig.root / rid).exists() and (rig.root / other).exists()
    assert all(dict(m.headers())["ht-demo-id"] != bytes.fromhex(other) for m in msgs)


class AgentProcess:
    """`handtrace agent run` (synthetic backend) for ``s``, owned by the test."""

    def __init__(self, s: Settings, employee: str) -> None:
        self.state = s.state_dir
        self.state.mkdir(parents=True, exist_ok=True)
        policy = self.state / "policy.json"
        policy.write_text(json.dumps(ALLOW_ALL))
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
                    "HANDTRACE_AGENT__EMPLOYEE_ID": employee, "HANDTRACE_AGENT__DEVICE_ID": "dev-1",
                    "HANDTRACE_AGENT__SOURCE": "synthetic", "HANDTRACE_AGENT__POLICY_FILE": str(policy),
                    "HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE": "false", "HANDTRACE_AGENT__SCREENSHOTS": "false",
                    # The test machine's power and network are not the subject here.
                    "HANDTRACE_DEMO__UPLOAD_ON_BATTERY": "true", "HANDTRACE_DEMO__UPLOAD_ON_METERED": "true"}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.state / "agent.log", "ab") as log:
            self.proc = spawn_owned([sys.executable, "-m", "handtrace.cli", "agent", "run"], env=self.env,
                                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)

    def log(self) -> str:
        return (self.state / "agent.log").read_text(errors="replace")[-3000:]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "handtrace.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=60, check=False)

    def kill9(self) -> None:
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def first_header_seen(s: Settings, timeout_s: float) -> bool:
    """Block until a header message appears on the demonstrations topic (fast fetches)."""
    topic = topics_of(s).demonstrations
    c = Consumer({**s.kafka.librdkafka(), "group.id": f"watch-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                  "fetch.wait.max.ms": 5, "fetch.min.bytes": 1})
    try:
        parts = sorted(c.list_topics(topic, timeout=10).topics[topic].partitions)
        c.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            m = c.poll(0.02)
            if m is not None and not m.error() and dict(m.headers() or []).get("ht-part") == b"demonstration":
                return True
        return False
    finally:
        c.close()


def test_kill9_mid_upload_resends_the_whole_recording_then_deletes_it(
        settings_factory: Callable[..., Settings], tmp_path: Path) -> None:
    s = settings_factory()
    agent = AgentProcess(s, "emp-1")
    # Big incompressible frames so that the upload lasts long enough to be killed in the middle;
    # if it still finishes first, try again with a bigger recording.
    killed_mid: str | None = None
    for attempt, (steps, size) in enumerate([(30, 2 << 20), (40, 4 << 20), (60, 6 << 20)]):
        rig = Rig(tmp_path / f"a{attempt}", root=demo_dir(s), frame_bytes=size)
        rig.clock.t = now_us()
        rid = rig.rec.start(f"a long task, attempt {attempt}")["id"]
        rig.act(click, steps)
        rig.rec.stop()
        rig.rec.submit(rid)
        manifest_frames = {p.name: p.stat().st_size for p in (demo_dir(s) / rid / "frames").iterdir()}
        assert len(manifest_frames) == steps + 1
        agent.start()
        try:
            if not first_header_seen(s, 90):
                pytest.fail(f"the agent did not start uploading:\n{agent.log()}")
            agent.kill9()
        finally:
            agent.stop()
        meta_path = demo_dir(s) / rid / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text())["status"] == "submitted":
            killed_mid = rid
            print(f"killed mid-upload at attempt {attempt}")  # noqa: T201 -- shown with -s
            break
    if killed_mid is None:
        pytest.fail("every upload finished before the kill -9 landed; the test could not kill one mid-way")
    rid = killed_mid
    before = [m for m in demo_messages(s) if dict(m.headers())["ht-demo-id"] == bytes.fromhex(rid)]
    frames = {p.name.split(".")[0]: p.read_bytes() for p in (demo_dir(s) / rid / "frames").iterdir()}
    agent.start()  # the next start re-uploads it, whole
    try:
        wait_for(lambda: not (demo_dir(s) / rid).exists(), 180, "the re-upload to finish and delete the recording",
                 agent.log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and agent.cli("status", "--json").returncode != 0:
            time.sleep(0.5)
        st = json.loads(agent.cli("status", "--json").stdout)
        assert st["demonstrations"]["submitted"] == 0 and st["demonstrations"]["upload"]["waiting"] == 0
        assert rid[:12] not in agent.cli("record", "list").stdout
    finally:
        agent.stop()
    after = [m for m in demo_messages(s) if dict(m.headers())["ht-demo-id"] == bytes.fromhex(rid)]
    heads = [m for m in after if dict(m.headers())["ht-part"] == b"demonstration"]
    assert len(heads) >= 2 and len(after) > len(before)  # re-sent after the kill
    rec = check_whole(after, rid, frames)  # ...whole: the header then every frame, in order
    ids = {codec.decode_record(m.value(), "demonstration")["demonstration_id"] for m in heads}
    assert ids == {bytes.fromhex(rid)}  # same id every time: the sink deduplicates
    assert {e["event_id"] for e in codec.decode_record(heads[0].value(), "demonstration")["events"]} == \
        {e["event_id"] for e in rec["events"]}  # same event ids too


def test_record_commands_through_the_cli_against_a_running_agent(settings_factory: Callable[..., Settings]) -> None:
    s = settings_factory()
    agent = AgentProcess(s, "emp-cli")
    agent.start()
    try:
        deadline = time.monotonic() + 60
        while agent.cli("status", "--json").returncode != 0:
            if time.monotonic() > deadline or (agent.proc and agent.proc.poll() is not None):
                pytest.fail(f"the agent did not answer:\n{agent.log()}")
            time.sleep(0.3)
        assert "needs a task instruction" in agent.cli("record", "start", " ").stderr.replace("\n", " ")
        r = agent.cli("record", "start", "file the travel expense")
        assert r.returncode == 0 and "started" in r.stdout, r.stdout + r.stderr
        assert "already running" in agent.cli("record", "start", "again").stderr
        time.sleep(2)  # the synthetic user types and clicks in allowlisted `code`
        st = json.loads(agent.cli("status", "--json").stdout)["demonstrations"]
        rid = st["recording"]["id"]
        assert "recording" in agent.cli("status").stdout
        r = agent.cli("record", "stop")
        assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
        assert rid[:12] in agent.cli("record", "list").stdout
        r = agent.cli("record", "show", rid[:8])
        assert r.returncode == 0 and "end frame" in r.stdout, r.stdout + r.stderr
        r = agent.cli("record", "trim", rid[:8], "--from", "0", "--to", "0.5")
        assert r.returncode == 0 and "trimmed" in r.stdout, r.stdout + r.stderr
        assert "no recording" in agent.cli("record", "show", "ffff").stderr
        r = agent.cli("record", "delete", rid[:8])
        assert r.returncode == 0 and not (demo_dir(s) / rid).exists(), r.stdout + r.stderr
        assert demo_messages(s) == []  # nothing of it was ever sent
    finally:
        agent.stop()
