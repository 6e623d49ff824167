"""Which insert failures the sink waits out and which it blames on the rows (issue #10, class 2).

A failed insert is one of three things:

- **retryable**: ClickHouse, the network or the cluster is unwell (down, overloaded, out of
  memory, read-only while Keeper is away, ...). The same rows will go in once it recovers, so
  the sink waits with backoff, for as long as it takes, and drops nothing.
- **bad data**: the rows themselves are refused and would be refused forever (cannot be parsed,
  wrong types, values out of range, a constraint, too many partitions for one insert block). The
  sink splits the flush to isolate them, inserts the rest and dead-letters them with a reason.
- **unknown**: neither of the above. Retried a bounded number of times; if it persists while the
  server answers a trivial query, it is treated as bad data (see ``Sink`` and docs/adr/0003):
  an unknown error must not be able to stop every later event of everyone for good.

The classification is by ClickHouse error *code* (clickhouse-connect puts it on
``DatabaseError.code`` for both the HTTP client and the embedded chdb engine; the message carries
"Code: NNN" too), with an explicit table below; exceptions without a code are classified by type
(socket and HTTP transport errors are retryable).
"""

from __future__ import annotations

import enum
import logging
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from confluent_kafka import KafkaException

T = TypeVar("T")


class ErrorClass(enum.Enum):
    """How the sink reacts to a failed insert."""

    RETRYABLE = "retryable"
    BAD_DATA = "bad_data"
    UNKNOWN = "unknown"


#: Codes that say "not now": the server, its disks, its Keeper or the network. Names are the
#: server's own (``errorCodeToName``); a test checks them against the real engine.
RETRYABLE_CODES: dict[int, str] = {
    60: "UNKNOWN_TABLE",  # migrations or the database not there yet: an operator problem
    74: "CANNOT_READ_FROM_FILE_DESCRIPTOR",
    75: "CANNOT_WRITE_TO_FILE_DESCRIPTOR",
    76: "CANNOT_OPEN_FILE",
    81: "UNKNOWN_DATABASE",
    95: "CANNOT_READ_FROM_SOCKET",
    96: "CANNOT_WRITE_TO_SOCKET",
    159: "TIMEOUT_EXCEEDED",
    160: "TOO_SLOW",
    164: "READONLY",
    173: "CANNOT_ALLOCATE_MEMORY",
    202: "TOO_MANY_SIMULTANEOUS_QUERIES",
    203: "NO_FREE_CONNECTION",
    209: "SOCKET_TIMEOUT",
    210: "NETWORK_ERROR",
    225: "NO_ZOOKEEPER",
    234: "NO_REPLICA_HAS_PART",
    236: "ABORTED",
    241: "MEMORY_LIMIT_EXCEEDED",
    242: "TABLE_IS_READ_ONLY",
    243: "NOT_ENOUGH_SPACE",
    244: "UNEXPECTED_ZOOKEEPER_ERROR",
    # 252 is also "Too many partitions for single INSERT block", which is bad data: see classify.
    252: "TOO_MANY_PARTS",
    254: "NO_ACTIVE_REPLICAS",
    265: "NO_AVAILABLE_REPLICA",
    279: "ALL_CONNECTION_TRIES_FAILED",
    285: "TOO_FEW_LIVE_REPLICAS",
    289: "REPLICA_IS_NOT_IN_QUORUM",
    291: "DATABASE_ACCESS_DENIED",
    319: "UNKNOWN_STATUS_OF_INSERT",
    369: "ALL_REPLICAS_ARE_STALE",
    394: "QUERY_WAS_CANCELLED",
    415: "ALL_REPLICAS_LOST",
    425: "SYSTEM_ERROR",
    439: "CANNOT_SCHEDULE_TASK",
    473: "DEADLOCK_AVOIDED",
    497: "ACCESS_DENIED",  # grants are an operator problem, not the rows'
    516: "AUTHENTICATION_FAILED",
    700: "USER_SESSION_LIMIT_EXCEEDED",
    735: "QUERY_WAS_CANCELLED_BY_CLIENT",
    745: "SERVER_OVERLOADED",
    749: "TCP_CONNECTION_LIMIT_REACHED",
    762: "HTTP_CONNECTION_LIMIT_REACHED",
    776: "RESOURCE_LIMIT_EXCEEDED",
    777: "MEMORY_RESERVATION_KILLED",
    778: "MEMORY_RESERVATION_FAILED",
    999: "KEEPER_EXCEPTION",
    1019: "QUERY_SLOT_ACQUISITION_TIMEOUT",
    1020: "MEMORY_RESERVATION_ACQUISITION_TIMEOUT",
}

#: Codes that say "never these rows": parsing, types, ranges, constraints, sizes.
BAD_DATA_CODES: dict[int, str] = {
    6: "CANNOT_PARSE_TEXT",
    7: "INCORRECT_NUMBER_OF_COLUMNS",
    9: "SIZES_OF_COLUMNS_DOESNT_MATCH",
    13: "SIZES_OF_COLUMNS_IN_TUPLE_DOESNT_MATCH",
    20: "NUMBER_OF_COLUMNS_DOESNT_MATCH",
    25: "CANNOT_PARSE_ESCAPE_SEQUENCE",
    26: "CANNOT_PARSE_QUOTED_STRING",
    27: "CANNOT_PARSE_INPUT_ASSERTION_FAILED",
    33: "CANNOT_READ_ALL_DATA",  # a truncated Arrow stream in the insert's body
    38: "CANNOT_PARSE_DATE",
    41: "CANNOT_PARSE_DATETIME",
    44: "ILLEGAL_COLUMN",
    53: "TYPE_MISMATCH",
    69: "ARGUMENT_OUT_OF_BOUND",
    70: "CANNOT_CONVERT_TYPE",
    72: "CANNOT_PARSE_NUMBER",
    117: "INCORRECT_DATA",
    128: "TOO_LARGE_ARRAY_SIZE",
    131: "TOO_LARGE_STRING_SIZE",
    190: "SIZES_OF_ARRAYS_DONT_MATCH",
    321: "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE",
    346: "CANNOT_CONVERT_CHARSET",
    349: "CANNOT_INSERT_NULL_IN_ORDINARY_COLUMN",
    376: "CANNOT_PARSE_UUID",
    407: "DECIMAL_OVERFLOW",
    467: "CANNOT_PARSE_BOOL",
    469: "VIOLATED_CONSTRAINT",
    632: "UNEXPECTED_DATA_AFTER_PARSED_VALUE",
    728: "UNEXPECTED_DATA_TYPE",
}

#: The reason given for rows whose insert block would touch too many ClickHouse partitions.
TOO_MANY_PARTITIONS = "TOO_MANY_PARTITIONS"
_PARTITIONS_MESSAGE = re.compile(r"too many partitions for (a )?single insert block", re.IGNORECASE)
_CODE_IN_MESSAGE = re.compile(r"\bCode:\s*(\d+)")

# Transport failures that carry no server code: the connection, not the rows (OSError covers
# ConnectionError and TimeoutError; urllib3 errors are the HTTP client's).
_RETRYABLE_TYPES: tuple[type[BaseException], ...] = (OSError,)


def _transport_types() -> tuple[type[BaseException], ...]:
    extra: list[type[BaseException]] = []
    try:
        import urllib3.exceptions as u3

        extra += [u3.HTTPError]
    except ImportError:  # pragma: no cover -- clickhouse-connect depends on urllib3
        pass
    return tuple(extra)


_RETRYABLE_TYPES += _transport_types()


@dataclass(frozen=True)
class Classified:
    """A failed insert, classified: ``reason`` is the ClickHouse error name (or the exception's
    type name), ``detail`` a short message with no row values."""

    cls: ErrorClass
    reason: str
    code: int | None
    detail: str


def error_code(exc: BaseException) -> int | None:
    """The ClickHouse error code of ``exc``: its ``code`` attribute (clickhouse-connect), else
    "Code: NNN" in its message; None for errors that do not come from the server."""
    code = getattr(exc, "code", None)
    if isinstance(code, int):
        return code
    m = _CODE_IN_MESSAGE.search(str(exc))
    return int(m.group(1)) if m else None


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`")
_AFTER_VALUE = re.compile(r"\b(before|at row|row|value|text)\s*:.*$", re.IGNORECASE)


def short_detail(exc: BaseException, limit: int = 160) -> str:
    """The first line of the message, without what it quotes (parse errors quote the offending
    value) and without what follows "before:"/"row:", cut short: keeps row contents out of
    dead-letter headers, the ledger and logs."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.replace("DB::Exception: ", "")
    text = _AFTER_VALUE.sub(r"\1: …", _QUOTED.sub("'…'", text))
    return text[:limit]


def classify(exc: BaseException) -> Classified:
    """Classify a failed insert (see the module docstring and the tables above)."""
    code = error_code(exc)
    if code is not None:
        if code == 252 and _PARTITIONS_MESSAGE.search(str(exc)):
            # Same code as "too many parts" (a merge backlog: retryable), but this one is about
            # the rows of this block: it fails every time, however long we wait (issue #10).
            return Classified(ErrorClass.BAD_DATA, TOO_MANY_PARTITIONS, code, short_detail(exc))
        if code in RETRYABLE_CODES:
            return Classified(ErrorClass.RETRYABLE, RETRYABLE_CODES[code], code, short_detail(exc))
        if code in BAD_DATA_CODES:
            return Classified(ErrorClass.BAD_DATA, BAD_DATA_CODES[code], code, short_detail(exc))
        name = getattr(exc, "name", None)
        return Classified(ErrorClass.UNKNOWN, name if isinstance(name, str) and name else f"CODE_{code}",
                          code, short_detail(exc))
    if isinstance(exc, _RETRYABLE_TYPES):
        return Classified(ErrorClass.RETRYABLE, type(exc).__name__, None, short_detail(exc))
    # clickhouse-connect raises OperationalError for HTTP transport failures (no server code).
    if type(exc).__name__ in {"OperationalError", "StreamFailureError"}:
        return Classified(ErrorClass.RETRYABLE, type(exc).__name__, None, short_detail(exc))
    return Classified(ErrorClass.UNKNOWN, type(exc).__name__, None, short_detail(exc))


class RowsRefused(Exception):  # noqa: N818 -- a signal for the writer, not a failure of ours
    """ClickHouse refuses these rows for good: bad data, or an unknown error that persists while
    ClickHouse answers."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def retry_clickhouse(what: str, fn: Callable[[], T], *, backoff: Callable[[int], None], unknown_retries: int,
                     log: logging.Logger, refusable: bool = False,
                     passthrough: tuple[type[BaseException], ...] = ()) -> T:
    """``fn()`` against ClickHouse, for the writers that own their retries (demonstrations,
    audit): outages are retried without limit through ``backoff(attempt)`` (which raises to
    stop); with ``refusable`` (inserts), rows ClickHouse refuses for good raise
    :class:`RowsRefused`. ``passthrough`` exceptions (a stop) propagate untouched."""
    from handtrace.sink import metrics

    attempt = unknown = 0
    while True:
        try:
            return fn()
        except passthrough:
            raise
        except Exception as e:  # noqa: BLE001 -- classified below
            c = classify(e)
            metrics.INSERT_ERRORS.labels(c.cls.value).inc()
            if refusable and c.cls is ErrorClass.BAD_DATA:
                raise RowsRefused(c.reason) from e
            if refusable and c.cls is ErrorClass.UNKNOWN:
                unknown += 1
                if unknown > unknown_retries:
                    raise RowsRefused(c.reason) from e
            log.warning("%s failed (%s); retrying", what, c.reason)
            backoff(attempt)
            attempt += 1


def backoff_in_group(consumer: Any, stop: threading.Event, attempt: int, *, log: logging.Logger) -> bool:
    """Jittered exponential wait (at most 30 s) after a failed ClickHouse call, for a writer that
    owns a consumer: its partitions are paused and polled meanwhile (callbacks only, so the group
    keeps it and a revoke is seen), then resumed. Returns False when ``stop`` is set (the caller
    raises its own stop)."""
    if stop.is_set():
        return False
    delay = min(0.1 * 2 ** min(attempt, 9), 30.0) * (0.8 + 0.4 * random.random())  # noqa: S311
    if consumer is None:
        stop.wait(delay)
    else:
        consumer.pause(consumer.assignment())
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and not stop.is_set():
            consumer.poll(0.1)
        try:
            consumer.resume(consumer.assignment())
        except KafkaException as e:  # a rebalance in between: the next poll sorts it out
            log.warning("resume after a backoff failed: %s", e)
    return not stop.is_set()
