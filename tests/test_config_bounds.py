"""Bounds the config puts on values the daemon does arithmetic with or stores: durations,
rates, counts, names, and a database every connection pool can share."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
from conftest import toml_text

from tracker import config
from tracker.store.sql import deliveries, tasks

MINIMAL: dict[str, Any] = {
    "upstream": {"base_url": "https://relay.example.com", "api_key": "sk-secret-key"},
    "webhooks": {"url": "https://app.example.com/hooks", "secret": "whsec_c2VjcmV0"},
}
ENDPOINT = {"url": "https://b.example.com/hooks", "secret": "whsec_ZXA"}


def document_with(key: str, value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (MINIMAL) with the dotted ``key`` set to ``value``, tables along the way made."""
    document = copy.deepcopy(MINIMAL if base is None else base)
    *tables, last = key.split(".")
    table = document
    for name in tables:
        table = table.setdefault(name, {})
    table[last] = value
    return document


def problems(document: dict[str, Any]) -> list[str]:
    with pytest.raises(config.ConfigError) as caught:
        config.parse(document, environ={})
    return caught.value.problems


#: every key holding a duration in seconds, with the section it needs to exist
SECONDS_KEYS = [
    "upstream.timeout",
    "poll.interval",
    "poll.give_up_after",
    "poll.not_found_after",
    "poll.max_interval",
    "poll.max_lag",
    "webhooks.timeout",
    "retention.interval",
    "dashboard.session_lifetime",
]


@pytest.mark.parametrize("key", SECONDS_KEYS)
@pytest.mark.parametrize("value", [math.inf, math.nan, 1e300, 0, -1, 366 * 86400 + 1])
def test_every_duration_is_finite_and_bounded(key: str, value: float) -> None:
    """inf, nan, a value past 366 days, zero or less: refused, naming the key and the range."""
    found = problems(document_with(key, value))

    assert any(p.startswith(f"{key}: must be more than 0 and at most 31622400 s") for p in found), (
        found
    )


@pytest.mark.parametrize("key", SECONDS_KEYS)
def test_a_duration_of_366_days_is_accepted(key: str) -> None:
    """The upper bound itself is allowed: a year and a day of seconds."""
    document = document_with(key, 366 * 86400)
    if key == "poll.interval":
        document["poll"]["max_interval"] = 366 * 86400

    config.parse(document, environ={})


def test_an_unbounded_interval_is_reported_once() -> None:
    """max_interval, left out, follows a long interval; an out-of-range one it leaves alone."""
    found = problems(document_with("poll.interval", math.inf))

    assert ["poll.interval"] == [p.split(":")[0] for p in found]


@pytest.mark.parametrize("value", [math.inf, 1e300])
def test_retry_delays_are_bounded_each(value: float) -> None:
    """One unbounded delay in the schedule is refused by its index."""
    found = problems(document_with("webhooks.retry_delays", [5, value]))

    assert any(p.startswith("webhooks.retry_delays.1: must be more than 0") for p in found), found


@pytest.mark.parametrize("key", ["delivered_days", "dead_days", "final_tasks_days"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 1e300, 3661, -1])
def test_retention_days_are_finite_and_at_most_ten_years(key: str, value: float) -> None:
    """Retention may keep rows up to 3660 days (or forever with 0), never inf or more."""
    found = problems(document_with(f"retention.{key}", value))

    expected = f"retention.{key}: must be from 0 (kept forever) to 3660 days"
    assert any(p.startswith(expected) for p in found), found


def test_retention_days_accept_zero_and_ten_years() -> None:
    """0 keeps rows forever, 3660 days is the longest span."""
    settings = config.parse(
        document_with("retention", {"delivered_days": 0, "dead_days": 3660}), environ={}
    )

    assert (0, 3660) == (settings.retention.delivered_days, settings.retention.dead_days)


@pytest.mark.parametrize("key", ["platforms.luma.rate_limit", "webhooks.endpoints.b.rate_limit"])
@pytest.mark.parametrize("value", [math.inf, math.nan, 0, 1e-300, 10_001])
def test_rate_limits_are_requests_per_second_within_bounds(key: str, value: float) -> None:
    """rate_limit is a rate, not a duration: finite, one request a day at least, 10000 a
    second at most."""
    document = document_with(key, value, document_with("webhooks.endpoints.b", dict(ENDPOINT)))

    found = problems(document)

    expected = f"{key}: must be from 1/86400 (one request a day) to 10000 requests per second"
    assert any(p.startswith(expected) for p in found), found


def test_counts_without_a_cap_get_the_caps_of_their_section() -> None:
    """A platform's batch_size is capped like [poll].batch_size, an endpoint's max_in_flight
    like [webhooks].concurrency."""
    document = document_with("platforms", {"luma": {"batch_size": 10_001}})
    document["webhooks"]["endpoints"] = {"b": {**ENDPOINT, "max_in_flight": 1025}}

    found = problems(document)

    assert "platforms.luma.batch_size: Input should be less than or equal to 10000" in found
    assert "webhooks.endpoints.b.max_in_flight: Input should be less than or equal to 1024" in found


def test_platform_and_endpoint_names_fit_the_database_columns() -> None:
    """Names longer than the 64-character columns they are stored in are refused by key."""
    long = "p" * 65
    document = document_with("platforms", {long: {"style": "replicate", "path": "/p/{task_id}"}})
    document["webhooks"]["endpoints"] = {"e" * 65: dict(ENDPOINT)}

    found = problems(document)

    # The store keeps its own width (it imports nothing of config); the two must agree.
    for column in (tasks.c.platform, tasks.c.endpoint, deliveries.c.platform):
        assert config.NAME_MAX_LENGTH == column.type.length
    too_long = "the name is 65 characters long; at most 64 fit the database's column"
    assert f"platforms.{long}: {too_long}" in found
    assert any(p.startswith(f"webhooks.endpoints.{'e' * 65}: the name is 65") for p in found)


def test_names_of_64_characters_are_accepted() -> None:
    """The column width itself is fine."""
    name = "p" * 64
    document = document_with("platforms", {name: {"style": "replicate", "path": "/p/{task_id}"}})

    assert name in config.parse(document, environ={}).platforms


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:///:memory:",
        "sqlite+pysqlite:///:memory:",
        "sqlite:///file::memory:?cache=shared&uri=true",
        "sqlite:///file:tracker?mode=memory&cache=shared&uri=true",
    ],
)
def test_an_in_memory_sqlite_database_is_refused(tmp_path: Path, url: str) -> None:
    """Each of the daemon's connection pools would get its own empty database: refused."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document_with("database.url", url)))

    with pytest.raises(config.ConfigError) as caught:
        config.load(path, environ={})

    assert 1 == len(caught.value.problems)
    assert caught.value.problems[0].startswith(
        "database.url: an in-memory SQLite database cannot be used"
    )


@pytest.mark.parametrize(
    "url", ["sqlite:///tracker.db", "sqlite:///file:tracker.db?uri=true", "postgresql://h/db"]
)
def test_file_and_server_databases_are_accepted(tmp_path: Path, url: str) -> None:
    """A file (a file: URI included) or a PostgreSQL server is fine."""
    path = tmp_path / "tracker.toml"
    path.write_text(toml_text(document_with("database.url", url)))

    config.load(path, environ={})


def test_every_bad_reference_is_listed_with_the_other_problems() -> None:
    """Two platforms naming missing upstreams, an endpoint with an unknown event and a bad
    value elsewhere: all four are reported in one run, each by its own key."""
    document = document_with("platforms", {"a": {"upstream": "gone"}, "b": {"upstream": "missing"}})
    document["webhooks"]["endpoints"] = {"e": {**ENDPOINT, "events": ["task.nope"]}}
    document["poll"] = {"interval": "fast"}

    found = problems(document)

    assert "platforms.a.upstream: names 'gone', which is not an [upstreams.NAME] section" in found
    assert (
        "platforms.b.upstream: names 'missing', which is not an [upstreams.NAME] section" in found
    )
    assert any(p.startswith("webhooks.endpoints.e.events: unknown event(s)") for p in found)
    assert "poll.interval: Input should be a valid number" in found


@pytest.mark.parametrize("key", ["upstream.base_url", "webhooks.url"])
@pytest.mark.parametrize("port", ["0", "65536", "99999", "http"])
def test_a_url_with_a_port_no_connection_can_use_is_refused_by_key(key: str, port: str) -> None:
    """Every request or delivery to such a URL would fail; the config says so at once."""
    found = problems(document_with(key, f"https://relay.example.com:{port}/v1"))

    assert [f"{key}: must have a TCP port from 1 to 65535"] == [
        p.split(" if any")[0] for p in found
    ]


def test_a_url_with_the_highest_port_or_none_is_accepted() -> None:
    """Port 65535 and a URL without a port (the scheme's own) are fine."""
    for url in ("https://relay.example.com:65535/v1", "https://relay.example.com/v1"):
        assert (
            url
            == config.parse(document_with("upstream.base_url", url), environ={}).upstream.base_url
        )
