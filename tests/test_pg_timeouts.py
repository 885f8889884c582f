"""PostgreSQL connections fail on a held lock and on a silent network instead of hanging.

A lock held past the lock timeout (SQLite's busy timeout, lowered here) fails the statement, so
the poll cycle fails cleanly, /readyz says so and a stop returns; the migration's advisory lock
still waits as long as it takes; a URL's own settings are kept.
"""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import psycopg
import pytest
import sqlalchemy as sa
from conftest import RecordingNotifier, merge

from tracker import config
from tracker.app import Daemon
from tracker.store import SqlStore, migrate
from tracker.store import engine as store_engine

pytestmark = pytest.mark.postgres

#: the lowered lock timeout, in ms: short enough for a quick test, long enough to tell apart
LOCK_TIMEOUT_MS = 200
#: how long a test waits for what should take LOCK_TIMEOUT_MS before calling it a hang
HANG = 5.0


@pytest.fixture(name="short_lock_timeout", autouse=True)
def _short_lock_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_engine, "PG_LOCK_TIMEOUT_MS", LOCK_TIMEOUT_MS)


@pytest.fixture(name="lock_polls")
def _lock_polls() -> Iterator[Callable[[str], sa.Connection]]:
    """Holds ``LOCK TABLE polls IN EXCLUSIVE MODE`` on a database until the test ends (or the
    test rolls the returned connection back)."""
    held: list[tuple[sa.Engine, sa.Connection]] = []

    def lock(url: str) -> sa.Connection:
        engine = sa.create_engine(store_engine.normalise_url(url))
        conn = engine.connect()
        conn.begin()
        conn.exec_driver_sql("LOCK TABLE polls IN EXCLUSIVE MODE")
        held.append((engine, conn))
        return conn

    yield lock
    for engine, conn in held:
        conn.rollback()
        conn.close()
        engine.dispose()


def _in_thread(work: Callable[[], Any], unblock: Callable[[], None]) -> tuple[Any, float]:
    """Run ``work`` in a thread; returns (its result or the exception it raised, seconds).

    Fails the test if it is still running after HANG seconds, once ``unblock`` let it end.
    """
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append(work())
        except Exception as exc:  # noqa: BLE001 - returned to the test
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    took = time.monotonic() - started
    if thread.is_alive():
        unblock()
        thread.join(HANG)
        pytest.fail(f"still waiting after {HANG} s: no lock timeout")
    return outcome[0], took


# -- a held lock ---------------------------------------------------------------------------------


def test_a_claim_under_a_held_table_lock_fails_after_the_lock_timeout(
    make_pg_url: Callable[[], str], lock_polls: Callable[[str], sa.Connection]
) -> None:
    """claim_due fails with "lock not available" after the lock timeout, instead of hanging."""
    url = make_pg_url()
    store = SqlStore.from_url(url)
    try:
        store.create_schema()
        holder = lock_polls(url)
        failure, took = _in_thread(
            lambda: store.claim_due(datetime.now(UTC), 10, lease=30), holder.rollback
        )
    finally:
        store.close()

    assert isinstance(failure, sa.exc.OperationalError), failure
    assert isinstance(failure.orig, psycopg.errors.LockNotAvailable)
    assert took < 2.0


async def test_a_daemon_under_a_held_table_lock_says_why_and_stops_promptly(
    document: dict[str, Any],
    make_pg_url: Callable[[], str],
    lock_polls: Callable[[str], sa.Connection],
) -> None:
    """Poll cycles fail on the lock, /readyz answers 503 naming the failed cycle, and a stop
    returns within seconds while the lock is still held."""
    url = make_pg_url()
    settings = config.parse(merge(document, {"database": {"url": url}}), environ={})
    daemon = Daemon(settings, notifier=RecordingNotifier())
    await daemon.start()
    holder = lock_polls(url)
    stopping: asyncio.Task[None] | None = None
    try:
        daemon.parts.engine.wake()
        headers = {"Authorization": "Bearer test-token"}
        async with httpx.AsyncClient(base_url=daemon.api_url, headers=headers, timeout=5) as client:
            deadline = time.monotonic() + HANG
            while (answer := await client.get("/readyz")).status_code != 503:
                assert time.monotonic() < deadline, f"/readyz still {answer.status_code}"
                await asyncio.sleep(0.05)
        assert ["last poll cycle failed: LockNotAvailable"] == answer.json()["reasons"]

        started = time.monotonic()
        stopping = asyncio.create_task(daemon.stop())
        done, _ = await asyncio.wait({stopping}, timeout=HANG)
        took = time.monotonic() - started
        assert stopping in done, f"stop still running after {HANG} s under the lock"
        assert took < 3.0
    finally:
        holder.rollback()  # lets a hung daemon go, so the test ends either way
        if stopping is not None:
            await stopping
        await daemon.stop()


# -- waits meant to be long ----------------------------------------------------------------------


def test_the_migration_lock_waits_longer_than_the_lock_timeout(
    make_pg_url: Callable[[], str],
) -> None:
    """An instance starting while another upgrades waits for it (here 5x the lock timeout),
    then finds the schema current."""
    url = make_pg_url()
    other = SqlStore.from_url(url)
    starting = SqlStore.from_url(url)
    try:
        with starting.engine.connect() as conn:  # the lock timeout is in force elsewhere
            assert f"{LOCK_TIMEOUT_MS}ms" == conn.exec_driver_sql("SHOW lock_timeout").scalar()
        hold = 5 * LOCK_TIMEOUT_MS / 1000
        with other.engine.connect() as conn, conn.begin():
            conn.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": migrate.LOCK_KEY})
            release = threading.Timer(hold, conn.rollback)
            release.start()
            try:
                state, took = _in_thread(
                    lambda: migrate.ensure(starting.engine, auto_migrate=True), lambda: None
                )
            finally:
                release.join()
    finally:
        starting.close()
        other.close()

    assert isinstance(state, migrate.SchemaState), state
    assert state.up_to_date
    assert took >= hold - 0.05


# -- the URL's own settings ----------------------------------------------------------------------


def test_the_urls_own_lock_timeout_is_kept(make_pg_url: Callable[[], str]) -> None:
    """A URL setting lock_timeout in its options keeps it; one without gets tracker's."""
    url = make_pg_url()
    for given, expected in [
        (url + "?options=-c%20lock_timeout%3D1234", "1234ms"),
        (url + "?options=-c%20application_name%3Dmine", f"{LOCK_TIMEOUT_MS}ms"),
        (url, f"{LOCK_TIMEOUT_MS}ms"),
    ]:
        store = SqlStore.from_url(given)
        try:
            with store.engine.connect() as conn:
                assert expected == conn.exec_driver_sql("SHOW lock_timeout").scalar(), given
                if "application_name" in given:  # the URL's other options are kept too
                    assert "mine" == conn.exec_driver_sql("SHOW application_name").scalar()
        finally:
            store.close()


@pytest.mark.skipif(sys.platform != "linux", reason="reads Linux TCP socket options")
def test_connect_timeout_and_keepalives_are_in_force_unless_the_url_sets_them(
    make_pg_url: Callable[[], str],
) -> None:
    """The connect timeout is a connection parameter (a configuration check); the keepalives
    and tcp_user_timeout are read back from the connection's own socket. A URL's values win."""
    url = make_pg_url()
    for given, idle, user_timeout, connect_timeout in [
        (url, 10, 25_000, "10"),
        (url + "?keepalives_idle=77&tcp_user_timeout=12345&connect_timeout=3", 77, 12345, "3"),
    ]:
        store = SqlStore.from_url(given)
        try:
            with store.engine.connect() as conn:
                dbapi = conn.connection.dbapi_connection
                assert isinstance(dbapi, psycopg.Connection)
                assert connect_timeout == dbapi.info.get_parameters()["connect_timeout"]
                sock = socket.socket(fileno=os.dup(dbapi.pgconn.socket))
                try:
                    assert sock.family in (socket.AF_INET, socket.AF_INET6)
                    assert 1 == sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                    assert idle == sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
                    assert 5 == sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
                    assert 3 == sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
                    assert user_timeout == sock.getsockopt(
                        socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT
                    )
                finally:
                    sock.close()
        finally:
            store.close()
