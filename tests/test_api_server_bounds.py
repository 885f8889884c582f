"""The API server against clients that connect and then say nothing, over a real daemon:
idle and half-sent requests are closed, and a flood of them neither starves /healthz nor
floods the log.
"""

from __future__ import annotations

import contextlib
import resource
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import base_config, merge, toml_text
from test_e2e import start_daemon

from tracker.testing.daemon import Daemon

pytestmark = pytest.mark.e2e

#: the usual default open-files limit, under which the daemon must hold up
DAEMON_NOFILE = 1024
FLOOD = 1100
HALF_REQUEST = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


@contextlib.contextmanager
def open_files_limit(soft: int) -> Iterator[None]:
    """The soft RLIMIT_NOFILE of this process (and of what it starts) set to ``soft``."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before[1] != resource.RLIM_INFINITY and before[1] < soft:
        pytest.skip(f"the hard open-files limit {before[1]} is below the {soft} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@pytest.fixture(name="tracker_for")
def _tracker_for(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(**overrides: Any) -> Daemon:
        document = base_config("http://127.0.0.1:9", None, f"sqlite:///{tmp_path / 'db'}")
        config = tmp_path / "config.toml"
        config.write_text(toml_text(merge(document, {"poll": {"interval": 3600}, **overrides})))
        with open_files_limit(DAEMON_NOFILE):
            started.append(start_daemon(config))
        return started[-1]

    yield start
    for tracker in started:
        tracker.stop()
        tracker.client.close()


def connect(address: tuple[str, int], send: bytes) -> socket.socket:
    sock = socket.create_connection(address, timeout=5)
    if send:
        sock.sendall(send)
    return sock


def closed_by_peer(sock: socket.socket, within: float) -> bool:
    """Whether the server closes ``sock`` within ``within`` seconds."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_silent_and_half_sent_requests_are_closed_after_the_header_timeout(
    tracker_for: Callable[..., Daemon],
) -> None:
    """A connection that sends nothing, or half a request head, is closed once
    [server].header_timeout passes; a prompt request on a new connection is served.
    """
    tracker = tracker_for(server={"header_timeout": 1})
    address = ("127.0.0.1", int(tracker.api.rsplit(":", 1)[1]))
    silent, half = connect(address, b""), connect(address, HALF_REQUEST)
    with silent, half:
        assert 200 == httpx.get(f"{tracker.api}/healthz").status_code
        assert closed_by_peer(silent, within=4)
        assert closed_by_peer(half, within=4)


def test_a_flood_of_idle_connections_neither_starves_healthz_nor_floods_the_log(
    tracker_for: Callable[..., Daemon],
) -> None:
    """1,100 connections sending nothing or half a request, against a daemon limited to 1,024
    open files: /healthz keeps answering promptly and the log stays quiet.
    """
    tracker = tracker_for()
    address = ("127.0.0.1", int(tracker.api.rsplit(":", 1)[1]))
    lines_before = len(tracker.stdout) + len(tracker.stderr)
    flood: list[socket.socket] = []
    try:
        flood.extend(connect(address, HALF_REQUEST if n % 2 else b"") for n in range(FLOOD))
        started = time.monotonic()
        answers = [httpx.get(f"{tracker.api}/healthz", timeout=2).status_code for _ in range(20)]
        took = time.monotonic() - started
    finally:
        for sock in flood:
            sock.close()

    assert [200] * 20 == answers
    assert took < 10, f"20 health checks took {took:.1f} s"
    time.sleep(0.5)  # anything the flood made the daemon write has been written
    written = len(tracker.stdout) + len(tracker.stderr) - lines_before
    assert written < 20, tracker.tail()
    assert 200 == tracker.client.get("/healthz").status_code
