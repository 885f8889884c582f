"""Start-up failures of the real `tracker` process: one line naming the cause, a documented code."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import base_config, merge, toml_text

from tracker import config
from tracker.app import Daemon
from tracker.startup import DatabaseLock, ExitCode, StartupError, database_problem
from tracker.testing.simulator import SimulatedRelay

REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("TRACKER_", "NOTIFY_"))}


def tracker(*argv: str, cwd: Path = REPO) -> subprocess.Popen[str]:
    """A `tracker` process, started and left running (several start in parallel)."""
    return subprocess.Popen(
        [sys.executable, "-m", "tracker", *argv],
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)  # generous: imports are slow on a busy machine
    return proc.returncode, out, err


def write(path: Path, document: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(toml_text(document))
    return path


def assert_one_line(code: int, expected: ExitCode, err: str, *says: str) -> None:
    lines = err.strip().splitlines()
    assert (expected, 1) == (code, len(lines)), err
    for part in says:
        assert part in lines[0], err
    assert "Traceback" not in err


def test_every_start_failure_is_one_line_with_its_exit_code(
    tmp_path: Path, relay: SimulatedRelay, listening: int
) -> None:
    """Port in use (3), missing database directory (4), database server down (4) and a schema
    from another version (5) each end `tracker run` with one stderr line naming the cause.
    """
    good = base_config(relay.base_url, None, f"sqlite:///{tmp_path / 'ok.db'}")
    foreign = tmp_path / "old.db"
    with sqlite3.connect(foreign) as conn:
        conn.execute("CREATE TABLE tracker_meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        conn.execute("INSERT INTO tracker_meta VALUES ('schema_version', '999')")
    down = "postgresql://postgres@127.0.0.1:1/tracker"
    cases = {
        "port": (
            {"server": {"port": listening}},
            ExitCode.LISTEN,
            (f"cannot listen on 127.0.0.1:{listening}", "change server.port"),
        ),
        "directory": (
            {"database": {"url": f"sqlite:///{tmp_path / 'nowhere' / 'x.db'}"}},
            ExitCode.DATABASE,
            (f"database directory {tmp_path / 'nowhere'} does not exist",),
        ),
        "server": (
            {"database": {"url": down}},
            ExitCode.DATABASE,
            (f"database {down} unreachable", "Connection refused"),
        ),
        "schema": (
            {"database": {"url": f"sqlite:///{foreign}"}},
            ExitCode.SCHEMA,
            ("(found '999')",),
        ),
    }
    procs = {
        name: tracker("run", "--config", str(write(tmp_path / f"{name}.toml", merge(good, o))))
        for name, (o, _, _) in cases.items()
    }
    for name, (_, expected, says) in cases.items():
        code, _, err = finish(procs[name])
        assert_one_line(code, expected, err, *says)
        assert "never retrieved" not in err, name


async def test_a_second_daemon_on_one_sqlite_file_names_the_first(
    tmp_path: Path, relay: SimulatedRelay
) -> None:
    """While one daemon runs on an SQLite file, `tracker run` on it exits 6 naming its pid."""
    document = base_config(relay.base_url, None, f"sqlite:///{tmp_path / 'one.db'}")
    first = Daemon(config.parse(document, environ={}))
    await first.start()
    try:
        proc = tracker("run", "--config", str(write(tmp_path / "c.toml", document)))
        code, _, err = finish(proc)
    finally:
        await first.stop()
    assert_one_line(code, ExitCode.LOCKED, err, f"{tmp_path / 'one.db'}", f"pid {os.getpid()}")

    # Once the first has stopped, the file is free again.
    second = Daemon(config.parse(document, environ={}))
    await second.start()
    await second.stop()


def test_the_lock_is_released_by_a_crash(tmp_path: Path) -> None:
    """A lock held by a process that died is free: the kernel drops it with the process."""
    database = tmp_path / "t.db"
    holder = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from tracker.startup import DatabaseLock; "
            "DatabaseLock(Path(sys.argv[1])).acquire(); sys.exit(0)",
            str(database),
        ],
        check=False,
        env=clean_env(),
    )
    assert 0 == holder.returncode
    lock = DatabaseLock(database)
    lock.acquire()
    with pytest.raises(StartupError) as refused:
        DatabaseLock(database).acquire()
    lock.release()
    assert ExitCode.LOCKED == refused.value.code


def test_database_problem_names_a_missing_directory_or_an_unusable_file(tmp_path: Path) -> None:
    """A missing directory and an unreadable file are named; a fine path or PostgreSQL is not."""
    assert database_problem(f"sqlite:///{tmp_path / 'a.db'}") is None
    assert database_problem("postgresql://x@127.0.0.1/db") is None
    missing = database_problem(f"sqlite:///{tmp_path / 'no' / 'a.db'}")
    assert missing is not None
    assert f"{tmp_path / 'no'} does not exist" in missing


@pytest.fixture(name="unwritable")
def _unwritable(tmp_path: Path) -> Iterator[Path]:
    """A database file this user cannot write: mode 0400, or immutable for root."""
    path = tmp_path / "ro.db"
    path.touch(mode=0o400)
    if os.geteuid() != 0:
        yield path
        return
    # Root writes any file whatever its mode; an immutable one it cannot.
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_database_file_is_named(unwritable: Path) -> None:
    """A database file this user cannot write is named by the check."""
    assert f"{unwritable} is not readable and writable" in (
        database_problem(f"sqlite:///{unwritable}") or ""
    )


def test_relative_sqlite_paths_resolve_against_the_config_directory(
    tmp_path: Path, relay: SimulatedRelay
) -> None:
    """The CLI run from two other directories reads and writes the file beside the config."""
    conf = write(
        tmp_path / "etc" / "t.toml",
        base_config(relay.base_url, "http://127.0.0.1:9/h", "sqlite:///t.db"),
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    added = finish(tracker("tasks", "add", "--config", str(conf), "luma", "x1", cwd=elsewhere))
    listed = finish(tracker("--json", "tasks", "list", "--config", str(conf), cwd=REPO))

    assert 0 == added[0], added
    assert (0, True, False) == (
        listed[0],
        (tmp_path / "etc" / "t.db").exists(),
        (elsewhere / "t.db").exists(),
    )
    assert '"task_id": "x1"' in listed[1]
    settings = config.load(conf)
    assert f"sqlite:///{tmp_path / 'etc' / 't.db'}" == settings.database.url


def test_check_config_names_a_missing_database_directory(
    tmp_path: Path, relay: SimulatedRelay
) -> None:
    """check-config exits 2 naming the directory that does not exist."""
    url = f"sqlite:///{tmp_path / 'gone' / 't.db'}"
    conf = write(tmp_path / "t.toml", base_config(relay.base_url, None, url))

    code, _, err = finish(tracker("check-config", "--config", str(conf)))

    assert 2 == code
    assert f"database.url: database directory {tmp_path / 'gone'} does not exist" in err
