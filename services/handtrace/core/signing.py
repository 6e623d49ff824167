"""Signed control records (docs/adr/0009-authentic-controls.md): who may decide who is paused,
exempt, enrolled, and which policy is in force.

Records on the controls, policy and devices topics carry an Ed25519 signature in Kafka headers,
computed when the record is produced:

- ``ht-signer``: ``cp:<kid>`` (the control plane's key ``kid``) or ``device:<device_id>`` (a
  laptop's own key, enrolled by the control plane on the devices topic);
- ``ht-sent-at``: the sender's clock at produce time (decimal µs, :data:`HEADER_SENT_AT`);
- ``ht-sig``: base64 of the signature over :func:`signed_bytes` -- a length-prefixed,
  domain-separated encoding of (purpose, topic role, message key, sent-at, value), so a signature
  made for one topic, key or time is worthless on another.

Verifiers hold public keys only. Which signer may issue which kind, and for whom, is decided by
the caller (handtrace.stream.controls, handtrace.agent.controlplane); this module only says who
signed and when.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from handtrace.core.clock import HEADER_SENT_AT, now_us

if TYPE_CHECKING:
    from handtrace.core.settings import Settings

log = logging.getLogger(__name__)

HEADER_SIGNER = "ht-signer"
HEADER_SIG = "ht-sig"
PURPOSE = b"handtrace/signed-control/v1"
ROLES = ("controls", "policy", "devices")
CONTROL_PLANE = "cp"
DEVICE = "device"
DEV_KEY_ID = "dev"


class Refused(Exception):
    """A record that is not honoured; ``reason`` is a short, bounded metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class KeyConfigError(ValueError):
    """Signing or verification keys are missing or malformed; the message says what to set."""


# ---------------------------------------------------------------- encoding


def signed_bytes(role: str, key: bytes | None, sent_at_us: int, value: bytes) -> bytes:
    """What is signed: purpose, topic role, key, sent-at and value, each length-prefixed (no
    field can be shifted into another)."""
    if role not in ROLES:
        raise ValueError(f"unknown topic role {role!r}; roles are {ROLES}")
    parts = (PURPOSE, role.encode(), key or b"", str(int(sent_at_us)).encode(), value)
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str, size: int, what: str) -> bytes:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError) as e:
        raise KeyConfigError(f"{what}: not base64 ({e})") from None
    if len(raw) != size:
        raise KeyConfigError(f"{what}: expected {size} bytes, got {len(raw)}")
    return raw


def private_key_from_b64(text: str, what: str = "signing key") -> Ed25519PrivateKey:
    """An Ed25519 private key from base64 of its 32 raw bytes."""
    return Ed25519PrivateKey.from_private_bytes(_unb64(text, 32, what))


def public_key_from_b64(text: str, what: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from base64 of its 32 raw bytes."""
    return Ed25519PublicKey.from_public_bytes(_unb64(text, 32, what))


def private_key_b64(key: Ed25519PrivateKey) -> str:
    """base64 of the 32 raw private bytes (what HANDTRACE_CONTROL__SIGNING_KEY holds)."""
    return _b64(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                  serialization.NoEncryption()))


def public_key_b64(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """base64 of the 32 raw public bytes (what HANDTRACE_CONTROL__PUBLIC_KEYS maps a kid to)."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return _b64(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


def generate_key_pair() -> tuple[str, str]:
    """A new (private, public) pair, both base64."""
    k = Ed25519PrivateKey.generate()
    return private_key_b64(k), public_key_b64(k)


# ---------------------------------------------------------------- signing


@dataclass(frozen=True)
class Signer:
    """Signs records as ``signer_id`` (``cp:<kid>`` or ``device:<device_id>``)."""

    signer_id: str
    private_key: Ed25519PrivateKey = field(repr=False)

    def headers(self, role: str, key: bytes | None, value: bytes,
                sent_at_us: int | None = None) -> list[tuple[str, bytes]]:
        """The three headers for one record, stamped now (the sender's clock at produce)."""
        at = now_us() if sent_at_us is None else int(sent_at_us)
        sig = self.private_key.sign(signed_bytes(role, key, at, value))
        return [(HEADER_SIGNER, self.signer_id.encode()), (HEADER_SENT_AT, str(at).encode()),
                (HEADER_SIG, base64.b64encode(sig))]

    def resign(self, role: str, key: bytes | None, value: bytes,
               headers: Iterable[tuple[str, bytes]] = (), sent_at_us: int | None = None) -> list[tuple[str, bytes]]:
        """``headers`` without any earlier signature or sent-at, plus a fresh signature (a spool
        entry re-sent after a retry is signed again at its new produce time)."""
        keep = [(k, v) for k, v in headers if k not in (HEADER_SIGNER, HEADER_SENT_AT, HEADER_SIG)]
        return keep + self.headers(role, key, value, sent_at_us)


def control_plane_signer(kid: str, private_key: Ed25519PrivateKey) -> Signer:
    """The control plane's signer for key id ``kid``."""
    return Signer(f"{CONTROL_PLANE}:{kid}", private_key)


def device_signer(device_id: str, private_key: Ed25519PrivateKey) -> Signer:
    """A laptop's signer (its own key, enrolled for one employee)."""
    return Signer(f"{DEVICE}:{device_id}", private_key)


# ---------------------------------------------------------------- verifying


@dataclass(frozen=True)
class Signature:
    """A verified signature: who (``cp`` or ``device``, and the kid or device id) and when
    (the sender's clock at produce, µs)."""

    kind: str
    signer: str
    sent_at_us: int


def _header(headers: Iterable[tuple[str, bytes | None]], name: str) -> bytes | None:
    found = None
    for k, v in headers:
        if k == name:
            if found is not None:
                raise Refused("bad_signature", f"header {name} repeated")
            found = bytes(v) if v is not None else b""
    return found


@dataclass(frozen=True)
class Verifier:
    """Control-plane public keys by key id (several at once: rotation adds a kid, then retires
    the old one). Device keys are passed per call (they come from the devices topic)."""

    keys: Mapping[str, Ed25519PublicKey] = field(default_factory=dict)
    retired: frozenset[str] = frozenset()

    def verify(self, headers: Iterable[tuple[str, bytes | None]], role: str, key: bytes | None, value: bytes,
               devices: Mapping[str, Ed25519PublicKey] | None = None) -> Signature:
        """Who signed this record; :class:`Refused` with reason ``unsigned``, ``bad_signature``,
        ``unknown_key``, ``retired_key`` or ``device_not_enrolled`` otherwise."""
        headers = list(headers)
        signer = _header(headers, HEADER_SIGNER)
        sig_b64 = _header(headers, HEADER_SIG)
        sent = _header(headers, HEADER_SENT_AT)
        if signer is None or sig_b64 is None:
            raise Refused("unsigned")
        try:
            kind, _, ident = signer.decode().partition(":")
            sent_at = int(sent.decode()) if sent is not None else None
            sig = base64.b64decode(sig_b64, validate=True)
        except (UnicodeDecodeError, ValueError, binascii.Error):
            raise Refused("bad_signature", "malformed signature headers") from None
        if sent_at is None or not ident or len(sig) != 64:
            raise Refused("bad_signature", "malformed signature headers")
        if kind == CONTROL_PLANE:
            if ident in self.retired:
                raise Refused("retired_key")
            pub = self.keys.get(ident)
            if pub is None:
                raise Refused("unknown_key")
        elif kind == DEVICE:
            pub = (devices or {}).get(ident)
            if pub is None:
                raise Refused("device_not_enrolled")
        else:
            raise Refused("unknown_key")
        try:
            pub.verify(sig, signed_bytes(role, key, sent_at, value))
        except InvalidSignature:
            raise Refused("bad_signature") from None
        return Signature(kind, ident, sent_at)


# ---------------------------------------------------------------- keys from settings and files


def _write_secret(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def load_or_create_key(path: Path) -> Ed25519PrivateKey:
    """The private key stored at ``path`` (base64), generated there once (0600) if missing."""
    if not path.exists():
        try:
            _write_secret(path, private_key_b64(Ed25519PrivateKey.generate()) + "\n")
        except FileExistsError:
            pass  # another process of this machine created it first
    return private_key_from_b64(path.read_text(), str(path))


def dev_key_path(settings: Settings) -> Path:
    """Where development mode keeps its generated control-plane key."""
    return settings.state_dir / "secrets" / "control-signing.key"


def _dev_key(settings: Settings) -> Ed25519PrivateKey:
    path = dev_key_path(settings)
    created = not path.exists()
    key = load_or_create_key(path)
    if created:
        log.warning("generated a development control-plane signing key at %s (dev_mode); set "
                    "HANDTRACE_CONTROL__SIGNING_KEY and HANDTRACE_CONTROL__PUBLIC_KEYS in production", path)
    return key


def issuer_signer(settings: Settings) -> Signer:
    """The control plane's signer: HANDTRACE_CONTROL__SIGNING_KEY (+ SIGNING_KEY_ID), or in
    dev_mode a key generated once under <state_dir>/secrets. Otherwise KeyConfigError."""
    c = settings.control
    if c.signing_key is not None:
        return control_plane_signer(c.signing_key_id, private_key_from_b64(
            c.signing_key.get_secret_value(), "HANDTRACE_CONTROL__SIGNING_KEY"))
    if settings.dev_mode:
        return control_plane_signer(DEV_KEY_ID, _dev_key(settings))
    raise KeyConfigError("no control-plane signing key: set HANDTRACE_CONTROL__SIGNING_KEY and "
                         "HANDTRACE_CONTROL__SIGNING_KEY_ID (`handtrace control keygen` makes a pair), "
                         "or HANDTRACE_DEV_MODE=true for a generated development key")


def verifier(settings: Settings) -> Verifier:
    """The control-plane public keys in force: HANDTRACE_CONTROL__PUBLIC_KEYS, or in dev_mode
    (with none configured) the development key's. Otherwise KeyConfigError: nothing could be
    verified, so nothing the control plane says could be honoured."""
    c = settings.control
    keys = {kid: public_key_from_b64(v, f"HANDTRACE_CONTROL__PUBLIC_KEYS[{kid}]")
            for kid, v in c.public_keys.items()}
    if not keys and settings.dev_mode:
        signer = issuer_signer(settings)  # the configured signing key, else the generated one
        keys = {signer.signer_id.split(":", 1)[1]: signer.private_key.public_key()}
    if not keys:
        raise KeyConfigError("no control-plane public keys: set HANDTRACE_CONTROL__PUBLIC_KEYS (a JSON "
                             "object key id -> base64 Ed25519 public key), or HANDTRACE_DEV_MODE=true")
    return Verifier(keys, frozenset(c.retired_key_ids))
