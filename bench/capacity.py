"""The capacity model (issue #15, item 5): docs/scaling.md, generated from measured numbers.

Every input the model divides by is a number measured in docs/BENCHMARKS.md, named by the heading of
the section it is in and written exactly as it appears there; tests/unit/test_capacity.py checks
that each is still there (so a re-measured number that changes breaks the test until the model is
updated) and that docs/scaling.md is what this module prints. What is not measured is listed apart
as an assumption, with its reason.

    python -m bench.capacity > docs/scaling.md
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FLEETS = (1_000, 10_000, 100_000)


@dataclass(frozen=True)
class Measured:
    """A number from docs/BENCHMARKS.md: ``text`` is how it is written under heading ``section``."""

    value: float
    unit: str
    section: str
    text: str
    what: str


@dataclass(frozen=True)
class Assumed:
    """A number the model needs that this machine cannot measure."""

    value: float
    unit: str
    why: str


MEASURED: dict[str, Measured] = {
    "events_per_laptop_hour": Measured(
        26_516, "events/hour", "Agent footprint (issue #3)", "26,516",
        "events one laptop sends per hour of the synthetic user (policy applied on the laptop)"),
    "wire_mb_per_laptop_hour": Measured(
        0.48, "MB/hour", "Agent footprint (issue #3)", "0.48",
        "what one laptop uploads per hour without screenshots (librdkafka tx_bytes)"),
    "wire_mb_per_laptop_hour_shots": Measured(
        1.11, "MB/hour", "Agent footprint (issue #3)", "1.11",
        "the same with event-driven screenshots (metadata only is stored for passive capture)"),
    "stored_share_demo_kept": Measured(
        629_764, "events", "Demo end to end (issues #2, #4)", "629,764",
        "events the demo stored out of 715,317 produced (the rest dropped by policy)"),
    "stored_share_demo_produced": Measured(
        715_317, "events", "Demo end to end (issues #2, #4)", "715,317",
        "events the demo produced"),
    "worker_events_cpu_s": Measured(
        61_306, "events/CPU-s", "Fleet load (issue #15)", "61,306",
        "stored events per CPU-second of one stream worker at a paced steady fleet rate (6,000 "
        "laptops, quiet machine; a backlog drains ~4x more efficiently)"),
    "sink_events_cpu_s": Measured(
        72_102, "events/CPU-s", "Fleet load (issue #15)", "72,102",
        "stored events per CPU-second of one sink process with its embedded ClickHouse, same run"),
    "insert_rows_s": Measured(
        201_089, "rows/s", "Warehouse at 100 M events (issue #14, part X)", "201,089",
        "the sink's own Arrow insert path into one ClickHouse engine holding 100 M events"),
    "bytes_on_disk_per_event": Measured(
        17.7, "B/event", "Warehouse at 100 M events (issue #14, part X)", "17.7",
        "`events` on disk at 100 M events with the codecs of ADR 0017 (system.parts)"),
    "fleet_laptops_one_machine": Measured(
        6_000, "laptops", "Fleet load (issue #15)", "6,000",
        "simulated laptops this 2-core machine held 10 minutes with bounded lag, everything "
        "co-located (quiet machine; 8,000 held a 90-s step but not the 10-minute confirm)"),
}

ASSUMED: dict[str, Assumed] = {
    "hours_per_day": Assumed(8, "hours", "a working day of capture; capture stops outside work (pause, lid closed)"),
    "peak_factor": Assumed(2.0, "x", "everyone at work the same hours, plus agents catching up after "
                                     "an outage (spools replay at up to the shipping rate)"),
    "headroom": Assumed(0.5, "of capacity", "run every tier at half of what was measured: the measuring machine "
                                             "was shared, and a rebalance or a replay needs the other half"),
    "kafka_replication": Assumed(3, "copies", "the usual production setting (min.insync.replicas 2)"),
    "topics_per_event": Assumed(2, "topics", "an event is held twice in Kafka: the raw topic and the accepted topic"),
    "raw_topic_days": Assumed(3, "days", "`stream.events_retention_hours` default 72"),
    "broker_disk_tb": Assumed(4.0, "TB", "usable log disk per broker; brokers are sized by disk here, "
                                         "their network (tens of MB/s) is far from the ingress below"),
    "clickhouse_replicas": Assumed(2, "copies", "ReplicatedMergeTree, two replicas per shard"),
    "events_days": Assumed(90, "days", "`warehouse.retention.events_days` default"),
    "shard_disk_tb": Assumed(10.0, "TB", "usable disk per ClickHouse replica"),
}


def _m(name: str) -> float:
    return MEASURED[name].value


def _a(name: str) -> float:
    return ASSUMED[name].value


@dataclass(frozen=True)
class Plan:
    laptops: int
    events_s_avg: float
    events_s_peak: float
    stored_share: float
    workers: int
    partitions: int
    sinks: int
    ingress_mb_s: float
    kafka_tb: float
    brokers: int
    stored_per_day: float
    clickhouse_tb_day: float
    clickhouse_tb: float
    shards: int


def plan(laptops: int) -> Plan:
    """The figures for ``laptops``, each from the inputs above."""
    avg = laptops * _m("events_per_laptop_hour") / 3600.0
    peak = avg * _a("peak_factor")
    share = _m("stored_share_demo_kept") / _m("stored_share_demo_produced")
    stored_peak = peak * share
    workers = max(1, math.ceil(stored_peak / (_m("worker_events_cpu_s") * _a("headroom"))))
    partitions = max(6, 2 * workers)  # room to add workers without repartitioning
    sinks = max(1, math.ceil(stored_peak / (_m("sink_events_cpu_s") * _a("headroom"))))
    mb_day = laptops * _m("wire_mb_per_laptop_hour_shots") * _a("hours_per_day")
    ingress = mb_day / (_a("hours_per_day") * 3600.0) * _a("peak_factor")
    kafka_tb = mb_day * _a("raw_topic_days") * _a("kafka_replication") * _a("topics_per_event") / 1e6
    brokers = max(3, math.ceil(kafka_tb / _a("broker_disk_tb")))
    stored_day = laptops * _m("events_per_laptop_hour") * _a("hours_per_day") * share
    ch_day = stored_day * _m("bytes_on_disk_per_event") / 1e12
    ch_tb = ch_day * _a("events_days") * _a("clickhouse_replicas")
    shards = max(1, math.ceil(ch_tb / _a("clickhouse_replicas") / _a("shard_disk_tb")),
                 math.ceil(stored_peak / (_m("insert_rows_s") * _a("headroom"))))
    return Plan(laptops, avg, peak, share, workers, partitions, sinks, ingress, kafka_tb, brokers,
                stored_day, ch_day, ch_tb, shards)


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def render() -> str:
    plans = [plan(n) for n in FLEETS]
    head = "| | " + " | ".join(f"{p.laptops:,} laptops" for p in plans) + " |"
    rule = "|---|" + "---:|" * len(plans)

    def row(label: str, f: object) -> str:
        return f"| {label} | " + " | ".join(f(p) for p in plans) + " |"  # type: ignore[operator]

    out = [
        "# Capacity model",
        "",
        "<!-- generated by `python -m bench.capacity > docs/scaling.md`; tests/unit/test_capacity.py "
        "keeps it current -->",
        "",
        "How many partitions, brokers, stream workers, sink processes and ClickHouse shards a fleet of",
        "1k, 10k and 100k laptops needs, and how much it stores a day. Every figure is computed from",
        "the measured inputs below (each cited by its section of docs/BENCHMARKS.md, where a test checks",
        "it is still written) and the assumptions listed after them. Measured on one 2-core machine with",
        "everything co-located, so per-process rates are floors.",
        "",
        head, rule,
        row("events/s, working-hours average", lambda p: _n(p.events_s_avg)),
        row("events/s, peak (x peak factor)", lambda p: _n(p.events_s_peak)),
        row("stream workers, one core each (stored peak / (worker events per CPU-s x headroom))",
            lambda p: str(p.workers)),
        row("partitions of each data topic (2 x workers, at least 6)", lambda p: str(p.partitions)),
        row("sink processes, one core each (stored peak / (sink events per CPU-s x headroom))", lambda p: str(p.sinks)),
        row("Kafka ingress at peak, MB/s", lambda p: _n(p.ingress_mb_s, 2)),
        row("Kafka log on disk, TB (MB/day x retention x replication x topics)", lambda p: _n(p.kafka_tb, 2)),
        row("brokers (disk, at least 3)", lambda p: str(p.brokers)),
        row("events stored per day", lambda p: _n(p.stored_per_day)),
        row("ClickHouse TB per day (one copy)", lambda p: _n(p.clickhouse_tb_day, 3)),
        row("ClickHouse TB held (retention x replicas)", lambda p: _n(p.clickhouse_tb, 2)),
        row("ClickHouse shards (by disk, or by stored peak / (insert rows/s x headroom))", lambda p: str(p.shards)),
        "",
        "Reading it:",
        "",
        "- Workers and sinks are sized from the **steady-state** cost per event of the fleet load test",
        "  (a paced fleet fills smaller micro-batches), not from the backlog-drain rate of the stream",
        "  scale-out benchmark (~4x cheaper per event): a fleet is steady most of the day,",
        "  and the headroom covers catching up. As a fleet's rate per worker rises, micro-batches fill",
        "  and the cost per event falls, so these counts are upper bounds; measure on the target hardware",
        "  (`python -m bench.fleet_load`) before buying for 100k laptops.",
        "- One worker or sink is one Python process using up to one core: put at most one per core.",
        "  Partitions bound the workers that can share a topic; the chart (helm/) refuses more replicas",
        "  than partitions.",
        "- The one measured machine (2 cores, broker, worker, sink and the fleet generator co-located)",
        f"  held {MEASURED['fleet_laptops_one_machine'].text} laptops for 10 minutes: the model's counts",
        "  carry a 0.5 headroom and a 2x peak on top of that measured cost.",
        "- ClickHouse storage is for `events` only (demonstration frames are in the object store and",
        "  are sized by how many demonstrations people record, not by the fleet).",
        "",
        "## Measured inputs (docs/BENCHMARKS.md)",
        "",
        "| input | value | section | what it is |",
        "|---|---:|---|---|",
    ]
    for name, m in MEASURED.items():
        out.append(f"| `{name}` | {m.text} {m.unit} | {m.section} | {m.what} |")
    out += ["", "## Assumptions (not measurable here)", "", "| assumption | value | why |", "|---|---:|---|"]
    for name, a in ASSUMED.items():
        out.append(f"| `{name}` | {a.value:g} {a.unit} | {a.why} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
