"""Poll throughput with 1, 2 and 3 `tracker run` instances on one PostgreSQL database, and one
on SQLite, in one run, on a workload bound by the relay rather than by this machine's CPU.

The relay answers each per-id request (the `kling` platform: one GET per task id) after
--latency seconds (default 0.1); each instance polls with `[poll].concurrency` 4, so one
instance can make at most 4 / 0.1 = 40 observations per second, and N instances sharing the
work should make N times that. Tasks never finish (the relay's script step is an hour), every
task is due every second (interval = max_interval = 1), and there are many more tasks than
the instances can poll, so every instance always has work.

Throughput is task observations per second: the rise of `tracker_upstream_requests_total`
summed over the instances' /metrics during --seconds, after a --warmup. Target: 3 instances
on PostgreSQL >= 2.6 x 1 instance. Exits 1 when missed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from poll_rig import postgres_database
from prometheus_client.parser import text_string_to_metric_families

from tracker import signing
from tracker.testing.simulator import SimulatedRelay

TARGET = 2.6
REPO = Path(__file__).resolve().parents[1]
TOKEN = "bench-token"


class SlowRelay(SimulatedRelay):
    """The simulated relay, answering every request after a fixed latency."""

    def __init__(self, latency: float) -> None:
        super().__init__(step=3600.0, record_limit=0)
        self.latency = latency

    def _answer(self, method: str, path: str, headers: dict[str, str], raw: bytes) -> Any:
        time.sleep(self.latency)  # one thread per request: the wait costs no CPU
        return super()._answer(method, path, headers, raw)


def _toml(document: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, keys in document.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in keys.items()]
    return "\n".join(lines) + "\n"


def config_text(relay_url: str, db_url: str, concurrency: int) -> str:
    """A daemon config: per-id polling every second."""
    return _toml(
        {
            "server": {"host": "127.0.0.1", "port": 0, "api_tokens": [TOKEN]},
            "database": {"url": db_url, "auto_migrate": True},
            "upstream": {"base_url": relay_url, "api_key": "sk-sim", "timeout": 10},
            "poll": {
                "interval": 1.0,
                "max_interval": 1.0,
                "concurrency": concurrency,
                "batch_size": 1000,
            },
            # Tasks never finish here, so no event is ever sent to this address.
            "webhooks": {"url": "http://127.0.0.1:9/hooks", "secret": signing.new_secret()},
            # info: the `started` line carries the API address (the rest is drained unread)
            "logging": {"level": "info", "format": "json"},
        }
    )


class Instance:
    """One `tracker run` process and its API address."""

    def __init__(self, config: Path) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracker", "run", "--config", str(config)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.api = self._wait_started()
        self.client = httpx.Client(
            base_url=self.api, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
        )
        # Keep reading, so a full pipe never blocks the daemon's logging.
        threading.Thread(target=self._drain, daemon=True).start()

    def _wait_started(self) -> str:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with contextlib.suppress(ValueError):
                event = json.loads(raw)
                if isinstance(event, dict) and event.get("event") == "started":
                    return str(event["api"])
        raise RuntimeError(f"a tracker instance exited with {self.proc.wait()} before starting")

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def observations(self) -> float:
        """Relay requests made so far, by every platform and answer code."""
        text = self.client.get("/metrics").text
        return sum(
            sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "tracker_upstream_requests"
            for sample in family.samples
            if sample.name.endswith("_total")
        )

    def stop(self) -> None:
        self.client.close()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def phase(db_url: str, count: int, args: argparse.Namespace, tmp: Path) -> float:
    """Start ``count`` instances on ``db_url``, register the tasks, measure observations/s."""
    with SlowRelay(args.latency) as relay:
        config = tmp / f"bench-{count}-{secrets.token_hex(3)}.toml"
        config.write_text(config_text(relay.base_url, db_url, args.concurrency))
        first = Instance(config)  # creates the schema; the others find it current
        instances = [first, *(Instance(config) for _ in range(count - 1))]
        try:
            ids = [f"bench-{n}" for n in range(args.tasks)]
            for start in range(0, len(ids), 100):
                answer = instances[start // 100 % count].client.post(
                    "/v1/tasks", json={"platform": "kling", "ids": ids[start : start + 100]}
                )
                if answer.status_code != 201:
                    raise RuntimeError(f"registration refused: {answer.text}")
            time.sleep(args.warmup)
            before, started = sum(i.observations() for i in instances), time.monotonic()
            time.sleep(args.seconds)
            after, ended = sum(i.observations() for i in instances), time.monotonic()
        finally:
            for instance in instances:
                instance.stop()
    return (after - before) / (ended - started)


def main(argv: list[str] | None = None) -> int:
    """Run every phase and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=4.0)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
        help="a PostgreSQL URL whose server may get a scratch database",
    )  # fmt: skip
    args = parser.parse_args(argv)
    ceiling = args.concurrency / args.latency
    rows: list[tuple[str, int, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for count in (1, 2, 3):
            with postgres_database(args.pg) as url:
                rows.append(("postgresql", count, phase(url, count, args, tmp)))
        rows.append(("sqlite", 1, phase(f"sqlite:///{tmp / 'bench.db'}", 1, args, tmp)))
    one = rows[0][2]
    print(f"per-id relay latency {args.latency:g} s, concurrency {args.concurrency} per instance")
    print(f"ceiling per instance: {ceiling:.0f} observations/s; {args.tasks} tasks")
    print(f"{'database':12} {'instances':>9} {'obs/s':>8} {'x one':>7} {'of ceiling':>11}")
    for database, count, rate in rows:
        print(
            f"{database:12} {count:9d} {rate:8.1f} {rate / one:7.2f} "
            f"{rate / (ceiling * count):10.0%}"
        )
    three = rows[2][2] / one
    ok = three >= TARGET
    print(f"target: 3 instances >= {TARGET} x one: {three:.2f} {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
