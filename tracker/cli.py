"""The `tracker` command: the daemon, the demo, config checks and operator commands."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracker import api, cli_io, clock, config, logs, startup
from tracker.retry import DeliveryState
from tracker.startup import ExitCode, StartupError
from tracker.store.sql import SchemaMismatchError

if TYPE_CHECKING:
    from tracker.store import SqlStore
    from tracker.store.abc import Store

#: exit codes scripts can rely on (the README's table lists them all)
EXIT_OK = ExitCode.OK
EXIT_FAILURE = ExitCode.FAILURE
EXIT_USAGE = ExitCode.USAGE


def _config_path(args: argparse.Namespace) -> str:
    path = args.config or os.environ.get("TRACKER_CONFIG")
    if not path:
        raise config.ConfigError(["no config file: pass --config PATH or set TRACKER_CONFIG"])
    return str(path)


def _load(args: argparse.Namespace) -> config.Settings:
    return config.load(_config_path(args))


def _known_platform(args: argparse.Namespace, name: str | None) -> None:
    """Refuse a platform the config does not define (a typo would read as "no such task")."""
    from tracker import platforms  # noqa: PLC0415

    known = sorted(platforms.build(_load(args)))
    if name is not None and name not in known:
        raise config.ConfigError([f"unknown platform {name!r}; known: {', '.join(known)}"])


# -- the daemon ------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from tracker.app import Daemon  # noqa: PLC0415 - keeps `tracker --help` fast

    path = _config_path(args)
    settings = config.load(path)
    with contextlib.ExitStack() as stack:
        if args.simulate:
            from tracker import simulate  # noqa: PLC0415

            step = args.step if args.step is not None else simulate.STEP
            settings = stack.enter_context(
                simulate.simulated(settings, receiver=args.receiver, step=step)
            )
        elif args.receiver:
            raise config.ConfigError(["--receiver goes with --simulate"])
        problems = config.placeholder_problems(settings)
        if problems:
            raise config.ConfigError(problems)
        startup.check_database(settings.database.url)
        logs.configure(
            level=settings.logging.level, fmt=settings.logging.format, secrets=settings.secrets()
        )
        asyncio.run(Daemon(settings, config_path=path).run())
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and say so."""
    path = _config_path(args)
    settings = config.load(path)
    problems = config.placeholder_problems(settings)
    database = startup.database_problem(settings.database.url)
    if problems or database:
        raise config.ConfigError([*problems, *([f"database.url: {database}"] if database else [])])
    from tracker import platforms  # noqa: PLC0415

    names = sorted(platforms.build(settings))
    shown = {"config": path, "platforms": names, "database": settings.database.url}
    cli_io.show(
        args,
        {"ok": True, **shown},
        lambda out: out.write(f"config OK: {len(names)} platforms ({', '.join(names)})\n"),
    )
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    """Write a fresh config with a new API token and webhook secret (mode 0600)."""
    from tracker import init_config  # noqa: PLC0415

    path = Path(args.path)
    try:
        token = init_config.write(path)
    except init_config.InitError as exc:
        raise config.ConfigError([str(exc)]) from None
    cli_io.show(
        args,
        {"path": str(path.absolute()), "api_token": token},
        lambda out: out.write(init_config.next_steps(path, token)),
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the whole path with no relay account: simulated relay, daemon, local receiver."""
    from tracker import demo  # noqa: PLC0415

    return demo.run(tasks=args.tasks, step=args.step)


# -- operator commands -----------------------------------------------------------------------


def _database(args: argparse.Namespace, *, create: bool = True) -> SqlStore:
    """The SQL store itself, for the ``db`` commands that work on its engine."""
    from sqlalchemy import exc as sa_exc  # noqa: PLC0415

    from tracker.store import SqlStore, migrate  # noqa: PLC0415

    settings = _load(args)
    url = settings.database.url
    startup.check_database(url)
    store = SqlStore.from_url(url)
    try:
        if create:
            # The same rule as the daemon's start: an empty database gets the schema, an older
            # one is upgraded only when auto_migrate allows it.
            migrate.ensure(store.engine, auto_migrate=settings.database.auto_migrate)
        else:
            store.engine.connect().close()
    except sa_exc.SQLAlchemyError as exc:
        raise startup.unreachable(url, exc) from None
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
    if cli_io.wants_json(args, out):
        cli_io.print_json({"registered": new, "existing": existing}, out)
    else:
        out.write(f"registered {len(new)}, already tracked {len(existing)}\n")
    return EXIT_OK


def cmd_tasks_list(args: argparse.Namespace) -> int:
    """List tasks, newest first."""
    _known_platform(args, args.platform)
    store = _store(args)
    filters = {k: v for k, v in (("status", args.status), ("platform", args.platform)) if v}
    rows, _ = store.list_tasks(limit=args.limit, **filters)
    shown = [api.task_json(t, with_history=False) for t in rows]
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
    else:
        cli_io.table(shown, ["platform", "task_id", "status", "progress", "updated_at"], sys.stdout)
    return EXIT_OK


def cmd_tasks_show(args: argparse.Namespace) -> int:
    """Show one task with its history."""
    _known_platform(args, args.platform)
    task = _store(args).get(args.platform, args.task_id)
    if task is None:
        print(f"no task {args.task_id!r} on platform {args.platform!r}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    shown = api.task_json(task)
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
    else:
        for key in ("platform", "task_id", "status", "upstream_status", "progress", "fail_reason"):
            value = shown[key]
            sys.stdout.write(f"{key:16} {'-' if value in (None, '') else value}\n")
        cli_io.table(
            shown["transitions"], ["from", "to", "upstream_status", "progress", "at"], sys.stdout
        )
    return EXIT_OK


def cmd_tasks_remove(args: argparse.Namespace) -> int:
    """Stop tracking a task."""
    _known_platform(args, args.platform)
    if not _store(args).remove(args.platform, args.task_id):
        print(f"no task {args.task_id!r} on platform {args.platform!r}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    cli_io.show(
        args,
        {"removed": {"platform": args.platform, "task_id": args.task_id}},
        lambda out: out.write(f"removed {args.platform}/{args.task_id}\n"),
    )
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
    cli_io.show(args, shown, lambda out: cli_io.stats_tables(shown, out))
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
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
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
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
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
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
    else:
        note = "up to date" if state.up_to_date else f"behind {state.head}"
        sys.stdout.write(f"{state.describe()} ({note})\n")
    return EXIT_OK if state.up_to_date else EXIT_FAILURE


def cmd_db_history(args: argparse.Namespace) -> int:
    """The migrations this release ships, oldest first."""
    from tracker.store import migrate  # noqa: PLC0415

    shown = [dataclasses.asdict(r) for r in migrate.history()]
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
    else:
        cli_io.table(shown, ["revision", "down_revision", "title"], sys.stdout)
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
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
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
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json(shown, sys.stdout)
    else:
        columns = ["id", "event_type", "task_id", "state", "attempts", "last_status_code", "url"]
        cli_io.table(shown, columns, sys.stdout)
    return EXIT_OK


def cmd_deliveries_redeliver(args: argparse.Namespace) -> int:
    """Queue one delivery again, whatever its state."""
    ids = _store(args).requeue(clock.SystemClock().now(), pk=args.id)
    if not ids:
        print(f"no delivery {args.id}", file=sys.stderr)  # noqa: T201
        return EXIT_FAILURE
    cli_io.show(args, {"requeued": ids}, lambda out: out.write(f"requeued {args.id}\n"))
    return EXIT_OK


def cmd_deliveries_recover(args: argparse.Namespace) -> int:
    """Queue every dead delivery created in a time window again."""
    ids = _store(args).requeue(clock.SystemClock().now(), since=args.since, until=args.until)
    if cli_io.wants_json(args, sys.stdout):
        cli_io.print_json({"requeued": ids}, sys.stdout)
    else:
        sys.stdout.write(f"requeued {len(ids)} dead deliveries\n")
    return EXIT_OK


# -- parsing ---------------------------------------------------------------------------------


def _global_flags(*, top: bool) -> argparse.ArgumentParser:
    """--config and --json, accepted before the command and after it alike.

    The sub-commands' copies default to SUPPRESS, so a flag given before the command is not
    reset by the sub-command's parser.
    """
    flags = argparse.ArgumentParser(add_help=False)
    default: Any = None if top else argparse.SUPPRESS
    flags.add_argument("--config", default=default, help="config file (default: $TRACKER_CONFIG)")
    flags.add_argument(
        "--json",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="JSON output (also whenever stdout is not a terminal)",
    )
    return flags


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = argparse.ArgumentParser(
        prog="tracker", description=__doc__, parents=[_global_flags(top=True)]
    )
    sub = top.add_subparsers(dest="command", required=True)
    flags = _global_flags(top=False)

    def group(name: str, help_text: str) -> Any:
        p = sub.add_parser(name, help=help_text, parents=[flags])
        return p.add_subparsers(dest=f"{name}_command", required=True)

    def command(
        name: str, handler: Callable[[argparse.Namespace], int], parent: Any = sub, **kw: Any
    ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = parent.add_parser(
            name, help=handler.__doc__, parents=[flags], **kw
        )
        p.set_defaults(handler=handler)
        return p

    run = command("run", cmd_run)
    run.add_argument(
        "--simulate", action="store_true", help="poll the built-in simulated relay (no account)"
    )
    run.add_argument(
        "--receiver",
        action="store_true",
        help="with --simulate: send webhooks to a local receiver that prints them",
    )
    run.add_argument(
        "--step",
        type=cli_io.seconds,
        help="with --simulate: seconds per simulated status (default 2)",
    )
    command("check-config", cmd_check_config)
    init = command("init", cmd_init)
    init.add_argument("path", nargs="?", default="tracker.toml", help="default: ./tracker.toml")
    demo = command("demo", cmd_demo)
    demo.add_argument(
        "--tasks", type=cli_io.positive, default=5, help="tasks to register (default 5)"
    )
    demo.add_argument("--step", type=cli_io.seconds, default=1.0, help="seconds per simulated step")

    tasks = group("tasks", "inspect and change tracked tasks")
    add = command("add", cmd_tasks_add, tasks)
    add.add_argument("platform")
    add.add_argument("ids", nargs="+")
    add.add_argument("--webhook-url")
    add.add_argument("--endpoint")
    add.add_argument("--metadata", help="a JSON object")
    listing = command("list", cmd_tasks_list, tasks)
    listing.add_argument("--status")
    listing.add_argument("--platform")
    listing.add_argument("--limit", type=cli_io.positive, default=50)
    for name, handler in (("show", cmd_tasks_show), ("remove", cmd_tasks_remove)):
        one = command(name, handler, tasks)
        one.add_argument("platform")
        one.add_argument("task_id")

    command("stats", cmd_stats)
    db = group("db", "database maintenance")
    command("check", cmd_db_check, db)
    command("upgrade", cmd_db_upgrade, db)
    command("current", cmd_db_current, db)
    prune = command("prune", cmd_db_prune, db)
    prune.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    command("history", cmd_db_history, db)

    deliveries = group("deliveries", "webhook deliveries")
    dl = command("list", cmd_deliveries_list, deliveries)
    dl.add_argument("--state", choices=[s.value for s in DeliveryState])
    dl.add_argument("--limit", type=cli_io.positive, default=50)
    rd = command("redeliver", cmd_deliveries_redeliver, deliveries)
    rd.add_argument("id", type=cli_io.positive)
    rc = command("recover", cmd_deliveries_recover, deliveries)
    rc.add_argument(
        "--since", type=cli_io.aware, required=True, help="ISO time, e.g. 2026-11-25T00:00Z"
    )
    rc.add_argument("--until", type=cli_io.aware, help="ISO time (default: now)")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tracker` console script."""
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except config.ConfigError as exc:
        return cli_io.fail(args, ExitCode.USAGE, exc.problems)
    except StartupError as exc:
        return cli_io.fail(args, exc.code, [str(exc)])
    except SchemaMismatchError as exc:
        return cli_io.fail(args, ExitCode.SCHEMA, [f"database: {exc}"])
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return code
