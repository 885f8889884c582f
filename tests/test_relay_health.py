"""Relay problems that need a human reach /readyz: a refused key, a relay gone for too long."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from conftest import base_config, merge

from tracker import config
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.platforms.base import Upstream, UpstreamError
from tracker.relay_health import RelayHealth
from tracker.store.records import Registration
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

KEY = "sk-wrong-key-4d1c"
RELAY = Upstream(name="default", base_url="http://relay.test", api_key=KEY)
SECOND = Upstream(name="second", base_url="http://other.test", api_key=KEY)


def test_a_refused_key_is_named_until_the_relay_answers_again() -> None:
    """401 and 403 name the relay and the config key (never the key); an answer clears it."""
    health = RelayHealth(FakeClock(), interval=10)

    health.report(RELAY, UpstreamError("HTTP 401", status_code=401))
    health.report(SECOND, UpstreamError("HTTP 403", status_code=403))
    problems = health.problems()
    health.report(RELAY, None)
    health.report(SECOND, UpstreamError("HTTP 500", status_code=500))

    assert [
        "relay http://other.test refused the API key (HTTP 403): check upstreams.second.api_key",
        "relay http://relay.test refused the API key (HTTP 401): check upstream.api_key",
    ] == problems
    assert all(KEY not in p for p in problems)
    assert [] == health.problems()


def test_an_unreachable_relay_is_named_after_three_intervals_without_an_answer() -> None:
    """Requests without any answer count from the first; within 3 intervals all is well. A
    502 ends the silence but not the failure; a usable answer ends both."""
    clock = FakeClock()
    health = RelayHealth(clock, interval=10)

    health.report(RELAY, httpx.ConnectError("refused"))
    clock.advance(25)
    health.report(RELAY, httpx.ConnectError("refused"))
    early = health.problems()
    clock.advance(6)
    late = health.problems()
    health.report(RELAY, UpstreamError("HTTP 502", status_code=502))
    answered = health.problems()
    health.report(RELAY, None)

    assert [] == early
    assert [
        "relay http://relay.test unreachable for 31 s (ConnectError; more than 3 poll intervals)"
    ] == late
    assert [
        "relay http://relay.test has given no usable answer for 31 s (last: HTTP 502; more "
        "than 3 poll intervals)"
    ] == answered
    assert [] == health.problems()


def test_a_relay_answering_only_429_is_named_after_three_intervals() -> None:
    """Its pauses plan its tasks ahead, so the poll lag cannot show a relay that refuses every
    request as too many: after three intervals of nothing but 429 it is named, with what
    would help; any other answer clears it."""
    clock = FakeClock()
    health = RelayHealth(clock, interval=10)
    too_many = UpstreamError("HTTP 429: slow down", status_code=429)

    health.report(RELAY, too_many)
    clock.advance(25)
    health.report(RELAY, too_many)
    early = health.problems()
    clock.advance(6)
    late = health.problems()
    health.report(RELAY, None)

    assert [] == early
    assert [
        "relay http://relay.test has answered only 429 Too Many Requests for 31 s (more than "
        "3 poll intervals): lower the platforms' rate_limit, or ask the relay for a higher limit"
    ] == late
    assert [] == health.problems()


def test_a_relay_giving_no_usable_answer_is_named_after_three_intervals() -> None:
    """500s, then a 503 (whose Retry-After pauses the relay, so its tasks are planned past
    the pause and show no lag): after three intervals without a usable answer, counted from
    the first failure of any kind, the relay is named with the last status code, never with
    its own text; a usable answer clears it, and a 2xx that could not be read counts too."""
    clock = FakeClock()
    health = RelayHealth(clock, interval=10)

    health.report(RELAY, httpx.ReadTimeout("no answer"))
    clock.advance(10)
    health.report(RELAY, UpstreamError(f"HTTP 500: oops {KEY}", status_code=500))
    clock.advance(15)
    health.report(RELAY, UpstreamError("HTTP 503: maintenance", status_code=503))
    early = health.problems()
    clock.advance(6)
    late = health.problems()
    health.report(RELAY, None)
    cleared = health.problems()
    health.report(SECOND, UpstreamError("answer is not JSON (not JSON: ...)", status_code=200))
    clock.advance(31)
    unreadable = health.problems()

    assert [] == early
    assert [
        "relay http://relay.test has given no usable answer for 31 s (last: HTTP 503; more "
        "than 3 poll intervals)"
    ] == late
    assert [] == cleared
    assert [
        "relay http://other.test has given no usable answer for 31 s (last: an answer it "
        "could not read; more than 3 poll intervals)"
    ] == unreadable
    assert all(KEY not in p and "maintenance" not in p for p in late + unreadable)


def test_a_429_among_other_errors_is_named_as_no_usable_answer() -> None:
    """Only a relay answering nothing but 429 is told to lower the rate limit; 429s mixed
    with 500s are no usable answer, counted from the first of them."""
    clock = FakeClock()
    health = RelayHealth(clock, interval=10)

    health.report(RELAY, UpstreamError("HTTP 429", status_code=429))
    clock.advance(20)
    health.report(RELAY, UpstreamError("HTTP 500", status_code=500))
    clock.advance(11)

    assert [
        "relay http://relay.test has given no usable answer for 31 s (last: HTTP 500; more "
        "than 3 poll intervals)"
    ] == health.problems()


async def test_readyz_names_a_relay_answering_only_500_for_three_intervals(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """A relay answering every batch query with 500 moves no task and, asked again each
    interval, leaves no lag: /readyz names it once that has lasted 3 intervals, and is ready
    again after its next usable answer."""
    relay.fail_next("http_500", 10_000)
    document = merge(
        base_config(relay.base_url, receiver.url, sqlite_url),
        {"poll": {"interval": 0.2, "max_interval": 1}},
    )
    daemon = await start(config.parse(document, environ={}))

    async def failing() -> httpx.Response | None:
        answer = await readyz(daemon)
        return answer if answer.status_code == 503 else None

    answer = await eventually(failing, 10, "503 from /readyz")
    [reason] = answer.json()["reasons"]
    assert reason.startswith(f"relay {relay.base_url} has given no usable answer for ")
    assert reason.endswith(" s (last: HTTP 500; more than 3 poll intervals)")
    relay.clear_faults()

    async def ready() -> bool:
        return (await readyz(daemon)).status_code == 200

    await eventually(ready, 10, "200 from /readyz")


@pytest.fixture(name="start")
async def _start() -> AsyncIterator[Callable[..., Any]]:
    made: list[Daemon] = []

    async def start(settings: config.Settings, **kwargs: Any) -> Daemon:
        daemon = Daemon(settings, **kwargs)
        made.append(daemon)
        await daemon.start()
        await asyncio.to_thread(
            daemon.parts.store.register, Registration("luma", ["r1"]), daemon.parts.clock.now()
        )
        daemon.parts.engine.wake()  # registered behind the API's back, so the engine is told
        return daemon

    yield start
    for daemon in made:
        await daemon.stop()


async def readyz(daemon: Daemon) -> httpx.Response:
    async with httpx.AsyncClient(base_url=daemon.api_url, timeout=5) as client:
        return await client.get("/readyz")


async def eventually(check: Callable[[], Any], within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while not (result := await check()):
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {within} s")
        await asyncio.sleep(0.05)
    return result


async def test_readyz_names_a_relay_that_refuses_the_key(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """A daemon whose relay answers 401 is not ready; the reason names the relay, not the key."""
    document = merge(
        base_config(relay.base_url, receiver.url, sqlite_url),
        {"upstream": {"api_key": KEY}, "poll": {"interval": 0.2, "max_interval": 1}},
    )
    daemon = await start(config.parse(document, environ={}))

    async def refused() -> httpx.Response | None:
        answer = await readyz(daemon)
        return answer if answer.status_code == 503 else None

    answer = await eventually(refused, 10, "503 from /readyz")
    assert [
        f"relay {relay.base_url} refused the API key (HTTP 401): check upstream.api_key"
    ] == answer.json()["reasons"]
    assert KEY not in answer.text


async def test_readyz_names_a_relay_unreachable_for_three_intervals(
    receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """A relay refusing connections for more than 3 intervals is named with its URL."""
    with SimulatedRelay() as gone:
        url = gone.base_url  # a loopback port nobody listens on once it is closed
    clock = FakeClock()
    document = merge(
        base_config(url, receiver.url, sqlite_url),
        {"poll": {"interval": 0.2, "max_interval": 1}},
    )
    daemon = await start(config.parse(document, environ={}), clock=clock)

    await eventually(
        lambda: asyncio.sleep(0, daemon.parts.relay_health.reports), 10, "a relay request's outcome"
    )
    clock.advance(0.7)

    reasons = (await readyz(daemon)).json()["reasons"]

    assert f"relay {url} unreachable for 1 s (ConnectError; more than 3 poll intervals)" in reasons
