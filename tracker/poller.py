"""One poll cycle: pick due tasks, ask the relay in batches within limits, record what changed."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from tracker import events, status
from tracker.activity import Series
from tracker.clock import Clock, isoformat
from tracker.config import PollSettings
from tracker.metrics import Metrics
from tracker.platforms.base import Platform, UpstreamError
from tracker.store.abc import TaskStore
from tracker.store.records import KEEP, DueTask, Keep, TaskUpdate

log = structlog.get_logger("tracker.poller")

NOT_FOUND_REASON = "not found upstream"

# A cycle drains every due task, but stops after this many claims so one cycle cannot run
# forever when tasks fall due faster than they can be polled; the next cycle goes on.
MAX_ROUNDS_PER_CYCLE = 50


@dataclasses.dataclass(slots=True)
class CycleReport:
    """What one cycle did, for its log line and the health checks."""

    claimed: int = 0
    requests: int = 0
    errors: int = 0
    changed: int = 0
    events: int = 0
    given_up: int = 0
    seconds: float = 0.0


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart (per platform)."""

    def __init__(self, rate: float) -> None:
        self._gap = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()

    async def wait(self) -> None:
        """Return when the next request may start."""
        async with self._lock:
            now = time.monotonic()
            delay = self._next - now
            self._next = max(now, self._next) + self._gap
        if delay > 0:
            await asyncio.sleep(delay)


class Poller:
    """Runs poll cycles against the relays."""

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
    ) -> None:
        self.store = store
        self.platforms = platforms
        self.client = client
        self.clock = clock
        self.settings = settings
        self.targets = targets
        self.metrics = metrics
        self.on_events = on_events
        self.last_cycle_at: datetime | None = None
        self.last_report: CycleReport | None = None
        self._pull_in = False
        self._limiters = {
            name: RateLimiter(p.rate_limit) for name, p in platforms.items() if p.rate_limit
        }

    def configure(self, settings: PollSettings) -> None:
        """Take new [poll] settings (a reload); they apply from the next cycle on."""
        # Tasks scheduled under a longer interval are pulled in, so a shorter one applies now.
        self._pull_in = settings.max_interval < self.settings.max_interval
        self.settings = settings

    async def run_cycle(self, until: asyncio.Event | None = None) -> CycleReport:
        """Poll every due task once (up to a bound, or until ``until`` is set), log one line."""
        started = time.monotonic()
        report = CycleReport()
        semaphore = asyncio.Semaphore(self.settings.concurrency)
        claim_size = self.settings.batch_size * self.settings.concurrency
        if self._pull_in:
            self._pull_in = False
            latest = self.clock.now() + timedelta(seconds=self.settings.max_interval)
            await asyncio.to_thread(self.store.pull_in, latest)
        for _ in range(MAX_ROUNDS_PER_CYCLE):
            if until is not None and until.is_set():
                break  # stopping: the claimed batch is done, the rest waits for the next start
            now = self.clock.now()
            due = await asyncio.to_thread(
                self.store.claim_due,
                now,
                claim_size,
                interval=self.settings.interval,
                max_interval=self.settings.max_interval,
            )
            report.claimed += len(due)
            if due:
                await self._poll(due, semaphore, report)
            if len(due) < claim_size:
                break
        report.seconds = time.monotonic() - started
        self.last_cycle_at = self.clock.now()
        self.last_report = report
        # For `tracker stats` in another process; one small write per cycle.
        await asyncio.to_thread(
            self.store.set_meta, "last_cycle_at", isoformat(self.last_cycle_at) or ""
        )
        self.metrics.cycle_duration.observe(report.seconds)
        # One line per cycle, empty ones included: the contract, and a heartbeat.
        log.info("poll_cycle", **dataclasses.asdict(report))
        return report

    async def _poll(
        self, due: Sequence[DueTask], semaphore: asyncio.Semaphore, report: CycleReport
    ) -> None:
        now = self.clock.now()
        expired = now - timedelta(seconds=self.settings.give_up_after)
        given_up: list[TaskUpdate] = []
        by_platform: dict[str, list[DueTask]] = defaultdict(list)
        for task in due:
            if task.created_at <= expired:
                reason = f"gave up after {self.settings.give_up_after:g} s without a final status"
                given_up.append(self._give_up(task, reason, now))
            else:
                by_platform[task.platform].append(task)
        if given_up:
            report.given_up += len(given_up)
            await self._record(given_up, report)
        jobs: list[Coroutine[Any, Any, None]] = []
        for name, tasks in by_platform.items():
            platform = self.platforms.get(name)
            if platform is None:
                # The platform was removed from the config; keep the tasks for when it returns.
                log.warning("unknown_platform", platform=name, tasks=len(tasks))
                continue
            size = platform.batch_size
            jobs.extend(
                self._poll_batch(platform, tasks[i : i + size], semaphore, report)
                for i in range(0, len(tasks), size)
            )
        await asyncio.gather(*jobs)

    async def _poll_batch(
        self,
        platform: Platform,
        tasks: Sequence[DueTask],
        semaphore: asyncio.Semaphore,
        report: CycleReport,
    ) -> None:
        ids = [t.task_id for t in tasks]
        async with semaphore:
            limiter = self._limiters.get(platform.name)
            if limiter is not None:
                await limiter.wait()
            report.requests += 1
            self.metrics.ids_per_request.labels(platform.name).observe(len(ids))
            self.metrics.activity.count(Series.POLLS, len(ids))
            try:
                observations = await platform.fetch(self.client, ids)
            except (UpstreamError, httpx.HTTPError) as exc:
                report.errors += 1
                code = _error_code(exc)
                self.metrics.upstream_requests.labels(platform.name, code).inc()
                self.metrics.upstream_errors.labels(platform.name, code).inc()
                self.metrics.activity.relay_error(platform.name, code, _describe(exc))
                log.warning(
                    "upstream_error",
                    platform=platform.name,
                    ids=len(ids),
                    error=_describe(exc),
                )
                # Asked again next cycle, not after the back-off the claim planned.
                at = self.clock.now() + timedelta(seconds=self.settings.interval)
                await asyncio.to_thread(self.store.reschedule, [t.pk for t in tasks], at)
                return
        self.metrics.upstream_requests.labels(platform.name, "200").inc()
        updates = self._decide(platform, tasks, observations)
        if updates:
            await self._record(updates, report)

    def _decide(
        self,
        platform: Platform,
        tasks: Sequence[DueTask],
        observations: Sequence[status.Observation],
    ) -> list[TaskUpdate]:
        now = self.clock.now()
        epoch = now.timestamp()
        seen = {o.task_id: o for o in observations}
        updates = []
        for task in tasks:
            observation = seen.get(task.task_id)
            if observation is None:
                updates.extend(self._missing(task, now))
                continue
            if observation.status is None:
                log.warning(
                    "unknown_upstream_status",
                    platform=platform.name,
                    task_id=task.task_id,
                    upstream_status=observation.upstream_status,
                )
            change = status.apply(task.snapshot, observation)
            missing = None if task.missing_since is not None else KEEP
            hint = self._hinted_poll(observation, epoch)
            if change is None:
                if missing is not KEEP or hint is not KEEP:
                    updates.append(TaskUpdate(task, missing_since=missing, next_poll_at=hint))
                continue
            target = self.targets.for_task(task)
            updates.append(
                TaskUpdate(
                    task,
                    change,
                    events.outbox_entries(task, change, target, now),
                    missing_since=missing,
                    next_poll_at=hint,
                )
            )
        return updates

    def _hinted_poll(self, observation: status.Observation, epoch: float) -> float | Keep:
        # The upstream's own estimate moves the next poll, but only later, never past the cap.
        hint = observation.wait_hint
        if hint is None or hint <= self.settings.interval:
            return KEEP
        return epoch + min(hint, self.settings.max_interval)

    def _missing(self, task: DueTask, now: datetime) -> list[TaskUpdate]:
        epoch = now.timestamp()
        if task.missing_since is None:
            return [TaskUpdate(task, missing_since=epoch)]
        if epoch - task.missing_since >= self.settings.not_found_after:
            return [self._give_up(task, NOT_FOUND_REASON, now)]
        return []

    def _give_up(self, task: DueTask, reason: str, now: datetime) -> TaskUpdate:
        change = status.give_up(task.snapshot, reason)
        if change is None:  # claimed tasks are never final; kept for the type checker
            return TaskUpdate(task)
        target = self.targets.for_task(task)
        return TaskUpdate(task, change, events.outbox_entries(task, change, target, now))

    async def _record(self, updates: Sequence[TaskUpdate], report: CycleReport) -> None:
        written = await asyncio.to_thread(self.store.record, updates, self.clock.now())
        moved = [u for u in updates if u.change is not None]
        report.changed += sum(1 for u in moved if u.change is not None and u.change.moved)
        fired = sum(len(u.outbox) for u in moved)
        report.events += fired
        for update in moved:
            if update.change is not None and update.change.moved:
                self.metrics.transitions.labels(
                    update.task.platform, update.change.after.status.value
                ).inc()
        if written and fired:
            self.on_events()


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
