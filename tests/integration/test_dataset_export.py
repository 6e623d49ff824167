"""`handtrace dataset export` end to end on the real embedded ClickHouse and a local frame store
(issue #12, Deliver 2, 4, 5): demonstrations stored by the sink's own writer are exported as
trajectories; the export passes the loader check; frames are OCR-scrubbed by the real tesseract
(a frame showing an email, a card number and API keys leaves with those boxes filled) and a frame
that cannot be scrubbed never leaves; an interrupted export resumes to the same files; withdrawing
a participant makes the exports that contain them stale and a reissue contains none of their steps.

No Kafka here: the demonstrations are fed to the sink's DemoWriter directly (its Kafka path is
tested in test_demo_sink.py, the whole pipeline with real X input in test_demonstration_e2e.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw, ImageFont

from handtrace.core import clickhouse, pii
from handtrace.core.framestore import LocalStore, frame_key
from handtrace.core.settings import Settings
from handtrace.export import scrub
from handtrace.export.check import check_export
from handtrace.export.dataset import (
    ExportError,
    ExportFilters,
    ExportProgress,
    export_dataset,
    list_exports,
    reissue,
    stale_exports,
    withdraw,
)
from handtrace.sink.demonstrations import DemoWriter
from tests.demo_messages import T0_US, make_demo
from tests.integration.test_scrub_ocr import render

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
HOUR = 3600 * 10**6


def screen(i: int, size: tuple[int, int] = (640, 400)) -> bytes:
    """A plain PNG screen with ordinary text (no PII) that differs per ``i``."""
    img = Image.new("RGB", size, (245, 245, 245))
    d = ImageDraw.Draw(img)
    d.rectangle((0, 0, size[0], 24), fill=(40, 40, 60))
    font = ImageFont.truetype(FONT, 15)
    d.text((12, 40), f"Quarterly report draft {i}", fill=(20, 20, 20), font=font)
    d.text((12, 70), "Revenue grew in every region", fill=(20, 20, 20), font=font)
    d.rectangle((20 + 10 * i, 120, 60 + 10 * i, 160), fill=(30 * i % 255, 90, 160))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@dataclass
class Warehouse:
    settings: Settings
    client: Any
    store: LocalStore
    writer: DemoWriter
    offset: int = 0

    def add(self, employee_key: str, n_frames: int = 4, *, seed: int, images: list[bytes] | None = None,
            t0_us: int = T0_US, cohort: str = "eng", apps: tuple[str, ...] = ("org.gnome.TextEditor",),
            n_events: int | None = None) -> str:
        """Store one complete demonstration through the sink's writer; returns its id."""
        d = make_demo(employee_key, n_frames, n_events if n_events is not None else n_frames + 2, seed=seed,
                      images=images if images is not None else [screen(seed * 10 + i) for i in range(n_frames)],
                      t0_us=t0_us, cohort=cohort, apps=apps, link_frames=True)
        for headers, value in [d.header, *d.frames]:
            self.writer.handle(0, self.offset, headers, value)
            self.offset += 1
        return str(uuid.UUID(bytes=d.demo_id))

    def export(self, out: Path, filters: ExportFilters | None = None, **kw: Any) -> Any:
        kw.setdefault("workers", 2)
        return export_dataset(self.client, self.store, out, filters or ExportFilters(), settings=self.settings, **kw)


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[Callable[..., Warehouse]]:
    made: list[str] = []

    def make(**export: Any) -> Warehouse:
        s = Settings(state_dir=tmp_path / "state", dev_mode=True,
                     clickhouse={"dsn": f"chdb://{tmp_path / 'ch'}"},
                     store={"url": f"file://{tmp_path / 'store'}"}, export=export,
                     stream={"pseudonym_key": "test-key-" + "k" * 32})
        client = clickhouse.connect(s.clickhouse_dsn())
        made.append(s.clickhouse_dsn())
        store = LocalStore(tmp_path / "store")
        return Warehouse(s, client, store, DemoWriter.on_clickhouse(s, client, store))

    yield make
    for dsn in made:
        clickhouse.close(dsn)


def lines(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in sorted((out / "trajectories").glob("part-*.jsonl"))
            for line in p.read_text().splitlines()]


def assert_loads(out: Path) -> pq.ParquetFile:
    """The loader check passes and pyarrow loads steps.parquet with one row per JSONL step."""
    report = check_export(out)
    assert report.ok, report.errors
    steps = pq.read_table(out / "steps.parquet")
    tasks = lines(out)
    assert steps.num_rows == sum(len(t["traj"]) for t in tasks) == report.steps > 0
    return steps


def test_export_is_loadable_scrubbed_and_recorded(warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse()
    pii_png, values, _plain = render()
    ids = [w.add("emp-a", seed=1), w.add("emp-b", seed=2, cohort="support"),
           w.add("emp-a", n_frames=2, seed=3, images=[screen(99), pii_png])]
    seen: list[ExportProgress] = []
    r = w.export(tmp_path / "out", batch_size=2, actor="researcher-1", progress=seen.append)

    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "handtrace-trajectories" and manifest["format_version"] == 1
    assert manifest["export_id"] == r.export_id
    assert sorted(manifest["demonstrations"]) == sorted(ids)
    assert manifest["participants"] == ["emp-a", "emp-b"]
    assert manifest["consent_versions"] == ["1"] and manifest["policy_versions"] == ["7"]
    red = manifest["redaction"]
    assert red["scrubbed"] is True and red["detector_version"] == pii.DETECTOR_VERSION
    assert red["scrub_version"] == scrub.SCRUB_VERSION and red["tesseract_version"].startswith("tesseract ")
    files = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == files, "the manifest lists every file, and only those"
    for rel, meta in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == meta["sha256"], rel
    assert [p.batches_done for p in seen if not p.frames_in_batch][-1] == 2, "progress per batch"
    assert any(p.frames_in_batch for p in seen), "progress per frame"

    steps = assert_loads(out)
    tasks = {t["task_id"]: t for t in lines(out)}
    assert tasks[ids[1]]["cohort"] == "support" and tasks[ids[0]]["participant"] == "emp-a"
    assert all(t["traj"][-1]["value"]["action"] == "terminate" for t in tasks.values())

    # The PII frame: the step that shows it left with every value's box filled.
    pii_step = next(st for st in tasks[ids[2]]["traj"] if st["frame_filled"])
    kinds = {b["kind"] for b in pii_step["frame_filled"]}
    assert {"email", "card", "secret"} <= kinds, kinds
    exported = (out / pii_step["image"]).read_bytes()
    assert hashlib.sha256(exported).hexdigest() != hashlib.sha256(pii_png).hexdigest()
    words = scrub.ocr_words(Image.open(io.BytesIO(exported)).convert("L"))
    text = " ".join(x.text for x in words)
    for value, _box in values:
        assert value.replace(" ", "") not in text.replace(" ", ""), f"{value} survived in the exported pixels"
    assert not pii.find_spans(text), text
    img = Image.open(io.BytesIO(exported)).convert("RGB")
    for b in pii_step["frame_filled"]:
        box = img.crop((b["x"], b["y"], b["x"] + b["width"], b["y"] + b["height"]))
        assert box.getcolors() == [(b["width"] * b["height"], scrub.FILL_RGB)], "a filled box is solid"
    row = next(x for x in steps.to_pylist() if x["image"] == pii_step["image"])
    assert row["scrub_status"] == "scrubbed" and row["detector_version"] == pii.DETECTOR_VERSION
    assert {b["kind"] for b in row["frame_filled"]} == kinds
    clean = [x for x in steps.to_pylist() if x["image"] and x["scrub_status"] == "clean"]
    assert clean and all(x["image_sha256"] == x["frame_sha256"] for x in clean), "clean frames leave unchanged"
    assert r.frames_filled == 1 and r.frames_unscrubbable == 0

    (rec,) = w.client.query(f"SELECT toString(export_id), actor, participants, tasks, steps, images, "
                            f"frames_filled, manifest_sha256 FROM {w.settings.clickhouse.database}"
                            ".dataset_exports FINAL").result_rows
    assert rec[0] == r.export_id and rec[1] == "researcher-1" and list(rec[2]) == ["emp-a", "emp-b"]
    assert rec[3:7] == (3, r.steps, r.images, 1)
    assert rec[7] == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()


def test_unscrubbable_or_missing_frames_never_leave(warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse()
    corrupt = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)  # passes the stream's magic check, does not decode
    demo = w.add("emp-a", n_frames=3, seed=5, images=[screen(1), corrupt, screen(2)])
    gone = screen(3)
    w.add("emp-b", n_frames=2, seed=6, images=[gone, screen(4)])
    assert w.store.delete(frame_key("emp-b", hashlib.sha256(gone).hexdigest(), "png"))
    r = w.export(tmp_path / "out")
    out = tmp_path / "out"
    steps = assert_loads(out).to_pylist()
    bad = [x for x in steps if x["frame_sha256"] == hashlib.sha256(corrupt).hexdigest()]
    assert bad and all(x["image"] is None and x["scrub_status"] == "unscrubbable" for x in bad)
    missing = [x for x in steps if x["frame_sha256"] == hashlib.sha256(gone).hexdigest()]
    assert missing and all(x["image"] is None and x["scrub_status"] == "missing" for x in missing)
    files = list((out / "images").rglob("*.png"))
    assert len(files) == r.images and corrupt not in {p.read_bytes() for p in files}
    m = json.loads((out / "manifest.json").read_text())
    assert m["counts"]["frames_unscrubbable"] == 1 == r.frames_unscrubbable
    assert m["counts"]["frames_missing"] == 1
    assert demo in m["demonstrations"]


def test_scrubbing_fails_closed_without_tesseract(warehouse: Callable[..., Warehouse], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    w = warehouse()
    w.add("emp-a", seed=1)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ExportError, match="tesseract"):
        w.export(tmp_path / "out")
    with pytest.raises(ExportError, match="must be scrubbed"):
        w.export(tmp_path / "out", scrub=False)
    assert not (tmp_path / "out").exists(), "nothing written"


class Interrupt(Exception):
    pass


def test_interrupted_export_resumes_to_the_same_files(warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse(require_scrub=False)
    for i in range(6):
        w.add(f"emp-{i % 2}", seed=10 + i, t0_us=T0_US + i * HOUR)
    whole = w.export(tmp_path / "whole", scrub=False, batch_size=2)

    def stop_after_first(p: ExportProgress) -> None:
        if p.batches_done == 1 and not p.frames_in_batch:
            raise Interrupt

    with pytest.raises(Interrupt):
        w.export(tmp_path / "cut", scrub=False, batch_size=2, progress=stop_after_first)
    assert not (tmp_path / "cut" / "manifest.json").exists()
    with pytest.raises(ExportError, match="--resume"):
        w.export(tmp_path / "cut", scrub=False, batch_size=2)
    with pytest.raises(ExportError, match="other filters"):
        w.export(tmp_path / "cut", ExportFilters(cohorts=("eng",)), scrub=False, batch_size=2, resume=True)
    other = subprocess.run(  # a second exporter on the same directory, while this one holds it
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)", str(tmp_path / "cut" / ".handtrace-export" / "lock")],
        capture_output=True, text=True, check=False)
    assert other.returncode != 0 and "BlockingIOError" in other.stderr, "the interrupted exporter holds its lock"
    resumed = w.export(tmp_path / "cut", scrub=False, batch_size=2, resume=True)
    assert resumed.batches_resumed == 1
    a = json.loads((tmp_path / "whole" / "manifest.json").read_text())
    b = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    differ = sorted(f for f in a["files"].keys() | b["files"].keys() if a["files"].get(f) != b["files"].get(f))
    assert not differ, f"the resumed export has the same files, byte for byte; differ: {differ}"
    assert a["counts"] == b["counts"] and whole.steps == resumed.steps
    assert not (tmp_path / "cut" / ".handtrace-export").exists()
    assert_loads(tmp_path / "cut")
    with pytest.raises(ExportError, match="finished export"):
        w.export(tmp_path / "cut", scrub=False, resume=True)


def test_filters(warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse(require_scrub=False)
    a = w.add("emp-a", seed=1, t0_us=T0_US, cohort="eng", apps=("code",))
    b = w.add("emp-b", seed=2, t0_us=T0_US + 2 * HOUR, cohort="support", apps=("firefox",))
    c = w.add("emp-a", n_frames=2, seed=3, t0_us=T0_US + 4 * HOUR, cohort="eng", apps=("code", "firefox"),
              n_events=12)

    def tasks(name: str, f: ExportFilters) -> set[str]:
        w.export(tmp_path / name, f, scrub=False)
        return {t["task_id"] for t in lines(tmp_path / name)}

    from datetime import UTC, datetime
    iso = datetime.fromtimestamp((T0_US + HOUR) / 1e6, UTC).isoformat()
    assert tasks("since", ExportFilters(since=iso)) == {b, c}
    assert tasks("until", ExportFilters(until=iso)) == {a}
    assert tasks("apps", ExportFilters(apps=("firefox",))) == {b, c}
    assert tasks("cohort", ExportFilters(cohorts=("support",))) == {b}
    assert tasks("people", ExportFilters(participants=("emp-a",))) == {a, c}
    steps = {t["task_id"]: len(t["traj"]) for t in lines(tmp_path / "people")}
    assert steps[c] > steps[a]
    assert tasks("min", ExportFilters(min_steps=steps[c])) == {c}
    assert tasks("max", ExportFilters(max_steps=steps[c] - 1)) == {a, b}
    with pytest.raises(ExportError, match="no complete demonstration"):
        w.export(tmp_path / "none", ExportFilters(cohorts=("nobody",)), scrub=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty"):
        w.export(tmp_path / "busy", scrub=False)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="ISO"):
        ExportFilters(since="yesterday")


def test_withdrawal_makes_exports_stale_and_reissue_leaves_them_out(
        warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse(require_scrub=False)
    db = w.settings.clickhouse.database
    keep = [w.add("emp-stay", seed=i, t0_us=T0_US + i * HOUR) for i in range(3)]
    gone = [w.add("emp-gone", seed=10 + i, t0_us=T0_US + (10 + i) * HOUR) for i in range(2)]
    both = w.export(tmp_path / "both", scrub=False, batch_size=2)
    only_stay = w.export(tmp_path / "stay", ExportFilters(participants=("emp-stay",)), scrub=False)
    assert stale_exports(w.client, db) == []

    withdraw(w.client, db, employee_key="emp-gone", actor="hr-1", reason="erasure request")
    (stale,) = stale_exports(w.client, db)
    assert stale.export_id == both.export_id and stale.participants == ["emp-gone"]
    assert only_stay.export_id not in {x.export_id for x in stale_exports(w.client, db)}

    new = reissue(w.client, w.store, both.export_id, tmp_path / "new", settings=w.settings, scrub=False)
    assert new.participants == ["emp-stay"]
    tasks = lines(tmp_path / "new")
    assert sorted(t["task_id"] for t in tasks) == sorted(keep)
    assert all(t["participant"] == "emp-stay" for t in tasks)
    steps = assert_loads(tmp_path / "new")
    assert set(steps.column("participant").to_pylist()) == {"emp-stay"}
    assert not any((tmp_path / "new" / "images" / g).exists() for g in gone)
    assert json.loads((tmp_path / "new" / "manifest.json").read_text())["replaces"] == both.export_id
    assert stale_exports(w.client, db) == [], "a replaced export is no longer listed as stale"
    listed = {r["export_id"]: r for r in list_exports(w.client, db).iter_rows(named=True)}
    assert listed[both.export_id]["replaced_by"] == new.export_id

    # Later exports leave the withdrawn out, even when asked for them by name.
    with pytest.raises(ExportError, match="no complete demonstration"):
        w.export(tmp_path / "ask", ExportFilters(participants=("emp-gone",)), scrub=False)

    # One demonstration withdrawn: the reissue (and its own replacement) lose only that one.
    withdraw(w.client, db, demonstration_id=keep[0], actor="emp-stay", reason="withdrawn in the portal")
    assert {x.export_id for x in stale_exports(w.client, db)} == {new.export_id, only_stay.export_id}
    again = reissue(w.client, w.store, new.export_id, tmp_path / "again", settings=w.settings, scrub=False)
    assert sorted(t["task_id"] for t in lines(tmp_path / "again")) == sorted(keep[1:])
    assert again.participants == ["emp-stay"]
    with pytest.raises(ExportError, match="actor and a reason"):
        withdraw(w.client, db, employee_key="emp-stay", actor="", reason="x")


def test_cli_export_check_withdraw_list_reissue(warehouse: Callable[..., Warehouse], tmp_path: Path) -> None:
    w = warehouse()
    for i in range(2):
        w.add(f"emp-{i}", n_frames=2, seed=i)
    clickhouse.close(w.settings.clickhouse_dsn())  # the CLI process opens the embedded engine itself
    env = {**os.environ, "HANDTRACE_STATE_DIR": str(w.settings.state_dir), "HANDTRACE_DEV_MODE": "true",
           "HANDTRACE_CLICKHOUSE__DSN": w.settings.clickhouse_dsn(), "HANDTRACE_STORE__URL": w.settings.store.url or "",
           "HANDTRACE_STREAM__PSEUDONYM_KEY": "test-key-" + "k" * 32, "OMP_THREAD_LIMIT": "1"}

    def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
        p = subprocess.run([sys.executable, "-m", "handtrace.cli", "dataset", *args], env=env, text=True,
                           capture_output=True, timeout=300, check=False)
        assert (p.returncode == 0) == ok, f"{args}: {p.returncode}\n{p.stdout}\n{p.stderr}"
        return p

    out = tmp_path / "cli-out"
    p = cli("export", str(out), "--workers", "2", "--batch-size", "1", "--actor", "researcher-1")
    assert "2 tasks" in p.stdout and "batch 2/2" in p.stderr, p.stderr
    assert "every check passed" in cli("check", str(out)).stdout
    assert "--no-scrub" in cli("export", str(tmp_path / "x"), "--no-scrub", ok=False).stderr
    assert "not consented" in cli("export", str(tmp_path / "x"), "--include-passive", ok=False).stderr
    assert "finished export" in cli("export", str(out), ok=False).stderr
    (out / "steps.parquet").write_bytes(b"tampered")
    assert "steps.parquet" in cli("check", str(out), ok=False).stderr
    cli("withdraw", "--participant", "emp-1", "--actor", "hr-1", "--reason", "left the programme")
    stale = [json.loads(x) for x in cli("list", "--stale", "--json").stdout.splitlines()]
    assert [x["participants"] for x in stale] == [["emp-1"]]
    cli("reissue", stale[0]["export_id"], str(tmp_path / "re"), "--workers", "2")
    assert {t["participant"] for t in lines(tmp_path / "re")} == {"emp-0"}
    assert cli("list", "--stale", "--json").stdout.strip() == ""
    assert "exactly one of" in cli("withdraw", "--actor", "a", "--reason", "r", ok=False).stderr
