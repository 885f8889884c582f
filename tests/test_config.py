"""Settings from TOML and the environment: defaults, overrides and errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tracker import config

ROOT = Path(__file__).resolve().parent.parent
MINIMAL: dict[str, Any] = {
    "upstream": {"base_url": "https://relay.example.com", "api_key": "sk-secret-key"},
    "webhooks": {"url": "https://app.example.com/hooks", "secret": "whsec_c2VjcmV0"},
}


def parse(document: dict[str, Any], **environ: str) -> config.Settings:
    return config.parse(document, environ=environ)


def problems(document: dict[str, Any], **environ: str) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        parse(document, **environ)
    return caught.value.problems


def test_defaults_match_the_documented_ones() -> None:
    """A minimal config gets the defaults the README and config.example.toml document."""
    settings = parse(MINIMAL)

    assert ("127.0.0.1", 8686, ()) == (
        settings.server.host,
        settings.server.port,
        settings.server.api_tokens,
    )
    assert "sqlite:///tracker.db" == settings.database.url
    assert 30 == settings.upstream.timeout
    poll = settings.poll
    assert (10, 100, 4, 86400, 600, 120) == (
        poll.interval,
        poll.batch_size,
        poll.concurrency,
        poll.give_up_after,
        poll.not_found_after,
        poll.max_interval,
    )
    assert (5, 300, 1800, 7200, 18000, 36000, 50400, 72000, 86400) == settings.webhooks.retry_delays
    assert 15 == settings.webhooks.timeout
    assert ("task.completed", "task.failed") == settings.webhooks.events
    assert 65536 == settings.webhooks.max_response_bytes


def test_the_example_config_is_valid_and_shows_every_default() -> None:
    """config.example.toml parses, and its values equal the defaults of every key it sets."""
    document = tomllib.loads((ROOT / "config.example.toml").read_text())
    settings = parse(document)
    defaults = parse(MINIMAL)

    for section in ("poll", "logging", "database", "retention"):
        assert getattr(defaults, section) == getattr(settings, section), section
    assert defaults.webhooks.retry_delays == settings.webhooks.retry_delays
    assert defaults.webhooks.events == settings.webhooks.events
    assert defaults.webhooks.max_response_bytes == settings.webhooks.max_response_bytes
    assert defaults.server.port == settings.server.port


def test_environment_overrides_the_secrets() -> None:
    """TRACKER_UPSTREAM_API_KEY and TRACKER_WEBHOOKS_SECRET win over the file."""
    settings = parse(
        MINIMAL, TRACKER_UPSTREAM_API_KEY="sk-from-env", TRACKER_WEBHOOKS_SECRET="whsec_ZW52"
    )

    assert "sk-from-env" == settings.upstream.api_key.get_secret_value()
    assert "whsec_ZW52" == settings.webhooks.secret.get_secret_value()


def test_the_api_and_dashboard_tokens_may_come_from_the_environment() -> None:
    """TRACKER_SERVER_API_TOKENS (separated by whitespace) replaces the file's api_tokens and
    TRACKER_DASHBOARD_TOKEN its dashboard token, so a world-readable config.toml need hold
    neither; a blank variable (systemd's `KEY=`) leaves the file's value alone, and a token
    from there is among the secrets the logs redact."""
    document = {**MINIMAL, "server": {"api_tokens": ["from-file-token"]}}
    settings = parse(
        document,
        TRACKER_SERVER_API_TOKENS=" first-token-from-env\tsecond-token-from-env \n",
        TRACKER_DASHBOARD_TOKEN="dashboard-token-from-env",
    )
    kept = parse(document, TRACKER_SERVER_API_TOKENS="  ", TRACKER_DASHBOARD_TOKEN="")

    assert ["first-token-from-env", "second-token-from-env"] == [
        t.get_secret_value() for t in settings.server.api_tokens
    ]
    assert settings.dashboard.token is not None
    assert "dashboard-token-from-env" == settings.dashboard.token.get_secret_value()
    assert {"first-token-from-env", "dashboard-token-from-env"} <= set(settings.secrets())
    assert ["from-file-token"] == [t.get_secret_value() for t in kept.server.api_tokens]
    assert kept.dashboard.token is None


def test_secrets_may_come_only_from_the_environment() -> None:
    """A file without api_key and secret is fine when the environment supplies them."""
    document = {"upstream": {"base_url": "https://r.example.com"}, "webhooks": {}}
    settings = parse(document, TRACKER_UPSTREAM_API_KEY="k", TRACKER_WEBHOOKS_SECRET="whsec_eA")

    assert "k" == settings.upstream.api_key.get_secret_value()


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"server": {"port": "8686"}}, "server.port: Input should be a valid integer"),
        ({"server": {"bogus": 1}}, "server.bogus: unknown key"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"poll": {"interval": 0}}, "poll.interval: must be more than 0 and at most"),
        ({"poll": {"interval": "10"}}, "poll.interval: Input should be a valid number"),
        ({"poll": {"batch_size": 1.5}}, "poll.batch_size: Input should be a valid integer"),
        ({"poll": {"interval": 30, "max_interval": 5}}, "max_interval must not be below"),
        ({"upstream": {"base_url": "relay.example.com"}}, "upstream.base_url: must be an http"),
        ({"webhooks": {"url": "mailto:x@y"}}, "webhooks.url: must be an http"),
        ({"webhooks": {"events": ["task.nope"]}}, "webhooks.events: unknown event"),
        ({"webhooks": {"allow_private": ["10.0.0.0/33"]}}, "is not an IP network"),
        ({"webhooks": {"retry_delays": []}}, "webhooks.retry_delays"),
        ({"database": {"url": "mysql://x"}}, "database.url"),
        ({"server": {"host": "0.0.0.0"}}, "api_tokens may be empty only when host is a loopback"),
        ({"platforms": {"x": {"upstream": "missing"}}}, "platforms.x.upstream: names 'missing'"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"webhooks": {"secret": "not base64!"}}, "webhooks.secret: must be a Standard Webhooks"),
        (
            {"webhooks": {"max_response_bytes": 1023}},
            "webhooks.max_response_bytes: Input should be greater than or equal to 1024",
        ),
        (
            {"webhooks": {"max_response_bytes": "64k"}},
            "webhooks.max_response_bytes: Input should be a valid integer",
        ),
    ],
)
def test_bad_values_are_named(overrides: dict[str, Any], expected: str) -> None:
    """Every unknown key or wrong value is reported with its dotted key."""
    document = {**MINIMAL, **{k: {**MINIMAL.get(k, {}), **v} for k, v in overrides.items()}}

    assert any(expected in p for p in problems(document)), problems(document)


def test_missing_required_keys_are_named() -> None:
    """Without [upstream] base_url/api_key and [webhooks] secret the daemon refuses to start."""
    found = problems({"upstream": {}, "webhooks": {}})

    assert {
        "upstream.base_url: required key is missing",
        "upstream.api_key: required key is missing",
        "webhooks.secret: required key is missing",
    } <= set(found)


def test_errors_never_echo_secret_values() -> None:
    """A bad value next to a secret does not put the secret in the message."""
    document = {**MINIMAL, "upstream": {**MINIMAL["upstream"], "timeout": "slow"}}

    assert "sk-secret-key" not in "\n".join(problems(document))


def test_tokens_allow_a_public_host() -> None:
    """With api_tokens set, the API may listen on any address."""
    settings = parse({**MINIMAL, "server": {"host": "0.0.0.0", "api_tokens": ["t"]}})

    assert "0.0.0.0" == settings.server.host


def test_long_interval_raises_the_default_max_interval() -> None:
    """An interval above 120 s does not trip the max_interval check when that is left out."""
    assert 300 == parse({**MINIMAL, "poll": {"interval": 300}}).poll.max_interval


def test_secrets_lists_every_secret_for_the_log_redactor() -> None:
    """Settings.secrets() returns the api key, webhook secrets and tokens."""
    settings = parse(
        {
            **MINIMAL,
            "server": {"api_tokens": ["tok-1"]},
            "webhooks": {
                **MINIMAL["webhooks"],
                "previous_secrets": [
                    {"secret": "whsec_b2xk", "expires_at": "2026-12-01T00:00:00Z"}
                ],
                "endpoints": {"b": {"url": "https://b.example.com", "secret": "whsec_ZXA"}},
            },
        }
    )

    assert {"sk-secret-key", "whsec_c2VjcmV0", "tok-1", "whsec_b2xk", "whsec_ZXA"} == set(
        settings.secrets()
    )


def test_previous_secret_needs_a_time_zone() -> None:
    """A rotation expiry without a zone is refused rather than guessed."""
    document = {
        **MINIMAL,
        "webhooks": {
            **MINIMAL["webhooks"],
            "previous_secrets": [{"secret": "whsec_b2xk", "expires_at": "2026-12-01T00:00:00"}],
        },
    }

    assert any("time zone" in p for p in problems(document))


def test_load_reports_unreadable_and_invalid_files(tmp_path: Path) -> None:
    """A missing file or broken TOML is a ConfigError naming the file."""
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("[server\nport = 1")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(broken, environ={})


def test_settings_are_frozen() -> None:
    """Settings cannot be changed after validation (a reload builds new ones)."""
    settings = parse(MINIMAL)

    with pytest.raises(Exception, match="frozen"):
        settings.poll.interval = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
     ("0.0.0.0", False), ("10.0.0.1", False), ("example.com", False)],
)  # fmt: skip
def test_is_loopback(host: str, loopback: bool) -> None:
    """Only loopback names and addresses count as loopback."""
    assert loopback == config.is_loopback(host)


def test_a_bad_value_from_the_environment_names_the_variable_not_the_value() -> None:
    """A problem with a value an environment variable set names that variable, so it is not
    looked for in the file; the value is never shown."""
    found = problems(MINIMAL, TRACKER_WEBHOOKS_SECRET="notawhsec")

    assert [
        "webhooks.secret (from TRACKER_WEBHOOKS_SECRET): must be a Standard Webhooks secret: "
        "whsec_ followed by base64"
    ] == found
    assert [] == [p for p in problems({**MINIMAL, "webhooks": {}}) if "(from" in p]


@pytest.mark.parametrize("value", ["...", "…", " ", "\t", "sk-…", "sk-..."])
def test_blank_and_ellipsis_credentials_are_placeholders(value: str) -> None:
    """The README's `...`, an ellipsis or a blank value is refused as a placeholder for the
    API tokens, the relay keys and the dashboard token, each named by its key."""
    document = {
        **MINIMAL,
        "server": {"api_tokens": ["a-real-token", value]},
        "upstream": {**MINIMAL["upstream"], "api_key": value},
        "upstreams": {"reseller": {"base_url": "https://r.example.com", "api_key": value}},
        "dashboard": {"token": value},
    }

    found = config.placeholder_problems(parse(document))

    assert [
        "server.api_tokens",
        "upstream.api_key",
        "upstreams.reseller.api_key",
        "dashboard.token",
    ] == [p.split(":")[0] for p in found]


@pytest.mark.parametrize("value", ["sk-live-1...", "a.b", "tok…en", ""])
def test_credentials_that_only_hold_dots_are_not_placeholders(value: str) -> None:
    """A key with anything beyond dots, ellipses and blanks is taken as a credential (an empty
    relay key too: a relay may need none)."""
    document = {**MINIMAL, "upstream": {**MINIMAL["upstream"], "api_key": value}}

    assert [] == config.placeholder_problems(parse(document))


def test_only_the_upstream_placeholder_hint_names_its_environment_variable() -> None:
    """TRACKER_UPSTREAM_API_KEY overrides only [upstream]: a named upstream's placeholder hint
    says to put the key in the file, naming no variable."""
    document = {
        **MINIMAL,
        "upstream": {**MINIMAL["upstream"], "api_key": "sk-..."},
        "upstreams": {"reseller": {"base_url": "https://r.example.com", "api_key": "sk-..."}},
    }

    upstream, reseller = config.placeholder_problems(parse(document))

    assert "here or in TRACKER_UPSTREAM_API_KEY" in upstream
    assert reseller.startswith("upstreams.reseller.api_key: the example's placeholder;")
    assert "TRACKER_" not in reseller
