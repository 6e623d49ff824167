"""A parent killed by SIGKILL leaves nothing running (issue #10, class 8): the local broker's
JVM and a service worker it started through core/procs.py die with it, through the same helper
the demo and the fixtures use."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import pid_alive

pytestmark = pytest.mark.timeout(300)

SERVICES = str(Path(__file__).resolve().parents[2] / "services")

# The parent: an owned LocalBroker (as the demo and the fixtures start it) and the real fleet
# exporter against it, started from a worker thread that ends at once (the kernel ties a child
# to the forking thread: the helper must not let that thread's end kill the worker, nor let the
# worker outlive the process). It prints both pids and waits to be killed.
PARENT = textwrap.dedent("""
    import json, socket, subprocess, sys, threading, time
    from pathlib import Path
    from handtrace.core.localbroker import LocalBroker
    from handtrace.core.procs import spawn_owned
    from handtrace.core.settings import Settings, settings_env

    def free_port():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    root = Path(sys.argv[1])
    port = free_port()
    broker = LocalBroker(root / "kafka", port, next(p for p in iter(free_port, None) if p != port))
    broker.start(timeout_s=150, echo=False)
    s = Settings(state_dir=root / "state", dev_mode=True,
                 kafka={"bootstrap_servers": broker.bootstrap}, fleet={"metrics_port": 0})
    env = {**{k: v for k, v in __import__("os").environ.items() if not k.startswith("HANDTRACE_")},
           **settings_env(s)}
    box = []
    log = open(root / "fleet.log", "ab")
    t = threading.Thread(target=lambda: box.append(spawn_owned(
        [sys.executable, "-m", "handtrace.fleet"], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)))
    t.start(); t.join()
    time.sleep(1.0)
    print(json.dumps({"broker": broker.pid(), "worker": box[0].pid}), flush=True)
    time.sleep(600)
""")



def test_broker_and_worker_die_when_their_parent_is_sigkilled(tmp_path: Path) -> None:
    import json

    env = {**os.environ, "PYTHONPATH": SERVICES + os.pathsep + os.environ.get("PYTHONPATH", "")}
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=open(tmp_path / "parent.err", "wb"), env=env)  # noqa: SIM115
    pids: dict[str, int] = {}
    try:
        assert parent.stdout is not None
        line = parent.stdout.readline()
        if not line:
            parent.wait(10)
            pytest.fail(f"the parent failed ({parent.returncode}):\n"
                        f"{(tmp_path / 'parent.err').read_text(errors='replace')[-3000:]}")
        pids = json.loads(line)
        assert pids["broker"] and pid_alive(pids["broker"]), "the broker is not running"
        assert b"kafka.Kafka" in Path(f"/proc/{pids['broker']}/cmdline").read_bytes()
        time.sleep(1.0)
        assert pid_alive(pids["worker"]), ("the worker died with the thread that started it:\n"
                                       + (tmp_path / "fleet.log").read_text(errors="replace")[-3000:])
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(pid_alive(p) for p in pids.values()):
            time.sleep(0.05)
        left = {name: p for name, p in pids.items() if pid_alive(p)}
        assert not left, f"still running after the parent's SIGKILL: {left}"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        for p in pids.values():
            if p and pid_alive(p):
                os.kill(p, signal.SIGKILL)
