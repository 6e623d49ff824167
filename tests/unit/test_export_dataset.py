"""Pure parts of the dataset exporter (export/dataset.py): filters (validation, JSON round trip)
and the URL origin that is all an export keeps of a URL."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from handtrace.export.dataset import ExportFilters, url_origin


def test_filters_round_trip_through_json() -> None:
    f = ExportFilters(since="2026-11-01", until="2026-12-01T09:30:00+01:00", apps=("code",), cohorts=("eng",),
                      participants=("p1", "p2"), min_steps=3, max_steps=80,
                      demonstrations=("01a23532-850f-7000-8dd4-8d6a7b58e4cc",))
    assert f.since == "2026-11-01T00:00:00.000000Z" and f.until == "2026-12-01T08:30:00.000000Z"
    back = ExportFilters.from_json(json.loads(json.dumps(f.to_json())))
    assert back == f
    assert back.only(["01a23532-850f-7000-8dd4-8d6a7b58e4cd"]).demonstrations == (
        "01a23532-850f-7000-8dd4-8d6a7b58e4cd",)


@pytest.mark.parametrize(("kw", "msg"), [
    ({"since": "last tuesday"}, "ISO"),
    ({"min_steps": 9, "max_steps": 3}, "exceeds"),
    ({"demonstrations": ("not-a-uuid",)}, "UUID|hexadecimal"),
])
def test_bad_filters_are_refused_clearly(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg):
        ExportFilters(**kw)  # type: ignore[arg-type]


def test_unknown_filters_in_json_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown filters: colour"):
        ExportFilters.from_json({"colour": "red"})


def origins(urls: list[str | None]) -> list[str | None]:
    return pl.DataFrame({"u": urls}, schema={"u": pl.String}).select(url_origin("u")).to_series().to_list()


def test_url_origin_examples() -> None:
    assert origins([
        "https://Mail.Example.com/inbox?id=42#msg", "http://user:secret@intranet.corp:8080/a/b",
        "file:///home/anna/report.pdf", "about:blank", "not a url", None,
    ]) == ["https://mail.example.com", "http://intranet.corp:8080", None, None, None, None]


_host = st.from_regex(r"[a-z][a-z0-9-]{0,10}(\.[a-z]{2,6}){1,2}", fullmatch=True)
_tail = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)


@given(scheme=st.sampled_from(["http", "https", "ftp", "chrome-extension"]), host=_host,
       port=st.none() | st.integers(1, 65535),
       user=st.none() | st.from_regex(r"[A-Za-z0-9._%+-]{1,12}(:[^/?#\s\\]{1,12})?", fullmatch=True),
       path=_tail, query=_tail, frag=_tail)
def test_url_origin_keeps_only_scheme_host_and_port(scheme: str, host: str, port: int | None, user: str | None,
                                                    path: str, query: str, frag: str) -> None:
    """Whatever the URL carries -- credentials, a path, a query, a fragment (where PII and
    tokens live) -- the export keeps scheme://host[:port] and nothing else."""
    hostport = host + (f":{port}" if port is not None else "")
    url = f"{scheme}://{(user + '@') if user else ''}{hostport}/{path}?{query}#{frag}"
    (o,) = origins([url])
    assert o == f"{scheme}://{hostport}".lower()
    assert urlsplit(o).path == "" and "@" not in o and "?" not in o and "#" not in o
