"""A demonstration end to end on real X11 input (issue #11, "Done when").

Under Xvfb, xdotool performs a scripted task in a real window (click, type, drag, scroll, hotkey)
while the real agent process (`handtrace agent run`, X11 backend) records it; the employee stops,
reviews (and trims or deletes) over the local socket, then submits. The real stream worker
enforces it and the real sink process stores it: ClickHouse (embedded) holds the demonstration
with one frame per action plus the end frame, every frame's object exists in the store (a local
directory, and a real S3-compatible server: SeaweedFS), the pixels of a non-allowlisted window
placed on the screen are solid in every stored frame, and nothing was on the wire before submit.
Then (issue #12, "Done when") the stored demonstration exports, OCR-scrubbed, to a trajectory whose
actions equal the script, from the frame store on either backend.
"""

from __future__ import annotations

import hashlib
import io
import json
import signal
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from handtrace.agent.localsock import request
from handtrace.agent.service import demo_dir, socket_path
from handtrace.core import clickhouse, codec
from handtrace.core.admin import group_lag
from handtrace.core.framestore import open_store
from handtrace.core.pii import MASK_CHAR
from handtrace.core.settings import Settings
from handtrace.export.check import check_export
from handtrace.export.dataset import ExportFilters, export_dataset
from tests.integration.conftest import start_sink_process, topic_messages, topics_of, wait_for
from tests.integration.test_demo_upload import AgentProcess
from tests.xvfb import WindowFactory, XvfbServer, xdotool

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

POLICY = {"version": 1, "allowed_apps": ["code"], "allowed_domains": [], "sampling": {},
          "text_capture": {"code": "masked"}}
CODE_RECT = (20, 20, 640, 560)
CHAT_RECT = (700, 60, 520, 400)  # on screen, never allowlisted: must be solid in every frame
CHAT_RGB = (220, 40, 40)
EMAIL = "anna.berg@example.com"
INSTRUCTION = f"File the travel expense for the Berlin trip and send it to {EMAIL}"
STEP_GAP_S = 1.6  # > the segmenter's burst gap and several frame intervals


class X11Agent(AgentProcess):
    """The real agent process on the test's X display, with the test policy."""

    def __init__(self, s: Settings, xvfb: XvfbServer) -> None:
        super().__init__(s, "emp-demo")
        (self.state / "policy.json").write_text(json.dumps(POLICY))
        self.env.update({"HANDTRACE_AGENT__SOURCE": "x11", "HANDTRACE_AGENT__DISPLAY": xvfb.display,
                         "DISPLAY": xvfb.display, "HANDTRACE_AGENT__FOCUS_POLL_S": "0.1",
                         "HANDTRACE_AGENT__FOCUS_IDLE_POLL_S": "0.1"})


def ask(s: Settings, cmd: str, **kw: Any) -> dict[str, Any]:
    reply = request(socket_path(s), {"cmd": cmd, **kw}, timeout_s=20)
    assert reply["ok"], reply
    return reply


def wait_for_agent(s: Settings, agent: AgentProcess) -> None:
    def up() -> bool:
        try:
            return bool(request(socket_path(s), {"cmd": "status"}, timeout_s=2).get("ok"))
        except Exception:  # noqa: BLE001 -- not listening yet
            return False
    wait_for(up, 60, "the agent's local socket", agent.log)


def scripted_task(xvfb: XvfbServer, code: Any) -> list[str]:
    """Click, type, drag, scroll, hotkey in the code window, the window's content changing before
    each action (as an app's would); returns the action kinds in order."""
    x0, y0 = CODE_RECT[0], CODE_RECT[1]

    def redraw(i: int) -> None:
        code.fill((30 * i % 255, 90, 200 - 25 * i), (10 + 40 * i, 10, 30, 300))
        time.sleep(STEP_GAP_S)

    redraw(1)
    xdotool(xvfb, "mousemove", str(x0 + 200), str(y0 + 200), "click", "1")
    redraw(2)
    xdotool(xvfb, "type", "--delay", "40", "Berlin 412 EUR")
    redraw(3)
    xdotool(xvfb, "mousemove", str(x0 + 100), str(y0 + 300), "mousedown", "1")
    for k in range(1, 6):
        xdotool(xvfb, "mousemove", str(x0 + 100 + 40 * k), str(y0 + 300 + 20 * k))
        time.sleep(0.05)
    xdotool(xvfb, "mouseup", "1")
    redraw(4)
    xdotool(xvfb, "click", "--repeat", "3", "--delay", "80", "5")
    redraw(5)
    xdotool(xvfb, "key", "ctrl+s")
    time.sleep(STEP_GAP_S)
    return ["click", "typing", "drag", "scroll", "hotkey"]


def rows(s: Settings, sql: str) -> list[tuple[Any, ...]]:
    c = clickhouse.connect(s.clickhouse_dsn())
    return [tuple(r) for r in c.query(sql.format(db=s.clickhouse.database)).result_rows]


def run_pipeline_until_stored(s: Settings, tmp_path: Path, stream_worker: Callable[..., Any],
                              submit: Callable[[], None]) -> None:
    """Stream worker and sink process running while ``submit`` happens; returns once the sink's
    demonstration writer has consumed everything the stream accepted (then the sink is stopped,
    which releases the embedded ClickHouse for this process)."""
    worker = stream_worker(s, policy=POLICY)
    log = tmp_path / "sink.log"
    sink = start_sink_process(s, log)
    try:
        submit()
        accepted = topics_of(s).demonstrations_accepted

        def stored() -> bool:
            heads = [m for m in topic_messages(s.kafka.librdkafka(), accepted, timeout_s=10)
                     if dict(m.headers() or []).get("ht-part") == b"demonstration"]
            return bool(heads) and group_lag(s.kafka, s.demo.sink_group_id, accepted) == 0
        wait_for(stored, 240, "the demonstration to be enforced and stored",
                 lambda: f"worker:\n{worker.tail()}\nsink:\n{log.read_text(errors='replace')[-3000:]}")
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(60)


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_recorded_reviewed_submitted_demonstration_lands_whole_with_masked_frames(
        backend: str, xvfb: XvfbServer, windows: WindowFactory, settings_factory: Callable[..., Settings],
        stream_worker: Callable[..., Any], tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store_cfg: dict[str, Any] = {}
    if backend == "s3":
        s3 = request.getfixturevalue("s3_server")
        store_cfg = s3.store_config(s3.fresh_bucket())
    s = settings_factory(store=store_cfg, demo={"upload_on_battery": True, "upload_on_metered": True})
    code = windows(wm_class=("code", "Code"), title="expenses.md - Code", geometry=CODE_RECT)
    windows(wm_class=("telegram-desktop", "TelegramDesktop"), title="Mum", geometry=CHAT_RECT,
            background=CHAT_RGB, focus=False)
    code.focus()
    agent = X11Agent(s, xvfb)
    agent.start()
    try:
        wait_for_agent(s, agent)
        time.sleep(1.0)  # the agent has seen the focused window
        rid = ask(s, "record_start", instruction=INSTRUCTION)["recording"]["id"]
        kinds = scripted_task(xvfb, code)
        ask(s, "record_stop")
        shown = ask(s, "record_show", id=rid)["recording"]
        assert [st["action"] for st in shown["steps_detail"]] == kinds, shown
        assert all(st["frame"] for st in shown["steps_detail"]), "every action has its frame"
        # Reviewed, not submitted: nothing has left the laptop.
        assert topic_messages(s.kafka.librdkafka(), topics_of(s).demonstrations, timeout_s=5) == []
        assert not any(open_store(s).list("frames/"))

        def submit() -> None:
            ask(s, "record_submit", id=rid)
            wait_for(lambda: not (demo_dir(s) / rid).exists(), 120, "the upload (local copy deleted after)",
                     agent.log)
        run_pipeline_until_stored(s, tmp_path, stream_worker, submit)
    finally:
        agent.stop()

    try:
        (status, instruction, n_frames, n_events), = rows(
            s, "SELECT status, instruction, frames, events FROM {db}.demonstrations FINAL")
        assert status == "complete"
        assert EMAIL not in instruction and "Berlin trip" in instruction, instruction
        frames = rows(s, "SELECT step, reason, sha256, object_key, format FROM {db}.frames FINAL ORDER BY step")
        assert [f[1] for f in frames] == [*kinds, "end"], frames
        assert n_frames == len(frames) == len(kinds) + 1
        assert n_events > 0
        apps = rows(s, "SELECT DISTINCT app_id FROM {db}.demonstration_events")
        assert apps == [("code",)], apps  # nothing of the chat window
        for table in ("demonstrations", "frames", "demonstration_events"):
            assert rows(s, f"SELECT count() FROM {{db}}.{table} WHERE employee_key = 'emp-demo'") == [(0,)]
    finally:
        clickhouse.close(s.clickhouse_dsn())

    store = open_store(s)
    for _step, reason, sha, key, fmt in frames:
        data = store.get(key)
        assert hashlib.sha256(data).hexdigest() == sha
        opened = Image.open(io.BytesIO(data))
        assert opened.format == fmt.upper()
        img = opened.convert("RGB")
        x, y, w, h = CHAT_RECT
        chat = img.crop((x, y, x + w, y + h))
        colours = {c for _n, c in chat.getcolors(1 << 24)}
        assert colours == {(0, 0, 0)}, f"{reason} frame shows the non-allowlisted window"
        cx, cy, cw, ch = CODE_RECT
        assert len(img.crop((cx, cy, cx + cw, cy + ch)).getcolors(1 << 24)) > 1, "the allowlisted window is shown"

    exported_trajectory_equals_the_script(s, tmp_path / "export")


def norm(v: int, size: int) -> float:
    """The exporter's normalisation: v / size rounded half up to 4 decimals."""
    return ((v * 20_000 + size) // (2 * size)) / 10_000


def exported_trajectory_equals_the_script(s: Settings, out: Path) -> None:
    """Issue #12, "Done when": the recorded demonstration exports (OCR-scrubbed) to a trajectory
    whose actions are the script's, at the right normalised positions, the typed text masked as
    the policy says, with one distinct frame per step; the export passes the loader check."""
    client = clickhouse.connect(s.clickhouse_dsn())
    try:
        r = export_dataset(client, open_store(s), out, ExportFilters(), settings=s, workers=2)
    finally:
        clickhouse.close(s.clickhouse_dsn())
    report = check_export(out)
    assert report.ok, report.errors
    (task,) = [json.loads(line) for line in (out / "trajectories" / "part-00000.jsonl").read_text().splitlines()]
    assert r.tasks == 1 and EMAIL not in task["instruction"] and "Berlin trip" in task["instruction"]
    w, h = task["screen"]["width"], task["screen"]["height"]
    x0, y0 = CODE_RECT[0], CODE_RECT[1]
    steps = [st for st in task["traj"] if st["value"]["action"] != "wait"]  # a loaded machine may pause
    masked = MASK_CHAR * len("Berlin 412 EUR")  # text_capture code: masked
    assert [st["value"]["code"] for st in steps] == [
        f"pyautogui.click(x={norm(x0 + 200, w)}, y={norm(y0 + 200, h)})",
        f'pyautogui.write(message="{masked}")',
        f"pyautogui.moveTo(x={norm(x0 + 100, w)}, y={norm(y0 + 300, h)})\n"
        f'pyautogui.dragTo(x={norm(x0 + 300, w)}, y={norm(y0 + 400, h)}, button="left")',
        f"pyautogui.scroll(-3, x={norm(x0 + 300, w)}, y={norm(y0 + 400, h)})",
        'pyautogui.hotkey("ctrl", "s")',
        'computer.terminate(status="success")',
    ], task["traj"]
    assert all(st["image"] for st in steps), "every step has its frame"
    actions = steps[:-1]
    assert len({st["image_sha256"] for st in actions}) == len(actions), "one distinct frame per action"
    assert [st["app"] for st in actions] == ["code"] * len(actions), actions
    # The window was focused before the recording began and no focus change happened during it:
    # no event of the demonstration carries its title (a recording starts without a focus snapshot).
    assert {st["title"] for st in actions} <= {None, "expenses.md - Code"}, actions
    assert all(st["scrub_status"] in ("clean", "scrubbed") for st in steps)


def test_trim_and_delete_before_submit_leave_nothing_of_the_removed_parts_anywhere(
        xvfb: XvfbServer, windows: WindowFactory, settings_factory: Callable[..., Settings],
        stream_worker: Callable[..., Any], tmp_path: Path) -> None:
    s = settings_factory(demo={"upload_on_battery": True, "upload_on_metered": True})
    code = windows(wm_class=("code", "Code"), title="expenses.md - Code", geometry=CODE_RECT)
    code.focus()
    agent = X11Agent(s, xvfb)
    agent.start()
    x0, y0 = CODE_RECT[0], CODE_RECT[1]
    try:
        wait_for_agent(s, agent)
        time.sleep(1.0)
        # A recording the employee deletes: its one action draws a colour nothing else shows.
        gone = ask(s, "record_start", instruction="a task I will withdraw")["recording"]["id"]
        code.fill((13, 250, 77), (300, 300, 200, 200))
        time.sleep(STEP_GAP_S)
        xdotool(xvfb, "mousemove", str(x0 + 50), str(y0 + 50), "click", "1")
        xdotool(xvfb, "type", "--delay", "40", "withdrawn words")
        time.sleep(STEP_GAP_S)
        ask(s, "record_stop")
        deleted_frames = {st["frame"]["sha256"] for st in ask(s, "record_show", id=gone)["recording"]["steps_detail"]
                          if st["frame"]}
        assert deleted_frames
        ask(s, "record_delete", id=gone)
        assert not (demo_dir(s) / gone).exists()
        # A recording with a step the employee trims: the typing step (its keys and its frame).
        code.fill((255, 255, 255), (300, 300, 200, 200))
        rid = ask(s, "record_start", instruction="file the expense")["recording"]["id"]
        kinds = scripted_task(xvfb, code)
        ask(s, "record_stop")
        before = ask(s, "record_show", id=rid)["recording"]
        typing = kinds.index("typing")
        trimmed = before["steps_detail"][typing]
        assert trimmed["action"] == "typing" and trimmed["events"] > 0
        ask(s, "record_trim", id=rid, steps=[typing])
        after = ask(s, "record_show", id=rid)["recording"]
        assert [st["action"] for st in after["steps_detail"]] == [k for k in kinds if k != "typing"]
        kept_frames = {st["frame"]["sha256"] for st in after["steps_detail"] if st["frame"]}
        kept_frames |= {after["end_frame"]["sha256"]} if after.get("end_frame") else set()
        removed_frames = {trimmed["frame"]["sha256"]} - kept_frames
        t_from = before["started_at_us"] + int(trimmed["from_s"] * 1e6)
        t_to = before["started_at_us"] + int(trimmed["to_s"] * 1e6)

        def submit() -> None:
            ask(s, "record_submit", id=rid)
            wait_for(lambda: not (demo_dir(s) / rid).exists(), 120, "the upload", agent.log)
        run_pipeline_until_stored(s, tmp_path, stream_worker, submit)
    finally:
        agent.stop()

    # The broker: nothing of the deleted recording, no removed frame, no key of the trimmed step.
    raw = topic_messages(s.kafka.librdkafka(), topics_of(s).demonstrations, timeout_s=10)
    assert raw and all(dict(m.headers())["ht-demo-id"] == bytes.fromhex(rid) for m in raw)
    shas = {dict(m.headers()).get("ht-sha256", b"").decode() for m in raw}
    assert not (shas & (removed_frames | deleted_frames))
    for m in raw:
        assert b"withdrawn" not in m.value()
    # Passive capture holds no copy either (what was captured while recording was the demo's).
    passive = topic_messages(s.kafka.librdkafka(), topics_of(s).events, timeout_s=10)
    for m in passive:
        ev = codec.decode_event_batch(m.value()).events
        assert not [t for t in ev.get_column("captured_at_us").dt.epoch("us").to_list()
                    if before["started_at_us"] <= t <= t_to], "passive capture kept input from a recording"
    # The store and ClickHouse.
    keys = list(open_store(s).list("frames/"))
    assert keys and not [k for k in keys if any(sha in k for sha in removed_frames | deleted_frames)]
    try:
        assert rows(s, "SELECT count() FROM {db}.demonstrations FINAL WHERE status = 'complete'") == [(1,)]
        assert rows(s, f"SELECT count() FROM {{db}}.demonstrations WHERE demonstration_id = "
                       f"toUUID('{uuid.UUID(gone)}')") == [(0,)]
        n, = rows(s, "SELECT count() FROM {db}.demonstration_events WHERE kind IN ('key_down', 'key_up') "
                     f"AND captured_at >= fromUnixTimestamp64Micro({t_from}) "
                     f"AND captured_at < fromUnixTimestamp64Micro({t_to})")
        assert n == (0,), "keys of the trimmed typing step were stored"
        assert rows(s, "SELECT countIf(reason = 'typing') FROM {db}.frames") == [(0,)]
    finally:
        clickhouse.close(s.clickhouse_dsn())
