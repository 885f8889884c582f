"""The `tracker` command: the daemon, the demo, config checks and operator commands."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, TextIO

from tracker import api, clock, config, logs
from tracker.retry import DeliveryState
from tracker.store.sql import SchemaMismatchError

if TYPE_CHECKING:
    from tracker.store import SqlStore
    from tracker.store.abc import Store

#: exit codes scripts can rely on
EXIT_OK = 0
EXIT_FAILURE = 1  #: the command ran but what it reports is bad (not found, check failed)
EXIT_USAGE = 2  #: bad arguments or an unusable config


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("TRACKER_CONFIG")
    if not path:
        raise config.ConfigError(["no config file: pass --config PATH or set TRACKER_CONFIG"])
    return str(path)


def _load(args: argparse.Namespace) -> config.Settings:
    return config.load(_config_path(args))


def _print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def _table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)) + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def _wants_json(args: argparse.Namespace, out: TextIO) -> bool:
    return bool(args.json) or not out.isatty()


# -- the daemon ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from tracker.app import Daemon  # noqa: PLC0415 - keeps `tracker --help` fast

    path = _config_path(args)
    settings = config.load(path)
    logs.configure(
        level=settings.logging.level, fmt=settings.logging.format, secrets=settings.secrets()
    )
    asyncio.run(Daemon(settings, config_path=path).run())
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and say so."""
    settings = _load(args)
    from tracker import platforms  # noqa: PLC0415

    names = sorted(platforms.build(settings))
    print(f"config OK: {len(names)} platforms ({', '.join(names)})")  # noqa: T201
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the whole path with no relay account: simulated relay, daemon, local receiver."""
    from tracker import demo  # noqa: PLC0415

    return demo.run(tasks=args.tasks, step=args.step)


# -- operator commands -----------------------------------------------------------------------


def _database(args: argparse.Namespace, *, create: bool = True) -> SqlStore:
    """The SQL store itself, for the ``db`` commands that work on its engine."""
    from tracker.store import SqlStore, migrate  # noqa: PLC0415

    settings = _load(args)
    store = SqlStore.from_url(settings.database.url)
    if create:
        # The same rule as the daemon's start: an empty database gets the schema, an older
        # one is upgraded only when auto_migrate allows it.
        migrate.ensure(store.engine, auto_migrate=settings.database.auto_migrate)
    return store


def _store(args: argparse.Namespace) -> Store:
    """The store as the task and delivery commands use it."""
    return _database(args)


def cmd_tasks_add(args: argparse.Namespace) -> int:
    """Register ids straight into the database (the daemon picks them up)."""
    from tracker import platforms  # noqa: PLC0415

    settings = _load(args)
    body: dict[str, Any] = {"platform": args.platform, "ids": args.ids}
    if args.webhook_url:
        body["webhook_url"] = args.webhook_url
    if args.endpoint:
        body["endpoint"] = args.endpoint
    if args.metadata:
        try:
            body["metadata"] = json.loads(args.metadata)
        except json.JSONDecodeError:
            print("metadata: not valid JSON", file=sys.stderr)  # noqa: T201
            return EXIT_USAGE
    registration, problems = asyncio.run(
        api.validate_registration(body, sorted(platforms.build(settings)), settings)
    )
    if registration is None:
        for problem in problems:
            print(problem, file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    store = _store(args)
    new, existing = store.register(registration, clock.SystemClock().now())
    out = sys.stdout
    if _wants_json(args, out):
        _print_json({"registered": new, "existing": existing}, out)
    else:
        out.write(f"registered {len(new)}, already tracked {len(existing)}\n")
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    """List tasks, newest first."""
    store = _store(args)
    filters = {k: v for k, v in (("status", args.status), ("platform", args.platform)) if v}
    rows, _ = store.list_tasks(limit=args.limit, **filters)
    shown = [api.task_json(t, with_history=False) for t in rows]
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        _table(shown, ["platform", "task_id", "status", "progress", "updated_at"], sys.stdout)
    return EXIT_OK


def cmd_tasks_show(args: argparse.Namespace) -> int:
    """Show one task with its history."""
    task = _store(args).get(args.platform, args.task_id)
    if task is None:
        print(f"no task {args.task_id!r} on platform {args.platform!r}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    shown = api.task_json(task)
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        for key in ("platform", "task_id", "status", "upstream_status", "progress", "fail_reason"):
            sys.stdout.write(f"{key:16} {shown[key]}\n")
        _table(
            shown["transitions"], ["from", "to", "upstream_status", "progress", "at"], sys.stdout
        )
    return EXIT_OK


def cmd_tasks_remove(args: argparse.Namespace) -> int:
    """Stop tracking a task."""
    if not _store(args).remove(args.platform, args.task_id):
        print(f"no task {args.task_id!r} on platform {args.platform!r}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    return EXIT_OK


def cmd_stats(args: argparse.Namespace) -> int:
    """Counts by status, outbox depth, poll lag, last poll activity."""
    from tracker.metrics import poll_lag  # noqa: PLC0415 - prometheus_client only when asked

    store = _store(args)
    stats = store.stats()
    by_status: dict[str, int] = {}
    for (_, task_status), n in stats.tasks.items():
        by_status[task_status] = by_status.get(task_status, 0) + n
    last = store.get_meta("last_cycle_at")
    shown = {
        "tasks": by_status,
        "tasks_by_platform": {f"{p}/{s}": n for (p, s), n in sorted(stats.tasks.items())},
        "deliveries": dict(stats.deliveries),
        "oldest_pending_delivery": clock.isoformat(stats.oldest_pending_delivery),
        "poll_lag_seconds": round(poll_lag(stats, clock.SystemClock().now().timestamp()), 3),
        "last_cycle_at": last,
    }
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        for key, value in shown.items():
            sys.stdout.write(f"{key:24} {value}\n")
    return EXIT_OK


def cmd_db_check(args: argparse.Namespace) -> int:
    """Integrity and schema revision."""
    from tracker.store import migrate  # noqa: PLC0415

    store = _database(args, create=False)
    problems = store.integrity_problems()
    try:
        state = migrate.current(store.engine)
    except SchemaMismatchError as exc:
        found, expected = None, migrate.head()
        problems.append(str(exc))
    else:
        found, expected = state.revision, state.head
        if not state.up_to_date:
            problems.append(
                f"schema revision {state.describe()}, expected {state.head}: "
                f"run `{migrate.UPGRADE_COMMAND}`"
            )
    shown = {"schema_version": found, "expected": expected, "problems": problems}
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        sys.stdout.write("database OK\n" if not problems else "\n".join(problems) + "\n")
    return EXIT_OK if not problems else EXIT_FAILURE


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the schema to this release's (adopting a release 0.1.0 database)."""
    from tracker.store import migrate  # noqa: PLC0415

    store = _database(args, create=False)
    try:
        before, after = migrate.upgrade(store.engine)
    finally:
        store.close()
    shown = {"from": before.revision, "to": after.revision, "shape": before.shape.value}
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    elif before.up_to_date:
        sys.stdout.write(f"already at {after.revision}\n")
    else:
        sys.stdout.write(f"upgraded from {before.describe()} to {after.revision}\n")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    """The database's schema revision and this release's newest."""
    from tracker.store import migrate  # noqa: PLC0415

    store = _database(args, create=False)
    try:
        state = migrate.current(store.engine)
    finally:
        store.close()
    shown = {
        "revision": state.revision,
        "head": state.head,
        "shape": state.shape.value,
        "up_to_date": state.up_to_date,
    }
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        note = "up to date" if state.up_to_date else f"behind {state.head}"
        sys.stdout.write(f"{state.describe()} ({note})\n")
    return EXIT_OK if state.up_to_date else EXIT_FAILURE


def cmd_db_history(args: argparse.Namespace) -> int:
    """The migrations this release ships, oldest first."""
    from tracker.store import migrate  # noqa: PLC0415

    shown = [dataclasses.asdict(r) for r in migrate.history()]
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        _table(shown, ["revision", "down_revision", "title"], sys.stdout)
    return EXIT_OK


def cmd_db_prune(args: argparse.Namespace) -> int:
    """Delete what [retention] no longer keeps (--dry-run: only count it)."""
    from tracker import retention  # noqa: PLC0415

    settings = _load(args)
    store = _database(args)
    now = clock.SystemClock().now()
    try:
        if args.dry_run:
            pruned = retention.preview(store.engine, settings.retention, now)
        else:
            pruned = retention.run(store.engine, settings.retention, now)
    finally:
        store.close()
    shown = {"dry_run": args.dry_run, **dataclasses.asdict(pruned)}
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        sys.stdout.write(
            f"{verb} {pruned.deliveries} deliveries ({pruned.attempts} attempts), "
            f"{pruned.tasks} tasks ({pruned.transitions} transitions)\n"
        )
    return EXIT_OK


def cmd_deliveries_list(args: argparse.Namespace) -> int:
    """List deliveries, newest first."""
    rows, _ = _store(args).list_deliveries(
        state=DeliveryState(args.state) if args.state else None, limit=args.limit
    )
    shown = [api.delivery_json(d) for d in rows]
    if _wants_json(args, sys.stdout):
        _print_json(shown, sys.stdout)
    else:
        columns = ["id", "event_type", "task_id", "state", "attempts", "last_status_code", "url"]
        _table(shown, columns, sys.stdout)
    return EXIT_OK


def cmd_deliveries_redeliver(args: argparse.Namespace) -> int:
    """Queue one delivery again, whatever its state."""
    ids = _store(args).requeue(clock.SystemClock().now(), pk=args.id)
    if not ids:
        print(f"no delivery {args.id}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    sys.stdout.write(f"requeued {args.id}\n")
    return EXIT_OK


def _aware(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone (add Z or +00:00)")
    return parsed


def cmd_deliveries_recover(args: argparse.Namespace) -> int:
    """Queue every dead delivery created in a time window again."""
    ids = _store(args).requeue(clock.SystemClock().now(), since=args.since, until=args.until)
    if _wants_json(args, sys.stdout):
        _print_json({"requeued": ids}, sys.stdout)
    else:
        sys.stdout.write(f"requeued {len(ids)} dead deliveries\n")
    return EXIT_OK


# -- parsing ---------------------------------------------------------------------------------


def _with_config(parser: argparse.ArgumentParser, *, json_flag: bool = False) -> None:
    parser.add_argument("--config", help="config file (default: $TRACKER_CONFIG)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(prog="tracker", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], parent: Any = sub, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(name, help=handler.__doc__, **kw)
        p.set_defaults(handler=handler)
        return p

    _with_config(command("run", cmd_run))
    _with_config(command("check-config", cmd_check_config))
    demo = command("demo", cmd_demo)
    demo.add_argument("--tasks", type=int, default=5, help="tasks to register (default 5)")
    demo.add_argument("--step", type=float, default=1.0, help="seconds per simulated status step")

    tasks = sub.add_parser("tasks", help="inspect and change tracked tasks").add_subparsers(
        dest="tasks_command", required=True
    )
    add = command("add", cmd_tasks_add, tasks)
    _with_config(add, json_flag=True)
    add.add_argument("platform")
    add.add_argument("ids", nargs="+")
    add.add_argument("--webhook-url")
    add.add_argument("--endpoint")
    add.add_argument("--metadata", help="a JSON object")
    listing = command("list", cmd_tasks_list, tasks)
    _with_config(listing, json_flag=True)
    listing.add_argument("--status")
    listing.add_argument("--platform")
    listing.add_argument("--limit", type=int, default=50)
    for name, handler in (("show", cmd_tasks_show), ("remove", cmd_tasks_remove)):
        one = command(name, handler, tasks)
        _with_config(one, json_flag=True)
        one.add_argument("platform")
        one.add_argument("task_id")

    _with_config(command("stats", cmd_stats), json_flag=True)
    db = sub.add_parser("db", help="database maintenance").add_subparsers(
        dest="db_command", required=True
    )
    _with_config(command("check", cmd_db_check, db), json_flag=True)
    _with_config(command("upgrade", cmd_db_upgrade, db), json_flag=True)
    _with_config(command("current", cmd_db_current, db), json_flag=True)
    prune = command("prune", cmd_db_prune, db)
    _with_config(prune, json_flag=True)
    prune.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    history = command("history", cmd_db_history, db)
    history.add_argument("--json", action="store_true", help="machine-readable output")

    deliveries = sub.add_parser("deliveries", help="webhook deliveries").add_subparsers(
        dest="deliveries_command", required=True
    )
    dl = command("list", cmd_deliveries_list, deliveries)
    _with_config(dl, json_flag=True)
    dl.add_argument("--state", choices=[s.value for s in DeliveryState])
    dl.add_argument("--limit", type=int, default=50)
    rd = command("redeliver", cmd_deliveries_redeliver, deliveries)
    _with_config(rd, json_flag=True)
    rd.add_argument("id", type=int)
    rc = command("recover", cmd_deliveries_recover, deliveries)
    _with_config(rc, json_flag=True)
    rc.add_argument("--since", type=_aware, required=True, help="ISO time, e.g. 2026-11-25T00:00Z")
    rc.add_argument("--until", type=_aware, help="ISO time (default: now)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tracker` console script."""
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except config.ConfigError as exc:
        print("configuration error:", file=sys.stderr)  # noqa: T201
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)  # noqa: T201
        return EXIT_USAGE
    except SchemaMismatchError as exc:
        print(f"database error: {exc}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    return code
