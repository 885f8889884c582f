"""`tracker tasks add|list|show|remove` and `tracker stats`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING, Any

from tracker import api, clock, config
from tracker.api import limits, strict_json
from tracker.cli import output
from tracker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, known_platform, load, store
from tracker.status import TaskStatus

if TYPE_CHECKING:
    from tracker.cli.parsing import Commands


def cmd_tasks_add(args: argparse.Namespace) -> int:
    """Register ids straight into the database (the daemon picks them up)."""
    from tracker import platforms  # noqa: PLC0415

    settings = load(args)
    body: dict[str, Any] = {"platform": args.platform, "ids": args.ids}
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    if args.endpoint:
        body["endpoint"] = args.endpoint
    if args.metadata:
        body["metadata"] = _metadata(args.metadata)
    registration, problems = asyncio.run(
        api.validate_registration(body, sorted(platforms.build(settings)), settings)
    )
    if registration is None:
        return output.fail(args, EXIT_USAGE, problems)
    new, existing = store(args).register(registration, clock.SystemClock().now())
    out = sys.stdout
    if output.wants_json(args, out):
        output.print_json({"registered": new, "existing": existing}, out)
    else:
        out.write(f"registered {len(new)}, already tracked {len(existing)}\n")
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    """List tasks, newest first."""
    known_platform(args, args.platform)
    filters = {k: v for k, v in (("status", args.status), ("platform", args.platform)) if v}
    rows, _ = store(args).list_tasks(limit=args.limit, **filters)
    shown = [api.task_json(t, with_history=False) for t in rows]
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        output.table(shown, ["platform", "task_id", "status", "progress", "updated_at"], sys.stdout)
    return EXIT_OK


def cmd_tasks_show(args: argparse.Namespace) -> int:
    """Show one task with its history."""
    known_platform(args, args.platform)
    task = store(args).get(args.platform, args.task_id)
    if task is None:
        return output.fail(args, EXIT_FAILURE, [_no_task(args)])
    shown = api.task_json(task)
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        for key in ("platform", "task_id", "status", "upstream_status", "progress", "fail_reason"):
            value = shown[key]
            sys.stdout.write(f"{key:16} {'-' if value in (None, '') else value}\n")
        output.table(
            shown["transitions"], ["from", "to", "upstream_status", "progress", "at"], sys.stdout
        )
    return EXIT_OK


def cmd_tasks_remove(args: argparse.Namespace) -> int:
    """Stop tracking a task."""
    known_platform(args, args.platform)
    if not store(args).remove(args.platform, args.task_id):
        return output.fail(args, EXIT_FAILURE, [_no_task(args)])
    output.show(
        args,
        {"removed": {"platform": args.platform, "task_id": args.task_id}},
        lambda out: out.write(f"removed {args.platform}/{args.task_id}\n"),
    )
    return EXIT_OK


def _metadata(text: str) -> Any:
    """--metadata read as the API reads a request body, so the CLI refuses what it refuses."""
    # surrogatepass: bytes of the command line that are not UTF-8 stay so, and are refused
    raw = text.encode("utf-8", "surrogatepass")
    try:
        value = strict_json.parse(raw)
        # In a body the metadata sits one level down, which counts against the depth bound.
        strict_json.parse(b'{"metadata":' + raw + b"}")
    except strict_json.BodyError as exc:
        raise config.ConfigError([f"metadata: {exc}"]) from None
    return value


def _no_task(args: argparse.Namespace) -> str:
    return f"no task {args.task_id!r} on platform {args.platform!r}"


def cmd_stats(args: argparse.Namespace) -> int:
    """Counts by status, outbox depth, poll lag, last poll activity."""
    # prometheus_client only when asked
    from tracker.metrics import HELD_LAG, poll_lag, reported_held_lag  # noqa: PLC0415

    opened = store(args)
    stats = opened.stats()
    by_status: dict[str, int] = {}
    for (_, task_status), n in stats.tasks.items():
        by_status[task_status] = by_status.get(task_status, 0) + n
    last = opened.get_meta("last_cycle_at")
    # The tasks a running daemon holds unasked, which its claims hide from the store's lag.
    now = clock.SystemClock().now().timestamp()
    held = reported_held_lag(opened.get_meta(HELD_LAG), now)
    shown = {
        "tasks": by_status,
        "tasks_by_platform": {f"{p}/{s}": n for (p, s), n in sorted(stats.tasks.items())},
        "deliveries": dict(stats.deliveries),
        "oldest_pending_delivery": clock.isoformat(stats.oldest_pending_delivery),
        "poll_lag_seconds": round(max(poll_lag(stats, now), held), 3),
        "last_cycle_at": last,
    }
    output.show(args, shown, lambda out: output.stats_tables(shown, out))
    return EXIT_OK


def register(commands: Commands) -> None:
    """The `tasks` group and `stats`."""
    tasks = commands.group("tasks", "inspect and change tracked tasks")
    add = commands.command("add", cmd_tasks_add, tasks)
    add.add_argument("platform")
    add.add_argument("ids", nargs="+")
    add.add_argument("--webhook-url")
    add.add_argument("--endpoint")
    add.add_argument("--metadata", help="a JSON object")
    listing = commands.command("list", cmd_tasks_list, tasks)
    listing.add_argument("--status", choices=[s.value for s in TaskStatus])
    listing.add_argument("--platform")
    listing.add_argument(
        "--limit",
        type=output.up_to(limits.MAX_PAGE),
        default=limits.DEFAULT_PAGE,
        help=f"at most {limits.MAX_PAGE}, as the API's pages (default {limits.DEFAULT_PAGE})",
    )
    for name, handler in (("show", cmd_tasks_show), ("remove", cmd_tasks_remove)):
        one = commands.command(name, handler, tasks)
        one.add_argument("platform")
        one.add_argument("task_id")
    commands.command("stats", cmd_stats)
