"""Erasure with a receipt (GDPR Art. 17, issue #14 part E; docs/adr/0015-erasure.md).

``handtrace erase`` runs :func:`erase`: (1) the suppression -- a signed erasure control the stream
enforces from then on, for every capture time -- is sent first, so nothing of the person is
stored again while the rest runs; (2) the person's rows are deleted from every table keyed by
``employee_key`` (the list is ``sink.schema.ERASABLE``, handed in by the caller) and their frames
from the frame store; (3) a re-query must find 0 rows and 0 objects, else :class:`NotVerified`
and no receipt; (4) a receipt row in ``erasure_receipts`` and a ``withdrawals`` participant row
(exports containing the person are then stale).

The deletion is a ClickHouse mutation (``ALTER TABLE .. DELETE .. SETTINGS mutations_sync = 2``):
when it returns, the active parts were rewritten without the rows (not only masked, as a
lightweight ``DELETE FROM`` does until the next merge), and a re-query sees 0 -- checked on the
embedded engine for MergeTree and ReplacingMergeTree tables (tests/unit/test_erasure.py). On the
embedded engine while the sink runs, the owner runs it (:meth:`chserve.RemoteClient.erase`: a
fixed operation naming only an employee key, never SQL).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from handtrace.core.ids import uuid7

if TYPE_CHECKING:
    from handtrace.core.cluster import ClusterLayout

EMPLOYEE_KEY_RE = re.compile(r"[0-9a-f]{16,64}")
"""An employee pseudonym: lowercase hex (32 from the stream's HMAC, stream/steps/pseudonymise.py; 64 from
the simulator)."""
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class ErasureError(RuntimeError):
    """An erasure that could not be carried out; the message says which step and why."""


class NotVerified(ErasureError):
    """The re-query after the deletion still found rows or objects: no receipt was recorded."""


class FrameObjects(Protocol):
    """What erasure needs of the frame store (core/framestore.FrameStore)."""

    def list(self, prefix: str) -> Any: ...

    def delete_prefix(self, prefix: str) -> int: ...


def check_employee_key(employee_key: str) -> str:
    """``employee_key`` if it is a pseudonym, else ValueError (nothing else reaches a statement)."""
    if not EMPLOYEE_KEY_RE.fullmatch(employee_key):
        raise ValueError(f"not an employee pseudonym (lowercase hex): {employee_key!r}")
    return employee_key


def _check_names(database: str, tables: Sequence[str]) -> None:
    for name in (database, *tables):
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"not a plain identifier: {name!r}")


def count_rows(client: Any, database: str, employee_key: str, tables: Sequence[str]) -> dict[str, int]:
    """Rows of ``employee_key`` per table, as stored (no FINAL: every physical row counts)."""
    check_employee_key(employee_key)
    _check_names(database, tables)
    if not tables:
        return {}
    union = " UNION ALL ".join(
        f"SELECT '{t}' AS t, count() AS n FROM {database}.{t} WHERE employee_key = {{k:String}}" for t in tables)
    rows = client.query(union, parameters={"k": employee_key}).result_rows
    return {str(t): int(n) for t, n in rows}


def delete_rows(client: Any, database: str, employee_key: str, tables: Sequence[str],
                cluster: ClusterLayout | None = None) -> dict[str, int]:
    """Delete every row of ``employee_key`` from ``tables`` (an owner's client); returns the rows
    each held before. Synchronous mutations: done on every part when this returns. With
    ``cluster``, the mutation runs on each table's replicated ``<table>_local`` ``ON CLUSTER``
    (a Distributed table takes no mutation; ADR 0020)."""
    before = count_rows(client, database, employee_key, tables)
    for t in tables:
        if before.get(t):
            target = f"{cluster.local(t)} {cluster.on_cluster()}" if cluster is not None else t
            client.command(f"ALTER TABLE {database}.{target} DELETE WHERE employee_key = {{k:String}} "
                           "SETTINGS mutations_sync = 2", parameters={"k": employee_key})
    return before


@dataclass
class Receipt:
    """What an erasure removed, when it was verified gone, and who asked why."""

    receipt_id: str
    employee_key: str
    actor: str
    reason: str
    requested_at: datetime
    verified_at: datetime
    rows_removed: dict[str, int]
    objects_removed: int
    erasure_control_id: str
    withdrawal_id: str
    settled: bool = False
    """True: before the deletion the pipeline was seen to hold nothing more of the person that it
    could still store (control/settle.py); False: not checked or not reached in time."""
    found: bool = field(default=True)
    """False: nothing was stored about the person (the suppression stands all the same)."""

    def as_json(self) -> dict[str, Any]:
        """The receipt as JSON values (``handtrace erase --json``)."""
        return {"receipt_id": self.receipt_id, "employee_key": self.employee_key, "actor": self.actor,
                "reason": self.reason, "requested_at": self.requested_at.isoformat(),
                "verified_at": self.verified_at.isoformat(), "rows_removed": self.rows_removed,
                "objects_removed": self.objects_removed, "erasure_control_id": self.erasure_control_id,
                "withdrawal_id": self.withdrawal_id, "settled": self.settled, "found": self.found}


RECEIPT_COLUMNS = ["receipt_id", "employee_key", "actor", "reason", "requested_at", "verified_at", "rows_removed",
                   "objects_removed", "erasure_control_id", "withdrawal_id", "settled"]


def erase(client: Any, database: str, store: FrameObjects | None, employee_key: str, *, actor: str, reason: str,
          tables: Sequence[str], suppress: Callable[[str], None],
          delete: Callable[[str], dict[str, int]] | None = None, settle: Callable[[], bool] | None = None,
          progress: Callable[[str], None] = lambda _m: None, erasure_id: str | None = None,
          cluster: ClusterLayout | None = None) -> Receipt:
    """Erase one person (module docstring) and return the receipt. ``suppress(erasure_id)`` sends
    the signed erasure control (raises to stop before anything is deleted); ``settle()`` waits
    until the pipeline holds nothing more of the person (control/settle.py; its result is the
    receipt's ``settled``); ``delete`` deletes the rows in the owner process (default:
    :func:`delete_rows` on ``client``). NotVerified when anything is left; ErasureError for a
    failed step."""
    actor, reason = actor.strip(), reason.strip()
    if not actor or not reason:
        raise ErasureError("an erasure needs --actor and --reason (both are kept on the receipt)")
    check_employee_key(employee_key)
    erasure_id = erasure_id or str(uuid7())
    requested_at = datetime.now(UTC)
    suppress(erasure_id)
    progress(f"suppression sent: the stream drops everything of {employee_key} from now on (erasure {erasure_id})")
    settled = settle() if settle is not None else False
    try:
        removed = (delete(employee_key) if delete is not None
                   else delete_rows(client, database, employee_key, tables, cluster))
    except ErasureError:
        raise
    except Exception as e:
        raise ErasureError(f"deleting the rows failed: {_first_line(e)}") from e
    for t in tables:
        progress(f"rows deleted from {t}: {removed.get(t, 0)}")
    prefix = f"frames/{employee_key}/"
    objects = 0
    if store is not None:
        try:
            objects = store.delete_prefix(prefix)
        except Exception as e:
            raise ErasureError(f"deleting the frames under {prefix} failed: {_first_line(e)}") from e
    progress(f"objects deleted from the frame store: {objects}")
    left = {t: n for t, n in _recount(client, database, employee_key, tables).items() if n}
    left_objects = sum(1 for _ in store.list(prefix)) if store is not None else 0
    if left or left_objects:
        raise NotVerified(f"after the deletion {sum(left.values())} rows ({left}) and {left_objects} objects under "
                          f"{prefix} are still there: no receipt recorded; run handtrace erase again")
    verified_at = datetime.now(UTC)
    progress("verified: 0 rows in every table, 0 objects")
    wid, rid = uuid7(), uuid7()
    receipt = Receipt(str(rid), employee_key, actor, reason, requested_at, verified_at,
                      {t: int(removed.get(t, 0)) for t in tables}, objects, erasure_id, str(wid), settled,
                      found=bool(sum(removed.values()) or objects))
    try:
        client.insert(f"{database}.withdrawals",
                      [[wid, "participant", employee_key, None, verified_at, actor, f"erasure: {reason}"]],
                      column_names=["withdrawal_id", "kind", "employee_key", "demonstration_id", "withdrawn_at",
                                    "actor", "reason"])
        client.insert(f"{database}.erasure_receipts",
                      [[rid, employee_key, actor, reason, requested_at, verified_at, receipt.rows_removed, objects,
                        erasure_id, wid, settled]], column_names=RECEIPT_COLUMNS)
    except Exception as e:
        raise ErasureError(f"the person is erased (verified 0 rows, 0 objects) but the receipt could not be "
                           f"recorded: {_first_line(e)} -- if the sink runs an older version, restart it (migration "
                           "11 adds erasure_receipts), then run handtrace erase again for the receipt") from e
    progress(f"receipt {rid} recorded")
    return receipt


def _recount(client: Any, database: str, employee_key: str, tables: Sequence[str]) -> dict[str, int]:
    # A re-query right after a synchronous mutation sees 0; the retries cover a server cluster
    # whose replicas apply it a moment later (mutations_sync = 2 waits for them, but be sure).
    for attempt in range(3):
        left = count_rows(client, database, employee_key, tables)
        if not any(left.values()) or attempt == 2:
            return left
        time.sleep(0.5 * (attempt + 1))
    return left  # pragma: no cover


def receipts(client: Any, database: str) -> list[dict[str, Any]]:
    """Every erasure receipt, newest first."""
    result = client.query(
        f"SELECT toString(receipt_id) AS receipt_id, employee_key, actor, reason, requested_at, verified_at, "
        f"rows_removed, objects_removed, erasure_control_id, toString(withdrawal_id) AS withdrawal_id, settled "
        f"FROM {database}.erasure_receipts ORDER BY requested_at DESC")
    return list(result.named_results())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)
