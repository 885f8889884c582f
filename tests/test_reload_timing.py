"""When a reload (SIGHUP) happens and what it can change: one asked for while the daemon starts
waits until it has started (its READY=1 after the start's), one asked for while it stops is
ignored, and a key the environment overrides keeps the environment's value, with a warning
naming the key and the variable when the file's value for it was edited."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import WEBHOOK_SECRET, RecordingNotifier, eventually, merge, toml_text

from tracker import config, sdnotify, signing
from tracker.app import Daemon

#: what a notify socket hears that tells systemd about start, reload and stop
LIFECYCLE = ("READY=1", "RELOADING=1", "STOPPING=1")


@pytest.fixture(name="notify_socket")
def _notify_socket() -> Iterator[socket.socket]:
    """A bound datagram socket playing systemd (short path: AF_UNIX allows 108 bytes)."""
    directory = Path(tempfile.mkdtemp(prefix="sdn-", dir="/tmp"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(directory / "notify.sock"))
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


def heard(sock: socket.socket) -> list[str]:
    """The first line of each lifecycle datagram already queued on ``sock``, in order."""
    received: list[str] = []
    sock.setblocking(False)
    try:
        while True:
            received.append(sock.recv(4096).decode().split("\n")[0])
    except BlockingIOError:
        pass
    return [m for m in received if m in LIFECYCLE]


class HeldStart:
    """Holds a daemon's start in its database step (the store's release of its leases, on a
    worker thread) until the test lets it go."""

    def __init__(self, daemon: Daemon, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reached = threading.Event()
        self.go = threading.Event()
        release = daemon.parts.store.release_claims

        def held() -> int:
            self.reached.set()
            self.go.wait(10)  # bounded: a failing test must not hang
            return release()

        monkeypatch.setattr(daemon.parts.store, "release_claims", held)


@pytest.fixture(name="running")
async def _running(
    tmp_path: Path,
    document: dict[str, Any],
    notify_socket: socket.socket,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Daemon, HeldStart, asyncio.Task[None]]]:
    """``Daemon.run()`` (its signal handlers installed) held mid-start, its config file at
    tmp_path/tracker.toml and its notifications going to ``notify_socket``."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    notifier = sdnotify.Notifier.from_environ({"NOTIFY_SOCKET": notify_socket.getsockname()})
    daemon = Daemon(config.load(path, environ={}), config_path=path, notifier=notifier)
    hold = HeldStart(daemon, monkeypatch)
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.to_thread(hold.reached.wait, 10)
        assert hold.reached.is_set(), "the start never reached its database step"
        yield daemon, hold, task
    finally:
        hold.go.set()
        daemon.parts.stop.set()
        await asyncio.wait_for(task, 30)


def events(logged: list[dict[str, Any]]) -> list[str]:
    return [str(e["event"]) for e in logged]


async def handled(logged: list[dict[str, Any]], what: str) -> None:
    """Wait until the loop has run the SIGHUP handler: it logs at once, whatever it does."""
    await eventually(lambda: any(e.startswith("reload") for e in events(logged)), 5, what)


async def test_a_sighup_during_start_is_applied_once_started(
    running: tuple[Daemon, HeldStart, asyncio.Task[None]],
    document: dict[str, Any],
    notify_socket: socket.socket,
) -> None:
    """`systemctl reload` right after `start`: the start's READY=1 comes first, alone; the
    reload follows it (RELOADING=1, READY=1), after `started`, and its change is in force."""
    daemon, hold, _task = running
    assert daemon.config_path is not None
    daemon.config_path.write_text(toml_text(merge(document, {"poll": {"interval": 0.5}})))

    with structlog.testing.capture_logs() as logged:
        os.kill(os.getpid(), signal.SIGHUP)
        await handled(logged, "the SIGHUP sent while starting")
        assert [] == heard(notify_socket)  # nothing said before the start is done
        hold.go.set()
        await eventually(lambda: "reloaded" in events(logged), 10, "the held reload")

    assert ["READY=1", "RELOADING=1", "READY=1"] == heard(notify_socket)
    order = events(logged)
    assert order.index("started") < order.index("reloaded")
    assert 1 == order.count("reloaded")
    assert 0.5 == daemon.settings.poll.interval
    assert 0.5 == daemon.parts.poller.settings.interval


async def test_a_sighup_during_a_start_that_is_then_stopped_sends_no_second_ready(
    running: tuple[Daemon, HeldStart, asyncio.Task[None]],
    notify_socket: socket.socket,
) -> None:
    """SIGHUP then SIGTERM while starting: the start's READY=1, then STOPPING=1; the held
    reload is dropped (the daemon is stopping) without RELOADING=1 or a second READY=1."""
    _daemon, hold, task = running

    with structlog.testing.capture_logs() as logged:
        os.kill(os.getpid(), signal.SIGHUP)
        await handled(logged, "the SIGHUP sent while starting")
        os.kill(os.getpid(), signal.SIGTERM)
        hold.go.set()
        await asyncio.wait_for(task, 30)

    assert ["READY=1", "STOPPING=1"] == heard(notify_socket)
    assert "reloaded" not in events(logged)
    assert "reload_ignored" in events(logged)


@pytest.fixture(name="started_with_env", params=["process", "given"])
async def _started_with_env(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    document: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Callable[[dict[str, str]], Any]]:
    """Starts a daemon, config file tmp_path/tracker.toml, whose environment holds the given
    variables: the process's own (as under systemd), or given to it as ``environ``. Stops it
    after the test."""
    made: list[Daemon] = []

    async def start(variables: dict[str, str]) -> Daemon:
        path = tmp_path / "tracker.toml"
        path.write_text(toml_text(document))
        if request.param == "process":
            for name, value in variables.items():
                monkeypatch.setenv(name, value)
            daemon = Daemon(config.load(path), config_path=path, notifier=RecordingNotifier())
        else:
            settings = config.load(path, environ=variables)
            daemon = Daemon(
                settings, config_path=path, notifier=RecordingNotifier(), environ=variables
            )
        made.append(daemon)
        await daemon.start()
        return daemon

    yield start
    for daemon in made:
        await daemon.stop()


@dataclasses.dataclass(frozen=True)
class Override:
    """An environment variable, the key it overrides and three values of that key."""

    variable: str
    key: str
    in_file: str  #: the file's value at start
    edited: str  #: the file's value after the edit
    in_env: str  #: the variable's value


OVERRIDES = [
    Override(
        "TRACKER_WEBHOOKS_SECRET",
        "webhooks.secret",
        WEBHOOK_SECRET,
        signing.new_secret(),
        signing.new_secret(),
    ),
    Override("TRACKER_UPSTREAM_API_KEY", "upstream.api_key", "sk-sim", "sk-edited-1", "sk-env-7"),
]


@pytest.mark.parametrize("case", OVERRIDES, ids=[o.variable for o in OVERRIDES])
async def test_an_edit_the_environment_overrides_is_named_on_reload(
    started_with_env: Callable[[dict[str, str]], Any], document: dict[str, Any], case: Override
) -> None:
    """The file's value of a key the environment overrides is edited, then reloaded: a warning
    names the key and the variable (no value), the environment's value stays in force. A
    reload with that key unchanged says nothing of it."""
    variable, key, edited, in_env = case.variable, case.key, case.edited, case.in_env
    daemon: Daemon = await started_with_env({variable: in_env})
    section, name = key.split(".")

    def in_force() -> str:
        value: Any = getattr(getattr(daemon.settings, section), name)
        return str(value.get_secret_value())

    assert in_env == in_force()
    assert daemon.config_path is not None
    daemon.config_path.write_text(toml_text(merge(document, {"poll": {"interval": 0.5}})))
    with structlog.testing.capture_logs() as untouched:
        daemon.reload()
    assert "reloaded" in events(untouched)
    assert "env_override_kept" not in events(untouched)

    daemon.config_path.write_text(
        toml_text(merge(document, {"poll": {"interval": 0.5}, section: {name: edited}}))
    )
    with structlog.testing.capture_logs() as logged:
        daemon.reload()

    (warning,) = [e for e in logged if e["event"] == "env_override_kept"]
    assert ("warning", key, variable) == (warning["log_level"], warning["key"], warning["variable"])
    assert "restart" in warning["hint"]
    assert "reloaded" in events(logged)
    text = repr(logged)
    for value in (case.in_file, edited, in_env):
        assert value not in text
    assert in_env == in_force()
    if key == "webhooks.secret":
        assert in_env == daemon.parts.deliverer.secrets_for(None)[0]

    with structlog.testing.capture_logs() as again:
        daemon.reload()  # the same file again: that edit was named once
    assert "env_override_kept" not in events(again)
