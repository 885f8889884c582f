"""Tests for tracker.logs: JSON/console rendering, journald priorities, redaction, levels."""

from __future__ import annotations

import io
import json
import logging
import os
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from tracker import logs

SECRET = "sk-live-0123456789abcdef"
ANSI_ESCAPE = re.compile(r"\x1b\[")


class FakeTTY(io.StringIO):
    """An in-memory stream that claims to be a terminal."""

    def isatty(self) -> bool:
        return True


pytestmark = pytest.mark.usefixtures("restore_logging")


def json_lines(buf: io.StringIO) -> list[dict[str, Any]]:
    """Each line of `buf` parsed as a JSON object."""
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_line_has_level_event_and_utc_timestamp() -> None:
    """fmt='json' writes one JSON object per event with level, event, keys and a UTC timestamp."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={})
    structlog.get_logger().info("task.polled", task_id="t-1", attempts=2)

    [line] = json_lines(buf)
    assert line["event"] == "task.polled"
    assert line["level"] == "info"
    assert line["task_id"] == "t-1"
    assert line["attempts"] == 2
    stamp = datetime.fromisoformat(line["timestamp"])
    assert stamp.utcoffset() == timedelta(0)
    assert abs(datetime.now(UTC) - stamp) < timedelta(seconds=5)


def test_contextvars_are_merged() -> None:
    """Values bound with structlog.contextvars appear on every line."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={})
    with structlog.contextvars.bound_contextvars(request_id="r-9"):
        structlog.get_logger().info("handled")
    structlog.get_logger().info("outside")

    inside, outside = json_lines(buf)
    assert inside["request_id"] == "r-9"
    assert "request_id" not in outside


def test_auto_picks_json_for_a_pipe() -> None:
    """fmt='auto' on a stream that is not a TTY writes JSON."""
    buf = io.StringIO()
    logs.configure(stream=buf, environ={})
    structlog.get_logger().warning("disk.low")
    assert json_lines(buf)[0]["event"] == "disk.low"


def test_auto_picks_console_on_a_tty_outside_systemd() -> None:
    """fmt='auto' on a TTY renders the readable console format with colors."""
    tty = FakeTTY()
    logs.configure(stream=tty, environ={})
    structlog.get_logger().info("tracker.started", port=8686)
    output = tty.getvalue()
    assert "tracker.started" in output
    assert ANSI_ESCAPE.search(output)
    with pytest.raises(json.JSONDecodeError):
        json.loads(output)


@pytest.mark.parametrize("variable", ["JOURNAL_STREAM", "INVOCATION_ID"])
def test_auto_picks_json_under_systemd_even_on_a_tty(variable: str) -> None:
    """fmt='auto' writes JSON on a TTY when JOURNAL_STREAM or INVOCATION_ID says systemd runs us."""
    tty = FakeTTY()
    logs.configure(stream=tty, environ={variable: "8:1234"})
    structlog.get_logger().info("tracker.started")
    line = tty.getvalue().removeprefix("<6>")
    assert json.loads(line)["event"] == "tracker.started"


def test_console_format_without_tty_has_no_colors() -> None:
    """fmt='console' on a non-TTY stream contains the event and keys but no ANSI escapes."""
    buf = io.StringIO()
    logs.configure(fmt="console", stream=buf, environ={})
    structlog.get_logger().info("webhook.sent", status=204)
    output = buf.getvalue()
    assert "webhook.sent" in output
    assert "status=204" in output
    assert not ANSI_ESCAPE.search(output)


def test_journald_lines_carry_syslog_priority_prefix() -> None:
    """Under JOURNAL_STREAM each JSON line starts with <N>: 7 debug, 6 info, 4 warning, 3 error."""
    buf = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=buf, environ={"JOURNAL_STREAM": "8:1234"})
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")

    lines = buf.getvalue().splitlines()
    prefixes = [line[:3] for line in lines]
    assert prefixes == ["<7>", "<6>", "<4>", "<3>", "<2>"]
    assert [json.loads(line[3:])["event"] for line in lines] == ["d", "i", "w", "e", "c"]


def test_no_priority_prefix_without_journald() -> None:
    """Without JOURNAL_STREAM the JSON lines are bare, even when INVOCATION_ID is set."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={"INVOCATION_ID": "abc"})
    structlog.get_logger().error("boom")
    assert buf.getvalue().startswith("{")


def test_journal_stream_must_match_a_real_stream(tmp_path: Path) -> None:
    """A real file gets the prefix only if JOURNAL_STREAM names its device and inode."""
    path = tmp_path / "out.log"
    with path.open("w") as stream:
        stat = os.fstat(stream.fileno())
        logs.configure(fmt="json", stream=stream, environ={"JOURNAL_STREAM": "1:2"})
        structlog.get_logger().error("redirected")
        logs.configure(
            fmt="json", stream=stream, environ={"JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}"}
        )
        structlog.get_logger().error("journal")
    first, second = path.read_text().splitlines()
    assert first.startswith("{")
    assert second.startswith("<3>{")


def fail_with_secret() -> None:
    """Raise the way a relay client might, echoing the key in the message."""
    raise RuntimeError(f"relay said: invalid key {SECRET}")


def test_secrets_are_redacted_everywhere() -> None:
    """A secret inside the event, nested values, an exception object and a traceback is replaced."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={}, secrets=[SECRET, "", "whsec_abc"])
    log = structlog.get_logger()
    event = f"relay rejected {SECRET}"
    try:
        fail_with_secret()
    except RuntimeError as exc:
        log.exception(
            event,
            response={"body": {"message": f"token {SECRET} expired"}, "codes": [f"x{SECRET}y"]},
            error=exc,
        )
    log.info("fine", note="nothing to hide")

    output = buf.getvalue()
    assert SECRET not in output
    first, second = json_lines(buf)
    assert first["event"] == "relay rejected [redacted]"
    assert first["response"]["body"]["message"] == "token [redacted] expired"
    assert first["response"]["codes"] == ["x[redacted]y"]
    assert first["error"] == "RuntimeError('relay said: invalid key [redacted]')"
    assert "RuntimeError: relay said: invalid key [redacted]" in first["exception"]
    assert second["note"] == "nothing to hide"


def test_redaction_applies_to_console_and_stdlib() -> None:
    """Redaction also covers the console renderer and stdlib records."""
    buf = io.StringIO()
    logs.configure(fmt="console", stream=buf, environ={}, secrets=[SECRET])
    structlog.get_logger().error("bad", detail=SECRET)
    logging.getLogger("httpx").error("GET /?key=%s failed", SECRET)
    output = buf.getvalue()
    assert SECRET not in output
    assert output.count("[redacted]") == 2


def test_level_filters_lower_events() -> None:
    """With level='warning', debug and info events are dropped and warning and up are kept."""
    buf = io.StringIO()
    logs.configure(level="warning", fmt="json", stream=buf, environ={})
    log = structlog.get_logger()
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    assert [line["event"] for line in json_lines(buf)] == ["w", "e"]


def test_set_level_applies_to_loggers_bound_earlier() -> None:
    """set_level changes what a logger bound before the change emits, both down and up."""
    buf = io.StringIO()
    logs.configure(level="info", fmt="json", stream=buf, environ={})
    bound = structlog.get_logger().bind(component="poller")
    bound.debug("hidden")

    logs.set_level("debug")
    assert logs.get_level() == "debug"
    bound.debug("shown")

    logs.set_level("ERROR")
    assert logs.get_level() == "error"
    bound.warning("hidden too")
    bound.error("kept")

    lines = json_lines(buf)
    assert [line["event"] for line in lines] == ["shown", "kept"]
    assert {line["component"] for line in lines} == {"poller"}


def test_unknown_level_and_format_are_rejected() -> None:
    """An unknown level name or format raises ValueError naming it."""
    with pytest.raises(ValueError, match="verbose"):
        logs.configure(level="verbose", stream=io.StringIO(), environ={})
    with pytest.raises(ValueError, match="xml"):
        logs.configure(fmt="xml", stream=io.StringIO(), environ={})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="loud"):
        logs.set_level("loud")


def test_stdlib_warnings_are_routed_as_json() -> None:
    """stdlib records at WARNING and above come out as JSON with logger name; INFO is dropped."""
    buf = io.StringIO()
    logs.configure(level="debug", fmt="json", stream=buf, environ={"JOURNAL_STREAM": "8:1"})
    logging.getLogger("uvicorn.error").warning("port %s busy", 8686)
    logging.getLogger("httpx").info("HTTP Request: GET / 200")
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        logging.getLogger("apscheduler.executors").exception("job crashed")

    lines = buf.getvalue().splitlines()
    assert [line[:3] for line in lines] == ["<4>", "<3>"]
    warning, error = (json.loads(line[3:]) for line in lines)
    assert warning["event"] == "port 8686 busy"
    assert warning["level"] == "warning"
    assert warning["logger"] == "uvicorn.error"
    assert "timestamp" in warning
    assert error["level"] == "error"
    assert "ZeroDivisionError" in error["exception"]


def test_stdlib_follows_a_raised_level() -> None:
    """When the level is raised to error, stdlib warnings are dropped as well."""
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={})
    logs.set_level("error")
    logging.getLogger("uvicorn.error").warning("dropped")
    logging.getLogger("uvicorn.error").error("kept")
    assert [line["event"] for line in json_lines(buf)] == ["kept"]


def test_reconfigure_replaces_the_stdlib_handler() -> None:
    """Calling configure twice leaves one handler, writing to the newest stream."""
    first, second = io.StringIO(), io.StringIO()
    logs.configure(fmt="json", stream=first, environ={})
    logs.configure(fmt="json", stream=second, environ={})
    logging.getLogger("x").warning("once")
    structlog.get_logger().info("here")
    assert first.getvalue() == ""
    assert [line["event"] for line in json_lines(second)] == ["once", "here"]


def test_stream_defaults_to_stdout_at_call_time(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream, output goes to whatever sys.stdout is when configure() is called."""
    logs.configure(fmt="json", environ={})
    structlog.get_logger().info("to.stdout")
    assert json.loads(capsys.readouterr().out)["event"] == "to.stdout"


def test_reset_removes_the_handler_and_restores_root_level() -> None:
    """reset() takes our handler off the root logger and puts its level back."""
    root = logging.getLogger()
    before_level, before_handlers = root.level, list(root.handlers)
    logs.configure(stream=io.StringIO(), environ={}, level="error")
    assert len(root.handlers) == len(before_handlers) + 1
    logs.reset()
    assert root.level == before_level
    assert root.handlers == before_handlers
