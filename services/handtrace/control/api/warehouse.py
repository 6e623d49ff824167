"""The employee's window onto what is stored about them (docs/design/control-plane.md, Part 3 B):
the ``services.Warehouse`` Protocol over ClickHouse (:class:`ClickHouseWarehouse`) and in memory
(:class:`MemoryWarehouse`, for unit and page tests).

Rows in ClickHouse carry HMAC pseudonyms, never raw ids. The API derives the caller's own
pseudonym with the stream's key (:func:`employee_key`): it is a trusted service holding that key,
like the stream workers (ADR 0013); it only ever derives the key of the authenticated caller, and
never shows a pseudonym to anyone. Every query is parameterised and filtered by that key first
(the tables' sort keys start with ``employee_key``), one aggregate query per page section.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from handtrace.control.api.services import WarehouseUnavailable, iso

if TYPE_CHECKING:
    from handtrace.core.settings import Settings

RECENT_FRAMES = 12
"""Frames "captured about me" shows (newest first)."""
EMPLOYEE_NAMESPACE = "employee"
"""The namespace ``stream/steps/pseudonymise.PseudonymiseStep`` hashes employee ids under: the
key derived here must equal the one stored (a test derives it through the step itself)."""


def employee_key(settings: Settings, employee_id: str) -> str:
    """The stream's pseudonym of ``employee_id`` (HMAC-SHA256 under the pseudonym key), as stored
    in every table. WarehouseUnavailable when the API has no pseudonym key (outside dev mode:
    ``HANDTRACE_STREAM__PSEUDONYM_KEY`` must be the workers' key)."""
    from handtrace.stream.app import MissingSecret, pseudonym_key
    from handtrace.stream.steps.pseudonymise import pseudonym

    try:
        key = pseudonym_key(settings)
    except MissingSecret as e:
        raise WarehouseUnavailable(f"the API cannot find your data: {e}") from None
    return pseudonym(key, EMPLOYEE_NAMESPACE, employee_id)


def _demo_id(demonstration_id: str) -> str | None:
    """The canonical form of a demonstration id, None when it is not a UUID."""
    try:
        return str(uuid.UUID(str(demonstration_id)))
    except ValueError:
        return None


def _counts(groups: dict[tuple[str, str], int]) -> list[dict[str, Any]]:
    rows = [{"app_id": app, "kind": kind, "events": n} for (app, kind), n in groups.items() if n]
    return sorted(rows, key=lambda r: (-r["events"], r["app_id"], r["kind"]))


# ---------------------------------------------------------------- ClickHouse


def _default_factory(dsn: str) -> Callable[[], Any]:
    from handtrace.core import clickhouse

    return lambda: clickhouse.reader(dsn)


_WINDOW = ("employee_key = {key:String} AND captured_at >= fromUnixTimestamp64Micro({since:Int64}, 'UTC') "
           "AND captured_at < fromUnixTimestamp64Micro({until:Int64}, 'UTC')")


class ClickHouseWarehouse:
    """The Warehouse over ClickHouse through ``clickhouse.reader(dsn)`` (never the embedded
    engine's lock: on chdb the process that owns the data dir, the sink, serves it). Every
    ClickHouse error becomes :class:`WarehouseUnavailable` with the cause."""

    def __init__(self, settings: Settings, client_factory: Callable[[], Any] | None = None) -> None:
        self.settings = settings
        self.database = settings.clickhouse.database
        self._factory = client_factory or _default_factory(settings.clickhouse_dsn())
        self._client: Any = None
        self._lock = threading.Lock()

    def _connected(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._factory()
            return self._client

    def _run(self, what: str, fn: Callable[[Any], Any]) -> Any:
        """``fn(client)``; any ClickHouse error -> WarehouseUnavailable (the client is dropped,
        the next call connects again)."""
        try:
            return fn(self._connected())
        except (KeyError, WarehouseUnavailable):
            raise
        except Exception as e:  # noqa: BLE001 - engine, network and driver errors alike
            with self._lock:
                self._client = None
            raise WarehouseUnavailable(f"the warehouse could not be read ({what}): {e}") from None

    def captured(self, employee_key: str, since_us: int, until_us: int) -> dict[str, Any]:
        db = self.database
        params = {"key": employee_key, "since": int(since_us), "until": int(until_us)}

        def read(client: Any) -> dict[str, Any]:
            groups = client.query(
                f"SELECT app_id, kind, sum(n) AS events FROM ("
                f" SELECT ifNull(app_id, '') AS app_id, toString(kind) AS kind, count() AS n"
                f" FROM {db}.events WHERE {_WINDOW} GROUP BY app_id, kind"
                f" UNION ALL"
                f" SELECT ifNull(app_id, '') AS app_id, toString(kind) AS kind, count() AS n"
                f" FROM {db}.demonstration_events WHERE {_WINDOW} GROUP BY app_id, kind"
                f") GROUP BY app_id, kind", parameters=params).result_rows
            demos = client.query(
                f"SELECT uniqExact(demonstration_id) FROM {db}.demonstrations WHERE employee_key = {{key:String}} "
                f"AND started_at >= fromUnixTimestamp64Micro({{since:Int64}}, 'UTC') "
                f"AND started_at < fromUnixTimestamp64Micro({{until:Int64}}, 'UTC')", parameters=params).result_rows
            frames = client.query(
                f"SELECT toString(demonstration_id), step, toUnixTimestamp64Micro(captured_at), sha256, "
                f"toString(reason) FROM {db}.frames WHERE {_WINDOW} "
                f"ORDER BY captured_at DESC, step DESC LIMIT {RECENT_FRAMES}", parameters=params).result_rows
            by = _counts({(str(a), str(k)): int(n) for a, k, n in groups})
            return {"total": sum(r["events"] for r in by), "by_app_kind": by,
                    "demonstrations": int(demos[0][0]) if demos else 0,
                    "frames": [{"demonstration_id": d, "step": int(s), "captured_at": iso(int(at)), "sha256": h,
                                "reason": r} for d, s, at, h, r in frames]}

        result: dict[str, Any] = self._run("captured", read)
        return result

    def demonstrations(self, employee_key: str, limit: int) -> list[dict[str, Any]]:
        db = self.database
        params = {"key": employee_key, "limit": max(0, int(limit))}

        def read(client: Any) -> list[dict[str, Any]]:
            rows = client.query(
                f"SELECT toString(d.demonstration_id), d.instruction, toString(d.status), "
                f"toUnixTimestamp64Micro(d.started_at), toUnixTimestamp64Micro(d.ended_at), d.frames, d.events, "
                f"d.apps, w.n, w.at "
                f"FROM (SELECT * FROM {db}.demonstrations FINAL WHERE employee_key = {{key:String}}) AS d "
                f"LEFT JOIN (SELECT assumeNotNull(demonstration_id) AS demonstration_id, count() AS n, "
                f"  toUnixTimestamp64Micro(min(withdrawn_at)) AS at FROM {db}.withdrawals "
                f"  WHERE employee_key = {{key:String}} AND kind = 'demonstration' AND demonstration_id IS NOT NULL "
                f"  GROUP BY demonstration_id) AS w ON d.demonstration_id = w.demonstration_id "
                f"ORDER BY d.started_at DESC LIMIT {{limit:UInt32}}", parameters=params).result_rows
            whole = client.query(
                f"SELECT count(), toUnixTimestamp64Micro(min(withdrawn_at)) FROM {db}.withdrawals "
                f"WHERE employee_key = {{key:String}} AND kind = 'participant'", parameters=params).result_rows
            everyone_at = int(whole[0][1]) if whole and int(whole[0][0]) else None
            out = []
            for did, instruction, status, started, ended, frames, events, apps, n, at in rows:
                withdrawn_at = int(at) if n else everyone_at
                out.append({"demonstration_id": did, "instruction": instruction, "status": status,
                            "started_at": iso(int(started)), "ended_at": iso(int(ended)), "frames": int(frames),
                            "events": int(events), "apps": list(apps), "withdrawn": withdrawn_at is not None,
                            "withdrawn_at": iso(withdrawn_at)})
            return out

        result: list[dict[str, Any]] = self._run("demonstrations", read)
        return result

    def frame(self, employee_key: str, demonstration_id: str, step: int) -> dict[str, Any] | None:
        did = _demo_id(demonstration_id)
        if did is None or not 0 <= int(step) < 2**32:
            return None
        db = self.database

        def read(client: Any) -> dict[str, Any] | None:
            rows = client.query(
                f"SELECT object_key, sha256, toString(format), width, height FROM {db}.frames "
                f"WHERE employee_key = {{key:String}} AND demonstration_id = {{demo:UUID}} AND step = {{step:UInt32}} "
                f"LIMIT 1", parameters={"key": employee_key, "demo": did, "step": int(step)}).result_rows
            if not rows:
                return None
            key, sha, fmt, w, h = rows[0]
            return {"object_key": key, "sha256": sha, "format": fmt, "width": int(w), "height": int(h)}

        result: dict[str, Any] | None = self._run("frame", read)
        return result

    def withdraw(self, *, employee_key: str, demonstration_id: str, actor: str, reason: str) -> str:
        did = _demo_id(demonstration_id)
        if did is None:
            raise KeyError(demonstration_id)
        db = self.database

        def write(client: Any) -> str:
            from handtrace.export.dataset import withdraw

            owned = client.query(f"SELECT count() FROM {db}.demonstrations WHERE employee_key = {{key:String}} "
                                 f"AND demonstration_id = {{demo:UUID}}",
                                 parameters={"key": employee_key, "demo": did}).result_rows
            if not owned or not int(owned[0][0]):
                raise KeyError(did)  # not theirs, or no such demonstration: the same answer
            return withdraw(client, db, demonstration_id=did, actor=actor, reason=reason)

        result: str = self._run("withdraw", write)
        return result

    def traffic(self, since_us: int, until_us: int) -> Any:
        from handtrace.control.api import dryrun

        return self._run("traffic", lambda client: dryrun.traffic(client, self.database, since_us, until_us,
                                                                  episode_s=self.settings.stream.episode_s))


# ---------------------------------------------------------------- in memory


@dataclass
class MemoryWarehouse:
    """The Warehouse over lists of dict rows (tests): ``events`` and ``demonstration_events``
    {employee_key, app_id, kind, captured_at_us}; ``demonstrations`` {demonstration_id,
    employee_key, instruction, status, started_at_us, ended_at_us, frames, events, apps};
    ``frames`` {demonstration_id, employee_key, step, captured_at_us, sha256, reason, object_key,
    format, width, height}; ``withdrawals`` as written. ``unavailable``: every call raises
    WarehouseUnavailable with it; ``traffic_result``: what ``traffic`` returns (default: nothing stored)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    demonstration_events: list[dict[str, Any]] = field(default_factory=list)
    demos: list[dict[str, Any]] = field(default_factory=list)
    frames: list[dict[str, Any]] = field(default_factory=list)
    withdrawals: list[dict[str, Any]] = field(default_factory=list)
    unavailable: str | None = None
    traffic_result: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _check(self) -> None:
        if self.unavailable is not None:
            raise WarehouseUnavailable(self.unavailable)

    def captured(self, employee_key: str, since_us: int, until_us: int) -> dict[str, Any]:
        self._check()

        def mine(r: dict[str, Any]) -> bool:
            return bool(r["employee_key"] == employee_key and since_us <= r["captured_at_us"] < until_us)

        groups: dict[tuple[str, str], int] = {}
        with self.lock:
            for r in [*self.events, *self.demonstration_events]:
                if mine(r):
                    k = (r.get("app_id") or "", r["kind"])
                    groups[k] = groups.get(k, 0) + 1
            demos = {d["demonstration_id"] for d in self.demos
                     if d["employee_key"] == employee_key and since_us <= d["started_at_us"] < until_us}
            frames = sorted((f for f in self.frames if mine(f)), key=lambda f: (f["captured_at_us"], f["step"]),
                            reverse=True)[:RECENT_FRAMES]
        by = _counts(groups)
        return {"total": sum(r["events"] for r in by), "by_app_kind": by, "demonstrations": len(demos),
                "frames": [{"demonstration_id": f["demonstration_id"], "step": f["step"],
                            "captured_at": iso(f["captured_at_us"]), "sha256": f["sha256"], "reason": f["reason"]}
                           for f in frames]}

    def demonstrations(self, employee_key: str, limit: int) -> list[dict[str, Any]]:
        self._check()
        with self.lock:
            demos = [d for d in self.demos if d["employee_key"] == employee_key]
            withdrawn = {w["demonstration_id"]: w["withdrawn_at_us"] for w in self.withdrawals
                         if w["employee_key"] == employee_key}
        demos.sort(key=lambda d: d["started_at_us"], reverse=True)
        return [{"demonstration_id": d["demonstration_id"], "instruction": d["instruction"], "status": d["status"],
                 "started_at": iso(d["started_at_us"]), "ended_at": iso(d["ended_at_us"]), "frames": d["frames"],
                 "events": d["events"], "apps": list(d["apps"]),
                 "withdrawn": d["demonstration_id"] in withdrawn,
                 "withdrawn_at": iso(withdrawn.get(d["demonstration_id"]))} for d in demos[:max(0, limit)]]

    def frame(self, employee_key: str, demonstration_id: str, step: int) -> dict[str, Any] | None:
        self._check()
        did = _demo_id(demonstration_id)
        with self.lock:
            for f in self.frames:
                if f["employee_key"] == employee_key and f["demonstration_id"] == did and f["step"] == step:
                    return {k: f[k] for k in ("object_key", "sha256", "format", "width", "height")}
        return None

    def withdraw(self, *, employee_key: str, demonstration_id: str, actor: str, reason: str) -> str:
        self._check()
        did = _demo_id(demonstration_id)
        from handtrace.core.clock import now_us
        from handtrace.core.ids import uuid7

        with self.lock:
            if not any(d["employee_key"] == employee_key and d["demonstration_id"] == did
                       for d in self.demos):
                raise KeyError(demonstration_id)
            wid = str(uuid7())
            self.withdrawals.append({"withdrawal_id": wid, "kind": "demonstration", "employee_key": employee_key,
                                     "demonstration_id": did, "withdrawn_at_us": now_us(), "actor": actor,
                                     "reason": reason})
        return wid

    def traffic(self, since_us: int, until_us: int) -> Any:
        self._check()
        if self.traffic_result is not None:
            return self.traffic_result
        from handtrace.control.api.dryrun import Traffic

        return Traffic(since_us=since_us, until_us=until_us, episode_s=600, groups=(), episodes=0, agents=0,
                       demonstrations=0, bytes_basis="nothing stored (in memory)")
