"""The store seen from its users: typed Protocols for the task side and the outbox side.

The poller needs only the task side, the deliverer only the outbox side, the API and the CLI
both plus the figures. ``SqlStore`` satisfies all of them (mypy checks it where a daemon is
wired); another implementation, or a test double, needs only the side its user reads.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from datetime import datetime
from typing import Protocol

from tracker.retry import DeliveryState
from tracker.store import records


class TaskStore(Protocol):
    """Tracked tasks: registration, the poll cycle's claims and writes, reads."""

    def register(
        self, registration: records.Registration, now: datetime
    ) -> tuple[list[str], list[str]]:
        """Track new ids; returns (registered, existing)."""
        ...

    def get(self, platform: str, task_id: str) -> records.TaskRecord | None:
        """One task with its transitions, None when unknown."""
        ...

    def list_tasks(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[records.TaskRecord], int | None]:
        """A page of tasks, newest first, and the cursor of the next page."""
        ...

    def remove(self, platform: str, task_id: str) -> bool:
        """Stop tracking a task; False when unknown."""
        ...

    def claim_due(
        self,
        now: datetime,
        limit: int,
        *,
        lease: float,
        due_by: datetime | None = None,
        skip: Collection[str] = (),
    ) -> list[records.DueTask]:
        """Take up to ``limit`` tasks due by ``due_by`` (default ``now``), most overdue first,
        leased for ``lease`` seconds; none of the platforms named in ``skip``."""
        ...

    def renew_claim(self, claim: records.Claim, until: float) -> int:
        """Extend ``claim`` to ``until`` for its tasks not recorded since; how many moved."""
        ...

    def earliest_poll(self) -> datetime | None:
        """When the earliest live task is due (None when none is live)."""
        ...

    def most_overdue(self) -> tuple[datetime, str] | None:
        """When the earliest live task is due, and its platform (None when none is live)."""
        ...

    def pull_in(self, latest: datetime, *, now: datetime, claims_within: float = 0.0) -> None:
        """Move every poll planned after ``latest`` to ``latest``. On a database other
        daemons may share, polls within ``claims_within`` seconds of ``now`` stay."""
        ...

    def shift_plans(
        self, seconds: float, after: datetime, *, claims_within: float = 0.0
    ) -> tuple[int, int]:
        """Move the polls and pending deliveries planned after ``after`` earlier by
        ``seconds`` (the wall clock stepped back), and the claims holding deliveries back
        for later; how many polls and deliveries moved. On a database other daemons may
        share, polls within ``claims_within`` seconds of ``after`` stay."""
        ...

    def record(
        self,
        updates: Sequence[records.TaskUpdate],
        now: datetime,
        replans: Sequence[records.Replan] = (),
        *,
        landed: list[records.TaskUpdate] | None = None,
    ) -> int:
        """Write a poll's decisions (task, history and outbox rows) in one transaction, and
        the next polls of ``replans`` (answers that moved nothing); how many tasks were
        written. ``landed`` gets the updates with a status change that were committed."""
        ...

    def set_meta(self, key: str, value: str) -> None:
        """Record a fact about the running daemon."""
        ...

    def get_meta(self, key: str) -> str | None:
        """A fact recorded with set_meta."""
        ...


class OutboxStore(Protocol):
    """Webhook deliveries: claims, attempt results, reads and re-queues."""

    def claim_deliveries(
        self, now: datetime, limit: int, *, lease: float
    ) -> list[records.DeliveryJob]:
        """Take up to ``limit`` due deliveries for ``lease`` seconds."""
        ...

    def extend_claims(self, claims: Mapping[int, float], until: float) -> set[int]:
        """Move to ``until`` the leases still held under their tokens (id -> lease end);
        returns the ids moved."""
        ...

    def finish_attempts(self, results: Sequence[records.AttemptResult]) -> None:
        """Log attempts and move on the deliveries their claims still hold, in one
        transaction."""
        ...

    def next_delivery_at(self) -> datetime | None:
        """When the earliest pending delivery falls due."""
        ...

    def release_claims(self) -> int:
        """Free every delivery lease (a single daemon starting)."""
        ...

    def get_delivery(self, pk: int) -> records.DeliveryRecord | None:
        """One delivery with its attempt log."""
        ...

    def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        platform: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[records.DeliveryRecord], int | None]:
        """A page of deliveries, newest first, each with its attempt log."""
        ...

    def requeue(
        self,
        now: datetime,
        *,
        pk: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[int]:
        """Send deliveries again with their own ids; returns the ids re-queued."""
        ...


class Store(TaskStore, OutboxStore, Protocol):
    """Both sides, the figures and the health checks: what the API, the CLI and the daemon
    hold.
    """

    def stats(self) -> records.Stats:
        """Counts by platform and status, deliveries by state, the oldest pending delivery."""
        ...

    def ping(self) -> None:
        """Raise when the database cannot answer."""
        ...

    def close(self) -> None:
        """Release every pooled connection."""
        ...
