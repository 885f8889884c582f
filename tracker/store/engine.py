"""The engine: SQLite pragmas and transaction behaviour, the PostgreSQL pool."""

from __future__ import annotations

import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

# SQLite's default is to fail at once on a locked database; wait instead.
SQLITE_BUSY_TIMEOUT_MS = 5000
#: PostgreSQL waits as long for a lock (a row, a table, an advisory lock), then fails the
#: statement ("lock not available"): a held lock fails the cycle, as on SQLite, instead of
#: freezing it. Waits meant to be long (the migration's lock) lift it for their transaction.
#: No statement_timeout: long migrations and prunes are legitimate.
PG_LOCK_TIMEOUT_MS = SQLITE_BUSY_TIMEOUT_MS
#: libpq connection parameters: a server that does not answer fails the connect after 10 s;
#: a network that silently stops forwarding fails the query within about 25 s (keepalive
#: probes after 10 s idle, 3 of them 5 s apart; unacknowledged data given up after 25 s), so
#: the thread a stop waits for ends below the unit's TimeoutStopSec=30
PG_CONNECT_PARAMS: dict[str, int] = {
    "connect_timeout": 10,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "tcp_user_timeout": 25_000,
}

#: how SQLite syncs a commit to disk. In WAL mode NORMAL is safe from a crash of the process,
#: not from one of the machine (a power loss): the last commits before it may roll back. A
#: poll's record may (the next poll finds the same status again), a delivery's outcome may
#: (the webhook is sent again, at least once as promised); what the daemon has acknowledged
#: to someone (a registration answered 201, a removal, a re-queue) is committed FULL, which
#: syncs the log, and every commit before it, to disk.
_USUAL_SYNC = "NORMAL"

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
        connect_args = pg_connect_args(url) if url.startswith("postgresql") else {}
        return sa.create_engine(url, pool_pre_ping=True, connect_args=connect_args, **pool)
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
        cursor.execute(f"PRAGMA synchronous = {_USUAL_SYNC}")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        options = connection.get_execution_options()
        if options.get("tracker_write", False):
            _set_synchronous(connection, "FULL" if options.get("tracker_durable") else _USUAL_SYNC)
            # A write transaction that starts deferred and upgrades later can fail with
            # "database is locked" without waiting; BEGIN IMMEDIATE waits for the lock instead.
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


def pg_connect_args(url: str) -> dict[str, Any]:
    """The libpq parameters tracker adds to a PostgreSQL URL: PG_CONNECT_PARAMS and the lock
    timeout (as ``-c lock_timeout=...`` in ``options``). What the URL (or, where libpq reads
    one, its environment variable) sets already is kept: these are defaults, not overrides.
    """
    query = sa.engine.make_url(url).query
    added: dict[str, Any] = {
        name: value
        for name, value in PG_CONNECT_PARAMS.items()
        if name not in query
        and not (name == "connect_timeout" and "PGCONNECT_TIMEOUT" in os.environ)
    }
    given = query.get("options", os.environ.get("PGOPTIONS", ""))
    options = " ".join(given) if isinstance(given, tuple) else given
    if "lock_timeout" not in options:
        added["options"] = f"{options} -c lock_timeout={PG_LOCK_TIMEOUT_MS}".strip()
    return added


def _set_synchronous(connection: sa.Connection, level: str) -> None:
    """Sync the transaction about to begin on ``connection`` at ``level`` (only the pragma's
    changes are sent: the connection remembers the level it was left at)."""
    record = connection.connection
    if record.info.get("synchronous", _USUAL_SYNC) != level:
        connection.exec_driver_sql(f"PRAGMA synchronous = {level}")
        record.info["synchronous"] = level
