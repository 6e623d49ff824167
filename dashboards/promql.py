"""Just enough PromQL lexing to check dashboards and rules against the metric inventories:
which metric names an expression reads, and its operands around top-level comparisons and set
operators (an alert expression returns data only while firing; its operands always should).

Also collects every query of every dashboard and every rule, and the names the services
declare in their metrics.py inventories -- shared by tests/unit and tests/integration.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES_DIR = ROOT / "deploy" / "prometheus" / "rules"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and durations excluded)."""
    s = _STRING.sub('""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)        # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)       # range/subquery durations
    s = _GROUPING.sub(" ", s)                # by (...), on (...), group_left (...)
    names = set()
    for m in _IDENT.finditer(s):
        name = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("(") or name.lower() in KEYWORDS:
            continue
        if re.match(r"\d", s[m.start() - 1: m.start()] or " "):  # part of a number like 1e9
            continue
        names.add(name)
    return names


def operands(expr: str) -> list[str]:
    """The operands of top-level comparisons and ``and``/``or``/``unless`` (modifiers dropped),
    or ``[expr]`` when there are none. Pure numbers are left out."""
    parts, depth, start, i = [], 0, 0, 0
    s = expr
    masked = _STRING.sub(lambda m: "x" * len(m.group(0)), s)
    while i < len(masked):
        c = masked[i]
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        elif depth == 0:
            op = re.match(r"(==|!=|>=|<=|>|<)|\b(and|or|unless)\b", masked[i:])
            if op and not (op.group(1) and masked[i - 1: i] in ("=", "!", "~")):
                parts.append(s[start:i])
                i += len(op.group(0))
                start = i
                continue
        i += 1
    parts.append(s[start:])
    out = []
    for p in parts:
        p = re.sub(r"^\s*bool\b", "", p)
        p = re.sub(r"^\s*(on|ignoring)\s*\([^)]*\)", "", p)
        p = re.sub(r"^\s*(group_left|group_right)\s*(\([^)]*\))?", "", p).strip()
        if p and not re.fullmatch(r"[-+]?[\d.e+]+", p):
            out.append(p)
    return out if len(parts) > 1 else [expr.strip()]


def rule_groups() -> list[dict[str, Any]]:
    """Every rule group of every deploy/prometheus/rules/*.yml."""
    groups = []
    for f in sorted(RULES_DIR.glob("*.yml")):
        groups += yaml.safe_load(f.read_text(encoding="utf-8"))["groups"]
    return groups


def rules() -> list[dict[str, Any]]:
    """Every recording and alerting rule."""
    return [r for g in rule_groups() for r in g["rules"]]


def recorded_names() -> set[str]:
    """Series the recording rules produce."""
    return {r["record"] for r in rules() if "record" in r}


def dashboard_queries(dashboards: list[dict[str, Any]]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(dashboard uid, panel title, datasource type, target) for every panel target."""
    out = []
    for d in dashboards:
        for p in d["panels"]:
            for t in p.get("targets", []):
                out.append((d["uid"], p["title"], t["datasource"]["type"], t))
    return out


def inventory_names() -> set[str]:
    """Every series name the services' metrics.py inventories can emit (counters as *_total,
    histograms as *_bucket/_sum/_count, scrape-time gauges of the fleet exporter)."""
    from prometheus_client import Counter, Gauge, Histogram
    from prometheus_client.metrics import MetricWrapperBase

    from handtrace.fleet import metrics as fleet
    from handtrace.sink import metrics as sink
    from handtrace.stream import metrics as stream

    names: set[str] = set()
    for module in (stream, sink, fleet):
        for obj in vars(module).values():
            if not isinstance(obj, MetricWrapperBase):
                continue
            base = obj._name
            if isinstance(obj, Counter):
                names.add(f"{base}_total")
            elif isinstance(obj, Histogram):
                names |= {f"{base}_bucket", f"{base}_sum", f"{base}_count"}
            elif isinstance(obj, Gauge):
                names.add(base)
    names |= {g.name for g in fleet.SCRAPE_GAUGES}
    return names
