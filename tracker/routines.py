"""What the daemon keeps doing once started: polling, delivering, and its periodic chores.

Each routine adds itself to the jobs (or runs as a task of its own) and brings its readiness
check; ``tracker.compose`` builds them, ``tracker.app`` starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sqlite3
from collections.abc import Callable

import structlog

from tracker import config, retention, sdnotify
from tracker.clock import Clock
from tracker.delivery import Deliverer
from tracker.jobs import InFlight, Jobs, cancelled
from tracker.metrics import HELD_EVERY, HELD_LAG, held_lag_text, poll_lag, replaces_held_lag
from tracker.poller import PollEngine, Poller
from tracker.retry import DeliveryState
from tracker.status import FINAL
from tracker.store import SqlStore
from tracker.store.records import Stats

log = structlog.get_logger("tracker.app")

#: how often the delivery loop looks for due retries when nothing woke it
DELIVERY_TICK = 1.0
#: how often the systemd STATUS= line is refreshed
STATUS_EVERY = 15.0
#: how often the appended count changes are folded (they are summed on every scrape)
COMPACT_COUNTS_EVERY = 30.0

Live = Callable[[], config.Settings]


def status_line(stats: Stats, last_cycle_seconds: float | None, lag: float = 0.0) -> str:
    """The systemd STATUS= line: active tasks, the poll lag, the last drain's length, the
    outbox depth."""
    active = sum(n for (_, s), n in stats.tasks.items() if s not in FINAL)
    cycle = f"{last_cycle_seconds:.2f}s" if last_cycle_seconds is not None else "none yet"
    return (
        f"{active} active tasks, poll lag {lag:.1f}s, last cycle {cycle}, "
        f"{stats.deliveries.get(DeliveryState.PENDING, 0)} pending deliveries"
    )


def _failure_reason(exc: Exception) -> str:
    """What /readyz says about a failed cycle: SQLite's own message (a lock, a full disk), for
    anything else the type alone, as driver messages can name hosts and users.
    """
    cause = getattr(exc, "orig", None) or exc
    if isinstance(cause, sqlite3.Error):
        return f"{type(cause).__name__}: {cause}"
    return type(cause).__name__


class PollLoop:
    """The poll engine as a task of its own, not a scheduler job: see tracker/poller/engine.py."""

    def __init__(
        self,
        *,
        engine: PollEngine,
        store: SqlStore,
        clock: Clock,
        live: Live,
        stop: asyncio.Event,
        inflight: InFlight,
    ) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.live = live
        self.stop = stop
        self.inflight = inflight
        self._task: asyncio.Task[None] | None = None

    def start(self, stack: contextlib.AsyncExitStack) -> None:
        """Poll until the stop; ``stack`` cancels a loop that the drain has not ended."""
        self._task = task = asyncio.create_task(self._run(), name="poll")
        stack.push_async_callback(cancelled, task)

    async def _run(self) -> None:
        with self.inflight.tracked():
            await self.engine.run(self.stop)

    async def check(self) -> str | None:
        """The readiness check: polls run and are not later than [poll].max_lag."""
        # Only lateness counts, never the size of the work: a long drain that keeps up is fine.
        if self._task is not None and self._task.done() and not self.stop.is_set():
            return "the poll engine has stopped"
        failure = self.engine.last_error
        if failure is not None:
            # Said at once, not only when polls fall late: a lock or a full disk is the why.
            return f"last poll cycle failed: {_failure_reason(failure)}"
        try:
            overdue = await asyncio.to_thread(self.store.most_overdue)
        except Exception:  # noqa: BLE001 - the database check names the failure
            return None
        # The tasks the poller holds unasked count too: their claims hide them from the store.
        found = [] if overdue is None else [(overdue[0].timestamp(), overdue[1])]
        held = self.engine.poller.earliest_held()
        if held is not None:
            found.append(held)
        if not found:
            return None
        earliest, platform = min(found)
        lag = self.clock.now().timestamp() - earliest
        limit = self.live().poll.max_lag
        if lag > limit:
            # The platform names the relay to look at, when one falls behind alone.
            return (
                f"polls of {platform} are {lag:.0f} s late (more than [poll].max_lag = {limit:g} s)"
            )
        return None


class Delivering:
    """The delivery job: passes of the deliverer, on the tick or as soon as events arrive."""

    def __init__(
        self,
        deliverer: Deliverer,
        store: SqlStore,
        clock: Clock,
        jobs: Jobs,
        inflight: InFlight,
    ) -> None:
        self.deliverer = deliverer
        self.store = store
        self.clock = clock
        self.jobs = jobs
        self.inflight = inflight
        self._running = False
        self._again = False
        jobs.add("deliver", self.run, every=DELIVERY_TICK)

    @property
    def running(self) -> bool:
        """Whether a delivery run is under way."""
        return self._running

    def kick(self) -> None:
        """Start delivering now rather than at the next tick (new events were recorded)."""
        if self._running:
            self._again = True
            return
        self.jobs.run_in("deliver", 0)

    async def run(self) -> None:
        """Deliver until nothing is due, again while kicked meanwhile; then plan the next run."""
        stop = self.jobs.stop
        if stop.is_set():
            return
        self._running = True
        with self.inflight.tracked():
            try:
                while not stop.is_set():
                    self._again = False
                    await self.deliverer.run(until=stop)
                    if not self._again:
                        await self._plan_next()
                    if not self._again:
                        break
            except Exception:
                log.exception("delivery_run_failed")
            finally:
                self._running = False

    async def _plan_next(self) -> None:
        # A retry due before the next tick (retry delays can be short) is tried on time.
        if self.jobs.stop.is_set():
            return
        due = await asyncio.to_thread(self.store.next_delivery_at)
        if due is None:
            return
        wait = (due - self.clock.now()).total_seconds()
        # Only a future due time: one already past belongs to a delivery this pass could not
        # take (leased by another run, or behind an earlier event), and the tick will do.
        if 0 < wait < DELIVERY_TICK:
            self.jobs.run_in("deliver", wait)


class Chores:
    """The periodic jobs beside polling and delivery: STATUS= line, retention, count folding."""

    def __init__(
        self,
        *,
        store: SqlStore,
        poller: Poller,
        clock: Clock,
        notifier: sdnotify.Notifier,
        live: Live,
        jobs: Jobs,
        inflight: InFlight,
    ) -> None:
        self.store = store
        self.poller = poller
        self.clock = clock
        self.notifier = notifier
        self.live = live
        self.stop = jobs.stop
        self.inflight = inflight
        jobs.add("status", self.status, every=STATUS_EVERY)
        jobs.add("retention", self.retention, every=live().retention.interval)
        jobs.add("compact_counts", self.compact_counts, every=COMPACT_COUNTS_EVERY, at_start=False)
        #: whether no figure of this daemon's in HELD_LAG says a held task is late (then an
        #: idle daemon writes nothing more)
        self._none_late_written = False
        #: this daemon's name in HELD_LAG, beside other daemons on the same database
        self._held_by = secrets.token_hex(8)
        jobs.add("held_lag", self.note_held, every=HELD_EVERY)

    async def status(self) -> None:
        """Tell systemd how things stand (STATUS=)."""
        if not self.notifier.enabled or self.stop.is_set():
            return
        stats = await asyncio.to_thread(self.store.stats)
        last = self.poller.last_report
        lag = poll_lag(stats, self.clock.now().timestamp(), self.poller.earliest_held())
        self.notifier.status(status_line(stats, None if last is None else last.seconds, lag))

    async def note_held(self) -> None:
        """Keep in the store how late the most overdue task the poller holds unasked is, for
        the lag `tracker stats` shows from another process (the task's claim hides it from
        the store's own lag): every HELD_EVERY while it is late, once more when it no longer
        is, and at start. `tracker stats` believes it HELD_FRESH only, so a daemon that stops
        leaves nothing that misleads. Another daemon's larger figure, while fresh, is left
        in place (`replaces_held_lag`)."""
        now = self.clock.now().timestamp()
        held = self.poller.earliest_held()
        lag = 0.0 if held is None else max(0.0, now - held[0])
        if lag == 0.0 and self._none_late_written:
            return
        try:
            await asyncio.to_thread(self._write_held, lag, now)
        except Exception:  # noqa: BLE001 - the database check says what is wrong with it
            return
        self._none_late_written = lag == 0.0

    def _write_held(self, lag: float, now: float) -> None:
        if replaces_held_lag(self.store.get_meta(HELD_LAG), lag, now, self._held_by):
            self.store.set_meta(HELD_LAG, held_lag_text(lag, now, self._held_by))

    async def retention(self) -> None:
        """Delete what [retention] keeps no longer, in batches, stopping between two if asked."""
        if self.stop.is_set():
            return
        with self.inflight.tracked():
            try:
                await retention.run_async(
                    self.store.engine, self.live().retention, self.clock, self.stop
                )
            except Exception:
                log.exception("retention_failed")

    async def compact_counts(self) -> None:
        """Fold the appended count changes into one row per key."""
        if self.stop.is_set():
            return
        try:
            await asyncio.to_thread(self.store.compact_counts)
        except Exception:
            log.exception("compact_counts_failed")
