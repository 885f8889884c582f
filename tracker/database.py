"""The daemon's database: opened at start (file check, SQLite lock, schema), probed for /readyz."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import urllib.parse
from pathlib import Path

import structlog
from sqlalchemy import exc as sa_exc

from tracker import config, startup
from tracker.readiness import NotReady
from tracker.store import SqlStore, migrate
from tracker.store.sql import SchemaMismatchError

log = structlog.get_logger("tracker.app")


def sqlite_file(store: SqlStore) -> Path | None:
    """The database file of an SQLite store, None for another database or an in-memory one."""
    url = store.engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


def probe_sqlite_file(path: Path) -> None:
    """Open the file afresh and read from it; raises when that fails.

    The store's pooled connections keep working on a file that was deleted, replaced or made
    unreadable (they hold it open), so only a new connection shows what a restart would meet.
    """
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=1.0)
    try:
        connection.execute("SELECT count(*) FROM tracker_meta").fetchone()
    finally:
        connection.close()


class Database:
    """The store the daemon runs on, with what opening and watching it takes."""

    def __init__(self, store: SqlStore, settings: config.DatabaseSettings) -> None:
        self.store = store
        self.settings = settings
        self.sqlite_file = sqlite_file(store)

    async def open(self, stack: contextlib.AsyncExitStack) -> migrate.SchemaState:
        """Lock an SQLite file, bring the schema up to date, resume our own leases.

        Raises StartupError (DATABASE, LOCKED or SCHEMA). What it took is released on ``stack``:
        the pool is closed before the lock goes, so no newcomer shares the file with us.
        """
        if self.sqlite_file is not None:
            lock = await asyncio.to_thread(self._lock, self.sqlite_file)
            stack.callback(lock.release)
        stack.callback(self.store.close)
        schema = await asyncio.to_thread(self._migrate)
        if self.store.dialect == "sqlite":
            # SQLite serves one daemon, so leases left by a crash are ours: resume those
            # deliveries now rather than when the leases run out. (PostgreSQL may be shared
            # with live daemons, whose leases must stand.)
            released = await asyncio.to_thread(self.store.release_claims)
            if released:
                log.info("resumed_deliveries", count=released)
        return schema

    def _lock(self, path: Path) -> startup.DatabaseLock:
        startup.check_database(self.settings.url)
        lock = startup.DatabaseLock(path)
        lock.acquire()
        return lock

    def _migrate(self) -> migrate.SchemaState:
        try:
            return migrate.ensure(self.store.engine, auto_migrate=self.settings.auto_migrate)
        except SchemaMismatchError as exc:
            raise startup.StartupError(str(exc), startup.ExitCode.SCHEMA) from None
        except sa_exc.SQLAlchemyError as exc:
            raise startup.unreachable(self.settings.url, exc) from None

    async def check(self) -> NotReady | None:
        """The readiness check: the store answers, and an SQLite file still opens afresh."""
        return await asyncio.to_thread(self._problem)

    def _problem(self) -> NotReady | None:
        try:
            self.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            # The type only: /readyz needs no token and driver messages name hosts and users.
            return NotReady(
                f"database unreachable: {type(exc).__name__}", f"{type(exc).__name__}: {exc}"
            )
        if self.sqlite_file is not None:
            try:
                probe_sqlite_file(self.sqlite_file)
            except sqlite3.Error as exc:
                return NotReady(
                    f"database file {self.sqlite_file.name} unusable: {exc}",
                    f"{self.sqlite_file}: {type(exc).__name__}: {exc}",
                )
        return None
