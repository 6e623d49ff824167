"""The agent's .deb (issue #15, ADR 0019), end to end: built by deploy/agent-deb.sh (nfpm),
installed with dpkg into a throwaway root (its own admin dir; maintainer scripts run
chrootless with $DPKG_ROOT), the installed launcher refused before the consent step, run under
Xvfb on real X11 input against the real broker, then removed and purged: nothing captured and
nothing of the package is left behind.

The installed agent runs on this machine's /usr/bin/python3 with only the package's own
libraries (python3 -I): the server stack is not there to be imported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl
import pytest

from handtrace.core import codec
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings
from tests.integration.conftest import topic_records, topics_of, wait_for
from tests.xvfb import WindowFactory, XvfbServer, xdotool

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SETTLE_S = 0.8


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is needed to build and install the agent's .deb (Debian's dpkg)")
    return path


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb, built once for this module with this interpreter (the wheels' Python)."""
    _tool("dpkg")
    _tool("strip")
    out = tmp_path_factory.mktemp("deb")
    r = subprocess.run([str(ROOT / "deploy" / "agent-deb.sh"), str(out)], env={**os.environ,
                       "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900, check=False)
    if r.returncode != 0:
        pytest.fail(f"deploy/agent-deb.sh failed:\n{r.stderr[-3000:]}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture
def droot() -> Iterator[Path]:
    """A throwaway root with its own dpkg admin dir, one user (alice) and the host's python3
    registered (the package depends on it; the agent runs on the host's interpreter). Short
    path: the agent's Unix socket lives under it."""
    r = Path(tempfile.mkdtemp(prefix="htdeb"))
    try:
        admin = r / "var" / "lib" / "dpkg"
        for d in ("updates", "info", "triggers"):
            (admin / d).mkdir(parents=True)
        (admin / "available").touch()
        version = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "python3"], capture_output=True,
                                 text=True, check=False).stdout.strip()
        if not version:
            pytest.fail("Debian's python3 package is needed (the .deb runs the agent on /usr/bin/python3)")
        (admin / "status").write_text(f"Package: python3\nStatus: install ok installed\nPriority: optional\n"
                                      f"Version: {version}\nArchitecture: amd64\nMaintainer: host\n"
                                      "Description: the host's python3\n\n")
        (r / "etc").mkdir()
        (r / "etc" / "passwd").write_text("root:x:0:0::/nonexistent-root:/bin/sh\n"
                                          "alice:x:1000:1000::/home/alice:/bin/sh\n")
        (r / "home" / "alice").mkdir(parents=True)
        yield r
    finally:
        shutil.rmtree(r, ignore_errors=True)


def dpkg(root: Path, *args: str) -> str:
    r = subprocess.run([_tool("dpkg"), f"--root={root}", "--force-script-chrootless", *args],
                       capture_output=True, text=True, timeout=300, check=False)
    assert r.returncode == 0, f"dpkg {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_deb_install_consent_capture_remove_purge(deb: Path, droot: Path, kafka_bootstrap: str,
                                                  settings_factory: Callable[..., Settings], xvfb: XvfbServer,
                                                  windows: WindowFactory) -> None:
    s = settings_factory()
    host_py = subprocess.run(["/usr/bin/python3", "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    assert host_py == str(sys.version_info[:2]), f"/usr/bin/python3 is {host_py}: the .deb's wheels are for this one"

    out = dpkg(droot, "-i", str(deb))
    assert "nothing is captured until an employee runs `handtrace-agent consent`" in out
    for f in ("usr/bin/handtrace-agent", "usr/lib/systemd/user/handtrace-agent.service", "etc/handtrace/agent.env",
              "opt/handtrace-agent/handtrace-agent.py", "opt/handtrace-agent/lib/handtrace/agent/cli.py",
              "usr/share/doc/handtrace-agent/agent-rollout.md"):
        assert (droot / f).exists(), f
    enabled = droot / "etc/systemd/user/graphical-session.target.wants/handtrace-agent.service"
    assert os.readlink(enabled) == "/usr/lib/systemd/user/handtrace-agent.service"
    unit = (droot / "usr/lib/systemd/user/handtrace-agent.service").read_text()
    assert "ConditionPathExists=%S/handtrace/agent/consent.json" in unit
    lib = droot / "opt/handtrace-agent/lib"
    for server in ("chdb", "pyarrow", "polars", "pandas", "faust", "fastapi", "numpy", "uvicorn", "aiokafka"):
        assert not (lib / server).exists(), f"the slim package ships {server}"
    state = droot / "home/alice/.local/state/handtrace/agent"
    assert not state.exists()  # installing started nothing

    # What device management ships (docs/agent-rollout.md): broker, employee id, policy.
    policy = droot / "etc/handtrace/policy.json"
    policy.write_text(json.dumps({"version": 3, "allowed_apps": ["code"], "allowed_domains": [],
                                  "sampling": {}, "text_capture": {"code": "full"}}))
    (droot / "etc/handtrace/agent.env").write_text(
        f"HANDTRACE_KAFKA__BOOTSTRAP_SERVERS={kafka_bootstrap}\nHANDTRACE_TOPICS__PREFIX={s.topics.prefix}\n"
        f"HANDTRACE_AGENT__POLICY_FILE={policy}\nHANDTRACE_AGENT__FOLLOW_CONTROL_PLANE=false\n"
        "HANDTRACE_AGENT__SCREENSHOTS=false\nHANDTRACE_AGENT__BATCH_INTERVAL_S=1\n"
        "HANDTRACE_AGENT__BATTERY_BATCH_INTERVAL_S=1\nHANDTRACE_AGENT__SOURCE=x11\n"
        "HANDTRACE_AGENT__FOCUS_POLL_S=0.1\nHANDTRACE_AGENT__FOCUS_IDLE_POLL_S=0.1\n")
    cfg = droot / "home/alice/.config/handtrace"
    cfg.mkdir(parents=True)
    (cfg / "agent.env").write_text("HANDTRACE_AGENT__EMPLOYEE_ID=alice\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(droot / "home/alice"), "DISPLAY": xvfb.display,
           "HANDTRACE_AGENT_HOME": str(droot / "opt/handtrace-agent"),
           "HANDTRACE_AGENT_ENV_FILE": str(droot / "etc/handtrace/agent.env"),
           # this machine's systemd does not know the throwaway root's unit
           "HANDTRACE_AGENT_SYSTEMD": "0"}
    launcher = str(droot / "usr/bin/handtrace-agent")

    def cli(*args: str, stdin: str | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([launcher, *args], env={**env, **extra}, input=stdin, capture_output=True,
                              text=True, timeout=60, check=False)

    r = cli("run")
    assert r.returncode == 1 and "no consent recorded" in r.stderr, r.stdout + r.stderr
    assert not (state / "spool").exists()
    r = cli("consent", stdin="yes\n")
    assert r.returncode == 2 and "interactively" in r.stderr  # piped stdin is not a terminal
    r = cli("consent", stdin="no\n", HANDTRACE_CONSENT_STDIN="1")
    assert r.returncode == 1 and not (state / "consent.json").exists()
    r = cli("consent", stdin="yes\n", HANDTRACE_CONSENT_STDIN="1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "apps captured:  code" in r.stdout and "employee id:    alice" in r.stdout
    assert json.loads((state / "consent.json").read_text())["employee_id"] == "alice"

    code = windows(wm_class=("code", "Code"), title="notes.md - Code", geometry=(50, 50, 500, 300))
    other = windows(wm_class=("telegram-desktop", "TelegramDesktop"), title="Mum", geometry=(600, 50, 400, 300),
                    focus=False)
    log = droot / "agent.log"
    with log.open("wb") as f:
        proc = spawn_owned([launcher, "run"], env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        def status() -> dict[str, object] | None:
            r = cli("status", "--json")
            return json.loads(r.stdout) if r.returncode == 0 else None

        wait_for(lambda: (st := status()) is not None and st["focused_app"] == "code", 60,
                 "the installed agent capturing", lambda: log.read_text(errors="replace"))
        xdotool(xvfb, "type", "--delay", "20", "hello deb")
        time.sleep(SETTLE_S)
        other.focus()
        time.sleep(SETTLE_S)
        xdotool(xvfb, "type", "--delay", "20", "private")
        code.focus()
        time.sleep(SETTLE_S)
        r = cli("pause", "1m")
        assert r.returncode == 0 and "paused until" in r.stdout, r.stdout + r.stderr
        xdotool(xvfb, "type", "--delay", "20", "paused")
        time.sleep(SETTLE_S)
        wait_for(lambda: (st := status()) is not None and st["mode"] == "paused" and st["spool_events"] == 0
                 and int(st["events_sent"]) > 0, 60, "the batches shipped", lambda: log.read_text(errors="replace"))
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, log.read_text(errors="replace")

    typed: dict[str, str] = {}
    for value in topic_records(kafka_bootstrap, topics_of(s).events):
        batch = codec.decode_event_batch(value)
        assert batch.header["employee_id"] == "alice", batch.header
        ev = batch.events.sort("captured_at_us")
        for row in ev.filter(pl.col("kind") == "key_down").iter_rows(named=True):
            typed[row["app_id"]] = typed.get(row["app_id"], "") + (row["text"] or "")
    assert typed == {"code": "hello deb"}, typed  # not the other app's text, nothing while paused
    assert (state / "spool").is_dir() and any((state / "spool").iterdir())

    dpkg(droot, "--remove", "handtrace-agent")
    assert not (state / "spool").exists(), "removal left captured data behind"
    assert (state / "consent.json").exists() and (droot / "etc/handtrace/agent.env").exists()
    assert not enabled.is_symlink() and not (droot / "opt/handtrace-agent").exists()
    assert not (droot / "usr/bin/handtrace-agent").exists()

    dpkg(droot, "--purge", "handtrace-agent")
    assert not (droot / "home/alice/.local/state/handtrace").exists()
    left = {f for f in files_under(droot) if not f.startswith("var/lib/dpkg/")}
    # Left: the test's own files and what device management wrote beside the package's (not dpkg's).
    assert left == {"etc/passwd", "agent.log", "home/alice/.config/handtrace/agent.env",
                    "etc/handtrace/policy.json"}, left
