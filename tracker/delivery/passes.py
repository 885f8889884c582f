"""One delivery pass: claim due deliveries, send them on per-host lanes, write results back."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time

import structlog

from tracker.delivery.outbox import Outbox, Round
from tracker.delivery.sending import Sender
from tracker.limits import Admission, Load, Ticket, give_back
from tracker.store.records import AttemptResult, DeliveryJob

log = structlog.get_logger("tracker.delivery")

#: deliveries claimed per store round
CLAIM_BATCH = 512
#: claimed deliveries a pass holds at most, whatever else the limits below allow
MAX_HELD = 8 * CLAIM_BATCH
#: what a pass holds before it has seen its own pace, in deliveries
FIRST_HELD = 4 * CLAIM_BATCH
#: a pass claims no more once what it holds would take this share of the wait budget to send
HELD_SHARE_OF_BUDGET = 0.25
#: finished attempts are written once this many wait, or the oldest has waited WRITE_LINGER
WRITE_BATCH = 512
#: seconds; each write is a transaction, so a few rows at a time would cost more than the POSTs
WRITE_LINGER = 0.5
#: finished attempts between two looks of the pass at whether to claim more
WAKE_EVERY = 32
#: seconds workers hold off their next send while a store round runs (see _hold_off)
ROUND_HOLD_OFF = 0.025
#: the share of the lease after which a pass renews the claims it holds: two more renewals
#: fit in before it would lapse, so one late round (a busy loop, a slow store) costs nothing
RENEW_SHARE = 1 / 3


@dataclasses.dataclass(slots=True)
class Lane:
    """One host's taken-on deliveries, sent in order by at most ``per_host`` workers."""

    load: Load
    queue: collections.deque[Ticket] = dataclasses.field(default_factory=collections.deque)
    workers: int = 0


class DeliveryPass:
    """Claims, one lane of workers per host, and results to write, until nothing is due.

    What the pass has claimed and not written back yet it renews every third of the lease, so
    its claims last as long as its attempts do and lapse within seconds when the daemon dies.
    A renewal that finds a delivery taken over (its lease lapsed and another claim took it)
    drops it unsent if it has not started; the result of one already in flight moves nothing
    in the store. Deliveries left for later are held back instead of renewed.

    Each worker sends one delivery after another on its own, as a client loop would: handing
    a freed slot to a waiting task instead makes several requests reach httpcore's pool in
    the same loop turn, where they race for one idle connection and retry (twice per request
    on loopback, half the CPU again). The store is used by one round at a time (write what
    finished, then claim); whatever finishes meanwhile goes into the next round.
    """

    def __init__(
        self,
        *,
        admission: Admission,
        sender: Sender,
        outbox: Outbox,
        refill: bool,
        until: asyncio.Event | None,
    ) -> None:
        self._admission = admission
        self._sender = sender
        self._outbox = outbox
        self._refill = refill
        self._until = until
        self._lanes: dict[str, Lane] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._held = 0  #: taken-on deliveries not finished yet
        self._finished: list[AttemptResult] = []
        self._first_finished_at = 0.0
        self._store_round: asyncio.Task[Round] | None = None
        #: id -> the lease's end (the claim's token) of what is claimed and not written back
        self._leases: dict[int, float] = {}
        #: the same for deliveries left for later, to hold back at the next round
        self._left: dict[int, float] = {}
        #: ids taken over by another claim: not to be sent
        self._lost: set[int] = set()
        self._renew_at = math.inf  #: monotonic time of the next renewal
        self._round_done = asyncio.Event()
        self._round_done.set()
        self._hold_off_until = 0.0
        self._wake = asyncio.Event()
        self._started_at = time.monotonic()
        self.attempts = 0
        self.deferred = 0  #: claimed but not taken on: the receiver already had enough queued
        self.expired = 0  #: taken on but not started within the wait budget
        self.taken_over = 0  #: dropped unsent: another claim took them after a lapse

    async def run(self) -> int:
        """Deliver until nothing more is due (or claims stop); returns the attempts made."""
        may_claim = True
        try:
            while True:
                claim = self._claim_size(may_claim)
                write_in = self._write_due()
                renew_in = self._renew_due()
                if claim or write_in == 0.0 or renew_in == 0.0:
                    wrote = bool(self._finished)
                    jobs = await self._round(claim, renew=renew_in == 0.0)
                    if claim:
                        may_claim = self._refill and len(jobs) == claim
                    elif wrote:
                        # A recorded result may unblock the next event of the same task.
                        may_claim = self._refill
                    self._start(jobs)
                    continue
                if not self._workers:
                    return self.attempts
                waits = [w for w in (write_in, renew_in) if w is not None]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(waits) if waits else None):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self._shut_down()
            if self.taken_over:
                log.info("webhooks_taken_over", count=self.taken_over)
            if self.deferred or self.expired:
                # They are held back for a while (Outbox.hold); a later pass takes them then.
                log.info(
                    "webhooks_left_for_later",
                    count=self.deferred + self.expired,
                    receiver_busy=self.deferred,
                    waited_too_long=self.expired,
                )

    async def _round(self, claim: int, *, renew: bool) -> list[DeliveryJob]:
        """Write what finished, hold back what was left for later, renew what is held when
        ``renew``, and claim up to ``claim``; returns the deliveries claimed.
        """
        batch = self._take_finished()
        renewing = dict(self._leases) if renew else {}
        hold, self._left = self._left, {}
        round_ = self._outbox.round(batch, claim, renew=renewing, hold=hold)
        # Shielded: a cancel must not leave the store round running unawaited.
        self._store_round = asyncio.create_task(round_)
        self._round_done.clear()
        self._hold_off_until = asyncio.get_running_loop().time() + ROUND_HOLD_OFF
        try:
            done = await asyncio.shield(self._store_round)
        finally:
            self._round_done.set()
            if self._store_round.done():
                self._store_round = None
        if renew:
            self._renew_at = time.monotonic() + self._outbox.lease * RENEW_SHARE
            self._renewed(renewing, done)
        if done.jobs and not self._leases:
            self._renew_at = time.monotonic() + self._outbox.lease * RENEW_SHARE
        for job in done.jobs:
            self._lost.discard(job.pk)  # ours again: claimed anew after the takeover
            if job.lease_until is not None:
                self._leases[job.pk] = job.lease_until
        return done.jobs

    def _renewed(self, renewing: dict[int, float], done: Round) -> None:
        """Take the new tokens of the renewed claims; a claim not renewed was taken over.

        A delivery that finished or was left for later during the round is still counted in
        ``_leases`` or ``_left``, so its result or its hold carries the token it has now.
        """
        for pk in renewing:
            if pk in done.renewed:
                held = self._leases if pk in self._leases else self._left
                if pk in held:
                    held[pk] = done.until
            elif self._leases.pop(pk, None) is not None:
                self._lost.add(pk)
            else:
                self._left.pop(pk, None)

    def _take_finished(self) -> list[AttemptResult]:
        """The finished attempts to write, each with its claim's token as last renewed."""
        batch, self._finished = self._finished, []
        for n, result in enumerate(batch):
            token = self._leases.pop(result.job.pk, None)
            if token is not None and token != result.job.lease_until:
                job = dataclasses.replace(result.job, lease_until=token)
                batch[n] = dataclasses.replace(result, job=job)
        return batch

    def _renew_due(self) -> float | None:
        """0 when the held claims should be renewed now, else seconds until then; None when
        nothing is held.
        """
        if not self._leases:
            return None
        return max(0.0, self._renew_at - time.monotonic())

    def _holding_off(self) -> bool:
        return (
            not self._round_done.is_set()
            and asyncio.get_running_loop().time() < self._hold_off_until
        )

    async def _hold_off(self) -> None:
        """Wait, at most until ROUND_HOLD_OFF after it began, for the store round under way.

        A round is Python work (SQLAlchemy) on the store thread, and sqlite3 lets go of the
        GIL at every step: run while the loop sends and receives, the two threads hand the
        GIL over thousands of times per round, which costs more CPU than the round itself
        (0.1-0.3 ms per delivery on bench/bench_delivery.py). Only this pass's workers wait:
        the event loop and everything else on it keep running, and a round that takes longer
        (a lock held by the poller, a remote PostgreSQL) holds them up no longer.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._hold_off_until):
                await self._round_done.wait()

    def _claim_size(self, may_claim: bool) -> int:
        if not may_claim or (self._until is not None and self._until.is_set()):
            return 0
        admission = self._admission
        settings = admission.settings
        if self._held + CLAIM_BATCH > MAX_HELD or len(self._workers) >= 2 * settings.concurrency:
            return 0
        # What is held should be sent well within the wait budget at the pace kept so far.
        cap = FIRST_HELD
        elapsed = time.monotonic() - self._started_at
        if self.attempts and elapsed > 0:
            paced = self.attempts / elapsed * admission.wait_budget * HELD_SHARE_OF_BUDGET
            cap = max(CLAIM_BATCH, int(paced))
        # A receiver's queue beyond what it can start in time does not count: it will be left
        # for later anyway, and the next claim may find receivers that are idle.
        counted = sum(
            min(lane.load.held, admission.allowance(settings.per_host, lane.load.latency))
            for lane in self._lanes.values()
        )
        return CLAIM_BATCH if counted + CLAIM_BATCH <= cap else 0

    def _write_due(self) -> float | None:
        """0 when the finished attempts should be written now, else seconds until they should.

        Deliveries left for later go with them, and on their own once no worker is left.
        """
        if not self._finished:
            return 0.0 if self._left and not self._workers else None
        if len(self._finished) >= WRITE_BATCH or not self._workers:
            return 0.0
        return max(0.0, self._first_finished_at + WRITE_LINGER - time.monotonic())

    def _start(self, jobs: list[DeliveryJob]) -> None:
        per_host = self._admission.settings.per_host
        for job in jobs:
            ticket = self._admission.admit(job)
            if ticket is None:
                self.deferred += 1
                self._leave(job.pk)
                continue
            self._held += 1
            lane = self._lanes.get(ticket.host)
            if lane is None:
                lane = self._lanes[ticket.host] = Lane(ticket.host_load)
            lane.queue.append(ticket)
            if lane.workers < per_host:
                lane.workers += 1
                worker = asyncio.create_task(self._work(lane))
                self._workers.add(worker)
                worker.add_done_callback(self._worker_done)

    async def _work(self, lane: Lane) -> None:
        try:
            while lane.queue:
                if self._holding_off():
                    await self._hold_off()
                    continue  # another worker of the lane may have emptied the queue meanwhile
                ticket = lane.queue.popleft()
                try:
                    result = await self._attempt(ticket)
                finally:
                    self._held -= 1
                    self._admission.release(ticket)
                if result is None:
                    continue
                self.attempts += 1
                if not self._finished:
                    self._first_finished_at = time.monotonic()
                    self._wake.set()  # starts the linger clock
                self._finished.append(result)
                # The coordinator need not look at every result: only when a write is due, or
                # now and then, as claims may fit again.
                if len(self._finished) >= WRITE_BATCH or self.attempts % WAKE_EVERY == 0:
                    self._wake.set()
        finally:
            lane.workers -= 1

    async def _attempt(self, ticket: Ticket) -> AttemptResult | None:
        """Send ``ticket`` once its slots are taken; None when they did not come in time (it
        is left for later) or its delivery was taken over meanwhile (it is dropped).
        """
        job = ticket.job
        taken = None if job.pk in self._lost else await self._admission.take_slots(ticket)
        if job.pk in self._lost:
            self.taken_over += 1
            if taken is not None:
                give_back(taken)
            return None
        if taken is None:
            self.expired += 1
            self._leave(job.pk)
            return None
        try:
            result = await self._sender.send(job)
        except Exception as exc:
            log.exception("webhook_attempt_crashed", webhook_id=job.webhook_id, url=job.url)
            return self._sender.crashed(job, exc)
        finally:
            give_back(taken)
        ticket.host_load.observe(result.latency_ms / 1000)
        return result

    def _leave(self, pk: int) -> None:
        """Hold ``pk`` back at the next round instead of renewing its claim."""
        token = self._leases.pop(pk, None)
        if token is not None:
            self._left[pk] = token

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        self._wake.set()

    async def _shut_down(self) -> None:
        # Normally nothing is left; after an error or a cancel, what finished is still written.
        for worker in self._workers:
            worker.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for lane in self._lanes.values():
            while lane.queue:
                self._held -= 1
                self._admission.release(lane.queue.popleft())
        if self._store_round is not None:
            try:
                await self._store_round
            except Exception:
                log.exception("delivery_store_round_failed")
                return
        if self._finished or self._left:
            batch = self._take_finished()
            try:
                await self._outbox.round(batch, 0, hold=self._left)
            except Exception:
                # The deliveries are retried when their lease lapses.
                log.exception("delivery_results_unrecorded", count=len(batch))
