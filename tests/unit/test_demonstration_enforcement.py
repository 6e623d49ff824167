"""Submitted demonstrations go through the event pipeline's own steps (except sampling): a frame
is published, and kept in its demonstration's manifest, only if an event captured at the same
moment in each of its visible windows would be stored; the instruction and every url are
redacted; nothing of an exempt employee and no raw id leaves; a frame whose bytes are not what
its headers claim is refused without its pixels being copied anywhere."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, unquote_plus

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core.partitioning import partition_for_key
from handtrace.core.pii import find_spans
from handtrace.core.policy import Policy
from handtrace.core.rows import STORED_SCHEMA, from_ipc
from handtrace.core.settings import Settings
from handtrace.stream.app import build_pipeline
from handtrace.stream.deadletter import OutRecord
from handtrace.stream.demonstrations import (
    FORMAT_MISMATCH,
    INVALID_HEADERS,
    INVALID_TIME,
    SHA256_MISMATCH,
    UNKNOWN_PART,
    DemonstrationEnforcer,
    DemoOutcome,
    DemoRules,
)
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.policy import EmployeeControls, Exemption, PauseWindow
from handtrace.stream.steps import BatchContext
from tests.factories import TEST_APP, TEST_URL, demo_frame, frame_message, make_demonstration
from tests.unit.test_step_redact import mixed

S = 1_000_000
T0 = 1_790_000_000 * S
NOW = T0 + 300 * S
PARTS = 3
EMP, DEV = "emp-raw-5c1d", "dev-raw-9e2b"
POLICY = Policy.from_record({"version": 1, "allowed_apps": [TEST_APP, "code"], "allowed_domains": ["google.com"],
                             "sampling": {}, "text_capture": {"*": "full"}})


@pytest.fixture(scope="module")
def enforcer(tmp_path_factory: pytest.TempPathFactory) -> DemonstrationEnforcer:
    s = Settings(state_dir=tmp_path_factory.mktemp("state"), stream={"pseudonym_key": "k" * 40})
    return DemonstrationEnforcer(build_pipeline(s).steps, partitions=PARTS, max_frame_bytes=s.demo.max_frame_bytes,
                                 source_topic="t.demonstrations.raw")


def msg(value: bytes, headers: list[tuple[str, bytes]], offset: int, key: str = EMP,
        partition: int | None = None) -> SourceMessage:
    p = partition_for_key(key.encode(), PARTS) if partition is None else partition
    return SourceMessage(value, p, offset, key.encode(), None, tuple(headers))


def upload(frames: list[dict[str, Any]], *, emp: str = EMP, first_offset: int = 10,
           **kw: Any) -> list[SourceMessage]:
    """A demonstration as the agent uploads it: the header, then one message per frame."""
    value, headers = make_demonstration(emp, frames, t0_us=T0, device_id=DEV, **kw)
    demo_id = dict(headers)["ht-demo-id"]
    out = [msg(value, headers, first_offset, emp)]
    for i, f in enumerate(frames):
        out.append(msg(*frame_message(f, demo_id, DEV), first_offset + 1 + i, emp))
    return out


def run(enforcer: DemonstrationEnforcer, msgs: list[SourceMessage], policy: Policy = POLICY,
        controls: dict[str, EmployeeControls] | None = None) -> DemoOutcome:
    return enforcer.enforce(msgs, BatchContext(NOW, policy, controls or {}))


def header_of(out: DemoOutcome) -> tuple[OutRecord, dict[str, Any]]:
    heads = [r for _, _, r in out.accepted if dict(r.headers)["ht-part"] == b"demonstration"]
    assert len(heads) == 1, out
    return heads[0], json.loads(dict(heads[0].headers)["ht-demo"])


def frames_of(out: DemoOutcome) -> list[OutRecord]:
    return [r for _, _, r in out.accepted if dict(r.headers)["ht-part"] == b"frame"]


def three_frames() -> list[dict[str, Any]]:
    return [demo_frame(T0 + 5 * S, seed=1, step=0), demo_frame(T0 + 20 * S, seed=2, step=1),
            demo_frame(T0 + 59 * S, seed=3, step=2, reason="end", fmt="webp")]


# ------------------------------------------------------------------ the whole path


@pytest.mark.parametrize("fast", [True, False])
def test_a_demonstration_is_published_per_contract(enforcer: DemonstrationEnforcer, fast: bool) -> None:
    frames = three_frames()
    msgs = upload(frames, fast=fast)
    out = run(enforcer, msgs)
    assert out.deadletters == []
    assert [(p, off) for p, off, _ in sorted(out.accepted, key=lambda a: a[1])] == [(msgs[0].partition, 10 + i)
                                                                                   for i in range(4)]
    head, demo = header_of(out)
    h = dict(head.headers)
    assert set(h) == {"ht-part", "ht-demo-id", "ht-employee-key", "ht-device-key", "ht-source-offset", "ht-demo"}
    assert head.key == h["ht-employee-key"] and head.partition == msgs[0].partition
    assert h["ht-demo-id"] == dict(msgs[0].headers)["ht-demo-id"] and h["ht-source-offset"] == b"10"
    assert set(demo) == {"demonstration_id", "employee_key", "device_key", "instruction", "started_at_us",
                         "ended_at_us", "sent_at_us", "received_at_us", "consent_version", "policy_version",
                         "agent_version", "os", "cohort", "screen", "apps", "frames", "frames_dropped",
                         "events_dropped"}
    assert demo["demonstration_id"] == h["ht-demo-id"].hex() and demo["received_at_us"] == NOW
    assert demo["instruction"] == "file the travel expense for the Berlin trip"
    assert demo["screen"] == {"width": 1920, "height": 1080, "scale": 1.0} and demo["apps"] == [TEST_APP]
    assert [f["sha256"] for f in demo["frames"]] == [f["sha256"].hex() for f in frames]
    assert demo["frames"][2]["format"] == "webp" and demo["frames"][2]["action_started_at_us"] is None
    assert demo["frames"][0]["windows"] == [{"app_id": TEST_APP, "url": TEST_URL, "x": 0, "y": 0, "width": 800,
                                             "height": 600}]
    assert demo["frames_dropped"] == {} and demo["events_dropped"] == {}
    rows = from_ipc(head.value)
    assert rows.schema.equals(STORED_SCHEMA) and rows.num_rows == 30
    assert set(rows.column("batch_id").to_pylist()) == {h["ht-demo-id"]}
    assert set(rows.column("source_offset").to_pylist()) == {10}
    shots = frames_of(out)
    assert [r.value for r in shots] == [f["image"] for f in frames]
    for r, f in zip(shots, frames, strict=True):
        fh = dict(r.headers)
        assert set(fh) == {"ht-part", "ht-demo-id", "ht-employee-key", "ht-sha256", "ht-format", "ht-source-offset"}
        assert r.key == head.key and fh["ht-sha256"] == f["sha256"].hex().encode()
        assert fh["ht-format"] == f["format"].encode()
    assert out.demonstrations == {"accepted": 1}
    assert out.frames == {("manifest", "accepted"): 3, ("message", "accepted"): 3}


def test_only_pseudonyms_leave(enforcer: DemonstrationEnforcer) -> None:
    out = run(enforcer, upload(three_frames()))
    assert len(out.accepted) == 4
    for _, _, r in out.accepted:
        blob = (r.key or b"") + b"".join(k.encode() + v for k, v in r.headers) + r.value
        if dict(r.headers)["ht-part"] == b"demonstration":
            blob += repr(from_ipc(r.value).to_pylist()).encode()  # the IPC buffers are compressed
        for raw in (EMP, DEV):
            assert raw.encode() not in blob, f"{raw} reached the accepted topic"


def test_a_paused_window_removes_its_frames_and_events(enforcer: DemonstrationEnforcer) -> None:
    frames = three_frames()
    pause = {EMP: EmployeeControls(pauses=(PauseWindow(T0 + 15 * S, T0 + 25 * S),))}
    out = run(enforcer, upload(frames), controls=pause)
    _, demo = header_of(out)
    assert [f["sha256"] for f in demo["frames"]] == [frames[0]["sha256"].hex(), frames[2]["sha256"].hex()]
    assert demo["frames_dropped"] == {"paused": 1}
    assert [r.value for r in frames_of(out)] == [frames[0]["image"], frames[2]["image"]]
    assert out.frames[("message", "paused")] == 1
    # events: 30 over 60 s, one every 2 s; the pause (widened by the 2 s margin) covers 13..27 s
    rows = from_ipc(header_of(out)[0].value)
    captured = [(t.timestamp() * S - T0) / S for t in rows.column("captured_at").to_pylist()]
    assert captured and not any(13 <= c < 27 for c in captured)
    assert demo["events_dropped"] == {"paused": 30 - rows.num_rows}


def test_a_frame_showing_a_window_that_is_not_allowlisted_is_dropped(enforcer: DemonstrationEnforcer) -> None:
    frames = [demo_frame(T0 + 5 * S, seed=1),
              demo_frame(T0 + 6 * S, ((TEST_APP, TEST_URL), ("telegram", None)), seed=2),
              demo_frame(T0 + 7 * S, ((TEST_APP, "https://evil.example/x"),), seed=3),
              demo_frame(T0 + 8 * S, (), seed=4)]  # all filled: judged on its time only
    out = run(enforcer, upload(frames))
    _, demo = header_of(out)
    assert [f["sha256"] for f in demo["frames"]] == [frames[0]["sha256"].hex(), frames[3]["sha256"].hex()]
    assert demo["frames_dropped"] == {"not_allowlisted_app": 1, "not_allowlisted_domain": 1}
    assert [r.value for r in frames_of(out)] == [frames[0]["image"], frames[3]["image"]]
    assert out.frames[("message", "not_allowlisted_app")] == 1
    assert out.frames[("message", "not_allowlisted_domain")] == 1


def test_a_frame_without_windows_inside_a_pause_is_dropped(enforcer: DemonstrationEnforcer) -> None:
    frames = [demo_frame(T0 + 5 * S, (), seed=1), demo_frame(T0 + 40 * S, (), seed=2)]
    out = run(enforcer, upload(frames), controls={EMP: EmployeeControls(pauses=(PauseWindow(T0, T0 + 10 * S),))})
    _, demo = header_of(out)
    assert [f["sha256"] for f in demo["frames"]] == [frames[1]["sha256"].hex()]
    assert [r.value for r in frames_of(out)] == [frames[1]["image"]]


def test_a_manifest_frame_outside_its_demonstration_is_dropped(enforcer: DemonstrationEnforcer) -> None:
    frames = [demo_frame(T0 + 5 * S, seed=1), demo_frame(T0 + 61 * S, seed=2)]
    _, demo = header_of(run(enforcer, upload(frames)))
    assert len(demo["frames"]) == 1 and demo["frames_dropped"] == {INVALID_TIME: 1}


def test_an_exempt_employee_yields_nothing(enforcer: DemonstrationEnforcer) -> None:
    for exemption in (Exemption(T0 - 10 * S), Exemption(T0 + 50 * S)):  # before it, or from within it
        out = run(enforcer, upload(three_frames()), controls={EMP: EmployeeControls(exemptions=(exemption,))})
        assert out.accepted == [] and out.deadletters == []
        assert out.demonstrations == {"exempt": 1}


def test_an_erased_employee_yields_nothing_whatever_the_times(enforcer: DemonstrationEnforcer) -> None:
    """An erasure (handtrace erase) covers demonstrations captured long before or after it."""
    for frames in (three_frames(), [demo_frame(T0 + 1000 * 86_400 * S, seed=3)]):
        out = run(enforcer, upload(frames), controls={EMP: EmployeeControls(erasures=("e-1",))})
        assert out.accepted == [] and out.deadletters == []
        assert out.demonstrations == {"exempt": 1}


def test_events_are_not_sampled(enforcer: DemonstrationEnforcer) -> None:
    nothing = Policy.from_record({"version": 2, "allowed_apps": [TEST_APP], "allowed_domains": ["google.com"],
                                  "sampling": {"*": 0.0}, "text_capture": {"*": "full"}})
    out = run(enforcer, upload(three_frames()), policy=nothing)
    assert from_ipc(header_of(out)[0].value).num_rows == 30
    assert "sample" not in {s.name for s in enforcer.rules.events}


def test_the_steps_are_the_event_pipelines_own(tmp_path: Path) -> None:
    pipeline = build_pipeline(Settings(state_dir=tmp_path, stream={"pseudonym_key": "k" * 40,
                                                                  "pointer_max_hz": 10}))
    rules = DemoRules.from_steps(pipeline.steps)
    assert [s.name for s in rules.events] == ["validate", "exemption", "pause", "allowlist", "redact",
                                              "pseudonymise"]
    assert all(any(s is p for p in pipeline.steps) for s in rules.events)
    assert rules.redact is next(s for s in pipeline.steps if s.name == "redact")
    with pytest.raises(ValueError, match="pause"):
        DemoRules.from_steps([s for s in pipeline.steps if s.name != "pause"])


def test_a_reupload_in_the_same_micro_batch_is_published_whole_twice(enforcer: DemonstrationEnforcer) -> None:
    frames = three_frames()
    first = upload(frames)
    again = [SourceMessage(m.payload, m.partition, m.offset + 100, m.key, None, m.headers) for m in first]
    out = run(enforcer, first + again)
    heads = [r for _, _, r in out.accepted if dict(r.headers)["ht-part"] == b"demonstration"]
    assert [from_ipc(h.value).num_rows for h in heads] == [30, 30]
    assert len(frames_of(out)) == 6


# ------------------------------------------------------------------ redaction


def _leftovers(text: str) -> list[Any]:
    return [s for view in {text, unquote(text), unquote_plus(text)} for s in find_spans(view)
            if "[REDACTED:" not in view[s[0]:s[1]]]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(instruction=mixed(), path=mixed())
def test_no_detector_finds_anything_in_the_instruction_or_urls(enforcer: DemonstrationEnforcer,
                                                               instruction: str, path: str) -> None:
    url = "https://docs.google.com/d/" + quote(path, safe="")
    frames = [demo_frame(T0 + 5 * S, ((TEST_APP, url),), seed=1)]
    out = run(enforcer, upload(frames, instruction=instruction))
    if out.deadletters:  # fails closed: what cannot be redacted is not published
        assert out.accepted == [] and out.deadletter_reasons == {"demonstration_unredactable": 1}
        return
    _, demo = header_of(out)
    assert _leftovers(demo["instruction"]) == [], demo["instruction"]
    for f in demo["frames"]:
        for w in f["windows"]:
            assert _leftovers(w["url"]) == [], w["url"]
    assert out.frames[("message", "accepted")] + sum(
        n for (part, _), n in out.frames.items() if part == "message" and _ != "accepted") == 1


def test_an_instruction_with_an_email_phone_and_card_is_redacted(enforcer: DemonstrationEnforcer) -> None:
    out = run(enforcer, upload(three_frames(), instruction="mail ada@acme.com, call +44 20 7946 0958, "
                               "pay with 4111 1111 1111 1111"))
    _, demo = header_of(out)
    assert demo["instruction"] == ("mail [REDACTED:email], call [REDACTED:phone], pay with [REDACTED:card]")


# ------------------------------------------------------------------ frames that are not what they claim


def _bad_frames() -> list[tuple[str, SourceMessage]]:
    f = demo_frame(T0 + 5 * S, seed=1)
    good_value, good_headers = frame_message(f, b"d" * 16, DEV)
    other = demo_frame(T0 + 5 * S, seed=2)
    cases = {
        SHA256_MISMATCH: (other["image"], good_headers),
        FORMAT_MISMATCH: (good_value, [(k, b"webp" if k == "ht-format" else v) for k, v in good_headers]),
        INVALID_HEADERS: (good_value, [(k, v) for k, v in good_headers if k != "ht-windows"]),
    }
    wrong_magic = b"GIF89a" + good_value[6:]
    import hashlib

    cases["format_mismatch_magic"] = (wrong_magic, [(k, hashlib.sha256(wrong_magic).hexdigest().encode()
                                                     if k == "ht-sha256" else v) for k, v in good_headers])
    return [(reason, msg(v, h, i)) for i, (reason, (v, h)) in enumerate(cases.items())]


def test_frames_that_are_not_what_they_claim_are_refused_without_their_pixels(
        enforcer: DemonstrationEnforcer) -> None:
    bad = _bad_frames()
    out = run(enforcer, [m for _, m in bad])
    assert out.accepted == []
    assert out.deadletter_reasons == {f"frame_{SHA256_MISMATCH}": 1, f"frame_{FORMAT_MISMATCH}": 2,
                                      f"frame_{INVALID_HEADERS}": 1}
    for r, (_, m) in zip(out.deadletters, bad, strict=True):
        h = dict(r.headers)
        assert r.value == b"" and h["ht-payload-withheld"] == str(len(m.payload)).encode()
        assert h["ht-source-topic"] == b"t.demonstrations.raw"


def test_garbled_and_misrouted_messages_are_dead_lettered(enforcer: DemonstrationEnforcer) -> None:
    value, headers = make_demonstration(EMP, [], t0_us=T0, device_id=DEV)
    wrong_p = (partition_for_key(EMP.encode(), PARTS) + 1) % PARTS
    msgs = [
        msg(value, [(k, v) for k, v in headers if k != "ht-part"], 1),
        msg(value, [(k, b"thumbnail" if k == "ht-part" else v) for k, v in headers], 2),
        msg(b"\xc3\x01" + b"\xff" * 8 + b"garbage", headers, 3),
        msg(value, headers, 4, key="someone-else"),
        msg(value, headers, 5, partition=wrong_p),
        msg(value, [(k, b"x" * 16 if k == "ht-demo-id" else v) for k, v in headers], 6),
        msg(value, [(k, b"soon" if k == "ht-sent-at" else v) for k, v in headers], 7),
    ]
    out = run(enforcer, msgs)
    assert out.accepted == []
    assert out.deadletter_reasons == {
        "demonstration_invalid_headers": 2, f"demonstration_{UNKNOWN_PART}": 1, "demonstration_unknown_schema": 1,
        "demonstration_key_mismatch": 1, "demonstration_wrong_partition": 1, "demonstration_demo_id_mismatch": 1,
    }
    assert len(out.deadletters) == 7
    # Copies keep a header's bytes (for replay), never what may be pixels (no ht-part saying otherwise).
    assert [r.value == b"" for r in out.deadletters] == [True, True, False, False, False, False, False]


def test_rounds_send_a_partitions_records_in_source_order(enforcer: DemonstrationEnforcer) -> None:
    msgs = upload(three_frames())
    out = run(enforcer, list(reversed(msgs)))
    rounds = out.rounds("accepted", "deadletter")
    assert [len(r) for r in rounds] == [1, 1, 1, 1]
    assert [dict(r[0][1].headers)["ht-source-offset"] for r in rounds] == [b"10", b"11", b"12", b"13"]


@given(st.binary(max_size=300))
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_arbitrary_bytes_never_raise(enforcer: DemonstrationEnforcer, junk: bytes) -> None:
    value, headers = make_demonstration(EMP, [], t0_us=T0, device_id=DEV)
    out = run(enforcer, [msg(junk, headers, 1), msg(value[: len(junk)], headers, 2),
                         msg(junk, frame_message(demo_frame(T0 + S), b"d" * 16, DEV)[1], 3)])
    assert len(out.deadletters) == 3 and out.accepted == []


def test_each_demonstration_counts_its_own_dropped_events(enforcer: DemonstrationEnforcer) -> None:
    """Enforced together in one pass, attributed per demonstration (a pass that drops for several
    reasons does not say which row was whose)."""
    import random

    from tests.factories import make_event

    rng = random.Random(3)
    events = [make_event("click", T0 + i * S, rng) for i in range(30)]
    for e in events[:7]:
        e["app_id"] = "telegram"  # not allowlisted
    paused = upload([demo_frame(T0 + 5 * S, seed=1)], emp="emp-a")
    other_value, other_headers = make_demonstration("emp-b", [demo_frame(T0 + 5 * S, seed=2)], t0_us=T0,
                                                    device_id=DEV, events=events)
    out = run(enforcer, [*paused, msg(other_value, other_headers, 50, "emp-b")],
              controls={"emp-a": EmployeeControls(pauses=(PauseWindow(T0 + 15 * S, T0 + 25 * S),))})
    heads = {dict(r.headers)["ht-source-offset"]: json.loads(dict(r.headers)["ht-demo"])
             for _, _, r in out.accepted if dict(r.headers)["ht-part"] == b"demonstration"}
    assert heads[b"10"]["events_dropped"] == {"paused": 7}  # 30 over 60 s; 13 s .. 27 s paused
    assert heads[b"50"]["events_dropped"] == {"not_allowlisted_app": 7}
    assert out.events.dropped == {"paused": 7, "not_allowlisted_app": 7}  # the metrics count each once
    assert out.events_stored == 46
