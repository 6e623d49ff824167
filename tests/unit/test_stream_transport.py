"""The stream's transport rules without a broker (issue #10, classes 1, 4, 7): accepted rows cut by
measured bytes only between source messages, free strings truncated with a count, keys and
partitions verified, dead-letter copies that always fit and keep key and headers, no events
acked before their sends are confirmed, no generated key outside dev_mode, no ids in logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pytest
import zstandard
from faust.types.tuples import ConsumerMessage
from hypothesis import given, settings
from hypothesis import strategies as st

from handtrace.core import codec, ids
from handtrace.core.clock import now_us
from handtrace.core.partitioning import partition_for_key
from handtrace.core.rows import ipc_stream
from handtrace.core.settings import Settings
from handtrace.stream import app as stream_app
from handtrace.stream.deadletter import RESERVED, deadletter_record, message_budget, record_size
from handtrace.stream.pipeline import BatchPipeline, DeadLetter, SourceMessage, pack_by_source, transport_problem
from handtrace.stream.policy import Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.pseudonymise import PseudonymiseStep
from handtrace.stream.steps.validate import MAX_LABEL_CHARS, ValidateStep
from tests.factories import TEST_POLICY, make_batch, make_event

# ------------------------------------------------------------------ accepted rows cut by bytes


def _encode(table: pa.Table) -> bytes:
    return ipc_stream(table, "lz4")


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 20), st.integers(0, 3000)), min_size=0, max_size=30),
       st.integers(1, 60), st.integers(600, 40_000), st.randoms(use_true_random=False))
def test_messages_fit_and_keep_source_messages_whole_and_in_order(
    sources: list[tuple[int, int]], max_rows: int, max_bytes: int, rng: random.Random
) -> None:
    offsets, texts = [], []
    for off, (n, size) in enumerate(sources):
        for _ in range(n):
            offsets.append(off * 3)
            texts.append(rng.randbytes(size).hex()[:size])  # incompressible-ish: lz4 cannot hide it
    table = pa.table({"source_offset": pa.array(offsets, pa.int64()), "t": pa.array(texts, pa.string()),
                      "row": pa.array(range(len(offsets)), pa.int64())})
    packed = pack_by_source(table, max_rows, max_bytes, _encode)
    seen: list[int] = []
    for rows, payload in packed.messages:
        assert len(payload) <= max_bytes
        assert payload == _encode(rows)
        offs = set(rows.column("source_offset").to_pylist())
        assert rows.num_rows <= max_rows or len(offs) == 1
        seen += sorted(offs)
    for off in packed.too_large:
        lo = offsets.index(off)
        alone = table.slice(lo, offsets.count(off))  # as the packer cuts it (a slice encodes a bit larger)
        assert len(_encode(alone)) > max_bytes, "a source message that fits was refused"
    assert len(seen) == len(set(seen)), "a source message was split across messages"
    assert sorted(seen + packed.too_large) == sorted(set(offsets))
    # rows of the messages, in order, are the table's minus the refused ones: never reordered
    kept = [r for rows, _ in packed.messages for r in rows.column("row").to_pylist()]
    refused = set(packed.too_large)
    assert kept == [r for r, o in zip(range(len(offsets)), offsets, strict=True) if o not in refused]


def test_rows_out_of_source_order_are_put_in_order() -> None:
    table = pa.table({"source_offset": pa.array([5, 5, 3, 9, 3], pa.int64()), "row": pa.array(range(5))})
    packed = pack_by_source(table, 100, 1 << 20, _encode)
    (rows, _), = packed.messages
    assert rows.column("source_offset").to_pylist() == [3, 3, 5, 5, 9]
    assert rows.column("row").to_pylist() == [2, 4, 0, 1, 3]


# ------------------------------------------------------------------ truncation in validation

_text = st.one_of(st.none(), st.text(max_size=300), st.text(alphabet="ßΣ😀a", min_size=60, max_size=200))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_text, _text, _text, _text), min_size=1, max_size=40), st.integers(64, 150),
       st.text(max_size=300))
def test_truncation_bounds_every_free_string_counts_it_and_keeps_row_order(
    values: list[tuple[str | None, ...]], limit: int, label: str
) -> None:
    cols = ("window_title", "url", "text", "app_id")
    frame = pl.DataFrame({
        "row": list(range(len(values))),
        **{c: [v[i] for v in values] for i, c in enumerate(cols)},
        "agent_version": [label] * len(values), "os": ["linux"] * len(values), "cohort": [label] * len(values),
    }, schema_overrides={c: pl.String for c in (*cols, "agent_version", "cohort")})
    out, counts = ValidateStep(max_field_chars=limit)._truncate(frame)
    assert out.get_column("row").to_list() == list(range(len(values)))
    bounds = {**dict.fromkeys(cols, limit), "agent_version": MAX_LABEL_CHARS, "os": MAX_LABEL_CHARS,
              "cohort": MAX_LABEL_CHARS}
    for c, bound in bounds.items():
        before, after = frame.get_column(c).to_list(), out.get_column(c).to_list()
        over = sum(1 for v in before if v is not None and len(v) > bound)
        assert counts.get(f"truncated_{c}", 0) == over
        for b, a in zip(before, after, strict=True):
            assert (a is None) == (b is None)
            if b is not None:
                assert a == b[:bound]  # a prefix, at most the bound, untouched when short


def test_validate_step_reports_truncations_with_the_redacted_counts() -> None:
    rng = random.Random(3)
    t0 = now_us() - 1_000_000
    e = make_event("focus_change", t0, rng)
    e["window_title"] = "x" * 5000
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": "emp-1", "device_id": "dev-1", "agent_version": "v" * 500,
              "os": "linux", "cohort": "default", "seq": 1, "sent_at_us": t0 + 1000}
    payload = codec.encode_event_batch(header, [e])
    frame = BatchPipeline([])._frame([(SourceMessage(payload, 0, 0), codec.parse_event_batch(payload))])
    res = ValidateStep(max_field_chars=2048)(frame, BatchContext(now_us()))
    assert res.frame.height == 1
    assert res.redacted == {"truncated_window_title": 1, "truncated_agent_version": 1}
    assert res.frame.get_column("window_title")[0] == "x" * 2048


def test_a_screenshot_hash_of_the_wrong_length_is_invalid() -> None:
    rng = random.Random(4)
    t0 = now_us() - 1_000_000
    good, bad = make_event("screenshot", t0, rng), make_event("screenshot", t0 + 1, rng)
    bad["screenshot_sha256"] = b"\x00" * 100_000
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": "emp-1", "device_id": "dev-1", "agent_version": "t",
              "os": "linux", "cohort": "default", "seq": 1, "sent_at_us": t0 + 1000}
    payload = codec.encode_event_batch(header, [good, bad])
    frame = BatchPipeline([])._frame([(SourceMessage(payload, 0, 0), codec.parse_event_batch(payload))])
    res = ValidateStep()(frame, BatchContext(now_us()))
    assert res.dropped == {"invalid_screenshot": 1} and res.frame.height == 1


# ------------------------------------------------------------------ keys and partitions


@given(st.text(min_size=1, max_size=40).map(lambda t: "emp-" + t), st.integers(1, 64), st.integers(0, 63))
def test_transport_problem_matches_the_partitioner(employee: str, partitions: int, partition: int) -> None:
    key = employee.encode()
    partition %= partitions
    m = SourceMessage(b"", partition, 0, key)
    want = partition_for_key(key, partitions)
    problem = transport_problem(m, employee, partitions)
    assert (problem is None) == (partition == want)
    if problem is not None:
        assert problem[0] == "wrong_partition" and employee not in problem[1]


def test_missing_and_mismatched_keys() -> None:
    assert transport_problem(SourceMessage(b"", 0, 0, None), "emp-1", 6) == ("missing_key", "message has no key")
    assert transport_problem(SourceMessage(b"", 0, 0, None), "emp-1", None) is None  # tools feeding the pipeline
    p = partition_for_key(b"emp-2", 6)
    assert transport_problem(SourceMessage(b"", p, 0, b"emp-2"), "emp-1", 6)[0] == "key_mismatch"  # type: ignore[index]
    assert transport_problem(SourceMessage(b"", 0, 0, b"emp-2"), "emp-1", None)[0] == "key_mismatch"  # type: ignore[index]


def test_the_worker_pipeline_dead_letters_each_transport_fault_and_keeps_the_rest() -> None:
    pipe = BatchPipeline([ValidateStep(), PseudonymiseStep(b"k" * 32)], partitions=6, max_payload_bytes=200_000)
    ok, _ = make_batch("emp-1", 20, seed=1)
    other, _ = make_batch("emp-2", 20, seed=2)
    part = partition_for_key(b"emp-1", 6)
    msgs = [
        SourceMessage(ok, part, 1, b"emp-1"),
        SourceMessage(ok, (part + 1) % 6, 2, b"emp-1"),
        SourceMessage(ok, part, 3, None),
        SourceMessage(other, part, 4, b"emp-1"),
        SourceMessage(b"x" * 200_001, part, 5, b"emp-1"),
    ]
    out = pipe.process_many(msgs, now_us())
    assert {d.message.offset: d.reason for d in out.deadletters} == {
        2: "wrong_partition", 3: "missing_key", 4: "key_mismatch", 5: "payload_too_large"}
    assert set(out.rows) == {part} and out.stored == 20


# ------------------------------------------------------------------ dead-letter copies


def _dl(payload: bytes, key: bytes | None, headers: tuple[tuple[str, bytes], ...], detail: str = "d") -> DeadLetter:
    return DeadLetter(SourceMessage(payload, 2, 77, key, None, headers), "some_reason", detail)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400_000), st.integers(0, 300_000), st.integers(0, 40), st.integers(0, 30_000),
       st.booleans(), st.integers(65_536, 300_000))
def test_a_dead_letter_copy_always_fits(payload_n: int, key_n: int, n_headers: int, header_n: int,
                                        compressible: bool, limit: int) -> None:
    rng = random.Random(payload_n ^ key_n)
    payload = b"a" * payload_n if compressible else rng.randbytes(payload_n)
    headers = tuple((f"h{i}", rng.randbytes(header_n)) for i in range(n_headers))
    key = rng.randbytes(key_n) if key_n else None
    r = deadletter_record(_dl(payload, key, headers), limit)
    assert record_size(r.key, r.value, r.headers) <= message_budget(limit) < limit
    h = dict(r.headers)
    assert h["ht-reason"] == b"some_reason" and h["ht-source-offset"] == b"77" and h["ht-source-partition"] == b"2"
    if h.get("ht-encoding") == b"zstd":
        assert zstandard.ZstdDecompressor().decompress(r.value, max_output_size=1 << 30) == payload
    elif h.get("ht-truncated") == b"1":
        assert payload.startswith(r.value)
        assert h["ht-original-sha256"] == hashlib.sha256(payload).hexdigest().encode()
        assert h["ht-original-bytes"] == str(len(payload)).encode()
    else:
        assert r.value == payload
    if "ht-key-sha256" not in h:
        assert r.key == key
    if "ht-headers-dropped" not in h:
        assert all(x in r.headers for x in headers)


def test_a_small_dead_letter_keeps_key_and_headers_and_redacts_the_detail() -> None:
    headers = (("ht-sent-at", b"123"), ("ht-reason", b"forged"), ("x", b"y"))
    r = deadletter_record(_dl(b"payload", b"emp-9", headers, "jane.doe@example.com said " + "z" * 1000), 1 << 20,
                          "p.events.raw")
    assert dict(r.headers)["ht-source-topic"] == b"p.events.raw"
    assert r.key == b"emp-9" and r.value == b"payload" and r.partition == 2
    assert ("ht-sent-at", b"123") in r.headers and ("x", b"y") in r.headers
    assert [v for k, v in r.headers if k == "ht-reason"] == [b"some_reason"], "a forged reserved header survived"
    detail = dict(r.headers)["ht-detail"].decode()
    assert "jane.doe" not in detail and len(detail) <= 200
    assert "ht-reason" in RESERVED


# ------------------------------------------------------------------ acks only after confirmed sends


class _Consumer:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, message: Any) -> bool:
        self.acked.append(message.offset)
        return True


class _Event:
    """What Faust's Event does on ack: Message.ack against the app's consumer."""

    def __init__(self, offset: int, consumer: _Consumer) -> None:
        self.message = ConsumerMessage("t", 0, offset, 0.0, 0, [], b"k", b"v", None)
        self.message.incref()  # the conductor's reference: one stream
        self.consumer = consumer

    def ack(self) -> bool:
        return self.message.ack(self.consumer)  # type: ignore[arg-type]


class _Topic:
    def __init__(self, fail: bool) -> None:
        self.fail = fail

    async def send(self, **kw: Any) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.fail:
            fut.set_exception(RuntimeError("MessageSizeTooLargeError"))
        else:
            fut.set_result(None)
        return fut


class _Stopped(Exception):
    pass


@pytest.mark.parametrize("fail", [False, True])
def test_events_are_acked_only_after_their_sends_are_confirmed(fail: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer = _Consumer()
    events = [_Event(o, consumer) for o in range(3)]

    def stop(what: str, exc: BaseException) -> Any:
        raise _Stopped(what)

    monkeypatch.setattr(stream_app, "fail_stop", stop)
    record = stream_app.OutRecord(0, None, b"v", [])

    async def run() -> None:
        delivery = stream_app.Delivery(events)
        for e in events:  # take_events acks the micro-batch when the agent asks for the next one
            e.ack()
        assert consumer.acked == [], "an event was acked before its sends were confirmed"
        await delivery.send([[(_Topic(fail), record)], [(_Topic(False), record)]])

    if fail:
        with pytest.raises(_Stopped):
            asyncio.run(run())
        assert consumer.acked == []
    else:
        asyncio.run(run())
        assert consumer.acked == [0, 1, 2]


# ------------------------------------------------------------------ secrets and logs


def test_no_pseudonym_key_outside_dev_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(stream_app.MissingSecret, match="HANDTRACE_STREAM__PSEUDONYM_KEY"):
        stream_app.pseudonym_key(Settings(state_dir=tmp_path))
    assert not (tmp_path / "secrets").exists()
    key = stream_app.pseudonym_key(Settings(state_dir=tmp_path, dev_mode=True))
    assert len(key) == 64 and stream_app.pseudonym_key(Settings(state_dir=tmp_path, dev_mode=True)) == key
    for k in [k for k in __import__("os").environ if k.startswith("HANDTRACE_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("HANDTRACE_STATE_DIR", str(tmp_path / "other"))
    # Nothing configured: both missing secrets are named, one line each, and nothing starts.
    with pytest.raises(SystemExit) as exit_:
        stream_app.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "HANDTRACE_STREAM__PSEUDONYM_KEY" in err[0] and "HANDTRACE_CONTROL__PUBLIC_KEYS" in err[1]
    # Control-plane keys configured: only the pseudonym key is missing.
    from handtrace.core.signing import generate_key_pair
    _private, public = generate_key_pair()
    monkeypatch.setenv("HANDTRACE_CONTROL__PUBLIC_KEYS", json.dumps({"cp1": public}))
    with pytest.raises(SystemExit) as exit_:
        stream_app.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "HANDTRACE_STREAM__PSEUDONYM_KEY" in err[0]


def test_third_party_log_records_never_carry_message_contents() -> None:
    f = stream_app.RawIdsOutOfLogs()

    def rec(name: str, level: int, msg: str, *args: Any) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, msg, args, None)

    assert not f.filter(rec("faust.topics", logging.DEBUG, "send: topic=%r k=%r v=%r", "t", b"emp-1", b"..."))
    assert not f.filter(rec("aiokafka.consumer.fetcher", logging.DEBUG, "record %r", b"emp-1"))
    r = rec("faust.topics", logging.WARNING, "_on_published error for message topic t error E message "
            "<FutureMessage: PendingMessage(key=b'emp-1', value=b'...')>")
    assert f.filter(r) and "emp-1" not in r.getMessage() and "error E" in r.getMessage()
    ours = rec("handtrace.stream", logging.DEBUG, "kept %s", "k=1")
    assert f.filter(ours) and ours.getMessage() == "kept k=1"


def test_the_pipeline_logs_no_id_at_debug(caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, stream={"pseudonym_key": "k" * 40})
    pipe = stream_app.worker_pipeline(s)
    secret = "emp-5e1f0a9d"  # noqa: S105 -- an employee id
    part = partition_for_key(secret.encode(), s.topics.partitions)
    msgs = [SourceMessage(make_batch(secret, 30, seed=i)[0], part, i, secret.encode()) for i in range(3)]
    msgs.append(SourceMessage(make_batch(secret, 5)[0], (part + 1) % s.topics.partitions, 9, secret.encode()))
    msgs.append(SourceMessage(b"garbage " + secret.encode(), part, 10, secret.encode()))
    with caplog.at_level(logging.DEBUG):
        logging.getLogger().setLevel(logging.DEBUG)
        out = pipe.process_many(msgs, now_us())
        for d in out.deadletters:
            deadletter_record(d, s.topics.max_message_bytes)
    assert len(out.deadletters) == 2
    assert secret not in caplog.text
    for d in out.deadletters:
        assert secret not in dict(deadletter_record(d, s.topics.max_message_bytes).headers)["ht-detail"].decode()


def test_outbound_dead_letters_rows_too_large_and_sends_partitions_in_rounds(tmp_path: Path) -> None:
    s = Settings(state_dir=tmp_path, topics={"max_message_bytes": 65_536, "partitions": 2},
                 stream={"pseudonym_key": "k" * 40, "max_rows_per_message": 100})
    pipe = stream_app.worker_pipeline(s)
    msgs = []
    for i, emp in enumerate(["emp-a", "emp-b", "emp-c", "emp-d"]):
        part = partition_for_key(emp.encode(), 2)
        msgs += [SourceMessage(make_batch(emp, 60, seed=i * 10 + j)[0], part, i * 10 + j, emp.encode())
                 for j in range(3)]
    whale = "emp-whale"
    big = make_batch(whale, 8000, seed=99)[0]
    # the first line (payload_too_large) off, to reach the second: rows that alone do not fit
    pipe.max_payload_bytes = None
    msgs.append(SourceMessage(big, partition_for_key(whale.encode(), 2), 500, whale.encode()))
    policy = Policy.from_record(TEST_POLICY)
    out = pipe.process_many(msgs, now_us(), policy=policy, controls={})
    assert not out.deadletters and out.stored == 12 * 60 + 8000, (out.deadletters, out.dropped)
    rounds, stored, deadletters = stream_app.outbound(out, msgs, s, "accepted", "deadletter")
    assert [(d.reason, d.message.offset) for d in deadletters] == [("row_too_large", 500)]
    assert stored == out.stored - 8000
    budget = message_budget(s.topics.max_message_bytes)
    seen: dict[int, list[int]] = {}
    for i, batch in enumerate(rounds):
        partitions = [r.partition for topic, r in batch if topic == "accepted"]
        assert len(partitions) == len(set(partitions)), "two messages of a partition in one round"
        for topic, r in batch:
            assert record_size(r.key, r.value, r.headers) <= budget
            if topic == "deadletter":
                assert i == 0 and r.key == whale.encode()
            else:
                rows = pa.ipc.open_stream(r.value).read_all()
                seen.setdefault(r.partition, []).extend(rows.column("source_offset").to_pylist())
    assert sum(len(v) for v in seen.values()) == stored
    for offsets in seen.values():
        assert offsets == sorted(offsets), "a partition's messages went out of source order"
