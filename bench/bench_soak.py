"""Soak: a real `tracker run` under steady churn for some minutes, as a busy app keeps it.

    python bench/bench_soak.py                 # 10 minutes, 100 new tasks a second
    python bench/bench_soak.py --minutes 2     # a shorter look
    python bench/bench_soak.py --pg postgresql+psycopg://postgres@127.0.0.1:5432/postgres

An app registers ``--rate`` new tasks a second through the API (batches of 50, one in ten
failing at the relay); the simulated relay, in a child process with a receiver that verifies
every signature, moves each task on every ``--step`` seconds until it finishes. Every 30 s it
reads the daemon's resident memory and ``/readyz``. At the end it stops registering, waits for
the last tasks and webhooks, and checks that nothing was lost or sent twice: every task final,
one verified webhook per task, as many deliveries delivered, none pending or dead, and the
memory after the warm-up flat within ``MAX_GROWTH_MB``. SQLite by default; with ``--pg``, a
scratch database on that PostgreSQL server, dropped afterwards. Prints the readings and the
checks, writes JSON, exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from poll_rig import (
    Outside,
    config_text,
    daemon,
    free_port,
    machine,
    postgres_database,
    rss_mb,
    work_dir,
)

#: ids a registration carries
BATCH = 50
#: seconds between two readings of memory and readiness
SAMPLE_EVERY = 30.0
#: share of the run whose memory is the warm-up (caches and pools fill), not a trend
WARM_UP_SHARE = 0.3
#: the shortest run: one reading of memory at least falls after the warm-up (minutes)
MIN_MINUTES = 1.0
#: the most resident memory may grow after the warm-up (MB)
MAX_GROWTH_MB = 10.0
#: seconds the end waits for the last tasks to finish and their webhooks to arrive
SETTLE = 60.0


def stats(config_path: Path) -> dict[str, Any]:
    """`tracker stats` as the operator reads it (JSON)."""
    out = subprocess.run(
        [sys.executable, "-m", "tracker", "--json", "stats", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def soak(args: argparse.Namespace, work: Path, db_url: str) -> dict[str, Any]:
    """Run the soak in ``work`` on ``db_url``; the figures and the checks."""
    with Outside(step=args.step) as outside:
        port = free_port()
        config_path = work / "tracker.toml"
        config_path.write_text(config_text(outside, db_url, port, {"interval": 1}))
        samples: list[dict[str, float]] = []
        registered: list[str] = []
        headers = {"Authorization": "Bearer bench-token"}
        with (
            daemon(config_path, work / "daemon.log", port) as process,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=headers) as api,
        ):
            started = time.monotonic()
            next_sample = started
            while (elapsed := time.monotonic() - started) < args.minutes * 60:
                ids = [
                    f"soak-{n}" + ("-fail" if n % 10 == 0 else "")
                    for n in range(len(registered), len(registered) + BATCH)
                ]
                api.post("/v1/tasks", json={"platform": "luma", "ids": ids}).raise_for_status()
                registered += ids
                if time.monotonic() >= next_sample:
                    rss, _peak = rss_mb(process.pid)
                    ready = api.get("/readyz").status_code
                    samples.append({"at": round(elapsed), "rss_mb": rss, "readyz": ready})
                    print(
                        f"{elapsed:5.0f} s  registered {len(registered):7,d}  RSS {rss:6.1f} MB"
                        f"  /readyz {ready}",
                        flush=True,
                    )
                    next_sample += SAMPLE_EVERY
                # Paced from the start, so the rate holds however long a registration takes.
                time.sleep(max(0.0, started + len(registered) / args.rate - time.monotonic()))
            deadline = time.monotonic() + SETTLE
            while True:
                figures = stats(config_path)
                live = sum(
                    count
                    for status, count in figures["tasks"].items()
                    if status not in {"completed", "failed", "canceled"}
                )
                pending = figures["deliveries"].get("pending", 0)
                if (live == 0 and pending == 0) or time.monotonic() > deadline:
                    break
                time.sleep(1)
            rss_end, peak = rss_mb(process.pid)
        _log, _flips, hooks = outside.results()
    hooked = [task_id for task_id, _at in hooks]
    # Never empty: main() asks for a run long enough to read memory after the warm-up.
    warm = [s["rss_mb"] for s in samples if s["at"] >= args.minutes * 60 * WARM_UP_SHARE]
    growth = rss_end - min(warm)
    delivered = figures["deliveries"].get("delivered", 0)
    results: dict[str, Any] = {
        "machine": machine(),
        "database": db_url.split(":", 1)[0].split("+", 1)[0],
        "minutes": args.minutes,
        "rate": args.rate,
        "step": args.step,
        "registered": len(registered),
        "tasks": figures["tasks"],
        "deliveries": figures["deliveries"],
        "webhooks_verified": len(hooked),
        "rss_mb": samples,
        "rss_end_mb": round(rss_end, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_after_warm_up_mb": round(growth, 1),
    }
    results["checks"] = {
        "every task final": live == 0 and sum(figures["tasks"].values()) == len(registered),
        "one verified webhook per task": len(hooked) == len(set(hooked)) == len(registered),
        "every delivery delivered, none pending or dead": delivered == len(registered)
        and set(figures["deliveries"]) == {"delivered"},
        "/readyz 200 at every reading": all(s["readyz"] == 200 for s in samples),
        f"memory after the warm-up within {MAX_GROWTH_MB:g} MB": growth <= MAX_GROWTH_MB,
    }
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to register")
    parser.add_argument("--rate", type=float, default=100.0, help="new tasks a second")
    parser.add_argument("--step", type=float, default=2.0, help="seconds a relay status lasts")
    parser.add_argument("--out", type=Path, default=Path("bench_soak.json"), help="JSON results")
    parser.add_argument("--keep", action="store_true", help="keep the config and the log")
    parser.add_argument(
        "--pg", metavar="URL", help="a PostgreSQL URL whose server may get a scratch database"
    )
    args = parser.parse_args(argv)
    if args.minutes < MIN_MINUTES:
        # A shorter run reads memory during the warm-up only, and its check could not fail.
        parser.error(f"--minutes: at least {MIN_MINUTES:g}, to read memory after the warm-up")
    with contextlib.ExitStack() as stack:
        work = work_dir(stack, args.keep, "bench-soak-")
        if args.pg:
            db_url = stack.enter_context(postgres_database(args.pg))
        else:
            db_url = f"sqlite:///{work / 'tracker.db'}"
        results = soak(args, work, db_url)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\n{results['database']}: registered {results['registered']:,} tasks in "
        f"{args.minutes:g} min; "
        f"tasks {results['tasks']}; deliveries {results['deliveries']}; "
        f"verified webhooks {results['webhooks_verified']:,}; "
        f"RSS at the end {results['rss_end_mb']} MB (peak {results['peak_rss_mb']}), "
        f"{results['growth_after_warm_up_mb']:+} MB after the warm-up\n"
    )
    for name, ok in results["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
