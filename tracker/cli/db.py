"""`tracker db check|upgrade|current|history|prune`: database maintenance."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import TYPE_CHECKING

from tracker import clock
from tracker.cli import output
from tracker.cli.common import EXIT_FAILURE, EXIT_OK, database, load
from tracker.store.sql import SchemaMismatchError

if TYPE_CHECKING:
    from tracker.cli.parsing import Commands


def cmd_db_check(args: argparse.Namespace) -> int:
    """Integrity and schema revision."""
    from tracker.store import migrate  # noqa: PLC0415

    store = database(args, create=False)
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
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        sys.stdout.write("database OK\n" if not problems else "\n".join(problems) + "\n")
    return EXIT_OK if not problems else EXIT_FAILURE


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Upgrade the schema to this release's (adopting a release 0.1.0 database)."""
    from tracker.store import migrate  # noqa: PLC0415

    store = database(args, create=False)
    try:
        before, after = migrate.upgrade(store.engine)
    finally:
        store.close()
    shown = {"from": before.revision, "to": after.revision, "shape": before.shape.value}
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    elif before.up_to_date:
        sys.stdout.write(f"already at {after.revision}\n")
    else:
        sys.stdout.write(f"upgraded from {before.describe()} to {after.revision}\n")
    return EXIT_OK


def cmd_db_current(args: argparse.Namespace) -> int:
    """The database's schema revision and this release's newest."""
    from tracker.store import migrate  # noqa: PLC0415

    store = database(args, create=False)
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
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        note = "up to date" if state.up_to_date else f"behind {state.head}"
        sys.stdout.write(f"{state.describe()} ({note})\n")
    return EXIT_OK if state.up_to_date else EXIT_FAILURE


def cmd_db_history(args: argparse.Namespace) -> int:
    """The migrations this release ships, oldest first."""
    from tracker.store import migrate  # noqa: PLC0415

    shown = [dataclasses.asdict(r) for r in migrate.history()]
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        output.table(shown, ["revision", "down_revision", "title"], sys.stdout)
    return EXIT_OK


def cmd_db_prune(args: argparse.Namespace) -> int:
    """Delete what [retention] no longer keeps (--dry-run: only count it)."""
    from tracker import retention  # noqa: PLC0415

    settings = load(args)
    store = database(args)
    now = clock.SystemClock().now()
    try:
        if args.dry_run:
            pruned = retention.preview(store.engine, settings.retention, now)
        else:
            pruned = retention.run(store.engine, settings.retention, now)
    finally:
        store.close()
    shown = {"dry_run": args.dry_run, **dataclasses.asdict(pruned)}
    if output.wants_json(args, sys.stdout):
        output.print_json(shown, sys.stdout)
    else:
        verb = "would delete" if args.dry_run else "deleted"
        sys.stdout.write(
            f"{verb} {pruned.deliveries} deliveries ({pruned.attempts} attempts), "
            f"{pruned.tasks} tasks ({pruned.transitions} transitions)\n"
        )
    return EXIT_OK


def register(commands: Commands) -> None:
    """The `db` group."""
    db = commands.group("db", "database maintenance")
    commands.command("check", cmd_db_check, db)
    commands.command("upgrade", cmd_db_upgrade, db)
    commands.command("current", cmd_db_current, db)
    prune = commands.command("prune", cmd_db_prune, db)
    prune.add_argument("--dry-run", action="store_true", help="count what would go, delete nothing")
    commands.command("history", cmd_db_history, db)
