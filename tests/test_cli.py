"""The operator CLI against the same config and database the daemon uses, and `tracker demo`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from conftest import base_config, toml_text

from tracker import cli
from tracker.store import Registration, SqlStore
from tracker.testing.simulator import SimulatedRelay


@pytest.fixture(name="config_file")
def _config_file(tmp_path: Path, relay: SimulatedRelay, sqlite_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(toml_text(base_config(relay.base_url, "http://127.0.0.1:9/hooks", sqlite_url)))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_add_list_show_remove(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Tasks added from the CLI can be listed, shown and removed; exit codes say what happened."""
    c = ["--config", str(config_file), "--json"]
    code, out, _ = run(capsys, "tasks", "add", *c, "luma", "a", "b", "--metadata", '{"k": 1}')
    assert (0, {"registered": ["a", "b"], "existing": []}) == (code, json.loads(out))

    code, out, _ = run(capsys, "tasks", "list", *c)
    assert (0, ["b", "a"]) == (code, [t["task_id"] for t in json.loads(out)])

    code, out, _ = run(capsys, "tasks", "show", *c, "luma", "a")
    assert (0, "pending", {"k": 1}) == (
        code,
        json.loads(out)["status"],
        json.loads(out)["metadata"],
    )

    assert 0 == run(capsys, "tasks", "remove", *c, "luma", "a")[0]
    code, _, err = run(capsys, "tasks", "show", *c, "luma", "a")
    assert 1 == code
    assert "no task 'a'" in err
    assert 1 == run(capsys, "tasks", "remove", *c, "luma", "a")[0]


def test_tasks_add_refuses_invalid_input(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Invalid ids or platforms exit 2 with the problem named, storing nothing."""
    code, _, err = run(capsys, "tasks", "add", "--config", str(config_file), "nope", "a")

    assert 2 == code
    assert "platform:" in err
    code, out, _ = run(capsys, "tasks", "list", "--config", str(config_file), "--json")
    assert [] == json.loads(out)


def test_stats_and_db_check(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """stats counts tasks by status; db check passes on a healthy database."""
    c = ["--config", str(config_file), "--json"]
    run(capsys, "tasks", "add", *c, "luma", "a", "b")

    code, out, _ = run(capsys, "stats", *c)
    assert (0, {"pending": 2}) == (code, json.loads(out)["tasks"])
    code, out, _ = run(capsys, "db", "check", *c)
    assert (0, []) == (code, json.loads(out)["problems"])


def test_stats_shows_how_late_the_most_overdue_poll_is(
    config_file: Path,
    sqlite_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stats reports poll_lag_seconds, in JSON and in the human table."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    store.register(Registration("luma", ["late"]), datetime.now(UTC) - timedelta(seconds=120))
    store.close()

    code, out, _ = run(capsys, "stats", "--config", str(config_file), "--json")
    assert 0 == code
    assert 120 <= json.loads(out)["poll_lag_seconds"] < 180
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    _, human, _ = run(capsys, "stats", "--config", str(config_file))
    [line] = [row for row in human.splitlines() if row.startswith("poll_lag_seconds")]
    assert 120 <= float(line.split()[1]) < 180


def test_db_check_fails_on_a_foreign_database(
    tmp_path: Path, relay: SimulatedRelay, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database without tracker's schema fails the check with exit code 1."""
    path = tmp_path / "c.toml"
    path.write_text(toml_text(base_config(relay.base_url, None, f"sqlite:///{tmp_path / 'x.db'}")))

    code, out, _ = run(capsys, "db", "check", "--config", str(path), "--json")
    assert 1 == code
    (problem,) = json.loads(out)["problems"]
    assert "schema revision empty (no tracker tables)" in problem
    assert "tracker db upgrade" in problem


def test_human_tables_on_request(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json on a terminal, output is a table with a header line."""
    run(capsys, "tasks", "add", "--config", str(config_file), "--json", "luma", "zz")
    args = cli.parser().parse_args(["tasks", "list", "--config", str(config_file)])

    class Tty:
        def __init__(self) -> None:
            self.text = ""

        def isatty(self) -> bool:
            return True

        def write(self, s: str) -> None:
            self.text += s

    out = Tty()
    sys.stdout, saved = out, sys.stdout  # type: ignore[assignment]
    try:
        assert 0 == args.handler(args)
    finally:
        sys.stdout = saved
    header, row = out.text.splitlines()
    assert header.startswith("PLATFORM")
    assert "zz" in row


def test_missing_config_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """With neither --config nor TRACKER_CONFIG, commands exit 2 and say how to fix it."""
    code, _, err = run(capsys, "stats")

    assert 2 == code
    assert "--config PATH or set TRACKER_CONFIG" in err


def test_tracker_config_environment_variable(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """TRACKER_CONFIG stands in for --config."""
    monkeypatch.setenv("TRACKER_CONFIG", str(config_file))

    assert 0 == run(capsys, "check-config")[0]


def test_demo_runs_end_to_end_in_a_fresh_process(tmp_path: Path) -> None:
    """`tracker demo` finishes every task, verifies every webhook and exits 0 within a minute."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    done = subprocess.run(
        [sys.executable, "-m", "tracker", "demo", "--step", "0.3"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=env,
        check=False,
    )

    assert 0 == done.returncode, done.stdout + done.stderr
    assert "done: 5 tasks finished" in done.stdout
    assert "0 failed verification" in done.stdout
    assert 4 == done.stdout.count("webhook task.completed")
    assert 1 == done.stdout.count("webhook task.failed")
