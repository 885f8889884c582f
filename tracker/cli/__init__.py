"""The `tracker` command: the daemon, the demo, config checks and operator commands.

One module per command group (`daemon`: run, demo, check-config, init; `tasks`: tasks and
stats; `db`; `deliveries`), what they share (`common`), tables and JSON (`output`) and the
parser they all add to (`parsing`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sqlalchemy import exc as sa_exc

from tracker import config
from tracker.cli import common, output
from tracker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from tracker.cli.parsing import CommandLineError, asks_json, parser
from tracker.startup import ExitCode, StartupError
from tracker.store.sql import SchemaMismatchError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tracker` console script."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser().parse_args(argv)
    except CommandLineError as exc:
        return _refused(exc, json=asks_json(argv))
    try:
        code: int = args.handler(args)
    except config.ConfigError as exc:
        return output.fail(args, ExitCode.USAGE, exc.problems)
    except (StartupError, sa_exc.DBAPIError) as exc:
        # A DBAPIError: the store opened, then a statement failed (a locked SQLite file, a
        # server gone), said as a database that would not open is, never as a traceback.
        failed = exc if isinstance(exc, StartupError) else common.failure(args, exc)
        return output.fail(args, failed.code, [str(failed)])
    except SchemaMismatchError as exc:
        return output.fail(args, ExitCode.SCHEMA, [f"database: {exc}"])
    except KeyboardInterrupt:
        # Said as any failure is (a script reading --json gets its one object).
        return output.fail(args, ExitCode.INTERRUPTED, ["interrupted"])
    return code


def _refused(exc: CommandLineError, *, json: bool) -> int:
    """Report a command line the parser refused: one JSON object with --json, else as
    argparse itself says it (the command's usage, then what is wrong).
    """
    if json:
        problem = f"{exc.parser.prog}: {exc.message}"
        return output.fail(argparse.Namespace(json=True), ExitCode.USAGE, [problem])
    exc.parser.print_usage(sys.stderr)
    print(f"{exc.parser.prog}: error: {exc.message}", file=sys.stderr)  # noqa: T201
    return ExitCode.USAGE
