"""Builds the FastAPI application: routers, services, and one error shape for everything."""

from __future__ import annotations

from collections.abc import Sequence

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from tracker.api import auth, deliveries, ops, tasks
from tracker.api.errors import ApiError, allowed_methods, problems, unauthorized
from tracker.api.state import ApiState, Services
from tracker.api.strict_json import StrictJSONResponse
from tracker.clock import Clock
from tracker.store.abc import Store

log = structlog.get_logger("tracker.api")


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)  # registered for this type only
    return exc.response()


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)  # registered for this type only
    title = "invalid query" if request.method == "GET" else "invalid request"
    return ApiError(422, title, problems=problems(exc.errors())).response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # registered for this type only
    path = request.url.path
    # Under /v1/ a caller without the token learns nothing, not even which routes exist.
    if path.startswith("/v1/") and not auth.authorized(request):
        return unauthorized().response()
    headers = exc.headers
    if exc.status_code == 404:
        message = f"no route {request.method} {path[:200]!r}"
    elif exc.status_code == 405:
        message = f"method {request.method} not allowed on {path[:200]!r}"
        headers = {"Allow": allowed_methods(request)}
    else:
        message = str(exc.detail)
    return ApiError(exc.status_code, message, headers=headers).response()


class HeadAsGet:
    """Answers HEAD wherever GET is answered, as RFC 9110 wants of every server (uptime
    monitors probe with HEAD): the application sees a GET, and uvicorn, which keeps the
    request's own method, sends the answer's headers without its body.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "HEAD":
            scope = {**scope, "method": "GET"}
        await self.app(scope, receive, send)


async def _unexpected(request: Request, exc: Exception) -> Response:
    log.error("api_request_failed", method=request.method, error=type(exc).__name__)
    return StrictJSONResponse({"error": "internal error"}, status_code=500)


def build(*, store: Store, platforms: Sequence[str], state: ApiState, clock: Clock) -> FastAPI:
    """The FastAPI application over ``store``."""
    app = FastAPI(
        title="tracker",
        summary="Tracks AI generation tasks on relays and delivers signed webhooks.",
        version="1",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by ops.openapi, behind the token when metrics are
        default_response_class=StrictJSONResponse,
        # A path with a slash too many (or too few) is a 404 in the error shape, behind the
        # token under /v1, not a bare 307 telling a caller without one which routes exist.
        redirect_slashes=False,
    )
    app.state.services = Services(store=store, platforms=list(platforms), state=state, clock=clock)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    for router in (ops.router, ops.protected, tasks.router, deliveries.router):
        app.include_router(router)
    app.add_middleware(HeadAsGet)
    app.add_middleware(auth.WebPageGuard, state=state)
    return app
