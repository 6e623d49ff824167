"""The stream rule of an erasure (`handtrace erase`, docs/adr/0015-erasure.md): once an authentic
erasure control is folded, no row of that employee is kept -- whatever the capture time, the
order the controls arrive in, replays of them, later revokes, or a worker restart between them
(the state goes through the changelog JSON) -- and nobody else's rows are touched."""

from __future__ import annotations

from typing import Any

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from handtrace.core import codec
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.controls import erasure_record
from handtrace.core.partitioning import partition_for_key
from handtrace.core.settings import Settings
from handtrace.stream.app import pseudonym_key, worker_pipeline
from handtrace.stream.controls import dumps, fold, loads
from handtrace.stream.pipeline import SourceMessage
from handtrace.stream.policy import EmployeeControls, Policy
from handtrace.stream.steps import BatchContext
from handtrace.stream.steps.exemption import ExemptionStep
from handtrace.stream.steps.pseudonymise import pseudonym
from tests.factories import TEST_POLICY, make_batch
from tests.unit.test_controls_auth import AUTH, DEV_A, MIN, T0, VERIFIER, grant, msg, pause, revoke

ERASED, OTHER = "emp-a", "emp-b"
PARTS = 3
POLICY = Policy(version=1, allowed_apps=frozenset(TEST_POLICY["allowed_apps"]),
                allowed_domains=tuple(TEST_POLICY["allowed_domains"]), text_capture={"*": "full"})
YEAR = 365 * 24 * 60 * MIN


def erasure(at: int = T0, erasure_id: str = "0190f0f0-aaaa-7bbb-8ccc-000000000001") -> dict[str, Any]:
    return erasure_record(ERASED, erasure_id, actor="dpo-1", reason="art. 17 request", at_us=at)


def frame(rows: list[tuple[str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        {"employee_id": [e for e, _ in rows], "captured_at_us": [t for _, t in rows], "n": list(range(len(rows)))},
        schema={"employee_id": pl.String, "captured_at_us": pl.Int64, "n": pl.Int64},
    ).with_columns(pl.col("captured_at_us").cast(pl.Datetime("us", "UTC")))


def others(at: int, kind: int) -> dict[str, Any]:
    return (grant(ERASED, at), revoke(ERASED, at), pause(ERASED, at))[kind]


@settings(max_examples=120, deadline=None)
@given(
    st.lists(st.tuples(st.integers(-5 * YEAR, 5 * YEAR), st.integers(0, 2)), max_size=6),
    st.integers(0, 6), st.integers(0, 3), st.lists(st.integers(0, 8), max_size=4),
    st.lists(st.tuples(st.sampled_from([ERASED, OTHER]), st.integers(-50 * YEAR, 50 * YEAR)), max_size=200),
    st.floats(0, 10),
)
def test_after_an_erasure_no_row_of_that_employee_is_kept(controls, position, replays, restarts, rows,
                                                          margin_s) -> None:  # type: ignore[no-untyped-def]
    # Other controls of the same person before and after it (revokes included), the erasure
    # replayed, the worker restarted (state through its changelog JSON) at random points.
    recs = [others(T0 + dt // 1000, k) for dt, k in controls]
    position = min(position, len(recs))
    er = erasure(T0)
    seq = [msg(r, at=T0 + i * MIN) for i, r in enumerate(recs)]
    erasure_msg = msg(er, at=T0 + position * MIN)
    seq.insert(position, erasure_msg)
    seq += [erasure_msg] * replays
    state = EmployeeControls()
    for i, m in enumerate(seq):
        if i in restarts:
            state = loads(dumps(state))
        state = fold(state, m, AUTH, now_us=T0 + len(seq) * MIN).state
    state = loads(dumps(state))
    assert state.erasures == (er["erasure_id"],)
    ctx = BatchContext(T0, controls={ERASED: state})
    rows = [(e, T0 + t) for e, t in rows]
    out = ExemptionStep(skew_margin_s=margin_s)(frame(rows), ctx)
    kept = out.frame.get_column("n").to_list()
    assert [rows[i][0] for i in kept] == [OTHER] * len(kept)
    assert len(kept) == sum(e == OTHER for e, _ in rows)
    assert out.dropped.get("erased", 0) == len(rows) - len(kept)


def test_only_the_control_plane_can_erase() -> None:
    """An unsigned or device-signed erasure changes nothing; an employee's own exemption request
    carrying an erasure id is not an erasure."""
    assert fold(EmployeeControls(), msg(erasure(), None), AUTH, now_us=T0).outcome == "unsigned"
    assert fold(EmployeeControls(), msg(erasure(), DEV_A), AUTH, now_us=T0).outcome == "not_permitted"
    request = {**erasure(), "kind": "exemption_request", "actor_role": "employee"}
    r = fold(EmployeeControls(), msg(request, DEV_A), AUTH, now_us=T0)
    assert r.applied and r.state.erasures == ()


def test_an_erasure_is_a_v2_control_and_a_v1_grant_reads_without_one() -> None:
    value = codec.encode_record("control_event", erasure())
    assert codec.writer_schema(value, "control_event").version == 2
    assert codec.decode_record(value, "control_event")["erasure_id"] == erasure()["erasure_id"]
    plain = codec.encode_record("control_event", grant(ERASED))
    assert codec.decode_record(plain, "control_event")["erasure_id"] is None


def test_state_written_before_erasures_existed_loads_without_any() -> None:
    assert loads('{"pauses": [], "exemptions": [[1, null, 0]], "seen": []}').erasures == ()


def test_the_agent_stays_off_and_the_api_shows_exempt_after_an_erasure_whatever_is_revoked(tmp_path: Any) -> None:
    """The other readers of the controls topic agree with the stream: a revoke after an erasure
    does not turn capture back on (agent) nor show the person as capturing (API state view)."""
    from handtrace.agent.controlplane import ControlPlaneFollower, ControlState
    from handtrace.control.api.services import fold_employee
    from tests.unit.test_controls_auth import _KafkaMsg

    f = ControlPlaneFollower({}, policy_topic="p", controls_topic="c", employee_id=ERASED,
                             state_path=tmp_path / "cp.json", verifier=VERIFIER)
    er = erasure(T0)
    records = [er, revoke(ERASED, T0 + MIN), grant(ERASED, T0 + 2 * MIN), revoke(ERASED, T0 + 3 * MIN)]
    for i, r in enumerate(records):
        f._on_control(_KafkaMsg(msg(r, at=T0 + i * MIN), i))
        assert f.state.exempt_from_us is not None, f"capture back on after {r['kind']}"
        assert fold_employee(records[: i + 1], ERASED, at_us=T0 + 4 * MIN)["mode"] == "exempt"
    assert ControlState.from_json(f.state.to_json()).erased_from_us == T0
    assert fold_employee([grant(ERASED), revoke(ERASED, T0 + MIN)], ERASED, at_us=T0 + 4 * MIN)["mode"] == "capturing"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from([ERASED, OTHER]), st.integers(-20 * 60, -1)), min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_the_worker_pipeline_stores_nothing_of_an_erased_employee(tmp_path_factory, batches, rnd) -> None:  # type: ignore[no-untyped-def]
    """The real step composition (worker_pipeline): batches of both people, captured up to 20 hours
    ago, in any order: no stored row carries the erased pseudonym, every event of the other person
    is judged as without an erasure, and what the erasure drops is counted as `erased`."""
    s = Settings(state_dir=tmp_path_factory.mktemp("s"), dev_mode=True, stream={"pseudonym_key": "k" * 40},
                 topics={"partitions": PARTS})
    pipe = worker_pipeline(s)
    now = now_us()
    msgs = []
    for i, (who, minutes) in enumerate(batches):
        t0 = now + minutes * MIN
        payload, _ids = make_batch(who, 30, seed=i, seq=i + 1, t0_us=t0)
        msgs.append(SourceMessage(payload, partition_for_key(who.encode(), PARTS), i, who.encode(), t0 + 30_000,
                                  ((HEADER_SENT_AT, str(t0 + 30_000).encode()),)))
    rnd.shuffle(msgs)
    erased = {ERASED: EmployeeControls(erasures=("e-1",))}
    out = pipe.process_many(msgs, now, policy=POLICY, controls=erased)
    without = pipe.process_many(msgs, now, policy=POLICY, controls={})
    gone = pseudonym(pseudonym_key(s), "employee", ERASED)
    keys = [k for t in out.rows.values() for k in t.column("employee_key").to_pylist()]
    assert gone not in keys
    kept_without = [k for t in without.rows.values() for k in t.column("employee_key").to_pylist()]
    assert sorted(keys) == sorted(k for k in kept_without if k != gone)
    assert out.dropped["erased"] == kept_without.count(gone)
    assert kept_without.count(gone) > 0 or all(who == OTHER for who, _ in batches)
