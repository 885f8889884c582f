"""The store side of delivery: write finished attempts back and claim due deliveries."""

from __future__ import annotations

import asyncio
import concurrent.futures
import weakref
from collections.abc import Sequence

from tracker.clock import Clock
from tracker.delivery.journal import Journal
from tracker.store.abc import OutboxStore
from tracker.store.records import AttemptResult, DeliveryJob

#: seconds a claim outlives the wait for slots and the attempt, for the write that records it
LEASE_MARGIN = 30.0


class Outbox:
    """Store rounds for the delivery loop: each writes what finished, then claims more.

    One round at a time, on a thread of its own: a store call is blocking I/O and must not
    hold the event loop, and a claim and a write at once would only queue on SQLite's lock,
    whose busy handler sleeps in steps of up to 100 ms.
    """

    def __init__(self, store: OutboxStore, clock: Clock, journal: Journal) -> None:
        self._store = store
        self._clock = clock
        self._journal = journal
        self._thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tracker-delivery-store"
        )
        weakref.finalize(self, self._thread.shutdown, wait=False)
        #: seconds a claim lasts; it must outlast the wait for slots, the attempt, and the
        #: write after it (see ``lease_for``)
        self.lease = LEASE_MARGIN

    @staticmethod
    def lease_for(wait_budget: float, timeout: float) -> float:
        """The lease a claim needs when deliveries wait up to ``wait_budget`` for their slots
        and ``timeout`` for their answer.
        """
        return wait_budget + timeout + LEASE_MARGIN

    async def round(self, results: Sequence[AttemptResult], claim: int) -> list[DeliveryJob]:
        """Record ``results``, then claim up to ``claim`` due deliveries; each result is
        logged once it is stored, so the log never shows an attempt the store lost.
        """
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self._thread, self._round, results, claim)
        for result in results:
            self._journal.attempted(result)
        return jobs

    def _round(self, results: Sequence[AttemptResult], claim: int) -> list[DeliveryJob]:
        if results:
            self._store.finish_attempts(results)
        if not claim:
            return []
        return self._store.claim_deliveries(self._clock.now(), claim, lease=self.lease)
