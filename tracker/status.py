"""The tracker's task statuses and the rules that move a task between them (pure: no I/O)."""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Mapping
from typing import Any


class TaskStatus(enum.StrEnum):
    """The tracker's own, normalised status of a task."""

    PENDING = "pending"  #: registered, not yet reported by the upstream
    QUEUED = "queued"  #: accepted upstream, waiting to run
    IN_PROGRESS = "in_progress"  #: running upstream
    COMPLETED = "completed"  #: finished with a result (final)
    FAILED = "failed"  #: finished without a result, or given up on (final)
    CANCELED = "canceled"  #: canceled upstream (final)


FINAL: frozenset[TaskStatus] = frozenset(
    {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELED}
)

# Statuses only move forward: a relay that reports QUEUED after IN_PROGRESS (a retry inside the
# vendor, a stale replica) must not make the task look younger than it was.
_RANK: Mapping[TaskStatus, int] = {
    TaskStatus.PENDING: 0,
    TaskStatus.QUEUED: 1,
    TaskStatus.IN_PROGRESS: 2,
    TaskStatus.COMPLETED: 3,
    TaskStatus.FAILED: 3,
    TaskStatus.CANCELED: 3,
}


class EventType(enum.StrEnum):
    """The webhook events a change of a task can fire; the value is the payload's ``type``."""

    STARTED = "task.started"  #: first move into in_progress (sent on request)
    PROGRESS = "task.progress"  #: progress changed without a status move (sent on request)
    COMPLETED = "task.completed"  #: moved into completed (always sent)
    FAILED = "task.failed"  #: moved into failed (always sent)
    CANCELED = "task.canceled"  #: moved into canceled (always sent)


FINAL_EVENTS: Mapping[TaskStatus, EventType] = {
    TaskStatus.COMPLETED: EventType.COMPLETED,
    TaskStatus.FAILED: EventType.FAILED,
    TaskStatus.CANCELED: EventType.CANCELED,
}
ALL_EVENTS: frozenset[EventType] = frozenset(EventType)
#: the events every target receives, wanted or not
FINAL_EVENT_TYPES: frozenset[EventType] = frozenset(FINAL_EVENTS.values())


def can_move(old: TaskStatus, new: TaskStatus) -> bool:
    """Whether a task in ``old`` may move to ``new`` (a final status never moves)."""
    if old in FINAL or old == new:
        return False
    return _RANK[new] > _RANK[old]


_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%?\s*$")


def parse_progress(raw: object, *, fraction: bool = False) -> int | None:
    """Turn an upstream progress value into an integer 0-100, or None when absent or unparsable.

    Relays send "45%", some send 45, Runway sends 0.45 (``fraction=True`` says the number is a
    fraction of one), a failed Midjourney task sends "".
    """
    if raw is None or isinstance(raw, bool):
        return None
    value: float
    if isinstance(raw, int | float):
        value = float(raw)
        if fraction:
            value *= 100
    elif isinstance(raw, str):
        match = _PERCENT.match(raw)
        if match is None:
            return None
        value = float(match.group(1))
        if fraction and not raw.strip().endswith("%"):
            value *= 100
    else:
        return None
    if not math.isfinite(value):
        return None
    return max(0, min(100, int(value)))


def raw_progress(raw: object) -> str | None:
    """The upstream progress as text for ``upstream_progress`` (None when absent)."""
    if raw is None:
        return None
    return raw if isinstance(raw, str) else str(raw)


@dataclasses.dataclass(frozen=True, slots=True)
class Observation:
    """What the upstream said about one task in one answer."""

    task_id: str
    upstream_status: str  #: the word as the upstream sent it
    status: TaskStatus | None  #: the normalised status; None when the word is not in the table
    progress: int | None = None
    upstream_progress: str | None = None
    fail_reason: str = ""
    result: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    wait_hint: float | None = None  #: seconds the upstream expects the task still needs


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The parts of a stored task that observations can change."""

    status: TaskStatus
    upstream_status: str | None = None
    progress: int | None = None
    upstream_progress: str | None = None
    fail_reason: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class Change:
    """A decided change of one task: what it was, what it becomes, and which events that fires."""

    before: Snapshot
    after: Snapshot
    result: Mapping[str, Any] | None  #: the upstream item, when the observation carried one
    events: tuple[EventType, ...]

    @property
    def moved(self) -> bool:
        """Whether the status itself changed (a transition row is written)."""
        return self.before.status != self.after.status

    @property
    def final(self) -> bool:
        """Whether this change finishes the task."""
        return self.after.status in FINAL


def _events(before: Snapshot, after: Snapshot) -> tuple[EventType, ...]:
    events: list[EventType] = []
    if before.status != after.status:
        # A status event carries the progress too, so no separate task.progress for it.
        if after.status == TaskStatus.IN_PROGRESS:
            events.append(EventType.STARTED)
        elif after.status in FINAL:
            events.append(FINAL_EVENTS[after.status])
    elif after.progress != before.progress and after.progress is not None:
        events.append(EventType.PROGRESS)
    return tuple(events)


def apply(current: Snapshot, observation: Observation) -> Change | None:
    """Decide what one observation does to a task; None when nothing is to be written.

    Final statuses stay final whatever the upstream says later. A word outside the platform's
    table (``observation.status is None``) changes no status but is kept as ``upstream_status``.
    """
    if current.status in FINAL:
        return None
    status = current.status
    if observation.status is not None and can_move(current.status, observation.status):
        status = observation.status
    progress = observation.progress
    upstream_progress = observation.upstream_progress
    if status == TaskStatus.COMPLETED and progress is None:
        progress = 100
    failing = status in (TaskStatus.FAILED, TaskStatus.CANCELED)
    fail_reason = observation.fail_reason if failing else current.fail_reason
    if progress is None and status not in FINAL:
        # An answer without progress does not erase what an earlier one said.
        progress, upstream_progress = current.progress, current.upstream_progress
    if (
        status is current.status
        and observation.upstream_status == current.upstream_status
        and progress == current.progress
        and upstream_progress == current.upstream_progress
        and fail_reason == current.fail_reason
    ):
        return None  # most answers: nothing moved (no Snapshot built to find that out)
    after = Snapshot(
        status=status,
        upstream_status=observation.upstream_status,
        progress=progress,
        upstream_progress=upstream_progress,
        fail_reason=fail_reason,
    )
    if after == current:
        return None
    return Change(
        before=current,
        after=after,
        result=observation.result or None,
        events=_events(current, after),
    )


def give_up(current: Snapshot, reason: str) -> Change | None:
    """Fail a task that is not final any more, with ``reason`` (None when already final)."""
    if current.status in FINAL:
        return None
    after = dataclasses.replace(current, status=TaskStatus.FAILED, fail_reason=reason)
    return Change(before=current, after=after, result=None, events=_events(current, after))
