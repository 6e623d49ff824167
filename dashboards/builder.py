"""Typed builders for the few Grafana objects our dashboards use (dashboard, row, panel,
Prometheus and ClickHouse queries, template variables) and their JSON (Grafana schema 39).

Plain dataclasses rather than grafana-foundation-sdk: see docs/adr/0007-dashboards-as-code.md.
Output is deterministic (ids and grid positions assigned in order, keys sorted when written), so
regenerating gives byte-identical files and tests/unit/test_dashboards.py can insist on it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PROMETHEUS = {"type": "prometheus", "uid": "prometheus"}
CLICKHOUSE = {"type": "grafana-clickhouse-datasource", "uid": "clickhouse"}
GRID_WIDTH = 24


@dataclass(frozen=True)
class Prom:
    """A PromQL query."""

    expr: str
    legend: str = ""
    instant: bool = False

    def to_json(self, ref_id: str) -> dict[str, Any]:
        return {"datasource": PROMETHEUS, "expr": self.expr, "legendFormat": self.legend or "__auto",
                "range": not self.instant, "instant": self.instant, "refId": ref_id}


@dataclass(frozen=True)
class SQL:
    """A ClickHouse query (grafana-clickhouse-datasource, SQL editor; macros like
    ``$__timeFilter(col)`` and ``$__timeInterval(col)`` are expanded by the plugin)."""

    sql: str
    fmt: Literal["table", "time_series"] = "table"

    def to_json(self, ref_id: str) -> dict[str, Any]:
        return {"datasource": CLICKHOUSE, "editorType": "sql", "format": 1 if self.fmt == "table" else 0,
                "queryType": "table" if self.fmt == "table" else "timeseries", "rawSql": self.sql.strip(),
                "refId": ref_id}


Query = Prom | SQL
PanelKind = Literal["timeseries", "stat", "table", "bargauge"]


@dataclass(frozen=True)
class Panel:
    """One visualisation. ``width`` in grid columns (of 24), ``height`` in grid rows."""

    title: str
    kind: PanelKind
    queries: tuple[Query, ...]
    description: str = ""
    unit: str = "short"
    width: int = 12
    height: int = 8
    decimals: int | None = None
    thresholds: tuple[tuple[float, str], ...] = ()
    min: float | None = None
    max: float | None = None

    def datasource(self) -> dict[str, str]:
        kinds = {type(q) for q in self.queries}
        if len(kinds) != 1:
            raise ValueError(f"panel {self.title!r} mixes datasources")
        return PROMETHEUS if kinds == {Prom} else CLICKHOUSE

    def to_json(self, panel_id: int, x: int, y: int) -> dict[str, Any]:
        defaults: dict[str, Any] = {"unit": self.unit}
        if self.decimals is not None:
            defaults["decimals"] = self.decimals
        if self.min is not None:
            defaults["min"] = self.min
        if self.max is not None:
            defaults["max"] = self.max
        steps = [{"color": "green", "value": None}] + [{"color": c, "value": v} for v, c in self.thresholds]
        defaults["thresholds"] = {"mode": "absolute", "steps": steps}
        options: dict[str, Any] = {}
        if self.kind == "timeseries":
            defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                                  "spanNulls": True}
            options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                       "tooltip": {"mode": "multi", "sort": "desc"}}
        elif self.kind == "stat":
            options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "colorMode": "value", "graphMode": "area", "textMode": "auto"}
        elif self.kind == "bargauge":
            options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                       "displayMode": "gradient", "orientation": "horizontal"}
        elif self.kind == "table":
            options = {"showHeader": True, "cellHeight": "sm"}
        return {
            "id": panel_id, "type": self.kind, "title": self.title, "description": self.description,
            "datasource": self.datasource(), "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
            "fieldConfig": {"defaults": defaults, "overrides": []}, "options": options,
            "targets": [q.to_json(chr(ord("A") + i)) for i, q in enumerate(self.queries)],
        }


@dataclass(frozen=True)
class Row:
    """A titled group of panels, laid out left to right, wrapping at the grid width."""

    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    """A multi-value template variable from a Prometheus label (``All`` matches everything)."""

    name: str
    label: str
    metric: str

    def to_json(self) -> dict[str, Any]:
        query = f"label_values({self.metric}, {self.name})"
        return {"name": self.name, "label": self.label, "type": "query", "datasource": PROMETHEUS,
                "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
                "definition": query, "refresh": 2, "multi": True, "includeAll": True, "allValue": ".*",
                "current": {"selected": True, "text": ["All"], "value": ["$__all"]}, "sort": 1}


@dataclass(frozen=True)
class Dashboard:
    """A whole dashboard."""

    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    tags: tuple[str, ...] = ("handtrace",)
    variables: tuple[Variable, ...] = ()
    time_from: str = "now-6h"
    refresh: str = "30s"
    links: tuple[str, ...] = field(default_factory=tuple)

    def panels(self) -> list[Panel]:
        """Every panel, in order."""
        return [p for r in self.rows for p in r.panels]

    def to_json(self) -> dict[str, Any]:
        panels: list[dict[str, Any]] = []
        next_id, y = 1, 0
        for row in self.rows:
            panels.append({"id": next_id, "type": "row", "title": row.title, "collapsed": False,
                           "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y}, "panels": []})
            next_id, y = next_id + 1, y + 1
            x, line_h = 0, 0
            for p in row.panels:
                if x + p.width > GRID_WIDTH:
                    x, y, line_h = 0, y + line_h, 0
                panels.append(p.to_json(next_id, x, y))
                next_id += 1
                x += p.width
                line_h = max(line_h, p.height)
            y += line_h
        return {
            "uid": self.uid, "title": self.title, "description": self.description, "tags": list(self.tags),
            "timezone": "utc", "editable": True, "graphTooltip": 1, "schemaVersion": 39, "version": 1,
            "time": {"from": self.time_from, "to": "now"}, "refresh": self.refresh,
            "templating": {"list": [v.to_json() for v in self.variables]},
            "annotations": {"list": []}, "links": [], "panels": panels,
        }
