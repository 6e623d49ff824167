"""The `handtrace` command: one entry point, one subcommand group per service."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Column, Table

from handtrace.agent.runcmd import OPTIONS as RUN_OPTIONS

if TYPE_CHECKING:
    from collections.abc import Callable

    from handtrace.core.framestore import FrameStore
    from handtrace.core.settings import Settings

app = typer.Typer(help="handtrace: consent-first capture of computer-use activity.",
                  no_args_is_help=True, add_completion=False)
kafka_app = typer.Typer(help="The local development Kafka broker (KRaft, 127.0.0.1).", no_args_is_help=True)
topics_app = typer.Typer(help="Kafka topics.", no_args_is_help=True)
stream_app = typer.Typer(help="Faust stream processors.", no_args_is_help=True)
sink_app = typer.Typer(help="The ClickHouse sink.", no_args_is_help=True)
agent_app = typer.Typer(help="The endpoint agent and the simulated fleet.", no_args_is_help=True)
schemas_app = typer.Typer(help="The Avro contracts in schemas/.", no_args_is_help=True)
control_app = typer.Typer(help="Controls: pauses and exemptions (HR, employees), policy (ops).",
                          no_args_is_help=True)
exemption_app = typer.Typer(help="Exemptions from capture.", no_args_is_help=True)
policy_app = typer.Typer(help="The global capture policy.", no_args_is_help=True)
device_app = typer.Typer(help="Laptops whose own key may pause and resume capture for one employee.",
                         no_args_is_help=True)
control_app.add_typer(exemption_app, name="exemption")
control_app.add_typer(policy_app, name="policy")
app.add_typer(policy_app, name="policy", help="The global capture policy (also `handtrace control policy`): "
              "`handtrace policy history` shows every change and refusal from the audit trail.")
control_app.add_typer(device_app, name="device")
app.add_typer(control_app, name="control")
app.add_typer(kafka_app, name="kafka")
app.add_typer(topics_app, name="topics")
app.add_typer(stream_app, name="stream")
app.add_typer(sink_app, name="sink")
app.add_typer(agent_app, name="agent")
app.add_typer(schemas_app, name="schemas")
api_app = typer.Typer(help="The control-plane HTTP API and portal.", no_args_is_help=True)
app.add_typer(api_app, name="api")

console = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    from handtrace.core.settings import load_settings, unknown_env_vars

    for name in unknown_env_vars():
        err.print(f"[yellow]warning:[/] {name} is not a handtrace setting (typo?); ignored")
    try:
        return load_settings()
    except ValidationError as e:
        err.print("[red]error:[/] invalid settings (environment HANDTRACE_*):")
        for problem in e.errors():
            loc = "__".join(str(p) for p in problem["loc"]).upper()
            err.print(f"  HANDTRACE_{loc}: {problem['msg']}")
        raise typer.Exit(2) from None


def _fail(msg: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/] {msg}")
    return typer.Exit(code)


@app.command()
def demo(
    agents: Annotated[int, typer.Option(min=1, max=5000, help="Simulated agents (laptops).")] = 200,
    duration: Annotated[float, typer.Option(min=1, help="Seconds the fleet produces.")] = 30.0,
    speedup: Annotated[float, typer.Option(min=1, help="Simulated seconds per wall second.")] = 10.0,
    batch_interval: Annotated[float, typer.Option(min=0.1, help="Seconds of activity per batch.")] = 2.0,
    policy: Annotated[Path | None, typer.Option(help="Policy JSON to publish first "
                                                "(default deploy/policy.example.json).")] = None,
) -> None:
    """Run the whole pipeline on this machine and print what landed in ClickHouse."""
    import signal

    from handtrace.control.publish import ControlError
    from handtrace.core.clickhouse import ClickHouseLocked
    from handtrace.core.localbroker import BrokerError
    from handtrace.demo import DEFAULT_POLICY, run_demo

    # SIGTERM (e.g. `timeout`, a supervisor) cleans up like Ctrl-C: no orphaned broker or worker.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # The demo is development by definition: its control-plane key pair (and other secrets) are
    # generated under the state dir, and the worker it starts (same environment) uses them.
    os.environ.setdefault("HANDTRACE_DEV_MODE", "true")
    s = _settings()
    try:
        r = run_demo(s, agents=agents, duration_s=duration, speedup=speedup,
                     batch_interval_s=batch_interval, console=console, policy_path=policy or DEFAULT_POLICY)
    except KeyboardInterrupt:
        err.print("[yellow]interrupted: everything the demo started was stopped[/]")
        raise typer.Exit(130) from None
    except (BrokerError, ClickHouseLocked, ControlError) as e:
        raise _fail(str(e)) from None
    d = Table(title=f"stream decisions (policy {r.policy_path.name})")
    d.add_column("decision")
    d.add_column("events", justify="right")
    for decision, n in sorted(r.decisions.items(), key=lambda kv: -kv[1]):
        d.add_row(decision, f"{n:,}")
    console.print(d)
    t = Table(title="what landed in ClickHouse (this run)")
    t.add_column("event kind")
    t.add_column("rows", justify="right")
    for kind, n in sorted(r.rows_by_kind.items()):
        t.add_row(kind, f"{n:,}")
    t.add_row("[bold]total", f"[bold]{r.events_stored:,}")
    console.print(t)
    accounted = sum(r.decisions.values())
    console.print(f"events produced:     {r.events_produced:,}  (stored {r.events_stored:,}, "
                  f"{accounted - r.decisions.get('stored', 0):,} dropped by policy, "
                  f"{r.deadlettered} dead-lettered messages in the topic)")
    console.print(f"bytes/event:         {r.payload_bytes_per_event:.1f} Avro payload, "
                  f"{r.wire_bytes_per_event:.1f} on the wire (zstd, incl. Kafka framing)")
    console.print(f"throughput:          {r.events_produced / r.produce_seconds:,.0f} events/s produced; "
                  f"{r.events_stored / r.total_seconds:,.0f} events/s stored, first batch to drained "
                  f"({r.total_seconds:.1f}s)")
    if accounted != r.events_produced or r.events_stored != r.decisions.get("stored", 0):
        raise _fail(f"events unaccounted for: produced {r.events_produced:,}, decided {accounted:,}, "
                    f"stored {r.events_stored:,} vs {r.decisions.get('stored', 0):,} accepted (see the "
                    "stream worker log and the dead-letter topic)")


@kafka_app.command("up")
def kafka_up() -> None:
    """Provision (first time, via Maven) and start the local broker."""
    from handtrace.core.localbroker import BrokerError
    from handtrace.demo import local_broker

    b = local_broker(_settings())
    try:
        started = b.start()
    except BrokerError as e:
        raise _fail(str(e)) from None
    state = "started" if started else "already running"
    console.print(f"kafka {state} at {b.bootstrap} (pid {b.pid()}, data {b.data_dir})")


@kafka_app.command("down")
def kafka_down() -> None:
    """Stop the local broker (and its whole process group)."""
    from handtrace.demo import local_broker

    console.print("kafka stopped" if local_broker(_settings()).stop() else "kafka was not running")


@kafka_app.command("status")
def kafka_status() -> None:
    """Is the local broker running? Exit 1 if not."""
    from handtrace.demo import local_broker

    b = local_broker(_settings())
    pid = b.pid()
    console.print(f"kafka running at {b.bootstrap} (pid {pid})" if pid else "kafka not running")
    if not pid:
        raise typer.Exit(1)


@topics_app.command("create")
def topics_create() -> None:
    """Create every handtrace topic (idempotent; checks partition counts of existing ones and sets
    their retention.ms from the retention policy)."""
    from handtrace.core.admin import TopicError, ensure_topics

    s = _settings()
    try:
        created = ensure_topics(s.kafka, s.topics, retention=s.warehouse.retention)
    except TopicError as e:
        raise _fail(str(e)) from None
    console.print(f"created: {', '.join(created) or 'nothing (all exist)'}")


@topics_app.command("list")
def topics_list() -> None:
    """The topics handtrace uses, with partitions and configs."""
    from handtrace.core.topics import topic_specs

    s = _settings()
    t = Table("topic", "partitions", "configs", "purpose")
    for spec in topic_specs(s.topics, s.demo, s.warehouse.retention):
        t.add_row(spec.name, str(spec.partitions), ", ".join(f"{k}={v}" for k, v in spec.configs.items()), spec.doc)
    console.print(t)


@stream_app.command("worker")
def stream_worker() -> None:
    """Run one Faust stream worker (until SIGTERM/SIGINT)."""
    from handtrace.core.signing import KeyConfigError
    from handtrace.stream.app import main

    try:
        main()
    except KeyConfigError as e:  # no control-plane public keys outside dev mode (ADR 0009)
        raise _fail(str(e)) from None


@sink_app.command("run")
def sink_run() -> None:
    """Run the ClickHouse sink (owns the embedded data dir while it runs)."""
    from handtrace.core.chserve import EndpointConfigError
    from handtrace.core.clickhouse import ClickHouseLocked
    from handtrace.sink.service import main

    try:
        main()
    except ClickHouseLocked as e:
        raise _fail(str(e)) from None
    except EndpointConfigError as e:
        raise _fail(str(e), 2) from None


@agent_app.command("simulate")
def agent_simulate(
    agents: Annotated[int, typer.Option(min=1, max=5000)] = 50,
    duration: Annotated[float, typer.Option(min=1)] = 30.0,
    speedup: Annotated[float, typer.Option(min=1)] = 1.0,
    batch_interval: Annotated[float, typer.Option(min=0.1)] = 2.0,
    seed: int = 0,
) -> None:
    """Produce a simulated fleet's batches and heartbeats to Kafka."""
    from handtrace.agent.simulator import SimulatedFleet

    fleet = SimulatedFleet(_settings(), agents, speedup=speedup, batch_interval_s=batch_interval, seed=seed)
    with console.status("producing ...") as status:
        stats = fleet.run(duration, on_progress=lambda s: status.update(
            f"producing: {s.events:,} events in {s.batches:,} batches, {s.delivered:,} delivered"))
    console.print(f"{stats.events:,} events in {stats.batches:,} batches; {stats.delivered:,} delivered, "
                  f"{stats.failed} failed; {stats.wire_bytes / max(stats.events, 1):.1f} wire bytes/event")
    if stats.failed:
        raise typer.Exit(1)


@agent_app.command("run")
def agent_run(
    employee: Annotated[str | None, typer.Option(help=RUN_OPTIONS["--employee"])] = None,
    source: Annotated[str | None, typer.Option(help=RUN_OPTIONS["--source"])] = None,
    policy_file: Annotated[Path | None, typer.Option(help=RUN_OPTIONS["--policy-file"])] = None,
) -> None:
    """Run the endpoint agent on this laptop until Ctrl-C / SIGTERM (unsent data stays spooled)."""
    # The same command as `handtrace-agent run` (plain text, no rich: agent/runcmd.py).
    from handtrace.agent.runcmd import RunExit, run

    try:
        run(employee, source, policy_file)
    except RunExit as e:
        raise typer.Exit(e.code) from None


@agent_app.command("device-key")
def agent_device_key() -> None:
    """This laptop's device id and public key, for enrollment by the control plane (the key is
    generated here on first use and never leaves the laptop)."""
    from handtrace.agent.service import device_id_of, device_key_path
    from handtrace.core.signing import load_or_create_key, public_key_b64

    s = _settings()
    key = load_or_create_key(device_key_path(s))
    device = device_id_of(s)
    pub = public_key_b64(key)
    console.print(f"device id:  {device}\npublic key: {pub}")
    console.print(f"enroll it:  handtrace control device enroll EMPLOYEE {device} {pub} --actor YOU --reason ...",
                  soft_wrap=True)


@agent_app.command("consent")
def agent_consent(
    withdraw: Annotated[bool, typer.Option("--withdraw", help="Withdraw it: delete the record; the "
                                           "agent stops and no longer starts on this laptop.")] = False,
    show: Annotated[bool, typer.Option("--show", help="Only show what is captured and whether "
                                       "consent is recorded; change nothing.")] = False,
) -> None:
    """Show what the agent captures on this laptop and record the employee's acceptance (asked
    interactively; the packaged agent starts only after it: docs/agent-rollout.md)."""
    import shutil
    import subprocess

    from handtrace.agent.consent import (
        ConsentError,
        consent_path,
        consent_text,
        read_consent,
        record_consent,
        withdraw_consent,
    )
    from handtrace.agent.service import device_id_of

    s = _settings()
    systemctl = shutil.which("systemctl") if os.environ.get("HANDTRACE_AGENT_SYSTEMD") == "1" else None
    if withdraw:
        had = withdraw_consent(s)
        if systemctl:
            subprocess.run([systemctl, "--user", "stop", "handtrace-agent.service"], check=False)
        console.print("consent withdrawn: the agent does not capture on this laptop any more"
                      if had else "no consent was recorded on this laptop; nothing captured")
        return
    text = consent_text(s)
    console.print(text, markup=False, highlight=False, soft_wrap=True)
    try:
        c = read_consent(s)
        console.print(f"consent recorded for {c.employee_id} ({consent_path(s)})")
        if show:
            return
    except ConsentError as e:
        if show:
            console.print(str(e))
            return
    if not s.agent.employee_id:
        raise _fail("no employee id: set HANDTRACE_AGENT__EMPLOYEE_ID (ask IT)", 2)
    if not sys.stdin.isatty() and os.environ.get("HANDTRACE_CONSENT_STDIN") != "1":
        raise _fail("consent is asked interactively: run `handtrace-agent consent` in a terminal", 2)
    answer = typer.prompt("Type yes to accept, anything else to decline", default="", show_default=False)
    if answer.strip().lower() != "yes":
        console.print("declined: nothing is captured on this laptop")
        raise typer.Exit(1)
    c = record_consent(s, text, device_id=device_id_of(s))
    console.print(f"consent recorded for {c.employee_id} ({consent_path(s)})")
    if systemctl:
        subprocess.run([systemctl, "--user", "start", "handtrace-agent.service"], check=False)
        console.print("the agent is starting (`handtrace-agent status` shows what it captures)")


def _parse_duration(text: str) -> float:
    """Minutes from `15`, `15m`, `90s`, `0.5h`."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", text)
    if not m:
        raise _fail(f"cannot read duration {text!r}: use e.g. 15m, 90s or 0.5h (at most 30 minutes)", 2)
    value, unit = float(m.group(1)), m.group(2) or "m"
    return value / 60 if unit == "s" else value * 60 if unit == "h" else value


def _agent_request(req: dict[str, Any]) -> dict[str, Any]:
    from handtrace.agent.localsock import AgentNotRunning, request
    from handtrace.agent.service import socket_path

    try:
        reply = request(socket_path(_settings()), req)
    except AgentNotRunning as e:
        raise _fail(str(e)) from None
    if not reply.get("ok"):
        raise _fail(reply.get("error", "the agent refused"))
    return reply


@app.command("pause")
def employee_pause(
    duration: Annotated[str, typer.Argument(help="How long: 15m, 90s, 0.5h (at most 30 minutes).")] = "15m",
    reason: Annotated[str, typer.Option(help="Optional note (kept with the pause record).")] = "",
) -> None:
    """Pause capture on this laptop now; it resumes by itself at the end."""
    from datetime import datetime

    reply = _agent_request({"cmd": "pause", "minutes": _parse_duration(duration), "reason": reason})
    until = datetime.fromtimestamp(reply["until_us"] / 1e6).strftime("%H:%M:%S")
    console.print(f"capture paused until {until}; nothing is recorded until then (`handtrace resume` ends it early)")


@app.command("resume")
def employee_resume() -> None:
    """End the current pause now."""
    _agent_request({"cmd": "resume"})
    console.print("capture resumed")


@app.command("status")
def employee_status(as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False) -> None:
    """What the agent on this laptop is doing: capturing, paused (until when) or exempt."""
    from datetime import datetime

    st = _agent_request({"cmd": "status"})["status"]
    if as_json:
        console.print_json(json.dumps(st))
        return
    mode = st["mode"]
    if mode == "paused":
        until = datetime.fromtimestamp(st["paused_until_us"] / 1e6).strftime("%H:%M:%S")
        console.print(f"[yellow]paused[/] until {until} (resumes by itself)")
    elif mode == "exempt":
        console.print("[green]exempt[/]: capture is off on this laptop (an exemption was granted)")
    else:
        app_txt = st["focused_app"] or "no window"
        verdict = "captured" if st["focused_allowed"] else "not captured (not on the allowlist)"
        console.print(f"[bold]capturing[/] work apps only; focused: {app_txt} -> {verdict}")
    if st["exemption_requested"] and mode != "exempt":
        console.print("exemption requested; waiting for HR")
    dropped = ", ".join(f"{k} {v:,}" for k, v in sorted(st["events_dropped"].items())) or "none"
    console.print(f"policy v{st['policy_version']}; {st['events_captured']:,} events seen, {st['events_sent']:,} "
                  f"sent, {st['spool_events']:,} waiting; not kept: {dropped}")
    _print_demo_status(st.get("demonstrations"))


employee_exemption_app = typer.Typer(help="Ask for an exemption from capture (HR decides).", no_args_is_help=True)
app.add_typer(employee_exemption_app, name="exemption")


@employee_exemption_app.command("request")
def employee_exemption_request(
    reason: Annotated[str, typer.Option(help="Why (shown to HR only).")],
) -> None:
    """Send an exemption request from this laptop's agent; capture stops once HR grants it."""
    _agent_request({"cmd": "exemption_request", "reason": reason})
    console.print("exemption request sent to HR; `handtrace status` shows when it is granted")


# --- demonstrations (issue #11): record a task, review it, submit it -------------------------

record_app = typer.Typer(help="Demonstrations: record a task, review it (show, trim, delete) and submit "
                         "it. Nothing leaves this laptop before submit.", no_args_is_help=True)
app.add_typer(record_app, name="record")
_RecordingId = Annotated[str, typer.Argument(metavar="ID", help="Recording id (a unique prefix will do).")]


def _clock(us: int | None) -> str:
    from datetime import datetime

    return "-" if not us else datetime.fromtimestamp(us / 1e6).strftime("%Y-%m-%d %H:%M:%S")


def _print_demo_status(demo: dict[str, Any] | None) -> None:
    """The demonstrations part of `handtrace status`."""
    if not demo:
        return
    rec = demo.get("recording")
    if rec:
        state = " (suspended: capture paused)" if rec.get("suspended") else ""
        console.print(f"[bold red]recording[/] {rec['id'][:12]}{state}: {rec['instruction']!r}, "
                      f"{rec['duration_s']:.0f} s, {rec['steps']} steps (stops by itself after "
                      f"{rec['max_minutes']:g} min)")
    up = demo.get("upload") or {}
    line = f"demonstrations: {demo.get('to_review', 0)} to review, {demo.get('submitted', 0)} submitted"
    if up.get("waiting"):
        why = up.get("detail") or up.get("reason") or "next check soon"
        line += f"; upload waiting: {why}"
    net = up.get("network")
    if net:
        metered = {True: "metered", False: "unmetered", None: "metering unknown"}[net["metered"]]
        if net["metered"] is None:
            metered += " (treated as metered)" if net["unknown_treated_as_metered"] else " (treated as unmetered)"
        line += f"; network: {metered} [{net['source']}]"
    console.print(line)
    if demo.get("frames_note"):
        console.print(f"[yellow]note:[/] {demo['frames_note']}")


def _recordings_table(rs: list[dict[str, Any]]) -> Table:
    t = Table(Column("id", no_wrap=True), Column("status", no_wrap=True), Column("started", no_wrap=True),
              Column("length", no_wrap=True), Column("steps", no_wrap=True), "task")
    for r in rs:
        started = _clock(r["started_at_us"])[5:16]  # MM-DD HH:MM
        t.add_row(r["id"][:12], r["status"], started, f"{r['duration_s']:.0f} s", str(r["steps"]), r["instruction"])
    return t


@record_app.command("start")
def record_start(instruction: Annotated[str, typer.Argument(
        help='The task, as you would tell a colleague: "file the travel expense for the Berlin trip".')]) -> None:
    """Start recording a task. Only allowlisted apps are recorded, as in normal capture."""
    r = _agent_request({"cmd": "record_start", "instruction": instruction})["recording"]
    console.print(f"recording {r['id'][:12]} started: {r['instruction']!r}. Do the task, then "
                  f"`handtrace record stop` (it stops by itself after {r['max_minutes']:g} min). "
                  "Nothing is sent before you submit it.")


@record_app.command("stop")
def record_stop() -> None:
    """Stop the running recording (it then waits on this laptop for your review)."""
    r = _agent_request({"cmd": "record_stop"})["recording"]
    console.print(f"recording {r['id'][:12]} stopped: {r['steps']} steps, {r['frames']} frames, "
                  f"{r['events']:,} events in {r['duration_s']:.0f} s. Review it with "
                  f"`handtrace record show {r['id'][:8]}`, then submit or delete it "
                  f"(unsubmitted recordings are deleted on {_clock(r['expires_at_us'])}).")


@record_app.command("list")
def record_list() -> None:
    """Every recording on this laptop (to review, submitted and waiting for upload)."""
    rs = _agent_request({"cmd": "record_list"})["recordings"]
    if not rs:
        console.print('no recordings on this laptop (`handtrace record start "TASK"` starts one)')
        return
    console.print(_recordings_table(rs))


@record_app.command("show")
def record_show(rid: _RecordingId) -> None:
    """One recording step by step: action, time, app, frame."""
    r = _agent_request({"cmd": "record_show", "id": rid})["recording"]
    console.print(_recordings_table([r]))
    console.print(f"{r['frames']} frames ({r['frame_bytes'] / 1024:.0f} KiB), {r['events']:,} events")
    console.print(f"apps: {', '.join(r.get('apps') or []) or '-'}; stopped: {r.get('stop_reason') or '-'}; "
                  f"expires: {_clock(r.get('expires_at_us'))}")
    t = Table("step", "action", "from (s)", "to (s)", "app", "events", "frame")
    for s in r["steps_detail"]:
        f = s["frame"]
        frame = f"{f['sha256'][:12]} {f['format']} {f['width']}x{f['height']} {f['bytes'] / 1024:.0f} KiB" if f \
            else "none"
        t.add_row(str(s["index"]), s["action"], f"{s['from_s']:.1f}", f"{s['to_s']:.1f}", s["app_id"] or "-",
                  str(s["events"]), frame)
    console.print(t)
    ef = r.get("end_frame")
    console.print(f"end frame: {ef['sha256'][:12]} {ef['format']} {ef['bytes'] / 1024:.0f} KiB" if ef else
                  "end frame: none")
    for a, b in r.get("gaps") or []:
        console.print(f"paused from {a:.1f} s to {'the end' if b is None else f'{b:.1f} s'}: nothing recorded")


def _parse_steps(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise _fail(f"cannot read steps {text!r}: use e.g. 3,5 or 2-4", 2)
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        out.extend(range(a, b + 1))
    return out


def _parse_offset(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(?:(\d+):)?(\d+(?:\.\d+)?)\s*s?\s*", text)
    if not m:
        raise _fail(f"cannot read --{name} {text!r}: seconds from the start (90, 90.5, 1:30)", 2)
    return float(m.group(2)) + 60 * int(m.group(1) or 0)


@record_app.command("trim")
def record_trim(
    rid: _RecordingId,
    steps: Annotated[str | None, typer.Option(help="Steps to drop, e.g. 3,5 or 2-4 (as `show` numbers them).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="Drop from here (seconds from the start, or "
                                              "m:ss).")] = None,
    to: Annotated[str | None, typer.Option(help="...to here (default: the end).")] = None,
) -> None:
    """Drop steps or a time range from a recording before submitting it: their events and frames
    are deleted from this laptop. Remaining steps are renumbered."""
    req: dict[str, Any] = {"cmd": "record_trim", "id": rid}
    if steps is not None:
        req["steps"] = _parse_steps(steps)
    req["from_s"], req["to_s"] = _parse_offset(from_, "from"), _parse_offset(to, "to")
    if steps is None and req["from_s"] is None and req["to_s"] is None:
        raise _fail("say what to drop: --steps 3,5 or --from/--to", 2)
    r = _agent_request(req)["recording"]
    console.print(f"trimmed {r['id'][:12]}: {r['steps_removed']} steps, {r['events_removed']:,} events and "
                  f"{r['frames_removed']} frames deleted; {r['steps']} steps left (renumbered)")


@record_app.command("delete")
def record_delete(rid: _RecordingId) -> None:
    """Delete a recording and everything of it from this laptop."""
    r = _agent_request({"cmd": "record_delete", "id": rid})["recording"]
    console.print(f"recording {r['id'][:12]} deleted from this laptop")


@record_app.command("submit")
def record_submit(rid: _RecordingId) -> None:
    """Submit a reviewed recording: it is uploaded when allowed (mains power, unmetered network by
    default), then deleted from this laptop. It can no longer be trimmed."""
    r = _agent_request({"cmd": "record_submit", "id": rid})["recording"]
    console.print(f"recording {r['id'][:12]} submitted: {r['steps']} steps, {r['frames']} frames; it is "
                  "uploaded when allowed (`handtrace status` shows when) and then deleted here")


def _publish(record: dict[str, Any]) -> None:
    from handtrace.control.publish import ControlError, publish

    try:
        publish(_settings(), record)
    except ControlError as e:
        raise _fail(str(e)) from None
    console.print(f"published {record['kind']} for {record.get('employee_id') or 'everyone'}")


@control_app.command("pause")
def control_pause(
    employee: Annotated[str, typer.Argument(help="Employee id.")],
    minutes: Annotated[float, typer.Option(help="How long (at most 30).")] = 15.0,
    actor: Annotated[str, typer.Option(help="Who asks (default: the employee).")] = "",
    reason: str = "",
) -> None:
    """Record a pause for an employee: nothing captured in it is stored (auto-resumes)."""
    from handtrace.control.publish import ControlError, pause_record

    try:
        rec = pause_record(employee, minutes, actor=actor or employee, reason=reason)
    except ControlError as e:
        raise _fail(str(e)) from None
    _publish(rec)


@control_app.command("resume")
def control_resume(employee: str, actor: str = "", reason: str = "") -> None:
    """End an employee's current pause now."""
    from handtrace.control.publish import control_record

    _publish(control_record("pause_end", employee_id=employee, actor=actor or employee, role="employee",
                            reason=reason))


@exemption_app.command("request")
def exemption_request(employee: str, reason: Annotated[str, typer.Option(help="Why (shown to HR).")]) -> None:
    """An employee asks for an exemption (HR decides)."""
    from handtrace.control.publish import control_record

    _publish(control_record("exemption_request", employee_id=employee, actor=employee, role="employee",
                            reason=reason))


@exemption_app.command("grant")
def exemption_grant(employee: str, actor: Annotated[str, typer.Option(help="HR user granting it.")],
                    reason: str = "") -> None:
    """HR grants an exemption: from now on nothing of the employee is stored."""
    from handtrace.control.publish import control_record

    _publish(control_record("exemption_grant", employee_id=employee, actor=actor, role="hr", reason=reason))


@exemption_app.command("revoke")
def exemption_revoke(employee: str, actor: Annotated[str, typer.Option(help="HR user revoking it.")],
                     reason: str = "") -> None:
    """HR ends an exemption: capture is stored again from now on."""
    from handtrace.control.publish import control_record

    _publish(control_record("exemption_revoke", employee_id=employee, actor=actor, role="hr", reason=reason))


@policy_app.command("set")
def policy_set(
    path: Annotated[Path, typer.Argument(help="Policy JSON (see deploy/policy.example.json).")],
    actor: Annotated[str, typer.Option(help="Ops user making the change.")],
    reason: str = "",
) -> None:
    """Publish a new global policy (allowlists, sampling, masking); workers apply it live. Its
    version must be greater than the one in force (workers ignore anything else)."""
    from handtrace.control.publish import ControlError, current_policy_version, policy_record
    from handtrace.core.signing import KeyConfigError

    s = _settings()
    try:
        rec = policy_record(path, actor=actor, reason=reason)  # the file first: every problem at once
    except ControlError as e:
        hint = ""
        if "version" in str(e):
            try:  # best effort: name the next version when the one in force can be read
                current = current_policy_version(s)
                hint = f" (the policy in force is v{current}: use version {current + 1})"
            except (ControlError, KeyConfigError):
                pass
        raise _fail(f"{e}{hint}") from None
    try:
        current = current_policy_version(s)
    except (ControlError, KeyConfigError) as e:
        raise _fail(str(e)) from None
    if rec["policy"]["version"] <= current:
        raise _fail(f"{path}: version {rec['policy']['version']} is not greater than the policy in force "
                    f"(v{current}); workers and agents would ignore it: use version {current + 1}")
    _publish(rec)


@policy_app.command("history")
def policy_history(
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="Entries to show (newest first).")] = 50,
    action: Annotated[str | None, typer.Option(help="Only this action (e.g. exemption_grant, "
                                               "policy_sampling, invalid).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array instead of a table.")] = False,
) -> None:
    """The audit trail of the control plane, from ClickHouse (control_audit, written by the sink):
    who, roles, when, action, target, reason, before -> after, outcome -- every change and refusal."""
    from datetime import UTC

    s, client = _warehouse()
    where = "WHERE action = %(a)s" if action else ""
    try:
        result = client.query(
            f"SELECT at, subject, name, roles, action, target, reason, before, after, outcome, detail, method, "
            f"path, source_partition, source_offset FROM {s.clickhouse.database}.control_audit {where} "
            f"ORDER BY at DESC, source_offset DESC LIMIT %(n)s", parameters={"a": action, "n": limit})
    except Exception as exc:  # noqa: BLE001 -- show ClickHouse's message, not a traceback
        raise _fail(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)) from None
    entries = list(result.named_results())
    for entry in entries:
        at = entry["at"]
        entry["at"] = (at.replace(tzinfo=UTC) if at.tzinfo is None else at).isoformat()  # stored in UTC
        for side in ("before", "after"):
            try:
                entry[side] = json.loads(entry[side])
            except ValueError:
                pass
    if as_json:
        sys.stdout.write(json.dumps(entries, default=str, indent=1) + "\n")
        return

    def show(v: Any) -> str:
        return "-" if v is None else v if isinstance(v, str) else json.dumps(v, sort_keys=True)

    t = Table(Column("when (UTC)", no_wrap=True), "who", "roles", "action", "target", "reason",
              Column("before -> after", overflow="fold"), "outcome",
              title=f"control-plane audit trail, newest first ({len(entries)})")
    for entry in entries:
        t.add_row(entry["at"][:19].replace("T", " "), entry["subject"], ",".join(entry["roles"]), entry["action"],
                  entry["target"] or "-", entry["reason"] or entry["detail"][:80],
                  f"{show(entry['before'])} -> {show(entry['after'])}", entry["outcome"])
    console.print(t)


@device_app.command("enroll")
def device_enroll(
    employee: Annotated[str, typer.Argument(help="Employee id the laptop captures for.")],
    device: Annotated[str, typer.Argument(help="Device id (from `handtrace agent device-key` on the laptop).")],
    public_key: Annotated[str, typer.Argument(help="The laptop's public key (same command).")],
    actor: Annotated[str, typer.Option(help="IT/ops user enrolling it.")],
    reason: str = "",
) -> None:
    """Enroll a laptop: its own key may then pause, resume and ask for an exemption -- for this
    employee only."""
    _publish_device(employee, device, public_key, actor, reason, revoke=False)


@device_app.command("revoke")
def device_revoke(
    employee: Annotated[str, typer.Argument(help="Employee id the laptop was enrolled for.")],
    device: Annotated[str, typer.Argument(help="Device id.")],
    actor: Annotated[str, typer.Option(help="IT/ops user revoking it.")],
    reason: str = "",
) -> None:
    """Withdraw a laptop's enrollment: nothing it signs is honoured any more (lost or replaced)."""
    _publish_device(employee, device, None, actor, reason, revoke=True)


def _publish_device(employee: str, device: str, public_key: str | None, actor: str, reason: str, *,
                    revoke: bool) -> None:
    from handtrace.control.publish import ControlError, device_record, publish_device

    try:
        publish_device(_settings(), device_record(employee, device, public_key, actor=actor, reason=reason,
                                                  revoke=revoke))
    except ControlError as e:
        raise _fail(str(e)) from None
    console.print(f"device {device} {'revoked' if revoke else f'enrolled for {employee}'}")


@control_app.command("resign")
def control_resign(
    actor: Annotated[str, typer.Option(help="Ops user rotating the key.")],
    reason: str = "key rotation",
) -> None:
    """Key rotation: re-publish the policy in force (version + 1), every enrolled device and every
    exemption in force, signed with the current HANDTRACE_CONTROL__SIGNING_KEY; then the old key
    id can be retired (the API's POST /api/v1/admin/resign does the same, audited)."""
    from handtrace.control.publish import ControlError, resign, resign_exemptions

    try:
        version, devices = resign(_settings(), actor=actor, reason=reason)
        exemptions = resign_exemptions(_settings(), actor=actor, reason=reason)
    except ControlError as e:
        raise _fail(str(e)) from None
    console.print(f"re-signed: policy {'v' + str(version) if version else '(none in force)'}, {devices} devices, "
                  f"{exemptions} exemptions")


@control_app.command("keygen")
def control_keygen(
    key_id: Annotated[str, typer.Option(help="Key id for the new pair (e.g. the month it starts).")] = "cp1",
) -> None:
    """Print a new control-plane key pair as settings: the private key for the control plane only,
    the public key for every worker and agent (add it next to the old one when rotating)."""
    from handtrace.core.signing import generate_key_pair

    priv, pub = generate_key_pair()
    console.print(f"# control plane only (secret):\nHANDTRACE_CONTROL__SIGNING_KEY={priv}\n"
                  f"HANDTRACE_CONTROL__SIGNING_KEY_ID={key_id}\n# workers and agents (add to the existing ones):\n"
                  f"HANDTRACE_CONTROL__PUBLIC_KEYS='{{\"{key_id}\": \"{pub}\"}}'", soft_wrap=True, markup=False)


@api_app.command("run")
def api_run() -> None:
    """Serve the control-plane API on HANDTRACE_API__HOST:PORT (refuses unsafe settings)."""
    from handtrace.control.api.__main__ import serve
    from handtrace.control.api.auth import ApiConfigError
    from handtrace.control.publish import ControlError

    try:
        serve(_settings())
    except (ApiConfigError, ControlError) as e:
        raise _fail(str(e), 2) from None


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL to run against the handtrace database.")],
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table",
    actor: Annotated[str | None, typer.Option(help="Who runs it (recorded in access_audit; default: "
                                                   "the OS user).")] = None,
) -> None:
    """Run SQL against ClickHouse as admin (recorded in access_audit; `handtrace sql --role` for
    the other tiers). The embedded engine: through the sink (or demo) that owns it while one runs
    (read statements only), else opened here."""
    _run_tiered(sql, role="admin", purpose=None, actor=actor, fmt=fmt)


@app.command("sql")
def sql_command(
    sql: Annotated[str, typer.Argument(help="One SELECT against the handtrace database.")],
    role: Annotated[str, typer.Option(help="analyst | researcher | auditor | admin (docs/warehouse.md).")],
    purpose: Annotated[str | None, typer.Option(help="Why (required for researcher; recorded).")] = None,
    actor: Annotated[str | None, typer.Option(help="Who runs it (recorded; default: the OS user).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table | json | csv")] = "table",
    param: Annotated[list[str] | None, typer.Option(
        help="NAME=VALUE for a {NAME:Type} placeholder (docs/cookbook.md); repeatable.")] = None,
) -> None:
    """Run one query under an access tier: ClickHouse's analyzer resolves what it reads, the tier
    refuses what it may not read (analysts: aggregates over >= warehouse.k_anonymity people only),
    and every attempt is recorded in access_audit."""
    from handtrace.warehouse.tiers import ROLES, bind_parameters

    if role not in ROLES:
        raise _fail(f"unknown role {role!r}: one of {', '.join(ROLES)}", 2)
    params: dict[str, str] = {}
    for p in param or ():
        name, sep, value = p.partition("=")
        if not sep or not name:
            raise _fail(f"--param {p!r}: expected NAME=VALUE", 2)
        params[name] = value
    try:
        sql = bind_parameters(sql, params)
    except ValueError as e:
        raise _fail(str(e), 2) from None
    _run_tiered(sql, role=role, purpose=purpose, actor=actor, fmt=fmt)


def _run_tiered(sql: str, *, role: str, purpose: str | None, actor: str | None, fmt: str) -> None:
    from handtrace.core import clickhouse
    from handtrace.warehouse import tiers

    if fmt not in ("table", "json", "csv"):
        raise _fail(f"unknown --format {fmt!r}: table, json or csv", 2)
    from handtrace.core import chserve

    s = _settings()
    dsn = s.clickhouse_dsn()
    path = clickhouse.embedded_path(dsn)
    answer: Any
    try:
        # served by another process (the sink): the owner runs the tier and writes the audit
        # (/v1/sql), with this role's token when this user may read it (warehouse.endpoint_groups)
        remote = chserve.RemoteClient.for_role(path.resolve(), role) if path is not None and \
            not clickhouse.opened_here(dsn) else None
        if remote is not None:
            answer = remote.sql(sql, role=role, purpose=purpose, actor=actor)
        else:
            client = clickhouse.open_for_cli(dsn)
            answer = tiers.run(client, sql, role=role, database=s.clickhouse.database,
                               k=s.warehouse.k_anonymity, actor=actor, purpose=purpose)
    except (clickhouse.ClickHouseLocked, clickhouse.ClickHouseUnavailable) as e:
        raise _fail(str(e)) from None
    except (tiers.TierRefused, tiers.QueryFailed, tiers.AuditUnavailable, chserve.StatementRefused,
            chserve.RemoteError) as e:
        raise _fail(str(e).strip()) from None
    except Exception as e:  # noqa: BLE001 -- show ClickHouse's message, not a traceback
        raise _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    if fmt == "json":
        for row in answer.named_results():
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout)
        w.writerow(answer.column_names)
        w.writerows(answer.rows)
        return
    t = Table(*answer.column_names)
    for values in answer.rows:
        t.add_row(*[str(v) for v in values])
    console.print(t)


@schemas_app.command("list")
def schemas_list() -> None:
    """Every version of every schema, with its fingerprint."""
    from handtrace.core import schemas

    t = Table("subject", "version", "fingerprint (CRC-64-AVRO)", "file")
    for sv in sorted(schemas.by_fingerprint().values(), key=lambda v: (v.subject, v.version)):
        t.add_row(sv.subject, str(sv.version), f"{sv.fingerprint:016x}",
                  str(Path("schemas") / sv.subject / f"v{sv.version}.avsc"))
    console.print(t)


@app.command()
def settings() -> None:
    """Print the settings in force (secrets masked, DSN credentials included)."""
    console.print_json(json.dumps(masked_settings(_settings())))


_MASK = "**********"
_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SECRET_QUERY_RE = re.compile(r"(?i)([?&;](?:password|passwd|pwd|pass|secret|token|key|access_key|"
                              r"secret_key|api_key|apikey|auth)[^=&;]*=)[^&;#]*")


def mask_url_credentials(value: str) -> str:
    """``value`` with any credentials of a URL masked: the password of its userinfo (everything
    after the first ``:`` before the LAST ``@`` of the authority-or-more, so a password holding
    ``@``, ``:`` or ``/`` is masked whole) and secret-looking query parameters. Not a URL: as is."""
    m = _URL_RE.match(value)
    if not m:
        return value
    scheme, rest = value[:m.end()], value[m.end():]
    if "@" in rest:
        userinfo, _, host = rest.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}{colon}{_MASK if colon else ''}@{host}"
    return scheme + _SECRET_QUERY_RE.sub(lambda q: q.group(1) + _MASK, rest)


def masked_settings(s: Settings) -> Any:
    """Settings as JSON-able data with every secret masked: SecretStr fields (pydantic's own
    mask) and credentials inside any URL-valued setting (DSNs, bootstrap lists)."""

    def walk(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: walk(x) for k, x in v.items()}
        if isinstance(v, list):
            return [walk(x) for x in v]
        return mask_url_credentials(v) if isinstance(v, str) else v

    return walk(json.loads(s.model_dump_json()))



# --- fleet exporter and dashboards (issue #5) ----------------------------------------------

fleet_app = typer.Typer(help="The fleet exporter: agent heartbeats -> Prometheus fleet metrics.",
                        no_args_is_help=True)
dashboards_app = typer.Typer(help="Grafana dashboards (dashboards/*.json, generated by code).",
                             no_args_is_help=True)
app.add_typer(fleet_app, name="fleet")
app.add_typer(dashboards_app, name="dashboards")


@fleet_app.command("run")
def fleet_run() -> None:
    """Run the fleet exporter (/metrics on HANDTRACE_FLEET__METRICS_PORT) until SIGTERM/SIGINT."""
    from handtrace.core.clickhouse import ClickHouseLocked
    from handtrace.fleet.service import main

    try:
        main()
    except ClickHouseLocked as e:
        raise _fail(str(e)) from None


@fleet_app.command("offenders")
def fleet_offenders(
    hours: Annotated[int, typer.Option(min=1, max=24 * 90, help="Look back this many hours.")] = 24,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="Devices to list.")] = 20,
) -> None:
    """The devices whose agent costs most (battery, upload, CPU), from the heartbeats table."""
    from handtrace.core import clickhouse
    from handtrace.fleet.store import fleet_dsn, worst_offenders_sql

    s = _settings()
    try:
        result = clickhouse.connect(fleet_dsn(s)).query(worst_offenders_sql(s.clickhouse.database, hours, limit))
    except clickhouse.ClickHouseLocked as e:
        raise _fail(str(e)) from None
    except Exception as e:  # noqa: BLE001 -- show ClickHouse's message, not a traceback
        raise _fail(str(e).strip().splitlines()[0] if str(e).strip() else repr(e)) from None
    t = Table(*result.column_names, title=f"worst offenders, last {hours} h")
    for row in result.result_rows:
        t.add_row(*[str(v) for v in row])
    console.print(t)


@dashboards_app.command("push")
def dashboards_push(
    url: Annotated[str, typer.Option(help="Grafana base URL, e.g. http://127.0.0.1:3000.")],
    token: Annotated[str | None, typer.Option(envvar="GRAFANA_TOKEN",
                                              help="Service-account token (or user:pass in the URL).")] = None,
    folder: Annotated[str, typer.Option(help="Folder uid (created when missing; also its title).")] = "handtrace",
    prometheus_uid: Annotated[str, typer.Option(help="Uid of the Prometheus datasource.")] = "prometheus",
    clickhouse_uid: Annotated[str, typer.Option(help="Uid of the ClickHouse datasource.")] = "clickhouse",
    directory: Annotated[Path | None, typer.Option("--dir", help="Dashboards JSON directory.")] = None,
) -> None:
    """Create or overwrite every dashboard in a Grafana folder (idempotent)."""
    from handtrace.fleet.grafana import DEFAULT_DIR, PushError, push

    try:
        pushed = push(url, token, directory=directory or DEFAULT_DIR, folder_uid=folder, folder_title=folder,
                      datasource_uids={"prometheus": prometheus_uid, "clickhouse": clickhouse_uid})
    except PushError as e:
        raise _fail(str(e)) from None
    for d in pushed:
        console.print(f"[green]✓[/] {d.title} (uid {d.uid}, version {d.version}) {d.url}")


# --- the frame store (issue #11) ------------------------------------------------------------

store_app = typer.Typer(help="The durable frame store (store.url: a directory or an S3 bucket).",
                        no_args_is_help=True)
app.add_typer(store_app, name="store")


def _open_frame_store() -> FrameStore:
    from handtrace.core.framestore import open_store

    try:
        return open_store(_settings())
    except ValueError as e:
        raise _fail(str(e)) from None


@store_app.command("check")
def store_check() -> None:
    """Write, read back and delete a probe object; print the url and latencies. Exit 1 on failure."""
    import secrets
    import time

    from handtrace.core.framestore import StoreError

    store = _open_frame_store()
    key = f"probes/check-{secrets.token_hex(8)}"
    data = secrets.token_bytes(1024)
    timings: dict[str, float] = {}
    steps: list[tuple[str, Callable[[], object]]] = [
        ("put", lambda: store.put(key, data)), ("get", lambda: store.get(key)),
        ("delete", lambda: store.delete(key))]
    try:
        for step, op in steps:
            t0 = time.perf_counter()
            result = op()
            timings[step] = (time.perf_counter() - t0) * 1000
            if step == "get" and result != data:
                raise StoreError(f"reading {key} from {store.url}: the probe came back different")
            if step == "delete" and result is not True:
                raise StoreError(f"deleting {key} from {store.url}: the probe was not there")
    except (StoreError, KeyError) as e:
        raise _fail(f"frame store check failed: {e}") from None
    endpoint = getattr(store, "endpoint_url", None)
    where = f"{store.url} at {endpoint}" if endpoint else store.url
    console.print(f"[green]✓[/] {where}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items()))


@store_app.command("ls")
def store_ls(
    prefix: Annotated[str, typer.Argument(help="Key prefix, e.g. frames/<pseudonym>/.")] = "frames/",
) -> None:
    """Keys under PREFIX, one per line (stdout), then their count (stderr)."""
    from handtrace.core.framestore import StoreError

    store = _open_frame_store()
    n = 0
    try:
        for key in store.list(prefix):
            print(key)
            n += 1
    except (StoreError, ValueError) as e:
        raise _fail(f"listing the frame store failed: {e}") from None
    err.print(f"{n} keys under {prefix!r} in {store.url}")


dataset_app = typer.Typer(help="Training-data exports: trajectories for computer-use agents (docs/export.md).",
                          no_args_is_help=True)
app.add_typer(dataset_app, name="dataset")


def _warehouse() -> tuple[Settings, Any]:
    from handtrace.core import clickhouse
    from handtrace.sink.schema import migrate

    s = _settings()
    try:
        # the sink's endpoint while it runs (it migrated at start), else the dir itself
        client = clickhouse.open_for_cli(s.clickhouse_dsn())
        if not clickhouse.is_remote(client):
            migrate(client, s.clickhouse.database, s.warehouse.retention)
    except (clickhouse.ClickHouseLocked, clickhouse.ClickHouseUnavailable) as e:
        raise _fail(str(e)) from None
    return s, client


def _employee_key(s: Settings, employee: str) -> str:
    from handtrace.stream.app import MissingSecret, pseudonym_key
    from handtrace.stream.steps.pseudonymise import pseudonym

    try:
        return pseudonym(pseudonym_key(s), "employee", employee)
    except MissingSecret as e:
        raise _fail(str(e)) from None


def _export_progress() -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False, disable=not err.is_terminal)


def _run_export(run: Callable[[Callable[[Any], None]], Any]) -> Any:
    """Run an export with a progress display (batches; frames of the batch being scrubbed)."""
    from handtrace.export.dataset import ExportError

    with _export_progress() as bar:
        batches = bar.add_task("batches", total=None)
        frames = bar.add_task("frames of this batch", total=None)
        last = [-1]

        def progress(p: Any) -> None:
            bar.update(batches, completed=p.batches_done, total=p.batches_total,
                       description=f"batches ({p.tasks} tasks, {p.steps} steps)")
            if p.frames_in_batch:
                bar.update(frames, completed=p.frames_done, total=p.frames_in_batch)
            if not err.is_terminal and p.frames_in_batch == 0 and p.batches_done != last[0]:
                last[0] = p.batches_done
                err.print(f"batch {p.batches_done}/{p.batches_total}: {p.tasks} tasks, {p.steps} steps")

        try:
            return run(progress)
        except ExportError as e:
            raise _fail(str(e)) from None
        except (ValueError, OSError) as e:
            raise _fail(f"export failed: {e}") from None


def _print_export(r: Any) -> None:
    console.print(f"[green]✓[/] export {r.export_id} in {r.out}: {r.tasks} tasks, {r.steps} steps, "
                  f"{r.images} images, {r.bytes / 1e6:.1f} MB, {r.seconds:.1f} s")
    console.print(f"  scrubbing: {r.frames_filled} frames filled ({r.boxes_filled} boxes), "
                  f"{r.frames_unscrubbable} frames left out as unscrubbable; participants: {len(r.participants)}"
                  + (f"; resumed after {r.batches_resumed} finished batches" if r.batches_resumed else ""))


@dataset_app.command("export")
def dataset_export(
    out: Annotated[Path, typer.Argument(help="Output directory (new or empty; or an unfinished export with "
                                              "--resume).")],
    since: Annotated[str | None, typer.Option(help="Demonstrations started at or after (ISO time).")] = None,
    until: Annotated[str | None, typer.Option(help="...and before (ISO time).")] = None,
    app_id: Annotated[list[str] | None, typer.Option("--app", help="Only demonstrations that used this app "
                                                                   "(repeatable).")] = None,
    cohort: Annotated[list[str] | None, typer.Option(help="Only these cohorts (repeatable).")] = None,
    participant: Annotated[list[str] | None, typer.Option(help="Only this participant pseudonym "
                                                               "(employee_key; repeatable).")] = None,
    employee: Annotated[list[str] | None, typer.Option(help="Only this employee id (pseudonymised here with "
                                                            "the stream's key; repeatable).")] = None,
    min_steps: Annotated[int | None, typer.Option(min=1, help="Trajectories with at least this many steps.")] = None,
    max_steps: Annotated[int | None, typer.Option(min=1, help="...and at most this many.")] = None,
    workers: Annotated[int | None, typer.Option(min=1, help="OCR processes (default: the CPU count).")] = None,
    batch_size: Annotated[int, typer.Option(min=1, max=10_000, help="Demonstrations per batch (and per "
                                                                     "trajectories part).")] = 50,
    no_scrub: Annotated[bool, typer.Option("--no-scrub", help="Skip OCR scrubbing (refused unless "
                                                             "HANDTRACE_EXPORT__REQUIRE_SCRUB=false).")] = False,
    include_passive: Annotated[bool, typer.Option("--include-passive", help="Also passive episodes (refused "
                                                                           "unless the policy allows it).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted export in OUT.")] = False,
    actor: Annotated[str, typer.Option(help="Who runs the export (recorded).")] = "",
) -> None:
    """Export complete demonstrations as trajectories (AgentNet/OpenCUA layout): manifest.json,
    trajectories/part-NNNNN.jsonl, images/, steps.parquet. Withdrawn ones are never exported."""
    from handtrace.export.dataset import ExportFilters, export_dataset

    s = _settings()
    if include_passive:
        if not s.export.allow_passive:
            raise _fail("passive episodes are not exportable under this policy (HANDTRACE_EXPORT__ALLOW_PASSIVE="
                        "false): passive capture was not consented to as training data")
        raise _fail("passive episodes are allowed by policy but this version exports demonstrations only")
    participants = list(participant or []) + [_employee_key(s, e) for e in employee or []]
    try:
        filters = ExportFilters(since=since, until=until, apps=tuple(app_id or ()), cohorts=tuple(cohort or ()),
                                participants=tuple(participants), min_steps=min_steps, max_steps=max_steps)
    except ValueError as e:
        raise _fail(str(e)) from None
    store = _open_frame_store()
    s, client = _warehouse()
    who = actor or os.environ.get("USER", "")
    r = _run_export(lambda progress: export_dataset(
        client, store, out, filters, settings=s, scrub=not no_scrub, workers=workers or os.cpu_count() or 1,
        batch_size=batch_size, resume=resume, actor=who, progress=progress))
    _print_export(r)


@dataset_app.command("check")
def dataset_check(out: Annotated[Path, typer.Argument(help="An export directory.")]) -> None:
    """Check an export as a training job would load it (hashes, coordinates, action codes, PII,
    order). Exit 1 when anything is wrong."""
    from handtrace.export.check import check_export

    if not (out / "manifest.json").exists():
        raise _fail(f"{out} holds no finished export (no manifest.json)")
    report = check_export(out)
    for e in report.errors:
        err.print(f"[red]✗[/] {e}")
    if not report.ok:
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {out}: {report.tasks} tasks, {report.steps} steps, {report.images} images; "
                  "every check passed")


@dataset_app.command("list")
def dataset_list(
    stale: Annotated[bool, typer.Option("--stale", help="Only exports that contain withdrawn data and are not "
                                                        "replaced yet.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable.")] = False,
) -> None:
    """Recorded exports (newest first), or the stale ones with what makes them stale."""
    from handtrace.export.dataset import list_exports, stale_exports

    s, client = _warehouse()
    db = s.clickhouse.database
    if stale:
        rows = stale_exports(client, db)
        if as_json:
            for x in rows:
                sys.stdout.write(json.dumps(x.__dict__, default=str) + "\n")
            return
        t = Table("export", "finished", "output", "withdrawn participants", "withdrawn demonstrations")
        for x in rows:
            t.add_row(x.export_id, str(x.finished_at)[:19], x.output, str(len(x.participants)),
                      str(len(x.demonstrations)))
        console.print(t)
        err.print(f"{len(rows)} stale exports; replace each with: handtrace dataset reissue EXPORT_ID NEW_DIR")
        return
    df = list_exports(client, db)
    if as_json:
        for row in df.iter_rows(named=True):
            sys.stdout.write(json.dumps(row, default=str) + "\n")
        return
    t = Table("export", "finished", "tasks", "steps", "participants", "output", "replaces", "replaced by")
    for r in df.iter_rows(named=True):
        t.add_row(r["export_id"], str(r["finished_at"])[:19], str(r["tasks"]), str(r["steps"]),
                  str(r["participants"]), r["output"], r["replaces"], r["replaced_by"])
    console.print(t)


@dataset_app.command("withdraw")
def dataset_withdraw(
    actor: Annotated[str, typer.Option(help="Who records the withdrawal.")],
    reason: Annotated[str, typer.Option(help="Why (kept with it).")],
    employee: Annotated[str | None, typer.Option(help="Withdraw every demonstration of this employee id.")] = None,
    participant: Annotated[str | None, typer.Option(help="...or of this pseudonym (employee_key).")] = None,
    demonstration: Annotated[str | None, typer.Option(help="...or this one demonstration id.")] = None,
) -> None:
    """Withdraw a participant or a demonstration from training data: later exports leave it out
    and the exports that contain it are listed as stale (handtrace dataset list --stale)."""
    from handtrace.export.dataset import ExportError, stale_exports, withdraw

    if sum(x is not None for x in (employee, participant, demonstration)) != 1:
        raise _fail("give exactly one of --employee, --participant, --demonstration")
    s, client = _warehouse()
    key = _employee_key(s, employee) if employee is not None else participant
    try:
        wid = withdraw(client, s.clickhouse.database, employee_key=key, demonstration_id=demonstration,
                       actor=actor, reason=reason)
    except (ExportError, ValueError) as e:
        raise _fail(str(e)) from None
    stale = stale_exports(client, s.clickhouse.database)
    console.print(f"[green]✓[/] withdrawal {wid} recorded; {len(stale)} exports are now stale"
                  + (": " + ", ".join(x.export_id for x in stale) if stale else ""))


@dataset_app.command("reissue")
def dataset_reissue(
    export_id: Annotated[str, typer.Argument(help="The stale export to replace.")],
    out: Annotated[Path, typer.Argument(help="Output directory of the replacement.")],
    workers: Annotated[int | None, typer.Option(min=1, help="OCR processes (default: the CPU count).")] = None,
    no_scrub: Annotated[bool, typer.Option("--no-scrub", help="As for export.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted reissue in OUT.")] = False,
    actor: Annotated[str, typer.Option(help="Who runs it (recorded).")] = "",
) -> None:
    """Re-export a stale export without what was withdrawn since: its filters and its
    demonstrations, minus the withdrawn ones. The new export records that it replaces the old."""
    from handtrace.export.dataset import reissue

    store = _open_frame_store()
    s, client = _warehouse()
    who = actor or os.environ.get("USER", "")
    r = _run_export(lambda progress: reissue(
        client, store, export_id, out, settings=s, scrub=not no_scrub, workers=workers or os.cpu_count() or 1,
        resume=resume, actor=who, progress=progress))
    _print_export(r)
    console.print(f"  replaces {export_id}: delete the old copy at its output (handtrace dataset list shows where)")



@app.command("erase")
def erase_person(
    employee_id: Annotated[str, typer.Argument(
        help="The employee id to erase (`receipts` without --actor/--reason: list the receipts).")],
    actor: Annotated[str, typer.Option(help="Who requests the erasure (kept on the receipt).")] = "",
    reason: Annotated[str, typer.Option(help="Why, e.g. the Art. 17 request reference (kept on the receipt).")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print the receipt (or the receipts) as JSON.")] = False,
    settle_timeout: Annotated[float, typer.Option(
        min=0, help="Seconds to wait, before deleting, until the pipeline holds nothing more of the person "
                    "(0: do not wait; the receipt says settled=false).")] = 120.0,
) -> None:
    """Erase one person (GDPR Art. 17): a signed suppression the stream enforces for every
    capture time, deletion of their rows in every table and of their frames, a re-query that
    must find nothing, then a receipt; exports containing them become stale. `handtrace erase
    receipts` lists the receipts (docs/operations.md, "Erasure")."""
    from handtrace.control.publish import ControlError, erasure_record, publish
    from handtrace.control.settle import settle_after_suppression
    from handtrace.core import clickhouse
    from handtrace.core.cluster import layout_of
    from handtrace.core.erasure import ErasureError, erase, receipts
    from handtrace.core.framestore import StoreError
    from handtrace.sink.schema import ERASABLE

    if employee_id == "receipts" and not actor and not reason:
        s, client = _warehouse()
        rows = receipts(client, s.clickhouse.database)
        if as_json:
            for r in rows:
                sys.stdout.write(json.dumps(r, default=str) + "\n")
            return
        for r in rows:
            console.print(f"{r['receipt_id']}  {r['employee_key']}  requested {r['requested_at']:%Y-%m-%d %H:%M:%S}  "
                          f"verified {r['verified_at']:%Y-%m-%d %H:%M:%S}  by {r['actor']}: {r['reason']}  "
                          f"rows {sum(r['rows_removed'].values())}  objects {r['objects_removed']}"
                          + ("" if r["settled"] else "  (not settled)"))
        err.print(f"{len(rows)} erasure receipts")
        return
    if not employee_id.strip():
        raise _fail("give the employee id to erase")
    if not actor.strip() or not reason.strip():
        raise _fail("an erasure needs --actor and --reason (both are kept on the receipt); nothing was done")
    s, client = _warehouse()
    key = _employee_key(s, employee_id)
    store = _open_frame_store()

    sent: list[tuple[int, int]] = []

    def suppress(erasure_id: str) -> None:
        try:
            sent.append(publish(s, erasure_record(employee_id, erasure_id, actor=actor.strip(),
                                                  reason=reason.strip())))
        except ControlError as e:
            raise ErasureError(f"the suppression could not be sent ({e}); nothing was deleted") from None

    def say(line: str) -> None:
        if not as_json:
            err.print(f"  {line}")

    def settle() -> bool:
        if settle_timeout <= 0:
            say("not waiting for the pipeline (--settle-timeout 0): the receipt says settled=false")
            return False
        partition, offset = sent[-1]
        return settle_after_suppression(s, partition, offset, settle_timeout, say)

    try:
        receipt = erase(client, s.clickhouse.database, store, key, actor=actor, reason=reason, tables=ERASABLE,
                        suppress=suppress, delete=client.erase if clickhouse.is_remote(client) else None,
                        settle=settle, progress=say, cluster=layout_of(s.clickhouse))
    except (ErasureError, StoreError, clickhouse.ClickHouseUnavailable) as e:
        raise _fail(str(e)) from None
    if as_json:
        sys.stdout.write(json.dumps(receipt.as_json()) + "\n")
        return
    if not receipt.found:
        console.print(f"[yellow]nothing was stored about {employee_id}[/] (pseudonym {key}); the suppression "
                      f"stands: the stream drops anything of them from now on. Receipt {receipt.receipt_id}.")
        return
    if not receipt.settled:
        err.print("[yellow]warning:[/] the pipeline was not seen to settle before the deletion: rows of them in "
                  "flight may have been stored since; run handtrace erase again once it has caught up")
    console.print(f"[green]✓[/] {employee_id} erased: {sum(receipt.rows_removed.values())} rows, "
                  f"{receipt.objects_removed} objects; verified {receipt.verified_at:%Y-%m-%d %H:%M:%S} UTC; "
                  f"receipt {receipt.receipt_id}. Exports containing them: handtrace dataset list --stale")



subject_app = typer.Typer(help="Subject access (GDPR Art. 15): everything held about one person.",
                          no_args_is_help=True)
app.add_typer(subject_app, name="subject")


@subject_app.command("export")
def subject_export(
    employee_id: Annotated[str, typer.Argument(help="The employee id of the person asking (as they gave it).")],
    out: Annotated[Path, typer.Option(help="A new or empty directory to write the files into.")],
    actor: Annotated[str, typer.Option(help="Who runs the export (recorded in access_audit).")],
    reason: Annotated[str, typer.Option(help="e.g. the Art. 15 request reference (recorded).")] = "",
    controls: Annotated[bool, typer.Option(help="Read the person's controls from the controls topic "
                                                "(--no-controls: the summary says they were not read).")] = True,
    heartbeats: Annotated[bool, typer.Option(help="Read the heartbeats of their devices from the fleet store "
                                                  "(--no-heartbeats: the summary says they were not read).")] = True,
) -> None:
    """Write everything held about one person as files they can read (events by day,
    demonstrations with their frames, controls, exports, withdrawals, erasures, the access audit)
    with a one-page SUMMARY.md; recorded in access_audit (docs/operations.md, "Subject access")."""
    from handtrace.core import clickhouse
    from handtrace.core.framestore import StoreError
    from handtrace.warehouse import tiers
    from handtrace.warehouse.subject import (
        SubjectAccessError,
        controls_from_topic,
        export_subject,
        heartbeats_in_child,
    )

    if not employee_id.strip():
        raise _fail("give the employee id whose data to export", 2)
    if not actor.strip():
        raise _fail("a subject access export needs --actor (it is recorded in access_audit)", 2)
    s, client = _warehouse()
    key = _employee_key(s, employee_id)
    store = _open_frame_store()

    try:
        r = export_subject(client, s.clickhouse.database, store, employee_id=employee_id, employee_key=key, out=out,
                           actor=actor, reason=reason, controls=(lambda: controls_from_topic(s)) if controls else None,
                           heartbeats=heartbeats_in_child if heartbeats else None,
                           progress=lambda line: err.print(f"  {line}", markup=False, highlight=False))
    except (SubjectAccessError, StoreError, tiers.AuditUnavailable, clickhouse.ClickHouseUnavailable,
            ValueError) as e:
        raise _fail(str(e)) from None
    for note in r.notes:
        err.print(f"[yellow]warning:[/] not read: {note}", markup=True)
    if not r.found:
        console.print(f"[yellow]nothing is held about {employee_id}[/] (pseudonym {key}): {out}/SUMMARY.md says so; "
                      "the export is recorded in access_audit")
        return
    counts = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in r.counts.items() if n)
    console.print(f"[green]✓[/] {employee_id}: {counts} -> {out} (SUMMARY.md first; manifest.json has every "
                  "file's SHA-256); recorded in access_audit")

if __name__ == "__main__":
    app()


db_app = typer.Typer(help="The ClickHouse database: migrations and retention.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply pending migrations and set every table's TTL from the retention settings. Needs the
    database to itself on the embedded engine: the sink does the same at its start."""
    from handtrace.core import clickhouse
    from handtrace.core.cluster import layout_of
    from handtrace.sink.schema import apply_retention, migrate

    s = _settings()
    dsn = s.clickhouse_dsn()
    path = clickhouse.embedded_path(dsn)
    if path is not None:
        from handtrace.core.chserve import endpoint_of

        try:
            served = endpoint_of(path.resolve())
        except clickhouse.ClickHouseUnavailable:
            served = None  # left by a dead owner
        if served is not None:
            raise _fail("the sink owns the embedded database and migrated it at its start (retention "
                        "settings included); restart the sink to apply changed settings")
    try:
        client = clickhouse.connect(dsn)
        layout = layout_of(s.clickhouse)
        applied = migrate(client, s.clickhouse.database, cluster=layout)
        changes = apply_retention(client, s.clickhouse.database, s.warehouse.retention, layout)
    except (clickhouse.ClickHouseLocked, clickhouse.ClickHouseUnavailable) as e:
        raise _fail(str(e)) from None
    console.print(f"migrations applied: {', '.join(map(str, applied)) or 'none pending'}")
    for c in changes:
        console.print(f"{c.table}: TTL {c.before or 'none'} -> {c.after or 'none'} ({c.data_class}: "
                      f"{c.days or 'forever'} days)")
    if not changes:
        console.print("TTLs already match the retention settings")


def _days(n: int) -> str:
    return "forever" if n == 0 else f"{n} d"


def _ms(ms: int | None) -> str:
    if ms is None:
        return "(missing)"
    return "forever" if ms < 0 else f"{ms / 86_400_000:g} d"


@db_app.command("retention")
def db_retention(
    apply: Annotated[bool, typer.Option("--apply", help="Make everything match: TTLs (when this process "
                                        "may own the database), topic retention.ms, and delete frame "
                                        "objects no live frames row references.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    topics: Annotated[bool, typer.Option("--topics/--no-topics", help="Check the topics (the broker "
                                         "must answer within 5 s).")] = True,
) -> None:
    """Every table against its retention policy (oldest row, rows past the policy, TTL in force),
    every topic's retention.ms, and the frame store's objects. Exit 1 when something does not match."""
    from handtrace.core import clickhouse
    from handtrace.core.framestore import StoreError, open_store
    from handtrace.fleet.store import fleet_dsn
    from handtrace.warehouse import retention as wr

    s = _settings()
    policy = s.warehouse.retention
    report = wr.RetentionReport(policy=wr.policy_days(policy))
    db = s.clickhouse.database
    try:
        client = clickhouse.open_for_cli(s.clickhouse_dsn())
        owner = not clickhouse.is_remote(client)
        if owner:
            from handtrace.sink.schema import migrate

            migrate(client, db)
        wr.warehouse_part(report, client, db, policy, owner=owner, apply=apply)
    except (clickhouse.ClickHouseLocked, clickhouse.ClickHouseUnavailable) as e:
        raise _fail(str(e)) from None
    store_url = s.store.url or "(default)"
    try:
        store = open_store(s)
        store_url = store.url
        wr.objects_part(report, client, db, store, policy, apply=apply,
                        progress=lambda m: err.print(m) if not as_json else None)
    except (StoreError, ValueError) as e:
        report.notes.append(f"frame store not checked: {e}")
    fdsn = fleet_dsn(s)
    fpath = clickhouse.embedded_path(fdsn)
    if fpath is not None and not fpath.exists():
        report.notes.append(f"fleet store {fpath} does not exist (no heartbeats stored yet)")
    else:
        try:
            if fdsn == s.clickhouse_dsn():
                fclient = client
            else:
                if owner and clickhouse.embedded_path(s.clickhouse_dsn()) is not None:
                    clickhouse.close(s.clickhouse_dsn())  # one embedded dir per process
                fclient = clickhouse.connect(fdsn)
            try:
                wr.fleet_part(report, fclient, db, policy, apply=apply)
            finally:
                if fclient is not client:
                    clickhouse.close(fdsn)
        except (clickhouse.ClickHouseLocked, clickhouse.ClickHouseUnavailable) as e:
            report.notes.append(f"heartbeats not checked: {' '.join(str(e).split())}")
    if topics:
        wr.topics_part(report, s, apply=apply)
    else:
        report.notes.append("topics not checked (--no-topics)")
    ok = (report.past_policy == 0 and all(t.ttl_matches for t in report.tables)
          and all(t["matches"] is not False for t in report.topics)
          and (report.objects is None
               or report.objects.unreferenced == report.objects.young_kept + report.objects.deleted))
    if as_json:
        print(json.dumps({**report.as_dict(), "ok": ok}, default=str))
    else:
        pol = ", ".join(f"{k} {_days(v)}" for k, v in report.policy.items())
        console.print(f"retention policy: {pol}")
        t = Table("store", "table", "class", "policy", "TTL in force", "rows", "oldest row", "past policy",
                  title="tables")
        for tr in report.tables:
            ttl = tr.ttl or "none"
            t.add_row(tr.store, tr.table, tr.data_class, _days(tr.policy_days),
                      ttl if tr.ttl_matches else f"[red]{ttl} (settings differ)[/]", str(tr.rows),
                      tr.oldest or "-", str(tr.past_policy) if not tr.past_policy else f"[red]{tr.past_policy}[/]")
        console.print(t)
        for c in report.ttl_changes:
            console.print(f"changed {c.table}: TTL {c.before or 'none'} -> {c.after or 'none'}")
        if report.topics:
            tt = Table("topic", "class", "wanted", "retention.ms in force", title="topics")
            for tp in report.topics:
                have = _ms(tp["retention_ms"])
                tt.add_row(tp["topic"], tp["data_class"], _ms(tp["wanted_ms"]),
                           have if tp["matches"] is not False else f"[red]{have}[/]")
            console.print(tt)
        for name, (before, after) in report.topic_changes.items():
            console.print(f"changed {name}: retention.ms {before} -> {after}")
        o = report.objects
        if o is not None:
            console.print(f"frame store {store_url}: {o.objects} objects, oldest {o.oldest or '-'}; "
                          f"{o.unreferenced} with no live frames row ({o.young_kept} younger than the grace "
                          f"period, kept); deleted now: {o.deleted}")
        for n in report.notes:
            err.print(f"[yellow]note:[/] {n}")
    if not ok:
        raise typer.Exit(1)
