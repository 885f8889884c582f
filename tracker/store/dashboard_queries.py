"""The reads the operator's dashboard needs beyond the store's own, each bounded for big tables.

Every query here is answered from an index or over a bounded range of ids, so a page stays
fast with millions of tasks stored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from tracker.store import records
from tracker.store.sql import SqlStore, _delivery_record, _task_record, attempts, deliveries, tasks

#: ids of tasks a text search reads per page: a search for a rare word stays bounded, and
#: the page offers to go on into older tasks
SEARCH_WINDOW = 100_000


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task listing, newest first."""

    tasks: list[records.TaskRecord]
    #: the ``before`` of the next (older) page, None when this is the last
    next_before: int | None
    #: for a text search: the lowest id this page searched down to
    searched_from: int | None = None
    #: tasks whose id is exactly the search text, on any platform
    exact: list[records.TaskRecord] = dataclasses.field(default_factory=list)


def _contains(column: Any, text: str) -> Any:
    # Case-insensitive on both dialects; % and _ in the text match themselves.
    return sa.func.lower(column).contains(text.lower(), autoescape=True)


class DashboardQueries:
    """Read-only queries over a store's database, for the dashboard."""

    def __init__(self, store: SqlStore) -> None:
        self.store = store
        self.engine = store.engine

    def tasks_page(
        self,
        *,
        platform: str | None = None,
        status: str | None = None,
        text: str | None = None,
        before: int | None = None,
        limit: int = 50,
        platforms: Sequence[str] = (),
    ) -> TaskPage:
        """Tasks newest first, filtered; ``text`` matches the id or the metadata, any case.

        A text search reads at most SEARCH_WINDOW ids below ``before`` per page.
        """
        query = sa.select(tasks).order_by(tasks.c.id.desc()).limit(limit + 1)
        if platform:
            query = query.where(tasks.c.platform == platform)
        if status:
            query = query.where(tasks.c.status == status)
        if before is not None:
            query = query.where(tasks.c.id < before)
        floor = None
        with self.engine.connect() as conn, conn.begin():
            if text:
                top = before
                if top is None:
                    top = (conn.execute(sa.select(sa.func.max(tasks.c.id))).scalar() or 0) + 1
                floor = max(top - SEARCH_WINDOW, 0)
                metadata_text = sa.cast(tasks.c.metadata, sa.Text)
                query = query.where(
                    tasks.c.id >= floor,
                    sa.or_(_contains(tasks.c.task_id, text), _contains(metadata_text, text)),
                )
            rows = conn.execute(query).all()
            exact: Sequence[Any] = []
            if text and before is None and platforms:
                # The unique (platform, task_id) index answers this at once.
                exact = conn.execute(
                    sa.select(tasks)
                    .where(tasks.c.platform.in_(list(platforms)), tasks.c.task_id == text)
                    .order_by(tasks.c.id.desc())
                ).all()
        if len(rows) > limit:
            rows, next_before = rows[:limit], rows[limit - 1].id
        elif floor is not None and floor > 0:
            next_before = floor
        else:
            next_before = None
        return TaskPage(
            tasks=[_task_record(r) for r in rows],
            next_before=next_before,
            searched_from=floor,
            exact=[_task_record(r) for r in exact],
        )

    def task_deliveries(self, platform: str, task_id: str) -> list[records.DeliveryRecord]:
        """Every delivery of one task with every attempt, oldest first (by the task's index)."""
        task_pk = (
            sa.select(tasks.c.id)
            .where(tasks.c.platform == platform, tasks.c.task_id == task_id)
            .scalar_subquery()
        )
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(
                sa.select(deliveries)
                .where(deliveries.c.task_pk == task_pk)
                .order_by(deliveries.c.id)
            ).all()
            logs: dict[int, list[Any]] = {r.id: [] for r in rows}
            if rows:
                for a in conn.execute(
                    sa.select(attempts)
                    .where(attempts.c.delivery_pk.in_(list(logs)))
                    .order_by(attempts.c.id)
                ):
                    logs[a.delivery_pk].append(a)
        return [_delivery_record(r, logs[r.id]) for r in rows]

    def dead_in_window(self, since: datetime | None, until: datetime | None) -> int:
        """How many dead deliveries were created in [since, until) (what a recover would take)."""
        query = (
            sa.select(sa.func.count()).select_from(deliveries).where(deliveries.c.state == "dead")
        )
        if since is not None:
            query = query.where(deliveries.c.created_at >= since)
        if until is not None:
            query = query.where(deliveries.c.created_at < until)
        with self.engine.connect() as conn, conn.begin():
            return int(conn.execute(query).scalar() or 0)
