"""The upload policy of submitted demonstrations (agent/demo_upload.py) without a broker: when it
may send (power, metered network, unknown network), what it sends in which order, and that a
failed delivery keeps the recording for a whole re-send. The real broker: tests/integration/
test_demo_upload.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from handtrace.agent.demo_upload import DemoUploader, NetworkState, nm_network_state, parse_nmcli_devices
from handtrace.core import codec
from handtrace.core.clock import HEADER_SENT_AT
from handtrace.core.settings import DemoSettings
from tests.unit.test_demo_recorder import Rig, recorded

UNMETERED = NetworkState(False, True, "test")


class FakeError:
    def __init__(self, name: str) -> None:
        self._name = name

    def name(self) -> str:
        return self._name


class FakeProducer:
    """Records what is produced; ``fail`` names the error reported for message number N."""

    def __init__(self, conf: dict[str, Any], fail: dict[int, str] | None = None) -> None:
        self.conf = conf
        self.sent: list[tuple[str, bytes, bytes, dict[str, bytes]]] = []
        self._pending: list[Any] = []
        self.fail = fail or {}

    def produce(self, topic: str, *, value: bytes, key: bytes, headers: list[tuple[str, bytes]],
                on_delivery: Any) -> None:
        self.sent.append((topic, key, value, dict(headers)))
        self._pending.append(on_delivery)

    def poll(self, _t: float = 0) -> int:
        return 0

    def flush(self, _t: float = 0) -> int:
        for i, cb in enumerate(self._pending):
            err = self.fail.get(len(self.sent) - len(self._pending) + i)
            cb(FakeError(err) if err else None, None)
        self._pending = []
        return 0

    def purge(self) -> None:
        self._pending = []


def rig_with_uploader(tmp_path: Path, *, battery: bool = False, net: NetworkState = UNMETERED,
                      fail: dict[int, str] | None = None, **demo: Any) -> tuple[Rig, DemoUploader, list[FakeProducer]]:
    rig = Rig(tmp_path, **demo)
    made: list[FakeProducer] = []

    def factory(conf: dict[str, Any]) -> FakeProducer:
        made.append(FakeProducer(conf, fail))
        return made[-1]

    up = DemoUploader(rig.rec.store, DemoSettings(**demo), {"bootstrap.servers": "x"}, "t.demonstrations.raw",
                      battery_fn=lambda: battery, network_fn=lambda: net, producer_factory=factory,
                      clock=rig.clock)
    return rig, up, made


def test_nothing_is_sent_before_submit(tmp_path: Path) -> None:
    rig, up, made = rig_with_uploader(tmp_path)
    recorded(rig)
    r = up.upload_pending()
    assert r.uploaded == [] and r.waiting == 0 and made == []


def test_header_first_then_one_message_per_manifest_frame_then_deleted(tmp_path: Path) -> None:
    rig, up, made = rig_with_uploader(tmp_path)
    rid = recorded(rig)
    rig.rec.trim(rid, steps=[1])
    rig.rec.submit(rid)
    meta = rig.meta(rid)
    r = up.upload_pending()
    assert r.uploaded == [rid] and not (rig.root / rid).exists()
    (p,) = made
    assert p.conf["enable.idempotence"] is True and p.conf["acks"] == "all"
    assert p.conf["message.max.bytes"] >= DemoSettings().max_frame_bytes
    topics = {t for t, *_ in p.sent}
    keys = {k for _t, k, *_ in p.sent}
    assert topics == {"t.demonstrations.raw"} and keys == {b"emp-1"}
    _t, _k, value, h = p.sent[0]
    assert h["ht-part"] == b"demonstration" and h["ht-demo-id"] == bytes.fromhex(rid) and HEADER_SENT_AT in h
    rec = codec.decode_record(value, "demonstration")
    assert int(h["ht-frames"]) == len(rec["frames"]) == len(p.sent) - 1
    assert rec["instruction"] == meta["instruction"] and len(rec["events"]) == meta["events"]
    for f, (_t, _k, img, fh) in zip(rec["frames"], p.sent[1:], strict=True):
        assert fh["ht-part"] == b"frame" and fh["ht-demo-id"] == bytes.fromhex(rid)
        assert fh["ht-sha256"] == f["sha256"].hex().encode() and fh["ht-format"] == b"png"
        assert fh["ht-device-id"] == b"dev-1" and HEADER_SENT_AT in fh
        assert json.loads(fh["ht-windows"]) == [[w["app_id"], w["url"]] for w in f["windows"]]
        assert int(fh["ht-captured-at-us"]) == int(f["captured_at_us"].timestamp() * 1_000_000)
        assert hashlib.sha256(img).digest() == f["sha256"]


def test_a_failed_delivery_keeps_the_recording_for_a_whole_resend(tmp_path: Path) -> None:
    rig, up, made = rig_with_uploader(tmp_path, fail={2: "_MSG_TIMED_OUT"})
    rid = recorded(rig)
    rig.rec.submit(rid)
    r = up.upload_pending()
    assert r.uploaded == [] and r.reason == "offline" and rig.meta(rid)["status"] == "submitted"
    assert up.status()["reason"] == "offline" and up.status()["waiting"] == 1
    up.producer_factory = lambda conf: made.append(FakeProducer(conf)) or made[-1]
    assert up.upload_pending().uploaded == [rid]
    first, second = made
    assert [h["ht-sha256"] for *_x, h in first.sent[1:]] == [h["ht-sha256"] for *_x, h in second.sent[1:]]
    assert first.sent[0][3]["ht-demo-id"] == second.sent[0][3]["ht-demo-id"]  # same id: deduplicated downstream


def test_a_corrupt_frame_file_is_left_out_of_the_manifest_for_good(tmp_path: Path) -> None:
    rig, up, made = rig_with_uploader(tmp_path)
    rid = recorded(rig)
    rig.rec.submit(rid)
    bad = sorted((rig.root / rid / "frames").iterdir())[0]
    bad.write_bytes(b"bitrot")
    assert up.upload_pending().uploaded == [rid]
    (p,) = made
    rec = codec.decode_record(p.sent[0][2], "demonstration")
    shas = [f["sha256"].hex() for f in rec["frames"]]
    assert bad.name.split(".")[0] not in shas and len(p.sent) == 1 + len(shas) == 6  # 7 frames, 1 lost
    assert all(hashlib.sha256(v).hexdigest() == h["ht-sha256"].decode() for _t, _k, v, h in p.sent[1:])


def test_big_recordings_are_flushed_in_parts_and_a_failure_stops_the_upload(tmp_path: Path) -> None:
    rig, up, made = rig_with_uploader(tmp_path, fail={3: "MSG_SIZE_TOO_LARGE"}, frame_bytes=3 << 20)
    rid = recorded(rig, clicks=8, typing=False)
    rig.rec.submit(rid)
    r = up.upload_pending()
    assert r.reason == "error" and rig.meta(rid)["status"] == "submitted"
    (p,) = made
    assert 6 <= len(p.sent) < 1 + 10  # stopped after the part that failed, not the whole recording


@pytest.mark.parametrize(("battery", "net", "cfg", "reason"), [
    (True, UNMETERED, {}, "battery"),
    (True, UNMETERED, {"upload_on_battery": True}, None),
    (False, NetworkState(True, True, "nmcli"), {}, "metered"),
    (False, NetworkState(True, True, "nmcli"), {"upload_on_metered": True}, None),
    (False, NetworkState(None, True, "unknown"), {}, None),
    (False, NetworkState(None, None, "unknown"), {"unknown_network_metered": True}, "metered"),
    (False, NetworkState(None, False, "nmcli"), {}, "offline"),
])
def test_uploads_wait_for_power_and_an_unmetered_network(tmp_path: Path, battery: bool, net: NetworkState,
                                                         cfg: dict[str, Any], reason: str | None) -> None:
    rig, up, made = rig_with_uploader(tmp_path, battery=battery, net=net, **cfg)
    rid = recorded(rig, clicks=1, typing=False)
    rig.rec.submit(rid)
    r = up.upload_pending()
    assert r.reason == reason
    assert (made == [] and rig.meta(rid)["status"] == "submitted") if reason else r.uploaded == [rid]
    if reason:
        assert up.status()["reason"] == reason and up.status()["detail"]


NMCLI = """GENERAL.DEVICE:wlp2s0
GENERAL.TYPE:wifi
GENERAL.STATE:100 (connected)
GENERAL.METERED:{wifi}

GENERAL.DEVICE:enp0s31f6
GENERAL.TYPE:ethernet
GENERAL.STATE:20 (unavailable)
GENERAL.METERED:unknown

GENERAL.DEVICE:lo
GENERAL.TYPE:loopback
GENERAL.STATE:100 (connected (externally))
GENERAL.METERED:unknown
"""


@pytest.mark.parametrize(("wifi", "metered"), [("no (guessed)", False), ("no", False), ("yes", True),
                                                ("yes (guessed)", True), ("unknown", None)])
def test_nmcli_metered_state(wifi: str, metered: bool | None) -> None:
    st = parse_nmcli_devices(NMCLI.format(wifi=wifi))
    assert (st.metered, st.online) == (metered, True)


def test_nmcli_offline_and_missing() -> None:
    assert parse_nmcli_devices(NMCLI.format(wifi="no").replace("100 (connected)\n", "30 (disconnected)\n", 1)
                               ).online is False

    def failing(*_a: Any, **_k: Any) -> Any:
        raise subprocess.TimeoutExpired("nmcli", 5)

    st = nm_network_state(failing)
    assert st.metered is None and st.online is None
