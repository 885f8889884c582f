"""The store on SQLAlchemy: one implementation, with the SQLite/PostgreSQL differences inside."""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
import structlog
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite

from tracker import sanitize
from tracker.retry import DeliveryState
from tracker.status import FINAL, EventType, Snapshot, TaskStatus
from tracker.store import counts, records
from tracker.store.models import (
    AttemptRow,
    DeliveryRow,
    MetaRow,
    TaskRow,
    TransitionRow,
)
from tracker.store.records import KEEP

log = structlog.get_logger("tracker.store")

tasks = TaskRow.__table__  # type: ignore[attr-defined]
transitions = TransitionRow.__table__  # type: ignore[attr-defined]
deliveries = DeliveryRow.__table__  # type: ignore[attr-defined]
attempts = AttemptRow.__table__  # type: ignore[attr-defined]
meta = MetaRow.__table__  # type: ignore[attr-defined]

# SQLite's default is to fail at once on a locked database; wait instead.
SQLITE_BUSY_TIMEOUT_MS = 5000

# Ids per IN (...) list: far below SQLite's and PostgreSQL's bound-parameter limits.
IN_CHUNK = 1000

# How often register() starts over after losing a race for the same ids.
REGISTER_TRIES = 3


class SchemaMismatchError(Exception):
    """The database was written by another version of tracker."""


def normalise_url(url: str) -> str:
    """Point bare ``postgresql://`` URLs at psycopg 3, the driver tracker ships with."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(url: str) -> sa.Engine:
    """An engine with the pragmas and transaction behaviour tracker relies on."""
    url = normalise_url(url)
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_size=8, max_overflow=8, pool_pre_ping=True)
    engine = sa.create_engine(url, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # We issue BEGIN ourselves (below), so writers can take the lock up front.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        # A write transaction that starts deferred and upgrades later can fail with
        # "database is locked" without waiting; BEGIN IMMEDIATE waits for the lock instead.
        immediate = connection.get_execution_options().get("tracker_write", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

    return engine


def _epoch(moment: datetime) -> float:
    return moment.timestamp()


def _from_epoch(value: float | None) -> datetime | None:
    return None if value is None else datetime.fromtimestamp(value, UTC)


class SqlStore:
    """Tasks, history and the webhook outbox in one SQL database."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name

    @classmethod
    def from_url(cls, url: str) -> SqlStore:
        """A store on a new engine for ``url``."""
        return cls(make_engine(url))

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    # -- plumbing ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            conn.execution_options(tracker_write=True)
            with conn.begin():
                yield conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def _lock(self, query: sa.Select[Any]) -> sa.Select[Any]:
        # Several daemons on one PostgreSQL database each claim different rows.
        if self.dialect == "postgresql":
            return query.with_for_update(skip_locked=True)
        return query

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
        for start in range(0, len(ordered), IN_CHUNK):
            query = (
                sa.select(table.c.id, column)
                .where(table.c.id.in_(ordered[start : start + IN_CHUNK]))
                .order_by(table.c.id)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update()
            found.update((row[0], row[1]) for row in conn.execute(query))
        return found

    def _claims(self, conn: sa.Connection, pks: set[int]) -> dict[int, tuple[str, float | None]]:
        """Status and next poll (the claim's token) of these tasks, locked as _current locks."""
        found: dict[int, tuple[str, float | None]] = {}
        ordered = sorted(pks)
        for start in range(0, len(ordered), IN_CHUNK):
            query = (
                sa.select(tasks.c.id, tasks.c.status, tasks.c.next_poll_at)
                .where(tasks.c.id.in_(ordered[start : start + IN_CHUNK]))
                .order_by(tasks.c.id)
            )
            if self.dialect == "postgresql":
                query = query.with_for_update()
            found.update((row[0], (row[1], row[2])) for row in conn.execute(query))
        return found

    # -- schema -----------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the schema, or upgrade it to the newest revision (see tracker.store.migrate)."""
        from tracker.store import migrate  # noqa: PLC0415 - alembic loads only when needed

        migrate.upgrade(self.engine)

    def integrity_problems(self) -> list[str]:
        """What the database's own consistency check reports (empty when healthy)."""
        with self._read() as conn:
            if self.dialect == "sqlite":
                rows = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                return [str(r) for r in rows if r != "ok"]
            conn.execute(sa.text("SELECT count(*) FROM tasks"))
        return []

    def set_meta(self, key: str, value: str) -> None:
        """Record a fact about the running daemon (e.g. when the last poll cycle ended)."""
        upsert = self._insert(meta).values(key=key, value=value)
        # An upsert: two daemons writing the same key for the first time must not collide.
        upsert = upsert.on_conflict_do_update(
            index_elements=[meta.c.key], set_={"value": upsert.excluded.value}
        )
        with self._write() as conn:
            conn.execute(upsert)

    def get_meta(self, key: str) -> str | None:
        """A fact recorded with set_meta, None when never recorded."""
        with self._read() as conn:
            value: str | None = conn.execute(
                sa.select(meta.c.value).where(meta.c.key == key)
            ).scalar()
        return value

    def ping(self) -> None:
        """Raise when the database cannot answer a query."""
        with self._read() as conn:
            conn.execute(sa.select(sa.func.count()).select_from(meta)).scalar()

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
        with self._write() as conn:
            for start in range(0, len(ids), IN_CHUNK):
                existing.update(
                    conn.execute(
                        sa.select(tasks.c.task_id).where(
                            tasks.c.platform == registration.platform,
                            tasks.c.task_id.in_(ids[start : start + IN_CHUNK]),
                        )
                    ).scalars()
                )
            new = [i for i in ids if i not in existing]
            if new:
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
                            "next_poll_at": epoch,
                            "last_change_at": epoch,
                        }
                        for task_id in new
                    ],
                )
        return new, [i for i in ids if i in existing]

    def get(self, platform: str, task_id: str) -> records.TaskRecord | None:
        """One task with its transitions (oldest first), None when unknown."""
        with self._read() as conn:
            row = conn.execute(
                sa.select(tasks).where(tasks.c.platform == platform, tasks.c.task_id == task_id)
            ).first()
            if row is None:
                return None
            history = conn.execute(
                sa.select(transitions)
                .where(transitions.c.task_pk == row.id)
                .order_by(transitions.c.id)
            ).all()
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
        with self._write() as conn:
            pk = conn.execute(
                sa.select(tasks.c.id).where(
                    tasks.c.platform == platform, tasks.c.task_id == task_id
                )
            ).scalar()
            if pk is None:
                return False
            # Explicit deletes: SQLite enforces ON DELETE CASCADE only with the pragma on, and
            # a database opened by another tool may not have it.
            delivery_pks = sa.select(deliveries.c.id).where(deliveries.c.task_pk == pk)
            conn.execute(attempts.delete().where(attempts.c.delivery_pk.in_(delivery_pks)))
            conn.execute(deliveries.delete().where(deliveries.c.task_pk == pk))
            conn.execute(transitions.delete().where(transitions.c.task_pk == pk))
            conn.execute(tasks.delete().where(tasks.c.id == pk))
        return True

    # -- the poll cycle ---------------------------------------------------------------------

    def claim_due(
        self, now: datetime, limit: int, *, lease: float, due_by: datetime | None = None
    ) -> list[records.DueTask]:
        """Take up to ``limit`` tasks due by ``due_by`` (default ``now``), most overdue first.

        The claim moves each task's next poll to the end of its ``lease`` (seconds), so no
        other claim takes it meanwhile, and that exact value is the claim's token: record()
        writes a task only while it still holds it, so an answer that arrives after the lease
        ran out (and another claim took the task) changes nothing. The poll is planned anew
        when its answer is recorded.
        """
        epoch = _epoch(now)
        raw = self.dialect == "sqlite"
        query = self._lock(
            sa.select(*(_DUE_COLUMNS_RAW if raw else _DUE_COLUMNS))
            .where(tasks.c.next_poll_at <= _epoch(due_by or now))
            .order_by(tasks.c.next_poll_at, tasks.c.id)
            .limit(limit)
        )
        until = epoch + lease
        with self._write() as conn:
            rows = conn.execute(query).all()
            if rows:
                conn.execute(
                    tasks.update()
                    .where(tasks.c.id.in_([r.id for r in rows]))
                    .values(next_poll_at=until)
                )
        decoded = _Decoded()
        return [_due(r, until, decoded) for r in rows]

    def earliest_poll(self) -> datetime | None:
        """When the earliest live task is due (None when none is live): one index lookup."""
        with self._read() as conn:
            value = conn.execute(sa.select(sa.func.min(tasks.c.next_poll_at))).scalar()
        return _from_epoch(value)

    def pull_in(self, latest: datetime) -> None:
        """Move every poll planned after ``latest`` to ``latest`` (after a shorter interval)."""
        with self._write() as conn:
            conn.execute(
                tasks.update()
                .where(tasks.c.next_poll_at > _epoch(latest))
                .values(next_poll_at=_epoch(latest))
            )

    def release_claims(self) -> int:
        """Free every delivery lease (a single daemon starting: no one else holds them)."""
        with self._write() as conn:
            done = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.claimed_until.is_not(None),
                    deliveries.c.state == DeliveryState.PENDING,
                )
                .values(claimed_until=None)
            )
        return int(done.rowcount)

    def record(self, updates: Sequence[records.TaskUpdate], now: datetime) -> int:
        """Write a poll's decisions in one transaction: task rows, history rows, outbox rows.

        Each task row is updated only if it still has the status the decision was made on; a
        task that moved or was removed meanwhile keeps its state and gets no history or event.
        A task whose own values the database refuses is left out (logged as
        `task_write_refused`; it is polled again) and the others are written without it; any
        other error (a lock, a full disk, a lost connection) rolls the whole call back.
        Returns how many tasks were written.
        """
        return _isolated(updates, lambda part: self._record_once(part, now), _refused_update)

    def _record_once(self, updates: Sequence[records.TaskUpdate], now: datetime) -> int:
        epoch = _epoch(now)
        replanned, updates = _split_replanned(updates)
        planned = [(u, _update_values(u, now, epoch)) for u in updates]
        planned = [(u, values) for u, values in planned if values or u.outbox]
        if not planned and not replanned:
            return 0
        history: list[dict[str, Any]] = []
        outbox: list[dict[str, Any]] = []
        # Task updates grouped by the columns they set, so each group is one executemany.
        pending: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        in_pending: set[int] = set()
        written = 0
        with self._write() as conn:
            if replanned:
                written += max(0, self._replan(conn, replanned))
            # The compare-and-set: statuses and claims read under lock, then checked here.
            current = self._claims(conn, {u.task.pk for u, _ in planned})
            held: set[int] = set()  # claims checked once in this call hold for its later updates
            for update, values in planned:
                task = update.task
                found = current.get(task.pk)
                if found is None or found[0] != task.snapshot.status.value:
                    continue
                if task.pk not in held:
                    if task.lease_until is not None and found[1] != task.lease_until:
                        continue  # the lease ran out and another claim took the task
                    held.add(task.pk)
                if values:
                    if task.pk in in_pending:
                        # The same task twice in one call: the later update must land last.
                        _update_tasks(conn, pending)
                        pending.clear()
                        in_pending.clear()
                    pending.setdefault(tuple(sorted(values)), []).append({"pk_": task.pk, **values})
                    in_pending.add(task.pk)
                    current[task.pk] = (values.get("status", found[0]), found[1])
                written += 1
                change = update.change
                if change is not None and change.moved:
                    history.append(
                        {
                            "task_pk": task.pk,
                            "from_status": change.before.status.value,
                            "to_status": change.after.status.value,
                            "upstream_status": change.after.upstream_status,
                            "progress": change.after.progress,
                            "at": now,
                        }
                    )
                outbox.extend(
                    {
                        "webhook_id": entry.webhook_id,
                        "task_pk": task.pk,
                        "platform": task.platform,
                        "task_id": task.task_id,
                        "event_type": entry.event_type,
                        "payload": entry.payload.decode(),
                        "url": entry.url,
                        "endpoint": entry.endpoint,
                        "guarded": entry.guarded,
                        "state": DeliveryState.PENDING,
                        "attempts": 0,
                        "next_attempt_at": epoch,
                        "created_at": now,
                    }
                    for entry in update.outbox
                )
            _update_tasks(conn, pending)
            if history:
                conn.execute(transitions.insert(), history)
            if outbox:
                conn.execute(deliveries.insert(), outbox)
        return written

    def _replan(self, conn: sa.Connection, replanned: list[tuple[float, int, float]]) -> int:
        """Run _REPLAN for (next poll, id, lease end) rows; how many rows it changed."""
        if self.dialect == "sqlite":
            # Straight to the driver: SQLAlchemy's per-row parameter processing costs more
            # than the UPDATE itself, and a drain sends one row per polled task.
            return conn.exec_driver_sql(_REPLAN_SQLITE, replanned).rowcount
        params = [{"next_": n, "pk_": pk, "lease_": lease} for n, pk, lease in replanned]
        return conn.execute(_REPLAN, params).rowcount

    # -- the delivery loop ------------------------------------------------------------------

    def claim_deliveries(
        self, now: datetime, limit: int, *, lease: float
    ) -> list[records.DeliveryJob]:
        """Take up to ``limit`` due deliveries, oldest first, for ``lease`` seconds.

        A delivery waits while an earlier event of the same task is still pending, so each
        receiver sees a task's events in the order they happened.
        """
        epoch = _epoch(now)
        earlier = deliveries.alias("earlier")
        blocked = (
            sa.select(earlier.c.id)
            .where(
                earlier.c.task_pk == deliveries.c.task_pk,
                earlier.c.state == DeliveryState.PENDING,
                earlier.c.id < deliveries.c.id,
            )
            # OFFSET 0 keeps this a per-row subplan on ix_deliveries_task: flattened into an
            # anti-join, PostgreSQL without fresh statistics chose a quadratic plan (seconds).
            .offset(0)
            .exists()
        )
        c = deliveries.c
        query = self._lock(
            # Only what a DeliveryJob carries: each datetime column read costs a conversion.
            sa.select(
                c.id,
                c.webhook_id,
                c.task_pk,
                c.platform,
                c.task_id,
                c.event_type,
                c.payload,
                c.url,
                c.endpoint,
                c.guarded,
                c.attempts,
            )
            .where(
                deliveries.c.state == DeliveryState.PENDING,
                deliveries.c.next_attempt_at <= epoch,
                sa.or_(deliveries.c.claimed_until.is_(None), deliveries.c.claimed_until < epoch),
                ~blocked,
            )
            .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
            .limit(limit)
        )
        with self._write() as conn:
            rows = conn.execute(query).all()
            if rows:
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id.in_([r.id for r in rows]))
                    .values(claimed_until=epoch + lease)
                )
        return [
            records.DeliveryJob(
                pk=r.id,
                webhook_id=r.webhook_id,
                task_pk=r.task_pk,
                platform=r.platform,
                task_id=r.task_id,
                event_type=EventType(r.event_type),
                payload=r.payload.encode(),
                url=r.url,
                endpoint=r.endpoint,
                guarded=r.guarded,
                attempts=r.attempts,
            )
            for r in rows
        ]

    def finish_attempts(self, results: Sequence[records.AttemptResult]) -> None:
        """Log attempts and move their deliveries on, in one transaction.

        A delivery removed meanwhile (its task was deleted) is skipped, so one removal does
        not fail the results of the whole batch. A result whose own values the database
        refuses is written again without the receiver's answer text, and the others without
        it; an unrecorded result would leave its delivery to be sent again at every lease.
        """
        if results:
            _isolated(results, self._finish_once, self._refused_result)

    def _refused_result(self, result: records.AttemptResult, exc: Exception) -> int:
        log.error(
            "attempt_write_refused",
            webhook_id=result.job.webhook_id,
            task_id=result.job.task_id,
            error=_describe_error(exc),
        )
        error = None if result.error is None else sanitize.clean_text(result.error, 500)
        plain = dataclasses.replace(result, response_excerpt="", error=error)
        try:
            return self._finish_once([plain])
        except Exception as again:
            if not _is_row_error(again):
                raise
            log.error(  # noqa: TRY400 - the row's values would only repeat in a traceback
                "attempt_unrecorded", webhook_id=result.job.webhook_id, error=_describe_error(again)
            )
            return 0

    def _finish_once(self, results: Sequence[records.AttemptResult]) -> int:
        with self._write() as conn:
            live = self._current(conn, deliveries.c.id, {r.job.pk for r in results})
            results = [r for r in results if r.job.pk in live]
            if not results:
                return 0
            conn.execute(
                attempts.insert(),
                [
                    {
                        "delivery_pk": r.job.pk,
                        "at": r.at,
                        "url": r.job.url,
                        "status_code": r.status_code,
                        "error": r.error,
                        "latency_ms": r.latency_ms,
                        "response_excerpt": r.response_excerpt,
                    }
                    for r in results
                ],
            )
            conn.execute(
                _FINISH,
                [
                    {
                        "pk_": r.job.pk,
                        "state_": r.state,
                        "next_": r.next_attempt_at,
                        "at_": r.at,
                        "code_": r.status_code,
                        "error_": r.error,
                        "delivered_": r.at if r.state == DeliveryState.DELIVERED else None,
                    }
                    for r in results
                ],
            )
        return len(results)

    def next_delivery_at(self) -> datetime | None:
        """When the earliest pending delivery falls due (None when none is pending)."""
        with self._read() as conn:
            value = conn.execute(
                sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(
                    deliveries.c.state == DeliveryState.PENDING
                )
            ).scalar()
        return _from_epoch(value)

    def get_delivery(self, pk: int) -> records.DeliveryRecord | None:
        """One delivery with its attempt log, None when unknown."""
        with self._read() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == pk)).first()
            if row is None:
                return None
            log = conn.execute(
                sa.select(attempts).where(attempts.c.delivery_pk == pk).order_by(attempts.c.id)
            ).all()
        return _delivery_record(row, log)

    def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        platform: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[records.DeliveryRecord], int | None]:
        """A page of deliveries, newest first, each with its attempt log."""
        if platform is not None and task_id is not None:
            # One task's deliveries through its row id: (task_pk, id) is indexed, the
            # (platform, task_id) copies on the delivery rows are not.
            task_pk = (
                sa.select(tasks.c.id)
                .where(tasks.c.platform == platform, tasks.c.task_id == task_id)
                .scalar_subquery()
            )
            query = _page(deliveries, limit, before, state=state).where(
                deliveries.c.task_pk == task_pk
            )
        else:
            query = _page(
                deliveries, limit, before, state=state, platform=platform, task_id=task_id
            )
        with self._read() as conn:
            rows, cursor = _cut(conn.execute(query).all(), limit)
            logs: dict[int, list[Any]] = {r.id: [] for r in rows}
            if rows:
                for a in conn.execute(
                    sa.select(attempts)
                    .where(attempts.c.delivery_pk.in_(list(logs)))
                    .order_by(attempts.c.id)
                ):
                    logs[a.delivery_pk].append(a)
        return [_delivery_record(r, logs[r.id]) for r in rows], cursor

    def requeue(
        self,
        now: datetime,
        *,
        pk: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[int]:
        """Send deliveries again with their own ``webhook-id``: one by id (any state), or every
        dead one created in [since, until). Returns the ids re-queued.
        """
        query = sa.select(deliveries.c.id)
        if pk is not None:
            query = query.where(deliveries.c.id == pk)
        else:
            query = query.where(deliveries.c.state == DeliveryState.DEAD)
            if since is not None:
                query = query.where(deliveries.c.created_at >= since)
            if until is not None:
                query = query.where(deliveries.c.created_at < until)
        with self._write() as conn:
            pks = list(conn.execute(query).scalars())
            if pks:
                conn.execute(
                    deliveries.update()
                    .where(deliveries.c.id.in_(pks))
                    .values(
                        state=DeliveryState.PENDING,
                        next_attempt_at=_epoch(now),
                        claimed_until=None,
                        delivered_at=None,
                    )
                )
        return pks

    # -- figures ----------------------------------------------------------------------------

    def stats(self) -> records.Stats:
        """Counts by platform and status, deliveries by state, the oldest pending delivery.

        The counts come from tracker_counts (kept by triggers) and the oldest pending delivery
        from one index lookup, so the cost does not grow with the tables.
        """
        with self._read() as conn:
            task_counts, delivery_counts = counts.read(conn)
            oldest = conn.execute(
                sa.select(sa.func.min(deliveries.c.created_at)).where(
                    deliveries.c.state == DeliveryState.PENDING
                )
            ).scalar()
        if isinstance(oldest, str):  # SQLite's MIN() over a DATETIME column loses the type
            oldest = datetime.fromisoformat(oldest)
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=UTC)
        return records.Stats(
            tasks=task_counts,
            deliveries=delivery_counts,
            oldest_pending_delivery=oldest,
            earliest_poll=self.earliest_poll(),
        )

    def compact_counts(self) -> int:
        """Fold the appended count changes into one row per key (keeps stats() cheap)."""
        with self._write() as conn:
            return counts.compact(conn)


_T = TypeVar("_T")


def _is_row_error(exc: Exception) -> bool:
    """Whether ``exc`` is the database (or the driver) refusing the values of some row.

    Those are worth retrying without the row; a lock, a full disk or a lost connection
    (OperationalError and the like) would fail every smaller write as well.
    """
    if isinstance(exc, sa.exc.DataError | sa.exc.IntegrityError):
        return True
    if isinstance(exc, sa.exc.StatementError) and not isinstance(exc, sa.exc.DBAPIError):
        return True  # a bind parameter could not be converted
    return isinstance(exc, ValueError | TypeError)  # e.g. text the driver cannot encode


def _describe_error(exc: Exception) -> str:
    cause = getattr(exc, "orig", None) or exc
    first_line = str(cause).split("\n", 1)[0]
    return sanitize.clean_text(f"{type(cause).__name__}: {first_line}", 300)


def _isolated(
    items: Sequence[_T],
    write: Callable[[Sequence[_T]], int],
    refused: Callable[[_T, Exception], int],
) -> int:
    """``write(items)``; when the database refuses some row's values, the halves apart.

    Halving until the refused rows stand alone costs about 2 log2(n) extra transactions per
    bad row, and only when there is one; each lone refused row goes to ``refused``.
    """
    try:
        return write(items)
    except Exception as exc:
        if not _is_row_error(exc):
            raise
        if len(items) == 1:
            return refused(items[0], exc)
    middle = len(items) // 2
    return _isolated(items[:middle], write, refused) + _isolated(items[middle:], write, refused)


def _refused_update(update: records.TaskUpdate, exc: Exception) -> int:
    log.error(
        "task_write_refused",
        platform=update.task.platform,
        task_id=update.task.task_id,
        error=_describe_error(exc),
    )
    return 0


# One statement for every finished attempt, run as an executemany.
_FINISH = (
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("pk_"))
    .values(
        state=sa.bindparam("state_"),
        attempts=deliveries.c.attempts + 1,
        next_attempt_at=sa.func.coalesce(
            sa.bindparam("next_", type_=deliveries.c.next_attempt_at.type),
            deliveries.c.next_attempt_at,
        ),
        claimed_until=None,
        last_attempt_at=sa.bindparam("at_"),
        last_status_code=sa.bindparam("code_"),
        last_error=sa.bindparam("error_"),
        delivered_at=sa.bindparam("delivered_"),
    )
)


_RAW_NAMES = ("created_at", "events", "metadata")

# The columns a poll needs: not the stored result, which can be large and is never read back.
_DUE_COLUMNS = tuple(
    tasks.c[name]
    for name in (
        "id", "platform", "task_id", "status", "upstream_status", "progress",
        "upstream_progress", "fail_reason", "created_at", "missing_since", "webhook_url",
        "endpoint", "events", "metadata", "next_poll_at", "last_change_at",
    )
)  # fmt: skip

# A new plan for a task whose answer changed nothing else; the WHERE is the compare-and-set
# (the claim still held: its lease's end is still the next poll).
_REPLAN = (
    tasks.update()
    .where(tasks.c.id == sa.bindparam("pk_"), tasks.c.next_poll_at == sa.bindparam("lease_"))
    .values(next_poll_at=sa.bindparam("next_"))
)
_REPLAN_SQLITE = "UPDATE tasks SET next_poll_at = ? WHERE id = ? AND next_poll_at = ?"

# _DUE_COLUMNS with the time and JSON columns as SQLite stores them (text): a claim's tasks
# mostly share these values (one bulk registration), so each is decoded once per claim.
_DUE_COLUMNS_RAW = tuple(
    sa.type_coerce(column, sa.Text) if column.name in _RAW_NAMES else column
    for column in _DUE_COLUMNS
)


def _split_replanned(
    updates: Sequence[records.TaskUpdate],
) -> tuple[list[tuple[float, int, float]], list[records.TaskUpdate]]:
    """(next poll, id, lease end) for _REPLAN of updates that only move a claimed task's next
    poll (and whose task the call names once), and the other updates."""
    seen: dict[int, int] = {}
    for update in updates:
        seen[update.task.pk] = seen.get(update.task.pk, 0) + 1
    replanned: list[tuple[float, int, float]] = []
    rest: list[records.TaskUpdate] = []
    for update in updates:
        task = update.task
        if (
            update.change is None
            and not update.outbox
            and update.missing_since is KEEP
            and isinstance(update.next_poll_at, float)
            and task.lease_until is not None
            and seen[task.pk] == 1
        ):
            replanned.append((update.next_poll_at, task.pk, task.lease_until))
        else:
            rest.append(update)
    return replanned, rest


def _update_tasks(conn: sa.Connection, groups: dict[tuple[str, ...], list[dict[str, Any]]]) -> None:
    # The SET clause comes from each group's keys; "pk_" only feeds the WHERE.
    for rows in groups.values():
        conn.execute(tasks.update().where(tasks.c.id == sa.bindparam("pk_")), rows)


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


def _update_values(update: records.TaskUpdate, now: datetime, epoch: float) -> dict[str, Any]:
    values: dict[str, Any] = {}
    change = update.change
    if change is not None:
        after = change.after
        values.update(
            status=after.status.value,
            upstream_status=after.upstream_status,
            progress=after.progress,
            upstream_progress=after.upstream_progress,
            fail_reason=after.fail_reason,
            updated_at=now,
        )
        if change.result is not None:
            values["result"] = dict(change.result)
        if change.moved or after.progress != change.before.progress:
            values["last_change_at"] = epoch
        if after.status in FINAL:
            values["finished_at"] = now
            values["next_poll_at"] = None
            values["missing_since"] = None
    if update.missing_since is not KEEP and "missing_since" not in values:
        values["missing_since"] = update.missing_since
    if update.next_poll_at is not KEEP and "next_poll_at" not in values:
        values["next_poll_at"] = update.next_poll_at
    return values


def _event_types(names: Sequence[str] | None) -> tuple[EventType, ...] | None:
    return None if names is None else tuple(EventType(name) for name in names)


_STATUSES = {s.value: s for s in TaskStatus}


class _Decoded:
    """The raw values of one claim decoded, each distinct one once (see _DUE_COLUMNS_RAW)."""

    def __init__(self) -> None:
        self.times: dict[str, datetime] = {}
        self.json: dict[str, Any] = {}
        self.events: dict[str, tuple[EventType, ...] | None] = {}

    def time(self, value: Any) -> datetime:
        if not isinstance(value, str):
            return value  # type: ignore[no-any-return]  # already a datetime (PostgreSQL)
        found = self.times.get(value)
        if found is None:
            # SQLite keeps UTC without a zone (UTCDateTime), in an ISO format.
            found = self.times[value] = datetime.fromisoformat(value).replace(tzinfo=UTC)
        return found

    def document(self, value: Any) -> Any:
        if not isinstance(value, str):
            return value
        if value not in self.json:
            self.json[value] = json.loads(value)
        return self.json[value]

    def event_types(self, value: Any) -> tuple[EventType, ...] | None:
        if not isinstance(value, str):
            return _event_types(value)
        if value not in self.events:
            self.events[value] = _event_types(json.loads(value))
        return self.events[value]


def _due(row: Any, lease_until: float, decoded: _Decoded) -> records.DueTask:
    # By position, in _DUE_COLUMNS order: a claim builds thousands of these per second.
    (pk, platform, task_id, status, upstream_status, progress, upstream_progress, fail_reason,
     created_at, missing_since, webhook_url, endpoint, events, metadata, planned,
     last_change_at) = row  # fmt: skip
    return records.DueTask(
        pk=pk,
        platform=platform,
        task_id=task_id,
        snapshot=Snapshot(
            status=_STATUSES[status],
            upstream_status=upstream_status,
            progress=progress,
            upstream_progress=upstream_progress,
            fail_reason=fail_reason,
        ),
        created_at=decoded.time(created_at),
        missing_since=missing_since,
        webhook_url=webhook_url,
        endpoint=endpoint,
        events=decoded.event_types(events),
        metadata=decoded.document(metadata),
        planned=planned,
        last_change_at=last_change_at,
        lease_until=lease_until,
    )


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
