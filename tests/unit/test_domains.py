"""Registrable-domain and IDNA rules (handtrace.core.domains): what an allowlist entry may be, which
host a url names, and which hosts an entry admits -- shared by the agent, the stream and the
control plane (issue #10, class 5).

Expected values are written out (A-labels from RFC 3492 / UTS-46 examples, public suffixes from
the Public Suffix List) or come from the ``publicsuffixlist`` library queried directly, never from
the code under test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import publicsuffixlist
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from publicsuffixlist import PublicSuffixList
from typer.testing import CliRunner

from handtrace.agent.capture import WindowInfo
from handtrace.agent.localpolicy import LocalPolicy
from handtrace.cli import app
from handtrace.core.codec import decode_record, encode_record
from handtrace.core.controls import ControlError, control_record, policy_record
from handtrace.core.domains import (
    DomainError,
    domain_entry_problems,
    host_allowed,
    normalise_domain,
    normalised_domains,
    url_host,
    url_verdict,
)
from handtrace.core.pii import redact_text
from handtrace.core.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.allowlist import AllowlistStep
from tests.unit.test_step_allowlist import T0, event, make_frame

PSL = PublicSuffixList()  # the oracle: the library itself, queried directly
ROOT = Path(__file__).resolve().parents[2]


def _psl_rules() -> tuple[list[str], list[str]]:
    """(public suffixes, exception names) of the shipped list, ICANN and private sections;
    a wildcard rule ``*.ck`` contributes ``wild.ck``."""
    public, exceptions = [], []
    for line in Path(publicsuffixlist.PSLFILE).read_text(encoding="utf-8").splitlines():
        rule = line.strip().split(" ")[0].lower()
        if not rule or rule.startswith("//"):
            continue
        if rule.startswith("!"):
            exceptions.append(rule[1:])
        else:
            public.append(rule.replace("*", "wild"))
    return public, exceptions


PSL_PUBLIC, PSL_EXCEPTIONS = _psl_rules()


# ------------------------------------------------------------------ entries

REFUSED = [
    # public suffixes and bare TLDs, ICANN and private sections
    ("com", "is a top-level domain"),
    ("io", "is a top-level domain"),
    ("co.uk", "is a public suffix"),
    ("CO.UK.", "is a public suffix"),
    (".co.uk", "is a public suffix"),
    ("github.io", "is a public suffix"),
    ("s3.amazonaws.com", "is a public suffix"),
    ("blogspot.com", "is a public suffix"),
    ("anything.ck", "is a public suffix"),  # *.ck
    ("xn--r8jz45g", "is a single-label name"),
    ("intranet", "is a single-label name"),
    ("東京.jp", "is a public suffix"),
    # not a domain
    ("*.google.com", "is a wildcard"),
    ("*", "is a wildcard"),
    ("https://google.com/x", "is a url, not a domain: write google.com"),
    ("google.com/x", "is a url"),
    ("ada@google.com", "is a url"),
    ("google.com:443", "has a port"),
    ("", "is empty"),
    ("   ", "is empty"),
    ("google .com", "has spaces"),
    ("fe80::1%eth0", "zone id"),
    # IDNA 2008 refuses what IDNA 2003 folded or allowed
    ("goo\u200dgle.com", "not a valid domain name"),
    ("goo\u200cgle.com", "not a valid domain name"),
    ("☃.net", "not a valid domain name"),
    ("xn--bcher-kv.de", "not a valid domain name"),  # truncated punycode
    ("xn--google-.com", "not a valid domain name"),
    ("-google.com", "not a valid domain name"),
    ("goo_gle!.com", "not a valid domain name"),
    ("a..b.com", "not a valid domain name"),
    # number-like names a browser rewrites to an address
    ("127.1", "not a valid domain name"),
    ("0x7f.0.0.1", "not a valid domain name"),
    ("010.0.0.1", "not a valid domain name"),
    ("1.2.3.4.5", "not a valid domain name"),
    ("a" * 64 + ".com", "not a valid domain name"),
]

ACCEPTED = [
    ("google.com", "google.com"),
    ("Google.COM.", "google.com"),
    (".google.com", "google.com"),
    (" google.com\n", "google.com"),
    ("docs.google.com", "docs.google.com"),
    ("example.co.uk", "example.co.uk"),
    ("alice.github.io", "alice.github.io"),
    ("amazonaws.com", "amazonaws.com"),
    ("www.ck", "www.ck"),  # !www.ck: an exception to *.ck
    ("bücher.de", "xn--bcher-kva.de"),
    ("BÜCHER.DE", "xn--bcher-kva.de"),
    ("XN--BCHER-KVA.de", "xn--bcher-kva.de"),
    ("例え.jp", "xn--r8jz45g.jp"),
    ("例え。jp", "xn--r8jz45g.jp"),  # ideographic full stop
    ("faß.de", "xn--fa-hia.de"),  # IDNA 2008 keeps ß (IDNA 2003: fass.de)
    ("fass.de", "fass.de"),
    ("βόλος.gr", "xn--nxasmm1c.gr"),  # final sigma kept (IDNA 2003: xn--nxasmq6b)
    ("ｇｏｏｇｌｅ.com", "google.com"),  # fullwidth: mapped as browsers map it
    ("10.0.0.5", "10.0.0.5"),
    ("[2001:DB8::1]", "2001:db8::1"),
    ("2001:db8:0::1", "2001:db8::1"),
]


@pytest.mark.parametrize(("entry", "why"), REFUSED)
def test_entries_that_are_not_one_site_are_refused_with_the_reason(entry: str, why: str) -> None:
    with pytest.raises(DomainError) as e:
        normalise_domain(entry)
    assert why in str(e.value)
    assert domain_entry_problems([entry]) == [str(e.value)]
    assert normalised_domains([entry]) == ()


@pytest.mark.parametrize(("entry", "want"), ACCEPTED)
def test_entries_are_normalised_as_browsers_name_hosts(entry: str, want: str) -> None:
    assert normalise_domain(entry) == want
    assert normalise_domain(want) == want  # idempotent: the stored form is its own normal form
    assert domain_entry_problems([entry]) == []


def test_messages_name_the_entry_and_suggest_a_registrable_domain() -> None:
    assert domain_entry_problems(["co.uk", "google.com", "com", "github.io"]) == [
        "`co.uk` is a public suffix: allowlist a registrable domain such as example.co.uk",
        "`com` is a top-level domain: allowlist a registrable domain such as example.com",
        "`github.io` is a public suffix: allowlist a registrable domain such as example.github.io",
    ]
    # An invisible joiner is spelled out, so the operator can see what is wrong.
    [msg] = domain_entry_problems(["goo\u200dgle.com"])
    assert msg.startswith("`goo\\u200dgle.com` is not a valid domain name") and "\u200d" not in msg
    assert domain_entry_problems([3]) == ["`3` is not a string"]


def test_every_public_suffix_of_the_shipped_list_is_refused() -> None:
    """Both sections of the list, ICANN and private (github.io, s3.amazonaws.com), and no rule
    is missed by the normalisation (an IDN rule must be refused in either spelling)."""
    assert len(PSL_PUBLIC) > 9000
    for rule in PSL_PUBLIC:
        assert normalised_domains([rule]) == (), rule
    for name in PSL_EXCEPTIONS:  # !www.ck: registrable
        assert normalise_domain(name) == name.encode("idna").decode("ascii"), name


def test_the_lists_punycode_rules_agree_with_idna_2008() -> None:
    """The library matches A-labels against punycode it derives with IDNA 2003; that is only
    right while no Unicode rule of the list differs between IDNA 2003 and 2008 (no ß, ς, joiner)."""
    import idna

    unicode_rules = [r for r in PSL_PUBLIC + PSL_EXCEPTIONS if not r.isascii()]
    assert unicode_rules
    for rule in unicode_rules:
        assert idna.encode(rule, uts46=True).decode() == rule.encode("idna").decode(), rule


# ------------------------------------------------------------------ hosts

HOSTS = [
    ("https://docs.google.com/x", "docs.google.com"),
    ("https://Docs.GOOGLE.com./x", "docs.google.com"),
    ("https://ada:pw@google.com:8443/x", "google.com"),
    ("https://google.com@evil.net/", "evil.net"),
    ("https://faß.de/", "xn--fa-hia.de"),
    ("https://FASS.de/", "fass.de"),
    ("https://βόλος.gr/", "xn--nxasmm1c.gr"),
    ("https://ΒΌΛΟΣ.gr/", "xn--nxasmq6b.gr"),  # capital sigma maps to σ, as browsers map it
    ("https://ΧΑΣ.com/", "xn--mxa0bk.com"),  # not str.lower()'s final-sigma "χας"
    ("https://bücher.de/", "xn--bcher-kva.de"),
    ("https://xn--bcher-kva.de/", "xn--bcher-kva.de"),
    ("https://例え。jp/", "xn--r8jz45g.jp"),
    ("https://ｇｏｏｇｌｅ.com/", "google.com"),
    ("https://goo\u00adgle.com/", "google.com"),  # soft hyphen: ignored by UTS-46 and browsers
    ("https://my_app.google.com/", "my_app.google.com"),
    ("http://10.0.0.5:8080/", "10.0.0.5"),
    ("http://[2001:DB8::1]:80/", "2001:db8::1"),
    # no host a browser would connect to under this name: never allowed
    ("https://goo\u200dgle.com/", None),  # IDNA 2003 deleted the joiner: google.com
    ("https://goo\u200cgle.com/", None),
    ("https://☃.net/", None),
    ("https://xn--bcher-kv.de/", None),
    ("https://google%2ecom/", None),
    ("http://127.1/", None),
    ("http://0x7f.0.0.1/", None),
    ("http://2130706433/", None),
    ("http://010.0.0.1/", None),
    ("http://1.2.3.4.5/", None),
    ("http://[::1]x/", None),
    ("http://[fe80::1%25eth0]/", None),
    ("https://-google.com/", None),
    ("https://" + "a" * 64 + ".com/", None),
    ("https://" + "\u00ad" * 2000 + "google.com/", None),  # padded past any real host name
]


@pytest.mark.parametrize(("url", "host"), HOSTS)
def test_a_urls_host_is_the_one_browsers_connect_to(url: str, host: str | None) -> None:
    assert url_host(url) == host


DECISIONS = [
    # (entries, url, allowed)
    (["google.com"], "https://docs.google.com/d", True),
    (["google.com"], "https://google.com/d", True),
    (["google.com"], "https://evilgoogle.com/", False),
    (["google.com"], "https://google.com.evil.net/", False),
    (["google.com"], "https://docs.google.com.evil.net/", False),
    (["docs.google.com"], "https://google.com/", False),
    (["docs.google.com"], "https://a.docs.google.com/", True),
    (["fass.de"], "https://faß.de/", False),  # look-alike: browsers go to xn--fa-hia.de
    (["fass.de"], "https://FASS.de/", True),
    (["faß.de"], "https://xn--fa-hia.de/", True),
    (["faß.de"], "https://fass.de/", False),
    (["bücher.de"], "https://xn--bcher-kva.de/", True),  # unicode entry, punycode host
    (["xn--bcher-kva.de"], "https://www.BÜCHER.de/", True),  # punycode entry, unicode host
    (["例え.jp"], "https://例え.jp/", True),
    (["google.com"], "https://goo\u200dgle.com/", False),
    (["google.com"], "https://ｇｏｏｇｌｅ.com/", True),
    # an entry never admits another party's site under a public suffix below it
    (["amazonaws.com"], "https://amazonaws.com/", True),
    (["amazonaws.com"], "https://www.amazonaws.com/", True),
    (["amazonaws.com"], "https://bucket.s3.amazonaws.com/", False),
    (["alice.github.io"], "https://alice.github.io/x", True),
    (["alice.github.io"], "https://bob.github.io/x", False),
    # public suffixes that slipped into a policy admit nothing
    (["com"], "https://google.com/", False),
    (["co.uk"], "https://example.co.uk/", False),
    (["github.io"], "https://alice.github.io/", False),
    (["s3.amazonaws.com"], "https://bucket.s3.amazonaws.com/", False),
    (["*.google.com"], "https://docs.google.com/", False),
    # IP literals only match an identical entry
    (["10.0.0.5"], "http://10.0.0.5/", True),
    (["10.0.0.5"], "http://10.0.0.50/", False),
    (["0.5"], "http://10.0.0.5/", False),
    (["2001:db8::1"], "http://[2001:0db8:0::1]/", True),
    (["google.com"], "http://127.1/", False),
]


@pytest.mark.parametrize(("entries", "url", "allowed"), DECISIONS)
def test_hosts_allowed_by_entries(entries: list[str], url: str, allowed: bool) -> None:
    reason, stored = url_verdict(url, normalised_domains(entries))
    assert (reason is None) == allowed, (reason, stored)
    assert (stored is not None) == allowed


def test_stored_urls_keep_only_scheme_host_port_and_path() -> None:
    domains = normalised_domains(["google.com", "bücher.de", "2001:db8::1"])
    assert url_verdict("https://ada:pw@Docs.Google.com.:8443/d/1?x=1#h", domains) == (
        None, "https://docs.google.com:8443/d/1")
    assert url_verdict("https://BÜCHER.de/a?b", domains) == (None, "https://xn--bcher-kva.de/a")
    assert url_verdict("http://[2001:DB8::1]:80/", domains) == (None, "http://[2001:db8::1]:80/")
    assert url_verdict("https://x\u200dgoogle.com/", domains) == ("invalid_url", None)
    assert url_verdict("https://evil.net/", domains) == ("not_allowlisted_domain", None)


def test_a_bad_entry_that_slips_in_is_logged_once_per_policy(caplog: pytest.LogCaptureFixture) -> None:
    entries = ("co.uk", "google.com", "unique-for-this-test.github.io", "github.io")
    with caplog.at_level("WARNING", logger="handtrace.core.domains"):
        for _ in range(5):
            assert normalised_domains(entries) == ("google.com", "unique-for-this-test.github.io")
    [record] = [r for r in caplog.records if r.name == "handtrace.core.domains"]
    assert "`co.uk` is a public suffix" in record.getMessage()
    assert "`github.io` is a public suffix" in record.getMessage()
    # Policy.from_record normalises the same way: an old policy already on the topic.
    policy = Policy.from_record({"version": 1, "allowed_domains": list(entries)})
    assert policy.allowed_domains == ("google.com", "unique-for-this-test.github.io")


def test_an_old_policy_on_the_topic_with_public_suffixes_admits_nothing_under_them() -> None:
    """A policy published before validation existed, as the stream and the agents decode it from
    the policy topic: its public-suffix, wildcard and url entries admit nothing; the rest works."""
    rec = control_record("policy_update", employee_id=None, actor="ops-old", role="ops", policy={
        "version": 4, "allowed_apps": ["firefox"], "sampling": {}, "text_capture": {},
        "allowed_domains": ["com", "github.io", "s3.amazonaws.com", "*.evil.net", "https://co.uk/",
                            "acme.io"]})
    policy = Policy.from_record(decode_record(encode_record("control_event", rec), "control_event")["policy"])
    assert policy.allowed_domains == ("acme.io",)
    urls = ["https://google.com/", "https://alice.github.io/", "https://b.s3.amazonaws.com/k",
            "https://x.evil.net/", "https://shop.co.uk/", "https://docs.acme.io/d"]
    frame = make_frame([[event("focus_change", app_id="firefox", url=u)] for u in urls])
    out = AllowlistStep()(frame, BatchContext(T0, policy=policy))
    assert out.frame.get_column("url").to_list() == ["https://docs.acme.io/d"]
    assert out.dropped == {"not_allowlisted_domain": 5}
    local = LocalPolicy(policy)
    assert [local.window(WindowInfo("firefox", None, u)).allowed for u in urls] == [False] * 5 + [True]


# ------------------------------------------------------------------ properties

LABELS = ["com", "co", "uk", "io", "github", "s3", "amazonaws", "blogspot", "google", "docs", "evil",
          "de", "ck", "www", "jp", "net", "bücher", "xn--bcher-kva", "faß", "fass", "例え", "βόλος",
          "gr", "goo\u200dgle", "ｇｏｏｇｌｅ", "x-1", "my_app", "10", "5", "0x7f"]
names = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)
spellings = st.tuples(names, st.sampled_from(["", ".", "upper"])).map(
    lambda t: t[0].upper() if t[1] == "upper" else t[0] + t[1])
entries_st = st.lists(st.one_of(spellings, st.sampled_from(PSL_PUBLIC)), max_size=5)


def urls_st(entries: list[str]) -> st.SearchStrategy[str]:
    """Urls whose host is often an entry or under one (spelled differently), else anything."""
    near = [e.strip().strip(".") for e in entries if e.strip().strip(".")]
    host = spellings
    if near:
        under = st.tuples(st.sampled_from(["", "www.", "a.b.", "s3.", "x-1."]), st.sampled_from(near),
                          st.sampled_from(["", ".", "upper"]))
        host = st.one_of(spellings, under.map(
            lambda t: (t[0] + t[1]).upper() if t[2] == "upper" else t[0] + t[1] + t[2]))
    return st.builds(
        lambda scheme, user, h, port, path: f"{scheme}://{user}{h}{port}{path}",
        st.sampled_from(["https", "http"]), st.sampled_from(["", "ada@", "google.com@"]), host,
        st.sampled_from(["", ":8443"]), st.sampled_from(["", "/", "/a?b=1#c"]),
    )


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries_st, st.data())
def test_an_allowed_host_is_within_an_entry_that_is_one_site(entries: list[str], data: st.DataObject) -> None:
    """(a) An allowed host equals a valid entry or ends with "." + entry; that entry is no
    public suffix, and it lies within the host's own registrable domain."""
    url = data.draw(urls_st(entries))
    domains = normalised_domains(entries)
    reason, stored = url_verdict(url, domains)
    if reason is not None:
        return
    host = url_host(url)
    assert host is not None and stored is not None
    assert host.isascii() and host == host.lower()
    site = PSL.privatesuffix(host)
    assert site is not None, host
    witnesses = [d for d in domains if host == d or host.endswith("." + d)]
    assert any(not PSL.is_public(d) and (d == site or d.endswith("." + site)) for d in witnesses), (
        host, domains)
    # and that entry came from the operator's list
    assert set(domains) <= {normalise_domain(e) for e in entries if not domain_entry_problems([e])}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(PSL_PUBLIC), st.sampled_from(["", "x.", "www.", "a.b."]),
       st.sampled_from(["", ".", "upper", "lead"]))
def test_a_public_suffix_entry_admits_nothing(suffix: str, sub: str, spelling: str) -> None:
    """(b) Any public suffix of the shipped list, however it is spelled, admits no host: not
    itself and nothing under it."""
    entry = {"": suffix, ".": suffix + ".", "upper": suffix.upper(), "lead": "." + suffix}[spelling]
    assert domain_entry_problems([entry])
    assert normalised_domains([entry]) == ()
    # Even handed to the matcher unnormalised (a caller that skipped normalisation).
    for candidate in (entry, suffix, suffix.encode("idna").decode("ascii")):
        host = url_host(f"https://{sub}{suffix}/")
        assert host is None or not host_allowed(host, (candidate,))
    assert url_verdict(f"https://{sub}{suffix}/", normalised_domains([entry]))[0] is not None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries_st, st.data())
def test_agent_and_stream_decide_identically(entries: list[str], data: st.DataObject) -> None:
    """(c) The laptop (before capture) and the stream (the proof) keep and drop the same urls,
    for the same reason, and store the same url (the agent redacts it on the laptop)."""
    urls = data.draw(st.lists(urls_st(entries), min_size=1, max_size=20))
    policy = Policy.from_record({"version": 1, "allowed_apps": ["firefox"], "allowed_domains": entries})
    raw = Policy(version=1, allowed_apps=frozenset({"firefox"}), allowed_domains=tuple(entries))
    local = LocalPolicy(policy)
    frame = make_frame([[event("focus_change", app_id="firefox", url=u)] for u in urls])
    for p in (policy, raw):  # the stream also gets Policy values built without from_record
        out = AllowlistStep()(frame, BatchContext(T0, policy=p))
        kept = dict(zip(out.frame.get_column("event_id").to_list(), out.frame.get_column("url").to_list(),
                        strict=True))
        ids = frame.get_column("event_id").to_list()
        dropped: dict[str, int] = {}
        for event_id, url in zip(ids, urls, strict=True):
            decision = local.window(WindowInfo(app_id="firefox", title=None, url=url))
            assert decision.allowed == (event_id in kept), url
            if decision.allowed:
                assert decision.url == redact_text(kept[event_id])[0]
            else:
                assert decision.reason is not None
                dropped[decision.reason] = dropped.get(decision.reason, 0) + 1
        assert out.dropped == dropped


# ------------------------------------------------------------------ the policy command


def _policy_file(tmp_path: Path, domains: list[str]) -> Path:
    path = tmp_path / "policy.json"
    path.write_text(json.dumps({"version": 2, "allowed_apps": ["firefox"], "allowed_domains": domains}))
    return path


def test_policy_record_refuses_public_suffixes_listing_every_problem(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, ["google.com", "co.uk", "github.io", "*.acme.io"])
    with pytest.raises(ControlError) as e:
        policy_record(path, actor="ops-1")
    msg = str(e.value)
    assert "`co.uk` is a public suffix: allowlist a registrable domain such as example.co.uk" in msg
    assert "`github.io` is a public suffix" in msg
    assert "`*.acme.io` is a wildcard" in msg
    assert "google.com`" not in msg


def test_policy_record_stores_entries_normalised(tmp_path: Path) -> None:
    rec = policy_record(_policy_file(tmp_path, ["Google.com.", "bücher.de", "alice.github.io"]), actor="ops-1")
    assert rec["policy"]["allowed_domains"] == ["google.com", "xn--bcher-kva.de", "alice.github.io"]


def test_policy_set_command_refuses_the_file_before_publishing(tmp_path: Path) -> None:
    path = _policy_file(tmp_path, ["co.uk", "github.io"])
    result = CliRunner().invoke(app, ["control", "policy", "set", str(path), "--actor", "ops-1"])
    assert result.exit_code == 1
    text = re.sub(r"\s+", " ", result.output)
    assert "`co.uk` is a public suffix" in text and "`github.io` is a public suffix" in text


def test_the_example_policy_is_valid() -> None:
    doc = json.loads((ROOT / "deploy" / "policy.example.json").read_text())
    assert domain_entry_problems(doc["allowed_domains"]) == []
