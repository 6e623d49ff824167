"""Render the ``config:`` block of the Helm chart's values (helm/handtrace/values.yaml) from the
Settings model, so the chart's values map one-to-one onto ``HANDTRACE_*`` settings.

Every setting of every section the cluster runs (all but ``agent``: agents run on laptops) is a
key under ``config``, nested as in Settings; ``null`` leaves the service default in force (shown
in the comment above the key). Secret fields are not here: they come from Kubernetes Secrets
(``secrets:`` in values.yaml). The chart's templates turn every non-null key into the variable
``HANDTRACE_<SECTION>__<FIELD>``.

Regenerate with ``python -m handtrace.core.settings_helm --write helm/handtrace/values.yaml``
(rewrites everything below the marker line); tests/unit/test_helm_chart.py fails while stale.
"""

from __future__ import annotations

import enum
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from handtrace.core.settings import Settings
from handtrace.core.settings_doc import _is_model, _is_secret

REGENERATE = "python -m handtrace.core.settings_helm --write helm/handtrace/values.yaml"
MARKER = "# --- generated from handtrace.core.settings.Settings: do not edit below this line ---"

EXCLUDED_SECTIONS = {"agent": "agents run on employees' laptops, not in the cluster"}
"""Sections of Settings with no key under ``config`` (and why)."""

CHART_VALUES: dict[str, Any] = {
    "metrics_host": "0.0.0.0",  # noqa: S104 -- Prometheus scrapes pods from outside the pod
    "api.host": "0.0.0.0",  # noqa: S104 -- the Service forwards to the pod's address
    "kafka.bootstrap_servers": "kafka:9092",
    "clickhouse.dsn": "http://clickhouse:8123",
}
"""Settings whose chart default differs from the service default (a cluster has no local broker,
no embedded engine shared by several pods, and is reached from outside loopback)."""

CREDENTIAL_SETTINGS = {"clickhouse.dsn", "fleet.clickhouse_dsn"}
"""Plain-string settings that may carry credentials (a DSN's user:password): they may come from
a Secret (``secrets:``) instead of ``config``; the Secret wins."""

JSON_SETTINGS = {"control.public_keys", "warehouse.endpoint_groups"}
"""Settings whose value is a mapping: the chart passes them as JSON instead of walking into them
as a section (lists are always passed as JSON). The template's `$json` list names the same."""


def _default(field: FieldInfo) -> Any:
    if field.default_factory is not None:
        return field.default_factory()  # type: ignore[call-arg]
    return None if field.default is PydanticUndefined else field.default


def _yaml_scalar(value: Any) -> str:
    """``value`` as a one-line YAML (JSON-compatible) scalar or flow collection."""
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path):
        value = str(value)
    return json.dumps(value)


def _comment(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}" for line in textwrap.wrap(" ".join(text.split()), 96 - len(indent))]


def secret_paths(model: type[BaseModel] = Settings, prefix: str = "") -> list[str]:
    """Dotted paths of every secret field (SecretStr) of ``model``."""
    out: list[str] = []
    for name, field in model.model_fields.items():
        if _is_model(field.annotation):
            out += secret_paths(field.annotation, f"{prefix}{name}.")
        elif _is_secret(field.annotation):
            out.append(prefix + name)
    return out


def _render(model: type[BaseModel], prefix: str, depth: int) -> list[str]:
    indent = "  " * depth
    lines: list[str] = []
    for name, field in model.model_fields.items():
        path = prefix + name
        if _is_model(field.annotation):
            if depth == 1 and name in EXCLUDED_SECTIONS:
                continue
            doc = " ".join((field.annotation.__doc__ or "").split())
            lines += ["", *_comment(doc, indent), f"{indent}{name}:"]
            lines += _render(field.annotation, path + ".", depth + 1)
            continue
        if _is_secret(field.annotation):
            continue  # from a Kubernetes Secret: secrets.<section>.<field>
        default = _default(field)
        shown = "unset" if default is None else _yaml_scalar(default)
        if name == "state_dir" and not prefix:
            shown = "/var/lib/handtrace (the image's HANDTRACE_STATE_DIR)"
        note = f"{field.description or ''} Service default: {shown}."
        if path in CREDENTIAL_SETTINGS:
            note += f" May carry credentials: prefer secrets.{path}."
        value = _yaml_scalar(CHART_VALUES[path]) + "  # chart default" if path in CHART_VALUES else "null"
        lines += [*_comment(note, indent), f"{indent}{name}: {value}"]
    return lines


def render_config_block() -> str:
    """The generated tail of values.yaml: the marker line and the whole ``config:`` mapping."""
    lines = [
        MARKER,
        f"# Regenerate with: {REGENERATE}",
        "#",
        "# config: one key per HANDTRACE_* setting (docs/configuration.md), nested as in Settings;",
        "# each non-null key becomes HANDTRACE_<SECTION>__<FIELD> in every handtrace container. null:",
        "# the service default (in the comment). Secret settings are under `secrets:` above. Not here:",
        *(f"# section `{k}` ({v})." for k, v in EXCLUDED_SECTIONS.items()),
        "config:",
        *_render(Settings, "", 1),
    ]
    return "\n".join(lines) + "\n"


def write(path: Path) -> None:
    """Rewrite everything from the marker line on in ``path`` (the hand-written part stays)."""
    text = path.read_text(encoding="utf-8")
    head = text.split(MARKER, 1)[0] if MARKER in text else text.rstrip("\n") + "\n\n"
    path.write_text(head + render_config_block(), encoding="utf-8")


def main(argv: list[str]) -> int:
    if argv[:1] == ["--write"] and len(argv) == 2:
        write(Path(argv[1]))
        return 0
    if argv:
        print("usage: python -m handtrace.core.settings_helm [--write VALUES_YAML]", file=sys.stderr)
        return 2
    sys.stdout.write(render_config_block())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
