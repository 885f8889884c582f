"""Poll engine benchmark: the real poll path against a bare httpx loop, and the cadence a real
`tracker run` keeps, measured at a simulated relay in a child process.

    python bench/bench_poll.py            # the full run (about 8 minutes)
    python bench/bench_poll.py --quick    # a smaller one (about 1 minute)

Prints a table and writes the figures as JSON (``--out``, default bench_poll.json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import sqlalchemy as sa
from poll_rig import (
    Outside,
    config_text,
    daemon,
    free_port,
    get_latencies,
    machine,
    populate,
    rss_mb,
    work_dir,
)

from tracker import config, events, logs, platforms, runtime
from tracker.clock import SystemClock
from tracker.metrics import Metrics
from tracker.poller import Poller
from tracker.retry import DeliveryState
from tracker.store import Registration, SqlStore
from tracker.store.sql import polls
from tracker.testing.cadence import poll_gaps, quantile

CONCURRENCY = 4
#: share of the live tasks the relay finishes per interval (or per timed drain)
FINISHING = 0.01
#: the targets
MAX_RATIO = 1.25
CADENCE_SLACK = 2.0  # seconds, p99 of the poll gap and of flip-to-webhook beyond the interval
SHORT_P99 = 3.0  # seconds, p99 poll gap at 1,000 tasks and interval 2 s
MAX_EXTRA_MB = 30.0
MAX_GET_P99 = 0.010
#: the cases a full run measures (``--only`` picks some)
CASES = ("ratio", "moving", "finishing", "big", "short", "memory")


# -- drains against a bare loop ----------------------------------------------------------------


async def bare_sweep(relay_url: str, batches: Sequence[list[str]]) -> float:
    """Seconds a plain httpx loop takes to POST and decode every batch, CONCURRENCY at a time."""
    queue = list(reversed(batches))
    headers = {"Authorization": "Bearer sk-sim"}
    async with relay_client() as client:

        async def worker() -> None:
            while queue:
                ids = queue.pop()
                answer = await client.post(
                    f"{relay_url}/luma/tasks", json={"ids": ids}, headers=headers
                )
                answer.raise_for_status()
                answer.json()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        return time.perf_counter() - started


async def real_drain(poller: Poller, statements: list[int]) -> tuple[float, int]:
    """Seconds one drain of every due task takes, and the write statements it issued."""
    before = statements[0]
    started = time.perf_counter()
    await poller.run_cycle()
    return time.perf_counter() - started, statements[0] - before


def make_poller(outside: Outside, store: SqlStore, batch: int, client: httpx.AsyncClient) -> Poller:
    settings = config.parse(
        {
            "upstream": {"base_url": outside.relay_url, "api_key": "sk-sim"},
            "poll": {"interval": 30, "batch_size": batch, "concurrency": CONCURRENCY},
            "webhooks": {"url": outside.hook_url, "secret": outside.secret},
        },
        environ={},
    )
    return Poller(
        store=store,
        platforms=platforms.build(settings),
        client=client,
        clock=SystemClock(),
        settings=settings.poll,
        targets=events.Targets(settings.webhooks),
        metrics=Metrics(),
    )


def counted_store(url: str) -> tuple[SqlStore, list[int]]:
    """A store on ``url``, and a one-item list counting the INSERT, UPDATE and DELETE
    statements sent through it (an executemany counts once)."""
    store = SqlStore.from_url(url)
    statements = [0]

    def count(_conn: Any, _cursor: Any, sql: str, *_rest: Any) -> None:
        if sql.lstrip().upper().startswith(("INSERT", "UPDATE", "DELETE")):
            statements[0] += 1

    sa.event.listen(store.engine, "before_cursor_execute", count)
    return store, statements


def relay_client() -> httpx.AsyncClient:
    """The HTTP client of the bare loop and of the drains: no cap on connections, keep-alive
    for 256 (more than CONCURRENCY ever opens)."""
    return httpx.AsyncClient(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256), timeout=30
    )


async def ratio_case(  # noqa: PLR0917 - one case, described by its figures
    outside: Outside, work: Path, live: int, batch: int, rounds: int, moving: bool = False
) -> dict[str, Any]:
    """Bare and real sweeps over the same ids, interleaved B R B R ... B. ``moving``: every
    task's progress moves before each drain (instead of 1 % finishing), so each poll writes
    its task's row, as while generations run."""
    kind = "moving" if moving else "ratio"
    url = f"sqlite:///{work / f'{kind}-{live}-{batch}.db'}"
    ids = populate(url, live, prefix=f"{kind[0]}{live}-{batch}-")
    store, statements = counted_store(url)
    batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
    client = relay_client()
    poller = make_poller(outside, store, batch, client)
    await poller.run_cycle()  # untimed: every task moves from pending to queued once
    if moving:  # untimed too: every task moves to in_progress; from then on progress alone moves
        outside.call("progress", ids, 1)
        with store.engine.begin() as conn:
            conn.execute(polls.update().values(next_poll_at=0.0))
        await poller.run_cycle()
    bare = [await bare_sweep(outside.relay_url, batches)]
    # CPU seconds of this process (the daemon's side: the relay runs in the child) per sweep.
    cpu, relay = time.process_time(), outside.cpu_seconds()
    await bare_sweep(outside.relay_url, batches)
    bare_cpu, relay_bare = time.process_time() - cpu, outside.cpu_seconds() - relay
    real_cpu: list[float] = []
    relay_real: list[float] = []
    real: list[float] = []
    writes: list[int] = []
    finished = 0
    for _ in range(rounds):
        # Every live task due again, and 1 % of them finished at the relay.
        with store.engine.begin() as conn:
            conn.execute(polls.update().values(next_poll_at=0.0))
        if moving:
            outside.call("progress", ids, 2 + len(real))
        else:
            step = max(1, round(live * FINISHING))
            outside.call("flip", ids[finished : finished + step])
            finished += step
        cpu, relay = time.process_time(), outside.cpu_seconds()
        seconds, written = await real_drain(poller, statements)
        real_cpu.append(time.process_time() - cpu)
        relay_real.append(outside.cpu_seconds() - relay)
        real.append(seconds)
        writes.append(written)
        bare.append(await bare_sweep(outside.relay_url, batches))
    outside.results()  # forget this case's requests
    await client.aclose()
    store.close()
    ratios = [r / ((bare[i] + bare[i + 1]) / 2) for i, r in enumerate(real)]
    return {
        "live": live,
        "batch": batch,
        "bare_s": round(statistics.median(bare), 3),
        "real_s": round(statistics.median(real), 3),
        # microseconds of this process's CPU per task: the bound on a relay that answers at once
        "bare_cpu_us": round(bare_cpu / live * 1e6, 1),
        "real_cpu_us": round(statistics.median(real_cpu) / live * 1e6, 1),
        # the relay's CPU per task, answering the bare loop and the drain
        "relay_cpu_us_bare": round(relay_bare / live * 1e6, 1),
        "relay_cpu_us_real": round(statistics.median(relay_real) / live * 1e6, 1),
        "ratio": round(statistics.median(ratios), 3),
        # The lowest ratio a drain costing this much CPU could reach here, every core it may
        # run on busy with the drain or the relay (both run on this machine's cores): what is
        # left of the ratio once the work is spread perfectly.
        "floor": round(
            (statistics.median(real_cpu) + statistics.median(relay_real))
            / len(os.sched_getaffinity(0))
            / statistics.median(bare),
            3,
        ),
        "writes_per_cycle": round(statistics.median(writes)),
        "requests_per_cycle": len(batches),
    }


async def finishing_case(
    outside: Outside, work: Path, live: int, batch: int, rounds: int
) -> dict[str, Any]:
    """Drains in which every task finishes at the relay (a relay back after an outage, say):
    each writes every task's row, its history row and its webhook's outbox row, the webhook
    body carrying the upstream item. Fresh tasks each round; bare sweeps over the same ids
    (answered SUCCESS alike) around each drain."""
    url = f"sqlite:///{work / f'finishing-{live}-{batch}.db'}"
    populate(url, 0)
    store, statements = counted_store(url)
    client = relay_client()
    poller = make_poller(outside, store, batch, client)
    real: list[float] = []
    real_cpu: list[float] = []
    ratios: list[float] = []
    writes: list[int] = []
    for round_ in range(rounds):
        ids = [f"f{live}-{batch}-{round_}-{i:07d}" for i in range(live)]
        store.register(Registration("luma", ids), datetime.now(UTC))
        await poller.run_cycle()  # untimed: every task moves from pending to queued once
        with store.engine.begin() as conn:
            conn.execute(polls.update().values(next_poll_at=0.0))
        outside.call("flip", ids)
        batches = [ids[i : i + batch] for i in range(0, len(ids), batch)]
        before = await bare_sweep(outside.relay_url, batches)
        events = store.stats().deliveries.get(DeliveryState.PENDING, 0)
        cpu = time.process_time()
        seconds, written = await real_drain(poller, statements)
        real_cpu.append(time.process_time() - cpu)
        # The drain timed must be the one described: every task finished, each with its event.
        if store.stats().deliveries.get(DeliveryState.PENDING, 0) - events != live:
            raise RuntimeError(f"a finishing drain of {live} tasks wrote another count of events")
        real.append(seconds)
        writes.append(written)
        after = await bare_sweep(outside.relay_url, batches)
        ratios.append(seconds / ((before + after) / 2))
    outside.results()  # forget this case's requests
    await client.aclose()
    store.close()
    return {
        "live": live,
        "batch": batch,
        "real_s": round(statistics.median(real), 3),
        "real_cpu_us": round(statistics.median(real_cpu) / live * 1e6, 1),
        "ratio": round(statistics.median(ratios), 3),
        "writes_per_cycle": round(statistics.median(writes)),
    }


# -- the cadence of a real daemon --------------------------------------------------------------


def cadence_case(  # noqa: PLR0917 - one case, described by its figures
    outside: Outside,
    work: Path,
    live: int,
    interval: float,
    batch: int,
    cycles: float,
    final: int = 0,
    warm: float = 1.5,
) -> dict[str, Any]:
    """Run `tracker run` over ``live`` tasks for ``cycles`` intervals; gaps, flip-to-webhook,
    memory (and, with ``final`` finished tasks stored too, GET latency)."""
    name = f"cadence-{live}-{final}"
    url = f"sqlite:///{work / f'{name}.db'}"
    ids = populate(url, live, final, prefix=f"{name}-")
    port = free_port()
    poll = {
        "interval": interval,
        "max_interval": interval,
        "batch_size": batch,
        "concurrency": CONCURRENCY,
    }
    path = work / f"{name}.toml"
    path.write_text(config_text(outside, url, port, poll))
    outside.results()
    with daemon(path, work / f"{name}.log", port) as process:
        outside.call("schedule", ids, FINISHING, interval, live)
        # Gaps count once the first drain (every task at once, each one a change) has
        # settled into the plan: after ``warm`` intervals.
        time.sleep(interval * warm)
        outside.call("log")
        time.sleep(interval * (cycles - warm))
        resident, peak = rss_mb(process.pid)
        every = [f"{name}-{i:07d}" for i in range(live + final)]
        took = get_latencies(port, every, 500) if final else []
        time.sleep(min(interval, 5.0))  # the last flips' webhooks
    requests, flips, hooks = outside.results()
    gaps = [g for per in poll_gaps(_Logged(at, ids) for at, ids in requests).values() for g in per]
    arrived = dict(hooks)
    delays = [arrived[t] - at for t, at in flips.items() if t in arrived]
    return {
        "live": live,
        "final": final,
        "interval": interval,
        "batch": batch,
        "gaps": len(gaps),
        "gap_p1": _round(quantile(gaps, 0.01)),
        "gap_p50": _round(quantile(gaps, 0.5)),
        "gap_p99": _round(quantile(gaps, 0.99)),
        "flipped": len(flips),
        "webhooks": len(delays),
        "webhook_p50": _round(quantile(delays, 0.5)),
        "webhook_p99": _round(quantile(delays, 0.99)),
        "rss_mb": round(resident, 1),
        "peak_rss_mb": round(peak, 1),
        "get_p99_ms": _round(1000 * quantile(took, 0.99)) if took else None,
    }


class _Logged:
    def __init__(self, at: float, ids: list[str]) -> None:
        self.at = at
        self.json_body = {"ids": ids}


def _round(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 3)


# -- the run -----------------------------------------------------------------------------------


def plan(quick: bool) -> dict[str, Any]:
    """The cases of a full or a quick run."""
    if quick:
        return {
            "ratio": [(10_000, 100), (10_000, 1000)],
            "moving": [(10_000, 1000)],
            "finishing": [(5_000, 1000)],
            "rounds": 2,
            "big": (10_000, 10.0, 1000, 4.0),
            "short": (1_000, 2.0, 100, 8),
            "memory": (2_000, 98_000),
        }
    return {
        "ratio": [(10_000, 100), (10_000, 1000), (100_000, 100), (100_000, 1000)],
        "moving": [(10_000, 1000)],
        "finishing": [(5_000, 1000)],
        "rounds": 3,
        "big": (100_000, 30.0, 1000, 5.5),
        "short": (1_000, 2.0, 100, 15),
        "memory": (10_000, 990_000),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cases = plan(args.quick)
    wanted = set(args.only.split(",")) if args.only else {*CASES}
    results: dict[str, Any] = {
        "machine": machine(),
        "started": datetime.now(UTC).isoformat(),
    }
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, args.keep, "bench-poll-")
        outside = stack.enter_context(Outside())
        # The drains below run in this process: its collector is set as `tracker run` sets its
        # own (the bare loop runs under the same setting).
        runtime.tune_gc()
        if "ratio" in wanted:
            # The relay's own time per answer (its database query), for bare and real alike.
            outside.call("latency", args.relay_latency)
            results["relay_latency"] = args.relay_latency
            results["ratio"] = [
                await ratio_case(outside, work, live, batch, cases["rounds"])
                for live, batch in cases["ratio"]
            ]
            outside.call("latency", 0.0)
        if "moving" in wanted:
            results["moving"] = [
                await ratio_case(outside, work, live, batch, cases["rounds"], moving=True)
                for live, batch in cases["moving"]
            ]
        if "finishing" in wanted:
            results["finishing"] = [
                await finishing_case(outside, work, live, batch, cases["rounds"])
                for live, batch in cases["finishing"]
            ]
        for name, warm in (("big", 2.5), ("short", 1.5)):
            if name in wanted:
                live, interval, batch, cycles = cases[name]
                results[name] = cadence_case(
                    outside, work, live, interval, batch, cycles, warm=warm
                )
        if "memory" in wanted:
            live, final = cases["memory"]
            results["memory_live"] = cadence_case(outside, work, live, 30.0, 1000, 1.5)
            results["memory_all"] = cadence_case(outside, work, live, 30.0, 1000, 1.5, final=final)
    results["machine"]["load_at_end"] = machine()["load_at_start"]
    return results


def verdicts(results: dict[str, Any]) -> dict[str, bool]:
    """Each target measured in this run, met or not (a figure that could not be taken misses)."""

    def at_most(value: float | None, limit: float) -> bool:
        return value is not None and value <= limit

    found: dict[str, bool] = {}
    if "ratio" in results:
        found["ratio <= 1.25"] = all(at_most(r["ratio"], MAX_RATIO) for r in results["ratio"])
    if "big" in results:
        big = results["big"]
        every = big["interval"]
        found["big: gaps p1..p99 within interval +- 2 s"] = at_most(
            every + CADENCE_SLACK, big["gap_p1"] + 2 * CADENCE_SLACK
        ) and at_most(big["gap_p99"], every + CADENCE_SLACK)
        found["big: webhook p99 <= interval + 2 s"] = at_most(
            big["webhook_p99"], every + CADENCE_SLACK
        )
    if "short" in results:
        found["1,000 tasks at 2 s: gap p99 <= 3 s"] = at_most(
            results["short"]["gap_p99"], SHORT_P99
        )
    if "memory_all" in results:
        extra = results["memory_all"]["rss_mb"] - results["memory_live"]["rss_mb"]
        found["1M stored: RSS within 30 MB"] = extra <= MAX_EXTRA_MB
        found["1M stored: GET p99 < 10 ms"] = at_most(
            results["memory_all"]["get_p99_ms"], 1000 * MAX_GET_P99
        )
    return found


def table(results: dict[str, Any]) -> str:
    lines = [f"relay latency per answer: {results.get('relay_latency', 0.0):g} s"]
    if results.get("ratio"):
        lines += [
            "",
            "| live | batch | bare s | real s | ratio | floor | CPU us/task bare "
            "| CPU us/task real | relay CPU us/task bare, real | writes/cycle | requests/cycle |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['live']:,} | {r['batch']} | {r['bare_s']} | {r['real_s']} | {r['ratio']} "
            f"| {r['floor']} | {r['bare_cpu_us']} | {r['real_cpu_us']} "
            f"| {r['relay_cpu_us_bare']}, {r['relay_cpu_us_real']} "
            f"| {r['writes_per_cycle']} | {r['requests_per_cycle']} |"
            for r in results["ratio"]
        ]
    if results.get("moving"):
        lines += [
            "",
            "every task's progress moves before each drain (no target):",
            "",
            "| live | batch | bare s | real s | ratio | CPU us/task bare | CPU us/task real "
            "| writes/cycle |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['live']:,} | {r['batch']} | {r['bare_s']} | {r['real_s']} | {r['ratio']} "
            f"| {r['bare_cpu_us']} | {r['real_cpu_us']} | {r['writes_per_cycle']} |"
            for r in results["moving"]
        ]
    if results.get("finishing"):
        lines += [
            "",
            "every task finishes at the relay before the drain (no target):",
            "",
            "| live | batch | real s | ratio | CPU us/task real | writes/cycle |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['live']:,} | {r['batch']} | {r['real_s']} | {r['ratio']} "
            f"| {r['real_cpu_us']} | {r['writes_per_cycle']} |"
            for r in results["finishing"]
        ]
    lines += [
        "",
        (
            "| run | live | final | interval | gap p1 | gap p50 | gap p99 | webhook p50 "
            "| webhook p99 | RSS MB | GET p99 ms |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in ("big", "short", "memory_live", "memory_all"):
        if name not in results:
            continue
        c = {k: "-" if v is None else v for k, v in results[name].items()}
        lines.append(
            f"| {name} | {c['live']:,} | {c['final']:,} | {c['interval']:g} s | {c['gap_p1']} "
            f"| {c['gap_p50']} "
            f"| {c['gap_p99']} | {c['webhook_p50']} | {c['webhook_p99']} | {c['rss_mb']} "
            f"| {c['get_p99_ms']} |"
        )
    lines += [
        "",
        *(f"{'PASS' if ok else 'MISS'}  {name}" for name, ok in results["verdicts"].items()),
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller cases, about a minute")
    parser.add_argument("--out", type=Path, default=Path("bench_poll.json"), help="JSON results")
    parser.add_argument("--only", help=f"comma-separated cases: {','.join(CASES)}")
    parser.add_argument("--keep", action="store_true", help="keep databases, configs and logs")
    parser.add_argument(
        "--relay-latency",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="ratio case: the relay holds every answer this long (default 0: at once)",
    )
    args = parser.parse_args(argv)
    logs.configure(level="warning", fmt="json", secrets=[])
    results = asyncio.run(run(args))
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    results["verdicts"] = verdicts(results)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    return 0 if all(results["verdicts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
