"""Retention: what goes after how long, what always stays, batches, the CLI and the daemon job."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import base_config, merge, toml_text
from test_counts import counted_the_slow_way, figures
from test_store import change, claim, claim_jobs, entry, outcome, register

from tracker import cli, config, retention
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.config import RetentionSettings
from tracker.status import TaskStatus
from tracker.store import SqlStore, TaskUpdate
from tracker.store import prune as prune_module
from tracker.store.prune import Kind, Pruned
from tracker.store.sql import attempts, deliveries, tasks, transitions
from tracker.testing.simulator import SimulatedRelay

T0 = datetime(2026, 1, 1, tzinfo=UTC)
NOW = T0 + timedelta(days=100)
DEFAULTS = RetentionSettings()


def day(n: float) -> datetime:
    return T0 + timedelta(days=n)


def finish(
    store: SqlStore,
    task_id: str,
    *,
    finished: float,
    delivery: str | None,
    delivered: float | None = None,
    status: TaskStatus = TaskStatus.COMPLETED,
) -> None:
    """A task that reached ``status`` on day ``finished`` with one event, whose delivery then
    ended ``delivery`` ("delivered", "dead", or "pending" still) on day ``delivered``.
    """
    register(store, task_id, now=day(finished))
    (task,) = [t for t in claim(store, day(finished), limit=1000) if t.task_id == task_id]
    store.record([TaskUpdate(task, change(task, status), (entry(),))], day(finished))
    if delivery in ("delivered", "dead"):
        assert delivered is not None
        (job,) = [j for j in claim_jobs(store, day(finished)) if j.task_id == task_id]
        store.finish_attempts([outcome(job, delivery, day(delivered))])


def aged(store: SqlStore) -> None:
    """Rows of every age and state around the default keep times, seen from NOW (day 100)."""
    finish(store, "done-old", finished=0, delivery="delivered", delivered=0)
    finish(store, "dead-old", finished=0, delivery="dead", delivered=1)
    finish(store, "dead-recent", finished=20, delivery="dead", delivered=20)
    # Finished long ago, but its delivery died recently (long retries): both stay.
    finish(store, "done-old-died-recently", finished=0, delivery="dead", delivered=50)
    # The receiver is still down: the pending delivery keeps its task.
    finish(store, "done-old-pending", finished=0, delivery="pending")
    finish(store, "done-mid", finished=40, delivery="delivered", delivered=40)
    finish(store, "done-recent", finished=80, delivery="delivered", delivered=80)
    failed = TaskStatus.FAILED
    finish(store, "failed-old", finished=5, delivery="delivered", delivered=5, status=failed)
    canceled = TaskStatus.CANCELED
    finish(store, "canceled-old", finished=5, delivery="delivered", delivered=5, status=canceled)
    finish(
        store, "canceled-recent", finished=80, delivery="delivered", delivered=80, status=canceled
    )
    register(store, "active-old", now=day(0))


def remaining(store: SqlStore) -> tuple[list[str], list[str]]:
    """Task ids left, and the task ids of the deliveries left."""
    with store.engine.connect() as conn:
        left = sorted(conn.execute(sa.select(tasks.c.task_id)).scalars())
        outbox = sorted(conn.execute(sa.select(deliveries.c.task_id)).scalars())
    return left, outbox


def orphans(store: SqlStore) -> int:
    """Attempts or transitions whose parent row is gone (none may be left behind)."""
    with store.engine.connect() as conn:
        lost_attempts = conn.execute(
            sa.select(sa.func.count())
            .select_from(attempts)
            .where(~attempts.c.delivery_pk.in_(sa.select(deliveries.c.id)))
        ).scalar_one()
        lost_history = conn.execute(
            sa.select(sa.func.count())
            .select_from(transitions)
            .where(~transitions.c.task_pk.in_(sa.select(tasks.c.id)))
        ).scalar_one()
    return int(lost_attempts) + int(lost_history)


def test_defaults_prune_what_is_past_its_keep_time_and_nothing_else(store: SqlStore) -> None:
    """Delivered after 30 days, dead after 90, final tasks (completed, failed, canceled) after
    90 once their deliveries go too; pending deliveries, younger rows and active tasks stay.
    The dry run counts exactly what the run then deletes, and the counts follow.
    """
    aged(store)

    expected = retention.preview(store.engine, DEFAULTS, NOW)
    pruned = retention.run(store.engine, DEFAULTS, NOW)

    assert Pruned(deliveries=5, attempts=5, tasks=4, transitions=4) == pruned == expected
    kept_tasks = [
        "active-old",
        "canceled-recent",
        "dead-recent",
        "done-mid",
        "done-old-died-recently",
        "done-old-pending",
        "done-recent",
    ]
    kept_deliveries = [
        "canceled-recent",
        "dead-recent",
        "done-old-died-recently",
        "done-old-pending",
        "done-recent",
    ]
    assert (kept_tasks, kept_deliveries) == remaining(store)
    assert 0 == orphans(store)
    assert counted_the_slow_way(store) == figures(store)
    assert Pruned() == retention.run(store.engine, DEFAULTS, NOW)  # nothing is left to go


def test_zero_keeps_each_kind_forever(store: SqlStore) -> None:
    """0 days keeps that kind of row forever; with all three at 0 nothing is deleted."""
    aged(store)
    keep_all = RetentionSettings(delivered_days=0, dead_days=0, final_tasks_days=0)
    keep_delivered = RetentionSettings(delivered_days=0)

    assert Pruned() == retention.preview(store.engine, keep_all, NOW)
    assert Pruned() == retention.run(store.engine, keep_all, NOW)
    pruned = retention.run(store.engine, keep_delivered, NOW)

    # Only the dead-old delivery and its task may go: delivered rows keep their tasks.
    assert Pruned(deliveries=1, attempts=1, tasks=1, transitions=1) == pruned
    assert "dead-old" not in remaining(store)[0]
    assert "done-old" in remaining(store)[0]


def test_a_batch_takes_at_most_its_size_and_says_whether_more_remain(store: SqlStore) -> None:
    """Each batch is one short transaction of at most batch_size rows of its kind."""
    for n in range(5):
        finish(store, f"d{n}", finished=0, delivery="delivered", delivered=0)
    limits = retention.cutoffs(DEFAULTS, NOW)

    first, more = prune_module.batch(store.engine, Kind.DELIVERED, limits, 2)
    assert (2, True) == (first.deliveries, more)
    sizes = [prune_module.batch(store.engine, Kind.DELIVERED, limits, 2) for _ in range(2)]
    assert [(2, True), (1, False)] == [(p.deliveries, more) for p, more in sizes]
    assert (0, False) == (
        prune_module.batch(store.engine, Kind.DELIVERED, limits, 2)[0].deliveries,
        False,
    )


@pytest.mark.postgres
def test_two_daemons_pruning_at_once_share_the_work(make_pg_url: Callable[[], str]) -> None:
    """Concurrent runs on one PostgreSQL database skip each other's locked rows: no error,
    nothing deleted twice, everything due gone.
    """
    url = make_pg_url()
    stores = [SqlStore.from_url(url) for _ in range(2)]
    stores[0].create_schema()
    for n in range(30):
        finish(stores[0], f"t{n}", finished=0, delivery="delivered", delivered=0)
    small = RetentionSettings(batch_size=3)
    start = threading.Barrier(2)
    results: list[Pruned] = []
    errors: list[BaseException] = []

    def run(store: SqlStore) -> None:
        start.wait()
        try:
            results.append(retention.run(store.engine, small, NOW))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert [] == errors
        assert Pruned(deliveries=30, attempts=30, tasks=30, transitions=30) == sum(
            results, Pruned()
        )
        assert ([], []) == remaining(stores[0])
    finally:
        for store in stores:
            store.close()


def test_retention_settings_defaults_and_errors() -> None:
    """[retention] defaults to 30/90/90 days; negative days are refused by key."""
    document = base_config("http://127.0.0.1:9", None, "sqlite:///x.db")
    settings = config.parse(document, environ={}).retention

    assert (30, 90, 90, 3600, 500) == (
        settings.delivered_days,
        settings.dead_days,
        settings.final_tasks_days,
        settings.interval,
        settings.batch_size,
    )
    with pytest.raises(config.ConfigError, match=r"retention\.dead_days"):
        config.parse(merge(document, {"retention": {"dead_days": -1}}), environ={})


def test_db_prune_dry_run_counts_and_the_real_run_deletes(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tracker db prune --dry-run` reports what would go and deletes nothing; without
    --dry-run the same rows go. Ages are measured from the real clock.
    """
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    ago = (datetime.now(UTC) - day(100)).total_seconds() / 86400
    finish(store, "old", finished=ago, delivery="delivered", delivered=ago)
    finish(store, "new", finished=ago + 99.9, delivery="delivered", delivered=ago + 99.9)
    path = tmp_path / "config.toml"
    path.write_text(toml_text(base_config("http://127.0.0.1:9", None, sqlite_url)))
    c = ["--config", str(path), "--json"]

    def run(*argv: str) -> tuple[int, Any]:
        code = cli.main(list(argv))
        return code, json.loads(capsys.readouterr().out)

    would = {"dry_run": True, "deliveries": 1, "attempts": 1, "tasks": 1, "transitions": 1}
    assert (0, would) == run("db", "prune", "--dry-run", *c)
    assert (["new", "old"], ["new", "old"]) == remaining(store)
    assert (0, {**would, "dry_run": False}) == run("db", "prune", *c)
    assert (["new"], ["new"]) == remaining(store)
    store.close()


async def test_the_daemon_prunes_on_start_and_then_every_interval(
    relay: SimulatedRelay, sqlite_url: str
) -> None:
    """The retention job runs at start against the daemon's clock, in batches."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    for n in range(7):
        finish(store, f"old-{n}", finished=0, delivery="delivered", delivered=0)
    finish(store, "recent", finished=95, delivery="delivered", delivered=95)
    store.close()
    document = merge(
        base_config(relay.base_url, None, sqlite_url), {"retention": {"batch_size": 2}}
    )
    daemon = Daemon(config.parse(document, environ={}), clock=FakeClock(NOW))
    try:
        await daemon.start()
        deadline = asyncio.get_running_loop().time() + 10
        while remaining(daemon.parts.store)[0] != ["recent"]:
            assert asyncio.get_running_loop().time() < deadline, remaining(daemon.parts.store)
            await asyncio.sleep(0.05)
        job = daemon.parts.jobs.scheduler.get_job("retention")
        assert job is not None
        assert timedelta(seconds=3600) == job.trigger.interval
    finally:
        await daemon.stop()
