"""Uploading submitted demonstrations (issue #11): only ``submitted`` recordings ever leave the
laptop, only when allowed, whole or retried whole.

When: on mains power (``agent.health.on_battery``) and on an unmetered network, unless
``demo.upload_on_battery`` / ``demo.upload_on_metered``. Metered detection on Linux reads
NetworkManager (``nmcli``): a connected device that NetworkManager calls metered (``yes`` or
``yes (guessed)``, e.g. a phone hotspot) makes the network metered; no connected device at all
is offline. Where the state cannot be read (no nmcli: macOS, Windows, minimal Linux) it is
``unknown`` and treated as ``demo.unknown_network_metered`` says (default: unmetered -- the data
was already submitted by the employee, only the cost is unknown); `handtrace status` shows it.

How: one thread, one upload at a time, with its own idempotent producer (acks=all, created for
the upload and closed after it: no broker connection while idle). Per recording: the
Demonstration header message first, then one message per manifest frame, all keyed by the
employee id on ``<prefix>.demonstrations.raw`` (one key: one partition, in order). Every delivery
report is checked; only when all are acknowledged is the recording marked ``uploaded`` and
deleted locally. Any failure: it stays ``submitted`` and is re-sent whole later (backoff with
jitter); a kill -9 mid-upload likewise re-sends it whole at the next start, with the same
demonstration id (downstream deduplicates).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from handtrace.agent.demonstrations import DemoStore, encode_header, manifest
from handtrace.core.clock import HEADER_SENT_AT, now_us
from handtrace.core.settings import DemoSettings

_OFFLINE_ERRORS = frozenset({"_TRANSPORT", "_MSG_TIMED_OUT", "_ALL_BROKERS_DOWN", "_TIMED_OUT",
                             "_RESOLVE", "NETWORK_EXCEPTION", "REQUEST_TIMED_OUT"})
_NM_CACHE_S = 30.0
_MAX_QUEUED_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class NetworkState:
    """What the uploader knows of the network: ``metered`` True/False/None (unknown), ``online``
    True/False/None (unknown), and where it comes from."""

    metered: bool | None
    online: bool | None
    source: str


def parse_nmcli_devices(text: str) -> NetworkState:
    """``nmcli -t -f GENERAL.DEVICE,GENERAL.TYPE,GENERAL.STATE,GENERAL.METERED device show``."""
    devices: list[dict[str, str]] = []
    cur: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, value = line.partition(":")
        name = name.split(".", 1)[-1]
        if name == "DEVICE" and cur:
            devices.append(cur)
            cur = {}
        cur[name] = value.replace("\\:", ":").strip()
    if cur:
        devices.append(cur)
    connected = [d for d in devices if d.get("STATE", "").startswith("100") and d.get("TYPE") != "loopback"
                 and d.get("DEVICE") != "lo"]
    if not connected:
        return NetworkState(None, False, "nmcli")
    metered = [d.get("METERED", "unknown").lower() for d in connected]
    if any(m.startswith("yes") for m in metered):
        return NetworkState(True, True, "nmcli")
    if all(m.startswith("no") for m in metered):
        return NetworkState(False, True, "nmcli")
    return NetworkState(None, True, "nmcli")


def nm_network_state(run: Callable[..., Any] = subprocess.run) -> NetworkState:
    """The network as NetworkManager sees it; unknown without nmcli (or when it fails)."""
    nmcli = shutil.which("nmcli")
    if nmcli is None:
        return NetworkState(None, None, "unknown (no NetworkManager)")
    try:
        r = run([nmcli, "-t", "-f", "GENERAL.DEVICE,GENERAL.TYPE,GENERAL.STATE,GENERAL.METERED", "device", "show"],
                capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return NetworkState(None, None, "unknown (nmcli failed)")
    if r.returncode != 0:
        return NetworkState(None, None, "unknown (nmcli failed)")
    return parse_nmcli_devices(r.stdout)


class _CachedNetwork:
    def __init__(self, fn: Callable[[], NetworkState]) -> None:
        self.fn = fn
        self._at = -1e18
        self._value = NetworkState(None, None, "unknown")

    def __call__(self) -> NetworkState:
        if time.monotonic() - self._at >= _NM_CACHE_S:
            self._value = self.fn()
            self._at = time.monotonic()
        return self._value


class UploadFailed(RuntimeError):
    """An upload attempt did not get every delivery acknowledged; ``offline`` when the errors say
    the broker could not be reached."""

    def __init__(self, msg: str, *, offline: bool = False) -> None:
        super().__init__(msg)
        self.offline = offline


@dataclass
class UploadResult:
    """What one :meth:`DemoUploader.upload_pending` pass did."""

    uploaded: list[str]
    waiting: int
    reason: str | None
    """Why recordings wait: battery | metered | offline | error | None."""


class DemoUploader:
    """Sends submitted recordings when allowed. :meth:`start` runs it as a thread; tests and the
    benchmark call :meth:`upload_pending` themselves."""

    def __init__(self, store: DemoStore, cfg: DemoSettings, producer_conf: dict[str, Any], topic: str, *,
                 battery_fn: Callable[[], bool], network_fn: Callable[[], NetworkState] | None = None,
                 producer_factory: Callable[[dict[str, Any]], Any] | None = None,
                 clock: Callable[[], int] = now_us) -> None:
        self.store = store
        self.cfg = cfg
        self.topic = topic
        self.conf = {**producer_conf, "enable.idempotence": True, "acks": "all",
                     "message.max.bytes": max(int(producer_conf.get("message.max.bytes", 0) or 0),
                                              cfg.max_frame_bytes + 64 * 1024),
                     "compression.type": producer_conf.get("compression.type", "zstd"),
                     "message.timeout.ms": int(cfg.upload_timeout_s * 1000)}
        self.battery_fn = battery_fn
        self.network_fn = network_fn or _CachedNetwork(nm_network_state)
        self.producer_factory = producer_factory or _confluent_producer
        self.clock = clock
        self._upload_lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reason: str | None = None
        self.detail: str | None = None
        self.uploading: str | None = None
        self.failures = 0
        self.next_attempt_at: float | None = None
        self.uploaded_total = 0
        self.last_network = NetworkState(None, None, "not checked yet")

    # ------------------------------------------------------------------ policy
    def gate(self) -> tuple[str | None, str | None]:
        """(reason, detail) why uploading must wait now, or (None, None)."""
        if not self.cfg.upload_on_battery and self.battery_fn():
            return "battery", "on battery: uploads wait for mains power (HANDTRACE_DEMO__UPLOAD_ON_BATTERY)"
        net = self.network_fn()
        self.last_network = net
        if net.online is False:
            return "offline", f"no network connection ({net.source})"
        metered = net.metered if net.metered is not None else self.cfg.unknown_network_metered
        if metered and not self.cfg.upload_on_metered:
            why = "metered network" if net.metered else f"network metering unknown ({net.source}), treated as metered"
            return "metered", f"{why}: uploads wait for an unmetered one (HANDTRACE_DEMO__UPLOAD_ON_METERED)"
        return None, None

    def waiting(self) -> list[str]:
        """Submitted recordings, oldest first."""
        out = []
        for rid in self.store.ids():
            try:
                if self.store.load_meta(rid).get("status") == "submitted":
                    out.append(rid)
            except (OSError, ValueError):
                continue
        return out

    # ------------------------------------------------------------------ one pass
    def upload_pending(self) -> UploadResult:
        """Upload every submitted recording now if allowed (one at a time); stops at the first
        failure (the rest wait for the next attempt)."""
        with self._upload_lock:
            pending = self.waiting()
            if not pending:
                self.reason = self.detail = None
                return UploadResult([], 0, None)
            reason, detail = self.gate()
            if reason is not None:
                self.reason, self.detail = reason, detail
                return UploadResult([], len(pending), reason)
            done: list[str] = []
            for rid in pending:
                try:
                    self.upload(rid)
                except UploadFailed as e:
                    self.failures += 1
                    self.reason = "offline" if e.offline else "error"
                    self.detail = str(e)
                    return UploadResult(done, len(pending) - len(done), self.reason)
                done.append(rid)
            self.failures = 0
            self.reason = self.detail = None
            return UploadResult(done, 0, None)

    def upload(self, rid: str) -> None:
        """Send one submitted recording whole; mark it uploaded and delete it locally only when
        every message was acknowledged (UploadFailed otherwise; it stays submitted)."""
        with self.store.lock:
            try:
                meta = self.store.load_meta(rid)
            except FileNotFoundError:  # deleted meanwhile: nothing to send
                return
            if meta.get("status") != "submitted":  # nothing but submitted recordings ever leaves
                raise UploadFailed(f"recording {rid[:12]} is {meta.get('status')}, not submitted")
            self.store.busy.add(rid)
        self.uploading = rid
        try:
            self._send(rid, meta)
            with self.store.lock:
                meta["status"] = "uploaded"
                meta["uploaded_at_us"] = self.clock()
                self.store.save_meta(rid, meta)
                self.store.busy.discard(rid)
                self.store.delete(rid)
            self.uploaded_total += 1
        finally:
            self.store.busy.discard(rid)
            self.uploading = None

    def _check_frames(self, rid: str, meta: dict[str, Any]) -> None:
        """Every frame file must still hold its bytes before anything is sent (the manifest is
        what the sink waits for). One that does not (disk corruption, power loss before the
        page cache reached the disk) is taken out of the recording for good, counted in
        ``frames_lost``: retrying could never send it."""
        lost = 0
        holders = [s for s in meta.get("steps", []) if s.get("frame")]
        for h, k in [*((s, "frame") for s in holders), *([(meta, "end_frame")] if meta.get("end_frame") else [])]:
            f = h[k]
            try:
                ok = hashlib.sha256(self.store.read_frame(rid, f["sha256"], f["format"])).hexdigest() == f["sha256"]
            except OSError:
                ok = False
            if not ok:
                h[k] = None
                lost += 1
        if lost:
            meta["frames_lost"] = meta.get("frames_lost", 0) + lost
            with self.store.lock:
                self.store.save_meta(rid, meta)
                self.store.prune_frames(rid, meta)

    def _send(self, rid: str, meta: dict[str, Any]) -> None:
        self._check_frames(rid, meta)
        frames = manifest(meta)
        sent_at = self.clock()
        value = encode_header(self.store, rid, meta, sent_at_us=sent_at)
        key = meta["employee_id"].encode()
        demo_id = bytes.fromhex(rid)
        reports: list[str | None] = []

        def on_delivery(err: Any, _msg: Any) -> None:
            reports.append(None if err is None else (err.name() if hasattr(err, "name") else str(err)))

        producer = self.producer_factory(self.conf)
        expected = queued = 0
        try:
            headers = [("ht-part", b"demonstration"), ("ht-demo-id", demo_id),
                       ("ht-frames", str(len(frames)).encode()), (HEADER_SENT_AT, str(self.clock()).encode())]
            self._produce(producer, value, key, headers, on_delivery)
            expected += 1
            for f in frames:
                sha = f["sha256"].hex()
                data = self.store.read_frame(rid, sha, f["format"])
                windows = json.dumps([[w.get("app_id"), w.get("url")] for w in f["windows"]]).encode()
                headers = [("ht-part", b"frame"), ("ht-demo-id", demo_id), ("ht-sha256", sha.encode()),
                           ("ht-format", f["format"].encode()),
                           ("ht-captured-at-us", str(f["captured_at_us"]).encode()),
                           ("ht-device-id", meta["device_id"].encode()), ("ht-windows", windows),
                           (HEADER_SENT_AT, str(self.clock()).encode())]
                self._produce(producer, data, key, headers, on_delivery)
                expected += 1
                queued += len(data)
                if queued >= _MAX_QUEUED_BYTES:  # bounded memory: a recording is not held whole
                    if producer.flush(self.cfg.upload_timeout_s) or any(reports):
                        break  # failed: reported below, the rest is not worth sending
                    queued = 0
            left = producer.flush(self.cfg.upload_timeout_s)
        except BufferError as e:
            raise UploadFailed(f"producer queue full: {e}") from None
        except Exception as e:  # noqa: BLE001 -- KafkaException and friends: retry later, whole
            _abandon(producer)
            raise UploadFailed(f"{type(e).__name__}: {e}") from None
        if left or len(reports) != expected or any(reports):
            _abandon(producer)
            errors = [r for r in reports if r]
            offline = bool(left) or (bool(errors) and all(r in _OFFLINE_ERRORS for r in errors))
            raise UploadFailed(f"{expected - reports.count(None)} of {expected} messages not acknowledged"
                               + (f" ({', '.join(sorted(set(errors)))})" if errors else " (timed out)"),
                               offline=offline)

    def _produce(self, producer: Any, value: bytes, key: bytes, headers: list[tuple[str, bytes]],
                 on_delivery: Callable[[Any, Any], None]) -> None:
        deadline = time.monotonic() + self.cfg.upload_timeout_s
        while True:
            try:
                producer.produce(self.topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                producer.poll(0)
                return
            except BufferError:
                if time.monotonic() > deadline:
                    raise
                producer.poll(0.1)

    # ------------------------------------------------------------------ thread
    def wake(self) -> None:
        """A recording was submitted: check at once."""
        self.next_attempt_at = None
        self._wake.set()

    def start(self) -> None:
        """Run :meth:`upload_pending` in a background thread (backoff with jitter on failure)."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="agent-demo-upload", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the thread (an upload in progress is abandoned: it is re-sent whole next time)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(timeout_s, 0.0))
            return not self._thread.is_alive()
        return True

    def _loop(self) -> None:
        delay = 1.0  # first look soon after start: a kill -9 may have left one half-sent
        while not self._stop.is_set():
            self._wake.wait(delay)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                result = self.upload_pending()
            except Exception as e:  # noqa: BLE001 -- never a crash loop; retried later
                self.reason, self.detail = "error", f"{type(e).__name__}: {e}"
                result = UploadResult([], 1, "error")
            if result.reason in ("offline", "error"):
                base = min(self.cfg.upload_retry_max_s, 5.0 * 2 ** min(self.failures, 20))
                delay = base * random.uniform(0.5, 1.0)  # noqa: S311 -- jitter, not crypto
            else:
                delay = self.cfg.upload_check_s
            self.next_attempt_at = time.time() + delay

    def status(self) -> dict[str, Any]:
        """For `handtrace status`: waiting recordings and why, the network as seen."""
        waiting = len(self.waiting())
        net = self.last_network
        return {"waiting": waiting, "uploading": self.uploading, "reason": self.reason if waiting else None,
                "detail": self.detail if waiting else None, "uploaded": self.uploaded_total,
                "next_attempt_at_us": int(self.next_attempt_at * 1e6) if self.next_attempt_at and waiting else None,
                "network": {"metered": net.metered, "online": net.online, "source": net.source,
                            "unknown_treated_as_metered": self.cfg.unknown_network_metered},
                "upload_on_battery": self.cfg.upload_on_battery, "upload_on_metered": self.cfg.upload_on_metered}


def _confluent_producer(conf: dict[str, Any]) -> Any:
    from confluent_kafka import Producer

    return Producer(conf)


def _abandon(producer: Any) -> None:
    """Drop what is still queued (it is re-sent whole next time)."""
    try:
        producer.purge()
        producer.flush(0)
    except Exception:  # noqa: BLE001,S110 -- best effort on an attempt already failed
        pass
