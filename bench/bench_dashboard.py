"""Dashboard page latency with a million tasks stored: p99 per page against a database-free page."""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from tracker import config, dashboard, logs
from tracker.activity import Activity, Series
from tracker.clock import SystemClock
from tracker.store import SqlStore
from tracker.testing.dashboard import hidden_fields

#: the target this benchmark exists to check, per page
MAX_P99_MS = 200.0
TOKEN = "bench-token"
PLATFORMS = ("luma", "suno", "midjourney", "video", "kling", "replicate")
#: (status, share of all tasks)
STATUSES = (
    ("completed", 0.85),
    ("failed", 0.05),
    ("canceled", 0.01),
    ("in_progress", 0.04),
    ("queued", 0.03),
    ("pending", 0.02),
)
FINAL = {"completed", "failed", "canceled"}
DEAD_SHARE = 0.002
PENDING_SHARE = 0.001
CHUNK = 50_000


def _stamp(moment: datetime) -> str:
    # How SQLAlchemy's DateTime stores a naive UTC value in SQLite.
    return moment.strftime("%Y-%m-%d %H:%M:%S.%f")


def _tasks(count: int, start: datetime, rng: random.Random) -> Iterator[tuple[object, ...]]:
    weights = [share for _, share in STATUSES]
    names = [name for name, _ in STATUSES]
    for n in range(1, count + 1):
        created = start + timedelta(seconds=n * 0.5)
        status = rng.choices(names, weights)[0]
        final = status in FINAL
        metadata = json.dumps({"user": f"user-{n % 5000}", "job": f"job-{n:07d}"})
        result = json.dumps({"id": f"t{n:07d}", "video": f"https://cdn.example/{n}.mp4"})
        yield (
            n,
            PLATFORMS[n % len(PLATFORMS)],
            f"t{n:07d}-{rng.getrandbits(48):012x}",
            status,
            "SUCCESS" if status == "completed" else None,
            100 if final else 40,
            "100%" if final else "40%",
            "upstream said no" if status == "failed" else "",
            metadata,
            None,
            None,
            None,
            result if status == "completed" else None,
            _stamp(created),
            _stamp(created + timedelta(seconds=90)),
            _stamp(created + timedelta(seconds=90)) if final else None,
            None if final else created.timestamp() + 10,
            created.timestamp(),
            None,
        )


def populate(path: Path, count: int, now: datetime) -> dict[str, int]:
    """A tracker database with ``count`` tasks, their history, deliveries and attempts."""
    store = SqlStore.from_url(f"sqlite:///{path}")
    store.create_schema()
    store.close()
    rng = random.Random(7)
    start = now - timedelta(seconds=count * 0.5 + 3600)
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous = OFF")
    task_sql = f"INSERT INTO tasks VALUES ({', '.join('?' * 19)})"
    figures = {"tasks": 0, "transitions": 0, "deliveries": 0, "attempts": 0, "dead": 0}
    rows = _tasks(count, start, rng)
    while batch := [row for _, row in zip(range(CHUNK), rows, strict=False)]:
        db.executemany(task_sql, batch)
        history, outbox, tries = [], [], []
        for row in batch:
            pk, platform, task_id, status = row[0], row[1], row[2], row[3]
            at = str(row[14])
            history.append((pk, "pending", "in_progress", "IN_PROGRESS", 40, str(row[13])))
            if status in FINAL:
                history.append((pk, "in_progress", status, row[4], 100, at))
                roll = rng.random()
                state = (
                    "dead"
                    if roll < DEAD_SHARE
                    else "pending"
                    if roll < DEAD_SHARE + PENDING_SHARE
                    else "delivered"
                )
                figures["dead"] += state == "dead"
                outbox.append(
                    (pk, f"msg_{pk:024d}", pk, platform, task_id, f"task.{status}", "{}",
                     "https://app.example/hooks", None, False, state,
                     4 if state == "dead" else 1, time.time(), None, at, at,
                     500 if state == "dead" else 204,
                     "HTTP 500" if state == "dead" else None,
                     at if state == "delivered" else None)
                )  # fmt: skip
                attempt = (
                    pk, at, "https://app.example/hooks", 500 if state == "dead" else 204,
                    None, 12.5, "receiver down" if state == "dead" else "",
                )  # fmt: skip
                tries.extend([attempt] * (4 if state == "dead" else 1))
        db.executemany(
            "INSERT INTO transitions (task_pk, from_status, to_status, upstream_status,"
            " progress, at) VALUES (?, ?, ?, ?, ?, ?)",
            history,
        )
        db.executemany(f"INSERT INTO deliveries VALUES ({', '.join('?' * 19)})", outbox)
        db.executemany(
            "INSERT INTO delivery_attempts (delivery_pk, at, url, status_code, error,"
            " latency_ms, response_excerpt) VALUES (?, ?, ?, ?, ?, ?, ?)",
            tries,
        )
        db.commit()
        figures["tasks"] += len(batch)
        figures["transitions"] += len(history)
        figures["deliveries"] += len(outbox)
        figures["attempts"] += len(tries)
    db.execute("ANALYZE")
    db.commit()
    db.close()
    return figures


class Server:
    """The dashboard alone on a loopback uvicorn, in a thread."""

    def __init__(self, database: Path) -> None:
        settings = config.parse(
            {
                "server": {"api_tokens": [TOKEN]},
                "database": {"url": f"sqlite:///{database}"},
                "upstream": {"base_url": "http://127.0.0.1:9", "api_key": "k"},
                "webhooks": {"url": "http://127.0.0.1:9/h", "secret": "whsec_c2VjcmV0"},
            },
            environ={},
        )
        self.store = SqlStore.from_url(settings.database.url)
        activity = Activity()
        activity.count(Series.POLLS, 1000)
        app = FastAPI()
        dashboard.mount(
            app,
            dashboard.Dashboard(
                store=self.store,
                clock=SystemClock(),
                settings=lambda: settings,
                platforms=list(PLATFORMS),
                activity=activity,
                poll_lag=lambda: 0.4,
            ),
        )
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def __exit__(self, *_exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.store.close()


def pages(database: Path) -> dict[str, str]:
    """The pages measured, by name; ids picked from the middle and the end of the table."""
    db = sqlite3.connect(database)
    newest = db.execute("SELECT platform, task_id FROM tasks ORDER BY id DESC LIMIT 1").fetchone()
    dead_task = db.execute(
        "SELECT platform, task_id, id FROM deliveries WHERE state = 'dead' LIMIT 1"
    ).fetchone()
    middle = db.execute("SELECT max(id) / 2 FROM tasks").fetchone()[0]
    db.close()
    return {
        "login (baseline, no database)": "/ui/login",
        "overview": "/ui/",
        "tasks": "/ui/tasks",
        "tasks ?status=queued": "/ui/tasks?status=queued",
        "tasks ?platform=kling": "/ui/tasks?platform=kling",
        "tasks ?platform=suno&status=failed": "/ui/tasks?platform=suno&status=failed",
        "tasks older page": f"/ui/tasks?before={middle}",
        "tasks ?q=exact id": f"/ui/tasks?q={newest[1]}",
        "tasks ?q=metadata word": "/ui/tasks?q=user-4242",
        "tasks ?q=no match": "/ui/tasks?q=nothing-like-this",
        "one task": f"/ui/tasks/{newest[0]}/{newest[1]}",
        "one task with a dead delivery": f"/ui/tasks/{dead_task[0]}/{dead_task[1]}",
        "deliveries": "/ui/deliveries",
        "deliveries ?state=dead": "/ui/deliveries?state=dead",
        "deliveries ?state=pending": "/ui/deliveries?state=pending",
        "recover confirmation": "/ui/recover?since=2000-01-01T00:00",
        "redeliver confirmation": f"/ui/deliveries/{dead_task[2]}/redeliver",
    }


def measure(base_url: str, paths: dict[str, str], rounds: int) -> dict[str, list[float]]:
    """Milliseconds per request, by page; pages interleaved so load drift hits all alike."""
    timings: dict[str, list[float]] = {name: [] for name in paths}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        form = client.get("/ui/login")
        signed_in = client.post("/ui/login", data={"token": TOKEN, **hidden_fields(form.text)})
        if signed_in.status_code != 303:
            raise SystemExit(f"sign-in answered {signed_in.status_code}")
        for name, path in paths.items():  # warm caches once
            answer = client.get(path)
            if answer.status_code != 200:
                raise SystemExit(f"{name}: {path} answered {answer.status_code}")
        for _ in range(rounds):
            for name, path in paths.items():
                started = time.perf_counter()
                client.get(path).raise_for_status()
                timings[name].append((time.perf_counter() - started) * 1000)
    return timings


def p99(values: list[float]) -> float:
    """The 99th percentile (nearest rank)."""
    ordered = sorted(values)
    return ordered[max(0, round(0.99 * len(ordered)) - 1)]


def main() -> int:
    """Build (or reuse) the database, measure every page, print the table; 1 when a p99 misses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--database", type=Path, help="reuse or keep this database file")
    args = parser.parse_args()
    logs.configure(level="warning", fmt="console")
    with tempfile.TemporaryDirectory() as tmp:
        database = args.database or Path(tmp) / "bench.db"
        if not database.exists():
            started = time.perf_counter()
            figures = populate(database, args.tasks, datetime.now(UTC))
            print(f"stored {figures} in {time.perf_counter() - started:.0f} s")
        paths = pages(database)
        store = SqlStore.from_url(f"sqlite:///{database}")
        started = time.perf_counter()
        store.stats()
        recount = (time.perf_counter() - started) * 1000
        store.close()
        with Server(database) as base_url:
            timings = measure(base_url, paths, args.rounds)
    baseline = p99(timings["login (baseline, no database)"])
    print(f"\n{'page':40} {'p50 ms':>8} {'p99 ms':>8} {'p99/baseline':>13}")
    missed = []
    for name, values in timings.items():
        late = p99(values)
        print(f"{name:40} {statistics.median(values):8.1f} {late:8.1f} {late / baseline:13.1f}")
        if late > MAX_P99_MS:
            missed.append(name)
    print(f"\n{len(timings)} pages x {args.rounds} requests; target p99 < {MAX_P99_MS:g} ms")
    print(f"the overview's background recount (store.stats()) took {recount:.0f} ms")
    if missed:
        print(f"MISSED: {', '.join(missed)}")
        return 1
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
