"""Subject access (warehouse/subject.py, issue #14 part S) on a real embedded ClickHouse: two
people stored (simulated demonstrations with frames in a local frame store, events over two
days, controls, control-plane audit, exports, withdrawals); one asks for their data. Only their
rows appear (checked by pseudonym and by content), the summary's counts are ClickHouse's,
frames are byte-identical to the store's, an unknown person gets an export that says nothing
is held, and every export is a row in access_audit."""

from __future__ import annotations

import csv
import hashlib
import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core import clickhouse
from handtrace.core.controls import control_record, pause_record
from handtrace.core.erasure import erase
from handtrace.core.framestore import LocalStore
from handtrace.export.simulate import seed_demonstrations
from handtrace.fleet.store import migrate as migrate_fleet
from handtrace.sink.schema import ERASABLE, migrate
from handtrace.warehouse import tiers
from handtrace.warehouse.subject import SubjectAccessError, export_subject, write_heartbeats
from tests.chserve_support import wait_served
from tests.unit.test_erasure import add_events

DB = "handtrace"
T0 = datetime(2026, 11, 2, 22, 0, tzinfo=UTC)
PEOPLE = ("alice", "bob")


def add_readable_events(client: Any, employee_key: str, name: str, n: int, device_key: str | None = None) -> None:
    """``n`` events of one person with text, titles and URLs naming them, every 30 min from 22:00
    (so they span two days), from device ``device_key`` (default ``devkey-<name>``)."""
    rows = [[uuid.uuid4(), uuid.UUID(int=2), employee_key, device_key or f"devkey-{name}", "focus_change",
             T0 + timedelta(minutes=30 * i),
             T0, f"app-{name}", f"typed by {name} #{i}", False, f"Title of {name}",
             f"https://example.com/{name}/{i}", i] for i in range(n)]
    client.insert(f"{DB}.events", rows, column_names=["event_id", "batch_id", "employee_key", "device_key", "kind",
                                                       "captured_at", "received_at", "app_id", "text", "text_masked",
                                                       "window_title", "url", "source_offset"])


@pytest.fixture
def warehouse(tmp_path: Path) -> Iterator[tuple[Any, LocalStore, dict[str, str]]]:
    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        migrate(client, DB)
        store = LocalStore(tmp_path / "frames")
        seeded = seed_demonstrations(client, DB, store, n=4, steps=4, participants=2, seed=5, workers=1,
                                     frame_kind="plain")
        keys = dict(zip(PEOPLE, seeded.participants, strict=True))
        for name, key in keys.items():
            add_events(client, key, 5)
            add_readable_events(client, key, name, 6)
            client.insert(f"{DB}.control_audit",
                          [[T0, "mgr-1", "Manager One", ["hr"], "other_state", name, f"looked at {name}", "", "",
                            "allowed", "", "GET", f"/v1/employees/{name}", 0, 1]],
                          column_names=["at", "subject", "name", "roles", "action", "target", "reason", "before",
                                        "after", "outcome", "detail", "method", "path", "source_partition",
                                        "source_offset"])
        client.insert(f"{DB}.dataset_exports", [[uuid.uuid4(), T0, T0, "ana", "/exports/both", list(keys.values())],
                                                [uuid.uuid4(), T0, T0, "ana", "/exports/bob", [keys["bob"]]]],
                      column_names=["export_id", "created_at", "finished_at", "actor", "output", "participants"])
        client.insert(f"{DB}.withdrawals", [[uuid.uuid4(), "participant", keys["bob"], None, T0, "hr-1", "left"]],
                      column_names=["withdrawal_id", "kind", "employee_key", "demonstration_id", "withdrawn_at",
                                    "actor", "reason"])
        # an analyst query long after everything was stored: it read the events table
        client.insert(f"{DB}.access_audit", [[T0 + timedelta(days=3), "an-1", "u", "analyst", "", "SELECT count() ..",
                                              "", [f"{DB}.events"], [f"{DB}.events.app_id"], 1, "allowed", ""]],
                      column_names=["at", "actor", "os_user", "role", "purpose", "query", "executed", "tables",
                                    "columns", "rows", "outcome", "reason"])
        add_heartbeats(client, DB, ("laptop-alice", "laptop-bob", "kiosk"))
        yield client, store, keys
    finally:
        clickhouse.close(dsn)


def add_heartbeats(client: Any, db: str, devices: tuple[str, ...]) -> None:
    """Three heartbeats a day apart per device, in the fleet store's table (raw device ids)."""
    migrate_fleet(client, db)
    rows = [[uuid.uuid4(), d, T0 + timedelta(days=i), T0 + timedelta(days=i), T0, 80.0 - i]
            for d in devices for i in range(3)]
    client.insert(f"{db}.heartbeats", rows, column_names=["heartbeat_id", "device_id", "sent_at", "received_at",
                                                           "agent_started_at", "battery_percent"])


DEVICE_KEYS = {"laptop-alice": "devkey-alice", "laptop-bob": "devkey-bob", "kiosk": "devkey-kiosk"}
"""The device pseudonyms of the fixture (the stream's HMAC in production)."""


def heartbeats_here(client: Any) -> Any:
    return lambda keys, path: write_heartbeats(client, DB, keys, DEVICE_KEYS.__getitem__, path, batch_rows=2)


def controls() -> list[dict[str, Any]]:
    at = int(T0.timestamp() * 1e6)
    return [pause_record("alice", 10, actor="alice", reason="lunch", at_us=at),
            pause_record("bob", 5, actor="bob", reason="bob's private call", at_us=at),
            control_record("exemption_request", employee_id="alice", actor="alice", role="employee",
                           reason="union work", at_us=at + 1),
            control_record("exemption_grant", employee_id="alice", actor="hr-2", role="hr", reason="approved",
                           at_us=at + 2, exemption_effective_at_us=at + 2)]


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def audit_rows(client: Any) -> list[dict[str, Any]]:
    return list(client.query(f"SELECT actor, role, purpose, query, rows, outcome, reason FROM {DB}.access_audit "
                             "WHERE purpose = 'subject access request' ORDER BY at").named_results())


def test_only_the_asking_persons_data_is_exported_and_counts_match(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    out = tmp_path / "alice"
    lines: list[str] = []
    r = export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=out,
                       actor="dpo-1", reason="Art. 15 #7", controls=controls, progress=lines.append, batch_rows=4,
                       heartbeats=heartbeats_here(client))
    me, other = keys["alice"], keys["bob"]

    def ch(sql: str, key: str = me) -> int:
        return int(client.query(sql.format(db=DB), parameters={"k": key}).first_row[0])

    expected = {
        "events": ch("SELECT count() FROM {db}.events FINAL WHERE employee_key = {{k:String}}"),
        "demonstrations": ch("SELECT count() FROM {db}.demonstrations FINAL WHERE employee_key = {{k:String}}"),
        "demonstration_events": ch(
            "SELECT count() FROM {db}.demonstration_events FINAL WHERE employee_key = {{k:String}}"),
        "frames": ch("SELECT count() FROM {db}.frames FINAL WHERE employee_key = {{k:String}}"),
    }
    assert expected["events"] == 11 and expected["demonstrations"] == 2 and expected["frames"] > 0
    for kind, n in expected.items():
        assert r.counts[kind] == n, kind
    assert r.counts["controls"] == 3 and r.counts["control_audit"] == 1 and r.counts["exports"] == 1
    assert r.counts["withdrawals"] == 0 and r.counts["access"] == 1 and r.counts["heartbeats"] == 3
    beats = read_csv(out / "heartbeats.csv")  # only the device her data came from (paged: batch_rows=2 < 3)
    assert {b["device_id"] for b in beats} == {"laptop-alice"} and [b["battery_percent"] for b in beats] == [
        "80.0", "79.0", "78.0"]

    # events: one file per UTC day, every row theirs, batched (batch_rows=4 < rows of a day)
    days = sorted(p.name for p in (out / "events").iterdir())
    assert days == ["2026-11-02.csv", "2026-11-03.csv"]
    events = [row for d in days for row in read_csv(out / "events" / d)]
    assert len(events) == expected["events"]
    assert {e["app"] for e in events} == {"x", "app-alice"}
    assert sum("typed by alice" in e["text"] for e in events) == 6
    assert any(e["window_title"] == "Title of alice" and e["url"].startswith("https://example.com/alice/")
               for e in events)
    assert [e["time"] for e in events] == sorted(e["time"] for e in events)

    # nothing of the other person, by pseudonym and by content, in any file
    for p in out.rglob("*"):
        if p.is_file() and p.suffix in (".csv", ".json", ".md"):
            text = p.read_text(encoding="utf-8")
            assert other not in text, p
            assert "bob" not in text.lower(), p
    assert me in (out / "SUMMARY.md").read_text(encoding="utf-8")

    # the summary's table is ClickHouse's counts
    summary = (out / "SUMMARY.md").read_text(encoding="utf-8")
    assert summary.startswith("# What handtrace holds about alice")
    for kind, n in expected.items():
        assert f"| {kind.replace('_', ' ')} | {n} |" in summary
    assert "Not included" in summary and "Passive screenshots (when enabled) are not stored" in summary
    assert "Nothing is held" not in summary

    # demonstrations and frames: byte-identical to the store, hashes right
    frames = client.query(f"SELECT toString(demonstration_id), step, sha256, object_key FROM {DB}.frames FINAL "
                          "WHERE employee_key = {k:String}", parameters={"k": me}).result_rows
    for did, step, sha, key in frames:
        f = out / "demonstrations" / did / "frames" / f"{step:04d}.png"
        data = f.read_bytes()
        assert hashlib.sha256(data).hexdigest() == sha and data == store.get(key)
    demos = sorted(p.name for p in (out / "demonstrations").iterdir())
    assert len(demos) == 2
    doc = json.loads((out / "demonstrations" / demos[0] / "demonstration.json").read_text())
    assert doc["demonstration_id"] == demos[0] and doc["instruction"] and doc["frames_files"]

    # the manifest hashes every file written
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"] == r.counts and manifest["employee_key"] == me
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(manifest["files"]) == written
    for rel, sha in manifest["files"].items():
        assert hashlib.sha256((out / rel).read_bytes()).hexdigest() == sha, rel

    controls_rows = read_csv(out / "controls.csv")
    assert [c["kind"] for c in controls_rows] == ["pause_start", "exemption_request", "exemption_grant"]
    assert controls_rows[2]["actor"] == "hr-2" and controls_rows[2]["actor_role"] == "hr"
    (exp,) = read_csv(out / "exports.csv")
    assert exp["output"] == "/exports/both" and exp["you_are_withdrawn"] in ("false", "False", "0")
    assert exp["your_withdrawn_demonstrations_in_it"] == "0"
    assert "queries are not per person" in summary or "not per person" in summary

    # audited: role admin, the purpose, the actor; and progress lines were given
    (row,) = audit_rows(client)
    assert row["actor"] == "dpo-1" and row["role"] == "admin" and row["outcome"] == "allowed"
    assert row["reason"] == "Art. 15 #7" and me in row["query"] and "alice" not in row["query"]
    assert row["rows"] == sum(r.counts.values())
    assert any(line.startswith("events: 11/11") for line in lines) and any("demonstrations: 2/2" in x for x in lines)


def test_the_withdrawn_person_sees_their_withdrawal_and_exports_marked(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    demos = [r[0] for r in client.query(f"SELECT demonstration_id FROM {DB}.demonstrations WHERE employee_key = "
                                        "{k:String} ORDER BY started_at", parameters={"k": keys["bob"]}).result_rows]
    client.insert(f"{DB}.dataset_exports", [[uuid.uuid4(), T0, T0 + timedelta(hours=1), "ana", "/exports/demos",
                                             [keys["bob"]], demos]],
                  column_names=["export_id", "created_at", "finished_at", "actor", "output", "participants",
                                "demonstration_ids"])
    client.insert(f"{DB}.withdrawals", [[uuid.uuid4(), "demonstration", keys["bob"], demos[0], T0, "bob", "oops"]],
                  column_names=["withdrawal_id", "kind", "employee_key", "demonstration_id", "withdrawn_at",
                                "actor", "reason"])
    r = export_subject(client, DB, store, employee_id="bob", employee_key=keys["bob"], out=tmp_path / "b",
                       actor="dpo-1", controls=controls)
    assert r.counts["exports"] == 3 and r.counts["withdrawals"] == 2 and r.counts["controls"] == 1
    exports = read_csv(tmp_path / "b" / "exports.csv")
    assert all(e["you_are_withdrawn"] in ("true", "True", "1") for e in exports)
    assert [e["your_withdrawn_demonstrations_in_it"] for e in exports] == ["0", "0", "1"]
    for p in (tmp_path / "b").rglob("*.csv"):
        assert keys["alice"] not in p.read_text() and "alice" not in p.read_text().lower()


def test_an_unknown_person_gets_an_export_that_says_nothing_is_held(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, _keys = warehouse
    out = tmp_path / "nobody"
    r = export_subject(client, DB, store, employee_id="carol", employee_key="cd" * 16, out=out, actor="dpo-1",
                       controls=controls)
    assert not r.found and set(r.counts.values()) == {0}
    summary = (out / "SUMMARY.md").read_text()
    assert "Nothing is held about you" in summary and "carol" in summary
    assert not (out / "events").exists() and not (out / "demonstrations").exists()
    assert read_csv(out / "controls.csv") == [] and read_csv(out / "access.csv") == []
    (row,) = audit_rows(client)
    assert row["actor"] == "dpo-1" and row["rows"] == 0


def test_a_non_empty_out_dir_is_refused_and_left_alone(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    out = tmp_path / "busy"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SubjectAccessError, match="not an empty directory"):
        export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=out, actor="dpo-1")
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and audit_rows(client) == []


def test_unreadable_controls_are_said_in_the_summary(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse

    def broker_down() -> list[dict[str, Any]]:
        raise RuntimeError("cannot read handtrace.controls: timed out")

    r = export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=tmp_path / "a",
                       actor="dpo-1", controls=broker_down)
    assert len(r.notes) == 2 and "timed out" in r.notes[0] and "the fleet store was not read" in r.notes[1]
    assert r.counts["heartbeats"] == 0 and read_csv(tmp_path / "a" / "heartbeats.csv") == []
    assert "Could not be read for this export" in (tmp_path / "a" / "SUMMARY.md").read_text()
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["notes"] == r.notes


def test_no_audit_no_export(warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse

    class NoAuditClient:  # reads work, the audit insert fails (e.g. a sink from before migration 12)
        def __getattr__(self, name: str) -> Any:
            return getattr(client, name)

        def insert(self, table: str, *a: Any, **kw: Any) -> Any:
            if table.endswith(".access_audit"):
                raise RuntimeError("Code: 60. Unknown table handtrace.access_audit")
            return client.insert(table, *a, **kw)

    out = tmp_path / "a"
    with pytest.raises(tiers.AuditUnavailable, match="nothing is handed out|not answered"):
        export_subject(NoAuditClient(), DB, store, employee_id="alice", employee_key=keys["alice"], out=out,
                       actor="dpo-1", controls=controls)
    assert list(out.iterdir()) == []


def test_a_frame_that_does_not_match_its_hash_stops_the_export(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    key = client.query(f"SELECT object_key FROM {DB}.frames WHERE employee_key = {{k:String}} LIMIT 1",
                       parameters={"k": keys["alice"]}).first_row[0]
    path = store.root / key
    path.chmod(0o644)
    path.write_bytes(b"tampered")
    out = tmp_path / "a"
    with pytest.raises(SubjectAccessError, match="does not match its sha256"):
        export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=out, actor="dpo-1")
    assert list(out.iterdir()) == [] and audit_rows(client) == []


def test_blank_actor_or_a_key_that_is_not_a_pseudonym_is_refused(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    with pytest.raises(SubjectAccessError, match="--actor"):
        export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=tmp_path / "a",
                       actor=" ")
    with pytest.raises(ValueError, match="not an employee pseudonym"):
        export_subject(client, DB, store, employee_id="alice", employee_key="' OR 1=1 --", out=tmp_path / "b",
                       actor="dpo-1")


# ---------------------------------------------------------------- while the sink runs: through its endpoint

OWNER = r"""
import signal, sys, threading
from handtrace.core import chserve, clickhouse
from handtrace.sink.schema import ERASABLE, migrate
from handtrace.stream.steps.pseudonymise import pseudonym
sys.path.insert(0, sys.argv[3])
from tests.unit.test_subject_access import add_readable_events

dsn, db, _root, key = sys.argv[1:5]
client = clickhouse.connect(dsn)
migrate(client, db)
for name in ("alice", "bob"):
    add_readable_events(client, pseudonym(key.encode(), "employee", name), name, 5,
                        device_key=pseudonym(key.encode(), "device", f"laptop-{name}"))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
server = chserve.serve(dsn, stop, erasable=ERASABLE, database=db)
stop.wait()
server.stop()
clickhouse.close(dsn)
"""

FLEET = r"""
import sys
from handtrace.core import clickhouse
sys.path.insert(0, sys.argv[3])
from tests.unit.test_subject_access import add_heartbeats

dsn, db = sys.argv[1:3]
add_heartbeats(clickhouse.connect(dsn), db, ("laptop-alice", "laptop-bob"))
clickhouse.close(dsn)
"""


def test_the_cli_exports_through_the_owners_endpoint_while_it_runs(tmp_path: Path) -> None:
    """`handtrace subject export` while another process (the sink) owns the embedded engine: the
    reads and the audit row go through its query endpoint; the person is found by the HMAC of the
    id they gave."""
    import os
    import signal
    import subprocess
    import sys

    from handtrace.stream.steps.pseudonymise import pseudonym

    root = str(Path(__file__).resolve().parents[2])
    services = str(Path(root) / "services")
    state, key = tmp_path / "state", "k" * 40
    data = state / "clickhouse"
    env = {**os.environ, "PYTHONPATH": f"{services}:{root}", "HANDTRACE_STATE_DIR": str(state),
           "HANDTRACE_STREAM__PSEUDONYM_KEY": key, "HANDTRACE_STORE__URL": f"file://{tmp_path / 'frames'}",
           "COLUMNS": "400"}
    env.pop("HANDTRACE_CLICKHOUSE__DSN", None)
    fleet = subprocess.run([sys.executable, "-c", FLEET, f"chdb://{state / 'clickhouse-fleet'}", DB, root], env=env,
                           capture_output=True, text=True, timeout=120)
    assert fleet.returncode == 0, fleet.stderr[-3000:]
    owner = subprocess.Popen([sys.executable, "-c", OWNER, f"chdb://{data}", DB, root, key], env=env,
                             stderr=subprocess.PIPE)
    try:
        wait_served(owner, data)
        out = tmp_path / "export"
        done = subprocess.run([sys.executable, "-m", "handtrace.cli", "subject", "export", "alice", "--out", str(out),
                               "--actor", "dpo-1", "--reason", "Art. 15 #9", "--no-controls"], env=env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
        assert "events: 5/5" in done.stderr and "recorded in access_audit" in done.stdout
        me, other = (pseudonym(key.encode(), "employee", n) for n in ("alice", "bob"))
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["employee_key"] == me and manifest["counts"]["events"] == 5
        events = [r for p in sorted((out / "events").iterdir()) for r in read_csv(p)]
        assert len(events) == 5 and all("alice" in e["text"] for e in events)
        assert not any(other in p.read_text() or "bob" in p.read_text() for p in out.rglob("*") if p.is_file())
        assert "the controls topic was not read" in (out / "SUMMARY.md").read_text()
        # heartbeats: the fleet store (a dir of its own, read by a child process), her laptop only
        assert manifest["counts"]["heartbeats"] == 3 and manifest["notes"] == [
            "controls (pauses, exemption requests and grants): the controls topic was not read"]
        assert {b["device_id"] for b in read_csv(out / "heartbeats.csv")} == {"laptop-alice"}
        again = subprocess.run([sys.executable, "-m", "handtrace.cli", "subject", "export", "alice", "--out",
                                str(out), "--actor", "dpo-1", "--no-controls"], env=env, capture_output=True,
                               text=True, timeout=180)
        assert again.returncode == 1 and "not an empty directory" in again.stderr + again.stdout
        remote = clickhouse.open_for_cli(f"chdb://{data}")
        assert clickhouse.is_remote(remote)
        (row,) = audit_rows(remote)
        assert row["actor"] == "dpo-1" and row["reason"] == "Art. 15 #9" and me in row["query"]
    finally:
        owner.send_signal(signal.SIGTERM)
        try:
            owner.wait(30)
        except subprocess.TimeoutExpired:
            owner.kill()
            owner.wait(10)


def test_after_an_erasure_the_person_sees_the_receipt_and_nothing_else_of_theirs(
        warehouse: tuple[Any, LocalStore, dict[str, str]], tmp_path: Path) -> None:
    client, store, keys = warehouse
    receipt = erase(client, DB, store, keys["alice"], actor="dpo-1", reason="Art. 17 #3", tables=ERASABLE,
                    suppress=lambda _e: None)
    r = export_subject(client, DB, store, employee_id="alice", employee_key=keys["alice"], out=tmp_path / "a",
                       actor="dpo-1", controls=controls, heartbeats=heartbeats_here(client))
    assert all(r.counts[k] == 0 for k in ("events", "demonstrations", "demonstration_events", "frames",
                                          "heartbeats", "access"))
    assert r.counts["erasures"] == 1 and r.counts["withdrawals"] == 1 and r.counts["exports"] == 1
    (e,) = read_csv(tmp_path / "a" / "erasures.csv")
    assert e["receipt_id"] == receipt.receipt_id and e["reason"] == "Art. 17 #3"
    assert json.loads(e["rows_removed"])["events"] == receipt.rows_removed["events"] > 0
    (exp,) = read_csv(tmp_path / "a" / "exports.csv")
    assert exp["you_are_withdrawn"] in ("true", "True", "1")
    assert not (tmp_path / "a" / "events").exists() and not (tmp_path / "a" / "demonstrations").exists()


# ---------------------------------------------------------------- the invariant, over generated people

_PEOPLE = st.lists(st.tuples(st.integers(0, 40), st.integers(0, 3)), min_size=2, max_size=4)
"""Per person: events, and how many distinct timestamps they share (0: all distinct)."""


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(people=_PEOPLE, asker=st.integers(0, 3), batch_rows=st.integers(1, 7), spread_h=st.integers(1, 60))
def test_an_export_holds_exactly_the_askers_events_whatever_the_paging(
        tmp_path_factory: pytest.TempPathFactory, people: list[tuple[int, int]], asker: int, batch_rows: int,
        spread_h: int) -> None:
    """Exactly the asking person's events (by event id), each once, whatever the batch size, the
    days they span and ties on capture time (keyset paging must neither skip nor repeat)."""
    client = _shared_client(tmp_path_factory)
    db = f"p{uuid.uuid4().hex[:12]}"
    migrate(client, db)
    asker %= len(people)
    ids: list[set[str]] = []
    for p, (n, ties) in enumerate(people):
        key = f"{p:02x}" * 16
        times = [T0 + timedelta(minutes=(i % ties if ties else i) * 60 * spread_h // max(n, 1)) for i in range(n)]
        rows = [[uuid.uuid4(), uuid.UUID(int=3), key, "dev", "click", t, t, f"app{p}", f"person {p}"]
                for t in times]
        if rows:
            client.insert(f"{db}.events", rows, column_names=["event_id", "batch_id", "employee_key", "device_key",
                                                               "kind", "captured_at", "received_at", "app_id",
                                                               "text"])
        ids.append({str(r[0]) for r in rows})
    out = tmp_path_factory.mktemp("export")
    r = export_subject(client, db, None, employee_id=f"person-{asker}", employee_key=f"{asker:02x}" * 16, out=out,
                       actor="dpo-1", batch_rows=batch_rows)
    got = [e for p in sorted((out / "events").glob("*.csv")) for e in read_csv(p)] if ids[asker] else []
    assert [e["event_id"] for e in got] != [] or not ids[asker]
    assert sorted(e["event_id"] for e in got) == sorted(ids[asker])  # each once, none missing
    assert all(e["text"] == f"person {asker}" for e in got)
    assert r.counts["events"] == len(ids[asker]) and r.found == bool(ids[asker])
    assert [e["time"] for e in got] == sorted(e["time"] for e in got)


_CLIENT: dict[str, Any] = {}


def _shared_client(factory: pytest.TempPathFactory) -> Any:
    # one embedded dir per process at a time: the property test's examples share one, each with
    # a database of its own (closed at the end of the session by the fixture below)
    if "c" not in _CLIENT:
        dsn = f"chdb://{factory.mktemp('prop') / 'ch'}"
        _CLIENT["dsn"], _CLIENT["c"] = dsn, clickhouse.connect(dsn)
    return _CLIENT["c"]


@pytest.fixture(autouse=True)
def _close_shared_client() -> Iterator[None]:
    yield
    if "c" in _CLIENT:
        clickhouse.close(_CLIENT.pop("dsn"))
        _CLIENT.clear()
