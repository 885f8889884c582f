"""The figures at a million tasks: a /metrics scrape and a status line against full table scans.

Fills a database (SQLite file, and PostgreSQL with --pg URL) with --tasks tasks (default
1,000,000: 3 % active, the rest final) and one delivery per final task, through the real schema
and its count triggers, then times, in one run:

- bare: ``SELECT 1`` on the store's engine, the floor any query pays;
- scan: the figures counted the way they were before the count table (GROUP BY over tasks
  and deliveries, MIN over pending deliveries);
- scrape: ``Metrics.render()`` with the store watched, as GET /metrics produces it;
- status: ``store.stats()`` plus ``tracker.routines.status_line``, as the systemd status job does.

Target: scrape and status line under 50 ms (median and p95) at 1,000,000 tasks. Exits 1 when
missed.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tracker.metrics import Metrics
from tracker.routines import status_line
from tracker.store import SqlStore
from tracker.store.sql import deliveries, polls, tasks

TARGET_MS = 50.0
PLATFORMS = ("luma", "suno", "kling")
CHUNK = 20_000
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _task_rows(total: int) -> Iterator[list[dict[str, Any]]]:
    for start in range(0, total, CHUNK):
        rows = []
        for n in range(start, min(total, start + CHUNK)):
            active = n % 100 < 3
            if active:
                status = ("pending", "in_progress")[n % 2]
            else:
                status = "failed" if n % 7 == 0 else "completed"
            at = T0 + timedelta(seconds=n)
            rows.append(
                {
                    "platform": PLATFORMS[n % len(PLATFORMS)],
                    "task_id": f"task-{n}",
                    "status": status,
                    "fail_reason": "",
                    "created_at": at,
                    "updated_at": at,
                    "finished_at": None if active else at,
                    "last_change_at": at.timestamp(),
                }
            )
        yield rows


def fill(store: SqlStore, total: int) -> float:
    """Insert the tasks and their deliveries; returns the seconds it took."""
    started = time.perf_counter()
    payload = '{"type":"task.completed","data":{}}'
    for rows in _task_rows(total):
        with store.engine.begin() as conn:
            conn.execute(tasks.insert(), rows)
            # The live ones are due from their creation on, as registration plans them.
            live = sa.select(tasks.c.id, tasks.c.last_change_at).where(
                tasks.c.task_id.in_([r["task_id"] for r in rows]), tasks.c.finished_at.is_(None)
            )
            conn.execute(polls.insert().from_select(["task_pk", "next_poll_at"], live))
            first = conn.execute(
                sa.select(tasks.c.id, tasks.c.task_id, tasks.c.platform, tasks.c.created_at)
                .where(tasks.c.task_id.in_([r["task_id"] for r in rows]))
                .where(tasks.c.finished_at.is_not(None))
            ).all()
            conn.execute(
                deliveries.insert(),
                [
                    {
                        "webhook_id": f"msg_{r.id}",
                        "task_pk": r.id,
                        "platform": r.platform,
                        "task_id": r.task_id,
                        "event_type": "task.completed",
                        "payload": payload,
                        "url": "https://app.example/hooks",
                        "guarded": False,
                        "state": "pending" if r.id % 500 == 0 else "delivered",
                        "attempts": 1,
                        "next_attempt_at": r.created_at.timestamp(),
                        "created_at": r.created_at,
                    }
                    for r in first
                ],
            )
    store.compact_counts()
    if store.dialect == "postgresql":
        with store.engine.connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").exec_driver_sql("VACUUM ANALYZE")
    else:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("ANALYZE")
    return time.perf_counter() - started


def scan(store: SqlStore) -> Any:
    """The figures as a full count, the way stats() read them before the count table."""
    with store.engine.connect() as conn:
        by_status = conn.execute(
            sa.select(tasks.c.platform, tasks.c.status, sa.func.count()).group_by(
                tasks.c.platform, tasks.c.status
            )
        ).all()
        by_state = conn.execute(
            sa.select(deliveries.c.state, sa.func.count()).group_by(deliveries.c.state)
        ).all()
        oldest = conn.execute(
            sa.select(sa.func.min(deliveries.c.created_at)).where(deliveries.c.state == "pending")
        ).scalar()
    return by_status, by_state, oldest


def timed(work: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Median and p95 wall time in milliseconds, after one warm-up call."""
    work()
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        work()
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def bench(url: str, total: int, runs: int) -> bool:
    """Fill, measure, print one block; True when both targets are met."""
    store = SqlStore.from_url(url)
    store.create_schema()
    seconds = fill(store, total)
    metrics = Metrics()
    metrics.watch_store(store.stats, time.time)
    stats = store.stats()
    if total != sum(stats.tasks.values()):
        raise RuntimeError(f"the counts say {stats.tasks}, not {total} tasks")
    rows = [
        ("bare SELECT 1", lambda: _select_one(store)),
        ("scan (GROUP BY)", lambda: scan(store)),
        ("scrape /metrics", metrics.render),
        ("status line", lambda: status_line(store.stats(), 0.5)),
    ]
    print(f"\n{store.dialect}: {total:,} tasks, {sum(stats.deliveries.values()):,} deliveries "
          f"(filled in {seconds:.0f} s)")  # fmt: skip
    print(f"  {'what':18} {'median ms':>10} {'p95 ms':>8} {'x bare':>8}")
    results = {}
    for name, work in rows:
        results[name] = timed(work, runs)
    bare = results["bare SELECT 1"][0]
    for name, (median, p95) in results.items():
        print(f"  {name:18} {median:10.2f} {p95:8.2f} {median / bare:8.1f}")
    ok = all(max(results[n]) < TARGET_MS for n in ("scrape /metrics", "status line"))
    print(f"  status line: {status_line(store.stats(), 0.5)!r}")
    print(f"  target: scrape and status line < {TARGET_MS:g} ms (p95): {'PASS' if ok else 'FAIL'}")
    store.close()
    return ok


def _select_one(store: SqlStore) -> None:
    with store.engine.connect() as conn:
        conn.execute(sa.text("SELECT 1")).scalar()


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark on SQLite, and on PostgreSQL when --pg is given."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument(
        "--pg", help="an empty PostgreSQL database URL, e.g. postgresql://postgres@127.0.0.1/x"
    )
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    args = parser.parse_args(argv)
    ok = True
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            ok &= bench(f"sqlite:///{Path(tmp) / 'bench.db'}", args.tasks, args.runs)
    if args.pg:
        ok &= bench(args.pg, args.tasks, args.runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
