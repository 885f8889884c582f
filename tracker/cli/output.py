"""What the CLI reads from its arguments and writes for people (tables) and scripts (JSON)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

import pydantic

from tracker.api import errors, models


def print_json(value: Any, out: TextIO) -> None:
    out.write(json.dumps(value, indent=2, sort_keys=True, default=str) + "\n")


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    cells = [[("" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(columns)]
    out.write("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)) + "\n")
    for row in cells:
        out.write("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip() + "\n")


def wants_json(args: argparse.Namespace, out: TextIO) -> bool:
    return bool(args.json) or not out.isatty()


def show(args: argparse.Namespace, value: Any, human: Callable[[TextIO], object]) -> None:
    """JSON with --json or off a terminal, else what ``human`` writes."""
    if wants_json(args, sys.stdout):
        print_json(value, sys.stdout)
    else:
        human(sys.stdout)


def stats_tables(shown: Mapping[str, Any], out: TextIO) -> None:
    rows = [
        {"platform": key.split("/", 1)[0], "status": key.split("/", 1)[1], "tasks": n}
        for key, n in shown["tasks_by_platform"].items()
    ]
    table(rows, ["platform", "status", "tasks"], out)
    out.write("\n")
    table(
        [{"state": state, "deliveries": n} for state, n in sorted(shown["deliveries"].items())],
        ["state", "deliveries"],
        out,
    )
    out.write("\n")
    out.write(f"oldest pending delivery  {shown['oldest_pending_delivery'] or '-'}\n")
    if "poll_lag_seconds" in shown:
        out.write(f"poll lag                 {shown['poll_lag_seconds']} s\n")
    out.write(f"last poll cycle          {shown['last_cycle_at'] or 'none yet'}\n")


def aware(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 time; expected e.g. 2026-11-25T00:00:00Z"
        ) from None
    if parsed.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{value!r} has no time zone (add Z or +00:00)")
    # Then the API's own reading of a time, so the CLI takes exactly the times it takes (a
    # year 1 time cannot even be moved to UTC).
    try:
        return pydantic.TypeAdapter(models.ZonedTime).validate_python(value)
    except pydantic.ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{value!r} {errors.problems(exc.errors())[0]}") from None


def up_to(maximum: int) -> Callable[[str], int]:
    """An argparse type: a whole number from 1 to ``maximum``.

    Every number has a top: a row id or a limit past what the database holds is an
    OverflowError in the driver, not an answer.
    """

    def whole(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
        if number > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {number}")
        return number

    return whole


def seconds(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {value}")
    return number


def fail(args: argparse.Namespace | None, code: int, problems: Sequence[str]) -> int:
    """Report a failure on stderr: one line per problem, or one JSON object with --json."""
    if args is not None and getattr(args, "json", False):
        error = {"error": problems[0] if problems else "", "problems": list(problems)}
        print(json.dumps({**error, "exit_code": int(code)}), file=sys.stderr)  # noqa: T201
    else:
        for problem in problems:
            print(f"tracker: {problem}", file=sys.stderr)  # noqa: T201
    return int(code)
