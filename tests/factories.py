"""Valid event batches for tests, built directly on the contract (no simulator involved)."""

from __future__ import annotations

import random
from typing import Any

from handtrace.core import codec, ids
from handtrace.core.clock import now_us

TEST_APP = "firefox"
TEST_URL = "https://docs.google.com/d/1"
# What the integration tests publish before they start a worker: allows the events above.
TEST_POLICY = {"version": 1, "allowed_apps": [TEST_APP], "allowed_domains": ["google.com"],
               "sampling": {}, "text_capture": {"*": "full"}}

KINDS = ("pointer_move", "click", "scroll", "key_down", "key_up", "focus_change", "screenshot")


def make_event(kind: str, ts_us: int, rng: random.Random) -> dict[str, Any]:
    """One valid event of ``kind`` captured at ``ts_us``."""
    e: dict[str, Any] = {"event_id": ids.uuid7_bytes(ts_us // 1000), "captured_at_us": ts_us,
                         "kind": kind, "button": "none", "screenshot_format": "none", "text_masked": False,
                         # Agents stamp the focused app (and page) on every event.
                         "app_id": TEST_APP, "url": TEST_URL}
    if kind in ("pointer_move", "click", "scroll"):
        e["x"], e["y"] = rng.randrange(1920), rng.randrange(1080)
    if kind == "click":
        e["button"], e["pressed"] = "left", rng.random() < 0.5
    if kind == "scroll":
        e["scroll_dy"] = rng.choice((-3, -1, 1, 3))
    if kind in ("key_down", "key_up"):
        e["key_code"] = rng.randrange(32, 127)
        e["text"] = chr(e["key_code"]) if kind == "key_down" else None
    if kind == "focus_change":
        e["window_title"] = "Docs"
    if kind == "screenshot":
        e["screenshot_sha256"] = rng.randbytes(32)
        e["screenshot_bytes"], e["screenshot_format"] = 20_000, "webp"
        e["screenshot_width"], e["screenshot_height"] = 960, 540
    return e


def make_batch(employee_id: str, n: int, *, seed: int = 0, t0_us: int | None = None,
               device_id: str | None = None, seq: int = 1, cohort: str = "default",
               version: int | None = None) -> tuple[bytes, list[bytes]]:
    """An encoded EventBatch of ``n`` events of all kinds; returns (payload, event ids)."""
    rng = random.Random(seed)
    t0 = t0_us if t0_us is not None else now_us() - 5_000_000
    events = [make_event(KINDS[i % len(KINDS)], t0 + i * 1000, rng) for i in range(n)]
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee_id,
              "device_id": device_id or f"dev-{employee_id}", "agent_version": "test",
              "os": "linux", "cohort": cohort, "seq": seq, "sent_at_us": t0 + n * 1000}
    return codec.encode_event_batch(header, events, version=version), [e["event_id"] for e in events]
