"""Web-domain rules shared by the agent (local allowlist, before capture) and the stream (the
allowlist step that proves it): one implementation, so both sides decide the same way.

A url's host is what a browser would connect to, normalised (lowercase, punycode, one trailing dot
removed); urls whose host cannot be determined safely (not absolute, control characters or
backslashes, percent-encoded or non-DNS names) have no host and are never allowed. A host is
allowed when it equals an allowed registrable domain ``d`` or ends with ``"." + d``:
``docs.google.com`` passes ``google.com``; ``docs.google.com.evil.net`` and ``evilgoogle.com``
do not. IP-literal hosts only match an identical entry.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

_HOST_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?(?:\.[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)*")
_SCHEME_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f\\]")


def url_host(url: str) -> str | None:
    """The host a browser would connect to for ``url``, normalised; None when that cannot be
    determined safely (see the module docstring)."""
    if _UNSAFE_RE.search(url) or not _SCHEME_RE.match(url):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        return None
    if not host:
        return None
    if parts.netloc.rsplit("@", 1)[-1].startswith("["):
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            return None
    if host.endswith("."):
        host = host[:-1]
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    host = host.lower()
    if not _HOST_RE.fullmatch(host):
        return None
    return host


def stored_url(url: str) -> str:
    """``url`` without userinfo, query string and fragment, host lowercased (call on urls with
    a valid host)."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1].lower()
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def host_allowed(host: str, domains: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``domains`` or a subdomain of one (label-wise suffix); an IP
    address only equals an entry."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return any(host == d or host.endswith("." + d) for d in domains)
    return host in domains


def normalised_domains(domains: Iterable[str]) -> tuple[str, ...]:
    out = []
    for d in domains:
        d = d.strip().lower().strip(".")
        if d:
            out.append(d)
    return tuple(out)


def url_allowed(url: str, domains: Iterable[str]) -> bool:
    """Whether ``url`` has a safely determinable host within ``domains`` (normalised already)."""
    host = url_host(url)
    return host is not None and host_allowed(host, domains)
