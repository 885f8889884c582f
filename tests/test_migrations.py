"""Schema migrations: they build exactly the models' schema, adopt release 0.1.0 databases
without loss, take turns on PostgreSQL, and the daemon refuses an older schema when told to.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import base_config, merge, toml_text
from sqlmodel import SQLModel

from tracker import cli, config
from tracker.app import Daemon
from tracker.store import Registration, SqlStore, migrate
from tracker.store.models import UTCDateTime
from tracker.store.sql import make_engine
from tracker.testing.simulator import SimulatedRelay

FIXTURES = Path(__file__).parent / "fixtures"
T0 = datetime(2026, 1, 1, tzinfo=UTC)
T1 = datetime(2026, 1, 1, 0, 5, tzinfo=UTC)

# The columns of release 0.1.0, typed as it wrote them. Kept apart from the models so the
# test goes on checking the same old rows whatever later migrations add.
_STR, _INT, _F, _JSON, _BOOL = sa.String, sa.Integer, sa.Float, sa.JSON, sa.Boolean
_TIME = UTCDateTime
RELEASE_0_1: dict[str, dict[str, Any]] = {
    "tasks": {
        "id": _INT, "platform": _STR, "task_id": _STR, "status": _STR, "upstream_status": _STR,
        "progress": _INT, "upstream_progress": _STR, "fail_reason": _STR, "metadata": _JSON,
        "webhook_url": _STR, "endpoint": _STR, "events": _JSON, "result": _JSON,
        "created_at": _TIME, "updated_at": _TIME, "finished_at": _TIME, "next_poll_at": _F,
        "last_change_at": _F, "missing_since": _F,
    },
    "transitions": {
        "id": _INT, "task_pk": _INT, "from_status": _STR, "to_status": _STR,
        "upstream_status": _STR, "progress": _INT, "at": _TIME,
    },
    "deliveries": {
        "id": _INT, "webhook_id": _STR, "task_pk": _INT, "platform": _STR, "task_id": _STR,
        "event_type": _STR, "payload": _STR, "url": _STR, "endpoint": _STR, "guarded": _BOOL,
        "state": _STR, "attempts": _INT, "next_attempt_at": _F, "claimed_until": _F,
        "created_at": _TIME, "last_attempt_at": _TIME, "last_status_code": _INT,
        "last_error": _STR, "delivered_at": _TIME,
    },
    "delivery_attempts": {
        "id": _INT, "delivery_pk": _INT, "at": _TIME, "url": _STR, "status_code": _INT,
        "error": _STR, "latency_ms": _F, "response_excerpt": _STR,
    },
    "tracker_meta": {"key": _STR, "value": _STR},
}  # fmt: skip

ROWS: dict[str, list[dict[str, Any]]] = {
    "tasks": [
        {
            "id": 1, "platform": "luma", "task_id": "done-1", "status": "completed",
            "upstream_status": "SUCCESS", "progress": 100, "upstream_progress": "100%",
            "fail_reason": "", "metadata": {"user": "ü", "n": 1}, "webhook_url": "http://h/x",
            "endpoint": None, "events": ["task.completed"], "result": {"url": "http://r/1"},
            "created_at": T0, "updated_at": T1, "finished_at": T1, "next_poll_at": None,
            "last_change_at": T1.timestamp(), "missing_since": None,
        },
        {
            "id": 2, "platform": "suno", "task_id": "running-2", "status": "in_progress",
            "upstream_status": "IN_PROGRESS", "progress": 40, "upstream_progress": "40%",
            "fail_reason": "", "metadata": None, "webhook_url": None, "endpoint": "main",
            "events": None, "result": None, "created_at": T0, "updated_at": T1,
            "finished_at": None, "next_poll_at": T1.timestamp() + 10.5,
            "last_change_at": T1.timestamp(), "missing_since": T1.timestamp() - 3,
        },
    ],
    "transitions": [
        {"id": 1, "task_pk": 1, "from_status": "pending", "to_status": "in_progress",
         "upstream_status": "IN_PROGRESS", "progress": 10, "at": T0},
        {"id": 2, "task_pk": 1, "from_status": "in_progress", "to_status": "completed",
         "upstream_status": "SUCCESS", "progress": 100, "at": T1},
    ],
    "deliveries": [
        {"id": 1, "webhook_id": "msg_a", "task_pk": 1, "platform": "luma", "task_id": "done-1",
         "event_type": "task.completed", "payload": '{"type":"task.completed"}',
         "url": "http://h/x", "endpoint": None, "guarded": True, "state": "delivered",
         "attempts": 2, "next_attempt_at": T1.timestamp(), "claimed_until": None,
         "created_at": T1, "last_attempt_at": T1, "last_status_code": 200, "last_error": None,
         "delivered_at": T1},
        {"id": 2, "webhook_id": "msg_b", "task_pk": 1, "platform": "luma", "task_id": "done-1",
         "event_type": "task.completed", "payload": "{}", "url": "http://h/y",
         "endpoint": "main", "guarded": False, "state": "dead", "attempts": 9,
         "next_attempt_at": T1.timestamp(), "claimed_until": T1.timestamp() + 30,
         "created_at": T1, "last_attempt_at": T1, "last_status_code": 500,
         "last_error": "HTTP 500", "delivered_at": None},
    ],
    "delivery_attempts": [
        {"id": 1, "delivery_pk": 1, "at": T0, "url": "http://h/x", "status_code": 503,
         "error": "HTTP 503", "latency_ms": 12.5, "response_excerpt": "busy"},
        {"id": 2, "delivery_pk": 1, "at": T1, "url": "http://h/x", "status_code": 200,
         "error": None, "latency_ms": 3.25, "response_excerpt": ""},
    ],
    "tracker_meta": [  # in key order, as snapshot() reads them
        {"key": "last_cycle_at", "value": "2026-01-01T00:05:00+00:00"},
        {"key": "schema_version", "value": "1"},
    ],
}  # fmt: skip


def _old_table(name: str) -> sa.TableClause:
    return sa.table(name, *(sa.column(c, t()) for c, t in RELEASE_0_1[name].items()))


def make_release_0_1_database(url: str) -> None:
    """A database as release 0.1.0 left it: its DDL (saved verbatim) and rows in every table."""
    engine = make_engine(url)
    ddl = (FIXTURES / f"schema_release1_{engine.dialect.name}.sql").read_text()
    statements = [s for s in ddl.split(";") if s.strip().replace("\n", "").strip("- ")]
    try:
        with engine.begin() as conn:
            for statement in statements:
                body = "\n".join(ln for ln in statement.splitlines() if not ln.startswith("--"))
                if body.strip():
                    conn.exec_driver_sql(body)
            for name, rows in ROWS.items():
                conn.execute(_old_table(name).insert(), rows)
            if engine.dialect.name == "postgresql":
                # Rows inserted with explicit ids, as the old release's sequences had advanced.
                for name in ("tasks", "transitions", "deliveries", "delivery_attempts"):
                    conn.exec_driver_sql(
                        f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), 100)"
                    )
    finally:
        engine.dispose()


def snapshot(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of release 0.1.0's columns, in key order; a task's next_poll_at read from
    its polls row once revision 0004 has moved it there (None: no row, the task is final)."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            moved = sa.inspect(conn).has_table("polls")
            found = {}
            for name, columns in RELEASE_0_1.items():
                table = _old_table(name)
                order = table.c.key if name == "tracker_meta" else table.c.id
                query = sa.select(table).order_by(order)
                if name == "tasks" and moved:
                    polls = sa.table("polls", sa.column("task_pk"), sa.column("next_poll_at", _F))
                    kept = [c for c in table.c if c.name != "next_poll_at"]
                    query = (
                        sa.select(*kept, polls.c.next_poll_at)
                        .select_from(table.outerjoin(polls, polls.c.task_pk == table.c.id))
                        .order_by(order)
                    )
                found[name] = [dict(r._mapping) for r in conn.execute(query)]
                assert all(set(columns) == set(r) for r in found[name])
    finally:
        engine.dispose()
    return found


def schema_diff(url: str) -> list[Any]:
    """What alembic's autogenerate would change to make the database match the models."""
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            context = MigrationContext.configure(
                conn, opts={"compare_type": True, "compare_server_default": True}
            )
            diff: list[Any] = compare_metadata(context, SQLModel.metadata)
    finally:
        engine.dispose()
    return diff


def state_of(url: str) -> migrate.SchemaState:
    engine = make_engine(url)
    try:
        return migrate.current(engine)
    finally:
        engine.dispose()


def upgrade(url: str) -> tuple[migrate.SchemaState, migrate.SchemaState]:
    engine = make_engine(url)
    try:
        return migrate.upgrade(engine)
    finally:
        engine.dispose()


# -- the migrations against the models ------------------------------------------------------


def test_migrations_build_exactly_the_models_schema(db_url: str) -> None:
    """Upgrading an empty database gives every table, column, type, index and constraint of
    the models, nothing more (alembic check's comparison comes back empty).

    When this fails after a model change: write the migration with
    ``alembic -x url=sqlite:///dev.db upgrade head`` then
    ``alembic -x url=sqlite:///dev.db revision --autogenerate -m "..."`` and review it.
    """
    before, after = upgrade(db_url)

    assert (migrate.Shape.EMPTY, None) == (before.shape, before.revision)
    assert after.up_to_date
    assert [] == schema_diff(db_url)


def test_the_shipped_history_is_one_line_from_the_baseline_to_head() -> None:
    """Revisions chain without branches from the release 0.1.0 baseline to the head."""
    history = migrate.history()

    assert migrate.BASELINE == history[0].revision
    assert history[0].down_revision is None
    assert migrate.head() == history[-1].revision
    for older, newer in itertools.pairwise(history):
        assert older.revision == newer.down_revision
    assert all(r.title for r in history)


# -- adopting release 0.1.0 databases --------------------------------------------------------


def test_a_release_0_1_database_is_adopted_and_upgraded_without_losing_a_row(
    db_url: str,
) -> None:
    """A database written by release 0.1.0, rows in every table, is stamped with the baseline
    and upgraded in place: every old row reads back the same, and the schema is the models'.
    """
    make_release_0_1_database(db_url)
    old = snapshot(db_url)
    assert migrate.Shape.RELEASE_0_1 == state_of(db_url).shape

    before, after = upgrade(db_url)

    assert (migrate.Shape.RELEASE_0_1, migrate.BASELINE) == (before.shape, before.revision)
    assert after.up_to_date
    assert [] == schema_diff(db_url)
    new = snapshot(db_url)
    # The one intended change: release 0.1.0 must refuse the upgraded database.
    assert {"key": "schema_version", "value": "2"} == new["tracker_meta"][1]
    new["tracker_meta"][1]["value"] = "1"
    assert ROWS == old
    assert old == new


def test_the_store_works_on_an_adopted_database(db_url: str) -> None:
    """Old tasks keep their history and deliveries their logs; new rows get fresh ids; the
    live task is claimed at the next poll it had planned, the final one never."""
    make_release_0_1_database(db_url)
    upgrade(db_url)
    store = SqlStore.from_url(db_url)
    try:
        done = store.get("luma", "done-1")
        new, existing = store.register(Registration("luma", ["done-1", "new-1"]), datetime.now(UTC))
        deliveries, _ = store.list_deliveries(limit=10)
        stats = store.stats()
        planned = T1.timestamp() + 10.5
        early = store.claim_due(datetime.fromtimestamp(planned - 1, UTC), 10, lease=5)
        due = store.claim_due(datetime.fromtimestamp(planned + 1, UTC), 10, lease=5)
    finally:
        store.close()

    assert [] == early
    assert [("running-2", planned)] == [(t.task_id, t.planned) for t in due]

    assert done is not None
    assert ({"user": "ü", "n": 1}, {"url": "http://r/1"}) == (done.metadata, done.result)
    assert ["in_progress", "completed"] == [t.to_status for t in done.transitions]
    assert (["new-1"], ["done-1"]) == (new, existing)
    assert [[], [503, 200]] == [[a.status_code for a in d.log] for d in deliveries]
    assert {"delivered": 1, "dead": 1} == dict(stats.deliveries)


def test_an_sqlite_too_old_to_drop_a_column_keeps_it_empty_and_polls_from_the_new_table(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With SQLite before 3.35 (no ALTER TABLE ... DROP COLUMN), revision 0004 leaves
    tasks.next_poll_at in place but empty, the row-count triggers whole, and the live task's
    next poll in polls, where claims find it."""
    make_release_0_1_database(sqlite_url)
    monkeypatch.setattr("sqlite3.sqlite_version_info", (3, 34, 1))
    upgrade(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.connect() as conn:
            left = conn.exec_driver_sql("SELECT count(next_poll_at) FROM tasks").scalar()
            triggers = conn.exec_driver_sql(
                "SELECT count(*) FROM sqlite_master WHERE type = 'trigger'"
            ).scalar()
    finally:
        engine.dispose()
    store = SqlStore.from_url(sqlite_url)
    try:
        planned = T1.timestamp() + 10.5
        due = store.claim_due(datetime.fromtimestamp(planned + 1, UTC), 10, lease=5)
        store.register(Registration("luma", ["new-1"]), T1)
        new = store.claim_due(datetime.fromtimestamp(planned + 1, UTC), 10, lease=5)
        stats = store.stats()
    finally:
        store.close()

    assert (0, 6) == (left, triggers)
    assert [("running-2", planned)] == [(t.task_id, t.planned) for t in due]
    assert ["new-1"] == [t.task_id for t in new]
    assert {
        ("luma", "completed"): 1,
        ("luma", "pending"): 1,
        ("suno", "in_progress"): 1,
    } == dict(stats.tasks)


def test_upgrading_a_current_database_changes_nothing(store: SqlStore) -> None:
    """A second upgrade finds the database at head and leaves it be."""
    before, after = migrate.upgrade(store.engine)

    assert before == after
    assert after.up_to_date


def test_a_revision_from_a_newer_release_is_refused(store: SqlStore) -> None:
    """An alembic_version this tracker does not ship is refused, naming it, before any change."""
    with store.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = 'f00d'")

    with pytest.raises(migrate.UnknownSchemaError, match="'f00d' is unknown"):
        migrate.upgrade(store.engine)
    with pytest.raises(migrate.UnknownSchemaError, match="newer release"):
        migrate.ensure(store.engine, auto_migrate=True)


def test_tracker_tables_without_a_known_version_are_refused(sqlite_url: str) -> None:
    """Tables with neither a migration history nor release 0.1.0's version row are not
    guessed at: the error names what was found.
    """
    make_release_0_1_database(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql("UPDATE tracker_meta SET value = '7' WHERE key = 'schema_version'")
        with pytest.raises(migrate.UnknownSchemaError, match="found '7'"):
            migrate.upgrade(engine)
    finally:
        engine.dispose()
    assert ROWS["tasks"] == snapshot(sqlite_url)["tasks"]


# -- the daemon's rule -------------------------------------------------------------------------


def test_ensure_refuses_an_older_schema_without_auto_migrate(sqlite_url: str) -> None:
    """With auto_migrate off an older schema is refused with the command to run, untouched."""
    make_release_0_1_database(sqlite_url)
    engine = make_engine(sqlite_url)
    try:
        with pytest.raises(migrate.SchemaOutdatedError, match="run `tracker db upgrade"):
            migrate.ensure(engine, auto_migrate=False)
        assert migrate.Shape.RELEASE_0_1 == migrate.current(engine).shape
        assert migrate.ensure(engine, auto_migrate=True).up_to_date
    finally:
        engine.dispose()


def test_ensure_gives_an_empty_database_its_schema_even_without_auto_migrate(
    sqlite_url: str,
) -> None:
    """No instance can be using an empty database, so it is never refused."""
    engine = make_engine(sqlite_url)
    try:
        assert migrate.ensure(engine, auto_migrate=False).up_to_date
    finally:
        engine.dispose()


def test_auto_migrate_defaults_on_for_sqlite_and_off_for_postgresql() -> None:
    """[database].auto_migrate follows the URL unless set."""
    document = base_config("http://127.0.0.1:9", None, "sqlite:///x.db")
    pg = merge(document, {"database": {"url": "postgresql://u@127.0.0.1/db"}})
    pg_on = merge(pg, {"database": {"auto_migrate": True}})

    assert config.parse(document, environ={}).database.auto_migrate
    assert not config.parse(pg, environ={}).database.auto_migrate
    assert config.parse(pg_on, environ={}).database.auto_migrate
    with pytest.raises(config.ConfigError, match=r"database\.auto_migrate"):
        config.parse(merge(document, {"database": {"auto_migrate": "yes"}}), environ={})


async def test_the_daemon_upgrades_a_release_0_1_sqlite_database_at_start(
    relay: SimulatedRelay, sqlite_url: str
) -> None:
    """On SQLite (auto_migrate on by default) the daemon adopts the old database and serves it."""
    make_release_0_1_database(sqlite_url)
    settings = config.parse(base_config(relay.base_url, None, sqlite_url), environ={})
    daemon = Daemon(settings)
    try:
        await daemon.start()
        assert daemon.parts.store.get("luma", "done-1") is not None
    finally:
        await daemon.stop()
    assert state_of(sqlite_url).up_to_date


@pytest.mark.postgres
@pytest.mark.e2e
def test_the_daemon_refuses_an_older_postgresql_schema_naming_the_command(
    tmp_path: Path, make_pg_url: Callable[[], str]
) -> None:
    """`tracker run` on an un-upgraded PostgreSQL database exits 5 saying what to run; after
    `tracker db upgrade` the schema is current.
    """
    url = make_pg_url()
    make_release_0_1_database(url)
    path = tmp_path / "config.toml"
    path.write_text(toml_text(base_config("http://127.0.0.1:9", None, url)))

    done = subprocess.run(
        [sys.executable, "-m", "tracker", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert 5 == done.returncode  # the schema's exit code in the README's table
    assert "run `tracker db upgrade --config PATH`" in done.stderr
    assert migrate.Shape.RELEASE_0_1 == state_of(url).shape
    assert 0 == cli.main(["db", "upgrade", "--config", str(path), "--json"])
    assert state_of(url).up_to_date


# -- the CLI ----------------------------------------------------------------------------------


def test_db_upgrade_current_and_history_commands(
    tmp_path: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """current says where the database stands (exit 1 while behind), upgrade moves it to head
    (twice is harmless), history lists the shipped revisions.
    """
    make_release_0_1_database(sqlite_url)
    path = tmp_path / "config.toml"
    path.write_text(toml_text(base_config("http://127.0.0.1:9", None, sqlite_url)))
    c = ["--config", str(path), "--json"]
    head = migrate.head()

    def run(*argv: str) -> tuple[int, Any]:
        code = cli.main(list(argv))
        return code, json.loads(capsys.readouterr().out)

    behind = {"revision": "0001", "head": head, "shape": "release-0.1.0", "up_to_date": False}
    assert (1, behind) == run("db", "current", *c)
    assert (0, {"from": "0001", "to": head, "shape": "release-0.1.0"}) == run("db", "upgrade", *c)
    assert (0, {"from": head, "to": head, "shape": "managed"}) == run("db", "upgrade", *c)
    current = {"revision": head, "head": head, "shape": "managed", "up_to_date": True}
    assert (0, current) == run("db", "current", *c)
    code, history = run("db", "history", "--json")
    assert (0, head) == (code, history[-1]["revision"])
    code, checked = run("db", "check", *c)
    assert (0, [], head) == (code, checked["problems"], checked["schema_version"])


# -- several instances at once ------------------------------------------------------------------


@pytest.mark.postgres
def test_instances_starting_together_on_postgresql_upgrade_once(
    make_pg_url: Callable[[], str],
) -> None:
    """Four upgrades racing on one old database all succeed: the advisory lock makes them take
    turns, so one adopts and upgrades and the others find it current.
    """
    url = make_pg_url()
    make_release_0_1_database(url)
    engines = [make_engine(url) for _ in range(4)]
    start = threading.Barrier(len(engines))
    results: list[tuple[migrate.SchemaState, migrate.SchemaState]] = []
    errors: list[BaseException] = []

    def run(engine: sa.Engine) -> None:
        start.wait()
        try:
            results.append(migrate.upgrade(engine))
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for engine in engines:
        engine.dispose()

    assert [] == errors
    assert 1 == sum(1 for before, _ in results if before.shape is migrate.Shape.RELEASE_0_1)
    assert all(after.up_to_date for _, after in results)
    assert ROWS["deliveries"] == snapshot(url)["deliveries"]
