"""`tracker run`, `demo`, `check-config` and `init`: the daemon and its config."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from tracker import config, logs, runtime, startup
from tracker.api import limits
from tracker.cli import common, output
from tracker.cli.common import EXIT_OK, config_path

if TYPE_CHECKING:
    from tracker.cli.parsing import Commands


def cmd_run(args: argparse.Namespace) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT."""
    from tracker.app import Daemon  # noqa: PLC0415 - keeps `tracker --help` fast

    # Said before the config is read: a flag that would do nothing is the first thing to fix.
    if args.receiver and not args.simulate:
        raise config.ConfigError(["--receiver goes with --simulate"])
    if args.step is not None and not args.simulate:
        raise config.ConfigError(["--step goes with --simulate"])
    path = config_path(args)
    settings = common.load_file(path)
    with contextlib.ExitStack() as stack:
        overrides = None
        if args.simulate:
            from tracker import simulate  # noqa: PLC0415

            step = args.step if args.step is not None else simulate.STEP
            overrides = stack.enter_context(
                simulate.simulated(settings, receiver=args.receiver, step=step)
            )
            settings = overrides(settings)
        problems = config.from_environment(config.placeholder_problems(settings))
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
    settings = _checked(path)
    problems = config.from_environment(startup.start_problems(settings))
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


def _checked(path: str) -> config.Settings:
    """The settings of the config file at ``path``, for check-config: when its keys do not
    validate, the error lists the placeholder credentials among its values too (judged on the
    values alone, as the start checks judge them); the database and platform checks need the
    whole file valid."""
    raw = common.read(path)
    try:
        return config.from_document(raw, path)
    except config.ConfigError as exc:
        named = exc.problems
        document = config.with_overrides(raw)
        found = config.from_environment(config.document_placeholder_problems(document))
        # A key whose value is already refused (a secret that is not one) is named once.
        found = [p for p in found if not any(_same_key(p, n) for n in named)]
        raise config.ConfigError([*named, *found]) from None


def _same_key(problem: str, other: str) -> bool:
    """Whether ``other`` is about the key ``problem`` names, or a part of it."""
    key = problem.split(":", 1)[0].split(" (from ", 1)[0]
    return other.startswith(key) and other[len(key) : len(key) + 1] in (":", ".", " ")


def _init_path(args: argparse.Namespace) -> str:
    """Where `tracker init` writes: its PATH, else --config, else TRACKER_CONFIG, else
    ./tracker.toml (so the next command, naming the file the same way, reads it)."""
    from tracker import init_config  # noqa: PLC0415

    if args.path is not None:
        if args.config is not None and args.config != args.path:
            raise config.ConfigError(
                [f"init: PATH {args.path!r} and --config {args.config!r} name two files; give one"]
            )
        return str(args.path)
    return common.named_config(args) or init_config.DEFAULT_PATH


def cmd_init(args: argparse.Namespace) -> int:
    """Write a fresh config with a new API token and webhook secret (mode 0600)."""
    from tracker import init_config  # noqa: PLC0415

    path = Path(_init_path(args))
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
    init.add_argument(
        "path",
        nargs="?",
        default=None,
        help="default: --config, else $TRACKER_CONFIG, else ./tracker.toml",
    )
    demo = commands.command("demo", cmd_demo)
    demo.add_argument(
        "--tasks",
        # The demo registers them in one request, which the API caps.
        type=output.up_to(limits.MAX_IDS),
        default=5,
        help=f"tasks to register, at most {limits.MAX_IDS} (default 5)",
    )
    demo.add_argument("--step", type=output.seconds, default=1.0, help="seconds per simulated step")
