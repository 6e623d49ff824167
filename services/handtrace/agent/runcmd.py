"""``run``: the agent's long-running command, shared by ``handtrace-agent run`` and ``handtrace agent
run``, in plain text and without typer or rich.

The agent runs for the whole desktop session, so what its command line imports stays resident:
typer, click and rich, the full ``handtrace`` command tree and rich's markup rendering cost
~7 MB of the idle agent's RSS (docs/BENCHMARKS.md, the slim agent's .deb). ``handtrace-agent run``
therefore parses its three options here with argparse (which pydantic-settings loads anyway), and
every other command of the agent -- short-lived ones: consent, pause, status... -- stays a typer
command (handtrace/agent/cli.py). ``handtrace agent run`` (the full CLI) calls :func:`run` too,
so both print and exit alike; tests/unit/test_agent_runcmd.py keeps the two option lists in step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from handtrace.core.settings import Settings

# (flag, help): the options of `run`, the same in both command lines (typer's help in handtrace/cli.py).
OPTIONS = {
    "--employee": "Employee id (default HANDTRACE_AGENT__EMPLOYEE_ID).",
    "--source": "auto, x11, macos, windows or synthetic (default HANDTRACE_AGENT__SOURCE).",
    "--policy-file": "Policy JSON used until the control plane's arrives.",
}
HELP = "Run the endpoint agent on this laptop until Ctrl-C / SIGTERM (unsent data stays spooled)."


class RunExit(Exception):
    """The command ends with this exit code (its message is already printed)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def load_settings_or_exit(err: TextIO) -> Settings:
    """Settings from the environment; warns about HANDTRACE_* names that are no setting and, on
    invalid values, prints every problem (one line each) and exits 2."""
    from pydantic import ValidationError

    from handtrace.core.settings import load_settings, unknown_env_vars

    for name in unknown_env_vars():
        print(f"warning: {name} is not a handtrace setting (typo?); ignored", file=err)
    try:
        return load_settings()
    except ValidationError as e:
        print("error: invalid settings (environment HANDTRACE_*):", file=err)
        for problem in e.errors():
            loc = "__".join(str(p) for p in problem["loc"]).upper()
            print(f"  HANDTRACE_{loc}: {problem['msg']}", file=err)
        raise RunExit(2) from None


def run(employee: str | None = None, source: str | None = None, policy_file: Path | None = None, *,
        out: TextIO | None = None, err: TextIO | None = None) -> None:
    """Run the agent until SIGINT/SIGTERM; raises :class:`RunExit` on a refusal (1) or bad
    settings/options (2), after printing why on ``err``."""
    from pydantic import ValidationError

    from handtrace.agent.capture import CaptureUnavailable
    from handtrace.agent.runtime import AgentError
    from handtrace.agent.service import run_agent
    from handtrace.agent.spool import SpoolFormatError

    out = out or sys.stdout
    err = err or sys.stderr
    s = load_settings_or_exit(err)
    over = {k: v for k, v in {"employee_id": employee, "source": source, "policy_file": policy_file}.items()
            if v is not None}
    if over:
        try:
            s = s.model_copy(update={"agent": s.agent.model_validate({**s.agent.model_dump(), **over})})
        except ValidationError as e:
            print("error: " + "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in e.errors()), file=err)
            raise RunExit(2) from None

    def started(agent, sock):  # type: ignore[no-untyped-def]
        print(f"agent running for {agent.employee_id} on {agent.device_id} (source {agent.source.name}, "
              f"policy v{agent.local.version or '-- none: capturing nothing'}); control socket {sock}. "
              "`handtrace pause 15m` pauses, Ctrl-C stops.", file=out, flush=True)

    try:
        agent = run_agent(s, on_started=started)
    except CaptureUnavailable as e:
        print(f"error: {e}\n  (agent settings: HANDTRACE_AGENT__SOURCE={s.agent.source}, "
              "HANDTRACE_AGENT__DISPLAY; `--source synthetic` runs without a display)", file=err)
        raise RunExit(1) from None
    except (AgentError, SpoolFormatError) as e:
        print(f"error: {e}", file=err)
        raise RunExit(1) from None
    st = agent.status()
    print(f"stopped: {st.events_captured:,} events captured, {st.events_sent:,} sent, "
          f"{st.spool_events:,} waiting in the spool", file=out, flush=True)


def parser(prog: str = "handtrace-agent run") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=HELP)
    p.add_argument("--employee", default=None, help=OPTIONS["--employee"])
    p.add_argument("--source", default=None, help=OPTIONS["--source"])
    p.add_argument("--policy-file", type=Path, default=None, help=OPTIONS["--policy-file"])
    return p


def main(argv: list[str]) -> int:
    """``handtrace-agent run [OPTIONS]``; returns the exit code (argparse exits 2 on bad options)."""
    a = parser().parse_args(argv)
    try:
        run(a.employee, a.source, a.policy_file)
    except RunExit as e:
        return e.code
    return 0
