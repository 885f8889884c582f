"""The engine: SQLite pragmas and transaction behaviour, the PostgreSQL pool."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

# SQLite's default is to fail at once on a locked database; wait instead.
SQLITE_BUSY_TIMEOUT_MS = 5000

#: connections an engine's pool keeps (and may open beyond) unless its user says otherwise
DEFAULT_POOL_SIZE = 8


class SchemaMismatchError(Exception):
    """The database was written by another version of tracker."""


def normalise_url(url: str) -> str:
    """Point bare ``postgresql://`` URLs at psycopg 3, the driver tracker ships with."""
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def make_engine(
    url: str, *, pool_size: int = DEFAULT_POOL_SIZE, max_overflow: int = DEFAULT_POOL_SIZE
) -> sa.Engine:
    """An engine with the pragmas and transaction behaviour tracker relies on.

    Its pool keeps ``pool_size`` connections and opens up to ``max_overflow`` more at busy
    times; a thread that finds them all in use waits (30 s at most, then fails). The daemon
    sizes its pools to the threads that use them (tracker/app.py); the defaults serve the CLI
    and scripts.
    """
    url = normalise_url(url)
    pool = {"pool_size": pool_size, "max_overflow": max_overflow}
    if not url.startswith("sqlite"):
        return sa.create_engine(url, pool_pre_ping=True, **pool)
    database = sa.engine.make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        pool = {}  # SQLAlchemy's own pool for an in-memory database: one shared connection
    engine = sa.create_engine(url, connect_args={"check_same_thread": False}, **pool)

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
