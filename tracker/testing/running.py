"""A Daemon running on its own event loop in a background thread, for blocking test code.

A browser driven through Selenium blocks the calling thread; the daemon it talks to must keep
serving meanwhile, so it gets a loop of its own.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from tracker import config
from tracker.app import Daemon

#: seconds start and stop may take
TIMEOUT = 30.0


class DaemonThread:
    """``with DaemonThread(settings) as daemon:`` a started daemon, stopped on exit."""

    def __init__(self, settings: config.Settings, **kwargs: Any) -> None:
        self._settings = settings
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.daemon: Daemon | None = None

    def __enter__(self) -> Daemon:
        self._thread.start()
        daemon: Daemon = self.call(self._start())
        self.daemon = daemon
        return daemon

    async def _start(self) -> Daemon:
        # Built on the daemon's own loop: its events and clients belong to that loop.
        daemon = Daemon(self._settings, **self._kwargs)
        await daemon.start()
        return daemon

    def call(self, coroutine: Any) -> Any:
        """Run ``coroutine`` on the daemon's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(TIMEOUT)

    def __exit__(self, *_exc: object) -> None:
        try:
            if self.daemon is not None:
                self.call(self.daemon.stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(TIMEOUT)
            self._loop.close()
