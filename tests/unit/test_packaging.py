"""The wheel ships every file the code reads at run time (issue #10, class 9); the slow
tests/integration/test_wheel.py installs it, this keeps pyproject's list complete on every run."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from handtrace.core.resources import PACKAGED, data_dir, data_file

REPO = Path(__file__).resolve().parents[2]


def force_include() -> dict[str, str]:
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())
    return dict(cfg["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"])


def packaged_as(source: Path) -> str | None:
    """Where the wheel puts ``source`` (a file under the repo), if anywhere."""
    rel = source.relative_to(REPO)
    for src, dst in force_include().items():
        if rel == Path(src):
            return dst
        if Path(src) in rel.parents:
            return str(Path(dst) / rel.relative_to(src))
    return None


@pytest.mark.parametrize("source", [
    REPO / "deploy" / "kafka" / "pom.xml",
    REPO / "deploy" / "policy.example.json",
    *sorted((REPO / "dashboards").glob("*.json")),
    *sorted((REPO / "schemas").rglob("*.avsc")),
], ids=lambda p: str(p.relative_to(REPO)))
def test_every_runtime_file_is_packaged_where_resources_looks(source: Path) -> None:
    top, *rest = source.relative_to(REPO).parts
    assert packaged_as(source) == "/".join(["handtrace", PACKAGED[top], *rest])


def test_checkout_fallback_resolves_the_committed_files() -> None:
    assert data_file("deploy", "kafka", "pom.xml") == REPO / "deploy" / "kafka" / "pom.xml"
    assert data_dir("dashboards") == REPO / "dashboards"
    with pytest.raises(FileNotFoundError, match="neither packaged"):
        data_file("deploy", "no-such-file.json")
    with pytest.raises(ValueError, match="not shipped"):
        data_file("bench", "x.py")
