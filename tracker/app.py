"""The composition root: builds every part from one Settings object and runs them together."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import structlog
import uvicorn
from apscheduler.events import EVENT_JOB_MAX_INSTANCES, JobExecutionEvent
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tracker import api, config, events, logs, platforms, sdnotify, ssrf
from tracker.clock import Clock, SystemClock
from tracker.delivery import Deliverer
from tracker.metrics import Metrics
from tracker.poller import Poller
from tracker.status import FINAL
from tracker.store import SqlStore

log = structlog.get_logger("tracker.app")

#: how often the delivery loop looks for due retries when nothing woke it
DELIVERY_TICK = 1.0
#: how long a stop waits for the in-flight poll batch and deliveries; below the unit's
#: TimeoutStopSec=30 so systemd never has to kill us mid-write
STOP_DEADLINE = 20.0
#: how often the systemd STATUS= line is refreshed
STATUS_EVERY = 15.0
#: settings a reload can apply without a restart
LIVE_SECTIONS = ("poll", "webhooks", "logging")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handlers: the daemon owns SIGTERM/SIGINT/SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


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
        self.metrics = Metrics()
        self.metrics.watch_store(self.store.stats, time.time)
        self.platforms = platforms.build(settings)
        poll = settings.poll
        self.relay_client = httpx.AsyncClient(
            transport=relay_transport,
            limits=httpx.Limits(
                max_connections=poll.concurrency * 2, max_keepalive_connections=poll.concurrency
            ),
            timeout=settings.upstream.timeout,
        )
        hooks = settings.webhooks
        limits = httpx.Limits(max_connections=hooks.concurrency, max_keepalive_connections=64)
        # Webhooks get their own clients, so a slow receiver never holds a relay connection.
        self.webhook_client = httpx.AsyncClient(
            transport=webhook_transport, limits=limits, follow_redirects=False
        )
        self.guarded_client = httpx.AsyncClient(
            transport=webhook_transport
            or ssrf.guarded_transport(ssrf.parse_allow(hooks.allow_private), limits=limits),
            follow_redirects=False,
        )
        self.targets = events.Targets(hooks)
        self.poller = Poller(
            store=self.store,
            platforms=self.platforms,
            client=self.relay_client,
            clock=self.clock,
            settings=poll,
            targets=self.targets,
            metrics=self.metrics,
            on_events=self.kick_delivery,
        )
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
            readiness=(self._database_ready, self._scheduler_ready, self._cycles_ready),
            metrics=self.metrics.render,
        )
        self.app = api.build(
            store=self.store, platforms=list(self.platforms), state=self.state, clock=self.clock
        )
        self.scheduler = AsyncIOScheduler(timezone=UTC)
        self.scheduler.add_listener(self._on_skipped, EVENT_JOB_MAX_INSTANCES)
        self.server: _Server | None = None
        self.stop_requested = asyncio.Event()
        self._busy: set[asyncio.Task[object]] = set()
        self._delivering = False
        self._deliver_again = False
        self._started_at = time.monotonic()
        self._serving: asyncio.Task[None] | None = None
        self._watchdog: asyncio.Task[None] | None = None

    # -- jobs -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _tracked(self) -> Iterator[None]:
        task = asyncio.current_task()
        if task is not None:
            self._busy.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._busy.discard(task)

    async def _poll_job(self) -> None:
        with self._tracked():
            try:
                await self.poller.run_cycle()
            except Exception:
                log.exception("poll_cycle_failed")

    async def _deliver_job(self) -> None:
        self._delivering = True
        with self._tracked():
            try:
                while True:
                    self._deliver_again = False
                    await self.deliverer.run()
                    if not self._deliver_again or self.stop_requested.is_set():
                        break
            except Exception:
                log.exception("delivery_run_failed")
            finally:
                self._delivering = False

    async def _status_job(self) -> None:
        if not self.notifier.enabled:
            return
        stats = await asyncio.to_thread(self.store.stats)
        active = sum(n for (_, s), n in stats.tasks.items() if s not in FINAL)
        last = self.poller.last_report
        cycle = f"{last.seconds:.2f}s" if last is not None else "none yet"
        self.notifier.status(
            f"{active} active tasks, last cycle {cycle}, "
            f"{stats.deliveries.get('pending', 0)} pending deliveries"
        )

    def kick_delivery(self) -> None:
        """Start delivering now rather than at the next tick (new events were recorded)."""
        if self._delivering:
            self._deliver_again = True
            return
        job = self.scheduler.get_job("deliver")
        if job is not None and self.scheduler.running:
            job.modify(next_run_time=datetime.now(UTC))

    def _on_skipped(self, event: JobExecutionEvent) -> None:
        if event.job_id == "poll":
            self.metrics.cycles_skipped.inc()
            log.warning("poll_cycle_skipped", reason="previous cycle still running")

    # -- readiness --------------------------------------------------------------------------

    async def _database_ready(self) -> str | None:
        try:
            await asyncio.to_thread(self.store.ping)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            return f"database unreachable: {type(exc).__name__}"
        return None

    async def _scheduler_ready(self) -> str | None:
        return None if self.scheduler.running else "scheduler is not running"

    async def _cycles_ready(self) -> str | None:
        window = 3 * self.settings.poll.interval
        last = self.poller.last_cycle_at
        if last is None:
            if time.monotonic() - self._started_at > window:
                return f"no poll cycle has completed within {window:g} s"
            return None
        age = (self.clock.now() - last).total_seconds()
        if age > window:
            return f"last poll cycle completed {age:.0f} s ago (more than 3 intervals)"
        return None

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def api_port(self) -> int:
        """The port the API listens on (useful when the config says 0)."""
        if self.server is None or not self.server.servers:
            raise RuntimeError("the API is not listening yet")
        port: int = self.server.servers[0].sockets[0].getsockname()[1]
        return port

    async def start(self) -> None:
        """Open the database, start listening and start the scheduler."""
        await asyncio.to_thread(self.store.create_schema)
        server_settings = self.settings.server
        self.server = _Server(
            uvicorn.Config(
                self.app,
                host=server_settings.host,
                port=server_settings.port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
        )
        serving = asyncio.create_task(self.server.serve(), name="api")
        while not self.server.started:
            if serving.done():
                await serving  # re-raises why it could not start
                raise RuntimeError("the API server stopped while starting")
            await asyncio.sleep(0.01)
        self._serving = serving
        now = datetime.now(UTC)
        poll = self.settings.poll
        self.scheduler.add_job(
            self._poll_job,
            "interval",
            seconds=poll.interval,
            id="poll",
            next_run_time=now,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self._deliver_job,
            "interval",
            seconds=DELIVERY_TICK,
            id="deliver",
            next_run_time=now,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
        )
        self.scheduler.add_job(
            self._status_job, "interval", seconds=STATUS_EVERY, id="status", next_run_time=now
        )
        self.scheduler.start()
        interval = self.notifier.watchdog_interval()
        self._watchdog = (
            asyncio.create_task(sdnotify.watchdog_loop(self.notifier, interval))
            if interval is not None
            else None
        )
        self.notifier.ready()
        log.info(
            "started",
            api=f"http://{server_settings.host}:{self.api_port}",
            database=self.store.dialect,
            platforms=sorted(self.platforms),
        )

    async def stop(self) -> None:
        """Stop taking work, let in-flight polls and deliveries finish (bounded), close."""
        self.notifier.stopping()
        self.state.accepting = False
        self.stop_requested.set()
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)
        busy = set(self._busy)
        if busy:
            log.info("draining", jobs=len(busy), deadline=STOP_DEADLINE)
            _, late = await asyncio.wait(busy, timeout=STOP_DEADLINE)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self.server is not None and self._serving is not None:
            self.server.should_exit = True
            await self._serving
        await self.relay_client.aclose()
        await self.webhook_client.aclose()
        await self.guarded_client.aclose()
        self.store.close()
        log.info("stopped")

    def reload(self) -> None:
        """Re-read the config file and apply what can change live (SIGHUP)."""
        if self.config_path is None:
            log.warning("reload_ignored", reason="no config file to re-read")
            return
        self.notifier.reloading()
        try:
            new = config.load(self.config_path)
        except config.ConfigError as exc:
            log.error("reload_failed", problems=exc.problems)  # noqa: TRY400 - no traceback wanted
            self.notifier.ready()
            return
        old = self.settings
        needs_restart = [
            name
            for name in type(old).model_fields
            if name not in (*LIVE_SECTIONS, "server") and getattr(old, name) != getattr(new, name)
        ]
        if old.server.model_copy(update={"api_tokens": ()}) != new.server.model_copy(
            update={"api_tokens": ()}
        ):
            needs_restart.append("server (host, port, metrics_require_auth)")
        self.settings = new
        self.state.settings = new
        self.poller.configure(new.poll)
        self.targets = events.Targets(new.webhooks)
        self.poller.targets = self.targets
        self.deliverer.configure(new.webhooks)
        logs.set_level(new.logging.level)
        job = self.scheduler.get_job("poll")
        if job is not None and new.poll.interval != old.poll.interval:
            job.reschedule("interval", seconds=new.poll.interval)
        log.info(
            "reloaded",
            applied=[s for s in LIVE_SECTIONS if getattr(old, s) != getattr(new, s)]
            + (["server.api_tokens"] if old.server.api_tokens != new.server.api_tokens else []),
            needs_restart=needs_restart,
        )
        self.notifier.ready()

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT (or ``stop_requested``), reloading on SIGHUP."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop_requested.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self.stop_requested.wait()
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
