"""A real agent process (`handtrace agent run`, synthetic capture) and the control-plane API over
the real broker, for the propagation test and benchmark (docs/design/control-plane.md part D):
what the agent applied is read from its local status socket, as `handtrace status` does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from handtrace.agent.localsock import AgentNotRunning, request
from handtrace.control.api.app import create_app
from handtrace.control.api.services import kafka_services
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings, settings_env
from tests.unit.api_support import bearer, mint


class AgentProcess:
    """`python -m handtrace.cli agent run` for one employee, with its own state dir (spool,
    control-plane cache, socket) that survives a stop: a restart is the same laptop."""

    def __init__(self, settings: Settings, employee_id: str, state_dir: Path, *, batch_interval_s: float) -> None:
        agent = settings.agent.model_validate({
            **settings.agent.model_dump(), "employee_id": employee_id, "device_id": f"dev-{employee_id}",
            "source": "synthetic", "screenshots": False, "batch_interval_s": batch_interval_s,
            "battery_batch_interval_s": batch_interval_s})
        self.settings = settings.model_copy(update={"state_dir": state_dir, "agent": agent})
        self.employee_id = employee_id
        self.socket = state_dir / "agent" / "agent.sock"
        self.log = state_dir / "agent.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the agent (returns at once; its socket answers soon after)."""
        state = Path(self.settings.state_dir)
        state.mkdir(parents=True, exist_ok=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")},
               **settings_env(self.settings)}
        with open(self.log, "ab") as out:
            self.proc = spawn_owned([sys.executable, "-m", "handtrace.cli", "agent", "run"], env=env,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def status(self) -> dict[str, Any] | None:
        """The agent's status (mode, policy_version, events_captured, ...), None when not answering."""
        try:
            reply = request(self.socket, {"cmd": "status"}, timeout_s=2.0)
        except (AgentNotRunning, OSError, ValueError):
            return None
        return reply.get("status") if reply.get("ok") else None

    def stop(self) -> None:
        """SIGTERM (everything unsent stays in the spool), then kill if it does not end."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-30:]) if self.log.exists() else ""


@dataclass(frozen=True)
class Sent:
    """When a change was requested and when the API answered 202 (time.monotonic()): the API
    publishes (acks=all) and then reads the state for its audit entry before answering, so a fast
    consumer may apply the change before the 202."""

    requested: float
    accepted: float


@dataclass
class Api:
    """The control-plane API app in this process over the real topics (kafka_services)."""

    client: TestClient

    @classmethod
    def of(cls, settings: Settings) -> Api:
        """The app started (its lifespan entered): call :meth:`close` when done."""
        client = TestClient(create_app(settings, kafka_services(settings)))
        client.__enter__()
        return cls(client)

    def close(self) -> None:
        """Shut the app down: its consumers and producers go (before the broker does)."""
        self.client.__exit__(None, None, None)

    def set_allowlist(self, apps: list[str], domains: list[str]) -> Sent:
        """Security replaces the allowlists."""
        t = time.monotonic()
        r = self.client.put("/api/v1/policy/allowlist", headers=bearer(mint("sec-1", ["security"])),
                            json={"allowed_apps": apps, "allowed_domains": domains, "reason": "propagation"})
        assert r.status_code == 202, r.text
        return Sent(t, time.monotonic())

    def set_sampling(self, rates: dict[str, float]) -> Sent:
        """Ops replaces the sampling rates."""
        t = time.monotonic()
        r = self.client.put("/api/v1/policy/sampling", headers=bearer(mint("ops-1", ["ops"])),
                            json={"rates": rates, "reason": "propagation"})
        assert r.status_code == 202, r.text
        return Sent(t, time.monotonic())

    def grant(self, employee_id: str) -> Sent:
        """HR grants an exemption."""
        t = time.monotonic()
        r = self.client.post(f"/api/v1/exemptions/{employee_id}/grant", headers=bearer(mint("hr-1", ["hr"])),
                             json={"reason": "propagation"})
        assert r.status_code == 202, r.text
        return Sent(t, time.monotonic())

    def revoke(self, employee_id: str) -> Sent:
        """HR revokes an exemption."""
        t = time.monotonic()
        r = self.client.post(f"/api/v1/exemptions/{employee_id}/revoke", headers=bearer(mint("hr-1", ["hr"])),
                             json={"reason": "propagation"})
        assert r.status_code == 202, r.text
        return Sent(t, time.monotonic())

    def policy_version(self) -> int:
        r = self.client.get("/api/v1/policy", headers=bearer(mint("sec-1", ["security"])))
        assert r.status_code == 200, r.text
        return int(r.json()["version"])


def first_held(predicates: dict[str, Callable[[], Any]], timeout_s: float,
               poll_s: float = 0.05) -> dict[str, float | None]:
    """Poll every predicate (in one loop, so one slow observer does not delay another's time)
    until all held; name -> time.monotonic() when it first held, None if not within ``timeout_s``."""
    held: dict[str, float | None] = dict.fromkeys(predicates)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(v is None for v in held.values()):
        for name, pred in predicates.items():
            if held[name] is None and pred():
                held[name] = time.monotonic()
        time.sleep(poll_s)
    return held
