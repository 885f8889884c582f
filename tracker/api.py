"""The HTTP API: authentication, validation of what apps send, and the JSON shapes they get."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tracker import clock, ssrf, status
from tracker.clock import Clock
from tracker.config import Settings
from tracker.retry import DeliveryState
from tracker.store import Registration, SqlStore
from tracker.store.records import DeliveryRecord, TaskRecord

MAX_IDS = 1000
MAX_ID_LENGTH = 200
MAX_METADATA_BYTES = 4096
MAX_PAGE = 1000
DEFAULT_PAGE = 50
REGISTRATION_FIELDS = frozenset(
    {"platform", "ids", "webhook_url", "endpoint", "events", "metadata"}
)


@dataclasses.dataclass(slots=True)
class ApiState:
    """What the running daemon tells the API: whether it takes work, and live settings."""

    settings: Settings
    accepting: bool = True
    #: readiness checks, each returning None when fine or the reason it is not
    readiness: Sequence[Callable[[], Awaitable[str | None]]] = ()
    metrics: Callable[[], bytes] | None = None


def _error(code: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=code)


def _printable_id(value: object) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_ID_LENGTH
        and value.isprintable()
        and value.strip() == value
    )


async def validate_registration(  # noqa: PLR0912 - one check per field, all reported together
    body: object, platforms: Sequence[str], settings: Settings
) -> tuple[Registration | None, list[str]]:
    """Check a POST /v1/tasks body whole; returns the registration or every problem found."""
    if not isinstance(body, dict):
        return None, ["body: must be a JSON object"]
    problems = [f"{key}: unknown field" for key in sorted(set(body) - REGISTRATION_FIELDS)]
    platform = body.get("platform")
    if not isinstance(platform, str) or platform not in platforms:
        problems.append(f"platform: must be one of {sorted(platforms)}, got {platform!r:.80}")
    ids = body.get("ids")
    if not isinstance(ids, list) or not ids:
        problems.append("ids: must be a non-empty array of task ids")
        ids = []
    elif len(ids) > MAX_IDS:
        problems.append(f"ids: at most {MAX_IDS} ids per request, got {len(ids)}")
    problems.extend(
        f"ids[{i}]: must be a non-empty string of at most {MAX_ID_LENGTH} printable characters "
        "without surrounding spaces"
        for i, value in enumerate(ids[:MAX_IDS])
        if not _printable_id(value)
    )
    webhook_url = body.get("webhook_url")
    endpoint = body.get("endpoint")
    if webhook_url is not None and endpoint is not None:
        problems.append("endpoint: give either webhook_url or endpoint, not both")
    if webhook_url is not None:
        if not isinstance(webhook_url, str):
            problems.append("webhook_url: must be a string")
        else:
            try:
                await ssrf.check_url(webhook_url, ssrf.parse_allow(settings.webhooks.allow_private))
            except ssrf.UnsafeURL as exc:
                problems.append(f"webhook_url: {exc.reason}")
    if endpoint is not None and (
        not isinstance(endpoint, str) or endpoint not in settings.webhooks.endpoints
    ):
        known = sorted(settings.webhooks.endpoints)
        problems.append(f"endpoint: must name a [webhooks.endpoints] entry {known}")
    if webhook_url is None and endpoint is None and settings.webhooks.url is None:
        problems.append("webhook_url: required, as the config sets no [webhooks].url")
    events = body.get("events")
    if events is not None:
        if not isinstance(events, list) or not all(isinstance(e, str) for e in events):
            problems.append("events: must be an array of event names")
        else:
            unknown = sorted(set(events) - status.ALL_EVENTS)
            if unknown:
                known = sorted(e.value for e in status.EventType)
                problems.append(f"events: unknown {unknown}; known {known}")
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            problems.append("metadata: must be a JSON object")
        elif len(json.dumps(metadata, separators=(",", ":")).encode()) > MAX_METADATA_BYTES:
            problems.append(f"metadata: must be at most {MAX_METADATA_BYTES} bytes as JSON")
    if problems:
        return None, problems
    return (
        Registration(
            platform=str(platform),
            ids=[str(i) for i in ids],
            webhook_url=webhook_url,
            endpoint=endpoint,
            events=tuple(map(status.EventType, events)) if events is not None else None,
            metadata=metadata,
        ),
        [],
    )


def task_json(task: TaskRecord, *, with_history: bool = True) -> dict[str, Any]:
    """A task as the API shows it."""
    shown: dict[str, Any] = {
        "platform": task.platform,
        "task_id": task.task_id,
        "status": task.status,
        "upstream_status": task.upstream_status,
        "progress": task.progress,
        "upstream_progress": task.upstream_progress,
        "fail_reason": task.fail_reason,
        "metadata": task.metadata if task.metadata is not None else {},
        "webhook_url": task.webhook_url,
        "endpoint": task.endpoint,
        "events": list(task.events) if task.events is not None else None,
        "result": task.result,
        "created_at": clock.isoformat(task.created_at),
        "updated_at": clock.isoformat(task.updated_at),
        "finished_at": clock.isoformat(task.finished_at),
    }
    if with_history:
        shown["transitions"] = [
            {
                "from": t.from_status,
                "to": t.to_status,
                "upstream_status": t.upstream_status,
                "progress": t.progress,
                "at": clock.isoformat(t.at),
            }
            for t in task.transitions
        ]
    return shown


def delivery_json(delivery: DeliveryRecord) -> dict[str, Any]:
    """A delivery and its attempt log as the API shows it."""
    return {
        "id": delivery.id,
        "webhook_id": delivery.webhook_id,
        "platform": delivery.platform,
        "task_id": delivery.task_id,
        "event_type": delivery.event_type,
        "url": delivery.url,
        "endpoint": delivery.endpoint,
        "state": delivery.state,
        "attempts": delivery.attempts,
        "next_attempt_at": clock.isoformat(delivery.next_attempt_at),
        "created_at": clock.isoformat(delivery.created_at),
        "last_attempt_at": clock.isoformat(delivery.last_attempt_at),
        "last_status_code": delivery.last_status_code,
        "last_error": delivery.last_error,
        "delivered_at": clock.isoformat(delivery.delivered_at),
        "log": [
            {
                "at": clock.isoformat(a.at),
                "url": a.url,
                "status_code": a.status_code,
                "error": a.error,
                "latency_ms": a.latency_ms,
                "response": a.response_excerpt,
            }
            for a in delivery.log
        ],
    }


def _page_args(
    request: Request, allowed: Mapping[str, Sequence[str] | None]
) -> tuple[dict[str, str], int, int | None, list[str]]:
    problems = []
    filters: dict[str, str] = {}
    for name, choices in allowed.items():
        value = request.query_params.get(name)
        if value is None or value == "":
            continue
        if choices is not None and value not in choices:
            problems.append(f"{name}: must be one of {sorted(choices)}")
        filters[name] = value
    limit = DEFAULT_PAGE
    raw_limit = request.query_params.get("limit")
    if raw_limit:
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE:
            problems.append(f"limit: must be an integer from 1 to {MAX_PAGE}")
        else:
            limit = int(raw_limit)
    cursor = None
    raw_cursor = request.query_params.get("cursor")
    if raw_cursor:
        if not raw_cursor.isdigit():
            problems.append("cursor: must be a next_cursor value from an earlier page")
        else:
            cursor = int(raw_cursor)
    return filters, limit, cursor, problems


def _parse_time(value: object, name: str, problems: list[str]) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is not None:
                return parsed
    problems.append(f"{name}: must be an ISO 8601 time with a zone, e.g. 2026-11-25T10:00:00Z")
    return None


def build(  # noqa: PLR0915 - the routes read best in one place
    *, store: SqlStore, platforms: Sequence[str], state: ApiState, clock: Clock
) -> FastAPI:
    """The FastAPI application over ``store``."""
    app = FastAPI(title="tracker", docs_url=None, redoc_url=None, openapi_url=None)
    platform_names = list(platforms)

    def authorized(request: Request) -> bool:
        tokens = state.settings.server.api_tokens
        if not tokens:
            return True  # only possible on a loopback host (config refuses otherwise)
        header = request.headers.get("authorization", "")
        scheme, _, presented = header.partition(" ")
        if scheme.lower() != "bearer" or not presented:
            return False
        # Compare against every token so timing says nothing about which one nearly matched.
        matches = [hmac.compare_digest(presented, t.get_secret_value()) for t in tokens]
        return any(matches)

    @app.middleware("http")
    async def _auth(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        path = request.url.path
        protected = path.startswith("/v1/") or (
            path in ("/metrics", "/readyz") and state.settings.server.metrics_require_auth
        )
        if protected and not authorized(request):
            return JSONResponse(
                {"error": "missing or invalid bearer token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        reasons = [r for r in await asyncio.gather(*(c() for c in state.readiness)) if r]
        if reasons:
            return JSONResponse({"status": "unavailable", "reasons": reasons}, status_code=503)
        return JSONResponse({"status": "ready"})

    @app.get("/metrics")
    async def metrics() -> Response:
        if state.metrics is None:
            return _error(404, "metrics are not enabled")
        body = await run_in_threadpool(state.metrics)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/tasks")
    async def register(request: Request) -> JSONResponse:
        if not state.accepting:
            return JSONResponse(
                {"error": "shutting down; not taking registrations"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error(422, "invalid registration", problems=["body: not valid JSON"])
        registration, problems = await validate_registration(body, platform_names, state.settings)
        if registration is None:
            return _error(422, "invalid registration", problems=problems)
        new, existing = await run_in_threadpool(store.register, registration, clock.now())
        return JSONResponse(
            {"registered": new, "existing": existing}, status_code=201 if new else 200
        )

    @app.get("/v1/tasks")
    async def list_tasks(request: Request) -> JSONResponse:
        filters, limit, cursor, problems = _page_args(
            request, {"status": [s.value for s in status.TaskStatus], "platform": None}
        )
        if problems:
            return _error(422, "invalid query", problems=problems)
        rows, next_cursor = await run_in_threadpool(
            lambda: store.list_tasks(limit=limit, before=cursor, **filters)
        )
        return JSONResponse(
            {
                "tasks": [task_json(t, with_history=False) for t in rows],
                "next_cursor": str(next_cursor) if next_cursor is not None else None,
            }
        )

    @app.get("/v1/tasks/{platform}/{task_id:path}/deliveries")
    async def task_deliveries(platform: str, task_id: str) -> JSONResponse:
        task = await run_in_threadpool(store.get, platform, task_id)
        if task is None:
            return _error(404, f"no task {task_id!r} on platform {platform!r}")
        rows, _ = await run_in_threadpool(
            lambda: store.list_deliveries(platform=platform, task_id=task_id, limit=MAX_PAGE)
        )
        return JSONResponse({"deliveries": [delivery_json(d) for d in reversed(rows)]})

    @app.get("/v1/tasks/{platform}/{task_id:path}")
    async def get_task(platform: str, task_id: str) -> JSONResponse:
        task = await run_in_threadpool(store.get, platform, task_id)
        if task is None:
            return _error(404, f"no task {task_id!r} on platform {platform!r}")
        return JSONResponse(task_json(task))

    @app.delete("/v1/tasks/{platform}/{task_id:path}")
    async def remove_task(platform: str, task_id: str) -> Response:
        removed = await run_in_threadpool(store.remove, platform, task_id)
        if not removed:
            return _error(404, f"no task {task_id!r} on platform {platform!r}")
        return Response(status_code=204)

    @app.get("/v1/deliveries")
    async def list_deliveries(request: Request) -> JSONResponse:
        filters, limit, cursor, problems = _page_args(
            request, {"state": [s.value for s in DeliveryState]}
        )
        if problems:
            return _error(422, "invalid query", problems=problems)
        state = DeliveryState(filters["state"]) if "state" in filters else None
        rows, next_cursor = await run_in_threadpool(
            lambda: store.list_deliveries(state=state, limit=limit, before=cursor)
        )
        return JSONResponse(
            {
                "deliveries": [delivery_json(d) for d in rows],
                "next_cursor": str(next_cursor) if next_cursor is not None else None,
            }
        )

    @app.post("/v1/deliveries/recover")
    async def recover(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        problems: list[str] = []
        if not isinstance(body, dict):
            return _error(422, "invalid recover request", problems=["body: must be an object"])
        problems += [f"{k}: unknown field" for k in sorted(set(body) - {"since", "until"})]
        if "since" not in body:
            problems.append("since: required")
        since = _parse_time(body.get("since"), "since", problems)
        until = _parse_time(body.get("until"), "until", problems)
        if problems:
            return _error(422, "invalid recover request", problems=problems)
        ids = await run_in_threadpool(lambda: store.requeue(clock.now(), since=since, until=until))
        return JSONResponse({"requeued": ids})

    @app.post("/v1/deliveries/{delivery_id}/redeliver")
    async def redeliver(delivery_id: str) -> JSONResponse:
        if not delivery_id.isdigit():
            return _error(404, f"no delivery {delivery_id!r}")
        ids = await run_in_threadpool(lambda: store.requeue(clock.now(), pk=int(delivery_id)))
        if not ids:
            return _error(404, f"no delivery {delivery_id!r}")
        return JSONResponse({"requeued": ids}, status_code=202)

    return app
