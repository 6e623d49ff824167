"""The one translation of the Kafka security settings for every client library (issue #10,
class 9): librdkafka (confluent-kafka: agent, sink, fleet, admin, control plane), aiokafka (the
stream's policy follower) and Faust's broker credentials (the stream worker).

Before this module the settings were translated three times and the Faust SASL_SSL path built a
TLS context without the client certificate, so mTLS + SASL clusters refused the stream worker.
Here one :func:`ssl_context` (CA bundle + client certificate/key) serves SSL and SASL_SSL alike,
and tests/unit/test_kafka_security.py checks, for every protocol x mechanism, that the three
outputs say the same thing and that the client certificate is presented in a real handshake.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from handtrace.core.settings import SecurityProtocol

if TYPE_CHECKING:
    from handtrace.core.settings import KafkaSettings

TLS_PROTOCOLS = frozenset({SecurityProtocol.SSL, SecurityProtocol.SASL_SSL})
SASL_PROTOCOLS = frozenset({SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL})


class KafkaSecurityError(ValueError):
    """The security settings cannot be turned into a working client configuration."""


def _check(k: KafkaSettings) -> None:
    if k.ssl_keyfile is not None and k.ssl_certfile is None:
        raise KafkaSecurityError("ssl_keyfile is set without ssl_certfile: a client key needs its certificate")
    if k.security_protocol in SASL_PROTOCOLS:
        _sasl(k)


def _sasl(k: KafkaSettings) -> tuple[str, str, str]:
    """(mechanism, username, password) of a SASL protocol; raises when one is missing."""
    if k.sasl_mechanism is None or k.sasl_username is None or k.sasl_password is None:
        raise KafkaSecurityError(f"security_protocol={k.security_protocol} needs sasl_mechanism, "
                                 "sasl_username and sasl_password")
    return k.sasl_mechanism.value, k.sasl_username, k.sasl_password.get_secret_value()


def ssl_context(k: KafkaSettings) -> ssl.SSLContext | None:
    """The TLS context for SSL and SASL_SSL (None otherwise): verifies the brokers against
    ``ssl_cafile`` (the system store when unset) and presents the client certificate when one is
    configured -- for both protocols."""
    _check(k)
    if k.security_protocol not in TLS_PROTOCOLS:
        return None
    ctx = ssl.create_default_context(cafile=str(k.ssl_cafile) if k.ssl_cafile else None)
    if k.ssl_certfile is not None:
        ctx.load_cert_chain(str(k.ssl_certfile), str(k.ssl_keyfile) if k.ssl_keyfile else None)
    return ctx


def librdkafka_config(k: KafkaSettings) -> dict[str, Any]:
    """Connection options for confluent-kafka (librdkafka property names)."""
    _check(k)
    conf: dict[str, Any] = {"bootstrap.servers": k.bootstrap(), "security.protocol": k.security_protocol.value}
    if k.security_protocol in SASL_PROTOCOLS:
        mechanism, username, password = _sasl(k)
        conf.update({"sasl.mechanism": mechanism, "sasl.username": username, "sasl.password": password})
    if k.security_protocol in TLS_PROTOCOLS:
        if k.ssl_cafile is not None:
            conf["ssl.ca.location"] = str(k.ssl_cafile)
        if k.ssl_certfile is not None:
            conf["ssl.certificate.location"] = str(k.ssl_certfile)
        if k.ssl_keyfile is not None:
            conf["ssl.key.location"] = str(k.ssl_keyfile)
    return conf


def aiokafka_security(k: KafkaSettings, context: ssl.SSLContext | None = None) -> dict[str, Any]:
    """Security keyword arguments for aiokafka clients (``AIOKafkaConsumer(**...)``); the same
    keys Faust derives from :func:`faust_credentials`. ``context``: reuse an
    :func:`ssl_context` already built."""
    opts: dict[str, Any] = {"security_protocol": k.security_protocol.value}
    if k.security_protocol in TLS_PROTOCOLS:
        opts["ssl_context"] = context if context is not None else ssl_context(k)
    else:
        _check(k)
    if k.security_protocol in SASL_PROTOCOLS:
        mechanism, username, password = _sasl(k)
        opts.update(sasl_mechanism=mechanism, sasl_plain_username=username, sasl_plain_password=password)
    return opts


def faust_credentials(k: KafkaSettings, context: ssl.SSLContext | None = None) -> Any:
    """``broker_credentials`` for ``faust.App``: None (PLAINTEXT), ``SSLCredentials`` or
    ``SASLCredentials`` carrying the same TLS context (client certificate included)."""
    import faust

    ctx = context if context is not None or k.security_protocol not in TLS_PROTOCOLS else ssl_context(k)
    _check(k)
    if k.security_protocol is SecurityProtocol.PLAINTEXT:
        return None
    if k.security_protocol is SecurityProtocol.SSL:
        return faust.SSLCredentials(ctx)
    mechanism, username, password = _sasl(k)
    # Faust takes SASL_SSL from the presence of a context, SASL_PLAINTEXT from its absence.
    return faust.SASLCredentials(username=username, password=password, ssl_context=ctx, mechanism=mechanism)
