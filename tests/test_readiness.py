"""The readiness registry: named checks each part registers, run together for /readyz."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import structlog

from tracker.readiness import NotReady, Readiness


class Switch:
    """A check whose answer the test sets."""

    def __init__(self, answer: str | NotReady | None = None) -> None:
        self.answer = answer
        self.runs = 0

    async def __call__(self) -> str | NotReady | None:
        self.runs += 1
        return self.answer


async def test_no_checks_means_ready() -> None:
    """An empty registry has no reason to give."""
    assert [] == await Readiness().run()


async def test_reasons_come_in_registration_order_and_only_from_failing_checks() -> None:
    """Every check runs on every call; the reasons of the failing ones come in the order the
    checks were registered, whatever order they finish in."""
    readiness = Readiness()
    first, second, third = Switch("first is down"), Switch(), Switch("third is down")

    async def slow() -> str | None:
        await asyncio.sleep(0.05)
        return await first()

    readiness.register("first", slow)
    readiness.register("second", second)
    readiness.register("third", third)

    assert ["first is down", "third is down"] == await readiness.run()
    assert (1, 1, 1) == (first.runs, second.runs, third.runs)
    assert ["first", "second", "third"] == readiness.names


async def test_checks_run_concurrently() -> None:
    """A slow check does not hold up the others: each waits for the other to have started."""
    readiness = Readiness()
    started = {name: asyncio.Event() for name in ("a", "b")}

    def waiting_for(me: str, other: str) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            started[me].set()
            await asyncio.wait_for(started[other].wait(), timeout=2)

        return check

    readiness.register("a", waiting_for("a", "b"))
    readiness.register("b", waiting_for("b", "a"))

    assert [] == await readiness.run()


async def test_not_ready_shows_its_reason_and_logs_its_detail() -> None:
    """/readyz gets the short reason; the detail (paths, driver text) goes to the log only."""
    readiness = Readiness()
    readiness.register(
        "database", Switch(NotReady("database unreachable", "secret-host: refused")), logged=True
    )

    with structlog.testing.capture_logs() as logs:
        reasons = await readiness.run()

    assert ["database unreachable"] == reasons
    [line] = logs
    assert ("not_ready", "database", "database unreachable", "secret-host: refused") == (
        line["event"],
        line["check"],
        line["reason"],
        line["detail"],
    )


async def test_a_logged_check_logs_once_when_it_starts_and_once_when_it_stops_failing() -> None:
    """One not_ready line however many probes fail in a row, one ready_again when it passes;
    an unlogged check stays quiet both ways."""
    readiness = Readiness()
    relay, scheduler = Switch("relay refused the key"), Switch("shutting down")
    readiness.register("relay", relay, logged=True)
    readiness.register("scheduler", scheduler)

    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            await readiness.run()
        relay.answer = scheduler.answer = None
        for _ in range(2):
            assert [] == await readiness.run()

    assert [("not_ready", "relay"), ("ready_again", "relay")] == [
        (line["event"], line["check"]) for line in logs
    ]
    # A string reason is its own detail.
    assert "relay refused the key" == logs[0]["detail"]


def test_a_name_is_registered_once() -> None:
    """A second check under a taken name is refused rather than hiding the first."""
    readiness = Readiness()
    readiness.register("database", Switch())

    with pytest.raises(ValueError, match="'database'"):
        readiness.register("database", Switch())
