"""Demonstration recordings on the laptop (agent/demonstrations.py), driven through the real Agent
(a fake backend, the real local policy): what a recording holds, review (list/show/trim/delete),
submit, expiry and recovery after kill -9. The frame capturer and the action segmenter (another
work package) are small fakes with the contract's interface."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.agent.capture import WindowInfo
from handtrace.agent.demonstrations import (
    DemoError,
    DemoRecorder,
    encode_header,
    referenced_frames,
    step_ranges,
)
from handtrace.agent.localsock import ControlServer
from handtrace.agent.runtime import Agent
from handtrace.core import codec
from handtrace.core.policy import Policy
from handtrace.core.settings import DemoSettings
from tests.unit.test_agent_runtime import (
    CHROME_EVIL,
    CODE,
    PASSWORD,
    PERSONAL,
    POLICY,
    Clock,
    FakeSource,
    S,
    key,
    make_agent,
    move,
    settle,
    spooled,
)

MS = 1000


@dataclass(frozen=True)
class FakeFrame:
    image: bytes
    fmt: str
    sha256: bytes
    width: int
    height: int
    captured_at_us: int
    windows: list[dict[str, Any]] = field(default_factory=list)
    filled: list[dict[str, Any]] = field(default_factory=list)


def fake_frame(t: int, tag: str = "", size: int = 0) -> FakeFrame:
    img = f"PNG-{t}-{tag}".encode() * 10 + (os.urandom(size) if size else b"")
    return FakeFrame(img, "png", hashlib.sha256(img).digest(), 1280, 800, t,
                     [{"app_id": "code", "url": None, "x": 0, "y": 0, "width": 800, "height": 600}],
                     [{"x": 800, "y": 0, "width": 480, "height": 800}])


class FakeCapturer:
    """A ring of 'distinct' frames, one per poll at most every ``interval_us``."""

    def __init__(self, interval_us: int = 200 * MS, frame_bytes: int = 0) -> None:
        self.frame_bytes = frame_bytes
        self.ring: list[FakeFrame] = []
        self.interval_us = interval_us
        self.resets = 0
        self.polls: list[int] = []

    def poll(self, now_us: int) -> None:
        self.polls.append(now_us)
        if not self.ring or now_us - self.ring[-1].captured_at_us >= self.interval_us:
            self.ring = [*self.ring[-15:], fake_frame(now_us, size=self.frame_bytes)]

    def frame_before(self, t_us: int) -> FakeFrame | None:
        before = [f for f in self.ring if f.captured_at_us < t_us]
        return before[-1] if before else None

    def final_frame(self, now_us: int) -> FakeFrame | None:
        return fake_frame(now_us, "end", self.frame_bytes)

    def reset(self) -> None:
        self.ring = []
        self.resets += 1


@dataclass
class FakeAction:
    kind: str
    started_at_us: int


class FakeSegmenter:
    """Click press -> click (a drag once the pointer moves > 5 px before the release, as the real
    one: the action object changes after it was returned); scroll -> scroll; a key after >= 1 s
    without keys -> typing."""

    def __init__(self) -> None:
        self.last_key = -(1 << 62)
        self.pressed: tuple[FakeAction, int, int] | None = None

    def feed_all(self, events: list[dict[str, Any]]) -> list[FakeAction]:
        out = []
        for e in events:
            k, t = e["kind"], e["captured_at_us"]
            if k == "pointer_move" and self.pressed and max(abs(e["x"] - self.pressed[1]),
                                                            abs(e["y"] - self.pressed[2])) > 5:
                self.pressed[0].kind = "drag"
            if k == "click" and not e.get("pressed"):
                self.pressed = None
            if k == "click" and e.get("pressed"):
                out.append(FakeAction("click", t))
                self.pressed = (out[-1], e["x"], e["y"])
            elif k == "scroll":
                out.append(FakeAction("scroll", t))
            elif k == "key_down":
                if t - self.last_key >= S:
                    out.append(FakeAction("typing", t))
                self.last_key = t
        return out


def click(t: int, x: int = 5, y: int = 5) -> dict[str, Any]:
    return {"kind": "click", "captured_at_us": t, "x": x, "y": y, "button": "left", "pressed": True}


def scroll(t: int) -> dict[str, Any]:
    return {"kind": "scroll", "captured_at_us": t, "x": 1, "y": 1, "scroll_dy": 1}


class Rig:
    def __init__(self, tmp_path: Path, policy: Policy | None = POLICY, capturer: bool = True, *,
                 root: Path | None = None, frame_bytes: int = 0, **demo: Any) -> None:
        self.agent, self.src, self.clock, self.spool = make_agent(tmp_path, policy=policy)
        self.capturers: list[FakeCapturer] = []
        self.frame_bytes = frame_bytes
        self.root = root or tmp_path / "demos"
        self.cfg = DemoSettings(**demo)
        self.with_capturer = capturer
        self.rec = self.new_recorder()
        self.agent.recorder = self.rec
        settle(self.agent, self.clock)

    def new_recorder(self) -> DemoRecorder:
        def capturer() -> FakeCapturer:
            c = FakeCapturer(frame_bytes=self.frame_bytes)
            self.capturers.append(c)
            return c

        agent = self.agent
        return DemoRecorder(self.cfg, self.root, employee_id="emp-1", device_id="dev-1", os_name="synthetic",
                            capturer_factory=capturer if self.with_capturer else None,
                            segmenter_factory=FakeSegmenter, mode_fn=lambda: agent.mode,
                            policy_version_fn=lambda: agent.local.version, clock=self.clock)

    def feed(self, *events: dict[str, Any], dt: int = 300 * MS) -> None:
        """Deliver events (timestamps relative to now), then one tick ``dt`` later."""
        for e in events:
            self.agent.on_event(e)
        self.clock.t += dt
        self.agent.tick()

    def idle(self, seconds: float, step: int = 250 * MS) -> None:
        end = self.clock.t + int(seconds * S)
        while self.clock.t < end:
            self.clock.t += step
            self.agent.tick()

    def act(self, ev_fn: Any, n: int = 1) -> None:
        """One action per tick: a few moves then the action, with idle ticks in between (frames)."""
        for _ in range(n):
            self.idle(0.5)
            t = self.clock.t
            ev = ev_fn(t + 50 * MS)
            release = [{**ev, "captured_at_us": t + 70 * MS, "pressed": False}] if ev["kind"] == "click" else []
            self.feed(move(t + 10 * MS), move(t + 20 * MS, 30, 40), ev, *release)

    def events(self, rid: str) -> list[dict[str, Any]]:
        return self.rec.store.read_events(rid)

    def meta(self, rid: str) -> dict[str, Any]:
        return self.rec.store.load_meta(rid)


def recorded(rig: Rig, clicks: int = 3, typing: bool = True) -> str:
    rid = rig.rec.start("file the travel expense for the Berlin trip")["id"]
    rig.act(click, clicks)
    if typing:
        rig.idle(1.5)
        t = rig.clock.t
        rig.feed(key(t + 10 * MS, "a", ord("a")), key(t + 60 * MS, "b", ord("b")))
    rig.act(scroll)
    rig.idle(0.5)
    rig.rec.stop()
    return rid


# ------------------------------------------------------------------ start / stop / show
def test_a_recording_holds_the_kept_events_steps_and_a_frame_strictly_before_each_action(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig)
    meta = rig.meta(rid)
    assert meta["status"] == "stopped" and meta["stop_reason"] == "stopped"
    kinds = [s["kind"] for s in meta["steps"]]
    assert kinds == ["click", "click", "click", "typing", "scroll"]
    assert [s["index"] for s in meta["steps"]] == list(range(5))
    evs = rig.events(rid)
    by_id = {e["event_id"]: e for e in evs}
    for s in meta["steps"]:
        f = s["frame"]
        assert f is not None and f["captured_at_us"] < s["started_at_us"]  # no future leakage
        assert by_id[s["event_id"]]["captured_at_us"] == s["started_at_us"]  # the action's first event
        assert s["app_id"] == "code"
        data = rig.rec.store.read_frame(rid, f["sha256"], f["format"])
        assert hashlib.sha256(data).hexdigest() == f["sha256"] and len(data) == f["bytes"]
    assert meta["end_frame"] is not None and meta["screen"] == {"width": 1280, "height": 800, "scale": 1.0}
    assert meta["events"] == len(evs) and {e["kind"] for e in evs} >= {"click", "scroll", "key_down", "pointer_move"}
    assert all(meta["started_at_us"] <= e["captured_at_us"] <= meta["ended_at_us"] for e in evs)
    assert meta["apps"] == ["code"]
    # Frames exist on disk exactly as referenced.
    files = {p.name for p in (rig.root / rid / "frames").iterdir()}
    assert files == {f"{f['sha256']}.png" for f in referenced_frames(meta)}
    shown = rig.rec.show(rid[:8])
    assert [s["action"] for s in shown["steps_detail"]] == kinds
    assert sum(s["events"] for s in shown["steps_detail"]) <= len(evs)
    assert all(s["frame"]["bytes"] > 0 and s["to_s"] > s["from_s"] for s in shown["steps_detail"])
    listed = rig.rec.recordings()
    assert [r["id"] for r in listed] == [rid] and listed[0]["steps"] == 5 and listed[0]["frames"] == 6


def test_while_recording_captured_input_belongs_to_the_demonstration_alone(tmp_path: Path) -> None:
    # Delete and trim must leave nothing of the removed steps anywhere: passive capture may not
    # hold a second copy of what the employee reviews.
    rig = Rig(tmp_path)
    rid = recorded(rig, clicks=2, typing=False)
    rig.agent.seal(force=True)
    passive = spooled(rig.spool)
    demo = rig.events(rid)
    meta = rig.rec.show(rid)
    assert {e["kind"] for e in demo} >= {"click"}
    assert {r["event_id"].hex() for r in passive}.isdisjoint({e["event_id"] for e in demo})
    t0 = meta["started_at_us"]
    during = [r for r in passive if r["kind"] != "focus_change" and r["captured_at_us"] >= t0]
    assert during == []
    assert rig.agent.counters.events_dropped.get("demonstration", 0) > 0


def test_start_refusals_say_why(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(DemoError, match="needs a task instruction"):
        rig.rec.start("   ")
    with pytest.raises(DemoError, match="at most 500"):
        rig.rec.start("x" * 501)
    rig.agent.pause(5)
    with pytest.raises(DemoError, match="paused"):
        rig.rec.start("do it")
    rig.agent.resume()
    rig.rec.start("do it")
    with pytest.raises(DemoError, match="already running"):
        rig.rec.start("again")
    rig.rec.stop()
    with pytest.raises(DemoError, match="no recording is running"):
        rig.rec.stop()
    rig.agent._apply_exemption(rig.clock.t)
    with pytest.raises(DemoError, match="exemption"):
        rig.rec.start("do it")
    off = Rig(tmp_path / "off", enabled=False)
    with pytest.raises(DemoError, match="disabled"):
        off.rec.start("do it")
    nopol = Rig(tmp_path / "nopol", policy=None)
    with pytest.raises(DemoError, match="no capture policy"):
        nopol.rec.start("do it")


def test_a_recording_stops_by_itself_after_max_minutes(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_minutes=0.05)  # 3 s
    rid = rig.rec.start("short task")["id"]
    rig.act(click)
    rig.idle(4)
    assert not rig.rec.recording
    meta = rig.meta(rid)
    assert meta["status"] == "stopped" and meta["stop_reason"] == "max_minutes"
    assert meta["ended_at_us"] == meta["started_at_us"] + 3 * S
    n = len(rig.events(rid))
    rig.act(click, 2)
    assert len(rig.events(rid)) == n  # nothing after the stop


def test_auto_stop_runs_while_paused_too(tmp_path: Path) -> None:
    rig = Rig(tmp_path, max_minutes=0.05)
    rig.rec.start("short task")
    rig.agent.pause(1)
    rig.idle(4)
    assert not rig.rec.recording


# ------------------------------------------------------------------ privacy: same rules as passive
def test_only_allowlisted_windows_reach_a_recording(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("mixed windows")["id"]
    rig.act(click)
    for w in (PERSONAL, CHROME_EVIL):
        rig.src.window = w
        rig.feed()  # the focus change tick
        rig.act(click, 2)
        t = rig.clock.t
        rig.feed(key(t + 5 * MS, "s", ord("s")))
    rig.src.window = CODE
    rig.feed()
    rig.act(click)
    rig.rec.stop()
    evs = rig.events(rid)
    assert {e.get("app_id") for e in evs} == {"code"}
    assert not any("evil" in json.dumps(e) or "telegram" in json.dumps(e) for e in evs)
    meta = rig.meta(rid)
    assert meta["apps"] == ["code"] and len(meta["steps"]) == 2


def test_password_field_keystrokes_are_never_stored(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("log in")["id"]
    rig.src.window = PASSWORD
    rig.feed()
    rig.idle(1.5)
    t = rig.clock.t
    typed = "hunter2XYZ"
    rig.feed(*[key(t + i * 30 * MS, ch, ord(ch)) for i, ch in enumerate(typed)])
    rig.idle(1)
    rig.rec.stop()
    evs = rig.events(rid)
    assert not [e for e in evs if e["kind"] in ("key_down", "key_up")]
    assert b"XYZ" not in (rig.root / rid / "events.jsonl").read_bytes()
    assert not [s for s in rig.meta(rid)["steps"] if s["kind"] == "typing"]


def test_masked_text_stays_masked_in_a_recording(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    chrome = WindowInfo("google-chrome", "Docs", url="https://docs.google.com/d/1", window_id=9)
    rid = rig.rec.start("type in chrome (text none)")["id"]
    rig.src.window = chrome
    rig.feed()
    rig.idle(1.5)
    t = rig.clock.t
    rig.feed(*[key(t + i * 30 * MS, ch, ord(ch)) for i, ch in enumerate("QWERTY")])
    rig.rec.stop()
    keys = [e for e in rig.events(rid) if e["kind"] == "key_down"]
    assert keys and all(e.get("text") is None and e["text_masked"] for e in keys)
    assert b"QWERTY" not in (rig.root / rid / "events.jsonl").read_bytes()


def test_a_recording_is_not_sampled(tmp_path: Path) -> None:
    sampled = Policy.from_record({"version": 4, "allowed_apps": ["code"], "allowed_domains": [],
                                  "sampling": {"agent:*": 0.0}, "text_capture": {"*": "full"}})
    rig = Rig(tmp_path, policy=sampled)
    rid = recorded(rig, clicks=2, typing=False)
    rig.agent.seal(force=True)
    assert not [r for r in spooled(rig.spool) if r["kind"] == "click"]  # passive: sampled out
    assert len([e for e in rig.events(rid) if e["kind"] == "click" and e["pressed"]]) == 2


def test_nothing_of_a_pause_inside_a_recording(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("with a break")["id"]
    rig.act(click)
    cap = rig.capturers[0]
    assert cap.ring
    pause_at = rig.clock.t
    rig.agent.pause(1)
    assert cap.resets == 1 and not cap.ring  # the frame ring is dropped
    for i in range(5):
        rig.agent.on_event(click(rig.clock.t + i * MS))  # the backend may still deliver some
    rig.idle(3)
    assert cap.polls[-1] < pause_at + S  # no grabs while paused
    rig.agent.resume()
    resumed_at = rig.clock.t
    rig.feed()  # re-announce the window
    # The first action right after the resume has no frame from before the pause.
    t = rig.clock.t
    rig.feed(click(t + 1 * MS))
    rig.act(click)
    rig.rec.stop()
    meta = rig.meta(rid)
    evs = rig.events(rid)
    assert not [e for e in evs if pause_at <= e["captured_at_us"] < resumed_at]
    assert [len(meta["gaps"]), meta["gaps"][0][0]] == [1, pause_at]
    for s in meta["steps"]:
        assert not pause_at <= s["started_at_us"] < resumed_at
        if s["frame"]:
            assert not pause_at <= s["frame"]["captured_at_us"] < resumed_at
    after = [s for s in meta["steps"] if s["started_at_us"] >= resumed_at]
    assert after[0]["frame"] is None or after[0]["frame"]["captured_at_us"] >= resumed_at
    assert len(after) == 2


def test_events_kept_on_disk_after_a_pause_start_are_cut(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("clock race")["id"]
    rig.act(click, 2)
    last = max(e["captured_at_us"] for e in rig.events(rid))
    rig.rec.suspend(last - 1)  # as if the pause started before the last tick's events
    assert all(e["captured_at_us"] < last - 1 for e in rig.events(rid))
    rig.rec.capture_resumed()
    rig.act(click)
    rig.rec.stop()
    assert all(not (last - 1 <= s["started_at_us"] <= last) for s in rig.meta(rid)["steps"])


def test_an_exemption_ends_the_recording_at_its_effective_time(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("until HR says no")["id"]
    rig.act(click, 3)
    since = rig.clock.t - 600 * MS  # effective a little in the past
    rig.agent._apply_exemption(since, start_source=False)
    assert not rig.rec.recording
    meta = rig.meta(rid)
    assert meta["status"] == "stopped" and meta["stop_reason"] == "exempt" and meta["ended_at_us"] < since
    assert all(e["captured_at_us"] < since for e in rig.events(rid))
    assert all(s["started_at_us"] < since for s in meta["steps"]) and meta["end_frame"] is None


def test_an_exemption_from_before_the_start_deletes_the_recording(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    before = rig.clock.t
    rid = rig.rec.start("too late")["id"]
    rig.act(click)
    rig.agent._apply_exemption(before, start_source=False)
    assert not (rig.root / rid).exists() and rig.rec.recordings() == []


# ------------------------------------------------------------------ trim / delete / submit
def test_trim_by_steps_removes_their_events_and_frames(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig, clicks=4, typing=False)
    meta = rig.meta(rid)
    ranges = step_ranges(meta)
    gone_frames = {meta["steps"][i]["frame"]["sha256"] for i in (1, 3)}
    out = rig.rec.trim(rid, steps=[1, 3])
    assert out["steps_removed"] == 2 and out["steps"] == 3 and out["events_removed"] > 0
    after = rig.meta(rid)
    assert [s["index"] for s in after["steps"]] == [0, 1, 2]
    for a, b in (ranges[1], ranges[3]):
        assert not [e for e in rig.events(rid) if a <= e["captured_at_us"] < b]
    names = {p.name.split(".")[0] for p in (rig.root / rid / "frames").iterdir()}
    assert not names & gone_frames
    with pytest.raises(DemoError, match="no step 7"):
        rig.rec.trim(rid, steps=[7])


def test_trim_by_time_range(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig, clicks=4, typing=False)
    meta = rig.meta(rid)
    t0 = meta["started_at_us"]
    a, b = meta["steps"][1]["started_at_us"] - 1, meta["steps"][2]["started_at_us"] + 1
    rig.rec.trim(rid[:10], from_s=(a - t0) / S, to_s=(b - t0) / S)
    after = rig.meta(rid)
    assert len(after["steps"]) == len(meta["steps"]) - 2
    assert not [e for e in rig.events(rid) if a <= e["captured_at_us"] < b]
    assert all(not (a <= f["captured_at_us"] < b) for f in referenced_frames(after))
    rig.rec.trim(rid, from_s=(b - t0) / S)  # open end: to the end of the recording
    after = rig.meta(rid)
    assert after["end_frame"] is None and not [e for e in rig.events(rid) if e["captured_at_us"] >= b]
    with pytest.raises(DemoError, match="empty"):
        rig.rec.trim(rid, from_s=5, to_s=2)


@st.composite
def recordings(draw: st.DrawFn) -> tuple[list[tuple[str, float]], list[int] | tuple[float, float]]:
    actions = draw(st.lists(st.tuples(st.sampled_from(["click", "scroll", "key"]),
                                      st.floats(0.05, 2.0)), min_size=1, max_size=8))
    if draw(st.booleans()):
        trim: list[int] | tuple[float, float] = draw(st.lists(st.integers(0, len(actions) - 1), min_size=1,
                                                              max_size=len(actions), unique=True))
    else:
        a = draw(st.floats(0, 12))
        trim = (a, a + draw(st.floats(0.01, 12)))
    return actions, trim


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=recordings())
def test_trim_leaves_nothing_in_the_removed_ranges_and_no_unreferenced_frame(tmp_path_factory: Any,
                                                                             case: Any) -> None:
    actions, trim = case
    rig = Rig(tmp_path_factory.mktemp("h"))
    rid = rig.rec.start("property")["id"]
    for kind, gap in actions:
        rig.idle(gap)
        t = rig.clock.t
        ev = {"click": click, "scroll": scroll}.get(kind, lambda t: key(t, "k", ord("k")))(t + 5 * MS)
        rig.feed(move(t + MS), ev)
    rig.rec.stop()
    meta = rig.meta(rid)
    t0 = meta["started_at_us"]
    if isinstance(trim, list):
        trim = [i for i in trim if i < len(meta["steps"])] or None
        if trim is None:
            return
        ranges = [step_ranges(meta)[i] for i in trim]
        rig.rec.trim(rid, steps=trim)
    else:
        ranges = [(t0 + round(trim[0] * S), t0 + round(trim[1] * S))]
        rig.rec.trim(rid, from_s=trim[0], to_s=trim[1])
    after = rig.meta(rid)

    def inside(t: int) -> bool:
        return any(a <= t < b for a, b in ranges)

    assert not [e for e in rig.events(rid) if inside(e["captured_at_us"])]
    assert not [s for s in after["steps"] if inside(s["started_at_us"])]
    assert not [f for f in referenced_frames(after) if inside(f["captured_at_us"])]
    on_disk = {p.name for p in (rig.root / rid / "frames").iterdir()}
    assert on_disk == {f"{f['sha256']}.{f['format']}" for f in referenced_frames(after)}
    assert [s["index"] for s in after["steps"]] == list(range(len(after["steps"])))
    assert after["events"] == len(rig.events(rid))


def test_delete_removes_everything(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig)
    rig.rec.delete(rid[:6])
    assert not (rig.root / rid).exists() and list(rig.root.iterdir()) == []
    running = rig.rec.start("delete me while running")["id"]
    rig.act(click)
    rig.rec.delete(running)
    assert not rig.rec.recording and not (rig.root / running).exists()


def test_submit_only_a_stopped_recording_and_then_no_trim(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    woke = []
    rig.rec.on_submit = lambda: woke.append(1)
    rid = rig.rec.start("submit me")["id"]
    rig.act(click)
    with pytest.raises(DemoError, match="still running"):
        rig.rec.submit(rid)
    rig.rec.stop()
    out = rig.rec.submit(rid)
    assert out["status"] == "submitted" and woke == [1] and out["expires_at_us"] is None
    with pytest.raises(DemoError, match="no longer be trimmed"):
        rig.rec.trim(rid, steps=[0])
    with pytest.raises(DemoError, match="already submitted"):
        rig.rec.submit(rid)
    empty = rig.rec.start("nothing happens")["id"]
    rig.rec.stop()
    with pytest.raises(DemoError, match="nothing was recorded"):
        rig.rec.submit(empty)


def test_unknown_and_ambiguous_ids(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    with pytest.raises(DemoError, match="no recording"):
        rig.rec.show("abcdef")
    with pytest.raises(DemoError, match="not a recording id"):
        rig.rec.show("../etc")
    a = recorded(rig, clicks=1, typing=False)
    b = recorded(rig, clicks=1, typing=False)
    common = os.path.commonprefix([a, b])
    with pytest.raises(DemoError, match="matches 2"):
        rig.rec.show(common)


def test_unsubmitted_recordings_expire(tmp_path: Path) -> None:
    rig = Rig(tmp_path, expire_hours=1)
    old = recorded(rig, clicks=1, typing=False)
    kept = recorded(rig, clicks=1, typing=False)
    rig.rec.submit(kept)
    rig.clock.t += 3600 * S + 1
    rig.agent.tick()  # the periodic check runs from the tick
    assert not (rig.root / old).exists() and (rig.root / kept).exists()
    stale = recorded(rig, clicks=1, typing=False)
    rig.clock.t += 3600 * S + 1
    rig.rec.start("a new one")  # checked at start too
    assert not (rig.root / stale).exists()


# ------------------------------------------------------------------ durability
def test_kill9_while_recording_recovers_a_stopped_recording_at_its_last_event(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("interrupted")["id"]
    rig.act(click, 3)
    last = max(e["captured_at_us"] for e in rig.events(rid))
    # kill -9: nothing closed, a torn line at the end of the events file.
    with open(rig.root / rid / "events.jsonl", "a") as fh:
        fh.write('{"kind":"click","captured_at_us":')
    again = rig.new_recorder()
    meta = again.store.load_meta(rid)
    assert meta["status"] == "stopped" and meta["stop_reason"] == "agent_restart"
    assert meta["ended_at_us"] == last and len(meta["steps"]) == 3 and meta["events"] == len(rig.events(rid))
    assert not (rig.root / rid / "steps.jsonl").exists()
    assert again.show(rid)["steps"] == 3
    again.submit(rid)


def test_files_are_private(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig, clicks=1, typing=False)
    assert stat.S_IMODE(os.stat(rig.root).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(rig.root / rid).st_mode) == 0o700
    for dirpath, dirs, files in os.walk(rig.root):
        for d in dirs:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o700
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode) == 0o600, f


def test_without_a_capturer_steps_are_recorded_without_frames(tmp_path: Path) -> None:
    rig = Rig(tmp_path, capturer=False)
    rid = recorded(rig, clicks=2, typing=False)
    meta = rig.meta(rid)
    assert len(meta["steps"]) == 3 and all(s["frame"] is None for s in meta["steps"])
    assert "frames unavailable" in rig.rec.status()["frames_note"]


# ------------------------------------------------------------------ the header record
def test_the_header_encodes_to_the_contract_with_a_matching_manifest(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = recorded(rig, clicks=2)
    rig.rec.trim(rid, steps=[0])
    meta = rig.meta(rid)
    rec = codec.decode_record(encode_header(rig.rec.store, rid, meta, sent_at_us=rig.clock.t), "demonstration")
    assert rec["demonstration_id"] == bytes.fromhex(rid) and rec["instruction"].startswith("file the travel")
    assert rec["employee_id"] == "emp-1" and rec["policy_version"] == POLICY.version
    frames = rec["frames"]
    # Step 0 was dropped: the old step 1's frame was grabbed during it (it shows step 0's
    # result), so it went too; the steps are renumbered.
    with_frame = [s for s in meta["steps"] if s["frame"]]
    assert meta["steps"][0]["frame"] is None and len(with_frame) == len(meta["steps"]) - 1
    assert [f["step"] for f in frames] == [*(s["index"] for s in with_frame), len(meta["steps"])]
    assert frames[-1]["reason"] == "end" and frames[-1]["action_event_id"] is None
    ids = {e["event_id"] for e in rec["events"]}
    for f, s in zip(frames, with_frame, strict=False):
        assert f["reason"] == s["kind"] and f["action_event_id"] in ids
        assert f["action_started_at_us"] == s["started_at_us"]
        assert f["sha256"].hex() == s["frame"]["sha256"] and f["windows"][0]["app_id"] == "code"
    assert len(rec["events"]) == meta["events"]


# ------------------------------------------------------------------ the local socket
def test_record_commands_on_the_local_socket(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    srv = ControlServer(rig.agent, tmp_path / "sock" / "agent.sock")
    r = srv.dispatch({"cmd": "record_start", "instruction": "via the socket"})
    assert r["ok"], r
    rid = r["recording"]["id"]
    rig.act(click, 2)
    assert srv.dispatch({"cmd": "status"})["status"]["demonstrations"]["recording"]["id"] == rid
    assert srv.dispatch({"cmd": "record_stop"})["recording"]["status"] == "stopped"
    assert [x["id"] for x in srv.dispatch({"cmd": "record_list"})["recordings"]] == [rid]
    assert len(srv.dispatch({"cmd": "record_show", "id": rid[:8]})["recording"]["steps_detail"]) == 2
    assert srv.dispatch({"cmd": "record_trim", "id": rid, "steps": [0]})["recording"]["steps"] == 1
    bad = srv.dispatch({"cmd": "record_trim", "id": rid, "steps": ["x"]})
    assert not bad["ok"] and "steps" in bad["error"]
    assert srv.dispatch({"cmd": "record_submit", "id": rid})["recording"]["status"] == "submitted"
    assert not srv.dispatch({"cmd": "record_start", "instruction": ""})["ok"]
    other = srv.dispatch({"cmd": "record_start", "instruction": "second"})["recording"]["id"]
    srv.dispatch({"cmd": "record_stop"})
    assert srv.dispatch({"cmd": "record_delete", "id": other})["ok"]
    assert [x["id"] for x in srv.dispatch({"cmd": "record_list"})["recordings"]] == [rid]
    nothing = ControlServer(Agent(rig.agent.cfg, FakeSource(), rig.spool, policy=POLICY, clock=Clock(),
                                  battery_fn=lambda: False, battery_info=lambda: (None, None)),
                            tmp_path / "s2" / "a.sock")
    assert "not available" in nothing.dispatch({"cmd": "record_list"})["error"]


WINDOWS = {"code": CODE, "password": PASSWORD, "personal": PERSONAL, "evil": CHROME_EVIL,
           "chrome": WindowInfo("google-chrome", "Docs", url="https://docs.google.com/d/1", window_id=2)}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(segments=st.lists(st.tuples(st.sampled_from(sorted(WINDOWS)), st.integers(1, 6), st.booleans()),
                         min_size=1, max_size=8))
def test_a_recording_never_holds_what_passive_capture_refuses(tmp_path_factory: Any,
                                                              segments: list[tuple[str, int, bool]]) -> None:
    """Whatever the windows and typing: only allowlisted apps, nothing typed in a password field
    (its characters are nowhere in the files), chrome's text (policy: none) never stored."""
    rig = Rig(tmp_path_factory.mktemp("p"))
    rid = rig.rec.start("property: privacy")["id"]
    password_spans = []
    for name, n, clicks in segments:
        rig.src.window = WINDOWS[name]
        rig.feed()  # the focus change
        t = rig.clock.t
        ch = "Ω" if name == "password" else "k"
        evs = [key(t + i * 20 * MS, ch, ord(ch)) for i in range(n)]
        if clicks:
            evs.append(click(t + n * 20 * MS + MS))
        rig.feed(*evs)
        if name == "password":
            password_spans.append((t, rig.clock.t))
    rig.rec.stop()
    evs = rig.events(rid)
    assert {e.get("app_id") for e in evs} <= {"code", "google-chrome"}
    assert not [e for e in evs if e.get("url") and "evil" in e["url"]]
    assert not [e for e in evs if e["kind"].startswith("key") and any(a <= e["captured_at_us"] < b
                                                                        for a, b in password_spans)]
    assert all(e.get("text") in (None, "k") for e in evs)
    assert all(e.get("text") is None for e in evs if e.get("app_id") == "google-chrome")
    raw = (rig.root / rid / "events.jsonl").read_text()
    assert "Ω" not in raw and "\\u03a9" not in raw
    assert all(s["app_id"] in ("code", "google-chrome") for s in rig.meta(rid)["steps"])


def test_a_click_that_becomes_a_drag_is_recorded_as_a_drag(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rid = rig.rec.start("drag a file")["id"]
    rig.act(click)
    rig.idle(0.5)
    t = rig.clock.t
    rig.feed(click(t + MS, 100, 100))  # the press: a click so far
    rig.feed(move(rig.clock.t + MS, 160, 140))  # next tick: the pointer moves with the button held
    rig.feed({**click(rig.clock.t + MS, 160, 140), "pressed": False})
    rig.act(click)
    shown = rig.rec.show(rid)  # while recording: the patch is applied
    assert [s["action"] for s in shown["steps_detail"]] == ["click", "drag", "click"]
    rig.rec.stop()
    assert [s["kind"] for s in rig.meta(rid)["steps"]] == ["click", "drag", "click"]
    rec = codec.decode_record(encode_header(rig.rec.store, rid, rig.meta(rid), sent_at_us=rig.clock.t),
                              "demonstration")
    assert [f["reason"] for f in rec["frames"]] == ["click", "drag", "click", "end"]
