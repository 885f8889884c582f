"""The operator CLI against the same config and database the daemon uses, and `tracker demo`."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from conftest import base_config, merge, toml_text

from tracker import cli, config, signing, simulate
from tracker.status import Change, TaskStatus
from tracker.store import Registration, SqlStore
from tracker.store.records import OutboxEntry, TaskUpdate
from tracker.testing.simulator import SimulatedRelay

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(name="config_file")
def _config_file(tmp_path: Path, relay: SimulatedRelay, sqlite_url: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(toml_text(base_config(relay.base_url, "http://127.0.0.1:9/hooks", sqlite_url)))
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """The exit code and what `tracker ARGV` printed to stdout and stderr (in this process)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:  # argparse's own exits (--help); the code is what a shell sees
        code = int(str(exc.code))
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
    [line] = [row for row in human.splitlines() if row.startswith("poll lag ")]
    assert 120 <= float(line.split()[2]) < 180


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
    assert "next: `tracker init`" in done.stdout
    assert 4 == done.stdout.count("webhook task.completed")
    assert 1 == done.stdout.count("webhook task.failed")


# -- flags, formats and errors ----------------------------------------------------------------


def test_global_flags_go_before_or_after_the_command(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tracker --json --config X stats` and `tracker stats --config X --json` say the same."""
    before = run(capsys, "--json", "--config", str(config_file), "stats")
    after = run(capsys, "stats", "--config", str(config_file), "--json")

    assert before == after
    assert (0, {}) == (before[0], json.loads(before[1])["tasks"])


class Tty(io.StringIO):
    """A stdout that says it is a terminal, so commands print for humans."""

    def isatty(self) -> bool:
        return True


def human(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    out = Tty()
    monkeypatch.setattr(sys, "stdout", out)
    code = cli.main(list(argv))
    return code, out.getvalue()


def test_stats_on_a_terminal_is_tables_not_python_reprs(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """stats prints a table of tasks by platform and status, and one of deliveries by state."""
    run(capsys, "tasks", "add", "--config", str(config_file), "luma", "a", "b")

    code, text = human(monkeypatch, "stats", "--config", str(config_file))

    assert 0 == code
    assert "{" not in text
    assert "PLATFORM  STATUS   TASKS" in text
    assert "luma      pending  2" in text
    assert "last poll cycle          none yet" in text


def test_tasks_show_on_a_terminal_shows_no_python_none(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task with no progress yet shows "-" rather than None."""
    run(capsys, "tasks", "add", "--config", str(config_file), "luma", "a")

    code, text = human(monkeypatch, "tasks", "show", "--config", str(config_file), "luma", "a")

    assert 0 == code
    assert "None" not in text
    assert "progress         -" in text


def test_every_command_prints_json_with_the_flag(
    config_file: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """check-config, tasks remove and deliveries recover print JSON with --json, even on a
    terminal.
    """
    c = ["--config", str(config_file), "--json"]
    run(capsys, "tasks", "add", *c, "luma", "a")
    outputs = [
        human(monkeypatch, "check-config", *c),
        human(monkeypatch, "tasks", "remove", *c, "luma", "a"),
        human(monkeypatch, "deliveries", "recover", *c, "--since", "2026-11-25T00:00:00Z"),
    ]

    assert [0, 0, 0] == [code for code, _ in outputs]
    shown = [json.loads(text) for _, text in outputs]
    assert True is shown[0]["ok"]
    assert {"platform": "luma", "task_id": "a"} == shown[1]["removed"]
    assert {"requeued": []} == shown[2]


def make_delivery(url: str) -> int:
    """Record one move of a fresh task with one webhook event; returns the delivery's id."""
    store = SqlStore.from_url(url)
    store.create_schema()
    now = datetime.now(UTC)
    store.register(Registration(platform="luma", ids=["d1"]), now)
    (task,) = store.claim_due(now, 10, lease=30.0)
    after = dataclasses.replace(task.snapshot, status=TaskStatus.IN_PROGRESS)
    entry = OutboxEntry("msg_1", "task.started", b"{}", "http://127.0.0.1:9/h", None, False)
    store.record([TaskUpdate(task, Change(task.snapshot, after, None, ()), (entry,))], now)
    (delivery,), _ = store.list_deliveries(limit=1)
    store.close()
    return delivery.id


def test_redeliver_prints_json(
    config_file: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """deliveries redeliver --json prints the requeued ids as JSON."""
    pk = make_delivery(sqlite_url)

    code, out, _ = run(capsys, "deliveries", "redeliver", "--config", str(config_file), str(pk))

    assert (0, {"requeued": [pk]}) == (code, json.loads(out))


def test_deliveries_list_shows_one_tasks_webhooks(
    config_file: Path, sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """--platform and --task-id narrow the list to one platform's, or one task's, webhooks
    (the same id on another platform is another task, so --task-id needs --platform); a
    mistyped platform names the known ones."""
    store = SqlStore.from_url(sqlite_url)
    store.create_schema()
    now = datetime.now(UTC)
    for platform, task_id in (("luma", "a"), ("luma", "b"), ("suno", "a")):
        store.register(Registration(platform=platform, ids=[task_id]), now)
    for n, task in enumerate(store.claim_due(now, 10, lease=30.0)):
        after = dataclasses.replace(task.snapshot, status=TaskStatus.IN_PROGRESS)
        entry = OutboxEntry(f"msg_{n}", "task.started", b"{}", "http://127.0.0.1:9/h", None, False)
        store.record([TaskUpdate(task, Change(task.snapshot, after, None, ()), (entry,))], now)
    store.close()
    c = ("--config", str(config_file), "--json")

    def listed(*options: str) -> list[tuple[str, str]]:
        code, out, _ = run(capsys, "deliveries", "list", *c, *options)
        assert 0 == code
        return sorted((d["platform"], d["task_id"]) for d in json.loads(out))

    assert [("luma", "a"), ("luma", "b"), ("suno", "a")] == listed()
    assert [("luma", "a"), ("luma", "b")] == listed("--platform", "luma")
    assert [("luma", "a")] == listed("--platform", "luma", "--task-id", "a")
    code, _, err = run(capsys, "deliveries", "list", *c, "--platform", "lumaa")
    assert 2 == code
    assert "unknown platform 'lumaa'" in json.loads(err)["error"]
    code, _, err = run(capsys, "deliveries", "list", *c, "--task-id", "a")
    assert 2 == code
    assert "--task-id needs --platform" in json.loads(err)["error"]


def test_errors_name_what_was_expected(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad time names the format, a mistyped platform names the known ones, and
    `demo --tasks 0` says the minimum; each exits 2 without a traceback.
    """
    c = ["--config", str(config_file)]
    cases = [
        (["deliveries", "recover", *c, "--since", "yesterday"], "expected e.g. 2026-11-25T00:00"),
        (["tasks", "show", *c, "lumaa", "ID"], "unknown platform 'lumaa'; known: kling, luma"),
        (["demo", "--tasks", "0"], "--tasks: must be at least 1, not 0"),
    ]
    for argv, says in cases:
        try:
            code = cli.main(argv)
        except SystemExit as exc:  # argparse's own refusals
            code = int(str(exc.code))
        err = capsys.readouterr().err
        assert (2, True) == (code, says in err), (argv, err)
        assert "Traceback" not in err


def test_errors_are_json_with_the_flag(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json a failure is one JSON object on stderr carrying the exit code."""
    code, _, err = run(capsys, "--json", "tasks", "show", "--config", str(config_file), "x", "y")

    assert 2 == code
    assert 2 == json.loads(err)["exit_code"]
    assert "unknown platform 'x'" in json.loads(err)["error"]


# -- the newcomer's path ----------------------------------------------------------------------


def test_the_example_config_is_refused_with_how_to_make_real_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.example.toml as shipped fails check-config and run, naming each placeholder and
    `tracker init`.
    """
    example = (REPO / "config.example.toml").read_text()
    path = tmp_path / "config.toml"
    path.write_text(example)

    for command in ("check-config", "run"):
        code, _, err = run(capsys, command, "--config", str(path))
        assert 2 == code
        assert "server.api_tokens: the example's placeholder token; `tracker init`" in err
        assert "upstream.api_key: the example's placeholder" in err
        assert "webhooks.secret: the example's published secret; `tracker init`" in err


def test_init_says_where_it_wrote_and_what_to_edit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a terminal, init names the file, the try-it command, and the keys to edit."""
    path = tmp_path / "t.toml"

    code, text = human(monkeypatch, "init", str(path))

    assert 0 == code
    assert f"wrote {path} (mode 0600)" in text
    assert f"tracker run --config {path} --simulate --receiver" in text
    assert "edit" in text
    assert "[upstream] base_url and api_key" in text


def test_the_simulate_receiver_verifies_webhooks_under_a_secret_a_reload_rotated_to(
    capsys: pytest.CaptureFixture[str], sqlite_url: str
) -> None:
    """`tracker run --simulate --receiver`: after a reload that rotates `[webhooks].secret`,
    the printing receiver verifies what the daemon now signs with the new secret (and still
    what it signed before)."""
    old, new = signing.new_secret(), signing.new_secret()
    document = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/hook", sqlite_url)
    settings = config.parse(merge(document, {"webhooks": {"secret": old}}), environ={})
    rotated = config.parse(merge(document, {"webhooks": {"secret": new}}), environ={})
    body = json.dumps(
        {
            "type": "task.completed",
            "data": {
                "platform": "luma",
                "task_id": "t1",
                "previous_status": "in_progress",
                "status": "completed",
                "fail_reason": None,
                "result": None,
            },
        }
    ).encode()

    def send(url: str, secret: str, msg_id: str) -> int:
        stamp = int(time.time())
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": signing.signature_header([secret], msg_id, stamp, body),
        }
        return httpx.post(url, content=body, headers=headers, timeout=10).status_code

    with simulate.simulated(settings, receiver=True) as override:
        started = override(settings)
        answers = [send(started.webhooks.url, old, "msg_before")]
        reloaded = override(rotated)  # what each reload does to the file's settings
        answers.append(send(reloaded.webhooks.url, new, "msg_after"))
        answers.append(send(reloaded.webhooks.url, signing.new_secret(), "msg_forged"))

    assert [204, 204, 400] == answers

    printed = capsys.readouterr().out
    assert "[verified, webhook-id msg_before]" in printed
    assert "[verified, webhook-id msg_after]" in printed
    assert "[NOT VERIFIED, webhook-id msg_forged]" in printed


def test_init_writes_a_private_config_and_the_simulator_path_delivers_a_webhook(
    tmp_path: Path,
) -> None:
    """`tracker init` writes a 0600 config with fresh credentials; `tracker run --simulate
    --receiver` on it takes a curl-style registration and prints the verified webhook.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRACKER_")}
    path = tmp_path / "tracker.toml"

    def init() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tracker", "init", str(path)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
            timeout=30,
        )

    made = init()
    assert 0 == made.returncode, made.stderr
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    settings = config.load(path)
    token = settings.server.api_tokens[0].get_secret_value()
    assert {"path": str(path), "api_token": token} == json.loads(made.stdout)
    assert token not in config.PLACEHOLDER_TOKENS
    assert settings.webhooks.secret.get_secret_value().startswith("whsec_")
    again = init()
    assert (2, True) == (again.returncode, "already exists" in again.stderr)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tracker_command = [sys.executable, "-m", "tracker"]
    path.write_text(path.read_text().replace("port = 8686", f"port = {port}"))
    proc = subprocess.Popen(
        [*tracker_command, "run", "--config", str(path), "--simulate", "--receiver", "--step=.2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        lines = iter(proc.stdout or ())
        next(line for line in lines if '"started"' in line or "started" in line)
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/tasks",
            headers={"Authorization": f"Bearer {token}"},
            json={"platform": "luma", "ids": ["my-first-task"]},
            timeout=10,
        )
        assert 201 == answer.status_code, answer.text
        hook = next(line for line in lines if "webhook task.completed" in line)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert "luma/my-first-task" in hook
    assert "[verified" in hook
    assert 0 == proc.returncode
