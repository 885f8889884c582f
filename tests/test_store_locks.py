"""Lock order between the store's writers on PostgreSQL, and claims a move must leave alone or
must move: removal against pruning, pruning against re-queues, pull-in against another
daemon's claims, and deliveries held back across a clock step back."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
import sqlalchemy as sa
from test_store import (
    T0,
    _db_url,  # noqa: F401 - the fixtures test_store's tests run on
    _pg_stores,  # noqa: F401
    _pg_url,  # noqa: F401
    _shared_pg_url,  # noqa: F401
    at,
    change,
    claim_jobs,
    entry,
    outcome,
    queue_events,
    register,
    wait_for_lock_waiters,
)

from tracker.delivery.outbox import HOLD_MARGIN
from tracker.delivery.outbox import LEASE as DELIVERY_LEASE
from tracker.status import TaskStatus
from tracker.store import SqlStore, TaskUpdate
from tracker.store import prune as prune_module
from tracker.store.base import attempts as attempts_table
from tracker.store.polling import HELD_BEYOND
from tracker.store.prune import Cutoffs, Kind
from tracker.store.sql import deliveries as deliveries_table
from tracker.store.sql import polls as polls_table

#: every delivered or dead delivery and every final task is due to go
ALL_DUE = Cutoffs(delivered=at(10**6), dead=at(10**6), tasks=at(10**6))


def lock_delivery(conn: sa.Connection, pk: int) -> None:
    query = sa.select(deliveries_table.c.id).where(deliveries_table.c.id == pk)
    conn.execute(query.with_for_update()).all()


def touch_in_turn(store: SqlStore, *pks: int) -> None:
    """Write these deliveries again, in this order: their rows then lie in that order at the
    end of the table, the order a sequential scan meets them in."""
    with store.engine.begin() as conn:
        for pk in pks:
            conn.execute(
                deliveries_table.update()
                .where(deliveries_table.c.id == pk)
                .values(attempts=deliveries_table.c.attempts)
            )


def done_or_waiting(conn: sa.Connection, work: Future[Any], count: int) -> None:
    """Return once ``work`` is done or ``count`` sessions wait for a lock (within 5 s)."""
    deadline = time.monotonic() + 5
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while not work.done() and time.monotonic() < deadline:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        if conn.exec_driver_sql(query).scalar_one() >= count:
            return
        time.sleep(0.01)


@pytest.mark.postgres
def test_removing_a_task_waits_for_a_prune_of_its_deliveries_instead_of_deadlocking(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """A removal locks the task's deliveries, in id order, before it deletes their attempts,
    as a prune locks deliveries before it deletes theirs. (It deleted the attempts first:
    waiting then for a delivery another session held, it held the attempts a prune of the
    task's other delivery waited for, and then wanted that delivery: a deadlock.)"""
    first, second = pg_stores
    queue_events(first, "x", per_task=2)
    (dead_job,) = claim_jobs(first, T0)  # a task's events are sent in turn
    first.finish_attempts([outcome(dead_job, "dead", at(1), status_code=410)])
    (delivered_job,) = claim_jobs(first, at(1))
    first.finish_attempts([outcome(delivered_job, "delivered", at(2))])
    assert dead_job.pk < delivered_job.pk
    touch_in_turn(first, dead_job.pk, delivered_job.pk)
    with second.engine.connect() as other, ThreadPoolExecutor(2) as pool:
        with other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            lock_delivery(other, dead_job.pk)  # any session, briefly
            removing = pool.submit(first.remove, "luma", "x")
            wait_for_lock_waiters(other, 1)
            pruning = pool.submit(prune_module.batch, second.engine, Kind.DELIVERED, ALL_DUE, 10)
            done_or_waiting(other, pruning, 2)
        removed = removing.result(timeout=10)  # a deadlock fails the removal or the prune
        pruning.result(timeout=10)

    assert removed is True
    assert first.get("luma", "x") is None
    with first.engine.connect() as conn:
        assert [] == conn.execute(sa.select(deliveries_table.c.id)).all()
        assert [] == conn.execute(sa.select(attempts_table.c.id)).all()


@pytest.mark.postgres
def test_pruning_final_tasks_waits_for_a_requeue_instead_of_deadlocking(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """A prune of final tasks locks their deliveries in id order, as a re-queue does: a
    re-queue that took the first goes on to the next and commits, and the prune then finds
    the tasks' deliveries pending and keeps the tasks. (It locked them in the order the scan
    met them, the later id first here: each then waited for the other.)"""
    first, second = pg_stores
    register(first, "a", "b")
    tasks = {t.task_id: t for t in first.claim_due(T0, 10, lease=10)}
    for task_id in ("b", "a"):  # b's delivery gets the lower id
        task = tasks[task_id]
        first.record([TaskUpdate(task, change(task, TaskStatus.COMPLETED), (entry(),))], T0)
    jobs = {job.task_id: job for job in claim_jobs(first, T0)}
    first.finish_attempts([outcome(j, "dead", at(1), status_code=410) for j in jobs.values()])
    low, high = jobs["b"].pk, jobs["a"].pk
    assert low < high
    touch_in_turn(first, high, low)  # a scan meets the higher id first, as the index does

    with second.engine.connect() as other, ThreadPoolExecutor(2) as pool:
        with other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            lock_delivery(other, low)
            requeuing = pool.submit(first.requeue, at(2))
            wait_for_lock_waiters(other, 1)
            pruning = pool.submit(prune_module.batch, second.engine, Kind.TASKS, ALL_DUE, 10)
            wait_for_lock_waiters(other, 2)
        requeued = requeuing.result(timeout=10)  # a deadlock fails the re-queue or the prune
        pruned, _ = pruning.result(timeout=10)

    assert [low, high] == requeued
    assert 0 == pruned.tasks
    states = {d.task_id: d.state for d in first.list_deliveries()[0]}
    assert {"a": "pending", "b": "pending"} == states


@pytest.mark.postgres
def test_pull_in_leaves_another_daemons_claims_alone(pg_stores: tuple[SqlStore, SqlStore]) -> None:
    """A pull-in to a shorter max_interval moves the polls planned later, not a next poll
    within the longest lease of now: that may be another daemon's claim token, and moved,
    that daemon's answer would be dropped (and the task polled again at once)."""
    first, second = pg_stores
    register(first, "a", "b")
    (task,) = first.claim_due(T0, 1, lease=20)  # the other daemon's claim on a
    assert "a" == task.task_id
    with first.engine.begin() as conn:
        conn.execute(
            polls_table.update()
            .where(polls_table.c.task_pk != task.pk)
            .values(next_poll_at=at(600).timestamp())
        )

    second.pull_in(at(10), claims_within=30, now=T0)

    with first.engine.connect() as conn:
        planned = dict(conn.execute(sa.select(polls_table)).all())
    assert [10.0, 20.0] == sorted(round(v - T0.timestamp(), 3) for v in planned.values())
    assert 1 == first.record([TaskUpdate(task, change(task, TaskStatus.IN_PROGRESS))], at(5))


def test_a_step_back_moves_deliveries_held_for_later_not_live_leases(store: SqlStore) -> None:
    """A delivery left for later is held back by its claim (outbox.py: about 38 s). After the
    clock stepped back an hour, shift_plans moves such a claim back by the step, so the
    delivery is sent within its hold, not an hour late; a claim ending within HELD_BEYOND of
    now (a live lease, perhaps another daemon's token) stays."""
    assert DELIVERY_LEASE < HELD_BEYOND <= HOLD_MARGIN
    queue_events(store, "held", "leased")
    jobs = {j.task_id: j for j in store.claim_deliveries(at(3600), 10, lease=DELIVERY_LEASE)}
    held, leased = jobs["held"], jobs["leased"]
    # Before the step: "held" left for later. After it: "leased" claimed by a daemon's clock.
    assert {held.pk} == store.extend_claims({held.pk: held.lease_until}, at(3638).timestamp())
    assert {leased.pk} == store.extend_claims({leased.pk: leased.lease_until}, at(5).timestamp())

    store.shift_plans(3600, T0, claims_within=30)

    with store.engine.connect() as conn:
        query = sa.select(deliveries_table.c.id, deliveries_table.c.claimed_until)
        claims = dict(conn.execute(query).all())
    assert {held.pk: 38.0, leased.pk: 5.0} == {
        pk: round(until - T0.timestamp(), 3) for pk, until in claims.items()
    }
    assert {"held", "leased"} == {j.task_id for j in store.claim_deliveries(at(39), 10, lease=6)}
