"""The states of a webhook delivery and the pure decision that moves it after an attempt."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime


class DeliveryState(enum.StrEnum):
    """Where a webhook delivery stands; the values are stored, filtered on and shown as is."""

    PENDING = "pending"  #: to be sent: not tried yet, or retried after a delay
    DELIVERED = "delivered"  #: a receiver answered 2xx
    DEAD = "dead"  #: given up; only an operator's redeliver or recover sends it again


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one delivery attempt produced."""

    status_code: int | None = None  # None when no HTTP answer
    error: str | None = None  # "timeout", "connect: ...", ...
    timed_out: bool = False
    retry_after: str | None = None  # raw Retry-After header value


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do after an attempt; ``delay`` (seconds) is set only when ``state`` is PENDING."""

    state: DeliveryState
    delay: float | None
    reason: str


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A retry schedule with jitter, an overload floor and bounded Retry-After support."""

    delays: tuple[float, ...]  # the [webhooks].retry_delays schedule, seconds
    jitter: float = 0.2  # ±20 %
    overload_floor: float = 60.0  # a 429 or a timeout waits at least this long

    def __post_init__(self) -> None:
        if any(delay < 0 for delay in self.delays):
            raise ValueError("retry delays must not be negative")
        if not 0 <= self.jitter < 1:
            raise ValueError("retry jitter must be in [0, 1)")
        if self.overload_floor < 0:
            raise ValueError("retry overload_floor must not be negative")

    def decide(self, outcome: Outcome, attempts: int, *, now: datetime, rand: float) -> Decision:
        """Decide the fate of a message after its ``attempts``-th attempt produced ``outcome``.

        ``rand`` in [0, 1) drives the jitter and ``now`` anchors an HTTP-date Retry-After, so
        the function reads neither a clock nor a random source.
        """
        if attempts < 1:
            raise ValueError("attempts counts the attempt just made, so it is at least 1")
        if not 0 <= rand < 1:
            raise ValueError("rand must be in [0, 1)")
        code = outcome.status_code
        if code is not None and 200 <= code < 300:
            return Decision(DeliveryState.DELIVERED, None, f"HTTP {code}")
        if code == 410:
            # the receiver says the endpoint is gone for good (Standard Webhooks)
            return Decision(DeliveryState.DEAD, None, "410 Gone")
        failure = _failure_reason(outcome)
        if attempts > len(self.delays):
            return Decision(
                DeliveryState.DEAD,
                None,
                f"retries exhausted after {attempts} attempts (last: {failure})",
            )

        scheduled = self.delays[attempts - 1]
        delay = scheduled * (1 - self.jitter + 2 * self.jitter * rand)
        retry_after = parse_retry_after(outcome.retry_after, now)
        if retry_after is not None:
            # honour the receiver, but neither hammer it nor let it park us for days
            delay = min(max(retry_after, scheduled), 2 * scheduled)
        if code == 429 or outcome.timed_out:
            delay = max(delay, self.overload_floor)
        return Decision(DeliveryState.PENDING, delay, failure)


def _failure_reason(outcome: Outcome) -> str:
    if outcome.status_code is not None:
        if 300 <= outcome.status_code < 400:
            return f"HTTP {outcome.status_code} (redirects are not followed)"
        return f"HTTP {outcome.status_code}"
    if outcome.error:
        return outcome.error
    if outcome.timed_out:
        return "timeout"
    return "no response"


def parse_retry_after(value: str | None, now: datetime) -> float | None:
    """Return Retry-After as seconds from ``now``, or None when absent or unparsable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # "-0000" yields a naive datetime; HTTP-dates are always GMT
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    return (when - now).total_seconds()
