"""The delivery loop's front door: one Deliverer per daemon, built once, reconfigured on reload."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import httpx

from tracker import retry
from tracker.clock import Clock
from tracker.config import WebhookSettings
from tracker.delivery.journal import Journal
from tracker.delivery.outbox import Outbox
from tracker.delivery.passes import DeliveryPass
from tracker.delivery.sending import Sender
from tracker.limits import Admission
from tracker.metrics import Metrics
from tracker.store.abc import OutboxStore


class Deliverer:
    """Sends due webhooks, one pass at a time.

    It wires four parts, each usable on its own: ``Sender`` (sign, POST, decide),
    ``Admission`` (per-host and per-endpoint load, in-flight slots, rates), ``Outbox`` (the
    store rounds, on a thread) and ``DeliveryPass`` (claims, per-host lanes, batched
    writes). Retries, ordering and leases live in the store.
    """

    def __init__(
        self,
        *,
        store: OutboxStore,
        client: httpx.AsyncClient,
        guarded_client: httpx.AsyncClient,
        clock: Clock,
        settings: WebhookSettings,
        metrics: Metrics,
        rand: Callable[[], float] = random.random,
        overload_floor: float = 60.0,
    ) -> None:
        self._overload_floor = overload_floor
        policy = self._policy(settings)
        self.sender = Sender(
            client=client,
            guarded_client=guarded_client,
            clock=clock,
            settings=settings,
            policy=policy,
            rand=rand,
        )
        self.admission = Admission(settings)
        self.outbox = Outbox(store, clock, Journal(metrics))
        self.configure(settings)

    def _policy(self, settings: WebhookSettings) -> retry.RetryPolicy:
        return retry.RetryPolicy(
            delays=tuple(settings.retry_delays), overload_floor=self._overload_floor
        )

    def configure(self, settings: WebhookSettings) -> None:
        """Take new [webhooks] settings (a reload): secrets, endpoints, schedule, limits."""
        self.settings = settings
        self.sender.configure(settings, self._policy(settings))
        self.admission.configure(settings)
        self.outbox.hold = Outbox.hold_for(self.admission.wait_budget, settings.timeout)

    def secrets_for(self, endpoint: str | None) -> list[str]:
        """The secrets that sign a delivery to ``endpoint`` right now (current first)."""
        return self.sender.secrets_for(endpoint)

    async def run(self, *, until: asyncio.Event | None = None) -> int:
        """Deliver until nothing is due (or ``until`` is set); returns the attempts made.

        Claims keep coming while attempts are in flight, and results are written as they
        arrive, so one slow receiver holds up neither the others nor the next claim.
        """
        return await self._pass(refill=True, until=until).run()

    async def run_once(self) -> int:
        """Claim one batch of due deliveries, attempt each, record the results as they come."""
        return await self._pass(refill=False, until=None).run()

    def _pass(self, *, refill: bool, until: asyncio.Event | None) -> DeliveryPass:
        return DeliveryPass(
            admission=self.admission,
            sender=self.sender,
            outbox=self.outbox,
            refill=refill,
            until=until,
        )
