"""Shared fixtures: loopback servers, settings builders, SQLite files, PostgreSQL databases."""

from __future__ import annotations

import asyncio
import copy
import functools
import gc
import json
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import httpx
import pytest
import sqlalchemy as sa
import standardwebhooks

from tracker import config, logs, sdnotify, signing
from tracker.store import SqlStore
from tracker.testing import browser
from tracker.testing.daemon import Daemon as TrackerProcess
from tracker.testing.receiver import Received, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

#: the machine's PostgreSQL server (trust auth); tests create and drop their own databases
PG_ADMIN_URL = os.environ.get(
    "TRACKER_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
#: set to 1 (CI does) to fail instead of skipping when the PostgreSQL server is unreachable
PG_REQUIRED = os.environ.get("TRACKER_TEST_PG_REQUIRED") == "1"
#: CI sets it: the dashboard's browser tests then fail, rather than skip, without Chromium
BROWSER_REQUIRED = os.environ.get("TRACKER_TEST_BROWSER_REQUIRED") == "1"

T = TypeVar("T")

# Just ensuring the tests are not polluted by the environment.
for _name in list(os.environ):
    if _name.startswith("TRACKER_"):
        del os.environ[_name]


@functools.cache
def _pg_problem() -> str | None:
    """Why the PostgreSQL server cannot be used, or None; asked once per session."""
    engine = sa.create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
    try:
        with engine.connect():
            return None
    except sa.exc.SQLAlchemyError as exc:
        return type(exc.orig or exc).__name__
    finally:
        engine.dispose()


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Skip (or, where CI requires them, fail) the tests whose outside parts are missing.

    Raised from this one place so pytest's summary folds every such skip into one line each:
    PostgreSQL tests without a server (TRACKER_TEST_PG_REQUIRED=1 makes it a failure), browser
    tests without Chromium and its driver (TRACKER_TEST_BROWSER_REQUIRED=1 likewise).
    """
    if item.get_closest_marker("postgres") is not None:
        _require_postgres()
    if item.get_closest_marker("browser") is not None:
        _require_browser()


def _require_postgres() -> None:
    problem = _pg_problem()
    if problem is None:
        return
    where = sa.engine.make_url(PG_ADMIN_URL).render_as_string(hide_password=True)
    message = (
        f"PostgreSQL tests need a server at {where} ({problem}): start one, or point "
        "TRACKER_TEST_PG at a server URL; -m 'not postgres' leaves them out"
    )
    _skip_unless_required(PG_REQUIRED, "TRACKER_TEST_PG_REQUIRED", message)


def _require_browser() -> None:
    problem = browser.available()
    if problem is None:
        return
    message = (
        f"browser tests need headless Chromium ({problem}): "
        "apt-get install chromium chromium-driver; -m 'not browser' leaves them out"
    )
    _skip_unless_required(BROWSER_REQUIRED, "TRACKER_TEST_BROWSER_REQUIRED", message)


def _skip_unless_required(required: bool, variable: str, message: str) -> NoReturn:
    """Skip the test, or fail it where ``variable`` (set by CI) requires what is missing."""
    if required:
        pytest.fail(f"{variable}=1: {message}", pytrace=False)
    pytest.skip(message)


WEBHOOK_SECRET = signing.new_secret()


def base_config(relay_url: str, hook_url: str | None, db_url: str) -> dict[str, Any]:
    """A complete, valid config document pointing at loopback servers."""
    document: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "api_tokens": ["test-token"]},
        "database": {"url": db_url},
        "upstream": {"base_url": relay_url, "api_key": "sk-sim", "timeout": 2},
        "poll": {"interval": 1, "batch_size": 100, "concurrency": 4},
        "webhooks": {
            "secret": WEBHOOK_SECRET,
            "retry_delays": [0.2, 0.4, 0.8],
            "timeout": 2,
            "allow_private": ["127.0.0.0/8"],
        },
    }
    if hook_url is not None:
        document["webhooks"]["url"] = hook_url
    return document


def merge(document: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``document`` with ``overrides`` merged in, section by section."""
    merged = copy.deepcopy(document)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged


@pytest.fixture(autouse=True)
def _heap_of_earlier_tests_frozen() -> None:
    """Each test starts with what earlier ones left collected and frozen, as `tracker run`
    freezes what its startup built (runtime.tune_gc). Late in the suite the test process
    holds some 270,000 objects, and a full collection walking them (up to 0.35 s) would
    otherwise land inside some real-clock test's timing as a stall of the engine under
    test. After the first, each collection here walks only the last test's leftovers."""
    gc.collect()
    gc.freeze()


@pytest.fixture(autouse=True, scope="module")
def _heap_thawed_after_each_module() -> Iterator[None]:
    """What a module's tests left frozen that has since become garbage (cycles: their
    finalizers close sockets and files) is collected at the next module's first test."""
    yield
    gc.unfreeze()


@pytest.fixture(name="restore_logging")
def _restore_logging() -> Iterator[None]:
    """Undo what a test's logs.configure() did (a reload with new secrets calls it): the
    log configuration is process-wide."""
    yield
    logs.reset()


@pytest.fixture(name="relay")
def _relay() -> Iterator[SimulatedRelay]:
    with SimulatedRelay(step=0.0) as relay:
        yield relay


@pytest.fixture(name="receiver")
def _receiver() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


@pytest.fixture(name="sqlite_url")
def _sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'tracker.db'}"


@pytest.fixture(name="make_pg_url")
def _make_pg_url() -> Iterator[Callable[[], str]]:
    """Creates fresh PostgreSQL databases and drops them after the test."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    created: list[str] = []

    def make() -> str:
        name = f"tracker_test_{secrets.token_hex(6)}"
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        created.append(name)
        return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"

    yield make
    with admin.connect() as conn:
        for name in created:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture(
    name="db_url", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def _db_url(request: pytest.FixtureRequest, sqlite_url: str, make_pg_url: Callable[[], str]) -> str:
    """A database URL, once for SQLite and once for PostgreSQL."""
    return sqlite_url if request.param == "sqlite" else make_pg_url()


@pytest.fixture(name="store")
def _store(db_url: str) -> Iterator[SqlStore]:
    """A store with its schema, on SQLite and on PostgreSQL."""
    store = SqlStore.from_url(db_url)
    store.create_schema()
    yield store
    store.close()


@pytest.fixture(name="settings_for")
def _settings_for(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str
) -> Callable[..., config.Settings]:
    """Builds Settings against the fixture relay and receiver, with overrides."""

    def build(db_url: str | None = None, **overrides: Any) -> config.Settings:
        document = base_config(relay.base_url, receiver.url, db_url or sqlite_url)
        return config.parse(merge(document, overrides), environ={})

    return build


def toml_text(document: dict[str, Any]) -> str:
    """A small TOML writer for config documents (nested tables, scalars and arrays)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(i) for i in item) + "]"
        return repr(item)

    def table(body: dict[str, Any], path: tuple[str, ...]) -> list[str]:
        scalars = {k: v for k, v in body.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in body.items() if isinstance(v, dict)}
        lines = [f"[{'.'.join(path)}]"] if path and (scalars or not tables) else []
        lines += [f"{k} = {value(v)}" for k, v in scalars.items()]
        for name, sub in tables.items():
            lines += table(sub, (*path, name))
        return lines

    return "\n".join(table(document, ())) + "\n"


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    """Poll ``check`` on the loop until it is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within:g} s waiting for {what}")
        await asyncio.sleep(0.02)
    return result


def wait_until(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.05) -> T:
    """``check()`` once it is truthy, asked every ``every`` s; fails the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def verified(hook: Received) -> dict[str, Any]:
    """The webhook's JSON body, after checking its Standard Webhooks signature."""
    body: dict[str, Any] = standardwebhooks.Webhook(WEBHOOK_SECRET).verify(hook.body, hook.headers)
    return body


def all_pages(client: httpx.Client, path: str, key: str) -> list[dict[str, Any]]:
    """Every row of a paged API listing."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        params = {"limit": "1000", **({"cursor": cursor} if cursor else {})}
        answer = client.get(path, params=params)
        answer.raise_for_status()
        page = answer.json()
        rows += page[key]
        cursor = page["next_cursor"]
        if cursor is None:
            return rows


@pytest.fixture(name="instances")
def _instances() -> Iterator[list[TrackerProcess]]:
    """Real `tracker run` processes a test starts; each is closed (killed if need be) after."""
    started: list[TrackerProcess] = []
    yield started
    for tracker in started:
        tracker.close()


@pytest.fixture(name="listening")
def _listening() -> Iterator[int]:
    """A port another socket already listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


class RecordingNotifier(sdnotify.Notifier):
    """A notifier that keeps what it would have sent to systemd (with a watchdog when
    ``watchdog_usec`` is given)."""

    def __init__(self, watchdog_usec: int | None = None) -> None:
        super().__init__("/nonexistent/notify", watchdog_usec=watchdog_usec)
        self.sent: list[str] = []

    def send(self, message: str) -> bool:
        """Record the datagram instead of sending it."""
        self.sent.append(message)
        return True


@pytest.fixture(name="document")
def _document(relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str) -> dict[str, Any]:
    """The base config document against the fixture relay and receiver, polling fast."""
    return merge(
        base_config(relay.base_url, receiver.url, sqlite_url),
        {"poll": {"interval": 0.2, "max_interval": 1}},
    )
