"""The SQLite file locked past the busy timeout, unable to grow, or on a full file system:
cycles fail cleanly."""

from __future__ import annotations

import collections
import contextlib
import errno
import resource
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_until
from faultrig import final_hooks, hooks_for, register, running, write_config

from tracker.testing.daemon import Daemon
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

IDS = sorted(f"db-{n}" for n in range(20))
#: the size-limited file system: room for the database (its file and WAL take under 1 MiB
#: when the disk fills here) and a filler file, small enough to fill in a moment
DISK_SIZE = "2m"


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


def cycle_failures(daemon: Daemon) -> int:
    return sum(1 for e in daemon.events if e.get("event") == "poll_cycle_failed")


def history(daemon: Daemon) -> dict[str, Any]:
    return {t: daemon.client.get(f"/v1/tasks/luma/{t}").json()["transitions"] for t in IDS}


def start_work(daemon: Daemon, relay: SimulatedRelay) -> dict[str, Any]:
    """Every task registered and recorded in progress, where the relay holds it; its history.

    So the fault strikes work that is under way: with the relay's default script the tasks
    would all be final and delivered in about two seconds, before any fault began.
    """
    for task_id in IDS:
        relay.set("luma", task_id, "IN_PROGRESS", "50%")
    register(daemon, IDS)

    def all_in_progress() -> bool:
        page = daemon.client.get("/v1/tasks", params={"limit": 100}).json()
        return sorted(t["task_id"] for t in page["tasks"] if t["status"] == "in_progress") == IDS

    wait_until(all_in_progress, 15, "every task in progress")
    return history(daemon)


def finish_upstream(relay: SimulatedRelay) -> None:
    """The relay reports every task completed (while the fault lasts, nothing records it)."""
    for task_id in IDS:
        relay.set("luma", task_id, "SUCCESS", "100%")


def test_sqlite_locked_past_the_busy_timeout_fails_cycles_cleanly_and_loses_nothing(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """Another process holding the write lock past the 5 s busy timeout makes cycles fail with
    "database is locked", which /readyz reports, and the completions the relay reports meanwhile
    wait; once it lets go, cycles resume and every task finishes with one webhook, the history
    committed before intact.
    """
    path = tmp_path / "faults.db"
    config = write_config(tmp_path, relay.base_url, receiver.url, f"sqlite:///{path}")
    with running(config) as daemon:
        before = start_work(daemon, relay)
        locker = sqlite3.connect(path, isolation_level=None, timeout=10)
        try:
            locker.execute("BEGIN IMMEDIATE")
            finish_upstream(relay)
            wait_until(
                lambda: not_ready_because(daemon, "database is locked"), 20, "/readyz to say why"
            )
            assert {} == final_hooks(receiver)  # the completions wait for the lock
            assert before == history(daemon)  # reads go on under the lock (WAL)
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
    file), every write fails with a disk I/O error and /readyz says so, and no completion is
    recorded; with room again, cycles resume and every task finishes with one webhook, the
    history committed before intact.
    """
    path = tmp_path / "faults.db"
    config = write_config(tmp_path, relay.base_url, receiver.url, f"sqlite:///{path}")
    with running(config) as daemon:
        before = start_work(daemon, relay)
        soft, hard = resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE)
        resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (4096, hard))
        try:
            finish_upstream(relay)
            wait_until(lambda: not_ready_because(daemon, "disk"), 20, "/readyz to say why")
            assert {} == final_hooks(receiver)
        finally:
            resource.prlimit(daemon.pid, resource.RLIMIT_FSIZE, (soft, hard))
        finish_everything(daemon, receiver, before)
        assert 0 == daemon.stop()


@contextlib.contextmanager
def small_disk(where: Path) -> Iterator[Path]:
    """A tmpfs of DISK_SIZE mounted at ``where``, unmounted at the end; skips the test when
    this machine does not let us mount (not root, or no CAP_SYS_ADMIN in a container).
    """
    where.mkdir()
    command = ["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(where)]
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        pytest.skip("no mount command: the file size limit test stands in for a full disk")
    except subprocess.CalledProcessError as exc:
        why = (exc.stderr.strip() or f"exit {exc.returncode}").splitlines()[0]
        pytest.skip(f"cannot mount a tmpfs ({why}): the file size limit test stands in")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True, timeout=10)


def fill(disk: Path) -> Path:
    """A file taking every free byte of ``disk``; returns it once a write meets ENOSPC."""
    filler = disk / "filler"
    chunk = b"\0" * 4096
    with filler.open("wb", buffering=0) as out:
        try:
            while True:
                out.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


def test_a_full_file_system_fails_cycles_cleanly_and_loses_nothing(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """With the SQLite file on a small tmpfs filled to the last byte, writes fail with
    "database or disk is full", cycles fail cleanly (again once the relay reports the tasks
    completed) and /readyz says why; once the filler is removed, cycles resume and every task
    finishes with one webhook, the history committed before intact.
    """
    with small_disk(tmp_path / "disk") as disk:
        url = f"sqlite:///{disk / 'faults.db'}"
        with running(write_config(tmp_path, relay.base_url, receiver.url, url)) as daemon:
            before = start_work(daemon, relay)
            filler = fill(disk)
            used = {p.name: p.stat().st_size for p in disk.iterdir()}
            try:
                wait_until(
                    lambda: not_ready_because(daemon, "database or disk is full"),
                    20,
                    "/readyz to say why",
                )
                # The relay's completions arrive while the disk is full: a retry of the cycle
                # fails the same clean way, and none of them is recorded or sent.
                failed_before = cycle_failures(daemon)
                finish_upstream(relay)
                wait_until(
                    lambda: cycle_failures(daemon) > failed_before, 20, "a retry to fail too"
                )
                assert {} == final_hooks(receiver)
            finally:
                filler.unlink()
            finish_everything(daemon, receiver, before)
            # Failed cycles and passes are logged with their traceback; nothing else failed.
            failed = [e for e in daemon.events if "exception" in e]
            kinds = collections.Counter(e["event"] for e in failed)
            # Shown with -s, quoted in docs/reliability.md.
            print(f"full disk: bytes {used}, failed {dict(kinds)}")  # noqa: T201
            assert kinds["poll_cycle_failed"] >= 2
            assert set(kinds) <= {"poll_cycle_failed", "delivery_run_failed"}
            assert all("database or disk is full" in e["exception"] for e in failed)
            assert "Traceback" not in "\n".join(daemon.stderr)
            assert 0 == daemon.stop()
