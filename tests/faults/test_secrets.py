"""A whole daemon session never shows a configured secret, nor any start of one over 8 chars."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import httpx
import pytest
from conftest import WEBHOOK_SECRET, wait_until
from faultrig import TOKEN, final_hooks, running, write_config

import tracker.cli
from tracker.testing.receiver import Reply, WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

pytestmark = pytest.mark.e2e

RELAY_KEY = "sk-relay-7c1e0b94d2a3f5e6a7b8c9d0e1f2a3b4"
SECOND_TOKEN = "second-token-88a1f0c3d4e5f6a7b8"
SECRETS = (RELAY_KEY, WEBHOOK_SECRET, TOKEN, SECOND_TOKEN)
#: a secret's leading characters that count as the secret (one more than 8)
PREFIX = 9


def leaks(text: str) -> list[str]:
    """The secrets ``text`` shows whole or by a start longer than 8 characters."""
    return [s for s in SECRETS if s[:PREFIX] in text]


def cli(config: Path, *args: str) -> str:
    """What `tracker ARGS --config CONFIG` prints, exit code included (run in this process)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = tracker.cli.main([*args, "--config", str(config)])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return f"$ tracker {' '.join(args)} -> {code}\n{out.getvalue()}{err.getvalue()}"


def http_transcript(client: httpx.Client, method: str, path: str, **kwargs: object) -> str:
    answer = client.request(method, path, **kwargs)  # type: ignore[arg-type]
    headers = "".join(f"{k}: {v}\n" for k, v in answer.headers.items())
    return f"{method} {path} -> {answer.status_code}\n{headers}{answer.text}\n"


def test_no_byte_of_a_full_session_carries_a_secret(
    tmp_path: Path, relay: SimulatedRelay, receiver: WebhookReceiver
) -> None:
    """Logs at debug (relay error pages echoing the key, a receiver echoing the signing
    secret), API answers and errors, /metrics, CLI output and the errors of a bad config: none
    holds a secret or a start of one longer than 8 characters.
    """
    relay.api_key = RELAY_KEY
    url = f"sqlite:///{tmp_path / 'faults.db'}"
    overrides = {
        "logging": {"level": "debug"},
        "server": {"api_tokens": [TOKEN, SECOND_TOKEN]},
        "upstream": {"api_key": RELAY_KEY},
    }
    config = write_config(tmp_path, relay.base_url, receiver.url, url, overrides)
    seen: list[str] = []
    with running(config) as daemon:
        client = daemon.client
        receiver.reply(Reply(500, body=f"no thanks, {WEBHOOK_SECRET}".encode()))
        relay.fail_next("echo_key", 2)
        for task_id in ("s-1", "s-2"):
            body = {"platform": "luma", "ids": [task_id]}
            seen.append(http_transcript(client, "POST", "/v1/tasks", json=body))
        wait_until(lambda: {"s-1", "s-2"} <= set(final_hooks(receiver)), 20, "both webhooks")
        for method, path in (
            ("GET", "/v1/tasks"),
            ("GET", "/v1/tasks/luma/s-1"),
            ("GET", "/v1/tasks/luma/nope"),
            ("GET", "/v1/deliveries"),
            ("GET", "/metrics"),
            ("GET", "/readyz"),
            ("GET", "/healthz"),
            ("GET", "/no/such/route"),
            ("POST", "/v1/tasks"),
        ):
            seen.append(http_transcript(client, method, path))
        seen.append(http_transcript(httpx.Client(base_url=daemon.api), "GET", "/v1/tasks"))
        commands = (("tasks", "list"), ("stats",), ("deliveries", "list", "--json"))
        seen.extend(cli(config, *args) for args in commands)
        assert 0 == daemon.stop()
        seen.append(daemon.output())
    assert any("[redacted]" in part for part in seen), "the session logged no secret at all"

    bad = tmp_path / "bad.toml"
    bad.write_text(
        config.read_text().replace(f'"{WEBHOOK_SECRET}"', f'"x{WEBHOOK_SECRET}"')
        + "\n[surprise]\nkey = 1\n"
    )
    seen.append(cli(bad, "check-config"))

    everything = "\n".join(seen)
    assert [] == leaks(everything), [line for line in everything.splitlines() if leaks(line)][:5]
