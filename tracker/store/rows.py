"""Row mappers: stored rows to the records of tracker.store.records (a claim's due tasks
included), and paging."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.status import EventType, Snapshot, TaskStatus
from tracker.store import records
from tracker.store.base import _from_epoch, attempts, chunks, one_of, polls, tasks


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


def _with_logs(conn: sa.Connection, rows: Sequence[Any]) -> list[records.DeliveryRecord]:
    """Delivery rows as records, each with its attempt log (one query per IN_CHUNK rows)."""
    logs: dict[int, list[Any]] = {r.id: [] for r in rows}
    pks = list(logs)
    for chunk in chunks(pks):
        for a in conn.execute(
            sa.select(attempts)
            .where(one_of(conn, attempts.c.delivery_pk, chunk))
            .order_by(attempts.c.id)
        ):
            logs[a.delivery_pk].append(a)
    return [_delivery_record(r, logs[r.id]) for r in rows]


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
        guarded=bool(row.guarded),
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


# The columns a poll needs: not the stored result, which can be large and is never read back.
# The planned time is the polls row's; the claim reads it before moving it to the lease's end.
_DUE_COLUMNS = (
    *(
        tasks.c[name]
        for name in (
            "id", "platform", "task_id", "status", "upstream_status", "progress",
            "upstream_progress", "fail_reason", "created_at", "missing_since", "webhook_url",
            "endpoint", "events", "metadata",
        )
    ),
    polls.c.next_poll_at,
    tasks.c.last_change_at,
)  # fmt: skip

_STATUSES = {s.value: s for s in TaskStatus}


def _due_tasks(rows: Sequence[Any], claim: records.Claim) -> list[records.DueTask]:
    """A claim's rows (in _DUE_COLUMNS order) as DueTasks.

    SQLite's claim reads the time and JSON columns as stored (text): a claim's tasks mostly
    share these values (one bulk registration), so each distinct text is decoded once per
    claim, and each distinct state is one Snapshot. Positional and in one loop: a claim
    builds thousands of these per second, and keyword arguments and a method call per value
    cost as much as the rest.
    """
    times: dict[Any, datetime] = {}
    documents: dict[str, Any] = {}
    kinds: dict[str, tuple[EventType, ...] | None] = {}
    snapshots: dict[tuple[Any, ...], Snapshot] = {}
    statuses = _STATUSES
    due = []
    for (pk, platform, task_id, status, upstream_status, progress, upstream_progress,
         fail_reason, created_at, missing_since, webhook_url, endpoint, events, metadata,
         planned, last_change_at) in rows:  # fmt: skip
        created = times.get(created_at)
        if created is None:
            created = times[created_at] = _time(created_at)
        document = metadata
        if isinstance(metadata, str):
            if metadata not in documents:
                documents[metadata] = json.loads(metadata)  # "null" too: no metadata
            document = documents[metadata]
        if isinstance(events, str):
            if events not in kinds:
                kinds[events] = _event_types(json.loads(events))
            wanted = kinds[events]
        else:
            wanted = _event_types(events)  # None, or a list (PostgreSQL)
        # Immutable, and shared by most tasks of a claim: one per distinct state.
        state = (status, upstream_status, progress, upstream_progress, fail_reason)
        snapshot = snapshots.get(state)
        if snapshot is None:
            snapshot = snapshots[state] = Snapshot(
                statuses[status], upstream_status, progress, upstream_progress, fail_reason
            )
        task = records.DueTask(
            pk, platform, task_id, snapshot, created, missing_since, webhook_url, endpoint,
            wanted, document, planned, last_change_at, claim,
        )  # fmt: skip
        due.append(task)
    return due


def _time(value: Any) -> datetime:
    if not isinstance(value, str):
        return value  # type: ignore[no-any-return]  # already a datetime (PostgreSQL)
    # SQLite keeps UTC without a zone (UTCDateTime), in an ISO format.
    return datetime.fromisoformat(value).replace(tzinfo=UTC)
