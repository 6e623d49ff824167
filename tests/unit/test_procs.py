"""Children started with core/procs.py die with their parent, even when it dies by SIGKILL and
even when they were started from a thread that has already ended (issue #10, class 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from handtrace.core.procs import LAUNCH_FAILED_CODES, launcher_argv, spawn_owned, stop_child
from tests.conftest import pid_alive

pytestmark = [pytest.mark.timeout(60),
              pytest.mark.skipif(sys.platform != "linux", reason="PR_SET_PDEATHSIG is Linux-only")]

SERVICES = str(Path(__file__).resolve().parents[2] / "services")

# A parent that starts three `sleep` children and reports their pids: one owned from the main
# thread, one owned from a thread that ends right away, one plain Popen (the control: it must
# survive, or this test could not tell an orphan from a cleanup).
PARENT = textwrap.dedent("""
    import subprocess, sys, threading, time
    from handtrace.core.procs import spawn_owned
    main = spawn_owned(["sleep", "600"], start_new_session=True)
    box = []
    t = threading.Thread(target=lambda: box.append(spawn_owned(["sleep", "600"])))
    t.start(); t.join()
    plain = subprocess.Popen(["sleep", "600"], start_new_session=True)
    time.sleep(0.5)  # the thread that forked `box[0]` is long gone by now
    print(main.pid, box[0].pid, plain.pid, flush=True)
    time.sleep(600)
""")



def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        left = [p for p in pids if pid_alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return [p for p in pids if pid_alive(p)]


def cmdline(pid: int) -> bytes:
    return Path(f"/proc/{pid}/cmdline").read_bytes()


def test_owned_children_die_when_the_parent_is_sigkilled() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE,
                              env={**os.environ, "PYTHONPATH": SERVICES})
    plain = 0
    try:
        assert parent.stdout is not None
        owned_main, owned_thread, plain = map(int, parent.stdout.readline().split())
        # Each pid is the program itself (the launcher exec'd it), alive while the parent is.
        assert wait_gone([owned_main, owned_thread], 0.5) == [owned_main, owned_thread]
        for pid in (owned_main, owned_thread):
            assert cmdline(pid).split(b"\0")[0].endswith(b"sleep")
        parent.kill()
        parent.wait(10)
        assert wait_gone([owned_main, owned_thread], 5) == []
        assert pid_alive(plain), "control: a plain child should outlive its SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if plain and pid_alive(plain):
            os.kill(plain, signal.SIGKILL)


def test_a_child_whose_parent_died_before_it_was_armed_does_not_run(tmp_path: Path) -> None:
    # The launcher is told its parent is pid 1; it is not, as if the real parent had died
    # between fork and prctl: it must exit before the program runs.
    marker = tmp_path / "ran"
    argv = launcher_argv(["touch", str(marker)], parent_pid=1)
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    assert done.returncode == 71, LAUNCH_FAILED_CODES
    assert not marker.exists()


def test_the_program_runs_with_its_arguments_environment_and_exit_code(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with open(out, "wb") as f:
        proc = spawn_owned(["sh", "-c", 'printf "%s|%s" "$1" "$HT_X"; exit 7', "sh", "a b"],
                           env={"HT_X": "y", "PATH": os.environ["PATH"]}, stdout=f, cwd=tmp_path)
    assert proc.wait(30) == 7
    assert out.read_text() == "a b|y"


def test_spawning_from_a_thread_returns_a_working_popen() -> None:
    box: list[subprocess.Popen[bytes]] = []
    t = threading.Thread(target=lambda: box.append(spawn_owned(["sleep", "600"], start_new_session=True)))
    t.start()
    t.join()
    proc = box[0]
    assert proc.poll() is None
    assert stop_child(proc, 5, group=True) == -signal.SIGTERM
    assert not pid_alive(proc.pid)


def test_a_missing_program_fails_in_the_parent() -> None:
    with pytest.raises(FileNotFoundError):
        spawn_owned(["handtrace-no-such-program-x"])


def test_kafka_up_detaches_its_broker_and_every_other_starter_owns_it(tmp_path: Path) -> None:
    from handtrace.core.localbroker import LocalBroker
    from handtrace.core.localbroker import main as broker_main
    from handtrace.core.settings import Settings
    from handtrace.demo import local_broker

    s = Settings(state_dir=tmp_path, dev_mode=True)
    assert local_broker(s).owned is False  # `handtrace kafka up|down|status`
    assert local_broker(s, owned=True).owned is True  # the demo
    assert LocalBroker(tmp_path / "kafka").owned is True  # fixtures, tests, anything else
    assert broker_main(["status", "--data-dir", str(tmp_path / "none")]) == 1
