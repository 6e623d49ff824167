"""The real-browser harness (issue #13): Debian's headless Chromium driven by Playwright for Python,
and an ASGI app served by uvicorn on a loopback port in a background thread.

Never a downloaded browser: Playwright launches the system binary by ``executable_path``
(``/usr/bin/chromium``, or ``HANDTRACE_CHROMIUM``) with background networking off. A missing
browser or Playwright driver is a test failure that says how to install it, never a skip.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

DEFAULT_CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-default-apps", "--disable-sync", "--metrics-recording-only"]
VIEWPORT = {"width": 1366, "height": 768}
"""A common laptop screen: the pages must be usable at this size."""
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
INSTALL_HINT = ("install Debian's browser with `sudo apt-get install chromium` (deploy/setup.sh does it), "
                "or point HANDTRACE_CHROMIUM at a Chromium binary; never a downloaded browser")


def chromium_path() -> str:
    """The Chromium binary the tests drive (HANDTRACE_CHROMIUM overrides /usr/bin/chromium)."""
    return os.environ.get("HANDTRACE_CHROMIUM") or DEFAULT_CHROMIUM


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (playwright.sync_api.Browser), closed at exit; fails the test when missing."""
    path = chromium_path()
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        pytest.fail(f"no Chromium at {path}: {INSTALL_HINT}")
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.fail(f"Playwright for Python is missing ({e}): it is in pyproject's dev extra; "
                    "run deploy/setup.sh")
    try:
        pw = sync_playwright().start()
    except Exception as e:  # noqa: BLE001 -- the driver (node) missing or broken
        pytest.fail(f"Playwright's driver did not start ({e}): reinstall the pinned playwright package "
                    f"(deploy/setup.sh); the browser itself is {path}")
    try:
        try:
            browser = pw.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            pytest.fail(f"Chromium at {path} did not start: {e}\n{INSTALL_HINT}")
        try:
            yield browser
        finally:
            browser.close()
    finally:
        pw.stop()


@contextmanager
def live_server(app: Any, timeout_s: float = 60.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free 127.0.0.1 port in a thread; yields the base URL and
    stops the server (and joins its thread) at exit."""
    import uvicorn

    # Bound here, handed to uvicorn: no window in which another process takes the port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                pytest.fail(f"uvicorn did not start on {base} within {timeout_s:g} s")
            time.sleep(0.02)
        # Readiness by a real request: any HTTP answer (a page may well say 401 without a session).
        try:
            urllib.request.urlopen(f"{base}/", timeout=timeout_s).close()  # noqa: S310
        except urllib.error.HTTPError:
            pass
        except OSError as e:
            pytest.fail(f"{base} does not answer: {e}")
        yield base
    finally:
        server.should_exit = True
        thread.join(timeout_s)
        sock.close()
        if thread.is_alive():
            raise RuntimeError(f"uvicorn on {base} did not stop within {timeout_s:g} s")


def screenshot(page: Any, *parts: str) -> Path:
    """Keep a full-page screenshot as a test artefact under tests/artifacts/<parts>.png."""
    path = ARTIFACTS.joinpath(*parts).with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path), full_page=True)
    return path


# What the portal's browser tests check on every page: WCAG contrast of text (4.5:1) and a label
# for every control.

CONTRAST_JS = """() => {
  const parse = c => { const m = c.match(/rgba?\\(([^)]+)\\)/); if (!m) return null;
    const p = m[1].split(/[ ,\\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1}; };
  const lum = c => { const f = v => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
    return 0.2126 * f(c.r) + 0.7152 * f(c.g) + 0.0722 * f(c.b); };
  const bg = el => { for (let e = el; e; e = e.parentElement) { const c = parse(getComputedStyle(e).backgroundColor);
    if (c && c.a > 0.99) return c; } return {r: 255, g: 255, b: 255, a: 1}; };
  const low = []; let checked = 0;
  for (const el of document.querySelectorAll('body *')) {
    if (![...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    const st = getComputedStyle(el), box = el.getBoundingClientRect();
    if (st.display === 'none' || st.visibility === 'hidden' || box.width <= 1 || box.height <= 1) continue;
    const a = lum(parse(st.color)), b = lum(bg(el));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05); checked++;
    if (ratio < 4.5) low.push(`${el.tagName} "${el.textContent.trim().slice(0, 40)}": ${ratio.toFixed(2)}`);
  }
  return {checked, low};
}"""

LABELS_JS = """() => [...document.querySelectorAll('input:not([type=hidden]), select, textarea')].map(el => ({
  id: el.id, labels: [...(el.labels || [])].map(l => l.textContent.replace(/\\s+/g, ' ').trim())}))"""


@contextmanager
def signed_in_pages(browser: Any, base_url: str) -> Iterator[Any]:
    """``open_(cookie, path="/", javascript=True)`` -> a page of a fresh browser context signed in
    with ``cookie`` (``page.last_status``: the HTTP status of the navigation); every context is
    closed on exit."""
    contexts: list[Any] = []

    def open_(cookie: dict[str, str], path: str = "/", javascript: bool = True) -> Any:
        ctx = browser.new_context(viewport=VIEWPORT, java_script_enabled=javascript, base_url=base_url)
        contexts.append(ctx)
        ctx.add_cookies([{"name": k, "value": v, "url": base_url} for k, v in cookie.items()])
        page = ctx.new_page()
        page.set_default_timeout(30_000)  # a loaded 2-core CI machine
        response = page.goto(path)
        page.last_status = response.status if response is not None else None
        return page

    try:
        yield open_
    finally:
        for ctx in contexts:
            ctx.close()
