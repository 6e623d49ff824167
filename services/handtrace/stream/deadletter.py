"""Dead-letter records that always fit (issue #10, classes 1 and 7).

A rejected source message is copied to the dead-letter topic with its original key and headers
(so it can be replayed by key) plus the stream's ``ht-*`` headers: source partition and offset,
reason, source topic, and a short detail run through PII redaction (details name no ids by construction; the
redaction is a second line). Nothing a hostile message contains may make this send fail:

- raw payloads arrive zstd-compressed by the agents' producers and decompressed by the consumer,
  while the worker's producer sends uncompressed, so a payload may exceed the topic's limit: it
  is then compressed here (one zstd frame, header ``ht-encoding: zstd``);
- if even that does not fit, the copy is the payload's first bytes, with ``ht-truncated: 1``,
  ``ht-original-bytes`` and ``ht-original-sha256`` (the original stays in the raw topic for its
  retention);
- a key and headers that together take more than an eighth of the budget are hostile: the
  headers are dropped (``ht-headers-dropped: <count>``), then the key if still too large
  (``ht-key-sha256``, ``ht-key-bytes``).

Original headers named like the stream's own are dropped, so a reader finds one of each.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa

from handtrace.core.pii import redact_text
from handtrace.core.rows import HEADER_SOURCE_OFFSET, HEADER_SOURCE_PARTITION
from handtrace.stream.pipeline import DeadLetter

MAX_DETAIL_CHARS = 200
RESERVED = frozenset({
    HEADER_SOURCE_PARTITION, HEADER_SOURCE_OFFSET, "ht-reason", "ht-detail", "ht-encoding", "ht-truncated",
    "ht-original-bytes", "ht-original-sha256", "ht-headers-dropped", "ht-key-sha256", "ht-key-bytes",
    "ht-source-topic", "ht-null-value",
})
_RECORD_OVERHEAD = 128  # Kafka record + record-batch framing of a record alone in its batch, rounded up


@dataclass(frozen=True)
class OutRecord:
    """One record to produce."""

    partition: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]


def record_size(key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes]]) -> int:
    """Bytes a record takes on the wire, uncompressed, alone in its batch (an upper bound)."""
    return (_RECORD_OVERHEAD + len(key or b"") + len(value or b"")
            + sum(len(k.encode()) + len(v) + 10 for k, v in headers))


def message_budget(max_message_bytes: int) -> int:
    """The largest record the stream produces for a topic limit of ``max_message_bytes``: a margin
    of 1/32 (at least 4 KiB) below it."""
    return max_message_bytes - max(4096, max_message_bytes // 32)


def short_detail(detail: str) -> str:
    """A dead-letter detail as it may be published: PII-redacted, at most MAX_DETAIL_CHARS."""
    return redact_text(detail[:4 * MAX_DETAIL_CHARS])[0][:MAX_DETAIL_CHARS]


def deadletter_record(d: DeadLetter, max_message_bytes: int, source_topic: str = "") -> OutRecord:
    """The dead-letter copy of ``d``'s message, within ``message_budget(max_message_bytes)``;
    ``source_topic`` (header ``ht-source-topic``) says where it came from (events, screenshots)."""
    m = d.message
    budget = message_budget(max_message_bytes)
    ours: list[tuple[str, bytes]] = [("ht-source-topic", source_topic.encode()),
        (HEADER_SOURCE_PARTITION, str(m.partition).encode()), (HEADER_SOURCE_OFFSET, str(m.offset).encode()),
        ("ht-reason", d.reason[:64].encode()), ("ht-detail", short_detail(d.detail).encode("utf-8", "replace")),
    ]
    theirs = [(k, bytes(v)) for k, v in m.headers if k not in RESERVED]
    key = m.key
    envelope = budget // 8
    if record_size(key, b"", theirs) > envelope:
        ours.append(("ht-headers-dropped", str(len(theirs)).encode()))
        theirs = []
    if key is not None and record_size(key, b"", []) > envelope:
        ours += [("ht-key-sha256", hashlib.sha256(key).hexdigest().encode()), ("ht-key-bytes", str(len(key)).encode())]
        key = None
    # room for the value, keeping space for the headers that may still be added below
    room = budget - record_size(key, b"", theirs + ours) - 300
    value = m.payload
    if value is None:  # a tombstone: the copy says so (Kafka keeps no null on a non-compacted topic here)
        value = b""
        ours.append(("ht-null-value", b"1"))
    if len(value) > room:
        packed = pa.compress(value, codec="zstd", asbytes=True)
        if len(packed) <= room:
            value = packed
            ours.append(("ht-encoding", b"zstd"))
        else:
            ours += [("ht-truncated", b"1"), ("ht-original-bytes", str(len(value)).encode()),
                     ("ht-original-sha256", hashlib.sha256(value).hexdigest().encode())]
            value = value[:room]
    return OutRecord(m.partition, key, value, theirs + ours)
