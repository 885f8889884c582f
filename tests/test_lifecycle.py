"""The daemon's start and stop on one exit stack: a start that fails halfway closes exactly what
had started, with no stop() needed, and the daemon's parts come from the composition root."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
from pathlib import Path

import httpx
import pytest
from conftest import RecordingNotifier, base_config, merge

from tracker import compose, config
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.startup import DatabaseLock, ExitCode, StartupError
from tracker.store import Registration, SqlStore
from tracker.testing.simulator import SimulatedRelay

#: the tasks a started daemon runs besides the scheduler's jobs
PART_TASKS = {"api", "poll", "watchdog"}


@pytest.fixture(name="free_port")
def _free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def settings_on(relay: SimulatedRelay, database: Path, port: int) -> config.Settings:
    """Settings for a daemon on ``database`` whose API listens on ``port``."""
    document = base_config(relay.base_url, None, f"sqlite:///{database}")
    return config.parse(merge(document, {"server": {"port": port}}), environ={})


def part_tasks() -> set[str]:
    """The names of the daemon's own tasks still on the loop."""
    return {t.get_name() for t in asyncio.all_tasks() if not t.done()} & PART_TASKS


def lock_is_free(database: Path) -> bool:
    """True when another daemon could take the SQLite file's lock now."""
    lock = DatabaseLock(database)
    try:
        lock.acquire()
    except StartupError:
        return False
    lock.release()
    return True


def refused(port: int) -> bool:
    """True when nothing accepts connections on ``port``."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_a_taken_port_unwinds_the_database_opened_before_it(
    tmp_path: Path, relay: SimulatedRelay, listening: int
) -> None:
    """The API cannot listen (exit 3) after the database was opened and locked: the lock is
    free again and no part runs, before anyone calls stop(); stop() then says STOPPING=1 only.
    """
    database = tmp_path / "t.db"
    notifier = RecordingNotifier(watchdog_usec=200_000)
    daemon = Daemon(settings_on(relay, database, listening), notifier=notifier)

    with pytest.raises(StartupError) as failure:
        await daemon.start()

    assert ExitCode.LISTEN == failure.value.code
    with sqlite3.connect(database) as conn:  # the database part did run: the schema is there
        assert conn.execute("SELECT count(*) FROM tracker_meta").fetchone()[0] > 0
    assert lock_is_free(database)
    assert set() == part_tasks()
    assert not daemon.parts.jobs.scheduler.running
    await daemon.stop()
    assert ["STOPPING=1"] == notifier.sent


async def test_a_part_failing_after_the_api_started_closes_the_api_and_the_database(
    tmp_path: Path, relay: SimulatedRelay, free_port: int
) -> None:
    """The jobs fail to start (their scheduler already runs) after the database, the API and
    the watchdog started: the port is closed, the watchdog stopped and the lock free again.
    """
    database = tmp_path / "t.db"
    notifier = RecordingNotifier(watchdog_usec=200_000)
    daemon = Daemon(settings_on(relay, database, free_port), notifier=notifier)
    scheduler = daemon.parts.jobs.scheduler
    scheduler.start(paused=True)  # the one real way to make starting the jobs fail
    try:
        with pytest.raises(Exception, match="already running"):
            await daemon.start()

        assert (True, True) == (refused(free_port), lock_is_free(database))
        assert set() == part_tasks()
        assert "READY=1" not in notifier.sent
    finally:
        scheduler.shutdown(wait=False)
        await daemon.stop()


async def test_a_stop_closes_every_part_that_started(
    tmp_path: Path, relay: SimulatedRelay, free_port: int
) -> None:
    """After a clean start and stop: the port is closed, the lock is free, no part task runs,
    and READY=1 came before STOPPING=1.
    """
    database = tmp_path / "t.db"
    notifier = RecordingNotifier(watchdog_usec=200_000)
    daemon = Daemon(settings_on(relay, database, free_port), notifier=notifier)
    await daemon.start()
    assert PART_TASKS == part_tasks()
    assert not lock_is_free(database)

    await daemon.stop()

    assert (True, True) == (refused(free_port), lock_is_free(database))
    assert set() == part_tasks()
    lines = [m.split("\n")[0] for m in notifier.sent]
    assert lines.index("READY=1") < lines.index("STOPPING=1")


async def test_build_takes_the_clock_the_transports_and_the_store_it_is_given(
    tmp_path: Path, relay: SimulatedRelay
) -> None:
    """Every part runs on the injected clock and store, and relay requests go through the
    injected transport: nothing is patched.
    """
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        return httpx.Response(200, json={"code": "success", "data": []})

    clock = FakeClock()
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 't.db'}")
    settings = settings_on(relay, tmp_path / "t.db", 0)
    parts = compose.build(
        settings,
        clock=clock,
        transports=compose.Transports(relay=httpx.MockTransport(answer)),
        store=store,
        notifier=RecordingNotifier(watchdog_usec=200_000),
    )
    try:
        store.create_schema()
        store.register(Registration("luma", ["x"]), clock.now())
        await parts.poller.run_cycle()

        assert [parts.store, parts.database.store] == [store, store]
        assert clock is parts.clock
        assert [] != seen
        assert [] == relay.requests
        assert ["database", "scheduler", "poll", "relay"] == parts.readiness.names
    finally:
        await parts.clients.aclose()
        store.close()
