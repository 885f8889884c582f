"""What every command shares: the config it names, the database it opens, the exit codes."""

from __future__ import annotations

import argparse
import os
import shlex
from typing import TYPE_CHECKING, Any

from tracker import config, startup
from tracker.startup import ExitCode

if TYPE_CHECKING:
    from sqlalchemy.exc import DBAPIError

    from tracker.store import SqlStore
    from tracker.store.abc import Store

#: exit codes scripts can rely on (the README's table lists them all)
EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE
#: why a command refuses an older schema, after the command that upgrades it
ONLY_UPGRADES = (
    "no other command upgrades it; the daemon's start does when [database].auto_migrate is on"
)


def config_path(args: argparse.Namespace) -> str:
    """The config file named by --config, else by TRACKER_CONFIG."""
    path = named_config(args)
    if path is None:
        raise config.ConfigError(
            ["no config file: pass --config PATH or set TRACKER_CONFIG; `tracker init` writes one"]
        )
    return path


def named_config(args: argparse.Namespace) -> str | None:
    """The config file named by --config, else by TRACKER_CONFIG; None when neither is set."""
    path = getattr(args, "config", None) or os.environ.get("TRACKER_CONFIG")
    return str(path) if path else None


def read(path: str) -> dict[str, Any]:
    """The config file at ``path`` decoded, not validated; when there is no such file, the
    error says that `tracker init` writes one there."""
    try:
        return config.read(path)
    except config.ConfigError as exc:
        if os.path.lexists(path):
            raise
        hint = f"; `tracker init --config {shlex.quote(path)}` writes one"
        raise config.ConfigError([exc.problems[0] + hint, *exc.problems[1:]]) from None


def load_file(path: str) -> config.Settings:
    """The settings of the config file at ``path`` (see ``read``)."""
    return config.from_document(read(path), path)


def load(args: argparse.Namespace) -> config.Settings:
    """The settings of the config file the command names."""
    return load_file(config_path(args))


def known_platform(args: argparse.Namespace, name: str | None) -> None:
    """Refuse a platform the config does not define (a typo would read as "no such task")."""
    from tracker import platforms  # noqa: PLC0415

    known = sorted(platforms.build(load(args)))
    if name is not None and name not in known:
        raise config.ConfigError([f"unknown platform {name!r}; known: {', '.join(known)}"])


def database(args: argparse.Namespace, *, create: bool = True) -> SqlStore:
    """The SQL store itself, for the ``db`` commands that work on its engine.

    With ``create`` an empty database gets the schema, as at the daemon's start, and an older
    one is refused (SchemaOutdatedError, exit 5) naming `tracker db upgrade`, whatever
    ``[database].auto_migrate`` says: only that command and the daemon's start upgrade, never
    a command run beside an older daemon still serving the database. Without it the database
    is only opened, whatever its schema (for the ``db`` commands that report or upgrade it).
    """
    from sqlalchemy import exc as sa_exc  # noqa: PLC0415

    from tracker.store import SchemaMismatchError, SqlStore, migrate  # noqa: PLC0415

    url = load(args).database.url
    startup.check_database(url)
    # Where a database error met later is said to come from (see `failure`).
    args.database_url = url
    store = SqlStore.from_url(url)
    try:
        if create:
            # Never upgraded here: a command may run beside an older daemon still serving it.
            migrate.ensure(store.engine, auto_migrate=False, hint=ONLY_UPGRADES)
        else:
            store.engine.connect().close()
    except sa_exc.SQLAlchemyError as exc:
        store.close()
        raise startup.unreachable(url, exc) from None
    except SchemaMismatchError:
        store.close()
        raise
    return store


def store(args: argparse.Namespace) -> Store:
    """The store as the task and delivery commands use it."""
    return database(args)


def failure(args: argparse.Namespace, exc: DBAPIError) -> startup.StartupError:
    """A database error met once the store is open (a locked SQLite file, a server gone) as
    one line (exit code DATABASE): the database, never its password, and the driver's cause.
    """
    url: str | None = getattr(args, "database_url", None)
    if url is None:  # not opened by `database` (`tracker run`): the config names it
        try:
            url = load(args).database.url
        except config.ConfigError:
            url = None
    return startup.unreachable(url, exc, "failed")
