"""AllowlistStep: only allowlisted apps and domains survive, by label-wise suffix semantics, with
the app context filled within batches and urls stripped of userinfo, query and fragment.

The oracle is independent of the step: urls are built from a spec, so the test knows the host
a browser would use (or that the url is broken) without parsing anything.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.codec import parse_event_batch
from handtrace.stream.pipeline import BatchPipeline, SourceMessage
from handtrace.stream.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.allowlist import AllowlistStep
from tests.factories import make_batch

T0 = 1_767_225_600_000_000


def _pipeline_schema() -> pl.Schema:
    payload, _ = make_batch("e-1", 7, t0_us=T0)
    frame = BatchPipeline([])._frame([(SourceMessage(payload, 0, 0), parse_event_batch(payload))])
    return frame.schema


SCHEMA = _pipeline_schema()
_ids = itertools.count(1)


def event(kind: str = "pointer_move", **fields: Any) -> dict[str, Any]:
    """An event row with the defaults the codec writes (the step does not validate kinds)."""
    return {"kind": kind, "button": "none", "screenshot_format": "none", "text_masked": False,
            **fields}


def make_frame(batches: list[list[dict[str, Any]]]) -> pl.DataFrame:
    """A frame shaped like BatchPipeline._frame's: events of each batch, in order, with the
    batch header broadcast per row."""
    rows = []
    for b, events in enumerate(batches):
        batch_id = (b + 1).to_bytes(16, "big")
        for i, e in enumerate(events):
            row = dict.fromkeys(SCHEMA.names())
            row.update(e)
            row.update(
                event_id=next(_ids).to_bytes(16, "big"), captured_at_us=T0 + i * 1000,
                employee_id=f"emp-{b % 3}", device_id=f"dev-{b % 3}", batch_id=batch_id,
                agent_version="test", os="linux", sent_at_us=T0 + 10**9, source_partition=b % 2,
                source_offset=b,
            )
            rows.append(row)
    return pl.DataFrame(rows, schema=SCHEMA)


# ------------------------------------------------------------------ urls with a known host

# Allowlistable domains, as an operator may write them -> the A-label (ASCII) form a browser
# connects to. The A-labels are written out here (RFC 3492 vectors checked by hand), not computed
# by the code under test.
ACE = {"google.com": "google.com", "github.com": "github.com", "atlassian.net": "atlassian.net",
       "acme.io": "acme.io", "fass.de": "fass.de", "bücher.de": "xn--bcher-kva.de",
       "例え.jp": "xn--r8jz45g.jp"}
BASE = tuple(ACE)
# Public suffixes (ICANN and private sections of the Public Suffix List): as entries they admit
# nothing, whatever they look like.
PUBLIC = ("com", "io", "co.uk", "github.io", "s3.amazonaws.com")
OTHER = ("youtube.com", "reddit.com", "com", "io", "evil.github.io", "bucket.s3.amazonaws.com",
         "shop.co.uk")
# Hosts a browser reaches that the IDNA 2003 folding (Python's "idna" codec) would take for an
# allowlisted domain: ß is kept (faß.de is not fass.de).
IDNA2008_LOOKALIKES = {"fass.de": [("faß.de", "xn--fa-hia.de"), ("docs.faß.de", "docs.xn--fa-hia.de")]}


@dataclass(frozen=True)
class UrlSpec:
    url: str
    host: str | None  # A-label form, lowercase, no trailing dot; None when the url is broken
    stored: str | None  # what the step must store when it keeps the row
    evil: bool = False  # built to look like an allowed domain without being one


def _both(d: str) -> list[tuple[str, str]]:
    """(shown, A-label) spellings of a domain: its Unicode and its ASCII form."""
    return sorted({(d, ACE[d]), (ACE[d], ACE[d])})


def _lookalikes(d: str) -> list[tuple[str, str]]:
    """(shown host, host as compared) pairs that are not ``d`` nor under it. The compared form is
    only used to judge, so for a Unicode label it may stay Unicode: it never equals an A-label."""
    name, _, tld = d.partition(".")
    out = [(h, h.lower()) for h in (f"{d}.evil.net", f"docs.{d}.evil.net", f"evil{d}", f"{name}-{tld}.com",
                                    f"{name}.{tld}x", f"{d}evil.net", f"{name}{tld}")]
    a = ACE[d]
    if a != d:
        out += [(f"{a}.evil.net", f"{a}.evil.net"), (f"evil{a}", f"evil{a}")]
    return out + IDNA2008_LOOKALIKES.get(d, [])


def _broken(d: str) -> list[str]:
    return [f"https://evil.com\\@{d}/", f"{d}/no-scheme", f"https://{d}%2eevil.net/", "https://",
            "javascript:alert(1)", "http://[::1/", f"https://{d}:99999/", "", f"https://a..{d}/",
            f"https://{d} x/", f"https://{d}\t/", "file:///etc/passwd", "not a url",
            # IDNA 2008 refuses a joiner outside its context; IDNA 2003 deleted it (google.com).
            f"https://x\u200d{d}/", f"https://{d[0]}\u200c{d[1:]}/", "https://xn--bcher-kv.de/"]  # truncated punycode


def _case_variants(host: str) -> list[str]:
    """Spellings of ``host`` in other letter cases that are still the same host (no ß -> SS)."""
    return [v for v in (host, host.upper(), host.title()) if v.lower() == host.lower()]


@st.composite
def url_specs(draw: st.DrawFn) -> UrlSpec:
    d = draw(st.sampled_from(BASE))
    form = draw(st.sampled_from(["exact", "sub", "sub", "lookalike", "other", "broken"]))
    if form == "broken":
        return UrlSpec(draw(st.sampled_from(_broken(d))), None, None)
    if form in ("exact", "sub"):
        shown_d, ace_d = draw(st.sampled_from(_both(d)))
        sub = "" if form == "exact" else draw(st.sampled_from(["docs", "mail", "a.b", "x-1", "my_app"])) + "."
        host, ace = sub + shown_d, sub + ace_d
    elif form == "lookalike":
        host, ace = draw(st.sampled_from(_lookalikes(d)))
    else:
        host = ace = draw(st.sampled_from(OTHER))
    scheme = draw(st.sampled_from(["https", "http"]))
    shown = draw(st.sampled_from(_case_variants(host)))
    dot = draw(st.sampled_from(["", "."]))
    port = draw(st.sampled_from(["", ":8443", ":80"]))
    userinfo = draw(st.sampled_from(["", "ada@", "ada:hunter2@", f"{d}@"]))
    path = draw(st.sampled_from(["", "/", "/d/1", "/a/b/c", "/x;y=1"]))
    query = draw(st.sampled_from(["", "?x=1", "?q=a&b=c#", "?"]))
    frag = draw(st.sampled_from(["", "#h", "#/x?y"]))
    url = f"{scheme}://{userinfo}{shown}{dot}{port}{path}{query}{frag}"
    # Stored: the host as a browser connects to it (A-label, lowercase, no trailing dot).
    stored = f"{scheme}://{ace.lower()}{port}{path}"
    return UrlSpec(url, ace.lower(), stored, evil=form == "lookalike")


def suffix_allowed(host: str, domains: list[str]) -> bool:
    """Reference: the domain's labels are the host's last labels."""
    labels = host.split(".")
    for d in domains:
        want = d.split(".")
        if len(want) <= len(labels) and labels[len(labels) - len(want):] == want:
            return True
    return False


APPS = ("firefox", "google-chrome", "code", "slack", "spotify")
KINDS = ("pointer_move", "click", "scroll", "key_down", "key_up", "focus_change", "screenshot")


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[list[tuple[dict[str, Any], UrlSpec | None]]], Policy]:
    batches = []
    for _ in range(draw(st.integers(1, 4))):
        rows = []
        for _ in range(draw(st.integers(0, 12))):
            kind = draw(st.sampled_from(KINDS))
            app = draw(st.one_of(st.none(), st.sampled_from(APPS)))
            spec = draw(st.one_of(st.none(), url_specs()))
            rows.append((event(kind, app_id=app, url=spec.url if spec else None), spec))
        batches.append(rows)
    allowed_apps = draw(st.frozensets(st.sampled_from(APPS)))
    domains = draw(st.lists(st.sampled_from(BASE + PUBLIC), unique=True))
    shown = []
    for d in domains:
        spelling = draw(st.sampled_from(_both(d) if d in ACE else [(d, d)]))[0]
        shown.append(draw(st.sampled_from([*_case_variants(spelling), f".{spelling}", f"{spelling}."])))
    return batches, Policy(allowed_apps=allowed_apps, allowed_domains=tuple(shown))


def reference_domains(policy: Policy) -> list[str]:
    """The entries that admit anything, in A-label form: the known public suffixes admit nothing."""
    out = []
    for entry in policy.allowed_domains:
        d = entry.lower().strip(".")
        if d not in PUBLIC:
            out.append(ACE.get(d, d))
    return out


def reference(batches: list[list[tuple[dict[str, Any], UrlSpec | None]]],
              policy: Policy) -> tuple[list[tuple[str, str | None, UrlSpec | None]], Counter[str]]:
    """Per row: kept (app, stored url, spec) or the drop reason, computed the simple way."""
    domains = reference_domains(policy)
    kept: list[tuple[str, str | None, UrlSpec | None]] = []
    dropped: Counter[str] = Counter()
    for rows in batches:
        app: str | None = None
        spec: UrlSpec | None = None
        for e, own in rows:
            if e["app_id"] is not None:
                app, spec = e["app_id"], own
            elif own is not None:
                spec = own
            if app is None:
                dropped["no_app_context"] += 1
            elif app not in policy.allowed_apps:
                dropped["not_allowlisted_app"] += 1
            elif spec is not None and spec.host is None:
                dropped["invalid_url"] += 1
            elif spec is not None and not suffix_allowed(spec.host or "", domains):
                dropped["not_allowlisted_domain"] += 1
            else:
                kept.append((app, spec.stored if spec else None, spec))
    return kept, dropped


_STORED_HOST = re.compile(r"^[a-z][a-z0-9+.-]*://([^/:?#@]+)")


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_only_allowlisted_apps_and_domains_survive(scenario) -> None:  # type: ignore[no-untyped-def]
    batches, policy = scenario
    frame = make_frame([[e for e, _ in rows] for rows in batches])
    result = AllowlistStep()(frame, BatchContext(received_at_us=T0, policy=policy))
    out = result.frame
    want, want_dropped = reference(batches, policy)

    # Rows are only dropped, never invented or reordered; counts add up.
    assert out.schema == frame.schema
    ids = frame.get_column("event_id").to_list()
    kept_ids = out.get_column("event_id").to_list()
    positions = [ids.index(i) for i in kept_ids]
    assert positions == sorted(positions) and len(set(kept_ids)) == len(kept_ids)
    assert sum(result.dropped.values()) + out.height == frame.height
    assert Counter(result.dropped) == want_dropped
    assert [(a, u) for a, u, _ in want] == list(
        zip(out.get_column("app_id").to_list(), out.get_column("url").to_list(), strict=True)
    )

    domains = reference_domains(policy)
    for (app, url), (_, _, spec) in zip(out.select("app_id", "url").iter_rows(), want, strict=True):
        assert app in policy.allowed_apps
        if url is not None:
            assert "?" not in url and "#" not in url and "@" not in url
            m = _STORED_HOST.match(url)
            assert m is not None, url
            assert suffix_allowed(m.group(1).rstrip("."), domains), url
            assert spec is not None and not spec.evil

    # Everything else about a kept row is untouched.
    rest = [c for c in frame.columns if c not in ("app_id", "url")]
    assert out.select(rest).equals(frame.filter(pl.col("event_id").is_in(kept_ids)).select(rest))


@pytest.mark.parametrize("host", [h for d in BASE for h, _ in _lookalikes(d)])
def test_lookalike_domains_never_pass(host: str) -> None:
    policy = Policy(allowed_apps=frozenset({"firefox"}), allowed_domains=BASE)
    frame = make_frame([[event("focus_change", app_id="firefox", url=f"https://{host}/x")]])
    result = AllowlistStep()(frame, BatchContext(T0, policy=policy))
    assert result.frame.height == 0
    assert result.dropped == {"not_allowlisted_domain": 1}


@pytest.mark.parametrize("url", [u for d in BASE[:1] for u in _broken(d)])
def test_unsafe_urls_are_dropped_as_invalid(url: str) -> None:
    policy = Policy(allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com", "evil.com"))
    frame = make_frame([[event("focus_change", app_id="firefox", url=url)]])
    result = AllowlistStep()(frame, BatchContext(T0, policy=policy))
    assert result.frame.height == 0
    assert result.dropped == {"invalid_url": 1}


def test_context_is_filled_within_a_batch_only_and_never_across_apps() -> None:
    policy = Policy(allowed_apps=frozenset({"firefox", "code"}), allowed_domains=("google.com",))
    frame = make_frame([
        [
            event("click"),  # before any context: dropped
            event("focus_change", app_id="firefox", url="https://docs.google.com/d/1?x=1#h"),
            event("key_down", text="a"),
            event("focus_change", app_id="code"),
            event("key_down", text="b"),  # code, and no browser url inherited
        ],
        [event("scroll")],  # a new batch does not inherit the previous one's context
    ])
    result = AllowlistStep()(frame, BatchContext(T0, policy=policy))
    assert result.dropped == {"no_app_context": 2}
    assert result.frame.select("kind", "app_id", "url").rows() == [
        ("focus_change", "firefox", "https://docs.google.com/d/1"),
        ("key_down", "firefox", "https://docs.google.com/d/1"),
        ("focus_change", "code", None),
        ("key_down", "code", None),
    ]


def test_empty_allowlist_allows_nothing_and_empty_frames_pass() -> None:
    frame = make_frame([[event("focus_change", app_id="firefox")]])
    result = AllowlistStep()(frame, BatchContext(T0, policy=Policy()))
    assert result.frame.height == 0 and result.dropped == {"not_allowlisted_app": 1}
    empty = make_frame([[]])
    assert AllowlistStep()(empty, BatchContext(T0, policy=Policy())).frame.height == 0


def test_a_pipeline_frame_goes_through() -> None:
    payload, _ = make_batch("e-1", 70, t0_us=T0)
    frame = BatchPipeline([])._frame([(SourceMessage(payload, 0, 0), parse_event_batch(payload))])
    policy = Policy(allowed_apps=frozenset({"firefox"}), allowed_domains=("google.com",))
    result = AllowlistStep()(frame, BatchContext(T0, policy=policy))
    # The factory stamps the focused app on every event, as agents do.
    assert result.dropped == {}
    assert result.frame.height == 70
    assert result.frame.get_column("url").unique().to_list() == ["https://docs.google.com/d/1"]
