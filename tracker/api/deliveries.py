"""/v1/deliveries: list webhook deliveries, queue one again, recover the dead ones of a window."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Response
from pydantic import BeforeValidator, ValidationError
from starlette.concurrency import run_in_threadpool

from tracker.api import models, views
from tracker.api.auth import require_token
from tracker.api.body import json_body
from tracker.api.common import (
    BODY_ERRORS,
    ERRORS,
    Cursor,
    Limit,
    blank_is_none,
    page_json,
    request_body,
)
from tracker.api.errors import ApiError, problems
from tracker.api.limits import DEFAULT_PAGE, no_delivery, row_id
from tracker.api.state import Deps
from tracker.api.strict_json import StrictJSONResponse
from tracker.retry import DeliveryState

router = APIRouter(
    prefix="/v1/deliveries",
    tags=["deliveries"],
    dependencies=[Depends(require_token)],
    responses=ERRORS,
)

StateFilter = Annotated[DeliveryState | None, Query(), BeforeValidator(blank_is_none)]


@router.get("", response_model=models.DeliveryPageOut)
async def list_deliveries(
    deps: Deps, state: StateFilter = None, limit: Limit = DEFAULT_PAGE, cursor: Cursor = None
) -> Response:
    """A page of deliveries, newest first, each with every attempt."""
    rows, next_cursor = await run_in_threadpool(
        lambda: deps.store.list_deliveries(state=state, limit=limit, before=cursor)
    )
    return page_json("deliveries", [views.delivery_json(d) for d in rows], next_cursor)


@router.post(
    "/recover",
    response_model=models.RequeuedOut,
    responses=BODY_ERRORS,
    openapi_extra=request_body(models.RecoverIn),
)
async def recover(
    deps: Deps, body: Annotated[Any, Depends(json_body("invalid recover request"))]
) -> Response:
    """Queue every dead delivery created in [since, until) again."""
    try:
        window = models.RecoverIn.model_validate(body)
    except ValidationError as exc:
        raise ApiError(422, "invalid recover request", problems=problems(exc.errors())) from None
    ids = await run_in_threadpool(
        lambda: deps.store.requeue(deps.clock.now(), since=window.since, until=window.until)
    )
    return StrictJSONResponse({"requeued": ids})


@router.post(
    "/{delivery_id}/redeliver",
    status_code=202,
    response_model=models.RequeuedOut,
    responses={404: {"model": models.ErrorOut, "description": "no such delivery"}},
)
async def redeliver(deps: Deps, delivery_id: str) -> Response:
    """Queue one delivery again, whatever its state, with the same webhook-id."""
    pk = row_id(delivery_id)
    if pk is None:
        raise ApiError(404, no_delivery(delivery_id))
    ids = await run_in_threadpool(lambda: deps.store.requeue(deps.clock.now(), pk=pk))
    if not ids:
        raise ApiError(404, f"no delivery {delivery_id!r}")
    return StrictJSONResponse({"requeued": ids}, status_code=202)
