"""Row mappers: stored rows to the records of tracker.store.records, and paging."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.status import EventType
from tracker.store import records
from tracker.store.base import _from_epoch


def _page(table: sa.Table, limit: int, before: int | None, **equal: str | None) -> Any:
    """Newest first, one row more than a page (to know whether another follows)."""
    query = sa.select(table).order_by(table.c.id.desc()).limit(limit + 1)
    for column, value in equal.items():
        if value is not None:
            query = query.where(table.c[column] == value)
    if before is not None:
        query = query.where(table.c.id < before)
    return query


def _cut(rows: Sequence[Any], limit: int) -> tuple[Sequence[Any], int | None]:
    """The page and the cursor of the next one (None on the last page)."""
    return rows[:limit], (rows[limit - 1].id if len(rows) > limit else None)


def _event_types(names: Sequence[str] | None) -> tuple[EventType, ...] | None:
    return None if names is None else tuple(EventType(name) for name in names)


def _transition(row: Any) -> records.Transition:
    return records.Transition(
        from_status=row.from_status,
        to_status=row.to_status,
        upstream_status=row.upstream_status,
        progress=row.progress,
        at=row.at,
    )


def _task_record(row: Any, history: tuple[records.Transition, ...] = ()) -> records.TaskRecord:
    return records.TaskRecord(
        platform=row.platform,
        task_id=row.task_id,
        status=row.status,
        upstream_status=row.upstream_status,
        progress=row.progress,
        upstream_progress=row.upstream_progress,
        fail_reason=row.fail_reason,
        metadata=row.metadata,
        webhook_url=row.webhook_url,
        endpoint=row.endpoint,
        events=_event_types(row.events),
        result=row.result,
        created_at=row.created_at,
        updated_at=row.updated_at,
        finished_at=row.finished_at,
        transitions=history,
    )


def _delivery_record(row: Any, log: Sequence[Any]) -> records.DeliveryRecord:
    return records.DeliveryRecord(
        id=row.id,
        webhook_id=row.webhook_id,
        platform=row.platform,
        task_id=row.task_id,
        event_type=EventType(row.event_type),
        url=row.url,
        endpoint=row.endpoint,
        state=DeliveryState(row.state),
        attempts=row.attempts,
        next_attempt_at=_from_epoch(row.next_attempt_at)
        if row.state == DeliveryState.PENDING
        else None,
        created_at=row.created_at,
        last_attempt_at=row.last_attempt_at,
        last_status_code=row.last_status_code,
        last_error=row.last_error,
        delivered_at=row.delivered_at,
        log=tuple(
            records.Attempt(
                at=a.at,
                url=a.url,
                status_code=a.status_code,
                error=a.error,
                latency_ms=a.latency_ms,
                response_excerpt=a.response_excerpt,
            )
            for a in log
        ),
    )
