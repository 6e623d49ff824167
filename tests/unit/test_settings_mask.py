"""`handtrace settings` never prints a secret: SecretStr fields and credentials inside any
URL-valued setting, whatever characters the password holds."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from handtrace.cli import mask_url_credentials, masked_settings
from handtrace.core.settings import Settings

passwords = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1,
                    max_size=30).filter(lambda p: p.strip() and "**" not in p)


@given(passwords)
def test_a_dsn_password_never_survives_masking(password: str) -> None:
    # Whatever the password holds (@, :, /, unicode), the output is the URL with it masked.
    assert (mask_url_credentials(f"https://analyst:{password}@ch.example.com:8443/db")
            == "https://analyst:**********@ch.example.com:8443/db")
    assert mask_url_credentials(f"http://u:{password}@10.0.0.1:8123") == "http://u:**********@10.0.0.1:8123"
    query_safe = "".join(c for c in password if c not in "&;#") or "x"
    assert (mask_url_credentials(f"https://ch.example.com/?user=u&password={query_safe}&db=x")
            == "https://ch.example.com/?user=u&password=**********&db=x")


def test_settings_output_masks_dsns_and_secret_fields() -> None:
    s = Settings(clickhouse={"dsn": "https://analyst:p@ss:w/rd@ch.example.com:8443"},
                 fleet={"clickhouse_dsn": "https://fleet:hunter2@ch2.example.com"},
                 stream={"pseudonym_key": "k" * 40},
                 kafka={"bootstrap_servers": "b1:9093", "security_protocol": "SASL_SSL", "sasl_mechanism": "PLAIN",
                        "sasl_username": "svc", "sasl_password": "kafka-secret"})
    text = json.dumps(masked_settings(s))
    for secret in ("p@ss:w/rd", "ss:w/rd", "hunter2", "k" * 40, "kafka-secret"):
        assert secret not in text
    assert "ch.example.com:8443" in text and "analyst" in text


def test_plain_values_are_left_alone() -> None:
    assert mask_url_credentials("b1:9093,b2:9093") == "b1:9093,b2:9093"
    assert mask_url_credentials("chdb:///var/lib/handtrace/clickhouse") == "chdb:///var/lib/handtrace/clickhouse"
