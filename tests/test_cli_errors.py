"""How the operator CLI fails: one line (one JSON object with --json) naming the cause, the
README's exit code, never a traceback, and never a password.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import pydantic
import pytest
from conftest import base_config, toml_text
from test_cli import _config_file, run  # noqa: F401 - _config_file is the config_file fixture

from tracker import cli
from tracker.api import limits, models, strict_json
from tracker.cli import parsing
from tracker.status import TaskStatus
from tracker.store import SqlStore

PASSWORD = "hunter2pw"


def json_error(err: str) -> dict[str, Any]:
    """The one JSON object a failure writes on stderr with --json (fails on anything else)."""
    lines = err.splitlines()
    assert 1 == len(lines), err
    error: dict[str, Any] = json.loads(lines[0])
    assert {"error", "problems", "exit_code"} == set(error)
    assert [error["error"]] == error["problems"][:1]
    return error


# -- --json errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "code", "says"),
    [
        (["tasks", "show", "luma", "nope"], 1, "no task 'nope' on platform 'luma'"),
        (["tasks", "remove", "luma", "nope"], 1, "no task 'nope' on platform 'luma'"),
        (["deliveries", "redeliver", "12345"], 1, "no delivery 12345"),
        (["tasks", "add", "luma", " spaced "], 2, "ids[0]: must be a non-empty string"),
        (["tasks", "add", "luma", "a", "--metadata", "{"], 2, "metadata: not valid JSON"),
        (["tasks", "list", "--status", "bogus"], 2, "argument --status: invalid choice"),
        (["tasks", "show", "luma"], 2, "required: task_id"),
        (["deliveries", "redeliver", "99999999999999999999"], 2, "argument id: must be at most"),
    ],
)
def test_with_json_every_failure_is_one_json_object_on_stderr(
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    code: int,
    says: str,
) -> None:
    """Unknown tasks and deliveries (exit 1), refused registrations and command lines argparse
    refuses (exit 2) all write `{"error", "problems", "exit_code"}` on stderr, nothing on stdout.
    """
    got, out, err = run(capsys, "--json", "--config", str(config_file), *argv)

    error = json_error(err)
    assert (code, code, "") == (got, error["exit_code"], out)
    assert says in error["error"]


@pytest.mark.parametrize("json_flag", [True, False])
def test_an_interrupted_command_says_so_and_exits_130(
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    json_flag: bool,
) -> None:
    """Ctrl-C during a command: exit 130, and one line on stderr, the JSON object with --json."""

    def interrupted(_self: object, *_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(SqlStore, "stats", interrupted)
    flags = ["--json"] if json_flag else []
    got, out, err = run(capsys, *flags, "--config", str(config_file), "stats")

    assert (130, "") == (got, out)
    if json_flag:
        assert {"error": "interrupted", "problems": ["interrupted"], "exit_code": 130} == (
            json_error(err)
        )
    else:
        assert "tracker: interrupted\n" == err


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["--json", "stats"], True),
        (["stats", "--js"], True),  # argparse takes a prefix of an option for it
        (["tasks", "show", "luma", "--", "--json"], False),  # a task id, not the flag
        (["stats", "--config", "x"], False),
    ],
)
def test_json_is_asked_as_argparse_would_read_it(argv: list[str], wanted: bool) -> None:
    """A refused command line still answers in JSON when --json (or its prefix) is on it."""
    assert wanted is parsing.asks_json(argv)


# -- bad input: exit 2, naming the argument, no traceback -------------------------------------


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (
            ["deliveries", "redeliver", "99999999999999999999"],
            f"argument id: must be at most {limits.MAX_ROW_ID}, not 99999999999999999999",
        ),
        (["deliveries", "redeliver", str(2**31)], f"argument id: must be at most {2**31 - 1}"),
        (["deliveries", "redeliver", "0"], "argument id: must be at least 1, not 0"),
        (
            ["tasks", "list", "--limit", "99999999999999999999"],
            f"argument --limit: must be at most {limits.MAX_PAGE}",
        ),
        (["tasks", "list", "--limit", "1001"], "argument --limit: must be at most 1000, not 1001"),
        (["deliveries", "list", "--limit", "1001"], "argument --limit: must be at most 1000"),
        (["demo", "--tasks", "1001"], "argument --tasks: must be at most 1000, not 1001"),
    ],
)
def test_numbers_past_what_the_api_takes_are_refused_naming_the_argument(
    config_file: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    """Ids past the INTEGER column and limits past the API's page exit 2 with argparse's
    usage and one line naming the argument, not an OverflowError from the driver.
    """
    code, _, err = run(capsys, *argv, "--config", str(config_file))

    assert 2 == code, err
    assert "Traceback" not in err
    usage, line = err.splitlines()[0], err.splitlines()[-1]
    assert usage.startswith("usage: tracker ")
    assert line.startswith("tracker ")
    assert f": error: {says}" in line


def test_numbers_up_to_the_bounds_are_taken(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The largest limit lists, and the largest id is looked up (and found missing, exit 1)."""
    c = ["--config", str(config_file), "--json"]

    code, out, _ = run(capsys, "tasks", "list", "--limit", str(limits.MAX_PAGE), *c)
    assert (0, []) == (code, json.loads(out))
    code, _, err = run(capsys, "deliveries", "redeliver", str(limits.MAX_ROW_ID), *c)
    assert (1, f"no delivery {limits.MAX_ROW_ID}") == (code, json_error(err)["error"])


TIMES = [
    "0001-01-01T00:00+01:00",  # before year 1 in UTC: cannot even be converted
    "9999-12-31T23:00-01:00",  # after year 9999 in UTC
    "1969-12-31T23:59:59Z",
    "1970-01-01T00:00:00Z",
    "9999-12-31T23:59:59+00:00",
    "2026-11-25T00:00:00+01:00",
]


def api_takes(value: str) -> bool:
    try:
        models.RecoverIn.model_validate({"since": value, "until": value})
    except pydantic.ValidationError:
        return False
    return True


@pytest.mark.parametrize("value", TIMES)
@pytest.mark.parametrize("flag", ["--since", "--until"])
def test_recover_takes_exactly_the_times_the_api_takes(
    config_file: Path, capsys: pytest.CaptureFixture[str], value: str, flag: str
) -> None:
    """A time outside the API's years (in UTC) exits 2 naming them; one inside recovers."""
    window = ["--since", "1970-01-01T00:00Z", flag, value] if flag == "--until" else [flag, value]

    code, _, err = run(capsys, "deliveries", "recover", "--config", str(config_file), *window)

    assert "Traceback" not in err
    if api_takes(value):
        assert (0, "") == (code, err)
    else:
        assert 2 == code
        assert f"argument {flag}: {value!r} must lie between the years 1970 and 9999 in UTC" in err


def nested(levels: int) -> str:
    return '{"a":' * (levels - 1) + "{}" + "}" * (levels - 1)


METADATA = {
    "nan": '{"a": NaN}',
    "infinity": '{"a": Infinity}',
    "minus-infinity": '{"a": -Infinity}',
    "float-overflow": '{"a": 1e999}',
    "lone-surrogate": '{"a": "\\ud800"}',
    "5000-digits": '{"a": ' + "1" * 5000 + "}",
    "31-levels": nested(31),
    "32-levels": nested(32),  # 33 in the body, one more than it may nest
    "plain": '{"a": 1.5, "b": [null, true, "\\u00e9"]}',
}


@pytest.mark.parametrize("metadata", METADATA.values(), ids=METADATA.keys())
def test_metadata_is_refused_exactly_where_the_api_refuses_it(
    config_file: Path, capsys: pytest.CaptureFixture[str], metadata: str
) -> None:
    """--metadata goes through the API's strict body reading: NaN, Infinity, 1e999, a lone
    surrogate, an over-long integer or nesting past the body's bound exit 2 naming metadata,
    storing nothing; what the API takes is registered.
    """
    body = b'{"platform": "luma", "ids": ["m"], "metadata": ' + metadata.encode() + b"}"
    try:
        strict_json.parse(body)  # what the API does with a registration's body first
    except strict_json.BodyError as exc:
        refusal: str | None = f"metadata: {exc}"
    else:
        refusal = None
    c = ["--config", str(config_file), "--json"]

    code, _, err = run(capsys, "tasks", "add", *c, "luma", "m", "--metadata", metadata)

    listed = [t["task_id"] for t in json.loads(run(capsys, "tasks", "list", *c)[1])]
    if refusal is None:
        assert (0, ["m"]) == (code, listed), err
    else:
        assert (2, refusal, []) == (code, json_error(err)["error"], listed)


def test_metadata_not_utf8_on_the_command_line_is_refused(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bytes that are not UTF-8 (kept by Python as lone surrogates) are refused as the API
    refuses such a body, not written to the database.
    """
    text = b'{"a": "\xff"}'.decode("utf-8", "surrogateescape")

    code, _, err = run(
        capsys,
        "--json",
        "tasks",
        "add",
        "--config",
        str(config_file),
        "luma",
        "m",
        "--metadata",
        text,
    )

    assert (2, "metadata: not valid UTF-8 at byte 7") == (code, json_error(err)["error"])


def test_an_unknown_status_exits_2_naming_the_valid_ones(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tasks list --status bogus` is refused like an unknown platform, not answered with []."""
    code, out, err = run(capsys, "tasks", "list", "--config", str(config_file), "--status", "bogus")

    assert (2, "") == (code, out)
    assert "argument --status: invalid choice: 'bogus'" in err
    assert all(repr(s.value) in err for s in TaskStatus)
    assert 0 == run(capsys, "tasks", "list", "--config", str(config_file), "--status", "queued")[0]


# -- check-config shows no password -----------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def postgres_config(tmp_path: Path, url: str) -> Path:
    path = tmp_path / "pg.toml"
    path.write_text(toml_text(base_config("http://127.0.0.1:9", None, url)))
    return path


@pytest.mark.parametrize(
    ("flags", "terminal"), [(["--json"], True), ([], True), ([], False)], ids=str
)
def test_check_config_never_shows_the_database_password(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    flags: list[str],
    terminal: bool,
) -> None:
    """check-config shows the database URL with the password as ***, as the exit-4 lines do,
    in JSON and on a terminal alike.
    """
    path = postgres_config(tmp_path, f"postgresql+psycopg://postgres:{PASSWORD}@db.example:5432/t")
    if terminal:
        monkeypatch.setattr(sys, "stdout", Tty())

    code = cli.main(["check-config", "--config", str(path), *flags])

    out = sys.stdout.getvalue() if terminal else ""  # type: ignore[attr-defined]
    captured = capsys.readouterr()
    shown = out + captured.out + captured.err
    assert 0 == code, shown
    assert PASSWORD not in shown
    if flags or not terminal:
        database = json.loads(out or captured.out)["database"]
        assert "postgresql+psycopg://postgres:***@db.example:5432/t" == database
    else:
        assert shown.startswith("config OK: ")


def test_check_config_refuses_an_unreadable_database_url_without_echoing_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A URL no command could open (a port that is not a number) exits 2 naming database.url,
    and the password stays out of the error.
    """
    path = postgres_config(tmp_path, f"postgresql://postgres:{PASSWORD}@db.example:port/t")

    code, out, err = run(capsys, "--json", "check-config", "--config", str(path))

    assert (2, "") == (code, out)
    assert json_error(err)["error"].startswith("database.url: not a database URL")
    assert PASSWORD not in err


def test_check_config_hides_a_password_given_as_a_query_parameter(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """libpq also takes the password as ?password=: it is shown as *** like the other."""
    url = f"postgresql+psycopg://postgres@db.example:5432/t?password={PASSWORD}&sslmode=require"
    path = postgres_config(tmp_path, url)

    code, out, err = run(capsys, "--json", "check-config", "--config", str(path))

    assert 0 == code, err
    assert PASSWORD not in out + err
    assert json.loads(out)["database"].endswith("/t?password=%2A%2A%2A&sslmode=require")


def test_check_config_refuses_a_password_with_a_bare_at_sign_without_showing_any_of_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An "@" in a password must be %-encoded; unencoded, the URL reads as a host holding the
    password's end, so it is refused as unreadable, not shown with that end as the host."""
    path = postgres_config(tmp_path, "postgresql://postgres:pass@word42@db.example:5432/t")

    code, out, err = run(capsys, "--json", "check-config", "--config", str(path))

    assert (2, "") == (code, out)
    assert json_error(err)["error"].startswith("database.url: not a database URL")
    assert "word42" not in err
