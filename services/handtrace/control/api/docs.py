"""docs/api.md from the OpenAPI document and the role matrix:
``python -m handtrace.control.api.docs > docs/api.md`` (tests/unit/test_api_docs.py keeps it
current)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI

from handtrace.control.api.roles import matrix_markdown

REGENERATE = "PYTHONPATH=$PWD/services python -m handtrace.control.api.docs > docs/api.md"


def openapi() -> dict[str, Any]:
    """The API's OpenAPI document (the JSON routes; the same one `/openapi.json` serves)."""
    from handtrace.control.api.routes import router

    app = FastAPI(title="handtrace control plane", version="1")
    app.include_router(router)
    return app.openapi()


def _schema_text(schema: dict[str, Any] | None, components: dict[str, Any]) -> str:
    if not schema:
        return "-"
    ref = schema.get("$ref")
    if ref:
        name = ref.rsplit("/", 1)[-1]
        props = components.get(name, {}).get("properties", {})
        required = set(components.get(name, {}).get("required", []))
        fields = ", ".join(f"{k}{'' if k in required else '?'}" for k in props)
        return f"`{name}` {{{fields}}}"
    if schema.get("type") == "array":
        return f"list of {_schema_text(schema.get('items'), components)}"
    if "anyOf" in schema:
        return " or ".join(_schema_text(s, components) for s in schema["anyOf"])
    return f"`{schema.get('type', 'object')}`"


def render(spec: dict[str, Any] | None = None) -> str:
    """The Markdown reference."""
    spec = spec or openapi()
    components = spec.get("components", {}).get("schemas", {})
    out = [
        "# Control-plane API reference",
        "",
        f"<!-- Generated from the OpenAPI document by `{REGENERATE}`; do not edit. -->",
        "",
        "Every route takes `Authorization: Bearer <JWT>` (an OIDC token of the configured issuer and",
        "audience, checked against its JWKS; see docs/adr/0013-control-plane-api.md). Missing, invalid",
        "or expired: 401 with `WWW-Authenticate: Bearer`. A role that may not: 403, and one audit entry.",
        "Validation errors: 422 `{\"detail\": [{\"field\": ..., \"message\": ...}, ...]}`, every error at once.",
        "The machine-readable document is served at `/openapi.json`.",
        "",
        "## Role matrix",
        "",
        "`self`: on their own employee id only. Everyone with an employee id is an employee of themself.",
        "",
        matrix_markdown(),
        "## Routes",
        "",
        "| method | path | roles | request body | response |",
        "|---|---|---|---|---|",
    ]
    details = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            roles = op.get("x-roles", [])
            who = "self (any role)" if op.get("x-self-only") and len(roles) == 6 else ", ".join(roles)
            if op.get("x-action") == "other_state":
                who += "; anyone for themself"
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            ok = next((c for c in op.get("responses", {}) if c.startswith("2")), "200")
            resp = op["responses"][ok].get("content", {}).get("application/json", {}).get("schema")
            out.append(f"| {method.upper()} | `{path}` | {who} | {_schema_text(body, components)} | "
                       f"{ok} {_schema_text(resp, components)} |")
            params = [f"`{p['name']}` ({p['in']})" for p in op.get("parameters", [])]
            desc = (op.get("description") or op.get("summary") or "").strip().replace("\n", " ")
            details.append(f"- **{method.upper()} `{path}`** -- {desc}"
                           + (f" Parameters: {', '.join(params)}." if params else ""))
    out += ["", *details, "", "## Schemas", ""]
    for name, schema in sorted(components.items()):
        if name in ("HTTPValidationError", "ValidationError"):
            continue
        props = json.dumps(schema.get("properties", {}), indent=1, sort_keys=True)
        out.append(f"### {name}\n\n```json\n{props}\n```\n")
    return "\n".join(out).rstrip() + "\n"


if __name__ == "__main__":
    print(render(), end="")
