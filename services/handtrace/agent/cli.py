"""``handtrace-agent``: the laptop's command line, and the slim distribution's only entry point
(packaging/agent, ADR 0019).

``handtrace-agent run`` -- the agent itself, resident for the whole session -- goes straight to
handtrace/agent/runcmd.py and never imports typer, click or rich (~7 MB of idle RSS, ADR 0021);
every other command (consent, pause, resume, status, exemption, record, device-key) is the typer
app of handtrace/agent/commands.py.
"""

from __future__ import annotations

import sys


def main() -> None:
    if sys.argv[1:2] == ["run"]:
        from handtrace.agent.runcmd import main as run_main

        sys.exit(run_main(sys.argv[2:]))
    from handtrace.agent.commands import app

    app()


if __name__ == "__main__":
    main()
