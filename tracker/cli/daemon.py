"""`tracker run`, `demo`, `check-config` and `init`: the daemon and its config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from tracker import config, logs, runtime, startup
from tracker.api import limits
from tracker.cli import output
from tracker.cli.common import EXIT_OK, config_path

if TYPE_CHECKING:
    from tracker.cli.parsing import Commands


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from tracker.app import Daemon  # noqa: PLC0415 - keeps `tracker --help` fast

    path = config_path(args)
    settings = config.load(path)
    with contextlib.ExitStack() as stack:
        overrides = None
        if args.simulate:
            from tracker import simulate  # noqa: PLC0415

            step = args.step if args.step is not None else simulate.STEP
            overrides = stack.enter_context(
                simulate.simulated(settings, receiver=args.receiver, step=step)
            )
            settings = overrides(settings)
        elif args.receiver:
            raise config.ConfigError(["--receiver goes with --simulate"])
        problems = config.placeholder_problems(settings)
        if problems:
            raise config.ConfigError(problems)
        startup.check_database(settings.database.url)
        logs.configure(
            level=settings.logging.level, fmt=settings.logging.format, secrets=settings.secrets()
        )
        runtime.tune_gc()
        asyncio.run(Daemon(settings, config_path=path, overrides=overrides).run())
    return EXIT_OK


def cmd_check_config(args: argparse.Namespace) -> int:
    """Validate the config and say so."""
    path = config_path(args)
    settings = config.load(path)
    problems = startup.start_problems(settings)
    if problems:
        raise config.ConfigError(problems)
    from tracker import platforms  # noqa: PLC0415

    names = sorted(platforms.build(settings))
    database = startup.shown_url(settings.database.url)  # never with its password
    shown = {"config": path, "platforms": names, "database": database}
    output.show(
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
    output.show(
        args,
        {"path": str(path.absolute()), "api_token": token},
        lambda out: out.write(init_config.next_steps(path, token)),
    )
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """Show the whole path with no relay account: simulated relay, daemon, local receiver."""
    from tracker import demo  # noqa: PLC0415

    return demo.run(tasks=args.tasks, step=args.step)


def register(commands: Commands) -> None:
    """`run`, `check-config`, `init` and `demo` with their flags."""
    run = commands.command("run", cmd_run)
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
        type=output.seconds,
        help="with --simulate: seconds per simulated status (default 2)",
    )
    commands.command("check-config", cmd_check_config)
    init = commands.command("init", cmd_init)
    init.add_argument("path", nargs="?", default="tracker.toml", help="default: ./tracker.toml")
    demo = commands.command("demo", cmd_demo)
    demo.add_argument(
        "--tasks",
        # The demo registers them in one request, which the API caps.
        type=output.up_to(limits.MAX_IDS),
        default=5,
        help=f"tasks to register, at most {limits.MAX_IDS} (default 5)",
    )
    demo.add_argument("--step", type=output.seconds, default=1.0, help="seconds per simulated step")
