"""A flood of one warning cannot fill the journal; secrets are redacted even when cut off."""

from __future__ import annotations

import io
import json
import logging
import time
from typing import Any

import pytest
import structlog

from tracker import logs

pytestmark = pytest.mark.usefixtures("restore_logging")


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_event_gets_its_burst_then_its_rate_and_says_how_many_it_dropped() -> None:
    """After the burst, lines of one event pass at the rate; the first after a gap counts the
    ones dropped, and another event keeps its own allowance.
    """
    clock = FakeClock()
    limiter = logs._RateLimiter(burst=3, rate=2.0, clock=clock)
    assert [0, 0, 0, None, None] == [limiter.take("flood") for _ in range(5)]
    assert 0 == limiter.take("other")
    clock.now = 0.5  # one line's worth at 2 per second
    assert 2 == limiter.take("flood")
    assert limiter.take("flood") is None


def allowed_since(started: float) -> float:
    """Lines of one event the limit lets through from ``started`` until now: the burst, and
    the rate's refill meanwhile (a loaded machine can take a fifth of a second for a flood)."""
    return logs.LOG_BURST + logs.LOG_RATE * (time.monotonic() - started)


def test_a_flood_of_warnings_writes_at_most_the_burst_while_info_lines_all_pass() -> None:
    """10,000 identical warnings in a moment write the LOG_BURST lines (and what the rate
    refilled meanwhile); 1,000 info lines (one per delivery, a contract) are all written.
    """
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={})
    log = structlog.get_logger("test")
    started = time.monotonic()
    for n in range(10_000):
        log.warning("bad_connection", n=n)
    allowed = allowed_since(started)
    for n in range(1_000):
        log.info("webhook_delivered", n=n)

    written = lines(buf)
    assert logs.LOG_BURST <= sum(1 for e in written if e["event"] == "bad_connection") <= allowed
    assert 1_000 == sum(1 for e in written if e["event"] == "webhook_delivered")


def test_stdlib_warnings_are_limited_the_same_way() -> None:
    """uvicorn-style stdlib warnings of one message are cut at the burst too (and what the
    rate refilled meanwhile)."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={})
    started = time.monotonic()
    for _ in range(1_000):
        logging.getLogger("uvicorn.error").warning("Invalid HTTP request received.")
    assert logs.LOG_BURST <= len(lines(buf)) <= allowed_since(started)


def test_a_secret_cut_off_inside_a_logged_value_is_redacted_too() -> None:
    """A value holding only the first part of a secret (an excerpt cut short) is redacted."""
    secret = "sk-live-0123456789abcdef0123"
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={}, secrets=[secret])
    structlog.get_logger("test").warning("upstream_error", error=f"HTTP 502: {secret[:-3]}")
    [line] = lines(buf)
    assert secret[:9] not in json.dumps(line)
    assert "HTTP 502: [redacted]" == line["error"]
