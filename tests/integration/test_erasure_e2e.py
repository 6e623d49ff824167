"""Erasure through the real pipeline (issue #14 part E, "Done when"): a person's events are
stored by the running stream worker and sink process (their demonstrations, frames in the frame
store and an export containing them were there before); `handtrace erase` (another process)
sends the signed suppression and has the sink -- which owns the embedded data dir -- delete the
rows; 0 rows are left in every erasable table, 0 objects, a receipt is recorded and the export
is stale; afterwards NEW events of that person and LATE ones (captured before the erasure) are
dropped by the stream, while another person's are stored. Before deleting, the command waits
until the pipeline holds nothing more of the person (control/settle.py); with the worker
stopped it gives up and the receipt says ``settled: false``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from handtrace.core import chserve, clickhouse
from handtrace.core.admin import group_lag
from handtrace.core.clock import now_us
from handtrace.core.framestore import FrameStore, open_store
from handtrace.core.settings import Settings, settings_env
from handtrace.export.dataset import stale_exports
from handtrace.export.simulate import seed_demonstrations
from handtrace.sink.schema import ERASABLE, migrate
from handtrace.stream.app import pseudonym_key
from handtrace.stream.steps.pseudonymise import pseudonym
from tests.factories import make_batch
from tests.integration.conftest import producer, start_sink_process, stream_metric, topics_of, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

GONE, KEPT = "emp-gone", "emp-kept"


def cli(s: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("HANDTRACE_")}, **settings_env(s),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "handtrace.cli", *args],  # noqa: S603
                          env=env, capture_output=True, text=True, timeout=180, check=False)


def stored(s: Settings, employee_key: str) -> int:
    r = cli(s, "query", f"SELECT count() AS n FROM {s.clickhouse.database}.events WHERE employee_key = "
                        f"'{employee_key}'", "--format", "json")
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["n"])


def seed_demonstrations_of(s: Settings, store: FrameStore, employee_key: str) -> str:
    """Complete demonstrations with frames of ``employee_key`` (the simulator's, relabelled) and an
    export containing them, written before the sink starts; returns the export id."""
    db, dsn = s.clickhouse.database, s.clickhouse_dsn()
    client = clickhouse.connect(dsn)
    try:
        migrate(client, db)
        (p0,) = seed_demonstrations(client, db, store, n=2, steps=4, participants=1, seed=5, workers=1,
                                    frame_kind="plain").participants
        keys = {"k": employee_key, "p": p0}
        for t in ("demonstrations", "frames", "demonstration_events"):
            cols = [r[0] for r in client.query(
                "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String} AND "
                "default_kind NOT IN ('MATERIALIZED', 'ALIAS') ORDER BY position", parameters={"d": db, "t": t}
            ).result_rows]
            values = ["{k:String}" if c == "employee_key" else "replaceOne(object_key, {p:String}, {k:String})"
                      if c == "object_key" else f"`{c}`" for c in cols]
            # an explicit column list: chdb's client silently runs nothing for INSERT .. SELECT * without one
            client.command(f"INSERT INTO {db}.{t} ({', '.join(f'`{c}`' for c in cols)}) SELECT {', '.join(values)} "
                           f"FROM {db}.{t} WHERE employee_key = {{p:String}}", parameters=keys)
            assert client.command(f"SELECT count() FROM {db}.{t} WHERE employee_key = {{k:String}}",
                                  parameters=keys) > 0, t
            client.command(f"ALTER TABLE {db}.{t} DELETE WHERE employee_key = {{p:String}} SETTINGS mutations_sync = 2",
                           parameters=keys)
        for key in list(store.list(f"frames/{p0}/")):
            store.put(key.replace(p0, employee_key), store.get(key))
            store.delete(key)
        export = "0190f0f0-0000-7000-8000-00000000e001"
        client.command(f"INSERT INTO {db}.dataset_exports (export_id, created_at, finished_at, actor, output, "
                       f"participants) VALUES ('{export}', now64(6), now64(6), 'ana', '/exports/x', [{{k:String}}])",
                       parameters=keys)
        return export
    finally:
        clickhouse.close(dsn)


def test_erase_while_the_pipeline_runs_then_new_and_late_events_are_dropped(  # type: ignore[no-untyped-def]
        settings_factory, stream_worker, tmp_path: Path) -> None:
    s = settings_factory()
    t = topics_of(s)
    data = Path(clickhouse.embedded_path(s.clickhouse_dsn()) or "")
    gone_key, kept_key = (pseudonym(pseudonym_key(s), "employee", e) for e in (GONE, KEPT))
    store = open_store(s)
    export = seed_demonstrations_of(s, store, gone_key)
    objects = len(list(store.list(f"frames/{gone_key}/")))
    assert objects > 0
    worker = stream_worker(s)
    p = producer(s)
    for seq, who in enumerate((GONE, KEPT, GONE)):
        payload, _ = make_batch(who, 60, seed=seq, seq=seq + 1)
        p.produce(t.events, key=who.encode(), value=payload)
    assert p.flush(30) == 0

    def drained() -> bool:
        return (group_lag(s.kafka, s.stream.app_id, t.events) == 0
                and group_lag(s.kafka, s.sink.group_id, t.stored) == 0)

    log = tmp_path / "sink.log"
    sink = start_sink_process(s, log)
    try:
        wait_for(lambda: (data / chserve.ENDPOINT_FILE).exists(), 120, "the sink to serve its data dir",
                 lambda: log.read_text()[-3000:])
        wait_for(lambda: drained() and stored(s, gone_key) > 0 and stored(s, kept_key) > 0, 180,
                 "the pipeline to store both people's events", worker.tail)
        before_gone, before_kept = stored(s, gone_key), stored(s, kept_key)
        erased_at = now_us()

        blank = cli(s, "erase", GONE, "--actor", " ", "--reason", "r")
        assert blank.returncode == 1 and "--actor and --reason" in blank.stderr, blank.stderr

        r = cli(s, "erase", GONE, "--actor", "dpo-1", "--reason", "Art. 17 request #7", "--json")
        assert r.returncode == 0, r.stderr
        receipt = json.loads(r.stdout)
        assert receipt["employee_key"] == gone_key and receipt["found"] is True
        assert receipt["settled"] is True  # the worker folded it and the pipeline drained before the deletion
        assert receipt["rows_removed"]["events"] == before_gone
        # make_batch types no key chords: the shortcut rollup holds nothing of them to remove
        assert all(receipt["rows_removed"][t] > 0 for t in ERASABLE if t != "rollup_shortcuts_hourly"), receipt
        assert receipt["objects_removed"] == objects and list(store.list(f"frames/{gone_key}/")) == []
        assert stored(s, gone_key) == 0 and stored(s, kept_key) == before_kept
        reader = clickhouse.reader(s.clickhouse_dsn())
        left = reader.query(" UNION ALL ".join(f"SELECT count() FROM {s.clickhouse.database}.{t} WHERE employee_key = "
                                               f"'{gone_key}'" for t in ERASABLE)).result_rows
        assert [n for (n,) in left] == [0] * len(ERASABLE)
        assert [(x.export_id, x.participants) for x in stale_exports(reader, s.clickhouse.database)] == [
            (export, [gone_key])]

        listed = cli(s, "erase", "receipts", "--json")
        assert listed.returncode == 0, listed.stderr
        assert [json.loads(x)["receipt_id"] for x in listed.stdout.splitlines()] == [receipt["receipt_id"]]
        w = cli(s, "query", f"SELECT kind, employee_key FROM {s.clickhouse.database}.withdrawals", "--format", "csv")
        assert w.stdout.splitlines()[1:] == [f"participant,{gone_key}"], (w.stdout, w.stderr)

        nobody = cli(s, "erase", "emp-never-seen", "--actor", "dpo-1", "--reason", "r")
        assert nobody.returncode == 0, nobody.stderr
        assert "nothing was stored about emp-never-seen" in nobody.stdout and "suppression" in nobody.stdout

        # The worker folds the suppression (a signed grant on the controls topic) ...
        wait_for(lambda: stream_metric(s, 'handtrace_stream_controls_total{kind="exemption_grant"}') >= 2, 120,
                 "the worker to apply the erasure controls", worker.tail)
        # ... then new events and late ones (captured an hour before the erasure) are dropped.
        late_t0 = erased_at - 3_600_000_000
        for seq, (who, t0) in enumerate([(GONE, None), (GONE, late_t0), (KEPT, None), (KEPT, late_t0)], start=10):
            payload, _ = make_batch(who, 40, seed=seq, seq=seq, t0_us=t0)
            p.produce(t.events, key=who.encode(), value=payload)
        assert p.flush(30) == 0
        wait_for(lambda: stream_metric(s, 'handtrace_stream_events_total{decision="erased"}') >= 80 and drained()
                 and stored(s, kept_key) > before_kept, 180,
                 "the new and late events to be judged and the other person's stored", worker.tail)
        assert stored(s, gone_key) == 0
        assert stream_metric(s, 'handtrace_stream_events_total{decision="erased"}') == 80

        # With the worker stopped nothing folds the control: the wait gives up, the receipt says so.
        worker.stop()
        unsettled = cli(s, "erase", KEPT, "--actor", "dpo-1", "--reason", "r", "--settle-timeout", "3", "--json")
        assert unsettled.returncode == 0, unsettled.stderr
        assert json.loads(unsettled.stdout)["settled"] is False and stored(s, kept_key) == 0
    finally:
        sink.send_signal(signal.SIGTERM)
        sink.wait(60)
    assert sink.returncode == 0, log.read_text()[-3000:]
