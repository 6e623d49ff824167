"""Provision the committed dashboards (dashboards/*.json) into a Grafana with grafana-client:
one folder, every dashboard overwritten in place by uid (idempotent: pushing twice leaves the
same state), datasource uids rewritten to the target Grafana's.

The JSON names its datasources by the uids that deploy/docker-compose.yml provisions
(``prometheus``, ``clickhouse``); another Grafana passes its own uids. Each target datasource is
looked up first, so a wrong uid fails before anything is written.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException

from handtrace.core.resources import data_dir

DEFAULT_DIR = data_dir("dashboards")
"""The committed dashboards: shipped in the wheel (handtrace/_dashboards), or the checkout's."""
DATASOURCE_TYPES = {"prometheus": "prometheus", "clickhouse": "grafana-clickhouse-datasource"}


class PushError(RuntimeError):
    """Grafana refused or could not be reached; the message says which step."""


@dataclass(frozen=True)
class Pushed:
    """One dashboard as Grafana stored it."""

    uid: str
    title: str
    version: int
    url: str


def load_dashboards(directory: Path = DEFAULT_DIR) -> list[dict[str, Any]]:
    """Every dashboard JSON in ``directory``, in file-name order."""
    files = sorted(directory.glob("*.json"))
    if not files:
        raise PushError(f"no dashboards (*.json) in {directory}; generate them with `python -m dashboards`")
    return [json.loads(f.read_text(encoding="utf-8")) for f in files]


def with_datasources(dashboard: Mapping[str, Any], uids: Mapping[str, str]) -> dict[str, Any]:
    """A copy of ``dashboard`` whose datasource references (by committed uid) use ``uids``."""
    out = copy.deepcopy(dict(dashboard))

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ds = node.get("datasource")
            if isinstance(ds, dict) and ds.get("uid") in uids:
                ds["uid"] = uids[ds["uid"]]
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def push(url: str, token: str | None, *, directory: Path = DEFAULT_DIR, folder_uid: str = "handtrace",
         folder_title: str = "handtrace", datasource_uids: Mapping[str, str] | None = None,
         timeout_s: float = 10.0) -> list[Pushed]:
    """Create the folder if missing, then create or overwrite every dashboard in it."""
    uids = {"prometheus": "prometheus", "clickhouse": "clickhouse", **(datasource_uids or {})}
    dashboards = [with_datasources(d, uids) for d in load_dashboards(directory)]
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout_s)
    used = {ds.get("uid") for d in dashboards for ds in _datasources(d)}
    for committed, uid in sorted(uids.items()):
        if uid not in used:
            continue
        try:
            found = api.datasource.get_datasource_by_uid(uid)
        except GrafanaException as e:
            raise PushError(f"datasource uid {uid!r} ({committed}) not found in Grafana: {_why(e)}") from None
        if found.get("type") != DATASOURCE_TYPES[committed]:
            raise PushError(f"datasource uid {uid!r} is a {found.get('type')}, want {DATASOURCE_TYPES[committed]}")
    try:
        api.folder.get_folder(folder_uid)
    except GrafanaClientError as e:
        if e.status_code != 404:
            raise PushError(f"reading folder {folder_uid!r}: {_why(e)}") from None
        try:
            api.folder.create_folder(folder_title, uid=folder_uid)
        except GrafanaException as e2:
            raise PushError(f"creating folder {folder_uid!r}: {_why(e2)}") from None
    except GrafanaException as e:
        raise PushError(f"reading folder {folder_uid!r}: {_why(e)}") from None
    pushed = []
    for d in dashboards:
        body = {"dashboard": {**d, "id": None}, "folderUid": folder_uid, "overwrite": True,
                "message": "handtrace dashboards push"}
        try:
            r = api.dashboard.update_dashboard(body)
        except GrafanaException as e:
            raise PushError(f"dashboard {d.get('uid')!r}: {_why(e)}") from None
        pushed.append(Pushed(d["uid"], d["title"], int(r.get("version", 0)), str(r.get("url", ""))))
    return pushed


def _datasources(node: Any) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            found.append(node["datasource"])
        for v in node.values():
            found += _datasources(v)
    elif isinstance(node, list):
        for v in node:
            found += _datasources(v)
    return found


def _why(e: GrafanaException) -> str:
    return f"HTTP {e.status_code}: {e.message}" if e.status_code else str(e.message)
