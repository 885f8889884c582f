"""The parser of every command: global flags, and each command group adding its own."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from tracker.cli import daemon, db, deliveries, tasks

#: what `tracker --help` says the command is
DESCRIPTION = "The `tracker` command: the daemon, the demo, config checks and operator commands."


class CommandLineError(Exception):
    """A command line the parser refused; ``main`` reports it as it reports every failure."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """A parser that raises CommandLineError where argparse would print and exit.

    Its sub-parsers are of its class too (argparse makes them so), so every command's
    refusal reaches ``main``, which writes it as one JSON object with --json.
    """

    def error(self, message: str) -> NoReturn:
        raise CommandLineError(self, message)


def asks_json(argv: Sequence[str]) -> bool:
    """Whether ``argv`` holds --json, or a prefix of it argparse would take for it.

    For a command line the parser refused, which leaves no namespace to ask.
    """
    options = argv[: argv.index("--")] if "--" in argv else argv
    return any(len(arg) > 2 and "--json".startswith(arg) for arg in options)


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


class Commands:
    """Where a command module adds its commands and groups, each taking the global flags."""

    def __init__(self, sub: Any) -> None:
        self._sub = sub
        self._flags = _global_flags(top=False)

    def group(self, name: str, help_text: str) -> Any:
        """A command group (`tracker NAME ...`); its commands go in with ``parent=``."""
        p = self._sub.add_parser(name, help=help_text, parents=[self._flags])
        return p.add_subparsers(dest=f"{name}_command", required=True)

    def command(
        self,
        name: str,
        handler: Callable[[argparse.Namespace], int],
        parent: Any = None,
        **kw: Any,
    ) -> argparse.ArgumentParser:
        """A command run by ``handler``, whose docstring is its help."""
        where = self._sub if parent is None else parent
        p: argparse.ArgumentParser = where.add_parser(
            name, help=handler.__doc__, parents=[self._flags], **kw
        )
        p.set_defaults(handler=handler)
        return p


def parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    top = _Parser(prog="tracker", description=DESCRIPTION, parents=[_global_flags(top=True)])
    commands = Commands(top.add_subparsers(dest="command", required=True))
    for module in (daemon, tasks, db, deliveries):
        module.register(commands)
    return top
