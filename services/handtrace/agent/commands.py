"""``handtrace-agent``'s commands as a typer app (the entry point is handtrace/agent/cli.py, which
runs ``handtrace-agent run`` without it: handtrace/agent/runcmd.py).

The commands are the ones of ``handtrace`` an employee's laptop needs (run, consent, pause,
resume, status, exemption request, record, device-key), mounted from handtrace.cli without
importing any server module: importing this pulls typer, rich and pydantic, nothing of the
server stack (tests/unit/test_agent_slim.py).
"""

from __future__ import annotations

import typer

from handtrace import cli

# Plain tracebacks: rich's would need pygments, which the slim install leaves out (packaging/agent/slim.py).
app = typer.Typer(help="handtrace agent on this laptop: consent-first capture of computer use.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
app.command("run")(cli.agent_run)
app.command("consent")(cli.agent_consent)
app.command("device-key")(cli.agent_device_key)
app.command("pause")(cli.employee_pause)
app.command("resume")(cli.employee_resume)
app.command("status")(cli.employee_status)
app.add_typer(cli.employee_exemption_app, name="exemption")
app.add_typer(cli.record_app, name="record")

