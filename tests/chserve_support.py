"""Tests that run a separate process owning an embedded data dir (as the sink does) and talk to
it through the endpoint it serves (core/chserve.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

from handtrace.core import chserve


def wait_served(owner: subprocess.Popen[Any], data: Path, timeout_s: float = 120) -> None:
    """Until ``owner`` serves ``data`` (its endpoint file exists); fails with the owner's stderr
    when it died first, or after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not (data / chserve.ENDPOINT_FILE).exists():
        if owner.poll() is not None:
            err = owner.stderr.read().decode(errors="replace")[-3000:] if owner.stderr else ""
            raise AssertionError(f"the owner died: {err}")
        assert time.monotonic() < deadline, f"the owner did not serve within {timeout_s:.0f} s"
        time.sleep(0.2)
