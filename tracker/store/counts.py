"""Row counts kept by the database itself, so /metrics and the status line never scan tables.

Triggers on ``tasks`` and ``deliveries`` (created by migration 0003) append a +1/-1 row to
``tracker_counts`` for every insert, delete and status or state change, inside the writing
transaction: the counts commit or roll back with the rows they count, whichever code path
wrote them. Appending rather than updating one row per status keeps concurrent writers (several
daemons on PostgreSQL) from queueing, or deadlocking, on a shared counter row. ``compact()``
folds the appended rows into one per key from time to time, so reading stays a sum over a few
hundred rows.
"""

from __future__ import annotations

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.store.models import CountRow

counts = CountRow.__table__  # type: ignore[attr-defined]

#: the ``kind`` of a count row
TASK = "task"
DELIVERY = "delivery"


def read(conn: sa.Connection) -> tuple[dict[tuple[str, str], int], dict[DeliveryState, int]]:
    """Tasks by (platform, status) and deliveries by state, leaving out zeros."""
    total = sa.func.sum(counts.c.n)
    rows = conn.execute(
        sa.select(counts.c.kind, counts.c.platform, counts.c.status, total.label("n"))
        .group_by(counts.c.kind, counts.c.platform, counts.c.status)
        .having(total != 0)
    )
    tasks: dict[tuple[str, str], int] = {}
    deliveries: dict[DeliveryState, int] = {}
    for row in rows:
        if row.kind == TASK:
            tasks[(row.platform, row.status)] = int(row.n)
        else:
            deliveries[DeliveryState(row.status)] = int(row.n)
    return tasks, deliveries


def compact(conn: sa.Connection) -> int:
    """Fold every count row into one per key; returns how many rows were folded.

    Run in a write transaction. On PostgreSQL the rows folded are exactly those the DELETE
    removed (RETURNING), so a row committed meanwhile, or folded by another daemon, is never
    counted twice or lost; SQLite's write transaction excludes every other writer anyway.
    """
    if conn.dialect.name == "postgresql":
        folded = conn.execute(
            sa.text(
                "WITH gone AS (DELETE FROM tracker_counts RETURNING kind, platform, status, n),"
                " summed AS (INSERT INTO tracker_counts (kind, platform, status, n)"
                " SELECT kind, platform, status, sum(n) FROM gone"
                " GROUP BY kind, platform, status HAVING sum(n) <> 0 RETURNING 1)"
                " SELECT (SELECT count(*) FROM gone)"
            )
        ).scalar_one()
        return int(folded)
    total = sa.func.sum(counts.c.n)
    sums = conn.execute(
        sa.select(counts.c.kind, counts.c.platform, counts.c.status, total.label("n"))
        .group_by(counts.c.kind, counts.c.platform, counts.c.status)
        .having(total != 0)
    ).all()
    folded = conn.execute(counts.delete()).rowcount
    if sums:
        conn.execute(counts.insert(), [dict(r._mapping) for r in sums])
    return int(folded)
