"""Reading a request body: JSON content types only, size-capped while it streams, strict JSON."""

from __future__ import annotations

import asyncio
import email.message
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request

from tracker.api import strict_json
from tracker.api.errors import ApiError
from tracker.api.state import services


def _is_json(content_type: str) -> bool:
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


async def read_json(request: Request, title: str) -> Any:
    """The request's body as strict JSON, or an ApiError naming what is wrong with it.

    A missing Content-Type is read as JSON (clients such as httpx send none for raw bytes);
    a declared one must be application/json or a +json type.
    """
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        raise ApiError(
            415, f"content type {content_type[:80]!r} is not JSON; send application/json"
        )
    settings = services(request).state.settings.server
    received = await read_capped(
        request, settings.max_body_bytes, settings.header_timeout, "[server].max_body_bytes"
    )
    try:
        return strict_json.parse(received)
    except strict_json.BodyError as exc:
        raise ApiError(422, title, problems=[f"body: {exc}"]) from None


async def read_capped(request: Request, cap: int, deadline: float, limit: str) -> bytes:
    """The request's whole body, or an ApiError: 413 (naming ``limit``) past ``cap`` bytes,
    declared or received, and 408 when it takes longer than ``deadline`` seconds.

    A declared Content-Length over the cap is refused before a byte is read; a chunked body,
    which declares none, is cut off as soon as it passes the cap.
    """
    too_big = ApiError(413, f"request body larger than {cap} bytes ({limit})")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > cap:
        raise too_big
    received = bytearray()
    # A body trickled or stalled holds a connection and a task; it gets as long as a head.
    try:
        async with asyncio.timeout(deadline):
            async for chunk in request.stream():
                received += chunk
                if len(received) > cap:  # a chunked body declares no length: stop here
                    raise too_big
    except TimeoutError:
        raise ApiError(408, f"request body not received within {deadline:g} s") from None
    return bytes(received)


def json_body(title: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency giving the strict JSON body; ``title`` heads a 422 answer."""

    async def dependency(request: Request) -> Any:
        return await read_json(request, title)

    return dependency
