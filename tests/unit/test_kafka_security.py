"""One translation of the Kafka security settings (core/kafka_security.py, issue #10 class 9):
for every protocol x mechanism, librdkafka's config, aiokafka's keyword arguments and Faust's
broker credentials (as Faust hands them to aiokafka) say the same thing, and the client
certificate is presented in a real TLS handshake whenever one is configured -- SASL_SSL too."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from handtrace.core.kafka_security import (
    KafkaSecurityError,
    aiokafka_security,
    faust_credentials,
    librdkafka_config,
    ssl_context,
)
from handtrace.core.settings import KafkaSettings

BROKER_HOST = "broker.handtrace.test"
CLIENT_CN = "handtrace-stream"


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
           *, ca: bool = False, server: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False,
                                          encipher_only=False, decipher_only=False), critical=True)
    else:
        b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                            critical=False)
        b = b.add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        if server:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(BROKER_HOST)]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A throwaway CA, a broker certificate and a client certificate (PEM files)."""
    d = tmp_path_factory.mktemp("pki")
    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _issue("handtrace test CA", ca_key, "handtrace test CA", ca_key, ca=True)
    return {"ca": _write(d / "ca.pem", ca),
            "server": _write(d / "server.pem", _issue(BROKER_HOST, srv_key, "handtrace test CA", ca_key, server=True),
                             srv_key),
            "client": _write(d / "client.pem", _issue(CLIENT_CN, cli_key, "handtrace test CA", ca_key), cli_key)}


def client_cert_seen_by_broker(client: ssl.SSLContext, pki: dict[str, Path]) -> str | None:
    """Handshake ``client`` with a broker-like TLS server in memory; the client certificate's CN
    the server received (None: the client presented none)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["server"], pki["server"].with_suffix(".key"))
    server_ctx.load_verify_locations(pki["ca"])
    server_ctx.verify_mode = ssl.CERT_OPTIONAL
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=BROKER_HOST)
    s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    done = {"c": False, "s": False}
    for _ in range(20):
        for name, side in (("c", c), ("s", s)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if all(done.values()):
            break
    assert all(done.values()), "the TLS handshake did not complete"
    peer = s.getpeercert()
    if not peer:
        return None
    return next(v for rdn in peer["subject"] for k, v in rdn if k == "commonName")


def settings(protocol: str, pki: dict[str, Path], *, mechanism: str | None = None, client_cert: bool = False,
             **extra: Any) -> KafkaSettings:
    kw: dict[str, Any] = {"bootstrap_servers": f"{BROKER_HOST}:9093", "security_protocol": protocol, **extra}
    if protocol.endswith("SSL"):
        kw["ssl_cafile"] = pki["ca"]
        if client_cert:
            kw |= {"ssl_certfile": pki["client"], "ssl_keyfile": pki["client"].with_suffix(".key")}
    if mechanism:
        kw |= {"sasl_mechanism": mechanism, "sasl_username": "svc-stream", "sasl_password": "s3cret-pw"}
    return KafkaSettings(**kw)


CASES = [
    ("PLAINTEXT", None, False),
    ("SSL", None, False),
    ("SSL", None, True),
    ("SASL_PLAINTEXT", "PLAIN", False),
    ("SASL_PLAINTEXT", "SCRAM-SHA-256", False),
    ("SASL_PLAINTEXT", "SCRAM-SHA-512", False),
    ("SASL_SSL", "PLAIN", True),
    ("SASL_SSL", "SCRAM-SHA-256", True),
    ("SASL_SSL", "SCRAM-SHA-512", True),
    ("SASL_SSL", "SCRAM-SHA-512", False),
]


@pytest.mark.parametrize(("protocol", "mechanism", "client_cert"), CASES,
                         ids=[f"{p}-{m or 'none'}-{'cert' if c else 'nocert'}" for p, m, c in CASES])
def test_three_client_libraries_agree(protocol: str, mechanism: str | None, client_cert: bool,
                                      pki: dict[str, Path]) -> None:
    k = settings(protocol, pki, mechanism=mechanism, client_cert=client_cert)
    rd = librdkafka_config(k)
    aio = aiokafka_security(k)
    fst = dict(credentials_to_aiokafka_auth(faust_credentials(k)))

    assert k.librdkafka() == rd
    assert rd["bootstrap.servers"] == f"{BROKER_HOST}:9093"
    assert rd["security.protocol"] == aio["security_protocol"] == fst["security_protocol"] == protocol
    if mechanism:
        assert (rd["sasl.mechanism"], rd["sasl.username"], rd["sasl.password"]) == (
            aio["sasl_mechanism"], aio["sasl_plain_username"], aio["sasl_plain_password"]) == (
            fst["sasl_mechanism"], fst["sasl_plain_username"], fst["sasl_plain_password"]) == (
            mechanism, "svc-stream", "s3cret-pw")
    else:
        assert not {key for key in rd if key.startswith("sasl.")}
        assert "sasl_mechanism" not in aio and "sasl_mechanism" not in fst

    if protocol.endswith("SSL"):
        assert rd["ssl.ca.location"] == str(pki["ca"])
        want = CLIENT_CN if client_cert else None
        assert ("ssl.certificate.location" in rd) is client_cert
        if client_cert:
            assert rd["ssl.certificate.location"] == str(pki["client"])
            assert rd["ssl.key.location"] == str(pki["client"].with_suffix(".key"))
        # The contexts verify the broker against the CA and present the client certificate.
        assert client_cert_seen_by_broker(aio["ssl_context"], pki) == want
        assert client_cert_seen_by_broker(fst["ssl_context"], pki) == want
    else:
        assert not {key for key in rd if key.startswith("ssl.")}
        assert aio.get("ssl_context") is None and fst.get("ssl_context") is None


def test_one_context_can_be_shared(pki: dict[str, Path]) -> None:
    k = settings("SASL_SSL", pki, mechanism="SCRAM-SHA-256", client_cert=True)
    ctx = ssl_context(k)
    assert ctx is not None
    assert aiokafka_security(k, ctx)["ssl_context"] is ctx
    assert faust_credentials(k, ctx).ssl_context is ctx


def test_a_context_verifies_the_broker(pki: dict[str, Path], tmp_path: Path) -> None:
    # A CA that did not sign the broker: the handshake must fail, not fall back to no checking.
    other_key = ec.generate_private_key(ec.SECP256R1())
    other = _write(tmp_path / "other-ca.pem", _issue("other CA", other_key, "other CA", other_key, ca=True))
    k = settings("SSL", pki, client_cert=True).model_copy(update={"ssl_cafile": other})
    ctx = ssl_context(k)
    assert ctx is not None
    with pytest.raises(ssl.SSLCertVerificationError):
        client_cert_seen_by_broker(ctx, pki)


def test_a_client_key_without_its_certificate_is_refused(pki: dict[str, Path]) -> None:
    k = settings("SSL", pki, ssl_keyfile=pki["client"].with_suffix(".key"))
    for translate in (librdkafka_config, aiokafka_security, faust_credentials, ssl_context):
        with pytest.raises(KafkaSecurityError, match="ssl_certfile"):
            translate(k)
