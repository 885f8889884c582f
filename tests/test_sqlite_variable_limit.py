"""The store on a SQLite build that takes at most 999 bound parameters per statement.

SQLite before 3.32 (Ubuntu 20.04, Debian 10, RHEL 8 and the Pythons linked against them)
refuses a statement with more than 999 parameters. Every store call that names thousands of
rows must split them below that, or a large claim, registration or prune fails outright. The
limit is set on each connection (``sqlite3.Connection.setlimit``), so this runs on any SQLite.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa

from tracker import retention
from tracker.api.limits import MAX_PAGE
from tracker.config import RetentionSettings
from tracker.retry import DeliveryState
from tracker.status import Change, Snapshot, TaskStatus
from tracker.store import AttemptResult, OutboxEntry, Registration, SqlStore, TaskUpdate
from tracker.store.sql import tasks

T0 = datetime(2026, 1, 1, tzinfo=UTC)
#: rows per call: more than two of the old limit's worth
MANY = 2500
OLD_LIMIT = 999


@pytest.fixture(name="old_sqlite")
def _old_sqlite(sqlite_url: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()

    def limit(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, OLD_LIMIT)

    sa.event.listen(store.engine, "connect", limit)
    store.engine.dispose()  # connections opened before the listener go
    yield store
    store.close()


def test_the_fixture_really_refuses_a_thousand_parameters(old_sqlite: SqlStore) -> None:
    """The check behind every other test here: 1,000 parameters fail on these connections."""
    marks = ", ".join("?" * 1000)
    with old_sqlite.engine.connect() as conn, pytest.raises(sa.exc.OperationalError):
        conn.exec_driver_sql(f"SELECT 1 WHERE 1 IN ({marks})", tuple(range(1000)))


def test_a_claim_of_thousands_that_skips_a_platform_takes_them_in_due_order(
    old_sqlite: SqlStore,
) -> None:
    """A claim leaving a busy platform's tasks out reads the ids first, then takes those
    still due in chunks below the limit: all 2,500, most overdue first, none of the other."""
    store = old_sqlite
    store.register(Registration(platform="suno", ids=[f"s{i}" for i in range(10)]), T0)
    ids = [f"t{i:05d}" for i in range(MANY)]
    for number, task_id in enumerate(ids):  # the last id (and row) is the most overdue
        at = T0 + timedelta(seconds=MANY - number)
        store.register(Registration(platform="luma", ids=[task_id]), at)

    due = store.claim_due(T0 + timedelta(hours=1), MANY + 10, lease=30.0, skip=["suno"])

    assert [t.task_id for t in due] == list(reversed(ids))
    assert store.claim_due(T0 + timedelta(hours=1), MANY, lease=30.0, skip=["suno"]) == []


def _entry(number: int) -> OutboxEntry:
    return OutboxEntry(
        webhook_id=f"msg_{number}",
        event_type="task.started",
        payload=b'{"n": 1}',
        url="http://127.0.0.1:9/hook",
        endpoint=None,
        guarded=False,
    )


def test_thousands_of_tasks_go_from_registration_to_delivery_to_prune(
    old_sqlite: SqlStore,
) -> None:
    """Register, claim, renew, record (with events), re-register, claim and finish the
    deliveries, then prune: each call over 2,500 rows at once."""
    store = old_sqlite
    ids = [f"t{i:05d}" for i in range(MANY)]
    created, existing = store.register(Registration(platform="luma", ids=ids), T0)
    assert (len(created), existing) == (MANY, [])
    assert store.register(Registration(platform="luma", ids=ids), T0) == ([], ids)

    due = store.claim_due(T0, MANY, lease=30.0)
    assert len(due) == MANY
    assert due[0].claim is not None
    assert store.renew_claim(due[0].claim, T0.timestamp() + 60.0) == MANY

    moves = []
    for number, task in enumerate(due):
        after = Snapshot(TaskStatus.COMPLETED, "SUCCESS", 100, "100%")
        done = Change(task.snapshot, after, {"url": "u"}, ())
        moves.append(TaskUpdate(task, done, (_entry(number),)))
    assert store.record(moves, T0) == MANY

    jobs = store.claim_deliveries(T0, MANY, lease=30.0)
    assert len(jobs) == MANY
    lease_end = T0.timestamp() + 30.0
    assert {j.lease_until for j in jobs} == {lease_end}
    renewed = store.extend_claims(dict.fromkeys((j.pk for j in jobs), lease_end), lease_end + 30)
    assert renewed == {j.pk for j in jobs}
    store.finish_attempts(
        [
            AttemptResult(
                dataclasses.replace(job, lease_until=lease_end + 30),
                T0,
                200,
                None,
                1.0,
                "ok",
                DeliveryState.DELIVERED,
                None,
            )
            for job in jobs
        ]
    )
    assert store.stats().deliveries.get("delivered") == MANY

    later = T0 + timedelta(days=400)
    pruned = retention.run(store.engine, RetentionSettings(batch_size=MANY), later)
    assert pruned.tasks == MANY
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tasks)).scalar() == 0


def test_thousands_of_dead_deliveries_are_listed_and_recovered(old_sqlite: SqlStore) -> None:
    """The API's largest page of deliveries (1,000, each with its attempt log) reads, and
    `tracker deliveries recover` after a long outage puts 2,500 dead deliveries back to
    pending in one call, every one of them."""
    store = old_sqlite
    ids = [f"d{i:05d}" for i in range(MANY)]
    store.register(Registration(platform="luma", ids=ids), T0)
    after = Snapshot(TaskStatus.COMPLETED, "SUCCESS", 100, "100%")
    store.record(
        [
            TaskUpdate(task, Change(task.snapshot, after, {}, ()), (_entry(number),))
            for number, task in enumerate(store.claim_due(T0, MANY, lease=30.0))
        ],
        T0,
    )
    jobs = store.claim_deliveries(T0, MANY, lease=30.0)
    store.finish_attempts(
        [AttemptResult(job, T0, 500, None, 1.0, "down", DeliveryState.DEAD, None) for job in jobs]
    )
    assert store.stats().deliveries.get("dead") == MANY
    page, _ = store.list_deliveries(limit=MAX_PAGE)
    assert len(page) == MAX_PAGE
    assert all(len(delivery.log) == 1 for delivery in page)

    requeued = store.requeue(T0 + timedelta(hours=1), since=T0 - timedelta(days=1))

    assert sorted(requeued) == sorted(job.pk for job in jobs)
    assert store.stats().deliveries == {"pending": MANY}
