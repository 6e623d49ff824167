"""Authentication of the control-plane API (docs/design/control-plane.md, "Auth"): only tokens
signed by the configured identity provider's keys, for this issuer and audience, unexpired, with
an asymmetric algorithm, get in; anything else is 401 with WWW-Authenticate: Bearer -- never a
5xx. Dev login cannot be enabled by accident."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from handtrace.control.api.app import create_app
from handtrace.control.api.auth import ApiConfigError, dev_key_path
from handtrace.control.api.services import memory_services
from handtrace.core.settings import Settings
from tests.unit.api_support import (
    ED_KEY,
    ISSUER,
    OTHER_ED_KEY,
    RSA_KEY,
    Api,
    bearer,
    claims,
    make_api,
    mint,
)


@pytest.fixture
def api(tmp_path: Path) -> Api:
    return make_api(tmp_path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unsigned(header: dict[str, Any], body: dict[str, Any], key: bytes | None = None) -> str:
    """A JWT built by hand (PyJWT refuses to make these): alg none, or HS256 with ``key``."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    sig = b"" if key is None else hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(sig)}"


def _ed_signed(header: dict[str, Any], body: dict[str, Any]) -> str:
    """A JWT signed by the trusted Ed25519 key, built by hand (PyJWT refuses odd claim types)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64(ED_KEY.sign(signing_input.encode()))}"


def _assert_401(api: Api, headers: dict[str, str]) -> None:
    r = api.client.get("/api/v1/me", headers=headers)
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"].startswith("Bearer")


def test_valid_tokens_of_either_key_type_get_in(api: Api) -> None:
    for key in ("ed", "rsa"):
        r = api.client.get("/api/v1/me", headers=bearer(mint("alice", ["hr"], key=key, name="Alice A.")))
        assert r.status_code == 200, r.text
        assert r.json() == {"subject": "alice", "employee_id": "alice", "roles": ["employee", "hr"],
                            "name": "Alice A."}


def test_employee_claim_wins_over_sub_and_unknown_roles_are_ignored(api: Api) -> None:
    r = api.client.get("/api/v1/me", headers=bearer(mint("idp|123", ["hr", "root", "superuser"],
                                                         employee_id="e-42")))
    assert r.json()["employee_id"] == "e-42"
    assert r.json()["roles"] == ["employee", "hr"]


NOW = int(time.time())
ONE_CLASS_EACH = {
    "wrong issuer": lambda: mint(iss="https://evil.example"),
    "wrong audience": lambda: mint(aud="another-app"),
    "expired": lambda: mint(exp=NOW - 3600, iat=NOW - 7200),
    "not yet valid": lambda: mint(nbf=int(time.time()) + 3600),
    "no expiry": lambda: jwt.encode({k: v for k, v in claims("alice", []).items() if k != "exp"}, ED_KEY,
                                    algorithm="EdDSA", headers={"kid": "ed"}),
    "bad signature (another key, same kid)": lambda: jwt.encode(claims("alice", ["admin"]), OTHER_ED_KEY,
                                                                 algorithm="EdDSA", headers={"kid": "ed"}),
    "unknown kid": lambda: jwt.encode(claims("alice", ["admin"]), OTHER_ED_KEY, algorithm="EdDSA",
                                      headers={"kid": "nope"}),
    "tampered payload": lambda: _tamper(mint("alice", [])),
    "alg none": lambda: _unsigned({"alg": "none", "typ": "JWT"}, claims("alice", ["admin"])),
    "alg none with kid": lambda: _unsigned({"alg": "none", "kid": "ed"}, claims("alice", ["admin"])),
    "HS256 keyed with the RSA public key": lambda: _unsigned(
        {"alg": "HS256", "kid": "rsa"}, claims("alice", ["admin"]),
        RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)),
    "HS256 keyed with the Ed25519 public key": lambda: _unsigned(
        {"alg": "HS256", "kid": "ed"}, claims("alice", ["admin"]),
        ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)),
    "RS256 header on the Ed25519 key": lambda: _relabel(mint("alice", ["admin"]), "RS256"),
    "roles claim not a list": lambda: mint(roles="admin"),
    "empty subject": lambda: mint(""),
    "employee id with spaces": lambda: mint(employee_id="a b"),
}


def _tamper(token: str) -> str:
    head, body, sig = token.split(".")
    doc = json.loads(base64.urlsafe_b64decode(body + "=="))
    doc["roles"] = ["admin"]
    return f"{head}.{_b64(json.dumps(doc).encode())}.{sig}"


def _relabel(token: str, alg: str) -> str:
    _head, body, sig = token.split(".")
    return f"{_b64(json.dumps({'alg': alg, 'kid': 'ed'}).encode())}.{body}.{sig}"


@pytest.mark.parametrize("case", sorted(ONE_CLASS_EACH))
def test_refused_token_classes_get_401(api: Api, case: str) -> None:
    _assert_401(api, bearer(ONE_CLASS_EACH[case]()))


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic YWxpY2U6cHc=", "Bearer garbage",
                                    "Bearer a.b.c", "Bearer ...", "bearer " + "x" * 20_000])
def test_missing_or_garbage_credentials_get_401(api: Api, header: str) -> None:
    _assert_401(api, {"Authorization": header} if header else {})


def test_401_is_never_audited(api: Api) -> None:
    _assert_401(api, {})
    _assert_401(api, bearer("garbage"))
    assert api.audit() == []


def test_symmetric_keys_in_the_jwks_are_never_used(tmp_path: Path) -> None:
    """An `oct` key published in the JWKS (a misconfigured IdP) cannot verify anything."""
    secret = b"s" * 32
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "kid": "hs", "k": _b64(secret)}]}))
    app = create_app(Settings(state_dir=tmp_path, api={"jwks_file": path, "issuer": ISSUER,
                                                       "algorithms": ["EdDSA"]}), memory_services())
    from fastapi.testclient import TestClient

    token = _unsigned({"alg": "HS256", "kid": "hs"}, claims("alice", ["admin"]), secret)
    r = TestClient(app).get("/api/v1/me", headers=bearer(token))
    assert r.status_code == 401


@pytest.mark.parametrize("alg", ["none", "HS256", "HS512"])
def test_symmetric_or_no_algorithm_cannot_be_configured(alg: str) -> None:
    with pytest.raises(ValidationError):
        Settings(api={"algorithms": [alg]})


def test_an_algorithm_not_configured_is_refused(tmp_path: Path) -> None:
    api = make_api(tmp_path, algorithms=["RS256"])
    assert api.client.get("/api/v1/me", headers=bearer(mint(key="rsa"))).status_code == 200
    _assert_401(api, bearer(mint(key="ed")))


def test_the_cookie_is_accepted_when_there_is_no_header(api: Api) -> None:
    api.client.cookies.set("ht_token", mint("alice", []))
    assert api.client.get("/api/v1/me").status_code == 200


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=20), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=8), c, max_size=3), max_leaves=8)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(extra=st.dictionaries(st.sampled_from(["sub", "roles", "employee_id", "name", "iss", "aud", "exp",
                                              "nbf", "iat"]), json_values, max_size=6))
def test_arbitrary_claim_shapes_never_yield_a_5xx(api: Api, extra: dict[str, Any]) -> None:
    """Signed by the trusted key, but with any JSON in the claims: 200 or 401, nothing else."""
    body = {**claims("alice", []), **extra}
    token = _ed_signed({"alg": "EdDSA", "kid": "ed"}, body)
    r = api.client.get("/api/v1/me", headers=bearer(token))
    assert r.status_code in (200, 401), (extra, r.status_code, r.text)
    if r.status_code == 200:
        assert isinstance(body["sub"], str) and body["sub"]
        assert body["iss"] == ISSUER


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(header=st.dictionaries(st.sampled_from(["alg", "kid", "typ", "crit", "jku", "x5u"]), json_values,
                              max_size=4),
       payload=st.binary(max_size=64))
def test_arbitrary_headers_and_payloads_never_yield_a_5xx(api: Api, header: dict[str, Any],
                                                          payload: bytes) -> None:
    token = f"{_b64(json.dumps(header).encode())}.{_b64(payload)}.{_b64(b'x' * 64)}"
    _assert_401(api, bearer(token))


# ---------------------------------------------------------------- start-up refusals


def test_no_jwks_or_no_issuer_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(ApiConfigError) as e:
        create_app(Settings(state_dir=tmp_path), memory_services())
    assert "HANDTRACE_API__JWKS_FILE" in str(e.value) and "HANDTRACE_API__ISSUER" in str(e.value)


def test_jwks_url_must_be_https(tmp_path: Path) -> None:
    with pytest.raises(ApiConfigError, match="https"):
        create_app(Settings(state_dir=tmp_path, api={"jwks_url": "http://idp.example/jwks", "issuer": ISSUER}),
                   memory_services())


ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - the refused case


@pytest.mark.parametrize(("dev_mode", "host"), [(False, "127.0.0.1"), (True, ALL_INTERFACES), (True, "10.0.0.5"),
                                                (False, ALL_INTERFACES), (True, "example.com")])
def test_dev_login_outside_dev_mode_or_loopback_refuses_to_start(tmp_path: Path, dev_mode: bool,
                                                                 host: str) -> None:
    s = Settings(state_dir=tmp_path, dev_mode=dev_mode, api={"dev_login": True, "host": host})
    with pytest.raises(ApiConfigError, match="dev_login"):
        create_app(s, memory_services())
    assert not dev_key_path(s).exists()  # refused before any key was made


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost", "127.0.0.2"])
def test_dev_login_on_loopback_in_dev_mode_mints_working_tokens(tmp_path: Path, host: str) -> None:
    from fastapi.testclient import TestClient

    s = Settings(state_dir=tmp_path, dev_mode=True, api={"dev_login": True, "host": host})
    client = TestClient(create_app(s, memory_services()))
    r = client.get("/login/dev", params={"as": "harriet", "roles": "hr"})
    assert r.status_code == 200 and r.cookies.get("ht_token")
    me = client.get("/api/v1/me", headers=bearer(r.json()["token"]))
    assert me.json()["roles"] == ["employee", "hr"]
    assert dev_key_path(s).exists()
    assert client.get("/login/dev", params={"as": "x", "roles": "root"}).status_code == 422


def test_no_dev_login_route_without_dev_login(api: Api) -> None:
    assert api.client.get("/login/dev", params={"as": "mallory", "roles": "admin"}).status_code == 404


def test_dev_tokens_are_not_trusted_by_a_production_app(tmp_path: Path) -> None:
    """A token minted by a dev login elsewhere is refused where dev login is off."""
    from fastapi.testclient import TestClient

    dev = TestClient(create_app(Settings(state_dir=tmp_path / "dev", dev_mode=True,
                                         api={"dev_login": True, "issuer": ISSUER}), memory_services()))
    token = dev.get("/login/dev", params={"as": "mallory", "roles": "admin"}).json()["token"]
    _assert_401(make_api(tmp_path), bearer(token))
