"""What operators and tools use: /healthz, /readyz, /metrics and the API's own description."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool

from tracker.api import models
from tracker.api.auth import require_token_for_ops
from tracker.api.errors import ApiError
from tracker.api.state import Deps
from tracker.api.strict_json import StrictJSONResponse

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": models.ErrorOut,
        "description": "missing or invalid bearer token ([server].metrics_require_auth)",
    },
}
#: routes behind the token only when [server].metrics_require_auth is true
protected = APIRouter(
    tags=["operations"], dependencies=[Depends(require_token_for_ops)], responses=UNAUTHORIZED
)
router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=models.HealthOut)
async def healthz() -> Response:
    """200 while the process is up."""
    return StrictJSONResponse({"status": "ok"})


@protected.get(
    "/readyz",
    response_model=models.ReadyOut,
    responses={503: {"model": models.ReadyOut, "description": "not ready, with the reasons"}},
)
async def readyz(deps: Deps) -> Response:
    """200 when ready, else 503 with the reasons."""
    reasons = await deps.state.readiness.run()
    if reasons:
        return StrictJSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
    return StrictJSONResponse({"status": "ready"})


@protected.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}},
        404: {"model": models.ErrorOut, "description": "metrics are not enabled"},
    },
)
async def metrics(deps: Deps) -> Response:
    """Prometheus text format."""
    if deps.state.metrics is None:
        raise ApiError(404, "metrics are not enabled")
    body = await run_in_threadpool(deps.state.metrics)
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@protected.get("/openapi.json", include_in_schema=False)
async def openapi(request: Request, deps: Deps) -> Response:
    """The OpenAPI document of this API."""
    # A copy: the platforms and tokens in force are filled in on every request.
    document: dict[str, Any] = copy.deepcopy(request.app.openapi())
    register = document["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]
    register["application/json"]["schema"]["properties"]["platform"]["enum"] = sorted(
        deps.platforms
    )
    server = deps.state.settings.server
    if not server.api_tokens:
        # An API without tokens (loopback only) asks for none; say so rather than mislead.
        for path in document["paths"].values():
            for operation in path.values():
                operation.pop("security", None)
        document.get("components", {}).pop("securitySchemes", None)
    elif not server.metrics_require_auth:
        # FastAPI lists the token on these whatever the setting; it is asked for only when on.
        for path, method in _behind_the_setting():
            document["paths"][path][method].pop("security", None)
    return StrictJSONResponse(document)


def _behind_the_setting() -> Iterator[tuple[str, str]]:
    """The documented operations (path, method) of ``protected``."""
    for route in protected.routes:
        if isinstance(route, APIRoute) and route.include_in_schema:
            for method in route.methods or ():
                yield route.path, method.lower()


@protected.get("/docs", include_in_schema=False)
async def docs() -> Response:
    """Swagger UI over /openapi.json."""
    return get_swagger_ui_html(openapi_url="/openapi.json", title="tracker API")
