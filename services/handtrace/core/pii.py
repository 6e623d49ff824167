"""PII and secret detectors over plain strings, and the password-context heuristic -- shared by
the stream's redaction step (which proves it on every stored row) and the agent (which applies
it before anything leaves the laptop). See handtrace.stream.steps.redact for what each detector
finds.

Detectors run on a *folded* view of the text (``fold``): compatibility-normalised (NFKC, so
fullwidth ``４１１１`` and ``＠`` read as ASCII), every Unicode space as a space, every dash or
minus as ``-``, every decimal digit as its ASCII digit, and invisible characters (zero-width
spaces and joiners, word joiner, BOM, soft hyphen, bidi controls, variation selectors, combining
marks) removed. A span found in the folded view is mapped back to the original string, so the
redaction replaces the original characters, separators and invisible ones included (issue #10:
``4111 1111…`` with no-break spaces, ``ada＠acme.com`` and ``ada<U+200B>@acme.com`` passed through).
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import unquote

DETECTORS = ("email", "phone", "card", "iban", "national_id", "secret")
DETECTOR_VERSION = 2
"""Version of the detector set; raised whenever a detector is added or changed, so an export can
record which detectors its rows went through (1: the first set; 2: issue #10 -- folded view,
IBANs, cloud/API token formats, more key words)."""
MASK_CHAR = "•"
MASKED_KEYSYM = 0x01000000 + ord(MASK_CHAR)
"""The keysym a masked character key carries (X11's Unicode keysym of ``•``)."""
DEFAULT_TOKEN = "[REDACTED:{kind}]"  # noqa: S105

Span = tuple[int, int, str]

# ------------------------------------------------------------------ the folded view

# Invisible in most renderings and not in category Cf: combining grapheme joiner, Hangul fillers,
# Mongolian free variation selectors and the variation selectors.
_INVISIBLE = frozenset({0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x180B, 0x180C, 0x180D, 0x180F,
                        *range(0xFE00, 0xFE10), *range(0xE0100, 0xE01F0)})
_DOTS = frozenset({0x3002, 0xFF61, 0xFE52})  # ideographic / halfwidth / small full stops
_DASHES = frozenset({0x2212, 0x2043, 0x02D7, 0x2796, 0xFE63, 0xFF0D})  # minus signs, hyphen bullet


@lru_cache(maxsize=8192)
def _fold_char(c: str) -> str:
    """The folded form of one non-ASCII character (possibly empty, possibly several)."""
    o = ord(c)
    cat = unicodedata.category(c)
    if cat in ("Cf", "Mn", "Me") or o in _INVISIBLE:
        return ""
    if cat == "Zs":
        return " "
    if cat in ("Zl", "Zp"):
        return "\n"
    if cat == "Pd" or o in _DASHES:
        return "-"
    if cat == "Nd":
        return chr(48 + unicodedata.digit(c))
    if o in _DOTS:
        return "."
    n = unicodedata.normalize("NFKC", c)
    if n == c:
        return c
    return "".join(x if x.isascii() else _fold_char(x) for x in n)


def fold(text: str) -> tuple[str, list[int] | None]:
    """The view detectors run on, and for each of its characters the index of the original
    character it came from (``None`` when the view is the text itself: ASCII)."""
    if text.isascii():
        return text, None
    pieces = [c if c.isascii() else _fold_char(c) for c in text]
    index = [i for i, piece in enumerate(pieces) for _ in piece]
    return "".join(pieces), index


# ------------------------------------------------------------------ detectors (Python `re`)


def luhn_ok(digits: str) -> bool:
    """Luhn checksum of a string of digits."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_GROUPS = re.compile(r"\d+")


def _card_spans(m: re.Match[str]) -> list[tuple[int, int]]:
    """Windows of consecutive digit groups with 13-19 digits passing Luhn; every group but the
    window's last has at least 4 digits (card layouts: 4-4-4-4, 4-6-5, 4-4-4-4-3, unbroken)."""
    groups = [(g.start() + m.start(), g.end() + m.start(), g.group())
              for g in _GROUPS.finditer(m.group())]
    out: list[tuple[int, int]] = []
    for i in range(len(groups)):
        digits = ""
        for j in range(i, len(groups)):
            digits += groups[j][2]
            if len(digits) > 19:
                break
            if len(digits) >= 13 and luhn_ok(digits):
                out.append((groups[i][0], groups[j][1]))
            if len(groups[j][2]) < 4:
                break
    return out


def _digit_groups_spans(lo: int, hi: int, skip_prefix: int = 0) -> Callable[[re.Match[str]], list[tuple[int, int]]]:
    """A phone validator: the longest prefix of digit groups with lo..hi digits."""

    def check(m: re.Match[str]) -> list[tuple[int, int]]:
        total, end = -skip_prefix, None
        for g in _GROUPS.finditer(m.group()):
            total += len(g.group())
            if total > hi:
                break
            if total >= lo:
                end = m.start() + g.end()
        if end is None:
            return []
        close = m.group().find(")", end - m.start())
        if close == end - m.start():  # keep a closing parenthesis with its digits
            end += 1
        return [(m.start(), end)]

    return check


def _intl_phone(m: re.Match[str]) -> list[tuple[int, int]]:
    return _digit_groups_spans(8, 15, skip_prefix=2 if m.group().startswith("00") else 0)(m)


def _token_like(m: re.Match[str]) -> list[tuple[int, int]]:
    v = m.group("v")
    if any(c.isdigit() for c in v) or not v.isalpha() or (v.lower() != v and v.upper() != v):
        return [m.span("v")]
    return []


def _value(m: re.Match[str]) -> list[tuple[int, int]]:
    s, e = m.span("v")
    return [(s, e)] if e > s else []


def shannon_entropy(s: str) -> float:
    """Bits per character of ``s`` (0 for an empty string)."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def _mixed_body(m: re.Match[str]) -> list[tuple[int, int]]:
    """A token whose body (after its prefix) has a digit and a letter, as generated keys do
    (``sk-this-is-a-long-product-name`` is not one)."""
    body = m.group("body")
    if any(c.isdigit() for c in body) and any(c.isalpha() for c in body):
        return [m.span()]
    return []


def _random_value(m: re.Match[str]) -> list[tuple[int, int]]:
    """A value after a weak key word (``key``, ``sig``...): redacted only when it looks
    generated -- 16+ characters, a digit and a letter, 3+ bits of entropy per character (the
    idea of gitleaks' generic-api-key rule and detect-secrets' entropy plugins)."""
    v = m.group("v").strip("\"'")
    if (len(v) >= 16 and any(c.isdigit() for c in v) and any(c.isalpha() for c in v)
            and shannon_entropy(v) >= 3.0):
        return [m.span("v")]
    return []


# Lengths of IBANs by country (SWIFT IBAN registry, ISO 13616).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BI": 27, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22,
    "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32,
    "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24,
    "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31,
    "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23,
    "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}


def iban_ok(compact: str) -> bool:
    """An IBAN without separators (upper case): the country's length and the ISO 7064 MOD 97-10
    check (the country code and check digits moved to the end, letters as 10..35, mod 97 is 1)."""
    if (_IBAN_LENGTHS.get(compact[:2]) != len(compact) or not compact[2:4].isdigit()
            or not (compact.isascii() and compact.isalnum())):
        return False
    return int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1


@lru_cache(maxsize=64)
def _iban_body(length: int) -> re.Pattern[str]:
    """``length`` letters and digits, single spaces or dashes between them."""
    return re.compile(rf"[A-Za-z0-9](?:[ -]?[A-Za-z0-9]){{{length - 1}}}(?![A-Za-z0-9])")


def _iban_spans(m: re.Match[str]) -> list[tuple[int, int]]:
    """From a country code and check digits, the country's number of letters and digits
    (single spaces or dashes between them allowed), not followed by another letter or digit,
    passing MOD 97-10."""
    want = _IBAN_LENGTHS.get(m.group("cc").upper())
    if want is None:
        return []
    body = _iban_body(want).match(m.string, m.start())
    if body is None:
        return []
    return [body.span()] if iban_ok(re.sub(r"[ -]", "", body.group()).upper()) else []


# Key words whose value is a secret whatever it looks like (passwords in many languages, PINs,
# card security codes, one-time codes, tokens, keys).
_SECRET_KEYS = (
    "password", "passwd", "passwort", "kennwort", "passphrase", "passcode", "pass", "pwd", "pw",
    "pin", "mot de passe", "contrase(?:ñ|n)a", "senha", "wachtwoord", "has(?:ł|l)o", "пароль",
    "otp", "cvv2?", "cvc2?",
    "secret", "secret[ _-]?(?:access[ _-]?)?key", "token", "api[ _-]?key", "apikey",
    "access[ _-]?key", "account[ _-]?key", "private[ _-]?key", "client[ _-]?secret", "auth",
    "session[ _-]?(?:id|token|key)",
)
# Key words whose value is redacted only when it looks generated (_random_value).
_WEAK_KEYS = ("key", "credentials?", "creds", "sig", "signature", "sid", "cookie")
_KEY_TAIL = r"(?:[_-][a-z0-9]+)*[\"']?[ \t]*(?::=|=>|[:=])[ \t]*"

# Well-known token formats, the ideas of gitleaks rules and trufflehog detectors: a fixed
# prefix and the length and alphabet of the generated part.
_PREFIXED_TOKENS = (
    r"AIza[0-9A-Za-z_-]{35}",  # Google API key
    r"GOCSPX-[A-Za-z0-9_-]{28}",  # Google OAuth client secret
    r"ya29\.[0-9A-Za-z_-]{20,}",  # Google OAuth access token
    r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{10,}",  # Stripe secret / restricted key
    r"whsec_[A-Za-z0-9+/=]{20,}",  # Stripe webhook secret
    # GitLab (a routable token ends in ``.<version><crc>``)
    r"gl(?:pat|dt|rt|ptt|cbt|imt|soat|ft|ffct|agent|oas|wt)-[A-Za-z0-9_-]{20,}(?:\.[0-9a-z]{2,12})?",
    r"GR1348941[A-Za-z0-9_-]{20,}",  # GitLab runner registration token
    r"npm_[A-Za-z0-9]{36}",  # npm
    r"pypi-AgE[A-Za-z0-9_-]{50,}",  # PyPI
    r"hf_[A-Za-z0-9]{30,}",  # Hugging Face
    r"SG\.[A-Za-z0-9_-]{16,32}\.[A-Za-z0-9_-]{16,64}",  # SendGrid
    r"dckr_pat_[A-Za-z0-9_-]{20,}",  # Docker Hub
    r"do[opr]_v1_[a-f0-9]{64}",  # DigitalOcean
    r"shp(?:at|ca|pa|ss)_[a-fA-F0-9]{32}",  # Shopify
    r"ATATT3[A-Za-z0-9_=-]{50,}",  # Atlassian API token
    r"dapi[a-f0-9]{32}",  # Databricks
    r"glsa_[A-Za-z0-9]{32}_[A-Fa-f0-9]{8}",  # Grafana service account
    r"xapp-[A-Za-z0-9-]{20,}",  # Slack app-level token
    r"sq0(?:atp|csp)-[A-Za-z0-9_-]{22,}",  # Square
    r"AGE-SECRET-KEY-1[0-9A-Z]{58}",  # age
)

_Check = Callable[[re.Match[str]], list[tuple[int, int]]]
_DIGITS = tuple("0123456789")
_KEY_STEMS = ("pass", "pw", "pin", "mot de", "contrase", "senha", "wachtwoord", "hasło", "haslo",
              "пароль", "otp", "cvv", "cvc", "secret", "token", "key", "auth", "session")

# Per kind: (pattern, validator, needs). ``needs``: substrings of which at least one must be in
# the lower-cased view for the pattern to be tried at all (empty: always tried) -- a cheap gate
# that keeps the per-distinct-value cost of many patterns low on ordinary titles and urls.
_PATTERNS: dict[str, list[tuple[str, _Check | None, tuple[str, ...]]]] = {
    "email": [
        (r"(?<![\w.%+-])[\w.%+-]+@[^\W_](?:[\w-]*[^\W_])?(?:\.[^\W_](?:[\w-]*[^\W_])?)*\.[^\W\d_]{2,}", None, ("@",)),
    ],
    "phone": [
        (r"(?<![\d+])(?:\+|(?<!\w)00)[1-9](?:[ .-]?\(?\d{1,5}\)?){1,8}", _intl_phone, _DIGITS),
        (r"(?<![\w+])(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)", None, _DIGITS),
        (r"(?<![\w+])0\d{1,4}([ .-])\d{2,8}(?:\1\d{2,8}){0,3}(?!\d)", _digit_groups_spans(10, 11), _DIGITS),
        (r"(?<![\w+])0\d{9,10}(?!\d)", None, _DIGITS),
    ],
    "card": [
        (r"(?<!\d)\d(?:[ -]?\d){12,}(?!\d)", _card_spans, _DIGITS),
    ],
    "iban": [
        (r"(?i)(?<![a-z0-9])(?P<cc>[a-z]{2})\d{2}(?=[ -]?[a-z0-9])", _iban_spans, _DIGITS),
    ],
    "national_id": [
        (r"(?<!\d)\d{3}([- ])\d{2}\1\d{4}(?!\d)", None, _DIGITS),
        (r"(?i)(?<![a-z0-9])[a-ceghj-pr-tw-z][a-ceghj-npr-tw-z]"
         r" ?\d{2} ?\d{2} ?\d{2} ?[a-d](?![a-z0-9])", None, _DIGITS),
    ],
    "secret": [
        (r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])", None, ()),
        (r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", None, ("gh", "github_pat_")),
        (r"(?<![A-Za-z0-9])xox[abposer]-[A-Za-z0-9-]{10,}", None, ("xox",)),
        (r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", None, ("eyj",)),
        (r"(?<![A-Za-z0-9_-])(?:" + "|".join(_PREFIXED_TOKENS) + ")", None, ()),
        # OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin-) and Anthropic (sk-ant-api03-) keys.
        (r"(?<![A-Za-z0-9_-])sk-(?:[a-z0-9]{2,10}-){0,2}(?P<body>[A-Za-z0-9_-]{20,})", _mixed_body, ("sk-",)),
        (r"(?<!\d)\d{8,10}:AA[A-Za-z0-9_-]{33}", None, (":aa",)),  # Telegram bot token
        (r"(?i)hooks\.slack\.com/(?:services|workflows|triggers)/(?P<v>[A-Za-z0-9+/_-]{20,})", _value,
         ("hooks.slack",)),
        # Credentials in a URL: scheme://user:password@host (the password).
        (r"(?i)(?<![a-z0-9+.-])[a-z][a-z0-9+.-]*://[^/\s:@]*:(?P<v>[^/\s@]+)@", _value, ("://",)),
        (r"(?i:(?<![a-z])bearer)\s+(?P<v>[A-Za-z0-9._~+/=-]{12,})", _token_like, ("bearer",)),
        (r"(?i:(?<![a-z])basic)\s+(?P<v>[A-Za-z0-9+/]{12,}={0,2})", _token_like, ("basic",)),
        (r"(?s)-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
         r"(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*)", None, ("-----begin",)),
        (r"(?i)(?<![a-z0-9])(?:" + "|".join(_SECRET_KEYS) + ")" + _KEY_TAIL
         + r"(?P<v>\"[^\"\n]*\"?|'[^'\n]*'?|[^\s\"'&;,]+)", _value, _KEY_STEMS),
        (r"(?i)(?<![a-z0-9])(?:" + "|".join(_WEAK_KEYS) + ")" + _KEY_TAIL
         + r"(?P<v>\"?[A-Za-z0-9._~+/=%-]{16,}\"?)", _random_value,
         ("key", "cred", "sig", "sid", "cookie")),
    ],
}


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    check: _Check | None
    needs: tuple[str, ...]

    def spans(self, text: str) -> Iterable[Span]:
        """Matches; after a validator accepted a shorter span, the search resumes at its end."""
        pos = 0
        while (m := self.pattern.search(text, pos)) is not None:
            if self.check is None:
                yield m.start(), m.end(), self.kind
                pos = m.end()
                continue
            got = self.check(m)
            for s, e in got:
                yield s, e, self.kind
            pos = max((e for _, e in got), default=m.end())


_ALL = {k: tuple(_Detector(k, re.compile(p), c, n) for p, c, n in v) for k, v in _PATTERNS.items()}


def find_spans(text: str, detectors: Iterable[str] = DETECTORS) -> list[Span]:
    """PII spans ``(start, end, kind)`` in ``text``, sorted and merged (overlaps take the kind
    of the earlier span). Found in the folded view (``fold``), reported in ``text``'s indices:
    a span covers the original characters, invisible ones inside it included."""
    view, index = fold(text)
    low = view.lower()
    gates: dict[tuple[str, ...], bool] = {(): True}  # detectors share gates: each is tested once
    found: list[Span] = []
    for k in detectors:
        for d in _ALL[k]:
            ok = gates.get(d.needs)
            if ok is None:
                ok = gates[d.needs] = any(n in low for n in d.needs)
            if ok:
                found.extend(d.spans(view))
    found.sort()
    if index is not None:
        found = [(index[s], index[e - 1] + 1, k) for s, e, k in found if e > s]
    merged: list[Span] = []
    for s, e, k in found:
        if merged and s < merged[-1][1]:
            ps, pe, pk = merged[-1]
            merged[-1] = (ps, max(pe, e), pk)
        else:
            merged.append((s, e, k))
    return merged


def redact_text(text: str, detectors: Iterable[str] = DETECTORS,
                token: str = DEFAULT_TOKEN) -> tuple[str, Counter[str]]:
    """``text`` with every PII span replaced by ``token`` (``{kind}`` filled in), and how many
    spans of each kind."""
    counts: Counter[str] = Counter()
    parts: list[str] = []
    pos = 0
    for s, e, k in find_spans(text, detectors):
        parts += [text[pos:s], token.format(kind=k)]
        pos = e
        counts[k] += 1
    if not counts:
        return text, counts
    return "".join(parts) + text[pos:], counts


def unredacted_spans(text: str, detectors: Iterable[str] = DETECTORS,
                     token: str = DEFAULT_TOKEN) -> list[Span]:
    """Spans a detector still finds in already redacted ``text`` outside the tokens that
    replaced earlier findings (``password=[REDACTED:secret]`` finds its own token again): the
    post-condition a publisher checks before a value leaves, so it can fail closed."""
    parts = (re.escape(p.replace("{{", "{").replace("}}", "}")) for p in token.split("{kind}"))
    marks = [m.span() for m in re.finditer(f"(?:{'|'.join(DETECTORS)})".join(parts), text)] if token else []
    return [s for s in find_spans(text, detectors)
            if not any(ms <= s[0] and s[1] <= me for ms, me in marks)]


_FORM_PLUS = re.compile(r"(?<=[^\W_])\+")  # ``+`` for a space in a form-encoded query


def redact_url(url: str, detectors: Iterable[str] = DETECTORS,
               token: str = DEFAULT_TOKEN) -> tuple[str, Counter[str]]:
    """``redact_text`` for a url, which may hide a value behind its encodings: it is checked
    percent-decoded (``ada%40acme.com``) and with ``+`` after a letter or digit read as a space
    (``4111+1111+1111+1111``), and returned so decoded when that found something."""
    new, counts = url, Counter[str]()
    if "%" in url:
        new, counts = redact_text(unquote(url), detectors, token)
    if not counts:
        new, counts = redact_text(url, detectors, token)
    if "+" in new:
        plus, more = redact_text(_FORM_PLUS.sub(" ", new), detectors, token)
        if more:
            new, counts = plus, counts + more
    return new, counts


DETAIL_LIMIT = 1000


def redact_detail(text: str, limit: int = DETAIL_LIMIT, token: str = DEFAULT_TOKEN) -> str:
    """Free text for a header or log line (a dead-letter reason's detail, an exception
    message) with every detector applied and cut to ``limit`` characters. Redacts before it
    cuts, so a value cut in half is still found; at most ``2 * limit`` characters are examined
    (text beyond that is dropped, never passed through)."""
    return redact_text(text[: 2 * limit], DETECTORS, token)[0][:limit]


_PASSWORD_WORDS = r"password|passwort|passphrase|passcode|kennwort|contrase(?:ñ|n)a|mot de passe|pin"  # noqa: S105
PASSWORD_TITLE = rf"(?i)\b(?:{_PASSWORD_WORDS})\b"
PASSWORD_APP = r"(?i)(?:password|passwd|keepass|bitwarden|lastpass|1password|keychain|pinentry|seahorse)"  # noqa: S105
_PASSWORD_TITLE_RE = re.compile(PASSWORD_TITLE)
_PASSWORD_APP_RE = re.compile(PASSWORD_APP)


def password_context(app_id: str | None, title: str | None) -> bool:
    """Whether a window looks like a password prompt: a title with a word such as ``password``
    or ``PIN``, or a password manager / PIN entry app."""
    return bool((title and password_title(title)) or (app_id and _PASSWORD_APP_RE.search(app_id)))


def password_title(title: str) -> bool:
    """Whether a window title has a password word, read in the folded view (``Pass\u200bword``
    and ``ＰＩＮ`` count)."""
    return _PASSWORD_TITLE_RE.search(fold(title)[0]) is not None
