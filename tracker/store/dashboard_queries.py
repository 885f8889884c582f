"""The reads the operator's dashboard needs beyond the store's own, each bounded for big tables.

Every query here is answered from an index or over a bounded range of ids, so a page stays
fast with millions of tasks stored.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.store import records
from tracker.store.base import deliveries, tasks
from tracker.store.rows import _task_record, _with_logs
from tracker.store.sql import SqlStore

#: ids of tasks a text search reads per query
SEARCH_CHUNK = 10_000
#: seconds a text search keeps reading chunks for one page: a search for a rare word stays
#: bounded, and the page offers to go on into older tasks
SEARCH_BUDGET = 0.02
#: deliveries in one state few enough to read from the state index and sort
FEW_IN_STATE = 20_000


@dataclasses.dataclass(frozen=True, slots=True)
class TaskPage:
    """One page of a task listing, newest first."""

    tasks: list[records.TaskRecord]
    #: the ``before`` of the next (older) page, None when this is the last
    next_before: int | None
    #: for a text search: the id this page searched down to (None: to the oldest task)
    searched_from: int | None = None
    #: tasks whose id is exactly the search text, on any platform
    exact: list[records.TaskRecord] = dataclasses.field(default_factory=list)


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
        budget: float = SEARCH_BUDGET,
    ) -> TaskPage:
        """Tasks newest first, filtered; ``text`` matches the id or the metadata, any case.

        A text search reads SEARCH_CHUNK ids at a time below ``before``, and stops after
        ``budget`` seconds; the page's ``next_before`` goes on where it stopped.
        """
        query = sa.select(tasks).order_by(tasks.c.id.desc())
        if platform:
            query = query.where(tasks.c.platform == platform)
        if status:
            query = query.where(tasks.c.status == status)
        floor = None
        exact: Sequence[Any] = []
        with self.engine.connect() as conn, conn.begin():
            if text:
                rows, floor = self._search(
                    conn, query=query, text=text, before=before, limit=limit, budget=budget
                )
                if before is None and platforms:
                    # The unique (platform, task_id) index answers this at once.
                    exact = conn.execute(
                        sa.select(tasks)
                        .where(tasks.c.platform.in_(list(platforms)), tasks.c.task_id == text)
                        .order_by(tasks.c.id.desc())
                    ).all()
            else:
                if before is not None:
                    query = query.where(tasks.c.id < before)
                rows = list(conn.execute(query.limit(limit + 1)).all())
        if len(rows) > limit:
            rows, next_before = rows[:limit], rows[limit - 1].id
        else:
            next_before = floor
        return TaskPage(
            tasks=[_task_record(r) for r in rows],
            next_before=next_before,
            searched_from=floor,
            exact=[_task_record(r) for r in exact],
        )

    def _search(
        self,
        conn: sa.Connection,
        *,
        query: sa.Select[Any],
        text: str,
        before: int | None,
        limit: int,
        budget: float,
    ) -> tuple[list[Any], int | None]:
        """Matches below ``before``, newest first, and the id the search stopped at (None at
        the oldest task): chunks of ids are read until the page fills or the budget runs out.
        """
        lowest = conn.execute(sa.select(sa.func.min(tasks.c.id))).scalar()
        if lowest is None:
            return [], None
        top = before
        if top is None:
            top = int(conn.execute(sa.select(sa.func.max(tasks.c.id))).scalar() or 0) + 1
        matches = sa.or_(
            self._contains(tasks.c.task_id, text),
            self._in_metadata(sa.cast(tasks.c.metadata, sa.Text), text),
        )
        found: list[Any] = []
        floor = top
        # Wall time on purpose: this bounds how long a page takes, whatever the machine does.
        deadline = time.monotonic() + budget
        while floor > lowest and len(found) <= limit:
            bottom = max(floor - SEARCH_CHUNK, lowest)
            chunk = query.where(tasks.c.id < floor, tasks.c.id >= bottom, matches)
            found += conn.execute(chunk.limit(limit + 1 - len(found))).all()
            floor = bottom
            if time.monotonic() >= deadline:
                break
        return found, (floor if floor > lowest else None)

    def _contains(self, column: Any, text: str) -> Any:
        # % and _ in the text match themselves. SQLite's LIKE already ignores ASCII case
        # (lower() on every row would double the cost); PostgreSQL needs ILIKE.
        if self.store.dialect == "postgresql":
            return column.icontains(text, autoescape=True)
        return column.contains(text, autoescape=True)

    def _in_metadata(self, stored: Any, text: str) -> Any:
        """Whether the metadata's stored JSON text holds ``text`` as the user typed it.

        sa.JSON stores what json.dumps writes: a value's non-ASCII characters as \\uXXXX,
        its quotes and backslashes escaped. So the text is matched as typed (a key, or JSON
        syntax) or, whole, in that escaped form (a value holding "日本語" or a quote); the
        stored text stays as it is, and the query reads each row once as before. ASCII
        letters match in any case, on both databases; a non-ASCII letter of a value only as
        typed (stored as its escape, its other case is another escape).
        """
        escaped = _json_escaped(text)
        if escaped == text:
            return self._contains(stored, text)
        return sa.or_(self._contains(stored, text), self._contains(stored, escaped))

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
            return _with_logs(conn, rows)

    def deliveries_page(
        self, *, state: DeliveryState | None = None, before: int | None = None, limit: int = 50
    ) -> tuple[list[records.DeliveryRecord], int | None]:
        """Deliveries newest first, each with its attempts; the second value is the next
        page's ``before``.

        Walking the table newest first finds a common state at once but reads nearly every
        row to find a rare one (the few dead among a million delivered): up to
        FEW_IN_STATE rows of a state are read from the state index and sorted instead.
        """
        if state is None or self._in_state_above(state, FEW_IN_STATE):
            return self.store.list_deliveries(state=state, limit=limit, before=before)
        newest = sa.select(deliveries.c.id).where(deliveries.c.state == state)
        if before is not None:
            newest = newest.where(deliveries.c.id < before)
        # Ids only, from the covering state index ("+ 0" keeps SQLite from walking the table
        # in id order to skip the sort); then the page's rows by primary key.
        newest = newest.order_by((deliveries.c.id + 0).desc()).limit(limit + 1)
        query = (
            sa.select(deliveries)
            .where(deliveries.c.id.in_(newest.scalar_subquery()))
            .order_by(deliveries.c.id.desc())
        )
        with self.engine.connect() as conn, conn.begin():
            rows = conn.execute(query).all()
            next_before = rows[limit - 1].id if len(rows) > limit else None
            return _with_logs(conn, rows[:limit]), next_before

    def _in_state_above(self, state: DeliveryState, bound: int) -> bool:
        few = (
            sa.select(deliveries.c.id)
            .where(deliveries.c.state == state)
            .limit(bound + 1)
            .subquery()
        )
        with self.engine.connect() as conn, conn.begin():
            return (
                int(conn.execute(sa.select(sa.func.count()).select_from(few)).scalar() or 0) > bound
            )

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


def _json_escaped(text: str) -> str:
    """``text`` as json.dumps writes it in a JSON string (what sa.JSON stores), unquoted."""
    return json.dumps(text)[1:-1]
