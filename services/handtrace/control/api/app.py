"""The ASGI app: create_app(settings, services=None) -> FastAPI (docs/design/control-plane.md)."""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response

from handtrace.control.api.actions import Invalid, Problems, Refused
from handtrace.control.api.auth import COOKIE, Authenticator
from handtrace.control.api.roles import Role
from handtrace.control.api.routes import router
from handtrace.control.api.services import Services, StateUnavailable, kafka_services
from handtrace.core.controls import ControlError
from handtrace.core.settings import Settings


def _field(loc: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] in ("body", "query", "path", "header", "cookie"):
        parts = parts[1:]
    return ".".join(parts) or "body"


def problems_response(problems: list[tuple[str, str]]) -> JSONResponse:
    """422 with every problem: {"detail": [{"field": ..., "message": ...}, ...]}."""
    return JSONResponse(status_code=422, content={"detail": [{"field": f, "message": m} for f, m in problems]})


def create_app(settings: Settings, services: Services | None = None) -> FastAPI:
    """The API (and, when pages are present, the portal). Refuses to start (ApiConfigError, or
    ControlError without a signing key) with settings that would be unsafe."""
    authenticator = Authenticator(settings)  # first: fails closed before anything connects

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        app.state.services.close()  # consumers and producers go with the app, not at exit

    app = FastAPI(title="handtrace control plane", version="1", lifespan=lifespan,
                  description="The only issuer of authoritative controls: pauses, exemptions and the "
                  "capture policy, with roles and an audit trail (docs/api.md).")
    app.state.settings = settings
    app.state.authenticator = authenticator
    app.state.services = services if services is not None else kafka_services(settings)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return problems_response([(_field(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in exc.errors()])

    @app.exception_handler(Invalid)
    async def _problems(_request: Request, exc: Invalid) -> JSONResponse:
        return problems_response(exc.problems if isinstance(exc, Problems) else [(exc.field, exc.message)])

    @app.exception_handler(Refused)
    async def _refused(_request: Request, exc: Refused) -> JSONResponse:
        return JSONResponse(status_code=403, content={"detail": str(exc)})  # already in the audit trail

    @app.exception_handler(ControlError)
    async def _not_issued(_request: Request, exc: ControlError) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": f"control not issued: {exc}"})

    @app.exception_handler(StateUnavailable)
    async def _unavailable(_request: Request, exc: StateUnavailable) -> JSONResponse:
        # e.g. the audit topic unreachable: the request is not answered as if it were recorded.
        return JSONResponse(status_code=503, content={"detail": f"control state unavailable: {exc}"})

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        """Liveness/readiness for Kubernetes probes (helm/handtrace): the process serves HTTP.
        No authentication and no Kafka round trip, so a broker outage does not restart the API
        (its requests answer 503 then)."""
        return {"status": "ok"}

    app.include_router(router)

    if authenticator.dev is not None:
        dev = authenticator.dev

        @app.get("/login/dev", tags=["dev"], include_in_schema=False)
        def login_dev(as_: Annotated[str, Query(alias="as", min_length=1, max_length=128)],
                      roles: Annotated[str, Query()] = "", employee_id: str | None = None,
                      next: str | None = None) -> Response:
            """Development only (dev_mode, loopback): a token for ``as`` with ``roles`` (comma
            separated), also set as the ht_token cookie."""
            wanted = [r for r in roles.split(",") if r]
            unknown = [r for r in wanted if r not in Role.__members__]
            if unknown:
                raise HTTPException(status_code=422, detail=f"unknown roles {unknown}")
            token = dev.mint(as_, wanted, employee_id or as_)
            resp: Response
            if next is not None and next.startswith("/") and not next.startswith("//"):
                resp = RedirectResponse(next, status_code=303)
            else:
                resp = JSONResponse({"token": token, "token_type": "Bearer"})
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", max_age=3600)
            return resp

    try:  # the portal pages (pages.py, built alongside the API)
        pages = importlib.import_module("handtrace.control.api.pages")
    except ModuleNotFoundError as e:
        if e.name != "handtrace.control.api.pages":
            raise
    else:
        pages.install(app)  # the pages router and HTML error pages outside /api/
    return app
