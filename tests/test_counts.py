"""The counts behind /metrics and the status line: kept by triggers in the writing transaction,
equal to a full count of the tables after any mix of writes, folded without losing a change.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from structlog.testing import capture_logs
from test_store import (
    at,
    change,
    claim,
    claim_jobs,
    entry,
    outcome,
    queue_events,
    register,
)

from tracker.status import TaskStatus
from tracker.store import SqlStore, TaskUpdate
from tracker.store.counts import counts as counts_table
from tracker.store.sql import deliveries, tasks


def counted_the_slow_way(store: SqlStore) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    """Tasks by (platform, status) and deliveries by state, by reading every row."""
    with store.engine.connect() as conn:
        by_status = {
            (r.platform, r.status): r.n
            for r in conn.execute(
                sa.select(tasks.c.platform, tasks.c.status, sa.func.count().label("n")).group_by(
                    tasks.c.platform, tasks.c.status
                )
            )
        }
        by_state = {
            r.state: r.n
            for r in conn.execute(
                sa.select(deliveries.c.state, sa.func.count().label("n")).group_by(
                    deliveries.c.state
                )
            )
        }
    return by_status, by_state


def figures(store: SqlStore) -> tuple[dict[tuple[str, str], int], dict[str, int]]:
    stats = store.stats()
    return dict(stats.tasks), dict(stats.deliveries)


def count_rows(store: SqlStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(counts_table)).scalar_one())


def test_counts_follow_every_kind_of_write(store: SqlStore) -> None:
    """Registration, moves to a final status, delivery outcomes, re-queues, removals and a
    delete made outside tracker's code all show in stats() exactly as a full count shows them.
    """
    queue_events(store, "a", "b", "c", per_task=2)
    register(store, "s1", "s2", platform="suno")
    assert counted_the_slow_way(store) == figures(store)

    due = {t.task_id: t for t in claim(store, at(100))}
    store.record(
        [
            TaskUpdate(due["a"], change(due["a"], TaskStatus.COMPLETED), (entry(),)),
            TaskUpdate(due["s1"], change(due["s1"], TaskStatus.FAILED)),
        ],
        at(100),
    )
    jobs = claim_jobs(store, at(100))
    store.finish_attempts(
        [outcome(jobs[0], "delivered", at(101)), outcome(jobs[1], "dead", at(101))]
    )
    assert counted_the_slow_way(store) == figures(store)

    assert 1 == len(store.requeue(at(102), pk=jobs[1].pk))
    assert store.remove("luma", "b")
    assert 0 < store.compact_counts()
    with store.engine.begin() as conn:  # an operator's own SQL is counted too
        conn.execute(tasks.delete().where(tasks.c.task_id == "s2"))
    assert counted_the_slow_way(store) == figures(store)
    assert {("luma", "completed"): 1, ("luma", "in_progress"): 1, ("suno", "failed"): 1} == (
        figures(store)[0]
    )


def test_compaction_leaves_one_row_per_count(store: SqlStore) -> None:
    """Folding keeps the figures and shrinks the table to one row per non-zero count."""
    queue_events(store, "a", "b", "c")
    assert store.remove("luma", "c")
    before = figures(store)

    store.compact_counts()

    assert before == figures(store)
    assert len(before[0]) + len(before[1]) == count_rows(store)
    rows = count_rows(store)
    store.compact_counts()
    assert (before, rows) == (figures(store), count_rows(store))


def test_a_rolled_back_write_leaves_the_counts_as_they_were(store: SqlStore) -> None:
    """Counts commit with the rows they count: a task whose write is refused changes neither."""
    queue_events(store, "a")
    register(store, "b")
    before = figures(store)
    (b,) = [t for t in claim(store, at(100)) if t.task_id == "b"]
    taken = entry()  # a webhook id already in the outbox makes the task's write fail
    store.record([TaskUpdate(b, change(b, TaskStatus.IN_PROGRESS), (taken,))], at(100))
    (b,) = [t for t in claim(store, at(200)) if t.task_id == "b"]
    after_first = figures(store)

    with capture_logs() as logs:
        written = store.record([TaskUpdate(b, change(b, TaskStatus.COMPLETED), (taken,))], at(200))

    assert 0 == written
    assert ["b"] == [e["task_id"] for e in logs if e["event"] == "task_write_refused"]

    assert before != after_first
    assert after_first == figures(store) == counted_the_slow_way(store)


@pytest.mark.postgres
def test_folding_while_other_sessions_write_loses_no_change(make_pg_url: Any) -> None:
    """Registrations and moves from several sessions, folded repeatedly from two others at
    the same time: the figures still equal a full count.
    """
    url = make_pg_url()
    writers = [SqlStore.from_url(url) for _ in range(3)]
    folders = [SqlStore.from_url(url) for _ in range(2)]
    writers[0].create_schema()
    done = threading.Event()
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for n in range(40):
                register(writers[i], *(f"w{i}-{n}-{k}" for k in range(5)), now=at(n))
                due = claim(writers[i], at(n + 1000), limit=3)
                writers[i].record(
                    [TaskUpdate(t, change(t, TaskStatus.IN_PROGRESS)) for t in due], at(n)
                )
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    def fold(store: SqlStore) -> None:
        try:
            while not done.is_set():
                store.compact_counts()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    folding = [threading.Thread(target=fold, args=(s,)) for s in folders]
    writing = [threading.Thread(target=write, args=(i,)) for i in range(len(writers))]
    for t in folding + writing:
        t.start()
    for t in writing:
        t.join(120)
    done.set()
    for t in folding:
        t.join(30)
    try:
        assert [] == errors
        assert counted_the_slow_way(writers[0]) == figures(writers[0])
        assert 600 == sum(figures(writers[0])[0].values())
    finally:
        for store in writers + folders:
            store.close()
