"""Alert rules: `promtool check rules` and `promtool test rules` (Debian's prometheus package)
pass on the committed files and fail on broken copies; every alert has a runbook section, a
firing and a quiet test case, and the Prometheus configs load the rules."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from dashboards.promql import RULES_DIR, rules

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]
TESTS_DIR = ROOT / "deploy" / "prometheus" / "tests"
RUNBOOK = ROOT / "docs" / "runbook.md"


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not installed (Debian package `prometheus`; deploy/setup.sh installs it)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=50, cwd=cwd, check=False)


def alerts() -> list[dict]:  # type: ignore[type-arg]
    return [r for r in rules() if "alert" in r]


def test_promtool_check_rules() -> None:
    files = sorted(str(f) for f in RULES_DIR.glob("*.yml"))
    assert files
    r = promtool("check", "rules", *files)
    assert r.returncode == 0, r.stdout + r.stderr


def test_promtool_test_rules() -> None:
    files = sorted(str(f) for f in TESTS_DIR.glob("*.test.yml"))
    assert files
    r = promtool("test", "rules", *files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_local_config_loads_the_rules() -> None:
    r = promtool("check", "config", str(ROOT / "deploy" / "prometheus" / "prometheus.local.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{len(list(RULES_DIR.glob('*.yml')))} rule files found" in r.stdout
    compose_cfg = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert compose_cfg["rule_files"] == ["/etc/prometheus/rules/*.yml"]
    compose = (ROOT / "deploy" / "docker-compose.yml").read_text()
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in compose


def test_a_broken_threshold_fails_the_rule_tests(tmp_path: Path) -> None:
    """The unit tests pin behaviour: raising a threshold makes them fail."""
    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    for f in RULES_DIR.glob("*.yml"):
        text = f.read_text().replace("handtrace:stream_deadletter_ratio:rate10m > 0.01",
                                     "handtrace:stream_deadletter_ratio:rate10m > 0.5")
        (tmp_path / "rules" / f.name).write_text(text)
    for f in TESTS_DIR.glob("*.test.yml"):
        shutil.copy(f, tmp_path / "tests" / f.name)
    r = promtool("test", "rules", *[str(p) for p in (tmp_path / "tests").glob("*.test.yml")])
    assert r.returncode != 0 and "HandtraceDeadLetterRateHigh" in r.stdout + r.stderr


def test_a_syntax_error_fails_check_rules(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("groups:\n  - name: x\n    rules:\n      - alert: X\n        expr: sum(rate(a[5m])\n")
    assert promtool("check", "rules", str(bad)).returncode != 0


def test_every_alert_is_tested_firing_and_quiet() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for f in TESTS_DIR.glob("*.test.yml"):
        for case in yaml.safe_load(f.read_text())["tests"]:
            for a in case.get("alert_rule_test", []):
                (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
    names = {a["alert"] for a in alerts()}
    assert names - fired == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested quiet"


def _anchors(markdown: str) -> set[str]:
    return {re.sub(r"[^a-z0-9 -]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.+)$", markdown, re.M)}


def test_every_alert_has_a_runbook_section() -> None:
    anchors = _anchors(RUNBOOK.read_text())
    for a in alerts():
        url = a["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/runbook.md" and anchor == a["alert"].lower(), url
        assert anchor in anchors, f"docs/runbook.md has no section for {a['alert']}"
        assert {"summary", "description"} <= set(a["annotations"]), a["alert"]
        assert a["labels"]["severity"] in ("warning", "critical"), a["alert"]


def test_the_issue_alerts_exist() -> None:
    """Issue #5: bandwidth or battery over budget, consumer lag, dead letters, ingestion stopped,
    agents silent."""
    names = {a["alert"] for a in alerts()}
    assert {"HandtraceAgentBatteryDrainOverBudget", "HandtraceAgentUploadOverBudget", "HandtraceConsumerLagHigh",
            "HandtraceDeadLetterRateHigh", "HandtraceIngestionStopped", "HandtraceAgentsSilent"} <= names
