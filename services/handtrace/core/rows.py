"""Stored rows: the contract between the stream (producer) and the sink (consumer).

The stream publishes accepted, pseudonymised rows as Arrow IPC streams (lz4-compressed buffers)
on the ``events.accepted`` topic, in the same partition number as the source message. Arrow IPC
is internal to the pipeline (no agent writes it). The sink reads each message to check it and to
deduplicate by source offset, then hands the *received bytes* of a flush to ClickHouse as one
ArrowStream (``join_ipc``): no re-serialisation, and only compressed bytes cross into the
engine (docs/adr/0002).
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.ipc as ipc

UUID_BYTES = pa.binary(16)
TS = pa.timestamp("us", tz="UTC")

STORED_SCHEMA = pa.schema(
    [
        pa.field("event_id", UUID_BYTES, nullable=False),
        pa.field("batch_id", UUID_BYTES, nullable=False),
        pa.field("employee_key", pa.string(), nullable=False),
        pa.field("device_key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("captured_at", TS, nullable=False),
        pa.field("received_at", TS, nullable=False),
        pa.field("x", pa.int32()),
        pa.field("y", pa.int32()),
        pa.field("button", pa.string(), nullable=False),
        pa.field("pressed", pa.bool_()),
        pa.field("scroll_dx", pa.int32()),
        pa.field("scroll_dy", pa.int32()),
        pa.field("key_code", pa.int32()),
        pa.field("modifiers", pa.int32()),
        pa.field("text", pa.string()),
        pa.field("text_masked", pa.bool_(), nullable=False),
        pa.field("app_id", pa.string()),
        pa.field("window_title", pa.string()),
        pa.field("url", pa.string()),
        pa.field("screenshot_sha256", pa.string()),
        pa.field("screenshot_bytes", pa.int32()),
        pa.field("screenshot_format", pa.string(), nullable=False),
        pa.field("screenshot_width", pa.int32()),
        pa.field("screenshot_height", pa.int32()),
        pa.field("agent_version", pa.string(), nullable=False),
        pa.field("os", pa.string(), nullable=False),
        pa.field("source_partition", pa.int32(), nullable=False),
        pa.field("source_offset", pa.int64(), nullable=False),
    ]
)

HEADER_SOURCE_PARTITION = "ht-source-partition"
HEADER_SOURCE_OFFSET = "ht-source-offset"
HEADER_ROWS = "ht-rows"


def to_ipc(table: pa.Table) -> bytes:
    """Serialise stored rows (must match STORED_SCHEMA exactly)."""
    if not table.schema.equals(STORED_SCHEMA, check_metadata=False):
        raise ValueError(f"rows do not match STORED_SCHEMA:\n{table.schema}")
    return ipc_stream(table, "lz4")


def ipc_stream(table: pa.Table, compression: str | None) -> bytes:
    """``table`` as one Arrow IPC stream, its buffers compressed with ``compression`` (lz4, zstd
    or None)."""
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema, options=ipc.IpcWriteOptions(compression=compression)) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()  # type: ignore[no-any-return]


def from_ipc(payload: bytes) -> pa.Table:
    """Read stored rows back; raises pyarrow.ArrowInvalid on bad bytes."""
    return ipc.open_stream(payload).read_all()


_EOS = b"\xff\xff\xff\xff\x00\x00\x00\x00"


def join_ipc(payloads: list[bytes]) -> bytes:
    """One Arrow IPC stream with the record batches of all ``payloads`` (IPC streams of the same
    schema), copied as they are -- compressed buffers are not decompressed. The schema is the
    first stream's; a stream with dictionary batches or another schema is refused."""
    if not payloads:
        raise ValueError("nothing to join")
    out: list[bytes] = []
    schema: pa.Schema | None = None
    for payload in payloads:
        reader = ipc.MessageReader.open_stream(pa.py_buffer(payload))
        for message in reader:
            if message.type == "schema":
                this = ipc.read_schema(message)
                if schema is None:
                    schema = this
                    out.append(message.serialize().to_pybytes())
                elif not this.equals(schema, check_metadata=False):
                    raise ValueError("streams of different schemas")
            elif message.type == "record batch":
                out.append(message.serialize().to_pybytes())
            else:
                raise ValueError(f"unexpected IPC message: {message.type}")
    out.append(_EOS)
    return b"".join(out)


# ------------------------------------------------------------------ demonstration tables
# The Arrow schemas of the sink's demonstration tables (sink/schema.py migrations 4-7): written by
# the sink (sink/demonstrations.py) and by the export's simulator (export/simulate.py).

_WINDOW = pa.struct([("app_id", pa.string()), ("url", pa.string()), ("x", pa.int32()), ("y", pa.int32()),
                     ("width", pa.int32()), ("height", pa.int32())])
_BOX = pa.struct([("x", pa.int32()), ("y", pa.int32()), ("width", pa.int32()), ("height", pa.int32())])

FRAMES_SCHEMA = pa.schema([
    pa.field("demonstration_id", UUID_BYTES, nullable=False),
    pa.field("employee_key", pa.string(), nullable=False),
    pa.field("step", pa.uint32(), nullable=False),
    pa.field("sha256", pa.string(), nullable=False),
    pa.field("object_key", pa.string(), nullable=False),
    pa.field("format", pa.string(), nullable=False),
    pa.field("bytes", pa.uint32(), nullable=False),
    pa.field("width", pa.uint32(), nullable=False),
    pa.field("height", pa.uint32(), nullable=False),
    pa.field("captured_at", TS, nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("action_started_at", TS),
    pa.field("action_event_id", UUID_BYTES),
    pa.field("windows", pa.list_(_WINDOW), nullable=False),
    pa.field("filled", pa.list_(_BOX), nullable=False),
])

DEMONSTRATIONS_SCHEMA = pa.schema([
    pa.field("demonstration_id", UUID_BYTES, nullable=False),
    pa.field("employee_key", pa.string(), nullable=False),
    pa.field("device_key", pa.string(), nullable=False),
    pa.field("cohort", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("started_at", TS, nullable=False),
    pa.field("ended_at", TS, nullable=False),
    pa.field("sent_at", TS, nullable=False),
    pa.field("received_at", TS, nullable=False),
    pa.field("screen_width", pa.uint32(), nullable=False),
    pa.field("screen_height", pa.uint32(), nullable=False),
    pa.field("screen_scale", pa.float32(), nullable=False),
    pa.field("apps", pa.list_(pa.string()), nullable=False),
    pa.field("consent_version", pa.string(), nullable=False),
    pa.field("policy_version", pa.string(), nullable=False),
    pa.field("agent_version", pa.string(), nullable=False),
    pa.field("os", pa.string(), nullable=False),
    pa.field("frames", pa.uint32(), nullable=False),
    pa.field("events", pa.uint32(), nullable=False),
    pa.field("missing_frames", pa.uint32(), nullable=False),
    pa.field("frames_dropped", pa.map_(pa.string(), pa.uint32()), nullable=False),
    pa.field("events_dropped", pa.map_(pa.string(), pa.uint32()), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])

DEMONSTRATION_EVENTS_SCHEMA = pa.schema([pa.field("demonstration_id", UUID_BYTES, nullable=False), *STORED_SCHEMA])
