"""Screenshots go through the event pipeline's own exemption, pause, allowlist, redaction and
pseudonymisation steps: an image is published only if an event captured at the same moment in
the same window would be stored, only under pseudonyms, and with its url redacted; an image whose
url cannot be redacted, or whose forwarded headers are not what they claim, is dropped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from handtrace.core import ids
from handtrace.core.policy import Policy
from handtrace.core.settings import Settings
from handtrace.stream.app import build_pipeline
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.policy import EmployeeControls, Exemption, PauseWindow
from handtrace.stream.screenshots import (
    INVALID,
    STEP_NAMES,
    UNREDACTABLE,
    ScreenshotMessage,
    enforce,
    screenshot_steps,
)
from handtrace.stream.steps import BatchContext, StepResult

S = 1_000_000
T0 = 1_790_000_000 * S
POLICY = Policy.from_record({"version": 1, "allowed_apps": ["code", "google-chrome"],
                             "allowed_domains": ["google.com"], "sampling": {}, "text_capture": {}})


def shot(emp: str | None, at_us: int, app: str | None, url: str | None = None, offset: int = 0) -> ScreenshotMessage:
    h = {"ht-event-id": ids.uuid7_bytes(at_us // 1000), "ht-captured-at-us": str(at_us).encode(),
         "ht-device-id": f"dev-{emp}".encode(), "ht-sha256": b"ab" * 32, "ht-format": b"webp"}
    if app:
        h["ht-app-id"] = app.encode()
    if url:
        h["ht-url"] = url.encode()
    return ScreenshotMessage(SourceMessage(b"RIFF....WEBPimage", 2, offset, emp.encode() if emp else None), h)


def test_only_what_an_event_would_be_stored_for_is_published(tmp_path: Path) -> None:
    steps = screenshot_steps(build_pipeline(Settings(state_dir=tmp_path, stream={"pseudonym_key": "k" * 40})).steps)
    controls = {"emp-paused": EmployeeControls(pauses=(PauseWindow(T0, T0 + 60 * S),)),
                "emp-exempt": EmployeeControls(exemptions=(Exemption(T0 - S),))}
    batch = [
        shot("emp-ok", T0 + S, "code"),
        shot("emp-ok", T0 + 2 * S, "google-chrome", "https://docs.google.com/d/1?x=secret"),
        shot("emp-ok", T0 + 3 * S, "google-chrome", "https://docs.google.com.evil.net/"),
        shot("emp-ok", T0 + 4 * S, "telegram"),
        shot("emp-paused", T0 + 10 * S, "code"),
        shot("emp-paused", T0 + 70 * S, "code"),  # after the pause (beyond the skew margin)
        shot("emp-exempt", T0 + S, "code"),
        shot(None, T0, "code"),
    ]
    batch.append(ScreenshotMessage(SourceMessage(b"x", 0, 9, b"emp-ok"), {}))  # no headers
    out, dropped = enforce(batch, steps, BatchContext(T0 + 100 * S, POLICY, controls))
    assert len(out) == 3
    assert dropped == {"screenshot_not_allowlisted_domain": 1, "screenshot_not_allowlisted_app": 1,
                       "screenshot_paused": 1, "screenshot_exempt": 1, INVALID: 2}
    for a in out:
        blob = a.key + b"".join(v for _k, v in a.headers)
        assert b"emp-" not in blob and b"dev-" not in blob, "a raw id reached the accepted topic"
        assert a.partition == 2 and a.value == b"RIFF....WEBPimage"
    urls = [dict(a.headers)["ht-url"] for a in out]
    assert b"https://docs.google.com/d/1" in urls and not any(b"secret" in u for u in urls)


def _steps(tmp_path: Path) -> list[Any]:
    return screenshot_steps(build_pipeline(Settings(state_dir=tmp_path, stream={"pseudonym_key": "k" * 40})).steps)


def test_the_redaction_step_is_the_event_pipelines_own(tmp_path: Path) -> None:
    pipeline = build_pipeline(Settings(state_dir=tmp_path, stream={"pseudonym_key": "k" * 40}))
    steps = screenshot_steps(pipeline.steps)
    assert [s.name for s in steps] == ["exemption", "pause", "allowlist", "redact", "pseudonymise"]
    assert set(STEP_NAMES) == {s.name for s in steps}
    assert next(s for s in steps if s.name == "redact") is next(s for s in pipeline.steps if s.name == "redact")


@pytest.mark.parametrize("url,gone", [
    ("https://docs.google.com/d/ada@acme.com/edit", ["ada@acme.com"]),
    ("https://docs.google.com/d/ada%40acme.com/edit", ["ada", "acme.com"]),
    ("https://docs.google.com/u/\uff41da\uff20acme.com/x", ["acme.com", "\uff20"]),
    ("https://docs.google.com/d/glpat-x7Yz9AbCdEf1GhIjKlMn/edit", ["glpat", "x7Yz9AbCdEf1GhIjKlMn"]),
    ("https://docs.google.com/k/AIzaSyDdI0hCZtE6vySjMm-WEfRq3CPzqKqqsHI", ["AIza", "SyDdI0hCZtE6vySjMm"]),
    ("https://docs.google.com/p/4111\u00a01111\u00a01111\u00a01111", ["4111"]),
    ("https://docs.google.com/iban/DE89370400440532013000", ["DE89", "3704004405"]),
    ("https://u:hunter2pass@docs.google.com/d/1", ["hunter2pass"]),  # userinfo is not stored at all
])
def test_urls_are_redacted_on_the_accepted_topic(tmp_path: Path, url: str, gone: list[str]) -> None:
    out, dropped = enforce([shot("emp-ok", T0 + S, "google-chrome", url)], _steps(tmp_path),
                           BatchContext(T0 + 100 * S, POLICY, {}))
    assert dropped == {}
    assert len(out) == 1
    published = dict(out[0].headers)["ht-url"].decode()
    assert published.startswith("https://docs.google.com/")
    assert "[REDACTED:" in published or "@docs" in url, published
    for g in gone:
        assert g not in published, published


def test_headers_that_are_not_what_they_claim_are_dropped(tmp_path: Path) -> None:
    bad = []
    for key, value in (("ht-sha256", b"ada@acme.com"), ("ht-format", b"ada@acme.com"), ("ht-event-id", b"x" * 40),
                       ("ht-captured-at-us", "\u0661\u0662".encode()), ("ht-captured-at-us", b" 12")):
        m = shot("emp-ok", T0 + S, "code")
        m.headers[key] = value
        bad.append(m)
    out, dropped = enforce([*bad, shot("emp-ok", T0 + S, "code")], _steps(tmp_path),
                           BatchContext(T0 + 100 * S, POLICY, {}))
    assert dropped == {INVALID: len(bad)}
    assert len(out) == 1
    assert {k for k, _ in out[0].headers} == {"ht-employee-key", "ht-device-key", "ht-event-id",
                                              "ht-captured-at-us", "ht-app-id", "ht-url", "ht-sha256", "ht-format"}


@dataclass(frozen=True)
class _BrokenRedact:
    """A redaction step that fails: raises, or lets everything through."""

    raises: bool
    name: str = "redact"
    token: str = "[REDACTED:{kind}]"  # noqa: S105

    def __call__(self, frame: pl.DataFrame, ctx: BatchContext) -> StepResult:
        if self.raises:
            raise RuntimeError("detector crashed")
        return StepResult(frame)


@pytest.mark.parametrize("raises", [True, False])
def test_a_url_that_cannot_be_redacted_drops_its_image(tmp_path: Path, raises: bool) -> None:
    steps = [_BrokenRedact(raises) if s.name == "redact" else s for s in _steps(tmp_path)]
    batch = [shot("emp-ok", T0 + S, "google-chrome", "https://docs.google.com/d/ada%40acme.com/x"),
             shot("emp-ok", T0 + 2 * S, "google-chrome", "https://docs.google.com/d/plain")]
    out, dropped = enforce(batch, steps, BatchContext(T0 + 100 * S, POLICY, {}))
    if raises:  # nothing is known about any url of the batch
        assert (out, dropped) == ([], {UNREDACTABLE: 2})
    else:  # the post-check finds the address the step let through
        assert dropped == {UNREDACTABLE: 1}
        assert [dict(a.headers)["ht-url"] for a in out] == [b"https://docs.google.com/d/plain"]
