"""A webhook receiver on loopback that records every request and can misbehave on purpose."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from tracker.testing.loopback import LoopbackServer, QuietHandler

CHUNK_SIZE: Final = 64 * 1024
# Statuses that carry no body, so no Content-Length either.
_BODILESS: Final = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Reply:
    """How to answer one request: `delay` seconds late, with `body` or `body_size` filler bytes,
    trickled out or not at all (`drop`)."""

    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    body_size: int | None = None
    #: seconds between two bytes of the body: an answer trickled out
    trickle: float = 0.0
    #: "reset" aborts the connection (TCP RST), "hang_up" closes it; neither answers
    drop: str | None = None


@dataclass(frozen=True, slots=True)
class Received:
    """One request as it arrived, how `verify` judged it, and the status we answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    verified: bool | None
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


Verify = Callable[[bytes, Mapping[str, str]], object]


class _ReceiverHandler(QuietHandler):
    @property
    def _owner(self) -> WebhookReceiver:
        return cast("WebhookReceiver", self.server.owner)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";", 1)[0], 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass  # trailers
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length > 0 else b""
        if len(body) < length:
            raise ConnectionError("client hung up in the middle of the body")
        return body

    def _serve(self) -> None:
        try:
            body = self._read_body()
        except ConnectionError:
            # A sender killed mid-request delivered nothing: record nothing, answer nothing.
            self.close_connection = True
            return
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self._owner._take(self.command, self.path, headers, body)
        try:
            if reply.delay > 0:
                time.sleep(reply.delay)
            self._send(reply)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _send(self, reply: Reply) -> None:
        if reply.drop is not None:
            if reply.drop == "reset":
                self.connection.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            self.close_connection = True
            return
        self.send_response(reply.status)
        for name, value in reply.headers.items():
            if name.lower() != "content-length":
                self.send_header(name, value)
        if reply.status in _BODILESS:
            self.end_headers()
            return
        size = reply.body_size if reply.body_size is not None else len(reply.body)
        self.send_header("Content-Length", str(size))
        self.end_headers()
        if reply.trickle > 0:
            for byte in reply.body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(reply.trickle)
            return
        if reply.body_size is None:
            self.wfile.write(reply.body)
            return
        filler = b"x" * CHUNK_SIZE
        remaining = size
        while remaining > 0:
            self.wfile.write(filler[: min(remaining, CHUNK_SIZE)])
            remaining -= CHUNK_SIZE


class WebhookReceiver(LoopbackServer):
    """Records every request on 127.0.0.1 and answers from a queue of scripted replies.

    Replies queued with `reply` are consumed one per request; then `default` (204) answers.
    A request `verify` rejects gets 400 without consuming the queue. `record_limit` keeps only
    the newest N requests (for long benchmarks); `count` and `wait_for` still count them all.
    """

    handler = _ReceiverHandler
    kind = "webhook receiver"

    def __init__(
        self,
        *,
        verify: Verify | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        on_receive: Callable[[Received], None] | None = None,
        record_limit: int | None = None,
    ) -> None:
        self.verify = verify
        self.on_receive = on_receive
        self.default = Reply()
        super().__init__(host=host, port=port)
        self._arrived = threading.Condition(self._lock)
        self._replies: deque[Reply] = deque()
        self._received: deque[Received] = deque(maxlen=record_limit)
        self._count = 0

    @property
    def url(self) -> str:
        return f"{self.base_url}/hooks"

    # -- scripting and inspection ----------------------------------------------------------

    def reply(self, *replies: Reply) -> None:
        """Queue replies for the next requests, in order."""
        with self._lock:
            self._replies.extend(replies)

    @property
    def received(self) -> list[Received]:
        with self._lock:
            return list(self._received)

    @property
    def count(self) -> int:
        """How many requests arrived since start or the last `clear`."""
        with self._lock:
            return self._count

    def clear(self) -> None:
        """Forget received requests and queued replies."""
        with self._lock:
            self._received.clear()
            self._replies.clear()
            self._count = 0

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Received]:
        """Block until at least `count` requests arrived; TimeoutError if they do not in time."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: self._count >= count, timeout):
                raise TimeoutError(
                    f"expected {count} webhook requests within {timeout}s, received {self._count}"
                )
            return list(self._received)

    def _take(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        """Judge, record and pick the reply for one request (called from handler threads)."""
        at = time.monotonic()
        verified: bool | None = None
        if self.verify is not None:
            try:
                self.verify(body, headers)
            except Exception:  # noqa: BLE001 - any failure to verify is a rejection
                verified = False
            else:
                verified = True
        with self._arrived:
            if verified is False:
                reply = Reply(status=400, body=b"signature verification failed")
            elif self._replies:
                reply = self._replies.popleft()
            else:
                reply = self.default
            received = Received(method, path, headers, body, at, verified, reply.status)
            self._received.append(received)
            self._count += 1
            self._arrived.notify_all()
        if self.on_receive is not None:
            self.on_receive(received)
        return reply
