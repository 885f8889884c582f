"""One running tracker: the parts ``tracker.compose`` builds, started and stopped together.

Starting enters each part on one ``AsyncExitStack`` and each pushes its own cleanup as it
starts, so a start that fails halfway unwinds exactly what had started, and a stop unwinds all
of it in reverse: no new job runs, the work in flight drains (bounded), the jobs shut down,
the API finishes its open requests, the store closes, the SQLite lock goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping
from pathlib import Path

import anyio.to_thread
import structlog

from tracker import api, compose, config, sdnotify
from tracker import reload as reloading
from tracker.clock import Clock
from tracker.jobs import cancelled
from tracker.store import SqlStore

log = structlog.get_logger("tracker.app")


class Daemon:
    """API, poll loop and delivery over one store, with SIGTERM/SIGINT/SIGHUP handled.

    The parts are ``compose.build``'s (``self.parts``), given every argument but
    ``config_path``, ``overrides`` and ``environ`` (the environment ``settings`` were read
    with, the process's by default: a reload applies the same overrides from it).
    """

    def __init__(
        self,
        settings: config.Settings,
        *,
        clock: Clock | None = None,
        transports: compose.Transports | None = None,
        store: SqlStore | None = None,
        notifier: sdnotify.Notifier | None = None,
        config_path: str | os.PathLike[str] | None = None,
        overrides: reloading.Overrides | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.parts = compose.build(
            settings, clock=clock, transports=transports, store=store, notifier=notifier
        )
        #: the file a SIGHUP re-reads
        self.config_path = Path(config_path) if config_path is not None else None
        #: what `tracker run` changed in the file's settings (--simulate); each reload too
        self._overrides = overrides
        self._log_secrets = reloading.LogSecrets(settings)
        #: the keys the environment overrides, and the file's values for them as last read
        self._env = reloading.EnvOverrides(self.config_path, environ)
        self._stack = contextlib.AsyncExitStack()
        self._started = False
        self._stopped = False
        #: a reload asked for while starting, applied once started
        self._reload_held = False

    @property
    def settings(self) -> config.Settings:
        """The settings in force (a reload replaces them)."""
        return self.parts.state.settings

    @property
    def api_port(self) -> int:
        """The port the API listens on (useful when the config says 0)."""
        return self.parts.server.port

    @property
    def api_url(self) -> str:
        """The base URL of the API, e.g. http://127.0.0.1:8686."""
        return self.parts.server.url

    async def start(self) -> None:
        """Open the database, start listening, polling and the jobs, then say READY=1.

        Raises StartupError, one line with an exit code, for every failure an operator fixes;
        what had started by then is closed again.
        """
        parts = self.parts
        # The API's handlers call the store on anyio's worker threads: no more at once than
        # the API's pool has connections for (see compose._stores).
        anyio.to_thread.current_default_thread_limiter().total_tokens = api.API_THREADS
        async with contextlib.AsyncExitStack() as stack:
            schema = await parts.database.open(stack)
            await parts.server.start(stack)
            # From here on nothing awaits before READY=1, so no job runs before it is said.
            self._watch(stack)
            parts.jobs.start(stack)
            parts.polling.start(stack)
            # Left in this order: the pause first, then one bounded wait for everything in
            # flight, then the jobs' shutdown (which would cancel the runs still going).
            stack.push_async_callback(parts.inflight.drain)
            stack.callback(parts.jobs.pause)
            self._stack = stack.pop_all()
        self._started = True
        parts.notifier.ready()
        log.info(
            "started",
            api=self.api_url,
            database=parts.store.dialect,
            schema=schema.revision,
            platforms=sorted(parts.platforms),
            pid=os.getpid(),
        )
        if self._reload_held:  # asked for while starting: now there is something to reload
            self._reload_held = False
            self.reload()

    def _watch(self, stack: contextlib.AsyncExitStack) -> None:
        # WATCHDOG=1 from the event loop: a wedged loop stops the pings and systemd restarts us.
        interval = self.parts.notifier.watchdog_interval()
        if interval is not None:
            watchdog = sdnotify.watchdog_loop(self.parts.notifier, interval)
            stack.push_async_callback(cancelled, asyncio.create_task(watchdog, name="watchdog"))

    async def stop(self) -> None:
        """Stop taking work, let in-flight polls and deliveries finish (bounded), close.

        Safe to call more than once, and on a daemon that never started or failed to.
        """
        if self._stopped:
            return
        self._stopped = True
        parts = self.parts
        parts.notifier.stopping()
        parts.state.accepting = False
        parts.stop.set()
        try:
            await self._stack.aclose()
        finally:
            # Built, not started: a daemon that never started has them to close too.
            await parts.clients.aclose()
            for store in (parts.store, parts.poll_store, parts.delivery_store):
                store.close()
        if self._started:  # a failed start has said why already
            log.info("stopped")

    def reload(self) -> None:
        """Re-read the config file and apply what can change live (SIGHUP).

        One asked for while the daemon is starting is held and applied once it has started,
        after its READY=1: until then there is nothing running to apply it to, and the reload's
        READY=1 would tell systemd the daemon is ready before it is. One asked for while it
        stops is ignored (``reload_file``), with neither RELOADING=1 nor READY=1.
        """
        if not self._started and not self.parts.stop.is_set():
            if not self._reload_held:
                log.info("reload_held", reason="starting", hint="applied once started")
            self._reload_held = True
            return
        reloading.reload_file(
            self.parts, self._log_secrets, self.config_path, self._overrides, self._env
        )

    def apply(self, new: config.Settings) -> reloading.ReloadPlan:
        """Put the live parts of ``new`` in force; returns what was applied and what was not."""
        return reloading.apply(self.parts, self._log_secrets, new)

    async def run(self) -> None:
        """Run until SIGTERM/SIGINT, reloading on SIGHUP."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.parts.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            await self.parts.stop.wait()
            log.info("stopping")
        finally:
            await self.stop()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
