"""The browser harness fails loudly (never skips) when Debian's Chromium is missing, and says how
to install it; HANDTRACE_CHROMIUM points it elsewhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import browser


def test_default_is_debians_chromium(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HANDTRACE_CHROMIUM", raising=False)
    assert browser.chromium_path() == "/usr/bin/chromium"
    monkeypatch.setenv("HANDTRACE_CHROMIUM", "/opt/chromium/chrome")
    assert browser.chromium_path() == "/opt/chromium/chrome"


@pytest.mark.parametrize("make", [lambda d: d / "absent", lambda d: d],  # missing; a directory
                         ids=["missing", "not-a-file"])
def test_missing_chromium_fails_with_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         make) -> None:
    monkeypatch.setenv("HANDTRACE_CHROMIUM", str(make(tmp_path)))
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install chromium"), browser.chromium():
        pytest.fail("the harness yielded a browser it does not have")


def test_launch_flags_keep_the_browser_offline_and_sandbox_free() -> None:
    for flag in ("--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"):
        assert flag in browser.CHROMIUM_ARGS
    assert browser.VIEWPORT == {"width": 1366, "height": 768}
