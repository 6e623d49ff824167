"""Every test under tests/integration carries the ``integration`` marker, whatever its module
declares, and no test elsewhere may use a broker fixture (tests/conftest.py, issue #10)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import BROKER_FIXTURES, misplaced_broker_tests

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


def collect(*args: str) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "services") + os.pathsep + str(REPO)}
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=110, check=False)
    return done.returncode, done.stdout + done.stderr


def count(out: str, word: str) -> int:
    m = re.search(rf"(\d+) (?:tests? )?{word}", out)
    return int(m.group(1)) if m else 0


def test_no_integration_test_escapes_the_marker() -> None:
    code, out = collect("-m", "not integration", "tests/integration")
    assert code == 5, out  # pytest: no tests collected (all deselected)
    assert count(out, "deselected") > 10, out
    code, out = collect("-m", "integration", "tests/integration")
    assert code == 0 and "::" in out, out


def test_unit_tests_are_not_marked_integration() -> None:
    code, out = collect("-m", "integration", "tests/unit/test_markers.py")
    assert code == 5, out


def test_broker_fixtures_outside_integration_are_refused() -> None:
    unit = REPO / "tests" / "unit" / "test_x.py"
    integ = REPO / "tests" / "integration" / "test_x.py"
    for fixture in BROKER_FIXTURES:
        assert misplaced_broker_tests([(unit, "tests/unit/test_x.py::t", ["tmp_path", fixture])]) == [
            f"tests/unit/test_x.py::t uses {fixture}"]
        assert misplaced_broker_tests([(integ, "tests/integration/test_x.py::t", [fixture])]) == []
    assert misplaced_broker_tests([(unit, "tests/unit/test_x.py::t", ["tmp_path", "monkeypatch"])]) == []
