"""Shared test helpers, and the hook that marks every test under tests/integration.

``pytestmark`` in a conftest applies to nothing, so the ``integration`` marker is applied by path
here (issue #10): no test under tests/integration can miss it, whatever its module says. A test
elsewhere that asks for a fixture needing the real broker is refused at collection, so
``pytest -m "not integration"`` never starts one.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest

INTEGRATION_DIR = Path(__file__).resolve().parent / "integration"

BROKER_FIXTURES = frozenset({
    "kafka_bootstrap", "settings_factory", "stream_worker", "sink_factory", "fleet_exporter",
    "outage_broker",
})
"""Fixtures that start or need the real Kafka broker: integration tests only."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that the OS says is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def is_integration_path(path: Path) -> bool:
    """Whether a test file lives under tests/integration."""
    return path.resolve().is_relative_to(INTEGRATION_DIR)


def misplaced_broker_tests(items: Iterable[tuple[Path, str, Sequence[str]]]) -> list[str]:
    """Ids of tests outside tests/integration that use a broker fixture, from
    ``(path, nodeid, fixture names)`` triples."""
    return [f"{nodeid} uses {', '.join(sorted(BROKER_FIXTURES & set(names)))}"
            for path, nodeid, names in items
            if not is_integration_path(path) and BROKER_FIXTURES & set(names)]


def x11_first(items: list[pytest.Item]) -> None:
    """Run the X11 test files (``*x11*``) first, in place (stable). Xlib and pynput wait on the
    X connection with select(), which fails for a descriptor >= 1024; the embedded ClickHouse keeps
    descriptors of every data dir a test process opened, and by the end of the suite the lowest
    free descriptor was past 1024 (CI, 2026-12-02: 11 errors in test_x11_capture.py). The agent
    itself never opens ClickHouse, so this is a property of the test process, not of the product."""
    items.sort(key=lambda item: 0 if "x11" in item.path.name else 1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark tests/integration/** ``integration``; refuse broker fixtures anywhere else; X11 first."""
    x11_first(items)
    for item in items:
        if is_integration_path(item.path):
            item.add_marker(pytest.mark.integration)
    bad = misplaced_broker_tests((item.path, item.nodeid, getattr(item, "fixturenames", ()))
                                 for item in items)
    if bad:
        raise pytest.UsageError("tests outside tests/integration use the real broker; move them there:\n  "
                                + "\n  ".join(bad))


def pid_alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting for init to reap it)."""
    from pathlib import Path

    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def open_fds() -> int:
    """File descriptors open in this process (Linux)."""
    import os

    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def _fd_log(request: pytest.FixtureRequest) -> Iterator[None]:
    """With HANDTRACE_TEST_FD_LOG=<file>: one line per test with the descriptors it left open (a
    leak pushes later descriptors past 1024, where select()-based libraries such as Xlib fail)."""
    import os

    log = os.environ.get("HANDTRACE_TEST_FD_LOG")
    before = open_fds() if log else 0
    yield
    if log:
        after = open_fds()
        with open(log, "a") as f:
            f.write(f"{after - before:+d}\t{after}\t{request.node.nodeid}\n")
