"""settings_env reproduces a Settings object through the environment (subprocess services)."""

from __future__ import annotations

from pathlib import Path

import pytest

from handtrace.core.settings import Settings, load_settings, settings_env


def test_environment_round_trips_nested_values_enums_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings(
        state_dir=Path("/tmp/x"),
        kafka={"bootstrap_servers": "b1:9093,b2:9093", "security_protocol": "SASL_SSL",
               "sasl_mechanism": "SCRAM-SHA-512", "sasl_username": "u", "sasl_password": "p w"},
        topics={"prefix": "t1", "partitions": 12},
        stream={"pseudonym_key": "k" * 40, "pointer_max_hz": 25.0},
        sink={"flush_rows": 123},
    )
    env = settings_env(s)
    assert env["HANDTRACE_KAFKA__SECURITY_PROTOCOL"] == "SASL_SSL"
    for name in [n for n in list(__import__("os").environ) if n.startswith("HANDTRACE_")]:
        monkeypatch.delenv(name)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    again = load_settings()
    assert again == s
    assert again.kafka.sasl_password is not None and again.kafka.sasl_password.get_secret_value() == "p w"
