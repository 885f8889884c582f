"""How the API's HTTP server holds up against clients that connect and then say nothing.

uvicorn closes a connection that idles between requests (``timeout_keep_alive``) but not one
that never completes its first request head, and it accepts connections until the process
runs out of file descriptors; then /healthz cannot connect either. This protocol adds both
bounds: a deadline for every request head, and a cap on open connections that, when reached,
closes the connection that has waited longest without a complete request head to make room
for the new one (a client that sends a whole request promptly always gets served).
"""

from __future__ import annotations

import asyncio
import resource
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: seconds a connection may idle between requests (uvicorn's keep-alive timeout)
KEEP_ALIVE_TIMEOUT = 5
#: connections the kernel queues for us, and the most asyncio accepts in one go. asyncio
#: accepts a whole backlog's worth before any protocol sees one (so before the cap can act),
#: and on EMFILE it logs once per remaining slot: a small batch keeps the file descriptors
#: in use below the limit and the log quiet.
ACCEPT_BACKLOG = 128
#: file descriptors kept back from API connections for the database, relays and receivers
_RESERVED_FDS = 0.5
#: request handlers that run on threads at once (store calls, /metrics): the daemon sets
#: anyio's thread limiter to this and gives the API one pooled connection per thread, so a
#: burst of requests waits for a thread, never for a connection
API_THREADS = 16


def connection_cap(configured: int) -> int:
    """``configured``, lowered to half the process's open-files limit when that is smaller."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, int(soft * _RESERVED_FDS)))


def bounded_protocol(*, header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An h11 protocol class with a request-head deadline and a connection cap."""

    class BoundedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)  # type: ignore[arg-type]
            if len(self.connections) > max_connections:
                oldest = next(iter(waiting), None)
                if oldest is None:
                    # Every connection is busy with a request: refuse this one instead.
                    transport.close()
                    return
                oldest._stop_waiting()
                oldest.transport.close()
            self._await_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._stop_waiting()  # the head is in (or the connection is done with)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._await_head()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

        def _await_head(self) -> None:
            if self in waiting:
                return
            waiting[self] = None
            self._head_timer = self.loop.call_later(header_timeout, self._head_too_slow)

        def _stop_waiting(self) -> None:
            waiting.pop(self, None)
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_too_slow(self) -> None:
            # Closed without a word or a log line: a flood of these must not flood the journal.
            self._head_timer = None
            waiting.pop(self, None)
            if not self.transport.is_closing():
                self.transport.close()

        def __hash__(self) -> int:
            return id(self)

        def __eq__(self, other: Any) -> bool:
            return self is other

    #: connections waiting for a request head, oldest first (dicts keep insertion order)
    waiting: dict[BoundedH11Protocol, None] = {}
    return BoundedH11Protocol
