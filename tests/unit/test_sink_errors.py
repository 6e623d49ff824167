"""The sink's error classification (issue #10, class 2): outages are waited out, refused rows are
isolated, anything else is retried a bounded number of times. Messages below are the ones the
real embedded engine raises (provoked while writing the classifier) or documented server ones."""

from __future__ import annotations

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError

from handtrace.sink.errors import (
    BAD_DATA_CODES,
    RETRYABLE_CODES,
    TOO_MANY_PARTITIONS,
    ErrorClass,
    classify,
    error_code,
    short_detail,
)

PARTITIONS = ("Code: 252. DB::Exception: Too many partitions for single INSERT block (more than 10). The limit "
              "is controlled by 'max_partitions_per_insert_block' setting. (TOO_MANY_PARTS)")
PARTS = ("Code: 252. DB::Exception: Too many parts (3001 with average size of 1.2 MiB) in table 'db.events'. "
         "Merges are processing significantly slower than inserts. (TOO_MANY_PARTS)")


@pytest.mark.parametrize(("exc", "cls", "reason"), [
    (DatabaseError(PARTITIONS, code=252, name="TOO_MANY_PARTS"), ErrorClass.BAD_DATA, TOO_MANY_PARTITIONS),
    (DatabaseError(PARTS, code=252, name="TOO_MANY_PARTS"), ErrorClass.RETRYABLE, "TOO_MANY_PARTS"),
    # The code only in the message (an older client or a re-raised error): still found.
    (RuntimeError(PARTITIONS), ErrorClass.BAD_DATA, TOO_MANY_PARTITIONS),
    (DatabaseError("Code: 117. DB::Exception: Not an Arrow IPC stream: implausible message metadata length",
                   code=117), ErrorClass.BAD_DATA, "INCORRECT_DATA"),
    (DatabaseError("Code: 33. DB::Exception: Cannot read all data. Bytes read: 292.", code=33),
     ErrorClass.BAD_DATA, "CANNOT_READ_ALL_DATA"),
    (DatabaseError("Code: 53. DB::Exception: Type mismatch", code=53), ErrorClass.BAD_DATA, "TYPE_MISMATCH"),
    (DatabaseError("Code: 469. DB::Exception: Constraint `c` is violated", code=469),
     ErrorClass.BAD_DATA, "VIOLATED_CONSTRAINT"),
    (DatabaseError("Code: 321. Value is out of range", code=321), ErrorClass.BAD_DATA,
     "VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE"),
    (DatabaseError("Code: 241. DB::Exception: Memory limit (total) exceeded", code=241),
     ErrorClass.RETRYABLE, "MEMORY_LIMIT_EXCEEDED"),
    (DatabaseError("Code: 242. DB::Exception: Table is in readonly mode", code=242),
     ErrorClass.RETRYABLE, "TABLE_IS_READ_ONLY"),
    (DatabaseError("Code: 202. Too many simultaneous queries", code=202),
     ErrorClass.RETRYABLE, "TOO_MANY_SIMULTANEOUS_QUERIES"),
    (DatabaseError("Code: 999. Coordination::Exception: Connection loss", code=999),
     ErrorClass.RETRYABLE, "KEEPER_EXCEPTION"),
    (DatabaseError("Code: 159. Timeout exceeded", code=159), ErrorClass.RETRYABLE, "TIMEOUT_EXCEEDED"),
    (ConnectionRefusedError(111, "Connection refused"), ErrorClass.RETRYABLE, "ConnectionRefusedError"),
    (ConnectionResetError(104, "Connection reset by peer"), ErrorClass.RETRYABLE, "ConnectionResetError"),
    (TimeoutError("timed out"), ErrorClass.RETRYABLE, "TimeoutError"),
    (OperationalError("Error HTTPConnectionPool(host='ch', port=8123): Max retries exceeded"),
     ErrorClass.RETRYABLE, "OperationalError"),
    # Neither table: bounded retries, then bad data if the server is otherwise healthy.
    (DatabaseError("Code: 49. DB::Exception: Logical error", code=49, name="LOGICAL_ERROR"),
     ErrorClass.UNKNOWN, "LOGICAL_ERROR"),
    (DatabaseError("Code: 1234. something new", code=1234), ErrorClass.UNKNOWN, "CODE_1234"),
    (ValueError("unexpected"), ErrorClass.UNKNOWN, "ValueError"),
])
def test_classification(exc: BaseException, cls: ErrorClass, reason: str) -> None:
    got = classify(exc)
    assert (got.cls, got.reason) == (cls, reason)


def test_tables_are_disjoint_and_named_like_the_server() -> None:
    assert not set(RETRYABLE_CODES) & set(BAD_DATA_CODES)
    for table in (RETRYABLE_CODES, BAD_DATA_CODES):
        for code, name in table.items():
            assert code > 0 and name.isupper() and " " not in name


def test_code_attribute_wins_over_message() -> None:
    assert error_code(DatabaseError("Code: 6. x", code=241)) == 241
    assert error_code(DatabaseError("no code here")) is None


def test_detail_is_short_and_single_line() -> None:
    exc = DatabaseError("Code: 6. DB::Exception: Cannot parse text: " + "v" * 1000 + "\nstack trace line")
    d = short_detail(exc)
    assert len(d) <= 160 and "\n" not in d and "DB::Exception" not in d


def test_detail_keeps_quoted_values_out() -> None:
    exc = DatabaseError("Code: 6. DB::Exception: Cannot parse input: expected ',' before: 'jane@example.com 4111': "
                        "(at row 3) (CANNOT_PARSE_TEXT)", code=6)
    d = short_detail(exc)
    assert "jane" not in d and "4111" not in d and d.startswith("Code: 6. Cannot parse input")
    assert "example" not in short_detail(DatabaseError('Code: 53. value "x@example.com" is bad', code=53))
