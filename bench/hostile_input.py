"""Hostile-input run (issue #10): thousands of generated bad messages of every kind, mixed with
good agent traffic, through the real broker, one real Faust worker and the real sink; then
every promise is checked and the numbers are printed for docs/BENCHMARKS.md.

    python -m bench.hostile_input --minutes 3 [--agents 16] [--bad-per-minute 1500]

What runs (each started process is stopped on exit, errors and Ctrl-C included; a hard
wall-clock limit, ``--hard-limit``, ends a run that hangs):

- a local Kafka broker on free ports (or ``--bootstrap`` / HANDTRACE_TEST_BOOTSTRAP), topics with
  a unique prefix, ``python -m handtrace.stream`` and ``python -m handtrace.sink`` as subprocesses
  (``dev_mode``, an explicit pseudonym key; the sink owns the embedded ClickHouse dir until it is
  stopped, then this process reads it), and a policy published the control plane's way
  (``handtrace.control.publish``, so it is signed wherever the control plane signs).
- good traffic: ``--agents`` simulated agents (``SyntheticActivity`` over the allowlisted work apps,
  as an agent's local policy would have filtered it) send real EventBatch messages every
  ``--batch-interval`` s, keyed by employee id, zstd; plus allowlisted batches whose titles, urls
  and typed text are full of PII and secrets, batches from an internationalised allowlisted
  domain, screenshots whose url carries a secret, and, after a genuine policy v2 widens the
  allowlist mid-run, batches of the newly allowed app.
- genuine controls (control-plane publish): a pause for some employees, an exemption for others;
  then forged controls written straight to the controls and policy topics (no signature or a
  bogus one): exemption_revoke and pause_end for those employees, a control stamped in 2100, a
  self-granted exemption, a policy with version 2**63-1 that would allow everything bad.
- bad messages at a bounded rate (``--bad-per-minute``; each tagged by its source
  partition/offset and a ``ht-bench-id`` header), every kind in KINDS below.

Checks (the run exits 1 if any fails; ``--lenient-reasons`` accepts any dead-letter reason):

- every good event stored exactly once (per event id; and the sink's inserted rows = rows stored);
- every message-level bad message dead-lettered, with an ``ht-reason`` header from its kind's
  expected set, on one of the dead-letter topics (every Topics field with ``deadletter`` in its
  name, plus ``--deadletter-topic``; attributed by ``ht-source-partition``/``-offset``, the
  ``ht-bench-id`` header, or the event ids of rows the sink set aside); its events never stored;
- row-level bad events (time, duplicates, flooded titles, not allowlisted) never stored, and no
  stored app or url host that good traffic did not send;
- no listed secret stored verbatim (ClickHouse LIKE on window_title, url, text; and the accepted
  screenshots' url header);
- nothing stored inside a genuine pause or exemption window, forged controls notwithstanding;
  the newly allowed app of the genuine policy v2 is stored (the forged policy did not lock it out);
- the 5 MB title is dead-lettered or stored truncated (``--max-stored-field-bytes``), never lost
  with its neighbours;
- the pipeline drains (consumer lag 0 and stable); the longest stall (lag > 0, no committed
  progress) stays under ``--max-stall``; worker and sink RSS (psutil, every second) under
  ``--max-rss-mb``; both stop within ``--max-stop`` seconds of SIGTERM.

Known limits: events are classified against the pause/exemption windows with guard bands
(``START_GUARD_S`` after a control is issued, ``EDGE_S`` around window edges) that are counted
neither way; ReplacingMergeTree merges could hide a duplicate, which is why the sink's own
inserted-rows counter is compared with the rows stored.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import random
import shutil
import signal
import string
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition

from bench.stream_throughput import GroupLag, Worker, free_port, machine_info, start_broker
from handtrace.agent import synthetic
from handtrace.agent.synthetic import SyntheticActivity
from handtrace.core import clickhouse, codec, ids, schemas
from handtrace.core.admin import ensure_topics
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.localbroker import LocalBroker
from handtrace.core.partitioning import partition_for_key
from handtrace.core.producer import producer_config
from handtrace.core.settings import Settings
from handtrace.core.topics import Topics

REPO = Path(__file__).resolve().parents[1]
_US = 1_000_000
BENCH_ID = "ht-bench-id"
START_GUARD_S = 8.0  # after a genuine control is published: the fold's latency, counted neither way
EDGE_S = 5.0  # around window edges: the stream's skew margin (2 s default) plus produce latency
WORK_APPS = tuple(a for a in synthetic.DEFAULT_APPS if a.work)
NEW_APP = "hostile-newapp"
IDN_HOST = "www.münchen.de"
PII_HOST = "docs.google.com"
BAD_APPS = ("steam", "whatsapp", "telegram-desktop")
# Hosts that must never be stored: outside the allowlist, look-alikes (IDNA 2003 folds ß and final
# sigma; Cyrillic o), public suffixes and sibling sites under one, and url tricks.
BAD_URLS = (
    "https://evil.example.net/x", "https://docs.google.com.evil.net/d/1", "https://evilgoogle.com/",
    "https://faß.de/", "https://www.faß.de/login", "https://ασς.com/", "https://gооgle.com/",
    "https://bob.github.io/", "https://github.io/", "https://evil-alice.github.io/",
    "https://google.com@evil.net/", "https://evil.net\\@google.com/", "https://co.uk/", "https://com/",
    "https://accounts.google.com%2Eevil.net/",
)


def _policy_v1() -> dict[str, Any]:
    """The genuine policy: the synthetic work apps; their domains; an IDN entry; ASCII entries that
    IDNA 2003 look-alikes fold onto; a site under a private public suffix."""
    return {
        "version": 1,
        "allowed_apps": sorted(a.app_id for a in WORK_APPS),
        "allowed_domains": ["google.com", "github.com", "atlassian.net", "münchen.de", "fass.de",
                            "ασσ.com".encode("idna").decode(), "alice.github.io"],
        "sampling": {"*": 1.0},
        "text_capture": {"*": "masked", "code": "full", "slack": "none"},
    }


def _policy_v2() -> dict[str, Any]:
    p = _policy_v1()
    return {**p, "version": 2, "allowed_apps": sorted([*p["allowed_apps"], NEW_APP])}


# ----------------------------------------------------------------------------- secrets


def make_secrets(rng: random.Random) -> dict[str, str]:
    """One fresh value per secret format named in issue #10 (and the detectors' older ones);
    the value itself is what must never be stored verbatim."""

    def pick(alphabet: str, n: int) -> str:
        return "".join(rng.choice(alphabet) for _ in range(n))

    up, alnum = string.ascii_uppercase + string.digits, string.ascii_letters + string.digits

    def luhn(prefix: str, n: int) -> str:
        body = prefix + pick(string.digits, n - len(prefix) - 1)
        total = 0
        for i, ch in enumerate(reversed(body)):
            d = int(ch) * (2 if i % 2 == 0 else 1)
            total += d - 9 if d > 9 else d
        return body + str((10 - total % 10) % 10)

    def iban() -> str:
        bban = pick(string.digits, 18)
        num = int(bban + "131400")  # D=13 E=14 then 00
        check = 98 - num % 97
        return f"DE{check:02d}{bban}"

    card = luhn("4", 16)
    ib = iban()
    tok = pick(string.ascii_lowercase, 8)
    return {
        "email": f"zoe.{tok}@example.com",
        "email_fullwidth_at": f"max.{tok}\uff20example.org",
        "phone_intl": f"+44 20 7946 {pick(string.digits, 4)}",
        "phone_nbsp": f"+49\u00a030\u00a0{pick(string.digits, 4)}\u00a0{pick(string.digits, 4)}",
        "card": card,
        "card_unicode_hyphens": "\u2010".join(card[i:i + 4] for i in range(0, 16, 4)),
        "iban": ib,
        "iban_spaced": " ".join(ib[i:i + 4] for i in range(0, len(ib), 4)),
        "ssn": f"{rng.randint(100, 665)}-{rng.randint(10, 99)}-{rng.randint(1000, 9999)}",
        "aws_key": "AKIA" + pick(up, 16),
        "google_api_key": "AIza" + pick(alnum + "_-", 35),
        "openai_key": "sk-" + pick(alnum, 48),
        "gitlab_pat": "glpat-" + pick(alnum + "_-", 20),
        "github_pat": "ghp_" + pick(alnum, 36),
        "slack_token": f"xoxb-{pick(string.digits, 11)}-{pick(string.digits, 12)}-{pick(alnum, 24)}",
        "password_kv": f"Pw{tok}!9x",  # as password=...
        "pw_colon": f"Hx{tok}#77",  # as pw: ...
        "passwd": f"Qz{tok}$31",  # as passwd=...
    }


def secret_title(sec: dict[str, str]) -> str:
    """A window title carrying every secret in its usual context."""
    return (f"Mail to {sec['email']} / {sec['email_fullwidth_at']} call {sec['phone_intl']} or "
            f"{sec['phone_nbsp']} card {sec['card']} ({sec['card_unicode_hyphens']}) IBAN {sec['iban_spaced']} "
            f"{sec['iban']} SSN {sec['ssn']} keys {sec['aws_key']} {sec['google_api_key']} {sec['openai_key']} "
            f"{sec['gitlab_pat']} {sec['github_pat']} {sec['slack_token']} password={sec['password_kv']} "
            f"pw: {sec['pw_colon']} passwd={sec['passwd']} - Google Docs")


def secret_urls(sec: dict[str, str]) -> list[str]:
    """Allowlisted urls carrying the secrets that can sit in a path (no ASCII spaces)."""
    base = f"https://{PII_HOST}"
    return [f"{base}/d/{sec['aws_key']}/edit", f"{base}/d/{sec['google_api_key']}/view",
            f"{base}/u/{sec['email']}/inbox", f"{base}/t/{sec['openai_key']}/{sec['gitlab_pat']}",
            f"{base}/x/{sec['github_pat']}/{sec['card']}/{sec['iban']}",
            f"{base}/login/password={sec['password_kv']}/passwd={sec['passwd']}"]


# ----------------------------------------------------------------------------- events


def event(kind: str, ts_us: int, rng: random.Random, *, app: str = "code", url: str | None = None,
          title: str | None = None, text: str | None = None) -> dict[str, Any]:
    """One valid event (the Event contract's per-kind rules hold)."""
    e: dict[str, Any] = {"event_id": ids.uuid7_bytes(max(ts_us, 0) // 1000), "captured_at_us": ts_us,
                         "kind": kind, "button": "none", "screenshot_format": "none", "text_masked": False,
                         "app_id": app, "url": url}
    if kind in ("pointer_move", "click", "scroll"):
        e["x"], e["y"] = rng.randrange(1920), rng.randrange(1080)
    if kind == "click":
        e["button"], e["pressed"] = "left", True
    if kind in ("key_down", "key_up"):
        e["key_code"] = 0x61
        e["text"] = text if kind == "key_down" else None
    if kind == "focus_change":
        e["window_title"] = title if title is not None else "Editor"
    return e


def plain_events(n: int, t0_us: int, rng: random.Random, step_us: int = 1000, **kw: Any) -> list[dict[str, Any]]:
    """``n`` allowlisted events (a focus change, then pointer moves)."""
    return [event("focus_change" if i == 0 else "pointer_move", t0_us + i * step_us, rng, **kw) for i in range(n)]


def batch(employee: str, events: list[dict[str, Any]], *, sent_at_us: int | None = None, seq: int = 1,
          device: str | None = None, count: int | None = None) -> bytes:
    """An encoded EventBatch (``count`` lies about the number of events when given)."""
    header = {"batch_id": ids.uuid7_bytes(), "employee_id": employee, "device_id": device or f"dev-{employee}",
              "agent_version": "hostile-bench", "os": "linux", "cohort": "default", "seq": seq,
              "sent_at_us": sent_at_us if sent_at_us is not None else now_us()}
    if count is None:
        return codec.encode_event_batch(header, events)
    return codec.encode_event_batch(header, block=codec.encode_events_block(events), count=count)


# ----------------------------------------------------------------------------- what was sent


@dataclass
class Sent:
    """One produced message and what must become of it."""

    bench_id: int
    kind: str  # good: agent, pii, idn, newapp, warmup, screenshot; bad: a KINDS key; control kinds
    topic: str
    key: bytes | None
    employee: str | None = None
    event_ids: list[bytes] = field(default_factory=list)
    captured: list[int] = field(default_factory=list)
    partition: int = -1
    offset: int = -1
    error: str | None = None
    size: int = 0

    @property
    def delivered(self) -> bool:
        return self.error is None and self.offset >= 0


@dataclass(frozen=True)
class Kind:
    """A kind of bad message: how often per 1000 bad messages (or a fixed rate per minute for the
    expensive ones), where it is judged, and the dead-letter reasons that fit it (None: any)."""

    weight: float
    level: str  # "message": dead-lettered; "row": not stored; "screenshot": not accepted; "huge"; "dup"
    reasons: frozenset[str] | None = None
    per_minute: float | None = None


_DECODE = frozenset({"bad_magic", "truncated", "malformed", "unknown_schema", "wrong_subject", "empty", "empty_value"})
KINDS: dict[str, Kind] = {
    "random_bytes": Kind(110, "message", _DECODE),
    "empty_value": Kind(15, "message", _DECODE),
    "null_value": Kind(10, "message", frozenset({"empty_value"})),
    "truncated_avro": Kind(110, "message", frozenset({"truncated", "malformed"})),
    "wrong_fingerprint": Kind(70, "message", frozenset({"unknown_schema"})),
    "wrong_subject": Kind(30, "message", frozenset({"wrong_subject"})),
    "count_lies": Kind(70, "message", frozenset({"malformed", "truncated"})),
    "over_event_limit": Kind(0, "message", frozenset({"oversized"}), per_minute=10),
    "missing_key": Kind(70, "message", frozenset({"missing_key"})),
    "key_mismatch": Kind(70, "message", frozenset({"key_mismatch"})),
    "wrong_partition": Kind(70, "message", frozenset({"wrong_partition"})),
    "huge_title": Kind(0, "huge", None, per_minute=2),
    "time_span_years": Kind(35, "row"),
    "time_far_future": Kind(35, "row"),
    "time_1970": Kind(35, "row"),
    "duplicate_ids": Kind(35, "dup"),
    "distinct_titles": Kind(0, "row", per_minute=8),
    "not_allowlisted_app": Kind(60, "row"),
    "not_allowlisted_host": Kind(90, "row"),
    "screenshot_missing_headers": Kind(60, "screenshot"),
}
GOOD_KINDS = ("warmup", "agent", "pii", "idn", "newapp")


class BadFactory:
    """Builds one bad message of a kind; everything else about it is valid (allowlisted, keyed
    right, current times), so only the defect under test can stop it."""

    def __init__(self, topics: Topics, partitions: int, max_batch_events: int, distinct_cap: int,
                 rng: random.Random) -> None:
        self.t, self.parts, self.max_events, self.distinct_cap, self.rng = (
            topics, partitions, max_batch_events, distinct_cap, rng)
        self.n = 0

    def employee(self) -> str:
        self.n += 1
        return f"att-{self.n % 97:03d}"

    def make(self, kind: str) -> dict[str, Any]:
        """Keyword arguments for ``Traffic.send`` (topic, key, value, events, partition, headers)."""
        r, emp, now = self.rng, self.employee(), now_us()
        key = emp.encode()
        good = plain_events(r.randint(3, 12), now - 2 * _US, r)
        out: dict[str, Any] = {"topic": self.t.events, "key": key, "events": good}
        if kind == "random_bytes":
            v = os.urandom(r.randint(1, 4000))
            out.update(value=b"\x00" + v if v[:2] == codec.MAGIC else v, events=[])
        elif kind == "empty_value":
            out.update(value=b"", events=[])
        elif kind == "null_value":
            out.update(value=None, events=[])
        elif kind == "truncated_avro":
            full = batch(emp, good)
            out["value"] = full[:r.randint(codec.PREFIX_LEN + 1, len(full) - 2)]
        elif kind == "wrong_fingerprint":
            full = batch(emp, good)
            out["value"] = full[:2] + os.urandom(8) + full[codec.PREFIX_LEN:]
        elif kind == "wrong_subject":
            full = batch(emp, good)
            out["value"] = full[:2] + schemas.latest("heartbeat").fingerprint_le + full[codec.PREFIX_LEN:]
        elif kind == "count_lies":
            out["value"] = batch(emp, good, count=len(good) + r.randint(1, 1000))
        elif kind == "over_event_limit":
            ev = plain_events(self.max_events + 1, now - 30 * _US, r, step_us=500)
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "missing_key":
            out.update(value=batch(emp, good), key=None)
        elif kind == "key_mismatch":
            out.update(value=batch(emp, good), key=f"victim-{r.randint(0, 9)}".encode())
        elif kind == "wrong_partition":
            right = partition_for_key(key, self.parts)
            out.update(value=batch(emp, good), partition=(right + 1 + r.randrange(self.parts - 1)) % self.parts)
        elif kind == "huge_title":
            title = ("The quick brown fox jumps over the lazy dog. " * 120_000)[:5 * 1024 * 1024]
            ev = [event("focus_change", now - 2 * _US, r, title=title), *plain_events(5, now - 2 * _US + 1000, r)]
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "time_span_years":
            # Capture times months to years apart (ClickHouse: one partition per month, and an
            # insert touching more than 100 is refused): none may be stored, and the sink must not
            # stall on them either way. Half reach back two years; half span 2020-2041, sent by an
            # agent whose clock claims 2041 (capture times bounded only by the sender's own clock).
            if r.random() < 0.5:
                start, end, sent, n = now - 2 * 365 * 86_400 * _US, now - 10 * 86_400 * _US, now, r.randint(20, 60)
            else:
                start, end, n = 1_580_000_000 * _US, 2_250_000_000 * _US, r.randint(120, 160)
                sent = end + 3600 * _US
            ev = plain_events(n, start, r, step_us=(end - start) // n)
            out.update(value=batch(emp, ev, sent_at_us=sent), events=ev)
        elif kind == "time_far_future":
            t2100 = 4_102_444_800 * _US
            ev = plain_events(r.randint(3, 10), t2100 + r.randint(0, 10**12), r)
            sent = t2100 + 10**13 if r.random() < 0.5 else now  # an agent that also claims to send then
            out.update(value=batch(emp, ev, sent_at_us=sent), events=ev)
        elif kind == "time_1970":
            ev = plain_events(r.randint(3, 10), r.randint(0, 10**9), r)
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "duplicate_ids":
            ev = plain_events(r.randint(4, 12), now - 2 * _US, r)
            dup = [dict(e, x=(e.get("x") or 0) + 1) for e in ev[1:]]
            out.update(value=batch(emp, ev + dup), events=ev)
        elif kind == "distinct_titles":
            n = self.distinct_cap + 500
            ev = [event("focus_change", now - 20 * _US + i * 1000, r, title=f"Doc {i} {uuid.uuid4().hex}")
                  for i in range(n)]
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "not_allowlisted_app":
            ev = plain_events(r.randint(3, 10), now - 2 * _US, r, app=r.choice(BAD_APPS))
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "not_allowlisted_host":
            ev = plain_events(r.randint(3, 10), now - 2 * _US, r, app="google-chrome", url=r.choice(BAD_URLS))
            out.update(value=batch(emp, ev), events=ev)
        elif kind == "screenshot_missing_headers":
            eid = ids.uuid7_bytes()
            h = {"ht-event-id": eid, "ht-captured-at-us": str(now - _US).encode(),
                 "ht-device-id": f"dev-{emp}".encode(),
                 "ht-app-id": b"google-chrome", "ht-url": f"https://{PII_HOST}/d/1".encode(),
                 "ht-sha256": os.urandom(32).hex().encode(), "ht-format": b"webp"}
            drop = r.choice(["ht-event-id", "ht-captured-at-us", "ht-device-id", "ht-app-id", "garbage_time", "no_key"])
            if drop == "garbage_time":
                h["ht-captured-at-us"] = b"yesterday"
            elif drop == "no_key":
                out["key"] = None
            else:
                h.pop(drop)
            out.update(topic=self.t.screenshots, value=os.urandom(2048), headers=list(h.items()),
                       events=[{"event_id": eid, "captured_at_us": now - _US}])
        else:
            raise ValueError(kind)
        return out


# ----------------------------------------------------------------------------- producing


class Traffic:
    """One producer (bounded local queue) for everything; every message tagged and tracked."""

    def __init__(self, s: Settings) -> None:
        self.p = Producer(producer_config(s.kafka, **{
            "compression.type": "zstd", "linger.ms": 20, "message.max.bytes": 16 * 1024 * 1024,
            "queue.buffering.max.messages": 20_000, "queue.buffering.max.kbytes": 131_072}))
        self.sent: list[Sent] = []

    def send(self, kind: str, topic: str, key: bytes | None, value: bytes | None, *,
             events: list[dict[str, Any]] = (), employee: str | None = None,  # type: ignore[assignment]
             partition: int | None = None, headers: list[tuple[str, bytes]] | None = None,
             sent_at_header: bool = True) -> Sent:
        s = Sent(len(self.sent), kind, topic, key, employee, [e["event_id"] for e in events],
                 [e["captured_at_us"] for e in events], size=len(value or b""))
        self.sent.append(s)
        hdrs = list(headers or [])
        if sent_at_header:
            hdrs.append((HEADER_SENT_AT, str(now_us()).encode()))
        hdrs.append((BENCH_ID, str(s.bench_id).encode()))

        def on(err: Any, m: Any) -> None:
            if err is not None:
                s.error = str(err)
            else:
                s.partition, s.offset = m.partition(), m.offset()

        kw: dict[str, Any] = {"key": key, "value": value, "headers": hdrs, "on_delivery": on}
        if partition is not None:
            kw["partition"] = partition
        while True:
            try:
                self.p.produce(topic, **kw)
                break
            except BufferError:  # bounded queue: wait for deliveries, never drop
                self.p.poll(0.05)
        self.p.poll(0)
        return s

    def flush(self, timeout_s: float = 60) -> int:
        return int(self.p.flush(timeout_s))


@dataclass
class Agent:
    employee: str
    device: str
    activity: SyntheticActivity
    last_us: int
    next_at: float
    seq: int = 0


@dataclass
class Windows:
    """The genuine controls as published (µs on the wall clock of this process)."""

    pause: dict[str, tuple[int, int]] = field(default_factory=dict)
    exempt: dict[str, int] = field(default_factory=dict)
    issued_us: int = 0
    policy_v2_us: int | None = None


def forged_controls(s: Settings, emps: dict[str, list[str]], windows: Windows, traffic: Traffic,
                    rng: random.Random) -> None:
    """Controls an attacker who can write the controls and policy topics (every agent can) would
    write: unsigned, or with a bogus signature; none may change anything."""
    t = Topics.from_settings(s.topics)
    now = now_us()
    bogus = [("ht-signer", b"cp:dev"), ("ht-sig", base64.b64encode(os.urandom(64)))]

    def ctl(kind: str, emp: str | None, role: str, headers: list[tuple[str, bytes]] | None = None,
            at: int | None = None, **fields: Any) -> None:
        rec = {"control_id": ids.uuid7_bytes(), "kind": kind, "employee_id": emp,
               "occurred_at_us": at if at is not None else now, "actor": emp or "ops-forged",
               "actor_role": role, "reason": "forged by bench.hostile_input", **fields}
        topic, key = (t.policy, b"global") if kind == "policy_update" else (t.controls, (emp or "").encode())
        traffic.send(f"forged_{kind}", topic, key, codec.encode_record("control_event", rec), headers=headers)

    for emp in emps["exempt"]:
        ctl("exemption_revoke", emp, "hr", exemption_effective_at_us=now)
        ctl("exemption_revoke", emp, "hr", headers=bogus, exemption_effective_at_us=now)
    for emp in emps["paused"]:
        ctl("pause_end", emp, "employee", pause_ends_at_us=now)
        ctl("pause_end", emp, "employee", headers=bogus, pause_ends_at_us=now)
        t2100 = 4_102_444_800 * _US
        ctl("pause_start", emp, "employee", at=t2100, pause_starts_at_us=t2100, pause_ends_at_us=t2100 + _US)
    for emp in emps["selfgrant"]:
        ctl("exemption_grant", emp, "employee", exemption_effective_at_us=now - 3600 * _US)
    wide = {"version": 2**63 - 1, "allowed_apps": list(BAD_APPS),
            "allowed_domains": ["com", "net", "io", "de", "co.uk"], "sampling": {}, "text_capture": {"*": "full"}}
    ctl("policy_update", None, "ops", policy=wide)
    ctl("policy_update", None, "ops", headers=bogus, policy=wide)
    traffic.send("forged_garbage", t.controls, emps["paused"][0].encode(), os.urandom(300))


# ----------------------------------------------------------------------------- monitoring


class Monitor:
    """Every second: RSS of the worker and the sink (with their children), consumer lag and
    committed progress of the stream and sink groups, and the longest stall per group."""

    def __init__(self, s: Settings, pids: dict[str, int]) -> None:
        t = Topics.from_settings(s.topics)
        self.groups = {"stream:events": (s.stream.app_id, t.events),
                       "stream:screenshots": (s.stream.app_id, t.screenshots),
                       "sink:accepted": (s.sink.group_id, t.stored)}
        self.s = s
        self.pids = pids
        self.rss: dict[str, list[tuple[float, int]]] = {k: [] for k in pids}
        self.lag: dict[str, int] = {}
        self.pos: dict[str, int] = {}
        self.max_stall: dict[str, float] = dict.fromkeys(self.groups, 0.0)
        self.track_stalls = False
        self._progress_t: dict[str, float] = {}
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.error: str | None = None
        self._thread = threading.Thread(target=self._run, name="hostile-monitor", daemon=True)
        self._thread.start()
        self._ready.wait(60)

    def _rss(self, pid: int) -> int:
        import psutil

        try:
            p = psutil.Process(pid)
            return int(p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True)))
        except psutil.Error:
            return 0

    def _run(self) -> None:
        lags: dict[str, GroupLag] = {}
        try:
            for name, (group, topic) in self.groups.items():
                lags[name] = GroupLag(self.s, group, topic)
        except Exception as e:  # noqa: BLE001 -- reported by the main thread
            self.error = f"monitor could not start: {e}"
        finally:
            self._ready.set()
        try:
            while not self._stop.wait(1.0):
                t = time.monotonic()
                for name, pid in self.pids.items():
                    self.rss[name].append((t, self._rss(pid)))
                for name, gl in lags.items():
                    try:
                        committed = gl.c.committed(gl.tps, timeout=5)
                        lag = pos = 0
                        for tp in committed:
                            lo, hi = gl.c.get_watermark_offsets(tp, timeout=5, cached=False)
                            off = tp.offset if tp.offset >= 0 else lo
                            lag += max(hi - off, 0)
                            pos += max(off, 0)
                    except KafkaException:
                        continue
                    moved = pos != self.pos.get(name)
                    self.lag[name], self.pos[name] = lag, pos
                    if lag == 0 or moved or not self.track_stalls:
                        self._progress_t[name] = t
                    else:
                        stall = t - self._progress_t.get(name, t)
                        self.max_stall[name] = max(self.max_stall[name], stall)
        finally:
            for gl in lags.values():
                gl.close()

    def drained(self) -> bool:
        return len(self.lag) == len(self.groups) and all(v == 0 for v in self.lag.values())

    def max_rss_mb(self, name: str, since: float = 0.0) -> float:
        vals = [v for t, v in self.rss.get(name, []) if t >= since]
        return max(vals, default=0) / 2**20

    def close(self) -> None:
        self._stop.set()
        self._thread.join(30)


# ----------------------------------------------------------------------------- reading back


def read_topic(s: Settings, topic: str, timeout_s: float = 60) -> list[Any]:
    """Every message of ``topic`` (from the beginning to the high watermarks at call time);
    [] when the topic does not exist."""
    c = Consumer({**s.kafka.librdkafka(), "group.id": f"hostile-read-{uuid.uuid4().hex[:8]}",
                  "enable.auto.commit": False, "fetch.max.bytes": 64 * 1024 * 1024,
                  "max.partition.fetch.bytes": 32 * 1024 * 1024, "log_level": 3})
    try:
        md = c.list_topics(topic, timeout=10).topics.get(topic)
        if md is None or md.error is not None or not md.partitions:
            return []
        ends = {}
        for p in md.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        if not ends:
            return []
        c.assign([TopicPartition(topic, p, -2) for p in ends])
        out, deadline = [], time.monotonic() + timeout_s
        pos = dict.fromkeys(ends, -1)
        while any(pos[p] < ends[p] - 1 for p in ends) and time.monotonic() < deadline:
            for m in c.consume(500, timeout=1.0):
                if m.error() is None:
                    out.append(m)
                    pos[m.partition()] = max(pos[m.partition()], m.offset() or 0)
        return out
    finally:
        c.close()


def scrape(port: int) -> dict[str, float]:
    """handtrace_* samples of a /metrics endpoint ({} when unreachable)."""
    try:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()  # noqa: S310
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith("handtrace_") and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


# ----------------------------------------------------------------------------- the run


@dataclass
class Config:
    """Everything a run depends on (the CLI and the integration test build one)."""

    minutes: float = 3.0
    agents: int = 16
    batch_interval_s: float = 2.0
    bad_per_minute: float = 1500
    partitions: int = 3
    max_batch_events: int = 5000
    drain_timeout_s: float = 300.0
    warmup_timeout_s: float = 240.0
    hard_limit_s: float | None = None
    max_rss_mb: float = 2048.0
    max_stall_s: float = 30.0
    max_stop_s: float = 10.0
    max_stored_field_bytes: int = 1024 * 1024
    strict_reasons: bool = True
    kinds: tuple[str, ...] = tuple(KINDS)
    forged_controls: bool = True
    deadletter_topics: tuple[str, ...] = ()
    bootstrap: str | None = None
    clickhouse_dsn: str | None = None
    seed: int = 10
    keep: bool = False
    root: Path | None = None


@dataclass
class Result:
    failures: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    table: str = ""

    def fail(self, what: str) -> None:
        self.failures.append(what)


class HardLimit(BaseException):
    """The run's wall-clock limit passed (raised from SIGALRM)."""


def _settings(root: Path, bootstrap: str, cfg: Config) -> Settings:
    tag = uuid.uuid4().hex[:8]
    ch: dict[str, Any] = {"dsn": cfg.clickhouse_dsn, "database": f"hostile_{tag}"} if cfg.clickhouse_dsn else {}
    sink_port = free_port()
    stream_port = next(p for p in iter(free_port, None) if p != sink_port)
    return Settings(
        state_dir=root / "state", dev_mode=True,
        kafka={"bootstrap_servers": bootstrap},
        topics={"prefix": f"hostile{tag}", "partitions": cfg.partitions},
        clickhouse=ch,
        stream={"app_id": f"hostile-stream-{tag}", "metrics_port": stream_port,
                "pseudonym_key": "hostile-bench-pseudonym-key-" + "k" * 32, "log_level": "warn",
                "max_batch_events": cfg.max_batch_events},
        sink={"group_id": f"hostile-sink-{tag}", "metrics_port": sink_port, "flush_interval_s": 0.5},
    )


def _publish(s: Settings, record: dict[str, Any]) -> None:
    """A genuine control, the control plane's way (signed there if the control plane signs)."""
    from handtrace.control.publish import publish

    publish(s, record)


def _schedule(cfg: Config, rng: random.Random) -> list[str]:
    """The bad kinds in sending order: weights share ``bad_per_minute``; fixed-rate kinds their own."""
    chosen = [k for k in cfg.kinds if k in KINDS]
    total_w = sum(KINDS[k].weight for k in chosen) or 1.0
    n = cfg.bad_per_minute * cfg.minutes
    order: list[str] = []
    for k in chosen:
        kd = KINDS[k]
        count = kd.per_minute * cfg.minutes if kd.per_minute else n * kd.weight / total_w
        order += [k] * max(1, round(count))
    rng.shuffle(order)
    return order


def run(cfg: Config, log: Callable[[str], None] = print) -> Result:
    """One hostile-input run; never raises for a failed invariant (see ``Result.failures``)."""
    res = Result()
    rng = random.Random(cfg.seed)
    root = cfg.root or Path(tempfile.mkdtemp(prefix="ht-hostile-"))
    broker: LocalBroker | None = None
    worker: Worker | None = None
    sink: Worker | None = None
    monitor: Monitor | None = None
    traffic: Traffic | None = None
    dsn: str | None = None
    hard = cfg.hard_limit_s or cfg.minutes * 60 + cfg.drain_timeout_s + cfg.warmup_timeout_s + 300
    def on_alarm(*_: Any) -> None:
        raise HardLimit

    old_alarm = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(hard))
    # Children are started from this checkout's code.
    os.environ["PYTHONPATH"] = os.pathsep.join(
        dict.fromkeys(filter(None, [str(REPO / "services"), os.environ.get("PYTHONPATH")])))
    info = machine_info()
    res.numbers["machine"] = info
    log(info)
    t_run = time.monotonic()
    try:
        bootstrap = cfg.bootstrap or os.environ.get("HANDTRACE_TEST_BOOTSTRAP")
        if not bootstrap:
            broker = start_broker(root, heap="1g")
            bootstrap = broker.bootstrap
            log(f"broker {bootstrap} up")
        s = _settings(root, bootstrap, cfg)
        t = Topics.from_settings(s.topics)
        ensure_topics(s.kafka, s.topics)
        from handtrace.core.controls import control_record, pause_record

        _publish(s, control_record("policy_update", employee_id=None, actor="bench", role="ops",
                                   reason="hostile input run", policy=_policy_v1()))
        sink = Worker("handtrace.sink", s, root / "sink.log")
        worker = Worker("handtrace.stream", s, root / "worker.log")
        sink.start()
        worker.start()
        assert sink.proc and worker.proc
        monitor = Monitor(s, {"worker": worker.proc.pid, "sink": sink.proc.pid})
        if monitor.error:
            raise RuntimeError(monitor.error)
        traffic = Traffic(s)

        def alive() -> None:
            assert worker and sink
            worker.check()
            sink.check()

        # ---- warm-up: one good batch all the way through, so controls are folded in real time
        wr = random.Random(1)
        ev = plain_events(20, now_us() - 3 * _US, wr)
        traffic.send("warmup", t.events, b"warm-0", batch("warm-0", ev), events=ev, employee="warm-0")
        traffic.flush(30)
        deadline = time.monotonic() + cfg.warmup_timeout_s
        while monitor.pos.get("sink:accepted", 0) == 0:
            alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up batch not stored within {cfg.warmup_timeout_s:.0f}s")
            time.sleep(0.5)
        log(f"worker and sink up, warm-up stored after {time.monotonic() - t_run:.0f}s; producing for "
            f"{cfg.minutes * 60:.0f}s")
        monitor.track_stalls = True
        t_steady = time.monotonic()

        # ---- traffic
        D = cfg.minutes * 60
        T0 = time.monotonic()
        n_special = 2 if cfg.agents >= 8 else 1
        agents = [Agent(f"emp-{i:04d}", f"dev-{i:04d}", SyntheticActivity(seed=cfg.seed * 1000 + i, apps=WORK_APPS),
                        now_us() - int(cfg.batch_interval_s * _US), T0 + cfg.batch_interval_s * i / cfg.agents)
                  for i in range(cfg.agents)]
        emps = {"paused": [a.employee for a in agents[:n_special]],
                "exempt": [a.employee for a in agents[n_special:2 * n_special]],
                "selfgrant": [a.employee for a in agents[2 * n_special:3 * n_special]]}
        windows = Windows()
        secrets_ = make_secrets(rng)
        factory = BadFactory(t, cfg.partitions, cfg.max_batch_events, s.stream.max_distinct_values_per_batch, rng)
        order = _schedule(cfg, rng)
        res.numbers["bad_planned"] = Counter(order)
        bad_i = 0
        extra_next = T0
        extra_n = 0
        events_on = {"controls": T0 + 0.15 * D, "forged": T0 + 0.25 * D, "policy_v2": T0 + 0.45 * D}
        done: set[str] = set()
        pause_s = min(0.6 * D, 1800.0)
        while (now := time.monotonic()) < T0 + D:
            alive()
            for a in agents:
                if now >= a.next_at:
                    t1 = now_us()
                    evs = a.activity.events_between(a.last_us, t1)
                    a.last_us, a.seq, a.next_at = t1, a.seq + 1, a.next_at + cfg.batch_interval_s
                    if evs:
                        traffic.send("agent", t.events, a.employee.encode(),
                                     batch(a.employee, evs, sent_at_us=t1, seq=a.seq, device=a.device),
                                     events=evs, employee=a.employee)
            if now >= extra_next:  # PII, IDN and (after policy v2) new-app batches, good screenshots
                extra_next += cfg.batch_interval_s
                extra_n += 1
                tnow = now_us()
                emp = f"pii-{extra_n % 3}"
                title = secret_title(secrets_)
                ev = [event("focus_change", tnow - 900_000, rng, app="google-chrome", url=u, title=title)
                      for u in secret_urls(secrets_)]
                ev[0]["window_title"] = f"Search - {secrets_['email']}"
                ev += [event("key_down", tnow - 500_000, rng, app="code", text=f"export AWS_KEY={secrets_['aws_key']} "
                             f"pw: {secrets_['pw_colon']} {secrets_['openai_key']}")]
                for i, e in enumerate(ev):
                    e["captured_at_us"] = tnow - 900_000 + i * 1000
                    e["event_id"] = ids.uuid7_bytes(e["captured_at_us"] // 1000)
                traffic.send("pii", t.events, emp.encode(), batch(emp, ev, sent_at_us=tnow), events=ev, employee=emp)
                emp = f"idn-{extra_n % 2}"
                ev = plain_events(5, tnow - 800_000, rng, app="google-chrome", url=f"https://{IDN_HOST}/rathaus")
                traffic.send("idn", t.events, emp.encode(), batch(emp, ev, sent_at_us=tnow), events=ev, employee=emp)
                if windows.policy_v2_us and tnow > windows.policy_v2_us + START_GUARD_S * _US:
                    emp = f"new-{extra_n % 2}"
                    ev = plain_events(5, tnow - 700_000, rng, app=NEW_APP)
                    traffic.send("newapp", t.events, emp.encode(), batch(emp, ev, sent_at_us=tnow), events=ev,
                                 employee=emp)
                emp = f"shot-{extra_n % 2}"
                eid = ids.uuid7_bytes()
                traffic.send("screenshot", t.screenshots, emp.encode(), os.urandom(2048), events=[
                    {"event_id": eid, "captured_at_us": tnow - 600_000}], employee=emp, headers=[
                    ("ht-event-id", eid), ("ht-captured-at-us", str(tnow - 600_000).encode()),
                    ("ht-device-id", f"dev-{emp}".encode()), ("ht-app-id", b"google-chrome"),
                    ("ht-url", secret_urls(secrets_)[extra_n % 6].encode()),
                    ("ht-sha256", os.urandom(32).hex().encode()), ("ht-format", b"webp")])
            if "controls" not in done and now >= events_on["controls"]:
                done.add("controls")
                windows.issued_us = now_us()
                for emp in emps["paused"]:
                    rec = pause_record(emp, pause_s / 60, actor="hr-bench", role="hr", reason="hostile run")
                    _publish(s, rec)
                    windows.pause[emp] = (rec["pause_starts_at_us"], rec["pause_ends_at_us"])
                for emp in emps["exempt"]:
                    at = now_us()
                    _publish(s, control_record("exemption_grant", employee_id=emp, actor="hr-bench", role="hr",
                                               reason="hostile run", at_us=at, exemption_effective_at_us=at))
                    windows.exempt[emp] = at
                log(f"  genuine pause ({pause_s:.0f}s) for {emps['paused']}, exemption for {emps['exempt']}")
            if cfg.forged_controls and "forged" not in done and now >= events_on["forged"]:
                done.add("forged")
                forged_controls(s, emps, windows, traffic, rng)
                log("  forged controls written (revoke, pause_end, 2100 stamp, self-grant, policy 2**63-1)")
            if "policy_v2" not in done and now >= events_on["policy_v2"]:
                done.add("policy_v2")
                _publish(s, control_record("policy_update", employee_id=None, actor="bench", role="ops",
                                           reason="hostile run: widen", policy=_policy_v2()))
                windows.policy_v2_us = now_us()
                log(f"  genuine policy v2 (adds {NEW_APP})")
            due = min(len(order), int(len(order) * (now - T0) / (0.95 * D)) + 1)
            while bad_i < due:
                kind = order[bad_i]
                bad_i += 1
                kw = factory.make(kind)
                ev = kw.pop("events")
                traffic.send(kind, kw.pop("topic"), kw.pop("key"), kw.pop("value"), events=ev, **kw)
            time.sleep(0.02)
        while bad_i < len(order):  # a slow machine: the rest at the end, still bounded
            kw = factory.make(order[bad_i])
            bad_i += 1
            ev = kw.pop("events")
            traffic.send(order[bad_i - 1], kw.pop("topic"), kw.pop("key"), kw.pop("value"), events=ev, **kw)
        left = traffic.flush(120)
        t_produced = time.monotonic()
        log(f"produced {len(traffic.sent):,} messages in {t_produced - T0:.0f}s ({left} undelivered); draining")

        # ---- drain
        deadline, stable, last = time.monotonic() + cfg.drain_timeout_s, 0, None
        drained = False
        while time.monotonic() < deadline:
            try:
                alive()
            except RuntimeError as e:
                res.fail(f"process died: {str(e).splitlines()[0]}")
                break
            cur = dict(monitor.pos)
            stable = stable + 1 if monitor.drained() and cur == last else 0
            last = cur
            if stable >= 3:
                drained = True
                break
            time.sleep(1.0)
        res.numbers["drain_s"] = time.monotonic() - t_produced
        if not drained:
            res.fail(f"pipeline did not drain within {cfg.drain_timeout_s:.0f}s (lag {monitor.lag})")
        log(f"drained: {drained} after {res.numbers['drain_s']:.0f}s")
        monitor.track_stalls = False
        res.numbers["stream_metrics"] = scrape(s.stream.metrics_port)
        res.numbers["sink_metrics"] = scrape(s.sink.metrics_port)
        res.numbers["rss_worker_mb"] = monitor.max_rss_mb("worker")
        res.numbers["rss_sink_mb"] = monitor.max_rss_mb("sink")
        res.numbers["rss_worker_steady_mb"] = monitor.max_rss_mb("worker", since=t_steady)
        res.numbers["rss_sink_steady_mb"] = monitor.max_rss_mb("sink", since=t_steady)
        res.numbers["max_stall_s"] = dict(monitor.max_stall)
        monitor.close()
        monitor = None

        # ---- stop (timed: every service must stop promptly on SIGTERM)
        for name, w in (("worker", worker), ("sink", sink)):
            t_stop = time.monotonic()
            w.stop()
            res.numbers[f"stop_{name}_s"] = time.monotonic() - t_stop
        worker = sink = None

        # ---- read back and check
        dsn = s.clickhouse_dsn()
        client = clickhouse.connect(dsn)
        check(res, cfg, s, t, client, traffic.sent, windows, emps, secrets_)
    except HardLimit:
        res.fail(f"hard wall-clock limit of {hard:.0f}s reached")
    except (RuntimeError, KafkaException, AssertionError, OSError) as e:
        res.fail(f"harness error: {e}")
        for proc in (worker, sink):
            if proc is not None:
                log(f"--- {proc.module} log tail:\n{proc.tail()}")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old_alarm)
        with contextlib.suppress(Exception):
            if monitor is not None:
                monitor.close()
        for proc in (worker, sink):
            if proc is not None:
                proc.stop()
        if dsn is not None:
            clickhouse.close(dsn)
        if broker is not None:
            broker.stop()
        if cfg.keep:
            log(f"kept {root}")
        elif cfg.root is None:
            shutil.rmtree(root, ignore_errors=True)
    res.numbers["run_s"] = time.monotonic() - t_run
    res.table = report(cfg, res)
    return res


def _stored_counts(client: Any, db: str) -> dict[bytes, int]:
    rows = client.query(f"SELECT event_id, count() FROM {db}.events GROUP BY event_id").result_rows
    return {r[0].bytes: int(r[1]) for r in rows}


def _by_rows(value: bytes | None, by_event: dict[bytes, Sent]) -> Sent | None:
    """The message whose events a dead-lettered Arrow IPC payload holds (None: not rows, or unknown)."""
    from handtrace.core.rows import from_ipc

    try:
        table = from_ipc(value or b"")
        ids_ = table.column("event_id").to_pylist()
    except Exception:  # noqa: BLE001 -- not stored rows
        return None
    return next((by_event[e] for e in ids_ if e in by_event), None)


def _like(s: str) -> str:
    return "%" + s.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def check(res: Result, cfg: Config, s: Settings, t: Topics, client: Any, sent: list[Sent], windows: Windows,
          emps: dict[str, list[str]], secrets_: dict[str, str]) -> None:
    """Every invariant, with the numbers behind it."""
    db = s.clickhouse.database
    n = res.numbers
    undelivered = Counter(x.kind for x in sent if not x.delivered)
    n["undelivered"] = dict(undelivered)
    for kind in GOOD_KINDS:
        if undelivered.get(kind):
            res.fail(f"harness: {undelivered[kind]} good '{kind}' messages not delivered")
    stored = _stored_counts(client, db)
    total, distinct = client.query(f"SELECT count(), uniqExact(event_id) FROM {db}.events").result_rows[0]
    n["rows_stored"], n["distinct_stored"] = int(total), int(distinct)
    inserted = n.get("sink_metrics", {}).get("handtrace_sink_rows_inserted_total")
    n["sink_rows_inserted"] = inserted
    if inserted is not None and int(inserted) != int(total):
        res.fail(f"sink inserted {int(inserted):,} rows, {int(total):,} stored (a merge hid duplicates?)")
    if int(total) != int(distinct):
        res.fail(f"{int(total) - int(distinct):,} duplicate rows stored (count {total:,} vs distinct {distinct:,})")

    # -- classify good events (paused / exempt employees by window)
    def klass(x: Sent, ts: int) -> str:
        if x.kind != "agent":
            return x.kind
        emp = x.employee or ""
        if emp in windows.pause:
            ps, pe = windows.pause[emp]
            g, e = int(START_GUARD_S * _US), int(EDGE_S * _US)
            if ps + g <= ts <= pe - e:
                return "in_pause"
            if ps - e <= ts <= pe + e:
                return "edge"  # the control's own latency, the skew margin: counted neither way
        if emp in windows.exempt:
            es = windows.exempt[emp]
            if ts >= es + START_GUARD_S * _US:
                return "in_exemption"
            if ts >= es - EDGE_S * _US:
                return "edge"
        if emp in emps["selfgrant"]:
            return "agent_selfgrant"
        return "agent"

    good: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])  # produced, stored once, missing, duplicated
    never: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # events, stored
    for x in sent:
        if not x.delivered or x.topic != t.events:
            continue
        if x.kind in GOOD_KINDS:
            for eid, ts in zip(x.event_ids, x.captured, strict=True):
                k = klass(x, ts)
                c = stored.get(eid, 0)
                if k in ("in_pause", "in_exemption"):
                    never[k][0] += 1
                    never[k][1] += c > 0
                elif k != "edge":
                    g = good[k]
                    g[0] += 1
                    g[1] += c == 1
                    g[2] += c == 0
                    g[3] += c > 1
        elif x.kind in KINDS and x.kind not in ("huge_title", "duplicate_ids"):
            never[x.kind][0] += len(x.event_ids)
            never[x.kind][1] += sum(stored.get(e, 0) > 0 for e in x.event_ids)
    n["good"], n["never"] = dict(good), dict(never)
    for k, (p, once, missing, dup) in good.items():
        if missing or dup:
            res.fail(f"good '{k}': {p:,} produced, {once:,} stored once, {missing:,} missing, {dup:,} duplicated")
    if windows.policy_v2_us and good.get("newapp", [0])[0] == 0:
        res.fail("no new-app batch was produced after policy v2 (run too short?)")
    for k, (p, st) in never.items():
        if st:
            res.fail(f"'{k}': {st:,} of {p:,} events stored (must be 0)")
    dups = [x for x in sent if x.kind == "duplicate_ids" and x.delivered]
    over = sum(stored.get(e, 0) > 1 for x in dups for e in x.event_ids)
    n["duplicate_ids"] = {"messages": len(dups), "ids_stored_twice": over}
    if over:
        res.fail(f"duplicate_ids: {over} event ids stored more than once")

    # -- dead letters
    dl_topics = list(dict.fromkeys([getattr(t, f) for f in vars(t) if "deadletter" in f]
                                   + [d.format(prefix=s.topics.prefix) for d in cfg.deadletter_topics]))
    by_src: dict[tuple[str | None, int, int], Sent] = {(x.topic, x.partition, x.offset): x for x in sent if x.delivered}
    by_id = {x.bench_id: x for x in sent}
    by_event = {e: x for x in sent if x.topic == t.events for e in x.event_ids}
    dead: dict[int, set[str]] = defaultdict(set)
    unattributed: Counter[str] = Counter()
    dl_count: dict[str, int] = {}
    for topic in dl_topics:
        msgs = read_topic(s, topic)
        dl_count[topic] = len(msgs)
        source = t.events if topic == t.deadletter else None
        for m in msgs:
            h = {k: bytes(v or b"") for k, v in (m.headers() or [])}
            reason = h.get("ht-reason", b"").decode(errors="replace") or "<no reason>"
            hit: Sent | None = None
            src_topic = h.get("ht-source-topic", b"").decode() or source
            with contextlib.suppress(ValueError, KeyError):
                hit = by_src.get((src_topic, int(h["ht-source-partition"]), int(h["ht-source-offset"])))
            if hit is None and BENCH_ID in h:
                with contextlib.suppress(ValueError):
                    hit = by_id.get(int(h[BENCH_ID]))
            if hit is None:  # rows the sink set aside (Arrow IPC): by their event ids
                hit = _by_rows(m.value(), by_event)
            if hit is None:
                unattributed[f"{topic}:{reason}"] += 1
            else:
                dead[hit.bench_id].add(reason)
    n["deadletter_topics"] = dl_count
    n["deadletter_unattributed"] = dict(unattributed)
    table: dict[str, dict[str, Any]] = {}
    for x in sent:
        if x.kind not in KINDS:
            continue
        row = table.setdefault(x.kind, {"produced": 0, "undelivered": 0, "deadlettered": 0, "reasons": Counter(),
                                        "wrong_reason": 0})
        if not x.delivered:
            row["undelivered"] += 1
            continue
        row["produced"] += 1
        if x.bench_id in dead:
            row["deadlettered"] += 1
            row["reasons"].update(dead[x.bench_id])
            want = KINDS[x.kind].reasons
            if want is not None and not dead[x.bench_id] & want:
                row["wrong_reason"] += 1
    for x in sent:
        if x.kind in GOOD_KINDS and x.bench_id in dead:
            res.fail(f"good '{x.kind}' message dead-lettered: {sorted(dead[x.bench_id])}")
            break
    # huge title: dead-lettered, or stored truncated
    huge_len = dict(client.query(
        f"SELECT event_id, length(window_title) FROM {db}.events WHERE length(window_title) > 65536").result_rows)
    huge_len = {k.bytes: int(v) for k, v in huge_len.items()}
    n["longest_stored_title"] = int(client.query(
        f"SELECT max(length(window_title)) FROM {db}.events").result_rows[0][0] or 0)
    for kind, row in table.items():
        level = KINDS[kind].level
        if level == "message":
            row["expect"] = "dead-lettered, reason " + ("any" if KINDS[kind].reasons is None
                                                         else "|".join(sorted(KINDS[kind].reasons or ())))
            if row["deadlettered"] < row["produced"]:
                res.fail(f"{kind}: {row['produced'] - row['deadlettered']} of {row['produced']} not dead-lettered")
            if row["wrong_reason"] and cfg.strict_reasons:
                res.fail(f"{kind}: {row['wrong_reason']} dead-lettered with an unexpected reason "
                         f"({dict(row['reasons'])})")
        elif level == "huge":
            row["expect"] = f"dead-lettered or stored truncated (<= {cfg.max_stored_field_bytes:,} B)"
            lost = 0
            for x in sent:
                if x.kind != kind or not x.delivered:
                    continue
                head = x.event_ids[0]
                if head in huge_len and huge_len[head] > cfg.max_stored_field_bytes:
                    res.fail(f"huge_title stored at full length ({huge_len[head]:,} chars)")
                if x.bench_id not in dead and stored.get(head, 0) == 0:
                    lost += 1
            row["lost"] = lost
            row["stored_note"] = (f"{sum(stored.get(x.event_ids[0], 0) > 0 for x in sent if x.kind == kind)} "
                                  f"huge titles stored, longest {max(huge_len.values(), default=0):,} chars")
            if lost:
                res.fail(f"huge_title: {lost} messages neither dead-lettered nor stored")
        elif level == "screenshot":
            row["expect"] = "not published to screenshots.accepted"
        elif level == "dup":
            row["expect"] = "each event id stored at most once"
            ids_ = [e for x in dups for e in x.event_ids]
            row["stored_note"] = (f"{sum(stored.get(e, 0) > 0 for e in ids_):,} of {len(ids_):,} ids stored, "
                                  f"{over:,} more than once")
        else:
            row["expect"] = "no event stored (row-level drop)"
    n["bad"] = table

    # -- screenshots
    acc = read_topic(s, t.screenshots_accepted)
    acc_ids: Counter[bytes] = Counter()
    shot_secrets = 0
    for m in acc:
        h = {k: bytes(v or b"") for k, v in (m.headers() or [])}
        acc_ids[h.get("ht-event-id", b"")] += 1
        url = h.get("ht-url", b"").decode(errors="replace")
        shot_secrets += any(v in url for v in secrets_.values())
    shots_bad = sum(acc_ids[x.event_ids[0]] > 0 for x in sent
                    if x.kind == "screenshot_missing_headers" and x.delivered)
    shots_good = [x for x in sent if x.kind == "screenshot" and x.delivered]
    shots_missing = sum(acc_ids[x.event_ids[0]] == 0 for x in shots_good)
    n["screenshots"] = {"good": len(shots_good), "good_missing": shots_missing, "bad_accepted": shots_bad,
                        "accepted_urls_with_secret": shot_secrets}
    if "screenshot_missing_headers" in table:
        table["screenshot_missing_headers"]["accepted"] = shots_bad
    if shots_bad:
        res.fail(f"screenshots with missing headers accepted: {shots_bad}")
    if shots_missing:
        res.fail(f"good screenshots not accepted: {shots_missing} of {len(shots_good)}")
    if shot_secrets:
        res.fail(f"accepted screenshots with a secret verbatim in ht-url: {shot_secrets}")

    # -- secrets, verbatim, anywhere a text lands
    found = {}
    for name, value in secrets_.items():
        c = int(client.query(
            f"SELECT count() FROM {db}.events WHERE window_title LIKE %(p)s OR url LIKE %(p)s OR text LIKE %(p)s",
            parameters={"p": _like(value)}).result_rows[0][0])
        if c:
            found[name] = c
    n["secrets_verbatim"] = found
    if found:
        res.fail(f"secrets stored verbatim: {found}")

    # -- nothing outside what good traffic sent (independent of the allowlist code)
    allowed_apps = set(_policy_v2()["allowed_apps"])
    apps = {r[0]: int(r[1])
            for r in client.query(f"SELECT app_id, count() FROM {db}.events GROUP BY app_id").result_rows}
    bad_apps = {a: c for a, c in apps.items() if a not in allowed_apps}
    good_hosts = {h for u in [*secret_urls(secrets_), f"https://{IDN_HOST}/"] for h in [u.split("/")[2].lower()]}
    good_hosts |= {h.encode("idna").decode() for h in list(good_hosts)}
    for app in WORK_APPS:
        for _title, page_url in app.pages:
            if page_url:
                good_hosts.add(page_url.split("/")[2].lower())
    hosts = {r[0]: int(r[1]) for r in client.query(
        f"SELECT domain(url) AS h, count() FROM {db}.events WHERE url IS NOT NULL GROUP BY h").result_rows}
    bad_hosts = {h: c for h, c in hosts.items() if h.lower() not in good_hosts}
    n["not_allowlisted_stored"] = {"apps": bad_apps, "hosts": bad_hosts}
    if bad_apps or bad_hosts:
        res.fail(f"rows outside the allowlist stored: apps {bad_apps}, hosts {bad_hosts}")

    # -- stalls, memory, stops
    for g, v in n.get("max_stall_s", {}).items():
        if v > cfg.max_stall_s:
            res.fail(f"{g} stalled {v:.0f}s (lag > 0, no progress; limit {cfg.max_stall_s:.0f}s)")
    for name in ("worker", "sink"):
        if n.get(f"rss_{name}_mb", 0) > cfg.max_rss_mb:
            res.fail(f"{name} RSS {n[f'rss_{name}_mb']:.0f} MiB > {cfg.max_rss_mb:.0f} MiB")
        if n.get(f"stop_{name}_s", 0) > cfg.max_stop_s:
            res.fail(f"{name} took {n[f'stop_{name}_s']:.1f}s to stop on SIGTERM (limit {cfg.max_stop_s:.0f}s)")
    n["controls_metrics"] = {k: v for k, v in n.get("stream_metrics", {}).items()
                             if ("control" in k or "reject" in k or "policy_version" in k) and "_created" not in k}


def report(cfg: Config, res: Result) -> str:
    """The summary as Markdown for docs/BENCHMARKS.md."""
    n = res.numbers
    lines = [n.get("machine", ""), "",
             f"run: {cfg.minutes:g} min of traffic, {cfg.agents} agents every {cfg.batch_interval_s:g} s, "
             f"{cfg.bad_per_minute:g} bad messages/min, {cfg.partitions} partitions, stream max_batch_events "
             f"{cfg.max_batch_events:,}; total wall clock {n.get('run_s', 0):.0f} s, "
             f"drain {n.get('drain_s', 0):.0f} s", "",
             "| good events | produced | stored exactly once | missing | duplicated |", "|---|---:|---:|---:|---:|"]
    for k, (p, once, missing, dup) in sorted(n.get("good", {}).items()):
        lines.append(f"| {k} | {p:,} | {once:,} | {missing:,} | {dup:,} |")
    lines += ["", f"rows stored {n.get('rows_stored', 0):,}, distinct event ids {n.get('distinct_stored', 0):,}, "
              f"sink rows inserted {n.get('sink_rows_inserted')}", "",
              "| bad kind | produced | expected | dead-lettered | reasons | events stored (or accepted) |",
              "|---|---:|---|---:|---|---:|"]
    never = n.get("never", {})
    bad = n.get("bad", {})
    for k in [k for k in KINDS if k in bad]:
        row = bad[k]
        reasons = ", ".join(f"{r} {c}" for r, c in sorted(row["reasons"].items())) or "–"
        st = never.get(k, [0, 0])
        stored_ = row.get("stored_note") or (f"{row['accepted']} accepted" if "accepted" in row
                                             else f"{st[1]:,} of {st[0]:,}")
        lines.append(f"| {k} | {row['produced']:,} | {row['expect']} | {row['deadlettered']:,} | {reasons} | "
                     f"{stored_} |")
    for k in ("in_pause", "in_exemption"):
        if k in never:
            lines.append(f"| good traffic {k.replace('_', ' ')} window (forged controls written) | – | "
                         f"not stored | – | – | {never[k][1]:,} of {never[k][0]:,} |")
    shots = n.get("screenshots", {})
    stall = ", ".join(f"{g} {v:.0f} s" for g, v in n.get("max_stall_s", {}).items())
    lines += ["", "| check | value |", "|---|---|",
              f"| secrets stored verbatim (LIKE on title/url/text) | {sum(n.get('secrets_verbatim', {}).values())} "
              f"{sorted(n.get('secrets_verbatim', {}))} |",
              f"| accepted screenshots with a secret in the url header | "
              f"{shots.get('accepted_urls_with_secret', '–')} |",
              f"| rows outside the allowlist stored | {n.get('not_allowlisted_stored', {})} |",
              f"| longest stored window title | {n.get('longest_stored_title', 0):,} chars |",
              f"| max RSS worker / sink | {n.get('rss_worker_mb', 0):.0f} / {n.get('rss_sink_mb', 0):.0f} MiB |",
              f"| longest stall (lag > 0, no committed progress) | {stall} |",
              f"| stop on SIGTERM worker / sink | {n.get('stop_worker_s', 0):.1f} / {n.get('stop_sink_s', 0):.1f} s |",
              f"| dead-letter topics (messages) | {n.get('deadletter_topics', {})} |",
              f"| dead letters not attributable | {n.get('deadletter_unattributed', {})} |",
              f"| control metrics | {n.get('controls_metrics', {})} |"]
    lines += ["", f"invariants: {'ALL HOLD' if not res.failures else f'{len(res.failures)} FAILED'}"]
    lines += [f"- FAIL: {f}" for f in res.failures]
    return "\n".join(lines)


@contextlib.contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP end the run like Ctrl-C: cleanup in ``finally`` runs (SIGINT too,
    because a shell starting the run in the background leaves it ignored)."""
    def raise_(*_: Any) -> None:
        raise KeyboardInterrupt

    old = {sig: signal.signal(sig, raise_) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.hostile_input", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    ap.add_argument("--minutes", type=float, default=d.minutes, help="length of the traffic phase")
    ap.add_argument("--agents", type=int, default=d.agents, help="simulated agents (good traffic)")
    ap.add_argument("--batch-interval", type=float, default=d.batch_interval_s,
                    help="seconds between an agent's batches")
    ap.add_argument("--bad-per-minute", type=float, default=d.bad_per_minute,
                    help="bad messages per minute (weighted kinds)")
    ap.add_argument("--partitions", type=int, default=d.partitions, help="partitions of every keyed topic (>= 2)")
    ap.add_argument("--max-batch-events", type=int, default=d.max_batch_events,
                    help="the stream's event limit per batch")
    ap.add_argument("--kinds", nargs="*", default=list(d.kinds), choices=list(KINDS), help="bad kinds to send")
    ap.add_argument("--no-forged-controls", action="store_true", help="do not write forged controls")
    ap.add_argument("--deadletter-topic", action="append", default=[],
                    help="another dead-letter topic to read ({prefix} is replaced); every Topics field named "
                         "*deadletter* is read anyway")
    ap.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s, help="longest wait to drain, seconds")
    ap.add_argument("--hard-limit", type=float, default=None, help="wall-clock limit of the whole run, seconds")
    ap.add_argument("--max-rss-mb", type=float, default=d.max_rss_mb, help="worker and sink RSS bound")
    ap.add_argument("--max-stall", type=float, default=d.max_stall_s, help="longest tolerated stall, seconds")
    ap.add_argument("--max-stop", type=float, default=d.max_stop_s, help="longest tolerated stop on SIGTERM, seconds")
    ap.add_argument("--max-stored-field-bytes", type=int, default=d.max_stored_field_bytes,
                    help="a stored title longer than this counts as not truncated")
    ap.add_argument("--lenient-reasons", action="store_true", help="any dead-letter reason will do")
    ap.add_argument("--bootstrap", default=None, help="use this Kafka cluster (else HANDTRACE_TEST_BOOTSTRAP, else "
                                                      "a local broker is started)")
    ap.add_argument("--clickhouse-dsn", default=None, help="a ClickHouse server (default: embedded, in a temp dir)")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    a = ap.parse_args(argv)
    if a.partitions < 2:
        ap.error("--partitions must be >= 2 (the wrong-partition kind needs another partition)")
    cfg = Config(minutes=a.minutes, agents=a.agents, batch_interval_s=a.batch_interval, bad_per_minute=a.bad_per_minute,
                 partitions=a.partitions, max_batch_events=a.max_batch_events, drain_timeout_s=a.drain_timeout,
                 hard_limit_s=a.hard_limit, max_rss_mb=a.max_rss_mb, max_stall_s=a.max_stall, max_stop_s=a.max_stop,
                 max_stored_field_bytes=a.max_stored_field_bytes, strict_reasons=not a.lenient_reasons,
                 kinds=tuple(a.kinds), forged_controls=not a.no_forged_controls,
                 deadletter_topics=tuple(a.deadletter_topic), bootstrap=a.bootstrap, clickhouse_dsn=a.clickhouse_dsn,
                 seed=a.seed, keep=a.keep)
    try:
        with _terminate_as_interrupt():
            res = run(cfg)
    except KeyboardInterrupt:
        print("interrupted; everything started was stopped", file=sys.stderr)
        return 130
    print()
    print(res.table)
    return 0 if not res.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
