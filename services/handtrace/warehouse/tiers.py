"""Access tiers and the access audit (issue #14, items 4 and 5; docs/warehouse.md).

``handtrace sql --role ROLE "SELECT ..."`` runs a query through :func:`run`:

1. **What does it read?** ClickHouse decides, not a regex: ``formatQuery`` parses the text (one
   statement, or a refusal) and the analyzer's ``EXPLAIN QUERY TREE`` resolves ``*``, ``t.*``,
   ``COLUMNS(..)``, CTEs, subqueries, ``IN (SELECT ..)``, joins, ``ARRAY JOIN`` and aliases to the
   real table columns each node reads (a COLUMN node names its column and the id of the TABLE node
   it comes from). :func:`analyse` parses that printed tree into :class:`Node` s and returns the
   :class:`Touched` tables, columns, table functions and functions.
2. **May this role read it?** One table of rules, :data:`TABLES` (every column of the tables the
   tiers open is classified, a column nobody classified is refused) and :data:`TIERS` (which
   tables and column classes each role reads). Table functions (``file``, ``url``, ``s3``,
   ``remote``...) are refused for every role but admin (``numbers`` and friends are harmless).
3. **k-anonymity (analyst).** The analyst tier answers only one shape, an aggregate over one table::

       SELECT <expressions> FROM <events|demonstrations|demonstration_events|rollup_*> [AS t]
       [WHERE ..] [GROUP BY ..] [HAVING ..] [ORDER BY ..] [LIMIT ..]

   (no subqueries, CTEs, joins, UNION, ARRAY JOIN, WITH TOTALS / ROLLUP / CUBE / GROUPING SETS,
   SETTINGS). The checker adds ``uniqExact(employee_key) >= k`` to its HAVING clause (first, so
   nothing of the analyst's HAVING is evaluated on a small group), analyses the rewritten query
   again and runs it only if the tree shows that very condition over the table's own
   employee_key. So every result row is a group of rows of >= k distinct people; smaller groups
   are suppressed by the engine. Pseudonyms may only be counted (``uniq*(employee_key)``); a
   filter, group or output on them is refused, and so are aggregates that hand out one row's value
   (``any``, ``argMax``, ``groupArray``...).
4. **Audit.** Every query, allowed, refused or failed, is one row of ``access_audit`` (written
   before any row is handed back; if the audit cannot be written, nothing is returned).

Researcher reads of the tables holding typed text are filtered by the engine to rows whose text
is masked or absent (``additional_table_filters``, a per-query row filter). While the sink serves
the embedded dir, ``handtrace sql`` sends the query to the owner (``/v1/sql``, core/chserve.py),
which runs :func:`run` with its own client (``served=True``: reads only, ``readonly = 1`` per
query, the filter applied) and writes the audit row itself, with the OS user of the connecting
socket. The raw ``/v1/query`` route runs readonly sessions that cannot carry the filter, so
:func:`run` over a ``RemoteClient`` refuses such reads.
"""

from __future__ import annotations

import datetime as dt
import getpass
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

ROLES = ("analyst", "researcher", "auditor", "admin")
READ_KINDS = ("SELECT", "WITH")
MAX_QUERY_CHARS = 64 * 1024

# ------------------------------------------------------------------ the rules (rendered into docs)

CLASSES: dict[str, str] = {
    "activity": "activity metadata (kinds, times, coordinates, keys, apps)",
    "person": "pseudonyms of people and devices",
    "text": "typed text",
    "title": "window titles",
    "url": "URLs",
    "instruction": "demonstration instructions",
    "frame": "frames and screenshots",
    "audit": "audit records",
    "pipeline": "pipeline bookkeeping",
}
"""Column classes: what a column holds, as the refusal messages name it."""

_EVENT_COLUMNS = {
    **dict.fromkeys(("event_id", "batch_id", "kind", "captured_at", "received_at", "stored_at", "x", "y",
                     "button", "pressed", "scroll_dx", "scroll_dy", "key_code", "modifiers", "text_masked",
                     "app_id", "screenshot_bytes", "screenshot_format", "screenshot_width", "screenshot_height",
                     "agent_version", "os", "source_partition", "source_offset"), "activity"),
    "employee_key": "person", "device_key": "person",
    "text": "text", "window_title": "title", "url": "url", "screenshot_sha256": "frame",
}


@dataclass(frozen=True)
class TableRule:
    """One table: what it holds and the class of each of its columns (``*``: all columns)."""

    label: str
    columns: dict[str, str]
    person_column: str | None = None

    def column_class(self, column: str) -> str | None:
        """The class of ``column`` (a subcolumn such as ``text.null`` has its column's class);
        None: not classified (refused to every role but admin)."""
        if "*" in self.columns:
            return self.columns["*"]
        return self.columns.get(column, self.columns.get(column.split(".", 1)[0]))


TABLES: dict[str, TableRule] = {
    "events": TableRule("passive activity events", dict(_EVENT_COLUMNS), "employee_key"),
    "demonstration_events": TableRule("events of demonstrations",
                                      {**_EVENT_COLUMNS, "demonstration_id": "activity"}, "employee_key"),
    "demonstrations": TableRule("demonstrations", {
        **dict.fromkeys(("demonstration_id", "cohort", "status", "started_at", "ended_at", "sent_at",
                         "received_at", "stored_at", "screen_width", "screen_height", "screen_scale", "apps",
                         "consent_version", "policy_version", "agent_version", "os", "frames", "events",
                         "missing_frames", "frames_dropped", "events_dropped", "reason"), "activity"),
        "employee_key": "person", "device_key": "person", "instruction": "instruction"}, "employee_key"),
    "frames": TableRule("frames of demonstrations", {
        **dict.fromkeys(("demonstration_id", "step", "sha256", "object_key", "format", "bytes", "width", "height",
                         "captured_at", "reason", "action_started_at", "action_event_id", "windows", "filled",
                         "stored_at"), "frame"),
        "employee_key": "person"}, "employee_key"),
    # Rollups (sink/schema.py, docs/cookbook.md): keyed by person, so analysts read them under the
    # same k-anonymity condition as the raw tables.
    "rollup_app_activity_hourly": TableRule("rollup: events per app, kind and hour", {
        **dict.fromkeys(("hour", "app_id", "kind", "events"), "activity"), "employee_key": "person"}, "employee_key"),
    "rollup_shortcuts_hourly": TableRule("rollup: key chords per app and hour", {
        **dict.fromkeys(("hour", "app_id", "modifiers", "key_code", "presses"), "activity"),
        "employee_key": "person"}, "employee_key"),
    "rollup_demonstrations_daily": TableRule("rollup: demonstrations per app and day", {
        **dict.fromkeys(("day", "app_id", "demonstrations", "seconds", "events", "frames"), "activity"),
        "employee_key": "person"}, "employee_key"),
    "rollup_demonstration_drops_hourly": TableRule("rollup: what the stream removed from demonstrations, by reason",
                                                   {"*": "pipeline"}),
    "control_audit": TableRule("the control-plane audit trail", {"*": "audit"}),
    "access_audit": TableRule("the access audit", {"*": "audit"}),
    "dataset_exports": TableRule("training-data exports", {"*": "audit"}),
    "withdrawals": TableRule("withdrawals and erasures", {"*": "audit"}),
    "erasure_receipts": TableRule("erasure receipts", {"*": "audit"}),
    "sink_ledger": TableRule("the sink's write-ahead ledger", {"*": "pipeline"}),
    "schema_migrations": TableRule("applied migrations", {"*": "pipeline"}),
    "retention_applied": TableRule("retention changes applied", {"*": "pipeline"}),
}
"""Every table of the handtrace database a tier may name. A table not here is readable by admin
only; tests/unit/test_tiers.py fails when a migrated table's column is not classified."""


@dataclass(frozen=True)
class Tier:
    """What one role may read."""

    role: str
    tables: tuple[str, ...]
    classes: tuple[str, ...]
    summary: str
    needs_purpose: bool = False
    k_anonymous: bool = False
    counted: tuple[str, ...] = ()
    """Classes this role may only count distinctly (``uniqExact(col)``), never see or filter on."""
    masked_text: bool = False
    """Typed text only where it is masked or absent (``text IS NULL OR text_masked``)."""


TIERS: dict[str, Tier] = {
    "analyst": Tier("analyst", ("events", "demonstrations", "demonstration_events", "rollup_app_activity_hourly",
                                "rollup_shortcuts_hourly", "rollup_demonstrations_daily"), ("activity",),
                    "aggregates over >= k distinct people of activity metadata; pseudonyms only counted; "
                    "no typed text, window titles, URLs, instructions or frames",
                    k_anonymous=True, counted=("person",)),
    "researcher": Tier("researcher", ("demonstrations", "demonstration_events", "frames"),
                       ("activity", "person", "text", "title", "url", "instruction", "frame"),
                       "per-person demonstrations (trajectories for training), frames and masked text; "
                       "a stated purpose is required and recorded", needs_purpose=True, masked_text=True),
    "auditor": Tier("auditor", ("control_audit", "access_audit", "dataset_exports", "withdrawals",
                                "erasure_receipts"), ("audit",),
                    "the audit tables: control changes, queries, exports, withdrawals, erasures"),
    "admin": Tier("admin", tuple(TABLES), tuple(CLASSES), "everything (still audited)"),
}

HARMLESS_TABLE_FUNCTIONS = frozenset({"numbers", "numbers_mt", "zeros", "zeros_mt", "generate_series",
                                      "generateSeries", "values"})
HARMLESS_SYSTEM_TABLES = frozenset({"system.one"})
UNIQ_FUNCTIONS = frozenset({"uniq", "uniqExact", "uniqCombined", "uniqCombined64", "uniqHLL12", "uniqTheta"})
ROW_VALUE_AGGREGATES = ("any", "argMin", "argMax", "groupArray", "groupUniqArray", "groupConcat", "first_value",
                        "last_value", "nth_value", "singleValueOrNull", "anyLast", "anyHeavy")
"""Aggregates that hand out the value of one row (prefixes: ``anyIf``, ``groupArraySorted``...):
refused for analysts, whose groups must not reveal a member's row."""
REFUSED_FUNCTIONS = ("file", "dictGet", "dictHas", "dictIsIn", "dictGetHierarchy", "dictGetChildren",
                     "dictGetDescendants", "joinGet", "throwIf", "sleep", "sleepEachRow", "getSetting",
                     "getServerSetting", "getMacro")
"""Functions refused to every role but admin (prefix match): they read outside the query's tables
(files, dictionaries, join tables) or signal through errors and time."""


def rules_markdown() -> str:
    """The tier rules as a Markdown table (docs/warehouse.md shows it; a test keeps it in step)."""
    lines = ["| role | tables | column classes | conditions |", "|---|---|---|---|"]
    for t in TIERS.values():
        classes = ", ".join(CLASSES[c].split(" (")[0] for c in t.classes)
        if t.counted:
            classes += "; counted only: " + ", ".join(CLASSES[c] for c in t.counted)
        lines.append(f"| {t.role} | {', '.join(t.tables)} | {classes} | {t.summary} |")
    lines += ["", "| table | columns | class |", "|---|---|---|"]
    for name, rule in TABLES.items():
        by_class: dict[str, list[str]] = {}
        for c, k in rule.columns.items():
            by_class.setdefault(k, []).append(c)
        for k, cols in by_class.items():
            shown = "every other column" if k == "activity" else ("every column" if cols == ["*"] else
                                                                  ", ".join(cols))
            lines.append(f"| {name} | {shown} | {CLASSES[k]} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ errors and results


class TierRefused(Exception):
    """The role may not run this query; the message says why (already audited by :func:`run`)."""


class NotAnalysable(TierRefused):
    """The text is not one SQL read statement, or ClickHouse's analysis of it could not be read."""


class QueryFailed(Exception):
    """ClickHouse failed the (allowed) query; the message is ClickHouse's (audited)."""


@dataclass
class Node:
    """One node of ``EXPLAIN QUERY TREE`` (a QUERY, TABLE, COLUMN, FUNCTION... or a section such
    as ``WHERE``, ``ARGUMENTS``)."""

    kind: str
    attrs: dict[str, str]
    depth: int
    line: str
    parent: Node | None = None
    children: list[Node] = field(default_factory=list)

    @property
    def id(self) -> str | None:
        return self.attrs.get("id")

    def walk(self) -> Iterator[Node]:
        """This node and every node below it."""
        yield self
        for c in self.children:
            yield from c.walk()

    def section(self, name: str) -> Node | None:
        """The child section ``name`` (``JOIN TREE``, ``HAVING``...)."""
        return next((c for c in self.children if c.kind == name and c.id is None), None)

    def args(self) -> list[Node]:
        """A FUNCTION's arguments (the nodes of its ARGUMENTS list)."""
        sec = self.section("ARGUMENTS")
        lists = [c for c in sec.children if c.kind == "LIST"] if sec else []
        return lists[0].children if lists else []


@dataclass(frozen=True)
class Touched:
    """What a statement reads, as ClickHouse's analyzer resolved it."""

    canonical: str
    kind: str
    tables: frozenset[str] = frozenset()
    """``database.table`` of every TABLE node."""
    columns: frozenset[str] = frozenset()
    """``database.table.column`` of every column read from a table."""
    table_functions: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()
    root: Node | None = None


@dataclass(frozen=True)
class Answer:
    """An allowed query's result and its audit row."""

    column_names: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    audit: dict[str, Any]

    def named_results(self) -> Iterator[dict[str, Any]]:
        for row in self.rows:
            yield dict(zip(self.column_names, row, strict=True))


# ------------------------------------------------------------------ analysis

_NODE_LINE = re.compile(r"^(?P<kind>[A-Z][A-Z_]*) id: (?P<id>\d+)(?P<rest>.*)$")
_SECTION_LINE = re.compile(r"^(?P<kind>[A-Z][A-Z_]*(?: [A-Z][A-Z_]*)*)(?: .*)?$")
"""A section (``WHERE``, ``JOIN TREE``...); ``EXPRESSION`` may be followed by the expression's
name, printed as is (quoted names are free of line breaks: _bare_identifiers_ok)."""
_ATTR = {name: re.compile(rf"(?:^|, ){name}: (?P<v>[^,\s]+)") for name in
         ("column_name", "source_id", "table_name", "function_name", "function_type", "table_function_name",
          "is_subquery", "is_cte", "is_group_by_with_totals", "is_group_by_with_rollup",
          "is_group_by_with_cube", "group_by_type", "nodes", "constant_value", "alias")}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else repr(e)


def _clickhouse_message(e: BaseException) -> str:
    """ClickHouse's own message (``Code: N. DB::Exception: ...``) without the client's wrapping."""
    text = " ".join(str(e).split())
    m = re.search(r"Code: \d+\. DB::Exception: (?:Code: \d+\. DB::Exception: )?(.*)", text)
    msg = m.group(1) if m else _first_line(e)
    return re.sub(r"\s*\(version [^)]*\)\.?", "", msg).strip()[:500]


def _bare_identifiers_ok(canonical: str) -> bool:
    """False when a quoted identifier holds an escape (``\\n``...): the analyzer prints aliases
    raw, so a line break in one would forge lines of its tree. String literals may hold anything
    (it prints them escaped)."""
    i, n = 0, len(canonical)
    while i < n:
        ch = canonical[i]
        if ch == "'":
            i += 1
            while i < n and canonical[i] != "'":
                i += 2 if canonical[i] == "\\" else 1
        elif ch in "`\"":
            j = i + 1
            while j < n and canonical[j] != ch:
                if canonical[j] == "\\" or not canonical[j].isprintable():
                    return False
                j += 1
            i = j
        i += 1
    return True


def parse_tree(lines: Sequence[str]) -> Node:
    """The nodes of ``EXPLAIN QUERY TREE`` output (one line per row, two spaces per level).
    NotAnalysable when a line does not fit the grammar (a forged or unknown line)."""
    root = Node("ROOT", {}, -1, "")
    stack = [root]
    skip_below: int | None = None
    for raw in lines:
        if not raw.strip():
            continue  # an empty section (INTERPOLATE) prints an empty line
        stripped = raw.lstrip(" ")
        indent = len(raw) - len(stripped)
        if indent % 2:
            raise NotAnalysable(f"the query's analysis could not be read (line {raw[:80]!r})")
        depth = indent // 2
        if skip_below is not None:
            if depth > skip_below:
                continue  # a PROJECTION COLUMNS entry: "name Type" (names are checked above)
            skip_below = None
        m = _NODE_LINE.match(stripped)
        if m:
            attrs = {"id": m.group("id")}
            for name, rx in _ATTR.items():
                a = rx.search(m.group("rest"))
                if a:
                    attrs[name] = a.group("v")
            node = Node(m.group("kind"), attrs, depth, stripped)
        elif (sec := _SECTION_LINE.match(stripped)) is not None:
            node = Node(sec.group("kind"), {}, depth, stripped)
        else:
            raise NotAnalysable(f"the query's analysis could not be read (line {raw[:80]!r})")
        while stack[-1].depth >= depth:
            stack.pop()
        if depth != stack[-1].depth + 1:
            raise NotAnalysable(f"the query's analysis could not be read (line {raw[:80]!r})")
        node.parent = stack[-1]
        stack[-1].children.append(node)
        stack.append(node)
        if node.kind == "PROJECTION COLUMNS":
            skip_below = depth
    if len(root.children) != 1:
        raise NotAnalysable("the query's analysis could not be read (not one tree)")
    return root.children[0]


def canonical_statement(client: Any, sql: str) -> str:
    """ClickHouse's print of the one statement in ``sql`` (``formatQuery``), else NotAnalysable."""
    if not sql.strip():
        raise NotAnalysable("not SQL: the query is empty")
    try:
        out = client.query("SELECT formatQuery({q:String})", parameters={"q": sql}).first_row[0]
    except Exception as e:  # noqa: BLE001 -- ClickHouse's parser said no: its message
        msg = _clickhouse_message(e)
        if "Multi-statements" in msg:
            raise NotAnalysable("not one statement: handtrace sql runs exactly one SELECT") from None
        raise NotAnalysable(f"not SQL: ClickHouse's parser says: {msg}") from None
    return str(out)


def _kind(canonical: str) -> str:
    words = canonical.lstrip("( \n").split(None, 1)
    return words[0].upper() if words else ""


def _starts_like(sql: str, kind: str) -> bool:
    """The given text starts with the keyword ClickHouse parsed (ClickHouse also reads a bare
    expression such as ``hello world`` as a SELECT; that is not a query someone meant)."""
    text = sql
    while True:
        text = text.lstrip(" \t\r\n(")
        if text.startswith("--"):
            text = text.partition("\n")[2]
        elif text.startswith("/*"):
            text = text.partition("*/")[2]
        else:
            break
    return text[: len(kind)].upper() == kind


def analyse(client: Any, sql: str) -> Touched:
    """The tables and columns ``sql`` reads, found by ClickHouse (``formatQuery`` then the
    analyzer's ``EXPLAIN QUERY TREE``). NotAnalysable when it is not one SQL statement, or its
    tree cannot be read; QueryFailed when ClickHouse cannot resolve it (unknown table, column...).
    A statement that is not a SELECT comes back with its kind and nothing resolved."""
    canonical = canonical_statement(client, sql)
    kind = _kind(canonical)
    if not _starts_like(sql, kind):
        raise NotAnalysable(f"not SQL: the text does not start with a statement keyword "
                            f"(ClickHouse would read it as {canonical[:80]!r})")
    if kind not in READ_KINDS or any(line.startswith("INTO OUTFILE") for line in canonical.splitlines()):
        return Touched(canonical, kind)  # nothing resolved: admins only (the analyzer does not explain OUTFILE)
    if not _bare_identifiers_ok(canonical):
        raise NotAnalysable("quoted names with escapes or control characters (line breaks...) are refused: "
                            "they would forge the analysis")
    try:
        lines = [str(r[0]) for r in client.query(f"EXPLAIN QUERY TREE {canonical}").result_rows]
    except Exception as e:  # noqa: BLE001 -- ClickHouse's analyzer said no: its message
        raise QueryFailed(_clickhouse_message(e)) from None
    root = parse_tree(lines)
    by_id: dict[str | None, Node] = {n.id: n for n in root.walk() if n.id is not None and n.kind in
             ("TABLE", "TABLE_FUNCTION", "QUERY", "UNION", "JOIN", "ARRAY_JOIN", "LAMBDA", "CROSS_JOIN")}
    tables, columns, tfs, funcs = set(), set(), set(), set()
    for n in root.walk():
        if n.kind == "TABLE":
            tables.add(n.attrs.get("table_name", "?"))
        elif n.kind == "TABLE_FUNCTION":
            tfs.add(n.attrs.get("table_function_name", "?"))
        elif n.kind == "FUNCTION":
            funcs.add(n.attrs.get("function_name", "?"))
        elif n.kind == "COLUMN":
            src = by_id.get(n.attrs.get("source_id"))
            if src is None:
                raise NotAnalysable(f"the query's analysis could not be read (column "
                                    f"{n.attrs.get('column_name')} of an unknown source)")
            if src.kind == "TABLE":
                columns.add(f"{src.attrs.get('table_name', '?')}.{n.attrs.get('column_name', '?')}")
    return Touched(canonical, kind, frozenset(tables), frozenset(columns), frozenset(tfs), frozenset(funcs), root)


# ------------------------------------------------------------------ the checks


def _split_table(qualified: str, database: str) -> str | None:
    """The bare table name of ``database.table`` if it is in the handtrace database, else None."""
    db, _, name = qualified.partition(".")
    return name if db == database and name else None


def _role_word(role: str) -> str:
    return {"analyst": "analysts", "researcher": "researchers", "auditor": "auditors"}.get(role, role)


def _counted(col: Node) -> bool:
    """The COLUMN is the single argument of a distinct count (``uniqExact(employee_key)``)."""
    lst = col.parent
    args = lst.parent if lst else None
    fn = args.parent if args else None
    return (lst is not None and lst.kind == "LIST" and lst.attrs.get("nodes") == "1"
            and args is not None and args.kind == "ARGUMENTS"
            and fn is not None and fn.kind == "FUNCTION" and fn.attrs.get("function_type") == "aggregate"
            and fn.attrs.get("function_name") in UNIQ_FUNCTIONS)


def check(touched: Touched, role: str, *, database: str, purpose: str | None = None) -> None:
    """TierRefused (with the message the user sees) unless ``role`` may read what ``touched``
    reads. The analyst's query shape is checked by :func:`with_k_anonymity`."""
    tier = TIERS.get(role)
    if tier is None:
        raise TierRefused(f"unknown role {role!r} (one of {', '.join(ROLES)})")
    who = f"refused for role {role}"
    if tier.needs_purpose and not (purpose or "").strip():
        raise TierRefused(f"{who}: a stated purpose is required (--purpose \"...\"); it is recorded in the "
                          "access audit with the query")
    if role == "admin":
        return
    if any(line.startswith("INTO OUTFILE") for line in touched.canonical.splitlines()):
        raise TierRefused(f"{who}: INTO OUTFILE is for admins only (use --format and a redirect)")
    if touched.kind not in READ_KINDS or touched.root is None:
        raise TierRefused(f"{who}: only SELECT queries are run for {_role_word(role)} "
                          f"(this is a {touched.kind or 'empty'} statement)")
    for name in sorted(touched.table_functions):
        if name not in HARMLESS_TABLE_FUNCTIONS:
            raise TierRefused(f"{who}: table function {name}() reads outside the handtrace tables; "
                              "table functions are for admins only")
    for fn in sorted(touched.functions):
        if fn.startswith(REFUSED_FUNCTIONS):
            raise TierRefused(f"{who}: function {fn}() is not available to {_role_word(role)} (it reads outside "
                              "the query's tables or signals through errors and time)")
        if tier.k_anonymous and fn.startswith(ROW_VALUE_AGGREGATES):
            raise TierRefused(f"{who}: aggregate {fn}() hands out one row's value; analysts get counts, sums, "
                              "averages, quantiles, min/max and distinct counts over groups")
    for qualified in sorted(touched.tables):
        if qualified in HARMLESS_SYSTEM_TABLES:
            continue
        bare = _split_table(qualified, database)
        if bare is None or bare not in tier.tables:
            what = f" ({TABLES[bare].label})" if bare in TABLES else ""
            raise TierRefused(f"{who}: table {qualified}{what} is not readable by {_role_word(role)} "
                              f"(they read {', '.join(tier.tables)})")
    by_id: dict[str | None, Node] = {n.id: n for n in touched.root.walk() if n.kind == "TABLE"}
    problems: dict[str, str] = {}  # every forbidden column once, in the order the tree reads them
    for col in touched.root.walk():
        if col.kind != "COLUMN":
            continue
        src = by_id.get(col.attrs.get("source_id"))
        if src is None:
            continue  # from a subquery, join or lambda: its own columns are checked where they are read
        qualified = src.attrs.get("table_name", "?")
        if qualified in HARMLESS_SYSTEM_TABLES:
            continue
        name = _split_table(qualified, database) or qualified
        column = col.attrs.get("column_name", "?")
        ref = f"{name}.{column}"
        klass = TABLES[name].column_class(column) if name in TABLES else None
        if klass is None:
            problems.setdefault(ref, f"column {ref} is not classified in the access tiers; only admins read it")
        elif klass in tier.counted:
            if not _counted(col):
                problems.setdefault(ref, f"column {ref} ({CLASSES[klass]}) may only be counted by "
                                         f"{_role_word(role)} (uniqExact({column})): results, filters and groups "
                                         "per person or device are refused")
        elif klass not in tier.classes:
            problems.setdefault(ref, f"column {ref} ({CLASSES[klass]}) is not readable by {_role_word(role)}")
    if problems:
        raise TierRefused(f"{who}: " + "; ".join(problems.values()))


def text_filters(touched: Touched, role: str, *, database: str) -> dict[str, str]:
    """The per-table row filters ``role`` needs for what ``touched`` reads: a researcher reading a
    table that holds typed text sees only its rows whose text is masked or absent -- whatever
    columns they read (the key codes of unmasked typing spell the text too)."""
    tier = TIERS[role]
    if not tier.masked_text:
        return {}
    out = {}
    for qualified in sorted(touched.tables):
        name = _split_table(qualified, database)
        if name in TABLES and "text" in TABLES[name].columns.values():
            out[qualified] = "text IS NULL OR text_masked"
    return out


_TOP_CLAUSES_AFTER_HAVING = ("WINDOW", "QUALIFY", "ORDER BY", "LIMIT", "OFFSET", "FETCH", "SETTINGS", "FORMAT",
                             "INTERPOLATE")


def _analyst_shape(touched: Touched, database: str) -> tuple[Node, str]:
    """The root QUERY and the table it aggregates, or TierRefused saying which shape is accepted."""
    who = "refused for role analyst"
    shape = ("analysts run one aggregate over one table: SELECT <dimensions>, <aggregates> FROM "
             "<events|demonstrations|demonstration_events|a rollup_* table> [WHERE ..] "
             "[GROUP BY <dimensions>] [HAVING ..] [ORDER BY ..] [LIMIT ..]")
    root = touched.root
    assert root is not None  # noqa: S101 -- check() refused statements without a tree
    if root.kind != "QUERY":
        raise TierRefused(f"{who}: UNION and other compound queries are not accepted; {shape}")
    for n in root.walk():
        if n is not root and n.kind in ("QUERY", "UNION"):
            raise TierRefused(f"{who}: subqueries and CTEs (WITH x AS (SELECT ..)) are not accepted, the "
                              f"k-anonymity check needs the groups of one query; {shape}")
    if any(root.attrs.get(flag) == "1" for flag in ("is_group_by_with_totals", "is_group_by_with_rollup",
                                                     "is_group_by_with_cube")) or "group_by_type" in root.attrs:
        raise TierRefused(f"{who}: WITH TOTALS, ROLLUP, CUBE and GROUPING SETS are not accepted (totals over "
                          "shown groups would reveal the suppressed ones)")
    if any(line.startswith(("SETTINGS", "FORMAT")) for line in touched.canonical.splitlines()):
        raise TierRefused(f"{who}: SETTINGS and FORMAT clauses are not accepted (use --format)")
    jt = root.section("JOIN TREE")
    tables = jt.children if jt else []
    if len(tables) != 1 or tables[0].kind != "TABLE":
        raise TierRefused(f"{who}: joins, ARRAY JOIN and table functions are not accepted; {shape}")
    name = _split_table(tables[0].attrs.get("table_name", ""), database)
    if name is None or name not in TABLES or TABLES[name].person_column is None:
        raise TierRefused(f"{who}: {shape}")
    proj = root.section("PROJECTION")
    aggregating = root.section("GROUP BY") is not None or any(
        n.kind == "FUNCTION" and n.attrs.get("function_type") == "aggregate" for n in (proj.walk() if proj else ()))
    if not aggregating:
        raise TierRefused(f"{who}: only aggregate queries are answered (GROUP BY with count(), sum(), avg(), "
                          "uniqExact(employee_key)...): rows of single events show one person's activity")
    return tables[0], name


def _with_having(canonical: str, condition: str) -> str:
    """``canonical`` (formatQuery's print, top-level clauses at column 0) with ``condition`` as
    the first condition of its top-level HAVING."""
    lines = canonical.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("HAVING"):
            j = i + 1
            while j < len(lines) and lines[j][:1] in (" ", ")"):
                j += 1
            body = "\n".join([line[len("HAVING"):], *lines[i + 1:j]]).strip()
            return "\n".join([*lines[:i], f"HAVING ({condition}) AND ({body})", *lines[j:]])
    at = next((i for i, line in enumerate(lines) if i > 0 and line.startswith(_TOP_CLAUSES_AFTER_HAVING)),
              len(lines))
    return "\n".join([*lines[:at], f"HAVING {condition}", *lines[at:]])


def _k_condition_holds(root: Node, table: Node, person: str, k: int) -> bool:
    """The rewritten tree's HAVING starts with ``uniqExact(<person> of table) >= k``."""
    having = root.section("HAVING")
    if having is None or len(having.children) != 1:
        return False
    cond = having.children[0]
    if cond.kind == "FUNCTION" and cond.attrs.get("function_name") == "and":
        args = cond.args()
        cond = args[0] if args else cond
    if cond.kind != "FUNCTION" or cond.attrs.get("function_name") != "greaterOrEquals":
        return False
    args = cond.args()
    if len(args) != 2:
        return False
    uniq, const = args
    inner = uniq.args() if uniq.kind == "FUNCTION" else []
    return (uniq.attrs.get("function_name") == "uniqExact" and uniq.attrs.get("function_type") == "aggregate"
            and len(inner) == 1 and inner[0].kind == "COLUMN" and inner[0].attrs.get("column_name") == person
            and inner[0].attrs.get("source_id") == table.id
            and const.kind == "CONSTANT" and re.fullmatch(rf"U?Int\d+_{k}", const.attrs.get("constant_value", ""))
            is not None)


def with_k_anonymity(client: Any, touched: Touched, *, database: str, k: int) -> Touched:
    """The analyst's query with ``uniqExact(employee_key) >= k`` first in its HAVING, analysed
    again and checked to carry that condition over its table's own pseudonym column."""
    table, name = _analyst_shape(touched, database)
    person = TABLES[name].person_column
    assert person is not None  # noqa: S101 -- _analyst_shape checked it
    rewritten = analyse(client, _with_having(touched.canonical, f"uniqExact({person}) >= {int(k)}"))
    check(rewritten, "analyst", database=database)
    root = rewritten.root
    assert root is not None  # noqa: S101 -- a SELECT has a tree
    jt = root.section("JOIN TREE")
    if jt is None or len(jt.children) != 1 or not _k_condition_holds(root, jt.children[0], person, k):
        raise TierRefused("refused for role analyst: the k-anonymity condition could not be attached to this "
                          "query (an alias shadowing employee_key?); rename and retry")
    return rewritten


# ------------------------------------------------------------------ running and auditing


_PLACEHOLDER = re.compile(r"\{(\w+):([^{}]+)\}")


def bind_parameters(sql: str, params: dict[str, str]) -> str:
    """``{name:Type}`` query parameters (as in docs/cookbook.md and clickhouse-client's
    ``--param_name``) replaced by ``CAST('<value>' AS Type)``: the value in ClickHouse's text
    format (``['a','b']`` for an Array), quoted as a string literal, parsed by the engine. The
    result is analysed and checked like any query. ValueError names a placeholder without value."""
    def one(m: re.Match[str]) -> str:
        if m[1] not in params:
            raise ValueError(f"no value for the query parameter {m[1]!r} ({m[0]}): pass --param {m[1]}=VALUE")
        value = params[m[1]].replace("\\", "\\\\").replace("'", "\\'")
        return f"CAST('{value}' AS {m[2]})"
    return _PLACEHOLDER.sub(one, sql)


def os_user() -> str:
    """The OS user running this process (the audit's default actor and OS user)."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


_os_user = os_user  # run()'s parameter of that name shadows the function


class _ReadOnlyReads:
    """The owner's client for a query run for another process: every read -- the analysis too
    (``formatQuery``, ``EXPLAIN QUERY TREE``, which evaluates scalar subqueries such as
    ``(SELECT .. FROM file(..))`` and would put what they read into an error message) -- runs with
    ``readonly = 1``; only the audit row is inserted."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def query(self, sql: str, parameters: Any = None, settings: dict[str, Any] | None = None) -> Any:
        return self._client.query(sql, parameters=parameters, settings={**(settings or {}), "readonly": 1})

    def insert(self, table: str, data: Any, column_names: Any) -> Any:
        return self._client.insert(table, data, column_names=column_names)


QUOTABLE_ERRORS = frozenset({
    "UNKNOWN_IDENTIFIER", "UNKNOWN_TABLE", "UNKNOWN_DATABASE", "UNKNOWN_FUNCTION", "UNKNOWN_AGGREGATE_FUNCTION",
    "SYNTAX_ERROR", "NUMBER_OF_ARGUMENTS_DOESNT_MATCH", "NOT_AN_AGGREGATE", "ILLEGAL_AGGREGATION",
    "MULTIPLE_EXPRESSIONS_FOR_ALIAS", "AMBIGUOUS_IDENTIFIER", "AMBIGUOUS_COLUMN_NAME", "NO_COMMON_TYPE",
    "TOO_DEEP_SUBQUERIES", "UNKNOWN_SETTING", "TIMEOUT_EXCEEDED", "TOO_MANY_ROWS_OR_BYTES", "MEMORY_LIMIT_EXCEEDED",
    "QUERY_WAS_CANCELLED", "READONLY"})
"""ClickHouse errors whose message names parts of the query (names, types, limits), never a value
read from a table. Any other message can quote one (``Cannot parse string 'x' as UInt64``), also
of a column the role may not read: the analysis (``EXPLAIN QUERY TREE``) runs scalar subqueries
before the tier has looked at the tree. When the sink runs a query for another process, roles but
admin get only the error's name for those (:func:`withheld`)."""


def withheld(message: str) -> str:
    """``message`` if its error is one of :data:`QUOTABLE_ERRORS`, else only the error's name."""
    m = re.search(r"\(([A-Z][A-Z0-9_]+)\)\s*$", message)
    name = m.group(1) if m else None
    if name in QUOTABLE_ERRORS:
        return message
    return (f"ClickHouse failed the query ({name or 'unnamed error'}); its message is withheld from roles but "
            "admin, as it can quote a value read from a table (use the ...OrNull conversions, no scalar subqueries)")


class AuditUnavailable(Exception):
    """The access audit could not be written: nothing is answered (fails closed)."""


def _audit(client: Any, database: str, row: dict[str, Any]) -> None:
    names = list(row)
    try:
        client.insert(f"{database}.access_audit", [[row[n] for n in names]], column_names=names)
    except Exception as e:  # noqa: BLE001 -- whatever failed, the query is not answered
        raise AuditUnavailable(
            f"the access audit could not be written, so the query is not answered ({_first_line(e)[:300]}); "
            f"{database}.access_audit is created by the sink's migrations (start the sink once, or the demo)"
        ) from None


def record_access(client: Any, database: str, *, actor: str | None, role: str, purpose: str, query: str,
                  tables: Sequence[str] = (), columns: Sequence[str] = (), rows: int = 0, outcome: str = "allowed",
                  reason: str = "") -> None:
    """One ``access_audit`` row for an access made outside :func:`run` (e.g. a subject access
    export, warehouse/subject.py). AuditUnavailable when it cannot be written."""
    _audit(client, database, {
        "at": dt.datetime.now(dt.UTC), "actor": actor or _os_user(), "os_user": _os_user(), "role": role,
        "purpose": purpose, "query": query[:MAX_QUERY_CHARS], "executed": "", "tables": sorted(tables),
        "columns": sorted(columns), "rows": int(rows), "outcome": outcome, "reason": reason})


def run(client: Any, sql: str, *, role: str, database: str, k: int, actor: str | None = None,
        purpose: str | None = None, os_user: str | None = None, served: bool = False) -> Answer:
    """Analyse, check, run and audit one query for ``role``. TierRefused (refused, audited),
    QueryFailed (ClickHouse failed it, audited) or the :class:`Answer` (audited before it is
    returned); AuditUnavailable when the audit row cannot be written (nothing is answered).

    ``os_user``: who runs it as the OS knows them (default: this process's user; the query
    endpoint passes the user of the connecting socket); ``actor`` defaults to it. ``served``: run
    for another process by the data dir's owner (``/v1/sql``): read statements only, for every
    role (admin too), each run with ``readonly = 1``."""
    from handtrace.core.chserve import StatementRefused, check_read
    from handtrace.core.clickhouse import is_remote

    who = os_user or _os_user()
    if served:
        client = _ReadOnlyReads(client)
    row: dict[str, Any] = {
        "at": dt.datetime.now(dt.UTC), "actor": actor or who, "os_user": who, "role": role,
        "purpose": purpose or "", "query": sql[:MAX_QUERY_CHARS], "executed": "", "tables": [], "columns": [],
        "rows": 0, "outcome": "refused", "reason": ""}
    touched: Touched | None = None
    try:
        touched = analyse(client, sql)
        row["tables"], row["columns"] = sorted(touched.tables), sorted(touched.columns)
        if served:
            try:
                check_read(touched.canonical)
            except StatementRefused as e:
                raise TierRefused(str(e)) from None
        check(touched, role, database=database, purpose=purpose)
        executed = touched
        settings: dict[str, Any] = {"readonly": 1} if served else {}
        if role != "admin":
            if TIERS[role].k_anonymous:
                executed = with_k_anonymity(client, touched, database=database, k=k)
            filters = text_filters(touched, role, database=database)
            if filters and is_remote(client):
                raise TierRefused(f"refused for role {role}: {', '.join(filters)} is filtered to rows with masked "
                                  "or no typed text by a per-query row filter, which the endpoint's raw query "
                                  "route cannot apply; use handtrace sql (the owner runs it: /v1/sql)")
            settings = {"readonly": 1}
            if filters:
                settings["additional_table_filters"] = "{" + ", ".join(
                    f"'{t}': '{f}'" for t, f in filters.items()) + "}"
        row["executed"] = executed.canonical
        try:
            result = client.query(executed.canonical, settings=settings) if settings else client.query(
                executed.canonical)
        except StatementRefused as e:  # the sink's query endpoint runs reads only
            raise TierRefused(str(e)) from None
        except Exception as e:  # noqa: BLE001 -- ClickHouse's message, audited
            raise QueryFailed(_clickhouse_message(e)) from None
    except TierRefused as e:
        row["reason"] = str(e)
        _audit(client, database, row)
        raise
    except QueryFailed as e:
        reason = str(e)
        if served and role != "admin":
            reason = withheld(reason)
        if served and reason.endswith("(READONLY)"):
            row["reason"] = (f"refused for role {role}: the sink runs queries for other processes read-only, the "
                             f"analysis included, and this one needs more ({reason}): table functions such as "
                             "file() or url() and SETTINGS clauses are not run")
            _audit(client, database, row)
            raise TierRefused(row["reason"]) from None
        row["outcome"], row["reason"] = "failed", reason
        _audit(client, database, row)
        if reason != str(e):
            raise QueryFailed(reason) from None
        raise
    rows = [tuple(r) for r in result.result_rows]
    row["outcome"], row["rows"] = "allowed", len(rows)
    _audit(client, database, row)
    return Answer(tuple(result.column_names), rows, row)


# ------------------------------------------------------------------ a ClickHouse server


def server_grants_sql(database: str) -> list[str]:
    """Roles, grants and row policies for a ClickHouse server (``handtrace_<role>``), one
    statement each. The server enforces tables and columns (a second wall); k-anonymity needs
    the query rewrite, so analyst logins go through ``handtrace sql``, never straight to the
    server. Statements parse with ClickHouse's parser (tests/unit/test_tiers.py)."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", database):
        raise ValueError(f"not a database name: {database!r}")
    out: list[str] = []
    for role, tier in TIERS.items():
        r = f"handtrace_{role}"
        out.append(f"CREATE ROLE IF NOT EXISTS {r}")
        if role == "admin":
            out.append(f"GRANT SELECT ON {database}.* TO {r}")
            continue
        for table in tier.tables:
            rule = TABLES[table]
            if "*" in rule.columns:
                out.append(f"GRANT SELECT ON {database}.{table} TO {r}")
                continue
            cols = [c for c, k in rule.columns.items() if k in tier.classes or k in tier.counted]
            out.append(f"GRANT SELECT({', '.join(cols)}) ON {database}.{table} TO {r}")
    # Row policies are permissive and, once a table has one, a user matched by none sees no rows:
    # so researchers get the masked-text policy and everyone else (the sink's user included) one
    # that passes every row.
    for table, rule in TABLES.items():
        if rule.columns.get("text") != "text":
            continue
        for role, t in TIERS.items():
            if t.masked_text and table in t.tables:
                out.append(f"CREATE ROW POLICY IF NOT EXISTS handtrace_{role}_masked_text ON {database}.{table} "
                           f"FOR SELECT USING (text IS NULL) OR text_masked TO handtrace_{role}")
                out.append(f"CREATE ROW POLICY IF NOT EXISTS handtrace_not_{role}_all_rows ON {database}.{table} "
                           f"FOR SELECT USING 1 TO ALL EXCEPT handtrace_{role}")
    return out
