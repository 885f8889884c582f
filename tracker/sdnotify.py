"""The systemd sd_notify protocol (readiness, status, watchdog) with the standard library only."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_loop"]


def _socket_address(raw: str) -> str | bytes | None:
    """Turn NOTIFY_SOCKET into an address for sendto; '@name' is an abstract socket."""
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    # systemd also allows vsock addresses; this daemon does not run in a VM guest, so ignore them.
    return None


def _watchdog_usec(environ: Mapping[str, str]) -> int | None:
    raw_usec = environ.get("WATCHDOG_USEC", "")
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid is not None:
        try:
            pid = int(raw_pid)
        except ValueError:
            return None
        # The watchdog belongs to another process (e.g. a wrapper that forked us).
        if pid != os.getpid():
            return None
    return usec


class Notifier:
    """Sends sd_notify datagrams to the service manager; a no-op without NOTIFY_SOCKET."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] = os.environ) -> Notifier:
        """Build a notifier from NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID."""
        address = _socket_address(environ.get("NOTIFY_SOCKET", ""))
        watchdog_usec = _watchdog_usec(environ) if address is not None else None
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        """True when a notification socket is configured."""
        return self._address is not None

    @property
    def watchdog_enabled(self) -> bool:
        """True when the service manager expects WATCHDOG=1 pings from this process."""
        return self._watchdog_usec is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WATCHDOG_USEC, as sd_watchdog_enabled(3) advises."""
        if self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def send(self, message: str) -> bool:
        """Send one raw datagram; False (never an exception) when it could not be sent."""
        if self._address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message.encode(), self._address)
        except (OSError, ValueError):
            # Notification is advisory: a broken socket must never take the daemon down.
            return False
        return True

    def notify(self, **fields: object) -> bool:
        """Send KEY=value lines, one per keyword argument, in a single datagram."""
        if self._address is None:
            return False
        lines = [f"{key}={_one_line(value)}" for key, value in fields.items()]
        return self.send("\n".join(lines))

    def ready(self) -> bool:
        """Tell systemd start-up (or a reload) is complete."""
        return self.notify(READY=1)

    def stopping(self) -> bool:
        """Tell systemd a graceful shutdown has begun."""
        return self.notify(STOPPING=1)

    def status(self, text: str) -> bool:
        """Set the free-form status line shown by systemctl status."""
        return self.notify(STATUS=text)

    def watchdog(self) -> bool:
        """Ping the watchdog."""
        return self.notify(WATCHDOG=1)

    def reloading(self) -> bool:
        """Tell systemd a reload started; MONOTONIC_USEC is required by Type=notify-reload."""
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec)


def _one_line(value: object) -> str:
    # A newline inside a value would start a new KEY=value assignment.
    return str(value).replace("\n", " ")


async def watchdog_loop(notifier: Notifier, interval: float) -> None:
    """Ping the watchdog every `interval` seconds from the event loop until cancelled.

    Running on the loop (not a thread) is the point: a wedged loop stops the pings and systemd
    restarts the service.
    """
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)
