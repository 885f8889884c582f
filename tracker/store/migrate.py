"""Schema upgrades: the Alembic migrations shipped in tracker/store/migrations, run by tracker.

A database is in one of three shapes: empty (no tracker tables), made by release 0.1.0
(``create_all`` plus a ``schema_version`` row in ``tracker_meta``, no ``alembic_version``), or
managed by these migrations. The second is adopted by stamping the baseline revision, whose
tables it already has, and upgrading from there; nothing is copied or rebuilt.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import io
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

from tracker.store.engine import SchemaMismatchError

#: where the migrations live, as a package resource (so it works from a wheel too)
SCRIPT_LOCATION = "tracker.store:migrations"
#: the revision whose tables release 0.1.0 created; such databases are stamped with it
BASELINE = "0001"
#: what release 0.1.0 wrote in tracker_meta (it refuses any other value)
RELEASE_0_1_SCHEMA_VERSION = "1"
#: PostgreSQL advisory lock held while upgrading: daemons starting together take turns
LOCK_KEY = 868686
#: the command an operator runs when the daemon refuses an older schema
UPGRADE_COMMAND = "tracker db upgrade --config PATH"


class SchemaOutdatedError(SchemaMismatchError):
    """The database schema is older than this tracker and automatic upgrades are off."""


class UnknownSchemaError(SchemaMismatchError):
    """The database holds a schema this tracker does not know (a newer release wrote it?)."""


class Shape(enum.StrEnum):
    """What a database holds before tracker touches it."""

    #: no tracker tables yet
    EMPTY = "empty"
    #: tables made by release 0.1.0, without a migration history
    RELEASE_0_1 = "release-0.1.0"
    #: a revision recorded in alembic_version
    MANAGED = "managed"


@dataclasses.dataclass(frozen=True, slots=True)
class SchemaState:
    """Where a database stands against the migrations this tracker ships."""

    shape: Shape
    revision: str | None  #: the recorded revision (BASELINE for a release 0.1.0 database)
    head: str  #: the newest revision this tracker knows

    @property
    def up_to_date(self) -> bool:
        """Whether the database has exactly the schema this tracker needs."""
        return self.shape is Shape.MANAGED and self.revision == self.head

    def describe(self) -> str:
        """One line for an operator: the revision, or why there is none."""
        if self.shape is Shape.EMPTY:
            return "empty (no tracker tables)"
        if self.shape is Shape.RELEASE_0_1:
            return f"{self.revision} (tables of release 0.1.0, not yet adopted)"
        return f"{self.revision}"


@dataclasses.dataclass(frozen=True, slots=True)
class RevisionInfo:
    """One migration, as `tracker db history` lists it."""

    revision: str
    down_revision: str | None
    title: str


@functools.cache
def script() -> ScriptDirectory:
    """The shipped migration scripts (read once per process)."""
    return ScriptDirectory.from_config(_config())


def head() -> str:
    """The newest revision this tracker ships."""
    newest = script().get_current_head()
    if newest is None:  # pragma: no cover - the package always ships revisions
        raise RuntimeError("no migrations found in the tracker package")
    return newest


def history() -> list[RevisionInfo]:
    """Every shipped migration, oldest first."""
    found = [
        RevisionInfo(
            revision=rev.revision,
            down_revision=_single(rev.down_revision),
            title=(rev.doc or "").strip().splitlines()[0] if rev.doc else "",
        )
        for rev in script().walk_revisions()
    ]
    return list(reversed(found))


def current(engine: sa.Engine) -> SchemaState:
    """Where ``engine``'s database stands (read only)."""
    with engine.connect() as conn, conn.begin():
        return _state(conn)


def upgrade(engine: sa.Engine) -> tuple[SchemaState, SchemaState]:
    """Bring the database to the newest revision; returns the states before and after.

    One transaction (SQLite and PostgreSQL both have transactional DDL): a failed upgrade
    leaves the database as it was. A release 0.1.0 database is stamped with the baseline
    first. On PostgreSQL an advisory lock makes instances that start together take turns;
    on SQLite the write transaction (BEGIN IMMEDIATE) does the same.
    """
    with engine.connect() as conn:
        conn.execution_options(tracker_write=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Wait as long as it takes, for this transaction only: for the lock while
                # another instance upgrades, and for the tables a migration alters while
                # queries of running instances use them (no PG_LOCK_TIMEOUT_MS here).
                conn.exec_driver_sql("SET LOCAL lock_timeout = 0")
                conn.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": LOCK_KEY})
            before = _state(conn)
            if not before.up_to_date:
                config = _config(conn)
                if before.shape is Shape.RELEASE_0_1:
                    command.stamp(config, BASELINE)
                command.upgrade(config, "head")
            after = _state(conn)
    return before, after


def ensure(
    engine: sa.Engine,
    *,
    auto_migrate: bool,
    hint: str = "or set [database].auto_migrate = true",
) -> SchemaState:
    """Make sure the schema is current before the daemon uses it.

    An empty database always gets the schema (no instance can be using an older one). An
    older schema is upgraded when ``auto_migrate`` is on and refused otherwise, naming the
    command that upgrades it (and ``hint``, after it in brackets).
    """
    state = current(engine)
    if state.up_to_date:
        return state
    if state.shape is not Shape.EMPTY and not auto_migrate:
        raise SchemaOutdatedError(
            f"database schema is at revision {state.describe()}, this tracker needs "
            f"{state.head}: run `{UPGRADE_COMMAND}` ({hint})"
        )
    _, after = upgrade(engine)
    return after


def _state(conn: sa.Connection) -> SchemaState:
    newest = head()
    tables = set(sa.inspect(conn).get_table_names())
    revision = MigrationContext.configure(conn).get_current_revision()
    if revision is not None:
        try:
            script().get_revision(revision)
        except CommandError:
            raise UnknownSchemaError(
                f"database schema revision {revision!r} is unknown to this tracker, whose "
                f"newest is {newest!r}: was it written by a newer release?"
            ) from None
        return SchemaState(Shape.MANAGED, revision, newest)
    if not tables & {"tasks", "tracker_meta"}:
        return SchemaState(Shape.EMPTY, None, newest)
    found = _release_0_1_version(conn, tables)
    if found != RELEASE_0_1_SCHEMA_VERSION:
        raise UnknownSchemaError(
            "database has tracker tables but neither a migration history nor the "
            f"schema_version {RELEASE_0_1_SCHEMA_VERSION!r} of release 0.1.0 (found {found!r})"
        )
    return SchemaState(Shape.RELEASE_0_1, BASELINE, newest)


def _release_0_1_version(conn: sa.Connection, tables: set[str]) -> str | None:
    if "tracker_meta" not in tables:
        return None
    meta = sa.table("tracker_meta", sa.column("key"), sa.column("value"))
    value = conn.execute(sa.select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
    return None if value is None else str(value)


def _config(conn: sa.Connection | None = None) -> Config:
    # No ini file: everything env.py needs comes from here. Alembic's own progress lines go
    # to a buffer, not to stdout, which belongs to the CLI's output.
    config = Config(stdout=io.StringIO())
    config.set_main_option("script_location", SCRIPT_LOCATION)
    if conn is not None:
        config.attributes["connection"] = conn
    return config


def _single(value: str | Sequence[str] | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return ",".join(value)
