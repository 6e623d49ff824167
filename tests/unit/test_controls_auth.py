"""Authentic controls (issue #10, class 3; docs/adr/0009-authentic-controls.md): the control fold
honours only what the control plane signed, or what a device enrolled for that very employee
signed about that employee's own pauses -- every forgery changes nothing and is counted."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core import codec, ids
from handtrace.core.clock import HEADER_SENT_AT
from handtrace.core.controls import POLICY_KEY, control_record
from handtrace.core.partitioning import partition_for_key
from handtrace.core.settings import Settings
from handtrace.core.signing import (
    HEADER_SIG,
    Refused,
    Signer,
    Verifier,
    control_plane_signer,
    device_signer,
    generate_key_pair,
    issuer_signer,
    public_key_b64,
    verifier,
)
from handtrace.stream.app import PolicyState
from handtrace.stream.controls import (
    ControlAuth,
    ControlMessage,
    DeviceRegistry,
    dumps,
    fold,
    loads,
)
from handtrace.stream.policy import MAX_PAUSE_US, EmployeeControls, Exemption, PauseWindow

S = 1_000_000
MIN = 60 * S
DAY = 86_400 * S
T0 = 1_780_000_000 * S
PARTS = 6
MAX_OFFSET = DAY

CP_KEY = Ed25519PrivateKey.generate()
CP = control_plane_signer("k1", CP_KEY)
ATTACKER = Ed25519PrivateKey.generate()
DEV_A_KEY = Ed25519PrivateKey.generate()
DEV_A = device_signer("dev-a", DEV_A_KEY)
DEV_B = device_signer("dev-b", Ed25519PrivateKey.generate())
OLD_KEY = Ed25519PrivateKey.generate()
VERIFIER = Verifier({"k1": CP_KEY.public_key(), "old": OLD_KEY.public_key()}, frozenset({"old"}))


def enrollment(device: str, employee: str, key: Ed25519PrivateKey | None, *, at: int = T0 - DAY // 2,
               signer: Signer = CP) -> ControlMessage:
    rec = {"enrollment_id": ids.uuid7_bytes(), "device_id": device, "employee_id": employee,
           "public_key": key.public_key().public_bytes_raw() if key else b"",
           "status": "enrolled" if key else "revoked", "occurred_at_us": at, "actor": "it-1", "reason": ""}
    value = codec.encode_record("device_enrollment", rec)
    return ControlMessage(value, device.encode(), 0, tuple(signer.headers("devices", device.encode(), value, at)), at)


def registry() -> DeviceRegistry:
    reg = DeviceRegistry()
    reg.apply(enrollment("dev-a", "emp-a", DEV_A_KEY), VERIFIER, MAX_OFFSET)
    reg.apply(enrollment("dev-b", "emp-b", DEV_B.private_key), VERIFIER, MAX_OFFSET)
    return reg


AUTH = ControlAuth(VERIFIER, registry(), PARTS, MAX_OFFSET)


def msg(rec: dict[str, Any], signer: Signer | None = CP, *, at: int = T0, sent: int | None = None,
        key: bytes | None = None, partition: int | None = None, role: str = "controls") -> ControlMessage:
    """A controls-topic message as produced (signed at ``sent``) and appended by the broker at ``at``."""
    value = codec.encode_record("control_event", rec)
    k = key if key is not None else (rec["employee_id"] or "").encode()
    headers = tuple(signer.headers(role, k, value, at if sent is None else sent)) if signer else ()
    p = partition if partition is not None else partition_for_key(k, PARTS)
    return ControlMessage(value, k, p, headers, at)


def grant(emp: str, at: int = T0) -> dict[str, Any]:
    return control_record("exemption_grant", employee_id=emp, actor="hr-1", role="hr", at_us=at)


def revoke(emp: str, at: int = T0) -> dict[str, Any]:
    return control_record("exemption_revoke", employee_id=emp, actor="hr-1", role="hr", at_us=at)


def pause(emp: str, start: int = T0, minutes: int = 10) -> dict[str, Any]:
    return control_record("pause_start", employee_id=emp, actor=emp, role="employee", at_us=start,
                          pause_starts_at_us=start, pause_ends_at_us=start + minutes * MIN)


def pause_end(emp: str, at: int) -> dict[str, Any]:
    return control_record("pause_end", employee_id=emp, actor=emp, role="employee", at_us=at, pause_ends_at_us=at)


PAUSED = EmployeeControls(pauses=(PauseWindow(T0, T0 + 10 * MIN),))
EXEMPT = EmployeeControls(exemptions=(Exemption(T0 - MIN),))


def outcome(state: EmployeeControls, m: ControlMessage, now: int = T0) -> tuple[EmployeeControls, str]:
    r = fold(state, m, AUTH, now_us=now)
    return r.state, r.outcome


# ---------------------------------------------------------------- forgeries change nothing


@pytest.mark.parametrize(("state", "rec"), [
    (EmployeeControls(), grant("emp-a")),
    (EXEMPT, revoke("emp-a", T0 + MIN)),
    (PAUSED, pause_end("emp-a", T0 + MIN)),
    (EmployeeControls(), pause("emp-a")),
])
def test_unsigned_controls_are_refused(state: EmployeeControls, rec: dict[str, Any]) -> None:
    assert outcome(state, msg(rec, None)) == (state, "unsigned")


def test_a_signature_that_does_not_match_is_refused() -> None:
    forged_kid = Signer("cp:k1", ATTACKER)  # claims the control plane's key id
    assert outcome(EXEMPT, msg(revoke("emp-a", T0 + MIN), forged_kid)) == (EXEMPT, "bad_signature")
    # A genuine signature over another value: the record was changed after signing.
    genuine = msg(pause("emp-a", T0, 5))
    tampered = replace(genuine, value=codec.encode_record("control_event", {
        **codec.decode_record(genuine.value, "control_event"), "kind": "exemption_revoke"}))
    assert outcome(EXEMPT, tampered)[1] == "bad_signature"
    garbage = replace(genuine, headers=tuple((k, b"!!" if k == HEADER_SIG else v) for k, v in genuine.headers))
    assert outcome(EXEMPT, garbage)[1] == "bad_signature"


def test_a_signature_made_for_another_topic_or_key_is_worthless_here() -> None:
    rec = revoke("emp-a", T0 + MIN)
    on_policy = msg(rec, CP, role="policy")  # signed for the policy topic
    assert outcome(EXEMPT, on_policy)[1] == "bad_signature"
    other = msg(revoke("emp-b", T0 + MIN))
    moved = replace(other, key=b"emp-a", partition=partition_for_key(b"emp-a", PARTS))
    assert outcome(EXEMPT, moved)[1] in ("key_mismatch", "bad_signature")


def test_unknown_and_retired_key_ids_are_refused() -> None:
    assert outcome(EXEMPT, msg(revoke("emp-a"), control_plane_signer("k9", ATTACKER)))[1] == "unknown_key"
    assert outcome(EXEMPT, msg(revoke("emp-a"), control_plane_signer("old", OLD_KEY)))[1] == "retired_key"
    assert outcome(EXEMPT, msg(revoke("emp-a"), Signer("hr:someone", ATTACKER)))[1] == "unknown_key"


def test_a_device_cannot_grant_or_revoke_an_exemption_not_even_its_own() -> None:
    assert outcome(EmployeeControls(), msg(grant("emp-a"), DEV_A)) == (EmployeeControls(), "not_permitted")
    assert outcome(EXEMPT, msg(revoke("emp-a", T0 + MIN), DEV_A)) == (EXEMPT, "not_permitted")


def test_a_device_cannot_pause_or_resume_someone_else() -> None:
    assert outcome(EmployeeControls(), msg(pause("emp-b"), DEV_A)) == (EmployeeControls(), "device_not_enrolled")
    assert outcome(PAUSED, msg(pause_end("emp-b", T0 + MIN), DEV_A)) == (PAUSED, "device_not_enrolled")


def test_a_device_that_is_not_enrolled_or_revoked_is_refused() -> None:
    stranger = device_signer("dev-x", ATTACKER)
    assert outcome(PAUSED, msg(pause_end("emp-a", T0 + MIN), stranger))[1] == "device_not_enrolled"
    reg = registry()
    reg.apply(enrollment("dev-a", "emp-a", None, at=T0 - DAY // 4), VERIFIER, MAX_OFFSET)
    auth = replace(AUTH, devices=reg)
    r = fold(PAUSED, msg(pause_end("emp-a", T0 + MIN), DEV_A), auth, now_us=T0)
    assert (r.state, r.outcome) == (PAUSED, "device_not_enrolled")


def test_enrollments_are_the_control_planes_and_cannot_be_replayed_after_a_revoke() -> None:
    reg = DeviceRegistry()
    with pytest.raises(Refused, match="unsigned"):
        reg.apply(replace(enrollment("dev-x", "emp-a", ATTACKER), headers=()), VERIFIER, MAX_OFFSET)
    with pytest.raises(Refused, match="bad_signature"):
        reg.apply(enrollment("dev-x", "emp-a", ATTACKER, signer=Signer("cp:k1", ATTACKER)), VERIFIER, MAX_OFFSET)
    first = enrollment("dev-a", "emp-a", DEV_A_KEY, at=T0 - DAY // 2)
    assert reg.apply(first, VERIFIER, MAX_OFFSET) == "enrolled"
    assert reg.apply(enrollment("dev-a", "emp-a", None, at=T0 - DAY // 4), VERIFIER, MAX_OFFSET) == "revoked"
    with pytest.raises(Refused, match="stale_version"):
        reg.apply(first, VERIFIER, MAX_OFFSET)  # the old enrollment written again
    assert reg.employee_of("dev-a") is None


def test_wrong_partition_and_key_mismatch_are_refused() -> None:
    right = partition_for_key(b"emp-a", PARTS)
    assert outcome(EmployeeControls(), msg(grant("emp-a"), partition=(right + 1) % PARTS))[1] == "wrong_partition"
    assert outcome(EmployeeControls(), msg(grant("emp-a"), key=b"emp-b"))[1] == "key_mismatch"


def test_a_record_from_a_clock_far_off_is_refused_and_an_old_one_written_again_too() -> None:
    assert outcome(EmployeeControls(), msg(grant("emp-a"), at=T0, sent=T0 + 2 * DAY))[1] == "clock_offset"
    genuine = msg(revoke("emp-a", T0), at=T0)
    assert outcome(EXEMPT, replace(genuine, appended_us=T0 + 3 * DAY), T0 + 3 * DAY)[1] == "clock_offset"


def test_a_replayed_genuine_record_is_applied_once() -> None:
    m = msg(pause("emp-a", T0, 10))
    once, out = outcome(EmployeeControls(), m)
    assert out == "pause_start" and len(once.pauses) == 1
    twice, out2 = outcome(once, replace(m, appended_us=T0 + 5 * MIN), T0 + 5 * MIN)
    assert (twice, out2) == (once, "replay")
    # ...also after the state went through the table's JSON.
    assert outcome(loads(dumps(once)), replace(m, appended_us=T0 + 6 * MIN), T0 + 6 * MIN)[1] == "replay"


def test_a_record_stamped_in_2100_prunes_nothing() -> None:
    y2100 = 4_102_444_800 * S
    state = EmployeeControls(pauses=(PauseWindow(T0 - 5 * MIN, T0 + 5 * MIN),))
    # Its sender claims 2100 at send time: refused outright.
    assert outcome(state, msg(grant("emp-a", y2100), sent=y2100))[1] == "clock_offset"
    # Sent now by the genuine control plane but about 2100: applied, and pruning runs on the
    # stream's clock, so the pause window stays.
    after, out = outcome(state, msg(grant("emp-a", y2100)))
    assert out == "exemption_grant" and after.pauses == state.pauses
    # Windows do go once they ended longer ago than the retention -- by the stream's clock.
    later, _ = outcome(state, msg(grant("emp-a", T0 + 9 * DAY), at=T0 + 9 * DAY), T0 + 9 * DAY)
    assert later.pauses == ()


# ---------------------------------------------------------------- genuine records apply


def test_a_genuine_device_pause_and_resume_and_a_control_plane_grant_apply() -> None:
    # The laptop's clock is 3 s behind the broker's: the windows keep that offset.
    state, out = outcome(EmployeeControls(), msg(pause("emp-a", T0, 10), DEV_A, at=T0 + 3 * S, sent=T0))
    assert out == "pause_start" and state.pauses == (PauseWindow(T0, T0 + 10 * MIN, 3 * S),)
    state, out = outcome(state, msg(pause_end("emp-a", T0 + 4 * MIN), DEV_A, at=T0 + 4 * MIN + 3 * S,
                                    sent=T0 + 4 * MIN))
    assert out == "pause_end" and state.pauses == (PauseWindow(T0, T0 + 4 * MIN, 3 * S),)
    state, out = outcome(state, msg(control_record("exemption_request", employee_id="emp-a", actor="emp-a",
                                                   role="employee", reason="council"), DEV_A))
    assert out == "exemption_request"
    state, out = outcome(state, msg(grant("emp-a", T0 + 5 * MIN), at=T0 + 5 * MIN - 2 * S, sent=T0 + 5 * MIN))
    assert out == "exemption_grant" and state.exemptions == (Exemption(T0 + 5 * MIN, None, -2 * S),)
    state, out = outcome(state, msg(revoke("emp-a", T0 + 9 * MIN), at=T0 + 9 * MIN))
    assert out == "exemption_revoke" and state.exemptions == (Exemption(T0 + 5 * MIN, T0 + 9 * MIN + 2 * S, -2 * S),)
    assert loads(dumps(state)) == state


def test_state_written_before_offsets_existed_loads_with_offset_zero() -> None:
    old = '{"pauses": [[1, 2]], "exemptions": [[3, null]]}'
    assert loads(old) == EmployeeControls(pauses=(PauseWindow(1, 2, 0),), exemptions=(Exemption(3, None, 0),))


def test_pause_longer_than_30_minutes_is_still_clamped() -> None:
    r = fold(EmployeeControls(), msg(pause("emp-a", T0, 45), DEV_A), AUTH, now_us=T0)
    assert r.clamped and r.state.pauses == (PauseWindow(T0, T0 + MAX_PAUSE_US),)


# ---------------------------------------------------------------- policies


def policy_msg(version: int, signer: Signer | None = CP, at: int = T0) -> ControlMessage:
    rec = control_record("policy_update", employee_id=None, actor="ops", role="ops", at_us=at, policy={
        "version": version, "allowed_apps": [f"app{version}"], "allowed_domains": [], "sampling": {},
        "text_capture": {}})
    value = codec.encode_record("control_event", rec)
    headers = tuple(signer.headers("policy", POLICY_KEY, value, at)) if signer else ()
    return ControlMessage(value, POLICY_KEY, 0, headers, at)


def test_policy_versions_only_from_the_control_plane_and_only_upwards() -> None:
    ps = PolicyState(VERIFIER, max_clock_offset_s=86_400, max_event_age_s=7 * 86_400)
    assert ps.apply(policy_msg(2**63 - 1, None), T0) == "unsigned"
    assert ps.apply(policy_msg(2**63 - 1, Signer("cp:k1", ATTACKER)), T0) == "bad_signature"
    assert ps.apply(policy_msg(2**63 - 1, DEV_A), T0) in ("device_not_enrolled", "not_permitted")
    assert ps.policy.version == 0
    assert ps.apply(policy_msg(3, at=T0), T0) == "policy_update"
    assert ps.apply(policy_msg(3, at=T0 + S), T0 + S) == "stale_version"  # equal is not greater
    assert ps.apply(policy_msg(2, at=T0 + 2 * S), T0 + 2 * S) == "stale_version"
    assert ps.apply(policy_msg(4, at=T0 + 3 * S), T0 + 3 * S) == "policy_update"
    assert ps.policy.version == 4 and ps.policy.allowed_apps == frozenset({"app4"})
    assert [(t, p.version) for t, p in ps.history] == [(T0, 3), (T0 + 3 * S, 4)]


def test_policy_history_keeps_recent_policies_and_the_one_in_force_at_the_horizon() -> None:
    ps = PolicyState(VERIFIER, max_clock_offset_s=86_400, max_event_age_s=7 * 86_400)
    for v in range(1, 4):
        ps.apply(policy_msg(v, at=T0 + v * DAY), T0 + v * DAY)
    ps.apply(policy_msg(9, at=T0 + 20 * DAY), T0 + 20 * DAY)
    # v3 was in force 7 days before now (the oldest capture time accepted): kept; v1, v2 not.
    assert [p.version for _, p in ps.history] == [3, 9]
    ps.apply(policy_msg(10, at=T0 + 28 * DAY), T0 + 28 * DAY)
    assert [p.version for _, p in ps.history] == [9, 10]
    ps.apply(policy_msg(11, at=T0 + 40 * DAY), T0 + 40 * DAY)
    assert [(t, p.version) for t, p in ps.history] == [(T0 + 28 * DAY, 10), (T0 + 40 * DAY, 11)]


# ---------------------------------------------------------------- keys from settings


def test_keys_from_settings_and_dev_mode(tmp_path: Any) -> None:
    from handtrace.core.signing import KeyConfigError

    prod = Settings(state_dir=tmp_path / "p")
    with pytest.raises(KeyConfigError, match="HANDTRACE_CONTROL__PUBLIC_KEYS"):
        verifier(prod)
    with pytest.raises(KeyConfigError, match="HANDTRACE_CONTROL__SIGNING_KEY"):
        issuer_signer(prod)
    assert not (tmp_path / "p" / "secrets").exists()
    dev = Settings(state_dir=tmp_path / "d", dev_mode=True)
    signer = issuer_signer(dev)
    key_file = tmp_path / "d" / "secrets" / "control-signing.key"
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert issuer_signer(dev).private_key.private_bytes_raw() == signer.private_key.private_bytes_raw()
    value = b"x"
    verifier(dev).verify(signer.headers("controls", b"k", value), "controls", b"k", value)
    priv, pub = generate_key_pair()
    explicit = Settings(state_dir=tmp_path / "e", control={"signing_key": priv, "signing_key_id": "2026a",
                                                           "public_keys": {"2026a": pub}})
    s = issuer_signer(explicit)
    assert s.signer_id == "cp:2026a" and public_key_b64(s.private_key) == pub
    assert verifier(explicit).verify(s.headers("policy", b"g", b"v"), "policy", b"g", b"v").signer == "2026a"
    with pytest.raises(ValueError, match="32 bytes"):
        Settings(control={"public_keys": {"k": base64.b64encode(b"short").decode()}})


# ---------------------------------------------------------------- the invariant


EMPLOYEES = ("emp-a", "emp-b")
DEVICE_OF = {"emp-a": DEV_A, "emp-b": DEV_B}


@st.composite
def genuine_records(draw: st.DrawFn) -> list[ControlMessage]:
    out = []
    t = T0
    for _ in range(draw(st.integers(1, 8))):
        t += draw(st.integers(1, 20)) * MIN
        emp = draw(st.sampled_from(EMPLOYEES))
        kind = draw(st.sampled_from(["pause_start", "pause_end", "exemption_grant", "exemption_revoke"]))
        start = t - draw(st.integers(0, 5)) * MIN
        rec = {"pause_start": pause(emp, start, draw(st.integers(1, 40))), "pause_end": pause_end(emp, start),
               "exemption_grant": grant(emp, start), "exemption_revoke": revoke(emp, start)}[kind]
        by_device = kind.startswith("pause") and draw(st.booleans())
        skew = draw(st.integers(-30, 30)) * S
        out.append(msg(rec, DEVICE_OF[emp] if by_device else CP, at=t, sent=t - skew))
    return out


def forgeries(m: ControlMessage, rec: dict[str, Any], variant: int) -> ControlMessage:
    """A forged or replayed variant of a genuine message, appended at the same broker time."""
    emp = rec["employee_id"]
    other = "emp-b" if emp == "emp-a" else "emp-a"
    if variant == 0:
        return replace(m, headers=())  # signature stripped
    if variant == 1:
        return msg(rec, Signer("cp:k1", ATTACKER), at=m.appended_us or T0)  # forged with the kid
    if variant == 2:
        return msg(rec, DEVICE_OF[emp], at=m.appended_us or T0) if rec["kind"].startswith("exemption") \
            else msg({**rec, "control_id": ids.uuid7_bytes()}, DEVICE_OF[other], at=m.appended_us or T0)
    if variant == 3:
        return replace(m, partition=(m.partition + 1) % PARTS)
    if variant == 4:
        return m  # an exact replay
    if variant == 5:
        return msg({**rec, "control_id": ids.uuid7_bytes()}, control_plane_signer("old", OLD_KEY),
                   at=m.appended_us or T0)
    return msg({**rec, "control_id": ids.uuid7_bytes(), "kind": "exemption_revoke"}, DEVICE_OF[emp],
               at=m.appended_us or T0)


def fold_all(messages: list[ControlMessage]) -> dict[str, EmployeeControls]:
    states: dict[str, EmployeeControls] = {}
    for m in messages:
        emp = (m.key or b"").decode()
        r = fold(states.get(emp, EmployeeControls()), m, AUTH, now_us=m.appended_us or T0)
        if r.applied:
            states[emp] = r.state
    return states


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(genuine=genuine_records(), data=st.data())
def test_forgeries_interleaved_with_genuine_records_change_nothing(genuine: list[ControlMessage],
                                                                  data: st.DataObject) -> None:
    mixed: list[ControlMessage] = []
    for m in genuine:
        rec = codec.decode_record(m.value, "control_event")
        before = data.draw(st.lists(st.integers(0, 6), max_size=3))
        after = data.draw(st.lists(st.integers(0, 6), max_size=3))
        mixed += [forgeries(m, rec, v) for v in before if v != 4]  # a replay cannot precede its original
        mixed.append(m)
        mixed += [forgeries(m, rec, v) for v in after]
    assert fold_all(mixed) == fold_all(genuine)
    assert any(s != EmployeeControls() for s in fold_all(genuine).values()) or not genuine


# ---------------------------------------------------------------- the agent's side


class _KafkaMsg:
    """The parts of a confluent_kafka.Message the agent's follower reads."""

    def __init__(self, m: ControlMessage, offset: int) -> None:
        self.m, self.off = m, offset

    def value(self) -> bytes:
        return self.m.value

    def key(self) -> bytes | None:
        return self.m.key

    def headers(self) -> list[tuple[str, bytes]]:
        return list(self.m.headers)

    def timestamp(self) -> tuple[int, int]:
        return (2, (self.m.appended_us or 0) // 1000)  # TIMESTAMP_LOG_APPEND_TIME, ms

    def offset(self) -> int:
        return self.off


def test_the_agent_honours_only_control_plane_grants_and_increasing_signed_policies(tmp_path: Any) -> None:
    from handtrace.agent.controlplane import ControlPlaneFollower

    f = ControlPlaneFollower({}, policy_topic="p", controls_topic="c", employee_id="emp-a",
                             state_path=tmp_path / "cp.json", verifier=VERIFIER)
    for i, m in enumerate([msg(grant("emp-a"), None), msg(grant("emp-a"), DEV_A),
                           msg(grant("emp-a"), Signer("cp:k1", ATTACKER)),
                           msg(grant("emp-a"), sent=T0 - 3 * DAY)]):
        f._on_control(_KafkaMsg(m, i))
    assert f.state.exempt_from_us is None
    assert f.state.refused == {"unsigned": 1, "device_not_enrolled": 1, "bad_signature": 1, "clock_offset": 1}
    genuine_revoke = msg(revoke("emp-a", T0 + MIN), at=T0 + MIN)
    f._on_control(_KafkaMsg(msg(grant("emp-a")), 10))
    f._on_control(_KafkaMsg(genuine_revoke, 11))
    f._on_control(_KafkaMsg(msg(grant("emp-a", T0 + 2 * MIN), at=T0 + 2 * MIN), 12))
    f._on_control(_KafkaMsg(replace(genuine_revoke, appended_us=T0 + 3 * MIN), 13))  # replayed revoke
    assert f.state.exempt_from_us == T0 + 2 * MIN and f.state.refused["replay"] == 1

    f._on_policy(_KafkaMsg(policy_msg(2**63 - 1, None), 0))
    f._on_policy(_KafkaMsg(policy_msg(2**63 - 1, Signer("cp:k1", ATTACKER)), 1))
    assert f.state.policy is None
    f._on_policy(_KafkaMsg(policy_msg(5), 2))
    f._on_policy(_KafkaMsg(policy_msg(5), 3))
    f._on_policy(_KafkaMsg(policy_msg(4), 4))
    assert f.policy is not None and f.policy.version == 5 and f.state.refused["stale_version"] == 2


def test_the_shipper_signs_controls_with_the_device_key_at_produce_time(tmp_path: Any) -> None:
    from handtrace.agent.shipper import Shipper
    from handtrace.agent.spool import Spool, SpoolEntry

    produced: list[tuple[str, bytes, bytes, list[tuple[str, bytes]]]] = []

    class Recorder:
        def __init__(self, conf: dict[str, Any]) -> None:
            self.cbs: list[Any] = []

        def produce(self, topic: str, value: bytes, key: bytes, headers: Any = None, on_delivery: Any = None) -> None:
            produced.append((topic, key, value, list(headers or [])))
            self.cbs.append(on_delivery)

        def flush(self, timeout: float = 0) -> int:
            cbs, self.cbs = self.cbs, []
            for cb in cbs:
                cb(None, None)
            return 0

        poll = flush

    spool = Spool(tmp_path, max_bytes=1 << 22, segment_bytes=64 << 10, fsync=False)
    value = codec.encode_record("control_event", pause("emp-a"))
    spool.append(SpoolEntry("controls", b"emp-a", value, 0))
    spool.append(SpoolEntry("events", b"emp-a", b"batch", 1))
    sh = Shipper(spool, {}, {"events": "ev", "controls": "ct"}, producer_factory=Recorder,  # type: ignore[arg-type]
                 stats_interval_s=None, control_signer=DEV_A)
    sh.ship_once(1.0)
    by_topic = {t: (k, v, h) for t, k, v, h in produced}
    k, v, h = by_topic["ct"]
    assert VERIFIER.verify(h, "controls", k, v, devices={"dev-a": DEV_A_KEY.public_key()}).signer == "dev-a"
    # Only controls are signed; every other message carries just the send-time stamp.
    assert [k for k, _ in by_topic["ev"][2]] == [HEADER_SENT_AT]
    spool.close()


def test_consumed_messages_carry_the_brokers_append_time_only_when_it_stamped_them() -> None:
    from types import SimpleNamespace

    from handtrace.stream.controls import message_of, message_of_confluent

    faust_msg = SimpleNamespace(value=b"v", key=b"k", partition=2, headers=[("h", b"x")], timestamp=1.5,
                                timestamp_type=1)
    assert message_of(faust_msg) == ControlMessage(b"v", b"k", 2, (("h", b"x"),), 1_500_000)
    aiokafka_record = SimpleNamespace(value=b"v", key=None, partition=0, headers=(), timestamp=1500,
                                      timestamp_type=1)
    assert message_of(aiokafka_record).appended_us == 1_500_000
    assert message_of(SimpleNamespace(**{**aiokafka_record.__dict__, "timestamp_type": 0})).appended_us is None

    class Confluent:
        def timestamp(self) -> tuple[int, int]:
            return (2, 1500)

        def value(self) -> bytes:
            return b"v"

        def key(self) -> bytes:
            return b"k"

        def headers(self) -> None:
            return None

        def partition(self) -> int:
            return 1

    assert message_of_confluent(Confluent()) == ControlMessage(b"v", b"k", 1, (), 1_500_000)
