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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import httpx

from tracker import signing
from tracker.client_types import (
    InvalidRequestError,
    Model,
    NotFoundError,
    Registered,
    Task,
    TaskPage,
    TrackerError,
    Transition,
    UnauthorizedError,
    UnavailableError,
    WebhookData,
    WebhookEvent,
    raise_for,
)
from tracker.paths import segment
from tracker.signing import InvalidSignature

# The models and errors live in client_types; apps know them from here.
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
    "Transition",
    "UnauthorizedError",
    "UnavailableError",
    "WebhookData",
    "WebhookEvent",
    "verify_webhook",
]

DEFAULT_TIMEOUT = 10.0

T = TypeVar("T")
M = TypeVar("M", bound=Model)


def _task_path(platform: str, task_id: str) -> str:
    # An id may hold "/" or "?", or be "..": each is one escaped path segment.
    return f"/v1/tasks/{segment(platform)}/{segment(task_id)}"


def _client_options(base_url: str, token: str, timeout: float) -> dict[str, Any]:
    return {
        "base_url": base_url,
        "headers": {"Authorization": f"Bearer {token}"},
        "timeout": timeout,
    }


@dataclass(frozen=True, slots=True)
class _Call(Generic[T]):
    """One API request and how to read its answer; both clients send these, each its own way."""

    method: str
    path: str
    read: Callable[[httpx.Response], T]
    json: Any = None
    params: Mapping[str, str] | None = None

    def answer(self, response: httpx.Response) -> T:
        """The answer read, or the API's error raised as a TrackerError."""
        raise_for(response)
        return self.read(response)


def _model(kind: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: kind.model_validate(response.json())


def _nothing(_response: httpx.Response) -> None:
    return None


class _Calls:
    """The requests behind the clients' methods (same names, same arguments), with no I/O."""

    @staticmethod
    def register(
        platform: str,
        ids: Sequence[str],
        *,
        webhook_url: str | None,
        endpoint: str | None,
        events: Sequence[str] | None,
        metadata: Mapping[str, Any] | None,
    ) -> _Call[Registered]:
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
        return _Call("POST", "/v1/tasks", _model(Registered), json=body)

    @staticmethod
    def get(platform: str, task_id: str) -> _Call[Task]:
        return _Call("GET", _task_path(platform, task_id), _model(Task))

    @staticmethod
    def list(
        status: str | None, platform: str | None, limit: int | None, cursor: str | None
    ) -> _Call[TaskPage]:
        given = {"status": status, "platform": platform, "limit": limit, "cursor": cursor}
        params = {k: str(v) for k, v in given.items() if v is not None}
        return _Call("GET", "/v1/tasks", _model(TaskPage), params=params)

    @staticmethod
    def remove(platform: str, task_id: str) -> _Call[None]:
        return _Call("DELETE", _task_path(platform, task_id), _nothing)


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

    def _send(self, call: _Call[T]) -> T:
        response = self._http.request(call.method, call.path, json=call.json, params=call.params)
        return call.answer(response)

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
        call = _Calls.register(
            platform,
            ids,
            webhook_url=webhook_url,
            endpoint=endpoint,
            events=events,
            metadata=metadata,
        )
        return self._send(call)

    def get(self, platform: str, task_id: str) -> Task:
        """One task with its history; NotFoundError when tracker does not know it."""
        return self._send(_Calls.get(platform, task_id))

    def list(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first."""
        return self._send(_Calls.list(status, platform, limit, cursor))

    def remove(self, platform: str, task_id: str) -> None:
        """Stop tracking a task (no webhook follows); NotFoundError when it was not tracked."""
        self._send(_Calls.remove(platform, task_id))

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

    async def _send(self, call: _Call[T]) -> T:
        response = await self._http.request(
            call.method, call.path, json=call.json, params=call.params
        )
        return call.answer(response)

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
        call = _Calls.register(
            platform,
            ids,
            webhook_url=webhook_url,
            endpoint=endpoint,
            events=events,
            metadata=metadata,
        )
        return await self._send(call)

    async def get(self, platform: str, task_id: str) -> Task:
        """One task with its history; NotFoundError when tracker does not know it."""
        return await self._send(_Calls.get(platform, task_id))

    async def list(
        self,
        *,
        status: str | None = None,
        platform: str | None = None,
        limit: int | None = None,
        cursor: str | None = None,
    ) -> TaskPage:
        """A page of tasks, newest first."""
        return await self._send(_Calls.list(status, platform, limit, cursor))

    async def remove(self, platform: str, task_id: str) -> None:
        """Stop tracking a task (no webhook follows); NotFoundError when it was not tracked."""
        await self._send(_Calls.remove(platform, task_id))

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
