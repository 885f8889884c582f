"""The config's sections: what each key accepts and its default, checked one section at a time."""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, Strict, StrictInt, StrictStr

from tracker import sanitize, signing, status

DEFAULT_RETRY_DELAYS = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
DEFAULT_EVENTS = (status.EventType.COMPLETED.value, status.EventType.FAILED.value)
DEFAULT_MAX_INTERVAL = 120.0
#: bytes of one relay answer read at most (32 MiB: a 10,000-id batch is about 12 MiB)
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: bytes of one webhook receiver's answer read at most (its status code alone decides)
DEFAULT_WEBHOOK_RESPONSE_BYTES = 64 * 1024

#: the longest duration in seconds any key takes: beyond every sensible value, and far enough
#: from datetime's limits that ``now + timedelta(seconds=...)`` (doubled, as a receiver's
#: Retry-After may) cannot overflow
MAX_SECONDS = 366 * 86400
#: the longest [retention] span in days (0 keeps rows forever)
MAX_DAYS = 3660
#: [platforms.NAME] and [webhooks.endpoints.NAME] rate limits, requests per second: at least
#: one a day (a slower pace would leave a request waiting without end), at most 10000
MIN_RATE = 1 / 86400
MAX_RATE = 10_000
#: characters of a platform or endpoint name, the width of the database columns that keep them
NAME_MAX_LENGTH = 64
#: the highest TCP port (a URL may name any number)
MAX_PORT = 65535


# TOML reads inf and nan as floats; the comparisons below refuse them (nan compares false).
def _seconds(value: float) -> float:
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(
            f"must be more than 0 and at most {MAX_SECONDS} s (366 days), not {value:g}"
        )
    return value


def _days(value: float) -> float:
    if not 0 <= value <= MAX_DAYS:
        raise ValueError(
            f"must be from 0 (kept forever) to {MAX_DAYS} days (about 10 years), not {value:g}"
        )
    return value


def _rate(value: float) -> float:
    if not MIN_RATE <= value <= MAX_RATE:
        raise ValueError(
            f"must be from 1/86400 (one request a day) to {MAX_RATE} requests per second, "
            f"not {value:g}"
        )
    return value


def _name(value: str) -> str:
    if len(value) > NAME_MAX_LENGTH:
        raise ValueError(
            f"the name is {len(value)} characters long; at most {NAME_MAX_LENGTH} fit the "
            "database's column"
        )
    return value


Seconds = Annotated[float, Strict(), pydantic.AfterValidator(_seconds)]
Days = Annotated[float, Strict(), pydantic.AfterValidator(_days)]
PerSecond = Annotated[float, Strict(), pydantic.AfterValidator(_rate)]
Count = Annotated[StrictInt, Field(ge=1)]
#: a platform's or an endpoint's name: stored with every task and delivery
Name = Annotated[StrictStr, pydantic.AfterValidator(_name)]
#: ids per upstream request, [poll].batch_size and a platform's own alike
BatchSize = Annotated[StrictInt, Field(ge=1, le=10000)]
#: deliveries in flight at once, over all receivers or to one of them
InFlight = Annotated[StrictInt, Field(ge=1, le=1024)]


def _http_url(value: str) -> str:
    # Quoted without a user and password written in it: the message reaches stderr and logs.
    shown = sanitize.without_userinfo(value)[:60]
    if not re.match(r"^https?://[^\s/?#]+", value):
        raise ValueError(f"must be an http:// or https:// URL, not {shown!r}")
    try:
        port = urlsplit(value).port
    except ValueError:  # not a number, or past 65535
        port = -1
    if port is not None and not 1 <= port <= MAX_PORT:
        raise ValueError(f"must have a TCP port from 1 to {MAX_PORT} if any, not {shown!r}")
    return value


HttpUrl = Annotated[StrictStr, pydantic.AfterValidator(_http_url)]
Style = Literal["newapi-batch", "newapi-single", "midjourney", "replicate"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(Section):
    """[server]: where the HTTP API listens and who may use it."""

    host: StrictStr = "127.0.0.1"
    port: Annotated[StrictInt, Field(ge=0, le=65535)] = 8686
    api_tokens: tuple[SecretStr, ...] = ()
    #: /metrics and /readyz need a token too when true
    metrics_require_auth: pydantic.StrictBool = False
    #: the largest request body the API reads, in bytes; larger ones answer 413
    max_body_bytes: Annotated[StrictInt, Field(ge=1024, le=64 * 1024 * 1024)] = 1024 * 1024
    #: seconds a client has to send a whole request head, and then its body; else it is dropped
    header_timeout: Annotated[float, Strict(), Field(gt=0, le=300)] = 10.0
    #: open API connections at most (half the open-files limit, if that is lower); when full,
    #: the connection that has waited longest without sending a request is closed
    max_connections: Annotated[StrictInt, Field(ge=1, le=100_000)] = 1000

    @pydantic.field_validator("api_tokens", mode="before")
    @classmethod
    def _tokens_are_strings(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(t, str) and t for t in value):
            raise ValueError("every token must be a non-empty string")
        return value

    @pydantic.model_validator(mode="after")
    def _tokens_needed_off_loopback(self) -> ServerSettings:
        if not self.api_tokens and not is_loopback(self.host):
            raise ValueError(
                f"api_tokens may be empty only when host is a loopback address, not {self.host!r}"
            )
        return self


class DatabaseSettings(Section):
    """[database]: an SQLAlchemy URL; SQLite is the embedded default."""

    url: Annotated[StrictStr, Field(pattern=r"^(sqlite|postgresql)(\+\w+)?://")] = (
        "sqlite:///tracker.db"
    )
    #: upgrade an older schema at start; default on for SQLite, off for PostgreSQL, where
    #: instances of two releases may share the database during a rolling upgrade
    auto_migrate: pydantic.StrictBool = True

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_auto_migrate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "auto_migrate" not in data:
            url = data.get("url", "sqlite")
            return {**data, "auto_migrate": isinstance(url, str) and url.startswith("sqlite")}
        return data


class UpstreamSettings(Section):
    """[upstream] and [upstreams.NAME]: one relay."""

    base_url: HttpUrl
    api_key: SecretStr
    #: seconds one whole request may take, the answer's body included
    timeout: Seconds = 30.0
    #: "mj-api-secret" for a midjourney-proxy upstream, "bearer" for relays
    auth: Literal["bearer", "mj-api-secret"] = "bearer"
    #: bytes of one answer read at most; a longer answer is a relay error, never read whole
    max_response_bytes: Annotated[StrictInt, Field(ge=1024)] = DEFAULT_MAX_RESPONSE_BYTES

    @pydantic.model_validator(mode="after")
    def _key_not_replaced(self) -> UpstreamSettings:
        # httpx sends a user and password written in the URL as "Authorization: Basic",
        # which would replace the relay key's Bearer header on every request: the relay
        # would refuse each one. (With mj-api-secret the key has a header of its own.)
        if self.auth == "bearer" and "@" in urlsplit(self.base_url).netloc:
            raise ValueError(
                'base_url must not carry a user or password with auth = "bearer": they'
                " would be sent as Authorization: Basic in place of the relay key"
            )
        return self


class PollSettings(Section):
    """[poll]: how often and how hard the upstream is asked."""

    interval: Seconds = 10.0
    batch_size: BatchSize = 100
    concurrency: Annotated[StrictInt, Field(ge=1, le=256)] = 4
    give_up_after: Seconds = 86400.0
    not_found_after: Seconds = 600.0
    #: default 120, or interval when that is longer
    max_interval: Seconds = 120.0
    #: /readyz fails while the most overdue live task is later than this (seconds)
    max_lag: Seconds = 300.0

    @pydantic.model_validator(mode="before")
    @classmethod
    def _default_max_interval(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_interval" not in data:
            interval = data.get("interval")
            # An interval out of range is reported once, by its own key, not copied here too.
            if isinstance(interval, int | float) and DEFAULT_MAX_INTERVAL < interval <= MAX_SECONDS:
                return {**data, "max_interval": interval}
        return data

    @pydantic.model_validator(mode="after")
    def _max_at_least_interval(self) -> PollSettings:
        if self.max_interval < self.interval:
            raise ValueError("max_interval must not be below interval")
        return self


class PlatformSettings(Section):
    """[platforms.NAME]: a custom platform, or overrides for a built-in one."""

    style: Style | None = None
    path: StrictStr | None = None
    batch_size: BatchSize | None = None
    upstream: StrictStr | None = None
    #: requests per second at most
    rate_limit: PerSecond | None = None
    #: upstream word -> tracker status, layered over the style's own table
    statuses: dict[StrictStr, status.TaskStatus] = Field(default_factory=dict)


def _signing_secret(value: SecretStr) -> SecretStr:
    try:
        signing.decode_secret(value.get_secret_value())
    except ValueError:
        raise ValueError("must be a Standard Webhooks secret: whsec_ followed by base64") from None
    return value


SigningSecret = Annotated[SecretStr, pydantic.AfterValidator(_signing_secret)]


class PreviousSecret(Section):
    """A rotated-out secret that keeps signing until it expires."""

    secret: SigningSecret
    expires_at: datetime

    @pydantic.field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a time zone, e.g. 2026-12-01T00:00:00Z")
        return value


class EndpointSettings(Section):
    """[webhooks.endpoints.NAME]: a named webhook target with its own secret."""

    url: HttpUrl
    secret: SigningSecret
    previous_secrets: tuple[PreviousSecret, ...] = ()
    events: tuple[StrictStr, ...] | None = None
    #: requests per second at most
    rate_limit: PerSecond | None = None
    max_in_flight: InFlight | None = None

    @pydantic.field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        return None if value is None else check_events(value)


class WebhookSettings(Section):
    """[webhooks]: where and how events are delivered."""

    url: HttpUrl | None = None
    secret: SigningSecret
    previous_secrets: tuple[PreviousSecret, ...] = ()
    retry_delays: Annotated[tuple[Seconds, ...], Field(min_length=1)] = DEFAULT_RETRY_DELAYS
    timeout: Seconds = 15.0
    events: tuple[StrictStr, ...] = DEFAULT_EVENTS
    allow_private: tuple[StrictStr, ...] = ()
    endpoints: dict[Name, EndpointSettings] = Field(default_factory=dict)
    #: deliveries in flight at once, over all receivers
    concurrency: InFlight = 64
    #: deliveries in flight at once to one host
    per_host: InFlight = 8
    #: bytes of a receiver's answer read at most; the rest is dropped unread
    max_response_bytes: Annotated[StrictInt, Field(ge=1024)] = DEFAULT_WEBHOOK_RESPONSE_BYTES

    @pydantic.field_validator("events")
    @classmethod
    def _known_events(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return check_events(value)

    @pydantic.field_validator("allow_private")
    @classmethod
    def _networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(f"{cidr!r} is not an IP network like 127.0.0.0/8") from None
        return value


class RetentionSettings(Section):
    """[retention]: how long finished work is kept, in days; 0 keeps it forever."""

    #: delivered deliveries and their attempt logs, counted from delivery
    delivered_days: Days = 30.0
    #: dead deliveries not replayed, counted from their last attempt
    dead_days: Days = 90.0
    #: final tasks and their history, counted from when they finished; a task goes only once
    #: each of its deliveries is due to go too
    final_tasks_days: Days = 90.0
    #: seconds between retention runs
    interval: Seconds = 3600.0
    #: rows deleted per transaction, so no run holds a lock for long
    batch_size: Annotated[StrictInt, Field(ge=1, le=10000)] = 500


class LoggingSettings(Section):
    """[logging]: verbosity and line format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


DEFAULT_SESSION_LIFETIME = 43200.0


class DashboardSettings(Section):
    """[dashboard]: the operator's web pages under /ui."""

    #: unset means on when [server].host is a loopback address, off elsewhere
    enabled: pydantic.StrictBool | None = None
    #: a sign-in token for the dashboard only (API tokens are accepted too)
    token: SecretStr | None = None
    #: seconds a sign-in lasts
    session_lifetime: Seconds = DEFAULT_SESSION_LIFETIME

    @pydantic.field_validator("token")
    @classmethod
    def _token_not_empty(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value():
            raise ValueError("must be a non-empty string")
        return value


def check_events(events: tuple[str, ...]) -> tuple[str, ...]:
    """Refuse event names the tracker never emits."""
    unknown = sorted(set(events) - status.ALL_EVENTS)
    if unknown:
        known = sorted(e.value for e in status.EventType)
        raise ValueError(f"unknown event(s) {unknown}; known: {known}")
    return events


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
