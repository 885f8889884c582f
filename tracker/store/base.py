"""What every part of the SQL store shares: the tables, transactions, locks, error triage."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from tracker import sanitize
from tracker.status import FINAL
from tracker.store.models import (
    AttemptRow,
    DashboardSessionRow,
    DeliveryRow,
    MetaRow,
    PollRow,
    TaskRow,
    TransitionRow,
)

tasks = TaskRow.__table__  # type: ignore[attr-defined]
polls = PollRow.__table__  # type: ignore[attr-defined]
transitions = TransitionRow.__table__  # type: ignore[attr-defined]
deliveries = DeliveryRow.__table__  # type: ignore[attr-defined]
attempts = AttemptRow.__table__  # type: ignore[attr-defined]
meta = MetaRow.__table__  # type: ignore[attr-defined]
dashboard_sessions = DashboardSessionRow.__table__  # type: ignore[attr-defined]

#: the stored status values of final tasks
FINAL_VALUES = sorted(status.value for status in FINAL)

# Bound parameters per statement: an IN (...) list of this many ids and the few other
# parameters stay under the 999 that SQLite builds before 3.32 allow (Ubuntu 20.04, RHEL 8).
IN_CHUNK = 900

_T = TypeVar("_T")


def chunks(values: Sequence[_T], size: int = IN_CHUNK) -> Iterator[Sequence[_T]]:
    """``values`` in consecutive slices of at most ``size`` (by default IN_CHUNK)."""
    for start in range(0, len(values), size):
        yield values[start : start + size]


def one_of(
    conn: sa.Connection, column: sa.Column[Any], values: Sequence[Any]
) -> sa.ColumnElement[bool]:
    """``column IN (values)``; on PostgreSQL ``column = ANY(array)``, one parameter for all.

    An IN list has a parameter per value: SQLAlchemy renders the statement anew for every
    length and psycopg parses it anew (too long for its cache), which doubled the CPU a
    registration of 300 ids cost the daemon. Callers still cut lists at IN_CHUNK for SQLite.
    """
    if conn.dialect.name == "postgresql":
        array = postgresql.ARRAY(column.type)
        return column == sa.any_(sa.bindparam(None, list(values), type_=array))
    return column.in_(values)


def in_id_order(
    conn: sa.Connection, key: sa.Column[Any], where: sa.ColumnElement[bool]
) -> sa.ColumnElement[bool]:
    """``where`` for an UPDATE of many rows; on PostgreSQL the rows are locked in ``key``
    order first.

    An UPDATE alone locks rows in whatever order its scan meets them, while record(), claims
    and removal lock them in id order: another daemon writing the same rows meanwhile would
    deadlock with it.
    """
    if conn.dialect.name != "postgresql":
        return where
    locked = sa.select(key).where(where).order_by(key).with_for_update()
    return key.in_(locked.scalar_subquery())


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SqlBase:
    """The engine and the plumbing the parts of SqlStore (tracker.store.sql) build on."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @contextlib.contextmanager
    def _write(self, *, durable: bool = False) -> Iterator[sa.Connection]:
        """A write transaction; ``durable``: one whose commit the daemon acknowledges to
        someone (a registration answered 201), synced to disk on SQLite too (see engine.py)."""
        with self.engine.connect() as conn:
            conn.execution_options(tracker_write=True, tracker_durable=durable)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _claims(self, conn: sa.Connection, pks: set[int]) -> dict[int, tuple[str, float | None]]:
        """Status and next poll (the claim's token; None for a final task) of these tasks,
        locked in id order: their polls rows, then their tasks rows. record() and removal lock
        in this order, so two writers of the same tasks wait for each other, not deadlock."""
        found: dict[int, tuple[str, float | None]] = {}
        ordered = sorted(pks)
        for chunk in chunks(ordered):
            query = (
                sa.select(tasks.c.id, tasks.c.status, polls.c.next_poll_at)
                .select_from(tasks.outerjoin(polls, polls.c.task_pk == tasks.c.id))
                .where(one_of(conn, tasks.c.id, chunk))
                .order_by(tasks.c.id)
            )
            if self.dialect == "postgresql":
                # FOR UPDATE cannot reach the nullable side of an outer join: the polls rows
                # are locked first, by a query of their own.
                query = query.with_for_update(of=tasks)
                lock = sa.select(polls.c.task_pk).where(one_of(conn, polls.c.task_pk, chunk))
                conn.execute(lock.order_by(polls.c.task_pk).with_for_update()).all()
            found.update((row[0], (row[1], row[2])) for row in conn.execute(query))
        return found

    def _lock(self, query: sa.Select[Any]) -> sa.Select[Any]:
        # Several daemons on one PostgreSQL database each claim different rows.
        if self.dialect == "postgresql":
            return query.with_for_update(skip_locked=True)
        return query

    def _claim(self, query: sa.Select[Any], column: sa.Column[Any], until: float) -> list[Any]:
        """Rows of ``query`` (which selects the key of ``column``'s table first), each row's
        ``column`` set to ``until`` in the same transaction: the claim of due tasks and of due
        deliveries alike.
        """
        table = column.table
        (key,) = table.primary_key.columns
        with self._write() as conn:
            rows = list(conn.execute(self._lock(query)).all())
            for chunk in chunks(rows):
                conn.execute(
                    table.update()
                    .where(one_of(conn, key, [r[0] for r in chunk]))
                    .values({column.name: until})
                )
        return rows

    def _insert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        # Both dialects speak INSERT ... ON CONFLICT, each through its own construct.
        if self.dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def _current(
        self, conn: sa.Connection, column: sa.Column[Any], pks: set[int]
    ) -> dict[int, Any]:
        """``column`` of the rows with these ids, locked until commit (absent ids are gone).

        SQLite needs no row lock: the write transaction (BEGIN IMMEDIATE) already excludes
        every other writer. PostgreSQL locks in id order, so two writers never deadlock.
        """
        table = column.table
        found: dict[int, Any] = {}
        ordered = sorted(pks)
        for chunk in chunks(ordered):
            query = (
                sa.select(table.c.id, column)
                .where(one_of(conn, table.c.id, chunk))
                .order_by(table.c.id)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update()
            found.update((row[0], row[1]) for row in conn.execute(query))
        return found


def _is_row_error(exc: Exception) -> bool:
    """Whether ``exc`` is the database (or the driver) refusing the values of some row.

    Those are worth retrying without the row; a lock, a full disk or a lost connection
    (OperationalError and the like) would fail every smaller write as well.
    """
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return True  # a bind parameter could not be converted
    # e.g. text the driver cannot encode, an integer SQLite cannot hold
    return isinstance(exc, ValueError | TypeError | OverflowError)


def _describe_error(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    first_line = str(cause).split("\n", 1)[0]
    return sanitize.clean_text(f"{type(cause).__name__}: {first_line}", 300)
