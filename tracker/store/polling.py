"""The poll side of the store: claims, the plan, and writing a poll's decisions."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import sqlalchemy as sa
import structlog

from tracker.retry import DeliveryState
from tracker.status import FINAL
from tracker.store import records
from tracker.store.base import (
    IN_CHUNK,
    SqlBase,
    _describe_error,
    _epoch,
    _from_epoch,
    chunks,
    deliveries,
    in_id_order,
    one_of,
    polls,
    tasks,
    transitions,
)
from tracker.store.records import KEEP, Keep
from tracker.store.refusals import RefusalMemory, _isolated
from tracker.store.rows import _DUE_COLUMNS, _due_tasks

log = structlog.get_logger("tracker.store")

#: due ids a SQLite claim that skips platforms reads beyond its limit (see _claim_sqlite)
CLAIM_SPARE = 16
#: seconds beyond which a pending delivery's claim is a hold, not a lease: a lease ends at
#: most tracker.delivery.outbox.LEASE (6 s) on, a delivery left for later is held back for
#: more than its HOLD_MARGIN (30 s). shift_plans moves holds back with the clock, and leaves
#: the leases (another daemon's token, by a clock that may not have stepped) alone.
HELD_BEYOND = 30.0


class Polling(SqlBase):
    """Tasks claimed for polls, the plan of their next polls, and the polls' results."""

    # -- the poll cycle ---------------------------------------------------------------------

    def claim_due(
        self,
        now: datetime,
        limit: int,
        *,
        lease: float,
        due_by: datetime | None = None,
        skip: Collection[str] = (),
    ) -> list[records.DueTask]:
        """Take up to ``limit`` tasks due by ``due_by`` (default ``now``), most overdue first,
        none of the platforms named in ``skip`` (their relay has enough to do).

        The claim moves each task's next poll to the end of its ``lease`` (seconds), so no
        other claim takes it meanwhile, and that exact value is the claim's token: record()
        writes a task only while it still holds it, so an answer that arrives after the lease
        ran out (and another claim took the task) changes nothing. The poll is planned anew
        when its answer is recorded; renew_claim() extends a claim still being worked on.
        """
        until = _epoch(now) + lease
        skipped = sorted(set(skip))
        if self.dialect == "sqlite":
            rows = self._claim_sqlite(_epoch(due_by or now), limit, until, skipped)
        else:
            query = (
                sa.select(*_DUE_COLUMNS)
                .select_from(polls.join(tasks, tasks.c.id == polls.c.task_pk))
                .where(polls.c.next_poll_at <= _epoch(due_by or now))
                .order_by(polls.c.next_poll_at, polls.c.task_pk)
                .limit(limit)
            )
            if skipped:
                query = query.where(tasks.c.platform.not_in(skipped))
            rows = self._claim(query, polls.c.next_poll_at, until)
        claim = records.Claim(until, tuple(r[0] for r in rows))
        return _due_tasks(rows, claim)

    def _claim_sqlite(
        self, due_by: float, limit: int, until: float, skip: Sequence[str]
    ) -> Sequence[Any]:
        """_claim's due rows and lease, as two statements straight to the driver.

        SQLAlchemy's per-row processing and its expansion of an IN list of thousands of ids
        (a statement compiled anew per claim) cost more than the claim's own work; the driver
        keeps the few statements of each IN list's length prepared instead. The write
        transaction excludes every other writer, so the rows read are the rows leased; a claim
        that ``skip``s platforms reads the ids first, outside it (see below), and then takes
        those of them still due.
        """
        pks: list[int] = []
        if skip:
            # Reading past a busy relay's overdue rows (about 0.1 us each, millions perhaps)
            # is done before the write transaction, so that writers (registrations) do not
            # wait for it; the transaction then takes those of the rows found still due.
            # A few more than the limit: a row another writer re-planned or removed in between
            # would leave the claim short, and a short claim tells the drain that nothing more
            # is due (it then waits a while before claiming for those relays again).
            reading = limit + CLAIM_SPARE
            with self._read() as conn:
                found = conn.exec_driver_sql(_due_ids_sqlite(len(skip)), (due_by, *skip, reading))
                pks = [r[0] for r in found]
        with self._write() as conn:
            if not skip:
                rows = conn.exec_driver_sql(_DUE_SQLITE, (due_by, limit)).all()
            else:
                rows = []
                for part in chunks(pks, IN_CHUNK - len(skip)):
                    query = _still_due_sqlite(len(part), len(skip))
                    rows += conn.exec_driver_sql(query, (due_by, *skip, *part)).all()
                rows.sort(key=lambda row: (row[_PLANNED], row[0]))
                del rows[limit:]
            for chunk in chunks(rows):
                ids = [r[0] for r in chunk]
                conn.exec_driver_sql(_lease_sqlite(len(ids)), (until, *ids))
        return rows

    def renew_claim(self, claim: records.Claim, until: float) -> int:
        """Extend ``claim`` to ``until`` (epoch seconds) for its tasks not recorded since.

        Only rows whose next poll is still the claim's token move, so a task already recorded,
        or taken by another claim after this one lapsed, is left alone; the tasks left alone
        join ``claim.lost`` (the poller asks nothing about them). Returns how many moved.
        """
        moved = 0
        lost: list[int] = []
        # In id order, the order _claims, removal and pruning lock rows in (a claim lists its
        # tasks in due order): two daemons on the same rows then wait instead of deadlocking.
        pks = sorted(claim.pks)
        with self._write() as conn:
            for chunk in chunks(pks):
                mine = sa.and_(
                    one_of(conn, polls.c.task_pk, chunk), polls.c.next_poll_at == claim.until
                )
                done = conn.execute(polls.update().where(mine).values(next_poll_at=until))
                moved += int(done.rowcount)
                if done.rowcount < len(chunk):
                    # Some were recorded since, or taken by another claim after this one
                    # lapsed: not this claim's to ask about (rare; read only then).
                    renewed = sa.select(polls.c.task_pk).where(
                        one_of(conn, polls.c.task_pk, chunk), polls.c.next_poll_at == until
                    )
                    kept = set(conn.execute(renewed).scalars())
                    lost += [pk for pk in chunk if pk not in kept]
        claim.lost.update(lost)
        claim.until = until
        return moved

    def earliest_poll(self) -> datetime | None:
        """When the earliest live task is due (None when none is live)."""
        overdue = self.most_overdue()
        return None if overdue is None else overdue[0]

    def most_overdue(self) -> tuple[datetime, str] | None:
        """When the earliest live task is due, and its platform (None when none is live): one
        index lookup, and the task's row."""
        query = (
            sa.select(polls.c.next_poll_at, tasks.c.platform)
            .select_from(polls.join(tasks, tasks.c.id == polls.c.task_pk))
            .order_by(polls.c.next_poll_at, polls.c.task_pk)
            .limit(1)
        )
        with self._read() as conn:
            row = conn.execute(query).first()
        if row is None:
            return None
        due = _from_epoch(row[0])
        return None if due is None else (due, row[1])

    def pull_in(self, latest: datetime, *, now: datetime, claims_within: float = 0.0) -> None:
        """Move every poll planned after ``latest`` to ``latest`` (after a shorter interval).

        On PostgreSQL, which other daemons may share, the polls planned within
        ``claims_within`` seconds of ``now`` stay, as in
        shift_plans: such a next poll may be the end of another daemon's lease, the token its
        claim is recorded by, and moved, that daemon's answer would find its claim gone.
        """
        cutoff = _epoch(latest)
        later = polls.c.next_poll_at > cutoff
        if self.dialect == "postgresql" and claims_within > 0:
            leases_end = _epoch(now) + claims_within
            later = sa.and_(later, polls.c.next_poll_at > leases_end)
        with self._write() as conn:
            moving = in_id_order(conn, polls.c.task_pk, later)
            conn.execute(polls.update().where(moving).values(next_poll_at=cutoff))

    def shift_plans(
        self, seconds: float, after: datetime, *, claims_within: float = 0.0
    ) -> tuple[int, int]:
        """Move every poll, and every pending delivery's next attempt, planned after ``after``
        earlier by ``seconds``: the wall clock stepped back that far, and they were planned
        by the clock before the step. Returns how many polls and deliveries moved.

        On PostgreSQL, which other daemons may share, the polls planned within
        ``claims_within`` seconds of ``after`` stay: a next poll that near may be the end of
        another daemon's lease, the token its claim is recorded by, and moved, that daemon's
        answer would find its claim gone (and the task due again at once). A plan of this
        daemon's that near is then polled that much late, once.

        A delivery's claim is a column of its own: pending deliveries' next attempts all
        move, and so does a claim that ends more than HELD_BEYOND seconds after ``after``,
        which is no live lease but a delivery left for later (held back), on either database.
        """
        cutoff = _epoch(after)
        pending = deliveries.c.state == DeliveryState.PENDING
        retry = deliveries.c.next_attempt_at > cutoff
        held = deliveries.c.claimed_until > cutoff + HELD_BEYOND
        spared = cutoff + claims_within if self.dialect == "postgresql" else cutoff
        with self._write() as conn:
            moved = conn.execute(
                polls.update()
                .where(in_id_order(conn, polls.c.task_pk, polls.c.next_poll_at > spared))
                .values(next_poll_at=polls.c.next_poll_at - seconds)
            ).rowcount
            # One UPDATE, so its rows are locked once, in id order.
            retried = conn.execute(
                deliveries.update()
                .where(in_id_order(conn, deliveries.c.id, sa.and_(pending, sa.or_(retry, held))))
                .values(
                    next_attempt_at=sa.case(
                        (retry, deliveries.c.next_attempt_at - seconds),
                        else_=deliveries.c.next_attempt_at,
                    ),
                    claimed_until=sa.case(
                        (held, deliveries.c.claimed_until - seconds),
                        else_=deliveries.c.claimed_until,
                    ),
                )
            ).rowcount
        return int(moved), int(retried)

    def record(
        self,
        updates: Sequence[records.TaskUpdate],
        now: datetime,
        replans: Sequence[records.Replan] = (),
        *,
        landed: list[records.TaskUpdate] | None = None,
    ) -> int:
        """Write a poll's decisions in one transaction: task rows, history rows, outbox rows.

        Each task row is updated only if it still has the status the decision was made on; a
        task that moved or was removed meanwhile keeps its state and gets no history or event.
        A task whose own values the database refuses is left out (logged as
        `task_write_refused`, once per reason) and set aside until its update's
        ``set_aside_until``, and the others are written without it; any other error (a lock,
        a full disk, a lost connection) rolls the whole call back. ``replans`` (most answers:
        nothing moved), and the updates that only move a claimed task's next poll, write only
        that next poll, while their claim holds the task, in a transaction of their own: no
        value of theirs can be refused. Returns how many tasks were written; ``landed``, if
        given, gets each update with a status change that was committed (one the
        compare-and-set or the database turned away is not).
        """
        replanned, updates = _split_replanned(updates)
        if replanned:
            replans = [*replans, *replanned]
        written = 0
        if replans:
            with self._write() as conn:
                written = max(0, self._replan(conn, replans))
            if self._task_refusals:
                self._accepted_replans(replans)
        return written + _isolated(
            updates,
            lambda part: self._record_once(part, now, landed),
            self._refused_update,
            self._accepted_updates,
            unit=_task_pk,
        )

    def _record_once(
        self,
        updates: Sequence[records.TaskUpdate],
        now: datetime,
        landed: list[records.TaskUpdate] | None = None,
    ) -> int:
        epoch = _epoch(now)
        planned = [
            (u, columns, next_poll)
            for u in updates
            for columns, next_poll in [_update_values(u, now, epoch)]
            if columns or next_poll is not KEEP or u.outbox
        ]
        if not planned:
            return 0
        history: list[dict[str, Any]] = []
        outbox: list[dict[str, Any]] = []
        # Task updates grouped by the columns they set, so each group is one executemany.
        pending: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        in_pending: set[int] = set()
        #: each written task's next poll (None: final, no more polls)
        moves: dict[int, float | None] = {}
        #: the updates with a change written here: landed only once the transaction commits
        changed: list[records.TaskUpdate] = []
        written = 0
        with self._write() as conn:
            # The compare-and-set: statuses and claims read under lock, then checked here.
            current = self._claims(conn, {u.task.pk for u, _, _ in planned})
            # The claims checked once in this call, by task and token: they hold for the same
            # claim's later updates (its first write moved the next poll), not for another's.
            held: set[tuple[int, float | None]] = set()
            for update, columns, next_poll in planned:
                task = update.task
                found = current.get(task.pk)
                if found is None or found[0] != task.snapshot.status.value:
                    continue
                claim = (task.pk, task.lease_until)
                if claim not in held:
                    if task.lease_until is not None and found[1] != task.lease_until:
                        continue  # the lease ran out and another claim took the task
                    held.add(claim)
                if next_poll is not KEEP:
                    moves[task.pk] = next_poll  # a later update's wins
                if columns:
                    if task.pk in in_pending:
                        # The same task twice in one call: the later update must land last.
                        _update_tasks(conn, pending)
                        pending.clear()
                        in_pending.clear()
                    row = {"pk_": task.pk, **columns}
                    pending.setdefault(tuple(sorted(columns)), []).append(row)
                    in_pending.add(task.pk)
                    current[task.pk] = (columns.get("status", found[0]), found[1])
                written += 1
                if update.change is not None:
                    changed.append(update)
                history.extend(_history_rows(update, now))
                outbox.extend(_outbox_rows(update, now, epoch))
            _update_tasks(conn, pending)
            self._move_polls(conn, moves)
            _insert_rows(conn, transitions, history)
            _insert_rows(conn, deliveries, outbox)
        if landed is not None:
            landed += changed
        return written

    def _move_polls(self, conn: sa.Connection, moves: dict[int, float | None]) -> None:
        """Set each task's next poll, or end its polls (None: the task is final)."""
        ended = [pk for pk, at in moves.items() if at is None]
        for chunk in chunks(ended):
            conn.execute(polls.delete().where(one_of(conn, polls.c.task_pk, chunk)))
        upserts = [(pk, at) for pk, at in moves.items() if at is not None]
        if not upserts:
            return
        if self.dialect == "sqlite":
            # Straight to the driver, as _replan: a row per polled task whose answer moved it.
            conn.exec_driver_sql(_UPSERT_POLL_SQLITE, upserts)
            return
        upsert = self._insert(polls)
        conn.execute(
            upsert.on_conflict_do_update(
                index_elements=[polls.c.task_pk],
                set_={"next_poll_at": upsert.excluded.next_poll_at},
            ),
            [{"task_pk": pk, "next_poll_at": at} for pk, at in upserts],
        )

    def _replan(self, conn: sa.Connection, replanned: Sequence[tuple[float, int, float]]) -> int:
        """Run _REPLAN for (next poll, id, lease end) rows; how many rows it changed."""
        if self.dialect == "sqlite":
            # Straight to the driver: SQLAlchemy's per-row parameter processing costs more
            # than the UPDATE itself, and a drain sends one row per polled task.
            if not _UPDATE_FROM:
                return conn.exec_driver_sql(_REPLAN_SQLITE, replanned).rowcount
            # One statement per few hundred rows, not one step per row: half the CPU, and the
            # driver lets go of the GIL once per statement rather than once per row.
            changed = 0
            for part in chunks(replanned, IN_CHUNK // 3):
                flat = [value for row in part for value in row]
                changed += conn.exec_driver_sql(_replan_sqlite(len(part)), tuple(flat)).rowcount
            return changed
        # In id order, the order _claims locks in: two daemons writing the same rows (one of
        # them under a lapsed claim) then wait for each other instead of deadlocking.
        ordered = sorted(replanned, key=lambda row: row[1])
        params = [{"next_": n, "pk_": pk, "lease_": lease} for n, pk, lease in ordered]
        return conn.execute(_REPLAN, params).rowcount

    # -- tasks whose write the database refuses ---------------------------------------------

    @functools.cached_property
    def _task_refusals(self) -> RefusalMemory:
        return RefusalMemory()

    def _refused_update(self, update: records.TaskUpdate, exc: Exception) -> int:
        """Log a refused task once per reason, and set it aside (its claim ends then) until
        ``set_aside_until``, so the answer the database refuses is not fetched and refused
        again at every lease's end."""
        task, until, lease = update.task, update.set_aside_until, update.task.lease_until
        next_poll = "when the claim ends"
        if until is not None and lease is not None:
            with self._write() as conn:
                # Only a time is written: no value of the answer can be refused again.
                self._replan(conn, [(until, task.pk, lease)])
            next_poll = datetime.fromtimestamp(until, UTC).isoformat()
        reason = _describe_error(exc)
        if self._task_refusals.first(task.pk, reason):
            log.error(
                "task_write_refused",
                platform=task.platform,
                task_id=task.task_id,
                error=reason,
                next_poll=next_poll,
            )
        return 0

    def _accepted_updates(self, updates: Sequence[records.TaskUpdate]) -> None:
        """Forget the refusals of tasks written at last, saying so: they are polled as usual."""
        if not self._task_refusals:
            return
        for update in updates:
            if self._task_refusals.forget(update.task.pk):
                log.info(
                    "task_write_accepted",
                    platform=update.task.platform,
                    task_id=update.task.task_id,
                )

    def _accepted_replans(self, replans: Sequence[records.Replan]) -> None:
        """_accepted_updates for replans: a refused task is forgotten (and named in the log)
        only if its replan was written, its claim still held; only those are read back."""
        refused = {r.pk: r.next_poll_at for r in replans if r.pk in self._task_refusals}
        if not refused:
            return
        found: list[Any] = []
        pks = sorted(refused)
        with self._read() as conn:
            for chunk in chunks(pks):
                query = (
                    sa.select(
                        polls.c.task_pk, polls.c.next_poll_at, tasks.c.platform, tasks.c.task_id
                    )
                    .join(tasks, tasks.c.id == polls.c.task_pk)
                    .where(one_of(conn, polls.c.task_pk, chunk))
                )
                found += conn.execute(query).all()
        for pk, next_poll_at, platform, task_id in found:
            if next_poll_at == refused[pk] and self._task_refusals.forget(pk):
                log.info("task_write_accepted", platform=platform, task_id=task_id)


# A new plan for a task whose answer changed nothing else; the WHERE is the compare-and-set
# (the claim still held: its lease's end is still the next poll).
_REPLAN = (
    polls.update()
    .where(polls.c.task_pk == sa.bindparam("pk_"), polls.c.next_poll_at == sa.bindparam("lease_"))
    .values(next_poll_at=sa.bindparam("next_"))
)
_REPLAN_SQLITE = "UPDATE polls SET next_poll_at = ? WHERE task_pk = ? AND next_poll_at = ?"
# A written task's next poll on SQLite: (id, next poll) rows.
_UPSERT_POLL_SQLITE = (
    "INSERT INTO polls (task_pk, next_poll_at) VALUES (?, ?)"
    " ON CONFLICT (task_pk) DO UPDATE SET next_poll_at = excluded.next_poll_at"
)
#: SQLite 3.33 and later know UPDATE ... FROM
_UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33)


#: _DUE_COLUMNS as SQLite reads them (the time and JSON columns as stored, for _due_tasks)
_DUE_SELECT = ", ".join(f"{c.table.name}.{c.name}" for c in _DUE_COLUMNS)
#: where a due row holds its planned poll
_PLANNED = [c.name for c in _DUE_COLUMNS].index("next_poll_at")


# A claim on SQLite: _DUE_COLUMNS of the due rows in due order, then their lease.
_DUE_SQLITE = (
    f"SELECT {_DUE_SELECT} FROM polls JOIN tasks ON tasks.id = polls.task_pk"  # noqa: S608
    " WHERE polls.next_poll_at <= ? ORDER BY polls.next_poll_at, polls.task_pk LIMIT ?"
)


@functools.cache
def _due_ids_sqlite(skipped: int) -> str:
    """The ids of the due rows in due order, but those of ``skipped`` platforms: (due by,
    platform, ..., limit); read before a claim's write transaction (_still_due_sqlite)."""
    skip = ", ".join("?" * skipped)
    # Only placeholders and column names go into the text.
    return (
        "SELECT polls.task_pk FROM polls JOIN tasks ON tasks.id = polls.task_pk"  # noqa: S608
        f" WHERE polls.next_poll_at <= ? AND tasks.platform NOT IN ({skip})"
        " ORDER BY polls.next_poll_at, polls.task_pk LIMIT ?"
    )


@functools.cache
def _still_due_sqlite(count: int, skipped: int) -> str:
    """_DUE_COLUMNS of those of ``count`` ids still due and of none of ``skipped`` platforms
    (an id may have been reused meanwhile): (due by, platform, ..., id, id, ...)."""
    marks, skip = ", ".join("?" * count), ", ".join("?" * skipped)
    # Only placeholders and column names go into the text.
    return (
        f"SELECT {_DUE_SELECT} FROM polls JOIN tasks ON tasks.id = polls.task_pk"  # noqa: S608
        f" WHERE polls.next_poll_at <= ? AND tasks.platform NOT IN ({skip})"
        f" AND polls.task_pk IN ({marks})"
    )


@functools.cache
def _lease_sqlite(count: int) -> str:
    """A claim's lease for ``count`` ids: (end of the lease, id, id, ...)."""
    marks = ", ".join("?" * count)
    # Only placeholders go into the text.
    return f"UPDATE polls SET next_poll_at = ? WHERE task_pk IN ({marks})"  # noqa: S608


@functools.cache
def _replan_sqlite(count: int) -> str:
    """_REPLAN_SQLITE for ``count`` (next poll, id, lease end) rows in one statement."""
    rows = ", ".join(["(?, ?, ?)"] * count)
    return (
        "UPDATE polls SET next_poll_at = r.column1"  # noqa: S608 - placeholders only
        f" FROM (VALUES {rows}) AS r"
        " WHERE polls.task_pk = r.column2 AND polls.next_poll_at = r.column3"
    )


def _task_pk(update: records.TaskUpdate) -> int:
    return update.task.pk


def _by_task(updates: Sequence[records.TaskUpdate]) -> list[records.TaskUpdate]:
    """``updates`` with those of one task next to each other, in their order (the first
    one's place): a refused row elsewhere must not split them into two writes, as the first
    write moves the task's next poll and the claim the second holds would seem lost."""
    first: dict[int, int] = {}
    for position, update in enumerate(updates):
        first.setdefault(update.task.pk, position)
    return sorted(updates, key=lambda u: first[u.task.pk])


def _history_rows(update: records.TaskUpdate, now: datetime) -> list[dict[str, Any]]:
    """The transitions row of a written update that moved its task (none otherwise)."""
    change = update.change
    if change is None or not change.moved:
        return []
    return [
        {
            "task_pk": update.task.pk,
            "from_status": change.before.status.value,
            "to_status": change.after.status.value,
            "upstream_status": change.after.upstream_status,
            "progress": change.after.progress,
            "at": now,
        }
    ]


def _outbox_rows(update: records.TaskUpdate, now: datetime, epoch: float) -> list[dict[str, Any]]:
    """The deliveries rows of a written update's events, due at once."""
    task = update.task
    return [
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
    ]


def _split_replanned(
    updates: Sequence[records.TaskUpdate],
) -> tuple[list[records.Replan], list[records.TaskUpdate]]:
    """Replans of the updates that only move a claimed task's next poll (and whose task the
    call names once), and the other updates, those of one task next to each other
    (``_by_task``)."""
    # A drain's call names each task once; only when one is named twice are names counted.
    once = len({u.task.pk for u in updates}) == len(updates)
    seen: dict[int, int] = {}
    if not once:
        for update in updates:
            seen[update.task.pk] = seen.get(update.task.pk, 0) + 1
    replanned: list[records.Replan] = []
    rest: list[records.TaskUpdate] = []
    for update in updates:
        task = update.task
        if (
            update.change is None
            and not update.outbox
            and update.missing_since is KEEP
            and isinstance(update.next_poll_at, float)
            and task.lease_until is not None
            and (once or seen[task.pk] == 1)
        ):
            replanned.append(records.Replan(update.next_poll_at, task.pk, task.lease_until))
        else:
            rest.append(update)
    return replanned, (rest if once else _by_task(rest))


def _update_tasks(conn: sa.Connection, groups: dict[tuple[str, ...], list[dict[str, Any]]]) -> None:
    # The SET clause comes from each group's keys; "pk_" only feeds the WHERE.
    if conn.dialect.name != "sqlite":
        for rows in groups.values():
            conn.execute(tasks.update().where(tasks.c.id == sa.bindparam("pk_")), rows)
        return
    # SQLite: straight to the driver, each value through its column's own bind processor (the
    # stored text is SQLAlchemy's). Its per-row parameter handling cost more than the UPDATE
    # itself, and a task whose progress moves is one row per poll.
    for columns, rows in groups.items():
        params = _driver_rows(conn.dialect, tasks, columns, rows, extra="pk_")
        conn.exec_driver_sql(_update_sqlite(columns), params)


def _insert_rows(conn: sa.Connection, table: sa.Table, rows: list[dict[str, Any]]) -> None:
    """Insert ``rows`` (each with the same keys) into ``table``; on SQLite straight to the
    driver, as _update_tasks writes (a change's history row and its outbox rows)."""
    if not rows:
        return
    columns = tuple(rows[0])
    # SQLAlchemy fills in a column's default where a row leaves it out; the driver would not.
    defaulted = any(c.default is not None and c.key not in rows[0] for c in table.c)
    if conn.dialect.name != "sqlite" or defaulted:
        conn.execute(table.insert(), rows)
        return
    names = tuple(table.c[key].name for key in columns)
    conn.exec_driver_sql(
        _insert_sqlite(table.name, names), _driver_rows(conn.dialect, table, columns, rows)
    )


def _driver_rows(
    dialect: sa.Dialect,
    table: sa.Table,
    columns: tuple[str, ...],
    rows: list[dict[str, Any]],
    extra: str | None = None,
) -> list[tuple[Any, ...]]:
    """``rows`` as the driver's parameters: ``columns`` in order, each value as SQLAlchemy
    hands it to the driver (then ``extra``'s value as it is)."""
    processors = [(name, _reusing(_bind_processor(dialect, table.c[name]))) for name in columns]
    values = [tuple(row[n] if p is None else p(row[n]) for n, p in processors) for row in rows]
    if extra is not None:
        values = [(*value, row[extra]) for value, row in zip(values, rows, strict=True)]
    return values


def _bind_processor(dialect: sa.Dialect, column: sa.Column[Any]) -> Callable[[Any], Any] | None:
    """What SQLAlchemy does to a value of ``column`` before the driver gets it: the dialect's
    own form of the column's type (a bare DateTime's would hand sqlite3 a datetime, which it
    stores without microseconds when there are none); for tasks.result, the same JSON
    written faster."""
    kind = column.type
    processor: Callable[[Any], Any] | None = kind.dialect_impl(dialect).bind_processor(dialect)
    if column is tasks.c.result and processor is not None:
        return functools.partial(_result_text, processor)
    return processor


#: no value of any column: what _reusing has seen before its first call
_UNSET: Final = object()


def _reusing(processor: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """``processor``, giving its last result again for the very same value: every row of
    one record() call carries the same ``now`` (updated_at, finished_at), whose text is
    made once, not once a row."""
    if processor is None:
        return None
    last: list[Any] = [_UNSET, None]

    def process(value: Any) -> Any:
        if value is not last[0]:
            last[0], last[1] = value, processor(value)
        return last[1]

    return process


def _result_text(processor: Callable[[Any], Any], value: Any) -> Any:
    """The JSON text of a task's ``result`` (the upstream item, written at every poll that
    moves the task's progress) by orjson, five to ten times faster than the json module
    SQLAlchemy uses; anything orjson cannot write as that would (an integer past 64 bits, a
    lone surrogate, None as JSON null) goes to SQLAlchemy's ``processor``. Only the spacing
    differs, and no query reads this column's text."""
    if isinstance(value, dict):
        with contextlib.suppress(orjson.JSONEncodeError):
            return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    return processor(value)


@functools.cache
def _insert_sqlite(table: str, columns: tuple[str, ...]) -> str:
    """An INSERT of ``columns`` (names, in that order) into ``table``: for _insert_rows."""
    marks = ", ".join("?" * len(columns))
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})"  # noqa: S608 - names


@functools.cache
def _update_sqlite(columns: tuple[str, ...]) -> str:
    """A tasks UPDATE setting ``columns`` (in that order), then the id: for _update_tasks."""
    sets = ", ".join(f"{tasks.c[name].name} = ?" for name in columns)
    return f"UPDATE tasks SET {sets} WHERE id = ?"  # noqa: S608 - column names and placeholders


def _update_values(
    update: records.TaskUpdate, now: datetime, epoch: float
) -> tuple[dict[str, Any], float | Keep | None]:
    """The tasks columns ``update`` sets, and its task's next poll (a polls row: None ends
    the polls of a final task, KEEP leaves it)."""
    values: dict[str, Any] = {}
    next_poll: float | Keep | None = update.next_poll_at
    change = update.change
    if change is not None:
        after = change.after
        if after.status is not update.task.snapshot.status:
            # Otherwise the row has that status already (the compare-and-set checks it), and
            # leaving it out of the SET spares the status index and the count trigger.
            values["status"] = after.status.value
        values.update(
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
            values["missing_since"] = None
            next_poll = None
    if update.missing_since is not KEEP and "missing_since" not in values:
        values["missing_since"] = update.missing_since
    return values, next_poll
