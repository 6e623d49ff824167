"""Unique, time-ordered ids (UUIDv7, RFC 9562) for events, batches and controls."""

from __future__ import annotations

import os
import threading
import uuid
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy is imported where arrays are made: the agent never pays for it
    import numpy as np

_lock = threading.Lock()
_last_ms = 0
_counter = 0


def uuid7_bytes(ts_ms: int | None = None) -> bytes:
    """One UUIDv7 as 16 bytes; monotonic within a process (12-bit counter in rand_a)."""
    global _last_ms, _counter
    from handtrace.core.clock import now_us

    ms = ts_ms if ts_ms is not None else now_us() // 1000
    with _lock:
        if ms <= _last_ms:
            ms = _last_ms
            _counter += 1
            if _counter > 0xFFF:  # counter exhausted: borrow the next millisecond
                ms += 1
                _counter = 0
        else:
            _counter = 0
        _last_ms = ms
        counter = _counter
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | counter << 64 | 0b10 << 62 | rand
    return value.to_bytes(16, "big")


def uuid7() -> uuid.UUID:
    """One UUIDv7 as a uuid.UUID."""
    return uuid.UUID(bytes=uuid7_bytes())


def uuid7_array(ts_us: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """UUIDv7 for many timestamps at once: returns an (n, 16) uint8 array, one id per row.

    Vectorised for the simulator and benchmarks; ids from the same millisecond are ordered by
    their position (a per-row sequence in rand_a), and 62 random bits make them unique.
    """
    import numpy as np

    rng = rng or np.random.default_rng()
    n = len(ts_us)
    ms = (np.asarray(ts_us, dtype=np.int64) // 1000).astype(np.uint64)
    seq = (np.arange(n, dtype=np.uint64) & np.uint64(0xFFF))
    hi = (ms << np.uint64(16)) | np.uint64(0x7000) | seq
    lo = rng.integers(0, 1 << 62, size=n, dtype=np.uint64) | np.uint64(0b10 << 62)
    out = np.empty((n, 2), dtype=">u8")
    out[:, 0] = hi
    out[:, 1] = lo
    return out.view(np.uint8).reshape(n, 16)


def uuid_str(raw: bytes) -> str:
    """Canonical text form of 16 id bytes."""
    return str(uuid.UUID(bytes=raw))
