"""Simulated demonstrations (export/simulate.py) stored as the sink stores them, in the real
embedded ClickHouse and a real frame store; no broker is needed (no broker fixture is used).

Checked against independent oracles: the sink's own Arrow schemas, the store's bytes
(sha256, a full PNG decode), the agent's ``ActionSegmenter`` (which action starts get a frame),
the exporter's ``reduce_actions`` (each demonstration reduces to exactly the planned actions,
``terminate`` last), the project's PII detectors and the real OCR (tesseract) for a PII frame."""

from __future__ import annotations

import hashlib
import io
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from PIL import Image

from handtrace.agent.actions import ActionSegmenter
from handtrace.core import clickhouse, pii
from handtrace.core.framestore import LocalStore, frame_key
from handtrace.export import simulate
from handtrace.export.actions import reduce_actions
from handtrace.sink import demonstrations as sink_demo
from handtrace.sink.schema import migrate

T0 = 1_790_000_000_000_000  # 2026-09
N, STEPS, PARTICIPANTS = 12, 50, 3
DB = "seedtest"


@pytest.fixture(scope="module")
def ch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One embedded ClickHouse for the module (databases per test group)."""
    dsn = f"chdb://{tmp_path_factory.mktemp('seed-ch')}"
    client = clickhouse.connect(dsn)
    try:
        yield client
    finally:
        clickhouse.close(dsn)


@pytest.fixture(scope="module")
def seeded(ch: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, LocalStore, simulate.SeedResult]:
    migrate(ch, DB)
    store = LocalStore(tmp_path_factory.mktemp("seed-store"))
    result = simulate.seed_demonstrations(ch, DB, store, n=N, steps=STEPS, participants=PARTICIPANTS, seed=7,
                                          t0_us=T0, pii_frames=0.15, batch_size=5)
    print(result.summary())
    return ch, store, result


def q(client: Any, sql: str) -> pl.DataFrame:
    return pl.from_arrow(client.query_arrow(sql.format(db=DB)))  # type: ignore[return-value]


def uid(b: bytes) -> str:
    return str(uuid.UUID(bytes=b))


def events(client: Any) -> pl.DataFrame:
    return q(client, "SELECT * FROM {db}.demonstration_events ORDER BY demonstration_id, captured_at, event_id")


def test_the_tables_are_written_with_the_sinks_own_schemas() -> None:
    assert simulate.FRAMES_SCHEMA.equals(sink_demo.FRAMES_SCHEMA)
    assert simulate.EVENTS_SCHEMA.equals(sink_demo.EVENTS_SCHEMA)
    assert simulate.DEMONSTRATIONS_SCHEMA.equals(sink_demo.DEMONSTRATIONS_SCHEMA)


def test_counts_participants_and_cohorts(seeded: Any) -> None:
    client, _, r = seeded
    demos = q(client, "SELECT * FROM {db}.demonstrations")
    assert demos.height == N == len(r.demonstration_ids)
    assert set(demos["status"]) == {"complete"}
    assert sorted(uid(b) for b in demos["demonstration_id"]) == sorted(r.demonstration_ids)
    assert set(demos["employee_key"]) == set(r.participants) and len(r.participants) == PARTICIPANTS
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in r.participants)
    assert all(re.fullmatch(r"[0-9a-f]{64}", k) for k in demos["device_key"])
    for key, cohort in demos.select("employee_key", "cohort").unique().iter_rows():
        assert cohort == r.cohorts[key] and cohort in ("eng", "support")
    assert set(r.cohorts.values()) == {"eng", "support"}
    assert all(len(a) and set(a) <= set(simulate.DEFAULT_APPS) for a in demos["apps"].to_list())
    assert set(demos["consent_version"]) == {simulate.CONSENT_VERSION}
    assert set(demos["screen_width"]) == {1280} and set(demos["screen_height"]) == {800}
    ev = q(client, "SELECT demonstration_id, count() AS n FROM {db}.demonstration_events GROUP BY demonstration_id")
    fr = q(client, "SELECT demonstration_id, count() AS n FROM {db}.frames GROUP BY demonstration_id")
    joined = demos.join(ev, on="demonstration_id").join(fr, on="demonstration_id", suffix="_f")
    assert joined.height == N
    assert (joined["events"] == joined["n"]).all() and (joined["frames"] == joined["n_f"]).all()
    assert int(ev["n"].sum()) == r.events > N * 800  # ~1-2k events per 50-step demonstration
    assert int(fr["n"].sum()) == r.frames
    # a demonstration's events and frames lie within it
    span = q(client, "SELECT d.demonstration_id, min(e.captured_at) >= any(d.started_at) AND "
                     "max(e.captured_at) <= any(d.ended_at) AS ok FROM {db}.demonstration_events e "
                     "JOIN {db}.demonstrations d USING demonstration_id GROUP BY d.demonstration_id")
    assert span.height == N and (span["ok"] == 1).all()


def test_every_frame_row_has_its_object_with_that_sha256(seeded: Any) -> None:
    client, store, r = seeded
    frames = q(client, "SELECT * FROM {db}.frames ORDER BY demonstration_id, step")
    assert frames.height == r.frames
    seen: set[str] = set()
    for row in frames.iter_rows(named=True):
        assert row["object_key"] == frame_key(row["employee_key"], row["sha256"], "png")
        if row["object_key"] in seen:
            continue
        seen.add(row["object_key"])
        data = store.get(row["object_key"])
        assert hashlib.sha256(data).hexdigest() == row["sha256"] and len(data) == row["bytes"]
        img = Image.open(io.BytesIO(data))
        assert img.format == "PNG" and img.size == (row["width"], row["height"]) == (1280, 800)
        img.load()  # the whole deflate stream decodes
    assert len(seen) == r.objects
    assert r.bytes == sum(len(store.get(k)) for k in seen)
    # mostly distinct images (content-addressed; a double click's second press shares one)
    assert frames["sha256"].n_unique() >= 0.85 * frames.height
    # steps 0.. contiguous, the end frame last (step = number of action frames)
    for _, g in frames.group_by("demonstration_id"):
        steps = g["step"].to_list()
        assert steps == list(range(len(steps)))
        assert g["reason"].to_list()[-1] == "end" and g["action_started_at"].to_list()[-1] is None
        assert set(g["reason"].to_list()[:-1]) <= {"click", "drag", "scroll", "typing", "hotkey"}
        caught = g["captured_at"].to_list()
        assert caught == sorted(caught)
        starts = g["action_started_at"].to_list()[:-1]
        assert all(c < s for c, s in zip(caught, starts, strict=False))  # grabbed before the action
        assert all(len(w) >= 1 for w in g["windows"]) and all(len(f) == 1 for f in g["filled"])


def test_events_are_ordered_and_reduce_to_exactly_the_planned_actions(seeded: Any) -> None:
    client, _, r = seeded
    ev = events(client)
    per = ev.group_by("demonstration_id", maintain_order=True).agg(
        (pl.col("captured_at").diff().drop_nulls() > pl.duration(microseconds=0)).all().alias("increasing"))
    assert per["increasing"].all()
    frames = q(client, "SELECT * FROM {db}.frames")
    screens = q(client, "SELECT demonstration_id, screen_width, screen_height FROM {db}.demonstrations")
    acts = reduce_actions(ev, frames, screens)
    for demo_id, g in acts.group_by("demonstration_id", maintain_order=True):
        names = g["action"].to_list()
        assert len(names) == STEPS and names[-1] == "terminate"
        assert names == r.actions[uid(demo_id[0])]
    seen = set(acts["action"])
    assert seen >= {"click", "doubleClick", "rightClick", "dragTo", "scroll", "write", "press", "hotkey", "wait",
                    "terminate"}
    writes = acts.filter(pl.col("action") == "write")["args"].struct.field("message")
    assert writes.str.contains("^•+$").any() and writes.str.contains("^[^•]+$").any()  # masked and kept
    pointer = acts.filter(pl.col("x").is_not_null())
    assert pointer.height > 0 and pointer["x"].is_between(0, 1).all() and pointer["y"].is_between(0, 1).all()
    # every action the agent grabs a frame for links to the frame grabbed for it (rule (a))
    exact = frames.filter(pl.col("reason") != "end").select("demonstration_id", pl.col("sha256").alias("f"),
                                                           pl.col("action_started_at").alias("started_at"))
    linked = acts.filter(pl.col("action").is_in(["click", "doubleClick", "tripleClick", "rightClick", "dragTo",
                                                 "scroll", "hscroll", "write", "hotkey"]))
    joined = linked.join(exact, on=["demonstration_id", "started_at"], how="left")
    assert joined["f"].null_count() == 0
    assert (linked["frame_sha256"].is_not_null()).all()


def test_frames_are_grabbed_where_the_agents_segmenter_starts_actions(seeded: Any) -> None:
    client, _, _ = seeded
    ev = events(client).with_columns(pl.col("captured_at").dt.epoch("us").alias("captured_at_us"))
    frames = q(client, "SELECT demonstration_id, step, reason, action_started_at, action_event_id FROM {db}.frames "
                       "WHERE reason != 'end' ORDER BY demonstration_id, step")
    for (demo_id,), g in ev.group_by("demonstration_id", maintain_order=True):
        seg = ActionSegmenter()
        rows = g.to_dicts()
        actions = seg.feed_all(rows)
        mine = frames.filter(pl.col("demonstration_id") == demo_id)
        starts = [int(t.timestamp() * 1_000_000) for t in mine["action_started_at"]]
        assert [a.started_at_us for a in actions] == starts
        assert [a.kind for a in actions] == mine["reason"].to_list()
        assert [rows[a.first_event]["event_id"] for a in actions] == mine["action_event_id"].to_list()


def test_windows_titles_and_urls_as_the_agent_stamps_them(seeded: Any) -> None:
    client, _, _ = seeded
    ev = events(client)
    assert ev["app_id"].null_count() == 0
    focus = ev.filter(pl.col("kind") == "focus_change")
    assert focus.height >= N
    assert focus["window_title"].null_count() > 0 and focus["window_title"].is_not_null().any()
    assert ev.filter(pl.col("kind") != "focus_change")["window_title"].null_count() == \
        ev.filter(pl.col("kind") != "focus_change").height
    urls = ev.filter(pl.col("url").is_not_null())
    assert urls.height > 0 and set(urls["app_id"]) <= simulate.BROWSERS
    assert urls["url"].str.contains(r"^https://[^/]+/[^?#]+\?").any()  # a path and a query
    masked = ev.filter(pl.col("text_masked"))
    assert masked.height > 0 and set(masked["text"]) == {pii.MASK_CHAR}
    assert set(masked["key_code"]) == {pii.MASKED_KEYSYM}
    # nothing simulated outside the frames is PII: instructions, titles, urls, typed text
    demos = q(client, "SELECT instruction FROM {db}.demonstrations")
    texts = [*demos["instruction"], *focus["window_title"].drop_nulls(), *urls["url"].unique()]
    typed = "".join(ev["text"].drop_nulls())
    assert all(pii.find_spans(t) == [] for t in [*texts, typed])


def test_pii_frames_really_show_the_strings(seeded: Any) -> None:
    client, store, r = seeded
    assert r.pii, "pii_frames=0.15 drew no PII frame"
    frames = q(client, "SELECT DISTINCT sha256, object_key FROM {db}.frames")
    keys = dict(frames.iter_rows())
    assert set(r.pii) <= set(keys)
    kinds = set()
    for strings in r.pii.values():
        for s in strings:
            spans = pii.find_spans(s)
            assert spans and spans[0][0] == 0 and spans[0][1] == len(s), s  # the detectors see all of it
            kinds.add(spans[0][2])
    assert kinds == {"email", "card", "secret"}
    # the real OCR reads them off the pixels (one frame with the most strings)
    sha = max(r.pii, key=lambda k: len(r.pii[k]))
    out = subprocess.run(["tesseract", "-", "-"], input=store.get(keys[sha]), capture_output=True, check=True,
                         timeout=120, env={**os.environ, "OMP_THREAD_LIMIT": "1"}).stdout.decode()
    seen = re.sub(r"[^0-9a-z]", "", out.lower())
    found = [s for s in r.pii[sha] if re.sub(r"[^0-9a-z]", "", s.lower()) in seen]
    assert found == r.pii[sha], (r.pii[sha], out)
    # and what the scrubber will do with that text: the detectors find each kind in it
    assert {k for _, _, k in pii.find_spans(out)} >= {pii.find_spans(s)[0][2] for s in r.pii[sha]}


def test_seeding_again_with_the_same_arguments_adds_nothing(seeded: Any) -> None:
    client, store, r = seeded
    again = simulate.seed_demonstrations(client, DB, store, n=N, steps=STEPS, participants=PARTICIPANTS, seed=7,
                                         t0_us=T0, pii_frames=0.15, batch_size=5)
    assert again.demonstration_ids == r.demonstration_ids and again.pii == r.pii
    for table, n in (("demonstrations", N), ("demonstration_events", r.events), ("frames", r.frames)):
        assert q(client, f"SELECT count() AS n FROM {{db}}.{table}")["n"][0] == n, table


def test_bad_arguments_are_refused(ch: Any, tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    for kw in ({"steps": 2}, {"pii_frames": 1.5}, {"frame_kind": "jpeg"}, {"participants": 0}, {"cohorts": ()}):
        with pytest.raises(ValueError):
            simulate.seed_demonstrations(ch, DB, store, n=1, **kw)  # type: ignore[arg-type]


def test_seeding_speed_200_demonstrations_of_50_steps(ch: Any, tmp_path: Path) -> None:
    migrate(ch, "seedbench")
    store = LocalStore(tmp_path / "store")
    r = simulate.seed_demonstrations(ch, "seedbench", store, n=200, steps=50, participants=5, t0_us=T0,
                                     pii_frames=0.02)
    print(f"\nseed 200 x 50 steps: {r.summary()}")
    (n,), = ch.query("SELECT count() FROM seedbench.demonstration_events").result_rows
    assert n == r.events > 200 * 800 and len(r.demonstration_ids) == 200
    assert r.seconds < 900  # a loose bound: the machine is shared; the number is printed


def test_the_bench_entry_point(tmp_path: Path) -> None:
    # its own process: it opens its own embedded ClickHouse directory
    out = subprocess.run([sys.executable, "-m", "handtrace.export.simulate", "--dsn", f"chdb://{tmp_path}/ch",
                          "--store", f"file://{tmp_path}/store", "-n", "3", "--steps", "12", "--pii-frames", "0.5"],
                         capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_THREAD_LIMIT": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "3/3 demonstrations" in out.stdout and "3 demonstrations, 5 participants" in out.stdout
    assert sum(1 for _ in LocalStore(tmp_path / "store").list("frames/")) > 3 * 5


def test_png_from_bands_is_exactly_the_drawn_screen() -> None:
    # The frame encoder (deflate streams per band, concatenated; Adler-32 combined) against Pillow:
    # a full decode of our PNG equals the same drawing made on a whole image, and zlib checks the
    # stream's Adler-32 and end.
    import zlib

    import numpy as np

    rng = np.random.default_rng(3)
    size = (333, 171)  # not a multiple of the band height
    wins = [simulate._Win("org.gnome.TextEditor", None, 0, simulate.TOP, 200, 171 - simulate.TOP),
            simulate._Win("firefox", simulate.URLS[0], 200, simulate.TOP, 133, 171 - simulate.TOP)]
    base = simulate._Screen.render(size, wins, "text", 1)
    noise = Image.fromarray(rng.integers(0, 256, size=(40, 333, 3), dtype=np.uint8))
    base = base.derive([(100, 140, lambda img, dy: img.paste(noise, (0, 100 + dy)))])
    ops = [simulate._text(10, 60, "ada.lovelace@example.com", simulate.SANS, 16, (15, 15, 15)),
           simulate._rect((5, 150, 300, 170), (200, 30, 30)), simulate._cursor(320, 160),
           simulate._cursor(40, 2)]
    bands, _ = base.with_ops(ops)
    png = simulate._png(*size, bands)
    expect = base.img.copy()
    for _, _, fn in ops:
        fn(expect, 0)
    got = Image.open(io.BytesIO(png))
    assert got.size == size and got.mode == "RGB"
    assert np.array_equal(np.asarray(got), np.asarray(expect))
    idat = png[8 + 25 + 8: -12 - 4]  # after the signature and IHDR chunk, the IDAT data (before its CRC)
    raw = zlib.decompress(idat)  # raises on a wrong Adler-32 or a missing end
    assert len(raw) == size[1] * (1 + 3 * size[0])
