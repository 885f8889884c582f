"""What every command shares: the config it names, the database it opens, the exit codes."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from tracker import config, startup
from tracker.startup import ExitCode

if TYPE_CHECKING:
    from tracker.store import SqlStore
    from tracker.store.abc import Store

#: exit codes scripts can rely on (the README's table lists them all)
EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE


def config_path(args: argparse.Namespace) -> str:
    """The config file named by --config, else by TRACKER_CONFIG."""
    path = args.config or os.environ.get("TRACKER_CONFIG")
    if not path:
        raise config.ConfigError(["no config file: pass --config PATH or set TRACKER_CONFIG"])
    return str(path)


def load(args: argparse.Namespace) -> config.Settings:
    """The settings of the config file the command names."""
    return config.load(config_path(args))


def known_platform(args: argparse.Namespace, name: str | None) -> None:
    """Refuse a platform the config does not define (a typo would read as "no such task")."""
    from tracker import platforms  # noqa: PLC0415

    known = sorted(platforms.build(load(args)))
    if name is not None and name not in known:
        raise config.ConfigError([f"unknown platform {name!r}; known: {', '.join(known)}"])


def database(args: argparse.Namespace, *, create: bool = True) -> SqlStore:
    """The SQL store itself, for the ``db`` commands that work on its engine."""
    from sqlalchemy import exc as sa_exc  # noqa: PLC0415

    from tracker.store import SqlStore, migrate  # noqa: PLC0415

    settings = load(args)
    url = settings.database.url
    startup.check_database(url)
    store = SqlStore.from_url(url)
    try:
        if create:
            # The same rule as the daemon's start: an empty database gets the schema, an older
            # one is upgraded only when auto_migrate allows it.
            migrate.ensure(store.engine, auto_migrate=settings.database.auto_migrate)
        else:
            store.engine.connect().close()
    except sa_exc.SQLAlchemyError as exc:
        raise startup.unreachable(url, exc) from None
    return store


def store(args: argparse.Namespace) -> Store:
    """The store as the task and delivery commands use it."""
    return database(args)
