"""`tracker deliveries list|redeliver|recover`: webhook deliveries."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from tracker import api, clock
from tracker.api import limits
from tracker.cli import output
from tracker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, known_platform, store
from tracker.retry import DeliveryState

if TYPE_CHECKING:
    from tracker.cli.parsing import Commands


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    """List deliveries, newest first; those of one platform, or of one task."""
    if args.task_id is not None and args.platform is None:
        # Ids are a platform's own: the same id on two platforms is two tasks.
        return output.fail(args, EXIT_USAGE, ["--task-id needs --platform"])
    known_platform(args, args.platform)
    rows, _ = store(args).list_deliveries(
        state=DeliveryState(args.state) if args.state else None,
        platform=args.platform,
        task_id=args.task_id,
        limit=args.limit,
    )
    shown = [api.delivery_json(d) for d in rows]
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        columns = ["id", "event_type", "task_id", "state", "attempts", "last_status_code", "url"]
        output.table(shown, columns, sys.stdout)
    return EXIT_OK


def cmd_deliveries_redeliver(args: argparse.Namespace) -> int:
    """Queue one delivery again, whatever its state."""
    ids = store(args).requeue(clock.SystemClock().now(), pk=args.id)
    if not ids:
        return output.fail(args, EXIT_FAILURE, [f"no delivery {args.id}"])
    output.show(args, {"requeued": ids}, lambda out: out.write(f"requeued {args.id}\n"))
    return EXIT_OK


def cmd_deliveries_recover(args: argparse.Namespace) -> int:
    """Queue every dead delivery created in a time window again."""
    ids = store(args).requeue(clock.SystemClock().now(), since=args.since, until=args.until)
    if output.wants_json(args, sys.stdout):
        output.print_json({"requeued": ids}, sys.stdout)
    else:
        sys.stdout.write(f"requeued {len(ids)} dead deliveries\n")
    return EXIT_OK


def register(commands: Commands) -> None:
    """The `deliveries` group."""
    deliveries = commands.group("deliveries", "webhook deliveries")
    listing = commands.command("list", cmd_deliveries_list, deliveries)
    listing.add_argument("--state", choices=[s.value for s in DeliveryState])
    listing.add_argument("--platform", help="only this platform's deliveries")
    listing.add_argument("--task-id", help="with --platform: only this task's webhooks")
    listing.add_argument(
        "--limit",
        type=output.up_to(limits.MAX_PAGE),
        default=limits.DEFAULT_PAGE,
        help=f"at most {limits.MAX_PAGE}, as the API's pages (default {limits.DEFAULT_PAGE})",
    )
    redeliver = commands.command("redeliver", cmd_deliveries_redeliver, deliveries)
    # The API's bound: ids live in INTEGER columns, 32-bit on PostgreSQL.
    redeliver.add_argument("id", type=output.up_to(limits.MAX_ROW_ID))
    recover = commands.command("recover", cmd_deliveries_recover, deliveries)
    recover.add_argument(
        "--since", type=output.aware, required=True, help="ISO time, e.g. 2026-11-25T00:00Z"
    )
    recover.add_argument("--until", type=output.aware, help="ISO time (default: now)")
