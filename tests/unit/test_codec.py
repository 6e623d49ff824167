"""The wire codec: round trips, fast columnar decode == per-record decode, and hostile input.

Anything a decoder is handed must come back as data or as a DecodeError with a bounded reason --
never another exception, never a crash (polars panics on bad Avro bytes; the codec must catch).
"""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import avro.io
import avro.schema
import fastavro
import polars as pl
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from handtrace.core import codec, schemas
from handtrace.core.codec import MAGIC, PREFIX_LEN, DecodeError, _zz
from handtrace.core.ids import uuid7_bytes

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds
REASONS = {"bad_magic", "unknown_schema", "wrong_subject", "truncated", "malformed"}

HYPOTHESIS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = settings(HYPOTHESIS, max_examples=300)  # cheap examples: a single decode each


def ts(us: int) -> datetime:
    """How a timestamp-micros long reads back (fastavro and polars agree on aware UTC)."""
    return EPOCH + timedelta(microseconds=us)


# ---------------------------------------------------------------- the Event schema, generically


def _event_raw() -> dict[str, Any]:
    return schemas.latest("event_batch").raw["fields"][-1]["type"]["items"]  # type: ignore[no-any-return]


EVENT_FIELDS: list[dict[str, Any]] = _event_raw()["fields"]
TIMESTAMP_FIELDS = {
    f["name"]
    for f in EVENT_FIELDS
    if isinstance(f["type"], dict) and f["type"].get("logicalType") == "timestamp-micros"
}


def _enum_symbols(name: str) -> list[str]:
    t = next(f["type"] for f in EVENT_FIELDS if f["name"] == name)
    return list(t["symbols"])


KINDS = _enum_symbols("kind")


def event(kind: str, i: int = 0, **fields: Any) -> dict[str, Any]:
    """One Event with every field present: schema defaults (null, none, false) unless given."""
    ev: dict[str, Any] = {
        f["name"]: f.get("default")
        for f in EVENT_FIELDS
        if f["name"] not in ("event_id", "captured_at_us", "kind")
    }
    ev.update(event_id=uuid7_bytes(), captured_at_us=T0 + 1_000 * i, kind=kind)
    unknown = set(fields) - set(ev)
    assert not unknown, f"not Event fields: {unknown}"
    ev.update(fields)
    return ev


def events_of_every_kind() -> list[dict[str, Any]]:
    evs = [
        event(
            "focus_change",
            0,
            app_id="org.mozilla.firefox",
            window_title="Docs — Übersicht",
            url="https://example.com/a?q=%E2%9C%93",
        ),
        event("pointer_move", 1, x=640, y=-12),
        event("click", 2, x=641, y=10, button="left", pressed=True, modifiers=2),
        event("click", 3, x=641, y=10, button="left", pressed=False, modifiers=2),
        event("scroll", 4, x=700, y=300, scroll_dx=0, scroll_dy=-120),
        event("key_down", 5, key_code=0x61, text="a", app_id="slack"),
        event("key_up", 6, key_code=0x61),
        event("key_down", 7, key_code=0xFFE1, text="•", text_masked=True, modifiers=1),
        event("key_down", 8, key_code=0x1F600, text="😀👍🏽"),
        event(
            "screenshot",
            9,
            screenshot_sha256=bytes(range(32)),
            screenshot_bytes=48_213,
            screenshot_format="webp",
            screenshot_width=2560,
            screenshot_height=1600,
        ),
    ]
    assert {e["kind"] for e in evs} == set(KINDS), "a new EventKind needs an example here"
    return evs


def header(**over: Any) -> dict[str, Any]:
    h = {
        "batch_id": uuid7_bytes(),
        "employee_id": "emp-00042",
        "device_id": "dev-7f3a",
        "agent_version": "0.1.0",
        "os": "linux",
        "seq": 17,
        "sent_at_us": T0 + 5_000_000,
    }
    h.update(over)
    return h


def decoded_header(h: dict[str, Any]) -> dict[str, Any]:
    return {"cohort": "default", **h, "sent_at_us": ts(h["sent_at_us"])}


def decoded_rows(evs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: ts(v) if k in TIMESTAMP_FIELDS else v for k, v in e.items()} for e in evs]


def single_object(subject: str, record: dict[str, Any]) -> bytes:
    """A message written by a plain Avro writer (fastavro, full schema) plus the prefix by hand."""
    sv = schemas.latest(subject)
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, sv.parsed, record)
    return MAGIC + sv.fingerprint_le + buf.getvalue()


def expect_error(reasons: str | set[str], fn: Any, *args: Any) -> DecodeError:
    want = {reasons} if isinstance(reasons, str) else reasons
    with pytest.raises(DecodeError) as info:
        fn(*args)
    assert info.value.reason in want, f"{info.value.reason} not in {want}: {info.value}"
    return info.value


# ---------------------------------------------------------------- control events and heartbeats


def control_events() -> list[dict[str, Any]]:
    base = {
        "employee_id": "emp-00042",
        "occurred_at_us": T0,
        "actor": "emp-00042",
        "actor_role": "employee",
        "reason": "",
        "pause_starts_at_us": None,
        "pause_ends_at_us": None,
        "exemption_effective_at_us": None,
        "erasure_id": None,
        "policy": None,
    }
    return [
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="pause_start",
            reason="lunch 🍜",
            pause_starts_at_us=T0,
            pause_ends_at_us=T0 + 30 * 60 * 1_000_000,
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="pause_end",
            actor="agent",
            actor_role="system",
            pause_ends_at_us=T0 + 12_345,
        ),
        dict(
            base, control_id=uuid7_bytes(), kind="exemption_request", reason="medical appointment"
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="exemption_grant",
            actor="hr-anna",
            actor_role="hr",
            exemption_effective_at_us=T0 + 1,
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="exemption_revoke",
            actor="hr-anna",
            actor_role="hr",
            exemption_effective_at_us=T0 + 2,
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="exemption_grant",
            actor="dpo-1",
            actor_role="hr",
            exemption_effective_at_us=T0 + 3,
            erasure_id="0190f0f0-aaaa-7bbb-8ccc-000000000001",
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="policy_update",
            employee_id=None,
            actor="ops-li",
            actor_role="ops",
            reason="roll out v7",
            policy={
                "version": 7,
                "allowed_apps": ["org.mozilla.firefox", "code", "slack"],
                "allowed_domains": ["example.com", "github.com"],
                "sampling": {"kind:pointer_move": 0.25, "app:slack": 1.0, "cohort:eng": 0.0},
                "text_capture": {"*": "none", "code": "full", "slack": "masked"},
            },
        ),
        dict(
            base,
            control_id=uuid7_bytes(),
            kind="policy_update",
            employee_id=None,
            actor="ops-li",
            actor_role="ops",
            policy={
                "version": 8,
                "allowed_apps": [],
                "allowed_domains": [],
                "sampling": {},
                "text_capture": {},
            },
        ),
    ]


def heartbeats() -> list[dict[str, Any]]:
    hb = {
        "heartbeat_id": uuid7_bytes(),
        "employee_id": "emp-00042",
        "device_id": "dev-7f3a",
        "sent_at_us": T0 + 60_000_000,
        "agent_started_at_us": T0 - 3_600_000_000,
        "agent_version": "0.1.0",
        "os": "macos",
        "cohort": "eng",
        "state": "capturing",
        "battery_percent": 87.5,  # float32: exactly representable
        "charging": False,
        "cpu_seconds": 12.625,
        "rss_bytes": 48 << 20,
        "payload_bytes_sent": 1_234_567,
        "wire_bytes_sent": 345_678,
        "events_captured": 100_000,
        "events_sent": 98_000,
        "events_dropped": {"policy": 1_500, "paused": 400, "spool_full": 0, "coalesced": 100},
        "spool_depth_events": 12,
        "spool_depth_bytes": 4_096,
        "radio_wakeups": 61,
    }
    return [
        hb,
        dict(
            hb,
            heartbeat_id=uuid7_bytes(),
            state="paused",
            battery_percent=None,
            charging=None,
            events_dropped={},
            os="linux",
        ),
    ]


RECORDS = [("control_event", r) for r in control_events()] + [
    ("heartbeat", r) for r in heartbeats()
]
TS_RECORD_FIELDS = {
    "control_event": {"occurred_at_us"},
    "heartbeat": {"sent_at_us", "agent_started_at_us"},
}


@pytest.mark.parametrize(
    ("subject", "record"), RECORDS, ids=[f"{s}-{r.get('kind', r.get('state'))}" for s, r in RECORDS]
)
def test_record_round_trip(subject: str, record: dict[str, Any]) -> None:
    payload = codec.encode_record(subject, record)
    sv = schemas.latest(subject)
    assert payload[:PREFIX_LEN] == MAGIC + sv.fingerprint_le
    assert codec.writer_schema(payload, subject) is sv
    want = {k: ts(v) if k in TS_RECORD_FIELDS[subject] else v for k, v in record.items()}
    assert codec.decode_record(payload, subject) == want
    # The body is plain Avro binary: a standard writer produces the same bytes.
    assert payload == single_object(subject, record)


def test_control_event_defaults_fill_in() -> None:
    # Only required fields given: the writer applies the schema defaults.
    rec = {
        "control_id": uuid7_bytes(),
        "kind": "pause_end",
        "occurred_at_us": T0,
        "actor": "agent",
        "actor_role": "system",
    }
    out = codec.decode_record(codec.encode_record("control_event", rec), "control_event")
    assert out["reason"] == "" and out["policy"] is None and out["employee_id"] is None


def test_records_read_with_apache_avro() -> None:
    for subject, record in RECORDS:
        payload = codec.encode_record(subject, record)
        schema = avro.schema.parse(json.dumps(schemas.latest(subject).raw))
        body = io.BytesIO(payload[PREFIX_LEN:])
        got = avro.io.DatumReader(schema).read(avro.io.BinaryDecoder(body))
        assert body.tell() == len(payload) - PREFIX_LEN
        assert got == codec.decode_record(payload, subject)


# ---------------------------------------------------------------- event batch round trips


def assert_batch(decoded: codec.DecodedBatch, h: dict[str, Any], evs: list[dict[str, Any]]) -> None:
    assert decoded.header == decoded_header(h)
    assert decoded.schema_version == schemas.latest("event_batch").version
    assert decoded.events.columns == [f["name"] for f in EVENT_FIELDS]
    assert decoded.events.height == len(evs)
    assert decoded.events.to_dicts() == decoded_rows(evs)


def test_event_batch_round_trip_every_kind() -> None:
    h, evs = header(), events_of_every_kind()
    payload = codec.encode_event_batch(h, evs)
    assert payload[:PREFIX_LEN] == MAGIC + schemas.latest("event_batch").fingerprint_le
    fast = codec.decode_event_batch(payload)
    slow = codec.decode_event_batch_per_record(payload)
    assert_batch(fast, h, evs)
    assert_batch(slow, h, evs)
    assert_frame_equal(fast.events, slow.events)


@pytest.mark.parametrize("evs", [None, []], ids=["none", "empty-list"])
def test_event_batch_round_trip_zero_events(evs: list[dict[str, Any]] | None) -> None:
    h = header()
    payload = codec.encode_event_batch(h, evs)
    fast = codec.decode_event_batch(payload)
    slow = codec.decode_event_batch_per_record(payload)
    assert_batch(fast, h, [])
    assert_batch(slow, h, [])
    assert_frame_equal(fast.events, slow.events)
    ref = codec.decode_event_batch(codec.encode_event_batch(h, events_of_every_kind())).events
    assert fast.events.schema == ref.schema


def test_event_batch_from_pre_encoded_block() -> None:
    h, evs = header(), events_of_every_kind()
    block = codec.encode_events_block(evs)
    assert codec.encode_event_batch(h, block=block, count=len(evs)) == codec.encode_event_batch(
        h, evs
    )
    assert codec.encode_events_block([]) == b""
    with pytest.raises(ValueError, match="count"):
        codec.encode_event_batch(h, block=block)


def test_event_batch_is_standard_avro() -> None:
    """Our negative-count block is a form every Avro reader accepts: check two of them."""
    h, evs = header(), events_of_every_kind()
    payload = codec.encode_event_batch(h, evs)
    sv = schemas.latest("event_batch")
    via_fastavro = fastavro.schemaless_reader(io.BytesIO(payload[PREFIX_LEN:]), sv.parsed, None)
    assert via_fastavro == dict(decoded_header(h), events=decoded_rows(evs))
    apache = avro.io.DatumReader(avro.schema.parse(json.dumps(sv.raw)))
    body = io.BytesIO(payload[PREFIX_LEN:])
    via_apache = apache.read(avro.io.BinaryDecoder(body))
    assert body.tell() == len(payload) - PREFIX_LEN
    assert via_apache == via_fastavro


@pytest.mark.parametrize("evs", [events_of_every_kind(), []], ids=["every-kind", "empty"])
def test_positive_count_batch_decodes_through_fallback(evs: list[dict[str, Any]]) -> None:
    h = header()
    standard = single_object("event_batch", dict(h, events=evs))
    ours = codec.encode_event_batch(h, evs)
    if evs:
        assert standard != ours  # fastavro writes `count, items..., 0`, no byte size
    got = codec.decode_event_batch(standard)
    assert_batch(got, h, evs)
    assert_frame_equal(got.events, codec.decode_event_batch(ours).events)


def test_several_negative_blocks_decode_fast() -> None:
    h, evs = header(), events_of_every_kind()
    one = codec.encode_event_batch(h, evs)
    head = one[: one.index(_zz(-len(evs)) + _zz(len(codec.encode_events_block(evs))))]
    body = b""
    for part in (evs[:3], evs[3:4], evs[4:]):
        blk = codec.encode_events_block(part)
        body += _zz(-len(part)) + _zz(len(blk)) + blk
    payload = head + body + _zz(0)
    got = codec.decode_event_batch(payload)
    assert_batch(got, h, evs)
    assert_frame_equal(got.events, codec.decode_event_batch_per_record(payload).events)


# ---------------------------------------------------------------- hypothesis: fast == per-record

_INT32 = st.integers(-(2**31), 2**31 - 1)
_INT64 = st.integers(-(2**63), 2**63 - 1)
# datetime's range: the per-record reader turns timestamp-micros into datetimes.
_TS = st.integers(-62_135_596_800_000_000, 253_402_300_799_999_999)
_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=24)


def _strategy(t: Any) -> st.SearchStrategy[Any]:
    if isinstance(t, list):
        (inner,) = [m for m in t if m != "null"]
        return st.none() | _strategy(inner)
    if isinstance(t, dict):
        if t.get("logicalType") == "timestamp-micros":
            return _TS
        if t["type"] == "enum":
            return st.sampled_from(t["symbols"])
        if t["type"] == "fixed":
            return st.binary(min_size=t["size"], max_size=t["size"])
        return _strategy(t["type"])
    simple = {
        "int": _INT32,
        "long": _INT64,
        "boolean": st.booleans(),
        "string": _TEXT,
        "bytes": st.binary(max_size=40),
        "Uuid": st.binary(min_size=16, max_size=16),
    }
    if t not in simple:
        raise AssertionError(f"no strategy for Event field type {t!r}: extend _strategy")
    return simple[t]


EVENT = st.fixed_dictionaries({f["name"]: _strategy(f["type"]) for f in EVENT_FIELDS})
HEADER = st.fixed_dictionaries(
    {
        "batch_id": st.binary(min_size=16, max_size=16),
        "employee_id": _TEXT,
        "device_id": _TEXT,
        "agent_version": _TEXT,
        "os": st.sampled_from(["linux", "macos", "windows", "synthetic"]),
        "seq": _INT64,
        "sent_at_us": _TS,
    },
    optional={"cohort": _TEXT},
)


@st.composite
def event_lists(draw: st.DrawFn) -> list[dict[str, Any]]:
    """0..300 events of any kinds. Up to 40 drawn freely, longer lists cycle through them (with
    fresh ids and times) so that long batches stay cheap to generate."""
    distinct = draw(st.lists(EVENT, max_size=40))
    n = draw(st.integers(0, 300)) if distinct and draw(st.booleans()) else len(distinct)
    out = []
    for i in range(n):
        e = dict(distinct[i % len(distinct)])
        if i >= len(distinct):
            e["event_id"] = i.to_bytes(16, "big")
            e["captured_at_us"] = T0 + i
        out.append(e)
    return out


@HYPOTHESIS
@given(h=HEADER, evs=event_lists())
def test_fast_decode_equals_per_record_decode(h: dict[str, Any], evs: list[dict]) -> None:
    payload = codec.encode_event_batch(h, evs)
    fast = codec.decode_event_batch(payload)
    slow = codec.decode_event_batch_per_record(payload)
    assert fast.header == slow.header == decoded_header(h)
    assert fast.schema_version == slow.schema_version
    assert_frame_equal(fast.events, slow.events)
    assert fast.events.to_dicts() == decoded_rows(evs)
    # A standard positive-count encoding of the same batch lands on the same frame.
    assert_frame_equal(
        codec.decode_event_batch(single_object("event_batch", dict(h, events=evs))).events,
        fast.events,
    )


# ---------------------------------------------------------------- hostile input: prefix


DECODERS: list[tuple[str, Any]] = [
    ("decode_event_batch", codec.decode_event_batch),
    ("decode_event_batch_per_record", codec.decode_event_batch_per_record),
    ("decode_record[control_event]", lambda p: codec.decode_record(p, "control_event")),
    ("decode_record[heartbeat]", lambda p: codec.decode_record(p, "heartbeat")),
]
DECODER_IDS = [name for name, _ in DECODERS]

GARBAGE = [
    b"",
    b"\x00",
    b"\xc3",
    b"garbage, not avro at all",
    bytes(range(256)),
    b'{"batch_id": "x", "events": []}',
    b"Obj\x01" + bytes(40),  # an Avro object container file, not a single-object message
    b"\x01\xc3" + bytes(30),
]


@pytest.mark.parametrize("garbage", GARBAGE, ids=range(len(GARBAGE)))
@pytest.mark.parametrize("decode", [d for _, d in DECODERS], ids=DECODER_IDS)
def test_garbage_is_bad_magic(decode: Any, garbage: bytes) -> None:
    expect_error("bad_magic", decode, garbage)


def test_empty_payload() -> None:
    for _, decode in DECODERS:
        expect_error("bad_magic", decode, b"")


@pytest.mark.parametrize("magic", [b"\xc3\x00", b"\x00\x01", b"\x01\xc3", b"\xc2\x01", b"\xff\xff"])
def test_wrong_magic(magic: bytes) -> None:
    batch = codec.encode_event_batch(header(), events_of_every_kind())
    hb = codec.encode_record("heartbeat", heartbeats()[0])
    expect_error("bad_magic", codec.decode_event_batch, magic + batch[2:])
    expect_error("bad_magic", codec.decode_event_batch_per_record, magic + batch[2:])
    expect_error("bad_magic", codec.decode_record, magic + hb[2:], "heartbeat")


def test_unknown_fingerprint() -> None:
    known = set(schemas.by_fingerprint())
    batch = codec.encode_event_batch(header(), events_of_every_kind())
    for fp in (0, 1, 2**64 - 1, schemas.latest("event_batch").fingerprint ^ 1):
        assert fp not in known
        payload = MAGIC + fp.to_bytes(8, "little") + batch[PREFIX_LEN:]
        err = expect_error("unknown_schema", codec.decode_event_batch, payload)
        assert f"{fp:016x}" in str(err)
        expect_error("unknown_schema", codec.decode_event_batch_per_record, payload)
        expect_error("unknown_schema", codec.decode_record, payload, "control_event")


def test_wrong_subject() -> None:
    control = codec.encode_record("control_event", control_events()[0])
    hb = codec.encode_record("heartbeat", heartbeats()[0])
    batch = codec.encode_event_batch(header(), events_of_every_kind())
    for payload in (control, hb):
        expect_error("wrong_subject", codec.decode_event_batch, payload)
        expect_error("wrong_subject", codec.decode_event_batch_per_record, payload)
    expect_error("wrong_subject", codec.decode_record, batch, "heartbeat")
    expect_error("wrong_subject", codec.decode_record, control, "heartbeat")
    expect_error("wrong_subject", codec.decode_record, hb, "control_event")


# ---------------------------------------------------------------- hostile input: truncation


def _prefix_reason(n: int) -> str | None:
    if n < 2:
        return "bad_magic"  # cannot even tell it was meant as a single-object message
    if n < PREFIX_LEN:
        return "truncated"
    return None


def test_every_truncation_of_a_batch_is_truncated() -> None:
    payload = codec.encode_event_batch(header(), events_of_every_kind())
    for n in range(len(payload)):
        expect_error(_prefix_reason(n) or "truncated", codec.decode_event_batch, payload[:n])


def test_every_truncation_of_an_empty_batch_is_truncated() -> None:
    payload = codec.encode_event_batch(header(), [])
    for n in range(len(payload)):
        expect_error(_prefix_reason(n) or "truncated", codec.decode_event_batch, payload[:n])


@pytest.mark.parametrize("form", ["ours", "standard"])
def test_every_truncation_per_record(form: str) -> None:
    h, evs = header(), events_of_every_kind()
    payload = (
        codec.encode_event_batch(h, evs)
        if form == "ours"
        else single_object("event_batch", dict(h, events=evs))
    )
    for n in range(len(payload)):
        want = _prefix_reason(n) or "truncated"
        expect_error(want, codec.decode_event_batch_per_record, payload[:n])
        if form == "standard":
            expect_error(want, codec.decode_event_batch, payload[:n])


@pytest.mark.parametrize(("subject", "record"), RECORDS[-3:], ids=["policy", "hb", "hb-nulls"])
def test_every_truncation_of_a_record(subject: str, record: dict[str, Any]) -> None:
    payload = codec.encode_record(subject, record)
    for n in range(len(payload)):
        want = _prefix_reason(n) or "truncated"
        expect_error(want, codec.decode_record, payload[:n], subject)


# ---------------------------------------------------------------- hostile input: trailing bytes

TRAILERS = [b"\x00", b"\x02\x00", b"\xff", b"junk" * 10]


@pytest.mark.parametrize("trailer", TRAILERS, ids=range(len(TRAILERS)))
def test_trailing_bytes_are_malformed(trailer: bytes) -> None:
    h, evs = header(), events_of_every_kind()
    for payload in (
        codec.encode_event_batch(h, evs),
        codec.encode_event_batch(h, []),
        single_object("event_batch", dict(h, events=evs)),  # the fallback path
    ):
        expect_error("malformed", codec.decode_event_batch, payload + trailer)
        expect_error("malformed", codec.decode_event_batch_per_record, payload + trailer)
    for subject, record in RECORDS:
        expect_error(
            "malformed",
            codec.decode_record,
            codec.encode_record(subject, record) + trailer,
            subject,
        )


def test_two_concatenated_messages_are_malformed() -> None:
    one = codec.encode_event_batch(header(), events_of_every_kind())
    expect_error("malformed", codec.decode_event_batch, one + one)
    hb = codec.encode_record("heartbeat", heartbeats()[0])
    expect_error("malformed", codec.decode_record, hb + hb, "heartbeat")


# ---------------------------------------------------------------- hostile input: corruption


def test_out_of_range_timestamp_is_malformed_not_overflow() -> None:
    # A valid Avro long that is no datetime: fastavro raises OverflowError converting it.
    big = 2**62
    batch = codec.encode_event_batch(header(sent_at_us=big), events_of_every_kind())
    expect_error("malformed", codec.decode_event_batch, batch)
    expect_error("malformed", codec.decode_event_batch_per_record, batch)
    evs = [dict(e, captured_at_us=big) for e in events_of_every_kind()]
    expect_error(
        "malformed", codec.decode_event_batch_per_record, codec.encode_event_batch(header(), evs)
    )
    rec = dict(control_events()[0], occurred_at_us=big)
    expect_error(
        "malformed", codec.decode_record, codec.encode_record("control_event", rec), "control_event"
    )


def test_block_size_past_the_end_is_truncated() -> None:
    h, evs = header(), events_of_every_kind()
    block = codec.encode_events_block(evs)
    payload = codec.encode_event_batch(h, block=block, count=len(evs))
    head = payload[: payload.index(_zz(-len(evs)) + _zz(len(block)))]
    bad = head + _zz(-len(evs)) + _zz(len(block) + 1) + block + _zz(0)
    expect_error("truncated", codec.decode_event_batch, bad)


@pytest.mark.parametrize("count", [len(events_of_every_kind()) + 1, 10**6, 2**40, 2**62 - 1])
def test_overstated_event_count_is_malformed(count: int) -> None:
    h, evs = header(), events_of_every_kind()
    block = codec.encode_events_block(evs)
    expect_error(
        "malformed", codec.decode_event_batch, codec.encode_event_batch(h, block=block, count=count)
    )


_BATCH_H = header()
_BATCH_EVS = events_of_every_kind()
_BATCH = codec.encode_event_batch(_BATCH_H, _BATCH_EVS)
_BLOCK = codec.encode_events_block(_BATCH_EVS)
_BLOCK_START = len(_BATCH) - 1 - len(_BLOCK)
assert _BATCH[_BLOCK_START : _BLOCK_START + len(_BLOCK)] == _BLOCK


@st.composite
def flips(draw: st.DrawFn, lo: int, hi: int) -> list[tuple[int, int]]:
    """1..4 (offset, xor mask) pairs with offsets in [lo, hi): every pair changes a byte."""
    return draw(
        st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(1, 255)), min_size=1, max_size=4)
    )


def _apply(payload: bytes, changes: list[tuple[int, int]]) -> bytes:
    b = bytearray(payload)
    for at, mask in changes:
        b[at] ^= mask
    return bytes(b)


def _decodes_or_rejects(
    decode: Any, payload: bytes, rows: int | None, reasons: set[str] = REASONS
) -> None:
    try:
        got = decode(payload)
    except DecodeError as e:
        assert e.reason in reasons, e
        return
    if isinstance(got, codec.DecodedBatch):
        assert got.events.columns == [f["name"] for f in EVENT_FIELDS]
        if rows is not None:
            assert got.events.height == rows


@FUZZ
@given(changes=flips(_BLOCK_START, _BLOCK_START + len(_BLOCK)))
def test_byte_flips_inside_the_events_block(changes: list[tuple[int, int]]) -> None:
    payload = _apply(_BATCH, changes)
    assume(payload != _BATCH)
    # Block framing is intact, so whatever fails, fails inside the events: malformed.
    _decodes_or_rejects(codec.decode_event_batch, payload, len(_BATCH_EVS), {"malformed"})
    _decodes_or_rejects(codec.decode_event_batch_per_record, payload, len(_BATCH_EVS))


@FUZZ
@given(changes=flips(PREFIX_LEN, len(_BATCH)))
def test_byte_flips_anywhere_after_the_prefix(changes: list[tuple[int, int]]) -> None:
    payload = _apply(_BATCH, changes)
    _decodes_or_rejects(codec.decode_event_batch, payload, None)
    _decodes_or_rejects(codec.decode_event_batch_per_record, payload, None)


_RECORD_PAYLOADS = [
    (s, codec.encode_record(s, r)) for s, r in (RECORDS[5], RECORDS[-2])
]  # policy_update with maps; a full heartbeat


@FUZZ
@given(which=st.sampled_from(range(len(_RECORD_PAYLOADS))), data=st.data())
def test_byte_flips_in_records(which: int, data: st.DataObject) -> None:
    subject, payload = _RECORD_PAYLOADS[which]
    changes = data.draw(flips(PREFIX_LEN, len(payload)))
    _decodes_or_rejects(lambda p: codec.decode_record(p, subject), _apply(payload, changes), None)


@FUZZ
@given(tail=st.binary(max_size=300))
def test_random_bytes_after_a_known_prefix(tail: bytes) -> None:
    for subject in schemas.SUBJECTS:
        payload = MAGIC + schemas.latest(subject).fingerprint_le + tail
        if subject == "event_batch":
            _decodes_or_rejects(codec.decode_event_batch, payload, None)
            _decodes_or_rejects(codec.decode_event_batch_per_record, payload, None)
        else:
            _decodes_or_rejects(lambda p, s=subject: codec.decode_record(p, s), payload, None)


def test_frames_are_polars() -> None:
    got = codec.decode_event_batch(_BATCH)
    assert isinstance(got.events, pl.DataFrame)
    assert got.events["captured_at_us"].dtype == pl.Datetime("us", "UTC")


def test_an_older_writer_version_decodes_with_the_newest_header() -> None:
    """A v1 batch (agents from before the cohort field) decodes fast and slow with cohort
    `default`; a v2 batch carries its cohort."""
    h, evs = header(), events_of_every_kind()
    old = codec.encode_event_batch(h, evs, version=1)
    new = codec.encode_event_batch(dict(h, cohort="pilot-eng"), evs)
    assert codec.writer_schema(old, "event_batch").version == 1
    assert codec.writer_schema(new, "event_batch").version == schemas.latest("event_batch").version
    assert codec.decode_event_batch(old).header == decoded_header(h)
    assert codec.decode_event_batch_per_record(old).header == decoded_header(h)
    assert codec.decode_event_batch(new).header["cohort"] == "pilot-eng"
    assert codec.decode_event_batch(old).events.equals(codec.decode_event_batch(new).events)
    with pytest.raises(ValueError, match="no version 99"):
        codec.encode_event_batch(h, evs, version=99)


# ---------------------------------------------------------------- many batches in one block

def _parsed(evs_per_batch: list[list[dict[str, Any]]], counts: list[int] | None = None) -> list[codec.ParsedBatch]:
    out = []
    for i, evs in enumerate(evs_per_batch):
        n = len(evs) if counts is None else counts[i]
        blk = codec.encode_events_block(evs)
        out.append(codec.parse_event_batch(codec.encode_event_batch(header(employee_id=f"emp-{i}"), block=blk,
                                                                    count=n)))
    return out


@HYPOTHESIS
@given(st.lists(event_lists(), min_size=1, max_size=6))
def test_decode_batches_equals_block_by_block(batches: list[list[dict[str, Any]]]) -> None:
    parsed = _parsed(batches)
    fp = parsed[0].fingerprint
    total = sum(len(b) for b in batches)
    merged = codec.decode_batches(fp, parsed)
    assert_frame_equal(merged, codec.decode_blocks(fp, [blk for p in parsed for blk in p.blocks], total))


@pytest.mark.parametrize("shift", [-1, 1])
def test_decode_batches_never_moves_records_between_batches(shift: int) -> None:
    """A batch whose count lies by one would, in one shared block, give a record to (or take one
    from) the next employee's batch; the event-id check sends it back to per-block decoding,
    which refuses it."""
    a = [event("click", i, x=1, y=2, button="left", pressed=True) for i in range(5)]
    b = [event("key_down", i, key_code=65) for i in range(5)]
    parsed = _parsed([a, b], counts=[5 + shift, 5 - shift])
    fp = parsed[0].fingerprint
    # The hazard: one shared block decodes "fine" -- 10 records, split 4/6 or 6/4.
    data = b"".join(p.records for p in parsed)
    lay = codec._layout(fp)
    shared = pl.read_avro(io.BytesIO(lay.container_header + _zz(10) + _zz(len(data)) + data + codec._SYNC))
    assert shared.height == 10
    assert shared.get_column("event_id")[5 + shift] != b[0]["event_id"]
    # Block by block the lie is refused, and so it is by decode_batches.
    expect_error("malformed", codec.decode_blocks, fp, [blk for p in parsed for blk in p.blocks], 10)
    expect_error("malformed", codec.decode_batches, fp, parsed)
