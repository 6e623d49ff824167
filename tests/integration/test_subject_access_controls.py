"""Subject access through the real broker (warehouse/subject.py, issue #14 part S): the controls
an export lists are the person's verified controls on the controls topic -- their pauses,
requests, grants with actor roles and reasons -- never another person's, never a forged record."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from handtrace.control.publish import publish
from handtrace.core import clickhouse
from handtrace.core.clock import now_us
from handtrace.core.controls import control_record, pause_record
from handtrace.core.framestore import LocalStore
from handtrace.core.signing import control_plane_signer, generate_key_pair, private_key_from_b64
from handtrace.sink.schema import migrate
from handtrace.warehouse.subject import controls_from_topic, export_subject

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_the_export_lists_the_persons_verified_controls_only(settings_factory: Any, tmp_path: Path) -> None:
    s = settings_factory(api={"read_timeout_s": 30})
    at = now_us()
    publish(s, pause_record("alice", 10, actor="alice", reason="doctor's call", at_us=at))
    publish(s, control_record("exemption_request", employee_id="alice", actor="alice", role="employee",
                              reason="works council", at_us=at + 1))
    publish(s, control_record("exemption_grant", employee_id="alice", actor="hr-2", role="hr", reason="approved",
                              at_us=at + 2, exemption_effective_at_us=at + 2))
    publish(s, pause_record("bob", 5, actor="bob", reason="private", at_us=at + 3))
    forger = control_plane_signer("forged", private_key_from_b64(generate_key_pair()[0]))
    publish(s, control_record("exemption_revoke", employee_id="alice", actor="mallory", role="hr",
                              reason="forged revoke", at_us=at + 4), signer=forger)

    dsn = f"chdb://{tmp_path / 'ch'}"
    client = clickhouse.connect(dsn)
    try:
        migrate(client, s.clickhouse.database)
        r = export_subject(client, s.clickhouse.database, LocalStore(tmp_path / "frames"), employee_id="alice",
                           employee_key="ab" * 16, out=tmp_path / "out", actor="dpo-1",
                           controls=lambda: controls_from_topic(s))
    finally:
        clickhouse.close(dsn)
    assert not [n for n in r.notes if n.startswith("controls")] and r.counts["controls"] == 3
    with (tmp_path / "out" / "controls.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(c["kind"], c["actor"], c["actor_role"], c["reason"]) for c in rows] == [
        ("pause_start", "alice", "employee", "doctor's call"),
        ("exemption_request", "alice", "employee", "works council"),
        ("exemption_grant", "hr-2", "hr", "approved")]
    assert rows[0]["pause_ends_at"] and rows[2]["exemption_effective_at"]
    text = (tmp_path / "out" / "controls.csv").read_text()
    assert "bob" not in text and "private" not in text and "mallory" not in text
