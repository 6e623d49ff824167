"""The endpoint agent: capture -> local policy -> coalesce -> batch -> spool -> ship.

Threads (all thin; the logic lives in methods a test or benchmark can drive with its own clock):

- the capture backend's thread(s) call :meth:`Agent.on_event` -- it only checks the capture state
  (paused / exempt events are counted and forgotten there, so a pause takes effect at once) and
  appends to a list;
- a *tick* every ``focus_poll_s`` (:meth:`Agent.tick`): reads the focused window once, decides
  with the local policy, stamps and masks the events, adds focus changes and screenshots, and
  seals a batch into the spool when it is full;
- a *wakeup* every batch interval -- longer on battery (:meth:`Agent.wakeup`): seals the batch,
  adds a heartbeat when one is due, reads the control plane, and ships the spool. One wakeup is
  one burst of radio use; nothing else sends.

Privacy properties (tests in tests/unit/test_agent_runtime.py and tests/integration/test_agent_*):
nothing captured while paused or exempt, nothing of a non-allowlisted window, nothing from a
window whose identity is ambiguous (focus changed within one tick: fail closed), typed content
masked per app and nothing of a password field -- all decided before the spool, so excluded
data never touches the disk or the network.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from handtrace import __version__
from handtrace.agent.capture import CaptureSource, Event, WindowInfo
from handtrace.agent.coalesce import coalesce_moves
from handtrace.agent.health import AgentCounters, HeartbeatBuilder, on_battery
from handtrace.agent.localpolicy import SAMPLED_OUT, LocalPolicy
from handtrace.agent.spool import Spool, SpoolEntry
from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.controls import MAX_PAUSE_MINUTES, control_record
from handtrace.core.policy import Policy
from handtrace.core.settings import AgentSettings

Mode = Literal["capturing", "paused", "exempt"]
AMBIGUOUS_FOCUS = "ambiguous_focus"
_US = 1_000_000


_BURST_GAP_US = 2 * _US
_BURST_HOLD_MAX_US = 30 * _US
_KEY_KINDS = ("key_down", "key_up")


def _burst_start(events: list[Event], now: int) -> int | None:
    """Index of the first event of the typing burst still going on at ``now`` (sorted events),
    or None when the last keystroke is ``_BURST_GAP_US`` old or more."""
    last: int | None = None
    start: int | None = None
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e["kind"] not in _KEY_KINDS:
            continue
        t = e["captured_at_us"]
        if (now if last is None else last) - t >= _BURST_GAP_US:
            break
        last, start = t, i
    return start


class AgentError(ValueError):
    """A request the agent refuses; the message says why (shown to the employee)."""


def default_device_id() -> str:
    """A stable, non-identifying device id: a hash of /etc/machine-id (or the host name)."""
    try:
        seed = Path("/etc/machine-id").read_text().strip()
    except OSError:
        seed = ""
    seed = seed or socket.gethostname()
    return "dev-" + hashlib.sha256(f"handtrace:{seed}".encode()).hexdigest()[:16]


def _window_key(w: WindowInfo | None) -> tuple[Any, ...] | None:
    # What makes two observations "the same window" for attribution: a title change alone
    # (a new document name) is not a focus change; another window, app, page or a password
    # field is.
    if w is None:
        return None
    return (w.window_id, w.app_id, w.url, w.password_field)


@dataclass
class Status:
    """What `handtrace status` shows."""

    mode: Mode
    employee_id: str
    device_id: str
    source: str
    paused_until_us: int | None
    exempt_since_us: int | None
    policy_version: int
    focused_app: str | None
    focused_allowed: bool | None
    events_captured: int
    events_sent: int
    events_dropped: dict[str, int]
    spool_events: int
    spool_bytes: int
    on_battery: bool
    exemption_requested: bool
    version: str = __version__

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Agent:
    """One laptop's agent. Construct, :meth:`start`, and :meth:`stop`; or drive :meth:`on_event`,
    :meth:`tick` and :meth:`wakeup` yourself with an explicit clock (tests, the footprint
    benchmark)."""

    def __init__(self, cfg: AgentSettings, source: CaptureSource, spool: Spool, *,
                 shipper: Any | None = None, follower: Any | None = None,
                 screenshotter: Any | None = None, policy: Policy | None = None,
                 clock: Callable[[], int] = now_us, battery_fn: Callable[[], bool] = on_battery,
                 battery_info: Any | None = None) -> None:
        if not cfg.employee_id:
            raise AgentError("no employee id: set HANDTRACE_AGENT__EMPLOYEE_ID (or --employee)")
        self.cfg = cfg
        self.employee_id = cfg.employee_id
        self.device_id = cfg.device_id or default_device_id()
        self.source = source
        self.spool = spool
        self.shipper = shipper
        self.follower = follower
        self.screenshotter = screenshotter
        self.clock = clock
        self.on_battery = battery_fn
        self.counters = AgentCounters()
        self.started_at_us = clock()
        hb_kw = {"battery_fn": battery_info} if battery_info is not None else {}
        self.health = HeartbeatBuilder(employee_id=self.employee_id, device_id=self.device_id,
                                       cohort=cfg.cohort, os=source.name, started_at_us=self.started_at_us,
                                       **hb_kw)
        self.local = LocalPolicy(policy)
        if follower is not None and follower.policy is not None:
            fp = follower.policy
            if policy is None or fp.version >= policy.version:
                self.local = LocalPolicy(fp)
        self._lock = threading.RLock()
        self._raw: list[Event] = []
        self._pending: list[Event] = []
        self._mode: Mode = "capturing"
        self._pause_start_us: int | None = None
        self._pause_until_us: int | None = None
        self._exempt_since_us: int | None = None
        self._exemption_requested = False
        self._last_window: WindowInfo | None = None
        self._last_key: tuple[Any, ...] | None = ("<start>",)
        self._last_poll_us = -(1 << 62)
        self._last_key_changes: int | None = None
        self._last_allowed: bool | None = None
        self._next_heartbeat_us = self.started_at_us
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._source_running = False
        self.last_error: str | None = None
        # Demonstrations (issue #11): set by service.build_agent (agent/demonstrations.py). The
        # recorder gets what this tick keeps *before* sampling, and every pause/exemption.
        self.recorder: Any | None = None
        if follower is not None and follower.state.exempt_from_us is not None:
            self._apply_exemption(follower.state.exempt_from_us, start_source=False)

    # ---------------------------------------------------------------- capture thread
    def on_event(self, ev: Event) -> None:
        """Called by the capture backend for every raw event (any thread)."""
        mode = self._mode
        if mode != "capturing":
            self.counters.drop(mode)
            return
        with self._lock:
            if self._mode != "capturing":
                self.counters.drop(self._mode)
                return
            self._raw.append(ev)

    # ---------------------------------------------------------------- controls
    def pause(self, minutes: float, *, reason: str = "") -> int:
        """Pause capture now for ``minutes`` (at most 30); returns the auto-resume time."""
        if not 0 < minutes <= MAX_PAUSE_MINUTES:
            raise AgentError(f"a pause lasts more than 0 and at most {MAX_PAUSE_MINUTES} minutes "
                             f"(asked {minutes:g}); capture resumes by itself at the end")
        if self._mode == "capturing":
            self.tick()  # attribute what was captured before the pause, as any tick would
        with self._lock:
            if self._mode == "exempt":
                raise AgentError("capture is off for good: an exemption is in force")
            now = self.clock()
            start = now if self._mode != "paused" else (self._pause_start_us or now)
            until = now + int(minutes * 60 * _US)
            until = min(until, start + MAX_PAUSE_MINUTES * 60 * _US)
            self._mode = "paused"
            self._pause_start_us = start
            self._pause_until_us = until
            if self.recorder is not None:  # demonstrations: nothing of the pause either
                self.recorder.suspend(start)
            # Events captured at or after the pause start never leave memory.
            self._drop_from(start, "paused")
            kept = [e for e in self._pending if e["captured_at_us"] < start]
            self.counters.drop("paused", len(self._pending) - len(kept))
            self._pending = kept
            self._spool_control(control_record(
                "pause_start", employee_id=self.employee_id, actor=self.employee_id, role="employee",
                reason=reason, at_us=now, pause_starts_at_us=start, pause_ends_at_us=until))
            return until

    def resume(self, *, auto: bool = False) -> None:
        """End a pause now (or at its planned end when ``auto``)."""
        with self._lock:
            if self._mode != "paused":
                if auto:
                    return
                raise AgentError("capture is not paused")
            now = self.clock()
            end = min(now, self._pause_until_us or now) if auto else now
            self._spool_control(control_record(
                "pause_end", employee_id=self.employee_id,
                actor="agent" if auto else self.employee_id, role="system" if auto else "employee",
                reason="auto-resume" if auto else "", at_us=now,
                pause_starts_at_us=self._pause_start_us, pause_ends_at_us=end))
            self._mode = "capturing"
            self._pause_start_us = self._pause_until_us = None
            self._last_key = ("<resumed>",)  # the next tick re-announces the focused window
            if self.recorder is not None:
                self.recorder.capture_resumed()

    def request_exemption(self, reason: str) -> None:
        """Send an exemption request to HR (capture continues until it is granted)."""
        if not reason.strip():
            raise AgentError("an exemption request needs a reason (--reason)")
        with self._lock:
            self._spool_control(control_record(
                "exemption_request", employee_id=self.employee_id, actor=self.employee_id,
                role="employee", reason=reason, at_us=self.clock()))
            self._exemption_requested = True

    def _apply_exemption(self, since_us: int | None, *, start_source: bool = True) -> None:
        with self._lock:
            if since_us is not None and self._mode != "exempt":
                self._mode = "exempt"
                self._exempt_since_us = since_us
                self._pause_start_us = self._pause_until_us = None
                self._drop_from(since_us, "exempt")
                dropped_pending = len(self._pending)
                self._pending = [e for e in self._pending if e["captured_at_us"] < since_us]
                self.counters.drop("exempt", dropped_pending - len(self._pending))
                stop_source = self._source_running
                if self.recorder is not None:  # demonstrations: the recording ends at since_us
                    self.recorder.exempt(since_us)
            elif since_us is None and self._mode == "exempt":
                self._mode = "capturing"
                self._exempt_since_us = None
                self._exemption_requested = False
                self._last_key = ("<resumed>",)
                stop_source = False
            else:
                return
        # The backend stops entirely while exempt: no hooks, no CPU, nothing to filter.
        if stop_source:
            self.source.stop()
            self._source_running = False
        elif start_source and self._mode == "capturing" and not self._source_running and self._threads:
            self.source.start(self.on_event)
            self._source_running = True

    def _drop_from(self, start_us: int, reason: str) -> None:
        kept = [e for e in self._raw if e["captured_at_us"] < start_us]
        self.counters.drop(reason, len(self._raw) - len(kept))
        self._raw = kept

    def _spool_control(self, rec: dict[str, Any]) -> None:
        self.spool.append(SpoolEntry("controls", self.employee_id.encode(),
                                     codec.encode_record("control_event", rec), 0))

    # ---------------------------------------------------------------- tick
    def tick(self, now: int | None = None) -> None:
        """Attribute the events since the last tick to the focused window, apply the local
        policy, and buffer what may be kept."""
        now = self.clock() if now is None else now
        with self._lock:
            if self._mode == "paused" and self._pause_until_us is not None and now >= self._pause_until_us:
                self.resume(auto=True)
            raw, self._raw = self._raw, []
            capturing = self._mode == "capturing"
            if not capturing:
                self.counters.drop(self._mode, len(raw))
        if not capturing:
            if self.recorder is not None:  # demonstrations: auto-stop still runs; no frames
                self.recorder.poll(now, capturing=False)
            return
        self.counters.add(events_captured=len(raw))
        kept: list[Event] = []
        demo: list[Event] | None = [] if self.recorder is not None and self.recorder.recording else None
        notified = getattr(self.source, "focus_changes", 0) != self._last_key_changes
        if raw or notified or now - self._last_poll_us >= self.cfg.focus_idle_poll_s * _US:
            kept = self._attribute(raw, now, demo)
        # else: no input and no focus notification since the last poll, nothing to attribute:
        # skip the X round trips (the next input after an unseen change is dropped as ambiguous).
        if self.recorder is not None:  # demonstrations: what this tick kept, then a frame if due
            if demo:
                self.recorder.record(demo, now)
            self.recorder.poll(now)
        if demo is not None and kept:
            # While a demonstration records, what is captured belongs to it alone: the employee
            # reviews, trims or deletes it before anything leaves the laptop, so passive capture
            # must not hold a second copy that the review cannot reach.
            self.counters.drop("demonstration", len(kept))
            kept = []
        with self._lock:
            if kept and self._mode == "capturing":
                self._pending.extend(kept)
            elif kept:
                self.counters.drop(self._mode, len(kept))
            due = bool(self._pending) and (
                len(self._pending) >= self.cfg.max_batch_events
                or now - self._pending[0]["captured_at_us"] >= self.cfg.durable_after_s * _US)
        if due:
            # Sealed batches are durable (kill -9 loses at most durable_after_s of capture);
            # they wait in the spool for the next wakeup, so this costs no radio use.
            self.seal(now)

    def _attribute(self, raw: list[Event], now: int, demo: list[Event] | None = None) -> list[Event]:
        """Read the focused window once and keep what of ``raw`` the local policy allows (and,
        into ``demo`` when a demonstration is recording, the same before sampling)."""
        w = self.source.focused_window()
        self._last_poll_us = now
        decision = self.local.window(w)
        # A backend that sees focus changes as they happen (not only by polling) counts them in
        # ``focus_changes``: then a switch away and back within one tick is caught too.
        self._last_key_changes = getattr(self.source, "focus_changes", 0)
        key = (_window_key(w), self._last_key_changes)
        kept: list[Event] = []
        if key != self._last_key:
            # Focus moved since the last tick: which window got these events is unknowable.
            self.counters.drop(AMBIGUOUS_FOCUS, len(raw))
            if decision.allowed and w is not None:
                kept.append({"kind": "focus_change", "captured_at_us": now, "app_id": w.app_id,
                             "window_title": self.local.clean_title(w.title), "url": decision.url})
                if demo is not None:
                    demo.append(kept[-1])
                self._screenshot(w, "focus_change", now, kept)
            self._last_key = key
        elif not decision.allowed:
            self.counters.drop(decision.reason or "not_allowed", len(raw))
        elif w is not None:
            kept.extend(self._admit(raw, w, decision, now, demo))
        self._last_window = w
        self._last_allowed = decision.allowed
        return kept

    def _admit(self, raw: list[Event], w: WindowInfo, decision: Any, now: int,
               demo: list[Event] | None = None) -> list[Event]:
        out: list[Event] = []
        clicked = False
        sampled_out = 0
        dropped_password = 0
        password = self.local.password_context(w)
        for ev in raw:
            ev["app_id"] = w.app_id
            if decision.url is not None:
                ev["url"] = decision.url
            kind = ev["kind"]
            if kind in ("key_down", "key_up"):
                masked = self.local.mask_key(ev, decision.text, password_field=password)
                if masked is None:
                    dropped_password += 1
                    continue
            if demo is not None:  # demonstrations are not sampled (issue #11)
                demo.append(ev)
            if not self.local.keep_sampled(ev, self.device_id):
                sampled_out += 1
                continue
            if kind == "click" and ev.get("pressed"):
                clicked = True
            out.append(ev)
        self.counters.drop("password_field", dropped_password)
        self.counters.drop(SAMPLED_OUT, sampled_out)
        if clicked:
            self._screenshot(w, "click", now, out)
        return out

    def _screenshot(self, w: WindowInfo, reason: str, now: int, out: list[Event]) -> None:
        if self.screenshotter is None or not self.cfg.screenshots:
            return
        if self.recorder is not None and self.recorder.recording:
            return  # a demonstration records its own frames, reviewed before upload
        try:
            shot = self.screenshotter.maybe_capture(w, reason, now)
        except Exception:  # noqa: BLE001 -- a screenshot failure must never stop capture
            self.counters.drop("screenshot_error")
            return
        if shot is None:
            return
        event_id = ids.uuid7_bytes(now // 1000)
        out.append({"kind": "screenshot", "captured_at_us": now, "event_id": event_id,
                    "app_id": w.app_id, "url": self.local.window(w).url,
                    "screenshot_sha256": shot.sha256, "screenshot_bytes": len(shot.image),
                    "screenshot_format": shot.fmt, "screenshot_width": shot.width,
                    "screenshot_height": shot.height})
        url = self.local.window(w).url
        headers = (("ht-sha256", shot.sha256.hex().encode()), ("ht-format", shot.fmt.encode()),
                   ("ht-event-id", event_id), ("ht-captured-at-us", str(now).encode()),
                   ("ht-device-id", self.device_id.encode()), ("ht-app-id", (w.app_id or "").encode()),
                   ("ht-url", (url or "").encode()))
        self.spool.append(SpoolEntry("screenshots", self.employee_id.encode(), shot.image, 0, headers))
        self.counters.add(screenshots_taken=1)

    # ---------------------------------------------------------------- batches
    def seal(self, now: int | None = None, *, force: bool = False) -> int:
        """Seal the buffered events into one EventBatch in the spool; returns its event count.

        A typing burst still going on at ``now`` (keys less than 2 s apart, the last one less
        than 2 s ago) is held back for the next batch, unless ``force`` or it is older than 30 s:
        the stream redacts PII per batch, and an address typed across two batches would reach
        it in halves."""
        now = self.clock() if now is None else now
        with self._lock:
            events, self._pending = self._pending, []
        if not events:
            return 0
        events.sort(key=lambda e: e["captured_at_us"])
        start = None if force else _burst_start(events, now)
        if start is not None and now - events[start]["captured_at_us"] < _BURST_HOLD_MAX_US:
            events, held = events[:start], events[start:]
            with self._lock:
                self._pending = held + self._pending
            if not events:
                return 0
        events = coalesce_moves(events, max_hz=self.cfg.pointer_max_hz,
                                epsilon_px=self.cfg.pointer_simplify_px)
        for ev in events:
            if "event_id" not in ev:
                ev["event_id"] = ids.uuid7_bytes(ev["captured_at_us"] // 1000)
        block = codec.encode_events_block(events)
        batch_id = ids.uuid7_bytes(now // 1000)

        def entry(seq: int) -> SpoolEntry:
            # The batch's seq is the spool's: monotonic per device across restarts.
            header = {"batch_id": batch_id, "employee_id": self.employee_id, "device_id": self.device_id,
                      "agent_version": __version__, "os": self.source.name, "cohort": self.cfg.cohort,
                      "seq": seq, "sent_at_us": now}
            payload = codec.encode_event_batch(header, block=block, count=len(events))
            return SpoolEntry("events", self.employee_id.encode(), payload, len(events))

        self.spool.append_with(entry)
        self.counters.add(batches_sealed=1)
        return len(events)

    def batch_interval_s(self) -> float:
        """Seconds between wakeups now (longer on battery)."""
        return self.cfg.battery_batch_interval_s if self.on_battery() else self.cfg.batch_interval_s

    @property
    def mode(self) -> Mode:
        """capturing, paused or exempt."""
        return self._mode

    # ---------------------------------------------------------------- wakeup
    def wakeup(self, now: int | None = None, *, ship_timeout_s: float = 10.0) -> Any:
        """One burst of radio use: seal, heartbeat when due, read controls, ship the spool."""
        now = self.clock() if now is None else now
        # Controls first: an exemption granted since the last wakeup drops what is still in
        # memory from its effective time before anything more is sealed.
        self.read_controls()
        self.tick(now)
        self.seal(now)
        if now >= self._next_heartbeat_us:
            self.spool.append(SpoolEntry("heartbeats", self.device_id.encode(), self.heartbeat(now), 0))
            self._next_heartbeat_us = now + int(self.cfg.heartbeat_interval_s * _US)
        if self.shipper is None:
            return None
        result = self.shipper.ship_once(ship_timeout_s)
        if result.entries_sent:
            self.counters.add(radio_wakeups=1, events_sent=result.events_sent,
                              payload_bytes_sent=result.payload_bytes,
                              wire_bytes_sent=getattr(result, "wire_bytes", 0) or 0)
        return result

    def read_controls(self, timeout_s: float = 5.0, *, start_source: bool = True) -> bool:
        """Read what the control plane published since the last read (policy, this employee's
        exemption) and apply it; True when something changed. Only at a wakeup or at start."""
        if self.follower is None or not self.cfg.follow_control_plane or not self.follower.refresh(timeout_s):
            return False
        if self.follower.policy is not None and self.follower.policy.version >= self.local.version:
            self.local = LocalPolicy(self.follower.policy)
        self._apply_exemption(self.follower.state.exempt_from_us, start_source=start_source)
        return True

    def heartbeat(self, now: int) -> bytes:
        """The encoded Heartbeat for now."""
        st = self.spool.stats()
        lost = dict(st.dropped_events)
        lost["spool_quarantined"] = st.quarantined
        lost["spool_deadlettered"] = st.deadlettered_events
        return self.health.encode(at_us=now, state=self._mode, counters=self.counters,
                                  spool_events=st.depth_events, spool_bytes=st.depth_bytes, spool_dropped=lost)

    def status(self) -> Status:
        """What the local `status` command shows."""
        st = self.spool.stats()
        w = self._last_window
        with self.counters._lock:
            dropped = dict(self.counters.events_dropped)
        return Status(
            mode=self._mode, employee_id=self.employee_id, device_id=self.device_id,
            source=self.source.name, paused_until_us=self._pause_until_us,
            exempt_since_us=self._exempt_since_us, policy_version=self.local.version,
            focused_app=w.app_id if w else None, focused_allowed=self._last_allowed,
            events_captured=self.counters.events_captured, events_sent=self.counters.events_sent,
            events_dropped=dropped, spool_events=st.depth_events, spool_bytes=st.depth_bytes,
            on_battery=self.on_battery(), exemption_requested=self._exemption_requested)

    # ---------------------------------------------------------------- threads
    def start(self) -> None:
        """Start capture and the tick and wakeup threads. The control plane is read first (for
        at most ``controls_at_start_s``): a laptop that was off when the policy changed or an
        exemption was granted applies them before it captures anything (docs/adr/0014). Offline,
        the cached controls stay in force (none cached: nothing is captured, fails closed)."""
        self._stop.clear()
        if self.cfg.controls_at_start_s > 0:
            self.read_controls(self.cfg.controls_at_start_s, start_source=False)
        if self._mode != "exempt":
            self.source.start(self.on_event)  # CaptureUnavailable: nothing started, nothing to undo
            self._source_running = True
        self._threads = [threading.Thread(target=self._tick_loop, name="agent-tick", daemon=True),
                         threading.Thread(target=self._wakeup_loop, name="agent-wakeup", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, *, final_ship_timeout_s: float = 5.0, deadline: float | None = None) -> bool:
        """Stop capture, seal what is buffered into the spool, try one last shipment. With
        ``deadline`` (time.monotonic()), everything here ends by then (a SIGTERM grace period):
        a wakeup still waiting for an unreachable broker is left behind with the shipper, and
        there is no last shipment -- sealed batches stay in the spool either way. Returns
        whether the worker threads ended (the shipper is then free to close)."""
        self._stop.set()
        if self._source_running:
            self.source.stop()
            self._source_running = False
        for t in self._threads:
            if t.ident is not None:
                left = 30.0 if deadline is None else max(deadline - time.monotonic(), 0.0)
                t.join(timeout=left)
        idle = not any(t.is_alive() for t in self._threads)
        self._threads = []
        self.tick()
        self.seal(force=True)
        if deadline is not None:
            final_ship_timeout_s = min(final_ship_timeout_s, deadline - time.monotonic())
        if self.shipper is not None and idle and final_ship_timeout_s > 0:
            try:
                self.shipper.ship_once(final_ship_timeout_s)
            except Exception as e:  # noqa: BLE001 -- whatever is unsent stays in the spool
                self.last_error = f"{type(e).__name__}: {e}"
        return idle

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.cfg.focus_poll_s):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 -- count and keep capturing; never a crash loop
                self.counters.drop("tick_error")

    def _wakeup_loop(self) -> None:
        delay = min(self.batch_interval_s(), 5.0)  # first contact soon after start
        while not self._stop.wait(delay):
            t0 = time.monotonic()
            try:
                result = self.wakeup()
                backoff = getattr(result, "next_delay_s", 0) or 0
            except Exception as e:  # noqa: BLE001 -- offline or broker trouble: retry next time
                self.last_error = f"{type(e).__name__}: {e}"
                backoff = 0
            interval = self.batch_interval_s()
            delay = max(backoff, interval - (time.monotonic() - t0), 0.5)
