"""A typed client for apps that register tasks with tracker, and a webhook verifier.

    from tracker.client import TrackerClient, verify_webhook

    with TrackerClient("http://127.0.0.1:8686", token) as tracker:
        tracker.register("luma", ["f4b6403a-..."], metadata={"user": 42})
        task = tracker.get("luma", "f4b6403a-...")

    event = verify_webhook(secret, body, headers)  # in the app's webhook handler

`AsyncTrackerClient` has the same methods as coroutines. The API's errors arrive as
`TrackerError` subclasses carrying the status code, the message and the problems it named.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict, Field

from tracker import signing
from tracker.signing import InvalidSignature
from tracker.status import EventType, TaskStatus

__all__ = [
    "AsyncTrackerClient",
    "InvalidRequestError",
    "InvalidSignature",
    "NotFoundError",
    "Registered",
    "Task",
    "TaskPage",
    "TrackerClient",
    "TrackerError",
    "UnauthorizedError",
    "UnavailableError",
    "WebhookEvent",
    "verify_webhook",
]

DEFAULT_TIMEOUT = 10.0


class _Model(BaseModel):
    # Fields a newer tracker adds are ignored, so an older client keeps working.
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class Registered(_Model):
    """What a registration did: ids new to tracker, and ids it already tracked."""

    registered: list[str]
    existing: list[str]


class Transition(_Model):
    """One status change of a task."""

    from_: TaskStatus = Field(alias="from")
    to: TaskStatus
    upstream_status: str | None = None
    progress: int | None = None
    at: datetime


class Task(_Model):
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


class TaskPage(_Model):
    """A page of tasks, newest first; pass ``next_cursor`` to `list` for the next one."""

    tasks: list[Task]
    next_cursor: str | None = None


class WebhookData(_Model):
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


class WebhookEvent(_Model):
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


def _raise_for(response: httpx.Response) -> None:
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


def _registration(
    platform: str,
    ids: Sequence[str],
    *,
    webhook_url: str | None,
    endpoint: str | None,
    events: Sequence[str] | None,
    metadata: Mapping[str, Any] | None,
) -> dict[str, Any]:
    if isinstance(ids, str):
        # A bare string would register one id per character.
        raise TypeError("ids must be a sequence of task ids, not a string")
    body: dict[str, Any] = {"platform": platform, "ids": list(ids)}
    optional = {
        "webhook_url": webhook_url,
        "endpoint": endpoint,
        "events": list(events) if events is not None else None,
        "metadata": dict(metadata) if metadata is not None else None,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def _task_path(platform: str, task_id: str) -> str:
    # An id may hold "/" or "?": each is one escaped path segment.
    return f"/v1/tasks/{quote(platform, safe='')}/{quote(task_id, safe='')}"


def _query(
    status: str | None, platform: str | None, limit: int | None, cursor: str | None
) -> dict[str, str]:
    given = {"status": status, "platform": platform, "limit": limit, "cursor": cursor}
    return {k: str(v) for k, v in given.items() if v is not None}


def _client_options(base_url: str, token: str, timeout: float) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {token}"},
        "timeout": timeout,
    }


class TrackerClient:
    """The tracker API for an app, synchronously (httpx underneath)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(**_client_options(base_url, token, timeout), transport=transport)

    def register(
        self,
        platform: str,
        ids: Sequence[str],
        *,
        webhook_url: str | None = None,
        endpoint: str | None = None,
        events: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Registered:
        """Track ``ids`` (idempotent: ids already tracked come back in ``existing``)."""
        body = _registration(
            platform,
            ids,
            webhook_url=webhook_url,
            endpoint=endpoint,
            events=events,
            metadata=metadata,
        )
        response = self._http.post("/v1/tasks", json=body)
        _raise_for(response)
        return Registered.model_validate(response.json())

    def get(self, platform: str, task_id: str) -> Task:
        """One task with its history; NotFoundError when tracker does not know it."""
        response = self._http.get(_task_path(platform, task_id))
        _raise_for(response)
        return Task.model_validate(response.json())

    def list(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first."""
        response = self._http.get("/v1/tasks", params=_query(status, platform, limit, cursor))
        _raise_for(response)
        return TaskPage.model_validate(response.json())

    def remove(self, platform: str, task_id: str) -> None:
        """Stop tracking a task (no webhook follows); NotFoundError when it was not tracked."""
        _raise_for(self._http.delete(_task_path(platform, task_id)))

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


class AsyncTrackerClient:
    """The tracker API for an app, as coroutines (httpx underneath)."""

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            **_client_options(base_url, token, timeout), transport=transport
        )

    async def register(
        self,
        platform: str,
        ids: Sequence[str],
        *,
        webhook_url: str | None = None,
        endpoint: str | None = None,
        events: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> Registered:
        """Track ``ids`` (idempotent: ids already tracked come back in ``existing``)."""
        body = _registration(
            platform,
            ids,
            webhook_url=webhook_url,
            endpoint=endpoint,
            events=events,
            metadata=metadata,
        )
        response = await self._http.post("/v1/tasks", json=body)
        _raise_for(response)
        return Registered.model_validate(response.json())

    async def get(self, platform: str, task_id: str) -> Task:
        """One task with its history; NotFoundError when tracker does not know it."""
        response = await self._http.get(_task_path(platform, task_id))
        _raise_for(response)
        return Task.model_validate(response.json())

    async def list(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first."""
        params = _query(status, platform, limit, cursor)
        response = await self._http.get("/v1/tasks", params=params)
        _raise_for(response)
        return TaskPage.model_validate(response.json())

    async def remove(self, platform: str, task_id: str) -> None:
        """Stop tracking a task (no webhook follows); NotFoundError when it was not tracked."""
        _raise_for(await self._http.delete(_task_path(platform, task_id)))

    async def aclose(self) -> None:
        """Close the connections."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def verify_webhook(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    tolerance: float = signing.DEFAULT_TOLERANCE_SECONDS,
) -> WebhookEvent:
    """The event of a webhook whose Standard Webhooks signature matches ``secret``.

    Raises InvalidSignature (saying which check failed) for a missing, stale or wrong
    signature, and for a body that is not a tracker event.
    """
    when = time.time() if now is None else now
    signing.verify(secret, body, headers, now=when, tolerance=tolerance)
    webhook_id = {k.lower(): v for k, v in headers.items()}["webhook-id"]
    try:
        payload = json.loads(body)
        if isinstance(payload, dict):
            return WebhookEvent.model_validate({**payload, "webhook_id": webhook_id})
    except ValueError:
        pass
    # Signed with our secret yet not an event: a sender's bug, never to be acted on.
    raise InvalidSignature("the signed body is not a tracker event")
