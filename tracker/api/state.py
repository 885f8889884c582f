"""What the routes reach through dependencies: the store, the clock and the daemon's live state."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Annotated

from fastapi import Depends, Request

from tracker.clock import Clock
from tracker.config import Settings
from tracker.readiness import Readiness
from tracker.store.abc import Store


@dataclasses.dataclass(slots=True)
class ApiState:
    """What the running daemon tells the API: whether it takes work, and live settings."""

    settings: Settings
    accepting: bool = True
    #: the named checks /readyz runs, registered by the parts they watch
    readiness: Readiness = dataclasses.field(default_factory=Readiness)
    metrics: Callable[[], bytes] | None = None
    #: called after new ids were stored, so the poll engine asks about them at once
    on_registered: Callable[[], None] = lambda: None


@dataclasses.dataclass(frozen=True, slots=True)
class Services:
    """Everything a route may use, built once by ``build`` and kept on the application."""

    store: Store
    platforms: Sequence[str]
    state: ApiState
    clock: Clock


def services(request: Request) -> Services:
    """The application's services, as the request reached them."""
    found: Services = request.app.state.services
    return found


async def _services(request: Request) -> Services:
    # A coroutine: FastAPI runs a plain-def dependency on a worker thread, which would add a
    # thread hop (and a wait for the GIL while the poller works) to every request.
    return services(request)


Deps = Annotated[Services, Depends(_services)]
