"""Deleting what the retention policy no longer keeps, a small batch per short transaction.

Three kinds of rows go: delivered deliveries (with their attempt logs), dead ones nobody
replayed, and final tasks (with their history and deliveries) once each of their deliveries
is due to go as well, so a task never takes a pending or still-kept delivery with it. Every
batch locks exactly the rows it deletes (SKIP LOCKED on PostgreSQL, so a second daemon
pruning at the same time takes other rows; SQLite's write transaction excludes other
writers), re-checks them under that lock, and commits before the next batch starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.store.base import (
    FINAL_VALUES,
    attempts,
    chunks,
    deliveries,
    one_of,
    polls,
    tasks,
    transitions,
)


class Kind(enum.StrEnum):
    """What one batch deletes."""

    DELIVERED = "delivered"
    DEAD = "dead"
    TASKS = "tasks"


@dataclasses.dataclass(frozen=True, slots=True)
class Cutoffs:
    """Rows older than these moments may go; None keeps that kind forever."""

    delivered: datetime | None  #: delivered deliveries, by delivered_at
    dead: datetime | None  #: dead deliveries, by their last attempt
    tasks: datetime | None  #: final tasks, by finished_at


@dataclasses.dataclass(frozen=True, slots=True)
class Pruned:
    """Rows deleted (or, for a dry run, that would be)."""

    deliveries: int = 0
    attempts: int = 0
    tasks: int = 0
    transitions: int = 0

    def __add__(self, other: Pruned) -> Pruned:
        """Both counts together."""
        return Pruned(
            deliveries=self.deliveries + other.deliveries,
            attempts=self.attempts + other.attempts,
            tasks=self.tasks + other.tasks,
            transitions=self.transitions + other.transitions,
        )

    @property
    def rows(self) -> int:
        """Every row counted."""
        return self.deliveries + self.attempts + self.tasks + self.transitions


def batch(engine: sa.Engine, kind: Kind, cutoffs: Cutoffs, size: int) -> tuple[Pruned, bool]:
    """Delete up to ``size`` rows of ``kind`` in one transaction; the bool says whether more
    of that kind may remain (a full batch was taken).
    """
    with _write(engine) as conn:
        if kind is Kind.TASKS:
            pks = _pick(conn, tasks, _task_due(cutoffs), tasks.c.finished_at, size)
            pks = _tasks_still_due(conn, pks, cutoffs)
            return _delete_tasks(conn, pks), len(pks) == size
        due = _delivered_due(cutoffs) if kind is Kind.DELIVERED else _dead_due(cutoffs)
        if due is None:
            return Pruned(), False
        order = deliveries.c.delivered_at if kind is Kind.DELIVERED else deliveries.c.id
        pks = _pick(conn, deliveries, due, order, size)
        return _delete_deliveries(conn, pks), len(pks) == size


def preview(engine: sa.Engine, cutoffs: Cutoffs) -> Pruned:
    """What a full run would delete now, deleting nothing (``tracker db prune --dry-run``)."""
    task_due = _task_due(cutoffs)
    going_tasks = sa.select(tasks.c.id).where(task_due) if task_due is not None else None
    delivery_due = [
        clause for clause in (_delivered_due(cutoffs), _dead_due(cutoffs)) if clause is not None
    ]
    going: list[Any] = list(delivery_due)
    if going_tasks is not None:
        going.append(deliveries.c.task_pk.in_(going_tasks))
    with engine.connect() as conn, conn.begin():
        gone_deliveries = sa.select(deliveries.c.id).where(sa.or_(sa.false(), *going))
        return Pruned(
            deliveries=_count(conn, deliveries, deliveries.c.id.in_(gone_deliveries)),
            attempts=_count(conn, attempts, attempts.c.delivery_pk.in_(gone_deliveries)),
            tasks=0 if going_tasks is None else _count(conn, tasks, tasks.c.id.in_(going_tasks)),
            transitions=0
            if going_tasks is None
            else _count(conn, transitions, transitions.c.task_pk.in_(going_tasks)),
        )


# -- which rows are due ------------------------------------------------------------------------


def _delivered_due(cutoffs: Cutoffs) -> Any:
    if cutoffs.delivered is None:
        return None
    return sa.and_(
        deliveries.c.state == DeliveryState.DELIVERED,
        # Never NULL for a delivered row; said anyway so NOT(...) below stays two-valued.
        deliveries.c.delivered_at.is_not(None),
        deliveries.c.delivered_at < cutoffs.delivered,
    )


def _dead_due(cutoffs: Cutoffs) -> Any:
    if cutoffs.dead is None:
        return None
    # A delivery that died without an attempt (its URL was refused up front) ages from its
    # creation.
    died = sa.func.coalesce(deliveries.c.last_attempt_at, deliveries.c.created_at)
    return sa.and_(deliveries.c.state == DeliveryState.DEAD, died < cutoffs.dead)


def _task_due(cutoffs: Cutoffs) -> Any:
    if cutoffs.tasks is None:
        return None
    # A delivery of the task that is not due itself keeps the task.
    due = (_delivered_due(cutoffs), _dead_due(cutoffs))
    kept = [deliveries.c.task_pk == tasks.c.id, *(~d for d in due if d is not None)]
    return sa.and_(
        tasks.c.finished_at < cutoffs.tasks,
        tasks.c.status.in_(FINAL_VALUES),
        ~sa.exists().where(*kept),
    )


# -- deleting -----------------------------------------------------------------------------------


@contextlib.contextmanager
def _write(engine: sa.Engine) -> Iterator[sa.Connection]:
    with engine.connect() as conn:
        conn.execution_options(tracker_write=True)  # BEGIN IMMEDIATE on SQLite
        with conn.begin():
            yield conn


def _pick(conn: sa.Connection, table: sa.Table, due: Any, order: Any, size: int) -> list[int]:
    if due is None:
        return []
    query = sa.select(table.c.id).where(due).order_by(order).limit(size)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return list(conn.execute(query).scalars())


def _tasks_still_due(conn: sa.Connection, pks: list[int], cutoffs: Cutoffs) -> list[int]:
    """Lock the picked tasks' deliveries and keep the tasks whose deliveries are all due.

    Between the pick and this lock another session may have re-queued one (PostgreSQL).
    """
    if not pks or conn.dialect.name != "postgresql":
        return pks
    # In id order, as requeue, finish_attempts, extend_claims and shift_plans lock them: in
    # scan order this deadlocked with them.
    locked = (
        sa.select(deliveries.c.id)
        .where(one_of(conn, deliveries.c.task_pk, pks))
        .order_by(deliveries.c.id)
    )
    conn.execute(locked.with_for_update()).all()
    recheck = sa.select(tasks.c.id).where(one_of(conn, tasks.c.id, pks), _task_due(cutoffs))
    return sorted(conn.execute(recheck).scalars())


def _delete_deliveries(conn: sa.Connection, pks: Sequence[int]) -> Pruned:
    pruned = Pruned()
    for chunk in chunks(pks):
        # Attempts first, explicitly: a database opened without SQLite's foreign_keys pragma
        # would not cascade.
        gone = conn.execute(attempts.delete().where(one_of(conn, attempts.c.delivery_pk, chunk)))
        done = conn.execute(deliveries.delete().where(one_of(conn, deliveries.c.id, chunk)))
        pruned += Pruned(deliveries=done.rowcount, attempts=gone.rowcount)
    return pruned


def _delete_tasks(conn: sa.Connection, pks: Sequence[int]) -> Pruned:
    pruned = Pruned()
    for chunk in chunks(pks):
        owned = sa.select(deliveries.c.id).where(one_of(conn, deliveries.c.task_pk, chunk))
        pruned += _delete_deliveries(conn, list(conn.execute(owned).scalars()))
        history = conn.execute(
            transitions.delete().where(one_of(conn, transitions.c.task_pk, chunk))
        )
        # A final task has no polls row; deleted all the same, as SQLite cascades only with
        # its foreign_keys pragma on.
        conn.execute(polls.delete().where(one_of(conn, polls.c.task_pk, chunk)))
        done = conn.execute(tasks.delete().where(one_of(conn, tasks.c.id, chunk)))
        pruned += Pruned(tasks=done.rowcount, transitions=history.rowcount)
    return pruned


def _count(conn: sa.Connection, table: sa.Table, where: Any) -> int:
    query = sa.select(sa.func.count()).select_from(table).where(where)
    return int(conn.execute(query).scalar_one())
