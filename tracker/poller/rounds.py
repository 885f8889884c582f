"""A drain as pipeline work (tracker/pipeline.py): claims of due tasks in due order, batches
per platform on one lane per upstream, and the answers' updates recorded at the next round.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import structlog

from tracker.pipeline import Claimed, Pace, Pipeline
from tracker.platforms.base import Glance, Platform
from tracker.poller.report import CycleReport
from tracker.status import Observation
from tracker.store.records import Claim, DueTask, Replan, TaskUpdate

if TYPE_CHECKING:
    from tracker.poller.drain import Poller

log = structlog.get_logger("tracker.poller")

#: the claims a drain still works on are renewed every this share of a lease
RENEW_SHARE = 0.25
#: seconds at least between two claims while requests are still out after a claim that found
#: less than it asked for (each is a write transaction, even when it finds nothing)
MIN_RECLAIM = 0.2
#: a drain takes no claim after this many intervals, or this many relay timeouts if longer
#: (and this many seconds at least): it ends once its requests are answered or called off
#: (Poller.call_off_requests), and the engine's chores between two drains (a clock step, a
#: reload's pull-in and new batch size) run before the next one starts. Meanwhile nothing is
#: claimed, for about a second if a relay has just gone silent: the longer the span, the
#: rarer that is.
DRAIN_INTERVALS = 10
MIN_DRAIN_SPAN = 10.0


@dataclasses.dataclass(frozen=True, slots=True)
class Answer:
    """A relay's answer about one batch: its observations (or glances) by task id, when it
    came, and when its request went out."""

    platform: Platform
    seen: Mapping[str, Observation | Glance]
    at: datetime
    asked: datetime
    #: the relay answered only as many ids as it answers at most (ANSWER_CAPS): the ids it
    #: left out are not known to be unknown, and are asked again
    capped: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class _Batch:
    """One relay request's worth of claimed tasks."""

    platform: Platform
    tasks: Sequence[DueTask]
    claim: Claim | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Answered:
    """A batch's outcome, to record: its updates, or the relay's answer to decide first
    (``batch`` None: updates decided without asking).
    """

    batch: _Batch | None
    updates: list[TaskUpdate]
    answer: Answer | None = None


class DrainWork:
    """One drain as pipeline work (tracker/pipeline.py): claims of due tasks in due order,
    batches on one lane per upstream (``[poll].concurrency`` requests at a time each), and
    the answers' updates recorded together at the next store round.

    Claims are prefetched one ahead: the next is taken once fewer than two claims' worth of
    tasks wait for a relay (about one in flight and one queued; at most three claims' worth
    are held), so a lane whose answer came finds its next batch at once: the relay never waits
    for the daemon's own bookkeeping. The count is per upstream, and a claim takes none of the
    tasks of an upstream that has two claims' worth waiting: a relay slower than its share of
    the work (whose tasks, most overdue, would come first in every claim) does not keep the
    tasks of the others from being claimed.

    While requests are out, a drain claims again every ``reclaim_every()`` seconds, so what
    falls due meanwhile does not wait for the slowest request; after DRAIN_INTERVALS intervals
    it claims no more and ends.
    """

    name = "poll"
    pace = Pace(claim_apart=True)
    refill_on_write = False

    def __init__(self, poller: Poller, started: float) -> None:
        self._poller = poller
        settings = poller.settings
        self._size = settings.batch_size * settings.concurrency
        self._width = settings.concurrency
        #: upstream name -> its claimed tasks the relay has not answered about yet (queued or
        #: in flight): the next claim takes its tasks once fewer than two claims' worth are,
        #: so requests never wait for it
        self._unanswered: dict[str, int] = defaultdict(int)
        #: upstream name -> when a claim that did not leave its tasks out found fewer than it
        #: asked for (monotonic): none of its tasks were due then, so a claim for it alone
        #: waits for the reclaim period
        self._emptied: dict[str, float] = {}
        self._claiming_at = 0.0
        #: tasks taken back unasked (a batch's, with its claim) when the drain stopped claiming,
        #: to write as due (their claims renewed until then)
        self._put_back_batches: list[tuple[Sequence[DueTask], Claim]] = []
        self._wound_down = False
        #: when the drain takes no more claims (monotonic)
        timeout = max((p.upstream.timeout for p in poller.platforms.values()), default=0.0)
        self._claims_until = started + max(
            max(settings.interval, timeout) * DRAIN_INTERVALS, MIN_DRAIN_SPAN
        )
        #: unrecorded batches per claim; these claims are renewed
        self._held: dict[Claim, int] = {}
        #: when the current log line's part of the drain began (monotonic)
        self.started = started
        #: the lines a drain longer than an interval logged before its last, summed up (a
        #: drain under more work than fits may never end: one total, not a list of lines)
        self.logged: list[CycleReport] = []

    def end_claims(self, pipeline: Pipeline[_Batch, _Answered]) -> None:
        """Take no more claims (a reload: the next drain starts with its settings), and wind
        down now, before a lane starts another queued batch."""
        self._claims_until = min(self._claims_until, time.monotonic())
        self._wind_down(pipeline)

    def _wind_down(self, pipeline: Pipeline[_Batch, _Answered]) -> None:
        if self._wound_down:
            return
        # The drain ends once its requests under way are answered, not after every batch
        # queued behind a slow relay's: those go back, due as they were, to be claimed by the
        # next drain, which the other relays need not wait for.
        self._wound_down = True
        for batch in pipeline.take_back_queued():
            self._put_back(batch)
        # Nor for a relay that stopped answering, or went silent, whose requests out may take
        # their whole timeout: called off, their tasks are due again at once.
        self._poller.call_off_requests()

    def claim_size(self, pipeline: Pipeline[_Batch, _Answered]) -> int:
        now = time.monotonic()
        if now >= self._claims_until:
            self._wind_down(pipeline)
            return 0
        if not self._open(ignore_emptied=not pipeline.workers):
            return 0
        # No later than the pipeline's own time of the claim: an upstream this claim finds
        # without due tasks is open again by the time the reclaim period has passed for it.
        self._claiming_at = now
        return self._size

    def _upstreams(self) -> set[str]:
        return {p.upstream.name for p in self._poller.platforms.values()}

    def _busy(self, upstream: str) -> bool:
        """Whether two claims' worth of ``upstream``'s tasks wait for its relay."""
        return self._unanswered.get(upstream, 0) >= 2 * self._size

    def _open(self, *, ignore_emptied: bool = False) -> bool:
        """Whether a claim now may find tasks for a relay that has room for them: one not
        busy, and not found without due tasks within the last ``reclaim_every()`` (with no
        upstream at all, a claim still finds the tasks of platforms no longer configured).
        ``ignore_emptied``: with nothing under way, a last claim says whether the drain ends.
        """
        upstreams = self._upstreams()
        if not upstreams:
            return True
        if ignore_emptied:
            return any(not self._busy(u) for u in upstreams)
        return self._reopens_in(upstreams) == 0.0

    def _reopens_in(self, upstreams: set[str]) -> float | None:
        """Seconds until the first upstream not busy may be claimed for again (0: now; None:
        every upstream is busy)."""
        waits = [
            self._emptied.get(u, -math.inf) + self._period() - time.monotonic()
            for u in upstreams
            if not self._busy(u)
        ]
        return max(min(waits), 0.0) if waits else None

    def claim_in(self) -> float | None:
        if self._wound_down:
            return None
        # The end of the claiming too: claim_size then takes back what is queued, before a
        # lane whose answer came starts its next batch.
        until_end = self._claims_until - time.monotonic()
        reopens_in = self._reopens_in(self._upstreams())
        return max(0.0, until_end if reopens_in is None else min(reopens_in, until_end))

    def renew_every(self) -> float:
        return self._poller.lease() * RENEW_SHARE

    def reclaim_every(self) -> float:
        return self._period()

    def _period(self) -> float:
        return max(self._poller.ahead(), MIN_RECLAIM)

    def unwritten(self) -> bool:
        return bool(self._put_back_batches)

    def _put_back(self, batch: _Batch) -> None:
        self._unanswered[batch.platform.upstream.name] -= len(batch.tasks)
        if batch.claim is not None:  # else nothing holds its tasks: they are due
            self._put_back_batches.append((batch.tasks, batch.claim))

    def _put_back_replans(self) -> tuple[int, list[Replan]]:
        """How many batches were put back, and their tasks due again when they were (while
        their claim holds them)."""
        batches = self._put_back_batches
        replans = [Replan(t.planned, t.pk, claim.until) for tasks, claim in batches for t in tasks]
        return len(batches), replans

    def _written_back(self, count: int) -> None:
        """The first ``count`` batches put back were written: their claims need no more
        renewals. Those put back meanwhile, and all of them if the round failed, are still to
        write (at the latest at the pipeline's last round)."""
        for _, claim in self._put_back_batches[:count]:
            self._release(claim)
        del self._put_back_batches[:count]

    async def round(
        self, results: list[_Answered], claim: int, *, renew: bool
    ) -> Claimed[_Batch, _Answered]:
        poller = self._poller
        now = poller.clock.now()
        lease = poller.lease()
        for answered in results:
            # Written in this round (or the round fails and the drain ends): not to renew.
            if answered.batch is not None and answered.batch.claim is not None:
                self._release(answered.batch.claim)
        renewing: list[Claim] = []
        if renew:
            # A claim taken within the last renewal period still has most of its lease.
            renewing = [
                c for c in self._held if c.until - now.timestamp() < lease * (1 - RENEW_SHARE)
            ]
        # Answers are decided here, not in their lane, so the lane's next request is out while
        # the loop decides: a relay's own time hides the deciding instead of adding to it.
        updates: list[TaskUpdate] = []
        put_back, replans = self._put_back_replans()
        for answered in results:
            if answered.answer is not None and answered.batch is not None:
                decided = await poller.decide(answered.batch.tasks, answered.answer)
                updates += decided.updates
                replans += decided.replans
            else:
                updates += answered.updates
        due_by = now + timedelta(seconds=poller.ahead())
        # A claim leaves out the platforms of a busy upstream; the others it asks for.
        upstreams = self._upstreams() if claim else set()
        asked_for = {u for u in upstreams if not self._busy(u)}
        busy = upstreams - asked_for
        skip = [name for name, p in poller.platforms.items() if p.upstream.name in busy]
        landed, due = await poller.store_worker.call(
            self._store_round,
            updates,
            replans,
            renewing,
            claim,
            now=now,
            lease=lease,
            due_by=due_by,
            skip=skip,
        )
        self._written_back(put_back)
        if claim and len(due) < claim:
            self._emptied.update(dict.fromkeys(asked_for, self._claiming_at))
        if landed:
            poller.count_recorded(landed)
        claimed: Claimed[_Batch, _Answered] = self._split(due, now) if due else Claimed()
        if skip and not claimed.more:
            # The busy upstreams' tasks are still due: claim_size says when there is room.
            claimed = dataclasses.replace(claimed, more=True)
        # A long drain's line per interval closes at a claim (renewals and writes alone run
        # while requests wait). Answers that waited for the round after a claim taken apart
        # (Pace.claim_apart) count in the next line; the drain's total counts everything.
        if claim and time.monotonic() - self.started >= max(poller.settings.interval, 1.0):
            self.logged = [CycleReport.total([*self.logged, poller.report])]
            await poller.close_line(poller.report, self.started)
            self.started = time.monotonic()
        return claimed

    def _store_round(
        self,
        updates: list[TaskUpdate],
        replans: list[Replan],
        renewing: list[Claim],
        claim: int,
        *,
        now: datetime,
        lease: float,
        due_by: datetime,
        skip: list[str],
    ) -> tuple[list[TaskUpdate], list[DueTask]]:
        """The round's writes and claim; the updates with a change that landed (the
        compare-and-set turns away those of a task that moved or went meanwhile), and the
        tasks claimed."""
        store = self._poller.store
        landed: list[TaskUpdate] = []
        if updates or replans:
            store.record(updates, now, replans, landed=landed)
        for held in renewing:
            store.renew_claim(held, now.timestamp() + lease)
        due = store.claim_due(now, claim, lease=lease, due_by=due_by, skip=skip) if claim else []
        return landed, due

    def _split(self, due: list[DueTask], now: datetime) -> Claimed[_Batch, _Answered]:
        """The claimed tasks as batches per platform, and updates for those not to ask."""
        poller = self._poller
        report = poller.report
        lag = now.timestamp() - due[0].planned
        if lag > report.lag:
            report.lag, report.lagging = lag, due[0].platform
        report.claimed += len(due)
        claim = due[0].claim
        ready: list[_Answered] = []
        by_platform: dict[str, list[DueTask]] = defaultdict(list)
        given_up: list[TaskUpdate] = []
        for task in due:
            update = poller.planner.expired(task, now)
            if update is not None:
                given_up.append(update)
            else:
                by_platform[task.platform].append(task)
        if given_up:
            report.given_up += len(given_up)
            ready.append(_Answered(None, given_up))
        units: list[tuple[str, int, _Batch]] = []
        for name, tasks in by_platform.items():
            platform = poller.platforms.get(name)
            if platform is None:
                # The platform was removed from the config; keep the tasks for when it returns.
                log.warning("unknown_platform", platform=name, tasks=len(tasks))
                kept = [poller.planner.unchanged(t, now) for t in tasks]
                ready.append(_Answered(None, kept))
                continue
            size = platform.batch_size
            lane = platform.upstream.name
            for i in range(0, len(tasks), size):
                batch = _Batch(platform, tasks[i : i + size], claim)
                units.append((lane, self._width, batch))
                self._unanswered[lane] += len(batch.tasks)
                if claim is not None:
                    self._held[claim] = self._held.get(claim, 0) + 1
        return Claimed(units=units, ready=ready, more=len(due) == self._size)

    def _release(self, claim: Claim) -> None:
        self._held[claim] -= 1
        if not self._held[claim]:
            del self._held[claim]

    async def perform(self, unit: _Batch) -> _Answered:
        try:
            got = await self._poller.ask(unit.platform, unit.tasks)
        finally:
            self._unanswered[unit.platform.upstream.name] -= len(unit.tasks)
        if isinstance(got, Answer):
            return _Answered(unit, [], got)
        return _Answered(unit, got)

    def dropped(self, unit: _Batch) -> None:
        """Put back, to write as due at the pipeline's last round (if that fails, the claim
        lapses, and the tasks fall due again)."""
        self._put_back(unit)
