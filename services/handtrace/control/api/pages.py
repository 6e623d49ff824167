"""The people's portal: server-rendered pages for employees and HR (issue #13, ADR 0013).

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

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.exceptions import HTTPException as StarletteHTTPException

from handtrace.control.api import actions
from handtrace.control.api.auth import Principal, principal, require
from handtrace.control.api.roles import Role
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


def _render(request: Request, template: str, status: int = 200, **ctx: Any) -> HTMLResponse:
    flash = request.cookies.get(FLASH_COOKIE)
    html = _env.get_template(template).render(request=request, flash=unquote(flash) if flash else None, **ctx)
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
                   errors: dict[str, str] | None = None, values: dict[str, str] | None = None) -> HTMLResponse:
    state = services.state.employee(who.employee_id) if who.employee_id else None
    return _render(request, "employee.html.j2", status, who=who, state=state, policy=services.state.policy(),
                   is_hr=bool(who.roles & actions.EXEMPTION_DECIDERS), minutes_choices=PAUSE_MINUTES,
                   errors=errors or {}, values=values or {})


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


@router.post("/portal/pause", dependencies=POST_GUARDS)
def pause(request: Request, who: Me, services: Svc, minutes: Annotated[str, Form()] = "",
          reason: Annotated[str, Form()] = "") -> Response:
    """Pause the caller's own capture (any employee_id in the form is ignored: self only)."""
    try:
        if minutes not in {str(m) for m in PAUSE_MINUTES}:
            raise actions.Invalid("minutes", f"choose {', '.join(map(str, PAUSE_MINUTES))} minutes")
        record = actions.pause_self(services, who, int(minutes), reason)
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    except actions.Invalid as e:
        return _employee_page(request, who, services, 422, {e.field: e.message}, {"reason": reason})
    until = _time(record["pause_ends_at_us"])
    return _back("/", f"Capture paused until {until['text'] if until else ''}.")


@router.post("/portal/resume", dependencies=POST_GUARDS)
def resume(who: Me, services: Svc) -> Response:
    """End the caller's own pause now."""
    try:
        actions.resume_self(services, who)
    except actions.Refused as e:
        raise HTTPException(403, str(e)) from None
    return _back("/", "Capture resumed.")


@router.post("/portal/exemption-request", dependencies=POST_GUARDS)
def exemption_request(request: Request, who: Me, services: Svc, reason: Annotated[str, Form()] = "") -> Response:
    """The caller asks HR for an exemption."""
    try:
        actions.request_exemption(services, who, reason)
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
        actions.grant_exemption(services, who, employee_id, reason)
    except actions.Invalid as e:
        return _hr_page(request, who, services, 422, {(employee_id, "grant"): e.message})
    return _back("/hr", f"Exemption granted to {employee_id}.")


@router.post("/portal/hr/{employee_id}/deny", dependencies=POST_GUARDS)
def deny(request: Request, employee_id: str, who: HR, services: Svc, reason: Annotated[str, Form()] = "") -> Response:
    """Deny ``employee_id``'s pending request (an audit entry; nothing changes for them)."""
    try:
        actions.deny_exemption(services, who, employee_id, reason)
    except actions.Invalid as e:
        return _hr_page(request, who, services, 422, {(employee_id, "deny"): e.message})
    return _back("/hr", f"Exemption request of {employee_id} denied.")


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
