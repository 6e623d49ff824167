"""The dry run of a sampling change (docs/design/control-plane.md, Part 3 C): what a new
``policy.sampling`` would store, estimated from what the current one stored in a recent window.

:func:`traffic` reads the ``events`` table (stored rows only: what the current rates kept) in a
window, one aggregate query per aspect; :func:`estimate` scales it group by group. Both are pure
over their inputs apart from the queries; the API and the ops page call :func:`dry_run`.

How the estimate reasons (its approximations are stated in :data:`NOTES`, shown to the reader):

* A group is the stored rows of one (app_id, kind). The rate that decides it, now and after, is
  the stream's own precedence rule (``stream/steps/sample.deciding_selector``: ``app:`` >
  ``kind:`` > ``cohort:`` > ``*``, unmatched rows kept). Stored rows have no cohort, so
  ``cohort:`` selectors are ignored here and listed in the basis.
* Sampling keeps a whole episode's rows of one rate with probability = rate, so a group's stored
  rows scale by ``after / now``. A group whose rate now is 0 stored nothing to scale from (any of
  its rows in the window come from an earlier policy): it is reported as unknown and left out of
  both columns, never guessed. Selectors whose rate is 0 now hide their rows entirely: when the
  change raises them, the rows they would keep are listed as unseen (the "after" is then a lower
  bound).
* Share of episodes kept: an episode keeps rows iff its draw ``u`` is below the largest rate among
  its rows (nested rates). Per group, the captured episodes containing it are estimated as
  ``episodes_seen / rate_now``; the group in the most captured episodes is taken to be in every
  episode, and groups are taken to occur independently of each other. Then
  ``P(kept) = integral over u of (1 - prod over groups with rate > u of (1 - presence))``, an
  expected value, the same formula for now and after.
* Demonstrations are never sampled: their share kept is 1 now and after.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import polars as pl

from handtrace.core.clock import now_us
from handtrace.stream.steps.sample import deciding_selector, rate_for

DEFAULT_EPISODE_S = 600
"""``stream.episode_s``'s default; callers pass the configured value (``settings.stream.episode_s``)."""
_US = 1_000_000

FIXED_ROW_BYTES = 137
"""Uncompressed bytes of an ``events`` row apart from its strings, in ClickHouse's column encoding
(sink/schema.py): 2 UUIDs (32), 3 DateTime64 (24), 9 nullable Int32 (45), nullable Bool (2), Bool
(1), 2 Int64/Int32 source fields (12), 6 LowCardinality indexes (~6), 6 string length prefixes and
5 null maps (~15)."""
ROW_BYTES_SQL = ("length(employee_key) + length(device_key) + ifNull(length(text), 0) + "
                 "ifNull(length(window_title), 0) + ifNull(length(url), 0) + ifNull(length(screenshot_sha256), 0)")
BYTES_BASIS = ("bytes: each row's uncompressed size in ClickHouse's column encoding ({fixed} fixed bytes plus "
               "its strings), times the events table's compression ratio from system.parts "
               "(compressed / uncompressed: {ratio:.3g})")

MIN_RATE_NOW = 1e-6
"""A group whose rate now is below this is unknown too: so few of its rows were kept that scaling
them up says nothing (and the arithmetic would overflow)."""

NOTES = (
    "Assumes the rates in force now were in force for the whole window.",
    "A group's stored rows scale by (rate after / rate now): rows of one rate are kept or dropped by whole episode.",
    "Groups whose rate now is 0 stored nothing to scale from: they are listed as unknown and left out of both columns.",
    "Share of episodes kept is an expected value: an episode keeps rows iff its draw is below the highest rate of "
    "its rows; the most frequent group is taken to be in every episode and groups to occur independently.",
    "Demonstrations are never sampled: all of them are kept, now and after.",
)


@dataclass(frozen=True)
class Group:
    """The stored rows of one (app_id, kind) in the window."""

    app_id: str | None
    kind: str
    rows: int
    bytes: float
    episodes: int


@dataclass(frozen=True)
class Traffic:
    """What the ``events`` table stored in [since_us, until_us): the input of :func:`estimate`."""

    since_us: int
    until_us: int
    episode_s: int
    groups: tuple[Group, ...]
    episodes: int
    """Distinct (employee, device, episode) with at least one stored row."""
    agents: int
    """Distinct device_key with at least one stored row."""
    demonstrations: int
    """Demonstrations started in the window (never sampled)."""
    bytes_basis: str = ""

    @property
    def window_s(self) -> float:
        return max(self.until_us - self.since_us, 1) / _US

    @property
    def rows(self) -> int:
        return sum(g.rows for g in self.groups)


@dataclass(frozen=True)
class Metric:
    """One line of the estimate: ``now`` vs ``after`` (None: nothing to compute it from)."""

    metric: str
    label: str
    unit: str
    now: float | None
    after: float | None


@dataclass(frozen=True)
class Estimate:
    """The dry run's answer (``to_dict`` is the JSON of ``PUT /policy/sampling?dry_run=true``)."""

    metrics: tuple[Metric, ...]
    groups: tuple[dict[str, Any], ...]
    basis: dict[str, Any]
    notes: tuple[str, ...] = NOTES
    available: bool = True

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.metric == name)

    def to_dict(self) -> dict[str, Any]:
        return {"available": True, "metrics": [asdict(m) for m in self.metrics], "groups": list(self.groups),
                "basis": dict(self.basis), "notes": list(self.notes)}


def unavailable(why: str) -> dict[str, Any]:
    """The dry run's answer when there is nothing to estimate from (no warehouse, not reachable)."""
    return {"available": False, "why": why}


# ---------------------------------------------------------------- reading the warehouse


def _frame(client: Any, sql: str, parameters: dict[str, Any]) -> pl.DataFrame:
    df = pl.from_arrow(client.query_arrow(sql, parameters=parameters))
    assert isinstance(df, pl.DataFrame)  # noqa: S101 -- a Table always converts to a DataFrame
    return df


def traffic(client: Any, database: str, since_us: int, until_us: int, *,
            episode_s: int = DEFAULT_EPISODE_S) -> Traffic:
    """What ``database.events`` stored with ``captured_at`` in [since_us, until_us): rows, bytes
    and distinct episodes by (app_id, kind), distinct episodes and agents overall, and the
    demonstrations started in the window. Four aggregate queries, no per-row Python."""
    if episode_s <= 0:
        raise ValueError("episode_s must be positive")
    db = database
    p = {"since": int(since_us), "until": int(until_us), "ep": int(episode_s) * _US, "db": db}
    window = ("captured_at >= fromUnixTimestamp64Micro(%(since)s) "
              "AND captured_at < fromUnixTimestamp64Micro(%(until)s)")
    episode = "employee_key, device_key, intDiv(toUnixTimestamp64Micro(captured_at), %(ep)s)"
    groups = _frame(client, f"SELECT app_id, toString(kind) AS kind, count() AS rows, "  # noqa: S608 -- db is ours
                    f"sum({ROW_BYTES_SQL}) AS string_bytes, uniqExact({episode}) AS episodes "
                    f"FROM {db}.events WHERE {window} GROUP BY app_id, kind", p)
    overall = _frame(client, f"SELECT uniqExact({episode}) AS episodes, uniqExact(device_key) AS agents "  # noqa: S608
                     f"FROM {db}.events WHERE {window}", p)
    demos = _frame(client, f"SELECT uniqExact(demonstration_id) AS n FROM {db}.demonstrations "  # noqa: S608
                   "WHERE started_at >= fromUnixTimestamp64Micro(%(since)s) "
                   "AND started_at < fromUnixTimestamp64Micro(%(until)s)", p)
    parts = _frame(client, "SELECT sum(data_compressed_bytes) AS c, sum(data_uncompressed_bytes) AS u "
                   "FROM system.parts WHERE active AND database = %(db)s AND table = 'events'", p)
    c, u = (parts.row(0) if parts.height else (0, 0))
    ratio = float(c) / float(u) if c and u else 1.0
    groups = groups.with_columns(
        ((pl.col("string_bytes").cast(pl.Float64) + pl.col("rows").cast(pl.Float64) * FIXED_ROW_BYTES) * ratio)
        .alias("bytes"))
    return Traffic(
        since_us=int(since_us), until_us=int(until_us), episode_s=int(episode_s),
        groups=tuple(Group(app_id=a, kind=str(k), rows=int(r), bytes=float(b), episodes=int(e))
                     for a, k, r, b, e in groups.select("app_id", "kind", "rows", "bytes", "episodes")
                     .sort("app_id", "kind", nulls_last=True).iter_rows()),  # one per (app, kind): bounded
        episodes=int(overall.item(0, "episodes")) if overall.height else 0,
        agents=int(overall.item(0, "agents")) if overall.height else 0,
        demonstrations=int(demos.item(0, "n")) if demos.height else 0,
        bytes_basis=BYTES_BASIS.format(fixed=FIXED_ROW_BYTES, ratio=ratio),
    )


# ---------------------------------------------------------------- the estimate


def _cohort_selectors(*policies: Mapping[str, Any]) -> list[str]:
    return sorted({s for p in policies for s in p if s.startswith("cohort:")})


def _without_cohorts(sampling: Mapping[str, Any]) -> dict[str, Any]:
    return {s: r for s, r in sampling.items() if not s.startswith("cohort:")}


def _unseen(current: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Selectors whose rate is 0 now (nothing they decide is stored) and that the change raises or
    removes: rows the new policy may keep that the window cannot show."""
    out = []
    for sel, rate in current.items():
        if sel.startswith("cohort:"):
            continue
        if rate_for({"*": rate}, None, None) > 0.0:  # the step's reading of the value (invalid: 0)
            continue
        if sel not in new or rate_for({"*": new[sel]}, None, None) > 0.0:
            out.append(sel)
    return sorted(out)


def _share_kept(presence_rates: list[tuple[float, float]]) -> float | None:
    """Expected share of captured episodes with at least one row kept, from (presence, rate) per
    group: integral over u in [0, 1) of 1 - prod_{rate > u} (1 - presence)."""
    if not presence_rates:
        return None
    cuts = sorted({0.0, 1.0, *(min(max(r, 0.0), 1.0) for _p, r in presence_rates)})
    total = 0.0
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        miss = 1.0
        for presence, rate in presence_rates:
            if rate > lo:  # rate >= hi: u in [lo, hi) is below it
                miss *= 1.0 - presence
        total += (hi - lo) * (1.0 - miss)
    return min(max(total, 0.0), 1.0)


def estimate(traffic: Traffic, current_rates: Mapping[str, Any], new_rates: Mapping[str, Any]) -> Estimate:
    """What ``new_rates`` would store, from what ``current_rates`` stored in ``traffic``'s window
    (module docstring: the reasoning and its approximations)."""
    current, new = _without_cohorts(current_rates), _without_cohorts(new_rates)
    window_s = traffic.window_s
    groups: list[dict[str, Any]] = []
    unknown: list[dict[str, Any]] = []
    rows_now = rows_after = bytes_now = bytes_after = 0.0
    captured: list[tuple[float, float, float]] = []  # (captured episodes containing the group, rate now, after)
    for g in traffic.groups:
        sel_now, r_now = deciding_selector(current, g.app_id, g.kind)
        sel_after, r_after = deciding_selector(new, g.app_id, g.kind)
        line = {"app_id": g.app_id, "kind": g.kind, "rows": g.rows, "selector_now": sel_now, "rate_now": r_now,
                "selector_after": sel_after, "rate_after": r_after}
        if r_now <= 0.0:
            unknown.append({**line, "why": "rate now is 0: nothing stored under it to scale from"})
            continue
        if r_now < MIN_RATE_NOW:
            unknown.append({**line, "why": f"rate now ({r_now:.3g}) is too small to scale from"})
            continue
        k = r_after / r_now
        rows_now += g.rows
        rows_after += g.rows * k
        bytes_now += g.bytes
        bytes_after += g.bytes * k
        captured.append((g.episodes / r_now, r_now, r_after))
        groups.append({**line, "events_per_s_now": g.rows / window_s, "events_per_s_after": g.rows * k / window_s})
    per_hour = 3600.0 / window_s
    agents = traffic.agents
    widest = max((n for n, _r, _a in captured), default=0.0)
    presence = [(min(n / widest, 1.0) if widest > 0 else 0.0, r, a) for n, r, a in captured]
    metrics = (
        Metric("events_per_s", "Events stored per second", "events/s", rows_now / window_s, rows_after / window_s),
        Metric("bytes_per_hour_per_agent", "Bytes stored per hour per agent", "bytes/h",
               bytes_now * per_hour / agents if agents else None,
               bytes_after * per_hour / agents if agents else None),
        Metric("episodes_kept", "Share of episodes kept", "share",
               _share_kept([(p, r) for p, r, _a in presence]), _share_kept([(p, a) for p, _r, a in presence])),
        Metric("demonstrations_kept", "Share of demonstrations kept", "share", 1.0, 1.0),
    )
    basis = {
        "since_us": traffic.since_us, "until_us": traffic.until_us, "window_s": window_s,
        "episode_s": traffic.episode_s, "rows_seen": traffic.rows, "episodes_seen": traffic.episodes,
        "agents": agents, "demonstrations": traffic.demonstrations, "groups": len(traffic.groups),
        "unknown_groups": unknown, "unseen_selectors": _unseen(current, new),
        "ignored_selectors": _cohort_selectors(current_rates, new_rates), "bytes": traffic.bytes_basis,
    }
    return Estimate(metrics=metrics, groups=tuple(groups), basis=basis)


def dry_run(warehouse: Any, current_rates: Mapping[str, Any], new_rates: Mapping[str, Any], *, window_s: int,
            at_us: int | None = None) -> dict[str, Any]:
    """The estimate for the API and the ops page: ``{"available": true, ...}`` from the last
    ``window_s`` seconds of ``warehouse.traffic``, or ``{"available": false, "why"}`` when there is
    no warehouse or it cannot be read (the dry run never fails the request)."""
    if warehouse is None:
        return unavailable("no warehouse is configured for the API (HANDTRACE_CLICKHOUSE__DSN): "
                           "there is no recent traffic to estimate from")
    until = now_us() if at_us is None else at_us
    try:
        seen = warehouse.traffic(until - window_s * _US, until)
    except Exception as e:  # noqa: BLE001 -- WarehouseUnavailable or a query error: say why, do not fail
        return unavailable(f"the warehouse could not be read: {e}")
    return estimate(seen, current_rates, new_rates).to_dict()


def change_ratio(now: float | None, after: float | None) -> str:
    """The change of one metric in words for the page ("x1.5", "+0.2", "unchanged", "-")."""
    if now is None or after is None or not (math.isfinite(now) and math.isfinite(after)):
        return "-"
    if after == now:
        return "unchanged"
    if now == 0:
        return f"+{after:.3g}"
    return f"x{after / now:.3g}"


def show(value: float | None, unit: str) -> str:
    """One metric's value for a person: shares as percentages, bytes with a unit, rates to three
    significant figures; "-" when there is nothing to show."""
    if value is None or not math.isfinite(value):
        return "-"
    if unit == "share":
        return f"{value * 100:.3g}%"
    if unit == "bytes/h":
        for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
            if value >= scale:
                return f"{value / scale:.3g} {name}/h"
        return f"{value:.3g} B/h"
    return f"{value:.3g} {unit}"


def duration(seconds: float) -> str:
    """A window length in words ("1 hour", "30 minutes", "2 days")."""
    for size, name in ((86_400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return f"{n} {name}{'' if n == 1 else 's'}"
    return f"{seconds:g} seconds"
