"""Reading a relay's answer: within its time and size bounds, as strict JSON, with errors that
say what came back (and never the key the request carried)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Any, cast

import httpx

from tracker import sanitize


class UpstreamError(Exception):
    """The relay did not give a usable answer; no task changes and the ids are asked again."""

    def __init__(
        self, message: str, *, status_code: int | None = None, retry_after: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        #: the answer's Retry-After header as sent (a 429's, say), None without one
        self.retry_after = retry_after


async def read_bounded(
    client: httpx.AsyncClient, request: httpx.Request, deadline: float, max_bytes: int
) -> httpx.Response:
    """Send ``request`` and read its answer, all within ``deadline`` seconds and ``max_bytes``.

    httpx's own timeouts bound each read, so a body trickled a byte at a time would never
    time out; this bounds the whole exchange (httpx.ReadTimeout when it runs out). An answer
    declaring more than ``max_bytes`` is refused before its body is read, and one that turns
    out longer is cut off there (UpstreamError either way), so memory stays bounded too.
    """
    try:
        async with asyncio.timeout(deadline):
            response = await client.send(request, stream=True)
            try:
                body = await _read_limited(response, max_bytes)
            finally:
                await response.aclose()
    except TimeoutError:
        raise httpx.ReadTimeout(f"no whole answer within {deadline:g} s", request=request) from None
    # The body is decoded already; the rebuilt response must not decode it again.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in {"content-encoding", "content-length", "transfer-encoding"}
    ]
    return httpx.Response(response.status_code, headers=headers, content=body, request=request)


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UpstreamError(
            f"answer of {int(declared)} bytes is over the {max_bytes} byte limit",
            status_code=response.status_code,
        )
    body = bytearray()
    # aiter_bytes is an async generator (typed as a plain iterator); close it, do not leave it
    # to the garbage collector.
    chunks = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
    async with contextlib.aclosing(chunks) as stream:
        async for chunk in stream:
            body += chunk
            if len(body) > max_bytes:
                raise UpstreamError(
                    f"answer is over the {max_bytes} byte limit (cut off unread)",
                    status_code=response.status_code,
                )
    return bytes(body)


def read_json(response: httpx.Response) -> Any:
    """The decoded, cleaned JSON body of a 2xx answer, or UpstreamError saying what came back.

    A body whose Content-Type says it is something else (text/plain, text/html) is not read
    as JSON; nor is one that is not strict JSON (see `sanitize.loads`).
    """
    if not response.is_success:
        raise UpstreamError(
            f"HTTP {response.status_code}: {excerpt(response)}",
            status_code=response.status_code,
            retry_after=response.headers.get("retry-after"),
        )
    media_type = _media_type(response)
    if media_type and "json" not in media_type:
        raise UpstreamError(
            f"answer is not JSON but {media_type}: {excerpt(response)}",
            status_code=response.status_code,
        )
    try:
        return sanitize.loads(response.content)
    except sanitize.BadJSONError as exc:
        raise UpstreamError(
            f"answer is not JSON ({exc}): {excerpt(response)}", status_code=response.status_code
        ) from None


def try_json(response: httpx.Response) -> Any:
    """The decoded, cleaned JSON body whatever the HTTP status, None when it is not JSON."""
    media_type = _media_type(response)
    if media_type and "json" not in media_type:
        return None
    try:
        return sanitize.loads(response.content)
    except sanitize.BadJSONError:
        return None


def _media_type(response: httpx.Response) -> str:
    declared: str = response.headers.get("content-type", "")
    return declared.split(";", 1)[0].strip().lower()


def excerpt(response: httpx.Response) -> str:
    """The start of an answer for log lines, with the key the request carried redacted."""
    text = sanitize.excerpt(response.content, _request_secrets(response))
    return text if text else "(empty body)"


def _request_secrets(response: httpx.Response) -> list[str]:
    # A relay that echoes the request (some error pages do) echoes its key.
    try:
        headers = response.request.headers
    except RuntimeError:  # a response built without its request
        return []
    found = [headers.get("mj-api-secret", "")]
    authorization = headers.get("authorization", "")
    found.append(authorization.removeprefix("Bearer ").removeprefix("bearer "))
    return [secret for secret in found if secret]


def relay_message(response: httpx.Response, body: Any) -> str:
    """The relay's own error message in ``body`` (a new-api envelope's ``message``), with the
    key the request carried redacted: a relay refusing a key may quote it."""
    message = body.get("message") if isinstance(body, dict) else None
    if not message:
        return "(no message)"
    return sanitize.redact(str(message), _request_secrets(response))


def new_api_items(body: Any, response: httpx.Response) -> list[Any]:
    """The items of a new-api answer: the ``{code, message, data}`` envelope or a bare array.

    ``response`` is the answer ``body`` came in; its HTTP status goes with the UpstreamError
    raised, and its request's key never does.
    """
    status_code = response.status_code
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        raise UpstreamError(
            f"answer is neither an object nor an array: {type(body).__name__}",
            status_code=status_code,
        )
    code = body.get("code")
    if code != "success":
        raise UpstreamError(
            f"code {code!r}: {relay_message(response, body)}", status_code=status_code
        )
    data = body.get("data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise UpstreamError(
            f"'data' is {type(data).__name__}, not an array", status_code=status_code
        )
    return data
