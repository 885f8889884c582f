"""Claim due rows, do their I/O within limits, record the results: the one loop of polling
and of delivery.

A ``Pipeline`` runs one ``Work`` (the poll's: batches of tasks asked of a relay; delivery's:
webhooks sent to receivers) until nothing more is due:

- one coordinator runs the store rounds, one at a time, each on the work's store thread:
  write what finished, renew the claims still held, claim more;
- the claimed units queue on lanes (an upstream, a receiver's host), each worked by at most
  its width of workers, in claim order; a worker performs one unit after another on its
  own, as a client loop would, and the limits of what it may send live in ``Work.perform``;
- results wait for the next round, which takes them all in one transaction; while units are
  under way the next claim is already taken, so the I/O never idles on the bookkeeping.

Claims are leases: a round renews what is held every ``Work.renew_every()`` seconds, so a
slow unit keeps its rows and a daemon that dies lets them lapse within one lease.

A claim that found less than it asked for ends the claiming: the run ends once the units
under way are done. Work whose rows fall due all the time (polls) claims again every
``Work.reclaim_every()`` seconds while units are still under way, so one slow lane does not
keep what falls due meanwhile for the others waiting until it is done. A work whose
``claim_size`` says 0 for a reason of its own (the poll drain: every relay with room was found
without due tasks a moment ago) names when to ask it again (``Work.claim_in``), and one that
stops claiming may take back the units still queued (``take_back_queued``), so the run ends
once the units under way are done.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import math
import time
from typing import Generic, Protocol, TypeVar

import structlog

log = structlog.get_logger("tracker.pipeline")

#: seconds at least before claim_size is asked again at the time Work.claim_in names
MIN_LOOK = 0.001
#: what the log says when a store round fails, or results cannot be written at the end
FAILURES = ("store_round_failed", "results_unrecorded")

U = TypeVar("U")  #: a unit of I/O: one relay request's batch, one webhook
R = TypeVar("R")  #: what performing it gives, to record


@dataclasses.dataclass(frozen=True, slots=True)
class Pace:
    """When a pipeline writes results and looks at its claims again."""

    #: results are written once this many wait ...
    write_batch: int = 1
    #: ... or the oldest has waited this long (seconds)
    linger: float = 0.0
    #: results between two looks of the coordinator at whether to write or claim
    wake_every: int = 1
    #: seconds workers hold off their next unit while a store round runs (0: never); see
    #: ``Pipeline._hold_off``
    hold_off: float = 0.0
    #: a claim due while results wait is a round of its own, before the write: the lanes get
    #: their next units without waiting for the results to be worked out and written
    claim_apart: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Claimed(Generic[U, R]):
    """What one store round gave: units to perform and results to record without I/O."""

    #: (lane, the lane's width, unit), in the order they are to be performed
    units: list[tuple[str, int, U]] = dataclasses.field(default_factory=list)
    #: results decided without I/O (a task past its deadline, say), written next round
    ready: list[R] = dataclasses.field(default_factory=list)
    #: whether another claim may find more due rows right now
    more: bool = False


class Work(Protocol[U, R]):
    """One kind of due work: how to claim it, perform it and record it."""

    #: the word in the pipeline's log lines ("poll", "delivery")
    name: str
    pace: Pace
    #: whether writing results may make more rows due (a delivery's next event of a task)
    refill_on_write: bool

    def claim_size(self, pipeline: Pipeline[U, R]) -> int:
        """How many rows the next round should claim now (0: none, enough is held)."""
        ...

    def unwritten(self) -> bool:
        """Whether the work has writes of its own waiting for a round (rows left for later)."""
        ...

    def renew_every(self) -> float:
        """Seconds between two renewals of the claims held."""
        ...

    def reclaim_every(self) -> float | None:
        """Seconds after a claim that found less than it asked for before the next claim, while
        units are still under way; None: no claim after such a one (the run ends when they are).
        """
        ...

    def claim_in(self) -> float | None:
        """After ``claim_size`` said 0: seconds until it may say more without a unit finishing
        (None: only units finishing change it)."""
        ...

    async def round(self, results: list[R], claim: int, *, renew: bool) -> Claimed[U, R]:
        """Write ``results``, renew the claims held when ``renew``, claim up to ``claim``."""
        ...

    async def perform(self, unit: U) -> R | None:
        """Do one unit's I/O; None when it turned out not to be ours to do (nothing to write)."""
        ...

    def dropped(self, unit: U) -> None:
        """``unit`` was claimed but never performed (the pipeline was cut off)."""
        ...


@dataclasses.dataclass(slots=True)
class _Lane(Generic[U]):
    queue: collections.deque[U] = dataclasses.field(default_factory=collections.deque)
    workers: int = 0


class Pipeline(Generic[U, R]):
    """Runs a ``Work`` until nothing more is due, or ``until`` is set; see the module."""

    def __init__(self, work: Work[U, R], *, until: asyncio.Event | None = None) -> None:
        self._work = work
        self._until = until
        self._lanes: dict[str, _Lane[U]] = {}
        self._workers: set[asyncio.Task[None]] = set()
        self._finished: list[R] = []
        self._first_finished_at = 0.0
        self._store_round: asyncio.Task[Claimed[U, R]] | None = None
        self._round_done = asyncio.Event()
        self._round_done.set()
        self._hold_off_until = 0.0
        self._renew_at = math.inf  #: monotonic time of the next renewal
        self._claimed_at = 0.0  #: monotonic time of the last claim
        self._wake = asyncio.Event()
        self._error: Exception | None = None
        self.started_at = time.monotonic()
        #: units claimed and not performed yet (queued or under way)
        self.held = 0
        #: units performed (with a result to write)
        self.performed = 0

    @property
    def workers(self) -> int:
        """Workers running."""
        return len(self._workers)

    def wake(self) -> None:
        """Look at the work again now (its claim_size or claim_in may say something new)."""
        self._wake.set()

    def queued(self) -> list[U]:
        """The units queued on every lane and not started yet (copies, so any thread may ask)."""
        return [unit for lane in list(self._lanes.values()) for unit in list(lane.queue)]

    def take_back_queued(self) -> list[U]:
        """The units queued on every lane and not started yet, taken off their lanes: the run
        then ends once the units under way are done (the work writes what they held)."""
        units: list[U] = []
        for lane in self._lanes.values():
            units.extend(lane.queue)
            lane.queue.clear()
        self.held -= len(units)
        return units

    async def run(self) -> int:
        """Claim, perform and record until nothing more is due; returns the units performed.

        What finished is written even when the run ends in an error or is cancelled; what
        was claimed and not performed is left to lapse.
        """
        may_claim = True
        apart = False  #: whether the last round was a claim of its own (Pace.claim_apart)
        try:
            while True:
                if self._error is not None:
                    raise self._error
                stopping = self._until is not None and self._until.is_set()
                reclaim_in = None if may_claim else self._reclaim_due()
                may_claim = may_claim or reclaim_in == 0.0
                claim = self._work.claim_size(self) if may_claim and not stopping else 0
                if may_claim and not claim and not stopping:
                    # Nothing to claim now; units finishing wake the loop, and so does the
                    # time the work names (at least a moment on: its clock read came first).
                    look_in = self._work.claim_in()
                    reclaim_in = None if look_in is None else max(look_in, MIN_LOOK)
                write_in = self._write_due()
                renew_in = self._renew_due()
                if claim or write_in == 0.0 or renew_in == 0.0:
                    wrote = bool(self._finished)
                    # Pace.claim_apart: the claim first, in a round of its own; the write next,
                    # whatever comes due meanwhile (a claim of rows decided without I/O would
                    # otherwise be followed by another claim, and the writes wait for them all).
                    apart = bool(claim and wrote and self._work.pace.claim_apart and not apart)
                    wrote = wrote and not apart
                    claimed = await self._round(claim, renew=renew_in == 0.0, results=not apart)
                    if claim:
                        may_claim = claimed.more
                    elif wrote and self._work.refill_on_write:
                        may_claim = True
                    self._start(claimed)
                    continue
                if not self._workers:
                    return self.performed
                waits = [w for w in (write_in, renew_in, reclaim_in) if w is not None and w > 0]
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(waits) if waits else None):
                        await self._wake.wait()
                self._wake.clear()
        finally:
            await self._shut_down()

    async def _round(self, claim: int, *, renew: bool, results: bool = True) -> Claimed[U, R]:
        """One store round: write what finished (unless ``results`` is False), renew, claim."""
        written: list[R] = []
        if results:
            written, self._finished = self._finished, []
        # Shielded: a cancel must not leave the store round running unawaited.
        if claim:
            self._claimed_at = time.monotonic()
        self._store_round = asyncio.create_task(self._work.round(written, claim, renew=renew))
        self._round_done.clear()
        self._hold_off_until = asyncio.get_running_loop().time() + self._work.pace.hold_off
        try:
            claimed = await asyncio.shield(self._store_round)
        finally:
            self._round_done.set()
            if self._store_round.done():
                self._store_round = None
        if renew or (claimed.units and self._renew_at == math.inf):
            self._renew_at = time.monotonic() + self._work.renew_every()
        return claimed

    def _reclaim_due(self) -> float | None:
        """0 when another claim should be tried now, after one that found less than it asked
        for, else seconds until then; None when none is to be (no unit is under way, or the
        work claims no more after such a claim).
        """
        every = self._work.reclaim_every()
        if every is None or not self._workers:
            return None
        due = max(0.0, self._claimed_at + every - time.monotonic())
        # The work may name an earlier time (the poll drain: the end of its claiming).
        look_in = self._work.claim_in()
        return due if look_in is None else min(due, max(look_in, 0.0))

    def _renew_due(self) -> float | None:
        """0 when the claims held should be renewed now, else seconds until then; None when
        nothing is held.
        """
        if not self.held and not self._finished:
            self._renew_at = math.inf
            return None
        return max(0.0, self._renew_at - time.monotonic())

    def _write_due(self) -> float | None:
        """0 when the results should be written now, else seconds until then (None: none)."""
        if not self._finished:
            return 0.0 if self._work.unwritten() and not self._workers else None
        if len(self._finished) >= self._work.pace.write_batch or not self._workers:
            return 0.0
        return max(0.0, self._first_finished_at + self._work.pace.linger - time.monotonic())

    def _start(self, claimed: Claimed[U, R]) -> None:
        if claimed.ready:
            self._add_finished(claimed.ready)
        for key, width, unit in claimed.units:
            self.held += 1
            lane = self._lanes.get(key)
            if lane is None:
                lane = self._lanes[key] = _Lane()
            lane.queue.append(unit)
            if lane.workers < width:
                lane.workers += 1
                worker = asyncio.create_task(self._run_lane(lane))
                self._workers.add(worker)
                worker.add_done_callback(self._worker_done)

    def _add_finished(self, results: list[R]) -> None:
        if not self._finished:
            self._first_finished_at = time.monotonic()
            self._wake.set()  # starts the linger clock
        self._finished.extend(results)

    async def _run_lane(self, lane: _Lane[U]) -> None:
        pace = self._work.pace
        try:
            while lane.queue:
                if self._holding_off():
                    await self._hold_off()
                    continue  # another worker of the lane may have emptied the queue meanwhile
                unit = lane.queue.popleft()
                try:
                    result = await self._work.perform(unit)
                finally:
                    self.held -= 1
                if result is None:
                    continue
                self.performed += 1
                self._add_finished([result])
                # The coordinator need not look at every result: only when a write is due, or
                # now and then, as claims may fit again.
                if len(self._finished) >= pace.write_batch or self.performed % pace.wake_every == 0:
                    self._wake.set()
        finally:
            lane.workers -= 1

    def _holding_off(self) -> bool:
        return (
            not self._round_done.is_set()
            and asyncio.get_running_loop().time() < self._hold_off_until
        )

    async def _hold_off(self) -> None:
        """Wait, at most until ``Pace.hold_off`` after it began, for the store round under way.

        A round is Python work (SQLAlchemy) on the store thread, and sqlite3 lets go of the
        GIL at every step: run while the loop sends and receives, the two threads hand the
        GIL over thousands of times per round, which costs more CPU than the round itself
        (0.1-0.3 ms per delivery on bench/bench_delivery.py). Only this pipeline's workers
        wait: the event loop and everything else on it keep running, and a round that takes
        longer (a lock held by another writer, a remote PostgreSQL) holds them up no longer.
        """
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self._hold_off_until):
                await self._round_done.wait()

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self._workers.discard(worker)
        failure = None if worker.cancelled() else worker.exception()
        if isinstance(failure, Exception) and self._error is None:
            # The run ends with it (after writing what finished); the lane's units lapse.
            self._error = failure
        self._wake.set()

    async def _shut_down(self) -> None:
        # Normally nothing is left; after an error or a cancel, what finished is still written.
        for worker in self._workers:
            worker.cancel()
        if self._workers:
            await asyncio.gather(*self._workers, return_exceptions=True)
        for lane in self._lanes.values():
            while lane.queue:
                self.held -= 1
                self._work.dropped(lane.queue.popleft())
        # The events' names: "delivery_store_round_failed", "poll_results_unrecorded", ...
        failed, unrecorded = (f"{self._work.name}_{what}" for what in FAILURES)
        if self._store_round is not None:
            try:
                claimed = await self._store_round
            except Exception:
                # Its own results are lost (their claims lapse); those that waited for the
                # next round (Pace.claim_apart) are still written below.
                log.exception(failed)
            else:
                # Cut off while it ran: what it claimed is let go, what it decided is written.
                for _, _, unit in claimed.units:
                    self._work.dropped(unit)
                self._finished.extend(claimed.ready)
        if self._finished or self._work.unwritten():
            results, self._finished = self._finished, []
            try:
                await self._work.round(results, 0, renew=False)
            except Exception:
                # Their claims lapse, and the rows fall due again.
                log.exception(unrecorded, count=len(results))
