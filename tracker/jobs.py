"""Background work: the scheduler running the periodic jobs, and the work a stop waits for."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler

from tracker import sdnotify

log = structlog.get_logger("tracker.app")

#: how long a stop waits for the in-flight poll batch and deliveries; below the unit's
#: TimeoutStopSec=30 so systemd never has to kill us mid-write
STOP_DEADLINE = 20.0
#: how long work cancelled at the deadline gets to unwind (a store call under way finishes
#: on its thread first) before the stop goes on without it: STOP_DEADLINE plus this stays
#: below TimeoutStopSec, so the process exits on its own rather than by systemd's SIGKILL
CANCEL_GRACE = 5.0

Job = Callable[[], Coroutine[Any, Any, None]]


class InFlight:
    """Work that must finish (or be cut off) before the store closes: what a stop drains."""

    def __init__(self, notifier: sdnotify.Notifier) -> None:
        self.notifier = notifier
        self._busy: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._busy)

    @contextlib.contextmanager
    def tracked(self) -> Iterator[None]:
        """Count the current task as in flight while the block runs."""
        task = asyncio.current_task()
        if task is not None:
            self._busy.add(task)
        try:
            yield
        finally:
            if task is not None:
                self._busy.discard(task)

    async def drain(self) -> None:
        """Wait for the work in flight, cancelling what is left after STOP_DEADLINE seconds.

        One deadline for all of it, however many parts it belongs to: the unit's stop timeout
        bounds the whole stop. What is still running CANCEL_GRACE after its cancel is left
        behind (logged as ``drain_abandoned``): its transaction, unfinished, commits nothing.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_DEADLINE
        # A job the scheduler launched just before the stop gets to see that it was asked.
        await asyncio.sleep(0)
        if not self._busy:
            return
        log.info("draining", jobs=len(self._busy), deadline=STOP_DEADLINE)
        self.notifier.status(f"stopping: finishing {len(self._busy)} in-flight jobs")
        started = loop.time()
        while self._busy:
            remaining = deadline - loop.time()
            if remaining <= 0:
                late = set(self._busy)
                log.warning("drain_deadline_passed", jobs=len(late), deadline=STOP_DEADLINE)
                for task in late:
                    task.cancel()
                _, stuck = await asyncio.wait(late, timeout=CANCEL_GRACE)
                if stuck:
                    log.error("drain_abandoned", jobs=len(stuck), grace=CANCEL_GRACE)
                break
            await asyncio.wait(set(self._busy), timeout=remaining)
        log.info("drained", seconds=round(loop.time() - started, 3))


async def cancelled(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` and wait until it has ended; an error it had ended with is logged.

    Logged, not raised: the rest of a stop must still run, and /readyz has said it already.
    """
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    except Exception:
        log.exception("task_failed", task=task.get_name())


class _NoSkipWarnings(logging.Filter):
    """Drops APScheduler's warning for a run skipped because the last one is still going.

    For the delivery job that is routine (a pass outlasts the tick).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances" not in str(record.msg)


def _scheduler_logger() -> logging.Logger:
    logger = logging.getLogger("tracker.scheduler")
    if not any(isinstance(f, _NoSkipWarnings) for f in logger.filters):
        logger.addFilter(_NoSkipWarnings())
    return logger


class Jobs:
    """The periodic jobs, each added by the part it belongs to, on one APScheduler.

    Jobs run one at a time each, and a run missed while the last one went on is not made up.
    """

    def __init__(self, stop: asyncio.Event) -> None:
        self.stop = stop
        self.scheduler = AsyncIOScheduler(timezone=UTC, logger=_scheduler_logger())

    def add(self, job_id: str, job: Job, *, every: float, at_start: bool = True) -> None:
        """Run ``job`` every ``every`` seconds once started, the first time at once or not."""
        self.scheduler.add_job(
            job,
            "interval",
            seconds=every,
            id=job_id,
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            **({"next_run_time": datetime.now(UTC)} if at_start else {}),
        )

    def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Start the jobs; ``stack`` pauses them, then (after the drain) shuts them down."""
        self.scheduler.start()
        # Shut down only once the drain is over: that cancels the jobs still running.
        stack.callback(self._shutdown)

    def pause(self) -> None:
        """Launch no more runs; the ones under way go on."""
        if self.scheduler.running:
            self.scheduler.pause()

    def _shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def shift_back(self, seconds: float) -> None:
        """Bring every job's next run ``seconds`` earlier: the wall clock stepped back that far,
        and APScheduler waits for wall-clock times (a job would otherwise pause as long)."""
        if not self.scheduler.running:
            return
        for job in self.scheduler.get_jobs():
            if job.next_run_time is not None:
                job.modify(next_run_time=job.next_run_time - timedelta(seconds=seconds))

    def run_in(self, job_id: str, seconds: float) -> None:
        """Bring the next run of ``job_id`` forward to ``seconds`` from now, when it is running."""
        job = self.scheduler.get_job(job_id)
        if job is not None and self.scheduler.running:
            # Real time for the scheduler: the parts' clock may be a test's FakeClock.
            job.modify(next_run_time=datetime.now(UTC) + timedelta(seconds=seconds))

    def reschedule(self, job_id: str, every: float) -> None:
        """Run ``job_id`` every ``every`` seconds from now on."""
        job = self.scheduler.get_job(job_id)
        if job is not None:
            job.reschedule("interval", seconds=every)

    async def check(self) -> str | None:
        """The readiness check: the jobs are running and no stop is under way."""
        if self.stop.is_set():
            return "shutting down"
        return None if self.scheduler.running else "scheduler is not running"
