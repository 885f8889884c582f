"""What `tracker.client` returns (pydantic models of the API's JSON and of webhook events) and
what it raises (`TrackerError` and a subclass per status the API answers with)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field

from tracker.status import EventType, TaskStatus


class Model(BaseModel):
    # Fields a newer tracker adds are ignored, so an older client keeps working.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Registered(Model):
    """What a registration did: ids new to tracker, and ids it already tracked."""

    registered: list[str]
    existing: list[str]


class Transition(Model):
    """One status change of a task."""

    from_: TaskStatus = Field(alias="from")
    to: TaskStatus
    upstream_status: str | None = None
    progress: int | None = None
    at: datetime


class Task(Model):
    """A tracked task as the API shows it (``transitions`` only from `get`)."""

    platform: str
    task_id: str
    status: TaskStatus
    upstream_status: str | None = None
    progress: int | None = None
    upstream_progress: str | None = None
    fail_reason: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    webhook_url: str | None = None
    endpoint: str | None = None
    events: list[EventType] | None = None
    result: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    transitions: list[Transition] = Field(default_factory=list)


class TaskPage(Model):
    """A page of tasks, newest first; pass ``next_cursor`` to `list` for the next one."""

    tasks: list[Task]
    next_cursor: str | None = None


class WebhookData(Model):
    """The task a webhook is about, as it was when the event happened."""

    platform: str
    task_id: str
    status: TaskStatus
    previous_status: TaskStatus
    upstream_status: str | None = None
    progress: int | None = None
    upstream_progress: str | None = None
    fail_reason: str = ""
    metadata: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    finished_at: datetime | None = None


class WebhookEvent(Model):
    """A verified webhook: its ``webhook_id`` is the same on every retry (de-duplicate on it)."""

    webhook_id: str
    type: EventType
    timestamp: datetime
    data: WebhookData


class TrackerError(Exception):
    """The API answered with an error: ``status_code``, its message and named problems."""

    def __init__(self, status_code: int, message: str, problems: Sequence[str] = ()) -> None:
        super().__init__(f"{status_code}: {message}" + "".join(f"\n  {p}" for p in problems))
        self.status_code = status_code
        self.message = message
        self.problems = list(problems)


class UnauthorizedError(TrackerError):
    """401: the token is missing or not one of `[server].api_tokens`."""


class NotFoundError(TrackerError):
    """404: tracker does not know this task."""


class InvalidRequestError(TrackerError):
    """422: the registration or query was refused; ``problems`` names each bad part."""


class UnavailableError(TrackerError):
    """503: the daemon is stopping or not ready; try again later."""


_ERRORS: Mapping[int, type[TrackerError]] = {
    401: UnauthorizedError,
    404: NotFoundError,
    422: InvalidRequestError,
    503: UnavailableError,
}


def raise_for(response: httpx.Response) -> None:
    """Nothing for a 2xx answer; otherwise the API's error as the TrackerError for its status."""
    if response.is_success:
        return
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        message = str(body.get("error") or response.reason_phrase)
        problems = [str(p) for p in body.get("problems") or ()]
    else:
        message, problems = response.reason_phrase or "error", []
    kind = _ERRORS.get(response.status_code, TrackerError)
    raise kind(response.status_code, message, problems)
