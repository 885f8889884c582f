"""The poll benchmark's outside world: a relay and a verifying receiver in a child process,
a real `tracker run` process to measure against them, and scratch PostgreSQL databases.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa

from tracker import runtime, signing
from tracker.store import Registration, SqlStore
from tracker.store.sql import polls, tasks
from tracker.testing.receiver import Received, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

#: a relay step so long that a task stays at its first status until the benchmark flips it
FOREVER = 10.0**9


# -- the child process: relay + receiver -------------------------------------------------------


class _World:
    """Runs in the child: the relay, the receiver, and a thread finishing tasks on schedule."""

    def __init__(self, secret: str, step: float = FOREVER) -> None:
        # The cadence cases read every request back; a relay that moves tasks itself (a
        # soak) is never asked for its log, which would grow all run long.
        limit = None if step == FOREVER else 100
        self.relay = SimulatedRelay(step=step, record_limit=limit).start()
        self.secret = secret
        self.hooks: list[tuple[str, float]] = []
        self.flips: dict[str, float] = {}
        self.receiver = WebhookReceiver(
            verify=self._verify, on_receive=self._received, record_limit=1
        ).start()
        self._halt = threading.Event()
        self._flipper: threading.Thread | None = None

    def _verify(self, body: bytes, headers: Mapping[str, str]) -> None:
        signing.verify(self.secret, body, headers, now=time.time())

    def _received(self, received: Received) -> None:
        if received.verified:
            self.hooks.append((received.json()["data"]["task_id"], received.at))

    def flip(self, ids: Sequence[str]) -> None:
        """Finish these tasks now."""
        for task_id in ids:
            self.relay.set("luma", task_id, "SUCCESS", "100%")
            self.flips[task_id] = time.monotonic()

    def progress(self, ids: Sequence[str], percent: int) -> None:
        """Move these tasks to IN_PROGRESS at ``percent`` %."""
        for task_id in ids:
            self.relay.set("luma", task_id, "IN_PROGRESS", f"{percent}%")

    def schedule(self, ids: Sequence[str], share: float, interval: float, seed: int) -> None:
        """Finish ``share`` of ``ids`` per interval, each at a random moment of it (the
        schedule of an earlier case stops)."""
        if self._flipper is not None:
            self._halt.set()
            self._flipper.join()
        halt = self._halt = threading.Event()
        rng = random.Random(seed)
        order = list(ids)
        rng.shuffle(order)
        per = max(1, round(len(order) * share))
        start = time.monotonic()
        plan = sorted(
            (start + (i // per) * interval + rng.uniform(0, interval), task_id)
            for i, task_id in enumerate(order)
        )

        def run() -> None:
            for at, task_id in plan:
                if halt.wait(max(0.0, at - time.monotonic())):
                    return
                self.flip([task_id])

        self._flipper = threading.Thread(target=run, daemon=True)
        self._flipper.start()

    def latency(self, seconds: float) -> None:
        """Hold every relay answer ``seconds`` from now on (0: answer at once)."""
        self.relay.latency = seconds

    def log(self) -> list[tuple[float, list[str]]]:
        """Every batch request so far as (arrival, ids), then forget them."""
        requests = self.relay.requests
        self.relay.clear_requests()
        return [(r.at, list(r.json_body["ids"])) for r in requests if isinstance(r.json_body, dict)]

    def stop(self) -> None:
        self._halt.set()
        self.relay.stop()
        self.receiver.stop()


def _serve(conn: Connection, secret: str, step: float) -> None:
    # The relay collects as the daemon does: at the default threshold its collector's full
    # passes over the request log it keeps double its CPU for some sweeps and not others,
    # and a sweep bound by the relay (the bare loop at batch 1000) then takes twice as long.
    runtime.tune_gc()
    world = _World(secret, step)
    conn.send((world.relay.base_url, world.receiver.url))
    while True:
        command, args = conn.recv()
        if command == "stop":
            world.stop()
            conn.send(None)
            return
        if command == "results":
            conn.send((world.log(), dict(world.flips), list(world.hooks)))
            world.flips.clear()
            world.hooks.clear()
            continue
        conn.send(getattr(world, command)(*args))


class Outside:
    """The relay and the receiver in a child process, so they do not share our GIL.

    ``step``: seconds the relay takes to move a task on by itself (pending, in progress, done:
    a task whose id contains "fail" fails); by default tasks move only when told to.
    """

    def __init__(self, step: float = FOREVER) -> None:
        self.secret = signing.new_secret()
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child, self.secret, step), daemon=True)
        self.relay_url = self.hook_url = ""

    def __enter__(self) -> Outside:
        self._process.start()
        self.relay_url, self.hook_url = self._conn.recv()
        return self

    def cpu_seconds(self) -> float:
        """CPU seconds the child (the relay and the receiver) has used so far."""
        fields = Path(f"/proc/{self._process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        # utime and stime, the 14th and 15th fields of the whole line
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def call(self, command: str, *args: Any) -> Any:
        """Run a _World method in the child and return its answer."""
        self._conn.send((command, args))
        return self._conn.recv()

    def results(
        self,
    ) -> tuple[list[tuple[float, list[str]]], dict[str, float], list[Any]]:
        """(batch requests, flip times, verified webhook arrivals) since the last call."""
        answer: tuple[list[tuple[float, list[str]]], dict[str, float], list[Any]]
        answer = self.call("results")
        return answer

    def __exit__(self, *_exc: object) -> None:
        with contextlib.suppress(OSError, EOFError):
            self.call("stop")
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()


# -- the database and the daemon ---------------------------------------------------------------


def populate(url: str, live: int, final: int = 0, prefix: str = "b") -> list[str]:
    """A fresh database with ``live`` due tasks and ``final`` finished ones; the live ids.

    Each case gets its own ``prefix``: the relay remembers the tasks of earlier cases.
    """
    store = SqlStore.from_url(url)
    store.create_schema()
    now = datetime.now(UTC)
    ids = [f"{prefix}{i:07d}" for i in range(live + final)]
    for start in range(0, len(ids), 50_000):
        store.register(Registration("luma", ids[start : start + 50_000]), now)
    if final:
        with store.engine.begin() as conn:
            conn.execute(
                tasks.update().where(tasks.c.id > live).values(status="completed", finished_at=now)
            )
            conn.execute(polls.delete().where(polls.c.task_pk > live))
    store.close()
    return ids[:live]


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database on the server of ``admin_url``, dropped afterwards."""
    admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
    name = f"tracker_bench_{secrets.token_hex(4)}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def work_dir(stack: contextlib.ExitStack, keep: bool, prefix: str) -> Path:
    """A directory for a run's files: kept (its path printed) with ``keep``, else removed when
    ``stack`` closes."""
    if keep:
        work = Path(tempfile.mkdtemp(prefix=prefix))
        print(f"work files in {work}")
        return work
    return Path(stack.enter_context(tempfile.TemporaryDirectory(prefix=prefix)))


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def config_text(outside: Outside, db_url: str, port: int, poll: Mapping[str, Any]) -> str:
    """The daemon's config: this relay, this receiver, these [poll] settings."""
    lines = [
        "[server]",
        'host = "127.0.0.1"',
        f"port = {port}",
        'api_tokens = ["bench-token"]',
        "[database]",
        f'url = "{db_url}"',
        "[upstream]",
        f'base_url = "{outside.relay_url}"',
        'api_key = "sk-sim"',
        "[poll]",
        *(f"{key} = {value}" for key, value in poll.items()),
        "[webhooks]",
        f'url = "{outside.hook_url}"',
        f'secret = "{outside.secret}"',
        "[logging]",
        'level = "info"',
        'format = "json"',
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def daemon(config_path: Path, log_path: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    """`tracker run` as a user starts it, until the block ends (then SIGTERM)."""
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tracker", "run", "--config", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                        break
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tracker run did not start; see {log_path}")
                time.sleep(0.1)
            yield process
        finally:
            process.terminate()
            process.wait(30)


def rss_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) memory of a process, in MB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (
        int(fields["VmRSS"].split()[0]) / 1024,
        int(fields["VmHWM"].split()[0]) / 1024,
    )


def get_latencies(port: int, ids: Sequence[str], count: int) -> list[float]:
    """Seconds each of ``count`` GET /v1/tasks/luma/{id} took, one after another."""
    rng = random.Random(1)
    headers = {"Authorization": "Bearer bench-token"}
    took = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as client:
        for _ in range(count):
            started = time.perf_counter()
            client.get(f"/v1/tasks/luma/{rng.choice(ids)}").raise_for_status()
            took.append(time.perf_counter() - started)
    return took


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": sys.version.split()[0],
        "sqlite": sa.__version__ and __import__("sqlite3").sqlite_version,
        "load_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }
