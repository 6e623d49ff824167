"""Demonstration mode's footprint next to passive capture: the whole agent process, measured in
ONE run on a real X display and a real Kafka broker.

    python -m bench.demo_footprint [--seconds 120] [--size 1920x1080]

Two runs of the real agent (`handtrace agent run`, X11 backend, default settings but a 30 s
batch interval) on a fresh Xvfb of the given size, each driven by the same scripted user for
``--seconds`` of wall time: xdotool moves the pointer along a path, clicks every ~4 s, types
bursts, scrolls, presses a hotkey, while a window's content changes (as an app's would). Three
real windows: an allowlisted editor, an allowlisted browser-like window and a non-allowlisted
chat window (filled in every frame).

1. **passive**: the agent only captures (its own spool and shipping, as in production);
2. **recording**: the same, inside a demonstration (`record start` ... `record stop`): the frame
   ring grabs the full screen every `demo.frame_interval_s`, masks it, keeps distinct frames and
   encodes the one before each action (PNG, ADR 0011).

Reported per run, from /proc of the agent process: CPU % of one core over the scripted period
(user + system, all threads), peak RSS (VmHWM), and for the recording the frames kept and their
bytes, extrapolated to an hour, plus the upload's size (every message of the submitted
demonstration). The driver, Xvfb and the broker are other processes and are not counted.
Targets (issue #11): recording <= 3 % of one core and <= 120 MB RSS; passive targets unchanged.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from handtrace.agent.localsock import request
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import Settings, settings_env

ROOT = Path(__file__).resolve().parent.parent
POLICY = {"version": 1, "allowed_apps": ["code", "firefox"], "allowed_domains": [], "sampling": {},
          "text_capture": {"code": "masked", "firefox": "masked"}}
_TICKS = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def proc_hwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def drive(xvfb: Any, xdotool: Any, editor: Any, seconds: float, seed: int, size: tuple[int, int]) -> dict[str, int]:
    """The scripted user: returns how many actions of each kind it performed."""
    rng = random.Random(seed)
    w, h = size
    counts = {"click": 0, "typing": 0, "scroll": 0, "hotkey": 0, "move": 0}
    end = time.monotonic() + seconds
    i = 0
    while time.monotonic() < end:
        i += 1
        x, y = rng.randint(40, min(900, w - 40)), rng.randint(40, min(700, h - 40))
        xdotool(xvfb, "mousemove", str(x), str(y))
        counts["move"] += 1
        kind = ("click", "typing", "scroll", "click", "hotkey")[i % 5]
        if kind == "click":
            xdotool(xvfb, "click", "1")
        elif kind == "typing":
            xdotool(xvfb, "type", "--delay", "60", rng.choice(["invoice 2041 ", "Berlin trip ", "approve "]))
        elif kind == "scroll":
            xdotool(xvfb, "click", "--repeat", "3", "--delay", "80", "5")
        else:
            xdotool(xvfb, "key", "ctrl+s")
        counts[kind] += 1
        # The app reacts: part of its window redraws.
        editor.fill((rng.randrange(256), rng.randrange(256), rng.randrange(256)),
                    (rng.randint(0, 500), rng.randint(0, 400), 120, 40))
        time.sleep(max(0.0, 4.0 - 0.5))
    return counts


def run_agent(mode: str, seconds: float, size: tuple[int, int], root: Path, bootstrap: str) -> dict[str, Any]:
    from tests.xvfb import open_windows, xdotool, xvfb_server

    state = root / mode
    state.mkdir(parents=True)
    (state / "policy.json").write_text(json.dumps(POLICY))
    s = Settings(dev_mode=True, state_dir=state, kafka={"bootstrap_servers": bootstrap},
                 topics={"prefix": f"df{mode[:3]}", "partitions": 1})
    from handtrace.core.admin import ensure_topics
    ensure_topics(s.kafka, s.topics)
    with xvfb_server(*size) as xvfb, open_windows(xvfb) as make:
        editor = make(wm_class=("code", "Code"), title="expenses.md - Code", geometry=(0, 0, 900, 700))
        make(wm_class=("firefox", "Firefox"), title="Travel - Firefox", geometry=(920, 0, 900, 700),
             background=(240, 240, 250), focus=False)
        make(wm_class=("telegram-desktop", "TelegramDesktop"), title="Chat", geometry=(920, 720, 600, 300),
             background=(200, 40, 40), focus=False)
        editor.focus()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
               "HANDTRACE_AGENT__EMPLOYEE_ID": "emp-bench", "HANDTRACE_AGENT__DEVICE_ID": "dev-bench",
               "HANDTRACE_AGENT__SOURCE": "x11", "HANDTRACE_AGENT__DISPLAY": xvfb.display, "DISPLAY": xvfb.display,
               "HANDTRACE_AGENT__POLICY_FILE": str(state / "policy.json"),
               "HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE": "false", "HANDTRACE_AGENT__SCREENSHOTS": "false",
               "HANDTRACE_DEMO__UPLOAD_ON_BATTERY": "true", "HANDTRACE_DEMO__UPLOAD_ON_METERED": "true"}
        with open(state / "agent.log", "ab") as log:
            proc = spawn_owned([sys.executable, "-m", "handtrace.cli", "agent", "run"], env=env, stdout=log,
                               stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        sock = state / "agent" / "agent.sock"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if request(sock, {"cmd": "status"}, timeout_s=2).get("ok"):
                        break
                except Exception:  # noqa: BLE001, S110 -- not up yet: try again
                    pass
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"agent did not start:\n{(state / 'agent.log').read_text()[-2000:]}")
                time.sleep(0.2)
            time.sleep(2.0)  # start-up done (imports, first focus poll)
            rid = None
            if mode == "recording":
                reply = request(sock, {"cmd": "record_start", "instruction": "file the travel expense"})
                rid = reply["recording"]["id"]
            cpu0, t0 = proc_cpu_s(proc.pid), time.monotonic()
            counts = drive(xvfb, xdotool, editor, seconds, 7, size)
            cpu1, t1 = proc_cpu_s(proc.pid), time.monotonic()
            out: dict[str, Any] = {"mode": mode, "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0), "wall_s": t1 - t0,
                                   "peak_rss_mb": proc_hwm_mb(proc.pid), "actions": counts}
            if rid is not None:
                request(sock, {"cmd": "record_stop"}, timeout_s=30)
                shown = request(sock, {"cmd": "record_show", "id": rid}, timeout_s=30)["recording"]
                frames_dir = state / "agent" / "demonstrations" / rid / "frames"
                sizes = [p.stat().st_size for p in frames_dir.iterdir()]
                steps = shown["steps_detail"]
                out.update(steps=len(steps), steps_with_frame=sum(1 for st in steps if st["frame"]),
                           frame_files=len(sizes), frame_bytes=sum(sizes),
                           events=shown.get("events"), peak_rss_recording_mb=out["peak_rss_mb"],
                           peak_rss_mb=proc_hwm_mb(proc.pid))
                per_h = 3600 / out["wall_s"]
                out["frames_per_hour"] = out["steps_with_frame"] * per_h
                out["frame_mb_per_hour"] = out["frame_bytes"] * per_h / 1e6
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=120.0, help="scripted activity per run")
    ap.add_argument("--size", default="1920x1080", help="screen WxH")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    size = tuple(int(v) for v in a.size.split("x"))
    from bench.stream_throughput import machine_info, start_broker

    info = machine_info()
    print(info, flush=True)
    root = Path(tempfile.mkdtemp(prefix="ht-demofp-"))
    broker = start_broker(root)
    try:
        results = []
        for mode in ("passive", "recording"):
            r = run_agent(mode, a.seconds, size, root, broker.bootstrap)  # type: ignore[arg-type]
            print(json.dumps(r), flush=True)
            results.append(r)
    finally:
        broker.stop()
    p, rec = results
    print(f"\nDemonstration mode vs passive, whole agent process, {a.size}, {a.seconds:.0f} s each, "
          "one action every ~4 s:")
    print("| mode | CPU % of one core | peak RSS MB | frames/h | frame MB/h |")
    print("|---|---:|---:|---:|---:|")
    print(f"| passive | {p['cpu_pct']:.2f} | {p['peak_rss_mb']:.0f} | - | - |")
    print(f"| recording | {rec['cpu_pct']:.2f} | {rec['peak_rss_mb']:.0f} | {rec['frames_per_hour']:.0f} | "
          f"{rec['frame_mb_per_hour']:.0f} |")
    print(f"ratio recording/passive: CPU {rec['cpu_pct'] / max(p['cpu_pct'], 1e-9):.2f}x, "
          f"RSS {rec['peak_rss_mb'] / max(p['peak_rss_mb'], 1e-9):.2f}x")
    ok_cpu, ok_rss = rec["cpu_pct"] <= 3.0, rec["peak_rss_mb"] <= 120
    print(f"targets: CPU <= 3 %: {'met' if ok_cpu else 'NOT met'}; RSS <= 120 MB: {'met' if ok_rss else 'NOT met'}")
    if a.json:
        a.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
