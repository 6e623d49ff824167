"""The agent's on-disk spool: round trips, restarts, torn tails, corruption, the bound, format
versions, and a property test that no unacked entry is ever lost uncounted and no acked one
ever comes back. (Temporary directories only; no network.)"""

from __future__ import annotations

import os
import random
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from handtrace.agent.spool import (
    FORMAT_VERSION,
    HEADER_BYTES,
    RECORD_OVERHEAD,
    ROLES,
    Spool,
    SpoolEntry,
    SpoolFormatError,
)

pytestmark = pytest.mark.timeout(120)


def ev(i: int, size: int = 200, role: str = "events", events: int = 3) -> SpoolEntry:
    rng = random.Random(i)
    return SpoolEntry(role, f"emp-{i % 3}".encode(), rng.randbytes(size), events if role == "events" else 0,
                      (("x-seq-hint", str(i).encode()),))


def open_spool(d: Path, **kw: object) -> Spool:
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("segment_bytes", 4096)
    kw.setdefault("fsync", False)
    return Spool(d, **kw)  # type: ignore[arg-type]


def segments(d: Path, lane: str = "main") -> list[Path]:
    return sorted(d.glob(f"seg-{lane}-*.htsp"))


def record_offsets(path: Path) -> list[int]:
    data = path.read_bytes()
    pos, out = HEADER_BYTES, []
    while pos + RECORD_OVERHEAD <= len(data):
        out.append(pos)
        pos += RECORD_OVERHEAD + struct.unpack_from("<I", data, pos)[0]
    return out


def test_append_pending_ack_round_trip(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        entries = [ev(i) for i in range(5)] + [ev(5, role="heartbeats"), ev(6, 3000, role="screenshots")]
        seqs = [sp.append(e) for e in entries]
        assert seqs == list(range(1, 8))
        got = sp.pending(100, 1 << 20)
        assert got == list(zip(seqs, entries, strict=True))
        assert sp.pending(2, 1 << 20) == got[:2]
        assert len(sp.pending(100, 600)) == 2  # ~ limit_bytes of records (255 bytes each)
        assert sp.pending(100, 1) == got[:1]  # always at least one
        assert sp.pending(100, 1 << 20, roles=["screenshots"]) == [got[6]]
        assert sp.ack([1, 2, 4]) == 3
        assert sp.ack([1, 99]) == 0  # done or unknown: ignored
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [3, 5, 6, 7]
        assert sp.ack_through(6, roles=["events", "heartbeats"]) == 3
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [7]
        st_ = sp.stats()
        assert (st_.depth_entries, st_.depth_events, st_.depth_by_role["screenshots"]) == (1, 0, 1)


def test_restart_keeps_unacked_entries_and_seq_continuity(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(40):
            sp.append(ev(i))
        sp.ack(range(1, 31))
        sp.ack([35])
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [31, 32, 33, 34, 36, 37, 38, 39, 40]
        assert sp.pending(100, 1 << 20)[0][1] == ev(30)
        assert sp.next_seq == 41
        assert sp.append(ev(40)) == 41
        sp.ack(range(1, 42))
    # Fully acked: segments are gone, but the seq never goes back.
    with open_spool(tmp_path) as sp:
        assert sp.pending(100, 1 << 20) == []
        assert sp.last_seq == 41 and sp.append(ev(0)) == 42
        assert len(segments(tmp_path)) == 1


def test_fully_acked_segments_are_deleted(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(60):
            sp.append(ev(i))
        before = len(segments(tmp_path))
        sp.ack_through(59)
        assert before > 2 and len(segments(tmp_path)) == 1  # the active one stays
        assert sp.stats().disk_bytes == sum(p.stat().st_size for p in segments(tmp_path))


def test_torn_tail_is_truncated_and_counted_once(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(5):
            sp.append(ev(i))
    seg = segments(tmp_path)[-1]
    with open(seg, "r+b") as f:  # kill -9 in the middle of writing record 5
        f.truncate(seg.stat().st_size - 50)
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [1, 2, 3, 4]
        assert sp.stats().torn_tail_truncated == 1
        assert sp.stats().quarantined == 0
        assert sp.append(ev(9)) == 5  # seq 5 never returned from append: free again
    with open_spool(tmp_path) as sp:
        assert [e for _, e in sp.pending(100, 1 << 20)][-1] == ev(9)
        assert sp.stats().torn_tail_truncated == 1


def test_corrupt_middle_record_is_quarantined_and_the_rest_readable(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(8):
            sp.append(ev(i))
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[record_offsets(seg)[2] + RECORD_OVERHEAD + 30] ^= 0x01  # one bit rots in record 3
    seg.write_bytes(bytes(data))
    with open_spool(tmp_path) as sp:
        got = sp.pending(100, 1 << 20)
        assert [s for s, _ in got] == [1, 2, 4, 5, 6, 7, 8]
        assert [e for _, e in got] == [ev(i) for i in (0, 1, 3, 4, 5, 6, 7)]
        assert sp.stats().quarantined == 1
    assert [p.name.split(".")[-2] for p in (tmp_path / "quarantine").iterdir()] == ["crc"]
    with open_spool(tmp_path) as sp:  # cut out of the segment: not counted again
        assert sp.stats().quarantined == 1
        assert len(sp.pending(100, 1 << 20)) == 7


def test_corrupt_length_field_resyncs(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(8):
            sp.append(ev(i))
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[record_offsets(seg)[3] : record_offsets(seg)[3] + 4] = struct.pack("<I", 0xFFFFFF)
    seg.write_bytes(bytes(data))
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [1, 2, 3, 5, 6, 7, 8]
        assert sp.stats().quarantined == 1 and sp.stats().torn_tail_truncated == 0


def test_corruption_found_while_running_is_quarantined(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(6):
            sp.append(ev(i))
        seg = segments(tmp_path)[0]
        with open(seg, "r+b") as f:  # the disk rots under a running agent
            f.seek(record_offsets(seg)[1] + RECORD_OVERHEAD + 20)
            f.write(b"\xff\xff")
        got = sp.pending(100, 1 << 20)
        assert [s for s, _ in got] == [1, 3, 4, 5, 6]
        assert sp.stats().quarantined == 1
        assert sp.append(ev(6)) == 7  # appends still land where the index expects them
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [1, 3, 4, 5, 6, 7]
        assert sp.pending(100, 1 << 20)[-1][1] == ev(6)
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [1, 3, 4, 5, 6, 7]
        assert sp.stats().quarantined == 1


def test_garbage_segment_file_is_quarantined_not_a_crash(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        sp.append(ev(1))
    (tmp_path / "seg-main-00000000000000000100.htsp").write_bytes(b"not a spool segment at all")
    with open_spool(tmp_path) as sp:
        assert sp.stats().quarantined == 1
        assert len(sp.pending(100, 1 << 20)) == 1


def test_ack_log_torn_tail_is_harmless(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        for i in range(10):
            sp.append(ev(i))
        for s in range(1, 6):
            sp.ack(s)
    acks = tmp_path / "acks.htsa"
    with open(acks, "ab") as f:
        f.write(b"\x01\x02\x03")  # kill -9 mid-ack
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [6, 7, 8, 9, 10]
        sp.ack(6)
    with open_spool(tmp_path) as sp:
        assert [s for s, _ in sp.pending(100, 1 << 20)] == [7, 8, 9, 10]
        assert sp.stats().ack_log_corrupt == 0


def test_bound_drops_screenshots_first_then_oldest_events_and_counts(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=20_000, segment_bytes=4096) as sp:
        for i in range(20):
            sp.append(ev(i, 400))  # ~8.6 KB of events
        for i in range(3):
            sp.append(ev(100 + i, 3000, role="screenshots"))  # ~9 KB of screenshots
        assert sum(sp.stats().dropped_entries.values()) == 0
        for i in range(20, 26):
            sp.append(ev(i, 400))  # over the bound: screenshots go first
        st_ = sp.stats()
        assert st_.dropped_by_role.get("screenshots", 0) >= 1
        assert st_.dropped_by_role.get("events", 0) == 0
        assert st_.disk_bytes <= 20_000
        for i in range(26, 80):
            sp.append(ev(i, 400))  # keep going: now the oldest events go
        st_ = sp.stats()
        assert st_.disk_bytes <= 20_000
        assert st_.dropped_by_role["screenshots"] == 3
        dropped_events = st_.dropped_by_role["events"]
        assert dropped_events > 0
        assert st_.dropped_entries == {"spool_full": 3 + dropped_events}
        assert st_.dropped_events == {"spool_full": 3 * dropped_events}
        left = [s for s, _ in sp.pending(1000, 1 << 30)]
        assert left == list(range(left[0], 84)) and left[-1] == 83  # the newest survive, in order
        assert left[0] == 4 + dropped_events  # the oldest went (3 screenshots in between)
    with open_spool(tmp_path, max_bytes=20_000, segment_bytes=4096) as sp:
        assert sp.stats().dropped_entries == {"spool_full": 3 + dropped_events}  # kept across restarts


def test_entry_larger_than_the_spool_is_dropped_and_counted(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=10_000, segment_bytes=4096) as sp:
        sp.append(ev(1))
        seq = sp.append(ev(2, 20_000, role="screenshots"))
        assert seq == 2
        assert sp.stats().dropped_entries == {"spool_full": 1}
        assert [s for s, _ in sp.pending(10, 1 << 20)] == [1]


def test_unknown_future_format_version_is_refused(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        sp.append(ev(1))
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    struct.pack_into("<H", data, 8, FORMAT_VERSION + 1)
    seg.write_bytes(bytes(data))
    with pytest.raises(SpoolFormatError, match=rf"format version {FORMAT_VERSION + 1}.*newer agent"):
        open_spool(tmp_path)
    assert seg.read_bytes() == bytes(data)  # left untouched for the newer agent


def test_unknown_future_ack_log_version_is_refused(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        sp.append(ev(1))
    acks = tmp_path / "acks.htsa"
    data = bytearray(acks.read_bytes())
    struct.pack_into("<H", data, 8, 7)
    acks.write_bytes(bytes(data))
    with pytest.raises(SpoolFormatError, match="version 7"):
        open_spool(tmp_path)


def test_append_with_gives_the_entry_its_seq(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        sp.append(ev(0))
        seq = sp.append_with(lambda s: SpoolEntry("events", b"k", f"batch seq {s}".encode(), 1))
        assert seq == 2 and sp.pending(10, 1 << 20)[1][1].value == b"batch seq 2"


def test_deadletter_counts_acks_and_keeps_a_copy(tmp_path: Path) -> None:
    with open_spool(tmp_path) as sp:
        s1, s2 = sp.append(ev(1)), sp.append(ev(2))
        sp.deadletter(s1, ev(1), "MSG_SIZE_TOO_LARGE")
        assert [s for s, _ in sp.pending(10, 1 << 20)] == [s2]
        assert sp.stats().deadlettered_entries == {"MSG_SIZE_TOO_LARGE": 1}
        assert sp.stats().deadlettered_events == 3
    dl = (tmp_path / "deadletter" / "deadletter.htsp").read_bytes()
    assert b"MSG_SIZE_TOO_LARGE" in dl and ev(1).value in dl


def test_concurrent_append_and_ack(tmp_path: Path) -> None:
    sp = open_spool(tmp_path, max_bytes=1 << 24, segment_bytes=8192)
    stop = threading.Event()
    acked: list[int] = []

    def ship() -> None:
        while not stop.is_set() or sp.stats().depth_entries:
            got = sp.pending(7, 1 << 20)
            sp.ack([s for s, _ in got])
            acked.extend(s for s, _ in got)

    t = threading.Thread(target=ship)
    t.start()
    seqs = [sp.append(ev(i, 100)) for i in range(500)]
    stop.set()
    t.join(30)
    assert sorted(acked) == seqs == list(range(1, 501))
    sp.close()


def test_entry_validation() -> None:
    with pytest.raises(ValueError, match="topic_role"):
        SpoolEntry("pictures", b"k", b"v")
    with pytest.raises(ValueError, match="max_bytes"):
        Spool(Path(tempfile.gettempdir()) / "never-created", max_bytes=1000, segment_bytes=4096)


# ---------------------------------------------------------------- property


_KIND = {0: "append", 1: "append", 2: "append", 3: "append", 4: "append", 5: "append",
         6: "ack", 7: "ack_oldest", 8: "reopen"}  # appends outnumber acks: the bound is reached
OPS = st.lists(
    st.tuples(st.sampled_from(sorted(_KIND)).map(_KIND.get), st.sampled_from(ROLES), st.integers(0, 2500),
              st.integers(0, 20), st.lists(st.integers(0, 40), max_size=3)),
    min_size=5,
    max_size=80,
)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, seed=st.integers(0, 2**32 - 1))
def test_property_no_unacked_entry_lost_uncounted_no_acked_entry_returned(ops: list[tuple], seed: int) -> None:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        kw = {"max_bytes": 7_000, "segment_bytes": 2048, "fsync": False}
        sp = Spool(d, **kw)  # type: ignore[arg-type]
        model: dict[int, SpoolEntry] = {}  # what must still be pending
        acked: set[int] = set()
        dropped: set[int] = set()
        last_seq = 0
        try:
            for op in ops:
                before_shots = {s for s, e in model.items() if e.topic_role == "screenshots"}
                kind, role, size, events, picks = op
                if kind == "append":
                    e = SpoolEntry(role, b"k%d" % rng.randrange(5), rng.randbytes(size),
                                   events if role == "events" else 0)
                    new_seq = sp.append(e)
                    assert new_seq > last_seq
                    last_seq = new_seq
                    model[new_seq] = e
                elif kind == "ack":
                    keys = sorted(model)
                    pick = {keys[i % len(keys)] for i in picks} if keys else set()
                    sp.ack(pick | {last_seq + 5})  # plus a seq that does not exist
                    for s in pick:
                        del model[s]
                    acked |= pick
                elif kind == "ack_oldest":
                    got = sp.pending(1 + events % 4, 1 << 30)
                    sp.ack([s for s, _ in got])
                    for s, _ in got:
                        del model[s]
                        acked.add(s)
                else:
                    sp.close()
                    sp = Spool(d, **kw)  # type: ignore[arg-type]
                    assert sp.last_seq >= last_seq
                got = dict(sp.pending(10_000, 1 << 30))
                assert not set(got) & acked, "an acked entry came back"
                assert not set(got) & dropped, "a dropped entry came back"
                assert set(got) <= set(model)
                for s, e in got.items():
                    assert model[s] == e
                lost = set(model) - set(got)
                # Whatever vanished was dropped at the bound, and counted.
                dropped |= lost
                if any(model[s].topic_role != "screenshots" for s in lost):
                    # Events, heartbeats and controls only go once no screenshot is left.
                    assert before_shots <= lost, "events dropped while screenshots were pending"
                for s in lost:
                    del model[s]
                st_ = sp.stats()
                assert sum(st_.dropped_entries.values()) == len(dropped)
                assert st_.depth_entries == len(model)
                assert st_.disk_bytes <= kw["max_bytes"]
            event(f"dropped at the bound: {bool(dropped)}")
            event(f"reopened: {any(op[0] == 'reopen' for op in ops)}")
        finally:
            sp.close()


def test_file_sizes_match_the_accounting(tmp_path: Path) -> None:
    with open_spool(tmp_path, max_bytes=30_000, segment_bytes=4096) as sp:
        for i in range(100):
            sp.append(ev(i, 300, role=random.Random(i).choice(ROLES)))
            if i % 7 == 0:
                sp.ack([s for s, _ in sp.pending(3, 1 << 20)])
        on_disk = sum(os.path.getsize(p) for p in tmp_path.glob("seg-*.htsp"))
        assert sp.stats().disk_bytes == on_disk <= 30_000
