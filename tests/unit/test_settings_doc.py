"""docs/configuration.md is generated from the Settings model and must not go stale."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from handtrace.core.settings import Settings
from handtrace.core.settings_doc import REGENERATE, render_settings_reference

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def _env_names(model: type[BaseModel], prefix: str) -> list[str]:
    """Every environment variable name of ``model``, walked independently of the renderer."""
    names: list[str] = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            names += _env_names(ann, f"{prefix}{name.upper()}__")
        else:
            names.append(f"{prefix}{name.upper()}")
    return names


def test_configuration_doc_is_up_to_date() -> None:
    """The committed reference equals a fresh rendering."""
    assert DOC.exists(), f"docs/configuration.md is missing; generate it with: {REGENERATE}"
    assert DOC.read_text(encoding="utf-8") == render_settings_reference(), (
        f"docs/configuration.md is stale (Settings changed); regenerate it with: {REGENERATE}"
    )


def test_every_setting_is_documented() -> None:
    """Each variable Settings reads has a row, with its description."""
    text = render_settings_reference()
    for env in _env_names(Settings, "HANDTRACE_"):
        assert f"| `{env}` |" in text, env
    assert "`HANDTRACE_STREAM__PSEUDONYM_KEY` | (secret) string" in text


class _Inner(BaseModel):
    """Inner section."""

    token: SecretStr = SecretStr("hunter2-do-not-print")
    port: int = Field(default=8080, ge=1, le=65535, description="A | piped <described> port.")


class _Fake(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FAKE_", env_nested_delimiter="__")

    name: str = "x"
    inner: _Inner = _Inner()


def test_secrets_are_masked_and_cells_escaped() -> None:
    """A secret default never reaches the document; table cells stay one cell."""
    text = render_settings_reference(_Fake)
    assert "hunter2" not in text
    assert "| `FAKE_INNER__TOKEN` | (secret) string | (secret) |" in text
    row = "| `FAKE_INNER__PORT` | integer, >= 1, <= 65535 | `8080` |"
    assert f"{row} A \\| piped \\<described> port. |" in text
    assert "## inner\n\nInner section.\n" in text
    assert text.endswith("|\n")
