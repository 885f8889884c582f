"""One drain: claim due tasks in due order, fetch them in batches within limits, record answers.

``Poller`` asks the relays and decides; the drain's claims, batches and store rounds are
``DrainWork`` (rounds.py), run by the pipeline delivery uses too (tracker/pipeline.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from tracker import events, sanitize
from tracker.activity import Series
from tracker.clock import Clock, isoformat
from tracker.config import PollSettings
from tracker.limits import RateLimiter
from tracker.metrics import Metrics
from tracker.pipeline import Pipeline
from tracker.platforms.base import Platform, Upstream, UpstreamError
from tracker.poller.plan import Decided, Planner
from tracker.poller.report import CycleReport
from tracker.poller.rounds import Answer, DrainWork
from tracker.retry import parse_retry_after
from tracker.store.abc import TaskStore
from tracker.store.records import DueTask, TaskUpdate
from tracker.store.worker import StoreWorker

log = structlog.get_logger("tracker.poller")

#: a claim's lease never runs shorter than this (seconds), however short the interval
MIN_LEASE = 1.0
#: nor longer: a daemon that dies holds its claims at most this long (seconds)
MAX_LEASE = 30.0
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
#: seconds a relay is asked nothing after a 429 Too Many Requests without Retry-After, or
#: after a request it did not answer at all (doubled for each such failure in a row) ...
RELAY_PAUSE = 2.0
#: ... and the most its Retry-After or its failures may pause it, rather than stopping on the
#: relay's word (RelayHealth names on /readyz a relay that answers nothing, or only 429)
MAX_RELAY_PAUSE = 30.0
#: once a drain stops claiming, a request out gets at least this long since it was sent
#: (seconds) before it is called off, its tasks due again: a relay that went silent, or one
#: holding a request for its whole timeout, does not keep the next drain (every other
#: relay's polls) waiting ...
END_GRACE = 1.0
#: ... nor is a relay that is slow but answering cut short: it gets this many times its usual
#: answer time
END_GRACE_ANSWERS = 2.0
#: weight of the newest answer in an upstream's usual answer time (a moving average)
ANSWER_TIME_WEIGHT = 0.2
#: the most ids relays are known to answer in one batch query (one-hub: 100; some
#: midjourney-proxy resellers: 500): an answer of exactly that many, to a request for more,
#: was cut there, not an answer that the other ids are unknown
ANSWER_CAPS = frozenset({100, 500})


@dataclasses.dataclass(eq=False)
class _Out:
    """A request under way in ask(): of which upstream and platform, whether it is a probe,
    when its most overdue task was planned (epoch seconds), and when it was sent (monotonic;
    None while it waits for its rate limit)."""

    upstream: str
    probe: bool
    platform: str
    planned: float
    sent: float | None = None


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
        #: the drain under way and its pipeline, for a reload to end its claims
        self._drain: tuple[DrainWork, Pipeline[Any, Any]] | None = None
        self._limiters = {
            name: RateLimiter(p.rate_limit) for name, p in platforms.items() if p.rate_limit
        }
        #: monotonic time until which each relay (by upstream name) is asked nothing: it
        #: answered 429 Too Many Requests (or 503 with a Retry-After), or did not answer
        self._paused: dict[str, float] = {}
        #: upstream name -> its rounds of requests that got no answer at all, in a row (any
        #: answer ends the row); while it has some, it is asked one request at a time
        self._failures: dict[str, int] = {}
        #: upstream names that asked for a pause (429, 503 with a Retry-After) and have given
        #: no usable answer since: after the pause they too are asked one request at a time,
        #: not by every lane at once (a burst that would only run into the limit again)
        self._limited: set[str] = set()
        #: the task of each request under way (in ask()): for call_off_requests, and to see
        #: a relay's probe (its one request, after failures) out
        self._out: dict[asyncio.Task[Any], _Out] = {}
        #: upstream name -> its usual answer time (seconds, a moving average)
        self._answer_times: dict[str, float] = {}
        #: the requests' tasks cancelled by call_off_requests, not by a shutdown
        self._called_off: set[asyncio.Task[Any]] = set()
        #: whether the drain under way has called off its requests: it sends no other
        self._asking_off = False
        #: the drain's stop, if it has one: set, it sends no other request either (its
        #: call-off, _stopping, runs a loop turn or two later)
        self._until: asyncio.Event | None = None
        #: the call-offs planned for requests given more time (cancelled when the drain ends)
        self._call_offs: list[asyncio.TimerHandle] = []
        self.store_worker = StoreWorker("tracker-poll-store")

    def configure(
        self,
        settings: PollSettings,
        platforms: Mapping[str, Platform] | None = None,
        targets: events.Targets | None = None,
    ) -> None:
        """Take new [poll] settings (a reload); they apply from the next drain on.

        ``platforms``, built from the new settings, carries the batch sizes and rate limits to
        use from now on;
        ``targets`` is where the webhooks of changes decided from now on go. A drain under way
        takes no more claims and ends once its requests are answered (what it had queued goes
        back), so the next one starts at once with the new claim size, concurrency and pull-in.
        """
        # Tasks scheduled under a longer interval are pulled in, so a shorter one applies now;
        # a pull-in still to do stays to do whatever a later reload changes.
        self._pull_in |= settings.max_interval < self.settings.max_interval
        changed = settings != self.settings
        self.settings = settings
        self.planner.settings = settings
        if targets is not None:
            self.planner.targets = targets
        for name, fresh in (platforms or {}).items():
            platform = self.platforms.get(name)
            if platform is None:
                continue
            if platform.batch_size != fresh.batch_size:
                platform.batch_size = fresh.batch_size
                changed = True
            if platform.rate_limit != fresh.rate_limit:
                # Requests waiting for the old limiter are called off by the drain's wind-down.
                platform.rate_limit = fresh.rate_limit
                if fresh.rate_limit:
                    self._limiters[name] = RateLimiter(fresh.rate_limit)
                else:
                    self._limiters.pop(name, None)
                changed = True
        if changed and self._drain is not None:
            # A reload of other sections (logging, tokens, webhooks) leaves the drain alone.
            drain, pipeline = self._drain
            drain.end_claims(pipeline)
            pipeline.wake()

    def lag(self) -> float | None:
        """Seconds the most overdue task was late when last claimed or asked about (the
        last drain's, or its last log line's); None before any drain."""
        return None if self.last_report is None else self.last_report.lag

    def earliest_held(self) -> tuple[float, str] | None:
        """When the most overdue task this daemon holds unasked was planned (epoch seconds),
        and its platform; None when it holds none.

        Such a task is claimed and waits in its lane, or for its rate limit: the claim moved
        its next poll in the store to the end of the lease, so the store's lag cannot see it.
        Any thread may ask (the lag gauge is read in the API's thread pool).
        """
        found = [(o.planned, o.platform) for o in list(self._out.values()) if o.sent is None]
        drain = self._drain
        if drain is not None:
            found += [(b.tasks[0].planned, b.platform.name) for b in drain[1].queued()]
        return min(found, default=None)

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
        self._asking_off = False
        if self._pull_in:
            # Cleared first: a reload meanwhile sets it again, for its own max_interval.
            self._pull_in = False
            now = self.clock.now()
            latest = now + timedelta(seconds=self.settings.max_interval)
            try:
                # Another daemon's claim ends at most MAX_LEASE on: left alone (see pull_in).
                await self.store_worker.call(
                    self.store.pull_in, latest, claims_within=MAX_LEASE, now=now
                )
            except BaseException:
                self._pull_in = True  # tried again at the next drain
                raise
        drain = DrainWork(self, started)
        pipeline = Pipeline(drain, until=until)
        self._drain, self._until = (drain, pipeline), until
        # A stop need not wait for a relay that does not answer either (call_off_requests).
        stopped = None if until is None else asyncio.ensure_future(until.wait())
        if stopped is not None:
            stopped.add_done_callback(self._stopping)
        try:
            await pipeline.run()
        finally:
            self._drain = self._until = None
            if stopped is not None:
                stopped.cancel()
            self._cancel_call_offs()
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

    async def ask(self, platform: Platform, tasks: Sequence[DueTask]) -> Answer | list[TaskUpdate]:
        """Ask the relay about ``tasks`` (a slot already held): its answer, to decide outside
        the slot, or the updates of a batch decided without one (a failed request, a lapsed
        claim). Counts go to the report of the log line open when they happen (a round may
        close a line while this waits).
        """
        name = platform.upstream.name
        held_back = self._held_back(platform, tasks)
        if held_back is not None:
            return held_back
        if self._asking_off or (self._until is not None and self._until.is_set()):
            # A batch a lane took just before the drain called off its requests (told to end),
            # or as a stop was set.
            return self._due_again(tasks)
        # Its last requests got no answer, or asked for a pause: one at a time.
        probe = name in self._failures or name in self._limited
        current = asyncio.current_task()
        # A claim lists its tasks in due order: the batch's first is its most overdue.
        out = _Out(name, probe, platform.name, tasks[0].planned)
        if current is not None:
            # Before any wait, so a drain's end can call it off wherever it waits; a probe's
            # batches behind it see it out.
            self._out[current] = out
        try:
            limiter = self._limiters.get(platform.name)
            if limiter is not None:
                before = limiter.waited
                await limiter.wait()
                self._count_wait(platform, limiter.waited - before)
            ids = self._still_held(tasks)
            if not ids:
                return []
            self.report.requests += 1
            self.metrics.ids_per_request.labels(platform.name).observe(len(ids))
            self.metrics.activity.count(Series.POLLS, len(ids))
            asked = self.clock.now()
            self._note_lag(platform, asked.timestamp() - out.planned)
            sent = out.sent = time.monotonic()
            seen = await platform.fetch_seen(self.client, ids)
        except (UpstreamError, httpx.HTTPError) as exc:
            # A request called off in the very step its timeout fired ends in that timeout,
            # which took the cancel for its own: it is called off all the same, below.
            if current not in self._called_off:
                return self._failed(platform, tasks, exc)
        except asyncio.CancelledError:
            if not self._called_off_alone(current):
                raise
        else:
            self._answered(platform, time.monotonic() - sent)
            capped = self._capped(platform, len(ids), len(seen))
            return Answer(platform, seen, self.clock.now(), asked, capped)
        finally:
            if current is not None:
                self._request_over(out, current)
        return self._due_again(tasks)

    def _note_lag(self, platform: Platform, late: float) -> None:
        """A batch went out ``late`` seconds after its most overdue task was due.

        Measured as the request goes out, not only at the claim: a batch claimed on time may
        wait long in its lane for the rate limit or a free slot, and a task that waited there
        is planned again from its answer, so it is never claimed late (the wait would show
        nowhere but in its gaps at the relay).
        """
        report = self.report
        if late > report.lag:
            report.lag, report.lagging = late, platform.name

    def _still_held(self, tasks: Sequence[DueTask]) -> list[str]:
        """The ids of ``tasks`` their claim still holds, to ask about; the others count as
        lapsed (another claim may hold them now, and they fall due again anyway)."""
        if self.clock.now().timestamp() >= min(t.lease_until or math.inf for t in tasks):
            # The claim lapsed while the batch waited (a stalled loop).
            held: Sequence[DueTask] = ()
        else:
            # A batch is one claim's. One that lapsed and was renewed since lost the tasks
            # another claim took meanwhile (renew_claim says which).
            claim = tasks[0].claim
            lost = claim.lost if claim is not None else ()
            held = [t for t in tasks if t.pk not in lost] if lost else tasks
        self.report.lapsed += len(tasks) - len(held)
        return [t.task_id for t in held]

    def _held_back(self, platform: Platform, tasks: Sequence[DueTask]) -> list[TaskUpdate] | None:
        """The batch's tasks planned for later, if its relay is paused or its probe is out
        (None: ask it now).

        Not waited out in the lane: a batch waiting there counts against the claims of every
        upstream, so one relay's pause would stop the polls of all. Asked again when the pause
        is over, or (a relay that stopped answering, or asked for a pause, gets one request at
        a time) when the one out has had its time (its timeout; RELAY_PAUSE for a relay that
        asked for a pause): planned that far, and the look-ahead beyond, as a claim takes
        tasks that much early (else every drain in the pause's last moments would claim them
        again, to find the relay paused). A pause the relay asked for counts as the
        platform's rate wait; one for a relay that is down does not (the lag warning would
        name rate_limit, which cannot help).
        """
        upstream = platform.upstream
        paused = self._paused.get(upstream.name, 0.0) - time.monotonic()
        if paused <= 0 and not self._probe_out(upstream.name):
            return None
        if paused > 0:
            wait = paused
        elif upstream.name in self._failures:
            wait = upstream.timeout  # a relay that stopped answering may hold its probe that long
        else:
            # The probe of a relay that asked for a pause: answered at once, as a rule.
            wait = min(upstream.timeout, RELAY_PAUSE)
        if upstream.name not in self._failures:
            self._count_wait(platform, wait)
        now = self.clock.now()
        return [self.planner.later(t, now, wait + self.ahead()) for t in tasks]

    def _answered(self, platform: Platform, took: float) -> None:
        """Note an answer that took ``took`` seconds: the relay answers (again)."""
        name = platform.upstream.name
        usual = self._answer_times.get(name)
        self._answer_times[name] = (
            took if usual is None else usual + ANSWER_TIME_WEIGHT * (took - usual)
        )
        self.report_relay(platform.upstream, None)
        self._failures.pop(name, None)
        self._limited.discard(name)
        self.metrics.upstream_requests.labels(platform.name, "200").inc()

    def _capped(self, platform: Platform, asked: int, answered: int) -> bool:
        """Whether the relay cut its answer at a cap (ANSWER_CAPS); if so, ``platform`` asks
        no more ids than that from now on (until a reload sets its batch size again), and
        the log says which setting to change."""
        if platform.per_id or answered >= asked or answered not in ANSWER_CAPS:
            return False
        if platform.batch_size > answered:
            platform.batch_size = answered
            log.warning(
                "relay_answer_capped",
                platform=platform.name,
                asked=asked,
                answered=answered,
                batch_size=answered,
                hint=f"the relay answers at most {answered} ids per request: asking that many"
                f" at a time from now on; set [platforms.{platform.name}].batch_size or"
                f" [poll].batch_size to {answered}",
            )
        return True

    def _due_again(self, tasks: Sequence[DueTask]) -> list[TaskUpdate]:
        """``tasks`` unasked and due again at once, in their place in due order."""
        now = self.clock.now()
        epoch = now.timestamp()
        return [self.planner.later(t, now, min(t.planned - epoch, 0.0)) for t in tasks]

    def _called_off_alone(self, current: asyncio.Task[Any] | None) -> bool:
        """Whether the request of ``current`` was cancelled by `call_off_requests` and nothing
        else (not by a shutdown too); if so, its cancel is taken back."""
        if current is None or current not in self._called_off:
            return False
        self._called_off.discard(current)
        return not current.uncancel()

    def _probe_out(self, upstream: str) -> bool:
        """Whether the one request to ``upstream``, a relay that stopped answering, is out."""
        return any(out.probe and out.upstream == upstream for out in self._out.values())

    def _request_over(self, out: _Out, current: asyncio.Task[Any]) -> None:
        if self._out.get(current) is out:
            del self._out[current]
        if current in self._called_off:
            # Called off, and ended otherwise (a timeout that took the cancel for its own, an
            # answer in the same step): the task's count of cancels is set right here.
            self._called_off.discard(current)
            current.uncancel()

    def _stopping(self, stopped: asyncio.Future[Any]) -> None:
        if not stopped.cancelled():  # else the drain ended first
            # A stop promises that the poll requests sent finish, their answers recorded,
            # those given a grace by the drain's end before it too.
            self._cancel_call_offs()
            self.call_off_requests(sent_too=False)

    def _cancel_call_offs(self) -> None:
        for handle in self._call_offs:
            handle.cancel()
        self._call_offs.clear()

    def call_off_requests(self, *, sent_too: bool = True) -> None:
        """Send no other request this drain, and call off those under way that may keep its
        end waiting: their tasks are due again at once, unasked, and nothing counts against
        the relay (no failure, no pause).

        Called off now: a request still waiting for its rate limit, and a relay's probe (the
        one request out to a relay that stopped answering, which may take a whole timeout).
        A request sent is given END_GRACE since it was sent, or END_GRACE_ANSWERS times its
        relay's usual answer time if that is longer, and called off then if still out: a relay
        gone silent holds the next drain about a second, not its whole timeout, and a slow one
        that answers is waited for. Without ``sent_too`` (a stop) the requests sent are left
        to finish.
        """
        self._asking_off = True
        now = time.monotonic()
        for current, out in list(self._out.items()):
            # A probe of a relay that asked for a pause (not one that stopped answering) is a
            # request like any other once sent: the relay has counted it already.
            silent = out.probe and out.upstream in self._failures
            if silent or out.sent is None:
                self._call_off(current, out)
                continue
            if not sent_too:
                continue
            usual = self._answer_times.get(out.upstream, 0.0)
            due = out.sent + max(END_GRACE, END_GRACE_ANSWERS * usual)
            if due <= now:
                self._call_off(current, out)
            else:
                loop = asyncio.get_running_loop()
                self._call_offs.append(loop.call_later(due - now, self._call_off, current, out))

    def _call_off(self, current: asyncio.Task[Any], out: _Out) -> None:
        if self._out.get(current) is not out or current in self._called_off:
            return  # answered meanwhile (the lane may be on another request)
        self._called_off.add(current)
        current.cancel()

    def _failed(
        self, platform: Platform, tasks: Sequence[DueTask], exc: UpstreamError | httpx.HTTPError
    ) -> list[TaskUpdate]:
        """Note a request that gave no usable answer; its tasks are asked again later."""
        upstream = platform.upstream
        name = upstream.name
        self.report_relay(upstream, exc)
        self.report.errors += 1
        code = _error_code(exc)
        self.metrics.upstream_requests.labels(platform.name, code).inc()
        self.metrics.upstream_errors.labels(platform.name, code).inc()
        # Shown on the dashboard, which has no log redactor: whatever the relay put in its
        # error, the key never goes further.
        error = sanitize.redact(_describe(exc), (upstream.api_key,))
        self.metrics.activity.relay_error(platform.name, code, error)
        if isinstance(exc, httpx.TransportError):
            failures = self._failures.get(name, 0)
            # Requests sent before a pause began fail within it: one round of them is one
            # failure, not one per request.
            if not failures or time.monotonic() >= self._paused.get(name, 0.0):
                failures += 1
            self._failures[name] = failures
        else:  # it answered, if not usefully: not down
            failures = 1
            self._failures.pop(name, None)
        pause = relay_pause(exc, self.clock.now(), failures)
        if pause is not None:
            until = time.monotonic() + pause
            self._paused[name] = max(self._paused.get(name, 0.0), until)
        if isinstance(exc, UpstreamError) and pause is not None:
            self._limited.add(name)
        elif not isinstance(exc, httpx.TransportError):
            self._limited.discard(name)
        log.warning(
            "upstream_error",
            platform=platform.name,
            ids=len(tasks),
            error=error,
            **({} if pause is None else {"relay_paused_seconds": round(pause, 3)}),
        )
        now = self.clock.now()
        return [self.planner.retry(t, now) for t in tasks]

    def _count_wait(self, platform: Platform, seconds: float) -> None:
        """Seconds a request of ``platform`` waited for the relay's limits (ours or its own),
        for the lag warning to name the rate limit."""
        waits = self.report.rate_waits
        waits[platform.name] = waits.get(platform.name, 0.0) + seconds

    async def decide(self, tasks: Sequence[DueTask], answer: Answer) -> Decided:
        """Each task's decision from the relay's ``answer``, as of when it came (a task a
        capped answer left out is due again, not missing)."""
        decided = Decided()
        if answer.capped:
            left_out = [t for t in tasks if t.task_id not in answer.seen]
            decided.updates += self._due_again(left_out)
            tasks = [t for t in tasks if t.task_id in answer.seen]
        for start in range(0, len(tasks), DECIDE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = tasks[start : start + DECIDE_CHUNK]
            part = self.planner.decide(answer.platform, chunk, answer.seen, answer.at, answer.asked)
            decided.updates += part.updates
            decided.replans += part.replans
        return decided

    def count_recorded(self, landed: Sequence[TaskUpdate]) -> None:
        """Count what the ``landed`` updates (changes committed) moved; tell the deliverer
        of new events."""
        report = self.report
        fired = 0
        for update in landed:
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
        if fired:
            self.on_events()


def relay_pause(exc: Exception, now: datetime, failures: int = 1) -> float | None:
    """Seconds the relay is left alone after ``exc``, at most MAX_RELAY_PAUSE; None when it
    answered in a way that asks for no pause.

    A 429, or a 503 with a Retry-After, pauses it as long as it asked. A relay that did not
    answer at all (a timeout, a refused or reset connection), ``failures`` times in a row, is
    paused RELAY_PAUSE, twice as long for each failure more: while it is down it gets one
    round of requests now and then, not every batch waiting out its timeout.
    """
    if isinstance(exc, httpx.TransportError):
        return min(RELAY_PAUSE * 2.0 ** min(failures - 1, 8), MAX_RELAY_PAUSE)
    if not isinstance(exc, UpstreamError):
        return None
    asked = parse_retry_after(exc.retry_after, now)
    if exc.status_code == 429:  # Too Many Requests
        pause = RELAY_PAUSE if asked is None else asked
    elif exc.status_code == 503 and asked is not None:  # Service Unavailable
        pause = asked
    else:
        return None
    return min(pause, MAX_RELAY_PAUSE) if pause > 0 else None


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
