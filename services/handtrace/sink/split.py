"""Writing one flush when its rows cannot all go in together (issue #10, class 2).

A flush is tried whole first. When ClickHouse refuses its rows (bad data), or before trying when
they would touch too many ClickHouse partitions, it is split into **pieces**, and pieces are split
again until each one is either inserted or rejected (dead-lettered with a reason):

1. by source message first (``source_offset``, halving the distinct offsets), so one hostile
   agent batch is cut off from the other employees' rows after ~2·log2(messages) inserts;
2. then, within one source message, by ClickHouse partition (``toYYYYMM(captured_at)``, halving
   the distinct months);
3. then by rows (halving in ``event_id`` order), while the message's budget of failed inserts
   lasts; after that a refused piece is rejected whole (bounded work for a message whose every
   row is bad).

Exactly once, across crashes: every piece has a **name** that is a function of its rows alone
(``s12-40``: source offsets 12..40; ``s7-7/m202301-202306``: offset 7, those months;
``s7-7/m202301-202301/r0-9``: rows 0..9 of that in event_id order), and its dedup token is the
flush token plus ``#name``. Every *decision* -- split this piece, reject it, its dead-letter copy
is out -- is written to the ledger *before* it is acted on; a replay follows the recorded
decisions and re-derives the same pieces, so each row ends up inserted under one token (which
ClickHouse deduplicates) or rejected, never both, whatever the settings or ClickHouse's mood on
the replay (docs/adr/0003-exactly-once-sink.md, "Bad data").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from handtrace.sink import metrics
from handtrace.sink.errors import TOO_MANY_PARTITIONS, Classified, ErrorClass, classify

log = logging.getLogger("handtrace.sink")

SPLIT = "split"
REJECTED = "rejected"
DEAD_LETTERED = "dead_lettered"


class Stopped(Exception):  # noqa: N818 -- a signal, not an error
    """The sink was asked to stop while it waited (nothing of the flush is committed)."""


@dataclass(frozen=True)
class Piece:
    """Rows of one flush that are inserted, split or rejected together. ``name`` is '' for the
    whole flush; otherwise it is determined by the rows alone (see the module docstring)."""

    name: str
    rows: pa.Table


@dataclass(frozen=True)
class Decision:
    """A decision about one piece, as recorded in the ledger."""

    outcome: str
    reason: str = ""
    detail: str = ""


@dataclass
class FlushOutcome:
    """What one flush did: the pieces inserted (their tables), rows rejected by reason."""

    inserted: list[pa.Table] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    inserts: int = 0

    @property
    def rows_inserted(self) -> int:
        return sum(t.num_rows for t in self.inserted)


def months(rows: pa.Table) -> pa.Array:
    """The ClickHouse partition of each row (``toYYYYMM(captured_at)``, UTC) as int64."""
    cap = rows.column("captured_at")
    return pc.add(pc.multiply(pc.year(cap), 100), pc.month(cap))


def distinct_months(rows: pa.Table) -> int:
    """How many ClickHouse partitions ``rows`` touch (1 in the common case, found cheaply)."""
    if rows.num_rows == 0:
        return 0
    # The hot path: the earliest and latest capture in one month (two values, not a column).
    mm = pc.min_max(rows.column("captured_at"))
    first, last = pc.year(mm["min"]).as_py(), pc.year(mm["max"]).as_py()
    if first == last and pc.month(mm["min"]).as_py() == pc.month(mm["max"]).as_py():
        return 1
    return len(pc.unique(months(rows)))


def batches_spanning(rows: pa.Table, limit: int) -> set[int]:
    """Source offsets (agent batches) whose rows touch more than ``limit`` ClickHouse partitions."""
    if rows.num_rows == 0 or distinct_months(rows) <= limit:
        return set()
    per = pa.table({"o": rows.column("source_offset"), "m": months(rows)}).group_by("o").aggregate(
        [("m", "count_distinct")])
    wide = per.filter(pc.greater(per.column("m_count_distinct"), limit))
    return {int(o) for o in wide.column("o").to_pylist()}


def _offset_range(rows: pa.Table) -> tuple[int, int]:
    mm = pc.min_max(rows.column("source_offset")).as_py()
    return int(mm["min"]), int(mm["max"])


def children(piece: Piece) -> list[Piece]:
    """The halves of ``piece`` (empty for a single row). A function of the piece's rows only."""
    rows = piece.rows
    src = rows.column("source_offset")
    offsets = pc.unique(src).sort()
    if len(offsets) > 1:
        mid = offsets[(len(offsets) - 1) // 2]
        out = []
        for part in (rows.filter(pc.less_equal(src, mid)), rows.filter(pc.greater(src, mid))):
            lo, hi = _offset_range(part)
            out.append(Piece(f"s{lo}-{hi}", part))
        return out
    off = int(offsets[0].as_py())
    mon = months(rows)
    distinct = pc.unique(mon).sort()
    if len(distinct) > 1:
        mid = distinct[(len(distinct) - 1) // 2]
        out = []
        for mask in (pc.less_equal(mon, mid), pc.greater(mon, mid)):
            part = rows.filter(mask)
            mm = pc.min_max(months(part)).as_py()
            out.append(Piece(f"s{off}-{off}/m{mm['min']}-{mm['max']}", part))
        return out
    if rows.num_rows < 2:
        return []
    order = pc.sort_indices(rows.column("event_id"))
    ordered = rows.take(order)
    half = (rows.num_rows + 1) // 2
    base = piece.name or f"s{off}-{off}"
    return [Piece(f"{base}/r0-{half - 1}", ordered.slice(0, half)),
            Piece(f"{base}/r{half}-{rows.num_rows - 1}", ordered.slice(half))]


def piece_token(flush_token: str, piece: Piece) -> str:
    """The dedup token of a piece: the flush's own for the whole flush."""
    return flush_token if not piece.name else f"{flush_token}#{piece.name}"


@dataclass
class FlushSplitter:
    """Inserts one flush, splitting it as the module docstring says.

    Callbacks (the sink passes its ClickHouse client and producer; tests pass fakes):
    ``insert(piece, token)`` inserts rows (raises on failure); ``record(piece, decision)`` writes
    a decision to the ledger (durably, before returning); ``publish(piece, reason, detail)`` sends
    rejected rows to the dead-letter topic (delivered before returning); ``wait(attempt)`` sleeps
    the backoff before a retry and raises ``Stopped`` when the sink is stopping; ``healthy()``
    says whether ClickHouse answers a trivial query.
    """

    insert: Callable[[Piece, str], None]
    record: Callable[[Piece, Decision], None]
    publish: Callable[[Piece, str, str], None]
    wait: Callable[[int], None]
    healthy: Callable[[], bool]
    max_partitions_per_insert: int = 100
    max_partitions_per_batch: int = 3
    unknown_error_retries: int = 3
    failed_inserts_per_batch: int = 32
    classify: Callable[[BaseException], Classified] = classify

    def write(self, root: Piece, token: str, decided: dict[str, Decision] | None = None) -> FlushOutcome:
        """Insert ``root`` (the whole flush) under ``token``, following ``decided`` (the ledger's
        decisions for this flush, on a replay) before deciding anything new."""
        decided = dict(decided or {})
        out = FlushOutcome()
        wide = batches_spanning(root.rows, self.max_partitions_per_batch)
        failures: dict[int, int] = {}
        stack = [root]
        while stack:
            piece = stack.pop()
            if piece.rows.num_rows == 0:
                continue
            known = decided.get(piece.name)
            if known is not None and known.outcome == SPLIT:
                stack.extend(reversed(children(piece)))
                continue
            if known is not None and known.outcome in (REJECTED, DEAD_LETTERED):
                if known.outcome == REJECTED:  # the copy may not have gone out before a crash
                    self._dead_letter(piece, known)
                out.rejected[known.reason] = out.rejected.get(known.reason, 0) + piece.rows.num_rows
                continue
            verdict = self._precheck(piece, wide)
            if verdict is None:
                outcome = self._try_insert(piece, token)
                out.inserts += 1
                if outcome is None:
                    out.inserted.append(piece.rows)
                    continue
                verdict = outcome
                lo, hi = _offset_range(piece.rows)
                if lo == hi:
                    failures[lo] = failures.get(lo, 0) + 1
            kids = children(piece)
            single = _offset_range(piece.rows)
            over_budget = single[0] == single[1] and failures.get(single[0], 0) > self.failed_inserts_per_batch
            if kids and not over_budget and verdict.reason != "batch_partitions":
                self.record(piece, Decision(SPLIT, verdict.reason))
                metrics.SPLITS.labels(verdict.reason).inc()
                stack.extend(reversed(kids))
                continue
            reason = TOO_MANY_PARTITIONS if verdict.reason == "batch_partitions" else verdict.reason
            decision = Decision(REJECTED, reason, verdict.detail[:200])
            self.record(piece, decision)
            self._dead_letter(piece, decision)
            out.rejected[reason] = out.rejected.get(reason, 0) + piece.rows.num_rows
        return out

    def _precheck(self, piece: Piece, wide: set[int]) -> Classified | None:
        """A reason not to try ``piece`` at all, or None."""
        if wide:
            lo, hi = _offset_range(piece.rows)
            if lo == hi and lo in wide:
                n = distinct_months(piece.rows)
                return Classified(ErrorClass.BAD_DATA, "batch_partitions", None,
                                  f"one source batch spans {n} ClickHouse partitions "
                                  f"(max_partitions_per_batch={self.max_partitions_per_batch})")
            if any(lo <= o <= hi for o in wide):
                return Classified(ErrorClass.BAD_DATA, "isolate_wide_batch", None, "")
        n = distinct_months(piece.rows)
        if n > self.max_partitions_per_insert:
            return Classified(ErrorClass.BAD_DATA, TOO_MANY_PARTITIONS, None,
                              f"{n} partitions > max_partitions_per_insert_block "
                              f"{self.max_partitions_per_insert}")
        return None

    def _try_insert(self, piece: Piece, token: str) -> Classified | None:
        """Insert, retrying what is retryable; None when inserted, else why the rows are refused."""
        attempt = 0
        unknown = 0
        while True:
            try:
                self.insert(piece, piece_token(token, piece))
                return None
            except Stopped:
                raise
            except Exception as e:  # noqa: BLE001 -- every failure is classified below
                c = self.classify(e)
                metrics.INSERT_ERRORS.labels(c.cls.value).inc()
                if c.cls is ErrorClass.BAD_DATA:
                    log.warning("insert of %s rows refused (%s): isolating the offending rows",
                                piece.rows.num_rows, c.reason)
                    return c
                if c.cls is ErrorClass.UNKNOWN:
                    unknown += 1
                    # Bounded: an error we cannot place, that persists while the server is
                    # otherwise healthy, is treated as the rows' fault (split + dead letter)
                    # rather than stop every later row of everyone (docs/adr/0003).
                    if unknown > self.unknown_error_retries and self.healthy():
                        log.warning("insert of %s rows keeps failing with an unclassified error "
                                    "(%s) while ClickHouse is up: treating it as bad data",
                                    piece.rows.num_rows, c.reason)
                        return Classified(ErrorClass.BAD_DATA, c.reason, c.code, c.detail)
                log.warning("insert of %s rows failed (%s, %s); retrying", piece.rows.num_rows,
                            c.cls.value, c.reason)
                self.wait(attempt)
                attempt += 1

    def _dead_letter(self, piece: Piece, decision: Decision) -> None:
        self.publish(piece, decision.reason, decision.detail)
        self.record(piece, Decision(DEAD_LETTERED, decision.reason, decision.detail))
        metrics.ROWS_DEADLETTERED.labels(decision.reason).inc(piece.rows.num_rows)
