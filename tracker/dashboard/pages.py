"""The dashboard's reading pages: overview, tasks, one task, deliveries."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from tracker.activity import Series
from tracker.api.limits import row_id
from tracker.dashboard import chart, figures
from tracker.dashboard.sessions import Session
from tracker.dashboard.web import RENDER, SessionDep, dashboard_of
from tracker.retry import DeliveryState
from tracker.status import FINAL, TaskStatus

PAGE_SIZE = 50
#: longest search text accepted (ids are at most 200 characters)
MAX_SEARCH = 200

router = APIRouter()


def _bad_request(request: Request, session: Session, problems: list[str]) -> HTMLResponse:
    return RENDER.page(
        request, "error.html", session=session, status_code=400, title="Bad request",
        problems=problems,
    )  # fmt: skip


def _cursor(raw: str | None, problems: list[str]) -> int | None:
    if not raw:
        return None
    cursor = row_id(raw)
    if cursor is None:
        problems.append("before: must be a page link's value")
    return cursor


@router.get("/")
async def overview(request: Request, session: SessionDep) -> HTMLResponse:
    """Tasks by platform and status, the outbox, activity over the last hour, relay errors."""
    dash = dashboard_of(request)
    stats, counted_at = await dash.counts.get()
    dead, _ = await run_in_threadpool(
        lambda: dash.store.list_deliveries(state=DeliveryState.DEAD, limit=5)
    )
    by_platform: dict[str, dict[str, int]] = defaultdict(dict)
    for (platform, task_status), count in sorted(stats.tasks.items()):
        by_platform[platform][task_status] = count
    totals = {s: sum(row.get(s, 0) for row in by_platform.values()) for s in TaskStatus}
    # The figure may come from the database: off the event loop.
    lag = await run_in_threadpool(dash.poll_lag) if dash.poll_lag is not None else None
    activity = dash.activity
    charts = []
    if activity is not None:
        charts = [
            chart.per_minute("Task polls per minute", activity.per_minute(Series.POLLS)),
            chart.per_minute("Webhook attempts per minute", activity.per_minute(Series.WEBHOOKS)),
        ]
    return RENDER.page(
        request,
        "overview.html",
        session=session,
        statuses=list(TaskStatus),
        final=FINAL,
        by_platform=dict(by_platform),
        totals=totals,
        deliveries={s: stats.deliveries.get(s, 0) for s in DeliveryState},
        oldest_pending=stats.oldest_pending_delivery,
        counted_at=counted_at,
        counts_max_age=figures.MAX_AGE,
        poll_lag=lag,
        charts=charts,
        relay_errors=activity.recent_errors()[:10] if activity is not None else [],
        recent_dead=dead,
    )


@router.get("/tasks")
async def tasks(request: Request, session: SessionDep) -> HTMLResponse:
    """Tasks newest first, filtered by platform, status and text in the id or the metadata."""
    dash = dashboard_of(request)
    params = request.query_params
    problems: list[str] = []
    platform = params.get("platform") or None
    status = params.get("status") or None
    text = (params.get("q") or "").strip() or None
    if platform is not None and platform not in dash.platforms:
        problems.append(f"platform: must be one of {', '.join(sorted(dash.platforms))}")
    if status is not None and status not in TaskStatus.__members__.values():
        problems.append(f"status: must be one of {', '.join(TaskStatus)}")
    if text is not None and len(text) > MAX_SEARCH:
        problems.append(f"q: at most {MAX_SEARCH} characters")
    if text is not None and "\x00" in text:
        # Nothing stored holds one (JSON escapes it), and PostgreSQL refuses it in a query.
        problems.append("q: must not contain a NUL character")
    before = _cursor(params.get("before"), problems)
    if problems:
        return _bad_request(request, session, problems)
    page = await run_in_threadpool(
        lambda: dash.queries.tasks_page(
            platform=platform,
            status=status,
            text=text,
            before=before,
            limit=PAGE_SIZE,
            platforms=dash.platforms,
        )
    )
    return RENDER.page(
        request,
        "tasks.html",
        session=session,
        page=page,
        platforms=sorted(dash.platforms),
        statuses=list(TaskStatus),
        filters={"platform": platform or "", "status": status or "", "q": text or ""},
        first_page=before is None,
    )


@router.get("/tasks/{platform}/{task_id:path}")
async def task(request: Request, session: SessionDep, platform: str, task_id: str) -> HTMLResponse:
    """One task: its fields, its transition timeline, its result and every delivery."""
    dash = dashboard_of(request)
    record = None
    if dash.could_hold(platform, task_id):
        record = await run_in_threadpool(dash.store.get, platform, task_id)
    if record is None:
        return RENDER.page(
            request, "error.html", session=session, status_code=404, title="No such task",
            problems=[f"no task {task_id!r} on platform {platform!r}"],
        )  # fmt: skip
    deliveries = await run_in_threadpool(dash.queries.task_deliveries, platform, task_id)
    return RENDER.page(request, "task.html", session=session, task=record, deliveries=deliveries)


@router.get("/deliveries")
async def deliveries(request: Request, session: SessionDep) -> HTMLResponse:
    """Webhook deliveries newest first, by state, with their attempts."""
    dash = dashboard_of(request)
    params = request.query_params
    problems: list[str] = []
    raw_state = params.get("state") or None
    state = None
    if raw_state is not None:
        try:
            state = DeliveryState(raw_state)
        except ValueError:
            problems.append(f"state: must be one of {', '.join(DeliveryState)}")
    before = _cursor(params.get("before"), problems)
    if problems:
        return _bad_request(request, session, problems)
    rows, next_before = await run_in_threadpool(
        lambda: dash.queries.deliveries_page(state=state, limit=PAGE_SIZE, before=before)
    )
    return RENDER.page(
        request,
        "deliveries.html",
        session=session,
        deliveries=rows,
        next_before=next_before,
        states=list(DeliveryState),
        state=state or "",
    )
