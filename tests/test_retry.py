"""Tests for the pure webhook retry decision."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker.config import DEFAULT_RETRY_DELAYS
from tracker.retry import Decision, DeliveryState, Outcome, RetryPolicy

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
POLICY = RetryPolicy(delays=(10.0, 100.0, 1000.0))
MID = 0.5  # rand that makes the jitter factor exactly 1


def decide(outcome: Outcome, attempts: int = 1, rand: float = MID) -> Decision:
    return POLICY.decide(outcome, attempts, now=NOW, rand=rand)


@pytest.mark.parametrize(
    ("outcome", "state", "delay", "reason"),
    [
        (Outcome(status_code=200), DeliveryState.DELIVERED, None, "HTTP 200"),
        (Outcome(status_code=204), DeliveryState.DELIVERED, None, "HTTP 204"),
        (Outcome(status_code=299), DeliveryState.DELIVERED, None, "HTTP 299"),
        (
            Outcome(status_code=301),
            DeliveryState.PENDING,
            10.0,
            "HTTP 301 (redirects are not followed)",
        ),
        (
            Outcome(status_code=302),
            DeliveryState.PENDING,
            10.0,
            "HTTP 302 (redirects are not followed)",
        ),
        (Outcome(status_code=400), DeliveryState.PENDING, 10.0, "HTTP 400"),
        (Outcome(status_code=404), DeliveryState.PENDING, 10.0, "HTTP 404"),
        (Outcome(status_code=410), DeliveryState.DEAD, None, "410 Gone"),
        (Outcome(status_code=429), DeliveryState.PENDING, 60.0, "HTTP 429"),
        (Outcome(status_code=500), DeliveryState.PENDING, 10.0, "HTTP 500"),
        (Outcome(status_code=503), DeliveryState.PENDING, 10.0, "HTTP 503"),
        (Outcome(error="timeout", timed_out=True), DeliveryState.PENDING, 60.0, "timeout"),
        (Outcome(timed_out=True), DeliveryState.PENDING, 60.0, "timeout"),
        (Outcome(error="connect: refused"), DeliveryState.PENDING, 10.0, "connect: refused"),
        (Outcome(), DeliveryState.PENDING, 10.0, "no response"),
    ],
)
def test_status_table(
    outcome: Outcome, state: DeliveryState, delay: float | None, reason: str
) -> None:
    """Each kind of outcome on the first attempt maps to the expected state, delay and reason."""
    assert decide(outcome) == Decision(state, delay, reason)


def test_410_is_dead_even_with_retries_left() -> None:
    """410 Gone stops retrying at once, whatever the attempt count."""
    assert decide(Outcome(status_code=410), attempts=1).state == DeliveryState.DEAD


def test_success_on_the_last_allowed_attempt_is_delivered() -> None:
    """A 2xx after the schedule is used up still counts as delivered."""
    assert decide(Outcome(status_code=200), attempts=4).state == DeliveryState.DELIVERED


@pytest.mark.parametrize(("attempts", "scheduled"), [(1, 10.0), (2, 100.0), (3, 1000.0)])
def test_schedule_is_indexed_by_attempts(attempts: int, scheduled: float) -> None:
    """The n-th failed attempt waits delays[n - 1] before the next one."""
    assert decide(Outcome(status_code=500), attempts=attempts).delay == scheduled


def test_exhaustion_exactly_after_the_schedule() -> None:
    """With three delays the fourth failed attempt is the last: the message goes dead."""
    last = decide(Outcome(status_code=500), attempts=3)
    assert last.state == DeliveryState.PENDING
    dead = decide(Outcome(status_code=500), attempts=4)
    assert dead == Decision(
        DeliveryState.DEAD, None, "retries exhausted after 4 attempts (last: HTTP 500)"
    )


def test_jitter_bounds() -> None:
    """rand 0 gives the -20 % edge and rand near 1 approaches the +20 % edge."""
    assert decide(Outcome(status_code=500), rand=0.0).delay == pytest.approx(8.0)
    high = decide(Outcome(status_code=500), rand=0.999999).delay
    assert high is not None
    assert 11.99 < high < 12.0


def test_overload_floor_is_not_applied_above_it() -> None:
    """A 429 whose scheduled delay already exceeds the floor keeps the jittered delay."""
    assert decide(Outcome(status_code=429), attempts=2, rand=0.0).delay == pytest.approx(80.0)


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [
        ("150", 150.0),  # inside [100, 200]
        ("5", 100.0),  # clamped up to the scheduled delay
        ("100000", 200.0),  # clamped down to twice the scheduled delay
        (" 150 ", 150.0),
    ],
)
def test_retry_after_seconds_is_clamped(retry_after: str, expected: float) -> None:
    """Retry-After in seconds is honoured within [scheduled, 2 x scheduled], replacing jitter."""
    outcome = Outcome(status_code=503, retry_after=retry_after)
    assert decide(outcome, attempts=2, rand=0.0).delay == expected


@pytest.mark.parametrize(("offset", "expected"), [(150, 150.0), (-600, 100.0), (86400, 200.0)])
def test_retry_after_http_date_is_relative_to_now(offset: int, expected: float) -> None:
    """An HTTP-date Retry-After counts from the supplied now and is clamped the same way."""
    when = format_datetime(NOW + timedelta(seconds=offset), usegmt=True)
    outcome = Outcome(status_code=503, retry_after=when)
    assert decide(outcome, attempts=2, rand=0.0).delay == pytest.approx(expected)


@pytest.mark.parametrize("garbage", ["", "soon", "-5", "1.5", "Mon, 99 Foo 2025"])
def test_unparsable_retry_after_is_ignored(garbage: str) -> None:
    """A Retry-After that is neither integer seconds nor an HTTP-date changes nothing."""
    outcome = Outcome(status_code=503, retry_after=garbage)
    assert decide(outcome, attempts=2, rand=0.0).delay == pytest.approx(80.0)


def test_retry_after_comes_before_the_overload_floor() -> None:
    """A 429 with a short Retry-After on a short schedule still waits the overload floor."""
    outcome = Outcome(status_code=429, retry_after="15")
    assert decide(outcome, attempts=1).delay == 60.0


def test_invalid_arguments_are_refused() -> None:
    """attempts below 1, rand outside [0, 1) and bad policies raise ValueError."""
    with pytest.raises(ValueError, match="attempts"):
        decide(Outcome(status_code=500), attempts=0)
    with pytest.raises(ValueError, match="rand"):
        decide(Outcome(status_code=500), rand=1.0)
    with pytest.raises(ValueError, match="negative"):
        RetryPolicy(delays=(1.0, -1.0))
    with pytest.raises(ValueError, match="jitter"):
        RetryPolicy(delays=(1.0,), jitter=1.0)


def test_default_schedule_spans_about_three_days() -> None:
    """The default retry_delays have nine delays (ten attempts) adding up to about three days."""
    schedule = DEFAULT_RETRY_DELAYS
    assert schedule == (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400)
    assert 2.9 * 86400 < sum(schedule) < 3.2 * 86400
    policy = RetryPolicy(delays=schedule)
    assert (
        policy.decide(Outcome(status_code=500), 10, now=NOW, rand=MID).state == DeliveryState.DEAD
    )
    assert policy.decide(Outcome(status_code=500), 9, now=NOW, rand=MID).delay == 86400


@given(
    status=st.one_of(st.none(), st.integers(min_value=100, max_value=599)),
    timed_out=st.booleans(),
    retry_after=st.one_of(
        st.none(),
        st.integers(min_value=0, max_value=10**7).map(str),
        st.integers(min_value=-(10**6), max_value=10**6).map(
            lambda s: format_datetime(NOW + timedelta(seconds=s), usegmt=True)
        ),
        st.text(max_size=20),
    ),
    attempts=st.integers(min_value=1, max_value=len(DEFAULT_RETRY_DELAYS)),
    rand=st.floats(min_value=0, max_value=1, exclude_max=True),
)
def test_every_retry_delay_is_within_bounds(
    status: int | None, timed_out: bool, retry_after: str | None, attempts: int, rand: float
) -> None:
    """Every retry delay lies within [0.8 x scheduled, max(2 x scheduled, overload floor)]."""
    policy = RetryPolicy(delays=DEFAULT_RETRY_DELAYS)
    outcome = Outcome(status_code=status, timed_out=timed_out, retry_after=retry_after)
    decision = policy.decide(outcome, attempts, now=NOW, rand=rand)
    if decision.state != DeliveryState.PENDING:
        assert decision.delay is None
        return
    scheduled = policy.delays[attempts - 1]
    assert decision.delay is not None
    assert 0.8 * scheduled <= decision.delay <= max(2 * scheduled, policy.overload_floor)


def test_delivery_states_keep_the_names_stored_and_shown() -> None:
    """The states are stored, filtered on and printed by these exact names."""
    assert ["pending", "delivered", "dead"] == [str(s) for s in DeliveryState]
