"""Screenshots go through the event pipeline's own exemption, pause, allowlist and
pseudonymisation steps: an image is published only if an event captured at the same moment in
the same window would be stored, and only under pseudonyms."""

from __future__ import annotations

from pathlib import Path

from handtrace.core import ids
from handtrace.core.policy import Policy
from handtrace.core.settings import Settings
from handtrace.stream.app import build_pipeline
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.policy import EmployeeControls, Exemption, PauseWindow
from handtrace.stream.screenshots import INVALID, ScreenshotMessage, enforce, screenshot_steps
from handtrace.stream.steps import BatchContext

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
