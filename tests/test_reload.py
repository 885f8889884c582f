"""A reload (SIGHUP) refuses whatever `tracker run` refuses at start, and keeps the overrides
`tracker run` put on the file's settings (``--simulate``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from conftest import WEBHOOK_SECRET, RecordingNotifier, merge, toml_text

from tracker import config, logs, signing, startup
from tracker import reload as reloading
from tracker.app import Daemon

TOKEN = "test-token"
EXAMPLE_SECRET = "whsec_CHANGE+ME+run+tracker+init"


@pytest.fixture(name="started")
async def _started(tmp_path: Path, document: dict[str, Any]) -> AsyncIterator[Daemon]:
    """A started daemon whose config file is tmp_path/tracker.toml."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))
    daemon = Daemon(config.load(path, environ={}), config_path=path, notifier=RecordingNotifier())
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop()


def rewrite(daemon: Daemon, document: dict[str, Any]) -> None:
    assert daemon.config_path is not None
    daemon.config_path.write_text(toml_text(document))


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"server": {"api_tokens": ["change-me"]}}, "server.api_tokens: the example's"),
        ({"webhooks": {"secret": EXAMPLE_SECRET}}, "webhooks.secret: the example's published"),
        ({"upstream": {"api_key": "sk-..."}}, "upstream.api_key: the example's placeholder"),
        (
            {"platforms": {"custom": {"style": "replicate"}}},
            "platforms.custom.path must be set",
        ),
        ({"database": {"url": "sqlite:////nonexistent/dir/t.db"}}, "database.url: database dir"),
    ],
)
async def test_a_reload_refuses_what_run_refuses_at_start(
    started: Daemon, document: dict[str, Any], overrides: dict[str, Any], expected: str
) -> None:
    """The example's placeholders, a platform that cannot be built or an unusable database
    file: the reload is refused whole, logged by key, and the old settings stay in force."""
    before = started.settings
    rewrite(started, merge(document, {"poll": {"interval": 0.5}, **overrides}))

    with structlog.testing.capture_logs() as logged:
        started.reload()

    assert before is started.settings
    assert 0.2 == started.parts.poller.settings.interval
    failed = [e for e in logged if e["event"] == "reload_failed"]
    assert 1 == len(failed), logged
    assert any(p.startswith(expected) for p in failed[0]["problems"]), failed
    assert not [e for e in logged if e["event"] == "reloaded"]


async def test_placeholder_credentials_never_open_the_api(
    started: Daemon, document: dict[str, Any]
) -> None:
    """The reviewers' case: the example's token and secret together are refused, so
    `Bearer change-me` stays unauthorised and the old token keeps working."""
    rewrite(
        started,
        merge(
            document,
            {"server": {"api_tokens": ["change-me"]}, "webhooks": {"secret": EXAMPLE_SECRET}},
        ),
    )

    with structlog.testing.capture_logs() as logged:
        started.reload()

    (failed,) = [e for e in logged if e["event"] == "reload_failed"]
    assert {"server.api_tokens", "webhooks.secret"} == {p.split(":")[0] for p in failed["problems"]}
    headers = {"Authorization": "Bearer change-me"}
    async with httpx.AsyncClient(base_url=started.api_url, timeout=5) as client:
        assert 401 == (await client.get("/v1/tasks", headers=headers)).status_code
        ok = await client.get("/v1/tasks", headers={"Authorization": f"Bearer {TOKEN}"})
        assert 200 == ok.status_code


async def test_a_reload_reapplies_the_overrides_run_started_with(
    started: Daemon, document: dict[str, Any]
) -> None:
    """As under `tracker run --simulate`: the file's slower poll interval and its placeholder
    relay key do not replace the simulated ones; the rest of the file applies."""
    simulated = started.settings

    def simulate(settings: config.Settings) -> config.Settings:
        poll = settings.poll.model_copy(update={"interval": 0.2})
        return settings.model_copy(update={"upstream": simulated.upstream, "poll": poll})

    rewrite(
        started,
        merge(
            document,
            {
                "upstream": {"base_url": "https://relay.example.com", "api_key": "sk-..."},
                "poll": {"interval": 10, "max_interval": 120, "batch_size": 7},
            },
        ),
    )

    with structlog.testing.capture_logs() as logged:
        reloading.reload_file(
            started.parts, reloading.LogSecrets(simulated), started.config_path, simulate
        )

    (reloaded,) = [e for e in logged if e["event"] == "reloaded"]
    assert [] == reloaded["needs_restart"]
    assert (0.2, 7) == (started.settings.poll.interval, started.settings.poll.batch_size)
    assert 0.2 == started.parts.poller.settings.interval
    assert simulated.upstream == started.settings.upstream


def test_start_problems_lists_every_refusal_at_once(document: dict[str, Any]) -> None:
    """Placeholders, an unusable database file and a platform that cannot be built, in one
    list (what check-config could show in one run)."""
    settings = config.parse(
        merge(
            document,
            {
                "server": {"api_tokens": ["change-me"]},
                "database": {"url": "sqlite:////nonexistent/dir/t.db"},
                "platforms": {"one": {"style": "replicate"}},
            },
        ),
        environ={},
    )

    found = startup.start_problems(settings)

    assert ["server.api_tokens", "database.url", "platforms.one.path"] == [
        p.split(" ")[0].rstrip(":") for p in found
    ]


async def test_the_reload_log_line_shows_old_and_new_numbers_switches_and_levels_never_secrets(
    started: Daemon, document: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A reload that changes a batch size, a built-in platform's rate limit (it had no
    section: the default), the log level, the webhook secret and the API tokens: the
    `reloaded` line, as written, lists every key, and shows the old and new value of the
    first three only; neither secret, old or new, appears in it."""
    new_secret, new_token = signing.new_secret(), "rotated-token-0123456789"
    rewrite(
        started,
        merge(
            document,
            {
                "poll": {"batch_size": 7},
                "platforms": {"luma": {"rate_limit": 3}},
                "logging": {"level": "debug"},
                "webhooks": {"secret": new_secret},
                "server": {"api_tokens": [new_token]},
            },
        ),
    )

    capsys.readouterr()
    try:
        started.reload()  # new secrets: the log is configured anew, to redact them too
        written = capsys.readouterr().out
    finally:
        logs.reset()  # from capsys's stream, which closes before the daemon stops

    [line] = [x for x in written.splitlines() if '"event": "reloaded"' in x]
    reloaded = json.loads(line)
    assert {
        "poll.batch_size",
        "platforms.luma.rate_limit",
        "logging.level",
        "webhooks.secret",
        "server.api_tokens",
    } == set(reloaded["applied"])
    assert {
        "poll.batch_size": [100, 7],
        "platforms.luma.rate_limit": [None, 3.0],
        "logging.level": ["info", "debug"],
    } == reloaded["values"]
    for secret in (new_secret, new_token, WEBHOOK_SECRET, TOKEN):
        assert secret not in line
