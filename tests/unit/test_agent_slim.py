"""The slim agent (issue #15, ADR 0019): its import graph pulls none of the server stack, the
`handtrace-agent` distribution declares what that graph needs (a pinned subset of handtrace's
own dependencies), and the packaged agent never starts before the employee's consent step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from handtrace.agent.consent import (
    ConsentError,
    consent_path,
    consent_text,
    read_consent,
    record_consent,
    withdraw_consent,
)
from handtrace.agent.runtime import AgentError
from handtrace.agent.service import run_agent
from handtrace.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
AGENT_PYPROJECT = ROOT / "packaging" / "agent" / "pyproject.toml"
# Top-level modules of the server stack: none may be imported by the agent.
SERVER_STACK = {"chdb", "pyarrow", "polars", "pandas", "faust", "mode", "aiokafka", "fastapi", "starlette",
                "uvicorn", "clickhouse_connect", "boto3", "botocore", "grafana_client", "prometheus_client",
                "jinja2", "jwt", "numpy", "multipart", "datasets"}
# What the agent entry point and every module it loads lazily at run time import (capture
# backends need a display to *start*, not to import). The synthetic source is a simulation for
# development (numpy, polars) and is not part of the slim agent.
AGENT_MODULES = ["handtrace.agent.cli", "handtrace.agent.commands", "handtrace.agent.runcmd",
                 "handtrace.agent.service", "handtrace.agent.consent",
                 "handtrace.agent.screenshots", "handtrace.agent.frames", "handtrace.agent.actions",
                 "handtrace.agent.sources.x11", "handtrace.core.resources"]
# Imported when present, absent in the slim install: fastavro's optional block codecs (the agent's
# batches are compressed by librdkafka, not by Avro) and Cython's runtime module.
OPTIONAL = {"backports", "lz4", "cramjam", "cython_runtime"}
PROBE = """
import importlib, json, sys
for m in sys.argv[1:]:
    importlib.import_module(m)
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
"""


def imported_top_level(modules: list[str]) -> set[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'services'}"}
    env.pop("DISPLAY", None)
    out = subprocess.run([sys.executable, "-c", PROBE, *modules], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def third_party(mods: set[str]) -> set[str]:
    return {m for m in mods if m not in sys.stdlib_module_names and not m.startswith("_") and m != "handtrace"}


def test_agent_import_graph_pulls_no_server_stack() -> None:
    mods = imported_top_level(AGENT_MODULES)
    assert "handtrace" in mods and "confluent_kafka" in mods  # the probe really imported the agent
    assert not mods & SERVER_STACK, f"the agent imports server modules: {sorted(mods & SERVER_STACK)}"


# The resident agent's command line is argparse, not typer/click/rich (ADR 0021: ~7 MB of idle RSS).
CLI_STACK = {"typer", "click", "rich"}


def test_running_the_agent_imports_nothing_of_the_server_stack(tmp_path: Path) -> None:
    """The entry point's `run` path in a child: spool, shipper, device key, screenshots, up to the
    X11 backend (which then finds no display), with the server stack -- and typer, click and rich --
    made unimportable."""
    code = f"""
import sys
for name in {sorted(SERVER_STACK | CLI_STACK)!r}:
    sys.modules[name] = None  # importing it now raises ImportError
sys.argv = ["handtrace-agent", "run"]
from handtrace.agent.cli import main
main()
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_") and k != "DISPLAY"}
    env.update(PYTHONPATH=str(ROOT / "services"), HANDTRACE_STATE_DIR=str(tmp_path),
               HANDTRACE_KAFKA__BOOTSTRAP_SERVERS="127.0.0.1:1", HANDTRACE_AGENT__EMPLOYEE_ID="e1",
               HANDTRACE_AGENT__SOURCE="x11", HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE="false",
               HANDTRACE_AGENT__POLICY_FILE=str(ROOT / "deploy" / "policy.example.json"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "DISPLAY" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert (tmp_path / "agent" / "device.key").exists()  # it got as far as the device key and spool


def _req_name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_agent_distribution_declares_a_pinned_subset_of_handtrace_dependencies() -> None:
    agent = tomllib.loads(AGENT_PYPROJECT.read_text())["project"]
    full = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    full_deps = {_req_name(r): r.split("#")[0].strip() for r in full["dependencies"]}
    pinned = {_req_name(line.split("==")[0]) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if "==" in line and not line.startswith("#")}
    for req in agent["dependencies"]:
        name = _req_name(req)
        assert full_deps.get(name) == req, f"{req}: not handtrace's own requirement ({full_deps.get(name)})"
        assert name in pinned, f"{name}: not pinned in constraints.txt"
        assert name not in {"chdb", "pyarrow", "polars", "faust-streaming", "fastapi", "numpy"}
    assert agent["scripts"] == {"handtrace-agent": "handtrace.agent.cli:main"}
    assert full["scripts"]["handtrace-agent"] == "handtrace.agent.cli:main"
    assert agent["version"] == full["version"]


def test_agent_distribution_covers_what_the_agent_imports() -> None:
    """Every third-party module the agent loads comes from a declared dependency (or one of theirs)."""
    from importlib.metadata import packages_distributions, requires

    from packaging.requirements import Requirement

    declared = {_req_name(r) for r in tomllib.loads(AGENT_PYPROJECT.read_text())["project"]["dependencies"]}
    closure, todo = set(declared), list(declared)
    while todo:
        for r in requires(todo.pop()) or []:
            req = Requirement(r)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            n = _req_name(req.name)
            if n not in closure:
                closure.add(n)
                todo.append(n)
    dists = packages_distributions()
    missing = {m: dists.get(m) for m in third_party(imported_top_level(AGENT_MODULES)) - OPTIONAL
               if not {_req_name(d) for d in dists.get(m, [])} & closure}
    assert not missing, f"imported by the agent but not installed by handtrace-agent: {missing}"


def test_agent_distribution_sources_exist() -> None:
    force = tomllib.loads(AGENT_PYPROJECT.read_text())["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    for src in force:
        assert (AGENT_PYPROJECT.parent / src).exists(), src
    assert "../../services/handtrace/agent" in force and "../../services/handtrace/core" in force


# ---------------------------------------------------------------- consent


def _settings(tmp_path: Path, **agent: object) -> Settings:
    return Settings(state_dir=tmp_path, kafka={"bootstrap_servers": "kafka.example.org:9093"},
                    agent={"employee_id": "e-7", "policy_file": ROOT / "deploy" / "policy.example.json",
                           "follow_control_plane": False, "source": "synthetic", **agent})


def test_consent_text_says_what_is_captured(tmp_path: Path) -> None:
    text = consent_text(_settings(tmp_path))
    assert "e-7" in text and "kafka.example.org:9093" in text
    assert "apps captured:  code, gnome-terminal-server, google-chrome, slack" in text
    assert "screenshots:    yes" in text and "consent --withdraw" in text
    assert "screenshots:    no" in consent_text(_settings(tmp_path, screenshots=False))


def test_consent_record_read_withdraw(tmp_path: Path) -> None:
    s = _settings(tmp_path)
    with pytest.raises(ConsentError, match="no consent recorded"):
        read_consent(s)
    c = record_consent(s, consent_text(s), device_id="d-1", now_s=1.0)
    assert read_consent(s) == c and c.employee_id == "e-7"
    assert consent_path(s).stat().st_mode & 0o777 == 0o600
    with pytest.raises(ConsentError, match="given by 'e-7', not 'e-8'"):
        read_consent(_settings(tmp_path, employee_id="e-8"))
    consent_path(s).write_text("{not json")
    with pytest.raises(ConsentError, match="unreadable"):
        read_consent(s)
    assert withdraw_consent(s) and not withdraw_consent(s)


def test_agent_requiring_consent_refuses_to_start_without_it(tmp_path: Path) -> None:
    s = _settings(tmp_path, require_consent=True)
    with pytest.raises(AgentError, match="handtrace-agent consent"):
        run_agent(s)
    assert not (tmp_path / "agent" / "spool").exists()  # refused before anything was opened


def test_consent_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from handtrace.agent.commands import app

    for k in [k for k in os.environ if k.startswith("HANDTRACE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HANDTRACE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HANDTRACE_AGENT__EMPLOYEE_ID", "e-9")
    runner = CliRunner()
    r = runner.invoke(app, ["consent"], input="yes\n")
    assert r.exit_code == 2 and "interactively" in r.output  # no terminal: never accepted silently
    monkeypatch.setenv("HANDTRACE_CONSENT_STDIN", "1")
    r = runner.invoke(app, ["consent"], input="no\n")
    assert r.exit_code == 1 and "declined" in r.output and not (tmp_path / "agent" / "consent.json").exists()
    r = runner.invoke(app, ["consent"], input="yes\n")
    assert r.exit_code == 0, r.output
    assert "mouse moves, clicks" in r.output and json.loads((tmp_path / "agent" / "consent.json").read_text())[
        "employee_id"] == "e-9"
    r = runner.invoke(app, ["consent", "--show"])
    assert r.exit_code == 0 and "consent recorded for e-9" in r.output
    r = runner.invoke(app, ["consent", "--withdraw"])
    assert r.exit_code == 0 and "withdrawn" in r.output and not (tmp_path / "agent" / "consent.json").exists()


def test_packaged_consent_starts_and_withdraw_stops_the_unit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the package's unit (the launcher sets HANDTRACE_AGENT_SYSTEMD=1), accepting starts it
    and withdrawing stops it; without, systemctl is never called."""
    import shutil
    import subprocess as sp

    from handtrace.agent.commands import app

    for k in [k for k in os.environ if k.startswith("HANDTRACE_")]:
        monkeypatch.delenv(k)
    calls: list[list[str]] = []
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(sp, "run", lambda argv, **kw: calls.append(argv))
    monkeypatch.setenv("HANDTRACE_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("HANDTRACE_AGENT__EMPLOYEE_ID", "e-9")
    monkeypatch.setenv("HANDTRACE_CONSENT_STDIN", "1")
    runner = CliRunner()
    assert runner.invoke(app, ["consent"], input="yes\n").exit_code == 0
    assert runner.invoke(app, ["consent", "--withdraw"]).exit_code == 0
    assert calls == []
    monkeypatch.setenv("HANDTRACE_AGENT_SYSTEMD", "1")
    assert runner.invoke(app, ["consent"], input="yes\n").exit_code == 0
    assert runner.invoke(app, ["consent", "--withdraw"]).exit_code == 0
    assert calls == [["/usr/bin/systemctl", "--user", "start", "handtrace-agent.service"],
                     ["/usr/bin/systemctl", "--user", "stop", "handtrace-agent.service"]]
