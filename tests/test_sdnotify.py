"""Tests for tracker.sdnotify against real AF_UNIX datagram sockets."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tracker.sdnotify import Notifier, watchdog_loop


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: AF_UNIX paths are limited to 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(short_dir: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket playing systemd, and the NOTIFY_SOCKET value that reaches it."""
    path = str(short_dir / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(1.0)
    yield sock, path
    sock.close()


@pytest.fixture
def abstract_receiver() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound to an abstract name, and the '@name' NOTIFY_SOCKET for it."""
    name = f"tracker-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(1.0)
    yield sock, "@" + name
    sock.close()


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued on `sock`, without waiting."""
    received: list[bytes] = []
    sock.setblocking(False)
    try:
        while True:
            received.append(sock.recv(4096))
    except BlockingIOError:
        pass
    finally:
        sock.settimeout(1.0)
    return received


def test_without_notify_socket_everything_is_a_noop() -> None:
    """With no NOTIFY_SOCKET the notifier is disabled and every call returns False."""
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "100000"})
    assert not notifier.enabled
    assert not notifier.watchdog_enabled
    assert notifier.watchdog_interval() is None
    results = [
        notifier.ready(),
        notifier.stopping(),
        notifier.status("x"),
        notifier.watchdog(),
        notifier.reloading(),
        notifier.send("READY=1"),
        notifier.notify(READY=1),
    ]
    assert results == [False] * len(results)


def test_relative_notify_socket_is_ignored() -> None:
    """A NOTIFY_SOCKET that is neither absolute nor abstract (e.g. vsock:) disables notifying."""
    assert not Notifier.from_environ({"NOTIFY_SOCKET": "vsock:2:1234"}).enabled
    assert not Notifier.from_environ({"NOTIFY_SOCKET": ""}).enabled


def test_path_socket_receives_exact_datagrams(receiver: tuple[socket.socket, str]) -> None:
    """Each convenience method sends exactly the documented datagram to a filesystem socket."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.enabled

    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("polling 3 tasks")
    assert sock.recv(4096) == b"STATUS=polling 3 tasks"
    assert notifier.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    assert notifier.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_reloading_carries_monotonic_usec(receiver: tuple[socket.socket, str]) -> None:
    """RELOADING=1 is sent with MONOTONIC_USEC taken from CLOCK_MONOTONIC at the call."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    lines = sock.recv(4096).decode().split("\n")
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after
    assert len(lines) == 2

    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"


def test_abstract_socket_name_maps_to_leading_nul(
    abstract_receiver: tuple[socket.socket, str],
) -> None:
    """An '@name' NOTIFY_SOCKET reaches the socket bound to the abstract name NUL + name."""
    sock, notify_socket = abstract_receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": notify_socket})
    assert notifier.ready()
    assert sock.recv(4096) == b"READY=1"
    assert notifier.status("up")
    assert sock.recv(4096) == b"STATUS=up"


def test_notify_sends_all_fields_in_one_datagram(receiver: tuple[socket.socket, str]) -> None:
    """notify() joins its fields as KEY=value lines of a single datagram, newlines flattened."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    assert notifier.notify(READY=1, STATUS="line one\nline two")
    assert sock.recv(4096) == b"READY=1\nSTATUS=line one line two"
    assert drain(sock) == []


def test_missing_socket_path_returns_false(short_dir: Path) -> None:
    """Sending to a NOTIFY_SOCKET path that does not exist returns False instead of raising."""
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(short_dir / "absent.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_send_never_blocks_on_a_full_receiver(receiver: tuple[socket.socket, str]) -> None:
    """When the manager stops reading, sends fail fast with False rather than hanging."""
    _sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    results = [notifier.status(f"update {n}") for n in range(5000)]
    assert results[0] is True
    assert False in results


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    """WATCHDOG_USEC=100000 gives a 0.05 s ping interval when WATCHDOG_PID is absent or ours."""
    base = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "100000"}
    assert Notifier.from_environ(base).watchdog_interval() == pytest.approx(0.05)
    ours = Notifier.from_environ({**base, "WATCHDOG_PID": str(os.getpid())})
    assert ours.watchdog_enabled
    assert ours.watchdog_interval() == pytest.approx(0.05)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"WATCHDOG_PID": "1"}, id="pid-of-another-process"),
        pytest.param({"WATCHDOG_PID": "not-a-pid"}, id="garbage-pid"),
        pytest.param({"WATCHDOG_USEC": "0"}, id="zero-usec"),
        pytest.param({"WATCHDOG_USEC": "soon"}, id="garbage-usec"),
        pytest.param({"WATCHDOG_USEC": ""}, id="empty-usec"),
    ],
)
def test_watchdog_disabled_when_not_meant_for_us(extra: dict[str, str]) -> None:
    """A WATCHDOG_PID of another process, or an unusable WATCHDOG_USEC, disables the watchdog."""
    environ = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "100000", **extra}
    notifier = Notifier.from_environ(environ)
    assert notifier.enabled
    assert not notifier.watchdog_enabled
    assert notifier.watchdog_interval() is None


async def test_watchdog_loop_pings_at_the_interval(receiver: tuple[socket.socket, str]) -> None:
    """watchdog_loop sends WATCHDOG=1 every interval and stops once cancelled."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"})
    interval = notifier.watchdog_interval()
    assert interval == pytest.approx(0.05)

    task = asyncio.create_task(watchdog_loop(notifier, interval))
    await asyncio.sleep(0.23)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    pings = drain(sock)
    # One at start, then one per 0.05 s: at most 5 in 0.23 s, fewer if the loop runs late.
    assert set(pings) == {b"WATCHDOG=1"}
    assert 3 <= len(pings) <= 5

    await asyncio.sleep(0.12)
    assert drain(sock) == []


async def test_wedged_event_loop_stops_the_pings(receiver: tuple[socket.socket, str]) -> None:
    """While the event loop is blocked no WATCHDOG=1 is sent, which is what lets systemd notice."""
    sock, path = receiver
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": path})
    task = asyncio.create_task(watchdog_loop(notifier, 0.02))
    await asyncio.sleep(0)
    assert drain(sock) == [b"WATCHDOG=1"]

    # Deliberately blocks the loop, as a synchronous call gone wrong would.
    time.sleep(0.15)  # noqa: ASYNC251
    assert drain(sock) == []

    await asyncio.sleep(0.01)
    assert drain(sock) == [b"WATCHDOG=1"]
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
