"""The loader check (export/check.py, issue #12 item 5): it passes a valid hand-built export
(tests/export_fixtures.py, the contract's exact layout), reports each class of error when one
thing is broken, never crashes on arbitrary input, and agrees with the reducer on what a
vocabulary call is. The export is also loaded the way its consumers do: HuggingFace ``datasets``."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.pii import unredacted_spans
from handtrace.export.check import (
    VOCABULARY,
    CheckReport,
    CodeError,
    check_code,
    check_export,
    coordinate_problems,
    parse_code,
    url_origin_problem,
)
from tests.export_fixtures import (
    STEPS_SCHEMA,
    make_task,
    png,
    read_tasks,
    refresh_manifest,
    sample_tasks,
    write_export,
)
from tests.unit.test_export_actions import frames_for, raw_events, reduce

Tasks = list[dict[str, Any]]


def build(tmp_path: Path, change: Callable[[Tasks], None] | None = None, **kw: Any) -> Path:
    """A valid export of ``sample_tasks()`` in tmp_path/out, after ``change`` edited the tasks."""
    tasks = sample_tasks()
    if change is not None:
        change(tasks)
    out = tmp_path / "out"
    write_export(out, tasks, **kw)
    return out


def errors_with(report: CheckReport, *fragments: str) -> list[str]:
    """The report's errors that contain every fragment; asserts there is at least one."""
    assert not report.ok
    hits = [e for e in report.errors if all(f in e for f in fragments)]
    assert hits, f"no error with {fragments} in {report.errors}"
    return hits


def step(tasks: Tasks, t: int = 0, i: int = 1) -> dict[str, Any]:
    return tasks[t]["traj"][i]


def set_value(s: dict[str, Any], code: str, action: str, args: dict[str, Any]) -> None:
    s["value"] = {"code": code, "action": action, "args": args}


# ------------------------------------------------------------------ a valid export


def test_a_valid_export_passes_with_its_counts(tmp_path: Path) -> None:
    out = build(tmp_path)
    r = check_export(out)
    assert r.errors == [] and r.ok
    tasks = read_tasks(out)
    assert (r.tasks, r.steps) == (3, sum(len(t["traj"]) for t in tasks)) == (3, 36)
    assert r.images == len(list((out / "images").rglob("*.png"))) == 33


def test_redaction_tokens_masked_text_and_the_exporters_work_folder_are_not_findings(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        step(tasks)["title"] = "Mail to [REDACTED:email] — password=[REDACTED:secret]"
        tasks[1]["instruction"] = tasks[1]["natural_language_task"] = tasks[1]["actual_task"] = \
            "Reply to [REDACTED:email]"

    out = build(tmp_path, change)
    (out / ".handtrace-export").mkdir()
    (out / ".handtrace-export" / "plan.json").write_text("{}")
    r = check_export(out)
    assert r.ok, r.errors


def test_not_a_folder_and_a_missing_manifest(tmp_path: Path) -> None:
    errors_with(check_export(tmp_path / "nowhere"), "is not a folder")
    out = build(tmp_path)
    (out / "manifest.json").unlink()
    errors_with(check_export(out), "manifest.json is missing")


# ------------------------------------------------------------------ manifest and files


def test_a_file_whose_hash_differs_from_the_manifest(tmp_path: Path) -> None:
    out = build(tmp_path)
    m = json.loads((out / "manifest.json").read_text())
    m["files"]["steps.parquet"]["sha256"] = "0" * 64
    m["files"]["trajectories/part-00000.jsonl"]["bytes"] += 1
    (out / "manifest.json").write_text(json.dumps(m))
    r = check_export(out)
    errors_with(r, "steps.parquet", "sha256 differs from manifest.json")
    errors_with(r, "trajectories/part-00000.jsonl", "size", "differs from manifest.json")


@pytest.mark.parametrize("victim", ["trajectories/part-00001.jsonl", "steps.parquet",
                                    "images/0190a000-0000-7000-8000-000000000002/0003.png"])
def test_every_file_matters_a_changed_byte_is_reported(tmp_path: Path, victim: str) -> None:
    out = build(tmp_path)
    p = out / victim
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0x01
    p.write_bytes(bytes(data))
    errors_with(check_export(out), victim, "sha256 differs from manifest.json")


def test_removing_any_one_file_is_reported(tmp_path: Path) -> None:
    out = build(tmp_path)
    files = sorted(json.loads((out / "manifest.json").read_text())["files"])
    assert len(files) == 2 + 1 + 33
    for rel in files:
        data = (out / rel).read_bytes()
        (out / rel).unlink()
        errors_with(check_export(out), "manifest.json lists", rel, "missing")
        (out / rel).write_bytes(data)
    assert check_export(out).ok


def test_a_missing_image_is_reported_even_when_the_manifest_agrees(tmp_path: Path) -> None:
    out = build(tmp_path)
    image = read_tasks(out)[0]["traj"][2]["image"]
    (out / image).unlink()
    refresh_manifest(out)
    r = check_export(out)
    errors_with(r, "step 2", f"its image {image} is missing")
    assert r.images == 33  # counted as referenced, so the manifest's count is not also wrong


def test_extra_files_are_reported(tmp_path: Path) -> None:
    out = build(tmp_path)
    (out / "notes.txt").write_text("hi")
    errors_with(check_export(out), "notes.txt is in the export but not listed in manifest.json")
    stray = out / "images" / "0190a000-0000-7000-8000-000000000000" / "0099.png"
    stray.write_bytes(png(seed=99))
    (out / "trajectories" / "extra.jsonl").write_text("")
    refresh_manifest(out)
    r = check_export(out)
    errors_with(r, "0099.png is not the image of any step")
    errors_with(r, "trajectories/extra.jsonl is not a trajectory part")
    assert not any("notes.txt" in e for e in r.errors)


def test_format_counts_participants_and_demonstrations_must_match_the_data(tmp_path: Path) -> None:
    out = build(tmp_path, manifest={"format": "agentnet", "format_version": 2,
                                    "counts": {"tasks": 4, "steps": 35, "images": 1, "steps_without_image": 0},
                                    "participants": ["p-ada", "p-eve"],
                                    "demonstrations": ["0190a000-0000-7000-8000-000000000000"]})
    r = check_export(out)
    errors_with(r, "format is 'agentnet'")
    errors_with(r, "format_version 2 is not one this check knows")
    errors_with(r, "counts.tasks is 4, the data has 3")
    errors_with(r, "counts.steps is 35, the data has 36")
    errors_with(r, "counts.images is 1, the data has 33")
    errors_with(r, "counts.steps_without_image is 0, the data has 3")
    errors_with(r, "participants differ", "1 listed without a task", "1 with tasks not listed")
    errors_with(r, "demonstrations differ", "2 tasks not listed")


# ------------------------------------------------------------------ images


def test_an_image_that_does_not_match_its_sha256(tmp_path: Path) -> None:
    out = build(tmp_path, lambda tasks: step(tasks, 1, 4).__setitem__("image_sha256", "ab" * 32))
    r = check_export(out)
    errors_with(r, "line 2", "step 4", "does not match image_sha256")
    errors_with(r, "step 4", "steps.parquet's image_sha256 does not match")


def test_images_that_do_not_decode_or_are_not_sane_pngs(tmp_path: Path) -> None:
    import io

    from PIL import Image

    jpeg = io.BytesIO()
    Image.new("RGB", (8, 8)).save(jpeg, format="JPEG")
    tid = sample_tasks()[0]["task_id"]
    out = build(tmp_path, images={f"images/{tid}/0001.png": b"\x89PNG\r\n\x1a\n not really",
                                  f"images/{tid}/0002.png": jpeg.getvalue(),
                                  f"images/{tid}/0003.png": png(width=20_000, height=1)})
    r = check_export(out)
    errors_with(r, "step 1", "does not decode")
    errors_with(r, "step 2", "is JPEG, not PNG")
    errors_with(r, "step 3", "20000x1, not a sane screen size")


def test_an_image_at_another_path_and_a_hash_without_image(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        step(tasks)["image"] = "../../etc/passwd"
        step(tasks, 0, 0)["image_sha256"] = "ab" * 32

    r = check_export(build(tmp_path, change))
    errors_with(r, "step 1", "expected 'images/")
    errors_with(r, "step 0", "image_sha256 is set but image is null")


def test_a_step_with_an_image_must_not_be_unscrubbable(tmp_path: Path) -> None:
    def status(t: pa.Table) -> pa.Table:
        col = t["scrub_status"].to_pylist()
        col[1], col[0] = "unscrubbable", "scrubbed"
        return t.set_column(t.schema.get_field_index("scrub_status"), "scrub_status", pa.array(col))

    r = check_export(build(tmp_path, steps=status))
    errors_with(r, "step 1", "has an image but scrub_status is unscrubbable")
    errors_with(r, "step 0", "scrub_status is scrubbed but the step has no image")


# ------------------------------------------------------------------ coordinates


def test_a_coordinate_outside_zero_one(tmp_path: Path) -> None:
    out = build(tmp_path, lambda tasks: set_value(step(tasks), "pyautogui.click(x=1.2, y=0.5)", "click",
                                                  {"x": 1.2, "y": 0.5}))
    errors_with(check_export(out), "step 1", "coordinate x=1.2 is outside [0, 1]")


def test_a_coordinate_with_five_decimals(tmp_path: Path) -> None:
    out = build(tmp_path, lambda tasks: set_value(
        step(tasks), 'pyautogui.moveTo(x=0.1, y=0.2)\npyautogui.dragTo(x=0.4, y=0.12345, button="left")', "dragTo",
        {"x": 0.1, "y": 0.2, "x2": 0.4, "y2": 0.12345, "button": "left"}))
    errors_with(check_export(out), "step 1", "coordinate y2=0.12345 has more than 4 decimals")


@given(st.integers(0, 10_000))
def test_four_decimal_coordinates_pass(n: int) -> None:
    assert coordinate_problems({"x": n / 10_000, "y": round(n / 10_000, 4), "x2": 1, "y2": 0}) == []


@given(st.integers(0, 100_000).filter(lambda n: n % 10), st.sampled_from(["x", "y", "x2", "y2"]))
def test_five_decimal_coordinates_fail(n: int, k: str) -> None:
    assert coordinate_problems({k: n / 100_000}) == [f"coordinate {k}={n / 100_000!r} has more than 4 decimals"]


@pytest.mark.parametrize("v", [-0.0001, 1.0001, math.inf, math.nan, "0.5", True])
def test_coordinates_that_are_not_in_range_or_not_numbers(v: Any) -> None:
    assert coordinate_problems({"x": v}), v


# ------------------------------------------------------------------ action codes


@pytest.mark.parametrize(("code", "action", "args", "problem"), [
    ("pyautogui.click(x=0.1, y=0.2)\npyautogui.click(x=0.1, y=0.2)", "click", {"x": 0.1, "y": 0.2},
     "has 2 statements"),
    ("pyautogui.click(x=0.1, y=0.2); pyautogui.click(x=0.1, y=0.2)", "click", {"x": 0.1, "y": 0.2},
     "has 2 statements"),
    ("pyautogui.screenshot()", "screenshot", {}, "calls pyautogui.screenshot, which is not in the vocabulary"),
    ("os.system('ls')", "press", {}, "calls os.system, which is not in the vocabulary"),
    ("__import__('os')", "press", {}, "not a vocabulary function"),
    ("__import__('os').system('ls')", "press", {}, "not a vocabulary function"),
    ("pyautogui.write(message=__import__('os').getcwd())", "write", {}, "not a literal constant"),
    ("pyautogui.click(x='0.1', y=0.2)", "click", {"x": 0.1, "y": 0.2}, "x as str, not float"),
    ("pyautogui.click(x=1, y=0)", "click", {"x": 1, "y": 0}, "x as int, not float"),
    ("pyautogui.click(x=0.1)", "click", {"x": 0.1}, "only one of x and y"),
    ("pyautogui.scroll(3.0, x=0.5, y=0.5)", "scroll", {"amount": 3}, "amount that is a float, not int"),
    ("pyautogui.scroll(True)", "scroll", {"amount": 1}, "amount that is a bool, not int"),
    ("pyautogui.write(message=5)", "write", {"message": 5}, "message that is a int, not str"),
    ("pyautogui.write('hi')", "write", {"message": "hi"}, "1 positional arguments to pyautogui.write"),
    ("pyautogui.press('enter', presses=0)", "press", {"keys": ["enter"]}, "presses that is not a positive int"),
    ("pyautogui.press('enter', interval=0.1)", "press", {"keys": ["enter"]}, "interval to pyautogui.press"),
    ("pyautogui.hotkey()", "hotkey", {}, "without keys"),
    ("pyautogui.hotkey('ctrl', 5)", "hotkey", {}, "key that is not a non-empty string"),
    ("computer.wait(seconds=-1)", "wait", {"seconds": -1}, "not a finite number >= 0"),
    ("computer.wait(seconds='1')", "wait", {"seconds": 1}, "not a finite number >= 0"),
    ("computer.terminate(status='done')", "terminate", {}, "status that is not one of"),
    ("computer.terminate()", "terminate", {}, "without status"),
    ('pyautogui.dragTo(x=0.4, y=0.4, button="left")', "dragTo", {}, "alone; a drag is"),
    ('pyautogui.moveTo(x=0.4, y=0.4)\npyautogui.dragTo(x=0.4, y=0.4, button="up")', "dragTo", {},
     "button that is not left, right or middle"),
    ("pyautogui.click(*[0.1, 0.2])", "click", {}, "unpacks arguments"),
    ("pyautogui.click(**{'x': 0.1})", "click", {}, "unpacks arguments"),
    ("import os", "click", {}, "not a call (Import)"),
    ("", "click", {}, "has no call"),
    ("pyautogui.click(", "click", {}, "does not parse as Python"),
    ("pyautogui.click()\x00", "click", {}, "does not parse as Python"),
    (None, "click", {}, "is a NoneType, not a string"),
    # parses, but disagrees with value.action / value.args
    ("pyautogui.click(x=0.1, y=0.2)", "doubleClick", {"x": 0.1, "y": 0.2}, "is a click but value.action says"),
    ("pyautogui.click(x=0.1, y=0.2)", "click", {"x": 0.1, "y": 0.3}, "disagree on y"),
    ("pyautogui.click(x=0.1, y=0.2)", "click", {"y": 0.2}, "gives x but value.args has none"),
    ("pyautogui.click()", "click", {"x": 0.1}, "value.args has x, which its code does not give"),
    ("pyautogui.click(x=0.1, y=0.2)", "click", {"x": 0.1, "y": 0.2, "clicks": 2}, "clicks=2 but its code implies 1"),
    ("pyautogui.rightClick(x=0.1, y=0.2)", "rightClick", {"x": 0.1, "y": 0.2, "button": "left"},
     "button='left' but its code implies 'right'"),
    ("pyautogui.press('enter')", "press", {"keys": ["enter"], "presses": 2}, "presses=2 but its code implies 1"),
    ("pyautogui.write(message='a')", "write", {"message": "a", "cmd": "rm"}, "unknown field 'cmd'"),
    ("pyautogui.write(message='a')", "write", [], "value.args is not an object"),
])
def test_codes_that_are_not_one_vocabulary_call_or_disagree(code: Any, action: str, args: Any, problem: str) -> None:
    problems = check_code(code, action, args)
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("code", ["pyautogui.click(x=0.1, y=0.2)\npyautogui.click(x=0.1, y=0.2)",
                                  "pyautogui.typewrite(message='x')", "__import__('os')",
                                  "pyautogui.click(x='0.1', y=0.2)"])
def test_a_bad_code_in_an_export_is_reported_with_its_task_and_step(tmp_path: Path, code: str) -> None:
    out = build(tmp_path, lambda tasks: set_value(step(tasks, 2, 3), code, "click", {"x": 0.1, "y": 0.2}))
    errors_with(check_export(out), "part-00001.jsonl line 1",
                "(task 0190a000-0000-7000-8000-000000000002) step 3: its code")


def test_terminate_last_and_only_last(tmp_path: Path) -> None:
    def swap(tasks: Tasks) -> None:
        traj = tasks[0]["traj"]
        traj[-1]["value"], traj[-2]["value"] = traj[-2]["value"], traj[-1]["value"]

    r = check_export(build(tmp_path, swap))
    errors_with(r, "step 10", "terminate is not the last step")
    errors_with(r, "step 11", "the last step is not terminate")
    errors_with(check_export(build(tmp_path / "b", lambda ts: ts[0].__setitem__("traj", []))),
                "traj is missing or empty")


# ------------------------------------------------------------------ privacy


def test_pii_in_a_title_is_reported_without_quoting_it(tmp_path: Path) -> None:
    out = build(tmp_path, lambda tasks: step(tasks, 1, 5).__setitem__("title", "Inbox — ada.lovelace@acme.com"))
    r = check_export(out)
    errors_with(r, "line 2", "step 5", "title has PII the detectors find (email)")
    assert not any("lovelace" in e for e in r.errors)


def test_pii_in_the_instruction_and_in_typed_text(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        tasks[0]["actual_task"] = "Pay with 4111 1111 1111 1111"
        set_value(step(tasks, 1, 1), 'pyautogui.write(message="token=ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8")',
                  "write", {"message": "token=ghp_A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"})

    r = check_export(build(tmp_path, change))
    errors_with(r, "line 1", "actual_task has PII the detectors find (card)")
    errors_with(r, "instruction, natural_language_task and actual_task differ")
    errors_with(r, "line 2", "step 1", "typed message has PII the detectors find (secret)")
    assert not any("4111" in e or "ghp_" in e for e in r.errors)


@pytest.mark.parametrize(("origin", "problem"), [
    ("https://acme.com/inbox", "path, query or fragment"),
    ("https://acme.com/", "path, query or fragment"),
    ("https://acme.com?q=1", "path, query or fragment"),
    ("https://acme.com#top", "path, query or fragment"),
    ("https://ada:pw@acme.com", "user info"),
    ("acme.com", "scheme://host[:port]"),
    ("https://acme.com:99999", "not a valid url"),
    ("https://:443", "scheme://host[:port]"),
    ("https://acme.com:x", "not a valid url"),
    (42, "not a string"),
])
def test_url_origin_is_only_scheme_host_port(tmp_path: Path, origin: Any, problem: str) -> None:
    assert problem in (url_origin_problem(origin) or "")
    assert url_origin_problem("https://intranet.example.com:8443") is None
    assert url_origin_problem(None) is None


def test_a_path_in_url_origin_is_reported(tmp_path: Path) -> None:
    out = build(tmp_path, lambda tasks: step(tasks, 0, 6).__setitem__("url_origin", "https://acme.com/reports/q3"))
    errors_with(check_export(out), "step 6", "url_origin carries a path")


# ------------------------------------------------------------------ order and times


def test_step_times_must_be_monotonic(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        traj = tasks[0]["traj"]
        traj[4]["started_at"] = traj[2]["started_at"]
        traj[4]["ended_at"] = traj[2]["ended_at"]
        traj[7]["ended_at"] = traj[6]["ended_at"]
        traj[8]["started_at"] = "yesterday"
        traj[9]["started_at"] = "2026-03-02T09:00:13"  # no time zone

    r = check_export(build(tmp_path, change))
    errors_with(r, "step 4", "started_at is before the previous step's")
    errors_with(r, "step 7", "ended_at is before started_at")
    errors_with(r, "step 8", "ISO 8601 times with a time zone")
    errors_with(r, "step 9", "ISO 8601 times with a time zone")


def test_step_indexes_must_be_zero_to_n(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        tasks[0]["traj"][3]["index"] = 4

    errors_with(check_export(build(tmp_path, change)), "step 3: index is 4, expected 3")


def test_task_ids_are_unique(tmp_path: Path) -> None:
    def change(tasks: Tasks) -> None:
        tasks[2]["task_id"] = tasks[0]["task_id"]
        for s in tasks[2]["traj"]:
            s["image"] = None

    errors_with(check_export(build(tmp_path, change)), "task_id appears more than once")


# ------------------------------------------------------------------ steps.parquet against the JSONL


def _set_cell(t: pa.Table, column: str, row: int, value: Any) -> pa.Table:
    col = t[column].to_pylist()
    col[row] = value
    i = t.schema.get_field_index(column)
    return t.set_column(i, t.schema.field(i), pa.array(col, type=t.schema.field(i).type))


def test_parquet_and_jsonl_must_agree(tmp_path: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        t = _set_cell(t, "code", 1, "pyautogui.click(x=0.9, y=0.9)")
        t = _set_cell(t, "x", 13, 0.9)
        t = _set_cell(t, "title", 14, "another title")
        t = _set_cell(t, "image_bytes", 15, 1)
        return t.filter(pa.array([i != 30 for i in range(t.num_rows)]))

    r = check_export(build(tmp_path, steps=change))
    errors_with(r, "line 1 (task 0190a000-0000-7000-8000-000000000000) step 1",
                "steps.parquet disagrees with the trajectory on code")
    errors_with(r, "line 2", "step 1: steps.parquet disagrees with the trajectory on x")
    errors_with(r, "step 2: steps.parquet disagrees with the trajectory on title")
    errors_with(r, "step 3: steps.parquet disagrees with the trajectory on image_bytes")
    errors_with(r, "(task 0190a000-0000-7000-8000-000000000002) step 6: steps.parquet has no row for it")


def test_parquet_rows_no_trajectory_has_and_missing_columns(tmp_path: Path) -> None:
    def change(t: pa.Table) -> pa.Table:
        extra = t.slice(0, 1)
        extra = extra.set_column(extra.schema.get_field_index("step"), "step", pa.array([99], pa.int32()))
        return pa.concat_tables([t, extra]).drop_columns(["scrub_version"])

    r = check_export(build(tmp_path, steps=change))
    errors_with(r, "steps.parquet has a row for task 0190a000-0000-7000-8000-000000000000 step 99")
    errors_with(r, "steps.parquet lacks columns scrub_version")


def test_parquet_timestamps_must_be_utc(tmp_path: Path) -> None:
    def naive(t: pa.Table) -> pa.Table:
        i = t.schema.get_field_index("started_at")
        return t.set_column(i, "started_at", t["started_at"].cast(pa.timestamp("us")))

    errors_with(check_export(build(tmp_path, steps=naive)), "started_at is timestamp[us], not a UTC timestamp")


def test_unreadable_parts_and_parquet(tmp_path: Path) -> None:
    out = build(tmp_path)
    (out / "trajectories" / "part-00000.jsonl").write_text('{"task_id": \n[1]\n', encoding="utf-8")
    (out / "steps.parquet").write_bytes(b"PAR1 not parquet")
    refresh_manifest(out)
    r = check_export(out)
    errors_with(r, "part-00000.jsonl line 1 is not valid JSON")
    errors_with(r, "part-00000.jsonl line 2 is not a JSON object")
    errors_with(r, "part-00000.jsonl cannot be read by pyarrow.json")
    errors_with(r, "steps.parquet cannot be read by pyarrow")


def test_types_that_json_readers_cannot_unify_are_reported(tmp_path: Path) -> None:
    # a reader that infers one schema per file (pyarrow.json, datasets) fails on a field that is an
    # object on one line and a string on the next
    out = build(tmp_path, lambda tasks: tasks[1].__setitem__("screen", "1920x1080"), tasks_per_part=3)
    errors_with(check_export(out), "part-00000.jsonl cannot be read by pyarrow.json")


# ------------------------------------------------------------------ properties


FRAGMENTS = ["pyautogui.", "computer.", "click", "doubleClick", "dragTo", "moveTo", "scroll", "write", "press",
             "hotkey", "wait", "terminate", "(", ")", "x=", "y=", "0.5", "1.25", "-3", ",", " ", "\n", ";",
             '"a"', "'ctrl'", "message=", "seconds=", "status=", '"success"', "button=", "presses=", "2",
             "__import__", "('os')", ".system", "import os", "lambda: 0", "[1]", "*", "**", "#", "\\", "=",
             "exec", "open('x')", "True", "None", "1e999", "x", "...", "\t"]
TEXTS = st.one_of(st.text(max_size=80), st.lists(st.sampled_from(FRAGMENTS), max_size=14).map("".join))


class _Recorder:
    """A stand-in for ``pyautogui`` / ``computer`` that records the calls made on it."""

    def __init__(self, module: str, log: list[str]) -> None:
        self._module, self._log = module, log

    def __getattr__(self, name: str) -> Callable[..., None]:
        def call(*args: Any, **kwargs: Any) -> None:
            self._log.append(f"{self._module}.{name}")
        return call


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(code=TEXTS, action=st.sampled_from(["click", "write", "dragTo", "terminate", "press"]))
def test_arbitrary_codes_never_crash_and_are_refused_unless_vocabulary_calls(code: str, action: str) -> None:
    problems = check_code(code, action, {})
    assert isinstance(problems, list) and all(isinstance(p, str) for p in problems)
    try:
        parsed = parse_code(code)
    except CodeError:
        return
    # accepted: an independent oracle runs it against recorders with no builtins at all; only
    # vocabulary calls can run there, exactly one (or the drag's moveTo + dragTo)
    log: list[str] = []
    exec(code, {"__builtins__": {}, "pyautogui": _Recorder("pyautogui", log),  # noqa: S102
                "computer": _Recorder("computer", log)})
    assert set(log) <= VOCABULARY
    assert log == (["pyautogui.moveTo", "pyautogui.dragTo"] if parsed.action == "dragTo"
                   else [f"{log[0].split('.')[0]}.{parsed.action}"])


COORD = st.integers(0, 10_000).map(lambda n: n / 10_000)
KEY = st.sampled_from(["ctrl", "alt", "shift", "win", "enter", "a", "f5", "'", '"', "\\"])
TEXT = st.text(max_size=30)


@st.composite
def vocabulary_calls(draw: st.DrawFn) -> tuple[str, str, dict[str, Any]]:
    """(code, action, args) of a valid call, written by hand -- not by the checker's or the
    reducer's code."""
    kind = draw(st.sampled_from(["click", "doubleClick", "tripleClick", "rightClick", "middleClick", "dragTo",
                                 "scroll", "hscroll", "write", "press", "hotkey", "wait", "terminate"]))
    x, y, x2, y2 = draw(COORD), draw(COORD), draw(COORD), draw(COORD)
    point = draw(st.booleans())
    xy = f"x={x!r}, y={y!r}" if point else ""
    pa_ = {"x": x, "y": y} if point else {}
    if kind in ("click", "doubleClick", "tripleClick", "rightClick", "middleClick"):
        return f"pyautogui.{kind}({xy})", kind, pa_
    if kind == "dragTo":
        b = draw(st.sampled_from(["left", "right", "middle"]))
        end = f"x={x2!r}, y={y2!r}, " if point else ""
        return (f"pyautogui.moveTo({xy})\npyautogui.dragTo({end}button={json.dumps(b)})", kind,
                {**pa_, **({"x2": x2, "y2": y2} if point else {}), "button": b})
    if kind in ("scroll", "hscroll"):
        n = draw(st.integers(-50, 50))
        return f"pyautogui.{kind}({n}{', ' + xy if xy else ''})", kind, {"amount": n, **pa_}
    if kind == "write":
        m = draw(TEXT)
        # JSON's ASCII escapes are Python's only inside the BMP: an astral character escaped as a
        # surrogate pair reads back as two surrogates in Python (the reducer writes UTF-8)
        escape = draw(st.booleans()) and all(ord(c) < 0x10000 for c in m)
        return f"pyautogui.write(message={json.dumps(m, ensure_ascii=escape)})", kind, {"message": m}
    if kind == "press":
        k, n = draw(KEY), draw(st.integers(1, 9))
        return (f"pyautogui.press({json.dumps(k)}{f', presses={n}' if n > 1 else ''})", kind,
                {"keys": [k], "presses": n})
    if kind == "hotkey":
        ks = draw(st.lists(KEY, min_size=1, max_size=4))
        return f"pyautogui.hotkey({', '.join(json.dumps(k) for k in ks)})", kind, {"keys": ks}
    if kind == "wait":
        s = draw(st.integers(0, 10_000)) / 10
        return f"computer.wait(seconds={s!r})", kind, {"seconds": s}
    return 'computer.terminate(status="success")', kind, {}


@given(vocabulary_calls())
def test_every_vocabulary_call_with_agreeing_args_passes(call: tuple[str, str, dict[str, Any]]) -> None:
    code, action, args = call
    assert check_code(code, action, args) == []
    assert coordinate_problems(args) == []


@given(vocabulary_calls(), st.sampled_from(["\nimport os", "; pyautogui.click()", "\n__import__('os')",
                                            "\nos.system('x')", "\npyautogui.press('a')", "\nx = 1"]))
def test_a_vocabulary_call_with_anything_appended_is_refused(call: tuple[str, str, dict[str, Any]],
                                                               tail: str) -> None:
    code, action, args = call
    assert check_code(code + tail, action, args)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(vocabulary_calls(), max_size=6), min_size=1, max_size=3), st.integers(1, 3))
def test_any_export_of_vocabulary_steps_passes_with_its_counts(tasks_calls: list[list[tuple[str, str, dict[str, Any]]]],
                                                               per_part: int) -> None:
    import tempfile

    tasks = []
    for i, calls in enumerate(tasks_calls):
        # typed text a detector flags is a finding (test_pii_in_the_instruction_and_in_typed_text)
        body = [(action, args, code) for code, action, args in calls
                if action != "terminate" and not unredacted_spans(args.get("message", ""))]
        steps = [*body, ("terminate", {}, 'computer.terminate(status="success")')]
        tasks.append(make_task(f"t{i}", participant=f"p{i % 2}", steps=steps, first_without_image=i % 2 == 0))
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        write_export(out, tasks, tasks_per_part=per_part)
        r = check_export(out)
    assert r.errors == []
    assert r.tasks == len(tasks) and r.steps == sum(len(t["traj"]) for t in tasks)
    assert r.images == r.steps - sum(1 for t in tasks if t["traj"][0]["image"] is None)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), evs=raw_events())
def test_everything_the_reducer_writes_passes_the_check(data: st.DataObject, evs: list[dict[str, Any]]) -> None:
    """The reducer (export/actions.py) and the checker agree on the vocabulary, the argument
    types and the args struct, on generated events (test_export_actions.raw_events)."""
    acts = reduce(evs, data.draw(frames_for(evs)))
    for row in acts.iter_rows(named=True):
        args = {k: v for k, v in row["args"].items() if v is not None}
        assert check_code(row["code"], row["action"], args) == [], row
        assert coordinate_problems(args) == [], row
    for _, g in acts.group_by("demonstration_id"):
        assert g.sort("step")["action"].to_list()[-1] == "terminate"
        assert pl.Series(g["action"]).eq("terminate").sum() == 1


def test_the_fixture_parquet_has_the_contract_columns() -> None:
    from handtrace.export.check import PARQUET_COLUMNS

    assert tuple(STEPS_SCHEMA.names) == PARQUET_COLUMNS


# ------------------------------------------------------------------ read as its consumers read it


def test_huggingface_datasets_loads_the_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    out = build(tmp_path)
    assert check_export(out).ok
    cache = str(tmp_path / "cache")
    steps = datasets.load_dataset("parquet", data_files=str(out / "steps.parquet"), cache_dir=cache)["train"]
    assert steps.num_rows == 36
    assert steps[4]["code"] == "pyautogui.scroll(-3, x=0.5, y=0.5)" and steps[4]["args"]["amount"] == -3
    assert steps.filter(lambda r: r["image"] is None).num_rows == 3
    parts = sorted(str(p) for p in (out / "trajectories").glob("part-*.jsonl"))
    tasks = datasets.load_dataset("json", data_files=parts, cache_dir=cache)["train"]
    assert tasks.num_rows == 3
    assert [len(t) for t in tasks["traj"]] == [12, 12, 12]
    first = tasks[0]["traj"][3]
    assert first["value"]["code"].startswith("pyautogui.moveTo(") and first["value"]["args"]["y2"] == 1.0
    assert tasks[1]["instruction"] == "Rename the report"
