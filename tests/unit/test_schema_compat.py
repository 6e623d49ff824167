"""The Avro contracts in schemas/: every version of a subject stays FULL_TRANSITIVE compatible.

FULL_TRANSITIVE: every version can read data written with every other version (a new reader
reads old data -- backward -- and an old reader reads new data -- forward), for all pairs, not
only adjacent ones. Checked with the Apache Avro library's compatibility checker, independent of
fastavro which the codec uses.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import avro.schema
import fastavro
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType
from fastavro.schema import to_parsing_canonical_form

from handtrace.core import schemas

# ---------------------------------------------------------------- the check


def check_full_transitive(subject_versions: Sequence[tuple[int, dict[str, Any]]]) -> list[str]:
    """Problems (empty when compatible) between every pair of ``(version, raw schema)``."""
    parsed = [(v, avro.schema.parse(json.dumps(raw))) for v, raw in subject_versions]
    problems = []
    for i, (old_v, old) in enumerate(parsed):
        for new_v, new in parsed[i + 1 :]:
            for label, (rv, reader), (wv, writer) in (
                ("backward", (new_v, new), (old_v, old)),
                ("forward", (old_v, old), (new_v, new)),
            ):
                # A fresh checker per pair: it memoises results by (reader, writer).
                res = ReaderWriterCompatibilityChecker().get_compatibility(reader, writer)
                if res.compatibility is not SchemaCompatibilityType.compatible:
                    problems.append(
                        f"{label}: v{rv} cannot read v{wv} data: "
                        f"{sorted(map(str, res.incompatibilities))} {sorted(res.messages)} "
                        f"at {sorted(res.locations)}"
                    )
    return problems


def _stored(subject: str) -> list[tuple[int, dict[str, Any]]]:
    return [(sv.version, sv.raw) for sv in schemas.versions(subject)]


def _all_versions() -> list[schemas.SchemaVersion]:
    return [sv for subject in schemas.SUBJECTS for sv in schemas.versions(subject)]


# ---------------------------------------------------------------- the stored contracts


@pytest.mark.parametrize("subject", schemas.SUBJECTS)
def test_versions_are_numbered_from_1_without_gaps(subject: str) -> None:
    nums = [sv.version for sv in schemas.versions(subject)]
    assert nums == list(range(1, len(nums) + 1))
    # A misnamed file (v2.json, V2.avsc, v02.avsc) would be silently ignored by the loader.
    files = {p.name for p in (schemas.schema_dir() / subject).iterdir()}
    assert files == {f"v{n}.avsc" for n in nums}, f"stray files in schemas/{subject}"


@pytest.mark.parametrize("subject", schemas.SUBJECTS)
def test_every_version_is_full_transitive_compatible(subject: str) -> None:
    assert check_full_transitive(_stored(subject)) == []


@pytest.mark.parametrize("sv", _all_versions(), ids=lambda sv: f"{sv.subject}-v{sv.version}")
def test_every_version_reads_itself_with_apache_avro(sv: schemas.SchemaVersion) -> None:
    # Also proves the Apache library parses every schema (the pairwise test needs >= 2 versions).
    s = avro.schema.parse(json.dumps(sv.raw))
    res = ReaderWriterCompatibilityChecker().get_compatibility(s, s)
    assert res.compatibility is SchemaCompatibilityType.compatible


@pytest.mark.parametrize("sv", _all_versions(), ids=lambda sv: f"{sv.subject}-v{sv.version}")
def test_every_version_parses_with_fastavro(sv: schemas.SchemaVersion) -> None:
    parsed = fastavro.parse_schema(copy.deepcopy(sv.raw))
    assert to_parsing_canonical_form(parsed) == to_parsing_canonical_form(sv.parsed)


@pytest.mark.parametrize("subject", schemas.SUBJECTS)
def test_record_name_is_stable_across_versions(subject: str) -> None:
    names = {(sv.raw.get("namespace"), sv.raw["name"]) for sv in schemas.versions(subject)}
    assert len(names) == 1, names


def test_events_is_the_last_field_of_every_event_batch_version() -> None:
    # The fast decoder reads the header fields, then hands the trailing array block to polars.
    for sv in schemas.versions("event_batch"):
        last = sv.raw["fields"][-1]
        assert last["name"] == "events", f"v{sv.version}: last field is {last['name']!r}"
        assert last["type"]["type"] == "array"
        assert last["type"]["items"]["type"] == "record"
        assert [f["name"] for f in sv.raw["fields"]].count("events") == 1


def test_event_fields_stay_flat() -> None:
    # "Flat and nullable (no nested unions)": what the columnar reader decodes whole blocks of.
    complex_types = {"record", "array", "map"}
    for sv in schemas.versions("event_batch"):
        for f in sv.raw["fields"][-1]["type"]["items"]["fields"]:
            t = f["type"]
            if isinstance(t, list):
                assert len(t) == 2 and "null" in t, f"v{sv.version} {f['name']}: union {t}"
                (t,) = [m for m in t if m != "null"]
            if isinstance(t, dict):
                assert t["type"] not in complex_types, f"v{sv.version} {f['name']}: {t}"


def test_fingerprints_are_unique() -> None:
    every = _all_versions()
    fps = [sv.fingerprint for sv in every]
    assert len(set(fps)) == len(fps)
    assert len({sv.fingerprint_le for sv in every}) == len(every)
    assert len(schemas.by_fingerprint()) == len(every)
    for sv in every:
        assert schemas.by_fingerprint()[sv.fingerprint] is sv


# ---------------------------------------------------------------- fingerprint vs the spec

_CRC64_EMPTY = 0xC15D213AA4D7A795
_CRC64_TABLE = []
for _i in range(256):
    _fp = _i
    for _ in range(8):
        _fp = (_fp >> 1) ^ (_CRC64_EMPTY & -(_fp & 1))
    _CRC64_TABLE.append(_fp)


def _crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO exactly as the Avro specification gives it."""
    fp = _CRC64_EMPTY
    for b in data:
        fp = (fp >> 8) ^ _CRC64_TABLE[(fp ^ b) & 0xFF]
    return fp


def test_reference_crc64_matches_the_spec_test_vector() -> None:
    # share/test/data/schema-tests.txt in apache/avro: "int" -> 8247732601305521295.
    assert _crc64_avro(b'"int"') == 8247732601305521295


@pytest.mark.parametrize("sv", _all_versions(), ids=lambda sv: f"{sv.subject}-v{sv.version}")
def test_fingerprint_is_the_spec_crc64_of_the_canonical_form(sv: schemas.SchemaVersion) -> None:
    want = _crc64_avro(to_parsing_canonical_form(sv.parsed).encode())
    assert sv.fingerprint == want
    assert sv.fingerprint_le == want.to_bytes(8, "little")


# ---------------------------------------------------------------- the check can fail


def _event_fields(raw: dict[str, Any]) -> list[dict[str, Any]]:
    return raw["fields"][-1]["type"]["items"]["fields"]  # type: ignore[no-any-return]


def _field(fields: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(f for f in fields if f["name"] == name)


def _add_event_field_without_default(raw: dict[str, Any]) -> None:
    _event_fields(raw).append({"name": "pressure", "type": "float"})


def _remove_event_kind_symbol(raw: dict[str, Any]) -> None:
    _field(_event_fields(raw), "kind")["type"]["symbols"].remove("scroll")


def _add_actor_role_symbol(raw: dict[str, Any]) -> None:
    # An old reader meets a symbol it does not know, and ActorRole has no enum default.
    _field(raw["fields"], "actor_role")["type"]["symbols"].append("auditor")


def _narrow_long_to_int(raw: dict[str, Any]) -> None:
    _field(raw["fields"], "rss_bytes")["type"] = "int"


def _drop_required_field(raw: dict[str, Any]) -> None:
    # An old reader needs `device_id` and the schema gives it no default.
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "device_id"]


BREAKING: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("event_batch", _add_event_field_without_default, "backward", "reader_field_missing_default"),
    ("event_batch", _remove_event_kind_symbol, "backward", "missing_enum_symbols"),
    ("control_event", _add_actor_role_symbol, "forward", "missing_enum_symbols"),
    ("heartbeat", _narrow_long_to_int, "backward", "type_mismatch"),
    ("heartbeat", _drop_required_field, "forward", "reader_field_missing_default"),
]


def _write_versions(root: Path, subject: str, raws: Sequence[dict[str, Any]]) -> None:
    folder = root / subject
    folder.mkdir(parents=True)
    for n, raw in enumerate(raws, start=1):
        (folder / f"v{n}.avsc").write_text(json.dumps(raw, indent=2))


def _load_from(root: Path, subject: str, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict]]:
    """Load ``root/<subject>`` through schemas.versions' own loader, bypassing its cache."""
    monkeypatch.setattr(schemas, "schema_dir", lambda: root)
    return [(sv.version, sv.raw) for sv in schemas.versions.__wrapped__(subject)]


@pytest.mark.parametrize(
    ("subject", "mutate", "direction", "incompatibility"),
    BREAKING,
    ids=[m.__name__.strip("_") for _, m, _, _ in BREAKING],
)
def test_check_reports_an_incompatible_v2(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    subject: str,
    mutate: Callable[[dict[str, Any]], None],
    direction: str,
    incompatibility: str,
) -> None:
    v1 = schemas.latest(subject).raw
    v2 = copy.deepcopy(v1)
    mutate(v2)
    _write_versions(tmp_path, subject, [v1, v2])
    problems = check_full_transitive(_load_from(tmp_path, subject, monkeypatch))
    assert problems, "an incompatible v2 passed the check"
    assert any(p.startswith(f"{direction}:") and incompatibility in p for p in problems), problems


def test_check_accepts_a_compatible_v2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The evolution the contracts allow: a nullable field with a default, a new symbol in an
    # enum that declares a default, and events still last.
    v1 = schemas.latest("event_batch").raw
    v2 = copy.deepcopy(v1)
    fields = _event_fields(v2)
    fields.append({"name": "display_id", "type": ["null", "int"], "default": None})
    _field(fields, "button")["type"]["symbols"].append("back")
    v2["fields"].insert(-1, {"name": "timezone", "type": "string", "default": "UTC"})
    _write_versions(tmp_path, "event_batch", [v1, v2])
    loaded = _load_from(tmp_path, "event_batch", monkeypatch)
    assert [v for v, _ in loaded] == [1, 2]
    assert check_full_transitive(loaded) == []


def test_check_is_transitive_not_only_adjacent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # v1 -> v2 drops `cohort` (it has a default), v2 -> v3 re-adds it as an int with a default:
    # each adjacent pair is compatible, but v1 and v3 disagree on the type of `cohort`.
    v1 = schemas.latest("heartbeat").raw
    v2 = copy.deepcopy(v1)
    v2["fields"] = [f for f in v2["fields"] if f["name"] != "cohort"]
    v3 = copy.deepcopy(v2)
    v3["fields"].append({"name": "cohort", "type": "int", "default": 0})
    assert check_full_transitive([(1, v1), (2, v2)]) == []
    assert check_full_transitive([(2, v2), (3, v3)]) == []
    _write_versions(tmp_path, "heartbeat", [v1, v2, v3])
    problems = check_full_transitive(_load_from(tmp_path, "heartbeat", monkeypatch))
    assert problems
    assert all("v1" in p and "v3" in p for p in problems), problems
    assert {p.split(":")[0] for p in problems} == {"backward", "forward"}
