"""The shared detectors (handtrace.core.pii), class by class: cloud and API tokens, IBANs, digits
and addresses behind Unicode separators, fullwidth forms and invisible characters, key-word
forms -- positive vectors, negative vectors from ordinary titles, and a property: no generated
secret or PII value, embedded in generated text with generated Unicode separators and zero-width
characters, survives redaction as a run of its significant characters (issue #10, class 6).

The property's checks are independent of the code under test: they compare plain characters
(digits, letters) of the generated value with those of the output, after a fold written here."""

from __future__ import annotations

import string
import unicodedata
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.agent.capture import WindowInfo
from handtrace.agent.localpolicy import LocalPolicy
from handtrace.core import pii
from handtrace.core.pii import (
    DETECTOR_VERSION,
    DETECTORS,
    find_spans,
    fold,
    iban_ok,
    redact_detail,
    redact_text,
    redact_url,
    unredacted_spans,
)
from handtrace.core.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.redact import RedactStep
from tests.unit.test_step_allowlist import T0, event, make_frame
from tests.unit.test_step_redact import card, email, luhn, national_id, phone

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------ vectors


@pytest.mark.parametrize("text,kind,value", [
    # Cloud and API keys (formats from gitleaks / trufflehog / detect-secrets).
    ("key AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI in", "secret", "AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI"),
    ("OPENAI_KEY sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f", "secret",
     "sk-proj-Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb7cDe0f"),
    ("sk-4fG7hJ2kL9mN3pQ6rS8tU1vW5xY0zA2bC4dE", "secret", "sk-4fG7hJ2kL9mN3pQ6rS8tU1vW5xY0zA2bC4dE"),
    ("sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe", "secret", "sk-ant-api03-Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2Ji1Hg0Fe"),
    ("clone with glpat-x7Yz9AbCdEf1GhIjKlMn", "secret", "glpat-x7Yz9AbCdEf1GhIjKlMn"),
    ("routable glpat-x7Yz9AbCdEf1GhIjKlMnOpQrStUvW.01a2b3c4d x", "secret", "01a2b3c4d"),
    ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc ok", "secret", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("stripe rk_live_51H8abcDEF0123456789xyz", "secret", "rk_live_51H8abcDEF0123456789xyz"),
    ("GitHub ghp_abcdefghijklmnopqrstuvwxyz0123456789", "secret", "ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ("Slack xoxb-12345678901-abcdefghijABCDEFGHIJ", "secret", "xoxb-12345678901-abcdefghijABCDEFGHIJ"),
    ("npm npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8", "secret", "npm_a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8"),
    ("hf hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789", "secret", "hf_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
    ("ya29.a0AfH6SMBx3yZ9kQ2wL8vN4cR7tU1pE5oI0", "secret", "a0AfH6SMBx3yZ9kQ2wL8vN4cR7tU1pE5oI0"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("AWS Secret Access Key: wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "secret",
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("https://x.blob.core.windows.net/c?sig=Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2%3D&se=1", "secret", "Zx9Yw8Vu7Ts6Rq5Po4Nm3Lk2"),
    ("config key=8f14e45fceea167a5a36dedd4bea2543", "secret", "8f14e45fceea167a5a36dedd4bea2543"),
    ("psql postgres://app:Hunter2Pass@db.internal/prod", "secret", "Hunter2Pass"),
    ("Authorization: Basic dXNlcjpwYXNzd29yZA==", "secret", "dXNlcjpwYXNzd29yZA=="),
    ("curl https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX", "secret",
     "T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"),
    # Key-word forms.
    ("wifi pw: Tr0ub4dor", "secret", "Tr0ub4dor"),
    ("pwd=hunter2", "secret", "hunter2"),
    ("passwd: letmein", "secret", "letmein"),
    ("login pass: s3cr3t!", "secret", "s3cr3t!"),
    ("card PIN: 4921", "secret", "4921"),
    ("passcode=778899", "secret", "778899"),
    ("WLAN Passwort: Geheim123", "secret", "Geheim123"),
    ("mot de passe\u202f: Motdepasse9", "secret", "Motdepasse9"),
    ("contraseña: clave99", "secret", "clave99"),
    ("CVV: 123", "secret", "123"),
    ("DB_PASSWORD := 'quoted value'", "secret", "quoted value"),
    ("pa\u200bss\u00adword=zerowidth1", "secret", "zerowidth1"),
    # IBANs (spaced, compact, lower case), with or without Unicode spaces.
    ("IBAN DE89 3704 0044 0532 0130 00 EUR", "iban", "DE89370400440532013000"),
    ("to GB82WEST12345698765432 today", "iban", "GB82WEST12345698765432"),
    ("fr14 2004 1010 0505 0001 3m02 606", "iban", "FR1420041010050500013M02606"),
    ("NL91\u00a0ABNA\u00a00417\u00a01643\u00a000", "iban", "NL91ABNA0417164300"),
    ("iban: CH93-0076-2011-6238-5295-7", "iban", "CH9300762011623852957"),
    # Digits and addresses behind Unicode separators, fullwidth forms, invisible characters.
    ("card 4111\u00a01111\u00a01111\u00a01111", "card", "4111111111111111"),
    ("card 4111\u20101111\u20111111\u22121111", "card", "4111111111111111"),
    ("card ４１１１ １１１１ １１１１ １１１１", "card", "4111111111111111"),
    ("card 4111\u200b1111\u2060111\ufeff1\u00ad1111", "card", "4111111111111111"),
    ("call +44\u202f20\u20097946\u20070958", "phone", "442079460958"),
    ("call (415)\u00a0555\u20132671", "phone", "4155552671"),
    ("call ٠٢٠ ٧٩٤٦ ٠٩٥٨", "phone", "02079460958"),
    ("ssn 123\u201245\u20126789", "national_id", "123456789"),
    ("mail ada＠acme.com", "email", "ada@acme.com"),
    ("mail ada\u200b@acme\u2060.com now", "email", "ada@acme.com"),
    ("mail ａｄａ＠ａｃｍｅ．ｃｏｍ", "email", "ada@acme.com"),
    ("mail josé.garcía@ejemplo.es", "email", "josé.garcía@ejemplo.es"),
])
def test_positive_vectors(text: str, kind: str, value: str) -> None:
    out, counts = redact_text(text)
    assert kind in counts, (text, out)
    assert plain(value) not in plain(out), out
    assert f"[REDACTED:{kind}]" in out


@pytest.mark.parametrize("text", [
    # Ordinary window titles, file names and urls.
    "main.py - handtrace - Visual Studio Code",
    "Inbox (3) - Mail",
    "Pull request #4211 · acme/handtrace · GitHub",
    "Fix parsing in 3f2a9c1d8e7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f · acme/handtrace@3f2a9c1",
    "commit 3f2a9c1d8e7b (HEAD -> main)",
    "Ticket 123e4567-e89b-12d3-a456-426614174000 - Jira",
    "https://docs.google.com/document/d/1BxiMVs0XRA5nFMdKvBdBZjgmUUqptlbs74OgvE2upms/edit",
    "https://www.youtube.com/watch?v=dQw4w9WgXcQ",
    "Key: PROJ-123 Fix login - Jira",
    "sk-learn tutorial - scikit-learn 1.5 documentation",
    "sk-this-is-a-long-product-name-and-not-a-key",
    "Passage to India - Reader",
    "Pinned messages - Slack",
    "Boarding passes and tokens of appreciation",
    "author: ada - 2 reviews",
    "Rechnung Nr. 2024‑0815 vom 01.02.2024 – 42,00 €",
    "v1.2.3 released 2024-01-15 10:30",
    "DE88370400440532013000 is a typo",  # fails MOD 97-10
    "GB82WEST12345698765433",
    "gb83west12345698765432",
    "XX89370400440532013000",  # no such country
    "DE893704004405320130001",  # one digit too many for Germany
    "AB12 3456 7890 1234",
    "Résumé – naïve café in München",
    "ｆｕｌｌｗｉｄｔｈ ｔｉｔｌｅ ０１",
    "room 12\u00a0a, floor 3\u2013 4",
    "Basic Settings - Preferences",
    "Bearer of bad news",
    "session: standup notes",
])
def test_negative_vectors(text: str) -> None:
    assert redact_text(text) == (text, {}), find_spans(text)


def test_iban_check_is_mod_97_10() -> None:
    assert iban_ok("DE89370400440532013000")
    assert iban_ok("GB82WEST12345698765432")
    assert not iban_ok("DE89370400440532013001")
    assert not iban_ok("GB82WEST1234569876543")
    assert not iban_ok("ＤＥ89370400440532013000")


def test_detector_version_and_kinds() -> None:
    assert DETECTOR_VERSION >= 2
    assert set(DETECTORS) == {"email", "phone", "card", "iban", "national_id", "secret"}


# ------------------------------------------------------------------ the folded view


def test_fold_maps_every_view_character_to_its_original() -> None:
    text = "a\u00a0b\u200bc\u2013d４\ufb01＠\u0301e٣"
    view, index = fold(text)
    assert view == "a bc-d4fi@e3"
    assert index is not None and len(index) == len(view)
    assert [text[i] for i in index] == ["a", "\u00a0", "b", "c", "\u2013", "d", "４", "\ufb01", "\ufb01", "＠",
                                        "e", "٣"]
    assert fold("plain ascii") == ("plain ascii", None)


@FAST
@given(st.text(max_size=60))
def test_fold_index_is_non_decreasing_and_in_range(text: str) -> None:
    view, index = fold(text)
    if index is None:
        assert view == text
        return
    assert len(index) == len(view)
    assert all(0 <= a <= b < len(text) for a, b in zip(index, index[1:], strict=False))


@FAST
@given(st.text(max_size=80))
def test_redaction_never_crashes_and_spans_are_disjoint_and_in_range(text: str) -> None:
    spans = find_spans(text)
    assert all(0 <= s < e <= len(text) for s, e, _ in spans)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
    out, _ = redact_text(text)
    assert not unredacted_spans(out), out


# ------------------------------------------------------------------ the property

SPACES = (" ", "\u00a0", "\u202f", "\u2007", "\u2009", "\u2002", "\u205f", "\u3000")
DASHES = ("-", "\u2010", "\u2011", "\u2012", "\u2013", "\u2014", "\u2015", "\u2212", "\ufe63", "\uff0d")
INVISIBLE = ("\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad")
DIGIT_BASES = (0x30, 0xFF10, 0x0660, 0x0966)  # ASCII, fullwidth, Arabic-Indic, Devanagari
WORDS = ("the", "deploy", "is", "done", "room", "meeting", "review", "my", "PR", "lgtm", "kafka",
         "consumer", "roadmap", "page", "ok", "ship", "budget", "München", "naïve", "café",
         "日本語", "Überweisung", "отчёт", "Δοκιμή", "author", "pinned", "passage", "(", ")", ",", "–")


def plain(text: str) -> str:
    """Independent fold for the checks: NFKC, then only letters and digits (any digit as ASCII),
    upper case -- what remains of a value whatever separators it was written with."""
    out = []
    for ch in unicodedata.normalize("NFKC", text):
        if ch.isdigit() and unicodedata.decimal(ch, None) is not None:
            out.append(str(unicodedata.decimal(ch)))
        elif ch.isalnum():
            out.append(ch.upper())
    return "".join(out)


def digits_of(text: str) -> str:
    return "".join(ch for ch in plain(text) if ch.isdigit())


@st.composite
def disguised(draw: st.DrawFn, value: str, *, separators: bool = True, digits: bool = True,
              letters: bool = False) -> str:
    """``value`` rewritten: ASCII spaces and dashes as any Unicode space or dash, digits of
    another script, fullwidth letters and ``＠``, and invisible characters between characters."""
    out = []
    for ch in value:
        if separators and ch == " ":
            ch = draw(st.sampled_from(SPACES))
        elif separators and ch == "-":
            ch = draw(st.sampled_from(DASHES))
        elif digits and ch.isdigit():
            ch = chr(draw(st.sampled_from(DIGIT_BASES)) + int(ch))
        elif letters and ch.isascii() and ch.isalpha() and draw(st.booleans()):
            ch = chr(ord(ch) - 0x21 + 0xFF01)
        elif ch == "@":
            ch = draw(st.sampled_from(["@", "＠", "\ufe6b"]))
        out.append(ch)
        if draw(st.integers(0, 5)) == 0:
            out.append(draw(st.sampled_from(INVISIBLE)))
    return "".join(out)


@st.composite
def iban(draw: st.DrawFn) -> str:
    country, bban_alphabet, bban_len = draw(st.sampled_from([
        ("DE", string.digits, 18), ("GB", None, 18), ("NL", None, 14), ("FR", string.digits, 23),
        ("ES", string.digits, 20), ("CH", string.digits, 17), ("BE", string.digits, 12),
        ("NO", string.digits, 11), ("IT", string.digits + string.ascii_uppercase, 23),
    ]))
    if bban_alphabet is None:  # 4 bank letters, then digits
        bban = draw(st.text(string.ascii_uppercase, min_size=4, max_size=4)) + draw(
            st.text(string.digits, min_size=bban_len - 4, max_size=bban_len - 4))
    else:
        bban = draw(st.text(bban_alphabet, min_size=bban_len, max_size=bban_len))
    check = 98 - int("".join(str(int(c, 36)) for c in bban + country + "00")) % 97
    compact = f"{country}{check:02d}{bban}"
    assert iban_ok(compact)
    if draw(st.booleans()):
        compact = " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))
    return compact.lower() if draw(st.booleans()) else compact


def _alnum(draw: st.DrawFn, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return draw(st.text(alphabet, min_size=n, max_size=n))


@st.composite
def token(draw: st.DrawFn) -> tuple[str, str]:
    """A token and its secret part (the part that must not survive)."""
    b64 = string.ascii_letters + string.digits + "_-"
    kind = draw(st.sampled_from(["google", "openai", "gitlab", "stripe", "aws", "npm", "hf", "sendgrid"]))
    if kind == "google":
        body = _alnum(draw, 35, b64)
        return "AIza" + body, body
    if kind == "openai":
        # Generated keys carry a digit and a letter; the detector requires them (a hyphenated
        # product name is not a key).
        body = _alnum(draw, draw(st.integers(18, 60)), b64) + draw(st.sampled_from("0123456789")) + "k"
        return draw(st.sampled_from(["sk-", "sk-proj-", "sk-svcacct-", "sk-ant-api03-"])) + body, body
    if kind == "gitlab":
        body = _alnum(draw, 20, b64)
        return draw(st.sampled_from(["glpat-", "gldt-", "glrt-"])) + body, body
    if kind == "stripe":
        body = _alnum(draw, draw(st.integers(10, 40)))
        return draw(st.sampled_from(["sk_live_", "rk_live_", "sk_test_"])) + body, body
    if kind == "aws":
        return "AKIA" + _alnum(draw, 16, string.ascii_uppercase + string.digits), ""
    if kind == "npm":
        body = _alnum(draw, 36)
        return "npm_" + body, body
    if kind == "hf":
        body = _alnum(draw, 34)
        return "hf_" + body, body
    a, b = _alnum(draw, 22, b64), _alnum(draw, 43, b64)
    return f"SG.{a}.{b}", a + b


@st.composite
def keyword_form(draw: st.DrawFn) -> tuple[str, str]:
    key = draw(st.sampled_from(["password", "passwd", "pwd", "pw", "pass", "pin", "passcode", "Passwort",
                                "mot de passe", "PIN", "DB_PASSWORD", "api_key", "client_secret", "token",
                                "secret access key", "contraseña", "otp"]))
    op = draw(st.sampled_from([":", "=", ": ", " = ", " : ", "：", "＝", ":=", " => "]))
    value = draw(st.text(string.ascii_letters + string.digits + "!#$*._", min_size=5, max_size=20))
    value += draw(st.sampled_from("0123456789"))  # the check looks for the value in the output
    key = "".join(c + (draw(st.sampled_from(INVISIBLE)) if draw(st.integers(0, 6)) == 0 else "") for c in key)
    return f"{key}{op}{value}", value


@st.composite
def surrounding(draw: st.DrawFn) -> str:
    """Generated text around a value: words of several scripts, joined by Unicode spaces."""
    words = draw(st.lists(st.sampled_from(WORDS), max_size=5))
    return "".join(w + draw(st.sampled_from(SPACES)) for w in words)


@st.composite
def embedded(draw: st.DrawFn) -> tuple[str, str, str]:
    """``(text, kind, what must not survive)``: a value of one class, disguised, in text."""
    kind = draw(st.sampled_from(["card", "phone", "iban", "national_id", "email", "token", "keyword"]))
    if kind == "card":
        value = draw(card())
        text, must_go = draw(disguised(value)), digits_of(value)
    elif kind == "phone":
        value = draw(phone())
        text, must_go = draw(disguised(value)), digits_of(value)
    elif kind == "national_id":
        value = draw(national_id())
        text, must_go = draw(disguised(value)), plain(value)
    elif kind == "iban":
        value = draw(iban())
        text, must_go = draw(disguised(value, letters=True)), plain(value)
    elif kind == "email":
        value = draw(email())
        text, must_go = draw(disguised(value, letters=True)), plain(value)
    elif kind == "token":
        value, body = draw(token())
        text, must_go = draw(disguised(value, separators=False, letters=True)), plain(body or value)
    else:
        value, secret_value = draw(keyword_form())
        text, must_go = draw(disguised(value, separators=False, digits=False)), plain(secret_value)
    return draw(surrounding()) + text + draw(st.sampled_from(SPACES)) + draw(surrounding()), kind, must_go


@FAST
@given(embedded())
def test_no_listed_secret_survives_as_a_run_of_its_characters(case: tuple[str, str, str]) -> None:
    text, kind, must_go = case
    out, counts = redact_text(text)
    assert counts, (kind, text)
    if kind in ("card", "phone"):
        assert must_go not in digits_of(out), (kind, text, out)
    else:
        assert must_go not in plain(out), (kind, text, out)
    assert not unredacted_spans(out), out


@FAST
@given(embedded())
def test_urls_carrying_a_value_percent_encoded_lose_it(case: tuple[str, str, str]) -> None:
    text, kind, must_go = case
    url = "https://docs.example.com/p/" + quote(text)
    out, counts = redact_url(url)
    assert counts, (kind, url)
    check = digits_of if kind in ("card", "phone") else plain
    assert must_go not in check(out), (kind, url, out)


def test_form_encoded_card_in_a_query() -> None:
    out, counts = redact_url("https://shop.example.com/pay?card=4111+1111+1111+1111&x=1")
    assert counts == {"card": 1} and "4111" not in out


# ------------------------------------------------------------------ agent and stream agree

POLICY = Policy(allowed_apps=frozenset({"code", "firefox"}), allowed_domains=("example.com",),
                text_capture={"*": "full"})


@FAST
@given(embedded(), embedded())
def test_agent_stamps_what_the_stream_stores(title_case: tuple[str, str, str],
                                             path_case: tuple[str, str, str]) -> None:
    title = title_case[0]
    url = "https://docs.example.com/p/" + quote(path_case[0])
    local = LocalPolicy(POLICY)
    agent_title = local.clean_title(title)
    agent_url = local.window(WindowInfo(app_id="firefox", title=title, url=url)).url
    frame = make_frame([[event("focus_change", app_id="firefox", window_title=title, url=url)]])
    stored = RedactStep()(frame, BatchContext(received_at_us=T0, policy=POLICY)).frame
    assert stored.get_column("window_title").to_list() == [agent_title]
    assert stored.get_column("url").to_list() == [agent_url]
    assert agent_title is not None and title_case[2] not in (
        digits_of if title_case[1] in ("card", "phone") else plain)(agent_title)


# ------------------------------------------------------------------ free text for headers


def test_redact_detail_redacts_then_cuts() -> None:
    detail = "conversion failed for values: [\"ada@acme.com\", \"4111 1111 1111 1111\"] " * 40
    out = redact_detail(detail, limit=300)
    assert len(out) <= 300
    assert "ada@acme.com" not in out and "4111" not in out
    assert "[REDACTED:email]" in out
    # A value that straddles the limit is still found (redaction runs before the cut).
    cut = "x" * 290 + " glpat-x7Yz9AbCdEf1GhIjKlMn"
    assert "glpat" not in redact_detail(cut, limit=300)
    assert redact_detail("y" * 10_000, limit=100) == "y" * 100


def test_unredacted_spans_accept_their_own_tokens() -> None:
    assert unredacted_spans("password=[REDACTED:card] and [REDACTED:email]") == []
    assert unredacted_spans("<secret> x", token="<{kind}>") == []  # noqa: S106
    assert [k for _, _, k in unredacted_spans("[REDACTED:email] ada@acme.com")] == ["email"]


def test_every_detector_has_vectors_here() -> None:
    # A new detector kind must come with vectors in this file.
    assert set(pii._ALL) == set(DETECTORS)
    assert luhn("4111111111111111")


@pytest.mark.parametrize("title,want", [
    ("Enter password", True), ("Pass\u200bword required", True), ("ＰＩＮ eingeben", True),
    ("Contrasen\u0303a", True), ("Pinned messages", False), ("Passage", False),
])
def test_password_titles_are_read_in_the_folded_view(title: str, want: bool) -> None:
    assert pii.password_title(title) is want
    assert pii.password_context(None, title) is want
