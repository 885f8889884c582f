"""The registration side of the store: tracking ids, reading tasks, removing them."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa

from tracker.status import TaskStatus
from tracker.store import records
from tracker.store.base import (
    SqlBase,
    _epoch,
    attempts,
    chunks,
    deliveries,
    one_of,
    polls,
    tasks,
    transitions,
)
from tracker.store.rows import _cut, _page, _task_record, _transition

# How often register() starts over after losing a race for the same ids.
REGISTER_TRIES = 3

# The API's GET of one task, built once: building the statements anew for every request cost
# SQLAlchemy more than running them.
_TASK = sa.select(tasks).where(
    tasks.c.platform == sa.bindparam("platform"), tasks.c.task_id == sa.bindparam("task_id")
)
_HISTORY = (
    sa.select(transitions)
    .where(transitions.c.task_pk == sa.bindparam("task_pk"))
    .order_by(transitions.c.id)
)


class Registry(SqlBase):
    """Registration and the reads of tasks (the API's and the CLI's side)."""

    # -- registration and reads -----------------------------------------------------------

    def register(
        self, registration: records.Registration, now: datetime
    ) -> tuple[list[str], list[str]]:
        """Track new ids; returns (registered, existing). Known ids are left untouched."""
        tries_left = REGISTER_TRIES
        while True:
            try:
                return self._register_once(registration, now)
            except sa.exc.IntegrityError:
                # A concurrent request inserted some of these ids between our SELECT and our
                # INSERT (PostgreSQL; SQLite's writers are serialised). It has committed by
                # now, so the next try sees those ids as existing.
                tries_left -= 1
                if not tries_left:
                    raise

    def _register_once(
        self, registration: records.Registration, now: datetime
    ) -> tuple[list[str], list[str]]:
        ids = list(dict.fromkeys(registration.ids))
        epoch = _epoch(now)
        metadata = dict(registration.metadata) if registration.metadata is not None else None
        events = list(registration.events) if registration.events is not None else None
        existing: set[str] = set()
        # Acknowledged (201) once committed: synced to disk even on SQLite.
        with self._write(durable=True) as conn:
            for chunk in chunks(ids):
                existing.update(
                    conn.execute(
                        sa.select(tasks.c.task_id).where(
                            tasks.c.platform == registration.platform,
                            one_of(conn, tasks.c.task_id, chunk),
                        )
                    ).scalars()
                )
            new = [i for i in ids if i not in existing]
            if new:
                # In one global order (sorted ids): two requests registering the same ids in
                # different orders would otherwise each wait for the other's unique-key entry
                # (a PostgreSQL deadlock); this way the later one waits, then retries.
                conn.execute(
                    tasks.insert(),
                    [
                        {
                            "platform": registration.platform,
                            "task_id": task_id,
                            "status": TaskStatus.PENDING.value,
                            "fail_reason": "",
                            "metadata": metadata,
                            "webhook_url": registration.webhook_url,
                            "endpoint": registration.endpoint,
                            "events": events,
                            "created_at": now,
                            "updated_at": now,
                            "last_change_at": epoch,
                        }
                        for task_id in sorted(new)
                    ],
                )
                # Each new task is due at once: its polls row, made from the rows just added.
                for chunk in chunks(new):
                    added = sa.select(tasks.c.id, sa.literal(epoch, sa.Float(precision=53))).where(
                        tasks.c.platform == registration.platform,
                        one_of(conn, tasks.c.task_id, chunk),
                    )
                    conn.execute(polls.insert().from_select(["task_pk", "next_poll_at"], added))
        return new, [i for i in ids if i in existing]

    def get(self, platform: str, task_id: str) -> records.TaskRecord | None:
        """One task with its transitions (oldest first), None when unknown."""
        with self._read() as conn:
            row = conn.execute(_TASK, {"platform": platform, "task_id": task_id}).first()
            if row is None:
                return None
            history = conn.execute(_HISTORY, {"task_pk": row.id}).all()
        return _task_record(row, tuple(_transition(t) for t in history))

    def list_tasks(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[records.TaskRecord], int | None]:
        """A page of tasks, newest first; the second value is the cursor of the next page."""
        query = _page(tasks, limit, before, status=status, platform=platform)
        with self._read() as conn:
            rows = conn.execute(query).all()
        rows, cursor = _cut(rows, limit)
        return [_task_record(r) for r in rows], cursor

    def remove(self, platform: str, task_id: str) -> bool:
        """Stop tracking a task; its history and undelivered events go with it."""
        with self._write(durable=True) as conn:
            pk = conn.execute(
                sa.select(tasks.c.id).where(
                    tasks.c.platform == platform, tasks.c.task_id == task_id
                )
            ).scalar()
            # The task's own rows first (its polls row, then its tasks row, as record() and
            # pruning lock them), then what hangs off it: deleting its deliveries first
            # deadlocked with a prune that had locked the task and was locking them.
            if pk is None or pk not in self._claims(conn, {pk}):
                return False  # unknown, or removed or pruned while this waited for it
            if self.dialect == "postgresql":
                # Its deliveries next, in id order, before their attempts: a prune locks
                # deliveries, then deletes their attempts. Deleting the attempts first, this
                # then waited for a delivery a prune held while that prune waited for them.
                owned = sa.select(deliveries.c.id).where(deliveries.c.task_pk == pk)
                conn.execute(owned.order_by(deliveries.c.id).with_for_update()).all()
            # Explicit deletes: SQLite enforces ON DELETE CASCADE only with the pragma on, and
            # a database opened by another tool may not have it.
            delivery_pks = sa.select(deliveries.c.id).where(deliveries.c.task_pk == pk)
            conn.execute(attempts.delete().where(attempts.c.delivery_pk.in_(delivery_pks)))
            conn.execute(deliveries.delete().where(deliveries.c.task_pk == pk))
            conn.execute(transitions.delete().where(transitions.c.task_pk == pk))
            conn.execute(polls.delete().where(polls.c.task_pk == pk))
            conn.execute(tasks.delete().where(tasks.c.id == pk))
        return True
