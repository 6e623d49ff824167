"""Agent footprint benchmark: what one laptop pays for an hour of capture, handtrace vs a naive agent,
measured in ONE run against a real Kafka broker.

    python -m bench.agent_footprint [--minutes 60] [--seed 1]
    python -m bench.agent_footprint --package [--deb PATH] [--settle 20]

The workload is an hour of the synthetic user (handtrace.agent.synthetic: pointer trajectories
with human dynamics at ~60 Hz, typing bursts, scrolls, app switches; checked against the Balabit
traces in tests/unit/test_synthetic.py), generated once by this process and saved to a file. Each
configuration then runs in its own child process -- the agent under test -- which reads the raw
events back chunk by chunk and hands them to the agent at the same point as an OS backend does
(``Agent.on_event``), on a simulated clock, so an hour takes seconds of wall time. Ticks (focus
polls) and wakeups happen at their simulated times; batches really go through the on-disk spool
(fsync on) and the shipper to the real broker (idempotent, acks=all, zstd).

Reported per configuration, from the child process itself:

- CPU % of one core = (user + system CPU seconds of the child, all threads incl. librdkafka's,
  minus the time spent reading the workload file and drawing synthetic screens) / simulated
  seconds;
- peak RSS (VmHWM) of the child;
- bytes uploaded per hour: librdkafka's ``tx_bytes`` (bytes written to broker sockets: compressed
  record batches plus protocol overhead), and the payload bytes (key + value + headers);
- radio wakeups per hour: shipments that sent something (naive: one per message).

Configurations:

1. handtrace on battery, no screenshots (120 s wakeups, 25 Hz coalescing + 1 px simplification);
2. handtrace on battery with event-driven screenshots (click / focus change, at most one per 30 s,
   960 px WebP, unchanged screens skipped by dHash; 8 MB/h budget where screenshots yield);
3. naive: every pointer sample, one message per event sent at once (no batching, no
   compression), a full-size PNG on every click and focus change.

Screenshots are rendered by a synthetic grab (a 1920x1080 page of text-like blocks per window and
scroll position): real screen content compresses differently, so the screenshot bytes are an
estimate of the mechanism, not of any particular desktop.

The X11 capture path (pynput's RECORD listener + the agent's emit) is measured apart, in the same
run: under Xvfb, another process injects pointer moves and keystrokes through XTEST, and the
capturing process's CPU per captured event is multiplied by the hour's raw events
(``--x11-events``; 0 skips it).

``--package`` measures the slim agent's .deb instead (issue #15, ADR 0019), built by
deploy/agent-deb.sh unless ``--deb`` names one: the .deb's size, its installed size (extracted
tree), the import time of the entry point + service + X11 backend on /usr/bin/python3 with the
package's libraries alone, and the installed agent's RSS after ``--settle`` seconds idle under a
fresh Xvfb against the real broker (consent recorded through the installed CLI first). Baseline in
the same run: the full install -- the `handtrace` distribution's dependency closure from this
venv's metadata, and the same agent run from it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from handtrace.core.admin import ensure_topics
from handtrace.core.localbroker import LocalBroker
from handtrace.core.procs import spawn_owned
from handtrace.core.settings import KafkaSettings, TopicSettings
from handtrace.core.topics import Topics

_US = 1_000_000
_MB = 1024 * 1024
T0 = 1_780_000_000 * _US
CHUNK_S = 60
TARGETS = {"cpu_pct": 1.0, "rss_mb": 80.0, "mb_per_hour_no_screens": 2.0, "mb_per_hour_screens": 10.0,
           "wakeups_per_hour": 120.0}
POLICY = Path(__file__).resolve().parent.parent / "deploy" / "policy.example.json"


# ---------------------------------------------------------------- workload


def make_workload(path: Path, minutes: int, seed: int) -> dict[str, Any]:
    """An hour (``minutes``) of raw backend events with the focused window at each, pickled per minute."""
    from handtrace.agent.sources.synthetic import SyntheticSource

    src = SyntheticSource(seed)
    kinds: dict[str, int] = {}
    with path.open("wb") as f:
        for m in range(minutes):
            chunk: list[tuple[dict[str, Any], tuple[Any, ...]]] = []

            def emit(ev: dict[str, Any], chunk: list[Any] = chunk) -> None:
                w = src.focused_window()
                chunk.append((ev, (w.app_id, w.title, w.url, w.window_id) if w else None))
                kinds[ev["kind"]] = kinds.get(ev["kind"], 0) + 1

            for s in range(CHUNK_S):
                t = T0 + (m * CHUNK_S + s) * _US
                src.drive(t, t + _US, emit)
            pickle.dump(chunk, f, protocol=pickle.HIGHEST_PROTOCOL)
    return {"events": sum(kinds.values()), "kinds": kinds, "focus_changes": src.focus_changes}


def read_chunks(path: Path):  # type: ignore[no-untyped-def]
    with path.open("rb") as f:
        while True:
            try:
                yield pickle.load(f)  # noqa: S301 -- our own file, written just before
            except EOFError:
                return


# ---------------------------------------------------------------- synthetic screen


def render_screen(title: str | None, url: str | None, scroll: int, size: tuple[int, int] = (1920, 1080)):  # type: ignore[no-untyped-def]
    """A deterministic 'page' for a window and scroll position: title bar, text-like lines."""
    import random

    from PIL import Image, ImageDraw

    img = Image.new("RGB", size, (250, 250, 250))
    d = ImageDraw.Draw(img)
    rng = random.Random(f"{title}|{url}|{scroll}")  # noqa: S311 -- picture, not security
    hue = random.Random(f"{title}").randrange(60, 200)  # noqa: S311
    d.rectangle((0, 0, size[0], 64), fill=(hue, 90, 160))
    d.text((24, 20), (title or "")[:80], fill=(255, 255, 255))
    y = 96
    while y < size[1] - 24:
        x = 48 + rng.randrange(0, 3) * 24
        for _ in range(rng.randrange(3, 14)):
            w = rng.randrange(20, 110)
            if x + w > size[0] - 48:
                break
            d.rectangle((x, y, x + w, y + 12), fill=(60, 60, 60))
            x += w + 9
        y += 22 if rng.random() > 0.12 else 44
    return img


# ---------------------------------------------------------------- child: the agent under test


class ReplaySource:
    """A backend whose focused window follows the workload (focus changes counted as the OS
    would notify them)."""

    name = "synthetic"

    def __init__(self) -> None:
        from handtrace.agent.capture import WindowInfo

        self._WindowInfo = WindowInfo
        self.window = None
        self.key: Any = None
        self.focus_changes = 0
        self.scroll = 0
        self.polls = 0

    def set(self, key: Any) -> None:
        if key != self.key:
            self.key = key
            self.focus_changes += 1
            self.window = (None if key is None else
                           self._WindowInfo(app_id=key[0], title=key[1], url=key[2], window_id=key[3],
                                            geometry=(0, 0, 1920, 1080)))

    def start(self, emit: Any) -> None:
        pass

    def stop(self) -> None:
        pass

    def focused_window(self) -> Any:
        self.polls += 1
        return self.window


class SimClock:
    def __init__(self, t: int) -> None:
        self.t = t

    def __call__(self) -> int:
        return self.t

    def seconds(self) -> float:
        return self.t / _US


def _peak_rss_mb() -> float:
    """Peak resident set size of this process image (VmHWM: unlike ru_maxrss it is not inherited
    from the parent across fork + exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child(config: str, workload: Path, bootstrap: str, prefix: str, minutes: int, tmp: Path) -> dict[str, Any]:
    cpu0 = _cpu_s()
    load_s = 0.0
    if config == "naive":
        return child_naive(workload, bootstrap, prefix, minutes, cpu0)
    from handtrace.agent.runtime import Agent
    from handtrace.agent.screenshots import ScreenshotConfig, Screenshotter
    from handtrace.agent.service import agent_producer_config
    from handtrace.agent.shipper import Shipper, TokenBucket
    from handtrace.agent.spool import Spool
    from handtrace.core.controls import policy_record
    from handtrace.core.policy import Policy
    from handtrace.core.settings import AgentSettings

    screens = config == "handtrace+screenshots"
    cfg = AgentSettings(employee_id="emp-bench", device_id="dev-bench", screenshots=screens)
    clock = SimClock(T0)
    topics = Topics.from_settings(TopicSettings(prefix=prefix))
    spool = Spool(tmp / f"spool-{config}", max_bytes=int(cfg.spool_max_mb * _MB), clock_us=clock)
    budget = TokenBucket(cfg.bandwidth_budget_mb_per_hour * _MB,
                         burst_bytes=int(cfg.bandwidth_budget_mb_per_hour * _MB / 12), clock=clock.seconds)
    shipper = Shipper(spool, agent_producer_config(KafkaSettings(bootstrap_servers=bootstrap)),
                      {"events": topics.events, "heartbeats": topics.heartbeats, "controls": topics.controls,
                       "screenshots": topics.screenshots}, budget=budget, clock=clock.seconds,
                      stats_interval_s=1.0)
    src = ReplaySource()
    shooter = None
    if screens:
        def grab(_geometry: Any) -> Any:
            # Drawing the synthetic screen stands in for the OS compositing it: not agent CPU.
            nonlocal load_s
            t_render = time.thread_time()
            w = src.window
            img = render_screen(w.title if w else None, w.url if w else None, src.scroll)
            load_s += time.thread_time() - t_render
            return img

        shooter = Screenshotter(ScreenshotConfig(max_width=cfg.screenshot_max_width, format=cfg.screenshot_format,
                                                 quality=cfg.screenshot_quality,
                                                 min_interval_s=cfg.screenshot_min_interval_s), grab=grab)
    policy = Policy.from_record(policy_record(POLICY, actor="bench")["policy"])
    agent = Agent(cfg, src, spool, shipper=shipper, screenshotter=shooter, policy=policy, clock=clock,
                  battery_fn=lambda: True, battery_info=lambda: (63.0, False))
    tick_us = int(cfg.focus_poll_s * _US)
    wake_us = int(cfg.battery_batch_interval_s * _US)
    next_tick, next_wake = T0 + tick_us, T0 + wake_us
    end = T0 + minutes * CHUNK_S * _US
    shipped = {"entries": 0, "payload": 0, "wakeups": 0}

    def run_until(t: int) -> None:
        nonlocal next_tick, next_wake
        while next_tick <= t:
            clock.t = next_tick
            agent.tick(next_tick)
            if next_tick >= next_wake:
                res = agent.wakeup(next_tick, ship_timeout_s=30)
                next_wake += wake_us
                if res is not None and res.entries_sent:
                    shipped["wakeups"] += 1
            next_tick += tick_us

    chunks = read_chunks(workload)
    while True:
        t_load = time.thread_time()  # reading the workload file is not the agent's cost
        items = next(chunks, None)
        load_s += time.thread_time() - t_load
        if items is None:
            break
        for ev, wkey in items:
            run_until(ev["captured_at_us"])
            clock.t = ev["captured_at_us"]
            src.set(wkey)
            if ev["kind"] == "scroll":
                src.scroll += 1
            agent.on_event(ev)
    run_until(end)
    clock.t = end
    agent.wakeup(end, ship_timeout_s=30)
    time.sleep(1.2)  # one more librdkafka statistics callback
    shipper.ship_once(5)
    st = shipper.stats
    spool_st = spool.stats()
    cpu = _cpu_s() - cpu0 - load_s
    out = {
        "config": config, "sim_s": minutes * CHUNK_S, "cpu_s": cpu,
        "rss_mb": _peak_rss_mb(),
        "payload_bytes": st.payload_bytes, "wire_bytes": st.wire_bytes, "wakeups": st.wakeups,
        "events_captured": agent.counters.events_captured, "events_sent": st.events_sent,
        "dropped": dict(agent.counters.events_dropped), "batches": agent.counters.batches_sealed,
        "screenshots": shooter.counters.__dict__ if shooter else None,
        "screenshots_deferred": st.screenshots_deferred, "spool_pending_entries": spool_st.depth_entries,
        "focus_polls": src.polls,
        "spool_pending_by_role": spool_st.depth_by_role,
    }
    shipper.close()
    spool.close()
    return out


def child_naive(workload: Path, bootstrap: str, prefix: str, minutes: int, cpu0: float) -> dict[str, Any]:
    """What a straightforward agent does: every raw sample, stamped and sent as its own message at
    once, plain Kafka defaults, a full-size PNG screenshot on every click and focus change."""
    import io

    from confluent_kafka import Producer

    from handtrace import __version__
    from handtrace.core import codec, ids

    topics = Topics.from_settings(TopicSettings(prefix=prefix))
    tx = {"bytes": 0}

    def on_stats(raw: str) -> None:
        tx["bytes"] = json.loads(raw).get("tx_bytes", tx["bytes"])

    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 0,
                  "statistics.interval.ms": 1000, "stats_cb": on_stats})
    payload = messages = events = shots = 0
    last_key: Any = ("<start>",)
    scroll = 0
    load_s = 0.0
    chunks = read_chunks(workload)
    seq = 0
    while True:
        t_load = time.thread_time()
        chunk = next(chunks, None)
        load_s += time.thread_time() - t_load
        if chunk is None:
            break
        for ev, wkey in chunk:
            ev = dict(ev)
            if wkey is not None:
                ev["app_id"], ev["url"] = wkey[0], wkey[2]
            if ev["kind"] == "scroll":
                scroll += 1
            shot = wkey is not None and (wkey != last_key or (ev["kind"] == "click" and ev.get("pressed")))
            last_key = wkey
            ev["event_id"] = ids.uuid7_bytes(ev["captured_at_us"] // 1000)
            seq += 1
            header = {"batch_id": ids.uuid7_bytes(ev["captured_at_us"] // 1000), "employee_id": "emp-naive",
                      "device_id": "dev-naive", "agent_version": __version__, "os": "synthetic", "seq": seq,
                      "sent_at_us": ev["captured_at_us"]}
            value = codec.encode_event_batch(header, [ev])
            p.produce(topics.events, key=b"emp-naive", value=value)
            payload += len(value) + 9
            messages += 1
            events += 1
            if shot:
                buf = io.BytesIO()
                t_render = time.thread_time()
                img = render_screen(wkey[1], wkey[2], scroll)
                load_s += time.thread_time() - t_render
                img.save(buf, format="PNG")
                p.produce(topics.screenshots, key=b"emp-naive", value=buf.getvalue())
                payload += buf.tell() + 9
                messages += 1
                shots += 1
            p.poll(0)
    p.flush(60)
    time.sleep(1.2)
    p.poll(0.5)
    return {"config": "naive", "sim_s": minutes * CHUNK_S, "cpu_s": _cpu_s() - cpu0 - load_s,
            "rss_mb": _peak_rss_mb(), "payload_bytes": payload,
            "wire_bytes": tx["bytes"], "wakeups": messages, "events_captured": events, "events_sent": events,
            "screenshots": {"taken": shots}}


# ---------------------------------------------------------------- X11 capture path


def x11_child(display: str, expect: int, out: Path) -> dict[str, Any]:
    """Capture with the real X11 backend until ``expect`` events arrived; CPU per event."""
    import threading

    from handtrace.agent.sources.x11 import X11Source

    got = {"n": 0}
    done = threading.Event()

    def emit(_ev: dict[str, Any]) -> None:
        got["n"] += 1
        if got["n"] >= expect:
            done.set()

    src = X11Source(display=display)
    src.start(emit)
    out.write_text("ready")
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    done.wait(120)
    cpu = _cpu_s() - cpu0
    wall = time.perf_counter() - t0
    src.stop()
    # What one focus poll costs: a real top-level window with WM_CLASS and a title, focused.
    import Xlib.display
    import Xlib.X

    d = Xlib.display.Display(display)
    screen = d.screen()
    win = screen.root.create_window(100, 100, 640, 400, 0, screen.root_depth)
    win.set_wm_class("code", "Code")
    win.set_wm_name(b"main.py - Code")
    win.map()
    d.sync()
    time.sleep(0.2)
    win.set_input_focus(Xlib.X.RevertToParent, Xlib.X.CurrentTime)
    d.sync()
    polls = 1000
    found = src.focused_window()
    cpu0 = _cpu_s()
    for _ in range(polls):
        src.focused_window()
    poll_s = (_cpu_s() - cpu0) / polls
    d.close()
    return {"events": got["n"], "cpu_s": cpu, "wall_s": wall, "rss_mb": _peak_rss_mb(), "poll_cpu_s": poll_s,
            "poll_found": found.app_id if found else None}


def inject(display: str, moves: int, keys: int) -> None:
    """Real input through XTEST (as xdotool does), paced at ~1 kHz, from this process."""
    import Xlib.display
    import Xlib.ext.xtest
    import Xlib.X

    d = Xlib.display.Display(display)
    code = d.keysym_to_keycode(ord("a"))
    for i in range(moves):
        Xlib.ext.xtest.fake_input(d, Xlib.X.MotionNotify, x=100 + i % 800, y=100 + (i * 7) % 500)
        if i % 50 == 0:
            d.sync()
            time.sleep(0.05)
    for i in range(keys):
        Xlib.ext.xtest.fake_input(d, Xlib.X.KeyPress if i % 2 == 0 else Xlib.X.KeyRelease, code)
        if i % 50 == 0:
            d.sync()
            time.sleep(0.05)
    d.sync()
    d.close()


@contextlib.contextmanager
def xvfb_display() -> Iterator[str]:
    """A fresh Xvfb (owned: it dies with this process); yields its display name."""
    import shutil
    import signal

    xvfb = shutil.which("Xvfb")
    if xvfb is None:
        raise RuntimeError("Xvfb is not installed (apt-get install xvfb) -- or pass --x11-events 0")
    r, w = os.pipe()
    proc = spawn_owned([xvfb, "-displayfd", str(w), "-screen", "0", "1280x800x24", "-nolisten", "tcp",
                        "-noreset"], pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
    os.close(w)
    try:
        digits = b""
        while not digits.endswith(b"\n"):
            chunk = os.read(r, 16)
            if not chunk:
                raise RuntimeError("Xvfb did not start")
            digits += chunk
        yield f":{int(digits)}"
    finally:
        os.close(r)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def x11_capture_cost(root: Path, n_events: int) -> dict[str, Any]:
    """Run the X11 backend under a fresh Xvfb against injected input; CPU seconds per event."""
    with xvfb_display() as display:
        moves, keys = n_events * 3 // 4, n_events - n_events * 3 // 4
        keys -= keys % 2
        ready = root / "x11.ready"
        child = spawn_owned(
            [sys.executable, "-m", "bench.agent_footprint", "--x11-child", display, "--x11-events", str(moves + keys),
             "--tmp", str(ready)], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
        deadline = time.monotonic() + 30
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the X11 capture child did not start")
            time.sleep(0.05)
        inject(display, moves, keys)
        out, _ = child.communicate(timeout=180)
        return json.loads(out.strip().splitlines()[-1]) | {"injected": moves + keys}


# ---------------------------------------------------------------- the slim package (issue #15)

REPO = Path(__file__).resolve().parent.parent
AGENT_IMPORTS = "handtrace.agent.cli, handtrace.agent.service, handtrace.agent.sources.x11"
PACKAGE_TARGETS = {"installed_mb": 60.0, "rss_idle_mb": 50.0}


def _du(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _full_install_bytes() -> int:
    """Installed bytes of the full `handtrace` distribution's runtime dependency closure (the
    baseline: what a laptop would carry with `pip install handtrace`), from this venv's metadata."""
    from importlib.metadata import PackageNotFoundError, distribution

    from packaging.requirements import Requirement

    seen: set[str] = set()
    todo = ["handtrace"]
    total = 0
    while todo:
        name = todo.pop()
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        for f in dist.files or []:
            path = Path(str(f.locate()))
            if name != "handtrace" and path.is_file():
                total += path.stat().st_size
        for r in dist.requires or []:
            req = Requirement(r)
            key = req.name.lower().replace("_", "-")
            if (req.marker is None or req.marker.evaluate({"extra": ""})) and key not in seen:
                seen.add(key)
                todo.append(key)
    return total + _du(REPO / "services" / "handtrace")


def _import_s(python: list[str], env: dict[str, str], runs: int = 5) -> float:
    """Median wall seconds to import the agent (entry point, service, X11 backend) in a fresh process."""
    code = f"import time; t = time.perf_counter(); import {AGENT_IMPORTS}; print(time.perf_counter() - t)"
    times = []
    for _ in range(runs):
        out = subprocess.run([*python, "-c", code], env=env, capture_output=True, text=True, timeout=120, check=True)
        times.append(float(out.stdout.strip()))
    return sorted(times)[runs // 2]


def _rss_idle(argv: list[str], env: dict[str, str], settle_s: float, log: Path) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB of the agent after ``settle_s`` of no input."""
    import signal

    with log.open("wb") as f:
        proc = spawn_owned(argv, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        time.sleep(settle_s)
        if proc.poll() is not None:
            raise RuntimeError(f"the agent exited: {log.read_text(errors='replace')[-2000:]}")
        status = Path(f"/proc/{proc.pid}/status").read_text()
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in status.splitlines())
              if k in ("VmRSS", "VmHWM")}
        return kb["VmRSS"] / 1024, kb["VmHWM"] / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def package_footprint(root: Path, bootstrap: str, deb: Path | None, settle_s: float) -> dict[str, Any]:
    """The .deb (built by deploy/agent-deb.sh unless given): its size, installed size, import time
    and idle RSS of the installed agent under Xvfb against the real broker -- each next to the
    same agent from the full install (this venv) as the baseline."""
    if deb is None:
        t = time.perf_counter()
        out = subprocess.run([str(REPO / "deploy" / "agent-deb.sh"), str(root / "deb")], capture_output=True,
                             text=True, timeout=1800, env={**os.environ, "PYTHON": sys.executable}, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"deploy/agent-deb.sh failed: {out.stderr[-2000:]}")
        deb = Path(out.stdout.strip().splitlines()[-1])
        print(f"package: built {deb.name} in {time.perf_counter() - t:.0f} s", flush=True)
    tree = root / "pkg"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tree)], check=True)
    home = tree / "opt" / "handtrace-agent"
    lib = home / "lib"
    r: dict[str, Any] = {"deb_bytes": deb.stat().st_size, "installed_bytes": _du(tree),
                         "full_install_bytes": _full_install_bytes()}
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HANDTRACE_", "PYTHON"))}
    # python -I ignores PYTHONPATH: the slim import runs with the package's lib alone on the path.
    slim_py = ["/usr/bin/python3", "-I", "-B", "-S", "-c"]
    code = (f"import sys, time; sys.path.insert(0, {str(lib)!r}); t = time.perf_counter(); "
            f"import {AGENT_IMPORTS}; print(time.perf_counter() - t)")
    times = sorted(float(subprocess.run([*slim_py, code], env=clean, capture_output=True, text=True, timeout=120,
                                        check=True).stdout) for _ in range(5))
    r["import_s"] = times[2]
    r["full_import_s"] = _import_s([sys.executable], clean | {"PYTHONPATH": str(REPO / "services")})
    state = root / "state"
    policy = REPO / "deploy" / "policy.example.json"
    prefix = f"fp-{uuid.uuid4().hex[:6]}"
    ensure_topics(KafkaSettings(bootstrap_servers=bootstrap), TopicSettings(prefix=prefix, partitions=1))
    agent_env = {"HANDTRACE_KAFKA__BOOTSTRAP_SERVERS": bootstrap, "HANDTRACE_TOPICS__PREFIX": prefix,
                 "HANDTRACE_AGENT__EMPLOYEE_ID": "bench", "HANDTRACE_AGENT__POLICY_FILE": str(policy),
                 "HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE": "false", "HANDTRACE_AGENT__SOURCE": "x11"}
    with xvfb_display() as display:
        env = clean | agent_env | {"DISPLAY": display, "HOME": str(root / "home"), "HANDTRACE_AGENT_HOME": str(home),
                                   "HANDTRACE_AGENT_ENV_FILE": "/nonexistent", "HANDTRACE_STATE_DIR": str(state),
                                   "HANDTRACE_AGENT_SYSTEMD": "0"}
        launcher = str(tree / "usr" / "bin" / "handtrace-agent")
        subprocess.run([launcher, "consent"], env=env | {"HANDTRACE_CONSENT_STDIN": "1"}, input="yes\n", text=True,
                       capture_output=True, check=True, timeout=60)
        r["rss_idle_mb"], r["rss_peak_mb"] = _rss_idle([launcher, "run"], env, settle_s, root / "slim.log")
        full_env = env | {"PYTHONPATH": str(REPO / "services"), "HANDTRACE_STATE_DIR": str(root / "state-full")}
        r["full_rss_idle_mb"], r["full_rss_peak_mb"] = _rss_idle(
            [sys.executable, "-m", "handtrace.agent.cli", "run"], full_env, settle_s, root / "full.log")
    r["settle_s"] = settle_s
    return r


def package_report(r: dict[str, Any], info: str) -> str:
    mb = 1_000_000
    inst, rss = r["installed_bytes"] / mb, r["rss_idle_mb"]
    return "\n".join([
        f"machine: {info}",
        "",
        "| | slim .deb (/usr/bin/python3, /opt/handtrace-agent) | full install (`handtrace` + deps, this venv) "
        "| ratio |",
        "|---|---|---|---|",
        f"| package (.deb) MB | {r['deb_bytes'] / mb:.1f} | -- | -- |",
        f"| installed MB | {inst:.1f} | {r['full_install_bytes'] / mb:.1f} | "
        f"{r['full_install_bytes'] / r['installed_bytes']:.1f}x smaller |",
        f"| import s (entry point + service + X11 backend, median of 5) | {r['import_s']:.3f} | "
        f"{r['full_import_s']:.3f} | {r['full_import_s'] / r['import_s']:.2f}x |",
        f"| RSS idle MB (X11, no input, {r['settle_s']:g} s after start, real broker) | {rss:.1f} | "
        f"{r['full_rss_idle_mb']:.1f} | {r['full_rss_idle_mb'] / rss:.2f}x |",
        f"| peak RSS MB (VmHWM) | {r['rss_peak_mb']:.1f} | {r['full_rss_peak_mb']:.1f} | -- |",
        "",
        f"installed {inst:.1f} MB (target <= {PACKAGE_TARGETS['installed_mb']:.0f}): "
        f"{'met' if inst <= PACKAGE_TARGETS['installed_mb'] else 'NOT met'}; RSS idle {rss:.1f} MB "
        f"(target <= {PACKAGE_TARGETS['rss_idle_mb']:.0f}): "
        f"{'met' if rss <= PACKAGE_TARGETS['rss_idle_mb'] else 'NOT met'}",
    ])


# ---------------------------------------------------------------- parent


def per_hour(r: dict[str, Any], key: str) -> float:
    return r[key] * 3600 / r["sim_s"]


def report(results: list[dict[str, Any]], info: str, wl: dict[str, Any], x11: dict[str, Any] | None = None) -> str:
    lines = [f"machine: {info}",
             f"workload: {wl['events']:,} raw events in {wl['minutes']} simulated minutes "
             f"({', '.join(f'{k} {v:,}' for k, v in sorted(wl['kinds'].items()))}), "
             f"{wl['focus_changes']} focus changes",
             "",
             "| configuration | CPU % of one core | peak RSS MB | MB uploaded / hour (wire) | payload MB / hour "
             "| wakeups / hour | events sent / hour | screenshots |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        shots = r.get("screenshots") or {}
        lines.append(
            f"| {r['config']} | {100 * r['cpu_s'] / r['sim_s']:.3f} | {r['rss_mb']:.1f} "
            f"| {per_hour(r, 'wire_bytes') / _MB:.2f} | {per_hour(r, 'payload_bytes') / _MB:.2f} "
            f"| {per_hour(r, 'wakeups'):.0f} | {per_hour(r, 'events_sent'):,.0f} | {shots.get('taken', 0)} |")
    by = {r["config"]: r for r in results}
    hn, hs, nv = by.get("handtrace"), by.get("handtrace+screenshots"), by.get("naive")
    lines.append("")
    if hn and nv:
        lines.append(f"naive / handtrace (no screenshots): CPU {nv['cpu_s'] / max(hn['cpu_s'], 1e-9):.1f}x, "
                     f"wire bytes {nv['wire_bytes'] / max(hn['wire_bytes'], 1):.0f}x, "
                     f"wakeups {nv['wakeups'] / max(hn['wakeups'], 1):.0f}x")
    checks = []
    for r in (hn, hs):
        if r is None:
            continue
        cpu = 100 * r["cpu_s"] / r["sim_s"]
        mb = per_hour(r, "wire_bytes") / _MB
        limit = TARGETS["mb_per_hour_screens" if r is hs else "mb_per_hour_no_screens"]
        wk = per_hour(r, "wakeups")

        def verdict(ok: bool) -> str:
            return "met" if ok else "NOT met"

        checks += [
            f"{r['config']}: CPU {cpu:.3f}% (target <= {TARGETS['cpu_pct']}%): {verdict(cpu <= TARGETS['cpu_pct'])}",
            f"{r['config']}: RSS {r['rss_mb']:.1f} MB (target <= {TARGETS['rss_mb']:.0f}): "
            f"{verdict(r['rss_mb'] <= TARGETS['rss_mb'])}",
            f"{r['config']}: {mb:.2f} MB/hour (target <= {limit}): {verdict(mb <= limit)}",
            f"{r['config']}: {wk:.0f} wakeups/hour on battery (target <= {TARGETS['wakeups_per_hour']:.0f}): "
            f"{verdict(wk <= TARGETS['wakeups_per_hour'])}",
        ]
    lines += checks
    if x11 is not None:
        polls = (hs or hn or {}).get("focus_polls", 0)
        poll_pct = 100 * polls * x11["poll_cpu_s"] / wl["minutes"] / CHUNK_S
        lines.append(f"X11 focus polls: {polls:,} in the hour (busy ticks every 0.25 s, idle every 2 s), "
                     f"{1e6 * x11['poll_cpu_s']:.0f} us CPU each ({x11['poll_found']} window) -> "
                     f"{poll_pct:.3f}% of a core")
        x11["cpu_pct_for_workload"] += poll_pct
        total = x11["cpu_pct_for_workload"] + (100 * hs["cpu_s"] / hs["sim_s"] if hs else 0.0)
        lines.append(f"X11 capture path (pynput RECORD -> emit, Xvfb, XTEST input from another process): "
                     f"{x11['events']:,}/{x11['injected']:,} events captured, {x11['us_per_event']:.1f} us CPU per "
                     f"event + focus polls -> {x11['cpu_pct_for_workload']:.3f}% of a core for this workload's "
                     f"{wl['events']:,} events; capture + handtrace with screenshots {total:.3f}% "
                     f"(target <= {TARGETS['cpu_pct']}%): {'met' if total <= TARGETS['cpu_pct'] else 'NOT met'}; "
                     f"capture process peak RSS {x11['rss_mb']:.1f} MB")
    for r in results:
        extra = {k: r[k] for k in ("dropped", "screenshots", "screenshots_deferred", "spool_pending_by_role",
                                   "batches") if k in r}
        lines.append(f"{r['config']} details: {json.dumps(extra, sort_keys=True)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=int, default=60, help="simulated minutes of activity (default an hour)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--configs", nargs="*", default=["handtrace", "handtrace+screenshots", "naive"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    ap.add_argument("--x11-events", type=int, default=4000,
                    help="events injected for the X11 capture-path measure (0: skip it)")
    ap.add_argument("--package", action="store_true", help="measure the slim .deb instead (issue #15): installed "
                    "size, import time and idle RSS of the installed agent vs the full install")
    ap.add_argument("--deb", type=Path, default=None, help="with --package: this .deb (default: build one with "
                    "deploy/agent-deb.sh)")
    ap.add_argument("--settle", type=float, default=20.0, help="with --package: seconds idle before RSS is read")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--x11-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--bootstrap", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--prefix", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", type=Path, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.workload, a.bootstrap, a.prefix, a.minutes, a.tmp)))
        return 0
    if a.x11_child:
        print(json.dumps(x11_child(a.x11_child, a.x11_events, a.tmp)))
        return 0

    from bench.stream_throughput import machine_info, start_broker

    info = machine_info()
    print(info, flush=True)
    root = Path(tempfile.mkdtemp(prefix="ht-footprint-"))
    broker: LocalBroker | None = None
    results: list[dict[str, Any]] = []
    try:
        broker = start_broker(root)
        if a.package:
            r = package_footprint(root, broker.bootstrap, a.deb, a.settle)
            print("\n" + package_report(r, info))
            if a.json:
                a.json.write_text(json.dumps({"machine": info, "package": r}, indent=2))
            return 0
        wl_path = root / "workload.pkl"
        t = time.perf_counter()
        wl = make_workload(wl_path, a.minutes, a.seed)
        wl["minutes"] = a.minutes
        print(f"workload: {wl['events']:,} raw events in {a.minutes} min, generated in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        for config in a.configs:
            prefix = f"fp-{uuid.uuid4().hex[:6]}"
            ensure_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), TopicSettings(prefix=prefix, partitions=1))
            t = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, "-m", "bench.agent_footprint", "--child", config, "--workload", str(wl_path),
                 "--bootstrap", broker.bootstrap, "--prefix", prefix, "--minutes", str(a.minutes),
                 "--tmp", str(root)],
                capture_output=True, text=True, timeout=1800, cwd=Path(__file__).resolve().parent.parent,
                env={**os.environ, "PYTHONHASHSEED": "0"})
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
                raise RuntimeError(f"configuration {config} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t
            results.append(r)
            print(f"{config}: {r['wall_s']:.1f} s wall, CPU {100 * r['cpu_s'] / r['sim_s']:.3f}%, "
                  f"{per_hour(r, 'wire_bytes') / _MB:.2f} MB/h wire", flush=True)
        x11 = None
        if a.x11_events:
            x11 = x11_capture_cost(root, a.x11_events)
            x11["us_per_event"] = 1e6 * x11["cpu_s"] / max(x11["events"], 1)
            x11["cpu_pct_for_workload"] = 100 * x11["us_per_event"] * wl["events"] / 1e6 / (a.minutes * CHUNK_S)
            print(f"x11 capture path: {x11['events']:,} of {x11['injected']:,} injected events captured, "
                  f"{x11['us_per_event']:.1f} us CPU per event", flush=True)
        text = report(results, info, wl, x11)
        print("\n" + text)
        if a.json:
            a.json.write_text(json.dumps({"machine": info, "workload": wl, "results": results, "x11": x11},
                                         indent=2))
    finally:
        if broker is not None:
            broker.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
