"""Render the settings reference (docs/configuration.md) from the Settings model.

Regenerate with ``python -m handtrace.core.settings_doc > docs/configuration.md``;
tests/unit/test_settings_doc.py fails while the file is stale.
"""

from __future__ import annotations

import enum
import inspect
import re
import sys
import types
from pathlib import Path
from typing import Any, Literal, TypeGuard, Union, get_args, get_origin

from pydantic import BaseModel, SecretBytes, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from handtrace.core.settings import Settings

REGENERATE = "python -m handtrace.core.settings_doc > docs/configuration.md"

_SCALARS: dict[Any, str] = {
    str: "string",
    int: "integer",
    float: "number",
    bool: "boolean",
    Path: "path",
}
_TAG_START = re.compile(r"<(?=[A-Za-z/!?])")  # would open an HTML tag in Markdown
_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"),
           ("min_length", "length >="), ("max_length", "length <="))


def _split_optional(annotation: Any) -> tuple[Any, bool]:
    """Return (the annotation without None, whether None was allowed)."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) < len(get_args(annotation)):
            return (args[0] if len(args) == 1 else Union[tuple(args)]), True  # noqa: UP007
    return annotation, False


def _is_model(annotation: Any) -> TypeGuard[type[BaseModel]]:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_secret(annotation: Any) -> bool:
    inner, _ = _split_optional(annotation)
    return isinstance(inner, type) and issubclass(inner, SecretStr | SecretBytes)


def _cell(text: str) -> str:
    """One Markdown table cell: a single line, pipes escaped, ``<`` escaped outside code spans."""
    parts = " ".join(text.split()).replace("|", "\\|").split("`")
    return "`".join(p if i % 2 else _TAG_START.sub(r"\\<", p) for i, p in enumerate(parts))


def _type_text(field: FieldInfo) -> str:
    """Human-readable type with its constraints, e.g. ``integer, >= 1, <= 65535``."""
    inner, optional = _split_optional(field.annotation)
    if _is_secret(inner):
        text = "(secret) string"
    elif isinstance(inner, type) and issubclass(inner, enum.Enum):
        text = "one of " + ", ".join(f"`{m.value}`" for m in inner)
    elif get_origin(inner) is Literal:
        text = "one of " + ", ".join(f"`{v}`" for v in get_args(inner))
    else:
        text = _SCALARS.get(inner, getattr(inner, "__name__", str(inner)))
    parts = [text]
    for meta in field.metadata:
        for attr, symbol in _BOUNDS:
            if getattr(meta, attr, None) is not None:
                parts.append(f"{symbol} {getattr(meta, attr)}")
        if getattr(meta, "pattern", None) is not None:
            parts.append(f"matching `{meta.pattern}`")
    if optional:
        parts.append("optional")
    return ", ".join(parts)


def _default_text(field: FieldInfo) -> str:
    """The default as shown in the table; secrets never appear."""
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if value is None:
        return "unset"
    if _is_secret(field.annotation):
        return "(secret)"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, Path) and value.is_absolute() and value.is_relative_to(Path.cwd()):
        return f"`./{value.relative_to(Path.cwd())}` (in the working directory)"
    return f"`{value}`"


def _sections(
    model: type[BaseModel], env_prefix: str, delimiter: str, title: str
) -> list[tuple[str, str, list[tuple[str, FieldInfo]]]]:
    """(title, intro, [(env var, field)]) for ``model`` and, recursively, its nested models."""
    rows: list[tuple[str, FieldInfo]] = []
    nested: list[tuple[str, str, list[tuple[str, FieldInfo]]]] = []
    for name, field in model.model_fields.items():
        env = f"{env_prefix}{name}".upper()
        if _is_model(field.annotation):
            sub_title = f"{title}.{name}" if title != "General" else name
            nested += _sections(field.annotation, env + delimiter, delimiter, sub_title)
        else:
            rows.append((env, field))
    intro = "" if title == "General" else inspect.cleandoc(model.__doc__ or "")
    return [(title, intro, rows), *nested] if rows else nested


def render_settings_reference(settings_cls: type[BaseSettings] = Settings) -> str:
    """Render the Markdown settings reference for ``settings_cls``.

    Args:
        settings_cls: The settings model to document (the project's Settings by default).

    Returns:
        The whole Markdown document, ending with a newline.
    """
    config = settings_cls.model_config
    prefix = config.get("env_prefix", "")
    delimiter = config.get("env_nested_delimiter") or "__"
    case = "case-sensitive" if config.get("case_sensitive") else "case-insensitive"
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from {settings_cls.__module__}.{settings_cls.__name__}: do not edit. "
        f"Regenerate with `{REGENERATE}`. -->",
        "",
        f"Every service reads its settings from environment variables named `{prefix}<FIELD>`; "
        f"the fields of a section are nested with `{delimiter}` "
        f"(e.g. `{prefix}KAFKA{delimiter}BOOTSTRAP_SERVERS`). Names are {case}. "
        f"A misspelt `{prefix}*` variable is ignored and the default stays in force: "
        "`handtrace settings` prints the settings in force (secret fields masked).",
        "",
        "Secret fields are marked (secret); their values are never shown.",
    ]
    for title, intro, rows in _sections(settings_cls, prefix, delimiter, "General"):
        lines += ["", f"## {title}", ""]
        if intro:
            lines += [" ".join(intro.split()), ""]
        lines += ["| Variable | Type | Default | Description |", "| --- | --- | --- | --- |"]
        for env, field in rows:
            cells = [f"`{env}`", _type_text(field), _default_text(field), field.description or ""]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render_settings_reference())
