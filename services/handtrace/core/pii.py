"""PII and secret detectors over plain strings, and the password-context heuristic -- shared by
the stream's redaction step (which proves it on every stored row) and the agent (which applies
it before anything leaves the laptop). See handtrace.stream.steps.redact for what each detector
finds."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

DETECTORS = ("email", "phone", "card", "national_id", "secret")
MASK_CHAR = "•"
MASKED_KEYSYM = 0x01000000 + ord(MASK_CHAR)
"""The keysym a masked character key carries (X11's Unicode keysym of ``•``)."""

Span = tuple[int, int, str]

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


_SECRET_KEYS = (
    "password", "passwd", "pwd", "passphrase", "secret", "token", "api[_-]?key", "apikey",
    "access[_-]?key", "private[_-]?key", "client[_-]?secret", "auth",
)

_PATTERNS: dict[str, list[tuple[str, Callable[[re.Match[str]], list[tuple[int, int]]] | None]]] = {
    "email": [
        (r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}", None),
    ],
    "phone": [
        (r"(?<![\d+])(?:\+|(?<!\w)00)[1-9](?:[ .-]?\(?\d{1,5}\)?){1,8}", _intl_phone),
        (r"(?<![\w+])(?:1[ .-]?)?(?:\(\d{3}\)[ .-]?|\d{3}[ .-])\d{3}[ .-]\d{4}(?!\d)", None),
        (r"(?<![\w+])0\d{1,4}([ .-])\d{2,8}(?:\1\d{2,8}){0,3}(?!\d)", _digit_groups_spans(10, 11)),
        (r"(?<![\w+])0\d{9,10}(?!\d)", None),
    ],
    "card": [
        (r"(?<!\d)\d(?:[ -]?\d){12,}(?!\d)", _card_spans),
    ],
    "national_id": [
        (r"(?<!\d)\d{3}([- ])\d{2}\1\d{4}(?!\d)", None),
        (r"(?i)(?<![a-z0-9])[a-ceghj-pr-tw-z][a-ceghj-npr-tw-z]"
         r" ?\d{2} ?\d{2} ?\d{2} ?[a-d](?![a-z0-9])", None),
    ],
    "secret": [
        (r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA|ANPA|ANVA|AIPA)[A-Z0-9]{16}(?![A-Z0-9])", None),
        (r"(?<![A-Za-z0-9_])(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})", None),
        (r"(?<![A-Za-z0-9])xox[abposer]-[A-Za-z0-9-]{10,}", None),
        (r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*", None),
        (r"(?i:(?<![a-z])bearer)\s+(?P<v>[A-Za-z0-9._~+/=-]{12,})", _token_like),
        (r"(?s)-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----"
         r"(?:.*?-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|.*)", None),
        (r"(?i)(?<![a-z0-9])(?:" + "|".join(_SECRET_KEYS) + r")(?:[_-][a-z0-9]+)*[\"']?[ \t]*[:=][ \t]*"
         r"(?P<v>\"[^\"\n]*\"?|'[^'\n]*'?|[^\s\"'&;,]+)", _value),
    ],
}


@dataclass(frozen=True)
class _Detector:
    kind: str
    pattern: re.Pattern[str]
    check: Callable[[re.Match[str]], list[tuple[int, int]]] | None

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


_ALL = {k: tuple(_Detector(k, re.compile(p), c) for p, c in v) for k, v in _PATTERNS.items()}


def find_spans(text: str, detectors: Iterable[str] = DETECTORS) -> list[Span]:
    """PII spans ``(start, end, kind)`` in ``text``, sorted and merged (overlaps take the kind
    of the earlier span)."""
    found = sorted(s for k in detectors for d in _ALL[k] for s in d.spans(text))
    merged: list[Span] = []
    for s, e, k in found:
        if merged and s < merged[-1][1]:
            ps, pe, pk = merged[-1]
            merged[-1] = (ps, max(pe, e), pk)
        else:
            merged.append((s, e, k))
    return merged


def redact_text(text: str, detectors: Iterable[str] = DETECTORS,
                token: str = "[REDACTED:{kind}]") -> tuple[str, Counter[str]]:  # noqa: S107
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


PASSWORD_TITLE = r"(?i)\b(?:password|passwort|passphrase|passcode|kennwort|contraseña|mot de passe|pin)\b"  # noqa: S105
PASSWORD_APP = r"(?i)(?:password|passwd|keepass|bitwarden|lastpass|1password|keychain|pinentry|seahorse)"  # noqa: S105
_PASSWORD_TITLE_RE = re.compile(PASSWORD_TITLE)
_PASSWORD_APP_RE = re.compile(PASSWORD_APP)


def password_context(app_id: str | None, title: str | None) -> bool:
    """Whether a window looks like a password prompt: a title with a word such as ``password``
    or ``PIN``, or a password manager / PIN entry app."""
    return bool((title and _PASSWORD_TITLE_RE.search(title)) or (app_id and _PASSWORD_APP_RE.search(app_id)))
