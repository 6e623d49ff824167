"""Shared by the API tests: the test's own identity provider (Ed25519 and RSA keys, a JWKS file),
token minting, and an app over in-memory services."""

from __future__ import annotations

import hashlib
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
PSEUDONYM_KEY = "test-pseudonym-key-" + "p" * 32
"""The stream workers' HMAC key as the API holds it (the employee's own-data routes derive the
caller's pseudonym with it)."""


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
    return Settings(state_dir=tmp_path, api={"jwks_file": path, "issuer": ISSUER, "audience": AUDIENCE, **api},
                    stream={"pseudonym_key": PSEUDONYM_KEY})


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


PNG_1PX = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944415408d763f8"
                        "cfc000000301010018dd8db00000000049454e44ae426082")
"""A 1x1 PNG: a frame's stored bytes."""


def own_data_warehouse(api: Api | Settings, employee_id: str, demonstration_id: str, *,
                       t0_us: int | None = None) -> Any:
    """A MemoryWarehouse holding one demonstration of ``employee_id`` (key derived as the API of
    ``api`` or with these settings does), its frame 0 (a PNG in the app's frame store) and two of their events today."""
    from handtrace.control.api.warehouse import MemoryWarehouse, employee_key
    from handtrace.core.clock import now_us
    from handtrace.core.framestore import frame_key, open_store

    settings = api if isinstance(api, Settings) else api.client.app.state.settings  # type: ignore[attr-defined]
    key = employee_key(settings, employee_id)
    at = now_us() if t0_us is None else t0_us
    sha = hashlib.sha256(PNG_1PX).hexdigest()
    obj = frame_key(key, sha, "png")
    open_store(settings).put(obj, PNG_1PX)
    return MemoryWarehouse(
        events=[{"employee_key": key, "app_id": "code", "kind": "click", "captured_at_us": at}] * 2,
        demos=[{"demonstration_id": demonstration_id, "employee_key": key, "instruction": "file an expense",
                "status": "complete", "started_at_us": at, "ended_at_us": at + 60_000_000, "frames": 1,
                "events": 3, "apps": ["code"]}],
        frames=[{"demonstration_id": demonstration_id, "employee_key": key, "step": 0, "captured_at_us": at,
                 "sha256": sha, "reason": "click", "object_key": obj, "format": "png", "width": 1, "height": 1}])
