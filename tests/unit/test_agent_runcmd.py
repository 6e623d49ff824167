"""``handtrace-agent run`` without typer (handtrace/agent/runcmd.py, ADR 0021): the same options,
help and exit codes as ``handtrace agent run``, which calls the same function."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from handtrace import cli
from handtrace.agent import runcmd

ROOT = Path(__file__).resolve().parents[2]


def test_run_options_in_step_with_the_typer_command() -> None:
    """`handtrace-agent run` (argparse) and `handtrace agent run` (typer) take the same options,
    with the same help, defaults and types."""
    cmd = typer.main.get_command(cli.agent_app).commands["run"]  # type: ignore[attr-defined]
    typer_opts = {p.opts[0]: (p.help, p.default) for p in cmd.params}
    argparse_opts = {a.option_strings[0]: (a.help, a.default) for a in runcmd.parser()._actions
                     if a.option_strings and a.dest != "help"}
    assert typer_opts == argparse_opts == {k: (v, None) for k, v in runcmd.OPTIONS.items()}
    assert cmd.help == runcmd.HELP
    assert runcmd.parser().parse_args(["--policy-file", "p.json"]).policy_file == Path("p.json")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for k in [k for k in os.environ if k.startswith("HANDTRACE_")]:
        monkeypatch.delenv(k)
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.setenv("HANDTRACE_STATE_DIR", str(tmp_path))
    return tmp_path


def test_invalid_settings_exit_2_with_one_line_per_problem(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HANDTRACE_AGENT__SPOOL_MAX_MB", "lots")
    monkeypatch.setenv("HANDTRACE_AGENT__SOURCE", "amiga")
    monkeypatch.setenv("HANDTRACE_AGENT__SPOOLMAX", "1")
    assert runcmd.main([]) == 2
    err = capsys.readouterr().err
    assert "warning: HANDTRACE_AGENT__SPOOLMAX is not a handtrace setting" in err
    assert "error: invalid settings" in err
    assert "  HANDTRACE_AGENT__SPOOL_MAX_MB: " in err and "  HANDTRACE_AGENT__SOURCE: " in err


def test_bad_option_values_exit_2(clean_env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert runcmd.main(["--source", "amiga"]) == 2
    assert "error: source: Input should be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse: unknown option
        runcmd.main(["--sauce", "x11"])
    assert e.value.code == 2


def test_refusals_exit_1_with_a_one_line_error(clean_env: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert runcmd.main([]) == 1  # no employee id
    assert capsys.readouterr().err.startswith("error: no employee id: set HANDTRACE_AGENT__EMPLOYEE_ID")
    monkeypatch.setenv("HANDTRACE_AGENT__REQUIRE_CONSENT", "true")  # as the .deb's launcher sets it
    assert runcmd.main(["--employee", "e-1", "--source", "x11",
                        "--policy-file", str(ROOT / "deploy" / "policy.example.json")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "handtrace-agent consent" in err and len(err.splitlines()) == 1
    assert not (clean_env / "agent" / "spool").exists()  # refused before anything was opened


def test_full_cli_run_exits_alike(clean_env: Path) -> None:
    r = CliRunner().invoke(cli.app, ["agent", "run", "--source", "amiga"])
    assert r.exit_code == 2 and "error: source: Input should be" in r.output
    r = CliRunner().invoke(cli.app, ["agent", "run"])
    assert r.exit_code == 1 and "no employee id" in r.output
