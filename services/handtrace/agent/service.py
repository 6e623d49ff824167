"""Assembling and running the endpoint agent from settings: backend, spool, shipper, control-plane
follower, screenshots, local control socket."""

from __future__ import annotations

import ctypes
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from handtrace.agent.capture import CaptureSource
from handtrace.agent.controlplane import ControlPlaneFollower
from handtrace.agent.demo_upload import DemoUploader
from handtrace.agent.demonstrations import DemoRecorder
from handtrace.agent.localsock import ControlServer
from handtrace.agent.runtime import Agent, AgentError, default_device_id
from handtrace.agent.shipper import Shipper, TokenBucket
from handtrace.agent.spool import Spool
from handtrace.core.controls import ControlError, policy_record
from handtrace.core.policy import Policy
from handtrace.core.producer import producer_config
from handtrace.core.settings import KafkaSettings, Settings
from handtrace.core.signing import KeyConfigError, Signer, device_signer, load_or_create_key, verifier
from handtrace.core.topics import Topics

_MB = 1024 * 1024


def agent_dir(settings: Settings) -> Path:
    """Where the agent keeps its state (spool, control-plane cache, socket)."""
    return settings.state_dir / "agent"


def socket_path(settings: Settings) -> Path:
    """The local control socket path in force."""
    return settings.agent.socket_path or agent_dir(settings) / "agent.sock"


def device_key_path(settings: Settings) -> Path:
    """Where this laptop's device key lives (generated there at first start, 0600)."""
    return settings.agent.device_key_path or agent_dir(settings) / "device.key"


def device_id_of(settings: Settings) -> str:
    """This laptop's device id in force."""
    return settings.agent.device_id or default_device_id()


def device_key_signer(settings: Settings) -> Signer:
    """This laptop's signer for the employee's own controls (its key never leaves the laptop;
    the control plane enrolls its public key: `handtrace agent device-key`)."""
    return device_signer(device_id_of(settings), load_or_create_key(device_key_path(settings)))


def agent_producer_config(kafka: KafkaSettings) -> dict[str, Any]:
    """The shared producer settings, made quiet for a laptop between wakeups: no metadata refresh
    every 5 minutes (librdkafka's default) and slow reconnect attempts while the broker is away."""
    return producer_config(kafka, **{"topic.metadata.refresh.interval.ms": 30 * 60 * 1000,
                                     "reconnect.backoff.max.ms": 60_000})


def open_capture_source(settings: Settings, *, seed: int = 0) -> CaptureSource:
    """The capture backend named by ``HANDTRACE_AGENT__SOURCE``."""
    name = settings.agent.source
    if name == "synthetic":
        try:
            from handtrace.agent.sources.synthetic import SyntheticSource
        except ImportError as e:  # the slim agent (packaging/agent) has no numpy/polars
            from handtrace.agent.capture import CaptureUnavailable

            raise CaptureUnavailable(f"the synthetic source is a simulation for development: it needs the "
                                     f"full handtrace distribution ({e})") from None

        return SyntheticSource(seed)
    from handtrace.agent.sources import open_source

    kw: dict[str, Any] = {}
    if settings.agent.display and name in ("x11", "auto"):
        kw["display"] = settings.agent.display
    return open_source(name, **kw)


def initial_policy(settings: Settings) -> Policy | None:
    """The policy file's policy, if one is configured (validated: every problem at once)."""
    path = settings.agent.policy_file
    if path is None:
        return None
    try:
        rec = policy_record(path, actor="agent")
    except ControlError as e:
        raise AgentError(f"HANDTRACE_AGENT__POLICY_FILE: {e}") from e
    return Policy.from_record(rec["policy"])


def build_agent(settings: Settings, *, source: CaptureSource | None = None,
                clock: Callable[[], int] | None = None) -> Agent:
    """An :class:`Agent` wired to the spool, the broker and the control plane per ``settings``."""
    cfg = settings.agent
    if not cfg.employee_id:
        raise AgentError("no employee id: set HANDTRACE_AGENT__EMPLOYEE_ID (or pass --employee)")
    topics = Topics.from_settings(settings.topics)
    base = agent_dir(settings)
    spool_dir = cfg.spool_dir or base / "spool"
    max_bytes = int(cfg.spool_max_mb * _MB)
    spool = Spool(spool_dir, max_bytes=max_bytes, segment_bytes=max(64 * 1024, min(4 * _MB, max_bytes // 8)))
    budget = TokenBucket(cfg.bandwidth_budget_mb_per_hour * _MB,
                         burst_bytes=int(max(cfg.bandwidth_budget_mb_per_hour * _MB / 12, 256 * 1024)))
    shipper = Shipper(spool, agent_producer_config(settings.kafka), {
        "events": topics.events, "heartbeats": topics.heartbeats, "controls": topics.controls,
        "screenshots": topics.screenshots}, budget=budget, control_signer=device_key_signer(settings))
    follower = None
    if cfg.follow_control_plane:
        try:
            check = verifier(settings)
        except KeyConfigError as e:
            raise AgentError(f"{e} (or HANDTRACE_AGENT__FOLLOW_CONTROL_PLANE=false)") from None
        follower = ControlPlaneFollower(settings.kafka.librdkafka(), policy_topic=topics.policy,
                                        controls_topic=topics.controls, employee_id=cfg.employee_id,
                                        state_path=base / "controlplane.json", verifier=check,
                                        max_clock_offset_s=settings.stream.max_clock_offset_s)
    screenshotter = None
    if cfg.screenshots:
        from handtrace.agent.screenshots import ScreenshotConfig, Screenshotter

        shot_cfg = ScreenshotConfig(max_width=cfg.screenshot_max_width, format=cfg.screenshot_format,
                                    quality=cfg.screenshot_quality, min_interval_s=cfg.screenshot_min_interval_s)
        kw: dict[str, Any] = {}
        if cfg.source in ("x11", "auto") and cfg.display:
            kw["display"] = cfg.display
        screenshotter = Screenshotter(shot_cfg, **kw) if cfg.source != "synthetic" else None
    src = source or open_capture_source(settings)
    extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
    agent = Agent(cfg, src, spool, shipper=shipper, follower=follower, screenshotter=screenshotter,
                  policy=initial_policy(settings), **extra)
    agent.recorder = build_recorder(settings, agent)
    return agent


# --------------------------------------------------------------------- demonstrations (issue #11)
def demo_dir(settings: Settings) -> Path:
    """Where recordings wait for review and upload (laptop only)."""
    return settings.demo.dir or agent_dir(settings) / "demonstrations"


def build_recorder(settings: Settings, agent: Agent, *,
                   capturer_factory: Callable[[], Any] | None = None,
                   segmenter_factory: Callable[[], Any] | None = None) -> DemoRecorder:
    """The agent's demonstration recorder; frames and actions come from agent/frames.py and
    agent/actions.py unless factories are given (tests)."""
    return DemoRecorder(
        settings.demo, demo_dir(settings), employee_id=agent.employee_id, device_id=agent.device_id,
        os_name=agent.source.name, cohort=settings.agent.cohort,
        capturer_factory=capturer_factory or _frame_capturer_factory(settings, agent),
        segmenter_factory=segmenter_factory or _segmenter_factory(),
        mode_fn=lambda: agent.mode, policy_version_fn=lambda: agent.local.version, clock=agent.clock,
        pointer_max_hz=settings.agent.pointer_max_hz, pointer_simplify_px=settings.agent.pointer_simplify_px)


# App ids of browsers (X11 WM_CLASS instance, macOS bundle id, Windows exe): their windows need a
# URL to be judged, so a non-focused one (URL unknown) is filled in demonstration frames.
KNOWN_BROWSERS = ("firefox", "firefox-esr", "navigator", "google-chrome", "chromium", "chromium-browser",
                  "brave-browser", "microsoft-edge", "vivaldi-stable", "opera", "org.mozilla.firefox",
                  "com.google.chrome", "com.apple.safari", "com.microsoft.edgemac", "chrome.exe",
                  "firefox.exe", "msedge.exe")


def _frame_capturer_factory(settings: Settings, agent: Agent) -> Callable[[], Any] | None:
    """A factory of the real FrameCapturer (agent/frames.py), imported lazily (mss and the X
    connection only when a recording starts); without a display (synthetic source) or a
    backend that lists visible windows, recordings hold events and steps without frames.
    """
    if settings.agent.source == "synthetic":
        return None
    source = agent.source

    def make() -> Any:
        from handtrace.agent import frames  # type: ignore[attr-defined,unused-ignore]

        visible = getattr(source, "visible_windows", None)
        if visible is None:
            return None

        # A browser window that is not focused has no known URL: it is filled unless its app is
        # allowed without a domain check (PolicyDecide; fails closed for apps seen with a URL).
        decide = frames.PolicyDecide(lambda: agent.local, url_apps=KNOWN_BROWSERS)

        def windows() -> Any:  # backends know url / password field for the focused window only
            focused = source.focused_window()
            decide.observe(focused)
            return frames.stamp_focused(visible(), focused)

        grab = frames.ScreenGrab(settings.agent.display)
        capturer = frames.FrameCapturer(frames.FrameConfig.from_settings(settings.demo), grab, windows, decide,
                                        clock=agent.clock, scale=grab.scale)
        return capturer

    return make


def _segmenter_factory() -> Callable[[], Any] | None:
    """A factory of the real ActionSegmenter (agent/actions.py), imported lazily (see above)."""
    try:
        from handtrace.agent import actions  # type: ignore[attr-defined,unused-ignore]
    except ImportError:
        return None
    factory: Callable[[], Any] | None = getattr(actions, "ActionSegmenter", None)
    return factory


def build_uploader(settings: Settings, agent: Agent) -> DemoUploader | None:
    """The uploader of submitted demonstrations (None without a recorder)."""
    if agent.recorder is None:
        return None
    topics = Topics.from_settings(settings.topics)
    uploader = DemoUploader(agent.recorder.store, settings.demo, agent_producer_config(settings.kafka),
                            topics.demonstrations, battery_fn=agent.on_battery, clock=agent.clock)
    agent.recorder.on_submit = uploader.wake
    return uploader


SHUTDOWN_BUDGET_S = 5.0
"""Seconds from SIGTERM/SIGINT to a closed spool, whatever the broker does (a 10 s grace period)."""


def tune_malloc() -> bool:
    """Keep the agent's memory from creeping up with frame-sized buffers (glibc only; a no-op
    elsewhere). Demonstration frames allocate and free ~6-8 MB buffers every second from two
    threads: glibc's default raises its mmap threshold after the first free (later buffers then
    come from the heap and fragment it) and gives each thread its own arena. A fixed 128 KiB
    threshold (large buffers always mmapped, returned on free) and two arenas cut the recording
    agent's peak RSS (docs/BENCHMARKS.md, demonstration footprint). Returns whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_mmap_threshold, m_arena_max = -3, -8  # from glibc's malloc.h
        return bool(libc.mallopt(m_mmap_threshold, 128 * 1024)) and bool(libc.mallopt(m_arena_max, 2))
    except (OSError, AttributeError):  # not glibc (musl, ...)
        return False


def run_agent(settings: Settings, *, stop: threading.Event | None = None,
              on_started: Callable[[Agent, Path], None] | None = None) -> Agent:
    """Run the agent until SIGINT/SIGTERM (or ``stop``); everything unsent stays in the spool."""
    stop = stop or threading.Event()
    if settings.agent.require_consent:
        from handtrace.agent.consent import ConsentError, read_consent

        try:
            read_consent(settings)
        except ConsentError as e:
            raise AgentError(str(e)) from None
    tune_malloc()
    agent = build_agent(settings)
    uploader = build_uploader(settings, agent)
    server = ControlServer(agent, socket_path(settings), uploader=uploader)
    server.start()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
    try:
        agent.start()
        if uploader is not None:  # demonstrations: its own thread, one upload at a time
            uploader.start()
        if on_started is not None:
            on_started(agent, server.path)
        while not stop.wait(0.5):
            pass
    finally:
        # Everything below ends within SHUTDOWN_BUDGET_S of the signal, broker or not (issue
        # #10): what is not delivered by then stays in the spool for the next start.
        deadline = time.monotonic() + SHUTDOWN_BUDGET_S
        server.stop()
        if uploader is not None:  # an upload cut short is re-sent whole at the next start
            uploader.stop(min(1.0, max(deadline - time.monotonic(), 0.0)))
        if agent.recorder is not None:
            agent.recorder.close()
        idle = agent.stop(deadline=deadline)
        if agent.follower is not None and idle:
            agent.follower.close()
        if agent.shipper is not None and idle:
            agent.shipper.close(max(deadline - time.monotonic(), 0.0))
        agent.spool.close()
    return agent
