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


# ------------------------------------------------------------------ demonstrations (issue #11)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DEMO_KINDS = ("focus_change", "click", "pointer_move", "key_down", "key_up", "scroll")


def frame_image(seed: int, fmt: str = "png", size: int = 256) -> bytes:
    """Bytes that start like an encoded ``fmt`` image (the stream checks the magic, not pixels)."""
    body = random.Random(seed).randbytes(size)
    if fmt == "webp":
        return b"RIFF" + (size + 4).to_bytes(4, "little") + b"WEBP" + body
    return PNG_MAGIC + body


def demo_frame(captured_at_us: int, windows: tuple[tuple[str | None, str | None], ...] = ((TEST_APP, TEST_URL),),
               *, fmt: str = "png", seed: int = 0, step: int = 0, reason: str = "click",
               size: int = 256) -> dict[str, Any]:
    """One manifest entry (demonstration/v1 Frame) with its image under ``image``."""
    import hashlib

    image = frame_image(seed, fmt, size)
    return {"image": image, "sha256": hashlib.sha256(image).digest(), "format": fmt, "bytes": len(image),
            "width": 1920, "height": 1080, "step": step, "reason": reason, "captured_at_us": captured_at_us,
            "action_started_at_us": None if reason == "end" else captured_at_us + 1000, "action_event_id": None,
            "windows": [{"app_id": a, "url": u, "x": 10 * i, "y": 0, "width": 800, "height": 600}
                        for i, (a, u) in enumerate(windows)],
            "filled": [{"x": 800, "y": 0, "width": 1120, "height": 1080}]}


def make_demonstration(employee_id: str, frames: list[dict[str, Any]], *, t0_us: int, n_events: int = 30,
                       instruction: str = "file the travel expense for the Berlin trip",
                       device_id: str | None = None, demo_id: bytes | None = None, span_us: int = 60_000_000,
                       apps: tuple[str, ...] = (TEST_APP,), fast: bool = True,
                       events: list[dict[str, Any]] | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """A demonstration header message (value, headers) as the agent uploads it: ``n_events``
    valid events spread over [t0, t0 + span), the manifest ``frames``; ``fast``: events as one
    size-prefixed block (encode_event_batch), else fastavro's generic encoding (encode_record)."""
    rng = random.Random(7)
    if events is None:
        step = span_us // max(n_events, 1)
        events = [make_event(DEMO_KINDS[i % len(DEMO_KINDS)], t0_us + i * step, rng) for i in range(n_events)]
    demo_id = demo_id or ids.uuid7_bytes(t0_us // 1000)
    sent = t0_us + span_us + 1_000_000
    header = {"demonstration_id": demo_id, "employee_id": employee_id, "device_id": device_id or f"dev-{employee_id}",
              "agent_version": "test", "os": "linux", "cohort": "default", "instruction": instruction,
              "started_at_us": t0_us, "ended_at_us": t0_us + span_us, "sent_at_us": sent, "consent_version": "1",
              "policy_version": 1, "screen": {"width": 1920, "height": 1080, "scale": 1.0}, "apps": list(apps),
              "frames": [{k: v for k, v in f.items() if k != "image"} for f in frames]}
    if fast:
        payload = codec.encode_event_batch(header, events, subject="demonstration")
    else:
        payload = codec.encode_record("demonstration", {**header, "events": events})
    headers = [("ht-part", b"demonstration"), ("ht-demo-id", demo_id), ("ht-sent-at", str(sent).encode()),
               ("ht-frames", str(len(frames)).encode())]
    return payload, headers


def frame_message(frame: dict[str, Any], demo_id: bytes, device_id: str,
                  sent_at_us: int | None = None) -> tuple[bytes, list[tuple[str, bytes]]]:
    """The frame message (value, headers) of one manifest entry, as the agent uploads it."""
    import json

    windows = [[w["app_id"], w["url"]] for w in frame["windows"]]
    return frame["image"], [
        ("ht-part", b"frame"), ("ht-demo-id", demo_id),
        ("ht-sent-at", str(sent_at_us or frame["captured_at_us"] + 90_000_000).encode()),
        ("ht-sha256", frame["sha256"].hex().encode()), ("ht-format", frame["format"].encode()),
        ("ht-captured-at-us", str(frame["captured_at_us"]).encode()), ("ht-device-id", device_id.encode()),
        ("ht-windows", json.dumps(windows).encode())]
