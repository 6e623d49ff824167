"""The agent's durable on-disk spool: what was captured survives a broker outage and ``kill -9``.

Layout of the spool directory (format version 1)::

    seg-<lane>-<first seq, 20 digits>.htsp   append-only segments; lane ``main`` holds events,
                                             heartbeats and controls, lane ``shot`` screenshots
    acks.htsa                                append-only log of seq ranges that are done
                                             (acknowledged, dropped, quarantined, dead-lettered)
    counters.json                            lifetime drop/quarantine counters (atomic rewrite)
    quarantine/                              bytes of corrupt records, the reason in the name
    deadletter/deadletter.htsp               entries the broker rejected for good (segment format)

A segment starts with a 16-byte header ``b"HTSPOOL\\n" | version u16 | lane u8 | 5 reserved``
followed by records ``[len u32][crc32 u32][seq u64][payload]`` (little endian; the CRC covers
len, seq and payload). The payload of version 1 is ``role u8 | events u32 | appended_at_us u64 |
key_len u16 | key | n_headers u16 | (name_len u16 | name | val_len u32 | val)* | value``.
The ack log has the same style of header (``b"HTSPACK\\n"``) and 24-byte records
``[crc32 u32][kind u8][3 reserved][first u64][last u64]``.

A newer format version than this agent knows is refused (:class:`SpoolFormatError`) rather
than guessed at; older versions stay readable. Crash safety: a torn last record (``kill -9``
mid-write) is truncated on open and counted; a record whose CRC or payload is bad is copied to
``quarantine/``, counted and cut out of its segment (so it is counted once), and shipping goes
on -- corrupt input never becomes a crash loop.

Screenshots live in their own lane so that the bound can drop them first, whole segments at a
time, and so that screenshots held back by the bandwidth budget never pin event segments on disk.

Delivery guarantee: an entry is re-sent after a restart unless its ack reached the ack log.
The window between the broker's ack and the ack-log write (one ``write`` + ``fsync``) can
produce a duplicate after ``kill -9``; downstream deduplicates by event id. Acks are never
lost the other way: nothing is marked done before the caller says so.
"""

from __future__ import annotations

import bisect
import heapq
import json
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

FORMAT_VERSION = 1
ROLES = ("events", "heartbeats", "controls", "screenshots")
_ROLE_CODE = {r: i + 1 for i, r in enumerate(ROLES)}
_CODE_ROLE = {v: k for k, v in _ROLE_CODE.items()}
LANES = ("main", "shot")
_LANE_CODE = {"main": 1, "shot": 2}

SEG_MAGIC = b"HTSPOOL\n"
ACK_MAGIC = b"HTSPACK\n"
_FILE_HEADER = struct.Struct("<8sHB5x")  # magic, version, lane (0 for the ack log)
_REC_HEADER = struct.Struct("<IIQ")  # payload length, crc32, seq
_ACK_REC = struct.Struct("<IB3xQQ")  # crc32, kind, first seq, last seq
_PAYLOAD_FIXED = struct.Struct("<BIQH")  # role, events, appended_at_us, key length
HEADER_BYTES = _FILE_HEADER.size
RECORD_OVERHEAD = _REC_HEADER.size
MAX_RECORD_BYTES = 256 * 1024 * 1024
# A resync candidate must have a seq close above the last good one: a cheap filter that keeps
# the byte-by-byte scan from CRC-checking garbage at every offset.
_RESYNC_SEQ_WINDOW = 1 << 32
_SEG_NAME = re.compile(r"^seg-(main|shot)-(\d{20})\.htsp$")

ACK_DONE, ACK_DROPPED, ACK_QUARANTINED, ACK_DEADLETTER = 1, 2, 3, 4
# Not an ack: the highest seq ever issued, so next_seq never goes back when no segment is left.
ACK_HIGHWATER = 5
_COMPACT_ACK_RECORDS = 4096


class SpoolFormatError(RuntimeError):
    """The spool on disk was written by a newer agent (unknown format version): refuse to touch it."""


@dataclass(frozen=True)
class SpoolEntry:
    """One message waiting for the broker: its topic role, Kafka key, value and headers."""

    topic_role: str
    """One of ``events``, ``heartbeats``, ``controls``, ``screenshots``."""
    key: bytes
    value: bytes
    events: int = 0
    """Captured events inside (an EventBatch's count); 0 for heartbeats and controls."""
    headers: tuple[tuple[str, bytes], ...] = ()

    def __post_init__(self) -> None:
        if self.topic_role not in _ROLE_CODE:
            raise ValueError(f"topic_role must be one of {ROLES}, not {self.topic_role!r}")
        if self.events < 0:
            raise ValueError("events must be >= 0")

    @property
    def size(self) -> int:
        """Payload bytes (key, value and headers): what the bandwidth budget is charged."""
        return len(self.key) + len(self.value) + sum(len(k) + len(v) for k, v in self.headers)


@dataclass
class SpoolStats:
    """Depth now, and lifetime counters (kept across restarts in counters.json)."""

    depth_entries: int = 0
    depth_events: int = 0
    depth_bytes: int = 0
    """Record bytes of the pending entries."""
    disk_bytes: int = 0
    """Bytes of all segment files: what ``max_bytes`` bounds."""
    depth_by_role: dict[str, int] = field(default_factory=dict)
    oldest_pending_us: int | None = None
    """Wall-clock time the oldest pending entry was appended (spool lag)."""
    next_seq: int = 1
    dropped_entries: dict[str, int] = field(default_factory=dict)
    """Entries dropped, by reason (``spool_full``)."""
    dropped_events: dict[str, int] = field(default_factory=dict)
    """Captured events inside the dropped entries, by reason."""
    dropped_by_role: dict[str, int] = field(default_factory=dict)
    deadlettered_entries: dict[str, int] = field(default_factory=dict)
    """Entries moved to deadletter/, by the broker's error name."""
    deadlettered_events: int = 0
    quarantined: int = 0
    """Corrupt records (or unreadable segment files) moved to quarantine/."""
    torn_tail_truncated: int = 0
    """Half-written last records cut off on open (kill -9 during append)."""
    ack_log_corrupt: int = 0
    """Ack-log records with a bad CRC (ignored: at worst a re-send, never a loss)."""


# ---------------------------------------------------------------- encoding


def encode_payload(entry: SpoolEntry, appended_at_us: int) -> bytes:
    """Version-1 payload of one entry."""
    parts = [_PAYLOAD_FIXED.pack(_ROLE_CODE[entry.topic_role], entry.events, appended_at_us, len(entry.key)),
             entry.key, struct.pack("<H", len(entry.headers))]
    for name, val in entry.headers:
        n = name.encode()
        parts += [struct.pack("<H", len(n)), n, struct.pack("<I", len(val)), val]
    parts.append(entry.value)
    return b"".join(parts)


def decode_payload(payload: bytes) -> tuple[SpoolEntry, int]:
    """(entry, appended_at_us) from a version-1 payload; ValueError if it is not one."""
    try:
        role, events, at_us, klen = _PAYLOAD_FIXED.unpack_from(payload, 0)
        pos = _PAYLOAD_FIXED.size
        key = payload[pos : pos + klen]
        pos += klen
        (nh,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        headers = []
        for _ in range(nh):
            (nl,) = struct.unpack_from("<H", payload, pos)
            name = payload[pos + 2 : pos + 2 + nl].decode()
            pos += 2 + nl
            (vl,) = struct.unpack_from("<I", payload, pos)
            val = payload[pos + 4 : pos + 4 + vl]
            pos += 4 + vl
            headers.append((name, val))
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError(f"bad payload: {e}") from e
    if role not in _CODE_ROLE or len(key) != klen or pos > len(payload):
        raise ValueError("bad payload: unknown role or fields past the end")
    return SpoolEntry(_CODE_ROLE[role], key, payload[pos:], events, tuple(headers)), at_us


def frame_record(seq: int, payload: bytes) -> bytes:
    """``[len][crc32][seq][payload]`` -- the CRC covers len, seq and payload."""
    ls = struct.pack("<I", len(payload)), struct.pack("<Q", seq)
    crc = zlib.crc32(payload, zlib.crc32(ls[1], zlib.crc32(ls[0])))
    return _REC_HEADER.pack(len(payload), crc, seq) + payload


def _record_ok(buf: bytes | memoryview, pos: int) -> tuple[int, int] | None:
    """(payload length, seq) if a whole record with a good CRC starts at ``pos``."""
    if pos + RECORD_OVERHEAD > len(buf):
        return None
    length, crc, seq = _REC_HEADER.unpack_from(buf, pos)
    end = pos + RECORD_OVERHEAD + length
    if length > MAX_RECORD_BYTES or end > len(buf):
        return None
    got = zlib.crc32(buf[pos + 8 : end], zlib.crc32(buf[pos : pos + 4]))
    return (length, seq) if got == crc else None


def _file_header(magic: bytes, lane: int) -> bytes:
    return _FILE_HEADER.pack(magic, FORMAT_VERSION, lane)


def _check_header(data: bytes, magic: bytes, path: Path) -> int | None:
    """The file's format version; None if the header is not ours; SpoolFormatError if newer."""
    if len(data) < HEADER_BYTES:
        return None
    got, version, _lane = _FILE_HEADER.unpack_from(data, 0)
    if got != magic or version == 0:
        return None
    if version > FORMAT_VERSION:
        raise SpoolFormatError(
            f"{path} has spool format version {version}; this agent reads versions <= {FORMAT_VERSION}. "
            "It was written by a newer agent: upgrade the agent (or move the spool directory aside "
            "to start empty, losing what it holds)."
        )
    return int(version)


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, fsync: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        _fsync_dir(path.parent)


# ---------------------------------------------------------------- in-memory index


@dataclass(eq=False)
class _Segment:
    lane: str
    first_seq: int
    path: Path
    size: int = HEADER_BYTES
    last_seq: int = 0
    live: int = 0
    reader: BinaryIO | None = None

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()
            self.reader = None


@dataclass(slots=True, eq=False)
class _Rec:
    seq: int
    seg: _Segment
    offset: int
    length: int  # whole record, header included
    role: str
    events: int
    appended_at_us: int


@dataclass
class _Scan:
    records: list[tuple[int, int, int, SpoolEntry, int]]  # seq, offset, length, entry, at_us
    size: int


def _lane_of(role: str) -> str:
    return "shot" if role == "screenshots" else "main"


class _Ranges:
    """Sorted, merged, inclusive seq ranges (the done set read from the ack log)."""

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        merged: list[list[int]] = []
        for a, b in sorted(ranges):
            if merged and a <= merged[-1][1] + 1:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.ends = [b for _, b in merged]

    def __contains__(self, seq: int) -> bool:
        i = bisect.bisect_right(self.starts, seq) - 1
        return i >= 0 and seq <= self.ends[i]

    def max(self) -> int:
        return self.ends[-1] if self.ends else 0


def _runs(seqs: Iterable[int]) -> Iterator[tuple[int, int]]:
    """Consecutive runs of sorted distinct seqs."""
    start = prev = None
    for s in seqs:
        if prev is not None and s == prev + 1:
            prev = s
            continue
        if start is not None:
            yield start, prev  # type: ignore[misc]
        start = prev = s
    if start is not None:
        yield start, prev  # type: ignore[misc]


# ---------------------------------------------------------------- the spool


class Spool:
    """Durable, bounded, thread-safe FIFO of :class:`SpoolEntry` with persistent acks.

    ``max_bytes`` bounds the segment files on disk (quarantine/ and deadletter/ are bounded
    separately by ``quarantine_max_bytes``). When an append would exceed it, whole oldest
    segments are dropped -- screenshot segments first, then the oldest event segments -- and
    every dropped entry is counted (``spool_full``), never silent.
    """

    def __init__(self, directory: Path, *, max_bytes: int, segment_bytes: int = 4 * 1024 * 1024,
                 fsync: bool = True, quarantine_max_bytes: int = 16 * 1024 * 1024,
                 clock_us: Callable[[], int] = lambda: time.time_ns() // 1000) -> None:
        if segment_bytes < 1024:
            raise ValueError("segment_bytes must be >= 1024")
        if max_bytes < 2 * segment_bytes + 2 * HEADER_BYTES:
            raise ValueError(f"max_bytes ({max_bytes}) must hold at least two segments of "
                             f"segment_bytes ({segment_bytes}) so the bound drops old data, not the new entry")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.quarantine_max_bytes = quarantine_max_bytes
        self._clock_us = clock_us
        self._lock = threading.RLock()
        self._segs: dict[str, list[_Segment]] = {lane: [] for lane in LANES}
        self._writers: dict[str, BinaryIO] = {}
        self._pending: dict[str, dict[int, _Rec]] = {r: {} for r in ROLES}
        self._depth_events = 0
        self._depth_bytes = 0
        self._disk_bytes = 0
        self._next_seq = 1
        self._ack_fh: BinaryIO | None = None
        self._ack_records = 0
        self._counters = self._load_counters()
        self._closed = False
        self._open()

    # ------------------------------------------------------------ public API

    @property
    def next_seq(self) -> int:
        """The seq the next append gets (per device, monotonic across restarts)."""
        with self._lock:
            return self._next_seq

    @property
    def last_seq(self) -> int:
        """The seq of the last append (0 if none ever)."""
        with self._lock:
            return self._next_seq - 1

    def append(self, entry: SpoolEntry) -> int:
        """Store ``entry``; returns its seq. Durable when this returns (with ``fsync``).

        An entry too big for the spool even when empty is dropped and counted (``spool_full``);
        its seq is consumed all the same.
        """
        return self.append_with(lambda _seq: entry)

    def append_with(self, make: Callable[[int], SpoolEntry]) -> int:
        """Build the entry from its seq (under the lock) and store it -- so that a batch header's
        ``seq`` equals the spool seq even with several appending threads."""
        with self._lock:
            self._check_open()
            seq = self._next_seq
            entry = make(seq)
            at_us = self._clock_us()
            rec = frame_record(seq, encode_payload(entry, at_us))
            lane = _lane_of(entry.topic_role)
            if len(rec) + 2 * HEADER_BYTES > self.max_bytes or len(rec) > MAX_RECORD_BYTES:
                self._next_seq = seq + 1
                self._count_drop("spool_full", entry.topic_role, 1, entry.events)
                self._save_counters()
                return seq
            seg = self._active(lane, seq)
            if seg.size > HEADER_BYTES and seg.size + len(rec) > self.segment_bytes:
                self._roll(lane, seq)
            self._make_room(len(rec), seq)
            seg = self._active(lane, seq)
            w = self._writers[lane]
            offset = seg.size
            try:
                w.write(rec)
                w.flush()
                if self.fsync:
                    os.fsync(w.fileno())
            except OSError:
                # Disk full or I/O error: cut the half-written record off so the next append
                # starts where the index thinks the segment ends.
                self._writers.pop(lane).close()
                self._truncate(seg.path, offset)
                raise
            seg.size += len(rec)
            seg.last_seq = seq
            seg.live += 1
            self._disk_bytes += len(rec)
            self._next_seq = seq + 1
            self._index(_Rec(seq, seg, offset, len(rec), entry.topic_role, entry.events, at_us))
            return seq

    def pending(self, limit_entries: int = 1000, limit_bytes: int = 1 << 20,
                roles: Iterable[str] | None = None) -> list[tuple[int, SpoolEntry]]:
        """Unacked entries, oldest first, at most ``limit_entries`` and about ``limit_bytes`` of
        record bytes (always at least one if any is pending). ``roles`` filters by topic role.

        A record found corrupt while reading is quarantined, counted and skipped.
        """
        chosen = list(ROLES) if roles is None else list(roles)
        for r in chosen:
            if r not in _ROLE_CODE:
                raise ValueError(f"unknown role {r!r}")
        with self._lock:
            self._check_open()
            out: list[tuple[int, SpoolEntry]] = []
            total = 0
            bad: list[_Rec] = []
            merged = heapq.merge(*(iter(self._pending[r].values()) for r in chosen), key=lambda x: x.seq)
            for rec in merged:
                if out and (len(out) >= limit_entries or total + rec.length > limit_bytes):
                    break
                entry = self._read(rec)
                if entry is None:
                    bad.append(rec)
                    continue
                out.append((rec.seq, entry))
                total += rec.length
            for rec in bad:
                self._repair(rec.seg)
            return out

    def get(self, seq: int) -> SpoolEntry | None:
        """The pending entry ``seq``; None if it is done, unknown or found corrupt (quarantined)."""
        with self._lock:
            self._check_open()
            rec = self._find(seq)
            if rec is None:
                return None
            entry = self._read(rec)
            if entry is None:
                self._repair(rec.seg)
            return entry

    def ack(self, seqs: int | Iterable[int]) -> int:
        """Mark entries delivered (persisted before this returns); unknown or done seqs are
        ignored. Returns how many were pending."""
        with self._lock:
            self._check_open()
            wanted = [seqs] if isinstance(seqs, int) else sorted(set(seqs))
            return self._done([s for s in wanted if self._find(s) is not None], ACK_DONE)

    def ack_through(self, seq: int, roles: Iterable[str] | None = None) -> int:
        """Ack every pending entry (of ``roles``, default all) with seq <= ``seq``."""
        with self._lock:
            self._check_open()
            chosen = ROLES if roles is None else tuple(roles)
            todo = sorted(s for r in chosen for s in self._pending[r] if s <= seq)
            return self._done(todo, ACK_DONE)

    def deadletter(self, seq: int, entry: SpoolEntry, reason: str) -> None:
        """Move a pending entry the broker rejected for good to deadletter/ (with ``reason`` as a
        header), count it, and mark it done so shipping goes on."""
        with self._lock:
            self._check_open()
            dl = self.directory / "deadletter"
            dl.mkdir(exist_ok=True)
            path = dl / "deadletter.htsp"
            used = path.stat().st_size if path.exists() else 0
            e = SpoolEntry(entry.topic_role, entry.key, entry.value, entry.events,
                           (*entry.headers, ("x-handtrace-deadletter-reason", reason.encode())))
            rec = frame_record(seq, encode_payload(e, self._clock_us()))
            if used + len(rec) <= self.quarantine_max_bytes:
                with open(path, "ab") as f:
                    if used == 0:
                        f.write(_file_header(SEG_MAGIC, 0))
                    f.write(rec)
                    if self.fsync:
                        f.flush()
                        os.fsync(f.fileno())
            else:  # still counted below; only the copy is skipped
                self._counters["deadletter_not_written"] = self._counters.get("deadletter_not_written", 0) + 1
            dle = self._counters["deadlettered_entries"]
            dle[reason] = dle.get(reason, 0) + 1
            self._counters["deadlettered_events"] += entry.events
            self._save_counters()
            if self._find(seq) is not None:
                self._done([seq], ACK_DEADLETTER)

    def stats(self) -> SpoolStats:
        """A snapshot of depth and counters."""
        with self._lock:
            c = self._counters
            oldest = [next(iter(d.values())).appended_at_us for d in self._pending.values() if d]
            return SpoolStats(
                depth_entries=sum(len(d) for d in self._pending.values()),
                depth_events=self._depth_events,
                depth_bytes=self._depth_bytes,
                disk_bytes=self._disk_bytes,
                depth_by_role={r: len(d) for r, d in self._pending.items()},
                oldest_pending_us=min(oldest) if oldest else None,
                next_seq=self._next_seq,
                dropped_entries=dict(c["dropped_entries"]),
                dropped_events=dict(c["dropped_events"]),
                dropped_by_role=dict(c["dropped_by_role"]),
                deadlettered_entries=dict(c["deadlettered_entries"]),
                deadlettered_events=c["deadlettered_events"],
                quarantined=c["quarantined"],
                torn_tail_truncated=c["torn_tail_truncated"],
                ack_log_corrupt=c["ack_log_corrupt"],
            )

    def close(self) -> None:
        """Close every file (idempotent). Everything appended or acked is already durable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._writers.values():
                w.close()
            self._writers.clear()
            for segs in self._segs.values():
                for s in segs:
                    s.close()
            if self._ack_fh is not None:
                self._ack_fh.close()
                self._ack_fh = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ opening

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "quarantine").mkdir(exist_ok=True)
        for tmp in self.directory.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
        done, highwater = self._read_ack_log()
        max_seq = max(done.max(), highwater)
        found: list[tuple[str, int, Path]] = []
        for p in self.directory.iterdir():
            m = _SEG_NAME.match(p.name)
            if m:
                found.append((m.group(1), int(m.group(2)), p))
        for lane, first, path in sorted(found, key=lambda t: (t[0], t[1])):
            data = path.read_bytes()
            version = _check_header(data, SEG_MAGIC, path)  # raises on a newer version
            if version is None:
                self._quarantine_bytes(data, f"{path.name}.whole", "bad_header")
                path.unlink()
                continue
            seg = _Segment(lane, first, path, last_seq=first - 1)
            scan = self._scan_segment(seg, data)
            seg.size = scan.size
            for seq, offset, length, entry, at_us in scan.records:
                seg.last_seq = seq
                max_seq = max(max_seq, seq)
                if seq in done:
                    continue
                seg.live += 1
                self._index(_Rec(seq, seg, offset, length, entry.topic_role, entry.events, at_us))
            self._segs[lane].append(seg)
            self._disk_bytes += seg.size
            max_seq = max(max_seq, first - 1)
        for lane in LANES:
            for seg in list(self._segs[lane][:-1]):
                if seg.live == 0:
                    self._delete_segment(seg)
        self._next_seq = max_seq + 1
        # Pending dicts must iterate in seq order: lanes were scanned one after the other.
        for r in ROLES:
            self._pending[r] = dict(sorted(self._pending[r].items()))
        self._compact_ack_log()
        self._save_counters()

    def _scan_segment(self, seg: _Segment, data: bytes) -> _Scan:
        """Index the good records of one segment; quarantine bad ones and cut them out of the
        file (so each is counted once); truncate a torn tail."""
        good: list[tuple[int, int, int, SpoolEntry, int]] = []
        bad: list[tuple[int, int, str]] = []
        pos = HEADER_BYTES
        last = seg.first_seq - 1
        cut_at: int | None = None
        torn = False
        view = memoryview(data)
        while pos < len(data):
            ok = _record_ok(view, pos)
            reason = "crc"
            if ok is not None:
                length, seq = ok
                if seq > last:
                    try:
                        entry, at_us = decode_payload(data[pos + RECORD_OVERHEAD : pos + RECORD_OVERHEAD + length])
                    except ValueError:
                        reason = "undecodable"
                    else:
                        good.append((seq, pos, RECORD_OVERHEAD + length, entry, at_us))
                        last = seq
                        pos += RECORD_OVERHEAD + length
                        continue
                else:
                    reason = "seq_out_of_order"
            nxt = self._resync(view, pos, last)
            if nxt is not None:
                bad.append((pos, nxt, reason))
                pos = nxt
                continue
            # Nothing good follows. A whole record that is bad is evidence worth keeping; a
            # record cut short is what kill -9 during an append leaves behind.
            if ok is not None or self._complete_record_at(view, pos):
                bad.append((pos, len(data), reason))
            else:
                torn = True
            cut_at = pos
            break
        for a, b, why in bad:
            self._quarantine_bytes(data[a:b], f"{seg.path.name}.{a}", why)
        if torn:
            self._counters["torn_tail_truncated"] += 1
            self._save_counters()
        if not any(b < len(data) for _, b, _ in bad):
            # At most a tail problem: cutting the file short keeps every good record's offset.
            if cut_at is not None:
                self._truncate(seg.path, cut_at)
                return _Scan(good, cut_at)
            return _Scan(good, len(data))
        # Corruption in the middle: rewrite the segment with only the good records.
        out = bytearray(data[:HEADER_BYTES])
        moved = []
        for seq, off, length, entry, at_us in good:
            moved.append((seq, len(out), length, entry, at_us))
            out += data[off : off + length]
        _atomic_write(seg.path, bytes(out), self.fsync)
        return _Scan(moved, len(out))

    @staticmethod
    def _complete_record_at(view: memoryview, pos: int) -> bool:
        if pos + RECORD_OVERHEAD > len(view):
            return False
        (length,) = struct.unpack_from("<I", view, pos)
        return bool(pos + RECORD_OVERHEAD + length <= len(view))

    @staticmethod
    def _resync(view: memoryview, pos: int, last_seq: int) -> int | None:
        """Offset of the next good record after a bad one at ``pos``, or None."""
        if pos + RECORD_OVERHEAD <= len(view):  # first trust the length field
            (length,) = struct.unpack_from("<I", view, pos)
            nxt = pos + RECORD_OVERHEAD + length
            if length <= MAX_RECORD_BYTES and nxt < len(view) and _plausible(view, nxt, last_seq):
                return int(nxt)
        for cand in range(pos + 1, len(view) - RECORD_OVERHEAD + 1):
            if _plausible(view, cand, last_seq):
                return cand
        return None

    def _truncate(self, path: Path, size: int) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)
            if self.fsync:
                os.fsync(f.fileno())

    # ------------------------------------------------------------ the ack log

    def _read_ack_log(self) -> tuple[_Ranges, int]:
        """The done ranges and the highest seq the log mentions."""
        path = self.directory / "acks.htsa"
        if not path.exists():
            return _Ranges(), 0
        data = path.read_bytes()
        if _check_header(data, ACK_MAGIC, path) is None:
            self._quarantine_bytes(data, "acks.htsa.whole", "bad_header")
            self._counters["ack_log_corrupt"] += 1
            return _Ranges(), 0
        ranges = []
        highwater = 0
        pos = HEADER_BYTES
        while pos + _ACK_REC.size <= len(data):
            crc, kind, first, last = _ACK_REC.unpack_from(data, pos)
            if zlib.crc32(data[pos + 4 : pos + _ACK_REC.size]) != crc or first > last:
                self._counters["ack_log_corrupt"] += 1
            elif kind == ACK_HIGHWATER:
                highwater = max(highwater, last)
            else:
                ranges.append((first, last))
            pos += _ACK_REC.size
        # A torn last record (kill -9 during an ack) is ignored here and gone after the
        # compaction that every open ends with, so later appends stay aligned.
        return _Ranges(ranges), highwater

    def _compact_ack_log(self) -> None:
        """Rewrite the ack log as the done seqs that still matter: every seq from the oldest
        live segment up to the last one issued that is not pending."""
        if self._ack_fh is not None:
            self._ack_fh.close()
            self._ack_fh = None
        firsts = [s.first_seq for segs in self._segs.values() for s in segs]
        floor = min(firsts) if firsts else self._next_seq
        pend = sorted(s for d in self._pending.values() for s in d)
        recs: list[bytes] = []
        lo = floor
        for s in [*pend, self._next_seq]:
            if s > lo:
                recs.append(self._ack_record(ACK_DONE, lo, s - 1))
            lo = max(lo, s + 1)
        if self._next_seq > 1:
            recs.append(self._ack_record(ACK_HIGHWATER, self._next_seq - 1, self._next_seq - 1))
        body = _file_header(ACK_MAGIC, 0) + b"".join(recs)
        _atomic_write(self.directory / "acks.htsa", body, self.fsync)
        self._ack_records = len(recs)
        self._ack_fh = open(self.directory / "acks.htsa", "ab")  # noqa: SIM115 -- long-lived

    @staticmethod
    def _ack_record(kind: int, first: int, last: int) -> bytes:
        body = struct.pack("<B3xQQ", kind, first, last)
        return struct.pack("<I", zlib.crc32(body)) + body

    def _log_done(self, seqs: list[int], kind: int) -> None:
        if self._ack_fh is None:
            raise RuntimeError("spool ack log is not open")
        recs = b"".join(self._ack_record(kind, a, b) for a, b in _runs(seqs))
        if not recs:
            return
        self._ack_fh.write(recs)
        self._ack_fh.flush()
        if self.fsync:
            os.fsync(self._ack_fh.fileno())
        self._ack_records += len(recs) // _ACK_REC.size

    # ------------------------------------------------------------ bookkeeping

    def _index(self, rec: _Rec) -> None:
        self._pending[rec.role][rec.seq] = rec
        self._depth_events += rec.events
        self._depth_bytes += rec.length

    def _find(self, seq: int) -> _Rec | None:
        for d in self._pending.values():
            rec = d.get(seq)
            if rec is not None:
                return rec
        return None

    def _forget(self, rec: _Rec) -> None:
        del self._pending[rec.role][rec.seq]
        self._depth_events -= rec.events
        self._depth_bytes -= rec.length
        rec.seg.live -= 1

    def _done(self, seqs: list[int], kind: int) -> int:
        """Persist that ``seqs`` (sorted, pending) are done, then forget them and delete
        segments nothing pending refers to any more."""
        if not seqs:
            return 0
        self._log_done(seqs, kind)
        touched = set()
        for s in seqs:
            rec = self._find(s)
            if rec is not None:
                self._forget(rec)
                touched.add(rec.seg)
        for seg in touched:
            segs = self._segs[seg.lane]
            if seg.live == 0 and seg is not segs[-1] and seg in segs:
                self._delete_segment(seg)
        if self._ack_records > _COMPACT_ACK_RECORDS:
            self._compact_ack_log()
        return len(seqs)

    def _active(self, lane: str, seq: int) -> _Segment:
        """The lane's segment appends go to (created, named after ``seq``, if the lane has none)."""
        segs = self._segs[lane]
        if not segs:
            return self._roll(lane, seq)
        if lane not in self._writers:
            self._writers[lane] = open(segs[-1].path, "ab")  # noqa: SIM115 -- long-lived
        return segs[-1]

    def _roll(self, lane: str, first_seq: int) -> _Segment:
        """Start a new active segment for ``lane`` whose first record will be ``first_seq``;
        the previous one is deleted if nothing in it is pending."""
        old = self._writers.pop(lane, None)
        if old is not None:
            old.close()
        path = self.directory / f"seg-{lane}-{first_seq:020d}.htsp"
        w = open(path, "wb")  # noqa: SIM115 -- long-lived
        w.write(_file_header(SEG_MAGIC, _LANE_CODE[lane]))
        w.flush()
        if self.fsync:
            os.fsync(w.fileno())
            _fsync_dir(self.directory)
        segs = self._segs[lane]
        if segs and segs[-1].live == 0:
            self._delete_segment(segs[-1])
        seg = _Segment(lane, first_seq, path, last_seq=first_seq - 1)
        self._disk_bytes += HEADER_BYTES
        segs.append(seg)
        self._writers[lane] = w
        return seg

    def _delete_segment(self, seg: _Segment) -> None:
        seg.close()
        if seg.lane in self._writers and self._segs[seg.lane] and self._segs[seg.lane][-1] is seg:
            self._writers.pop(seg.lane).close()
        self._segs[seg.lane].remove(seg)
        self._disk_bytes -= seg.size
        seg.path.unlink(missing_ok=True)

    def _make_room(self, need: int, new_seq: int) -> None:
        """Drop whole oldest segments until ``need`` more bytes fit: screenshots first."""
        while self._disk_bytes + need > self.max_bytes:
            victim = self._victim()
            if victim is None:
                return
            recs = sorted((r for d in self._pending.values() for r in d.values() if r.seg is victim),
                          key=lambda r: r.seq)
            for r in recs:
                self._count_drop("spool_full", r.role, 1, r.events)
            if recs:
                self._done([r.seq for r in recs], ACK_DROPPED)
                self._save_counters()
            if victim in self._segs[victim.lane]:
                if victim is self._segs[victim.lane][-1]:
                    self._roll(victim.lane, new_seq)
                else:
                    self._delete_segment(victim)

    def _victim(self) -> _Segment | None:
        """What to free next: a segment holding only done records (no loss), else the oldest
        screenshot segment, else the oldest main segment."""
        candidates = [seg for lane in ("shot", "main") for seg in self._segs[lane] if seg.size > HEADER_BYTES]
        free = [seg for seg in candidates if seg.live == 0]
        pool = free or candidates
        return pool[0] if pool else None

    def _read(self, rec: _Rec) -> SpoolEntry | None:
        seg = rec.seg
        if seg.reader is None:
            seg.reader = open(seg.path, "rb")  # noqa: SIM115 -- cached per segment
        seg.reader.seek(rec.offset)
        data = seg.reader.read(rec.length)
        ok = _record_ok(data, 0)
        if ok is None or ok[1] != rec.seq or len(data) != rec.length:
            return None
        try:
            return decode_payload(data[RECORD_OVERHEAD:])[0]
        except ValueError:
            return None

    def _repair(self, seg: _Segment) -> None:
        """A record of ``seg`` went bad after it was indexed: rescan the segment (quarantining
        and cutting out what is bad) and rebuild its part of the index."""
        if seg not in self._segs[seg.lane]:
            return
        was = {r.seq: r for d in self._pending.values() for r in d.values() if r.seg is seg}
        w = self._writers.pop(seg.lane, None) if self._segs[seg.lane][-1] is seg else None
        if w is not None:
            w.close()
        seg.close()
        for r in was.values():
            self._forget(r)
        self._disk_bytes -= seg.size
        data = seg.path.read_bytes()
        scan = self._scan_segment(seg, data)
        seg.size = scan.size
        self._disk_bytes += seg.size
        seen = set()
        for seq, offset, length, entry, at_us in scan.records:
            if seq in was:
                seen.add(seq)
                seg.live += 1
                self._index(_Rec(seq, seg, offset, length, entry.topic_role, entry.events, at_us))
        lost = sorted(set(was) - seen)
        if lost:  # pending records that the rescan could not keep: done (as quarantined)
            self._log_done(lost, ACK_QUARANTINED)
        for role in ROLES:
            self._pending[role] = dict(sorted(self._pending[role].items()))
        if seg.live == 0 and self._segs[seg.lane][-1] is not seg:
            self._delete_segment(seg)

    # ------------------------------------------------------------ counters

    def _count_drop(self, reason: str, role: str, entries: int, events: int) -> None:
        c = self._counters
        c["dropped_entries"][reason] = c["dropped_entries"].get(reason, 0) + entries
        c["dropped_events"][reason] = c["dropped_events"].get(reason, 0) + events
        c["dropped_by_role"][role] = c["dropped_by_role"].get(role, 0) + entries

    def _quarantine_bytes(self, data: bytes, name: str, reason: str) -> None:
        self._counters["quarantined"] += 1
        qdir = self.directory / "quarantine"
        qdir.mkdir(exist_ok=True)
        used = sum(p.stat().st_size for p in qdir.iterdir() if p.is_file())
        if used + len(data) <= self.quarantine_max_bytes:
            _atomic_write(qdir / f"{name}.{reason}.bin", bytes(data), self.fsync)
        self._save_counters()

    def _load_counters(self) -> dict[str, Any]:
        base: dict[str, Any] = {"version": FORMAT_VERSION, "dropped_entries": {}, "dropped_events": {},
                      "dropped_by_role": {}, "deadlettered_entries": {}, "deadlettered_events": 0,
                      "quarantined": 0, "torn_tail_truncated": 0, "ack_log_corrupt": 0}
        path = self.directory / "counters.json"
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return base
        if not isinstance(saved, dict):
            return base
        for k, v in base.items():
            if type(saved.get(k)) is type(v):
                base[k] = saved[k]
        return base

    def _save_counters(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.directory / "counters.json", json.dumps(self._counters, sort_keys=True).encode(),
                      self.fsync)

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("spool is closed")


def _plausible(view: memoryview, pos: int, last_seq: int) -> bool:
    """A good record starts at ``pos`` with a seq just above ``last_seq`` (resync test)."""
    if pos + RECORD_OVERHEAD > len(view):
        return False
    (seq,) = struct.unpack_from("<Q", view, pos + 8)
    if not last_seq < seq <= last_seq + _RESYNC_SEQ_WINDOW:
        return False
    return _record_ok(view, pos) is not None
