"""One delivery attempt: sign, POST, read a capped answer, and decide what happens next."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import random
import time
from collections.abc import AsyncGenerator, Callable
from datetime import datetime, timedelta
from typing import cast

import httpx

from tracker import retry, sanitize, signing, ssrf
from tracker.clock import Clock
from tracker.config import EndpointSettings, PreviousSecret, WebhookSettings
from tracker.retry import DeliveryState
from tracker.store.records import AttemptResult, DeliveryJob

#: this many characters of it are kept in the delivery log (after secrets are redacted)
EXCERPT_BYTES = 2048


def current_secrets(secret: str, previous: tuple[PreviousSecret, ...], now: datetime) -> list[str]:
    """``secret`` first, then the rotated-out ones not expired at ``now``.

    While a rotated-out secret is unexpired, receivers that still hold it can verify too.
    """
    return [secret] + [p.secret.get_secret_value() for p in previous if p.expires_at > now]


def target_now(
    settings: WebhookSettings, *, url: str, endpoint: str | None, guarded: bool
) -> str | None:
    """Where a delivery goes when it is sent now (the sender, and the dashboard's redeliver
    confirmation): a named endpoint's URL, or [webhooks].url for the default target, as the
    config has them now (as their secrets are the ones they have now: an app that moved is
    found again); a registration's own webhook_url (``guarded``) as stored. None when the
    config has no such target any more.
    """
    if endpoint is not None:
        named = settings.endpoints.get(endpoint)
        return None if named is None else named.url
    return url if guarded else settings.url


@functools.lru_cache(maxsize=64)
def _signing_key(secret: str) -> bytes:
    # Decoded once, not on every attempt.
    return signing.decode_secret(secret)


def describe(exc: Exception) -> str:
    """An exception as the delivery log shows it: its type, and its message when it has one."""
    detail = str(exc)
    return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__


async def read_capped(response: httpx.Response, limit: int) -> bytes:
    """The first ``limit`` bytes of the answer's body; the rest is never read."""
    body = bytearray()
    # aiter_raw is an async generator (typed as a plain iterator); close it, do not leave it
    # to the garbage collector.
    raw = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
    async with contextlib.aclosing(raw) as chunks:
        async for chunk in chunks:
            body += chunk
            if len(body) >= limit:
                # Leaving the stream unfinished closes the connection instead of draining it.
                break
    return bytes(body[:limit])


class Sender:
    """Turns a claimed delivery into an attempt result: sign, POST, let the retry policy decide.

    It knows nothing of limits or of the store: whoever calls ``send`` has taken the slots,
    and writes the result back.
    """

    def __init__(
        self,
        *,
        client: httpx.AsyncClient,
        guarded_client: httpx.AsyncClient,
        clock: Clock,
        settings: WebhookSettings,
        policy: retry.RetryPolicy,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._client = client
        self._guarded_client = guarded_client
        self._clock = clock
        self._rand = rand
        self.configure(settings, policy)

    def configure(self, settings: WebhookSettings, policy: retry.RetryPolicy) -> None:
        """Sign, time out and decide by these from the next attempt on."""
        self._settings = settings
        # A receiver may echo a signing secret back; it must not reach the delivery log.
        self._secrets = tuple(
            secret.get_secret_value()
            for secret in (
                settings.secret,
                *(p.secret for p in settings.previous_secrets),
                *(e.secret for e in settings.endpoints.values()),
                *(p.secret for e in settings.endpoints.values() for p in e.previous_secrets),
            )
        )
        self._policy = policy

    def secrets_for(self, endpoint: str | None) -> list[str]:
        """The secrets that sign a delivery to ``endpoint`` right now (current first)."""
        now = self._clock.now()
        settings = self._settings
        named: EndpointSettings | None = settings.endpoints.get(endpoint) if endpoint else None
        if named is not None:
            return current_secrets(named.secret.get_secret_value(), named.previous_secrets, now)
        return current_secrets(settings.secret.get_secret_value(), settings.previous_secrets, now)

    async def send(
        self, job: DeliveryJob, *, decide_as: Callable[[], DeliveryJob] | None = None
    ) -> AttemptResult:
        """One attempt of ``job``; every failure, of the receiver or of the request, is a result.

        ``decide_as`` gives the delivery as claimed once the answer is in, when a claim taken
        meanwhile may have changed it (a re-queue sets its attempts back to 0): the retry
        policy decides by that one.
        """
        now = self._clock.now()
        started = time.perf_counter()

        def as_claimed(sent: DeliveryJob) -> DeliveryJob:
            return sent if decide_as is None else dataclasses.replace(decide_as(), url=sent.url)

        url = target_now(self._settings, url=job.url, endpoint=job.endpoint, guarded=job.guarded)
        if url is None:
            # Never sent elsewhere nor signed with another secret: retried, so putting the
            # target back in the config delivers it.
            missing = (
                f"endpoint {job.endpoint!r} is not in [webhooks.endpoints]"
                if job.endpoint is not None
                else "no [webhooks].url in the config"
            )
            outcome = retry.Outcome(error=f"{missing}: not sent")
            return self._result(as_claimed(job), now, started, outcome, b"", fatal=False)
        if url != job.url:
            job = dataclasses.replace(job, url=url)
        outcome, excerpt, fatal = await self._exchange(job, now)
        return self._result(as_claimed(job), now, started, outcome, excerpt, fatal=fatal)

    def crashed(self, job: DeliveryJob, exc: Exception) -> AttemptResult:
        """The result of an attempt that raised ``exc``: a failure like any other, so one
        malformed delivery is retried and in time dies instead of stopping the rest.
        """
        outcome = retry.Outcome(error=describe(exc))
        return self._result(job, self._clock.now(), time.perf_counter(), outcome, b"", fatal=False)

    async def _exchange(self, job: DeliveryJob, now: datetime) -> tuple[retry.Outcome, bytes, bool]:
        """What the receiver made of one POST: the outcome, the answer's first bytes, and
        whether the failure is one no retry can cure.
        """
        try:
            keys = [_signing_key(secret) for secret in self.secrets_for(job.endpoint)]
            headers = signing.webhook_headers(
                keys, job.webhook_id, int(now.timestamp()), job.payload
            )
            # The answer's first bytes are kept for the attempt log: asked for uncompressed
            # (httpx offers gzip), they read as text there, and the cap counts what is kept.
            headers["accept-encoding"] = "identity"
        except ValueError as exc:
            # A secret that is not whsec_<base64>: retried, so fixing the config saves it.
            return retry.Outcome(error=f"cannot sign: {exc}"), b"", False
        client = self._guarded_client if job.guarded else self._client
        timeout, limit = self._settings.timeout, self._settings.max_response_bytes
        try:
            request = client.build_request(
                "POST", job.url, content=job.payload, headers=headers, timeout=timeout
            )
            # httpx's timeouts are per read; this one bounds the whole exchange.
            async with asyncio.timeout(timeout):
                response = await client.send(request, stream=True, follow_redirects=False)
                try:
                    excerpt = await read_capped(response, limit)
                finally:
                    await response.aclose()
        except (TimeoutError, httpx.TimeoutException):
            return retry.Outcome(error="timeout", timed_out=True), b"", False
        except httpx.HTTPError as exc:
            if ssrf.is_blocked_error(exc):
                return retry.Outcome(error=str(exc)), b"", True
            return retry.Outcome(error=describe(exc)), b"", False
        except httpx.InvalidURL as exc:
            return retry.Outcome(error=f"invalid URL: {exc}"), b"", True
        outcome = retry.Outcome(
            status_code=response.status_code, retry_after=response.headers.get("retry-after")
        )
        return outcome, excerpt, False

    def _result(
        self,
        job: DeliveryJob,
        now: datetime,
        started: float,
        outcome: retry.Outcome,
        excerpt: bytes,
        *,
        fatal: bool,
    ) -> AttemptResult:
        """The attempt log row, and the delivery's next state: dead when ``fatal``, else as
        the retry policy decides.
        """
        state, error, next_attempt_at = DeliveryState.DEAD, outcome.error, None
        if not fatal:
            # The wait runs from the answer (or the timeout), not from the POST: a receiver
            # that took 15 s to time out still gets the whole 60 s floor after it.
            ended = self._clock.now()
            decision = self._policy.decide(outcome, job.attempts + 1, now=ended, rand=self._rand())
            state = decision.state
            error = None if state == DeliveryState.DELIVERED else decision.reason
            if state == DeliveryState.PENDING:
                next_attempt_at = (ended + timedelta(seconds=decision.delay or 0.0)).timestamp()
        return AttemptResult(
            job=job,
            at=now,
            status_code=outcome.status_code,
            error=error,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
            # Redacted before it is cut, cleaned so any database takes it (a NUL byte in an
            # answer once made PostgreSQL refuse the whole batch of results).
            response_excerpt=sanitize.excerpt(excerpt, self._secrets, EXCERPT_BYTES),
            state=state,
            next_attempt_at=next_attempt_at,
        )
