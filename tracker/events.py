"""Which webhook events a change fires, where they go, and the exact JSON they carry."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from tracker import clock, sanitize, signing, status
from tracker.config import WebhookSettings
from tracker.status import Change, EventType
from tracker.store.records import DueTask, OutboxEntry

#: resolved targets kept by a Targets (a dict lookup instead of sets and enums per change)
RESOLVED_KEPT = 4096


@dataclasses.dataclass(frozen=True, slots=True)
class Target:
    """Where a task's events go."""

    url: str
    endpoint: str | None  #: the [webhooks.endpoints.NAME] it belongs to; None for the default
    guarded: bool  #: the URL came through the API, so the SSRF guard applies
    events: frozenset[EventType]  #: events it wants besides the final ones, which always go


class Targets:
    """Resolves a task's webhook target from its registration and the settings."""

    def __init__(self, settings: WebhookSettings) -> None:
        self._settings = settings
        #: targets resolved so far: a drain resolves one per changed task, mostly the same few
        self._resolved: dict[tuple[str | None, str | None, tuple[str, ...] | None], Target | None]
        self._resolved = {}

    def resolve(
        self, webhook_url: str | None, endpoint: str | None, events: Sequence[str] | None
    ) -> Target | None:
        """The target for a registration (an empty ``url``: held until the config has one)."""
        key = (webhook_url, endpoint, None if events is None else tuple(events))
        if key in self._resolved:
            return self._resolved[key]
        if len(self._resolved) >= RESOLVED_KEPT:
            self._resolved.clear()  # per-task URLs: each differs, and none is worth keeping long
        target = self._resolved[key] = self._resolve(webhook_url, endpoint, events)
        return target

    def _resolve(
        self, webhook_url: str | None, endpoint: str | None, events: Sequence[str] | None
    ) -> Target | None:
        settings = self._settings
        if endpoint is not None:
            named = settings.endpoints.get(endpoint)
            if named is None:
                # The endpoint left the config after the task was registered: its events are
                # still written, addressed to the name alone, and the deliverer holds them
                # (failing, retried, then dead and recoverable) until the endpoint is back.
                url, guarded, wanted = "", False, set(settings.events)
            else:
                url, guarded = named.url, False
                wanted = set(named.events if named.events is not None else settings.events)
        elif webhook_url is not None:
            url, guarded, wanted = webhook_url, True, set(settings.events)
        elif settings.url is not None:
            url, guarded, wanted = settings.url, False, set(settings.events)
        else:
            # [webhooks].url left the config after the task was registered (a registration
            # names a target while there is none): its events are written all the same, and
            # held by the deliverer, as a gone endpoint's are, until the URL is back.
            url, guarded, wanted = "", False, set(settings.events)
        if events is not None:
            wanted &= set(events)
        return Target(
            url=url, endpoint=endpoint, guarded=guarded, events=frozenset(map(EventType, wanted))
        )

    def for_task(self, task: DueTask) -> Target | None:
        """The target of a claimed task."""
        return self.resolve(task.webhook_url, task.endpoint, task.events)


def wanted_events(change: Change, target: Target) -> list[EventType]:
    """The events of ``change`` this target receives: final events always, others on request."""
    return [e for e in change.events if e in target.events or e in status.FINAL_EVENT_TYPES]


def payload(task: DueTask, change: Change, event_type: EventType, now: datetime) -> bytes:
    """The webhook body: compact strict JSON, signed and sent byte for byte on every attempt."""
    after = change.after
    body: Mapping[str, Any] = {
        "type": event_type,
        "timestamp": clock.isoformat(now.replace(microsecond=0)),
        "data": {
            "platform": task.platform,
            "task_id": task.task_id,
            "status": after.status.value,
            "previous_status": change.before.status.value,
            "upstream_status": after.upstream_status,
            "progress": after.progress,
            "upstream_progress": after.upstream_progress,
            "fail_reason": after.fail_reason,
            "metadata": dict(task.metadata) if task.metadata is not None else {},
            "result": dict(change.result) if change.result is not None else None,
            "finished_at": clock.isoformat(now) if change.final else None,
        },
    }
    # Cleaned on the way out: metadata stored before it was validated (a lone surrogate,
    # a NaN) must still give strict JSON in UTF-8, never an error that stops the batch.
    return sanitize.dumps(body).encode()


def outbox_entries(
    task: DueTask, change: Change, target: Target | None, now: datetime
) -> tuple[OutboxEntry, ...]:
    """The outbox rows a change writes, one per event the target wants."""
    if target is None:
        return ()
    return tuple(
        OutboxEntry(
            webhook_id=signing.new_message_id(),
            event_type=event_type,
            payload=payload(task, change, event_type, now),
            url=target.url,
            endpoint=target.endpoint,
            guarded=target.guarded,
        )
        for event_type in wanted_events(change, target)
    )
