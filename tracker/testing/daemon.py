"""The real `tracker run` process for end-to-end tests: start it, read its log lines, kill it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

import httpx

#: how long a started process may take to log `started` (imports dominate, on a busy machine)
START_TIMEOUT = 20.0
#: environment variables a test's tracker must not inherit
_DROPPED_ENV = ("TRACKER_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM", "INVOCATION_ID")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without tracker or systemd variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_DROPPED_ENV)}
    env.update(extra)
    return env


class Daemon:
    """One `python -m tracker run --config PATH` process, its output, and an API client."""

    def __init__(
        self,
        config: Path,
        *,
        token: str,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        """Start it; ``env`` replaces `clean_env()`, and with TRACKER_CONFIG in it, --config
        is left out so the path comes from there."""
        self.config = config
        flag = [] if env and "TRACKER_CONFIG" in env else ["--config", str(config)]
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [sys.executable, "-m", "tracker", "run", *flag],
            cwd=cwd,
            env=dict(env) if env is not None else clean_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._arrived = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        started = self.wait_for_log(lambda e: e.get("event") == "started", start_timeout)
        self.api: str = started["api"]
        self.client = httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    @property
    def pid(self) -> int:
        """The process id."""
        return self.proc.pid

    def _read(self, stream: IO[bytes], into: list[str]) -> None:
        for raw in stream:
            with self._arrived:
                into.append(raw.decode(errors="replace").rstrip("\n"))
                self._arrived.notify_all()

    @property
    def events(self) -> list[dict[str, Any]]:
        """Every stdout line that is a JSON log event."""
        with self._arrived:
            lines = list(self.stdout)
        found = []
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def output(self) -> str:
        """Everything written to stdout and stderr so far."""
        with self._arrived:
            return "\n".join([*self.stdout, *self.stderr])

    def wait_for_log(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first log event ``match`` accepts, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        with self._arrived:
            while True:
                for event in self.events:
                    if match(event):
                        return event
                left = deadline - time.monotonic()
                gone = self.proc.poll() is not None and not any(r.is_alive() for r in self._readers)
                if left <= 0 or gone:
                    raise TimeoutError(f"no matching log line within {timeout:g} s\n{self.tail()}")
                self._arrived.wait(min(left, 0.1))

    def tail(self, lines: int = 40) -> str:
        """The last lines of output, for failure messages."""
        with self._arrived:
            return "\n".join(
                ["--- stdout", *self.stdout[-lines:], "--- stderr", *self.stderr[-lines:]]
            )

    def peak_rss_bytes(self) -> int:
        """The most resident memory the process has used so far (VmHWM, Linux)."""
        status = Path(f"/proc/{self.pid}/status").read_text()
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM line in /proc/PID/status")

    def wait(self, timeout: float) -> int:
        """The exit code, once the process and its output have ended."""
        code = self.proc.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        self.client.close()
        return code

    def register(self, ids: list[str], **fields: Any) -> httpx.Response:
        """POST /v1/tasks for luma ids (or ``platform=...``)."""
        return self.client.post("/v1/tasks", json={"platform": "luma", "ids": ids, **fields})

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then the exit code."""
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no chance to clean up."""
        self.proc.kill()
        self.wait(10)

    def close(self) -> None:
        """Kill the process if it still runs (test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.client.close()


# Imports what `tracker run` needs once, then forks one daemon per line "CONFIG<TAB>LOG" read
# from stdin, answering with the child's pid. Children are reaped by the kernel (SIGCHLD is
# ignored), so a killed one simply disappears.
_FORKSERVER = """
import os, signal, sys
import tracker.app, tracker.cli
signal.signal(signal.SIGCHLD, signal.SIG_IGN)
for line in sys.stdin:
    config, log = line.rstrip("\\n").split("\\t")
    pid = os.fork()
    if pid == 0:
        out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        code = tracker.cli.main(["run", "--config", config])
        sys.stdout.flush()
        os._exit(code)
    print(pid, flush=True)
"""


class Forkserver:
    """Starts daemons by forking one process that has done the imports already.

    A kill -9 loop on a busy machine spends nearly all its time importing; a forked child
    runs the very same `tracker run` from its first line, its imports shared and done.
    """

    def __init__(self, *, cwd: Path | None = None) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter
            [sys.executable, "-c", _FORKSERVER],
            cwd=cwd,
            env=clean_env(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def spawn(self, config: Path, log: Path, *, token: str) -> ForkedDaemon:
        """A started daemon for ``config``, writing its output to ``log``."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        if stdin is None or stdout is None:
            raise RuntimeError("the fork server has no pipes")
        stdin.write(f"{config}\t{log}\n".encode())
        stdin.flush()
        pid = int(stdout.readline())
        try:
            return ForkedDaemon(pid, log, token=token)
        except BaseException:
            # One that never said `started` must not live on polling a relay nobody reads.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise

    def close(self) -> None:
        """Stop the fork server (its children are the caller's to kill)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class ForkedDaemon:
    """A daemon forked by a `Forkserver`: its log file and an API client."""

    def __init__(
        self, pid: int, log: Path, *, token: str, start_timeout: float = START_TIMEOUT
    ) -> None:
        self.pid = pid
        self.log = log
        started = self.wait_for_log(lambda e: e.get("event") == "started", start_timeout)
        self.api: str = started["api"]
        self.client = httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {token}"}, timeout=10
        )

    def alive(self) -> bool:
        """Whether the process still exists."""
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        return True

    def output(self) -> str:
        """What it wrote so far."""
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(
        self, match: Callable[[dict[str, Any]], bool], timeout: float = 10.0
    ) -> dict[str, Any]:
        """The first JSON log event ``match`` accepts, waiting up to ``timeout`` s for it."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict) and match(event):
                        return event
            if time.monotonic() > deadline or not self.alive():
                raise TimeoutError(f"no matching log line within {timeout:g} s\n{self.output()}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        self.client.close()
