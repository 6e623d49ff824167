"""Subject access (GDPR Art. 15, issue #14 part S): everything held about one person, as files
they can read, with a one-page summary.

``handtrace subject export EMPLOYEE_ID --out DIR --actor A`` runs :func:`export_subject`. Rows
are found by the person's pseudonym (``employee_key``, the stream's HMAC of their id: the
caller derives it, this module never sees the pseudonym key); the controls topic and the
control-plane audit name people by their raw id, so those are found by the id they gave.

Memory: events are read per day, each day in keyset-paged Arrow batches of ``batch_rows`` and
appended to that day's CSV (never the whole history in memory); frames are copied one at a time.
Everything goes through the same client as ``handtrace sql`` (the sink's query endpoint while it
runs, else the data dir), and the export itself is a row in ``access_audit`` (role admin,
purpose "subject access request"), written through ``warehouse.tiers`` -- when it cannot be
written, nothing is handed out (the files are removed).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import re
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

from handtrace.core.erasure import check_employee_key

PURPOSE = "subject access request"
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PERSON_TABLES = ("events", "demonstrations", "demonstration_events", "frames")
"""Tables holding captured data of a person, keyed by ``employee_key`` (sink.schema.ERASABLE)."""

EVENT_COLUMNS = (
    ("time", "toString(captured_at)"),
    ("app", "app_id"),
    ("kind", "kind"),
    ("text", "text"),
    ("text_masked", "text_masked"),
    ("window_title", "window_title"),
    ("url", "url"),
    ("x", "x"),
    ("y", "y"),
    ("button", "button"),
    ("key_code", "key_code"),
    ("modifiers", "modifiers"),
    ("scroll_dx", "scroll_dx"),
    ("scroll_dy", "scroll_dy"),
    ("screenshot_sha256", "screenshot_sha256"),
    ("event_id", "toString(event_id)"),
)
"""Columns of the events CSVs (readable name, expression). ``text`` is as stored: masked
(``•``) where the policy masks typed text."""

CONTROL_COLUMNS = ("time", "kind", "actor", "actor_role", "reason", "pause_ends_at", "exemption_effective_at",
                   "erasure_id", "control_id")


class SubjectAccessError(RuntimeError):
    """An export that could not be made; the message says why (nothing half-written is left)."""


@dataclass
class SubjectExport:
    """What :func:`export_subject` wrote."""

    out: Path
    employee_key: str
    counts: dict[str, int]
    """Kind -> rows (or files) exported: events, demonstrations, demonstration_events, frames,
    controls, control_audit, exports, withdrawals, erasures, access."""
    ranges: dict[str, tuple[str, str]]
    """Kind -> (first, last) time, for the kinds with any rows."""
    files: dict[str, str] = field(default_factory=dict)
    """Relative path -> sha256 of every file written (manifest.json and SUMMARY.md aside)."""
    notes: list[str] = field(default_factory=list)
    """Parts that could not be read (e.g. the controls topic): the export says so."""

    @property
    def found(self) -> bool:
        """True when anything at all is held about the person."""
        return any(self.counts.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepare(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SubjectAccessError(f"{out} is not an empty directory: refusing to write into it (choose a new --out)")
    out.mkdir(parents=True, exist_ok=True)


def _iso(v: Any) -> str:
    if isinstance(v, dt.datetime):
        return (v if v.tzinfo else v.replace(tzinfo=dt.UTC)).isoformat()
    return "" if v is None else str(v)


class _Writer:
    """Files under the export dir, each hashed as it is closed."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.files: dict[str, str] = {}

    def path(self, rel: str) -> Path:
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def done(self, rel: str) -> None:
        self.files[rel] = _sha256(self.out / rel)

    def csv(self, rel: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> int:
        n = 0
        with self.path(rel).open("w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(header)
            for r in rows:
                w.writerow([_iso(v) if not isinstance(v, list | tuple | dict) else json.dumps(v, default=str)
                            for v in r])
                n += 1
        self.done(rel)
        return n


def _event_select() -> str:
    # c_ aliases: an alias named like a column (event_id) would replace it in WHERE and ORDER BY
    return ", ".join(f"{expr} AS c_{name}" for name, expr in EVENT_COLUMNS)


def _events_by_day(client: Any, db: str, key: str, w: _Writer, batch_rows: int,
                   progress: Callable[[str], None]) -> tuple[int, tuple[str, str] | None]:
    days = client.query(
        f"SELECT toString(toDate(captured_at)) AS d, count() FROM {db}.events FINAL "
        "WHERE employee_key = {k:String} GROUP BY d ORDER BY d", parameters={"k": key}).result_rows
    total = sum(int(n) for _d, n in days)
    select = _event_select()
    done = 0
    first = last = None
    for day, _n in days:
        rel = f"events/{day}.csv"
        after: tuple[str, str] | None = None
        writer: pacsv.CSVWriter | None = None
        with w.path(rel).open("wb") as f:
            while True:
                where = "employee_key = {k:String} AND toDate(captured_at) = toDate({d:String})"
                params: dict[str, Any] = {"k": key, "d": day}
                if after is not None:  # keyset paging: memory is one batch, whatever the day holds
                    where += (" AND (captured_at, event_id) > "
                              "(toDateTime64({t:String}, 6, 'UTC'), toUUID({e:String}))")
                    params |= {"t": after[0], "e": after[1]}
                table = client.query_arrow(
                    f"SELECT {select} FROM {db}.events FINAL WHERE {where} "
                    f"ORDER BY captured_at, event_id LIMIT {int(batch_rows)}", parameters=params)
                if table.num_rows == 0:
                    break
                table = table.rename_columns([n for n, _ in EVENT_COLUMNS])
                table = table.cast(pa.schema([pa.field(n, pa.string() if n != "text_masked" else pa.bool_())
                                              for n in table.column_names]))
                if writer is None:
                    writer = pacsv.CSVWriter(f, table.schema)
                writer.write_table(table)
                times, ids = table.column("time"), table.column("event_id")
                after = (str(times[-1]), str(ids[-1]))
                first = first or str(times[0])
                last = str(times[-1])
                done += table.num_rows
                if table.num_rows < batch_rows:
                    break
            if writer is not None:
                writer.close()
        w.done(rel)
        progress(f"events: {done}/{total} ({day})")
    return done, (first, last) if first and last else None


def _demonstrations(client: Any, db: str, store: Any, key: str, w: _Writer,
                    progress: Callable[[str], None]) -> dict[str, Any]:
    demos = list(client.query(
        f"SELECT toString(demonstration_id) AS demonstration_id, instruction, status, started_at, ended_at, cohort, "
        f"apps, screen_width, screen_height, frames, events, missing_frames, frames_dropped, events_dropped, "
        f"reason, consent_version, policy_version, agent_version, os, stored_at "
        f"FROM {db}.demonstrations FINAL WHERE employee_key = {{k:String}} ORDER BY started_at",
        parameters={"k": key}).named_results())
    n_events = n_frames = 0
    for i, d in enumerate(demos, 1):
        did = d["demonstration_id"]
        base = f"demonstrations/{did}"
        frames = list(client.query(
            f"SELECT step, sha256, object_key, format, bytes, width, height, captured_at, reason "
            f"FROM {db}.frames FINAL WHERE employee_key = {{k:String}} AND demonstration_id = toUUID({{d:String}}) "
            f"ORDER BY step, sha256", parameters={"k": key, "d": did}).named_results())
        listed = []
        for fr in frames:
            ext = str(fr["format"] or "png").lower()
            rel = f"{base}/frames/{int(fr['step']):04d}.{ext}"
            data = store.get(fr["object_key"]) if store is not None else None
            entry = {"step": fr["step"], "captured_at": _iso(fr["captured_at"]), "reason": fr["reason"],
                     "width": fr["width"], "height": fr["height"], "sha256": fr["sha256"]}
            if data is None:
                entry["file"] = None
                entry["missing"] = "no frame store configured"
            elif hashlib.sha256(data).hexdigest() != fr["sha256"]:
                raise SubjectAccessError(f"frame {did} step {fr['step']}: the stored object {fr['object_key']} "
                                         f"does not match its sha256: the export stops (report it)")
            else:
                w.path(rel).write_bytes(data)
                w.files[rel] = fr["sha256"]
                entry["file"] = f"frames/{int(fr['step']):04d}.{ext}"
                n_frames += 1
            listed.append(entry)
        ev = client.query(
            f"SELECT {_event_select()} FROM {db}.demonstration_events FINAL "
            f"WHERE employee_key = {{k:String}} AND demonstration_id = toUUID({{d:String}}) "
            f"ORDER BY captured_at, event_id", parameters={"k": key, "d": did})
        n_events += w.csv(f"{base}/events.csv", [n for n, _ in EVENT_COLUMNS], ev.result_rows)
        doc = {k: (_iso(v) if isinstance(v, dt.datetime) else v) for k, v in d.items()}
        doc["frames_files"] = listed
        with w.path(f"{base}/demonstration.json").open("w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, ensure_ascii=False, default=str)
        w.done(f"{base}/demonstration.json")
        progress(f"demonstrations: {i}/{len(demos)} ({len(frames)} frames)")
    rng = (_iso(demos[0]["started_at"]), _iso(demos[-1]["ended_at"])) if demos else None
    return {"demonstrations": len(demos), "demonstration_events": n_events, "frames": n_frames, "range": rng}


HEARTBEAT_COLUMNS = ("sent_at", "device_id", "state", "battery_percent", "charging", "cpu_percent", "rss_bytes",
                     "upload_bytes_per_hour", "agent_drain_percent_per_hour", "events_captured", "events_sent",
                     "events_dropped", "spool_depth_events", "agent_version", "os", "cohort")
"""Columns of heartbeats.csv (the fleet store's ``heartbeats`` table, fleet/store.py)."""

HeartbeatSource = Callable[[set[str], Path], tuple[int, "tuple[str, str] | None"]]
"""Writes the heartbeats of the devices whose pseudonyms are given into the CSV at the path;
returns (rows, (first, last) sent_at or None)."""


def device_keys(client: Any, database: str, employee_key: str) -> set[str]:
    """The device pseudonyms the person's captured data came from (events, demonstrations)."""
    check_employee_key(employee_key)
    rows = client.query(" UNION DISTINCT ".join(
        f"SELECT DISTINCT device_key FROM {database}.{t} WHERE employee_key = {{k:String}}"
        for t in ("events", "demonstrations", "demonstration_events")), parameters={"k": employee_key}).result_rows
    return {str(r[0]) for r in rows if r[0]}


def write_heartbeats(client: Any, database: str, keys: set[str], device_pseudonym: Callable[[str], str],
                     path: Path, batch_rows: int = 50_000) -> tuple[int, tuple[str, str] | None]:
    """Write into ``path`` (CSV) the heartbeats of the devices whose pseudonym is in ``keys``.
    The fleet store keeps raw device ids and no employee id: a device is the person's when the
    stream's pseudonym of its id (``device_pseudonym``, HMAC) is one their data carries -- one
    HMAC per distinct device id, never per row. Keyset-paged (memory: one batch)."""
    ids = [str(r[0]) for r in client.query(f"SELECT DISTINCT device_id FROM {database}.heartbeats").result_rows]
    mine = sorted(d for d in ids if device_pseudonym(d) in keys)
    n = 0
    first = last = None
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEARTBEAT_COLUMNS)
        after: tuple[str, str] | None = None
        while mine:
            where = "device_id IN {ids:Array(String)}"
            params: dict[str, Any] = {"ids": mine}
            if after is not None:
                where += (" AND (sent_at, heartbeat_id) > "
                          "(toDateTime64({t:String}, 6, 'UTC'), toUUID({h:String}))")
                params |= {"t": after[0], "h": after[1]}
            rows = client.query(
                f"SELECT toString(sent_at) AS c_sent, {', '.join(HEARTBEAT_COLUMNS[1:])}, "
                f"toString(heartbeat_id) AS c_id FROM {database}.heartbeats FINAL WHERE {where} "
                f"ORDER BY sent_at, heartbeat_id LIMIT {int(batch_rows)}", parameters=params).result_rows
            for r in rows:
                w.writerow([_iso(v) if not isinstance(v, dict) else json.dumps(v) for v in r[:-1]])
            if not rows:
                break
            n += len(rows)
            first = first or str(rows[0][0])
            last, after = str(rows[-1][0]), (str(rows[-1][0]), str(rows[-1][-1]))
            if len(rows) < batch_rows:
                break
    return n, (first, last) if first and last else None


def controls_from_topic(settings: Any) -> list[dict[str, Any]]:
    """Every verified employee control on the controls topic, oldest first: signed by a
    control-plane key in force, or by a laptop enrolled for that record's own employee (forged
    records are left out), as the API folds them (control/api/services.KafkaState)."""
    from typing import cast

    from handtrace.control.api.services import KafkaAudit, KafkaState

    # records() never reads the API's audit trail (only pending requests do, for denials): no
    # audit producer to open
    state = KafkaState(settings, cast(KafkaAudit, None))
    try:
        return state.records()
    finally:
        state.close()


def heartbeats_in_child(keys: set[str], path: Path, timeout_s: float = 600.0) -> tuple[int, tuple[str, str] | None]:
    """:func:`write_heartbeats` in a child process with this process's settings (environment): an
    embedded engine can open one data dir per process, and the fleet store is a dir of its own
    (fleet/store.fleet_dsn). RuntimeError with the child's message when it fails (e.g. the fleet
    exporter holds the dir)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "handtrace.warehouse.subject", "heartbeats", str(path)],
                          input=json.dumps(sorted(keys)), capture_output=True, text=True, timeout=timeout_s,
                          check=False)
    if done.returncode != 0:
        lines = [x for x in done.stderr.strip().splitlines() if x.strip()]
        raise RuntimeError(lines[-1] if lines else f"the heartbeat reader exited with {done.returncode}")
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    rng = doc["range"]
    return int(doc["rows"]), (str(rng[0]), str(rng[1])) if rng else None


def _heartbeats_main(path: str) -> int:
    """Child entry of :func:`heartbeats_in_child`: device pseudonyms (JSON list) on stdin."""
    import sys

    from handtrace.core import clickhouse
    from handtrace.core.settings import load_settings
    from handtrace.fleet.store import fleet_dsn
    from handtrace.stream.app import pseudonym_key
    from handtrace.stream.steps.pseudonymise import pseudonym

    s = load_settings()
    keys = set(json.loads(sys.stdin.read() or "[]"))
    dsn = fleet_dsn(s)
    where = clickhouse.embedded_path(dsn)
    if where is not None and not where.exists():
        raise SystemExit(f"no fleet store on this host ({where}): heartbeats are stored only where the fleet "
                         "exporter runs with fleet.store_heartbeats")
    client = clickhouse.open_for_cli(dsn)
    hmac_key = pseudonym_key(s)
    try:
        n, rng = write_heartbeats(client, s.clickhouse.database, keys,
                                  lambda d: pseudonym(hmac_key, "device", d), Path(path))
    finally:
        if not clickhouse.is_remote(client):
            clickhouse.close(dsn)
    print(json.dumps({"rows": n, "range": list(rng) if rng else None}))  # noqa: T201 -- the parent reads it
    return 0


def _controls(records: Sequence[dict[str, Any]], employee_id: str, w: _Writer) -> tuple[int, tuple[str, str] | None]:
    def t(us: Any) -> str:
        return "" if us is None else dt.datetime.fromtimestamp(int(us) / 1e6, dt.UTC).isoformat()

    from handtrace.control.api.services import control_id

    mine = sorted((r for r in records if r.get("employee_id") == employee_id), key=lambda r: r["occurred_at_us"])
    rows = []
    for r in mine:
        cid = control_id(r) if r.get("control_id") is not None else ""
        rows.append([t(r["occurred_at_us"]), r["kind"], r.get("actor", ""), r.get("actor_role", ""),
                     r.get("reason", ""), t(r.get("pause_ends_at_us")), t(r.get("exemption_effective_at_us")),
                     r.get("erasure_id") or "", cid])
    n = w.csv("controls.csv", CONTROL_COLUMNS, rows)
    return n, (rows[0][0], rows[-1][0]) if rows else None


def _query_csv(client: Any, w: _Writer, rel: str, sql: str, params: dict[str, Any]) -> tuple[int, Any]:
    result = client.query(sql, parameters=params)
    rows = [list(r) for r in result.result_rows]
    n = w.csv(rel, list(result.column_names), rows)
    return n, ((_iso(rows[0][0]), _iso(rows[-1][0])) if rows else None)


def export_subject(client: Any, database: str, store: Any, *, employee_id: str, employee_key: str, out: Path,
                   actor: str, reason: str = "", controls: Callable[[], Sequence[dict[str, Any]]] | None = None,
                   heartbeats: HeartbeatSource | None = None,
                   progress: Callable[[str], None] = lambda _m: None, batch_rows: int = 50_000,
                   now: dt.datetime | None = None) -> SubjectExport:
    """Write everything held about one person into ``out`` (new or empty; module docstring) and
    record the export in ``access_audit``. ``employee_key`` is the pseudonym of ``employee_id``
    (the caller derives it); ``controls()`` returns the verified control records of the controls
    topic (control/api/services.KafkaState.records; None or an exception: noted as not read);
    ``heartbeats(device_keys, path)`` writes heartbeats.csv (:func:`write_heartbeats`, run where
    the fleet store can be opened; None or an exception: noted as not read).
    SubjectAccessError for a refused or failed export; tiers.AuditUnavailable when the audit row
    cannot be written (the files are removed then)."""
    from handtrace.warehouse import tiers

    actor = actor.strip()
    if not actor:
        raise SubjectAccessError("a subject access export needs --actor (it is recorded in access_audit)")
    if not employee_id.strip():
        raise SubjectAccessError("give the employee id whose data to export")
    check_employee_key(employee_key)
    if not _IDENTIFIER.fullmatch(database):
        raise ValueError(f"not a plain database name: {database!r}")
    if batch_rows < 1:
        raise ValueError("batch_rows must be >= 1")
    out = Path(out)
    _prepare(out)
    now = now or dt.datetime.now(dt.UTC)
    w = _Writer(out)
    counts: dict[str, int] = {}
    ranges: dict[str, tuple[str, str]] = {}
    notes: list[str] = []
    db = database
    try:
        progress("events: counting")
        counts["events"], rng = _events_by_day(client, db, employee_key, w, batch_rows, progress)
        if rng:
            ranges["events"] = rng
        d = _demonstrations(client, db, store, employee_key, w, progress)
        for k in ("demonstrations", "demonstration_events", "frames"):
            counts[k] = d[k]
        if d["range"]:
            ranges["demonstrations"] = d["range"]
        if controls is None:
            notes.append("controls (pauses, exemption requests and grants): the controls topic was not read")
            w.csv("controls.csv", CONTROL_COLUMNS, [])
            counts["controls"] = 0
        else:
            try:
                records = controls()
            except Exception as e:  # noqa: BLE001 -- said in the summary, not a crash
                notes.append(f"controls (pauses, exemption requests and grants): the controls topic could not be "
                             f"read ({_first_line(e)})")
                records = []
            counts["controls"], rng = _controls(records, employee_id, w)
            if rng:
                ranges["controls"] = rng
        progress(f"controls: {counts['controls']}")
        counts["heartbeats"] = 0
        hb_path = w.path("heartbeats.csv")
        try:
            if heartbeats is None:
                raise LookupError("the fleet store was not read")
            counts["heartbeats"], rng = heartbeats(device_keys(client, db, employee_key), hb_path)
            if rng:
                ranges["heartbeats"] = rng
        except Exception as e:  # noqa: BLE001 -- said in the summary, not a crash
            notes.append(f"heartbeats (agent health of your devices): {_first_line(e)}")
            w.csv("heartbeats.csv", HEARTBEAT_COLUMNS, [])
        w.done("heartbeats.csv")
        progress(f"heartbeats: {counts['heartbeats']}")
        queries: list[tuple[str, str, str, dict[str, Any]]] = [
            ("control_audit", "control_audit.csv",
             f"SELECT at, action, outcome, subject AS by_subject, name AS by_name, roles AS by_roles, reason, "
             f"before, after FROM {db}.control_audit WHERE target = {{id:String}} ORDER BY at",
             {"id": employee_id}),
            ("exports", "exports.csv",
             f"SELECT e.finished_at AS finished_at, toString(e.export_id) AS export_id, e.actor AS actor, "
             f"e.output AS output, length(e.demonstration_ids) AS demonstrations_in_export, "
             f"(SELECT count() FROM {db}.withdrawals WHERE employee_key = {{k:String}} "
             f"AND kind = 'participant') > 0 AS you_are_withdrawn, "
             f"arrayCount(x -> has((SELECT groupArray(assumeNotNull(demonstration_id)) FROM {db}.withdrawals "
             f"WHERE employee_key = {{k:String}} AND kind = 'demonstration'), x), e.demonstration_ids) "
             f"AS your_withdrawn_demonstrations_in_it, "
             f"toString(e.replaces) AS replaces "
             f"FROM {db}.dataset_exports AS e FINAL WHERE has(e.participants, {{k:String}}) ORDER BY e.finished_at",
             {"k": employee_key}),
            ("withdrawals", "withdrawals.csv",
             f"SELECT withdrawn_at, kind, toString(demonstration_id) AS demonstration_id, actor, reason, "
             f"toString(withdrawal_id) AS withdrawal_id FROM {db}.withdrawals "
             f"WHERE employee_key = {{k:String}} ORDER BY withdrawn_at", {"k": employee_key}),
            ("erasures", "erasures.csv",
             f"SELECT requested_at, verified_at, actor, reason, rows_removed, objects_removed, "
             f"toString(receipt_id) AS receipt_id FROM {db}.erasure_receipts "
             f"WHERE employee_key = {{k:String}} ORDER BY requested_at", {"k": employee_key}),
        ]
        for kind, rel, sql, params in queries:
            counts[kind], rng = _query_csv(client, w, rel, sql, params)
            if rng:
                ranges[kind] = rng
        held = [f"{db}.{t}" for t in PERSON_TABLES if counts.get(t)]
        # one format before comparing (events: "YYYY-MM-DD hh:mm:ss.ffffff", others ISO with "T"),
        # cut to the second: earlier, never later, than the first row
        since = min((r[0].replace("T", " ")[:19] for k, r in ranges.items() if k in ("events", "demonstrations")),
                    default=None)
        if held and since:
            counts["access"], rng = _query_csv(
                client, w, "access.csv",
                f"SELECT at, actor, role, purpose, outcome, rows AS rows_returned, tables, query "
                f"FROM {db}.access_audit WHERE hasAny(tables, {{t:Array(String)}}) "
                f"AND at >= parseDateTime64BestEffort({{s:String}}, 6, 'UTC') ORDER BY at",
                {"t": held, "s": since})
            if rng:
                ranges["access"] = rng
        else:
            counts["access"] = w.csv("access.csv", ["at", "actor", "role", "purpose", "outcome", "rows_returned",
                                                    "tables", "query"], [])
        progress(f"access audit: {counts['access']} queries read tables holding your rows")
        result = SubjectExport(out, employee_key, counts, ranges, w.files, notes)
        _summary(result, employee_id, now, w)
        _manifest(result, employee_id, now, actor, reason, w)
    except BaseException:
        _clear(out)
        raise
    row_total = sum(counts.values())
    try:
        tiers.record_access(client, database, actor=actor, role="admin", purpose=PURPOSE,
                            query=f"handtrace subject export (employee_key {employee_key})",
                            tables=[f"{db}.{t}" for t in (*PERSON_TABLES, "control_audit", "dataset_exports",
                                                          "withdrawals", "erasure_receipts", "access_audit")],
                            rows=row_total, reason=reason)
    except BaseException:
        _clear(out)
        raise
    return result


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _clear(out: Path) -> None:
    for p in out.iterdir() if out.exists() else ():
        shutil.rmtree(p) if p.is_dir() else p.unlink()


FILES_EXPLAINED = (
    ("events/YYYY-MM-DD.csv", "your passive activity events, one file per day (UTC): time, app, kind, typed text "
                              "(masked with • where the policy masks it), window title, URL, pointer and key data"),
    ("demonstrations/<id>/", "each demonstration you recorded: demonstration.json (the task as you worded it, "
                             "status, times, apps), events.csv, and frames/NNNN.png (the screenshots as stored)"),
    ("controls.csv", "your pauses, exemption requests, grants and revokes, with who issued them, their role and why"),
    ("control_audit.csv", "what the control-plane API did, refused or showed about you (e.g. a manager viewing your "
                          "capture state), and by whom"),
    ("heartbeats.csv", "agent health reports (battery, CPU, bandwidth, events sent) of the devices your data came "
                       "from; a device shared with others reports for all of its users"),
    ("exports.csv", "training-data exports you appear in, whether you have been withdrawn since, and how many of "
                    "your demonstrations in each you withdrew"),
    ("withdrawals.csv", "your withdrawals from training data (a demonstration, or you as a participant)"),
    ("erasures.csv", "erasure receipts about you (what was deleted, when it was verified)"),
    ("access.csv", "queries of the access audit that read a table holding your rows (see below)"),
    ("manifest.json", "every file with its SHA-256, and the counts"),
)

NOT_INCLUDED = (
    "Passive screenshots (when enabled) are not stored by the warehouse: the images pass through Kafka "
    "topics (screenshots.raw, screenshots.accepted) and are deleted when the topics' retention expires (72 h by "
    "default); events keep only each screenshot's hash and size (screenshot_sha256).",
    "Data in transit: the raw Kafka topics hold what your laptop sent, before enforcement (pause, exemption, "
    "redaction), until their retention expires; they are not readable through the warehouse and are not copied "
    "here.",
    "Heartbeats of devices your captured data never came from: the fleet store keeps device ids and no employee "
    "id, so a device is linked to you only through the pseudonymous device key on your events and demonstrations.",
    "Other people's data: rows are selected by your pseudonym only; queries in access.csv are listed because they "
    "read a table that holds your rows -- a query is not per person, so most of them did not look at you.",
    "Your raw employee id is not stored with your captured data: it is replaced by a pseudonym (an HMAC) before "
    "storage; controls and the control-plane audit name you by your id.",
)


def _summary(r: SubjectExport, employee_id: str, now: dt.datetime, w: _Writer) -> None:
    lines = [f"# What handtrace holds about {employee_id}", "",
             f"Exported {now.astimezone(dt.UTC):%Y-%m-%d %H:%M} UTC (GDPR Art. 15 subject access). "
             f"Your pseudonym in the warehouse: `{r.employee_key}`.", ""]
    if not r.found:
        lines += ["**Nothing is held about you**: no events, demonstrations, frames, controls, exports, "
                  "withdrawals or erasure receipts were found under your id or your pseudonym.", ""]
    lines += ["| what | count | first (UTC) | last (UTC) |", "|---|---:|---|---|"]
    for kind in ("events", "demonstrations", "demonstration_events", "frames", "controls", "heartbeats",
                 "control_audit", "exports", "withdrawals", "erasures", "access"):
        first, last = r.ranges.get(kind, r.ranges.get("demonstrations", ("", "")) if kind in (
            "demonstration_events", "frames") and r.counts.get(kind) else ("", ""))
        lines.append(f"| {kind.replace('_', ' ')} | {r.counts.get(kind, 0)} | {first[:19].replace('T', ' ')} "
                     f"| {last[:19].replace('T', ' ')} |")
    lines += ["", "## The files", ""]
    lines += [f"- `{name}`: {what}" for name, what in FILES_EXPLAINED]
    lines += ["", "## Not included, and why", ""]
    lines += [f"- {n}" for n in NOT_INCLUDED]
    if r.notes:
        lines += ["", "## Could not be read for this export", ""] + [f"- {n}" for n in r.notes]
    lines.append("")
    w.path("SUMMARY.md").write_text("\n".join(lines), encoding="utf-8")
    w.done("SUMMARY.md")


def _manifest(r: SubjectExport, employee_id: str, now: dt.datetime, actor: str, reason: str, w: _Writer) -> None:
    doc = {"employee_id": employee_id, "employee_key": r.employee_key, "exported_at": now.isoformat(),
           "actor": actor, "reason": reason, "purpose": PURPOSE, "counts": r.counts,
           "ranges": {k: list(v) for k, v in r.ranges.items()}, "notes": r.notes,
           "files": dict(sorted(r.files.items()))}
    buf = io.StringIO()
    json.dump(doc, buf, indent=2, ensure_ascii=False)
    w.path("manifest.json").write_text(buf.getvalue() + "\n", encoding="utf-8")


if __name__ == "__main__":  # the heartbeat reader's child process (heartbeats_in_child)
    import sys

    if len(sys.argv) != 3 or sys.argv[1] != "heartbeats":
        raise SystemExit("usage: python -m handtrace.warehouse.subject heartbeats PATH (device keys on stdin)")
    try:
        raise SystemExit(_heartbeats_main(sys.argv[2]))
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 -- one line for the parent's note
        raise SystemExit(f"the fleet store could not be read: {_first_line(e)}") from None
