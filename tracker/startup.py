"""What can stop tracker from starting, each as one line naming the cause and an exit code."""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import socket
from pathlib import Path

from sqlalchemy import exc as sa_exc

from tracker import config, sanitize


class ExitCode(enum.IntEnum):
    """The exit codes of every `tracker` command (the README's table lists them)."""

    OK = 0
    #: the command ran, but what it reports is missing or unhealthy
    FAILURE = 1
    #: bad arguments or an unusable config (placeholders included)
    USAGE = 2
    #: the API cannot listen (port in use, address not available, no permission)
    LISTEN = 3
    #: the database cannot be opened (missing directory, unwritable file, server down)
    DATABASE = 4
    #: the database schema is not the one this tracker expects
    SCHEMA = 5
    #: another tracker holds the SQLite file
    LOCKED = 6
    INTERRUPTED = 130


class StartupError(Exception):
    """Tracker cannot start; the message is the one line the operator sees."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code


def database_problem(url: str) -> str | None:
    """Why the SQLite file of ``url`` cannot be opened for writing, or None.

    Checked before SQLAlchemy is asked, whose error would not name the path.
    """
    path = config.sqlite_path(url)
    if path is None:
        return None
    directory = path.parent
    if not directory.is_dir():
        return f"database directory {directory} does not exist (database url {url})"
    if path.exists():
        if not os.access(path, os.R_OK | os.W_OK):
            return f"database file {path} is not readable and writable by this user"
    elif not os.access(directory, os.W_OK | os.X_OK):
        return f"database directory {directory} is not writable by this user (to create {path})"
    return None


def start_problems(settings: config.Settings) -> list[str]:
    """What `tracker run` refuses to start with beyond the file's own keys, one line each by
    key: the example's placeholders, a database URL that cannot be read or an unusable SQLite
    file, platforms that cannot be built. check-config lists them all; a reload refuses them.
    """
    from tracker import platforms  # noqa: PLC0415 - httpx and the adapters, only when asked

    problems = config.placeholder_problems(settings)
    if shown_url(settings.database.url) is None:
        # Said without the URL, which may hold a password.
        problems.append(
            "database.url: not a database URL (is the port a number, the password %-encoded?)"
        )
    else:
        database = database_problem(settings.database.url)
        if database is not None:
            problems.append(f"database.url: {database}")
    try:
        platforms.build(settings)
    except config.ConfigError as exc:
        problems += exc.problems
    return problems


def check_database(url: str) -> None:
    """Raise StartupError (DATABASE) when the SQLite file of ``url`` is unusable."""
    problem = database_problem(url)
    if problem is not None:
        raise StartupError(problem, ExitCode.DATABASE)


def shown_url(url: str) -> str | None:
    """``url`` as it may be shown (in a line, a log, check-config), its password as ***; None
    when SQLAlchemy cannot read it.
    """
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - cold path

    try:
        parsed = make_url(url)
    except (sa_exc.ArgumentError, ValueError):
        return None
    if "@" in (parsed.host or ""):
        return None  # a password with a bare "@": part of it would show as the host
    hidden = {k: "***" for k in parsed.query if k.lower() in sanitize.SECRET_QUERY_KEYS}
    return parsed.update_query_dict(hidden).render_as_string(hide_password=True)


def unreachable(
    url: str | None, exc: sa_exc.SQLAlchemyError, what: str = "unreachable"
) -> StartupError:
    """The one-line error for a database that refused to open (or, ``what`` "failed", one
    whose statement failed once open), naming where (no password) and the driver's cause."""
    where = (shown_url(url) if url else None) or "(an unreadable URL)"
    cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return StartupError(
        f"database {where} {what}: {cause[0] if cause else type(exc).__name__}",
        ExitCode.DATABASE,
    )


class DatabaseLock:
    """An exclusive lock on ``<database>.lock`` beside an SQLite file, holding our pid.

    SQLite serves one daemon: two would both release each other's delivery leases at start.
    flock is dropped by the kernel when the process dies, so a crash leaves no stale lock.
    """

    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise StartupError (LOCKED) naming the process that holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StartupError(
                f"cannot create the lock file {self.path}: {exc.strerror}", ExitCode.DATABASE
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                message = f"cannot lock {self.path}: {exc.strerror}"
                raise StartupError(message, ExitCode.DATABASE) from None
            database = self.path.with_suffix("")
            raise StartupError(
                f"{database} is in use by another tracker (pid {holder}); SQLite serves one "
                "daemon: stop that one, or use PostgreSQL to run several",
                ExitCode.LOCKED,
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the next daemon start (the file stays: removing it would race a newcomer)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for the API, or StartupError (LISTEN) saying why not."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise StartupError(
            f"cannot listen on {shown}: {exc.strerror} (server.host)", ExitCode.LISTEN
        ) from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = " (another process listens there; change server.port)"
        raise StartupError(
            f"cannot listen on {shown}: {exc.strerror}"
            + (hint if exc.errno == errno.EADDRINUSE else ""),
            ExitCode.LISTEN,
        ) from None
    return sock
