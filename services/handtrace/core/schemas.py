"""The Avro contracts in schemas/: every version of every schema, addressed by fingerprint.

Layout: ``schemas/<subject>/v<N>.avsc``. Writers use the newest version of a subject; readers
accept any version whose CRC-64-AVRO fingerprint they know (the single-object-encoding prefix of
each message names it), so old agents keep working after a schema change.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

SUBJECTS = ("event_batch", "control_event", "heartbeat", "device_enrollment", "demonstration")
_VERSION_RE = re.compile(r"^v(\d+)\.avsc$")


def schema_dir() -> Path:
    """schemas/ of the source tree, or the copy packaged into the wheel."""
    packaged = Path(__file__).resolve().parents[1] / "_schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[3] / "schemas"


@dataclass(frozen=True)
class SchemaVersion:
    """One stored version of one subject."""

    subject: str
    version: int
    raw: dict[str, Any]
    parsed: Any
    fingerprint: int

    @property
    def fingerprint_le(self) -> bytes:
        """Fingerprint as the 8 little-endian bytes of Avro single-object encoding."""
        return self.fingerprint.to_bytes(8, "little")


def _load(path: Path, subject: str, version: int) -> SchemaVersion:
    raw = json.loads(path.read_text())
    parsed = fastavro.parse_schema(raw, _write_hint=False)
    canonical = to_parsing_canonical_form(parsed)
    # fastavro returns the fingerprint's little-endian bytes as hex; keep the spec's integer.
    fp = int.from_bytes(bytes.fromhex(fingerprint(canonical, "CRC-64-AVRO")), "little")
    return SchemaVersion(subject, version, raw, parsed, fp)


@cache
def versions(subject: str) -> tuple[SchemaVersion, ...]:
    """All versions of a subject, oldest first."""
    folder = schema_dir() / subject
    found = []
    for path in folder.glob("v*.avsc"):
        m = _VERSION_RE.match(path.name)
        if m:
            found.append(_load(path, subject, int(m.group(1))))
    if not found:
        raise FileNotFoundError(f"no schema versions for {subject!r} under {folder}")
    return tuple(sorted(found, key=lambda s: s.version))


def get(subject: str, version: int) -> SchemaVersion:
    """One version of a subject; ValueError naming the known versions if it does not exist."""
    for sv in versions(subject):
        if sv.version == version:
            return sv
    known = ", ".join(f"v{sv.version}" for sv in versions(subject))
    raise ValueError(f"{subject} has no version {version} (known: {known})")


def latest(subject: str) -> SchemaVersion:
    """The version writers use."""
    return versions(subject)[-1]


@cache
def by_fingerprint() -> dict[int, SchemaVersion]:
    """Every known version of every subject, by fingerprint."""
    return {v.fingerprint: v for subject in SUBJECTS for v in versions(subject)}
