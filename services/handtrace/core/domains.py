"""Web-domain rules shared by the agent (local allowlist, before capture), the stream (the allowlist
step that proves it) and the control plane (policy validation): one implementation, so all three
decide the same way.

**Hosts.** A url's host is the name a browser would connect to, in its ASCII (A-label) form:
UTS-46 mapping with IDNA 2008 validation, non-transitional, as browsers do (the ``idna`` package;
never Python's built-in ``"idna"`` codec, which is IDNA 2003 and folds ``faß.de`` to ``fass.de``,
``ς`` to ``σ`` and drops zero-width joiners, so a look-alike host would pass for an allowlisted
domain that browsers never connect to). Lowercase, one trailing dot removed; ASCII labels may
hold letters, digits, hyphens inside and underscores; an ``xn--`` label must be the canonical
A-label of a valid IDNA 2008 label. A url whose host cannot be determined safely -- not absolute,
control characters or backslashes, percent-encoded, IDNA-invalid (``goo\u200dgle.com``,
``☃.net``), a number-like last label that is not a dotted-quad IPv4 (``127.1``, ``0x7f.1``: browsers
rewrite those to addresses) -- has no host and is never allowed.

**Entries.** An allowlist entry is a registrable domain by the Public Suffix List (``google.com``,
``example.co.uk``, ``bücher.de``, ``alice.github.io``) or a name under one (``docs.google.com``), or
an IP address. Entries are normalised like hosts (``BÜCHER.de.`` -> ``xn--bcher-kva.de``; one
leading dot is allowed and means the same). Refused, with a message naming the entry and why:
public suffixes and bare TLDs from both the ICANN and the private sections of the list (``com``,
``co.uk``, ``github.io``, ``s3.amazonaws.com``), wildcards (``*.google.com``: an entry already
covers its subdomains), urls, ports, IDNA-invalid names and number-like names.

**Matching.** A host is allowed by an entry ``d`` when it equals ``d`` or ends with ``"." + d``, and
``d`` lies within the host's own site (its registrable domain by the Public Suffix List): an entry
never admits another party's site, so ``amazonaws.com`` admits ``amazonaws.com`` and
``www.amazonaws.com`` but not ``bucket.s3.amazonaws.com`` (``s3.amazonaws.com`` is a public suffix
between them). ``docs.google.com`` passes ``google.com``; ``docs.google.com.evil.net`` and
``evilgoogle.com`` do not. A public-suffix entry that slips in anyway (an old policy already on the
topic) admits nothing: such entries are dropped, logged once per distinct entry list. IP-literal
hosts only match an identical entry.

The Public Suffix List is the copy shipped with the pinned ``publicsuffixlist`` package, parsed
once per process; it is never fetched at run time. Work is bounded: callers judge each distinct
url once (the stream once per frame), each distinct host is mapped and looked up once (bounded
caches), and a raw host longer than 1024 characters is invalid before any mapping.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Iterable
from functools import lru_cache
from urllib.parse import SplitResult, urlsplit, urlunsplit

import idna
from publicsuffixlist import PublicSuffixList

log = logging.getLogger(__name__)

INVALID_URL = "invalid_url"
NOT_ALLOWLISTED_DOMAIN = "not_allowlisted_domain"

# Both sections (ICANN and private); unknown TLDs count as public suffixes (the list's "*" rule).
_PSL = PublicSuffixList(accept_unknown=True, only_icann=False)

_LABEL_RE = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
# WHATWG URL "ends in a number": a browser parses such a host as an IPv4 address (127.1, 0x7f.1).
_NUMBERISH_RE = re.compile(r"[0-9]+|0x[0-9a-f]*")
_SCHEME_RE = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_UNSAFE_RE = re.compile(r"[\x00-\x20\x7f\\]")
_MAX_HOST, _MAX_LABEL = 253, 63  # DNS limits (RFC 1035): no such name resolves
_MAX_RAW_HOST = 1024


class DomainError(ValueError):
    """An allowlist entry that is refused; the message names the entry and says why."""


@lru_cache(maxsize=8192)  # urls are many, hosts few: each distinct host is mapped once
def host_to_ascii(name: str) -> str:
    """The ASCII (A-label) form of a DNS name as a browser maps it (UTS-46, IDNA 2008,
    non-transitional), lowercase, one trailing dot removed; raises ValueError when the name is
    not one a browser would connect to (see the module docstring)."""
    if len(name) > _MAX_RAW_HOST:  # before mapping (and caching): ignorable characters could pad it
        raise ValueError(f"longer than {_MAX_RAW_HOST} characters")
    mapped = name.lower() if name.isascii() else idna.uts46_remap(name, std3_rules=False, transitional=False)
    if mapped.endswith("."):
        mapped = mapped[:-1]
    labels = []
    for label in mapped.split("."):
        if not label:
            raise ValueError("empty label")
        if not label.isascii():
            labels.append(idna.alabel(label).decode("ascii"))
        elif label.startswith("xn--"):
            # An A-label must decode to a valid IDNA 2008 label whose A-label is itself: no
            # alternative spellings of one name.
            if idna.alabel(idna.ulabel(label)).decode("ascii") != label:
                raise ValueError(f"{label!r} is not a canonical A-label")
            labels.append(label)
        elif len(label) <= _MAX_LABEL and _LABEL_RE.fullmatch(label):
            labels.append(label)
        else:
            raise ValueError(f"label {label!r} is too long or has characters a host name cannot have")
    if _NUMBERISH_RE.fullmatch(labels[-1]):
        raise ValueError("a number-like name that is not a dotted-quad IPv4 address")
    host = ".".join(labels)
    if len(host) > _MAX_HOST:
        raise ValueError(f"longer than {_MAX_HOST} characters")
    return host


def _ipv4(name: str) -> str | None:
    try:
        return str(ipaddress.IPv4Address(name))
    except ValueError:
        return None


def url_host(url: str) -> str | None:
    """The host a browser would connect to for ``url``, normalised (A-label, lowercase; IPv6
    compressed, without brackets); None when that cannot be determined safely."""
    split = _split(url)
    return split[1] if split else None


def _split(url: str) -> tuple[SplitResult, str] | None:
    """``url`` split, with its normalised host; None when the host cannot be determined safely."""
    if _UNSAFE_RE.search(url) or not _SCHEME_RE.match(url):
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a malformed port
    except ValueError:
        return None
    hostinfo = parts.netloc.rpartition("@")[2]
    if hostinfo.startswith("["):
        inner, _, after = hostinfo[1:].partition("]")
        if (after and not after.startswith(":")) or "%" in inner:  # browsers refuse zone ids
            return None
        try:
            return parts, str(ipaddress.IPv6Address(inner))
        except ValueError:
            return None
    # The raw host, not urlsplit's .hostname: str.lower() applies the final-sigma rule
    # ("ΧΑΣ" -> "χας") where UTS-46 maps every capital sigma to σ, as browsers do.
    raw = hostinfo.partition(":")[0]
    if not raw:
        return None
    ip = _ipv4(raw) if raw[-1].isdigit() else None
    if ip is not None:
        return parts, ip
    try:
        return parts, host_to_ascii(raw)
    except ValueError:  # idna.IDNAError is a ValueError
        return None


def _stored(parts: SplitResult, host: str) -> str:
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def stored_url(url: str) -> str:
    """``url`` as stored: scheme, normalised host (as :func:`url_host`), port and path; userinfo,
    query string and fragment removed (call on urls with a valid host)."""
    split = _split(url)
    if split is None:
        raise ValueError("stored_url needs a url with a valid host")
    return _stored(*split)


@lru_cache(maxsize=8192)
def _site(host: str) -> str | None:
    """The registrable domain of a normalised host (None: it is a public suffix itself)."""
    return _PSL.privatesuffix(host)


def is_public_suffix(name: str) -> bool:
    """Whether a normalised name is a public suffix (ICANN or private section; a single label
    always is)."""
    return bool(_PSL.is_public(name))


def normalise_domain(entry: str) -> str:
    """An allowlist entry in its normalised form (A-label, lowercase, no leading or trailing
    dot; an IP address in its canonical form); raises :class:`DomainError` naming the entry and
    why it is refused (see the module docstring)."""
    try:
        return _normalise_domain(entry)
    except DomainError as err:
        raise DomainError(_visible(f"`{entry}` {err}")) from None


def _visible(text: str) -> str:
    """``text`` with invisible characters (a zero-width joiner) spelled out as escapes, so the
    operator sees them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def _normalise_domain(entry: str) -> str:
    e = entry.strip()
    if not e:
        raise DomainError("is empty")
    if "://" in e or any(c in e for c in "/?#@\\"):
        host = url_host(e if "://" in e else "https://" + e)
        hint = f": write {host}" if host else ""
        raise DomainError(f"is a url, not a domain{hint}")
    if "*" in e:
        rest = e.lstrip("*.")
        hint = f": write {rest}, which covers its subdomains" if rest else ""
        raise DomainError(f"is a wildcard, not a domain{hint}")
    if _UNSAFE_RE.search(e):
        raise DomainError("has spaces or control characters: not a domain")
    bare = e[1:-1] if e.startswith("[") and e.endswith("]") else e
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:
        if "%" in bare:
            raise DomainError("has a zone id, which browsers refuse")
        return str(ip)
    if ":" in e:
        raise DomainError("has a port: an entry is a domain and covers every port")
    name = e[1:] if e.startswith(".") else e
    try:
        host = host_to_ascii(name)
    except ValueError as err:
        raise DomainError(f"is not a valid domain name (UTS-46/IDNA 2008): {err}") from None
    if is_public_suffix(host):
        if "." not in host and _PSL.is_public(host, accept_unknown=False):
            raise DomainError(f"is a top-level domain: allowlist a registrable domain "
                              f"such as example.{host}")
        if "." not in host:
            raise DomainError(f"is a single-label name, which the Public Suffix List treats "
                              f"as a top-level domain: allowlist a registrable domain such as "
                              f"example.{host}")
        raise DomainError(f"is a public suffix: allowlist a registrable domain such as "
                          f"example.{host}")
    return host


def domain_entry_problems(entries: Iterable[object]) -> list[str]:
    """One message per refused allowlist entry (empty: every entry is valid)."""
    problems = []
    for entry in entries:
        if not isinstance(entry, str):
            problems.append(f"`{entry!r}` is not a string")
            continue
        try:
            normalise_domain(entry)
        except DomainError as err:
            problems.append(str(err))
    return problems


@lru_cache(maxsize=64)
def _allowlisted(entries: tuple[str, ...]) -> tuple[str, ...]:
    out: list[str] = []
    problems = []
    for entry in entries:
        try:
            d = normalise_domain(entry)
        except DomainError as err:
            problems.append(str(err))
            continue
        if d not in out:
            out.append(d)
    if problems:
        # Cached: logged once per distinct entry list (policy), never per event.
        log.warning("allowlist entries ignored, they admit nothing (fail closed): %s", "; ".join(problems))
    return tuple(out)


def normalised_domains(entries: Iterable[str]) -> tuple[str, ...]:
    """The valid entries of an allowlist, normalised and deduplicated; refused entries are
    dropped (they admit nothing), logged once per distinct list."""
    return _allowlisted(tuple(entries))


def host_allowed(host: str, domains: Iterable[str]) -> bool:
    """Whether the normalised ``host`` (from :func:`url_host`) is one of the normalised
    ``domains`` or a subdomain of one that lies within the host's own site; an IP address only
    equals an entry."""
    if not host:
        return False
    if ":" in host or (host[-1].isdigit() and _ipv4(host) is not None):
        return host in domains
    matching = [d for d in domains if host == d or host.endswith("." + d)]
    if not matching:
        return False
    site = _site(host)
    if site is None:  # the host is a public suffix: nobody's site
        return False
    return any(d == site or d.endswith("." + site) for d in matching)


def url_verdict(url: str, domains: Iterable[str]) -> tuple[str | None, str | None]:
    """``(reason, stored)`` for a url under the normalised ``domains``: reason ``invalid_url`` or
    ``not_allowlisted_domain`` with no stored url, or ``None`` and the url as stored."""
    split = _split(url)
    if split is None:
        return INVALID_URL, None
    if not host_allowed(split[1], domains):
        return NOT_ALLOWLISTED_DOMAIN, None
    return None, _stored(*split)


def url_allowed(url: str, domains: Iterable[str]) -> bool:
    """Whether ``url`` has a safely determinable host within ``domains`` (normalised already)."""
    return url_verdict(url, domains)[0] is None
