"""Every limit on outgoing requests, for the poller and the deliverer alike.

Pacing (RateLimiter: a platform's or an endpoint's `rate_limit`) and the deliverer's admission
(Admission: load per host and endpoint, `per_host`, `max_in_flight`, `[webhooks].concurrency`);
the lanes both run on (one per upstream, one per receiver's host) are tracker/pipeline.py's.
A receiver that hangs must not hold the whole delivery loop: each host and endpoint is allowed
only what it can start within the wait budget at the pace it answers, and a delivery that does
not get its slots within that budget is left for a later pass.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import time
import urllib.parse
from collections.abc import Mapping

from tracker.config import WebhookSettings
from tracker.store.records import DeliveryJob

#: a claimed delivery waits at most this long (or the timeout, if longer) for its slots
MIN_WAIT_BUDGET = 5.0
#: queued deliveries per slot that count against a pass's claims while a receiver has not
#: answered yet, so a first encounter with one that hangs does not stall the others
UNKNOWN_QUEUE_PER_SLOT = 2
#: how much longer than the wait budget a receiver's queue may look before it is cut short
ALLOWANCE_MARGIN = 4
#: answer times remembered per receiver
RECENT_ANSWERS = 32
#: receivers whose load is tracked before idle ones are forgotten
MAX_TRACKED_HOSTS = 4096


@functools.lru_cache(maxsize=MAX_TRACKED_HOSTS)
def host_of(url: str) -> str:
    """The host (and port) a delivery's URL connects to, the unit of the per-host limit."""
    return urllib.parse.urlsplit(url).netloc.lower()


@dataclasses.dataclass(slots=True)
class Load:
    """Taken-on but unfinished deliveries of one host or endpoint, and how fast it answers."""

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

        The quickest, because a time measured while the loop was busy elsewhere (a burst of
        answers, a store round on another thread) looks slower than the receiver is, and
        what this is for is telling receivers that hang from those that do not.
        """
        return min(self.recent) if self.recent else None


@dataclasses.dataclass(slots=True)
class Ticket:
    """A claimed delivery that was taken on, with the loads it counts against."""

    job: DeliveryJob
    host: str
    host_load: Load
    endpoint_load: Load | None
    deadline: float  #: loop time by which it must have its slots, or be left for later


class Admission:
    """The limits every delivery goes through: load per host and endpoint, and slots.

    ``admit`` decides whether a claimed delivery is taken on at all; ``take_slots`` waits
    (until the ticket's deadline) for the endpoint's and the global in-flight slots and the
    endpoint's rate. The per-host limit is not a slot: a pass runs at most ``per_host``
    workers per host (see passes.py). Loads outlive passes, so what one pass learned about a
    receiver's pace the next one uses.
    """

    def __init__(self, settings: WebhookSettings) -> None:
        self._hosts: dict[str, Load] = {}
        self._endpoints: dict[str, Load] = {}
        self.configure(settings)

    def configure(self, settings: WebhookSettings) -> None:
        """Take new limits; deliveries in flight keep the slots they took."""
        self.settings = settings
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
        #: seconds a taken-on delivery may wait for its slots
        self.wait_budget = max(settings.timeout, MIN_WAIT_BUDGET)

    def admit(self, job: DeliveryJob) -> Ticket | None:
        """Take ``job`` on, or None when its receiver is known to be too slow to reach it.

        A delivery left out keeps its claim until the lease lapses and is taken by a later
        pass: a receiver that hangs thus holds a few slots of its own, never the whole pass.
        """
        host = host_of(job.url)
        host_load = self._hosts.get(host)
        if host_load is None:
            if len(self._hosts) >= MAX_TRACKED_HOSTS:
                self._hosts = {h: load for h, load in self._hosts.items() if load.held}
            host_load = self._hosts[host] = Load()
        latency = host_load.latency
        if latency is not None and host_load.held >= self.allowance(
            self.settings.per_host, latency
        ):
            return None
        endpoint_load = None
        named = self.settings.endpoints.get(job.endpoint) if job.endpoint else None
        if named is not None and (named.max_in_flight or named.rate_limit):
            endpoint_load = self._endpoints.setdefault(job.endpoint or "", Load())
            if (
                named.max_in_flight
                and latency is not None
                and endpoint_load.held >= self.allowance(named.max_in_flight, latency)
            ):
                return None
            if named.rate_limit and endpoint_load.held >= named.rate_limit * self.wait_budget:
                return None
            endpoint_load.held += 1
        host_load.held += 1
        return Ticket(
            job=job,
            host=host,
            host_load=host_load,
            endpoint_load=endpoint_load,
            deadline=asyncio.get_running_loop().time() + self.wait_budget,
        )

    def allowance(self, slots: int, latency: float | None) -> int:
        """How many deliveries a receiver with ``slots`` and this answer time may hold: those
        it can start within the wait budget, with room for error. One that never answered
        gets a few.
        """
        if latency is None:
            return slots * UNKNOWN_QUEUE_PER_SLOT
        return slots + int(slots * ALLOWANCE_MARGIN * self.wait_budget / max(latency, 1e-3))

    def release(self, ticket: Ticket) -> None:
        """``ticket`` is done with (sent, or left for later): it no longer counts as held."""
        ticket.host_load.held -= 1
        if ticket.endpoint_load is not None:
            ticket.endpoint_load.held -= 1

    async def take_slots(self, ticket: Ticket) -> list[asyncio.Semaphore] | None:
        """The slots ``ticket`` needs, taken (give them back with ``give_back``); None when
        they did not come before its deadline, and then nothing is held.
        """
        if asyncio.get_running_loop().time() >= ticket.deadline:
            return None  # its claim may lapse mid-attempt: a later pass takes it
        endpoint = ticket.job.endpoint or ""
        limit = self._endpoint_limits.get(endpoint)
        rate = self._endpoint_rates.get(endpoint)
        in_flight = self._in_flight
        if limit is None and rate is None and not in_flight.locked():
            await in_flight.acquire()  # free: no wait, so no deadline to watch
            return [in_flight]
        taken: list[asyncio.Semaphore] = []
        try:
            # Slots in one fixed order, so waits cannot deadlock; the global one last, so a
            # busy endpoint never sits on one.
            async with asyncio.timeout_at(ticket.deadline):
                if limit is not None:
                    await limit.acquire()
                    taken.append(limit)
                if rate is not None:
                    await rate.wait()
                await in_flight.acquire()
                taken.append(in_flight)
        except TimeoutError:
            give_back(taken)
            return None
        except BaseException:  # a cancel: what was taken goes back before it propagates
            give_back(taken)
            raise
        return taken


def give_back(taken: list[asyncio.Semaphore]) -> None:
    """Release slots from ``Admission.take_slots``, the last taken first."""
    for semaphore in reversed(taken):
        semaphore.release()


class RateLimiter:
    """Spaces request starts at least ``1 / rate`` seconds apart."""

    def __init__(self, rate: float) -> None:
        self._gap = 1.0 / rate
        self._next = 0.0
        self._lock = asyncio.Lock()
        #: seconds callers have spent waiting here, for the hint of what slows polling down
        self.waited = 0.0

    async def wait(self) -> None:
        """Return when the next request may start.

        Waiters queue on the lock and the next slot counts from when the last one was
        actually released: a stalled event loop then delays requests rather than letting
        the ones it held up go out in a burst.
        """
        async with self._lock:
            delay = self._next - time.monotonic()
            if delay > 0:
                self.waited += delay
                await asyncio.sleep(delay)
            self._next = time.monotonic() + self._gap
