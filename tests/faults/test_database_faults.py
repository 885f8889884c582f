"""The SQLite file locked past the busy timeout, or unable to grow: cycles fail cleanly."""

from __future__ import annotations

import resource
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from faultrig import hooks_for, register, running, wait_until, write_config

from tracker.testing.daemon import Daemon
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

IDS = [f"db-{n}" for n in range(20)]


def not_ready_because(daemon: Daemon, words: str) -> dict[str, Any] | None:
    answer = daemon.client.get("/readyz")
    body: dict[str, Any] = answer.json()
    if answer.status_code == 503 and any(words in r for r in body.get("reasons", [])):
        return body
    return None


def ready(daemon: Daemon) -> bool:
    return daemon.client.get("/readyz").status_code == 200


def finish_everything(daemon: Daemon, receiver: WebhookReceiver, before: dict[str, Any]) -> None:
    """Every task ends final with one verified webhook; nothing committed earlier is gone."""
    hooks = wait_until(
        lambda: hooks_for(receiver, IDS),
        30,
        "a final webhook for every task",
    )
    assert dict.fromkeys(IDS, 1) == {t: len(hooks[t]) for t in IDS}
    wait_until(lambda: ready(daemon), 10, "/readyz to be ready again")
    for task_id, earlier in before.items():
        now = daemon.client.get(f"/v1/tasks/luma/{task_id}").json()
        # The history committed before the fault is still the start of the history now.
        assert earlier == now["transitions"][: len(earlier)]
        assert now["status"] in {"completed", "failed"}


def history(daemon: Daemon) -> dict[str, Any]:
    return {t: daemon.client.get(f"/v1/tasks/luma/{t}").json()["transitions"] for t in IDS}


def test_sqlite_locked_past_the_busy_timeout_fails_cycles_cleanly_and_loses_nothing(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """Another process holding the write lock past the 5 s busy timeout makes cycles fail with
    "database is locked", which /readyz reports; once it lets go, cycles resume and every task
    finishes with one webhook, the history committed before intact.
    """
    relay.step = 0.4
    path = tmp_path / "faults.db"
    config = write_config(tmp_path, relay.base_url, receiver.url, f"sqlite:///{path}")
    with running(config) as daemon:
        register(daemon, IDS)
        wait_until(lambda: receiver.count or None, 15, "a first webhook")
        locker = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            locker.execute("BEGIN IMMEDIATE")
            before = history(daemon)  # reads go on under the lock (WAL)
            wait_until(
                lambda: not_ready_because(daemon, "database is locked"), 20, "/readyz to say why"
            )
        finally:
            locker.rollback()
            locker.close()
        finish_everything(daemon, receiver, before)
        failed = [e for e in daemon.events if e.get("event") == "poll_cycle_failed"]
        assert failed
        assert 0 == daemon.stop()


def test_a_database_file_that_cannot_grow_fails_writes_cleanly_and_loses_nothing(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """With the daemon's file size limit cut to one page (what a full disk does to a growing
    file), every write fails with a disk I/O error and /readyz says so; with room again, cycles
    resume and every task finishes with one webhook, the history committed before intact.
    """
    relay.step = 0.4
    path = tmp_path / "faults.db"
    config = write_config(tmp_path, relay.base_url, receiver.url, f"sqlite:///{path}")
    with running(config) as daemon:
        register(daemon, IDS)
        wait_until(lambda: receiver.count or None, 15, "a first webhook")
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (4096, hard))
        try:
            before = history(daemon)
            wait_until(lambda: not_ready_because(daemon, "disk"), 20, "/readyz to say why")
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (soft, hard))
        finish_everything(daemon, receiver, before)
        assert 0 == daemon.stop()
