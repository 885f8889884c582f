"""The overview's counts, recomputed in the background so no page waits on a full count.

Counting a million tasks by platform and status reads the whole table (seconds on SQLite),
far longer than a page may take. The overview shows counts at most MAX_AGE old and says
when they were taken; a request that finds them older starts one recount and does not wait.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime

import structlog
from starlette.concurrency import run_in_threadpool

from tracker.clock import Clock
from tracker.store.records import Stats

log = structlog.get_logger("tracker.dashboard")

#: seconds the overview's counts may be old before a request starts a recount
MAX_AGE = 10.0


class CountsCache:
    """The latest ``Stats`` and when they were taken; one recount at a time."""

    def __init__(self, compute: Callable[[], Stats], clock: Clock) -> None:
        self._compute = compute
        self._clock = clock
        self._latest: tuple[Stats, datetime] | None = None
        self._recount: asyncio.Task[None] | None = None

    async def get(self) -> tuple[Stats, datetime]:
        """Counts and when they were taken; waits only when none were ever taken."""
        latest = self._latest
        if latest is None:
            await self._refresh()
            assert self._latest is not None
            return self._latest
        age = (self._clock.now() - latest[1]).total_seconds()
        if age > MAX_AGE and (self._recount is None or self._recount.done()):
            self._recount = asyncio.create_task(self._refresh_quietly(), name="dashboard_counts")
        return latest

    async def _refresh(self) -> None:
        taken = self._clock.now()
        stats = await run_in_threadpool(self._compute)
        self._latest = (stats, taken)

    async def _refresh_quietly(self) -> None:
        try:
            await self._refresh()
        except Exception:
            log.warning("dashboard_counts_failed", exc_info=True)
