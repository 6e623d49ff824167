"""Shared by the API tests: the test's own identity provider (Ed25519 and RSA keys, a JWKS file),
token minting, and an app over in-memory services."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi.testclient import TestClient

from handtrace.control.api.app import create_app
from handtrace.control.api.services import MemoryBackend, Services, memory_services
from handtrace.core.settings import Settings

ISSUER = "https://idp.example.test"
AUDIENCE = "handtrace"

ED_KEY = Ed25519PrivateKey.generate()
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_ED_KEY = Ed25519PrivateKey.generate()


def jwks() -> dict[str, Any]:
    """The identity provider's public keys."""
    ed = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(ED_KEY.public_key()))
    rs = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    return {"keys": [{**ed, "kid": "ed", "alg": "EdDSA", "use": "sig"},
                     {**rs, "kid": "rsa", "alg": "RS256", "use": "sig"}]}


def api_settings(tmp_path: Path, **api: Any) -> Settings:
    """Settings trusting the test's JWKS file (not dev mode)."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks()))
    return Settings(state_dir=tmp_path, api={"jwks_file": path, "issuer": ISSUER, "audience": AUDIENCE, **api})


def claims(sub: str, roles: list[str], **extra: Any) -> dict[str, Any]:
    """Valid claims for ``sub`` (employee id = sub unless overridden)."""
    now = int(time.time())
    return {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 600, "roles": roles, **extra}


def mint(sub: str = "alice", roles: list[str] | None = None, *, key: str = "ed", **extra: Any) -> str:
    """A token signed by the test's identity provider."""
    body = claims(sub, roles or [], **extra)
    if key == "rsa":
        return jwt.encode(body, RSA_KEY, algorithm="RS256", headers={"kid": "rsa"})
    return jwt.encode(body, ED_KEY, algorithm="EdDSA", headers={"kid": "ed"})


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclass
class Api:
    """A TestClient over an app with in-memory services."""

    client: TestClient
    services: Services
    backend: MemoryBackend

    def as_(self, sub: str, *roles: str) -> dict[str, str]:
        """Authorization headers of ``sub`` with ``roles``."""
        return bearer(mint(sub, list(roles)))

    def audit(self) -> list[dict[str, Any]]:
        return list(self.backend.audit)


def make_api(tmp_path: Path, **api: Any) -> Api:
    backend = MemoryBackend()
    services = memory_services(backend)
    app = create_app(api_settings(tmp_path, **api), services)
    return Api(TestClient(app, raise_server_exceptions=False), services, backend)
