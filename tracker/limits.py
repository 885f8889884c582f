"""Limits shared by the poller and the deliverer: request pacing."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart."""

    def __init__(self, rate: float) -> None:
        self._gap = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()
        #: seconds callers have spent waiting here, for the hint of what slows polling down
        self.waited = 0.0

    async def wait(self) -> None:
        """Return when the next request may start.

        Waiters queue on the lock and the next slot counts from when the last one was
        actually released: a stalled event loop then delays requests rather than letting
        the ones it held up go out in a burst.
        """
        async with self._lock:
            delay = self._next - time.monotonic()
            if delay > 0:
                self.waited += delay
                await asyncio.sleep(delay)
            self._next = time.monotonic() + self._gap
