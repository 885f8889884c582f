"""The store on SQLAlchemy: one implementation, with the SQLite/PostgreSQL differences inside.

``SqlStore`` is composed of its parts, one module per concern: registry.py (registration and
task reads), polling.py (claims and a poll's writes), outbox.py (deliveries), sessions.py (the
dashboard's sign-in sessions), refusals.py (rows the database refuses), rows.py (row mappers),
base.py (tables and transactions) and engine.py (the engine); this module keeps the schema, the
daemon's meta facts and the figures.
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from tracker.retry import DeliveryState
from tracker.store import counts, records
from tracker.store.base import (
    FINAL_VALUES,
    IN_CHUNK,
    attempts,
    deliveries,
    meta,
    polls,
    tasks,
    transitions,
)
from tracker.store.engine import (
    DEFAULT_POOL_SIZE,
    SchemaMismatchError,
    make_engine,
    normalise_url,
)
from tracker.store.outbox import Outbox
from tracker.store.polling import Polling
from tracker.store.registry import Registry
from tracker.store.sessions import SessionRows

# Where these lived before the split; the CLI, the tests and the benchmarks import them here.
__all__ = [
    "IN_CHUNK",
    "SchemaMismatchError",
    "SqlStore",
    "attempts",
    "deliveries",
    "make_engine",
    "meta",
    "normalise_url",
    "polls",
    "tasks",
    "transitions",
]


class SqlStore(Registry, Polling, Outbox, SessionRows):
    """Tasks, history, the webhook outbox and the dashboard's sessions in one SQL database."""

    @classmethod
    def from_url(
        cls, url: str, *, pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_POOL_SIZE
    ) -> SqlStore:
        """A store on a new engine for ``url``, its pool sized as make_engine says."""
        return cls(make_engine(url, pool_size=pool_size, max_overflow=max_overflow))

    def close(self) -> None:
        """Release every pooled connection."""
        self.engine.dispose()

    # -- schema -----------------------------------------------------------------------------

    def create_schema(self) -> None:
        """Create the schema, or upgrade it to the newest revision (see tracker.store.migrate)."""
        from tracker.store import migrate  # noqa: PLC0415 - alembic loads only when needed

        migrate.upgrade(self.engine)

    def integrity_problems(self) -> list[str]:
        """What the database's own consistency check reports, and live tasks without a next
        poll (they would never be polled again); empty when healthy."""
        problems: list[str] = []
        with self._read() as conn:
            if self.dialect == "sqlite":
                rows = conn.exec_driver_sql("PRAGMA integrity_check").scalars().all()
                problems += [str(r) for r in rows if r != "ok"]
            unplanned = 0
            if sa.inspect(conn).has_table("polls"):  # else the schema check says what is wrong
                unplanned = conn.execute(
                    sa.select(sa.func.count())
                    .select_from(tasks.outerjoin(polls, polls.c.task_pk == tasks.c.id))
                    .where(polls.c.task_pk.is_(None), tasks.c.status.not_in(FINAL_VALUES))
                ).scalar_one()
        if unplanned:
            problems.append(
                f"{unplanned} live task(s) without a polls row, so never polled again (rows"
                " written by hand?): `tracker tasks remove` them and `tracker tasks add` them"
            )
        return problems

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
