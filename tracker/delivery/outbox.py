"""The store side of delivery: write finished attempts back, keep claims alive, claim more."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tracker.clock import Clock
from tracker.delivery.journal import Journal
from tracker.store.abc import OutboxStore
from tracker.store.records import AttemptResult, DeliveryJob
from tracker.store.worker import StoreWorker

#: seconds a claim lasts unless renewed. A pass renews what it holds every third of it (see
#: passes.py), so the claims of a daemon that died lapse within seconds and the others take
#: its deliveries over, while a live daemon keeps an attempt as long as the attempt takes.
LEASE = 6.0
#: seconds a delivery left for later (its receiver had enough queued, or it waited too long
#: for a slot) is held back beyond the wait for slots and the attempt, so the next pass does
#: not claim it again at once
HOLD_MARGIN = 30.0


@dataclasses.dataclass(frozen=True, slots=True)
class Round:
    """What one store round did: the deliveries it claimed, and which renewals held."""

    jobs: list[DeliveryJob]
    #: the ids whose lease was renewed, now ending at ``until`` (the others were taken over)
    renewed: set[int]
    until: float


class Outbox:
    """Store rounds for the delivery loop: each writes what finished, renews and holds back
    what is still claimed, then claims more.

    One round at a time, on a StoreWorker of its own (see tracker.store.worker).
    """

    def __init__(self, store: OutboxStore, clock: Clock, journal: Journal) -> None:
        self._store = store
        self._clock = clock
        self._journal = journal
        self._worker = StoreWorker("tracker-delivery-store")
        #: seconds a claim or a renewal lasts
        self.lease = LEASE
        #: seconds a delivery left for later is held back (see ``hold_for``)
        self.hold = HOLD_MARGIN

    @staticmethod
    def hold_for(wait_budget: float, timeout: float) -> float:
        """How long to hold back a delivery left for later, when deliveries wait up to
        ``wait_budget`` for their slots and ``timeout`` for their answer.
        """
        return wait_budget + timeout + HOLD_MARGIN

    async def round(
        self,
        results: Sequence[AttemptResult],
        claim: int,
        *,
        renew: Mapping[int, float] | None = None,
        hold: Mapping[int, float] | None = None,
    ) -> Round:
        """Record ``results``, hold back ``hold`` and renew ``renew`` (id -> the claim's token,
        its lease's end), then claim up to ``claim`` due deliveries. Each result is logged
        once it is stored, so the log never shows an attempt the store lost.
        """
        done = await self._worker.call(self._round, results, claim, renew or {}, hold or {})
        for result in results:
            self._journal.attempted(result)
        return done

    def _round(
        self,
        results: Sequence[AttemptResult],
        claim: int,
        renew: Mapping[int, float],
        hold: Mapping[int, float],
    ) -> Round:
        if results:
            self._store.finish_attempts(results)
        now = self._clock.now()
        if hold:
            self._store.extend_claims(hold, now.timestamp() + self.hold)
        until = now.timestamp() + self.lease
        renewed = self._store.extend_claims(renew, until) if renew else set()
        jobs = self._store.claim_deliveries(now, claim, lease=self.lease) if claim else []
        return Round(jobs=jobs, renewed=renewed, until=until)
