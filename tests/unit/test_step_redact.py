"""RedactStep: no PII or secret survives in titles, urls or typed text -- typed one character per
key event across many rows -- while ordinary text is left alone, and typed text of apps whose
policy is none or masked never appears (not even through key codes).

The checks use their own, simpler patterns and Luhn, not the step's."""

from __future__ import annotations

import re
import string
from typing import Any
from urllib.parse import quote, unquote

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.codec import parse_event_batch
from handtrace.core.rows import STORED_SCHEMA
from handtrace.stream.pipeline import BatchPipeline, SourceMessage, to_stored
from handtrace.stream.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.allowlist import AllowlistStep
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.redact import MASKED_KEYSYM, RedactStep, redact_text
from handtrace.stream.steps.validate import ValidateStep
from tests.factories import make_batch
from tests.unit.test_step_allowlist import T0, event, make_frame

FULL = Policy(allowed_apps=frozenset({"code"}), text_capture={"*": "full"})
GAP = "█"  # stands for a row whose text was removed when typed text is joined back

# ------------------------------------------------------------------ independent checks


def luhn(digits: str) -> bool:
    s = 0
    for i, d in enumerate(int(c) for c in reversed(digits)):
        s += sum(divmod(d * 2, 10)) if i % 2 else d
    return s % 10 == 0


_CHECKS = {
    "email": re.compile(r"[\w.+-]+@[\w-]+\.[\w.-]+"),
    "nino": re.compile(r"(?i)\b[a-z]{2} ?\d\d ?\d\d ?\d\d ?[a-d]\b"),
    "aws": re.compile(r"AKIA[A-Z0-9]{16}"),
    "github": re.compile(r"gh[pousr]_[A-Za-z0-9]{10,}|github_pat_"),
    "slack": re.compile(r"xox[a-z]-"),
    "jwt": re.compile(r"eyJ[\w-]+\.[\w-]+\."),
    "bearer": re.compile(r"(?i)bearer\s+(?!\[REDACTED)[^\s" + GAP + r"]{8,}"),
    "pem": re.compile(r"PRIVATE KEY"),
    "assignment": re.compile(
        r"(?i)(password|api_key|secret|token)\W{0,2}\s*[:=]\s*(?!\[REDACTED)[^\s" + GAP + r"]"
    ),
}
_NUMBER_RUN = re.compile(r"\+?\d(?:[ ().-]*\d)*")


def pii_in(text: str) -> list[str]:
    """What in ``text`` looks like PII: pattern hits, any run of 9+ digits (phones, SSNs, cards)
    and any 13-19 digit run passing Luhn."""
    found = [f"{k}:{m.group()}" for k, p in _CHECKS.items() for m in p.finditer(text)]
    for m in _NUMBER_RUN.finditer(text):
        digits = re.sub(r"\D", "", m.group())
        if len(digits) >= 9 or (13 <= len(digits) <= 19 and luhn(digits)):
            found.append(f"number:{m.group()}")
    return found


# ------------------------------------------------------------------ generated text

WORDS = ("the", "deploy", "is", "done", "room", "meeting", "at", "review", "my", "PR", "lgtm",
         "kafka", "consumer", "lag", "roadmap", "see", "page", "of", "v", "ok", "ship",
         "budget", "München", "naïve", "café", "tokens", "author", "pinned", "passage")
NUMBERS = ("12", "3", "v1.2.3", "2024-01-15", "10:30", "#1234", "42%", "$45.99", "x86_64",
           "3.14", "1,234", "0.5", "HT-123", "Q3", "1e6", "01.02.2024", "10.0.0.1", "UTF-8")


@st.composite
def benign(draw: st.DrawFn) -> str:
    """Words, and numbers that are never next to each other (so no long digit runs form)."""
    out = []
    for _ in range(draw(st.integers(1, 5))):
        out.append(draw(st.sampled_from(WORDS)))
        if draw(st.booleans()):
            out.append(draw(st.sampled_from(NUMBERS)))
    return " ".join(out)


def _digits(draw: st.DrawFn, n: int) -> str:
    return "".join(draw(st.lists(st.sampled_from(string.digits), min_size=n, max_size=n)))


def _alnum(draw: st.DrawFn, n: int, alphabet: str = string.ascii_letters + string.digits) -> str:
    return draw(st.text(alphabet, min_size=n, max_size=n))


@st.composite
def card(draw: st.DrawFn) -> str:
    amex = draw(st.booleans())
    body = ("37" if amex else "4") + _digits(draw, 12 if amex else 14)
    for check in string.digits:
        if luhn(body + check):
            number = body + check
    sep = draw(st.sampled_from(["", " ", "-"]))
    if amex:
        return sep.join((number[:4], number[4:10], number[10:]))
    return sep.join(number[i : i + 4] for i in range(0, 16, 4))


@st.composite
def phone(draw: st.DrawFn) -> str:
    d = lambda n: _digits(draw, n)  # noqa: E731
    return draw(st.sampled_from([
        f"+{draw(st.sampled_from(['1', '44', '49', '33', '353']))} {d(3)} {d(3)} {d(4)}",
        f"+44 20 {d(4)} {d(4)}", f"+1-{d(3)}-{d(3)}-{d(4)}", f"({d(3)}) {d(3)}-{d(4)}",
        f"{d(3)}-{d(3)}-{d(4)}", f"{d(3)}.{d(3)}.{d(4)}", f"020 {d(4)} {d(4)}",
        f"07{d(3)} {d(6)}", f"01 {d(2)} {d(2)} {d(2)} {d(2)}", f"030-{d(8)}", f"0044 20 {d(4)} {d(4)}",
    ]))


@st.composite
def email(draw: st.DrawFn) -> str:
    local = draw(st.from_regex(r"[a-z][a-z0-9._+-]{0,10}[a-z0-9]", fullmatch=True))
    domain = draw(st.from_regex(r"[a-z][a-z0-9-]{0,8}[a-z0-9](\.[a-z]{2,3}){1,2}", fullmatch=True))
    return f"{local}@{domain}"


@st.composite
def national_id(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return f"{_digits(draw, 3)}-{_digits(draw, 2)}-{_digits(draw, 4)}"
    a = draw(st.sampled_from("ABCEGHJKLMNPRSTWXYZ"))
    b = draw(st.sampled_from("ABCEGHJKLMNPRSTWXYZ"))
    sep = draw(st.sampled_from(["", " "]))
    nino = sep.join([a + b, _digits(draw, 2), _digits(draw, 2), _digits(draw, 2),
                     draw(st.sampled_from("ABCD"))])
    return nino.lower() if draw(st.booleans()) else nino


@st.composite
def secret(draw: st.DrawFn) -> str:
    b64 = string.ascii_letters + string.digits + "_-"
    kind = draw(st.sampled_from(["aws", "github", "pat", "slack", "jwt", "bearer", "assign", "pem"]))
    if kind == "aws":
        return "AKIA" + _alnum(draw, 16, string.ascii_uppercase + string.digits)
    if kind == "github":
        return draw(st.sampled_from(["ghp_", "gho_", "ghs_"])) + _alnum(draw, 36)
    if kind == "pat":
        return "github_pat_" + _alnum(draw, 40, string.ascii_letters + string.digits + "_")
    if kind == "slack":
        return f"xox{draw(st.sampled_from('baprs'))}-{_digits(draw, 11)}-{_alnum(draw, 24)}"
    if kind == "jwt":
        return f"eyJ{_alnum(draw, 20, b64)}.eyJ{_alnum(draw, 30, b64)}.{_alnum(draw, 43, b64)}"
    if kind == "bearer":
        return "Bearer " + _alnum(draw, 8) + "7" + _alnum(draw, 20)
    if kind == "assign":
        key = draw(st.sampled_from(["password", "api_key", "DB_PASSWORD", "client_secret", "token"]))
        sep = draw(st.sampled_from(["=", ": ", " = "]))
        return f"{key}{sep}{_alnum(draw, draw(st.integers(4, 16)))}"
    return "-----BEGIN RSA PRIVATE KEY-----\nMIIEow" + _alnum(draw, 30) + "\n-----END RSA PRIVATE KEY-----"


PII = st.one_of(card(), phone(), email(), national_id(), secret())


@st.composite
def mixed(draw: st.DrawFn) -> str:
    parts = [draw(benign())]
    for _ in range(draw(st.integers(1, 3))):
        parts += [draw(PII), draw(benign())]
    return " ".join(parts)


# ------------------------------------------------------------------ frames


def typed(text: str, *, mods: int = 0, noise: list[bool] | None = None) -> list[dict[str, Any]]:
    """Key events typing ``text`` one character per key_down, with a key_up each and, where
    ``noise`` says so, a pointer move in between."""
    rows: list[dict[str, Any]] = []
    for i, ch in enumerate(text):
        code = ord(ch) if ord(ch) < 0x100 else 0x01000000 + ord(ch)
        rows.append(event("key_down", key_code=code, modifiers=mods, text=ch))
        if noise and noise[i % len(noise)]:
            rows.append(event("pointer_move", x=1, y=2))
        rows.append(event("key_up", key_code=code, modifiers=mods))
    return rows


def session(app: str, title: str, url: str | None, text: str, **kw: Any) -> list[dict[str, Any]]:
    return [event("focus_change", app_id=app, window_title=title, url=url), *typed(text, **kw)]


def joined_text(frame: pl.DataFrame, column: str = "text") -> list[str]:
    """Per batch, the stored text of the key_down rows, with GAP for removed text."""
    per_batch = (
        frame.filter(pl.col("kind") == "key_down")
        .group_by("batch_id", maintain_order=True)
        .agg(pl.col(column).fill_null(GAP).str.join(""))
    )
    return per_batch.get_column(column).to_list()


def keyed_text(frame: pl.DataFrame, kind: str) -> list[str]:
    """Per batch, what the key codes of ``kind`` rows spell (GAP for anything not a character)."""
    codes = frame.filter(pl.col("kind") == kind).select("batch_id", "key_code")
    out: dict[bytes, list[str]] = {}
    for b, code in codes.iter_rows():
        ch = chr(code) if code < 0x100 else chr(code - 0x01000000) if code < 0x01110000 else GAP
        out.setdefault(b, []).append(GAP if code == MASKED_KEYSYM else ch)
    return ["".join(v) for v in out.values()]


def run(frame: pl.DataFrame, policy: Policy = FULL, step: RedactStep | None = None):  # type: ignore[no-untyped-def]
    result = (step or RedactStep())(frame, BatchContext(received_at_us=T0, policy=policy))
    out = result.frame
    assert out.schema == frame.schema
    assert out.get_column("event_id").to_list() == frame.get_column("event_id").to_list()
    assert result.dropped == {}
    untouched = [c for c in frame.columns if c not in ("text", "text_masked", "key_code",
                                                       "window_title", "url")]
    assert out.select(untouched).equals(frame.select(untouched))
    return out, result


# ------------------------------------------------------------------ properties

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_the_checks_see_the_generated_pii_and_not_the_benign_text() -> None:
    @FAST
    @given(PII, benign())
    def check(pii: str, ok: str) -> None:
        assert pii_in(pii), pii
        assert not pii_in(ok), ok

    check()


@FAST
@given(st.lists(st.tuples(mixed(), mixed(), mixed(), st.lists(st.booleans(), min_size=1)),
                min_size=1, max_size=2))
def test_no_pii_survives_in_titles_urls_or_typed_text(batches) -> None:  # type: ignore[no-untyped-def]
    frame = make_frame([
        session("code", title, "https://docs.google.com/p/" + quote(path), text, noise=noise)
        for title, path, text, noise in batches
    ])
    out, result = run(frame)
    for value in out.get_column("window_title").drop_nulls().to_list():
        assert not pii_in(value), value
    for value in out.get_column("url").drop_nulls().to_list():
        assert not pii_in(unquote(value)), value
    for value in joined_text(out) + keyed_text(out, "key_down") + keyed_text(out, "key_up"):
        assert not pii_in(value), value
    # Removed text is flagged, and every finding was counted.
    removed = out.filter(pl.col("text").is_null() & (pl.col("kind") == "key_down"))
    assert removed.get_column("text_masked").all()
    assert sum(result.redacted.get(k, 0) for k in ("email", "phone", "card", "national_id",
                                                   "secret")) >= len(batches)


@FAST
@given(st.lists(st.tuples(benign(), benign(), benign()), min_size=1, max_size=3))
def test_ordinary_text_is_left_intact(batches) -> None:  # type: ignore[no-untyped-def]
    frame = make_frame([
        session("code", title, "https://github.com/acme/" + path.replace(" ", "/"), text)
        for title, path, text in batches
    ])
    out, result = run(frame)
    assert out.equals(frame)
    assert result.redacted == {}


@FAST
@given(st.lists(st.tuples(st.sampled_from(["none", "masked", "full"]), mixed()), min_size=1,
                max_size=4))
def test_typed_text_of_none_and_masked_apps_never_appears(sessions) -> None:  # type: ignore[no-untyped-def]
    apps = {f"app-{i}": mode for i, (mode, _) in enumerate(sessions)}
    policy = Policy(text_capture={**apps, "*": "full"})
    rows = []
    for i, (_, text) in enumerate(sessions):
        rows += session(f"app-{i}", "Editor", None, text)
        rows += [event("key_down", key_code=ord("c"), modifiers=2, text="c"),  # ctrl+c
                 event("key_up", key_code=ord("c"), modifiers=2)]
    frame = make_frame([rows])
    out, _ = run(frame, policy)
    app = pl.col("app_id").forward_fill()
    keys = out.with_columns(app.alias("_app")).filter(pl.col("kind").is_in(["key_down", "key_up"]))
    for (a,), part in keys.partition_by("_app", as_dict=True, maintain_order=True).items():
        mode = apps[str(a)]
        shortcut = part.filter(pl.col("modifiers") == 2)
        typed_part = part.filter(pl.col("modifiers") == 0)
        assert shortcut.get_column("key_code").to_list() == [ord("c"), ord("c")]
        texts = typed_part.filter(pl.col("kind") == "key_down").get_column("text").to_list()
        if mode == "full":
            assert shortcut.get_column("text").to_list() == ["c", None]
            continue
        assert set(typed_part.get_column("key_code").to_list()) <= {MASKED_KEYSYM}
        if mode == "none":
            assert texts == [None] * len(texts)
        else:
            assert texts == ["•"] * len(texts)
        assert typed_part.filter(pl.col("kind") == "key_down").get_column("text_masked").all()
        assert shortcut.get_column("text").is_null().all()


# ------------------------------------------------------------------ examples


def test_pii_typed_across_rows_masks_exactly_its_rows() -> None:
    frame = make_frame([session("code", "Editor", None, "mail ada@acme.com now",
                                noise=[False, True])])
    out, result = run(frame)
    assert joined_text(out) == ["mail " + GAP * len("ada@acme.com") + " now"]
    assert keyed_text(out, "key_up") == joined_text(out)
    assert result.redacted["email"] == 1


def test_examples_in_titles_and_urls() -> None:
    frame = make_frame([[
        event("focus_change", app_id="code", window_title="Inbox (3) - ada@acme.com - Mail",
              url="https://mail.example.com/u/ada%40acme.com/inbox"),
        event("focus_change", app_id="code", window_title="Call +44 20 7946 0958 re room 12 v1.2.3",
              url="https://x.example.com/t/ghp_abcdefghijklmnopqrstuvwxyz0123456789"),
    ]])
    out, result = run(frame)
    assert out.get_column("window_title").to_list() == [
        "Inbox (3) - [REDACTED:email] - Mail", "Call [REDACTED:phone] re room 12 v1.2.3"]
    assert out.get_column("url").to_list() == [
        "https://mail.example.com/u/[REDACTED:email]/inbox", "https://x.example.com/t/[REDACTED:secret]"]
    assert result.redacted == {"email": 2, "phone": 1, "secret": 1}


@pytest.mark.parametrize("text,want", [
    ("card 4111 1111 1111 1111 exp", "card [REDACTED:card] exp"),
    ("card 4111 1111 1111 1112 is no card", "card 4111 1111 1111 1112 is no card"),
    ("ssn 123-45-6789", "ssn [REDACTED:national_id]"),
    ('DB_PASSWORD="s3cr3t" x', "DB_PASSWORD=[REDACTED:secret] x"),
    ("Authorization: Bearer abcDEF123456789xyz", "Authorization: Bearer [REDACTED:secret]"),
    ("a bearer of responsibilities", "a bearer of responsibilities"),
    ("room 12, v1.2.3, 2024-01-15 10:30, 01.02.2024 10:30, ts 1767225600000, +3 pts",
     "room 12, v1.2.3, 2024-01-15 10:30, 01.02.2024 10:30, ts 1767225600000, +3 pts"),
    ("numbers 12 34 56 78 90 12 34 56", "numbers 12 34 56 78 90 12 34 56"),
])
def test_redact_text_examples(text: str, want: str) -> None:
    assert redact_text(text)[0] == want


def test_password_fields_and_unknown_apps_keep_no_text() -> None:
    frame = make_frame([
        session("code", "Sign in - Enter password", None, "hunter2"),
        [*typed("secret typed before any focus change")],
    ])
    out, result = run(frame)
    assert out.filter(pl.col("kind") == "key_down").get_column("text").is_null().all()
    assert set(out.filter(pl.col("kind").is_in(["key_down", "key_up"]))
               .get_column("key_code").to_list()) == {MASKED_KEYSYM}
    assert result.redacted["password_field"] == len("hunter2")


def test_detectors_can_be_switched_off_and_unknown_ones_fail() -> None:
    frame = make_frame([[event("focus_change", app_id="code",
                               window_title="ada@acme.com +44 20 7946 0958")]])
    out, _ = run(frame, step=RedactStep(detectors=frozenset({"email"}), token="<{kind}>"))  # noqa: S106
    assert out.get_column("window_title").to_list() == ["<email> +44 20 7946 0958"]
    with pytest.raises(ValueError):
        RedactStep(detectors=frozenset({"email", "dna"}))


def test_pipeline_frames_go_through_all_steps_to_stored_rows() -> None:
    payload, _ = make_batch("e-1", 140, t0_us=T0)
    frame = BatchPipeline([])._frame([(SourceMessage(payload, 0, 0), parse_event_batch(payload))])
    policy = Policy(allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",),
                    text_capture={"*": "masked"})
    ctx = BatchContext(received_at_us=T0, policy=policy)
    for step in (ValidateStep(), AllowlistStep(), RedactStep(), PseudonymiseStep(b"k" * 32)):
        frame = step(frame, ctx).frame
    assert frame.height == 140  # every factory event carries its app (none lack context)
    assert set(frame.get_column("text").drop_nulls().to_list()) == {"•"}
    assert to_stored(frame, T0).schema.equals(STORED_SCHEMA)


def test_header_free_text_stored_with_every_row_is_redacted() -> None:
    frame = make_frame([[event("focus_change", app_id="code", window_title="Editor"),
                         event("pointer_move", x=1, y=2)]])
    frame = frame.with_columns(pl.lit("1.0 ada@acme.com").alias("agent_version"),
                               pl.lit("linux pw: hunter2").alias("os"))
    result = RedactStep()(frame, BatchContext(received_at_us=T0, policy=FULL))
    out = result.frame
    assert out.get_column("agent_version").to_list() == ["1.0 [REDACTED:email]"] * 2
    assert out.get_column("os").to_list() == ["linux pw: [REDACTED:secret]"] * 2
    assert result.redacted == {"email": 2, "secret": 2}


@pytest.mark.parametrize("title,url,gone", [
    ("Überweisung DE89\u00a03704\u00a00044\u00a00532\u00a00130\u00a000", None, "0532"),
    ("Mail ａｄａ＠acme.com", None, "acme.com"),
    ("Key AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", None, "AIza"),
    ("Pay", "https://shop.example.com/p/4111+1111+1111+1111", "4111"),
    ("Pay", "https://shop.example.com/p/ada%EF%BC%A0acme.com", "acme"),
])
def test_unicode_and_encoded_forms_in_titles_and_urls(title: str, url: str | None, gone: str) -> None:
    frame = make_frame([[event("focus_change", app_id="code", window_title=title, url=url)]])
    out, result = run(frame)
    stored = [v for v in out.row(0, named=True).values() if isinstance(v, str)]
    assert not any(gone in v for v in stored), stored
    assert result.redacted
