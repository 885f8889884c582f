"""The composition root: every part of a daemon built from one Settings object, nothing started.

``build`` wires the parts together and registers each one's readiness check and jobs; it does
no I/O (the database is opened, the port bound and the tasks started by ``tracker.app``). The
clock, the HTTP transports and the store come in from outside, so tests swap them without
patching anything.
"""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
from fastapi import FastAPI

from tracker import api, config, dashboard, events, platforms, sdnotify, ssrf
from tracker.clock import Clock, SystemClock
from tracker.database import Database
from tracker.delivery import Deliverer
from tracker.jobs import InFlight, Jobs
from tracker.metrics import Metrics
from tracker.platforms.base import Platform
from tracker.poller import PollEngine, Poller
from tracker.readiness import Readiness
from tracker.relay_health import RelayHealth
from tracker.routines import Chores, Delivering, PollLoop
from tracker.server import ApiServer
from tracker.store import SqlStore

#: connections the daemon's own jobs (status line, readiness, retention, count folding, the
#: next delivery's due time) add to the API's pool: a few run at a time on asyncio's default
#: executor
JOB_CONNECTIONS = 4
#: connections of the poll engine's pool and of the deliverer's: each makes one store call at
#: a time on a thread of its own (one spare, and as many again at a pinch)
WORKER_CONNECTIONS = 2


@dataclasses.dataclass(frozen=True, slots=True)
class Transports:
    """Where the daemon's HTTP goes; None is the network (webhooks through the SSRF guard)."""

    relay: httpx.AsyncBaseTransport | None = None
    #: replaces the SSRF-guarded transport too: a test's receivers live on loopback
    webhook: httpx.AsyncBaseTransport | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Clients:
    """The HTTP clients, one pool each, so a slow receiver never holds a relay connection."""

    relay: httpx.AsyncClient
    webhook: httpx.AsyncClient
    #: webhooks to URLs an endpoint's config did not name, through the SSRF guard
    guarded: httpx.AsyncClient

    async def aclose(self) -> None:
        """Close every pool."""
        for client in (self.relay, self.webhook, self.guarded):
            await client.aclose()


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Parts:
    """A daemon's parts, assembled. Reloads reconfigure them in place; none is ever replaced."""

    clock: Clock
    #: the API's, the dashboard's and the jobs' store; the poller and the deliverer have their
    #: own, on pools of their own (see _stores)
    store: SqlStore
    poll_store: SqlStore
    delivery_store: SqlStore
    database: Database
    metrics: Metrics
    platforms: dict[str, Platform]
    clients: Clients
    relay_health: RelayHealth
    poller: Poller
    engine: PollEngine
    deliverer: Deliverer
    #: set when the daemon is asked to stop; every loop and job watches it
    stop: asyncio.Event
    inflight: InFlight
    jobs: Jobs
    polling: PollLoop
    delivering: Delivering
    chores: Chores
    #: what the API reads live, the settings in force included
    state: api.ApiState
    app: FastAPI
    server: ApiServer
    readiness: Readiness
    notifier: sdnotify.Notifier


def _clients(settings: config.Settings, transports: Transports) -> Clients:
    # The pools never bind: the poller's and the deliverer's own limits do, and those follow a
    # reload, which a pool's size could not.
    hooks = settings.webhooks
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=64)
    return Clients(
        relay=httpx.AsyncClient(
            transport=transports.relay,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
            timeout=settings.upstream.timeout,
        ),
        webhook=httpx.AsyncClient(
            transport=transports.webhook, limits=limits, timeout=hooks.timeout
        ),
        guarded=httpx.AsyncClient(
            transport=transports.webhook
            or ssrf.guarded_transport(ssrf.parse_allow(hooks.allow_private), limits=limits),
            timeout=hooks.timeout,
        ),
    )


def _stores(url: str, given: SqlStore | None) -> tuple[SqlStore, SqlStore, SqlStore]:
    """The stores of the API (and jobs), of the poll engine and of the deliverer.

    Three pools, each sized to the threads that use it: a burst of API requests holds at most
    api.API_THREADS connections (the daemon sets anyio's thread limiter to that) and never one
    the poll engine or the deliverer is waiting for (tests/test_pools.py). A given store (a
    test's) serves all three.
    """
    if given is not None:
        return given, given, given
    worker = {"pool_size": WORKER_CONNECTIONS, "max_overflow": WORKER_CONNECTIONS}
    return (
        SqlStore.from_url(
            url, pool_size=api.API_THREADS + JOB_CONNECTIONS, max_overflow=JOB_CONNECTIONS
        ),
        SqlStore.from_url(url, **worker),
        SqlStore.from_url(url, **worker),
    )


def build(
    settings: config.Settings,
    *,
    clock: Clock | None = None,
    transports: Transports | None = None,
    store: SqlStore | None = None,
    notifier: sdnotify.Notifier | None = None,
) -> Parts:
    """Every part of a daemon for ``settings``; the real clock, network, database and systemd
    notify socket unless others are given. ``store`` must be the database of
    ``settings.database.url``; the daemon closes it when it stops.
    """
    # One flat list on purpose (about 100 lines): each part is built after the parts it needs,
    # and the whole wiring reads top to bottom in one place.
    clock = clock or SystemClock()
    store, poll_store, delivery_store = _stores(settings.database.url, store)
    notifier = notifier or sdnotify.Notifier.from_environ()
    metrics = Metrics()
    built = platforms.build(settings)
    clients = _clients(settings, transports or Transports())
    stop = asyncio.Event()
    inflight = InFlight(notifier)
    jobs = Jobs(stop)
    deliverer = Deliverer(
        store=delivery_store,
        client=clients.webhook,
        guarded_client=clients.guarded,
        clock=clock,
        settings=settings.webhooks,
        metrics=metrics,
    )
    delivering = Delivering(deliverer, store, clock, jobs, inflight)
    relay_health = RelayHealth(clock, settings.poll.interval)
    poller = Poller(
        store=poll_store,
        platforms=built,
        client=clients.relay,
        clock=clock,
        settings=settings.poll,
        targets=events.Targets(settings.webhooks),
        metrics=metrics,
        on_events=delivering.kick,
        report_relay=relay_health.report,
    )
    metrics.watch_store(
        store.stats,
        lambda: clock.now().timestamp(),
        platforms=list(built),
        held=poller.earliest_held,
    )
    engine = PollEngine(poller, clock, on_step=jobs.shift_back)
    readiness = Readiness()
    state = api.ApiState(
        settings=settings, readiness=readiness, metrics=metrics.render, on_registered=engine.wake
    )

    def live() -> config.Settings:
        return state.settings

    polling = PollLoop(
        engine=engine, store=store, clock=clock, live=live, stop=stop, inflight=inflight
    )
    chores = Chores(
        store=store,
        poller=poller,
        clock=clock,
        notifier=notifier,
        live=live,
        jobs=jobs,
        inflight=inflight,
    )
    database = Database(store, settings.database)
    # The order /readyz lists the reasons in; the database and relays log when they change.
    readiness.register("database", database.check, logged=True)
    readiness.register("scheduler", jobs.check)
    readiness.register("poll", polling.check)
    readiness.register("relay", relay_health.check, logged=True)
    app = api.build(store=store, platforms=list(built), state=state, clock=clock)
    dashboard.mount(
        app,
        dashboard.Dashboard(
            store=store,
            clock=clock,
            settings=live,
            platforms=list(built),
            activity=metrics.activity,
            poll_lag=poller.lag,
        ),
    )
    return Parts(
        clock=clock,
        store=store,
        poll_store=poll_store,
        delivery_store=delivery_store,
        database=database,
        metrics=metrics,
        platforms=built,
        clients=clients,
        relay_health=relay_health,
        poller=poller,
        engine=engine,
        deliverer=deliverer,
        stop=stop,
        inflight=inflight,
        jobs=jobs,
        polling=polling,
        delivering=delivering,
        chores=chores,
        state=state,
        app=app,
        server=ApiServer(app, settings.server),
        readiness=readiness,
        notifier=notifier,
    )
