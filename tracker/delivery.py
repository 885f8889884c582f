"""The delivery loop: claim due outbox rows, sign, POST, and let the retry policy decide."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib.util
import random
import sys
import time
import urllib.parse
import weakref
from collections.abc import AsyncGenerator, Callable, Mapping
from datetime import datetime, timedelta
from typing import cast

import httpx
import structlog

from tracker import retry, signing, ssrf
from tracker.activity import Series
from tracker.clock import Clock
from tracker.config import EndpointSettings, PreviousSecret, WebhookSettings
from tracker.metrics import Metrics
from tracker.poller import RateLimiter
from tracker.retry import DeliveryState
from tracker.store import SqlStore
from tracker.store.records import AttemptResult, DeliveryJob

log = structlog.get_logger("tracker.delivery")

#: at most this much of any answer is read; the rest is dropped unread
MAX_RESPONSE_BYTES = 64 * 1024
#: this much of it is kept in the delivery log
EXCERPT_BYTES = 2048
#: deliveries claimed per store round trip
CLAIM_BATCH = 512
#: claimed deliveries run() holds at most, whatever else the limits below allow
MAX_HELD = 8 * CLAIM_BATCH
#: what run() holds before it has seen its own pace, in deliveries
FIRST_HELD = 4 * CLAIM_BATCH
#: run() claims no more once what it holds would take this share of the wait budget to send
HELD_SHARE_OF_BUDGET = 0.25
#: finished attempts are written once this many wait, or the oldest has waited WRITE_LINGER
WRITE_BATCH = 512
#: seconds; each write is a transaction, so a few rows at a time would cost more than the POSTs
WRITE_LINGER = 0.5
#: seconds the event loop waits for a store round before awaiting it (see _store_round)
STORE_BLOCK = 0.025
#: a claimed delivery waits at most this long (or the timeout, if longer) for its slots
MIN_WAIT_BUDGET = 5.0
#: seconds a claim outlives the wait and the attempt, for the write that records it
LEASE_MARGIN = 30.0
#: queued deliveries per slot that count against run()'s claims while a receiver has not
#: answered yet, so a first encounter with one that hangs does not stall the others
UNKNOWN_QUEUE_PER_SLOT = 2
#: how much longer than the wait budget a receiver's queue may look before it is cut short
ALLOWANCE_MARGIN = 4
#: answer times remembered per receiver
RECENT_ANSWERS = 32
#: finished attempts between two looks of run() at whether to claim more
WAKE_EVERY = 32
#: receivers whose load is tracked before idle ones are forgotten
MAX_TRACKED_HOSTS = 4096
#: the tracker_deliveries outcome label of an attempt that left its delivery in each state: a
#: failed attempt with retries left reads "retry" to an operator, though the delivery is pending
OUTCOME_LABELS: Mapping[DeliveryState, str] = {
    DeliveryState.DELIVERED: "delivered",
    DeliveryState.PENDING: "retry",
    DeliveryState.DEAD: "dead",
}


def avoid_failing_sniffio_import() -> None:
    """Make httpcore's per-request ``import sniffio`` fail fast when sniffio is not installed.

    anyio >= 4.11 stopped depending on sniffio and httpcore 1.0.9 imports it inside every lock
    and semaphore set-up; a failed import is not cached, so each one walks sys.path again
    (encode/httpcore#1103). That cost about 0.25 ms per request, half of a loopback delivery.
    A None entry in sys.modules makes the import raise at once; httpcore then assumes asyncio,
    which is what it would have concluded anyway.
    """
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


def _current_secrets(secret: str, previous: tuple[PreviousSecret, ...], now: datetime) -> list[str]:
    # While a rotated-out secret is unexpired, receivers that still hold it can verify too.
    return [secret] + [p.secret.get_secret_value() for p in previous if p.expires_at > now]


@functools.lru_cache(maxsize=64)
def _signing_key(secret: str) -> bytes:
    # Decoded once, not on every attempt.
    return signing.decode_secret(secret)


@functools.lru_cache(maxsize=MAX_TRACKED_HOSTS)
def _host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).netloc.lower()


def _describe(exc: Exception) -> str:
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    # aiter_raw is an async generator (typed as a plain iterator); close it, do not leave it
    # to the garbage collector.
    raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) >= MAX_RESPONSE_BYTES:
                # Leaving the stream unfinished closes the connection instead of draining it.
                break
    return bytes(body[:MAX_RESPONSE_BYTES])


@dataclasses.dataclass(slots=True)
class _Load:
    """Claimed-but-unfinished deliveries of one host or endpoint, and how fast it answers."""

    held: int = 0
    recent: collections.deque[float] = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=RECENT_ANSWERS)
    )

    def observe(self, seconds: float) -> None:
        """Remember one answer time."""
        self.recent.append(seconds)

    @property
    def latency(self) -> float | None:
        """Its quickest recent answer, seconds (None before the first one).

        The quickest, because a time measured while the loop was busy elsewhere (a store
        round, a burst of answers) looks slower than the receiver is, and what this is for is
        telling receivers that hang from those that do not.
        """
        return min(self.recent) if self.recent else None


@dataclasses.dataclass(slots=True)
class _Ticket:
    """A claimed delivery admitted to this pass, with the loads it counts against."""

    job: DeliveryJob
    host: str
    host_load: _Load
    endpoint_load: _Load | None
    deadline: float  #: loop time by which it must have its slots, or be left for later


class Deliverer:
    """Sends due webhooks; one instance per daemon, running one pass at a time.

    A pass claims due outbox rows, queues each on its host's lane (at most ``per_host``
    workers per host, ``concurrency`` requests overall, endpoint limits on top), and writes
    the attempts back in batches. Retries, ordering and leases live in the store.
    """

    def __init__(
        self,
        *,
        store: SqlStore,
        client: httpx.AsyncClient,
        guarded_client: httpx.AsyncClient,
        clock: Clock,
        settings: WebhookSettings,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
        overload_floor: float = 60.0,
    ) -> None:
        avoid_failing_sniffio_import()
        self.store = store
        self.client = client
        self.guarded_client = guarded_client
        self.clock = clock
        self.metrics = metrics
        self.rand = rand
        self.overload_floor = overload_floor
        self._outcomes = {
            state: metrics.deliveries.labels(label) for state, label in OUTCOME_LABELS.items()
        }
        self._hosts: dict[str, _Load] = {}
        self._endpoints: dict[str, _Load] = {}
        #: seconds the loop has spent waiting on store rounds (see _store_round)
        self._blocked = 0.0
        # One store round at a time, on a thread of our own: a claim and a write at once would
        # only queue on SQLite's lock, whose busy handler sleeps in steps of up to 100 ms.
        self._store_thread = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tracker-delivery-store"
        )
        weakref.finalize(self, self._store_thread.shutdown, wait=False)
        self.configure(settings)

    def configure(self, settings: WebhookSettings) -> None:
        """Take new [webhooks] settings (a reload): secrets, endpoints, schedule, limits."""
        self.settings = settings
        self.policy = retry.RetryPolicy(
            delays=tuple(settings.retry_delays), overload_floor=self.overload_floor
        )
        # Deliveries in flight keep the semaphores they took; new ones use these.
        self._in_flight = asyncio.Semaphore(settings.concurrency)
        self._endpoint_limits: Mapping[str, asyncio.Semaphore] = {
            name: asyncio.Semaphore(e.max_in_flight)
            for name, e in settings.endpoints.items()
            if e.max_in_flight
        }
        self._endpoint_rates: Mapping[str, RateLimiter] = {
            name: RateLimiter(e.rate_limit)
            for name, e in settings.endpoints.items()
            if e.rate_limit
        }
        self._wait_budget = max(settings.timeout, MIN_WAIT_BUDGET)
        # A claim must outlast the wait for a slot, the attempt, and the write after it.
        self._lease = self._wait_budget + settings.timeout + LEASE_MARGIN

    def secrets_for(self, endpoint: str | None) -> list[str]:
        """The secrets that sign a delivery to ``endpoint`` right now (current first)."""
        now = self.clock.now()
        named: EndpointSettings | None = self.settings.endpoints.get(endpoint) if endpoint else None
        if named is not None:
            return _current_secrets(named.secret.get_secret_value(), named.previous_secrets, now)
        return _current_secrets(
            self.settings.secret.get_secret_value(), self.settings.previous_secrets, now
        )

    async def run(self, *, until: asyncio.Event | None = None) -> int:
        """Deliver until nothing is due (or ``until`` is set); returns the attempts made.

        Claims keep coming while attempts are in flight, and results are written as they
        arrive, so one slow receiver holds up neither the others nor the next claim.
        """
        return await _Pass(self, refill=True, until=until).run()

    async def run_once(self) -> int:
        """Claim one batch of due deliveries, attempt each, record the results as they come."""
        return await _Pass(self, refill=False, until=None).run()

    # -- admission: which claimed deliveries this pass takes on ------------------------------

    def _admit(self, job: DeliveryJob) -> _Ticket | None:
        """Take ``job`` on, or None when its receiver is known to be too slow to reach it.

        A delivery left out keeps its claim until the lease lapses and is taken by a later
        pass: a receiver that hangs thus holds a few slots of its own, never the whole pass.
        """
        host = _host_of(job.url)
        host_load = self._hosts.get(host)
        if host_load is None:
            if len(self._hosts) >= MAX_TRACKED_HOSTS:
                self._hosts = {h: load for h, load in self._hosts.items() if load.held}
            host_load = self._hosts[host] = _Load()
        latency = host_load.latency
        if latency is not None and host_load.held >= self._allowance(
            self.settings.per_host, latency
        ):
            return None
        endpoint_load = None
        named = self.settings.endpoints.get(job.endpoint) if job.endpoint else None
        if named is not None and (named.max_in_flight or named.rate_limit):
            endpoint_load = self._endpoints.setdefault(job.endpoint or "", _Load())
            if (
                named.max_in_flight
                and latency is not None
                and endpoint_load.held >= self._allowance(named.max_in_flight, latency)
            ):
                return None
            if named.rate_limit and endpoint_load.held >= named.rate_limit * self._wait_budget:
                return None
            endpoint_load.held += 1
        host_load.held += 1
        return _Ticket(
            job=job,
            host=host,
            host_load=host_load,
            endpoint_load=endpoint_load,
            deadline=asyncio.get_running_loop().time() + self._wait_budget,
        )

    def _allowance(self, slots: int, latency: float | None) -> int:
        """How many deliveries a receiver with ``slots`` and this answer time may hold: those
        it can start within the wait budget, with room for error. One that never answered
        gets a few.
        """
        if latency is None:
            return slots * UNKNOWN_QUEUE_PER_SLOT
        return slots + int(slots * ALLOWANCE_MARGIN * self._wait_budget / max(latency, 1e-3))

    def _release(self, ticket: _Ticket) -> None:
        ticket.host_load.held -= 1
        if ticket.endpoint_load is not None:
            ticket.endpoint_load.held -= 1

    # -- one attempt ---------------------------------------------------------------------------

    async def _attempt(self, ticket: _Ticket) -> AttemptResult | None:
        """Take the endpoint and global slots, then send; None when they did not come in time.

        The host's own limit is its lane's worker count (see _Pass), so no slot is taken here.
        """
        job = ticket.job
        if asyncio.get_running_loop().time() >= ticket.deadline:
            return None  # its claim may lapse mid-attempt: a later pass takes it
        endpoint = job.endpoint or ""
        taken: list[asyncio.Semaphore] = []
        limit = self._endpoint_limits.get(endpoint)
        rate = self._endpoint_rates.get(endpoint)
        try:
            if limit is None and rate is None and not self._in_flight.locked():
                await self._in_flight.acquire()  # free: no wait, so no deadline to watch
                taken.append(self._in_flight)
            else:
                try:
                    # Slots in one fixed order, so waits cannot deadlock; the global one last,
                    # so a busy endpoint never sits on one.
                    async with asyncio.timeout_at(ticket.deadline):
                        if limit is not None:
                            await limit.acquire()
                            taken.append(limit)
                        if rate is not None:
                            await rate.wait()
                        await self._in_flight.acquire()
                        taken.append(self._in_flight)
                except TimeoutError:
                    return None
            blocked = self._blocked
            result = await self._send(job)
        except Exception as exc:
            # One malformed delivery must not stop the rest: it fails, and in time dies.
            log.exception("webhook_attempt_crashed", webhook_id=job.webhook_id, url=job.url)
            return self._decide(
                job, self.clock.now(), time.perf_counter(), retry.Outcome(error=_describe(exc)), b""
            )
        else:
            # The time the loop sat in a store round is not the receiver's.
            ticket.host_load.observe(max(0.0, result.latency_ms / 1000 - self._blocked + blocked))
            return result
        finally:
            for semaphore in reversed(taken):
                semaphore.release()

    async def _send(self, job: DeliveryJob) -> AttemptResult:
        now = self.clock.now()
        started = time.perf_counter()
        try:
            keys = [_signing_key(secret) for secret in self.secrets_for(job.endpoint)]
            headers = signing.webhook_headers(
                keys, job.webhook_id, int(now.timestamp()), job.payload
            )
        except ValueError as exc:
            # A secret that is not whsec_<base64>: retried, so fixing the config saves it.
            return self._decide(job, now, started, retry.Outcome(error=f"cannot sign: {exc}"), b"")
        client = self.guarded_client if job.guarded else self.client
        timeout = self.settings.timeout
        excerpt = b""
        outcome: retry.Outcome
        try:
            request = client.build_request(
                "POST", job.url, content=job.payload, headers=headers, timeout=timeout
            )
            # httpx's timeouts are per read; this one bounds the whole exchange.
            async with asyncio.timeout(timeout):
                response = await client.send(request, stream=True, follow_redirects=False)
                try:
                    excerpt = await _read_capped(response)
                finally:
                    await response.aclose()
            outcome = retry.Outcome(
                status_code=response.status_code,
                retry_after=response.headers.get("retry-after"),
            )
        except (TimeoutError, httpx.TimeoutException):
            outcome = retry.Outcome(error="timeout", timed_out=True)
        except httpx.HTTPError as exc:
            if ssrf.is_blocked_error(exc):
                return self._result(
                    job, now, started, None, str(exc), b"", DeliveryState.DEAD, None
                )
            outcome = retry.Outcome(error=_describe(exc))
        except httpx.InvalidURL as exc:
            return self._result(
                job, now, started, None, f"invalid URL: {exc}", b"", DeliveryState.DEAD, None
            )
        return self._decide(job, now, started, outcome, excerpt)

    def _decide(
        self,
        job: DeliveryJob,
        now: datetime,
        started: float,
        outcome: retry.Outcome,
        excerpt: bytes,
    ) -> AttemptResult:
        decision = self.policy.decide(outcome, job.attempts + 1, now=now, rand=self.rand())
        error = None if decision.state == DeliveryState.DELIVERED else decision.reason
        if decision.state == DeliveryState.PENDING:
            at = (now + timedelta(seconds=decision.delay or 0.0)).timestamp()
            return self._result(
                job, now, started, outcome.status_code, error, excerpt, DeliveryState.PENDING, at
            )
        return self._result(
            job, now, started, outcome.status_code, error, excerpt, decision.state, None
        )

    def _result(  # noqa: PLR0917 - one row of the attempt log, field by field
        self,
        job: DeliveryJob,
        now: datetime,
        started: float,
        status_code: int | None,
        error: str | None,
        excerpt: bytes,
        state: DeliveryState,
        next_attempt_at: float | None,
    ) -> AttemptResult:
        latency = time.perf_counter() - started
        return AttemptResult(
            job=job,
            at=now,
            status_code=status_code,
            error=error,
            latency_ms=round(latency * 1000, 3),
            response_excerpt=excerpt[:EXCERPT_BYTES].decode("utf-8", "replace"),
            state=state,
            next_attempt_at=next_attempt_at,
        )

    # -- the store and the log ---------------------------------------------------------------

    async def _store_round(self, results: list[AttemptResult], claim: int) -> list[DeliveryJob]:
        """Record ``results``, then claim up to ``claim`` due deliveries, on the store thread.

        The loop first waits for the round without yielding, for up to STORE_BLOCK: a round
        is Python work (SQLAlchemy), and run while the loop runs too, both threads fight for
        the GIL, whose hand-overs cost more than the round itself (on the benchmark, about
        0.7 ms per delivery, a third of its cost). A round that takes longer (a lock held by
        the poller, a remote PostgreSQL) is then awaited like any other, so the loop never
        stalls for more than STORE_BLOCK.
        """
        future = self._store_thread.submit(self._store_round_sync, results, claim)
        blocked_from = time.perf_counter()
        with contextlib.suppress(concurrent.futures.TimeoutError):
            future.result(timeout=STORE_BLOCK)
        self._blocked += time.perf_counter() - blocked_from
        jobs = await asyncio.wrap_future(future)
        for result in results:
            self._log(result)
        return jobs

    def _store_round_sync(self, results: list[AttemptResult], claim: int) -> list[DeliveryJob]:
        if results:
            self.store.finish_attempts(results)
        if not claim:
            return []
        return self.store.claim_deliveries(self.clock.now(), claim, lease=self._lease)

    def _log(self, result: AttemptResult) -> None:
        job = result.job
        self._outcomes[result.state].inc()
        self.metrics.activity.count(Series.WEBHOOKS)
        self.metrics.delivery_latency.observe(result.latency_ms / 1000)
        fields = {
            "webhook_id": job.webhook_id,
            "event_type": job.event_type,
            "platform": job.platform,
            "task_id": job.task_id,
            "url": job.url,
            "attempt": job.attempts + 1,
            "status_code": result.status_code,
            "latency_ms": result.latency_ms,
        }
        if result.state == DeliveryState.DELIVERED:
            # One line per delivery is part of the contract (issue 2), so info, not debug.
            log.info("webhook_delivered", **fields)
        elif result.state == DeliveryState.DEAD:
            log.error("webhook_dead", error=result.error, **fields)
        else:
            retry_at = result.next_attempt_at
            log.warning(
                "webhook_retry",
                error=result.error,
                retry_in=None if retry_at is None else round(retry_at - result.at.timestamp(), 3),
                **fields,
            )


@dataclasses.dataclass(slots=True)
class _Lane:
    """One host's admitted deliveries, sent in order by at most ``per_host`` workers."""

    load: _Load
    queue: collections.deque[_Ticket] = dataclasses.field(default_factory=collections.deque)
    workers: int = 0


class _Pass:
    """One delivery pass: claims, one lane of workers per host, and results to write.

    Each worker sends one delivery after another on its own, as a client loop would: handing
    a freed slot to a waiting task instead makes several requests reach httpcore's pool in
    the same loop turn, where they race for one idle connection and retry (twice per request
    on loopback, half the CPU again). The store is used by one round at a time (write what
    finished, then claim); whatever finishes meanwhile goes into the next round.
    """

    def __init__(self, deliverer: Deliverer, *, refill: bool, until: asyncio.Event | None) -> None:
        self.deliverer = deliverer
        self.refill = refill
        self.until = until
        self.lanes: dict[str, _Lane] = {}
        self.workers: set[asyncio.Task[None]] = set()
        self.held = 0  #: admitted deliveries not finished yet
        self.finished: list[AttemptResult] = []
        self.first_finished_at = 0.0
        self.store_round: asyncio.Task[list[DeliveryJob]] | None = None
        self.wake = asyncio.Event()
        self.started_at = time.monotonic()
        self.attempts = 0
        self.deferred = 0  #: claimed but not taken on: the receiver already had enough queued
        self.expired = 0  #: taken on but not started within the wait budget

    def _claim_size(self, may_claim: bool) -> int:
        if not may_claim or (self.until is not None and self.until.is_set()):
            return 0
        deliverer = self.deliverer
        settings = deliverer.settings
        if self.held + CLAIM_BATCH > MAX_HELD or len(self.workers) >= 2 * settings.concurrency:
            return 0
        # What is held should be sent well within the wait budget at the pace kept so far.
        cap = FIRST_HELD
        elapsed = time.monotonic() - self.started_at
        if self.attempts and elapsed > 0:
            paced = self.attempts / elapsed * deliverer._wait_budget * HELD_SHARE_OF_BUDGET
            cap = max(CLAIM_BATCH, int(paced))
        # A receiver's queue beyond what it can start in time does not count: it will be left
        # for later anyway, and the next claim may find receivers that are idle.
        counted = sum(
            min(lane.load.held, deliverer._allowance(settings.per_host, lane.load.latency))
            for lane in self.lanes.values()
        )
        return CLAIM_BATCH if counted + CLAIM_BATCH <= cap else 0

    def _write_due(self) -> float | None:
        """0 when the finished attempts should be written now, else seconds until they should."""
        if not self.finished:
            return None
        if len(self.finished) >= WRITE_BATCH or not self.workers:
            return 0.0
        return max(0.0, self.first_finished_at + WRITE_LINGER - time.monotonic())

    async def run(self) -> int:
        may_claim = True
        try:
            while True:
                claim = self._claim_size(may_claim)
                write_in = self._write_due()
                if claim or write_in == 0.0:
                    batch, self.finished = self.finished, []
                    # Shielded: a cancel must not leave the store round running unawaited.
                    self.store_round = asyncio.create_task(
                        self.deliverer._store_round(batch, claim)
                    )
                    try:
                        jobs = await asyncio.shield(self.store_round)
                    finally:
                        if self.store_round.done():
                            self.store_round = None
                    if claim:
                        may_claim = self.refill and len(jobs) == claim
                    elif batch:
                        # A recorded result may unblock the next event of the same task.
                        may_claim = self.refill
                    self._start(jobs)
                    continue
                if not self.workers:
                    return self.attempts
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(write_in):
                        await self.wake.wait()
                self.wake.clear()
        finally:
            await self._shut_down()
            if self.deferred or self.expired:
                # They keep their claim until the lease lapses; a later pass takes them then.
                log.info(
                    "webhooks_left_for_later",
                    count=self.deferred + self.expired,
                    receiver_busy=self.deferred,
                    waited_too_long=self.expired,
                )

    def _start(self, jobs: list[DeliveryJob]) -> None:
        per_host = self.deliverer.settings.per_host
        for job in jobs:
            ticket = self.deliverer._admit(job)
            if ticket is None:
                self.deferred += 1
                continue
            self.held += 1
            lane = self.lanes.get(ticket.host)
            if lane is None:
                lane = self.lanes[ticket.host] = _Lane(ticket.host_load)
            lane.queue.append(ticket)
            if lane.workers < per_host:
                lane.workers += 1
                worker = asyncio.create_task(self._work(lane))
                self.workers.add(worker)
                worker.add_done_callback(self._worker_done)

    async def _work(self, lane: _Lane) -> None:
        try:
            while lane.queue:
                ticket = lane.queue.popleft()
                try:
                    result = await self.deliverer._attempt(ticket)
                finally:
                    self.held -= 1
                    self.deliverer._release(ticket)
                if result is None:
                    self.expired += 1
                    continue
                self.attempts += 1
                if not self.finished:
                    self.first_finished_at = time.monotonic()
                    self.wake.set()  # starts the linger clock
                self.finished.append(result)
                # The coordinator need not look at every result: only when a write is due, or
                # now and then, as claims may fit again.
                if len(self.finished) >= WRITE_BATCH or self.attempts % WAKE_EVERY == 0:
                    self.wake.set()
        finally:
            lane.workers -= 1

    def _worker_done(self, worker: asyncio.Task[None]) -> None:
        self.workers.discard(worker)
        self.wake.set()

    async def _shut_down(self) -> None:
        # Normally nothing is left; after an error or a cancel, what finished is still written.
        for worker in self.workers:
            worker.cancel()
        if self.workers:
            await asyncio.gather(*self.workers, return_exceptions=True)
        for lane in self.lanes.values():
            while lane.queue:
                self.held -= 1
                self.deliverer._release(lane.queue.popleft())
        if self.store_round is not None:
            try:
                await self.store_round
            except Exception:
                log.exception("delivery_store_round_failed")
                return
        if self.finished:
            batch, self.finished = self.finished, []
            try:
                await self.deliverer._store_round(batch, 0)
            except Exception:
                # The deliveries are retried when their lease lapses.
                log.exception("delivery_results_unrecorded", count=len(batch))
