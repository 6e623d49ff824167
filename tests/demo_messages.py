"""Accepted demonstration messages as the stream publishes them (docs/design/demonstrations.md,
"In the stream"): a header (Arrow IPC events + ``ht-demo`` JSON) and one message per frame.
Shared by the unit and integration tests of the sink's demonstration writer."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from handtrace.core.rows import STORED_SCHEMA, to_ipc

Headers = list[tuple[str, bytes]]

T0_US = 1_790_000_000_000_000  # 2026-09


@dataclass
class DemoMessages:
    """One demonstration on the accepted topic."""

    demo_id: bytes
    employee_key: str
    header: tuple[Headers, bytes]
    frames: list[tuple[Headers, bytes]]
    event_ids: list[bytes]
    meta: dict[str, Any]

    @property
    def shas(self) -> list[str]:
        return [f["sha256"] for f in self.meta["frames"]]


def events_ipc(employee_key: str, device_key: str, n: int, rng: random.Random,
               source_offset: int, t0_us: int = T0_US) -> tuple[bytes, list[bytes]]:
    """``n`` enforced events of one person as STORED_SCHEMA Arrow IPC."""
    ids = [rng.randbytes(16) for _ in range(n)]
    cols: dict[str, Any] = {f.name: [None] * n for f in STORED_SCHEMA}
    cols.update({
        "event_id": ids, "batch_id": [rng.randbytes(16)] * n, "employee_key": [employee_key] * n,
        "device_key": [device_key] * n, "kind": ["click"] * n,
        "captured_at": [t0_us + i * 1000 for i in range(n)], "received_at": [t0_us + 10**6] * n,
        "x": [rng.randrange(1000) for _ in range(n)], "y": [rng.randrange(800) for _ in range(n)],
        "button": ["left"] * n, "pressed": [True] * n, "text_masked": [False] * n,
        "app_id": ["org.gnome.TextEditor"] * n, "screenshot_format": [""] * n,
        "agent_version": ["0.1.0"] * n, "os": ["linux"] * n, "source_partition": [0] * n,
        "source_offset": [source_offset] * n,
    })
    return to_ipc(pa.table(cols, schema=STORED_SCHEMA)), ids


def make_demo(employee_key: str, n_frames: int, n_events: int = 5, *, seed: int = 0,
              frame_bytes: int = 2000, instruction: str = "file the travel expense",
              images: list[bytes] | None = None, t0_us: int = T0_US, cohort: str = "",
              apps: tuple[str, ...] = ("org.gnome.TextEditor",), link_frames: bool = False) -> DemoMessages:
    """A demonstration of ``n_frames`` distinct frames (``images``: real encoded ones; default
    bytes that only start like a PNG) and ``n_events`` click events, starting at ``t0_us``.
    ``link_frames``: frame i is grabbed just before event i and chosen for it (as the agent's
    frame of an action start), the last one is the end frame."""
    rng = random.Random(seed)  # noqa: S311 -- test data
    demo_id = rng.randbytes(16)
    device_key = f"dev_{employee_key}"
    value, ids = events_ipc(employee_key, device_key, n_events, rng, source_offset=seed, t0_us=t0_us)
    if images is None:
        images = [b"\x89PNG\r\n\x1a\n" + rng.randbytes(frame_bytes) for _ in range(n_frames)]
    assert len(images) == n_frames
    frames = [{
        "sha256": hashlib.sha256(img).hexdigest(), "format": "png", "bytes": len(img), "width": 1280,
        "height": 800, "step": i, "reason": "click" if i < n_frames - 1 else "end",
        "captured_at_us": t0_us + i * 1000 - 100 if link_frames else t0_us + i * 500_000,
        "action_started_at_us": (None if i == n_frames - 1 else t0_us + i * 1000) if link_frames
        else t0_us + i * 500_000 + 100,
        "action_event_id": ids[i % len(ids)].hex() if ids else None,
        "windows": [{"app_id": "org.gnome.TextEditor", "url": None, "x": 0, "y": 0, "width": 800, "height": 600}],
        "filled": [{"x": 800, "y": 0, "width": 480, "height": 800}],
    } for i, img in enumerate(images)]
    meta = {
        "demonstration_id": demo_id.hex(), "employee_key": employee_key, "device_key": device_key,
        "instruction": instruction, "started_at_us": t0_us, "ended_at_us": t0_us + n_frames * 500_000,
        "sent_at_us": t0_us + 9 * 10**6, "received_at_us": t0_us + 10 * 10**6, "consent_version": "1",
        "policy_version": "7", "agent_version": "0.1.0", "os": "linux",
        "screen": {"width": 1280, "height": 800, "scale": 1.0}, "apps": list(apps), "cohort": cohort,
        "frames": frames, "frames_dropped": {"not_allowlisted": 1}, "events_dropped": {},
    }
    header: Headers = [("ht-part", b"demonstration"), ("ht-demo-id", demo_id),
                       ("ht-employee-key", employee_key.encode()), ("ht-device-key", device_key.encode()),
                       ("ht-source-offset", str(seed).encode()), ("ht-demo", json.dumps(meta).encode())]
    frame_msgs = [([("ht-part", b"frame"), ("ht-demo-id", demo_id), ("ht-employee-key", employee_key.encode()),
                    ("ht-sha256", f["sha256"].encode()), ("ht-format", b"png"),
                    ("ht-source-offset", str(seed + 1 + i).encode())], img)
                  for i, (f, img) in enumerate(zip(frames, images, strict=True))]
    return DemoMessages(demo_id, employee_key, (header, value), frame_msgs, ids, meta)
