"""The poll engine: drains whatever is due, then sleeps until the earliest task falls due.

A long-running task of the daemon rather than a scheduler job on a fixed tick: a tick makes a
task wait for the next one whenever it falls due in between, and a job that outlasts its tick
is skipped. Woken early by a registration or a reload, so new work never waits for a timer.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from tracker.clock import Clock, StepWatch
from tracker.poller.drain import MAX_LEASE, Poller
from tracker.poller.report import CycleReport

log = structlog.get_logger("tracker.poller")

#: longest sleep without looking at the store again, in seconds: tasks registered by another
#: process (the CLI, another daemon on the same PostgreSQL) are picked up within this
MAX_SLEEP = 1.0
#: seconds to wait after a drain failed (the database away, say) before the next try
FAILURE_PAUSE = 1.0
#: seconds to wait when a task is due but no claim could take it (another daemon holds it)
BLOCKED_PAUSE = 0.1
#: a lag warning is logged at most this often (seconds)
LAG_WARNING_EVERY = 60.0
#: a batch style asking fewer ids per request than this is told to ask more when lagging;
#: not past it, as relays cap an answer there (one-hub answers at most 100 ids; Poller.ask
#: then asks fewer at a time, but a hint should not lead there)
SUGGESTED_BATCH = 100


class PollEngine:
    """Runs the poller's drains back to back while work is due, and sleeps in between."""

    def __init__(
        self,
        poller: Poller,
        clock: Clock,
        *,
        on_step: Callable[[float], None] = lambda _seconds: None,
    ) -> None:
        self.poller = poller
        self.clock = clock
        #: told how far the wall clock stepped back, once the plans moved (the periodic jobs)
        self.on_step = on_step
        self._wake = asyncio.Event()
        self._heartbeat = time.monotonic()
        self._warned_at = -LAG_WARNING_EVERY
        #: why the last drain failed (for /readyz); None once one succeeds
        self.last_error: Exception | None = None
        self._steps = StepWatch(clock)
        #: when run() began (epoch seconds; None before): a lag of tasks due before then was
        #: left by the daemon's own downtime, not by too little capacity
        self.started_at: float | None = None
        poller.on_report = self.check_lag

    def wake(self) -> None:
        """Look for due work now (new tasks were registered, or the settings changed)."""
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Drain and sleep until ``stop`` is set; in-flight batches finish before returning."""
        self.started_at = self.clock.now().timestamp()
        while not stop.is_set():
            self._wake.clear()
            beat = time.monotonic() - self._heartbeat >= self.poller.settings.interval
            try:
                await self.follow_clock()
                report = await self.poller.run_cycle(until=stop, log_empty=beat)
            except Exception as exc:
                self.last_error = exc
                log.exception("poll_cycle_failed")
                await self._sleep(stop, FAILURE_PAUSE)
                continue
            self.last_error = None
            if beat or report.claimed:
                self._heartbeat = time.monotonic()
            await self._idle(stop, blocked=not report.claimed)

    async def _idle(self, stop: asyncio.Event, *, blocked: bool) -> None:
        """Return when a task is due, when woken, or when an empty drain is due as a heartbeat."""
        while not stop.is_set() and not self._wake.is_set():
            if self._steps.stepped_back():
                return  # the plans move back first (follow_clock), then what is due is due
            try:
                earliest = await self.poller.earliest()
            except Exception:
                log.exception("poll_cycle_failed")
                await self._sleep(stop, FAILURE_PAUSE)
                return
            # Measured on the real clock: the heartbeat keeps the log line once per interval.
            beat = self.poller.settings.interval - (time.monotonic() - self._heartbeat)
            wait = min(MAX_SLEEP, beat)
            if earliest is not None:
                ahead = self.poller.ahead()
                wait = min(wait, (earliest - self.clock.now()).total_seconds() - ahead)
            if wait <= 0:
                if blocked and beat > 0:
                    await self._sleep(stop, BLOCKED_PAUSE)
                return
            await self._sleep(stop, wait)

    async def follow_clock(self) -> None:
        """After a step back of the wall clock, move every plan back by as much.

        Polls and retries are planned as wall-clock times: a step back of an hour (NTP at
        boot, a hardware clock set right) would otherwise stop every poll and retry for that
        hour. Run between drains, when no claim of this daemon is out. A jump forward moves
        nothing (what fell due meanwhile is due indeed) and is only logged.
        """
        back = self._steps.stepped_back()
        forward = self._steps.jumped_forward()
        if forward:
            # Nothing to move: what was planned meanwhile is due now. Said, as the lag it
            # leaves (and a poll_lagging warning) would otherwise be a riddle.
            log.warning(
                "clock_jumped_forward",
                seconds=round(forward, 3),
                hint="the machine was suspended or its clock set forward; what fell due "
                "meanwhile is polled and sent now",
            )
        if not back:
            return
        poller = self.poller
        # Another daemon's claim ends at most MAX_LEASE on: left alone (see shift_plans).
        polls, deliveries = await poller.store_worker.call(
            poller.store.shift_plans, back, self.clock.now(), claims_within=MAX_LEASE
        )
        self._steps.followed(back)
        self.on_step(back)
        log.warning(
            "clock_stepped_back",
            seconds=round(back, 3),
            polls_moved=polls,
            deliveries_moved=deliveries,
            hint="every poll, retry and periodic job planned before the step moved back as far",
        )
        if deliveries:
            poller.on_events()

    async def _sleep(self, stop: asyncio.Event, seconds: float) -> None:
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waits:
                waiter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def check_lag(self, report: CycleReport) -> None:
        """Warn (at most once a minute) when polls run late, naming what would help."""
        settings = self.poller.settings
        if report.lag <= settings.interval:
            return
        now = time.monotonic()
        if now - self._warned_at < LAG_WARNING_EVERY:
            return
        self._warned_at = now
        setting = self.helpful_setting(report)
        late = f"polls of {report.lagging or 'tasks'} run {report.lag:.0f} s late"
        due = self.clock.now().timestamp() - report.lag
        if self.started_at is not None and due < self.started_at:
            # After a restart or an outage no setting is to blame, unless the lag stays.
            hint = (
                f"{late}: they fell due before this daemon started (it was stopped or down) "
                f"and are caught up oldest first; if the lag does not shrink, raise {setting}"
            )
        else:
            hint = f"{late}; raise {setting} if the relay allows it"
        log.warning(
            "poll_lagging",
            lag_seconds=round(report.lag, 1),
            interval=settings.interval,
            # With several relays, one may fall behind alone: whose tasks are most overdue.
            platform=report.lagging,
            setting=setting,
            hint=hint,
        )

    def helpful_setting(self, report: CycleReport) -> str:
        """The setting most likely to shorten the lag, as a dotted config key."""
        limited = [name for name, waited in report.rate_waits.items() if waited > 0]
        if limited:
            worst = max(limited, key=lambda name: report.rate_waits[name])
            return f"platforms.{worst}.rate_limit"
        batching = [p for p in self.poller.platforms.values() if not p.per_id]
        if any(p.batch_size < SUGGESTED_BATCH for p in batching):
            return "poll.batch_size"
        return "poll.concurrency"
