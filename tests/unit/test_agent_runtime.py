"""The agent's local privacy rules, observed where they matter: what reaches the spool (the only
way anything leaves the laptop). A fake backend stands in for the OS; the spool is the real one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.agent.capture import Emit, Event, WindowInfo
from handtrace.agent.localsock import ControlServer
from handtrace.agent.runtime import Agent, AgentError
from handtrace.agent.spool import Spool
from handtrace.core import codec
from handtrace.core.pii import MASKED_KEYSYM
from handtrace.core.policy import Policy
from handtrace.core.settings import AgentSettings

S = 1_000_000
T0 = 1_780_000_000 * S

POLICY = Policy.from_record({
    "version": 3, "allowed_apps": ["code", "google-chrome"], "allowed_domains": ["google.com"],
    "sampling": {}, "text_capture": {"code": "full", "*": "masked", "google-chrome": "none"},
})
CODE = WindowInfo("code", "main.py - Code", window_id=1, geometry=(0, 0, 800, 600))
CHROME_OK = WindowInfo("google-chrome", "Docs", url="https://docs.google.com/d/1?token=x#f", window_id=2)
CHROME_EVIL = WindowInfo("google-chrome", "Evil", url="https://docs.google.com.evil.net/", window_id=2)
PERSONAL = WindowInfo("telegram", "Chat with mum", window_id=3)
PASSWORD = WindowInfo("code", "Password", window_id=1, password_field=True)


class FakeSource:
    """A backend whose focused window and events the test sets."""

    name = "synthetic"

    def __init__(self) -> None:
        self._window: WindowInfo | None = CODE
        self.focus_changes = 0
        self.emit: Emit | None = None
        self.running = False

    @property
    def window(self) -> WindowInfo | None:
        return self._window

    @window.setter
    def window(self, w: WindowInfo | None) -> None:
        self._window = w
        self.focus_changes += 1  # as an OS focus notification would

    def start(self, emit: Emit) -> None:
        self.emit, self.running = emit, True

    def stop(self) -> None:
        self.running = False

    def focused_window(self) -> WindowInfo | None:
        self.polls = getattr(self, "polls", 0) + 1
        return self.window


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> int:
        return self.t


def make_agent(tmp_path: Path, policy: Policy | None = POLICY, **cfg: Any) -> tuple[Agent, FakeSource, Clock, Spool]:
    src, clock = FakeSource(), Clock()
    spool = Spool(tmp_path / "spool", max_bytes=64 << 20, fsync=False, clock_us=clock)
    settings = AgentSettings(employee_id="emp-1", device_id="dev-1", pointer_simplify_px=0, **cfg)
    agent = Agent(settings, src, spool, policy=policy, clock=clock, battery_fn=lambda: False,
                  battery_info=lambda: (None, None))
    return agent, src, clock, spool


def move(t: int, x: int = 10, y: int = 10) -> Event:
    return {"kind": "pointer_move", "captured_at_us": t, "x": x, "y": y}


def key(t: int, ch: str | None, code: int, mods: int = 0, kind: str = "key_down") -> Event:
    return {"kind": kind, "captured_at_us": t, "key_code": code, "modifiers": mods, "text": ch}


def spooled(spool: Spool, role: str = "events") -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for _seq, e in spool.pending(100_000, 1 << 30, roles=[role]):
        if role == "events":
            frame = codec.decode_event_batch(e.value).events
            frame = frame.with_columns(pl.col("captured_at_us").dt.epoch("us"))
            rows.extend(frame.to_dicts())
        else:
            rows.append(codec.decode_record(e.value, "control_event" if role == "controls" else "heartbeat"))
    return rows


def settle(agent: Agent, clock: Clock) -> None:
    """One tick to announce the focused window (events of a focus change are dropped)."""
    clock.t += 100_000
    agent.tick()


def test_events_of_an_allowlisted_window_are_stamped_and_spooled(tmp_path: Path) -> None:
    agent, _src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    for i in range(5):
        agent.on_event(move(clock.t + i * 50_000, 10 + i, 20))
    clock.t += 300_000
    agent.tick()
    agent.seal(force=True)
    rows = spooled(spool)
    kinds = [r["kind"] for r in rows]
    assert kinds.count("focus_change") == 1 and kinds.count("pointer_move") == 5
    assert {r["app_id"] for r in rows} == {"code"}
    assert len({r["event_id"] for r in rows}) == len(rows)


def test_no_policy_captures_nothing(tmp_path: Path) -> None:
    agent, _src, clock, spool = make_agent(tmp_path, policy=None)
    settle(agent, clock)
    agent.on_event(move(clock.t))
    clock.t += 300_000
    agent.tick()
    agent.seal(force=True)
    assert spooled(spool) == []
    assert agent.counters.events_dropped["no_policy"] == 1


@pytest.mark.parametrize(("window", "reason"), [
    (PERSONAL, "not_allowlisted_app"), (CHROME_EVIL, "not_allowlisted_domain"),
    (WindowInfo("google-chrome", "x", url="javascript:alert(1)", window_id=2), "invalid_url"),
    (None, "no_app_context"),
])
def test_non_allowlisted_windows_never_reach_the_spool(tmp_path: Path, window: WindowInfo | None,
                                                       reason: str) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    src.window = window
    settle(agent, clock)
    agent.on_event(move(clock.t, 1, 1))
    agent.on_event(key(clock.t + 1, "x", ord("x")))
    clock.t += 300_000
    agent.tick()
    agent.seal(force=True)
    assert spooled(spool) == []
    assert agent.counters.events_dropped[reason] == 2


def test_url_is_stored_without_query_and_fragment(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    src.window = CHROME_OK
    settle(agent, clock)
    agent.seal(force=True)
    [focus] = spooled(spool)
    assert focus["url"] == "https://docs.google.com/d/1"


def test_focus_change_within_a_tick_drops_its_events(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    agent.on_event(key(clock.t + 1, "s", ord("s")))  # typed either in code or in telegram
    src.window = PERSONAL
    clock.t += 250_000
    agent.tick()
    src.window = CODE
    agent.on_event(key(clock.t + 1, "k", ord("k")))  # typed in telegram or in code
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    assert [r for r in spooled(spool) if r["kind"] == "key_down"] == []
    assert agent.counters.events_dropped["ambiguous_focus"] == 2


def test_keystroke_masking_per_app_and_shortcuts(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    out: dict[str, list[dict[str, Any]]] = {}
    for name, window in (("code", CODE), ("chrome", CHROME_OK), ("other", WindowInfo("code", "t", window_id=9))):
        src.window = window
        settle(agent, clock)
        agent.on_event(key(clock.t + 1, "a", ord("a")))
        agent.on_event(key(clock.t + 2, "7", ord("7")))
        agent.on_event(key(clock.t + 3, None, 0xFF0D))  # Return
        agent.on_event(key(clock.t + 4, "c", ord("c"), mods=2))  # ctrl+c
        clock.t += 250_000
        agent.tick()
        agent.seal(force=True)
        out[name] = [r for r in spooled(spool) if r["kind"] == "key_down"]
        spool.ack_through(spool.next_seq)
    code = out["code"]
    assert [r["text"] for r in code] == ["a", "7", None, None]
    assert [r["key_code"] for r in code] == [ord("a"), ord("7"), 0xFF0D, ord("c")]
    chrome = out["chrome"]  # none: timing only, nothing of the characters
    assert [r["text"] for r in chrome] == [None, None, None, None]
    assert [r["key_code"] for r in chrome] == [MASKED_KEYSYM, MASKED_KEYSYM, 0xFF0D, ord("c")]
    assert chrome[3]["modifiers"] == 2 and chrome[0]["text_masked"] is True


def test_masked_mode_keeps_only_bullets(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path, policy=Policy.from_record({
        "version": 1, "allowed_apps": ["code"], "text_capture": {"*": "masked"}}))
    settle(agent, clock)
    for i, ch in enumerate("Ab1 !"):
        agent.on_event(key(clock.t + i, ch, ord(ch)))
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    rows = [r for r in spooled(spool) if r["kind"] == "key_down"]
    assert "".join(r["text"] for r in rows) == "•••••"
    assert all(r["key_code"] == MASKED_KEYSYM and r["text_masked"] for r in rows)


def test_nothing_typed_into_a_password_field(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    src.window = PASSWORD
    settle(agent, clock)
    for i, ch in enumerate("hunter2"):
        agent.on_event(key(clock.t + i, ch, ord(ch)))
    agent.on_event(key(clock.t + 10, "v", ord("v"), mods=2))
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    assert [r for r in spooled(spool) if r["kind"].startswith("key")] == []
    assert agent.counters.events_dropped["password_field"] == 8


def test_pause_drops_everything_inside_and_auto_resumes(tmp_path: Path) -> None:
    agent, _src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    before = clock.t
    agent.on_event(move(before, 1, 1))
    clock.t += 1000
    until = agent.pause(1.5, reason="doctor's appointment")
    assert until == clock.t + 90 * S and agent.mode == "paused"
    for i in range(10):
        agent.on_event(move(clock.t + i * S, 5, 5))
    clock.t += 60 * S
    agent.tick()
    assert agent.mode == "paused"
    clock.t += 31 * S
    agent.tick()  # auto-resume at the planned end
    assert agent.mode == "capturing"
    settle(agent, clock)
    agent.on_event(move(clock.t, 9, 9))
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    moves = [r for r in spooled(spool) if r["kind"] == "pointer_move"]
    times = [r["captured_at_us"] for r in moves]
    assert all(not (before < t < until) for t in times)
    controls = spooled(spool, "controls")
    assert [c["kind"] for c in controls] == ["pause_start", "pause_end"]
    assert controls[1]["actor_role"] == "system" and controls[1]["pause_ends_at_us"] == until
    assert agent.counters.events_dropped["paused"] == 10


def test_pause_longer_than_30_minutes_is_refused(tmp_path: Path) -> None:
    agent, *_ = make_agent(tmp_path)
    with pytest.raises(AgentError, match="at most 30 minutes"):
        agent.pause(31)
    with pytest.raises(AgentError, match="not paused"):
        agent.resume()
    assert agent.mode == "capturing"


def test_exemption_grant_stops_capture_entirely(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    agent.start()
    try:
        settle(agent, clock)
        agent.on_event(move(clock.t, 3, 3))
        agent._apply_exemption(clock.t - 1)  # granted, effective just before that move
        assert agent.mode == "exempt" and src.running is False
        agent.on_event(move(clock.t + 1, 4, 4))
        clock.t += S
        agent.tick()
        agent.seal(force=True)
        assert [r for r in spooled(spool) if r["kind"] == "pointer_move"] == []
        assert agent.status().mode == "exempt"
        with pytest.raises(AgentError, match="exemption"):
            agent.pause(5)
        agent._apply_exemption(None)  # revoked
        assert agent.mode == "capturing" and src.running is True
    finally:
        agent.stop()


def test_control_socket_commands(tmp_path: Path) -> None:
    agent, *_ = make_agent(tmp_path)
    server = ControlServer(agent, tmp_path / "sock" / "agent.sock")
    assert server.dispatch({"cmd": "pause", "minutes": 45})["error"].startswith("a pause lasts")
    assert server.dispatch({"cmd": "pause", "minutes": "ten"})["ok"] is False
    assert server.dispatch({"cmd": "pause", "minutes": 10})["ok"] is True
    assert server.dispatch({"cmd": "status"})["status"]["mode"] == "paused"
    assert server.dispatch({"cmd": "resume"})["ok"] is True
    assert server.dispatch({"cmd": "exemption_request", "reason": ""})["ok"] is False
    assert server.dispatch({"cmd": "exemption_request", "reason": "union rep"})["ok"] is True
    assert server.dispatch({"cmd": "nope"})["ok"] is False


# ---------------------------------------------------------------- invariant


WINDOWS = [CODE, CHROME_OK, CHROME_EVIL, PERSONAL, PASSWORD, None]
op = st.one_of(
    st.tuples(st.just("events"), st.integers(1, 20)),
    st.tuples(st.just("focus"), st.integers(0, len(WINDOWS) - 1)),
    st.tuples(st.just("pause"), st.floats(0.05, 30)),
    st.tuples(st.just("resume"), st.just(0)),
    st.tuples(st.just("wait"), st.integers(1, 600)),
    st.tuples(st.just("tick"), st.just(0)),
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(op, max_size=40))
def test_invariant_nothing_excluded_reaches_the_spool(tmp_path_factory: pytest.TempPathFactory,
                                                       ops: list[tuple[str, Any]]) -> None:
    """Whatever the sequence of input, focus changes, pauses and resumes: every spooled event
    was captured outside every pause window, in an allowlisted window that was focused for the
    whole tick, and no key event carries text from a non-`full` app or a password field."""
    agent, src, clock, spool = make_agent(tmp_path_factory.mktemp("inv"))
    truth: dict[int, WindowInfo | None] = {}  # captured_at -> window focused while it was captured
    pauses: list[list[int]] = []
    for name, arg in ops:
        if name == "events":
            for _ in range(arg):
                clock.t += 7_000
                ev = key(clock.t, "z", ord("z")) if clock.t % 3 == 0 else move(clock.t, clock.t % 97, 5)
                truth[clock.t] = src.window
                agent.on_event(ev)
        elif name == "focus":
            src.window = WINDOWS[arg]
        elif name == "pause":
            try:
                extending = agent.mode == "paused"
                agent.pause(arg)
                if extending:  # a new pause while paused extends the window in force
                    pauses.pop()
                pauses.append([agent._pause_start_us, agent._pause_until_us])
            except AgentError:
                pass
        elif name == "resume":
            if agent.mode == "paused":
                agent.resume()
                pauses[-1][1] = clock.t
        elif name == "wait":
            clock.t += arg * 100_000
        else:
            agent.tick()
        clock.t += 10
    agent.tick()
    agent.seal(force=True)
    allowed = {id(CODE), id(CHROME_OK), id(PASSWORD)}
    for r in spooled(spool):
        if r["kind"] == "focus_change":
            continue
        t = r["captured_at_us"]
        assert not any(a <= t < b for a, b in pauses), "event inside a pause window"
        assert id(truth[t]) in allowed, f"event from {truth[t]} was spooled"
        assert not (r["kind"].startswith("key") and truth[t] is PASSWORD), "keystroke of a password field"
        if r["kind"].startswith("key") and r["app_id"] != "code":
            assert r["text"] is None or set(r["text"]) <= {"•"}


def test_switch_away_and_back_within_one_tick_is_caught(tmp_path: Path) -> None:
    """Alt-tab to a personal chat, type, alt-tab back -- all between two polls of the focus: the
    backend's focus notifications make the tick see it, and the keystrokes go."""
    agent, src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    src.window = PERSONAL
    agent.on_event(key(clock.t + 1, "h", ord("h")))
    src.window = CODE
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    assert [r for r in spooled(spool) if r["kind"] == "key_down"] == []
    assert agent.counters.events_dropped["ambiguous_focus"] == 1


def test_heartbeat_reports_the_agents_own_cost(tmp_path: Path) -> None:
    agent, _src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    agent.on_event(move(clock.t, 1, 1))
    clock.t += 1000
    agent.pause(5)
    agent.on_event(move(clock.t + 1, 2, 2))
    agent.wakeup()  # no shipper: seals, and spools a heartbeat (one is due at start)
    [hb] = spooled(spool, "heartbeats")
    assert hb["employee_id"] == "emp-1" and hb["device_id"] == "dev-1" and hb["state"] == "paused"
    assert hb["cpu_seconds"] > 0 and hb["rss_bytes"] > 10 << 20
    assert hb["events_captured"] == 1 and hb["events_dropped"] == {"paused": 1}
    assert hb["spool_depth_events"] >= 2  # the focus change and the move, sealed, waiting
    assert hb["battery_percent"] is None and hb["charging"] is None  # no battery (battery_info)
    agent.wakeup()  # not due again for heartbeat_interval_s
    assert len(spooled(spool, "heartbeats")) == 1


def test_what_the_spool_bound_drops_is_reported_in_heartbeats(tmp_path: Path) -> None:
    src, clock = FakeSource(), Clock()
    spool = Spool(tmp_path / "spool", max_bytes=64 * 1024, segment_bytes=16 * 1024, fsync=False, clock_us=clock)
    agent = Agent(AgentSettings(employee_id="emp-1", device_id="dev-1", pointer_simplify_px=0,
                                pointer_max_hz=240), src, spool, policy=POLICY, clock=clock,
                  battery_fn=lambda: False, battery_info=lambda: (None, None))
    settle(agent, clock)
    for _ in range(60):  # broker unreachable: nothing ships, the spool overflows
        for i in range(100):
            agent.on_event(move(clock.t + i * 5_000, i, i))
        clock.t += 600_000
        agent.tick()
        agent.seal(force=True)
    dropped = spool.stats().dropped_events.get("spool_full", 0)
    assert dropped > 0
    agent.wakeup()
    hbs = spooled(spool, "heartbeats")
    assert hbs and hbs[-1]["events_dropped"]["spool_full"] == spool.stats().dropped_events["spool_full"]


def test_a_backend_that_cannot_start_leaves_nothing_running(tmp_path: Path) -> None:
    from handtrace.agent.capture import CaptureUnavailable

    agent, src, *_ = make_agent(tmp_path)

    def refuse(_emit: Emit) -> None:
        raise CaptureUnavailable("no X display")

    src.start = refuse  # type: ignore[method-assign]
    with pytest.raises(CaptureUnavailable, match="no X display"):
        agent.start()
    agent.stop()  # must not fail on threads that never started
    assert not any(t.is_alive() for t in agent._threads)



def test_idle_ticks_skip_focus_polls_but_never_misattribute(tmp_path: Path) -> None:
    """With no input the focused window is read only every focus_idle_poll_s (X round trips
    cost CPU); input after a focus change nobody saw is dropped, not given to the old window."""
    agent, src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    src.polls = 0
    for _ in range(40):  # 10 s of idle ticks at 0.25 s
        clock.t += 250_000
        agent.tick()
    assert src.polls == 5  # every 2 s
    # A focus change the backend cannot report (polling-only, like X11 without a WM):
    src._window = PERSONAL
    agent.on_event(key(clock.t + 1, "x", ord("x")))
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    assert [r for r in spooled(spool) if r["kind"] == "key_down"] == []
    assert agent.counters.events_dropped["ambiguous_focus"] == 1


def test_a_typing_burst_is_never_cut_between_two_batches(tmp_path: Path) -> None:
    """The stream redacts PII per batch: an address typed while a batch is sealed must travel
    whole in the next batch, not in halves."""
    agent, _src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    text = "mail john.doe@example.com now"
    for i, ch in enumerate(text):
        agent.on_event(key(clock.t + i * 150_000, ch, ord(ch)))  # 150 ms between keys
        if i == 12:  # a seal falls in the middle of the address
            clock.t += 13 * 150_000
            agent.tick()
            agent.seal()
    clock.t += len(text) * 150_000 + 3 * S  # the burst ended 3 s ago
    agent.tick()
    agent.seal()
    batches = []
    for _seq, e in spool.pending(100, 1 << 30, roles=["events"]):
        rows = codec.decode_event_batch(e.value).events
        batches.append("".join(t for t in rows.get_column("text").to_list() if t))
    assert "" in batches or batches == [text]  # the first seal held every key back ...
    assert text in batches  # ... and the whole burst travelled in one batch


def test_a_burst_is_held_back_at_most_30_seconds(tmp_path: Path) -> None:
    agent, _src, clock, spool = make_agent(tmp_path)
    settle(agent, clock)
    t = clock.t
    for i in range(400):  # 40 s of uninterrupted typing, 10 keys per second
        agent.on_event(key(t + i * 100_000, "a", ord("a")))
    clock.t = t + 400 * 100_000
    agent.tick()  # pending is older than durable_after_s: the tick seals
    keys = [r for r in spooled(spool) if r["kind"] == "key_down"]
    assert len(keys) == 400  # the burst is older than 30 s: sealed anyway (durability wins)


def test_titles_and_urls_leave_the_laptop_redacted_and_password_prompts_are_guarded(tmp_path: Path) -> None:
    agent, src, clock, spool = make_agent(tmp_path)
    src.window = WindowInfo("google-chrome", "Inbox (3) - ada@acme.com - Mail",
                            url="https://mail.google.com/u/ada@acme.com/inbox?x=1", window_id=5)
    settle(agent, clock)
    src.window = WindowInfo("code", "sudo password for ada", window_id=6)  # no backend flag
    settle(agent, clock)
    for i, ch in enumerate("hunter2"):
        agent.on_event(key(clock.t + i, ch, ord(ch)))
    clock.t += 250_000
    agent.tick()
    agent.seal(force=True)
    rows = spooled(spool)
    focus = [r for r in rows if r["kind"] == "focus_change"]
    assert focus[0]["window_title"] == "Inbox (3) - [REDACTED:email] - Mail"
    assert focus[0]["url"] == "https://mail.google.com/u/[REDACTED:email]/inbox"
    assert not [r for r in rows if r["kind"].startswith("key")]
    assert agent.counters.events_dropped["password_field"] == 7


def test_what_the_agent_sends_passes_the_streams_rules(tmp_path: Path) -> None:
    """The contract between the two ends: every event the agent spools under a policy is valid
    for the stream and allowed by the same policy there -- nothing the agent masked or
    stamped is rejected (a masked key still has a key code), and masked text stays masked."""
    from handtrace.core.settings import Settings
    from handtrace.stream.app import build_pipeline
    from handtrace.stream.pipeline import SourceMessage

    agent, src, clock, spool = make_agent(tmp_path)
    for window in (CODE, CHROME_OK, WindowInfo("code", "t", window_id=9)):
        src.window = window
        settle(agent, clock)
        for i, ch in enumerate("ab 7"):
            agent.on_event(key(clock.t + 10 * i, ch, ord(ch)))
            agent.on_event(key(clock.t + 10 * i + 5, ch, ord(ch), kind="key_up"))
        agent.on_event(key(clock.t + 100, "c", ord("c"), mods=2))
        agent.on_event(move(clock.t + 200, 3, 4))
        agent.on_event({"kind": "click", "captured_at_us": clock.t + 300, "x": 3, "y": 4, "button": "left",
                        "pressed": True})
        agent.on_event({"kind": "scroll", "captured_at_us": clock.t + 400, "x": 3, "y": 4, "scroll_dx": 0,
                        "scroll_dy": 1})
        clock.t += 250_000
        agent.tick()
    agent.seal(force=True)
    sent = spooled(spool)
    msgs = [SourceMessage(e.value, 0, i, key=e.key)
            for i, (_seq, e) in enumerate(spool.pending(1000, 1 << 30, roles=["events"]))]
    pipe = build_pipeline(Settings(state_dir=tmp_path / "state", stream={"pseudonym_key": "k" * 40}))
    out = pipe.process_many(msgs, clock.t + S, policy=POLICY, controls={})
    assert not out.deadletters and not out.dropped, (out.deadletters, out.dropped)
    assert out.stored == len(sent)
    stored = pl.concat([pl.from_arrow(t) for t in out.rows.values()])
    chrome_text = stored.filter((pl.col("app_id") == "google-chrome") & pl.col("kind").is_in(["key_down"]))
    assert chrome_text.get_column("text").null_count() == chrome_text.height  # `none` stays none


class FakeFollower:
    """A control-plane follower whose next read returns what the test published meanwhile."""

    def __init__(self, policy: Policy | None, exempt_from_us: int | None = None) -> None:
        self.policy = policy
        self.state = type("State", (), {"exempt_from_us": exempt_from_us})()
        self.next: tuple[Policy | None, int | None] | None = None
        self.reads: list[float] = []

    def refresh(self, timeout_s: float = 5.0) -> bool:
        self.reads.append(timeout_s)
        if self.next is None:
            return False
        self.policy, self.state.exempt_from_us = self.next
        self.next = None
        return True


def _agent_with(tmp_path: Path, follower: FakeFollower, **cfg: Any) -> tuple[Agent, FakeSource]:
    src, clock = FakeSource(), Clock()
    spool = Spool(tmp_path / "spool", max_bytes=64 << 20, fsync=False, clock_us=clock)
    settings = AgentSettings(employee_id="emp-1", device_id="dev-1", **cfg)
    return Agent(settings, src, spool, follower=follower, clock=clock, battery_fn=lambda: False,
                 battery_info=lambda: (None, None)), src


def test_an_agent_applies_what_changed_while_it_was_off_before_capturing(tmp_path: Path) -> None:
    newer = Policy.from_record({"version": 4, "allowed_apps": ["code"], "allowed_domains": [], "sampling": {},
                                "text_capture": {"*": "full"}})
    cached = FakeFollower(POLICY)
    agent, src = _agent_with(tmp_path, cached)
    assert agent.local.version == 3
    cached.next = (newer, T0 - S)  # granted (and a new policy) while the laptop was off
    agent.start()
    try:
        assert cached.reads == [3.0]  # controls_at_start_s
        assert agent.mode == "exempt" and src.running is False  # never started under the old state
        assert agent.local.version == 4
    finally:
        agent.stop()


def test_an_offline_start_keeps_the_cached_controls_and_zero_turns_the_read_off(tmp_path: Path) -> None:
    follower = FakeFollower(POLICY)
    agent, src = _agent_with(tmp_path, follower, controls_at_start_s=0)
    agent.start()
    try:
        assert follower.reads == [] and src.running and agent.local.version == 3
    finally:
        agent.stop()
    follower = FakeFollower(POLICY)  # unreachable: refresh says nothing changed
    agent, src = _agent_with(tmp_path / "b", follower)
    agent.start()
    try:
        assert follower.reads == [3.0] and src.running and agent.local.version == 3
    finally:
        agent.stop()
