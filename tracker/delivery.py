"""The delivery loop: claim due outbox rows, sign, POST, and let the retry policy decide."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.parse
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime, timedelta

import httpx
import structlog

from tracker import retry, signing, ssrf
from tracker.clock import Clock
from tracker.config import EndpointSettings, PreviousSecret, WebhookSettings
from tracker.metrics import Metrics
from tracker.poller import RateLimiter
from tracker.store import SqlStore
from tracker.store.records import AttemptResult, DeliveryJob

log = structlog.get_logger("tracker.delivery")

#: at most this much of any answer is read; the rest is dropped unread
MAX_RESPONSE_BYTES = 64 * 1024
#: this much of it is kept in the delivery log
EXCERPT_BYTES = 2048
#: deliveries claimed per round
CLAIM_BATCH = 256


def _current_secrets(secret: str, previous: tuple[PreviousSecret, ...], now: datetime) -> list[str]:
    # While a rotated-out secret is unexpired, receivers that still hold it can verify too.
    return [secret] + [p.secret.get_secret_value() for p in previous if p.expires_at > now]


async def _read_capped(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_raw():
        body += chunk
        if len(body) >= MAX_RESPONSE_BYTES:
            break
    return bytes(body[:MAX_RESPONSE_BYTES])


class Deliverer:
    """Sends due webhooks; one instance per daemon."""

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
        self.store = store
        self.client = client
        self.guarded_client = guarded_client
        self.clock = clock
        self.metrics = metrics
        self.rand = rand
        self.overload_floor = overload_floor
        self._host_limits: dict[str, asyncio.Semaphore] = defaultdict(self._host_semaphore)
        self.configure(settings)

    def configure(self, settings: WebhookSettings) -> None:
        """Take new [webhooks] settings (a reload): secrets, endpoints, schedule, limits."""
        self.settings = settings
        self.policy = retry.RetryPolicy(
            delays=tuple(settings.retry_delays), overload_floor=self.overload_floor
        )
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
        self._host_limits.clear()

    def _host_semaphore(self) -> asyncio.Semaphore:
        return asyncio.Semaphore(self.settings.per_host)

    def secrets_for(self, endpoint: str | None) -> list[str]:
        """The secrets that sign a delivery to ``endpoint`` right now (current first)."""
        now = self.clock.now()
        named: EndpointSettings | None = self.settings.endpoints.get(endpoint) if endpoint else None
        if named is not None:
            return _current_secrets(named.secret.get_secret_value(), named.previous_secrets, now)
        return _current_secrets(
            self.settings.secret.get_secret_value(), self.settings.previous_secrets, now
        )

    async def run(self) -> int:
        """Deliver until nothing is due; returns how many attempts were made."""
        total = 0
        while True:
            made = await self.run_once()
            total += made
            if made < CLAIM_BATCH:
                return total

    async def run_once(self) -> int:
        """Claim one batch of due deliveries, attempt each, and record the results together."""
        lease = self.settings.timeout + 30
        jobs = await asyncio.to_thread(
            self.store.claim_deliveries, self.clock.now(), CLAIM_BATCH, lease=lease
        )
        if not jobs:
            return 0
        results = await asyncio.gather(*(self._attempt(job) for job in jobs))
        await asyncio.to_thread(self.store.finish_attempts, results)
        for result in results:
            self._log(result)
        return len(jobs)

    @contextlib.asynccontextmanager
    async def _slot(self, job: DeliveryJob) -> AsyncIterator[None]:
        # A slow receiver holds only its own host's and endpoint's slots, never all of them.
        host = urllib.parse.urlsplit(job.url).netloc
        async with contextlib.AsyncExitStack() as stack:
            endpoint = job.endpoint or ""
            if endpoint in self._endpoint_limits:
                await stack.enter_async_context(self._endpoint_limits[endpoint])
            await stack.enter_async_context(self._host_limits[host])
            await stack.enter_async_context(self._in_flight)
            if endpoint in self._endpoint_rates:
                await self._endpoint_rates[endpoint].wait()
            yield

    async def _attempt(self, job: DeliveryJob) -> AttemptResult:
        async with self._slot(job):
            return await self._send(job)

    async def _send(self, job: DeliveryJob) -> AttemptResult:
        now = self.clock.now()
        headers = signing.webhook_headers(
            self.secrets_for(job.endpoint), job.webhook_id, int(now.timestamp()), job.payload
        )
        client = self.guarded_client if job.guarded else self.client
        started = time.perf_counter()
        excerpt = b""
        outcome: retry.Outcome
        try:
            async with asyncio.timeout(self.settings.timeout):
                async with client.stream(
                    "POST", job.url, content=job.payload, headers=headers
                ) as response:
                    excerpt = await _read_capped(response)
            outcome = retry.Outcome(
                status_code=response.status_code,
                retry_after=response.headers.get("retry-after"),
            )
        except (TimeoutError, httpx.TimeoutException):
            outcome = retry.Outcome(error="timeout", timed_out=True)
        except httpx.HTTPError as exc:
            if ssrf.is_blocked_error(exc):
                return self._result(job, now, started, None, str(exc), b"", "dead", None)
            outcome = retry.Outcome(error=f"{type(exc).__name__}: {exc}")
        decision = self.policy.decide(outcome, job.attempts + 1, now=now, rand=self.rand())
        error = None if decision.state == "delivered" else decision.reason
        if decision.state == "retry":
            delay = decision.delay or 0.0
            at = (now + timedelta(seconds=delay)).timestamp()
            return self._result(
                job, now, started, outcome.status_code, error, excerpt, "pending", at
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
        state: str,
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

    def _log(self, result: AttemptResult) -> None:
        job = result.job
        outcome = "retry" if result.state == "pending" else result.state
        self.metrics.deliveries.labels(outcome).inc()
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
        if result.state == "delivered":
            log.info("webhook_delivered", **fields)
        elif result.state == "dead":
            log.error("webhook_dead", error=result.error, **fields)
        else:
            retry_at = result.next_attempt_at
            log.warning(
                "webhook_retry",
                error=result.error,
                retry_in=None if retry_at is None else round(retry_at - result.at.timestamp(), 3),
                **fields,
            )
