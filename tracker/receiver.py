"""A webhook receiver on loopback that records every request and can misbehave on purpose."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final, Self

CHUNK_SIZE: Final = 64 * 1024
# Statuses that carry no body, so no Content-Length either.
_BODILESS: Final = frozenset({204, 304})


@dataclass(frozen=True, slots=True)
class Reply:
    """How to answer one request: `delay` seconds late, with `body` or `body_size` filler bytes."""

    status: int = 204
    headers: Mapping[str, str] = field(default_factory=dict)
    body: bytes = b""
    delay: float = 0.0
    body_size: int | None = None


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


class _ReceiverHTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    receiver: WebhookReceiver

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up mid-answer is what some tests do on purpose.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _ReceiverHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # Buffered so the status line, headers and a small body leave in one send.
    wbufsize = CHUNK_SIZE
    server: _ReceiverHTTPServer

    def setup(self) -> None:
        super().setup()
        self.server.receiver._track(self.connection, open_=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.receiver._track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests and benchmarks own stderr."""

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_GET(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

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
        return self.rfile.read(length) if length > 0 else b""

    def _serve(self) -> None:
        body = self._read_body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        reply = self.server.receiver._take(self.command, self.path, headers, body)
        try:
            if reply.delay > 0:
                time.sleep(reply.delay)
            self._send(reply)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _send(self, reply: Reply) -> None:
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
        if reply.body_size is None:
            self.wfile.write(reply.body)
            return
        filler = b"x" * CHUNK_SIZE
        remaining = size
        while remaining > 0:
            self.wfile.write(filler[: min(remaining, CHUNK_SIZE)])
            remaining -= CHUNK_SIZE


class WebhookReceiver:
    """Records every request on 127.0.0.1 and answers from a queue of scripted replies.

    Replies queued with `reply` are consumed one per request; then `default` (204) answers.
    A request `verify` rejects gets 400 without consuming the queue. `record_limit` keeps only
    the newest N requests (for long benchmarks); `count` and `wait_for` still count them all.
    """

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
        self.host = host
        self.on_receive = on_receive
        self.default = Reply()
        self._port = port
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._replies: deque[Reply] = deque()
        self._received: deque[Received] = deque(maxlen=record_limit)
        self._count = 0
        self._server: _ReceiverHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind (the same port again after a stop) and serve in a background thread."""
        if self._server is not None:
            return self
        server = _ReceiverHTTPServer((self.host, self._port), _ReceiverHandler)
        server.receiver = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        server.shutdown()
        server.server_close()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        thread.join()
        self._server = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the webhook receiver is not running; call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/hooks"

    def _track(self, conn: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)

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
