"""The fleet exporter without I/O: the energy model, per-interval rates from cumulative
heartbeat counters (restarts, replays, resets), bounded labels, the online/silent census, the
metrics one heartbeat produces, and the simulator's heartbeats that feed it all."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY, CollectorRegistry

from handtrace.agent.simulator import SimulatedFleet
from handtrace.core import codec, ids
from handtrace.core.settings import FleetSettings, Settings
from handtrace.fleet import metrics as m
from handtrace.fleet.energy import EnergyModel
from handtrace.fleet.exporter import FleetCollector, FleetExporter
from handtrace.fleet.state import OTHER, FleetState, LabelGuard, normalise_os
from handtrace.fleet.store import COLUMNS, fleet_dsn, heartbeat_row, worst_offenders_sql

pytestmark = pytest.mark.timeout(60)

T0 = 1_800_000_000_000_000
MODEL = EnergyModel(cpu_watts_per_core=2.5, radio_wakeup_joules=0.6, radio_joules_per_mb=0.1,
                    battery_capacity_wh=55.0)


def hb(t_s: float = 0.0, **over: Any) -> dict[str, Any]:
    """A decoded-heartbeat-shaped record ``t_s`` seconds after T0."""
    base: dict[str, Any] = {
        "heartbeat_id": ids.uuid7_bytes(T0 // 1000 + int(t_s * 1000)), "employee_id": "emp-1",
        "device_id": "dev-1", "sent_at_us": T0 + int(t_s * 1e6), "agent_started_at_us": T0 - 10**9,
        "agent_version": "0.1.0", "os": "linux", "cohort": "eng", "state": "capturing",
        "battery_percent": 80.0, "charging": False, "cpu_seconds": 0.0, "rss_bytes": 100 << 20,
        "payload_bytes_sent": 0, "wire_bytes_sent": 0, "events_captured": 0, "events_sent": 0,
        "events_dropped": {}, "spool_depth_events": 0, "spool_depth_bytes": 0, "radio_wakeups": 0,
    }
    base.update(over)
    return base


# --- energy model -------------------------------------------------------------------------


def test_energy_model_worked_example() -> None:
    """1 % of a core for an hour, one wakeup a minute, 3.6 MB: the documented arithmetic."""
    j = MODEL.joules(cpu_seconds=36.0, radio_wakeups=60, wire_bytes=3_600_000)
    assert j == pytest.approx(2.5 * 36 + 0.6 * 60 + 0.1 * 3.6)
    # 126.36 J over an hour = 0.0351 W; of 55 Wh that is 0.0638 %/h
    assert MODEL.drain_percent_per_hour(j, 3600) == pytest.approx(j / 3600 / 55 * 100)


@given(cpu=st.floats(0, 1e4), wake=st.floats(0, 1e5), byts=st.floats(0, 1e10), secs=st.floats(1, 1e5))
@settings(max_examples=200, deadline=None)
def test_energy_model_is_monotone_and_scales(cpu: float, wake: float, byts: float, secs: float) -> None:
    """More work never costs less; the same work over twice the time drains half as fast."""
    j = MODEL.joules(cpu, wake, byts)
    assert j >= 0 and MODEL.joules(cpu + 1, wake, byts) > j
    d1, d2 = MODEL.drain_percent_per_hour(j, secs), MODEL.drain_percent_per_hour(j, 2 * secs)
    assert d1 >= 0 and math.isclose(d2 * 2, d1, rel_tol=1e-9, abs_tol=1e-12)


def test_energy_model_from_settings_and_rejects_empty_interval() -> None:
    fs = FleetSettings(cpu_watts_per_core=4.0, battery_capacity_wh=40.0)
    model = EnergyModel.from_settings(fs)
    assert (model.cpu_watts_per_core, model.battery_capacity_wh) == (4.0, 40.0)
    with pytest.raises(ValueError):
        model.drain_percent_per_hour(1.0, 0)


# --- labels ---------------------------------------------------------------------------------


def test_label_guard_caps_distinct_values() -> None:
    g = LabelGuard(2)
    assert g("a") == ("a", False) and g("b") == ("b", False)
    assert g("c") == (OTHER, True)
    assert g("a") == ("a", False)  # known values stay
    assert g("bad value with spaces") == (OTHER, True)
    assert g.seen == {"a", "b"}


@pytest.mark.parametrize(("raw", "want"), [("Linux", "linux"), ("darwin", "macos"), ("Windows", "windows"),
                                           ("synthetic", "synthetic"), ("BeOS", OTHER), ("", OTHER)])
def test_os_is_a_closed_set(raw: str, want: str) -> None:
    assert normalise_os(raw) == want


@given(st.lists(st.text(min_size=0, max_size=20), max_size=200))
@settings(max_examples=100, deadline=None)
def test_cardinality_is_bounded_whatever_agents_report(values: list[str]) -> None:
    """However many distinct versions and cohorts agents report, at most cap + 1 label values."""
    state = FleetState(MODEL, max_label_values=5)
    seen = set()
    for i, v in enumerate(values):
        labels, _ = state.labels_of(hb(i, agent_version=v, cohort=v, os=v))
        seen.add(labels)
    assert len({lb.agent_version for lb in seen}) <= 6
    assert len({lb.cohort for lb in seen}) <= 6
    assert {lb.os for lb in seen} <= {"linux", "macos", "windows", "synthetic", OTHER}


# --- intervals ------------------------------------------------------------------------------


def test_interval_rates_from_cumulative_counters() -> None:
    state = FleetState(MODEL)
    assert state.observe(hb(0), 100.0).outcome == "first"
    obs = state.observe(hb(60, cpu_seconds=0.6, wire_bytes_sent=50_000, payload_bytes_sent=120_000,
                           radio_wakeups=2, events_captured=1000, events_sent=900, battery_percent=79.8,
                           events_dropped={"coalesced": 100}), 160.0)
    assert obs.outcome == "applied"
    iv = obs.interval
    assert iv is not None
    assert iv.seconds == 60 and iv.cpu_percent == pytest.approx(1.0)
    assert iv.upload_bytes_per_hour == pytest.approx(50_000 * 60)
    assert iv.joules == pytest.approx(2.5 * 0.6 + 0.6 * 2 + 0.1 * 0.05)
    assert iv.agent_drain_percent_per_hour == pytest.approx(iv.joules / 60 / 55 * 100)
    assert iv.device_drain_percent_per_hour == pytest.approx(0.2 * 60)
    assert iv.dropped == {"coalesced": 100}
    assert (iv.events_captured, iv.events_sent) == (1000, 900)


def test_no_drain_unless_on_battery_at_both_ends() -> None:
    for first, second in [({"charging": True}, {}), ({}, {"charging": True}),
                          ({"battery_percent": None, "charging": None}, {"battery_percent": None, "charging": None})]:
        state = FleetState(MODEL)
        state.observe(hb(0, **first), 0)
        iv = state.observe(hb(60, cpu_seconds=1.0, **second), 60).interval
        assert iv is not None and iv.agent_drain_percent_per_hour is None and iv.device_drain_percent_per_hour is None
        assert iv.cpu_percent > 0  # the rest is still measured


def test_replays_restarts_and_resets() -> None:
    state = FleetState(MODEL)
    state.observe(hb(0), 0)
    state.observe(hb(60, cpu_seconds=1.0), 60)
    assert state.observe(hb(60, cpu_seconds=1.0), 61).outcome == "stale"     # duplicate
    assert state.observe(hb(30, cpu_seconds=0.5), 62).outcome == "stale"     # reordered
    restarted = hb(120, agent_started_at_us=T0 + 100 * 10**6, cpu_seconds=0.1)
    assert state.observe(restarted, 120).outcome == "restart"
    older_run = hb(200, cpu_seconds=9.0)  # from the run before the restart: history
    assert state.observe(older_run, 121).outcome == "stale"
    obs = state.observe(hb(180, agent_started_at_us=T0 + 100 * 10**6, cpu_seconds=0.7), 180)
    assert obs.outcome == "applied" and obs.interval is not None
    assert obs.interval.cpu_percent == pytest.approx(1.0)
    # counters going backwards without a new start time: a silent reset, a new baseline
    assert state.observe(hb(240, agent_started_at_us=T0 + 100 * 10**6, cpu_seconds=0.2), 240).outcome == "restart"


def test_census_online_silent_forgotten() -> None:
    state = FleetState(MODEL)
    now = T0 / 1e6
    state.observe(hb(0, device_id="a", state="paused"), now)
    state.observe(hb(0, device_id="b", state="exempt"), now - 500)
    state.observe(hb(0, device_id="c"), now - 10 * 86_400)
    state.observe(hb(-7200, device_id="d"), now)  # a replayed backlog: received now, sent long ago
    online, silent = state.census(now, online_window_s=180, forget_after_s=86_400, max_heartbeat_age_s=3600)
    assert online == {("linux", "0.1.0", "eng", "paused"): 1}
    assert silent == {("linux", "0.1.0", "eng"): 2}  # b (quiet) and d (stale heartbeat)
    assert "c" not in state.agents  # forgotten: memory stays bounded


# --- the exporter's metrics, without Kafka -------------------------------------------------


def _sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


def test_exporter_records_fleet_metrics() -> None:
    ex = FleetExporter(Settings(fleet={"max_label_values": 8}))
    lv = {"os": "linux", "agent_version": "9.9.9", "cohort": "metrics-test"}
    before = {n: _sample(n, lv) for n in ("handtrace_fleet_agent_upload_bytes_total",
                                          "handtrace_fleet_agent_battery_drain_percent_per_hour_count",
                                          "handtrace_fleet_agent_cpu_percent_count",
                                          "handtrace_fleet_agent_rss_bytes_count")}
    applied_before = _sample("handtrace_fleet_heartbeats_total", {"outcome": "applied"})
    invalid_before = _sample("handtrace_fleet_heartbeats_total", {"outcome": "invalid"})

    def enc(r: dict[str, Any]) -> bytes:
        return codec.encode_record("heartbeat", r)

    ex.handle(enc(hb(0, agent_version="9.9.9", cohort="metrics-test")), 1.0)
    ex.handle(enc(hb(60, agent_version="9.9.9", cohort="metrics-test", wire_bytes_sent=4096, cpu_seconds=0.3,
                     radio_wakeups=3)), 61.0)
    ex.handle(b"\x00garbage", 62.0)
    assert _sample("handtrace_fleet_agent_upload_bytes_total", lv) - before[
        "handtrace_fleet_agent_upload_bytes_total"] == 4096
    assert _sample("handtrace_fleet_agent_battery_drain_percent_per_hour_count", lv) - before[
        "handtrace_fleet_agent_battery_drain_percent_per_hour_count"] == 1
    for name, n in (("handtrace_fleet_agent_cpu_percent_count", 1), ("handtrace_fleet_agent_rss_bytes_count", 2)):
        assert _sample(name, lv) - before[name] == n
    assert _sample("handtrace_fleet_heartbeats_total", {"outcome": "applied"}) - applied_before == 1
    assert _sample("handtrace_fleet_heartbeats_total", {"outcome": "invalid"}) - invalid_before == 1


def test_collector_emits_declared_gauges_with_zeros() -> None:
    ex = FleetExporter(Settings())
    ex.handle(codec.encode_record("heartbeat", hb(0, sent_at_us=int(__import__("time").time() * 1e6))),
              __import__("time").time())
    ex.apply_policy(codec.encode_record("control_event", {
        "control_id": ids.uuid7_bytes(0), "kind": "policy_update", "employee_id": None, "occurred_at_us": T0,
        "actor": "t", "actor_role": "ops", "reason": "", "pause_starts_at_us": None, "pause_ends_at_us": None,
        "exemption_effective_at_us": None,
        "policy": {"version": 3, "allowed_apps": [], "allowed_domains": [],
                   "sampling": {"*": 0.5, "kind:pointer_move": 0.1}, "text_capture": {}}}))
    ex.lag = {"stream": 5}
    reg = CollectorRegistry()
    reg.register(FleetCollector(ex))
    names = {f.name for f in reg.collect()}
    assert names == {g.name for g in m.SCRAPE_GAUGES}
    online = {s.labels["state"]: s.value for f in reg.collect() if f.name == m.AGENTS_ONLINE.name for s in f.samples}
    assert online == {"capturing": 1, "paused": 0, "exempt": 0, "idle": 0, "stopped": 0}
    assert reg.get_sample_value(m.AGENTS_SILENT.name, {"os": "linux", "agent_version": "0.1.0", "cohort": "eng"}) == 0
    assert reg.get_sample_value(m.SAMPLING_RATE.name, {"selector": "kind:pointer_move"}) == 0.1
    assert reg.get_sample_value(m.POLICY_VERSION.name) == 3
    assert reg.get_sample_value(m.CONSUMER_LAG.name, {"consumer": "stream"}) == 5
    assert reg.get_sample_value(m.BATTERY_BUDGET.name) == 1.0


# --- the store ------------------------------------------------------------------------------


def test_heartbeat_row_matches_columns_and_drops_employee_id() -> None:
    state = FleetState(MODEL)
    state.observe(hb(0), 0)
    h = hb(60, cpu_seconds=0.6)
    row = heartbeat_row(h, state.observe(h, 60), 60.0)
    assert len(row) == len(COLUMNS)
    assert "emp-1" not in [v for v in row if isinstance(v, str)]
    assert row[COLUMNS.index("cpu_percent")] == pytest.approx(1.0)


def test_fleet_dsn_never_shares_an_embedded_dir(tmp_path: Any) -> None:
    s = Settings(state_dir=tmp_path)
    assert fleet_dsn(s) == f"chdb://{(tmp_path / 'clickhouse-fleet').resolve()}" != s.clickhouse_dsn()
    assert fleet_dsn(Settings(clickhouse={"dsn": "https://u:p@ch:8443"})) == "https://u:p@ch:8443"
    assert fleet_dsn(Settings(fleet={"clickhouse_dsn": "chdb:///x"})) == "chdb:///x"
    assert "LIMIT 7" in worst_offenders_sql("handtrace", 24, 7)


# --- the simulator's heartbeats ---------------------------------------------------------------


def test_simulated_heartbeats_vary_realistically() -> None:
    fleet = SimulatedFleet(Settings(), agents=60, seed=3)
    state = FleetState(MODEL)
    drains, cpus, states, batteries = [], [], set(), set()
    for step in range(6):
        at = T0 + step * 30_000_000
        for d in fleet.devices:
            for k in range(15):  # 15 batches of 2 s per 30 s interval, with real payloads
                t0 = at - 30_000_000 + k * 2_000_000
                fleet._batch(d, t0, t0 + 2_000_000)
            rec = codec.decode_record(fleet._heartbeat(d, at, T0 - 10**9), "heartbeat")
            rec["sent_at_us"], rec["agent_started_at_us"] = at, T0 - 10**9
            states.add(rec["state"])
            batteries.add(rec["battery_percent"] is None)
            obs = state.observe(rec, at / 1e6)
            if obs.interval is not None and obs.interval.seconds > 0:
                cpus.append(obs.interval.cpu_percent)
                assert obs.interval.wire_bytes > 0 and obs.interval.payload_bytes > obs.interval.wire_bytes / 2
                if obs.interval.agent_drain_percent_per_hour is not None:
                    drains.append(obs.interval.agent_drain_percent_per_hour)
    assert {"capturing", "exempt"} <= states and batteries == {True, False}
    assert len(set(round(c, 3) for c in cpus)) > 50 and 0.05 < sorted(cpus)[len(cpus) // 2] < 5
    assert drains and max(drains) > min(drains) > 0
