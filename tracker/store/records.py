"""The values that cross the store boundary (plain frozen dataclasses, no SQL)."""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

from tracker.retry import DeliveryState
from tracker.status import Change, EventType, Snapshot


class Keep(enum.Enum):
    """Marker for "leave this column as it is"."""

    KEEP = enum.auto()


KEEP = Keep.KEEP


@dataclasses.dataclass(frozen=True, slots=True)
class Registration:
    """A validated request to track ids of one platform."""

    platform: str
    ids: Sequence[str]
    webhook_url: str | None = None
    endpoint: str | None = None
    events: tuple[EventType, ...] | None = None
    metadata: Mapping[str, Any] | None = None


@dataclasses.dataclass(eq=False, slots=True)
class Claim:
    """One claim's hold on its tasks: each one's next poll is ``until`` until it is recorded.

    ``until`` is also the claim's token (record() writes a task only while its next poll still
    equals it). The poller renews the claims it still works on (renew_claim moves ``until``),
    so a lease can be short: a daemon that dies lets its claims lapse within one lease.
    """

    until: float
    pks: tuple[int, ...]
    #: its tasks a renewal found taken by another claim (this one had lapsed): not to be asked
    lost: set[int] = dataclasses.field(default_factory=set)


class DueTask(NamedTuple):
    """A task claimed for one poll, with what the poller needs to decide and to notify.

    A NamedTuple rather than a frozen dataclass: a claim builds thousands a second, and a
    frozen dataclass's __init__ costs five times as much.
    """

    pk: int
    platform: str
    task_id: str
    snapshot: Snapshot
    created_at: datetime
    missing_since: float | None
    webhook_url: str | None
    endpoint: str | None
    events: tuple[EventType, ...] | None
    metadata: Mapping[str, Any] | None
    #: epoch seconds the poll was planned for (the next one is planned from it, not from now)
    planned: float = 0.0
    #: epoch seconds of the last status or progress move, for the back-off
    last_change_at: float = 0.0
    #: the claim that holds the task; record() writes the task only while it still holds it
    claim: Claim | None = None

    @property
    def lease_until(self) -> float | None:
        """Epoch seconds the task's claim lasts (None: not claimed)."""
        return None if self.claim is None else self.claim.until


@dataclasses.dataclass(frozen=True, slots=True)
class OutboxEntry:
    """A webhook event to deliver, written in the same transaction as the change behind it."""

    webhook_id: str
    event_type: EventType
    payload: bytes
    url: str
    endpoint: str | None
    guarded: bool


@dataclasses.dataclass(frozen=True, slots=True)
class TaskUpdate:
    """What one poll decided for one task."""

    task: DueTask
    change: Change | None = None
    outbox: tuple[OutboxEntry, ...] = ()
    missing_since: float | Keep | None = KEEP
    #: epoch seconds of the next poll, when the upstream hinted at one
    next_poll_at: float | Keep = KEEP
    #: epoch seconds of the next poll should the database refuse this update (the task is
    #: set aside until then); None leaves the task to be claimed again when its claim ends
    set_aside_until: float | None = None


class Replan(NamedTuple):
    """A poll whose answer moved nothing: only its task's next poll is written, while the
    claim that asked still holds the task (a tuple, as a drain makes one per polled task)."""

    next_poll_at: float
    pk: int
    #: the claim's token: the row is written only while its next poll still equals it
    lease_until: float


@dataclasses.dataclass(frozen=True, slots=True)
class Transition:
    """One row of a task's status history."""

    from_status: str
    to_status: str
    upstream_status: str | None
    progress: int | None
    at: datetime


@dataclasses.dataclass(frozen=True, slots=True)
class TaskRecord:
    """A stored task as the API and the CLI show it."""

    platform: str
    task_id: str
    status: str
    upstream_status: str | None
    progress: int | None
    upstream_progress: str | None
    fail_reason: str
    metadata: Mapping[str, Any] | None
    webhook_url: str | None
    endpoint: str | None
    events: tuple[EventType, ...] | None
    result: Mapping[str, Any] | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    transitions: tuple[Transition, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryJob:
    """A claimed delivery, ready to sign and send."""

    pk: int
    webhook_id: str
    task_pk: int
    platform: str
    task_id: str
    event_type: EventType
    payload: bytes
    url: str
    endpoint: str | None
    guarded: bool
    attempts: int
    #: epoch seconds the claim lasts, its token: finish_attempts moves the delivery on only
    #: while the claim still holds it, and extend_claims renews it only then
    lease_until: float | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class AttemptResult:
    """What one attempt produced and what happens next (decided by the retry policy)."""

    job: DeliveryJob
    at: datetime
    status_code: int | None
    error: str | None
    latency_ms: float
    response_excerpt: str
    state: DeliveryState
    next_attempt_at: float | None


@dataclasses.dataclass(frozen=True, slots=True)
class Attempt:
    """One row of the delivery log."""

    at: datetime
    url: str
    status_code: int | None
    error: str | None
    latency_ms: float
    response_excerpt: str


@dataclasses.dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """A delivery as the API and the CLI show it."""

    id: int
    webhook_id: str
    platform: str
    task_id: str
    event_type: EventType
    url: str
    endpoint: str | None
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None
    created_at: datetime
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    delivered_at: datetime | None
    log: tuple[Attempt, ...] = ()
    #: sent to its registration's own webhook_url, as stored (else to a target the config
    #: names now: see `tracker.delivery.sending.target_now`)
    guarded: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class Stats:
    """Counts for `tracker stats`, /metrics and the systemd status line."""

    tasks: Mapping[tuple[str, str], int]  #: (platform, status) -> count
    deliveries: Mapping[DeliveryState, int]
    oldest_pending_delivery: datetime | None
    #: when the earliest live task is due for a poll (None when no task is live)
    earliest_poll: datetime | None = None
