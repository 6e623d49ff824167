"""Who is calling: OIDC bearer JWTs checked against the identity provider's JWKS (issuer,
audience, expiry, asymmetric algorithms only), and a development login that cannot be enabled
by accident (docs/design/control-plane.md, "Auth"; ADR 0013)."""

from __future__ import annotations

import ipaddress
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from fastapi import Depends, HTTPException, Request
from jwt import PyJWK, PyJWKClient

from handtrace.control.api.roles import Action, Role
from handtrace.core.settings import Settings
from handtrace.core.signing import load_or_create_key

DEV_ISSUER = "handtrace-dev-login"
DEV_KID = "handtrace-dev"
COOKIE = "ht_token"
_ASYMMETRIC_KTY = {"RSA", "EC", "OKP"}
_MAX_TOKEN_CHARS = 16_384


class ApiConfigError(ValueError):
    """The API's settings would make it unsafe to start; the message says what to set."""


class AuthError(Exception):
    """A token that is refused (the caller gets 401)."""


@dataclass(frozen=True)
class Principal:
    """An authenticated caller."""

    subject: str
    employee_id: str | None
    roles: frozenset[Role]
    name: str


def dev_key_path(settings: Settings) -> Path:
    """Where dev login keeps its token-signing key."""
    return settings.state_dir / "secrets" / "api-dev.key"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_settings(settings: Settings) -> None:
    """Refuse to start (ApiConfigError, every problem at once) with settings that would accept
    tokens from anyone, or that would offer dev login outside a developer's own machine."""
    a = settings.api
    problems = []
    if a.dev_login:
        if not settings.dev_mode:
            problems.append("api.dev_login needs dev_mode=true (HANDTRACE_DEV_MODE): dev login mints "
                            "tokens for any role and is never for production")
        if not _is_loopback(a.host):
            problems.append(f"api.dev_login needs a loopback api.host (127.0.0.1, ::1 or localhost), "
                            f"not {a.host!r}: dev login must not be reachable from another machine")
    else:
        if a.jwks_file is None and a.jwks_url is None:
            problems.append("set HANDTRACE_API__JWKS_FILE or HANDTRACE_API__JWKS_URL (the identity "
                            "provider's public keys)")
        if not a.issuer:
            problems.append("set HANDTRACE_API__ISSUER (the identity provider's `iss`)")
    if a.jwks_url is not None and not a.jwks_url.startswith(("https://", "http://127.0.0.1", "http://localhost")):
        problems.append("api.jwks_url must be https:// (or http on loopback for tests)")
    if problems:
        raise ApiConfigError("the API refuses to start: " + "; ".join(problems))


class DevIssuer:
    """Dev login's token issuer: an Ed25519 key under <state_dir>/secrets/api-dev.key."""

    def __init__(self, settings: Settings) -> None:
        self.key: Ed25519PrivateKey = load_or_create_key(dev_key_path(settings))
        self.issuer = settings.api.issuer or DEV_ISSUER
        self.audience = settings.api.audience
        self.roles_claim = settings.api.roles_claim
        self.employee_claim = settings.api.employee_claim

    def jwk(self) -> PyJWK:
        """The public key as the JWKS entry the app trusts (dev login only)."""
        doc = json.loads(jwt.algorithms.OKPAlgorithm.to_jwk(self.key.public_key()))
        return PyJWK({**doc, "kid": DEV_KID, "alg": "EdDSA", "use": "sig"})

    def mint(self, subject: str, roles: Iterable[str], employee_id: str | None = None,
             ttl_s: float = 3600.0) -> str:
        """A signed token for ``subject`` with ``roles``."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": self.audience, "sub": subject, "iat": now,
                                  "nbf": now, "exp": now + int(ttl_s), self.roles_claim: list(roles),
                                  "name": subject}
        if employee_id is not None:
            claims[self.employee_claim] = employee_id
        return jwt.encode(claims, self.key, algorithm="EdDSA", headers={"kid": DEV_KID})


def _jwks_keys(doc: object) -> dict[str | None, PyJWK]:
    """Asymmetric signing keys of a JWKS document by kid (symmetric `oct` keys are dropped:
    a shared secret is never a verification key here)."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ApiConfigError("a JWKS is a JSON object with a `keys` list")
    out: dict[str | None, PyJWK] = {}
    for entry in doc["keys"]:
        if not isinstance(entry, dict) or entry.get("kty") not in _ASYMMETRIC_KTY:
            continue
        if entry.get("use", "sig") != "sig":
            continue
        try:
            out[entry.get("kid")] = PyJWK(entry)
        except jwt.PyJWTError:
            continue  # an algorithm this PyJWT cannot use
    return out


class Authenticator:
    """Verifies bearer tokens against the configured JWKS (+ the dev key under dev login)."""

    def __init__(self, settings: Settings) -> None:
        check_settings(settings)
        a = settings.api
        self.settings = settings
        self.algorithms = list(dict.fromkeys(a.algorithms))
        self.issuer = a.issuer
        self.audience = a.audience
        self.roles_claim = a.roles_claim
        self.employee_claim = a.employee_claim
        self.keys: dict[str | None, PyJWK] = {}
        if a.jwks_file is not None:
            try:
                self.keys.update(_jwks_keys(json.loads(a.jwks_file.read_text())))
            except (OSError, json.JSONDecodeError) as e:
                raise ApiConfigError(f"cannot read the JWKS file {a.jwks_file}: {e}") from e
        self.client = PyJWKClient(a.jwks_url, cache_jwk_set=True, lifespan=int(a.jwks_cache_s),
                                  timeout=10) if a.jwks_url else None
        self.dev: DevIssuer | None = None
        if a.dev_login:
            self.dev = DevIssuer(settings)
            self.keys[DEV_KID] = self.dev.jwk()
            if "EdDSA" not in self.algorithms:
                self.algorithms.append("EdDSA")
            self.issuer = self.issuer or DEV_ISSUER

    def _key(self, kid: object) -> PyJWK:
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed kid")
        if kid in self.keys:
            return self.keys[kid]
        if kid is None and len(self.keys) == 1 and self.client is None:
            return next(iter(self.keys.values()))
        if self.client is not None and isinstance(kid, str):
            try:
                key = self.client.get_signing_key(kid)
            except jwt.PyJWKClientError as e:
                raise AuthError(f"no key for kid: {e}") from None
            if key.key_type not in _ASYMMETRIC_KTY:
                raise AuthError("not an asymmetric key")
            return key
        raise AuthError("unknown signing key")

    def verify(self, token: str) -> Principal:
        """The caller of a valid token; AuthError otherwise (never anything else)."""
        if not token or len(token) > _MAX_TOKEN_CHARS:
            raise AuthError("missing or oversized token")
        try:
            header = jwt.get_unverified_header(token)
            alg = header.get("alg")
            if alg not in self.algorithms:
                raise AuthError(f"algorithm {alg!r} is not accepted")
            key = self._key(header.get("kid"))
            claims = jwt.decode(token, key.key, algorithms=[alg], audience=self.audience, issuer=self.issuer,
                                options={"require": ["exp", "iss", "aud", "sub"]}, leeway=30)
        except AuthError:
            raise
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as e:
            raise AuthError(str(e)) from None
        return self._principal(claims)

    def _principal(self, claims: dict[str, Any]) -> Principal:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > 256:
            raise AuthError("sub must be a non-empty string")
        raw_roles = claims.get(self.roles_claim, [])
        if not isinstance(raw_roles, list) or not all(isinstance(r, str) for r in raw_roles):
            raise AuthError(f"claim {self.roles_claim} must be a list of strings")
        roles = {Role(r) for r in raw_roles if r in Role.__members__}
        employee_id = claims.get(self.employee_claim, sub)
        if not isinstance(employee_id, str) or not valid_employee_id(employee_id):
            raise AuthError(f"claim {self.employee_claim} must be an employee id")
        roles.add(Role.employee)  # everyone is an employee of themself
        name = claims.get("name")
        return Principal(subject=sub, employee_id=employee_id, roles=frozenset(roles),
                         name=name if isinstance(name, str) and name else sub)


def valid_employee_id(value: str) -> bool:
    """An employee id the controls can carry: 1..128 printable characters, no spaces."""
    return 0 < len(value) <= 128 and value.isprintable() and not any(c.isspace() for c in value)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(status_code=401, detail=detail,
                         headers={"WWW-Authenticate": 'Bearer realm="handtrace", error="invalid_token"'})


def token_of(request: Request) -> str | None:
    """The bearer token of a request: the Authorization header, else the ht_token cookie."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        return value.strip() if scheme.lower() == "bearer" else None
    return request.cookies.get(COOKIE)


def principal(request: Request) -> Principal:
    """FastAPI dependency: the authenticated caller, or 401 with WWW-Authenticate: Bearer."""
    token = token_of(request)
    if not token:
        raise HTTPException(status_code=401, detail="authentication required",
                            headers={"WWW-Authenticate": 'Bearer realm="handtrace"'})
    authenticator: Authenticator = request.app.state.authenticator
    try:
        return authenticator.verify(token)
    except AuthError:
        raise _unauthorized("invalid or expired token") from None


def require(*roles: Role, action: Action | None = None) -> Callable[..., Principal]:
    """FastAPI dependency factory: the caller if they hold one of ``roles``; otherwise 403 and
    exactly one audit entry (outcome ``refused``)."""
    wanted = frozenset(roles)

    def dependency(request: Request, caller: Principal = Depends(principal)) -> Principal:  # noqa: B008
        if caller.roles & wanted:
            return caller
        refuse(request, caller, action.value if action else "access", target=request.url.path,
               why=f"needs one of the roles {sorted(r.value for r in wanted)}")
        raise AssertionError("unreachable")

    return dependency


def refuse(request: Request, caller: Principal, action: str, *, target: str | None, why: str) -> None:
    """Record the refusal in the audit trail, then raise 403."""
    from handtrace.control.api.services import audit_entry

    services = request.app.state.services
    services.audit.record(audit_entry(caller, action=action, target=target, reason="", outcome="refused",
                                      detail=why, method=request.method, path=request.url.path))
    raise HTTPException(status_code=403, detail=f"forbidden: {why}")
