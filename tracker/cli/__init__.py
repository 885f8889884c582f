"""The `tracker` command: the daemon, the demo, config checks and operator commands.

One module per command group (`daemon`: run, demo, check-config, init; `tasks`: tasks and
stats; `db`; `deliveries`), what they share (`common`), tables and JSON (`output`) and the
parser they all add to (`parsing`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tracker import config
from tracker.cli import output
from tracker.cli.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from tracker.cli.parsing import parser
from tracker.startup import ExitCode, StartupError
from tracker.store.sql import SchemaMismatchError

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main", "parser"]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tracker` console script."""
    args = parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except config.ConfigError as exc:
        return output.fail(args, ExitCode.USAGE, exc.problems)
    except StartupError as exc:
        return output.fail(args, exc.code, [str(exc)])
    except SchemaMismatchError as exc:
        return output.fail(args, ExitCode.SCHEMA, [f"database: {exc}"])
    except KeyboardInterrupt:
        return ExitCode.INTERRUPTED
    return code
