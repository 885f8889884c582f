"""The operator CLI and the database: no command but `tracker db upgrade` upgrades an older
schema (it refuses, exit 5, naming that command), and a database that fails once open (locked,
gone) is one line naming it, exit 4, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from conftest import base_config, merge, toml_text
from test_cli import _config_file, run  # noqa: F401 - _config_file is the config_file fixture
from test_cli_errors import json_error
from test_migrations import make_release_0_1_database, state_of

from tracker.cli import common
from tracker.store import engine, migrate

#: every command that opens the store to read or write rows (not the `db` commands that
#: report or upgrade the schema itself)
READS = [
    ["tasks", "list"],
    ["tasks", "show", "luma", "done-1"],
    ["stats"],
    ["deliveries", "list"],
    ["db", "prune", "--dry-run"],
]
WRITES = [
    ["tasks", "add", "luma", "x1", "--webhook-url", "https://8.8.8.8/h"],
    ["tasks", "remove", "luma", "done-1"],
    ["db", "prune"],
    ["deliveries", "redeliver", "1"],
    ["deliveries", "recover", "--since", "2020-01-01T00:00:00Z"],
]
SCHEMA_EXIT = 5  # the README's exit code table
DATABASE_EXIT = 4


def config_for(tmp_path: Path, url: str, **database: object) -> list[str]:
    """--config of a config file on ``url`` (no relay is asked: none of these commands polls)."""
    document = merge(base_config("http://127.0.0.1:9", None, url), {"database": database})
    path = tmp_path / "config.toml"
    path.write_text(toml_text(document))
    return ["--config", str(path)]


def still_release_0_1(url: str) -> bool:
    state = state_of(url)
    return (migrate.Shape.RELEASE_0_1, migrate.BASELINE) == (state.shape, state.revision)


# -- an older schema ---------------------------------------------------------------------------


@pytest.mark.parametrize("argv", READS + WRITES, ids=" ".join)
def test_commands_refuse_an_older_schema_and_leave_it_as_it_is(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """On SQLite auto_migrate is on, yet a command run beside an older daemon (a new release
    installed, not yet restarted) does not upgrade under it: it exits 5 naming the command that
    does, and the revision stays where it was.
    """
    make_release_0_1_database(sqlite_url)
    c = config_for(tmp_path, sqlite_url, auto_migrate=True)

    code, out, err = run(capsys, *argv, *c)

    assert (SCHEMA_EXIT, "") == (code, out)
    [line] = err.splitlines()
    assert line.startswith("tracker: database: database schema is at revision 0001")
    assert f"run `{migrate.UPGRADE_COMMAND}`" in line
    assert still_release_0_1(sqlite_url)
    assert 1 == run(capsys, "db", "current", *c)[0]  # still behind


@pytest.mark.parametrize("argv", [READS[0], WRITES[0]], ids=" ".join)
def test_with_json_the_refusal_is_one_json_object(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """A script reading --json gets the schema's exit code and the command to run."""
    make_release_0_1_database(sqlite_url)

    code, out, err = run(capsys, *argv, *config_for(tmp_path, sqlite_url), "--json")

    error = json_error(err)
    assert (SCHEMA_EXIT, "", SCHEMA_EXIT) == (code, out, error["exit_code"])
    assert "tracker db upgrade" in error["error"]
    assert still_release_0_1(sqlite_url)


def test_db_upgrade_upgrades_and_then_the_commands_work(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The refusal's advice works: after `tracker db upgrade` the same command answers, from
    the rows release 0.1.0 left.
    """
    make_release_0_1_database(sqlite_url)
    c = [*config_for(tmp_path, sqlite_url), "--json"]
    assert SCHEMA_EXIT == run(capsys, "tasks", "show", "luma", "done-1", *c)[0]

    assert 0 == run(capsys, "db", "upgrade", *c)[0]
    assert state_of(sqlite_url).up_to_date
    code, out, _ = run(capsys, "tasks", "show", "luma", "done-1", *c)
    assert (0, "done-1") == (code, json.loads(out)["task_id"])


@pytest.mark.postgres
def test_an_older_postgresql_schema_is_not_upgraded_by_a_command_even_with_auto_migrate(
    tmp_path: Path, make_pg_url: Callable[[], str], capsys: pytest.CaptureFixture[str]
) -> None:
    """auto_migrate is the daemon's start's rule, not the CLI's: where several instances share
    one schema, `tasks list` from one host must not change it under the others.
    """
    url = make_pg_url()
    make_release_0_1_database(url)

    code, _, err = run(capsys, "tasks", "list", *config_for(tmp_path, url, auto_migrate=True))

    assert SCHEMA_EXIT == code
    assert "tracker db upgrade" in err
    assert still_release_0_1(url)


# -- a database that fails once open ------------------------------------------------------------


@pytest.fixture(name="locked")
def _locked(
    config_file: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> Iterator[list[str]]:
    """--config of a database another connection holds with BEGIN EXCLUSIVE."""
    c = ["--config", str(config_file)]
    # A brand-new file gets the schema from any command, as before.
    assert 0 == run(capsys, "tasks", "list", *c)[0]
    assert state_of(sqlite_url).up_to_date
    holder = sqlite3.connect(sa.make_url(sqlite_url).database or "", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        yield c
    finally:
        holder.rollback()
        holder.close()


@pytest.fixture(name="short_busy_timeout")
def _short_busy_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite connections opened from here on wait 50 ms for a lock, not 5 s."""
    monkeypatch.setattr(engine, "SQLITE_BUSY_TIMEOUT_MS", 50)


def test_a_locked_database_is_one_json_object_after_the_busy_timeout(
    locked: list[str], sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """With the real busy timeout (5 s: the one slow case), a registration that cannot get
    the lock exits 4 with one JSON object naming the database and the cause.
    """
    code, out, err = run(capsys, "--json", "tasks", "add", "luma", "x1", *locked)

    error = json_error(err)
    assert (DATABASE_EXIT, "", DATABASE_EXIT) == (code, out, error["exit_code"])
    assert error["error"] == f"database {sqlite_url} failed: database is locked"


@pytest.mark.parametrize(
    "argv",
    [
        ["tasks", "add", "luma", "x1", "--webhook-url", "https://8.8.8.8/h"],
        ["db", "prune"],
        ["db", "upgrade"],
        ["deliveries", "recover", "--since", "2020-01-01T00:00:00Z"],
    ],
    ids=" ".join,
)
@pytest.mark.parametrize("as_json", [False, True], ids=["human", "json"])
@pytest.mark.usefixtures("short_busy_timeout")
def test_a_locked_database_is_one_line_exit_4_never_a_traceback(
    locked: list[str],
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    as_json: bool,
) -> None:
    """The same for every write, on a terminal and with --json (the busy timeout shortened
    here: the case above waits the real one).
    """
    code, out, err = run(capsys, *argv, *locked, *(["--json"] if as_json else []))

    assert (DATABASE_EXIT, "") == (code, out)
    [line] = err.splitlines()
    cause = f"database {sqlite_url} failed: database is locked"
    if as_json:
        assert cause == json_error(err)["error"]
    else:
        assert f"tracker: {cause}" == line


def test_a_database_failure_never_shows_the_password() -> None:
    """The line names the database as startup's do: the password (in the URL or its query)
    as ***, and the driver's cause, first line only.
    """
    args = argparse.Namespace(
        database_url="postgresql://tracker:hunter2pw@db.example:5432/t?sslpassword=hunter2pw"
    )
    exc = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection\nmore"))

    failed = common.failure(args, exc)

    line = str(failed)
    assert (4, False) == (failed.code, "hunter2pw" in line)
    assert line == (
        "database postgresql://tracker:***@db.example:5432/t?sslpassword=%2A%2A%2A failed: "
        "server closed the connection"
    )
