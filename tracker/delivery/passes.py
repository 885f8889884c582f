"""One delivery pass: due deliveries claimed, sent on per-host lanes, results written back,
as a ``Work`` of the pipeline polling uses too (tracker/pipeline.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time

import structlog

from tracker.delivery.outbox import Outbox, Round
from tracker.delivery.sending import Sender
from tracker.limits import Admission, Load, Ticket, give_back
from tracker.pipeline import Claimed, Pace, Pipeline
from tracker.sanitize import without_userinfo
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
#: seconds workers hold off their next send while a store round runs (Pipeline._hold_off)
ROUND_HOLD_OFF = 0.025
#: the share of the lease after which a pass renews the claims it holds: two more renewals
#: fit in before it would lapse, so one late round (a busy loop, a slow store) costs nothing
RENEW_SHARE = 1 / 3
#: the claim token of an attempt that is to move nothing: no lease's end equals NaN
_HOLDS_NOTHING = math.nan


class DeliveryPass:
    """Delivery as pipeline work: claims, one lane of ``per_host`` workers per host, results.

    What the pass has claimed and not written back yet is renewed every third of the lease,
    so its claims last as long as its attempts do and lapse within seconds when the daemon
    dies. A renewal that finds a delivery taken over (its lease lapsed and another claim took
    it) drops it unsent if it has not started; the result of one already in flight moves
    nothing in the store. Deliveries left for later are held back instead of renewed.

    Each worker sends one delivery after another on its own, as a client loop would: handing
    a freed slot to a waiting task instead makes several requests reach httpcore's pool in
    the same loop turn, where they race for one idle connection and retry (twice per request
    on loopback, half the CPU again).
    """

    name = "delivery"
    pace = Pace(
        write_batch=WRITE_BATCH, linger=WRITE_LINGER, wake_every=WAKE_EVERY, hold_off=ROUND_HOLD_OFF
    )

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
        #: whether claims continue after the first (False: one batch, then the pass ends)
        self.refill_on_write = refill
        self._until = until
        #: the load of each host this pass sent to
        self._hosts: dict[str, Load] = {}
        #: id -> the lease's end (the claim's token) of what is claimed and not written back
        self._leases: dict[int, float] = {}
        #: the same for deliveries left for later, to hold back at the next round
        self._left: dict[int, float] = {}
        #: ids taken over by another claim: not to be sent
        self._lost: set[int] = set()
        #: id -> its ticket, from its admission until its attempt ends: one per delivery, so a
        #: delivery claimed again meanwhile is sent once, as its latest claim has it
        self._tickets: dict[int, Ticket] = {}
        #: id -> the attempts a finished attempt was decided after, until it is written
        self._decided: dict[int, int] = {}
        #: ids whose finished attempt, still to be written, was decided on a schedule that a
        #: re-queue has started again since: written to the log, it moves nothing
        self._superseded: set[int] = set()
        self.deferred = 0  #: claimed but not taken on: the receiver already had enough queued
        self.expired = 0  #: taken on but not started within the wait budget
        self.taken_over = 0  #: dropped unsent: another claim took them after a lapse

    async def run(self) -> int:
        """Deliver until nothing more is due (or claims stop); returns the attempts made."""
        try:
            return await Pipeline(self, until=self._until).run()
        finally:
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

    def renew_every(self) -> float:
        return self._outbox.lease * RENEW_SHARE

    def unwritten(self) -> bool:
        return bool(self._left)

    def reclaim_every(self) -> None:
        return None  # the next pass (every tick, or woken by new events) takes what fell due

    def claim_in(self) -> None:
        return None  # claim_size says 0 only while enough is held: a finished send changes it

    async def round(
        self, results: list[AttemptResult], claim: int, *, renew: bool
    ) -> Claimed[Ticket, AttemptResult]:
        """Write what finished, hold back what was left for later, renew what is held when
        ``renew``, claim up to ``claim``, and take on (admit) what was claimed.
        """
        batch = self._with_tokens(results)
        renewing = dict(self._leases) if renew else {}
        hold, self._left = self._left, {}
        done = await self._outbox.round(batch, claim, renew=renewing, hold=hold)
        if renew:
            self._renewed(renewing, done)
        fresh: list[DeliveryJob] = []
        for job in done.jobs:
            pk = job.pk
            self._lost.discard(pk)  # ours again: claimed anew after the takeover
            ticket = self._tickets.get(pk)
            if ticket is not None:
                # Claimed again while queued or in flight here: our claim lapsed during a slow
                # round, or the delivery was re-queued (its attempts back to 0). Its one ticket
                # sends it, or decides what its attempt means, as this claim has it.
                ticket.job = job
                new = False
            elif pk in self._decided:
                # Its attempt is over, to be written: as this claim's, unless a re-queue has
                # started its schedule again since; then that attempt moves nothing and this
                # claim is sent anew. (Its lease may be gone: a renewal found it re-queued.)
                new = self._decided[pk] != job.attempts
                if new:
                    self._superseded.add(pk)
            else:
                new = True
            if job.lease_until is not None:
                self._leases[pk] = job.lease_until
            if new:
                fresh.append(job)
        more = self.refill_on_write and claim > 0 and len(done.jobs) == claim
        return Claimed(units=self._take_on(fresh), more=more)

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

    def _with_tokens(self, results: list[AttemptResult]) -> list[AttemptResult]:
        """The finished attempts to write, each with its claim's token as last renewed."""
        for n, result in enumerate(results):
            pk = result.job.pk
            self._decided.pop(pk, None)
            if pk in self._superseded:
                self._superseded.discard(pk)
                job = dataclasses.replace(result.job, lease_until=_HOLDS_NOTHING)
                results[n] = dataclasses.replace(result, job=job)
                continue  # the lease it would take is the new claim's
            token = self._leases.pop(pk, None)
            if token is not None and token != result.job.lease_until:
                job = dataclasses.replace(result.job, lease_until=token)
                results[n] = dataclasses.replace(result, job=job)
        return results

    def claim_size(self, pipeline: Pipeline[Ticket, AttemptResult]) -> int:
        admission = self._admission
        settings = admission.settings
        if pipeline.held + CLAIM_BATCH > MAX_HELD or pipeline.workers >= 2 * settings.concurrency:
            return 0
        # What is held should be sent well within the wait budget at the pace kept so far.
        cap = FIRST_HELD
        elapsed = time.monotonic() - pipeline.started_at
        if pipeline.performed and elapsed > 0:
            paced = pipeline.performed / elapsed * admission.wait_budget * HELD_SHARE_OF_BUDGET
            cap = max(CLAIM_BATCH, int(paced))
        # A receiver's queue beyond what it can start in time does not count: it will be left
        # for later anyway, and the next claim may find receivers that are idle.
        counted = sum(
            min(load.held, admission.allowance(settings.per_host, load.latency))
            for load in self._hosts.values()
        )
        return CLAIM_BATCH if counted + CLAIM_BATCH <= cap else 0

    def _take_on(self, jobs: list[DeliveryJob]) -> list[tuple[str, int, Ticket]]:
        per_host = self._admission.settings.per_host
        units = []
        for job in jobs:
            ticket = self._admission.admit(job)
            if ticket is None:
                self.deferred += 1
                self._leave(job.pk)
                continue
            self._hosts.setdefault(ticket.host, ticket.host_load)
            self._tickets[job.pk] = ticket
            units.append((ticket.host, per_host, ticket))
        return units

    async def perform(self, unit: Ticket) -> AttemptResult | None:
        """Send the delivery once its slots are taken; None when they did not come in time
        (it is left for later) or it was taken over meanwhile (it is dropped).
        """
        try:
            return await self._attempt(unit)
        finally:
            self._done_with(unit)

    async def _attempt(self, ticket: Ticket) -> AttemptResult | None:
        pk = ticket.job.pk
        taken = None if pk in self._lost else await self._admission.take_slots(ticket)
        if pk in self._lost:
            self.taken_over += 1
            if taken is not None:
                give_back(taken)
            return None
        if taken is None:
            self.expired += 1
            self._leave(pk)
            return None
        job = ticket.job  # as last claimed: a claim taken while it waited for slots counts
        try:
            # Decided as the latest claim has it: one taken during the request (a re-queue)
            # makes this attempt the first of the schedule started again.
            result = await self._sender.send(job, decide_as=lambda: ticket.job)
        except Exception as exc:
            log.exception(
                "webhook_attempt_crashed", webhook_id=job.webhook_id, url=without_userinfo(job.url)
            )
            result = self._sender.crashed(ticket.job, exc)
        else:
            ticket.host_load.observe(result.latency_ms / 1000)
        finally:
            give_back(taken)
        self._decided[pk] = result.job.attempts
        return result

    def dropped(self, unit: Ticket) -> None:
        self._done_with(unit)

    def _done_with(self, ticket: Ticket) -> None:
        self._admission.release(ticket)
        if self._tickets.get(ticket.job.pk) is ticket:
            del self._tickets[ticket.job.pk]

    def _leave(self, pk: int) -> None:
        """Hold ``pk`` back at the next round instead of renewing its claim."""
        token = self._leases.pop(pk, None)
        if token is not None:
            self._left[pk] = token
