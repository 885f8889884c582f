"""A small threaded HTTP server on loopback: what the simulated relay and the receiver share."""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, ClassVar, Self


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 makes bursts of new connections wait for SYN retries (~1 s).
    request_queue_size = 128
    owner: LoopbackServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client hanging up mid-answer is routine here (some tests do it on purpose);
        # anything else is a bug worth seeing.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class QuietHandler(BaseHTTPRequestHandler):
    """HTTP/1.1 keep-alive, no Nagle delay, no request log, connections tracked for stop()."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    # Buffered so the status line, headers and a small body leave in one send.
    wbufsize = 64 * 1024
    server: _Server

    def setup(self) -> None:
        """Register the connection so stop() can cut it."""
        super().setup()
        self.server.owner.track(self.connection, open_=True)

    def finish(self) -> None:
        """Forget the connection."""
        with contextlib.suppress(OSError):
            super().finish()
        self.server.owner.track(self.connection, open_=False)

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet: tests, benchmarks and the demo own stderr."""

    def _serve(self) -> None:
        raise NotImplementedError

    # Every method goes to _serve, so an unexpected one gets the server's own answer rather
    # than http.server's HTML 501.
    def do_GET(self) -> None:
        """Serve a GET."""
        self._serve()

    def do_POST(self) -> None:
        """Serve a POST."""
        self._serve()

    def do_PUT(self) -> None:
        """Serve a PUT."""
        self._serve()

    def do_PATCH(self) -> None:
        """Serve a PATCH."""
        self._serve()

    def do_DELETE(self) -> None:
        """Serve a DELETE."""
        self._serve()


class LoopbackServer:
    """Serves ``handler`` on ``host:port`` (port 0: any free one) in a background thread."""

    handler: ClassVar[type[QuietHandler]]
    #: what the server is called in error messages
    kind: ClassVar[str] = "server"

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    def start(self) -> Self:
        """Bind (the same port again after a stop) and serve in a background thread."""
        if self._server is not None:
            return self
        server = _Server((self.host, self._port), self.handler)
        server.owner = self
        self._port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections, so clients see the server go."""
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
        """The bound port."""
        if self._server is None:
            raise RuntimeError(f"the {self.kind} is not running; call start() first")
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.port}"

    def track(self, conn: socket.socket, *, open_: bool) -> None:
        """Remember or forget an open connection."""
        with self._lock:
            if open_:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)
