"""The people's portal: server-rendered pages for employees, HR, ops, security and auditors
(issue #13, ADR 0013).

Plain HTML forms that work without JavaScript: each POST acts through :mod:`actions` (the same
functions the JSON routes call), then redirects 303 back with a flash message in a short-lived
cookie (a query parameter would let any link put words on the page); an invalid input re-renders
the page with the message next to its field (422). Who may see or do what is declared by the
``principal``/``require`` dependencies, never decided in a handler. Templates are Jinja2 with
autoescape on. Cross-site form posts are held off twice: the SameSite=Strict session cookie, and
:func:`same_origin` on every POST (behind an OIDC proxy that adds the Authorization header itself,
the browser's cookie rules no longer protect the app).
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from handtrace.control.api import actions, dryrun
from handtrace.control.api.auth import Principal, principal, require
from handtrace.control.api.roles import MATRIX, Action, Role, allowed
from handtrace.control.api.services import Services, get_services

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"
PAUSE_MINUTES = (5, 15, 30)
"""The choices the pause form offers (the API accepts any 1..30)."""
FLASH_COOKIE = "ht_flash"

router = APIRouter(include_in_schema=False)

_env = Environment(loader=FileSystemLoader(TEMPLATES), autoescape=True, undefined=StrictUndefined,
                   trim_blocks=True, lstrip_blocks=True)
_env.filters["path"] = lambda v: quote(str(v), safe="")

Me = Annotated[Principal, Depends(principal)]
Svc = Annotated[Services, Depends(get_services)]
HR = Annotated[Principal, Depends(require(Role.hr, Role.admin))]


def _may(action: Action) -> Any:
    """The dependency guarding a page with ``action``'s rule of the role matrix (403, audited)."""
    return Depends(require(*MATRIX[action].roles, action=action))


Ops = Annotated[Principal, _may(Action.sampling)]
Security = Annotated[Principal, _may(Action.allowlist)]
Auditor = Annotated[Principal, _may(Action.audit)]

NAV = (("/", "My capture", Action.own), ("/hr", "Exemption requests", Action.exemptions),
       ("/ops", "Sampling", Action.sampling), ("/security", "Allowlists and masking", Action.allowlist),
       ("/audit", "Audit trail", Action.audit))
"""The navigation: each link shows only to roles the matrix lets open the page."""
EMPTY_ROWS = 3
"""Empty rows under the rates and text-capture rows: adding a row needs no JavaScript."""
MAX_ROWS = 200
AUDIT_LIMIT = 200
"""Entries the audit page shows (newest first)."""
AUDIT_SCAN = 5000
"""Newest entries the outcome filter looks through."""
OUTCOMES = ("all", "allowed", "refused")


def same_origin(request: Request, who: Me, services: Svc) -> None:
    """Refuse (403, audited) a form post that a browser says came from another site: Sec-Fetch-Site
    when the browser sends it, else an Origin that is not this host."""
    site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if site is not None:
        foreign = site not in ("same-origin", "none")
    else:
        foreign = origin is not None and (origin == "null" or urlsplit(origin).netloc != request.headers.get("host"))
    if foreign:
        services.audit.record(actions.audit_entry(who, request.url.path, target=request.path_params.get("employee_id"),
                                                  outcome="refused", reason=f"cross-site form post ({origin or site})"))
        raise HTTPException(403, "form posted from another site")


POST_GUARDS = [Depends(same_origin)]


def _at(value: Any) -> datetime | None:
    """A state timestamp (ISO string, datetime or epoch microseconds) as an aware UTC datetime."""
    if value in (None, ""):
        return None
    if isinstance(value, datetime):
        at = value
    elif isinstance(value, int | float):
        at = datetime.fromtimestamp(value / 1e6, UTC)
    else:
        at = datetime.fromisoformat(str(value))
    return (at if at.tzinfo else at.replace(tzinfo=UTC)).astimezone(UTC)


def _time(value: Any, fmt: str = "%H:%M") -> dict[str, str] | None:
    at = _at(value)
    return None if at is None else {"iso": at.isoformat(), "text": at.strftime(fmt) + " UTC"}


_env.filters["when"] = _time


def _show(value: Any) -> str:
    """A before/after value of the audit trail as compact text (JSON for structures)."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(", ", ": "))


_env.filters["show"] = _show
_env.filters["rate"] = lambda v: "-" if v is None else f"{float(v):g}"
_env.filters["metric"] = dryrun.show
_env.filters["change"] = dryrun.change_ratio
_env.filters["duration"] = dryrun.duration


def _nav(who: Principal | None) -> list[tuple[str, str]]:
    return [(href, label) for href, label, action in NAV if who is not None and allowed(action, who.roles)]


def _render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    flash = request.cookies.get(FLASH_COOKIE)
    html = _env.get_template(template).render(request=request, flash=unquote(flash) if flash else None,
                                              nav=_nav(ctx.get("who")), **ctx)
    response = HTMLResponse(html, status_code=status)
    if flash:
        response.delete_cookie(FLASH_COOKIE, path="/")
    return response


def _back(to: str, message: str) -> RedirectResponse:
    response = RedirectResponse(to, status_code=303)
    response.set_cookie(FLASH_COOKIE, quote(message, safe=""), max_age=60, path="/", httponly=True,
                        samesite="strict")
    return response


def _employee_page(request: Request, who: Principal, services: Services, status: int = 200,
                   errors: dict[str, str] | None = None, values: dict[str, str] | None = None,
                   own_data: dict[str, Any] | None = None) -> HTMLResponse:
    state = services.state.employee(who.employee_id) if who.employee_id else None
    return _render(request, "employee.html.j2", status, who=who, state=state, policy=services.state.policy(),
                   is_hr=bool(who.roles & actions.EXEMPTION_DECIDERS), minutes_choices=PAUSE_MINUTES,
                   errors=errors or {}, values=values or {},
                   own=own_data_sections(request, who, services, **(own_data or {})))


def _hr_page(request: Request, who: Principal, services: Services, status: int = 200,
             errors: dict[tuple[str, str], str] | None = None) -> HTMLResponse:
    return _render(request, "hr.html.j2", status, who=who, requests=services.state.pending_requests(),
                   errors=errors or {}, is_hr=True)


@router.get("/static/portal.css")
def portal_css() -> FileResponse:
    """The portal's one stylesheet."""
    return FileResponse(STATIC / "portal.css", media_type="text/css")


@router.get("/", response_class=HTMLResponse)
def employee_page(request: Request, who: Me, services: Svc) -> HTMLResponse:
    """The caller's own page: capture state, pause/resume, exemption request, policy and consent."""
    return _employee_page(request, who, services)


def _where(request: Request) -> actions.Where:
    return actions.where(request.method, request.url.path)


@router.post("/portal/pause", dependencies=POST_GUARDS)
def pause(request: Request, who: Me, services: Svc, minutes: Annotated[str, Form()] = "",
          reason: Annotated[str, Form()] = "") -> Response:
    """Pause the caller's own capture (any employee_id in the form is ignored: self only)."""
    try:
        if minutes not in {str(m) for m in PAUSE_MINUTES}:
            raise actions.Invalid("minutes", f"choose {', '.join(map(str, PAUSE_MINUTES))} minutes")
        record = actions.pause_self(services, who, int(minutes), reason, at=_where(request))
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    except actions.Invalid as e:
        return _employee_page(request, who, services, 422, {e.field: e.message}, {"reason": reason})
    until = _time(record["pause_ends_at_us"])
    return _back("/", f"Capture paused until {until['text'] if until else ''}.")


@router.post("/portal/resume", dependencies=POST_GUARDS)
def resume(request: Request, who: Me, services: Svc) -> Response:
    """End the caller's own pause now."""
    try:
        actions.resume_self(services, who, at=_where(request))
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    return _back("/", "Capture resumed.")


@router.post("/portal/exemption-request", dependencies=POST_GUARDS)
def exemption_request(request: Request, who: Me, services: Svc, reason: Annotated[str, Form()] = "") -> Response:
    """The caller asks HR for an exemption."""
    try:
        actions.request_exemption(services, who, reason, at=_where(request))
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    except actions.Invalid as e:
        return _employee_page(request, who, services, 422, {"exemption_" + e.field: e.message},
                              {"exemption_reason": reason})
    return _back("/", "Your exemption request was sent to HR.")


@router.get("/hr", response_class=HTMLResponse)
def hr_page(request: Request, who: HR, services: Svc) -> HTMLResponse:
    """HR's queue of pending exemption requests."""
    return _hr_page(request, who, services)


@router.post("/portal/hr/{employee_id}/grant", dependencies=POST_GUARDS)
def grant(request: Request, employee_id: str, who: HR, services: Svc, reason: Annotated[str, Form()] = "") -> Response:
    """Grant ``employee_id`` an exemption."""
    try:
        actions.grant_exemption(services, who, employee_id, reason, at=_where(request))
    except actions.Invalid as e:
        return _hr_page(request, who, services, 422, {(employee_id, "grant"): e.message})
    return _back("/hr", f"Exemption granted to {employee_id}.")


@router.post("/portal/hr/{employee_id}/deny", dependencies=POST_GUARDS)
def deny(request: Request, employee_id: str, who: HR, services: Svc, reason: Annotated[str, Form()] = "") -> Response:
    """Deny ``employee_id``'s pending request (an audit entry; nothing changes for them)."""
    try:
        actions.deny_exemption(services, who, employee_id, reason, at=_where(request))
    except actions.Invalid as e:
        return _hr_page(request, who, services, 422, {(employee_id, "deny"): e.message})
    return _back("/hr", f"Exemption request of {employee_id} denied.")


# ---------------------------------------------------------------- employee: own stored data (Part 3 B)


def own_data_sections(request: Request, who: Principal, services: Services, *,
                      withdraw_errors: dict[str, str] | None = None,
                      withdraw_values: dict[str, str] | None = None) -> dict[str, Any]:
    """The employee page's "Captured about me today" and "My demonstrations": each section holds
    its data or the reason it cannot be shown (the rest of the page works either way)."""
    from handtrace.control.api import own
    from handtrace.control.api.services import WarehouseUnavailable

    settings = request.app.state.settings
    out: dict[str, Any] = {"captured": None, "captured_error": None, "demonstrations": [],
                           "demonstrations_error": None, "withdraw_errors": withdraw_errors or {},
                           "withdraw_values": withdraw_values or {}}
    if who.employee_id is None:
        return out
    try:
        out["captured"] = own.captured(services, settings, who, None)
    except WarehouseUnavailable as e:
        out["captured_error"] = str(e)
    try:
        out["demonstrations"] = own.demonstrations(services, settings, who)
    except WarehouseUnavailable as e:
        out["demonstrations_error"] = str(e)
    return out


@router.post("/portal/me/demonstrations/{demonstration_id}/withdraw", dependencies=POST_GUARDS)
def withdraw_demonstration(request: Request, demonstration_id: str, who: Me, services: Svc,
                           reason: Annotated[str, Form()] = "") -> Response:
    """Withdraw one of the caller's own demonstrations from training data (as ``POST
    /api/v1/me/demonstrations/{id}/withdraw``: own.withdraw, one audit entry); another person's
    or an unknown one: the same 404 page."""
    from handtrace.control.api import own
    from handtrace.control.api.services import WarehouseUnavailable

    try:
        own.withdraw(services, request.app.state.settings, who, demonstration_id, reason, method=request.method,
                     path=request.url.path)
    except own.NotFound:
        raise HTTPException(404, own.NOT_FOUND) from None
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    except actions.Invalid as e:
        return _employee_page(request, who, services, 422, own_data={
            "withdraw_errors": {demonstration_id: e.message}, "withdraw_values": {demonstration_id: reason}})
    except WarehouseUnavailable as e:
        return _employee_page(request, who, services, 503, own_data={
            "withdraw_errors": {demonstration_id: f"not withdrawn: {e}"},
            "withdraw_values": {demonstration_id: reason}})
    return _back("/#demonstrations", "Demonstration withdrawn: it will be left out of training data.")


async def form_fields(request: Request) -> dict[str, str]:
    """The posted form as text fields (a repeated name: the last one), for forms whose rows are
    numbered (``selector_0``, ``rate_0``, ...)."""
    form = await request.form()
    return {k: v for k, v in form.multi_items() if isinstance(v, str)}


Fields = Annotated[dict[str, str], Depends(form_fields)]


def _rows(fields: dict[str, str], *names: str) -> list[dict[str, str]]:
    """Numbered form rows (``<name>_<i>``) in order, each {name: stripped value}, at most MAX_ROWS."""
    pattern = re.compile(rf"(?:{'|'.join(map(re.escape, names))})_(\d{{1,4}})")
    indices = sorted({int(m.group(1)) for k in fields if (m := pattern.fullmatch(k))})[:MAX_ROWS]
    return [{n: fields.get(f"{n}_{i}", "").strip() for n in names} for i in indices]


def _blank_rows(n: int, *names: str) -> list[dict[str, str]]:
    return [dict.fromkeys(names, "") for _ in range(n)]


# ---------------------------------------------------------------- ops: sampling


def sampling_changes(old: dict[str, Any], new: dict[str, Any]) -> list[dict[str, Any]]:
    """What replacing the sampling map ``old`` by ``new`` changes, per selector (sorted):
    {selector, before, after, change: added|removed|changed|unchanged}; an unset selector keeps
    everything it matches (rate 1)."""
    out = []
    for sel in sorted(set(old) | set(new)):
        before, after = old.get(sel), new.get(sel)
        change = ("added" if before is None else "removed" if after is None
                  else "unchanged" if float(before) == float(after) else "changed")
        out.append({"selector": sel, "before": before, "after": after, "change": change})
    return out


def _sampling_form(rows: list[dict[str, str]]) -> tuple[dict[str, Any], dict[str, tuple[int, str]],
                                                        dict[tuple[int, str], str]]:
    """Rates by selector from the form rows, the row of each selector, and the problems the form
    itself finds (a rate without a selector, a selector twice); rate text that is not a number
    goes through as text, for the policy's own validation to refuse."""
    rates: dict[str, Any] = {}
    where: dict[str, tuple[int, str]] = {}
    errors: dict[tuple[int, str], str] = {}
    for i, row in enumerate(rows):
        sel, raw = row["selector"], row["rate"]
        if not sel and not raw:
            continue  # an empty row: nothing to add, or a rate removed
        if not sel:
            errors[(i, "selector")] = "a selector is needed for this rate (clear the rate to remove the row)"
        elif sel in where:
            errors[(i, "selector")] = f"{sel} is already on row {where[sel][0] + 1}"
        elif not raw:
            errors[(i, "rate")] = "a rate from 0 to 1 is needed (clear the selector to remove the row)"
        else:
            where[sel] = (i, sel)
            try:
                rate: Any = float(raw)
            except ValueError:
                rate = raw
            rates[sel] = rate if not isinstance(rate, float) or math.isfinite(rate) else raw
    return rates, where, errors


def _sampling_estimate(request: Request, services: Services, current: dict[str, Any],
                       rates: dict[str, Any]) -> dict[str, Any]:
    """The dry run of ``rates`` against the rates in force (control/api/dryrun.py), as the API's
    ``?dry_run=true`` answers it; ``{"available": False, "why"}`` without a readable warehouse."""
    return dryrun.dry_run(services.warehouse, current, rates, window_s=request.app.state.settings.api.dry_run_window_s)


def _ops_page(request: Request, who: Principal, services: Services, status: int = 200, *,
              rows: list[dict[str, str]] | None = None, errors: dict[Any, str] | None = None, reason: str = "",
              summary: list[dict[str, Any]] | None = None, estimate: dict[str, Any] | None = None) -> HTMLResponse:
    policy = services.state.policy() or actions.EMPTY_POLICY
    if rows is None:
        rows = [{"selector": s, "rate": f"{float(r):g}"} for s, r in sorted(policy["sampling"].items())]
        rows += _blank_rows(EMPTY_ROWS, "selector", "rate")
    errors = errors or {}
    # The fleet impact summary: what the rates in force store (the dry run of no change).
    fleet = _sampling_estimate(request, services, policy["sampling"], policy["sampling"])
    return _render(request, "ops.html.j2", status, who=who, policy=policy, rows=rows, errors=errors,
                   reason=reason, summary=summary, can_apply=summary is not None and set(errors) <= {"reason"},
                   estimate=estimate, fleet=fleet)


@router.get("/ops", response_class=HTMLResponse)
def ops_page(request: Request, who: Ops, services: Svc) -> HTMLResponse:
    """The sampling rates in force and the form to change them (ops, admin)."""
    return _ops_page(request, who, services)


@router.post("/portal/ops/sampling", dependencies=POST_GUARDS)
def set_sampling(request: Request, who: Ops, services: Svc, fields: Fields) -> Response:
    """``intent=preview``: what the new rates change, against the policy in force; ``intent=apply``:
    publish them (actions.change_policy, as ``PUT /api/v1/policy/sampling`` does)."""
    rows = _rows(fields, "selector", "rate")
    reason = fields.get("reason", "")
    apply = fields.get("intent") == "apply"
    rates, where, errors = _sampling_form(rows)
    current, _doc, problems = actions.plan_policy(services, {"sampling": rates}, reason, rename={"sampling": "rates"},
                                                  check_reason=apply)
    page_errors: dict[Any, str] = dict(errors)
    for field, message in problems:
        sel = field.removeprefix("rates.") if field.startswith("rates.") else None
        if sel is not None and sel in where:
            page_errors[(where[sel][0], "rate" if "must be a number" in message else "selector")] = message
        elif field == "reason":
            page_errors["reason"] = message
        else:  # e.g. a section of the policy in force that no longer validates: say all of it
            page_errors["form"] = "; ".join(filter(None, (page_errors.get("form"), f"{field}: {message}")))
    if apply and not page_errors and fields.get("base_version") != str(current["version"]):
        page_errors["form"] = (f"the policy changed (now version {current['version']}) since this page was "
                               "opened: check what this changes, then apply again")
    summary = None if errors or any(isinstance(k, tuple) for k in page_errors) else \
        sampling_changes(current["sampling"], rates)
    if page_errors or not apply:
        estimate = None if summary is None else _sampling_estimate(request, services, current["sampling"], rates)
        return _ops_page(request, who, services, 422 if page_errors else 200, rows=rows, errors=page_errors,
                         reason=reason, summary=summary, estimate=estimate)
    try:
        record = actions.change_policy(services, who, "policy_sampling", reason, {"sampling": rates},
                                       rename={"sampling": "rates"}, method=request.method, path=request.url.path)
    except actions.Problems as e:  # the policy moved between the check and the change
        return _ops_page(request, who, services, 422, rows=rows, reason=reason,
                         errors={"form": "; ".join(f"{f}: {m}" for f, m in e.problems)})
    return _back("/ops", f"Sampling rates applied: policy version {record['policy']['version']}.")


# ---------------------------------------------------------------- security: allowlists, typed text


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _security_page(request: Request, who: Principal, services: Services, status: int = 200, *,
                   errors: dict[Any, Any] | None = None, values: dict[str, str] | None = None,
                   text_rows: list[dict[str, str]] | None = None) -> HTMLResponse:
    policy = services.state.policy() or actions.EMPTY_POLICY
    if text_rows is None:
        text_rows = [{"app": a, "mode": m} for a, m in sorted(policy["text_capture"].items())]
        text_rows += _blank_rows(EMPTY_ROWS, "app", "mode")
    values = {"allowed_apps": "\n".join(policy["allowed_apps"]),
              "allowed_domains": "\n".join(policy["allowed_domains"]), **(values or {})}
    return _render(request, "security.html.j2", status, who=who, policy=policy, errors=errors or {}, values=values,
                   text_rows=text_rows, modes=TEXT_MODES)


TEXT_MODES = (("masked", "masked (letters replaced)"), ("none", "none (no typed text)"),
              ("full", "full (typed text kept)"))


@router.get("/security", response_class=HTMLResponse)
def security_page(request: Request, who: Security, services: Svc) -> HTMLResponse:
    """Allowed apps and domains, and typed-text capture per app, with forms (security, admin)."""
    return _security_page(request, who, services)


def _entry_errors(problems: list[tuple[str, str]], names: dict[str, list[str]]) -> dict[str, list[str]]:
    """Problems grouped by the form field they concern (``allowed_domains.3`` -> allowed_domains,
    the message naming the entry)."""
    out: dict[str, list[str]] = {}
    for field, message in problems:
        head, _, index = field.partition(".")
        entries = names.get(head, [])
        if index.isdigit() and int(index) < len(entries) and f"`{entries[int(index)]}`" not in message:
            message = f"`{entries[int(index)]}`: {message}"
        out.setdefault(head if head in names or head == "reason" else "form", []).append(message)
    return out


@router.post("/portal/security/allowlist", dependencies=POST_GUARDS)
def set_allowlist(request: Request, who: Security, services: Svc, allowed_apps: Annotated[str, Form()] = "",
                  allowed_domains: Annotated[str, Form()] = "", reason: Annotated[str, Form()] = "") -> Response:
    """Replace the allowed apps and domains (one per line; as ``PUT /api/v1/policy/allowlist``)."""
    apps, domains = _lines(allowed_apps), _lines(allowed_domains)
    try:
        record = actions.change_policy(services, who, "policy_allowlist", reason,
                                       {"allowed_apps": apps, "allowed_domains": domains},
                                       method=request.method, path=request.url.path)
    except actions.Problems as e:
        errors = _entry_errors(e.problems, {"allowed_apps": apps, "allowed_domains": domains})
        if "reason" in errors:
            errors["allowlist_reason"] = errors.pop("reason")
        return _security_page(request, who, services, 422, errors=errors, values={
            "allowed_apps": allowed_apps, "allowed_domains": allowed_domains, "allowlist_reason": reason})
    return _back("/security", f"Allowlists applied: policy version {record['policy']['version']}.")


@router.post("/portal/security/text-capture", dependencies=POST_GUARDS)
def set_text_capture(request: Request, who: Security, services: Svc, fields: Fields) -> Response:
    """Replace typed-text capture by app (rows; as ``PUT /api/v1/policy/text-capture``)."""
    rows = _rows(fields, "app", "mode")
    reason = fields.get("reason", "")
    modes: dict[str, str] = {}
    where: dict[str, int] = {}
    errors: dict[Any, Any] = {}
    for i, row in enumerate(rows):
        if not row["app"]:
            continue  # an empty row
        if row["app"] in where:
            errors[(i, "app")] = f"{row['app']} is already on row {where[row['app']] + 1}"
            continue
        where[row["app"]] = i
        modes[row["app"]] = row["mode"]
    record = None
    if not errors:
        try:
            record = actions.change_policy(services, who, "policy_text_capture", reason, {"text_capture": modes},
                                           method=request.method, path=request.url.path)
        except actions.Problems as e:
            for field, message in e.problems:
                app = field.removeprefix("text_capture.") if field.startswith("text_capture.") else None
                if app is not None and app in where:
                    errors[(where[app], "mode" if "none, masked or full" in message else "app")] = message
                else:
                    errors.setdefault("text_" + field if field == "reason" else "form", []).append(message)
    if record is None:
        return _security_page(request, who, services, 422, errors=errors, text_rows=rows,
                              values={"text_reason": reason})
    return _back("/security", f"Typed-text capture applied: policy version {record['policy']['version']}.")


# ---------------------------------------------------------------- auditor


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, who: Auditor, services: Svc, outcome: str = "all") -> HTMLResponse:
    """The audit trail, newest first (at most AUDIT_LIMIT entries), filtered by outcome."""
    error = None
    if outcome not in OUTCOMES:
        error, outcome = f"choose one of {', '.join(OUTCOMES)}", "all"
    entries = services.audit.entries(AUDIT_LIMIT if outcome == "all" else AUDIT_SCAN)
    if outcome != "all":
        entries = [e for e in entries if e.get("outcome") == outcome][:AUDIT_LIMIT]
    return _render(request, "audit.html.j2", 422 if error else 200, who=who, entries=entries, outcome=outcome,
                   outcomes=OUTCOMES, error=error, limit=AUDIT_LIMIT)


async def _html_errors(request: Request, exc: Exception) -> Response:
    """Errors on pages as pages (401, 403, 404...); /api/ keeps FastAPI's JSON errors."""
    if not isinstance(exc, StarletteHTTPException):  # registered for it only
        raise exc
    if request.url.path.startswith("/api/"):
        return await http_exception_handler(request, exc)
    html = _env.get_template("error.html.j2").render(request=request, status=exc.status_code, detail=exc.detail,
                                                     flash=None)
    return HTMLResponse(html, status_code=exc.status_code, headers=getattr(exc, "headers", None))


def install(app: FastAPI) -> None:
    """Serve the portal from ``app``: the pages router and HTML error pages outside /api/."""
    app.include_router(router)
    app.add_exception_handler(StarletteHTTPException, _html_errors)
