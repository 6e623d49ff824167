"""The package installs and runs from a built wheel (issue #10, class 9): build the wheel, install
it with --no-deps into a fresh venv that sees the shared venv's dependencies (not its handtrace),
and from a directory outside the checkout run the CLI and resolve every file the code reads at
run time (broker pom, example policy, dashboards JSON, Avro schemas) inside the installed package."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import sysconfig
import textwrap
import zipfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]

# Runs in the fresh venv, cwd outside the checkout; prints what it resolved as JSON.
PROBE = textwrap.dedent("""
    import json, sys
    import handtrace
    from handtrace.core import schemas
    from handtrace.core.resources import data_file
    from handtrace.control.publish import policy_record
    from handtrace.demo import DEFAULT_POLICY
    from handtrace.fleet.grafana import DEFAULT_DIR, load_dashboards
    rec = policy_record(DEFAULT_POLICY, actor="wheel-test", reason="resolution")
    print(json.dumps({
        "package": handtrace.__file__,
        "pom": str(data_file("deploy", "kafka", "pom.xml")),
        "policy": str(DEFAULT_POLICY),
        "policy_kind": rec.get("kind") if isinstance(rec, dict) else type(rec).__name__,
        "dashboards_dir": str(DEFAULT_DIR),
        "dashboards": sorted(d["uid"] for d in load_dashboards()),
        "schema_dir": str(schemas.schema_dir()),
        "schemas": len(schemas.by_fingerprint()),
    }))
""")


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, cwd=cwd, env=env)
    assert done.returncode == 0, (f"{' '.join(cmd)} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done


def test_the_built_wheel_installs_and_runs_outside_the_checkout(tmp_path: Path) -> None:
    # --- build (offline when hatchling is installed, as `make setup` does)
    dist = tmp_path / "dist"
    isolation = [] if importlib.util.find_spec("hatchling") is None else ["--no-build-isolation"]
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-w", str(dist), str(REPO)])
    (wheel,) = dist.glob("handtrace-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {"handtrace/_deploy/kafka/pom.xml", "handtrace/_deploy/policy.example.json",
               *(f"handtrace/_dashboards/{p.name}" for p in (REPO / "dashboards").glob("*.json")),
               *(f"handtrace/_schemas/{p.relative_to(REPO / 'schemas')}" for p in (REPO / "schemas").rglob("*.avsc"))}
    assert shipped - names == set(), f"missing from the wheel: {sorted(shipped - names)}"

    # --- a fresh venv; the wheel installed while the venv sees nothing else (no index, no deps)
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    py = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)])
    site = Path(run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # Then the shared venv's dependencies, as a plain path: its .pth files (the editable
    # handtrace among them) are not processed, so `handtrace` can only be the installed wheel.
    (site / "zz_shared_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HANDTRACE_", "PYTHON", "VIRTUAL_ENV"))}
    env["HANDTRACE_STATE_DIR"] = str(tmp_path / "state")
    env["COLUMNS"] = "200"  # help text unwrapped
    cli = [str(venv / "bin" / "handtrace")]

    probe = json.loads(run([str(py), "-c", PROBE], cwd=outside, env=env).stdout.strip().splitlines()[-1])
    for key in ("package", "pom", "policy", "dashboards_dir", "schema_dir"):
        assert Path(probe[key]).resolve().is_relative_to(site.resolve()), f"{key} resolved outside the wheel: {probe}"
        assert Path(probe[key]).exists(), probe
    committed = sorted(json.loads(p.read_text())["uid"] for p in (REPO / "dashboards").glob("*.json"))
    assert probe["dashboards"] == committed
    assert probe["schemas"] >= 3

    assert "--agents" in run([*cli, "demo", "--help"], cwd=outside, env=env).stdout
    assert "--actor" in run([*cli, "control", "policy", "set", "--help"], cwd=outside, env=env).stdout
    assert "--url" in run([*cli, "dashboards", "push", "--help"], cwd=outside, env=env).stdout
    status = subprocess.run([*cli, "kafka", "status"], cwd=outside, env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert status.returncode in (0, 1) and "kafka" in status.stdout, status.stdout + status.stderr
