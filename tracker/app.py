"""The composition root: builds every part from one Settings object and runs them together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import structlog
import uvicorn
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from sqlalchemy import exc as sa_exc

from tracker import (
    api,
    config,
    dashboard,
    events,
    logs,
    platforms,
    retention,
    sdnotify,
    ssrf,
    startup,
)
from tracker.clock import Clock, SystemClock
from tracker.delivery import Deliverer
from tracker.metrics import Metrics, poll_lag
from tracker.poller import PollEngine, Poller
from tracker.relay_health import RelayHealth
from tracker.reload import ReloadPlan, plan_reload
from tracker.retry import DeliveryState
from tracker.status import FINAL
from tracker.store import SqlStore, migrate
from tracker.store.records import Stats
from tracker.store.sql import SchemaMismatchError

log = structlog.get_logger("tracker.app")

#: how often the delivery loop looks for due retries when nothing woke it
DELIVERY_TICK = 1.0
#: how long a stop waits for the in-flight poll batch and deliveries; below the unit's
#: TimeoutStopSec=30 so systemd never has to kill us mid-write
STOP_DEADLINE = 20.0
#: how long the API may take to finish its open requests once the drain is over
HTTP_SHUTDOWN_DEADLINE = 5
#: how often the systemd STATUS= line is refreshed
STATUS_EVERY = 15.0
#: how often the appended count changes are folded (they are summed on every scrape)
COMPACT_COUNTS_EVERY = 30.0


class _NoSkipWarnings(logging.Filter):
    """Drops APScheduler's warning for a run skipped because the last one is still going.

    For the delivery job that is routine (a pass outlasts the tick).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


def _scheduler_logger() -> logging.Logger:
    logger = logging.getLogger("tracker.scheduler")
    if not any(isinstance(f, _NoSkipWarnings) for f in logger.filters):
        logger.addFilter(_NoSkipWarnings())
    return logger


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def status_line(stats: Stats, last_cycle_seconds: float | None, lag: float = 0.0) -> str:
    """The systemd STATUS= line: active tasks, the poll lag, the last drain's length, the
    outbox depth."""
    active = sum(n for (_, s), n in stats.tasks.items() if s not in FINAL)
    cycle = f"{last_cycle_seconds:.2f}s" if last_cycle_seconds is not None else "none yet"
    return (
        f"{active} active tasks, poll lag {lag:.1f}s, last cycle {cycle}, "
        f"{stats.deliveries.get(DeliveryState.PENDING, 0)} pending deliveries"
    )


def _sqlite_file(store: SqlStore) -> Path | None:
    """The database file of an SQLite store, None for another database or an in-memory one."""
    url = store.engine.url
    if url.get_backend_name() != "sqlite":
        return None
    database = url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).resolve()


def _readiness_reason(exc: Exception) -> str:
    """What /readyz says about a failed cycle: SQLite's own message (a lock, a full disk), for
    anything else the type alone, as driver messages can name hosts and users.
    """
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, sqlite3.Error):
        return f"{type(cause).__name__}: {cause}"
    return type(cause).__name__


def _probe_sqlite_file(path: Path) -> None:
    """Open the file afresh and read from it; raises when that fails.

    The store's pooled connections keep working on a file that was deleted, replaced or made
    unreadable (they hold it open), so only a new connection shows what a restart would meet.
    """
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    connection = sqlite3.connect(uri, uri=True, timeout=1.0)
    try:
        connection.execute("SELECT count(*) FROM tracker_meta").fetchone()
    finally:
        connection.close()


class Daemon:
    """One running tracker: API, poll cycle and delivery loop over one store."""

    def __init__(
        self,
        settings: config.Settings,
        *,
        clock: Clock | None = None,
        relay_transport: httpx.AsyncBaseTransport | None = None,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
        config_path: str | os.PathLike[str] | None = None,
        notifier: sdnotify.Notifier | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.config_path = Path(config_path) if config_path is not None else None
        self.notifier = notifier or sdnotify.Notifier.from_environ()
        self.store = SqlStore.from_url(settings.database.url)
        self.sqlite_file = _sqlite_file(self.store)
        self.metrics = Metrics()
        self.metrics.watch_store(self.store.stats, lambda: self.clock.now().timestamp())
        self.platforms = platforms.build(settings)
        # The pools never bind: the poller's and the deliverer's own limits do, and those
        # follow a reload, which a pool's size could not.
        self.relay_client = httpx.AsyncClient(
            transport=relay_transport,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            timeout=settings.upstream.timeout,
        )
        hooks = settings.webhooks
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
        # Webhooks get their own clients, so a slow receiver never holds a relay connection.
        self.webhook_client = httpx.AsyncClient(
            transport=webhook_transport, limits=limits, timeout=hooks.timeout
        )
        self.guarded_client = httpx.AsyncClient(
            transport=webhook_transport
            or ssrf.guarded_transport(ssrf.parse_allow(hooks.allow_private), limits=limits),
            timeout=hooks.timeout,
        )
        self.targets = events.Targets(hooks)
        self.relay_health = RelayHealth(self.clock, settings.poll.interval)
        self.poller = Poller(
            store=self.store,
            platforms=self.platforms,
            client=self.relay_client,
            clock=self.clock,
            settings=settings.poll,
            targets=self.targets,
            metrics=self.metrics,
            on_events=self.kick_delivery,
            report_relay=self.relay_health.report,
        )
        # Polling is a task of its own, not a scheduler job: see tracker/poller/engine.py.
        self.engine = PollEngine(self.poller, self.clock)
        self._polling: asyncio.Task[None] | None = None
        self.deliverer = Deliverer(
            store=self.store,
            client=self.webhook_client,
            guarded_client=self.guarded_client,
            clock=self.clock,
            settings=hooks,
            metrics=self.metrics,
        )
        self.state = api.ApiState(
            settings=settings,
            readiness=(
                self._database_ready,
                self._scheduler_ready,
                self._lag_ready,
                self._relays_ready,
            ),
            metrics=self.metrics.render,
            on_registered=self.engine.wake,
        )
        self.app = api.build(
            store=self.store, platforms=list(self.platforms), state=self.state, clock=self.clock
        )
        dashboard.mount(
            self.app,
            dashboard.Dashboard(
                store=self.store,
                clock=self.clock,
                settings=lambda: self.settings,
                platforms=list(self.platforms),
                activity=self.metrics.activity,
                poll_lag=self.poller.lag,
            ),
        )
        self.scheduler = AsyncIOScheduler(timezone=UTC, logger=_scheduler_logger())
        self.server: _Server | None = None
        self.stop_requested = asyncio.Event()
        self._busy: set[asyncio.Task[Any]] = set()
        self._delivering = False
        self._deliver_again = False
        self._started_at: datetime | None = None
        self._serving: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._stopped = False
        self._not_ready: list[str] = []
        self._log_secrets = set(settings.secrets())
        self._lock: startup.DatabaseLock | None = None

    # -- jobs -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        # What stop() waits for: work that must finish (or be cut off) before the store closes.
        task = asyncio.current_task()
        if task is not None:
            self._busy.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._busy.discard(task)

    async def _poll_loop(self) -> None:
        with self._tracked():
            await self.engine.run(self.stop_requested)

    async def _deliver_job(self) -> None:
        if self.stop_requested.is_set():
            return
        self._delivering = True
        with self._tracked():
            try:
                while not self.stop_requested.is_set():
                    self._deliver_again = False
                    await self.deliverer.run(until=self.stop_requested)
                    if not self._deliver_again:
                        await self._schedule_next_delivery()
                    if not self._deliver_again:
                        break
            except Exception:
                log.exception("delivery_run_failed")
            finally:
                self._delivering = False

    async def _schedule_next_delivery(self) -> None:
        # A retry due before the next tick (retry delays can be short) is tried on time.
        if self.stop_requested.is_set():
            return
        due = await asyncio.to_thread(self.store.next_delivery_at)
        job = self.scheduler.get_job("deliver")
        if due is None or job is None or not self.scheduler.running:
            return
        wait = (due - self.clock.now()).total_seconds()
        # Only a future due time: one already past belongs to a delivery this pass could not
        # take (leased by another run, or behind an earlier event), and the tick will do.
        if 0 < wait < DELIVERY_TICK:
            # Real time for the scheduler: the store's clock may be a test's FakeClock.
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=wait))

    async def _status_job(self) -> None:
        if not self.notifier.enabled or self.stop_requested.is_set():
            return
        stats = await asyncio.to_thread(self.store.stats)
        last = self.poller.last_report
        lag = poll_lag(stats, self.clock.now().timestamp())
        self.notifier.status(status_line(stats, None if last is None else last.seconds, lag))

    async def _retention_job(self) -> None:
        if self.stop_requested.is_set():
            return
        with self._tracked():
            try:
                await retention.run_async(
                    self.store.engine, self.settings.retention, self.clock, self.stop_requested
                )
            except Exception:
                log.exception("retention_failed")

    async def _compact_counts_job(self) -> None:
        if self.stop_requested.is_set():
            return
        try:
            await asyncio.to_thread(self.store.compact_counts)
        except Exception:
            log.exception("compact_counts_failed")

    def kick_delivery(self) -> None:
        """Start delivering now rather than at the next tick (new events were recorded)."""
        if self._delivering:
            self._deliver_again = True
            return
        job = self.scheduler.get_job("deliver")
        if job is not None and self.scheduler.running:
            job.modify(next_run_time=datetime.now(UTC))

    # -- readiness --------------------------------------------------------------------------

    async def readiness(self) -> list[str]:
        """Why the daemon is not ready (empty when it is), as /readyz reports it."""
        checks = (
            self._database_ready(),
            self._scheduler_ready(),
            self._lag_ready(),
            self._relays_ready(),
        )
        return [r for r in await asyncio.gather(*checks) if r]

    async def _database_ready(self) -> str | None:
        reason, detail = await asyncio.to_thread(self._database_problem)
        self._note_readiness("database", reason, detail)
        return reason

    def _database_problem(self) -> tuple[str | None, str | None]:
        """The reason /readyz gives and the fuller one for the log, or (None, None)."""
        try:
            self.store.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            # The type only: /readyz needs no token and driver messages name hosts and users.
            return f"database unreachable: {type(exc).__name__}", f"{type(exc).__name__}: {exc}"
        if self.sqlite_file is not None:
            try:
                _probe_sqlite_file(self.sqlite_file)
            except sqlite3.Error as exc:
                reason = f"database file {self.sqlite_file.name} unusable: {exc}"
                return reason, f"{self.sqlite_file}: {type(exc).__name__}: {exc}"
        return None, None

    async def _scheduler_ready(self) -> str | None:
        if self.stop_requested.is_set():
            return "shutting down"
        return None if self.scheduler.running else "scheduler is not running"

    async def _lag_ready(self) -> str | None:
        # Only lateness counts, never the size of the work: a long drain that keeps up is fine.
        if self._polling is not None and self._polling.done() and not self.stop_requested.is_set():
            return "the poll engine has stopped"
        failure = self.engine.last_error
        if failure is not None:
            # Said at once, not only when polls fall late: a lock or a full disk is the why.
            return f"last poll cycle failed: {_readiness_reason(failure)}"
        try:
            earliest = await asyncio.to_thread(self.store.earliest_poll)
        except Exception:  # noqa: BLE001 - the database check names the failure
            return None
        if earliest is None:
            return None
        lag = (self.clock.now() - earliest).total_seconds()
        limit = self.settings.poll.max_lag
        if lag > limit:
            return f"polls are {lag:.0f} s late (more than [poll].max_lag = {limit:g} s)"
        return None

    async def _relays_ready(self) -> str | None:
        reason = "; ".join(self.relay_health.problems()) or None
        self._note_readiness("relay", reason)
        return reason

    def _note_readiness(self, check: str, reason: str | None, detail: str | None = None) -> None:
        # One log line when a check starts or stops failing, not one per probe.
        if reason is not None and check not in self._not_ready:
            self._not_ready.append(check)
            log.warning("not_ready", check=check, reason=reason, detail=detail or reason)
        elif reason is None and check in self._not_ready:
            self._not_ready.remove(check)
            log.info("ready_again", check=check)

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def api_port(self) -> int:
        """The port the API listens on (useful when the config says 0)."""
        if self.server is None or not self.server.servers:
            raise RuntimeError("the API is not listening yet")
        port: int = self.server.servers[0].sockets[0].getsockname()[1]
        return port

    @property
    def api_url(self) -> str:
        """The base URL of the API, e.g. http://127.0.0.1:8686."""
        host = self.settings.server.host
        return f"http://{f'[{host}]' if ':' in host else host}:{self.api_port}"

    async def start(self) -> None:
        """Open the database, start listening and start the scheduler, then say READY=1.

        Raises StartupError, one line with an exit code, for every failure an operator fixes.
        """
        schema = await asyncio.to_thread(self._open_database)
        if self.store.dialect == "sqlite":
            # SQLite serves one daemon, so leases left by a crash are ours: resume those
            # deliveries now rather than when the leases run out. (PostgreSQL may be shared
            # with live daemons, whose leases must stand.)
            released = await asyncio.to_thread(self.store.release_claims)
            if released:
                log.info("resumed_deliveries", count=released)
        server_settings = self.settings.server
        self.server = _Server(
            uvicorn.Config(
                self.app,
                host=server_settings.host,
                port=server_settings.port,
                log_config=None,
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=HTTP_SHUTDOWN_DEADLINE,
                # Idle, silent and half-sent connections are closed, and their number capped.
                http=api.bounded_protocol(
                    header_timeout=server_settings.header_timeout,
                    max_connections=api.connection_cap(server_settings.max_connections),
                ),
                timeout_keep_alive=api.KEEP_ALIVE_TIMEOUT,
                backlog=api.ACCEPT_BACKLOG,
            )
        )
        sock = startup.listen(server_settings.host, server_settings.port)
        serving = asyncio.create_task(self.server.serve(sockets=[sock]), name="api")
        while not self.server.started:
            if serving.done():
                # uvicorn ends a failed start with SystemExit; retrieved here, so asyncio has
                # no "exception was never retrieved" traceback to print.
                with contextlib.suppress(BaseException):
                    await serving
                sock.close()
                raise startup.StartupError(
                    f"the API could not start on {server_settings.host}:{server_settings.port}",
                    startup.ExitCode.LISTEN,
                )
            await asyncio.sleep(0.01)
        self._serving = serving
        self._started_at = self.clock.now()
        now = datetime.now(UTC)
        jobs = {"max_instances": 1, "coalesce": True, "misfire_grace_time": None}
        self._polling = asyncio.create_task(self._poll_loop(), name="poll")
        self.scheduler.add_job(
            self._deliver_job,
            "interval",
            seconds=DELIVERY_TICK,
            id="deliver",
            next_run_time=now,
            **jobs,
        )
        self.scheduler.add_job(
            self._status_job,
            "interval",
            seconds=STATUS_EVERY,
            id="status",
            next_run_time=now,
            **jobs,
        )
        self.scheduler.add_job(
            self._retention_job,
            "interval",
            seconds=self.settings.retention.interval,
            id="retention",
            next_run_time=now,
            **jobs,
        )
        self.scheduler.add_job(
            self._compact_counts_job,
            "interval",
            seconds=COMPACT_COUNTS_EVERY,
            id="compact_counts",
            **jobs,
        )
        self.scheduler.start()
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            self._watchdog = asyncio.create_task(
                sdnotify.watchdog_loop(self.notifier, interval), name="watchdog"
            )
        self.notifier.ready()
        log.info(
            "started",
            api=self.api_url,
            database=self.store.dialect,
            schema=schema.revision,
            platforms=sorted(self.platforms),
            pid=os.getpid(),
        )

    async def stop(self) -> None:
        """Stop taking work, let in-flight polls and deliveries finish (bounded), close."""
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping()
        self.state.accepting = False
        self.stop_requested.set()
        # Paused, not shut down: shutting the asyncio executor down cancels the running jobs.
        if self.scheduler.running:
            self.scheduler.pause()
        await self._drain()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        if self.server is not None and self._serving is not None:
            self.server.should_exit = True
            await self._serving
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        await self.relay_client.aclose()
        await self.webhook_client.aclose()
        await self.guarded_client.aclose()
        self.store.close()
        if self._lock is not None:
            self._lock.release()
        if self._started_at is not None:  # a failed start has said why already
            log.info("stopped")

    def _open_database(self) -> migrate.SchemaState:
        if self.sqlite_file is not None:
            startup.check_database(self.settings.database.url)
            self._lock = startup.DatabaseLock(self.sqlite_file)
            self._lock.acquire()
        try:
            return migrate.ensure(
                self.store.engine, auto_migrate=self.settings.database.auto_migrate
            )
        except SchemaMismatchError as exc:
            raise startup.StartupError(str(exc), startup.ExitCode.SCHEMA) from None
        except sa_exc.SQLAlchemyError as exc:
            raise startup.unreachable(self.settings.database.url, exc) from None

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_DEADLINE
        # A job the scheduler launched just before the shutdown gets to see stop_requested.
        await asyncio.sleep(0)
        if not self._busy:
            return
        log.info("draining", jobs=len(self._busy), deadline=STOP_DEADLINE)
        self.notifier.status(f"stopping: finishing {len(self._busy)} in-flight jobs")
        started = loop.time()
        while self._busy:
            remaining = deadline - loop.time()
            if remaining <= 0:
                late = set(self._busy)
                log.warning("drain_deadline_passed", jobs=len(late), deadline=STOP_DEADLINE)
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
                break
            await asyncio.wait(set(self._busy), timeout=remaining)
        log.info("drained", seconds=round(loop.time() - started, 3))

    def reload(self) -> None:
        """Re-read the config file and apply what can change live (SIGHUP)."""
        if self.stop_requested.is_set():
            log.info("reload_ignored", reason="shutting down")
            return
        if self.config_path is None:
            log.warning("reload_ignored", reason="no config file to re-read")
            return
        self.notifier.reloading()
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error(  # noqa: TRY400 - the problems say it all; a traceback would not
                "reload_failed", problems=exc.problems, config=str(self.config_path)
            )
        else:
            try:
                self.apply(new)
            except Exception:
                log.exception("reload_failed", config=str(self.config_path))
        finally:
            self.notifier.ready()

    def apply(self, new: config.Settings) -> ReloadPlan:
        """Put the live parts of ``new`` in force; returns what was applied and what was not."""
        old = self.settings
        plan = plan_reload(old, new)
        current = plan.settings
        self._update_log_setup(old, current)
        self.settings = current
        self.state.settings = current
        # Rebuilt from the settings now in force, for the batch sizes [poll] implies.
        self.poller.configure(current.poll, platforms.build(current))
        self.relay_health.interval = current.poll.interval
        self.targets = events.Targets(current.webhooks)
        self.poller.targets = self.targets
        self.deliverer.configure(current.webhooks)
        job = self.scheduler.get_job("retention")
        if job is not None and current.retention.interval != old.retention.interval:
            job.reschedule("interval", seconds=current.retention.interval)
        self.engine.wake()
        log.info("reloaded", applied=plan.applied, needs_restart=plan.needs_restart)
        if plan.needs_restart:
            log.warning("restart_needed", keys=plan.needs_restart)
        for problem in plan.refused:
            log.error("reload_refused", problem=problem)
        return plan

    def _update_log_setup(self, old: config.Settings, new: config.Settings) -> None:
        secrets = set(new.secrets())
        if secrets <= self._log_secrets and old.logging.format == new.logging.format:
            logs.set_level(new.logging.level)
            return
        # New secrets must be redacted from the next line on; old ones stay redacted too.
        self._log_secrets |= secrets
        logs.configure(
            level=new.logging.level, fmt=new.logging.format, secrets=sorted(self._log_secrets)
        )

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``stop_requested``), reloading on SIGHUP."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self.stop_requested.wait()
            log.info("stopping")
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
