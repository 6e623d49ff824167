"""docs/api.md is generated from the OpenAPI document and roles.py and must not go stale."""

from __future__ import annotations

from pathlib import Path

from handtrace.control.api.docs import REGENERATE, openapi, render
from handtrace.control.api.roles import MATRIX

DOC = Path(__file__).resolve().parents[2] / "docs" / "api.md"


def test_api_reference_is_up_to_date() -> None:
    assert DOC.exists(), f"docs/api.md is missing; generate it with: {REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == render(), f"docs/api.md is stale; regenerate it with: {REGENERATE}"


def test_every_route_and_rule_is_in_the_reference() -> None:
    text = render()
    for path, ops in openapi()["paths"].items():
        for method in ops:
            assert f"| {method.upper()} | `{path}` |" in text
    for rule in MATRIX.values():
        assert f"| {rule.label} |" in text
