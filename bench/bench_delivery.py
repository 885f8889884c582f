"""Webhook delivery throughput: the real outbox path against a bare httpx loop, same receiver."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import multiprocessing
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx

from tracker import config, delivery, events, logs, signing, status
from tracker.clock import SystemClock
from tracker.metrics import Metrics
from tracker.retry import DeliveryState
from tracker.status import EventType, Snapshot, TaskStatus
from tracker.store import Registration, SqlStore, TaskUpdate
from tracker.store.records import DueTask
from tracker.testing.receiver import WebhookReceiver

#: the targets this benchmark exists to check
MIN_RATIO = 0.7
MIN_RATE = 500.0
#: the poll that finishes every benchmark task, as a relay would report it
FINISHED = status.Observation(
    task_id="",
    upstream_status="SUCCESS",
    status=TaskStatus.COMPLETED,
    progress=100,
    upstream_progress="100%",
    result={"audio_url": "https://cdn.example/a.mp3", "image_url": "https://cdn.example/a.png"},
)


# -- the receiver, in its own process so that it does not take our GIL ------------------------


def _serve(conn: Connection) -> None:
    with WebhookReceiver(record_limit=1) as receiver:
        conn.send(receiver.url)
        conn.recv()  # any message means stop
        conn.send(receiver.count)


class ReceiverProcess:
    """A WebhookReceiver answering 204, in a child process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(target=_serve, args=(child,), daemon=True)
        self.url = ""

    def __enter__(self) -> ReceiverProcess:
        self._process.start()
        self.url = self._conn.recv()
        return self

    def stop(self) -> int:
        """Stop the receiver; returns how many requests it answered."""
        self._conn.send("stop")
        count: int = self._conn.recv()
        self._process.join(5)
        return count

    def __exit__(self, *_exc: object) -> None:
        if self._process.is_alive():
            self._process.kill()
            self._process.join()


# -- shared set-up ------------------------------------------------------------------------------


def webhook_settings(url: str, per_host: int) -> config.WebhookSettings:
    """[webhooks] for one receiver: the defaults, with ``per_host`` slots for it."""
    return config.WebhookSettings.model_validate(
        {"url": url, "secret": signing.new_secret(), "per_host": per_host}
    )


def make_client(settings: config.WebhookSettings) -> httpx.AsyncClient:
    """A webhook client configured as the daemon configures its own (tracker.compose)."""
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=64)
    return httpx.AsyncClient(limits=limits, follow_redirects=False)


def sample_payload() -> bytes:
    """A task.completed body like the ones the real path sends."""
    task = DueTask(
        pk=1,
        platform="suno",
        task_id="bench-000000",
        snapshot=Snapshot(TaskStatus.IN_PROGRESS),
        created_at=datetime.now(UTC),
        missing_since=None,
        webhook_url=None,
        endpoint=None,
        events=None,
        metadata={"user": "bench"},
    )
    change = status.apply(task.snapshot, dataclasses.replace(FINISHED, task_id=task.task_id))
    assert change is not None
    return events.payload(task, change, EventType.COMPLETED, datetime.now(UTC))


def cpu_seconds() -> float:
    """CPU time of this process so far (every thread)."""
    times = os.times()
    return times.user + times.system


@dataclasses.dataclass(frozen=True)
class Phase:
    """What one timed phase did."""

    requests: int
    seconds: float
    cpu: float

    @property
    def rate(self) -> float:
        """Requests per second of wall time."""
        return self.requests / self.seconds

    @property
    def cpu_ms(self) -> float:
        """Milliseconds of our CPU per request."""
        return 1000 * self.cpu / self.requests


# -- (a) the bare loop ---------------------------------------------------------------------------


async def bare_loop(url: str, concurrency: int, seconds: float, payload: bytes) -> Phase:
    """POST the sample body from ``concurrency`` workers for ``seconds``."""
    settings = webhook_settings(url, concurrency)
    headers = {"content-type": "application/json"}
    done = 0
    async with make_client(settings) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                response = await client.post(url, content=payload, headers=headers)
                response.raise_for_status()
                done += 1

        cpu = cpu_seconds()
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Phase(done, time.perf_counter() - started, cpu_seconds() - cpu)


# -- (b) the real path ---------------------------------------------------------------------------


def preload(store: SqlStore, url: str, count: int) -> None:
    """Register ``count`` tasks and record their completion: one due delivery each, in bulk."""
    now = datetime.now(UTC)
    ids = [f"bench-{i:06d}" for i in range(count)]
    store.register(Registration(platform="suno", ids=ids, metadata={"user": "bench"}), now)
    targets = events.Targets(webhook_settings(url, 1))
    updates = []
    for task in store.claim_due(now, count, lease=600):
        change = status.apply(task.snapshot, dataclasses.replace(FINISHED, task_id=task.task_id))
        assert change is not None
        entries = events.outbox_entries(task, change, targets.for_task(task), now)
        updates.append(TaskUpdate(task, change, entries))
    store.record(updates, now)


async def real_path(
    store: SqlStore, url: str, concurrency: int, profile: cProfile.Profile | None
) -> Phase:
    """Drain the outbox with Deliverer.run() as the daemon would."""
    settings = webhook_settings(url, concurrency)
    async with make_client(settings) as client:
        deliverer = delivery.Deliverer(
            store=store,
            client=client,
            guarded_client=client,
            clock=SystemClock(),
            settings=settings,
            metrics=Metrics(),
        )
        if profile is not None:
            profile.enable()
        cpu = cpu_seconds()
        started = time.perf_counter()
        attempts = await deliverer.run()
        phase = Phase(attempts, time.perf_counter() - started, cpu_seconds() - cpu)
        if profile is not None:
            profile.disable()
    return phase


def delivered_count(store: SqlStore) -> int:
    """Deliveries in state delivered."""
    return store.stats().deliveries.get(DeliveryState.DELIVERED, 0)


# -- the report ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command line: how long each phase runs, how often, and how hard."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each bare phase")
    parser.add_argument(
        "--rounds", type=int, default=6, help="real phases (each between bare ones)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight (the default per_host)"
    )
    parser.add_argument("--min-rows", type=int, default=3000, help="fewest outbox rows per round")
    parser.add_argument("--profile", action="store_true", help="cProfile the real path")
    return parser.parse_args(argv)


def left_for_later(log_lines: io.StringIO) -> int:
    """Deliveries a pass logged as left for a later pass (the daemon's next tick)."""
    left = 0
    for line in log_lines.getvalue().splitlines():
        entry = json.loads(line)
        if entry.get("event") == "webhooks_left_for_later":
            left += int(entry["count"])
    log_lines.seek(0)
    log_lines.truncate()
    return left


def measure_bare(receiver: ReceiverProcess, args: argparse.Namespace) -> Phase:
    """One bare phase."""
    return asyncio.run(bare_loop(receiver.url, args.concurrency, args.seconds, sample_payload()))


def measure_real(
    receiver: ReceiverProcess,
    args: argparse.Namespace,
    rows: int,
    profile: cProfile.Profile | None,
    log_lines: io.StringIO,
) -> tuple[Phase, dict[str, Any]]:
    """One real phase over a fresh store with ``rows`` due deliveries, loaded before timing."""
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlStore.from_url(f"sqlite:///{Path(tmp) / 'bench.db'}")
        store.create_schema()
        loading = time.perf_counter()
        preload(store, receiver.url, rows)
        loaded = time.perf_counter() - loading
        real = asyncio.run(real_path(store, receiver.url, args.concurrency, profile))
        delivered = delivered_count(store)
        store.close()
    info = {
        "rows": rows,
        "load_seconds": loaded,
        "delivered": delivered,
        "left": left_for_later(log_lines),
    }
    return real, info


def main(argv: Sequence[str] | None = None) -> int:
    """Run the rounds and print the report; exit status 1 when a target is missed."""
    args = parse_args(argv)
    # The daemon logs at info as JSON; pay for that, but not on the terminal.
    log_lines = io.StringIO()
    logs.configure(level="info", fmt="json", stream=log_lines, environ={})
    profile = cProfile.Profile() if args.profile else None
    print(
        f"concurrency {args.concurrency}; {args.rounds} real phases, each between two bare "
        f"phases of {args.seconds:g} s"
    )
    print("round  bare/s  cpu ms   real/s  cpu ms   ratio   rows  delivered  left  load s")
    bares, reals, ratios = [], [], []
    missing = 0
    with ReceiverProcess() as receiver:
        before = measure_bare(receiver, args)
        bares.append(before.rate)
        for number in range(1, args.rounds + 1):
            rows = max(args.min_rows, int(before.rate * args.seconds))
            real, info = measure_real(receiver, args, rows, profile, log_lines)
            after = measure_bare(receiver, args)
            # Compared with the bare phases on either side, so a machine that speeds up or
            # slows down meanwhile (other work on it) moves both sides alike.
            bare_rate = (before.rate + after.rate) / 2
            bare_cpu = (before.cpu_ms + after.cpu_ms) / 2
            ratio = real.rate / bare_rate
            bares.append(after.rate)
            reals.append(real.rate)
            ratios.append(ratio)
            missing += info["rows"] - info["delivered"]
            print(
                f"{number:5d} {bare_rate:7.0f} {bare_cpu:7.2f} {real.rate:8.0f} "
                f"{real.cpu_ms:7.2f} {ratio:7.2f} {info['rows']:6d} {info['delivered']:10d} "
                f"{info['left']:5d} {info['load_seconds']:7.2f}"
            )
            before = after
        answered = receiver.stop()
    ratio, rate = statistics.median(ratios), statistics.median(reals)
    ok = ratio >= MIN_RATIO and rate >= MIN_RATE and missing == 0
    print(f"median: bare {statistics.median(bares):.0f}/s, real {rate:.0f}/s, ratio {ratio:.2f}")
    print(f"targets: ratio >= {MIN_RATIO}, real >= {MIN_RATE:.0f}/s, every row delivered")
    print(f"receiver answered {answered} requests; rows not delivered: {missing}")
    print("PASS" if ok else "FAIL")
    if profile is not None:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(40)
        print(out.getvalue())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
