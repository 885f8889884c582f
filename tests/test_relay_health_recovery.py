"""/readyz names only relays still being asked, and times their silence on the monotonic
clock: a relay whose last tasks went during an outage is not named for ever, and a step of the
wall clock neither hides a relay that still fails nor makes one failure an hour of silence."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import httpx
import pytest
from conftest import base_config, merge
from test_relay_health import _start, eventually, readyz  # noqa: F401 - _start is a fixture

from tracker import config
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.platforms.base import Upstream, UpstreamError
from tracker.poller.drain import RELAY_PAUSE
from tracker.relay_health import RelayHealth
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

#: the relays' timeout: a relay no request ended at for 30 s + 2 x 1 s + 3 x 0.2 s = 32.6 s
#: (its longest pause, twice its timeout, 3 poll intervals) is not named
TIMEOUT = 1
#: fake seconds at which a relay still asked is asked again (within 32.6 s of the first)
ASKED_AGAIN = 30
#: fake seconds at which a relay last asked at 0 is no longer named, one asked at 30 still is
LOOKED = 34
HEADERS = {"Authorization": "Bearer test-token"}


def closed_port() -> str:
    """The URL of a loopback port nobody listens on (a relay that is down)."""
    with SimulatedRelay() as gone:
        return gone.base_url


def document_for(url: str, receiver: WebhookReceiver, sqlite_url: str, **more: Any) -> Any:
    return merge(
        base_config(url, receiver.url, sqlite_url),
        {
            "upstream": {"timeout": TIMEOUT},
            "poll": {"interval": 0.2, "max_interval": 1},
            **more,
        },
    )


def unreachable(url: str, seconds: int) -> str:
    return f"relay {url} unreachable for {seconds} s (ConnectError; more than 3 poll intervals)"


async def relay_reasons(daemon: Daemon) -> list[str]:
    """The relay problems /readyz names (its relay reason lists them joined by "; ")."""
    reasons: list[str] = (await readyz(daemon)).json().get("reasons", [])
    return [p for r in reasons if r.startswith("relay ") for p in re.split(r"; (?=relay )", r)]


async def pause_over() -> None:
    """Wait out (on the real clock) the drain's pause after a relay's first failure: a task
    due within it is planned past it on the fake clock, which moves only when told."""
    await asyncio.sleep(RELAY_PAUSE + 0.1)


async def next_report(daemon: Daemon, after: int) -> None:
    """Wait until a request outcome past the first ``after`` is reported."""
    health = daemon.parts.relay_health
    await eventually(lambda: asyncio.sleep(0, health.reports > after), 10, "a relay request")


def test_a_refusal_a_429_and_a_silence_are_not_named_once_the_relay_is_no_longer_asked() -> None:
    """Past 30 s + 2 x timeout + 3 intervals without a request ending at a relay, nothing is
    said of it, whatever it last answered; the next request speaks afresh: a refused key is
    named again at once, a silence counts from that request, not from before."""
    clock = FakeClock()
    health = RelayHealth(clock, interval=10)
    refusing = Upstream(name="default", base_url="http://relay.test", api_key="k", timeout=5)
    limiting = Upstream(name="second", base_url="http://other.test", api_key="k", timeout=5)
    silent = Upstream(name="third", base_url="http://third.test", api_key="k", timeout=5)

    health.report(refusing, UpstreamError("HTTP 401", status_code=401))
    health.report(limiting, UpstreamError("HTTP 429", status_code=429))
    health.report(silent, httpx.ConnectError("refused"))
    clock.advance(70)  # 30 + 2 x 5 + 3 x 10 = 70: still asked, for all /readyz knows
    named = health.problems()
    clock.advance(1)
    gone = health.problems()
    health.report(refusing, UpstreamError("HTTP 401", status_code=401))
    health.report(silent, httpx.ConnectError("refused"))
    again = health.problems()

    assert 3 == len(named)
    assert [] == gone
    assert [
        "relay http://relay.test refused the API key (HTTP 401): check upstream.api_key"
    ] == again


async def test_a_relay_whose_last_tasks_went_is_no_longer_named(
    receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """Two relays down, both named. The app removes the default relay's last task: once
    nothing has asked that relay for the stated time it is not named, while the second relay,
    still asked and still failing, is; once its task goes too, /readyz is 200."""
    url, other = closed_port(), closed_port()
    clock = FakeClock()
    document = document_for(
        url,
        receiver,
        sqlite_url,
        upstreams={"second": {"base_url": other, "api_key": "sk-sim", "timeout": TIMEOUT}},
        platforms={"suno": {"upstream": "second"}},
    )
    daemon = await start(config.parse(document, environ={}), clock=clock)  # luma r1
    async with httpx.AsyncClient(base_url=daemon.api_url, headers=HEADERS, timeout=5) as api:
        created = await api.post("/v1/tasks", json={"platform": "suno", "ids": ["s1"]})
        assert 201 == created.status_code
        await next_report(daemon, 1)  # one failed request to each relay
        clock.advance(1)
        both = await relay_reasons(daemon)

        assert 204 == (await api.delete("/v1/tasks/luma/r1")).status_code
        asked = daemon.parts.relay_health.reports
        await pause_over()
        clock.advance(ASKED_AGAIN - 1)
        await next_report(daemon, asked)  # the second relay is asked again, and fails
        clock.advance(LOOKED - ASKED_AGAIN)
        one = await relay_reasons(daemon)

        assert 204 == (await api.delete("/v1/tasks/suno/s1")).status_code
        clock.advance(LOOKED)
        ready = await readyz(daemon)

    assert sorted([unreachable(url, 1), unreachable(other, 1)]) == sorted(both)
    assert [unreachable(other, LOOKED)] == one
    assert 200 == ready.status_code, ready.text


@pytest.mark.parametrize(("silent", "step"), [(1, -3600), (None, 3600)])
async def test_a_step_of_the_wall_clock_neither_hides_nor_lengthens_a_relays_silence(
    receiver: WebhookReceiver, sqlite_url: str, start: Any, silent: int | None, step: float
) -> None:
    """The relay is down; then the wall clock steps an hour. Back, after a second of silence:
    the relay is still named, silent for a second, after the step and after the next failed
    request. Forward, after one failed request: it has not been silent for an hour, neither
    after the step nor after the next failed request."""
    url = closed_port()
    clock = FakeClock()
    settings = config.parse(document_for(url, receiver, sqlite_url), environ={})
    daemon = await start(settings, clock=clock)
    await next_report(daemon, 0)
    await pause_over()
    asked = daemon.parts.relay_health.reports
    if silent is not None:
        clock.advance(silent)
    clock.step(step)
    stepped = await relay_reasons(daemon)
    await next_report(daemon, asked)  # asked again after the step, and failing still
    after = await relay_reasons(daemon)

    named = [] if silent is None else [unreachable(url, silent)]
    assert named == stepped
    assert named == after
