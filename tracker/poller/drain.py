"""One drain: claim due tasks in due order, fetch them in batches within limits, record answers.

The drain is work for the pipeline delivery uses too (tracker/pipeline.py): claims, requests
and records overlap, so while batches wait on the relay the next claim is taken and earlier
answers are written, and the relay never idles on the daemon's bookkeeping.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta

import httpx
import structlog

from tracker import events
from tracker.activity import Series
from tracker.clock import Clock, isoformat
from tracker.config import PollSettings
from tracker.limits import RateLimiter
from tracker.metrics import Metrics
from tracker.pipeline import Claimed, Pace, Pipeline
from tracker.platforms.base import Platform, Upstream, UpstreamError
from tracker.poller.plan import Planner
from tracker.poller.report import CycleReport
from tracker.store.abc import TaskStore
from tracker.store.records import Claim, DueTask, TaskUpdate
from tracker.store.worker import StoreWorker

log = structlog.get_logger("tracker.poller")

#: a claim's lease never runs shorter than this (seconds), however short the interval
MIN_LEASE = 1.0
#: nor longer: a daemon that dies holds its claims at most this long (seconds)
MAX_LEASE = 30.0
#: the claims a drain still works on are renewed every this share of a lease
RENEW_SHARE = 0.25
#: share of the interval a drain looks ahead: tasks due that soon join the current batches
#: rather than waking the engine again a few milliseconds later
AHEAD_SHARE = 0.05
#: the look-ahead never exceeds this many seconds, whatever the interval
MAX_AHEAD = 1.0
#: the last-poll time is written for `tracker stats` at most this often (seconds)
META_EVERY = 5.0
#: tasks decided between two yields to the event loop: a 1,000-task answer decided in one go
#: would hold up the API's requests on the same loop for tens of milliseconds
DECIDE_CHUNK = 100


class Poller:
    """Drains due tasks against the relays; the engine decides when."""

    def __init__(
        self,
        *,
        store: TaskStore,
        platforms: Mapping[str, Platform],
        client: httpx.AsyncClient,
        clock: Clock,
        settings: PollSettings,
        targets: events.Targets,
        metrics: Metrics,
        on_events: Callable[[], None] = lambda: None,
        on_report: Callable[[CycleReport], None] = lambda _report: None,
        report_relay: Callable[[Upstream, Exception | None], None] = lambda _u, _e: None,
    ) -> None:
        self.store = store
        self.platforms = platforms
        self.client = client
        self.clock = clock
        self.settings = settings
        self.planner = Planner(settings, targets)
        self.metrics = metrics
        self.on_events = on_events
        self.on_report = on_report
        #: told the outcome of every relay request (None: answered), for the health checks
        self.report_relay = report_relay
        self.last_cycle_at: datetime | None = None
        self.last_report: CycleReport | None = None
        self._meta_written = -META_EVERY
        self.report = CycleReport()
        self._pull_in = False
        self._limiters = {
            name: RateLimiter(p.rate_limit) for name, p in platforms.items() if p.rate_limit
        }
        self.store_worker = StoreWorker("tracker-poll-store")

    def configure(
        self,
        settings: PollSettings,
        platforms: Mapping[str, Platform] | None = None,
        targets: events.Targets | None = None,
    ) -> None:
        """Take new [poll] settings (a reload); they apply from the next claim on.

        ``platforms``, built from the new settings, carries the batch sizes to use from now on;
        ``targets`` is where the webhooks of changes decided from now on go.
        """
        # Tasks scheduled under a longer interval are pulled in, so a shorter one applies now.
        self._pull_in = settings.max_interval < self.settings.max_interval
        self.settings = settings
        self.planner.settings = settings
        if targets is not None:
            self.planner.targets = targets
        for name, fresh in (platforms or {}).items():
            if name in self.platforms:
                self.platforms[name].batch_size = fresh.batch_size

    def lag(self) -> float | None:
        """Seconds the most overdue task was late when last claimed; None before any drain."""
        return None if self.last_report is None else self.last_report.lag

    def ahead(self) -> float:
        """Seconds ahead of its due time a task may be polled, to join a batch."""
        return min(self.settings.interval * AHEAD_SHARE, MAX_AHEAD)

    def lease(self) -> float:
        """Seconds a claim holds its tasks between two renewals: half an interval.

        The drain renews the claims it still works on (queued or in flight) every quarter of
        a lease, so a slow request keeps its tasks, while the claims of a daemon that died lapse
        within half an interval, leaving the rest of two intervals for another daemon to reach
        them in due order.
        """
        return min(max(self.settings.interval / 2, MIN_LEASE), MAX_LEASE)

    async def earliest(self) -> datetime | None:
        """When the earliest live task falls due (None when none is live)."""
        return await self.store_worker.call(self.store.earliest_poll)

    async def run_cycle(
        self, until: asyncio.Event | None = None, *, log_empty: bool = True
    ) -> CycleReport:
        """Poll every task due now (or until ``until`` is set), pipelined; log its line(s).

        A drain that runs longer than one interval logs a line each interval, so the log keeps
        its heartbeat while a backlog is worked off. ``log_empty`` False leaves out the line of
        a drain that found nothing due (the engine keeps one such line per interval).
        """
        self.report = CycleReport()
        started = time.monotonic()
        self.planner.drain_started = self.clock.now().timestamp()
        if self._pull_in:
            self._pull_in = False
            latest = self.clock.now() + timedelta(seconds=self.settings.max_interval)
            await self.store_worker.call(self.store.pull_in, latest)
        drain = _Drain(self, started)
        await Pipeline(drain, until=until).run()
        report, started = self.report, drain.started
        await self.close_line(report, started, log_line=log_empty or report.claimed > 0)
        return CycleReport.total([*drain.logged, report])

    async def close_line(
        self, report: CycleReport, started: float, *, log_line: bool = True
    ) -> CycleReport:
        """Log the report's line, publish it, and start a new one."""
        report.seconds = time.monotonic() - started
        self.last_cycle_at = self.clock.now()
        self.last_report = report
        if time.monotonic() - self._meta_written >= META_EVERY:
            self._meta_written = time.monotonic()
            # For `tracker stats` in another process.
            await self.store_worker.call(
                self.store.set_meta, "last_cycle_at", isoformat(self.last_cycle_at) or ""
            )
        self.metrics.cycle_duration.observe(report.seconds)
        if log_line:
            # One line per drain (per interval in a long one), and a heartbeat when idle.
            log.info("poll_cycle", **report.line())
        self.on_report(report)
        self.report = CycleReport()
        return self.report

    async def fetch(self, platform: Platform, tasks: Sequence[DueTask]) -> list[TaskUpdate]:
        """Ask the relay about ``tasks`` (a slot already held) and decide each one's update."""
        report = self.report
        ids = [t.task_id for t in tasks]
        limiter = self._limiters.get(platform.name)
        if limiter is not None:
            before = limiter.waited
            await limiter.wait()
            waited = limiter.waited - before
            report.rate_waits[platform.name] = report.rate_waits.get(platform.name, 0.0) + waited
        lease_until = min(t.lease_until or float("inf") for t in tasks)
        if self.clock.now().timestamp() >= lease_until:
            # The claim lapsed while the batch waited (a stalled loop): another claim may hold
            # the tasks now, and they fall due again anyway.
            report.lapsed += len(ids)
            return []
        report.requests += 1
        self.metrics.ids_per_request.labels(platform.name).observe(len(ids))
        self.metrics.activity.count(Series.POLLS, len(ids))
        try:
            observations = await platform.fetch(self.client, ids)
        except (UpstreamError, httpx.HTTPError) as exc:
            self.report_relay(platform.upstream, exc)
            self.report.errors += 1
            code = _error_code(exc)
            self.metrics.upstream_requests.labels(platform.name, code).inc()
            self.metrics.upstream_errors.labels(platform.name, code).inc()
            self.metrics.activity.relay_error(platform.name, code, _describe(exc))
            log.warning(
                "upstream_error", platform=platform.name, ids=len(ids), error=_describe(exc)
            )
            now = self.clock.now()
            return [self.planner.retry(t, now) for t in tasks]
        self.report_relay(platform.upstream, None)
        self.metrics.upstream_requests.labels(platform.name, "200").inc()
        now = self.clock.now()
        seen = {o.task_id: o for o in observations}
        updates: list[TaskUpdate] = []
        for start in range(0, len(tasks), DECIDE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = tasks[start : start + DECIDE_CHUNK]
            updates += self.planner.decide(platform.name, chunk, seen, now)
        return updates

    def count_recorded(self, updates: Sequence[TaskUpdate], written: int) -> None:
        """Count what the recorded ``updates`` moved; tell the deliverer of new events."""
        report = self.report
        fired = 0
        for update in updates:
            change = update.change
            if change is None:
                continue
            fired += len(update.outbox)
            if change.moved:
                report.changed += 1
                self.metrics.transitions.labels(
                    update.task.platform, change.after.status.value
                ).inc()
        report.events += fired
        if written and fired:
            self.on_events()


@dataclasses.dataclass(frozen=True, slots=True)
class _Batch:
    """One relay request's worth of claimed tasks."""

    platform: Platform
    tasks: Sequence[DueTask]
    claim: Claim | None


@dataclasses.dataclass(frozen=True, slots=True)
class _Answered:
    """A batch's updates, to record (``batch`` None: decided without asking)."""

    batch: _Batch | None
    updates: list[TaskUpdate]
    size: int


class _Drain:
    """One drain as pipeline work (tracker/pipeline.py): claims of due tasks in due order,
    batches on one lane per upstream (``[poll].concurrency`` requests at a time each), and
    the answers' updates recorded together at the next store round.

    Claims are prefetched one ahead: the next is taken once fewer than one claim's worth of
    tasks are under way, so the relay never waits for the daemon's own bookkeeping.
    """

    name = "poll"
    pace = Pace()
    refill_on_write = False

    def __init__(self, poller: Poller, started: float) -> None:
        self._poller = poller
        settings = poller.settings
        self._size = settings.batch_size * settings.concurrency
        self._width = settings.concurrency
        #: claimed tasks not recorded yet
        self._outstanding = 0
        #: unrecorded batches per claim; these claims are renewed
        self._held: dict[Claim, int] = {}
        #: when the current log line's part of the drain began (monotonic)
        self.started = started
        #: the lines a drain longer than an interval logged before its last
        self.logged: list[CycleReport] = []

    def claim_size(self, pipeline: Pipeline[_Batch, _Answered]) -> int:
        return self._size if self._outstanding < self._size else 0

    def renew_every(self) -> float:
        return self._poller.lease() * RENEW_SHARE

    def unwritten(self) -> bool:
        return False

    async def round(
        self, results: list[_Answered], claim: int, *, renew: bool
    ) -> Claimed[_Batch, _Answered]:
        poller = self._poller
        now = poller.clock.now()
        lease = poller.lease()
        renewing: list[Claim] = []
        if renew:
            # A claim taken within the last renewal period still has most of its lease.
            renewing = [
                c for c in self._held if c.until - now.timestamp() < lease * (1 - RENEW_SHARE)
            ]
        updates = [u for answered in results for u in answered.updates]
        due_by = now + timedelta(seconds=poller.ahead())
        written, due = await poller.store_worker.call(
            self._store_round, updates, renewing, claim, now=now, lease=lease, due_by=due_by
        )
        for answered in results:
            self._outstanding -= answered.size
            if answered.batch is not None and answered.batch.claim is not None:
                self._release(answered.batch.claim)
        if updates:
            poller.count_recorded(updates, written)
        claimed: Claimed[_Batch, _Answered] = self._split(due, now) if due else Claimed()
        # A long drain's line per interval closes at a claim, so it counts what it claimed
        # and what it recorded alike (renewals and writes alone run while requests wait).
        if claim and time.monotonic() - self.started >= max(poller.settings.interval, 1.0):
            self.logged.append(poller.report)
            await poller.close_line(poller.report, self.started)
            self.started = time.monotonic()
        return claimed

    def _store_round(
        self,
        updates: list[TaskUpdate],
        renewing: list[Claim],
        claim: int,
        *,
        now: datetime,
        lease: float,
        due_by: datetime,
    ) -> tuple[int, list[DueTask]]:
        store = self._poller.store
        written = store.record(updates, now) if updates else 0
        for held in renewing:
            store.renew_claim(held, now.timestamp() + lease)
        due = store.claim_due(now, claim, lease=lease, due_by=due_by) if claim else []
        return written, due

    def _split(self, due: list[DueTask], now: datetime) -> Claimed[_Batch, _Answered]:
        """The claimed tasks as batches per platform, and updates for those not to ask."""
        poller = self._poller
        report = poller.report
        report.lag = max(report.lag, now.timestamp() - due[0].planned)
        report.claimed += len(due)
        self._outstanding += len(due)
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
            ready.append(_Answered(None, given_up, len(given_up)))
        units: list[tuple[str, int, _Batch]] = []
        for name, tasks in by_platform.items():
            platform = poller.platforms.get(name)
            if platform is None:
                # The platform was removed from the config; keep the tasks for when it returns.
                log.warning("unknown_platform", platform=name, tasks=len(tasks))
                kept = [poller.planner.unchanged(t, now) for t in tasks]
                ready.append(_Answered(None, kept, len(kept)))
                continue
            size = platform.batch_size
            lane = platform.upstream.name
            for i in range(0, len(tasks), size):
                units.append((lane, self._width, _Batch(platform, tasks[i : i + size], claim)))
                if claim is not None:
                    self._held[claim] = self._held.get(claim, 0) + 1
        return Claimed(units=units, ready=ready, more=len(due) == self._size)

    def _release(self, claim: Claim) -> None:
        self._held[claim] -= 1
        if not self._held[claim]:
            del self._held[claim]

    async def perform(self, unit: _Batch) -> _Answered:
        updates = await self._poller.fetch(unit.platform, unit.tasks)
        return _Answered(unit, updates, len(unit.tasks))

    def dropped(self, unit: _Batch) -> None:
        """Nothing to undo: its claim lapses, and the tasks fall due again."""


def _error_code(exc: Exception) -> str:
    if isinstance(exc, UpstreamError) and exc.status_code is not None:
        return str(exc.status_code)
    if isinstance(exc, httpx.TimeoutException):
        return "timeout"
    return "error"


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return f"timeout: {type(exc).__name__}"
    if isinstance(exc, httpx.HTTPError):
        return f"{type(exc).__name__}: {exc}"
    return str(exc)
