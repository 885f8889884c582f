"""A user and password written in a configured URL (``http://user:pass@relay``, for a relay
behind a proxy or basic auth) never show: not in /readyz (no token needed) nor its not_ready
log line, not in a config error (stderr, the reload_failed log), and the log redactor knows
the password.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from conftest import base_config, merge, toml_text
from test_cli import run
from test_relay_health import _start, eventually, readyz  # noqa: F401 - _start is a fixture
from test_reload import _started, rewrite  # noqa: F401 - _started is a fixture

from tracker import config, logs, sanitize
from tracker.app import Daemon
from tracker.clock import FakeClock
from tracker.testing.receiver import WebhookReceiver
from tracker.testing.simulator import SimulatedRelay

USER = "proxyuser"
PASSWORD = "S3cretPassw0rd-7f3a"
KEY = "sk-wrong-key-4d1c"


def with_userinfo(url: str, password: str = PASSWORD) -> str:
    """``url`` (``scheme://host...``) with USER and ``password`` written before its host."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{USER}:{password}@{rest}"


def assert_hidden(text: str) -> None:
    assert PASSWORD not in text, text
    assert f"{USER}:" not in text, text


# -- the helper ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://proxyuser:S3cretPassw0rd-7f3a@127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("https://token@relay.example", "https://relay.example"),
        ("https://relay.example/v1?x=1", "https://relay.example/v1?x=1"),
        # not URLs any parser takes: still nothing of the password
        ("https://admin:S3cretPassw0rd-7f3a@relay.example:70000", "https://relay.example:70000"),
        ("https://admin:S3cret/Passw0rd-7f3a@relay.example", "https://relay.example"),
        ("https://admin:S3cret#Passw0rd-7f3a@[::1", "https://[::1"),
        ("admin:S3cretPassw0rd-7f3a@relay.example", "relay.example"),
        ("admin:S3cretPassw0rd-7f3a@https://relay.example", "https://relay.example"),
        ("", ""),
        # an "@" past a sound authority is the path's or the query's: the host stays
        ("https://hooks.example.com/cb?notify=ops@corp.example", None),
        ("https://app.example/u/me@x.io/hook", None),
        ("https://hook:pw-4d2a@app.example/u/me@x.io", "https://app.example/u/me@x.io"),
    ],
)
def test_a_url_is_shown_without_its_user_and_password_even_when_unparsable(
    url: str, shown: str | None
) -> None:
    """The user and password go, whether or not the URL parses; a URL without them (an "@"
    in its path or query included) is shown as it is (``shown`` None)."""
    assert (url if shown is None else shown) == sanitize.without_userinfo(url)


# -- /readyz and its log line ---------------------------------------------------------------


async def test_readyz_and_not_ready_log_show_a_refusing_relay_without_its_password(
    relay: SimulatedRelay, receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """A relay whose base_url carries a user and password refuses the key: /readyz (no token
    needed) and the not_ready log line name it by its URL without them, as before otherwise."""
    document = merge(
        base_config(with_userinfo(relay.base_url), receiver.url, sqlite_url),
        # mj-api-secret: with auth = "bearer" such a base_url is refused (the test below).
        {
            "upstream": {"api_key": KEY, "auth": "mj-api-secret"},
            "poll": {"interval": 0.2, "max_interval": 1},
        },
    )
    daemon: Daemon = await start(config.parse(document, environ={}))

    async def refused() -> httpx.Response | None:
        answer = await readyz(daemon)
        return answer if answer.status_code == 503 else None

    with structlog.testing.capture_logs() as logged:
        answer = await eventually(refused, 10, "503 from /readyz")

    assert [
        f"relay {relay.base_url} refused the API key (HTTP 401): check upstream.api_key"
    ] == answer.json()["reasons"]
    assert_hidden(answer.text)
    (line,) = [e for e in logged if e["event"] == "not_ready" and e["check"] == "relay"]
    assert line["reason"].startswith(f"relay {relay.base_url} refused the API key")
    assert_hidden(repr(line))


async def test_readyz_shows_an_unreachable_relay_without_its_password(
    receiver: WebhookReceiver, sqlite_url: str, start: Any
) -> None:
    """A relay gone for more than 3 intervals is named by its URL without user and password,
    in /readyz and in the not_ready log line."""
    with SimulatedRelay() as gone:
        url = gone.base_url  # a loopback port nobody listens on once it is closed
    clock = FakeClock()
    document = merge(
        base_config(with_userinfo(url), receiver.url, sqlite_url),
        {"upstream": {"auth": "mj-api-secret"}, "poll": {"interval": 0.2, "max_interval": 1}},
    )
    daemon: Daemon = await start(config.parse(document, environ={}), clock=clock)
    await eventually(
        lambda: asyncio.sleep(0, daemon.parts.relay_health.reports), 10, "a relay request's outcome"
    )
    clock.advance(0.7)

    with structlog.testing.capture_logs() as logged:
        answer = await readyz(daemon)

    reason = f"relay {url} unreachable for 1 s (ConnectError; more than 3 poll intervals)"
    assert reason in answer.json()["reasons"]
    assert_hidden(answer.text)
    (line,) = [e for e in logged if e["event"] == "not_ready" and e["check"] == "relay"]
    assert_hidden(repr(line))


# -- config errors ------------------------------------------------------------------------------

MINIMAL: dict[str, Any] = {
    "upstream": {"base_url": "https://relay.example.com", "api_key": "sk-secret-key"},
    "webhooks": {"url": "https://app.example.com/hooks", "secret": "whsec_c2VjcmV0"},
}


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (
            {"upstream": {"base_url": f"https://admin:{PASSWORD}@relay.example:70000"}},
            "upstream.base_url: must have a TCP port from 1 to 65535 if any, not "
            "'https://relay.example:70000'",
        ),
        (
            {
                "upstreams": {
                    "b": {"base_url": f"https://admin:{PASSWORD}@r.example:0", "api_key": "k"}
                }
            },
            "upstreams.b.base_url: must have a TCP port",
        ),
        (  # "/" unescaped in the password: the port reads as "S3cret"
            {"webhooks": {"url": "https://admin:S3cret/Passw0rd-7f3a@hooks.example"}},
            "webhooks.url: must have a TCP port from 1 to 65535 if any, not "
            "'https://hooks.example'",
        ),
        (
            {
                "webhooks": {
                    "endpoints": {
                        "e": {"url": f"ftp://admin:{PASSWORD}@h.example", "secret": "whsec_ZXA"}
                    }
                }
            },
            "webhooks.endpoints.e.url: must be an http:// or https:// URL, not 'ftp://h.example'",
        ),
        (  # a long user name: the password starts within the 60 characters quoted
            {"upstream": {"base_url": f"https://{'u' * 40}:{PASSWORD}@relay.example:99999"}},
            "upstream.base_url: must have a TCP port",
        ),
    ],
)
def test_a_bad_url_is_named_without_its_password(overrides: dict[str, Any], expected: str) -> None:
    """The config error for a bad URL quotes it without the user and password written in it,
    its message otherwise unchanged."""
    document = merge(MINIMAL, overrides)

    with pytest.raises(config.ConfigError) as caught:
        config.parse(document, environ={})

    text = "\n".join(caught.value.problems)
    assert any(p.startswith(expected) for p in caught.value.problems), text
    assert "S3cret" not in text
    assert "admin" not in text


def test_check_config_shows_no_password_of_a_bad_relay_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The CLI's stderr line for a bad base_url carries neither user nor password."""
    document = base_config(
        f"https://{USER}:{PASSWORD}@relay.example:70000", None, f"sqlite:///{tmp_path / 't.db'}"
    )
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document))

    code, out, err = run(capsys, "check-config", "--config", str(path))

    assert 2 == code, out + err
    assert "upstream.base_url: must have a TCP port" in err
    assert_hidden(out + err)


async def test_reload_failed_log_shows_no_password_of_a_bad_url(
    started: Daemon, document: dict[str, Any]
) -> None:
    """A SIGHUP reload refusing a bad base_url logs reload_failed without its password."""
    rewrite(
        started,
        merge(document, {"upstream": {"base_url": with_userinfo("https://relay.example:70000")}}),
    )

    with structlog.testing.capture_logs() as logged:
        started.reload()

    (failed,) = [e for e in logged if e["event"] == "reload_failed"]
    assert any(p.startswith("upstream.base_url: must have") for p in failed["problems"]), failed
    assert_hidden(repr(failed))


# -- the log redactor ---------------------------------------------------------------------------


def test_secrets_hold_every_url_password_so_the_log_redacts_it(restore_logging: None) -> None:
    """Settings.secrets() lists the password of every URL that may carry one (relays,
    webhook receivers, the database), as written and %-decoded; a log line quoting the URL
    then shows [redacted] in its place. Usernames are not secrets (often plain words)."""
    settings = config.parse(
        {
            "database": {"url": "postgresql+psycopg://db:db-pass-1234@db.example/t"},
            "upstream": {
                "base_url": with_userinfo("http://relay.example"),
                "api_key": "sk-k",
                "auth": "mj-api-secret",
            },
            "upstreams": {
                "b": {
                    "base_url": "https://u:b-relay%40pass@b.example",
                    "api_key": "sk-b",
                    "auth": "mj-api-secret",
                }
            },
            "webhooks": {
                "url": "https://hook:hook-pass-5678@app.example/hooks",
                "secret": "whsec_c2VjcmV0",
                "endpoints": {
                    "e": {"url": "https://e:endpoint-pass-90@e.example", "secret": "whsec_ZXA"}
                },
            },
        },
        environ={},
    )

    secrets = settings.secrets()

    assert {
        PASSWORD,
        "b-relay%40pass",
        "b-relay@pass",
        "hook-pass-5678",
        "endpoint-pass-90",
        "db-pass-1234",
    } <= set(secrets)
    assert USER not in secrets
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={}, secrets=secrets)
    structlog.get_logger().warning("relay_said", url=settings.upstream.base_url)
    assert PASSWORD not in buf.getvalue()
    assert f"{USER}:[redacted]@relay.example" in buf.getvalue()


def test_a_database_password_sqlalchemy_reads_is_a_secret_too() -> None:
    """SQLAlchemy takes a "/" in the password unescaped, and a password as ?password=: both
    are secrets as the driver gets them."""
    settings = config.parse(
        merge(
            MINIMAL,
            {
                "database": {
                    "url": "postgresql://db:pa/ss-1234@db.example/t?sslpassword=key-pw-5e21"
                }
            },
        ),
        environ={},
    )

    assert {"pa/ss-1234", "key-pw-5e21"} <= set(settings.secrets())


def test_a_short_url_password_is_no_secret_of_the_redactor(restore_logging: None) -> None:
    """A password shorter than MIN_SECRET_PREFIX ("postgres") is not handed to the log
    redactor, which would cut it out of every word that holds it ("postgresql", a path, a
    pid); the URLs themselves are never shown with their passwords."""
    settings = config.parse(
        merge(MINIMAL, {"database": {"url": "postgresql://postgres:postgres@db.example/t"}}),
        environ={},
    )
    secrets = settings.secrets()
    buf = io.StringIO()
    logs.configure(fmt="json", stream=buf, environ={}, secrets=secrets)
    structlog.get_logger().info("started", database="postgresql", config="/etc/postgres.toml")

    assert "postgres" not in secrets
    assert '"database": "postgresql"' in buf.getvalue()
    assert "/etc/postgres.toml" in buf.getvalue()


# -- a user and password beside a Bearer key ------------------------------------------------------


@pytest.mark.parametrize("where", ["upstream", "upstreams.b"])
def test_a_bearer_relay_url_with_a_user_and_password_is_refused_naming_neither(
    where: str,
) -> None:
    """httpx sends a user and password written in the URL as Authorization: Basic, in place
    of the relay key's Bearer header, so every request would be refused: such a config is
    refused at once, saying why, without quoting the URL. With auth = "mj-api-secret" the
    key has a header of its own and the URL is accepted."""

    def document(auth: str) -> dict[str, Any]:
        relay = {"base_url": with_userinfo("https://relay.example"), "api_key": "k", "auth": auth}
        placed = {"upstream": relay} if where == "upstream" else {"upstreams": {"b": relay}}
        base = base_config("https://relay.example", "https://app.example/h", "sqlite:///t.db")
        return merge(base, placed)

    with pytest.raises(config.ConfigError) as refused:
        config.parse(document("bearer"), environ={})

    assert f"{where}: base_url must not carry a user or password" in str(refused.value)
    assert_hidden(str(refused.value))
    assert PASSWORD in config.parse(document("mj-api-secret"), environ={}).secrets()
