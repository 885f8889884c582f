"""Contract tests of SqlStore, run on SQLite and on PostgreSQL alike."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from conftest import PG_ADMIN_URL
from structlog.testing import capture_logs

from tracker.status import Change, Snapshot, TaskStatus
from tracker.store import (
    AttemptResult,
    DeliveryJob,
    DueTask,
    OutboxEntry,
    Registration,
    Replan,
    SqlStore,
    TaskUpdate,
    polling,
)
from tracker.store.base import attempts as attempts_table
from tracker.store.base import one_of
from tracker.store.sql import deliveries as deliveries_table
from tracker.store.sql import polls as polls_table
from tracker.store.sql import tasks as tasks_table
from tracker.store.sql import transitions as transitions_table

T0 = datetime(2026, 1, 1, tzinfo=UTC)
INTERVAL = 10.0
MAX_INTERVAL = 60.0
LEASE = 30.0
HOOK = "http://127.0.0.1:9/hook"

_message_numbers = itertools.count()


def at(seconds: float) -> datetime:
    """T0 plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def register(
    store: SqlStore, *ids: str, platform: str = "luma", now: datetime = T0, **options: Any
) -> tuple[list[str], list[str]]:
    return store.register(Registration(platform=platform, ids=list(ids), **options), now)


def claim(store: SqlStore, now: datetime, limit: int = 100) -> list[DueTask]:
    return store.claim_due(now, limit, lease=INTERVAL)


def claim_ids(store: SqlStore, now: datetime, limit: int = 100) -> list[str]:
    return [t.task_id for t in claim(store, now, limit)]


def claim_one(store: SqlStore, task_id: str, now: datetime) -> DueTask:
    (task,) = [t for t in claim(store, now) if t.task_id == task_id]
    return task


def change(
    task: DueTask,
    status: TaskStatus,
    *,
    progress: int | None = None,
    result: dict[str, Any] | None = None,
    fail_reason: str = "",
) -> Change:
    after = Snapshot(
        status=status,
        upstream_status=f"UP_{status.value}",
        progress=progress,
        upstream_progress=None if progress is None else f"{progress}%",
        fail_reason=fail_reason,
    )
    return Change(before=task.snapshot, after=after, result=result, events=())


def moved_on(task: DueTask, done: Change) -> DueTask:
    """``task`` as it is after ``done`` was recorded."""
    return task._replace(snapshot=done.after)


def entry(webhook_id: str | None = None, event_type: str = "task.started") -> OutboxEntry:
    number = next(_message_numbers)
    return OutboxEntry(
        webhook_id=webhook_id or f"msg_{number}",
        event_type=event_type,
        payload=f'{{"n":{number},"text":"caf\u00e9"}}'.encode(),
        url=HOOK,
        endpoint=None,
        guarded=False,
    )


def queue_events(
    store: SqlStore, *task_ids: str, now: datetime = T0, per_task: int = 1, platform: str = "luma"
) -> None:
    """Register ``task_ids`` and record one move each that carries ``per_task`` events."""
    register(store, *task_ids, platform=platform, now=now)
    due = [t for t in claim(store, now, limit=1000) if t.task_id in task_ids]
    assert len(task_ids) == len(due)
    store.record(
        [
            TaskUpdate(
                t,
                change(t, TaskStatus.IN_PROGRESS),
                tuple(entry() for _ in range(per_task)),
            )
            for t in due
        ],
        now,
    )


def claim_jobs(store: SqlStore, now: datetime, limit: int = 100) -> list[DeliveryJob]:
    return store.claim_deliveries(now, limit, lease=LEASE)


def outcome(
    job: DeliveryJob,
    state: str,
    now: datetime,
    *,
    next_attempt_at: float | None = None,
    status_code: int | None = 200,
    error: str | None = None,
) -> AttemptResult:
    return AttemptResult(
        job=job,
        at=now,
        status_code=status_code,
        error=error,
        latency_ms=12.5,
        response_excerpt="ok" if status_code == 200 else "nope",
        state=state,
        next_attempt_at=next_attempt_at,
    )


def task_row(store: SqlStore, task_id: str) -> Any:
    """The raw tasks row with its polls row's next_poll_at (None: no polls row, the task is
    final), for what no public method shows (next_poll_at, missing_since)."""
    query = (
        sa.select(tasks_table, polls_table.c.next_poll_at)
        .select_from(tasks_table.outerjoin(polls_table, polls_table.c.task_pk == tasks_table.c.id))
        .where(tasks_table.c.task_id == task_id)
    )
    with store.engine.connect() as conn:
        return conn.execute(query).one()


def in_threads(count: int, work: Callable[[int], list[int]]) -> list[list[int]]:
    """Run ``work(i)`` in ``count`` threads released together; their results, in order."""
    start = threading.Barrier(count)

    def run(i: int) -> list[int]:
        start.wait(timeout=10)
        return work(i)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(run, range(count)))


def wait_for_lock_waiters(conn: sa.Connection, count: int = 1) -> None:
    """Return once ``count`` sessions of this PostgreSQL database wait for a lock (within 5 s).

    ``conn`` may be in a transaction of its own (holding locks the others wait for): within
    one, PostgreSQL shows pg_stat_activity as it was at the first look, so each look first
    discards that snapshot. Without that, a look taken before the others began to wait would
    be the only one: the test failed whenever they were slow to start.
    """
    deadline = time.monotonic() + 5
    query = (
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    while True:
        conn.exec_driver_sql("SELECT pg_stat_clear_snapshot()")
        if conn.exec_driver_sql(query).scalar_one() >= count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {count} sessions started waiting for a lock")
        time.sleep(0.01)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(name="shared_pg_url", scope="module")
def _shared_pg_url() -> Iterator[str]:
    """One PostgreSQL database for this module: CREATE DATABASE per test costs ~0.3 s each."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"tracker_test_{secrets.token_hex(6)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(name="pg_url")
def _pg_url(shared_pg_url: str) -> str:
    """The module's PostgreSQL database, wiped: as empty as a freshly created one."""
    engine = sa.create_engine(shared_pg_url)
    with engine.begin() as conn:
        # A session a failed test left holding locks fails the wipe instead of hanging it.
        conn.exec_driver_sql("SET LOCAL lock_timeout = '5s'")
        conn.exec_driver_sql("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    engine.dispose()
    return shared_pg_url


@pytest.fixture(
    name="db_url", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def _db_url(request: pytest.FixtureRequest, sqlite_url: str) -> str:
    """Overrides conftest's db_url (same backends, so the ``store`` fixture is unchanged) to
    reuse one wiped PostgreSQL database instead of creating one per test.
    """
    if request.param == "sqlite":
        return sqlite_url
    url: str = request.getfixturevalue("pg_url")
    return url


@pytest.fixture(name="pg_stores")
def _pg_stores(pg_url: str) -> Iterator[tuple[SqlStore, SqlStore]]:
    """Two stores on one PostgreSQL database with the schema, as two daemons would have."""
    first, second = SqlStore.from_url(pg_url), SqlStore.from_url(pg_url)
    first.create_schema()
    yield first, second
    first.close()
    second.close()


# -- schema and meta --------------------------------------------------------------------------


def test_create_schema_twice_is_harmless(store: SqlStore) -> None:
    """Creating the schema again keeps the tables and their rows."""
    register(store, "a")

    store.create_schema()

    assert store.get("luma", "a") is not None


def test_integrity_problems_is_empty_on_a_healthy_database(store: SqlStore) -> None:
    """A healthy database with rows in every table reports no integrity problem."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)
    store.finish_attempts([outcome(job, "delivered", T0)])

    assert [] == store.integrity_problems()
    store.ping()


def test_integrity_problems_name_live_tasks_that_would_never_be_polled(store: SqlStore) -> None:
    """A live task without its polls row (a row deleted by hand) is reported; a final one,
    which has none, is not."""
    register(store, "live", "done")
    (done,) = [t for t in claim(store, T0) if t.task_id == "done"]
    store.record([TaskUpdate(done, change(done, TaskStatus.COMPLETED))], T0)
    assert [] == store.integrity_problems()
    with store.engine.begin() as conn:
        conn.execute(polls_table.delete())

    (problem,) = store.integrity_problems()
    assert problem.startswith("1 live task(s) without a polls row, so never polled again")


def test_meta_values_are_written_overwritten_and_read(store: SqlStore) -> None:
    """get_meta is None until set_meta writes a key; a later set_meta replaces the value."""
    assert store.get_meta("last_cycle_at") is None

    store.set_meta("last_cycle_at", "2026-01-01T00:00:00Z")
    store.set_meta("last_cycle_at", "2026-01-01T00:00:10Z")
    store.set_meta("other", "x")

    assert "2026-01-01T00:00:10Z" == store.get_meta("last_cycle_at")
    assert "x" == store.get_meta("other")


def test_one_of_matches_the_listed_ids_as_one_array_parameter_on_postgresql(
    store: SqlStore,
) -> None:
    """one_of() matches exactly the listed values on both databases; PostgreSQL gets the list
    as one array parameter (a statement that SQLAlchemy and psycopg prepare once), SQLite an
    IN list."""
    register(store, "a", "b", "c")
    with store.engine.connect() as conn:
        clause = one_of(conn, tasks_table.c.task_id, ["a", "c", "zz"])
        query = sa.select(tasks_table.c.task_id).where(clause)
        compiled = query.compile(conn)
        found = sorted(conn.execute(query).scalars())
    assert ["a", "c"] == found
    if store.dialect == "postgresql":
        assert "= ANY (" in str(compiled)
        assert [["a", "c", "zz"]] == list(compiled.construct_params().values())
    else:
        assert " IN (" in str(compiled)


# -- register ---------------------------------------------------------------------------------


def test_register_tells_new_ids_from_existing_ones(store: SqlStore) -> None:
    """Register returns the new ids and the already known ones, each in request order."""
    assert (["a", "b"], []) == register(store, "a", "b")
    assert (["d", "c"], ["b", "a"]) == register(store, "b", "d", "a", "c")


def test_register_counts_an_id_repeated_in_one_request_once(store: SqlStore) -> None:
    """An id given twice in one request is registered once and reported once."""
    assert (["a", "b"], []) == register(store, "a", "b", "a", "b")

    page, _ = store.list_tasks()
    assert ["b", "a"] == [t.task_id for t in page]


def test_register_keeps_the_original_options_of_known_ids(store: SqlStore) -> None:
    """Registering a known id again changes nothing: metadata, webhook_url, endpoint stay."""
    register(
        store,
        "a",
        webhook_url="http://127.0.0.1:1/first",
        endpoint="main",
        events=("task.progress",),
        metadata={"user": 1},
    )

    assert ([], ["a"]) == register(
        store, "a", webhook_url="http://127.0.0.1:1/second", metadata={"user": 2}, now=at(50)
    )

    task = store.get("luma", "a")
    assert task is not None
    assert "http://127.0.0.1:1/first" == task.webhook_url
    assert "main" == task.endpoint
    assert ("task.progress",) == task.events
    assert {"user": 1} == task.metadata
    assert T0 == task.created_at


def test_register_keys_ids_by_platform(store: SqlStore) -> None:
    """The same id on two platforms is two tasks."""
    register(store, "a", platform="luma")

    assert (["a"], []) == register(store, "a", platform="suno")
    assert {"luma", "suno"} == {t.platform for t in store.list_tasks()[0]}


def test_registered_tasks_are_pending_due_at_once_with_aware_utc_times(store: SqlStore) -> None:
    """A new task is pending, due immediately, and its timestamps read back as aware UTC."""
    plus_two = timezone(timedelta(hours=2))
    register(store, "a", now=T0.astimezone(plus_two), metadata={"k": [1, "x"]})

    task = store.get("luma", "a")
    assert task is not None
    assert "pending" == task.status
    assert {"k": [1, "x"]} == task.metadata
    assert T0 == task.created_at == task.updated_at
    assert UTC == task.created_at.tzinfo == task.updated_at.tzinfo
    assert task.finished_at is None
    assert () == task.transitions
    assert ["a"] == claim_ids(store, T0)


def test_register_refuses_naive_timestamps(store: SqlStore) -> None:
    """A naive datetime never reaches the database, so local time cannot pass for UTC."""
    with pytest.raises(sa.exc.StatementError, match="naive datetime"):
        register(store, "a", now=datetime(2026, 1, 1))  # noqa: DTZ001

    assert store.get("luma", "a") is None


# -- claim_due --------------------------------------------------------------------------------


def test_claim_due_takes_only_tasks_whose_poll_is_due(store: SqlStore) -> None:
    """Tasks registered after ``now`` are not due yet."""
    register(store, "early", now=T0)
    register(store, "late", now=at(5))

    assert ["early"] == claim_ids(store, at(1))


def test_claim_due_orders_by_next_poll_not_by_id(store: SqlStore) -> None:
    """Due tasks come in next-poll order, ties in id order, whatever their registration order."""
    register(store, "a", "b", "c", "d")
    due = {t.task_id: t for t in claim(store, T0)}
    store.record(
        [
            TaskUpdate(due["a"], next_poll_at=at(30).timestamp()),
            TaskUpdate(due["b"], next_poll_at=at(20).timestamp()),
            TaskUpdate(due["c"], next_poll_at=at(20).timestamp()),
            TaskUpdate(due["d"], next_poll_at=at(15).timestamp()),
        ],
        T0,
    )

    assert ["d", "b", "c", "a"] == claim_ids(store, at(40))


def test_claim_due_honours_the_limit_and_leaves_the_rest_due(store: SqlStore) -> None:
    """At most ``limit`` tasks are taken per call; the next call takes the next ones."""
    register(store, "a", "b", "c", "d", "e")

    assert ["a", "b"] == claim_ids(store, T0, limit=2)
    assert ["c", "d"] == claim_ids(store, T0, limit=2)
    assert ["e"] == claim_ids(store, T0, limit=2)
    assert [] == claim_ids(store, T0, limit=2)


def test_claim_due_leaves_the_tasks_of_skipped_platforms_due(store: SqlStore) -> None:
    """A claim that skips platforms takes the due tasks of the others, most overdue first,
    however many of the skipped ones are more overdue; a later claim still finds those."""
    register(store, "l1", "l2", "l3", now=T0)
    register(store, "s1", "s2", platform="suno", now=at(1))
    register(store, "m1", platform="mj", now=at(2))

    taken = store.claim_due(at(5), 2, lease=INTERVAL, skip=["luma"])
    assert [("suno", "s1"), ("suno", "s2")] == [(t.platform, t.task_id) for t in taken]
    taken = store.claim_due(at(5), 10, lease=INTERVAL, skip=["luma", "suno", "kling"])
    assert ["m1"] == [t.task_id for t in taken]
    assert [] == store.claim_due(at(5), 10, lease=INTERVAL, skip=["luma"])
    assert ["l1", "l2", "l3"] == claim_ids(store, at(5))


def claim_skipping_suno(
    store: SqlStore, now: datetime, limit: int, *, meanwhile: Callable[[], None]
) -> list[DueTask]:
    """A claim that skips suno, with ``meanwhile`` run as another writer between its read of
    the due ids and its write transaction (SQLite)."""
    read = store._read

    @contextlib.contextmanager
    def read_then_others_write() -> Iterator[sa.Connection]:
        with read() as conn:
            yield conn
        meanwhile()

    store._read = read_then_others_write  # type: ignore[method-assign]
    try:
        return store.claim_due(now, limit, lease=INTERVAL, skip=["suno"])
    finally:
        store._read = read  # type: ignore[method-assign]


def test_a_claim_skipping_platforms_on_sqlite_takes_only_the_rows_still_due_when_it_writes(
    sqlite_url: str,
) -> None:
    """On SQLite such a claim reads the due ids before its write transaction; a task another
    writer re-planned, and one removed, in between are not taken (nor leased)."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    register(store, "a", "b", "c", now=T0)
    register(store, "s", platform="suno", now=T0)

    def others_write() -> None:
        with store.engine.begin() as conn:
            pk = sa.select(tasks_table.c.id).where(tasks_table.c.task_id == "a").scalar_subquery()
            replan = polls_table.update().where(polls_table.c.task_pk == pk)
            conn.execute(replan.values(next_poll_at=1e12))
        store.remove("luma", "c")

    taken = claim_skipping_suno(store, at(1), 10, meanwhile=others_write)

    assert ["b"] == [t.task_id for t in taken]
    assert ["s"] == claim_ids(store, at(1))
    store.close()


def test_a_claim_skipping_platforms_on_sqlite_is_not_left_short_by_a_row_gone_meanwhile(
    sqlite_url: str,
) -> None:
    """Such a claim, for two of four due tasks, loses the first one it read to another writer
    before its write transaction: it still takes two (a short claim would tell the drain
    that nothing more is due), the next ones in due order."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    register(store, "a", now=T0)
    register(store, "b", now=at(1))
    register(store, "c", now=at(2))
    register(store, "d", now=at(3))
    register(store, "s", platform="suno", now=T0)

    taken = claim_skipping_suno(store, at(5), 2, meanwhile=lambda: store.remove("luma", "a"))

    assert ["b", "c"] == [t.task_id for t in taken]
    assert ["s", "d"] == claim_ids(store, at(5))
    store.close()


def test_claimed_tasks_are_not_claimed_again_before_their_next_poll(store: SqlStore) -> None:
    """A claim schedules the next poll, so the task is not handed out twice in between."""
    register(store, "a", "b")
    first = claim(store, T0)

    assert [] == claim_ids(store, T0)
    assert [] == claim_ids(store, at(INTERVAL - 0.01))
    assert ["a", "b"] == claim_ids(store, at(INTERVAL))
    assert first[0].snapshot == Snapshot(status=TaskStatus.PENDING)


def test_claim_due_returns_what_the_poller_needs(store: SqlStore) -> None:
    """A due task carries its snapshot, options and missing_since as stored."""
    register(
        store,
        "a",
        webhook_url=HOOK,
        endpoint="main",
        events=("task.progress",),
        metadata={"user": 7},
    )

    (task,) = claim(store, T0)

    assert ("luma", "a") == (task.platform, task.task_id)
    assert Snapshot(status=TaskStatus.PENDING) == task.snapshot
    assert (HOOK, "main", ("task.progress",)) == (task.webhook_url, task.endpoint, task.events)
    assert {"user": 7} == task.metadata
    assert T0 == task.created_at
    assert task.missing_since is None


def test_final_tasks_are_never_claimed(store: SqlStore) -> None:
    """Once a task is final it has no next poll and no claim returns it."""
    register(store, "a", "b")
    due = {t.task_id: t for t in claim(store, T0)}
    store.record([TaskUpdate(due["a"], change(due["a"], TaskStatus.COMPLETED))], T0)

    assert ["b"] == claim_ids(store, at(10**7))


def test_a_claim_leases_its_tasks_until_the_answer_plans_the_next_poll(store: SqlStore) -> None:
    """The claim moves the next poll to the lease's end; the record sets the planned one."""
    register(store, "a")
    (task,) = claim(store, T0)

    assert 0.0 == task.planned - T0.timestamp()
    assert at(INTERVAL).timestamp() == task.lease_until
    assert [] == claim_ids(store, at(INTERVAL - 0.01))
    store.record([TaskUpdate(task, next_poll_at=at(3).timestamp())], at(1))

    assert ["a"] == claim_ids(store, at(3))


@pytest.mark.parametrize("microseconds", [0, 123456])
def test_a_recorded_change_is_stored_as_sqlalchemys_own_update_stores_it(
    store: SqlStore, microseconds: int
) -> None:
    """record() writes SQLite's rows straight through the driver: what it stores (time
    text, numbers, NULLs) is, byte for byte, what SQLAlchemy's own UPDATE of the same values
    stores, so every query comparing or decoding those columns reads them alike (a time on a
    whole second included). ``result``, which no query reads as text, is written by orjson:
    the same JSON value, spaced differently."""
    register(store, "moving", "finished", "plain")
    due = {t.task_id: t for t in claim(store, T0)}
    result = {
        "task_id": "x",
        "progress": "50%",
        "data": {"url": "https://a/caf\u00e9", "n": [1, 2.5]},
    }
    now = T0 + timedelta(seconds=5, microseconds=microseconds)
    moving = change(due["moving"], TaskStatus.IN_PROGRESS, progress=50, result=result)
    failed = change(due["finished"], TaskStatus.FAILED, result=result, fail_reason="quota \u00e9")
    updates = [
        TaskUpdate(
            due["moving"], moving, missing_since=at(4).timestamp(), next_poll_at=at(15).timestamp()
        ),
        TaskUpdate(due["finished"], failed),
    ]
    assert 2 == store.record(updates, now)
    columns = [c for c in tasks_table.c if c.name not in {"id", "task_id", "result"}]

    def stored(task_id: str) -> tuple[Any, ...]:
        with store.engine.connect() as conn:
            query = sa.select(*(sa.cast(c, sa.Text) for c in columns))
            return tuple(conn.execute(query.where(tasks_table.c.task_id == task_id)).one())

    for task_id in ("moving", "finished"):
        written = stored(task_id)
        with store.engine.begin() as conn:
            row = conn.execute(sa.select(*columns).where(tasks_table.c.task_id == task_id)).one()
            values = dict(zip([c.name for c in columns], row, strict=True))
            conn.execute(
                tasks_table.update().where(tasks_table.c.task_id == "plain").values(**values)
            )
        assert written == stored("plain")
        written_result = store.get("luma", task_id)
        assert written_result is not None
        assert result == written_result.result


@pytest.mark.parametrize("microseconds", [0, 123456])
def test_a_changes_history_and_outbox_rows_are_stored_as_sqlalchemys_own_insert_stores_them(
    store: SqlStore, microseconds: int
) -> None:
    """record() inserts SQLite's history and outbox rows straight through the driver: every
    column (time text, booleans, enums, numbers, NULLs) is stored byte for byte as
    SQLAlchemy's own INSERT of the same values stores it (a time on a whole second included)."""
    register(store, "a")
    (task,) = claim(store, T0)
    now = T0 + timedelta(seconds=5, microseconds=microseconds)
    guarded = dataclasses.replace(entry(event_type="task.failed"), guarded=True, endpoint="main")
    failed = change(task, TaskStatus.FAILED, fail_reason="quota \u00e9")
    assert 1 == store.record([TaskUpdate(task, failed, (entry(), guarded))], now)

    for table in (transitions_table, deliveries_table):
        columns = [c for c in table.c if c.name not in {"id", "webhook_id"}]
        text = [sa.cast(c, sa.Text) for c in columns]
        if store.dialect == "sqlite":  # the storage class too: integer 1 and text '1' differ
            text += [sa.func.typeof(c) for c in columns]
        with store.engine.begin() as conn:
            written = conn.execute(sa.select(*text).order_by(table.c.id)).all()
            rows = conn.execute(sa.select(table).order_by(table.c.id)).mappings().all()
            again = [
                {**row, "id": row["id"] + 1000}
                | ({"webhook_id": f"again_{row['id']}"} if "webhook_id" in row else {})
                for row in rows
            ]
            conn.execute(table.insert(), again)
            inserted = conn.execute(
                sa.select(*text).where(table.c.id > 1000).order_by(table.c.id)
            ).all()
        assert len(written) == len(rows) > 0
        assert written == inserted, table.name


def test_rows_inserted_without_a_defaulted_column_get_its_default(store: SqlStore) -> None:
    """A row that leaves out a column with a default (deliveries' state, attempts, guarded)
    is inserted with that default, as SQLAlchemy's own INSERT fills it in."""
    register(store, "a")
    (task,) = claim(store, T0)
    row = {
        "webhook_id": "msg_bare", "task_pk": task.pk, "platform": "luma", "task_id": "a",
        "event_type": "task.started", "payload": "{}", "url": HOOK, "endpoint": None,
        "next_attempt_at": T0.timestamp(), "created_at": T0,
    }  # fmt: skip
    with store.engine.begin() as conn:
        polling._insert_rows(conn, deliveries_table, [row])
        stored = conn.execute(
            sa.select(
                deliveries_table.c.state, deliveries_table.c.attempts, deliveries_table.c.guarded
            )
        ).one()

    assert ("pending", 0, False) == tuple(stored)


@pytest.mark.parametrize(
    "result",
    [
        {"url": "https://a/caf\u00e9", "n": [1, 2.5, None, True], "nested": {"k": "\u65e5"}},
        {"id": 2**70, "text": "beyond 64 bits: written by the json module"},
        {"lone": "\ud800", "text": "a lone surrogate: written by the json module"},
    ],
)
def test_a_recorded_result_reads_back_as_it_was(store: SqlStore, result: dict[str, Any]) -> None:
    """The upstream item stored with a change reads back equal, whichever encoder wrote it."""
    register(store, "a")
    (task,) = claim(store, T0)
    moved = change(task, TaskStatus.IN_PROGRESS, progress=10, result=result)

    assert 1 == store.record([TaskUpdate(task, moved)], at(1))
    stored = store.get("luma", "a")
    assert stored is not None
    assert result == stored.result


def test_a_claim_of_thousands_leases_each_task_and_its_answers_plan_each_one(
    store: SqlStore,
) -> None:
    """Claims and re-plans go to the database in parts (bound-parameter limits): every task
    of a 2,000-task claim is leased, every answer plans its own task's next poll, and a task
    recorded meanwhile (its claim no longer holds it) keeps that record's plan."""
    ids = [f"t{i:04d}" for i in range(2000)]
    register(store, *ids)
    due = claim(store, T0, limit=2000)
    assert len(due) == 2000
    assert [] == claim_ids(store, at(INTERVAL - 0.01))
    early = due[1000:1010]
    store.record([TaskUpdate(t, next_poll_at=at(2).timestamp()) for t in early], at(1))

    planned = {t.task_id: at(3 + i / 1000).timestamp() for i, t in enumerate(due)}
    written = store.record([TaskUpdate(t, next_poll_at=planned[t.task_id]) for t in due], at(1))

    assert written == 2000 - len(early)
    for task in early:
        planned[task.task_id] = at(2).timestamp()
    with store.engine.connect() as conn:
        stored = dict(
            conn.execute(
                sa.select(tasks_table.c.task_id, polls_table.c.next_poll_at).join(
                    polls_table, polls_table.c.task_pk == tasks_table.c.id
                )
            ).all()
        )
    assert planned == stored


def test_a_renewed_claim_keeps_its_tasks_and_its_answers_are_written(store: SqlStore) -> None:
    """renew_claim moves the claim's end for its unrecorded tasks only; no other claim takes
    them meanwhile, and answers recorded under the renewed claim are written."""
    register(store, "a", "b")
    due = {t.task_id: t for t in claim(store, T0)}
    store.record([TaskUpdate(due["a"], next_poll_at=at(5).timestamp())], at(1))

    held = due["b"].claim
    assert held is not None
    assert 1 == store.renew_claim(held, at(INTERVAL + 8).timestamp())

    assert at(INTERVAL + 8).timestamp() == due["b"].lease_until
    assert ["a"] == claim_ids(store, at(INTERVAL + 1))  # "a" keeps its own plan
    assert 1 == store.record([TaskUpdate(due["b"], change(due["b"], TaskStatus.QUEUED))], at(9))
    assert TaskStatus.QUEUED.value == task_row(store, "b").status


def test_a_renewal_moves_its_tasks_in_id_order_whatever_their_due_order(store: SqlStore) -> None:
    """renew_claim updates a claim's rows in id order, the order record() and removal lock
    them in, even when the claim took them in another (due) order across several statements:
    two daemons touching the same rows then wait for each other instead of deadlocking."""
    ids = [f"t{i:04d}" for i in range(2000)]
    register(store, *ids)
    first = claim(store, T0, limit=2000)
    # Later ids fall due first: the next claim takes them in the reverse of id order.
    planned = [
        TaskUpdate(t, next_poll_at=at(100 - i / 100).timestamp()) for i, t in enumerate(first)
    ]
    store.record(planned, at(1))
    due = claim(store, at(100), limit=2000)
    assert [t.task_id for t in due] == ids[::-1]
    held = due[0].claim
    assert held is not None
    moved: list[int] = []

    def capture(_conn: Any, _cursor: Any, sql: str, params: Any, *_rest: Any) -> None:
        if sql.lstrip().upper().startswith("UPDATE POLLS"):
            values = params.values() if isinstance(params, dict) else params
            for value in values:  # PostgreSQL's ids come as one list (see one_of)
                listed = value if isinstance(value, list) else [value]
                moved.extend(v for v in listed if isinstance(v, int) and not isinstance(v, bool))

    sa.event.listen(store.engine, "before_cursor_execute", capture)
    try:
        assert 2000 == store.renew_claim(held, at(200).timestamp())
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", capture)

    assert moved == sorted(t.pk for t in due)


def test_a_lapsed_claim_is_not_renewed_over_a_newer_claim(store: SqlStore) -> None:
    """A claim renewed after it lapsed and another claim took the task changes nothing, and
    its answer is not written."""
    register(store, "a")
    (slow,) = claim(store, T0)
    (fresh,) = claim(store, at(INTERVAL))

    assert slow.claim is not None
    assert 0 == store.renew_claim(slow.claim, at(INTERVAL + 30).timestamp())

    assert fresh.lease_until == task_row(store, "a").next_poll_at
    assert 0 == store.record([TaskUpdate(slow, change(slow, TaskStatus.QUEUED))], at(11))


def test_a_renewal_names_the_tasks_another_claim_took(store: SqlStore) -> None:
    """A lapsed claim renewed: its tasks still held move on, and those another claim took
    meanwhile are named in the claim's ``lost`` (the poller then asks nothing about them)."""
    register(store, "kept", now=T0)
    register(store, "taken", now=at(1))
    slow = claim(store, at(1))
    assert ["kept", "taken"] == [t.task_id for t in slow]
    held = slow[0].claim
    assert held is not None
    # Only "taken" is claimed again once the slow claim lapsed; "kept" is left to it.
    with store.engine.begin() as conn:
        kept = polls_table.c.task_pk == slow[0].pk
        conn.execute(polls_table.update().where(kept).values(next_poll_at=held.until + 999))
    (fresh,) = claim(store, at(INTERVAL + 2))
    with store.engine.begin() as conn:
        conn.execute(polls_table.update().where(kept).values(next_poll_at=held.until))

    assert 1 == store.renew_claim(held, at(INTERVAL + 30).timestamp())

    assert "taken" == fresh.task_id
    assert {fresh.pk} == held.lost
    assert held.until == task_row(store, "kept").next_poll_at


def test_claim_due_takes_tasks_due_by_a_later_time_when_asked(store: SqlStore) -> None:
    """due_by lets a claim take tasks falling due a moment later into the same batch."""
    register(store, "now", now=T0)
    register(store, "soon", now=at(0.04))
    register(store, "later", now=at(1))

    taken = store.claim_due(T0, 100, lease=INTERVAL, due_by=at(0.05))

    assert ["now", "soon"] == [t.task_id for t in taken]


def test_an_answer_after_the_lease_was_taken_over_changes_nothing(store: SqlStore) -> None:
    """A late answer (its lease ran out, another claim took the task) neither moves the task
    backwards nor fires an event twice; the newer claim's answer is written.
    """
    register(store, "a")
    (slow,) = claim(store, T0)
    (fresh,) = claim(store, at(INTERVAL))  # the lease ran out: another daemon's claim
    store.record([TaskUpdate(fresh, change(fresh, TaskStatus.PENDING, progress=60))], at(INTERVAL))

    written = store.record(
        [TaskUpdate(slow, change(slow, TaskStatus.PENDING, progress=20))], at(INTERVAL + 1)
    )

    assert 0 == written
    assert (TaskStatus.PENDING.value, 60) == (
        task_row(store, "a").status,
        task_row(store, "a").progress,
    )


def test_a_lapsed_claims_answer_in_the_same_call_as_the_holders_changes_nothing(
    store: SqlStore,
) -> None:
    """Two answers about one task in one call, the holding claim's first: the lapsed claim's
    answer still fails its own check, so the task keeps the newer answer and only its event
    is queued."""
    register(store, "a")
    (slow,) = claim(store, T0)
    (fresh,) = claim(store, at(INTERVAL))  # the lease ran out: another claim took the task
    newer = TaskUpdate(fresh, change(fresh, TaskStatus.PENDING, progress=60), (entry("msg_new"),))
    late = TaskUpdate(slow, change(slow, TaskStatus.PENDING, progress=20), (entry("msg_late"),))

    written = store.record([newer, late], at(INTERVAL + 1))

    assert 1 == written
    assert 60 == task_row(store, "a").progress
    assert ["msg_new"] == [d.webhook_id for d in store.list_deliveries(task_id="a")[0]]


def test_most_overdue_names_the_first_live_task_due_and_its_platform(store: SqlStore) -> None:
    """most_overdue gives when the soonest live task is due and its platform (the readiness
    reason names it); None when none is live."""
    assert store.most_overdue() is None
    register(store, "a", now=at(5))
    store.register(Registration("suno", ["b"]), at(2))

    assert (at(2), "suno") == store.most_overdue()
    due = claim(store, at(10))
    store.record([TaskUpdate(t, change(t, TaskStatus.COMPLETED)) for t in due], at(10))

    assert store.most_overdue() is None


def test_earliest_poll_is_the_first_live_task_due(store: SqlStore) -> None:
    """earliest_poll names the soonest next poll of a live task; None when none is live."""
    assert store.earliest_poll() is None
    register(store, "a", now=at(5))
    register(store, "b", now=at(2))

    assert at(2) == store.earliest_poll()
    assert at(2) == store.stats().earliest_poll
    due = claim(store, at(10))
    store.record([TaskUpdate(t, change(t, TaskStatus.COMPLETED)) for t in due], at(10))

    assert store.earliest_poll() is None


# -- record -----------------------------------------------------------------------------------


def test_record_writes_task_history_and_outbox_together(store: SqlStore) -> None:
    """A status move updates the task, appends a transition and queues its events."""
    register(store, "a", "b")
    due = {t.task_id: t for t in claim(store, T0)}
    moved = change(due["a"], TaskStatus.IN_PROGRESS, progress=40, result={"video": "v.mp4"})
    events = (entry(event_type="task.started"), entry(event_type="task.progress"))

    written = store.record([TaskUpdate(due["a"], moved, events)], at(5))

    assert 1 == written
    task = store.get("luma", "a")
    assert task is not None
    assert ("in_progress", "UP_in_progress") == (task.status, task.upstream_status)
    assert (40, "40%") == (task.progress, task.upstream_progress)
    assert {"video": "v.mp4"} == task.result
    assert at(5) == task.updated_at
    assert T0 == task.created_at
    assert task.finished_at is None
    assert [("pending", "in_progress", "UP_in_progress", 40, at(5))] == [
        (t.from_status, t.to_status, t.upstream_status, t.progress, t.at) for t in task.transitions
    ]
    queued, _ = store.list_deliveries(task_id="a")
    assert [e.webhook_id for e in reversed(events)] == [d.webhook_id for d in queued]
    assert {("pending", 0, at(5))} == {(d.state, d.attempts, d.next_attempt_at) for d in queued}
    # The second event of the task waits until the first is out.
    assert [events[0].payload] == [j.payload for j in claim_jobs(store, at(5))]
    untouched = store.get("luma", "b")
    assert untouched is not None
    assert ("pending", T0) == (untouched.status, untouched.updated_at)


def test_record_of_a_progress_change_adds_no_transition(store: SqlStore) -> None:
    """A change that keeps the status updates the row and queues events, but adds no history."""
    register(store, "a")
    (task,) = claim(store, T0)
    started = change(task, TaskStatus.IN_PROGRESS, progress=10)
    store.record([TaskUpdate(task, started)], T0)
    task = moved_on(task, started)

    store.record(
        [TaskUpdate(task, change(task, TaskStatus.IN_PROGRESS, progress=70), (entry(),))], at(1)
    )

    stored = store.get("luma", "a")
    assert stored is not None
    assert (70, at(1)) == (stored.progress, stored.updated_at)
    assert 1 == len(stored.transitions)
    assert 1 == len(store.list_deliveries(task_id="a")[0])


def test_record_skips_a_task_whose_status_changed_meanwhile(store: SqlStore) -> None:
    """A stale decision writes nothing for its task while the rest of the batch is written."""
    register(store, "a", "b")
    due = {t.task_id: t for t in claim(store, T0)}
    store.record([TaskUpdate(due["a"], change(due["a"], TaskStatus.IN_PROGRESS))], T0)

    # Both decisions were made on the pending snapshots; "a" has moved since.
    written = store.record(
        [
            TaskUpdate(due["a"], change(due["a"], TaskStatus.COMPLETED), (entry(),)),
            TaskUpdate(due["b"], change(due["b"], TaskStatus.QUEUED), (entry(),)),
        ],
        at(1),
    )

    assert 1 == written
    stale = store.get("luma", "a")
    assert stale is not None
    assert ("in_progress", None, T0) == (stale.status, stale.finished_at, stale.updated_at)
    assert ["in_progress"] == [t.to_status for t in stale.transitions]
    assert [] == store.list_deliveries(task_id="a")[0]
    fresh = store.get("luma", "b")
    assert fresh is not None
    assert ["queued"] == [t.to_status for t in fresh.transitions]
    assert 1 == len(store.list_deliveries(task_id="b")[0])


def test_record_skips_a_task_removed_meanwhile(store: SqlStore) -> None:
    """A decision about a removed task is dropped without error; the batch's others are kept."""
    register(store, "a", "b")
    due = {t.task_id: t for t in claim(store, T0)}
    assert store.remove("luma", "a")

    written = store.record(
        [
            TaskUpdate(due["a"], change(due["a"], TaskStatus.COMPLETED), (entry(),)),
            TaskUpdate(due["b"], change(due["b"], TaskStatus.COMPLETED), (entry(),)),
        ],
        at(1),
    )

    assert 1 == written
    assert store.get("luma", "a") is None
    assert [] == store.list_deliveries(task_id="a")[0]
    assert ["b"] == [d.task_id for d in store.list_deliveries()[0]]


def test_record_leaves_out_a_task_whose_write_fails_and_writes_the_others(
    store: SqlStore,
) -> None:
    """A write refused for one task (a duplicate webhook id) leaves that task untouched, with
    no history or event, while the other task of the call is written whole.
    """
    queue_events(store, "first")
    (existing,) = store.list_deliveries()[0]
    register(store, "a", "b", now=at(1))
    due = {t.task_id: t for t in claim(store, at(1))}

    with capture_logs() as logs:
        written = store.record(
            [
                TaskUpdate(due["a"], change(due["a"], TaskStatus.IN_PROGRESS), (entry("ok"),)),
                TaskUpdate(
                    due["b"], change(due["b"], TaskStatus.FAILED), (entry(existing.webhook_id),)
                ),
            ],
            at(2),
        )

    assert 1 == written
    assert ["b"] == [e["task_id"] for e in logs if e["event"] == "task_write_refused"]
    task = store.get("luma", "a")
    assert task is not None
    assert ("in_progress", 1) == (task.status, len(task.transitions))
    assert ["ok"] == [d.webhook_id for d in store.list_deliveries(task_id="a")[0]]
    task = store.get("luma", "b")
    assert task is not None
    assert ("pending", at(1), ()) == (task.status, task.updated_at, task.transitions)
    assert [] == store.list_deliveries(task_id="b")[0]
    # Nothing half-written blocks the retry of the refused task with sound values.
    assert 1 == store.record(
        [TaskUpdate(due["b"], change(due["b"], TaskStatus.FAILED), (entry(),))], at(3)
    )


def test_record_keeps_two_moves_of_one_task_together_when_another_row_is_refused(
    store: SqlStore,
) -> None:
    """Two moves of one task in one call (queued, then in progress with its event) are written
    together when another task's row is refused. Halving the call apart put them in two
    writes: the second found the task's next poll moved by the first, as if its claim were
    lost, and was dropped unlogged (the task stayed queued, its task.started never sent)."""
    queue_events(store, "first")
    (existing,) = store.list_deliveries()[0]
    register(store, "a", "b", now=at(1))
    due = {t.task_id: t for t in claim(store, at(1))}
    queued = change(due["a"], TaskStatus.QUEUED)
    started = change(moved_on(due["a"], queued), TaskStatus.IN_PROGRESS)

    with capture_logs() as logs:
        written = store.record(
            [
                TaskUpdate(due["a"], queued, next_poll_at=at(40).timestamp()),
                TaskUpdate(
                    due["b"], change(due["b"], TaskStatus.FAILED), (entry(existing.webhook_id),)
                ),
                TaskUpdate(
                    moved_on(due["a"], queued),
                    started,
                    (entry("started"),),
                    next_poll_at=at(50).timestamp(),
                ),
            ],
            at(2),
        )

    assert 2 == written
    assert ["b"] == [e["task_id"] for e in logs if e["event"] == "task_write_refused"]
    task = store.get("luma", "a")
    assert task is not None
    assert ["queued", "in_progress"] == [t.to_status for t in task.transitions]
    assert "in_progress" == task.status
    assert at(50).timestamp() == task_row(store, "a").next_poll_at
    assert ["started"] == [d.webhook_id for d in store.list_deliveries(task_id="a")[0]]


def test_a_final_change_finishes_the_task(store: SqlStore) -> None:
    """A final status sets finished_at and clears next_poll_at and missing_since."""
    register(store, "a")
    (task,) = claim(store, T0)
    store.record([TaskUpdate(task, missing_since=T0.timestamp())], T0)
    failed = change(task, TaskStatus.FAILED, fail_reason="not found")

    store.record(
        [
            TaskUpdate(
                task, failed, (entry(event_type="task.failed"),), next_poll_at=at(99).timestamp()
            )
        ],
        at(7),
    )

    stored = store.get("luma", "a")
    assert stored is not None
    assert ("failed", "not found", at(7)) == (stored.status, stored.fail_reason, stored.finished_at)
    row = task_row(store, "a")
    assert (None, None) == (row.next_poll_at, row.missing_since)
    assert [] == claim_ids(store, at(10**7))


def test_record_writes_missing_since_without_a_change(store: SqlStore) -> None:
    """missing_since is set and cleared on its own, keeping the status and the history."""
    register(store, "a")
    (task,) = claim(store, T0)

    assert 1 == store.record([TaskUpdate(task, missing_since=at(0.5).timestamp())], at(1))
    (again,) = claim(store, at(INTERVAL))
    assert at(0.5).timestamp() == again.missing_since
    assert 1 == store.record([TaskUpdate(again, missing_since=None)], at(11))
    (cleared,) = claim(store, at(2 * INTERVAL))
    assert cleared.missing_since is None
    stored = store.get("luma", "a")
    assert stored is not None
    assert ("pending", T0, ()) == (stored.status, stored.updated_at, stored.transitions)


def test_record_moves_the_next_poll_without_a_change(store: SqlStore) -> None:
    """A hinted next poll replaces the one the claim planned."""
    register(store, "a")
    (task,) = claim(store, T0)

    store.record([TaskUpdate(task, next_poll_at=at(300).timestamp())], T0)

    assert [] == claim_ids(store, at(299))
    assert ["a"] == claim_ids(store, at(300))


def test_replans_move_next_polls_only_while_their_claim_holds(store: SqlStore) -> None:
    """Replans (answers that moved nothing) write each task's next poll under the claim's
    token, beside the updates of the same call; a task whose claim lapsed and was taken by
    another keeps the newer claim's plan, and nothing else of any task changes."""
    register(store, "a", "b", "c")
    a, b, c = sorted(claim(store, T0), key=lambda t: t.task_id)
    assert a.lease_until is not None
    moved = change(c, TaskStatus.IN_PROGRESS, progress=5)
    replans = [
        Replan(at(40).timestamp(), a.pk, a.lease_until),
        Replan(at(50).timestamp(), b.pk, a.lease_until + 1.0),  # not b's token
    ]

    written = store.record([TaskUpdate(c, moved, next_poll_at=at(60).timestamp())], T0, replans)

    assert written == 2
    assert task_row(store, "a").next_poll_at == at(40).timestamp()
    assert task_row(store, "b").next_poll_at == b.lease_until
    assert task_row(store, "c").next_poll_at == at(60).timestamp()
    untouched = store.get("luma", "a")
    assert untouched is not None
    assert (untouched.status, untouched.updated_at) == ("pending", T0)


def test_record_of_nothing_writes_nothing(store: SqlStore) -> None:
    """Updates with no change, no events and nothing kept return 0 and touch no row."""
    register(store, "a")
    (task,) = claim(store, T0)

    assert 0 == store.record([TaskUpdate(task)], at(1))
    assert 0 == store.record([], at(1))
    stored = store.get("luma", "a")
    assert stored is not None
    assert T0 == stored.updated_at


def test_record_applies_two_updates_of_one_task_in_order(store: SqlStore) -> None:
    """Two moves of one task in one call both land, in order; a stale third one does not."""
    register(store, "a")
    (task,) = claim(store, T0)
    first = change(task, TaskStatus.IN_PROGRESS, progress=10)
    second = change(moved_on(task, first), TaskStatus.COMPLETED, progress=100)
    stale = change(task, TaskStatus.CANCELED)

    written = store.record(
        [
            TaskUpdate(task, first),
            TaskUpdate(moved_on(task, first), second),
            TaskUpdate(task, stale),
        ],
        at(1),
    )

    assert 2 == written
    stored = store.get("luma", "a")
    assert stored is not None
    assert ("completed", 100) == (stored.status, stored.progress)
    assert ["in_progress", "completed"] == [t.to_status for t in stored.transitions]


def test_record_keeps_events_that_come_without_a_row_change(store: SqlStore) -> None:
    """An update that only carries events queues them when the task still has that status."""
    register(store, "a")
    (task,) = claim(store, T0)

    assert 1 == store.record([TaskUpdate(task, outbox=(entry(),))], at(1))
    assert 1 == len(store.list_deliveries(task_id="a")[0])


# -- get, list_tasks, remove ------------------------------------------------------------------


def test_get_of_an_unknown_task_is_none(store: SqlStore) -> None:
    """get returns None for ids it never saw, also on another platform."""
    register(store, "a", platform="luma")

    assert store.get("luma", "zzz") is None
    assert store.get("suno", "a") is None


def test_list_tasks_filters_by_status_and_platform_newest_first(store: SqlStore) -> None:
    """Filters combine, and each page lists the newest tasks first."""
    register(store, "l1", "l2", "l3", platform="luma")
    register(store, "s1", "s2", platform="suno")
    due = {t.task_id: t for t in claim(store, T0)}
    store.record(
        [TaskUpdate(due[i], change(due[i], TaskStatus.COMPLETED)) for i in ("l2", "s1")], T0
    )

    def listed(**filters: str) -> list[str]:
        page, cursor = store.list_tasks(**filters)
        assert cursor is None
        return [t.task_id for t in page]

    assert ["s2", "s1", "l3", "l2", "l1"] == listed()
    assert ["l3", "l2", "l1"] == listed(platform="luma")
    assert ["s1", "l2"] == listed(status="completed")
    assert ["l3", "l1"] == listed(status="pending", platform="luma")
    assert [] == listed(status="failed")
    assert () == store.list_tasks()[0][0].transitions


@pytest.mark.parametrize("count", [6, 7])
def test_list_tasks_cursor_pages_through_every_task_once(store: SqlStore, count: int) -> None:
    """Following the cursor yields every task exactly once, newest first, then stops."""
    register(store, *[f"t{i}" for i in range(count)])
    register(store, "other", platform="suno")

    seen: list[str] = []
    cursor: int | None = None
    pages = 0
    while True:
        page, cursor = store.list_tasks(platform="luma", limit=3, before=cursor)
        seen += [t.task_id for t in page]
        pages += 1
        if cursor is None:
            break

    assert [f"t{i}" for i in reversed(range(count))] == seen
    assert -(-count // 3) == pages


def test_remove_deletes_the_task_its_history_and_its_deliveries(store: SqlStore) -> None:
    """Removing a task drops its transitions, deliveries and attempt log, and nothing else."""
    queue_events(store, "a", "b", per_task=2)
    jobs = claim_jobs(store, T0)
    store.finish_attempts([outcome(j, "delivered", at(1)) for j in jobs])
    gone = [d.id for d in store.list_deliveries(task_id="a")[0]]

    assert store.remove("luma", "a")

    assert store.get("luma", "a") is None
    assert [None, None] == [store.get_delivery(pk) for pk in gone]
    assert [] == store.list_deliveries(task_id="a")[0]
    assert 2 == len(store.list_deliveries(task_id="b")[0])
    kept = store.get("luma", "b")
    assert kept is not None
    assert 1 == len(kept.transitions)
    assert not store.remove("luma", "a")
    assert (["a"], []) == register(store, "a", now=at(2))
    assert [] == store.integrity_problems()


# -- claim_deliveries -------------------------------------------------------------------------


def test_claim_deliveries_takes_due_ones_oldest_first_up_to_the_limit(store: SqlStore) -> None:
    """Due deliveries come oldest first, at most ``limit`` per call, never one not yet due."""
    queue_events(store, "a", now=T0)
    queue_events(store, "b", now=at(1))
    queue_events(store, "c", now=at(2))
    queue_events(store, "d", now=at(20))

    first = claim_jobs(store, at(10), limit=2)
    rest = claim_jobs(store, at(10), limit=2)

    assert ["a", "b"] == [j.task_id for j in first]
    assert ["c"] == [j.task_id for j in rest]
    assert [] == claim_jobs(store, at(10))
    assert ["d"] == [j.task_id for j in claim_jobs(store, at(20))]


def test_claim_deliveries_returns_the_stored_event(store: SqlStore) -> None:
    """A claimed job carries the exact payload bytes, target and attempt count."""
    register(store, "a")
    (task,) = claim(store, T0)
    sent = OutboxEntry(
        webhook_id="msg_exact",
        event_type="task.completed",
        payload='{"x":"\u00fc","n":1}'.encode(),
        url=HOOK,
        endpoint="main",
        guarded=True,
    )
    store.record([TaskUpdate(task, change(task, TaskStatus.COMPLETED), (sent,))], T0)

    (job,) = claim_jobs(store, T0)

    assert ("msg_exact", "task.completed", sent.payload) == (
        job.webhook_id,
        job.event_type,
        job.payload,
    )
    assert (HOOK, "main", True, 0) == (job.url, job.endpoint, job.guarded, job.attempts)
    assert ("luma", "a", task.pk) == (job.platform, job.task_id, job.task_pk)


def test_a_claimed_delivery_is_reclaimable_only_after_its_lease(store: SqlStore) -> None:
    """A lease hides a delivery until it runs out; then a new claim resumes it (crash recovery)."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)

    assert [] == claim_jobs(store, at(LEASE - 1))
    (again,) = claim_jobs(store, at(LEASE + 1))

    assert (job.pk, job.webhook_id, 0) == (again.pk, again.webhook_id, again.attempts)


def test_a_renewed_claim_outlives_its_first_lease(store: SqlStore) -> None:
    """extend_claims moves a held lease's end, and that end is the claim's new token."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)
    assert job.lease_until == at(LEASE).timestamp()

    assert {job.pk} == store.extend_claims({job.pk: at(LEASE).timestamp()}, at(50).timestamp())

    assert [] == claim_jobs(store, at(LEASE + 1))
    assert set() == store.extend_claims({job.pk: at(LEASE).timestamp()}, at(90).timestamp())
    store.finish_attempts(
        [outcome(dataclasses.replace(job, lease_until=at(50).timestamp()), "delivered", at(49))]
    )
    delivery = store.get_delivery(job.pk)
    assert delivery is not None
    assert ("delivered", 1) == (delivery.state, delivery.attempts)


def test_a_claim_taken_over_after_its_lease_lapsed_moves_nothing_for_its_old_holder(
    store: SqlStore,
) -> None:
    """After a lapse and another claim, the old holder can neither renew the delivery nor move
    it on: its late result is logged as an attempt, the new holder's result decides.
    """
    queue_events(store, "a")
    (old,) = claim_jobs(store, T0)
    (new,) = claim_jobs(store, at(LEASE + 1))

    assert set() == store.extend_claims({old.pk: old.lease_until or 0.0}, at(90).timestamp())
    store.finish_attempts([outcome(new, "delivered", at(LEASE + 2))])
    late = outcome(
        old, "pending", at(LEASE + 3), next_attempt_at=at(99).timestamp(), status_code=500
    )
    store.finish_attempts([late])

    delivery = store.get_delivery(old.pk)
    assert delivery is not None
    assert ("delivered", 1, at(LEASE + 2), None) == (
        delivery.state,
        delivery.attempts,
        delivery.last_attempt_at,
        delivery.next_attempt_at,
    )
    assert [200, 500] == [a.status_code for a in delivery.log]


def test_a_finished_delivery_is_no_longer_held_by_its_claim(store: SqlStore) -> None:
    """Once its result is written, a delivery's claim cannot be renewed (nor a re-queue's)."""
    queue_events(store, "a", "b")
    first, second = claim_jobs(store, T0)
    store.finish_attempts([outcome(first, "delivered", at(1))])
    assert [second.pk] == store.requeue(at(2), pk=second.pk)

    tokens = {first.pk: first.lease_until or 0.0, second.pk: second.lease_until or 0.0}
    assert set() == store.extend_claims(tokens, at(50).timestamp())


def test_a_later_event_of_a_task_waits_for_the_earlier_one(store: SqlStore) -> None:
    """Events of one task go out in order: the next waits while an earlier one is pending."""
    queue_events(store, "a", per_task=2)
    queue_events(store, "b", now=at(1))
    first, other = claim_jobs(store, at(1))
    assert ("a", "b") == (first.task_id, other.task_id)

    store.finish_attempts(
        [
            outcome(first, "pending", at(2), next_attempt_at=at(100).timestamp(), status_code=500),
            outcome(other, "delivered", at(2)),
        ]
    )
    assert [] == claim_jobs(store, at(50))
    (retried,) = claim_jobs(store, at(100))
    assert first.pk == retried.pk
    store.finish_attempts([outcome(retried, "delivered", at(101))])
    (second,) = claim_jobs(store, at(101))

    assert ("a", second.pk) == (second.task_id, first.pk + 1)


def test_a_dead_event_does_not_block_the_later_ones(store: SqlStore) -> None:
    """Once an earlier event is dead, the task's later events are delivered."""
    queue_events(store, "a", per_task=2)
    (first,) = claim_jobs(store, T0)

    store.finish_attempts([outcome(first, "dead", at(1), status_code=410)])

    (second,) = claim_jobs(store, at(1))
    assert first.pk != second.pk


# -- finish_attempts, get_delivery, list_deliveries -------------------------------------------


def test_a_delivered_attempt_is_logged_and_ends_the_delivery(store: SqlStore) -> None:
    """A delivered attempt writes a log row, counts an attempt and is never claimed again."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)

    store.finish_attempts([outcome(job, "delivered", at(3))])

    delivery = store.get_delivery(job.pk)
    assert delivery is not None
    assert ("delivered", 1, at(3), at(3)) == (
        delivery.state,
        delivery.attempts,
        delivery.delivered_at,
        delivery.last_attempt_at,
    )
    assert (200, None, None) == (
        delivery.last_status_code,
        delivery.last_error,
        delivery.next_attempt_at,
    )
    assert [(at(3), HOOK, 200, None, 12.5, "ok")] == [
        (a.at, a.url, a.status_code, a.error, a.latency_ms, a.response_excerpt)
        for a in delivery.log
    ]
    assert [] == claim_jobs(store, at(10**6))


def test_a_failed_attempt_schedules_the_next_one(store: SqlStore) -> None:
    """A retryable failure keeps the delivery pending until its next attempt, counting tries."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)
    store.finish_attempts(
        [outcome(job, "pending", at(1), next_attempt_at=at(60).timestamp(), status_code=503)]
    )
    assert [] == claim_jobs(store, at(59))
    (job,) = claim_jobs(store, at(60))
    assert 1 == job.attempts

    store.finish_attempts(
        [
            outcome(
                job,
                "pending",
                at(61),
                next_attempt_at=at(200).timestamp(),
                status_code=None,
                error="timeout",
            )
        ]
    )

    delivery = store.get_delivery(job.pk)
    assert delivery is not None
    assert ("pending", 2, at(200)) == (delivery.state, delivery.attempts, delivery.next_attempt_at)
    assert (None, "timeout", None) == (
        delivery.last_status_code,
        delivery.last_error,
        delivery.delivered_at,
    )
    assert [(503, None), (None, "timeout")] == [(a.status_code, a.error) for a in delivery.log]
    assert at(200) == store.next_delivery_at()


def test_a_dead_delivery_is_never_claimed_again(store: SqlStore) -> None:
    """A dead delivery keeps its log and is out of the queue."""
    queue_events(store, "a")
    (job,) = claim_jobs(store, T0)

    store.finish_attempts([outcome(job, "dead", at(1), status_code=410)])

    delivery = store.get_delivery(job.pk)
    assert delivery is not None
    assert ("dead", 1, None) == (delivery.state, delivery.attempts, delivery.next_attempt_at)
    assert [] == claim_jobs(store, at(10**6))
    assert store.next_delivery_at() is None


def test_finish_attempts_skips_deliveries_removed_meanwhile(store: SqlStore) -> None:
    """A task removed while its event was in flight does not fail the rest of the batch."""
    queue_events(store, "a", "b")
    jobs = {j.task_id: j for j in claim_jobs(store, T0)}
    store.remove("luma", "a")

    store.finish_attempts([outcome(j, "delivered", at(1)) for j in jobs.values()])
    store.finish_attempts([])

    assert store.get_delivery(jobs["a"].pk) is None
    delivered = store.get_delivery(jobs["b"].pk)
    assert delivered is not None
    assert ("delivered", 1) == (delivered.state, len(delivered.log))


def test_get_delivery_of_an_unknown_id_is_none(store: SqlStore) -> None:
    """get_delivery returns None for ids it never saw."""
    assert store.get_delivery(12345) is None


def test_list_deliveries_filters_pages_and_attaches_logs(store: SqlStore) -> None:
    """Filters combine, pages run newest first through every row once, each with its log."""
    queue_events(store, "a", "b", per_task=2, platform="luma")
    queue_events(store, "s", per_task=3, platform="suno")
    jobs = claim_jobs(store, T0)
    store.finish_attempts([outcome(j, "dead", at(1), status_code=410) for j in jobs])
    everything = [d.id for d in store.list_deliveries(limit=100)[0]]

    seen: list[int] = []
    cursor: int | None = None
    while True:
        page, cursor = store.list_deliveries(limit=2, before=cursor)
        seen += [d.id for d in page]
        if cursor is None:
            break

    assert 7 == len(everything)
    assert sorted(everything, reverse=True) == everything == seen
    assert 3 == len(store.list_deliveries(platform="suno")[0])
    assert 2 == len(store.list_deliveries(platform="luma", task_id="b")[0])
    assert 3 == len(store.list_deliveries(state="dead")[0])
    dead = store.list_deliveries(state="dead", platform="luma")[0]
    assert {"a", "b"} == {d.task_id for d in dead}
    assert all(1 == len(d.log) and 410 == d.log[0].status_code for d in dead)
    pending = store.list_deliveries(state="pending")[0]
    assert 4 == len(pending)
    assert all(() == d.log for d in pending)


# -- requeue ----------------------------------------------------------------------------------


def test_requeue_by_id_sends_any_delivery_again_with_its_webhook_id(store: SqlStore) -> None:
    """One delivery in any state is pending and due again, keeping its webhook-id."""
    queue_events(store, "delivered", "dead", "leased")
    jobs = {j.task_id: j for j in claim_jobs(store, T0)}
    store.finish_attempts(
        [
            outcome(jobs["delivered"], "delivered", at(1)),
            outcome(jobs["dead"], "dead", at(1), status_code=410),
        ]
    )

    for name in ("delivered", "dead", "leased"):
        assert [jobs[name].pk] == store.requeue(at(5), pk=jobs[name].pk)
    assert [] == store.requeue(at(5), pk=999_999)

    again = {j.task_id: j for j in claim_jobs(store, at(5))}
    assert {n: jobs[n].webhook_id for n in jobs} == {n: j.webhook_id for n, j in again.items()}
    delivery = store.get_delivery(jobs["delivered"].pk)
    assert delivery is not None
    assert ("pending", None, 1) == (delivery.state, delivery.delivered_at, len(delivery.log))


def test_requeue_recovers_dead_deliveries_created_in_a_window(store: SqlStore) -> None:
    """Recovery re-queues dead deliveries created in [since, until) and touches no other."""
    queue_events(store, "before", now=T0)
    queue_events(store, "start", now=at(10))
    queue_events(store, "inside", now=at(15))
    queue_events(store, "end", now=at(20))
    queue_events(store, "delivered", now=at(15))
    queue_events(store, "waiting", now=at(15))
    jobs = {j.task_id: j for j in claim_jobs(store, at(20))}
    store.finish_attempts(
        [
            outcome(jobs[n], "dead", at(21), status_code=410)
            for n in ("before", "start", "inside", "end")
        ]
        + [
            outcome(jobs["delivered"], "delivered", at(21)),
            outcome(jobs["waiting"], "pending", at(21), next_attempt_at=at(500).timestamp()),
        ]
    )

    requeued = store.requeue(at(30), since=at(10), until=at(20))

    assert sorted([jobs["start"].pk, jobs["inside"].pk]) == sorted(requeued)
    states = {d.task_id: d.state for d in store.list_deliveries()[0]}
    assert {
        "before": "dead",
        "start": "pending",
        "inside": "pending",
        "end": "dead",
        "delivered": "delivered",
        "waiting": "pending",
    } == states
    assert ["start", "inside"] == [j.task_id for j in claim_jobs(store, at(30))]
    assert sorted([jobs["before"].pk, jobs["end"].pk]) == sorted(store.requeue(at(31)))


# -- figures ----------------------------------------------------------------------------------


def test_stats_count_tasks_and_deliveries(store: SqlStore) -> None:
    """Stats count tasks by platform and status, deliveries by state, and date the oldest."""
    empty = store.stats()
    assert ({}, {}, None) == (empty.tasks, empty.deliveries, empty.oldest_pending_delivery)
    queue_events(store, "a", "b", now=at(5))
    queue_events(store, "s", platform="suno", now=at(7))
    register(store, "p", now=at(8))
    (job,) = [j for j in claim_jobs(store, at(8)) if j.task_id == "a"]
    store.finish_attempts([outcome(job, "delivered", at(9))])

    stats = store.stats()

    assert {("luma", "in_progress"): 2, ("luma", "pending"): 1, ("suno", "in_progress"): 1} == dict(
        stats.tasks
    )
    assert {"delivered": 1, "pending": 2} == dict(stats.deliveries)
    assert at(5) == stats.oldest_pending_delivery
    assert stats.oldest_pending_delivery is not None
    assert UTC == stats.oldest_pending_delivery.tzinfo


def test_next_delivery_at_is_the_earliest_pending_attempt(store: SqlStore) -> None:
    """next_delivery_at is the earliest due time among pending deliveries, None without any."""
    assert store.next_delivery_at() is None
    queue_events(store, "a", "b", now=at(3))
    jobs = claim_jobs(store, at(3))
    store.finish_attempts(
        [
            outcome(jobs[0], "pending", at(4), next_attempt_at=at(80).timestamp()),
            outcome(jobs[1], "pending", at(4), next_attempt_at=at(40).timestamp()),
        ]
    )

    assert at(40) == store.next_delivery_at()
    (retried,) = claim_jobs(store, at(40))
    store.finish_attempts([outcome(retried, "delivered", at(41))])
    assert at(80) == store.next_delivery_at()


# -- concurrency ------------------------------------------------------------------------------


@pytest.mark.postgres
def test_daemons_sharing_postgres_never_claim_the_same_task(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """Threads of two stores claiming at once get disjoint tasks that together cover all."""
    first, second = pg_stores
    register(first, *[f"t{i}" for i in range(240)])

    def work(i: int) -> list[int]:
        store = (first, second)[i % 2]
        taken: list[int] = []
        while batch := claim(store, T0, limit=7):
            taken += [t.pk for t in batch]
        return taken

    claims = [pk for taken in in_threads(6, work) for pk in taken]

    assert len(claims) == len(set(claims))
    assert 240 == len(claims)


@pytest.mark.postgres
def test_claim_due_skips_rows_another_daemon_holds(pg_stores: tuple[SqlStore, SqlStore]) -> None:
    """A claim passes over tasks locked by another transaction instead of waiting for them."""
    first, second = pg_stores
    register(first, "a", "b", "c", "d")
    with ThreadPoolExecutor(1) as pool, first.engine.connect() as other:
        other.execute(
            sa.select(tasks_table.c.id)
            .where(tasks_table.c.task_id.in_(["a", "c"]))
            .with_for_update()
        ).all()

        taken = pool.submit(claim_ids, second, T0).result(timeout=5)
        other.rollback()

    assert ["b", "d"] == taken


@pytest.mark.postgres
def test_daemons_sharing_postgres_never_claim_the_same_delivery(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """Threads of two stores claiming deliveries at once never get the same one."""
    first, second = pg_stores
    queue_events(first, *[f"t{i}" for i in range(120)], per_task=2)

    def work(i: int) -> list[int]:
        store = (first, second)[i % 2]
        taken: list[int] = []
        while batch := claim_jobs(store, T0, limit=5):
            taken += [j.pk for j in batch]
        return taken

    claims = [pk for taken in in_threads(6, work) for pk in taken]

    # Only the first event of each task is claimable while the second waits behind it.
    assert len(claims) == len(set(claims))
    assert 120 == len(claims)


@pytest.mark.postgres
def test_concurrent_registrations_of_the_same_ids_in_opposite_orders_both_succeed(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """Two daemons registering the same 2,000 ids at once, one in reverse order: no deadlock;
    each id is registered by exactly one of them (the other finds it existing), once, with
    its next poll."""
    stores = pg_stores
    for attempt in range(3):
        ids = [f"r{attempt}-{n:04}" for n in range(2000)]
        start = threading.Barrier(2)

        def work(store: SqlStore, order: list[str], start: threading.Barrier = start) -> Any:
            start.wait(timeout=10)
            return store.register(Registration("luma", order), T0)

        with ThreadPoolExecutor(2) as pool:
            (new_a, old_a), (new_b, old_b) = pool.map(work, stores, (ids, ids[::-1]))

        assert set(ids) == set(new_a) | set(new_b)
        assert not set(new_a) & set(new_b)
        assert (set(old_a), set(old_b)) == (set(new_b), set(new_a))
    with stores[0].engine.connect() as conn:
        counted = [
            conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
            for table in (tasks_table, polls_table)
        ]
    assert [6000, 6000] == counted


@pytest.mark.postgres
def test_concurrent_registrations_of_one_id_both_succeed(pg_url: str) -> None:
    """An id inserted by a concurrent request counts as existing instead of failing the call."""
    store = SqlStore.from_url(pg_url)
    store.create_schema()
    try:
        with ThreadPoolExecutor(1) as pool, store.engine.connect() as other:
            other.execute(
                tasks_table.insert().values(
                    platform="luma",
                    task_id="a",
                    status="pending",
                    fail_reason="",
                    created_at=T0,
                    updated_at=T0,
                    last_change_at=T0.timestamp(),
                )
            )
            racing = pool.submit(register, store, "a", "b")
            with store.engine.connect() as watching:
                wait_for_lock_waiters(watching)  # our INSERT of "a" waits for the other one
            other.commit()
            result = racing.result(timeout=10)
    finally:
        store.close()

    assert (["b"], ["a"]) == result


def test_sqlite_uses_wal_and_waits_for_locks(sqlite_url: str) -> None:
    """SQLite connections run in WAL mode with a busy timeout and foreign keys on."""
    store = SqlStore.from_url(sqlite_url)
    try:
        store.create_schema()
        with store.engine.connect() as conn:
            mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
            timeout = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
            keys = conn.exec_driver_sql("PRAGMA foreign_keys").scalar()
    finally:
        store.close()

    assert ("wal", 1) == (mode, keys)
    assert timeout is not None
    assert timeout >= 1000


def test_sqlite_writers_in_two_threads_do_not_fail(sqlite_url: str) -> None:
    """Two stores writing one SQLite file at once wait for each other instead of failing."""
    stores = [SqlStore.from_url(sqlite_url), SqlStore.from_url(sqlite_url)]
    stores[0].create_schema()

    def work(i: int) -> list[int]:
        store = stores[i]
        for n in range(25):
            # register reads, then writes: the upgrade a deferred transaction fails on
            register(store, f"w{i}-{n}", f"shared-{n}")
            store.set_meta(f"writer-{i}", str(n))
            claim(store, at(n))
        return [n]

    try:
        in_threads(2, work)
        page, _ = stores[0].list_tasks(limit=1000)
    finally:
        for store in stores:
            store.close()

    assert 75 == len(page)


def test_pull_in_moves_later_polls_to_the_given_time(store: SqlStore) -> None:
    """After a shorter interval, polls planned further out are pulled in; earlier ones stay."""
    register(store, "a")
    register(store, "b", now=at(-100))
    claim(store, T0)  # both now due after their back-off
    store.pull_in(at(1), now=T0)

    assert [] == claim_ids(store, at(0.5))
    assert ["a", "b"] == sorted(claim_ids(store, at(1)))


MOVES_OF_EVERY_PLAN: dict[str, tuple[Callable[[SqlStore], object], list[float]]] = {
    # how the plans of rows a and b (next polls 900 and 500) move, and where they end
    "pull_in": (
        lambda store: store.pull_in(
            datetime.fromtimestamp(100, UTC), now=datetime.fromtimestamp(0, UTC)
        ),
        [100.0, 100.0],
    ),
    "shift_plans": (
        lambda store: store.shift_plans(50, datetime.fromtimestamp(0, UTC)),
        [450.0, 850.0],
    ),
}


@pytest.mark.parametrize("how", sorted(MOVES_OF_EVERY_PLAN))
def test_moving_every_plan_waits_for_a_daemon_locking_in_id_order_instead_of_deadlocking(
    pg_stores: tuple[SqlStore, SqlStore], how: str
) -> None:
    """pull_in and shift_plans lock their rows in id order, as record() and removal do:
    another daemon that holds the first row and then asks for the second gets it, and the
    move goes on after it commits. (Locking in table order, the later-written row first,
    deadlocked: PostgreSQL then aborts one of the two.)"""
    move, expected = MOVES_OF_EVERY_PLAN[how]
    first, second = pg_stores
    register(first, "a", "b")
    a, b = sorted(t.pk for t in claim(first, T0))
    with first.engine.begin() as conn:  # b's row first, a's after it, in the table
        conn.execute(
            polls_table.update().where(polls_table.c.task_pk == b).values(next_poll_at=500)
        )
        conn.execute(
            polls_table.update().where(polls_table.c.task_pk == a).values(next_poll_at=900)
        )

    def lock(conn: sa.Connection, pk: int) -> None:
        query = sa.select(polls_table.c.task_pk).where(polls_table.c.task_pk == pk)
        conn.execute(query.with_for_update()).all()

    with second.engine.connect() as other, ThreadPoolExecutor(1) as pool:
        with other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            lock(other, a)
            moving = pool.submit(move, first)
            wait_for_lock_waiters(other, 1)
            lock(other, b)  # a deadlock would fail here (or the move) within a second
        moving.result(timeout=10)
    with first.engine.connect() as conn:
        moved = conn.execute(sa.select(polls_table.c.next_poll_at)).scalars().all()
    assert expected == sorted(moved)


def test_shift_plans_moves_what_was_planned_after_now_back_by_the_step(store: SqlStore) -> None:
    """After the wall clock stepped back an hour, the polls and the pending deliveries' next
    attempts planned after the new now move an hour earlier; what is due already, and
    deliveries no longer pending, stay as they were."""
    queue_events(store, "retry", "done", "due")
    register(store, "later")
    polls_at = {"retry": -5, "done": -5, "due": -5, "later": 3610}
    attempts_at = {"retry": 3620, "done": 3630, "due": -1}

    def pks() -> dict[str, int]:
        with store.engine.connect() as conn:
            return dict(conn.execute(sa.select(tasks_table.c.task_id, tasks_table.c.id)).all())

    ids = pks()
    with store.engine.begin() as conn:
        for task_id, seconds in polls_at.items():
            conn.execute(
                polls_table.update()
                .where(polls_table.c.task_pk == ids[task_id])
                .values(next_poll_at=at(seconds).timestamp())
            )
        for task_id, seconds in attempts_at.items():
            conn.execute(
                deliveries_table.update()
                .where(deliveries_table.c.task_pk == ids[task_id])
                .values(
                    next_attempt_at=at(seconds).timestamp(),
                    state="delivered" if task_id == "done" else "pending",
                )
            )

    assert (1, 1) == store.shift_plans(3600, T0)

    by_pk = {pk: task_id for task_id, pk in ids.items()}
    with store.engine.connect() as conn:
        polls_now = dict(conn.execute(sa.select(polls_table)).all())
        query = sa.select(deliveries_table.c.task_pk, deliveries_table.c.next_attempt_at)
        attempts_now = dict(conn.execute(query).all())
    assert {"retry": -5, "done": -5, "due": -5, "later": 10} == {
        by_pk[pk]: round(value - T0.timestamp(), 3) for pk, value in polls_now.items()
    }
    assert {"retry": 20, "done": 3630, "due": -1} == {
        by_pk[pk]: round(value - T0.timestamp(), 3) for pk, value in attempts_now.items()
    }


def test_release_claims_frees_every_pending_lease(store: SqlStore) -> None:
    """A restarted single daemon takes back deliveries it held when it died, at once."""
    queue_events(store, "a", "b")
    assert 2 == len(claim_jobs(store, T0))
    assert [] == claim_jobs(store, T0)

    assert 2 == store.release_claims()
    assert 2 == len(claim_jobs(store, T0))


def test_one_tasks_deliveries_are_read_through_the_task_index(sqlite_url: str) -> None:
    """Listing a task's deliveries uses the (task_pk, id) index, not a scan of all deliveries."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    statements: list[tuple[str, Any]] = []

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        if statement.startswith("SELECT deliveries."):
            statements.append((statement, parameters))

    sa.event.listen(store.engine, "before_cursor_execute", keep)
    try:
        store.list_deliveries(platform="luma", task_id="t1", limit=10)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", keep)
    assert 1 == len(statements)
    statement, parameters = statements[0]
    with store.engine.connect() as conn:
        plan = conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters).all()
    store.close()
    details = " ".join(str(row[-1]) for row in plan)
    assert "ix_deliveries_task" in details, details


# -- lock order with pruning, and acknowledged writes -----------------------------------------


def finished(store: SqlStore, task_id: str) -> int:
    """Register ``task_id`` and record its move to completed, with one event; its id."""
    register(store, task_id)
    task = claim_one(store, task_id, T0)
    store.record([TaskUpdate(task, change(task, TaskStatus.COMPLETED), (entry(),))], T0)
    return task.pk


@pytest.mark.postgres
def test_removing_a_task_a_prune_holds_waits_for_it_instead_of_deadlocking(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """A prune locks a final task's row, then its deliveries, then deletes them all. A removal
    of that task meanwhile waits for the task's row before it touches anything, and finds the
    task gone once the prune commits. (It deleted the deliveries first, so each of the two
    waited for the other: PostgreSQL aborted the removal, and the API answered 500.)"""
    first, second = pg_stores
    pk = finished(first, "a")
    with second.engine.connect() as other, ThreadPoolExecutor(1) as pool:
        with other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            # The prune's steps (tracker/store/prune.py), the removal started after the first.
            task = sa.select(tasks_table.c.id).where(tasks_table.c.id == pk)
            other.execute(task.with_for_update()).all()
            removing = pool.submit(first.remove, "luma", "a")
            wait_for_lock_waiters(other, 1)
            owned = sa.select(deliveries_table.c.id).where(deliveries_table.c.task_pk == pk)
            other.execute(owned.with_for_update()).all()
            for table, column in (
                (attempts_table, attempts_table.c.delivery_pk.in_(owned)),
                (deliveries_table, deliveries_table.c.task_pk == pk),
                (transitions_table, transitions_table.c.task_pk == pk),
                (tasks_table, tasks_table.c.id == pk),
            ):
                other.execute(table.delete().where(column))
        removed = removing.result(timeout=10)

    assert removed is False
    assert first.get("luma", "a") is None
    assert ([], None) == first.list_deliveries()


@pytest.mark.postgres
def test_requeue_leaves_out_a_dead_delivery_pruned_while_it_waited(
    pg_stores: tuple[SqlStore, SqlStore],
) -> None:
    """A prune deleting a dead delivery holds its row until it commits. A recovery of the dead
    deliveries meanwhile waits for it, then returns only the ids it re-queued: not the pruned
    one, which it reported re-queued although nothing would ever send it."""
    first, second = pg_stores
    queue_events(first, "pruned", "kept")
    jobs = {j.task_id: j for j in claim_jobs(first, T0)}
    first.finish_attempts([outcome(job, "dead", at(1), status_code=410) for job in jobs.values()])
    gone = jobs["pruned"].pk
    with second.engine.connect() as other, ThreadPoolExecutor(1) as pool:
        with other.begin():
            other.exec_driver_sql("SET LOCAL lock_timeout = '10s'")
            other.execute(attempts_table.delete().where(attempts_table.c.delivery_pk == gone))
            other.execute(deliveries_table.delete().where(deliveries_table.c.id == gone))
            requeuing = pool.submit(first.requeue, at(2))
            wait_for_lock_waiters(other, 1)
        requeued = requeuing.result(timeout=10)

    assert [jobs["kept"].pk] == requeued
    assert {"kept": "pending"} == {d.task_id: d.state for d in first.list_deliveries()[0]}


def test_acknowledged_writes_are_synced_to_disk_on_sqlite_and_poll_writes_are_not(
    tmp_path: Path,
) -> None:
    """SQLite in WAL mode at synchronous NORMAL survives a crash of the process, not a power
    loss: the last commits before one may roll back. What tracker acknowledges (a registration
    answered 201, a removal, a re-queue) commits at FULL, which syncs it and every commit
    before it; the polls' and deliveries' own writes stay at NORMAL (the next poll finds a
    rolled-back status again, and a webhook is sent at least once)."""
    store = SqlStore.from_url(f"sqlite:///{tmp_path / 'tracker.db'}")
    traced: list[tuple[int, str]] = []

    def trace(dbapi: Any, _record: Any) -> None:
        dbapi.set_trace_callback(lambda sql: traced.append((id(dbapi), sql)))

    sa.event.listen(store.engine, "connect", trace)
    store.create_schema()
    calls: dict[str, tuple[int, int]] = {}

    def call(name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = len(traced)
        result = function(*args, **kwargs)
        calls[name] = (start, len(traced))
        return result

    try:
        call("register", register, store, "a", "b")
        (task, _) = call("claim_due", claim, store, T0)
        done = change(task, TaskStatus.IN_PROGRESS)
        call("record", store.record, [TaskUpdate(task, done, (entry(),))], T0)
        (job,) = call("claim_deliveries", claim_jobs, store, T0)
        dead = outcome(job, "dead", at(1), status_code=410)
        call("finish_attempts", store.finish_attempts, [dead])
        call("requeue", store.requeue, at(2))
        call("remove", store.remove, "luma", "b")
    finally:
        store.close()

    levels: dict[int, str] = {}  # each connection's level: NORMAL as it connects
    committed_at: dict[int, str] = {}  # position in the trace -> the level of that COMMIT
    for position, (connection, sql) in enumerate(traced):
        if sql.startswith("PRAGMA synchronous = "):
            levels[connection] = sql.removeprefix("PRAGMA synchronous = ")
        elif sql == "COMMIT":
            committed_at[position] = levels.get(connection, "NORMAL")
    seen = {
        name: sorted({level for at, level in committed_at.items() if start <= at < end})
        for name, (start, end) in calls.items()
    }
    assert {
        "register": ["FULL"],
        "claim_due": ["NORMAL"],
        "record": ["NORMAL"],
        "claim_deliveries": ["NORMAL"],
        "finish_attempts": ["NORMAL"],
        "requeue": ["FULL"],
        "remove": ["FULL"],
    } == seen


def test_record_hands_back_the_changes_it_committed_and_only_those(store: SqlStore) -> None:
    """``landed`` gets each update with a change that was written; the change of a task
    removed after its claim (the compare-and-set turns it away) and an update without a
    change are not in it."""
    register(store, "kept", "gone", "quiet")
    due = {t.task_id: t for t in claim(store, T0)}
    assert store.remove("luma", "gone")
    kept = TaskUpdate(due["kept"], change(due["kept"], TaskStatus.IN_PROGRESS))
    gone = TaskUpdate(due["gone"], change(due["gone"], TaskStatus.IN_PROGRESS))
    quiet = TaskUpdate(due["quiet"], next_poll_at=at(5).timestamp())
    landed: list[TaskUpdate] = []

    written = store.record([kept, gone, quiet], at(1), landed=landed)

    assert [kept] == landed
    assert 2 == written  # kept's row and quiet's next poll
