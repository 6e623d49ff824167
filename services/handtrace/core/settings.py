"""Typed, validated settings for every service.

One frozen model, read from the environment with prefix ``HANDTRACE_`` and nested delimiter
``__`` (``HANDTRACE_KAFKA__BOOTSTRAP_SERVERS``), so deployment environments map one-to-one onto
these fields (tests/unit/test_deploy_consistency.py keeps docker-compose in step; the
reference in docs/configuration.md is generated from this file).
"""

from __future__ import annotations

import json
import os
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def default_state_dir() -> Path:
    """Where local state (broker cache, embedded ClickHouse, spool) lives by default."""
    return Path.cwd() / ".handtrace"


class SecurityProtocol(StrEnum):
    PLAINTEXT = "PLAINTEXT"
    SSL = "SSL"
    SASL_PLAINTEXT = "SASL_PLAINTEXT"
    SASL_SSL = "SASL_SSL"


class SaslMechanism(StrEnum):
    PLAIN = "PLAIN"
    SCRAM_SHA_256 = "SCRAM-SHA-256"
    SCRAM_SHA_512 = "SCRAM-SHA-512"


class KafkaSettings(BaseModel):
    """Where the Kafka cluster is and how to reach it."""

    model_config = ConfigDict(frozen=True)

    bootstrap_servers: str | None = Field(
        default=None,
        description="host:port list of an existing cluster. Unset: the project's own local broker "
        "(deploy/kafka, started by `handtrace kafka up` or the demo) is used.",
    )
    security_protocol: SecurityProtocol = Field(
        default=SecurityProtocol.PLAINTEXT, description="How clients talk to the brokers."
    )
    sasl_mechanism: SaslMechanism | None = Field(default=None, description="SASL mechanism (with SASL_*).")
    sasl_username: str | None = Field(default=None, description="SASL user (with SASL_*).")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password (with SASL_*).")
    ssl_cafile: Path | None = Field(default=None, description="CA bundle that signed the brokers.")
    ssl_certfile: Path | None = Field(default=None, description="Client certificate (mTLS).")
    ssl_keyfile: Path | None = Field(default=None, description="Client key (mTLS).")
    local_port: int = Field(
        default=19092, ge=1024, le=65535, description="Client port of the local dev broker."
    )
    local_controller_port: int = Field(
        default=19093, ge=1024, le=65535, description="KRaft controller port of the local dev broker."
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _blank_is_unset(cls, v: str | None) -> str | None:
        return v.strip() or None if v is not None else None

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol in (SecurityProtocol.SASL_PLAINTEXT, SecurityProtocol.SASL_SSL):
            missing = [
                name
                for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(
                    f"security_protocol={self.security_protocol} needs {', '.join(missing)}"
                )
        return self

    @property
    def uses_local_broker(self) -> bool:
        """True when no external cluster is configured."""
        return self.bootstrap_servers is None

    def bootstrap(self) -> str:
        """The bootstrap list every client uses."""
        return self.bootstrap_servers or f"127.0.0.1:{self.local_port}"

    def librdkafka(self) -> dict[str, Any]:
        """Connection options for confluent-kafka (librdkafka property names); the one
        translation shared with aiokafka and Faust is core/kafka_security.py."""
        from handtrace.core.kafka_security import librdkafka_config

        return librdkafka_config(self)


class TopicSettings(BaseModel):
    """Topic names and sizes. Event and control topics must have equal partition counts so one
    employee's events and controls land in the same partition number (co-partitioning)."""

    model_config = ConfigDict(frozen=True)

    prefix: str = Field(default="handtrace", pattern=r"^[a-zA-Z0-9._-]+$", description="Prefix of every topic name.")
    partitions: int = Field(default=6, ge=1, le=1024, description="Partitions of every keyed topic.")
    replication_factor: int = Field(default=1, ge=1, le=5, description="Replicas per partition (3 in production).")
    events_retention_hours: int = Field(default=72, ge=1, description="Raw events topic retention.")
    max_message_bytes: int = Field(
        default=4 * 1024 * 1024, ge=64 * 1024, description="Largest accepted batch message."
    )


Sharding = Literal["person", "row"]


class ClickHouseSettings(BaseModel):
    """Where events are stored."""

    model_config = ConfigDict(frozen=True)

    dsn: str | None = Field(
        default=None,
        description="`chdb:///path` (embedded engine, default <state_dir>/clickhouse) or "
        "`http(s)://user:pass@host:port` for a ClickHouse server.",
    )
    database: str = Field(
        default="handtrace", pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$",
        description="Database holding the handtrace tables (a DSN path does not change it).",
    )
    cluster: str | None = Field(
        default=None, pattern=r"^[a-zA-Z_][a-zA-Z0-9_.-]*$",
        description="ClickHouse cluster (a `remote_servers` entry of the servers) to create the tables "
        "on: migrations run `ON CLUSTER`, each table becomes a Replicated* `<table>_local` plus a "
        "Distributed `<table>` that reads and writes use (docs/cluster.md, ADR 0020). Empty: one "
        "node. A server DSN only (the embedded engine has no cluster).",
    )
    sharding: Sharding = Field(
        default="person", description="Cluster mode: how the Distributed tables spread rows over "
        "shards. `person`: tables with an `employee_key` by `cityHash64(employee_key)` (a person's "
        "rows on one shard: erasure and per-person rollups touch one shard), others by their sorting "
        "key; `row`: every table by a hash of its sorting key (even spread, a heavy user on every "
        "shard). Both deterministic, which the sink's exactly-once inserts need.",
    )
    zookeeper_path: str = Field(
        default="/clickhouse/tables/{shard}/{database}/{table}",
        description="Cluster mode: Keeper path of each Replicated* table (`{shard}` and `{replica}` are "
        "the servers' macros; `{database}`/`{table}` are filled in by ClickHouse).",
    )

    @field_validator("dsn")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("chdb://", "http://", "https://")):
            raise ValueError("dsn must start with chdb://, http:// or https://")
        return v

    @model_validator(mode="after")
    def _cluster_needs_server(self) -> ClickHouseSettings:
        if self.cluster and (self.dsn is None or self.dsn.startswith("chdb://")):
            raise ValueError("clickhouse.cluster needs a ClickHouse server DSN (http(s)://...): "
                             "the embedded engine has no cluster")
        return self


class SinkSettings(BaseModel):
    """Flush policy of the ClickHouse sink."""

    model_config = ConfigDict(frozen=True)

    flush_rows: int = Field(default=50_000, ge=1, description="Flush a partition at this many rows.")
    flush_interval_s: float = Field(default=1.0, gt=0, le=60, description="...or this often.")
    group_id: str = Field(default="handtrace-sink", description="Consumer group of the sink.")
    audit_group_id: str = Field(
        default="handtrace-sink-audit", description="Consumer group of the sink's audit writer "
        "(the control-plane audit topic -> ClickHouse `control_audit`; offsets are committed only "
        "after ClickHouse has the rows).",
    )
    audit_batch_messages: int = Field(
        default=500, ge=1, le=100_000, description="Audit entries taken per poll and inserted together.",
    )
    session_timeout_s: float = Field(
        default=10.0, ge=6, le=300, description="Kafka group session timeout: how soon a dead "
        "sink's partitions move to a live one (its last flush is then replayed, exactly once).",
    )
    poll_messages: int = Field(default=500, ge=1, le=100_000, description="Messages taken per consumer poll.")
    partitions: list[int] = Field(
        default_factory=list, description="Partitions of the accepted-rows topic this sink owns, "
        "assigned statically instead of balanced by the consumer group. Needed when several sinks "
        "write separate embedded data dirs: each dir holds its partitions' exactly-once ledger, "
        "so a partition must never move to another dir (every sink of the group then lists its "
        "own, disjoint partitions; together all of them). Empty: the group balances partitions "
        "(one sink, or any number on a shared ClickHouse server). A partition the topic does not "
        "have stops the sink at start (fails closed). ADR 0020.",
    )
    metrics_port: int = Field(default=9102, ge=0, le=65535, description="Prometheus /metrics port (0: off).")
    max_partitions_per_batch: int = Field(
        default=3, ge=1, le=100, description="An agent batch (one source message) whose rows span "
        "more ClickHouse partitions (months of capture time) than this is not stored: its rows go "
        "to the `events.rejected` topic with reason TOO_MANY_PARTITIONS (fails closed; the stream "
        "already bounds capture times, this guards the sink against anything else that writes "
        "its topic). Flushes are also split so that no insert exceeds the server's "
        "`max_partitions_per_insert_block`.",
    )
    unknown_error_retries: int = Field(
        default=3, ge=0, le=100, description="An insert failing with an error the sink cannot "
        "classify is retried this many times; if it still fails while ClickHouse answers a "
        "trivial query, its rows are treated as bad data (split, the offending rows "
        "dead-lettered) so that nothing stalls the sink for good. Outages (connection, timeout, "
        "overload, read-only) are retried without limit and never drop rows.",
    )
    failed_inserts_per_batch: int = Field(
        default=32, ge=1, le=10_000, description="Refused inserts spent isolating the bad rows of "
        "one source batch by halving; once spent, a refused piece of that batch is dead-lettered "
        "whole (bounds the work a batch of all-bad rows causes; other batches are unaffected).",
    )
    stop_grace_s: float = Field(
        default=8.0, ge=1, le=60, description="After SIGTERM/SIGINT the sink process exits within "
        "this many seconds even if ClickHouse or the broker does not answer: an unfinished flush "
        "is not committed and is replayed, exactly once, on the next start.",
    )

    @field_validator("partitions")
    @classmethod
    def _distinct_partitions(cls, v: list[int]) -> list[int]:
        if any(p < 0 for p in v) or len(set(v)) != len(v):
            raise ValueError("sink.partitions must be distinct partition numbers >= 0")
        return sorted(v)


class StreamSettings(BaseModel):
    """Faust worker settings."""

    model_config = ConfigDict(frozen=True)

    app_id: str = Field(default="handtrace-stream", description="Faust app id (also its consumer group).")
    max_rows_per_message: int = Field(
        default=20_000, ge=100, le=1_000_000, description="Accepted rows are published in messages "
        "of at most about this many rows (cut between source batches), well under the size limit.",
    )
    max_batch_events: int = Field(
        default=50_000, ge=1, description="Batches with more events are dead-lettered (oversized)."
    )
    micro_batch_messages: int = Field(
        default=500, ge=1, le=100_000,
        description="Messages decoded and enforced together (one columnar pass).",
    )
    micro_batch_wait_s: float = Field(
        default=0.05, gt=0, le=5, description="Longest wait to fill a micro-batch (adds latency)."
    )
    metrics_port: int = Field(default=9101, ge=0, le=65535, description="Prometheus /metrics port (0: off).")
    pseudonym_key: SecretStr | None = Field(
        default=None,
        min_length=32,
        description="HMAC key that turns employee and device ids into pseudonyms; keep it stable, "
        "or every pseudonym changes. Unset: the worker refuses to start (fails closed), except in "
        "dev_mode, where a key is generated once under <state_dir>/secrets.",
    )
    session_timeout_s: float = Field(
        default=10.0, ge=6, le=300, description="Kafka group session timeout: how soon a dead "
        "worker's partitions move to a live one.",
    )
    episode_s: int = Field(
        default=600, ge=10, le=86_400, description="Sampling unit: an employee-device episode of "
        "this many seconds is kept or dropped whole, so stored trajectories stay contiguous.",
    )
    pointer_max_hz: float | None = Field(
        default=None, gt=0, le=1000, description="Keep at most this many pointer moves per second "
        "per device (stream-side decimation); unset: off (agents coalesce at the source).",
    )
    clock_skew_margin_s: float = Field(
        default=2.0, ge=0, le=300, description="Pause windows and exemptions are widened by this "
        "on both sides (agent clock drift); widening only ever drops more (fails closed).",
    )
    max_clock_offset_s: float = Field(
        default=86_400.0, ge=1, le=7 * 86_400, description="Largest difference between a sender's "
        "clock (its `ht-sent-at` header) and the broker's append time that the stream corrects "
        "for; a batch or control whose sender's clock is further off cannot be placed in time and "
        "is rejected (fails closed).",
    )
    max_event_age_s: float = Field(
        default=7 * 86_400.0, ge=3600, le=30 * 86_400, description="Events captured longer ago "
        "than this (on the stream's clock, after clock correction) are rejected as invalid_time: "
        "bounds how far back one batch can reach (and how many ClickHouse partitions one insert "
        "touches); keep it below the raw topic's retention.",
    )
    max_future_skew_s: float = Field(
        default=300.0, ge=0, description="Events captured later than the batch's sent time plus "
        "this are rejected as invalid (agent clock error).",
    )
    max_distinct_values_per_batch: int = Field(
        default=2000, ge=10, description="A batch with more distinct window titles or URLs is "
        "dropped whole (too_many_distinct_values): bounds the per-value work a hostile agent can "
        "cause; fails closed.",
    )
    max_field_chars: int = Field(
        default=2048, ge=64, le=65_536, description="Free strings of an event (window title, URL, "
        "text, app id) longer than this many characters are truncated in validation and counted "
        "(handtrace_stream_fields_truncated_total): bounds every accepted message's size, so no "
        "agent-sent value can make a send fail.",
    )
    stop_deadline_s: float = Field(
        default=8.0, ge=1, le=120, description="After SIGTERM/SIGINT the worker stops gracefully "
        "within this many seconds, else exits at once (e.g. broker unreachable); either way only "
        "offsets whose sends were confirmed are ever committed, so a hard stop replays, never loses.",
    )
    log_level: Literal["crit", "error", "warn", "info", "debug"] = Field(
        default="warn", description="Faust worker log level. Faust, aiokafka and mode never log "
        "below info (their debug lines carry message keys and values: raw ids).",
    )


class FleetSettings(BaseModel):
    """Fleet exporter: agent heartbeats -> Prometheus fleet-impact metrics."""

    model_config = ConfigDict(frozen=True)

    group_id: str = Field(default="handtrace-fleet", description="Consumer group of the fleet exporter.")
    metrics_port: int = Field(default=9103, ge=0, le=65535, description="Prometheus /metrics port (0: off).")
    clickhouse_dsn: str | None = Field(
        default=None,
        description="Where heartbeats are stored (table `heartbeats`, for worst-offender queries). "
        "Unset: the shared HANDTRACE_CLICKHOUSE__DSN when that is a server; with the embedded engine "
        "an embedded dir of its own, <state_dir>/clickhouse-fleet (one process per embedded dir; "
        "the sink owns the default one). See docs/adr/0006-fleet-heartbeat-store.md.",
    )
    store_heartbeats: bool = Field(
        default=True, description="Write heartbeats to ClickHouse (off: Prometheus metrics only)."
    )
    flush_interval_s: float = Field(
        default=2.0, gt=0, le=60, description="Heartbeat rows are inserted this often; Kafka offsets "
        "are committed only after the insert (at-least-once; the table deduplicates replays).",
    )
    online_window_s: float = Field(
        default=180.0, ge=5, le=86_400, description="An agent is online while its last heartbeat "
        "arrived within this many seconds (exporter clock); keep it >= 2 heartbeat intervals.",
    )
    forget_after_s: float = Field(
        default=86_400.0, ge=60, description="Agents silent for longer are forgotten (no longer "
        "counted as silent); bounds the exporter's memory to the active fleet.",
    )
    max_heartbeat_age_s: float = Field(
        default=3600.0, ge=10, description="A heartbeat sent (agent clock) longer ago than this is "
        "history, not evidence that the agent is online (a replayed backlog marks no one online).",
    )
    max_label_values: int = Field(
        default=32, ge=1, le=1000, description="Distinct values kept per label (os, agent_version, "
        "cohort, drop reason); later ones become `other` (bounded cardinality, counted).",
    )
    lag_interval_s: float = Field(
        default=10.0, ge=0.5, le=600, description="How often the consumer lag of the stream, sink and "
        "fleet groups is read from the brokers.",
    )
    cpu_watts_per_core: float = Field(
        default=2.5, gt=0, le=50, description="Energy model: extra package power (W) while the agent "
        "keeps one core busy, i.e. joules per agent CPU-second.",
    )
    radio_wakeup_joules: float = Field(
        default=0.6, ge=0, le=100, description="Energy model: joules per network send burst (radio "
        "wake-up plus tail; Wi-Fi ~0.3-1 J, LTE ~5-10 J).",
    )
    radio_joules_per_mb: float = Field(
        default=0.1, ge=0, le=100, description="Energy model: joules per MB on the wire (transfer).",
    )
    battery_capacity_wh: float = Field(
        default=55.0, gt=0, le=500, description="Energy model: battery capacity (Wh) that drain "
        "percentages refer to (heartbeats carry no capacity; a typical fleet laptop).",
    )
    battery_budget_percent_per_hour: float = Field(
        default=1.0, gt=0, le=100, description="Budget: p95 over the fleet of battery drain "
        "attributable to the agent (exported as a gauge; the alert compares against it).",
    )
    upload_budget_bytes_per_hour: float = Field(
        default=8_000_000, gt=0, description="Budget: p95 over the fleet of bytes uploaded per "
        "agent-hour (exported as a gauge; the alert compares against it).",
    )

    @field_validator("clickhouse_dsn")
    @classmethod
    def _known_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("chdb://", "http://", "https://")):
            raise ValueError("dsn must start with chdb://, http:// or https://")
        return v


class ControlSettings(BaseModel):
    """Authentic controls (docs/adr/0009-authentic-controls.md): the control plane signs what
    only it may issue (grants, revokes, policies, device enrollments); workers and agents hold
    public keys only."""

    model_config = ConfigDict(frozen=True)

    signing_key: SecretStr | None = Field(
        default=None, description="The control plane's Ed25519 private key (base64 of its 32 raw "
        "bytes; `handtrace control keygen` makes one). Only the control plane (the `handtrace "
        "control` CLI) holds it. Unset outside dev_mode: the CLI refuses to issue controls.",
    )
    signing_key_id: str = Field(
        default="cp1", pattern=r"^[A-Za-z0-9._-]{1,64}$", description="Key id of signing_key, sent "
        "with every signature (`ht-signer: cp:<id>`); verifiers look it up in public_keys.",
    )
    public_keys: dict[str, str] = Field(
        default_factory=dict, description="Control-plane public keys by key id (JSON object, "
        "base64 Ed25519 public keys), held by stream workers and agents. Several at once for "
        "rotation. A record signed by a key id not listed here is refused. Empty outside dev_mode: "
        "workers and control-plane-following agents refuse to start (fails closed).",
    )
    retired_key_ids: list[str] = Field(
        default_factory=list, description="Key ids no longer honoured, even if still listed in "
        "public_keys (fails closed): re-publish the policy and re-enroll devices with the new key "
        "before retiring the old one.",
    )

    @field_validator("public_keys")
    @classmethod
    def _valid_keys(cls, v: dict[str, str]) -> dict[str, str]:
        import base64
        import binascii
        import re

        for kid, key in v.items():
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", kid):
                raise ValueError(f"key id {kid!r}: use letters, digits, '.', '_' or '-'")
            try:
                raw = base64.b64decode(key.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"public key {kid!r} is not base64") from None
            if len(raw) != 32:
                raise ValueError(f"public key {kid!r} must be 32 bytes (Ed25519), got {len(raw)}")
        return v


JwsAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"]
"""Asymmetric JWS algorithms only: `none` and HS* are not in the set."""


def _default_algorithms() -> list[JwsAlgorithm]:
    return ["RS256", "ES256", "EdDSA"]


class ApiSettings(BaseModel):
    """The control-plane HTTP API and portal (docs/design/control-plane.md, ADR 0013): the only
    issuer of authoritative controls; callers authenticate with OIDC bearer tokens."""

    model_config = ConfigDict(frozen=True)

    host: str = Field(default="127.0.0.1", description="Address the API binds to.")
    port: int = Field(default=8080, ge=1, le=65535, description="Port the API listens on.")
    jwks_file: Path | None = Field(
        default=None, description="JWKS JSON file with the identity provider's public keys. With "
        "neither jwks_file nor jwks_url (and no dev_login) the API refuses to start (fails closed).",
    )
    jwks_url: str | None = Field(
        default=None, description="URL of the identity provider's JWKS (fetched, cached jwks_cache_s). "
        "An unreachable JWKS refuses every token (fails closed).",
    )
    jwks_cache_s: float = Field(default=300.0, ge=1, le=86_400, description="How long keys fetched "
                                "from jwks_url are reused before fetching again.")
    issuer: str | None = Field(
        default=None, description="Required `iss` of every token: tokens of another issuer are refused. "
        "Unset outside dev_login: the API refuses to start (fails closed).",
    )
    audience: str = Field(default="handtrace", min_length=1, description="Required `aud` of every "
                          "token: tokens for another audience are refused.")
    algorithms: list[JwsAlgorithm] = Field(
        default_factory=_default_algorithms, min_length=1,
        description="Accepted JWS algorithms (asymmetric only: `none` and HS* cannot be configured, "
        "so a public key can never serve as an HMAC secret).",
    )
    roles_claim: str = Field(default="roles", min_length=1, description="Claim holding the caller's "
                             "roles (a list of strings); unknown roles are ignored, none means "
                             "employee of themself only.")
    employee_claim: str = Field(default="employee_id", min_length=1, description="Claim holding the "
                                "caller's employee id (else `sub`).")
    dev_login: bool = Field(
        default=False, description="`/login/dev` mints local tokens for any role (development only). "
        "Allowed only with dev_mode=true AND a loopback host; otherwise the API refuses to start "
        "(fails closed).",
    )
    read_timeout_s: float = Field(default=10.0, gt=0, le=120, description="Longest wait for the "
                                  "controls, policy or audit topic when the API reads state; past it "
                                  "the request fails (503) rather than answering from partial state.")
    warehouse: bool = Field(default=True, description="Show employees what is stored about them (\"Captured "
                            "about me\", their demonstrations and frames, withdrawal) by reading ClickHouse "
                            "(`clickhouse.dsn`; on the embedded engine the sink must be running: it serves the "
                            "data dir). Needs the workers' pseudonym key (`stream.pseudonym_key`) to derive the "
                            "caller's own pseudonym; without it these sections answer 503 and nothing else is "
                            "affected. Off: the sections say no warehouse is configured.")
    dry_run_window_s: int = Field(
        default=3600, ge=60, le=7 * 86_400, description="Recent window of stored events that the sampling "
        "dry run (`PUT /api/v1/policy/sampling?dry_run=true`, the ops page's preview) estimates from. A dry "
        "run publishes nothing; without a readable warehouse it says it is unavailable instead of guessing.",
    )


class AgentSettings(BaseModel):
    """The endpoint agent on a laptop: what it captures, how it batches, spools and ships."""

    model_config = ConfigDict(frozen=True)

    employee_id: str | None = Field(default=None, description="Employee this laptop captures for "
                                    "(required to run the agent).")
    device_id: str | None = Field(default=None, description="Stable device id; unset: derived from "
                                  "/etc/machine-id (or the host name), hashed.")
    cohort: str = Field(default="default", pattern=r"^[a-zA-Z0-9._-]{1,64}$",
                        description="Rollout cohort reported in heartbeats (fleet dashboards).")
    source: Literal["auto", "x11", "macos", "windows", "synthetic"] = Field(
        default="auto", description="Capture backend; `auto` picks the one for this OS.")
    display: str | None = Field(default=None, description="X11 display (default: $DISPLAY).")
    socket_path: Path | None = Field(default=None, description="Local control socket (pause, resume, "
                                     "status); a Unix socket, never a network port. Unset: "
                                     "<state_dir>/agent/agent.sock.")
    spool_dir: Path | None = Field(default=None, description="On-disk spool; unset: <state_dir>/agent/spool.")
    spool_max_mb: float = Field(default=200.0, ge=1, description="Spool bound: beyond it the oldest "
                                "unsent data is dropped (screenshots first), counted in heartbeats.")
    batch_interval_s: float = Field(default=30.0, ge=1, le=3600, description="Seal and send a batch "
                                    "this often on mains power.")
    battery_batch_interval_s: float = Field(default=120.0, ge=1, le=3600, description="...and this "
                                            "often on battery (fewer radio wakeups).")
    durable_after_s: float = Field(default=5.0, ge=0.5, le=300, description="Captured events reach "
                                   "the on-disk spool within this many seconds: all a kill -9 can lose. "
                                   "Sealed batches wait there for the next wakeup.")
    max_batch_events: int = Field(default=20_000, ge=10, le=50_000, description="Seal a batch early "
                                  "at this many events (must stay under the stream's limit).")
    pointer_max_hz: float = Field(default=25.0, gt=0, le=240, description="Pointer moves kept per "
                                  "second at most (coalesced at the source).")
    pointer_simplify_px: float = Field(default=1.0, ge=0, le=50, description="Path simplification "
                                       "tolerance in pixels (Ramer-Douglas-Peucker); 0: off.")
    heartbeat_interval_s: float = Field(default=60.0, ge=5, le=3600, description="Health heartbeat "
                                        "period; sent with the next batch wakeup, never on its own.")
    bandwidth_budget_mb_per_hour: float = Field(default=8.0, gt=0, description="Upload budget (token "
                                                "bucket); screenshots yield first, events never wait.")
    screenshots: bool = Field(default=True, description="Take event-driven screenshots of allowlisted "
                              "windows (on click and focus change, rate-limited, deduplicated).")
    screenshot_min_interval_s: float = Field(default=30.0, ge=1, description="At most one screenshot "
                                             "per this many seconds.")
    screenshot_max_width: int = Field(default=960, ge=64, le=4096, description="Screenshots are "
                                      "downscaled to this width at most.")
    screenshot_format: Literal["webp", "jpeg"] = Field(default="webp", description="Screenshot encoding.")
    screenshot_quality: int = Field(default=60, ge=1, le=100, description="Screenshot encoder quality.")
    policy_file: Path | None = Field(default=None, description="Policy JSON (deploy/policy.example.json "
                                     "format) used until the control plane's policy arrives. No "
                                     "policy at all: nothing is captured (fails closed).")
    follow_control_plane: bool = Field(default=True, description="Read the policy and this employee's "
                                       "exemption grants from Kafka at each wakeup.")
    controls_at_start_s: float = Field(default=3.0, ge=0, le=30, description="At start, read the "
                                       "control plane (policy, this employee's exemption) for at most "
                                       "this long before capturing, so a laptop that was off when they "
                                       "changed applies them before capturing anything. Broker "
                                       "unreachable: capture starts after this delay under the cached "
                                       "controls (none cached: nothing captured, fails closed). 0: no "
                                       "read at start (the first wakeup reads them).")
    focus_poll_s: float = Field(default=0.25, ge=0.02, le=5, description="How often the focused window "
                                "is checked; events whose window is ambiguous (focus changed within "
                                "one poll) are dropped, fail closed.")
    device_key_path: Path | None = Field(default=None, description="This laptop's Ed25519 device "
                                         "key, generated here at first start (0600) and never "
                                         "sent; it signs the employee's own pauses and exemption "
                                         "requests. Unset: <state_dir>/agent/device.key.")
    require_consent: bool = Field(default=False, description="Refuse to start unless the employee "
                                  "accepted what is captured on this laptop (`handtrace-agent consent` "
                                  "writes <state_dir>/agent/consent.json for the employee in force). The "
                                  ".deb sets it (docs/agent-rollout.md).")
    focus_idle_poll_s: float = Field(default=2.0, ge=0.02, le=60, description="With no input since the "
                                     "last check, the focused window is checked only this often (each "
                                     "check costs X round trips); input after an unseen focus change "
                                     "is then dropped as ambiguous, never misattributed.")


class StoreSettings(BaseModel):
    """The durable object store for demonstration frames (content-addressed images)."""

    model_config = ConfigDict(frozen=True)

    url: str | None = Field(default=None, description="Where frames are stored: `file:///abs/path` (a "
                            "local directory, the embedded default), `s3://bucket` or "
                            "`s3://bucket/prefix` (any S3-compatible service, with the s3_* settings; "
                            "keys under the prefix). Anything else is refused at start. Unset: "
                            "file://<state_dir>/frames.")
    s3_endpoint_url: str | None = Field(default=None, description="S3 endpoint (e.g. "
                                        "`https://s3.eu-central-1.amazonaws.com`, or a SeaweedFS/MinIO "
                                        "address); unset: the AWS default for the region.")
    s3_region: str = Field(default="us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(default=None, description="S3 access key id (unset: the "
                                         "standard AWS credential chain).")
    s3_secret_access_key: SecretStr | None = Field(default=None, description="S3 secret key.")
    s3_addressing_style: Literal["auto", "path", "virtual"] = Field(
        default="auto", description="How the bucket is named in requests: `virtual` "
        "(bucket.host, AWS), `path` (host/bucket: SeaweedFS, MinIO and most self-hosted servers), "
        "`auto` (botocore decides).")
    retries: int = Field(default=5, ge=0, le=100, description="Attempts beyond the first for an object "
                         "operation that failed transiently (connection error, timeout, 5xx, "
                         "throttling), with exponential backoff; then it raises and the caller fails "
                         "closed (no row without its object). Permanent errors (access denied, no such "
                         "bucket) are not retried.")
    retry_backoff_s: float = Field(default=0.2, gt=0, le=60, description="First backoff between "
                                   "retries; doubles each attempt (with jitter), capped at 10 s.")
    timeout_s: float = Field(default=30.0, gt=0, le=600, description="Per-request timeout (connect: "
                             "at most 10 s of it).")


class DemoSettings(BaseModel):
    """Demonstrations: task recordings the employee starts, reviews and submits (issue #11).
    Agent-side knobs (recording, frames, uploads) and the stream/sink's handling of them."""

    model_config = ConfigDict(frozen=True)

    enabled: bool = Field(default=True, description="Allow the employee to record demonstrations.")
    dir: Path | None = Field(default=None, description="Where recordings wait for review, on the "
                             "laptop only; unset: <state_dir>/agent/demonstrations.")
    max_minutes: float = Field(default=20.0, gt=0, le=240, description="A recording stops by itself "
                               "after this long.")
    expire_hours: float = Field(default=72.0, gt=0, le=24 * 90, description="Recordings not "
                                "submitted within this many hours are deleted from the laptop.")
    consent_version: str = Field(default="1", min_length=1, max_length=64, description="Version of "
                                 "the demonstration consent text the employee accepted; sent with "
                                 "every demonstration.")
    upload_on_battery: bool = Field(default=False, description="Upload submitted demonstrations "
                                    "while on battery (default: wait for mains power).")
    upload_on_metered: bool = Field(default=False, description="Upload on a metered network "
                                    "(default: wait for an unmetered one).")
    unknown_network_metered: bool = Field(default=False, description="How a network whose metered "
                                          "state cannot be read (no NetworkManager: macOS, Windows, "
                                          "minimal Linux) is treated: false uploads there (the data "
                                          "was already submitted; only the cost is unknown), true "
                                          "waits as on a metered one. `handtrace status` says which.")
    instruction_max_chars: int = Field(default=500, ge=10, le=4000, description="Longest task "
                                       "instruction accepted at `record start` (longer: refused).")
    upload_check_s: float = Field(default=60.0, ge=1, le=3600, description="How often the agent "
                                  "checks whether submitted demonstrations may be uploaded now "
                                  "(power, network); a submit wakes it at once.")
    upload_timeout_s: float = Field(default=300.0, ge=5, le=3600, description="One upload attempt "
                                    "waits this long for every delivery ack; otherwise it counts as "
                                    "failed, the recording stays on the laptop and is re-sent whole "
                                    "later (same ids: downstream deduplicates).")
    upload_retry_max_s: float = Field(default=1800.0, ge=1, le=86_400, description="Longest wait "
                                      "between failed upload attempts (exponential backoff with "
                                      "jitter up to this).")
    hold_s: float = Field(default=3600.0, gt=0, le=7 * 86_400, description="Sink: how long a "
                          "demonstration whose frames have not all arrived is held before it is "
                          "recorded as incomplete (nothing of it exportable).")
    max_frame_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024, le=64 * 1024 * 1024,
                                 description="Largest frame message (and max.message.bytes of the "
                                 "demonstration topics).")
    sink_group_id: str = Field(default="handtrace-sink-demonstrations", description="Consumer group "
                               "of the sink's demonstration writer.")
    frame_interval_s: float = Field(default=1.0, ge=0.1, le=60, description="While recording, "
                                    "grab the full (masked) screen every this many seconds; the frame "
                                    "of an action is the last distinct grab before it, so this bounds "
                                    "how stale a frame can be (ADR 0011: 1 s keeps recording under 3 % "
                                    "of one core).")
    frame_ring: int = Field(default=2, ge=1, le=32, description="Distinct frames kept in memory "
                            "(raw pixels, ~8 MB each at 1080p) to pick action frames from; the "
                            "oldest is dropped first (an action whose frame fell out gets none). "
                            "2 suffices while the tick (which attributes actions) runs more often "
                            "than frames are grabbed: the newest grab may postdate the action, the "
                            "one before it cannot.")
    frame_hash_distance: int = Field(default=0, ge=0, le=64, description="0 (default): a grab is "
                                     "kept when anything visible changed since the last kept frame "
                                     "(its 8x-reduced image differs; one typed character is enough). "
                                     "Above 0: kept only when its 64-bit dHash differs in more than "
                                     "this many bits (cheaper, blind to small changes such as typing).")
    frame_format: Literal["png", "webp"] = Field(default="png", description="Lossless encoding of "
                                                 "frames (ADR 0011): png (zlib level 1) fits the 120 MB "
                                                 "budget; webp is ~25 % smaller and faster but peaks "
                                                 "~30 MB higher at 1080p. Never lossy: every filled "
                                                 "region stays exactly the fill colour.")


class ExportSettings(BaseModel):
    """Training-data export (issue #12): how raw demonstration events reduce to actions
    (``handtrace.export.actions``; docs/export.md, "Action reduction")."""

    model_config = ConfigDict(frozen=True)

    double_click_interval_s: float = Field(default=0.5, gt=0, le=2, description="Left clicks whose "
                                           "presses follow each other within this many seconds "
                                           "(and within the radius) merge into a doubleClick / "
                                           "tripleClick (X toolkits use 0.4-0.5 s).")
    double_click_radius_px: int = Field(default=5, ge=0, le=50, description="...and whose press "
                                        "points differ by at most this many pixels in each axis.")
    drag_threshold_px: int = Field(default=5, ge=0, le=100, description="A press whose pointer "
                                   "moves further than this (in either axis) before the release is "
                                   "a drag (moveTo + dragTo), not a click; same as the agent's.")
    scroll_burst_gap_s: float = Field(default=1.0, gt=0, le=30, description="Scroll notches of one "
                                      "direction following each other within this gap merge into "
                                      "one scroll / hscroll (the agent's burst gap).")
    typing_gap_s: float = Field(default=1.0, gt=0, le=30, description="Typed characters within this "
                                "gap form one write; repeats of one non-printing key within it form "
                                "one press(presses=n).")
    wait_threshold_s: float = Field(default=3.0, gt=0, le=600, description="A gap between two actions "
                                    "longer than this becomes a wait step; must exceed the burst, "
                                    "typing and double-click gaps (checked at start).")

    require_scrub: bool = Field(default=True, description="Exports must OCR-scrub every frame "
                                "(docs/export.md): an export asked to skip scrubbing is refused "
                                "(fails closed). Only for benchmarks and frames known to hold no text.")
    allow_passive: bool = Field(default=False, description="Passive capture may be exported as "
                                "training episodes. Off: `--include-passive` is refused (passive "
                                "capture was not consented to as training data; demonstrations were).")

    @model_validator(mode="after")
    def _wait_exceeds_gaps(self) -> ExportSettings:
        gaps = {"double_click_interval_s": self.double_click_interval_s,
                "scroll_burst_gap_s": self.scroll_burst_gap_s, "typing_gap_s": self.typing_gap_s}
        short = [k for k, v in gaps.items() if v >= self.wait_threshold_s]
        if short:
            raise ValueError(f"wait_threshold_s ({self.wait_threshold_s}) must exceed {', '.join(short)}")
        return self


class RetentionSettings(BaseModel):
    """How long each class of data is kept (``handtrace db retention``; docs/operations.md,
    "Retention"). Days counted from the time the data describes (capture, start of a
    demonstration, heartbeat sent, audit entry); 0 keeps the class forever. A policy is the longest
    ANY copy is kept: ClickHouse TTLs, the frame store and Kafka topics follow it (a topic keeps
    the shorter of its transport retention and the policy)."""

    model_config = ConfigDict(frozen=True)

    events_days: int = Field(default=90, ge=0, le=36_500, description="Passive capture (`events`; "
                             "the raw, accepted, dead-letter and screenshot topics): rows older "
                             "are deleted by a ClickHouse TTL when parts merge, topics never keep "
                             "them longer. 0: forever (not recommended: minimisation, GDPR Art. 5(1)(e)).")
    demonstrations_days: int = Field(default=365, ge=0, le=36_500, description="Demonstrations "
                                     "(`demonstrations`, `demonstration_events`, `frames` and the frame "
                                     "store objects, the demonstration topics): training data the "
                                     "employee chose to record. Objects whose rows are gone are deleted "
                                     "by `handtrace db retention --apply` (or an S3 lifecycle rule). 0: forever.")
    heartbeats_days: int = Field(default=30, ge=0, le=36_500, description="Agent heartbeats (fleet "
                                 "store `heartbeats`; the heartbeats topic keeps at most this): "
                                 "operational data, device ids. 0: forever.")
    rollups_days: int = Field(default=730, ge=0, le=36_500, description="Rollup tables (aggregates "
                              "per app, hour, day; no per-event data). 0: forever.")
    audit_days: int = Field(default=0, ge=0, le=36_500, description="Audit trails (`control_audit`, "
                            "`access_audit`, the audit topic). 0 (default): forever -- the evidence of "
                            "who did what to whose data (accountability, GDPR Art. 5(2)); a value > 0 "
                            "deletes older entries for good. Erasure receipts, withdrawals and the "
                            "export register are obligations, never expired (docs/operations.md).")


class WarehouseSettings(BaseModel):
    """The warehouse (issue #14): access tiers and the access audit (``handtrace sql``;
    docs/warehouse.md)."""

    model_config = ConfigDict(frozen=True)

    k_anonymity: int = Field(default=5, ge=2, le=10_000, description="The analyst tier answers only "
                             "aggregates: every group of its results counts at least this many distinct "
                             "people (employee_key); smaller groups are suppressed (left out of the "
                             "result), queries that cannot be checked are refused (fails closed). "
                             "At least 2: k = 1 would hand out per-person rows.")
    retention: RetentionSettings = Field(default_factory=RetentionSettings, description="Retention "
                                         "per data class (days; 0 = forever).")
    endpoint_groups: dict[Literal["analyst", "researcher", "auditor"], str] = Field(
        default_factory=dict, description="While the sink serves the embedded data dir, it writes one "
        "token file per role (`query.<role>.endpoint`). A role named here (JSON object, role -> OS group "
        "name) gets its file with mode 0640 and that group, so members of the group run `handtrace sql "
        "--role <role>` under that tier and no other; a role not named here gets mode 0600 (the sink's "
        "user only). A group that does not exist, or that the sink's user cannot give a file, stops the "
        "sink at start (fails closed). The admin file (`query.endpoint`) is always 0600.",
    )

    @field_validator("endpoint_groups")
    @classmethod
    def _group_names(cls, v: dict[str, str]) -> dict[str, str]:
        import re

        for role, group in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9._-]{0,63}\$?", group):
                raise ValueError(f"endpoint_groups[{role!r}]: {group!r} is not an OS group name")
        return v


class Settings(BaseSettings):
    """All handtrace settings. Environment: HANDTRACE_<FIELD>, nested with `__`."""

    model_config = SettingsConfigDict(
        env_prefix="HANDTRACE_", env_nested_delimiter="__", frozen=True, extra="ignore"
    )

    state_dir: Path = Field(default_factory=default_state_dir, description="Local state root.")
    dev_mode: bool = Field(
        default=False, description="Development mode (the demo and the tests set it): missing "
        "secrets -- the pseudonym key, the control-plane signing key -- are generated once under "
        "<state_dir>/secrets. Off (production): a service that lacks a secret refuses to start "
        "(fails closed).",
    )
    metrics_host: str = Field(
        default="127.0.0.1", description="Address the services' /metrics endpoints bind to "
        "(0.0.0.0 in containers)."
    )
    kafka: KafkaSettings = KafkaSettings()
    topics: TopicSettings = TopicSettings()
    clickhouse: ClickHouseSettings = ClickHouseSettings()
    sink: SinkSettings = SinkSettings()
    stream: StreamSettings = StreamSettings()
    fleet: FleetSettings = FleetSettings()
    agent: AgentSettings = AgentSettings()
    control: ControlSettings = ControlSettings()
    api: ApiSettings = ApiSettings()
    store: StoreSettings = StoreSettings()
    demo: DemoSettings = DemoSettings()
    export: ExportSettings = ExportSettings()
    warehouse: WarehouseSettings = WarehouseSettings()

    @model_validator(mode="after")
    def _distinct_metrics_ports(self) -> Settings:
        ports = {"stream": self.stream.metrics_port, "sink": self.sink.metrics_port,
                 "fleet": self.fleet.metrics_port}
        used = [p for p in ports.values() if p]
        if len(used) != len(set(used)):
            raise ValueError(f"metrics ports must differ between services: {ports}")
        return self

    def clickhouse_dsn(self) -> str:
        """The DSN in force: the configured one or the embedded engine under state_dir."""
        return self.clickhouse.dsn or f"chdb://{(self.state_dir / 'clickhouse').resolve()}"


def unknown_env_vars(environ: dict[str, str] | None = None) -> list[str]:
    """HANDTRACE_* variables that name no setting (typos would otherwise be silently ignored)."""
    env = os.environ if environ is None else environ
    unknown = []
    for name in env:
        if not name.startswith("HANDTRACE_") or name in _NON_SETTINGS_ENV:
            continue
        model: Any = Settings
        for part in name[len("HANDTRACE_"):].lower().split("__"):
            fields = getattr(model, "model_fields", {})
            if part not in fields:
                unknown.append(name)
                break
            model = fields[part].annotation
    return sorted(unknown)


# Read by tools and tests, not by Settings.
_NON_SETTINGS_ENV = {"HANDTRACE_TEST_BOOTSTRAP", "HANDTRACE_PYTHON", "HANDTRACE_PSEUDONYM_KEY",
                     # the .deb's launcher and unit (packaging/agent, docs/agent-rollout.md)
                     "HANDTRACE_AGENT_HOME", "HANDTRACE_AGENT_ENV_FILE", "HANDTRACE_AGENT_PYTHON",
                     "HANDTRACE_AGENT_SYSTEMD", "HANDTRACE_CONSENT_STDIN"}


def settings_env(settings: Settings) -> dict[str, str]:
    """The HANDTRACE_* environment that reproduces ``settings`` (secrets in clear) -- for starting
    a service as a subprocess with exactly these settings."""
    env: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, BaseModel):
            for name in type(value).model_fields:
                walk(f"{prefix}__{name.upper()}" if prefix else name.upper(), getattr(value, name))
        elif isinstance(value, dict | list):
            if value:
                env[f"HANDTRACE_{prefix}"] = json.dumps(value)
        elif value is not None:
            v = value.get_secret_value() if isinstance(value, SecretStr) else value
            env[f"HANDTRACE_{prefix}"] = str(v.value if isinstance(v, StrEnum) else v)

    walk("", settings)
    return env


def load_settings(**overrides: Any) -> Settings:
    """Read settings from the environment; keyword overrides win (used by the CLI and tests)."""
    return Settings(**overrides)
