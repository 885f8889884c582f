"""Readiness as a list of named checks: each part registers its own, /readyz runs them all.

A check returns None when its part is fine, else why not: a short reason for /readyz (which
needs no token, so no host names, users or driver messages) or a ``NotReady`` that adds a fuller
detail for the log only.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("tracker.app")


@dataclasses.dataclass(frozen=True, slots=True)
class NotReady:
    """Why a part is not ready: what /readyz says, and what only the log says."""

    reason: str  #: shown by /readyz
    detail: str  #: logged; may name paths and carry driver messages


Check = Callable[[], Awaitable[str | NotReady | None]]


@dataclasses.dataclass(frozen=True, slots=True)
class _Registered:
    name: str
    check: Check
    logged: bool


class Readiness:
    """The registered checks, run together in the order they were registered."""

    def __init__(self) -> None:
        self._checks: list[_Registered] = []
        #: names of logged checks failing at their last run
        self._failing: set[str] = set()

    @property
    def names(self) -> list[str]:
        """The registered checks' names, in order."""
        return [c.name for c in self._checks]

    def register(self, name: str, check: Check, *, logged: bool = False) -> None:
        """Add ``check`` under ``name``.

        A ``logged`` check says ``not_ready`` once when it starts failing and ``ready_again``
        once when it stops; checks whose failure is expected (a stop under way) or already
        logged elsewhere (a failed poll cycle) stay quiet.
        """
        if name in self.names:
            raise ValueError(f"a readiness check named {name!r} is registered already")
        self._checks.append(_Registered(name, check, logged))

    async def run(self) -> list[str]:
        """Why the daemon is not ready, one reason per failing check; empty when it is."""
        results = await asyncio.gather(*(c.check() for c in self._checks))
        reasons = []
        for registered, result in zip(self._checks, results, strict=True):
            failure = NotReady(result, result) if isinstance(result, str) else result
            if registered.logged:
                self._note(registered.name, failure)
            if failure is not None:
                reasons.append(failure.reason)
        return reasons

    def _note(self, name: str, failure: NotReady | None) -> None:
        # One log line when a check starts or stops failing, not one per probe.
        if failure is not None and name not in self._failing:
            self._failing.add(name)
            log.warning("not_ready", check=name, reason=failure.reason, detail=failure.detail)
        elif failure is None and name in self._failing:
            self._failing.discard(name)
            log.info("ready_again", check=name)
