"""Per-event Faust baseline for ``bench.stream_throughput``: handtrace's enforcement rules written
the way a typical team writes a Faust service, to measure what the columnar design buys.

    python -m bench.baseline_faust_app        # settings from HANDTRACE_* like handtrace.stream

What it does, per Kafka message, in the agent's ``async for`` loop:

1. checks the single-object prefix and decodes the whole EventBatch with
   ``fastavro.schemaless_reader`` (one Python dict per event);
2. runs every event through ``enforce_event``, plain Python per event, in handtrace's order:
   validate (per-kind rules, time bounds, duplicate ids) → exemption → pause (the employee's
   windows from a Faust table folded from the controls topic, as handtrace does) → allowlist (app
   context carried from the previous event of the batch, ``url_host`` / ``host_allowed`` /
   ``stored_url`` called per event) → sampling (rate per app/kind/``*``) → redaction (the PII
   regexes of ``handtrace.stream.steps.redact`` on each event's window title and url, typed-text
   mode per app, password context, key codes of hidden characters) → pseudonymise (HMAC of the
   batch's employee and device, once per message);
   typed PII that spans key events is found per batch (the batch's full-mode text joined, one
   ``find_spans`` call), as handtrace does;
3. inserts the accepted rows as Python lists with ``clickhouse-connect``'s ``client.insert`` into
   the same ``events`` table the sink writes (one insert per message).

The rule helpers (url parsing, the PII regexes) are handtrace's own, so the rules are the same;
what differs is the shape: per-event Python, no caching of per-value work, row inserts. No
exactly-once bookkeeping (no ledger, no dedup token), no dead-letter topic (bad messages are
counted and skipped), no republish to Kafka: each is less work than handtrace does.

The policy is read once at start-up from the compacted policy topic (to its end).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import logging
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import unquote

import fastavro
import faust
from confluent_kafka import Consumer, TopicPartition

from handtrace.core import clickhouse, codec
from handtrace.core.domains import host_allowed, stored_url, url_host
from handtrace.core.settings import Settings, load_settings
from handtrace.core.topics import Topics
from handtrace.sink.schema import migrate
from handtrace.stream.app import run_worker
from handtrace.stream.controls import apply_control, dumps, loads
from handtrace.stream.policy import EmployeeControls, Policy
from handtrace.stream.steps.redact import DETECTORS, MASK_CHAR, MASKED_KEYSYM, find_spans, redact_text
from handtrace.stream.steps.sample import SampleStep

log = logging.getLogger("bench.baseline")

COLUMNS = [
    "event_id", "batch_id", "employee_key", "device_key", "kind", "captured_at", "received_at",
    "x", "y", "button", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text",
    "text_masked", "app_id", "window_title", "url", "screenshot_sha256", "screenshot_bytes",
    "screenshot_format", "screenshot_width", "screenshot_height", "agent_version", "os",
    "source_partition", "source_offset",
]
_TEXT, _TEXT_MASKED, _KEY_CODE, _KIND = COLUMNS.index("text"), COLUMNS.index("text_masked"), \
    COLUMNS.index("key_code"), COLUMNS.index("kind")

EARLIEST = datetime(2020, 1, 1, tzinfo=UTC)
POINTER = ("pointer_move", "click", "scroll")
KEYS = ("key_down", "key_up")
SHORTCUT = 2 | 4 | 8
PASSWORD_TITLE = re.compile(
    r"(?i)\b(?:password|passwort|passphrase|passcode|kennwort|contraseña|mot de passe|pin)\b")
PASSWORD_APP = re.compile(r"(?i)(?:password|passwd|keepass|bitwarden|lastpass|1password|keychain|pinentry|seahorse)")
TOKEN = "[REDACTED:{kind}]"  # noqa: S105


def pseudonym(key: bytes, namespace: str, raw_id: str) -> str:
    return hmac.new(key, f"{namespace}:{raw_id}".encode(), hashlib.sha256).hexdigest()[:32]


def printable(code: int | None) -> bool:
    if code is None:
        return False
    return code < 0xFF00 or code == 0xFF80 or 0xFFAA <= code <= 0xFFBD or 0x01000000 <= code <= 0x0110FFFF


def to_us(dt: datetime) -> int:
    return int(dt.timestamp() * 1_000_000)


def redact_value(value: str | None, decode: bool) -> str | None:
    if value is None:
        return None
    new, found = value, None
    if decode and "%" in value:
        new, found = redact_text(unquote(value), DETECTORS, TOKEN)
    if not found:
        new, found = redact_text(value, DETECTORS, TOKEN)
    return new if found else value


class BatchState:
    """What the per-event rules carry from one event of a batch to the next."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()
        self.app: str | None = None
        self.url: str | None = None
        self.prev_app: str | None = None
        self.title: str | None = None
        self.first = True
        self.modes: list[str] = []  # text mode of each accepted row


class Rules:
    """The enforcement rules, applied event by event."""

    def __init__(self, settings: Settings, policy: Policy, key: bytes) -> None:
        self.settings = settings
        self.policy = policy
        self.key = key
        self.skew = timedelta(seconds=settings.stream.max_future_skew_s)
        self.margin_us = int(settings.stream.clock_skew_margin_s * 1_000_000)
        self.sampler = SampleStep(key=hashlib.sha256(b"handtrace-sampling:" + key).digest(),
                                  episode_s=settings.stream.episode_s)

    def enforce_event(self, ev: dict[str, Any], batch: dict[str, Any], controls: EmployeeControls,
                      st: BatchState) -> str | None:
        """Mutates ``ev`` into its stored form; returns why it is dropped, or None to keep it."""
        kind = ev["kind"]
        # validate
        if kind in POINTER and (ev["x"] is None or ev["y"] is None):
            return "invalid_coordinates"
        if kind == "click" and (ev["pressed"] is None or ev["button"] == "none"):
            return "invalid_click"
        if kind in KEYS and ev["key_code"] is None:
            return "invalid_key"
        if kind == "focus_change" and ev["app_id"] is None:
            return "invalid_focus"
        if kind == "screenshot" and ev["screenshot_sha256"] is None:
            return "invalid_screenshot"
        ts = ev["captured_at_us"]
        if ts < EARLIEST or ts > batch["sent_at_us"] + self.skew:
            return "invalid_time"
        if ev["event_id"] in st.seen:
            return "duplicate_event_id"
        st.seen.add(ev["event_id"])
        # exemption and pause
        if controls.exemptions or controls.pauses:
            t = to_us(ts)
            for e in controls.exemptions:
                if e.from_us - self.margin_us <= t and (e.until_us is None or t < e.until_us + self.margin_us):
                    return "exempt"
            for w in controls.pauses:
                if w.starts_at_us - self.margin_us <= t < w.ends_at_us + self.margin_us:
                    return "paused"
        # allowlist: the app context (app and url together) carries over within the batch
        if ev["app_id"] is not None:
            st.app, st.url = ev["app_id"], ev["url"]
        else:
            ev["app_id"] = st.app
            if ev["url"] is None:
                ev["url"] = st.url
            else:
                st.url = ev["url"]
        app = ev["app_id"]
        if app is None:
            return "no_app_context"
        if app not in self.policy.allowed_apps:
            return "not_allowlisted_app"
        if ev["url"] is not None:
            host = url_host(ev["url"])
            if host is None:
                return "invalid_url"
            if not host_allowed(host, self.policy.allowed_domains):
                return "not_allowlisted_domain"
            ev["url"] = stored_url(ev["url"])
        # sampling
        sampling = self.policy.sampling
        rate = sampling.get(f"app:{app}", sampling.get(f"kind:{kind}", sampling.get("*", 1.0)))
        if rate < 1.0:
            window = to_us(ts) // (self.settings.stream.episode_s * 1_000_000)
            if rate <= 0.0 or self.sampler.episode_draw(batch["employee_id"], batch["device_id"], window) >= rate:
                return "sampled_out"
        # redaction
        if kind == "focus_change" or ev["window_title"] is not None or st.first or app != st.prev_app:
            st.title = ev["window_title"]
        st.first, st.prev_app = False, app
        password = bool((st.title and PASSWORD_TITLE.search(st.title)) or PASSWORD_APP.search(app))
        mode = "none" if password else self.policy.text_capture_for(app)
        if mode not in ("none", "masked", "full"):
            mode = "none"
        text = ev["text"]
        shortcut = bool((ev["modifiers"] or 0) & SHORTCUT)
        if text is not None:
            if mode == "none" or (mode == "masked" and shortcut):
                ev["text"] = None
            elif mode == "masked":
                ev["text"] = MASK_CHAR * len(text)
            if mode != "full":
                ev["text_masked"] = True
        if kind in KEYS and mode != "full" and not shortcut and printable(ev["key_code"]):
            ev["key_code"] = MASKED_KEYSYM
        ev["window_title"] = redact_value(ev["window_title"], decode=False)
        ev["url"] = redact_value(ev["url"], decode=True)
        st.modes.append(mode)
        return None

    @staticmethod
    def redact_typed(rows: list[list[Any]], modes: list[str]) -> None:
        """PII typed across key events: join the batch's full-mode text, find spans, hide the
        text (and character key codes, press and release) of every row inside one."""
        idx = [i for i, r in enumerate(rows) if modes[i] == "full" and r[_TEXT] is not None]
        if not idx:
            return
        joined = "".join(rows[i][_TEXT] for i in idx)
        spans = find_spans(joined, DETECTORS)
        if not spans:
            return
        pii: set[int] = set()
        pos = 0
        for i in idx:
            end = pos + len(rows[i][_TEXT])
            if any(s < end and pos < e for s, e, _ in spans):
                pii.add(i)
            pos = end
        pressed: dict[Any, int] = {}
        for i, r in enumerate(rows):
            kind, code = r[_KIND], r[_KEY_CODE]
            shortcut = bool((r[COLUMNS.index("modifiers")] or 0) & SHORTCUT)
            if kind == "key_down":
                pressed[code] = i
            hide = i in pii or (kind == "key_up" and pressed.get(code) in pii)
            if hide and kind in KEYS and not shortcut and printable(code):
                r[_KEY_CODE] = MASKED_KEYSYM
            if i in pii:
                r[_TEXT], r[_TEXT_MASKED] = None, True

    def process_message(self, payload: bytes, partition: int, offset: int,
                        controls: EmployeeControls) -> list[list[Any]]:
        """One EventBatch message → accepted rows (Python lists in COLUMNS order)."""
        received = datetime.now(UTC)
        sv = codec.writer_schema(payload, "event_batch")
        batch = fastavro.schemaless_reader(io.BytesIO(payload[codec.PREFIX_LEN:]), sv.parsed, None)
        emp_key = pseudonym(self.key, "employee", batch["employee_id"])
        dev_key = pseudonym(self.key, "device", batch["device_id"])
        batch_id = uuid.UUID(bytes=batch["batch_id"])
        st = BatchState()
        rows: list[list[Any]] = []
        for ev in batch["events"]:
            if self.enforce_event(ev, batch, controls, st) is not None:
                continue
            sha = ev["screenshot_sha256"]
            rows.append([
                uuid.UUID(bytes=ev["event_id"]), batch_id, emp_key, dev_key, ev["kind"],
                ev["captured_at_us"], received, ev["x"], ev["y"], ev["button"], ev["pressed"],
                ev["scroll_dx"], ev["scroll_dy"], ev["key_code"], ev["modifiers"], ev["text"],
                ev["text_masked"], ev["app_id"], ev["window_title"], ev["url"],
                sha.hex() if sha is not None else None, ev["screenshot_bytes"], ev["screenshot_format"],
                ev["screenshot_width"], ev["screenshot_height"], batch["agent_version"], batch["os"],
                partition, offset,
            ])
        self.redact_typed(rows, st.modes)
        return rows


def read_policy(settings: Settings, topic: str) -> Policy:
    """The newest policy on the compacted policy topic, read to its end once."""
    c = Consumer({**settings.kafka.librdkafka(), "group.id": f"baseline-policy-{uuid.uuid4().hex}",
                  "enable.auto.commit": False, "log_level": 3})
    policy = Policy()
    try:
        tp = TopicPartition(topic, 0)
        lo, hi = c.get_watermark_offsets(tp, timeout=10)
        if hi <= lo:
            return policy
        c.assign([TopicPartition(topic, 0, lo)])
        pos = lo
        while pos < hi:
            for m in c.consume(100, timeout=1.0):
                if m.error() is not None:
                    continue
                pos = m.offset() + 1
                rec = codec.decode_record(m.value(), "control_event")
                if rec["kind"] == "policy_update" and rec.get("policy"):
                    new = Policy.from_record(rec["policy"])
                    if new.version >= policy.version:
                        policy = new
        return policy
    finally:
        c.close()


def create_app(settings: Settings) -> faust.App:
    topics = Topics.from_settings(settings.topics)
    parts = settings.topics.partitions
    app = faust.App(
        settings.stream.app_id,
        broker=[f"kafka://{h}" for h in settings.kafka.bootstrap().split(",")],
        value_serializer="raw", key_serializer="raw", web_enabled=False, store="memory://",
        topic_partitions=parts, consumer_auto_offset_reset="earliest", broker_commit_interval=1.0,
        producer_max_request_size=settings.topics.max_message_bytes,
        consumer_max_fetch_size=settings.topics.max_message_bytes,
        datadir=str(settings.state_dir / "faust-baseline"),
    )
    source = app.topic(topics.events, value_type=bytes, key_type=bytes, partitions=parts)
    control_topic = app.topic(topics.controls, value_type=bytes, key_type=bytes, partitions=parts)
    controls_table = app.Table("employee-controls", default=None, partitions=parts, key_type=str, value_type=str)
    assert settings.stream.pseudonym_key is not None, "set HANDTRACE_STREAM__PSEUDONYM_KEY"
    rules = Rules(settings, read_policy(settings, topics.policy),
                  settings.stream.pseudonym_key.get_secret_value().encode())
    client = clickhouse.connect(settings.clickhouse_dsn())
    db = settings.clickhouse.database
    migrate(client, db)
    table = f"{db}.events"

    @app.agent(source)
    async def enforce(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            employee = msg.key.decode(errors="replace") if msg.key else ""
            try:
                rows = rules.process_message(msg.value, msg.partition, msg.offset,
                                             loads(controls_table.get(employee)))
            except (codec.DecodeError, *codec._READ_ERRORS) as e:
                log.warning("skipping undecodable message %s/%s: %s", msg.partition, msg.offset, e)
                continue
            if rows:
                client.insert(table, rows, column_names=COLUMNS)

    @app.agent(control_topic)
    async def fold_controls(stream: Any) -> None:
        async for event in stream.events():
            rec = codec.decode_record(event.message.value, "control_event")
            employee = rec.get("employee_id")
            if employee and rec["kind"] != "policy_update":
                controls_table[employee] = dumps(apply_control(loads(controls_table.get(employee)), rec)[0])

    return app


def main() -> None:
    settings = load_settings()
    run_worker(create_app(settings), settings)


if __name__ == "__main__":
    main()
