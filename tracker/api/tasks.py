"""/v1/tasks: register ids, read and list tasks, stop tracking, a task's deliveries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BeforeValidator, ValidationError
from starlette.concurrency import run_in_threadpool

from tracker import ssrf, status
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
from tracker.api.limits import DEFAULT_PAGE, MAX_PAGE
from tracker.api.state import Deps
from tracker.api.strict_json import StrictJSONResponse
from tracker.config import Settings
from tracker.store import Registration
from tracker.store.records import DeliveryRecord

NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": models.ErrorOut, "description": "no such task"},
}

router = APIRouter(
    prefix="/v1/tasks", tags=["tasks"], dependencies=[Depends(require_token)], responses=ERRORS
)


async def validate_registration(
    body: object, platforms: Sequence[str], settings: Settings
) -> tuple[Registration | None, list[str]]:
    """Check a POST /v1/tasks body whole; returns the registration or every problem found."""
    hooks = settings.webhooks
    rules = models.RegistrationRules(
        platforms=platforms, endpoints=hooks.endpoints, has_default_url=hooks.url is not None
    )
    found: list[str] = []
    parsed: models.RegistrationIn | None = None
    try:
        parsed = models.RegistrationIn.model_validate(body, context=rules)
    except ValidationError as exc:
        found = problems(exc.errors())
    url = body.get("webhook_url") if isinstance(body, dict) else None
    if isinstance(url, str):
        try:
            await ssrf.check_url(url, ssrf.parse_allow(hooks.allow_private))
        except ssrf.UnsafeURL as exc:
            found.append(f"webhook_url: {exc.reason}")
    if parsed is None or found:
        return None, found
    registration = Registration(
        platform=parsed.platform,
        ids=parsed.ids,
        webhook_url=parsed.webhook_url,
        endpoint=parsed.endpoint,
        events=tuple(map(status.EventType, parsed.events)) if parsed.events is not None else None,
        metadata=parsed.metadata,
    )
    return registration, []


async def accepting(deps: Deps) -> None:
    """Registrations stop while the daemon stops: it would never poll them."""
    if not deps.state.accepting:
        raise ApiError(503, "shutting down; not taking registrations", headers={"Retry-After": "5"})


@router.post(
    "",
    status_code=201,
    response_model=models.RegisteredOut,
    responses={
        200: {"model": models.RegisteredOut, "description": "every id was tracked already"},
        503: {"model": models.ErrorOut, "description": "the daemon is stopping"},
        **BODY_ERRORS,
    },
    dependencies=[Depends(accepting)],
    openapi_extra=request_body(models.RegistrationIn),
)
async def register(
    deps: Deps, body: Annotated[Any, Depends(json_body("invalid registration"))]
) -> Response:
    """Track ids of one platform; idempotent, all or nothing."""
    registration, found = await validate_registration(
        body, list(deps.platforms), deps.state.settings
    )
    if registration is None:
        raise ApiError(422, "invalid registration", problems=found)
    new, existing = await run_in_threadpool(deps.store.register, registration, deps.clock.now())
    if new:
        deps.state.on_registered()
    return StrictJSONResponse(
        {"registered": new, "existing": existing}, status_code=201 if new else 200
    )


TaskStatusFilter = Annotated[status.TaskStatus | None, Query(), BeforeValidator(blank_is_none)]
PlatformFilter = Annotated[str | None, Query(max_length=200), BeforeValidator(blank_is_none)]


@router.get("", response_model=models.TaskPageOut)
async def list_tasks(
    deps: Deps,
    status: TaskStatusFilter = None,
    platform: PlatformFilter = None,
    limit: Limit = DEFAULT_PAGE,
    cursor: Cursor = None,
) -> Response:
    """A page of tasks, newest first; pass next_cursor back as cursor for the next page."""
    if platform is not None and platform not in deps.platforms:
        return page_json("tasks", [], None)  # no task can be there; and no NUL reaches SQL
    rows, next_cursor = await run_in_threadpool(
        lambda: deps.store.list_tasks(status=status, platform=platform, limit=limit, before=cursor)
    )
    return page_json("tasks", [views.task_json(t, with_history=False) for t in rows], next_cursor)


def _no_task(platform: str, task_id: str) -> ApiError:
    return ApiError(404, f"no task {task_id[:200]!r} on platform {platform[:80]!r}")


def _could_exist(deps: Deps, platform: str, task_id: str) -> bool:
    return models.could_be_stored(deps.platforms, platform, task_id)


async def _task(deps: Deps, platform: str, task_id: str) -> Response:
    task = None
    if _could_exist(deps, platform, task_id):
        task = await run_in_threadpool(deps.store.get, platform, task_id)
    if task is None:
        raise _no_task(platform, task_id)
    return StrictJSONResponse(views.task_json(task))


@router.get(
    "/{platform}/{task_id:path}/deliveries",
    response_model=models.DeliveryListOut,
    responses=NOT_FOUND,
)
async def task_deliveries(request: Request, deps: Deps, platform: str, task_id: str) -> Response:
    """The task's webhook deliveries, oldest first, each with every attempt.

    A path ending in a literal ``/deliveries`` asks for these; a task whose own id ends in
    ``/deliveries`` is fetched with that slash percent-encoded (``.../x%2Fdeliveries``).
    """
    if not request.scope.get("raw_path", b"/deliveries").endswith(b"/deliveries"):
        return await _task(deps, platform, f"{task_id}/deliveries")
    if not _could_exist(deps, platform, task_id):
        raise _no_task(platform, task_id)
    task = await run_in_threadpool(deps.store.get, platform, task_id)
    if task is None:
        raise _no_task(platform, task_id)
    rows = await run_in_threadpool(_every_delivery, deps, platform, task_id)
    return StrictJSONResponse({"deliveries": [views.delivery_json(d) for d in reversed(rows)]})


def _every_delivery(deps: Deps, platform: str, task_id: str) -> list[DeliveryRecord]:
    """Every delivery of the task, newest first: the route promises them all, a task that
    sent many progress events included, so it reads page after page."""
    rows: list[DeliveryRecord] = []
    cursor: int | None = None
    while True:
        page, cursor = deps.store.list_deliveries(
            platform=platform, task_id=task_id, limit=MAX_PAGE, before=cursor
        )
        rows += page
        if cursor is None:
            return rows


@router.get("/{platform}/{task_id:path}", response_model=models.TaskOut, responses=NOT_FOUND)
async def get_task(deps: Deps, platform: str, task_id: str) -> Response:
    """The task with its status history, oldest first."""
    return await _task(deps, platform, task_id)


@router.delete("/{platform}/{task_id:path}", status_code=204, responses=NOT_FOUND)
async def remove_task(deps: Deps, platform: str, task_id: str) -> Response:
    """Stop tracking the task; no webhook follows."""
    removed = _could_exist(deps, platform, task_id) and await run_in_threadpool(
        deps.store.remove, platform, task_id
    )
    if not removed:
        raise _no_task(platform, task_id)
    return Response(status_code=204)
