"""Frozen settings read from a TOML file and the environment, with errors that name the key."""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, SecretStr, Strict, StrictInt, StrictStr

from tracker import signing, status

# Environment variables that override a key, so secrets can live outside the config file
# (systemd's EnvironmentFile=).
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "TRACKER_UPSTREAM_API_KEY": ("upstream", "api_key"),
    "TRACKER_WEBHOOKS_SECRET": ("webhooks", "secret"),
}

DEFAULT_RETRY_DELAYS = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 50400.0, 72000.0, 86400.0)
DEFAULT_EVENTS = (status.EventType.COMPLETED.value, status.EventType.FAILED.value)
DEFAULT_MAX_INTERVAL = 120.0
#: bytes of one relay answer read at most (32 MiB: a 10,000-id batch is about 12 MiB)
DEFAULT_MAX_RESPONSE_BYTES = 32 * 1024 * 1024
#: bytes of one webhook receiver's answer read at most (its status code alone decides)
DEFAULT_WEBHOOK_RESPONSE_BYTES = 64 * 1024

#: values config.example.toml ships with: anyone who read the repository knows them
PLACEHOLDER_TOKENS = frozenset({"change-me"})
PLACEHOLDER_KEYS = frozenset({"sk-..."})
PLACEHOLDER_SECRETS = frozenset(
    {
        "whsec_CHANGE+ME+run+tracker+init",
        # the example's secret up to version 0.1.0
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    }
)
MAKE_REAL_ONES = "`tracker init` writes a config with a fresh API token and webhook secret"

Seconds = Annotated[float, Strict(), Field(gt=0)]
Days = Annotated[float, Strict(), Field(ge=0)]
Count = Annotated[StrictInt, Field(ge=1)]


def _http_url(value: str) -> str:
    if not re.match(r"^https?://[^\s/?#]+", value):
        raise ValueError(f"must be an http:// or https:// URL, not {value[:60]!r}")
    return value


HttpUrl = Annotated[StrictStr, pydantic.AfterValidator(_http_url)]
Style = Literal["newapi-batch", "newapi-single", "midjourney", "replicate"]


class ConfigError(ValueError):
    """The configuration is not usable; the message lists every problem by key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Section):
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


class DatabaseSettings(_Section):
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


class UpstreamSettings(_Section):
    """[upstream] and [upstreams.NAME]: one relay."""

    base_url: HttpUrl
    api_key: SecretStr
    #: seconds one whole request may take, the answer's body included
    timeout: Seconds = 30.0
    #: "mj-api-secret" for a midjourney-proxy upstream, "bearer" for relays
    auth: Literal["bearer", "mj-api-secret"] = "bearer"
    #: bytes of one answer read at most; a longer answer is a relay error, never read whole
    max_response_bytes: Annotated[StrictInt, Field(ge=1024)] = DEFAULT_MAX_RESPONSE_BYTES


class PollSettings(_Section):
    """[poll]: how often and how hard the upstream is asked."""

    interval: Seconds = 10.0
    batch_size: Annotated[StrictInt, Field(ge=1, le=10000)] = 100
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
            if isinstance(interval, int | float) and interval > DEFAULT_MAX_INTERVAL:
                return {**data, "max_interval": interval}
        return data

    @pydantic.model_validator(mode="after")
    def _max_at_least_interval(self) -> PollSettings:
        if self.max_interval < self.interval:
            raise ValueError("max_interval must not be below interval")
        return self


class PlatformSettings(_Section):
    """[platforms.NAME]: a custom platform, or overrides for a built-in one."""

    style: Style | None = None
    path: StrictStr | None = None
    batch_size: Count | None = None
    upstream: StrictStr | None = None
    rate_limit: Seconds | None = None
    #: upstream word -> tracker status, layered over the style's own table
    statuses: dict[StrictStr, status.TaskStatus] = Field(default_factory=dict)


def _signing_secret(value: SecretStr) -> SecretStr:
    try:
        signing.decode_secret(value.get_secret_value())
    except ValueError:
        raise ValueError("must be a Standard Webhooks secret: whsec_ followed by base64") from None
    return value


SigningSecret = Annotated[SecretStr, pydantic.AfterValidator(_signing_secret)]


class PreviousSecret(_Section):
    """A rotated-out secret that keeps signing until it expires."""

    secret: SigningSecret
    expires_at: datetime

    @pydantic.field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("must carry a time zone, e.g. 2026-12-01T00:00:00Z")
        return value


class EndpointSettings(_Section):
    """[webhooks.endpoints.NAME]: a named webhook target with its own secret."""

    url: HttpUrl
    secret: SigningSecret
    previous_secrets: tuple[PreviousSecret, ...] = ()
    events: tuple[StrictStr, ...] | None = None
    rate_limit: Seconds | None = None
    max_in_flight: Count | None = None


class WebhookSettings(_Section):
    """[webhooks]: where and how events are delivered."""

    url: HttpUrl | None = None
    secret: SigningSecret
    previous_secrets: tuple[PreviousSecret, ...] = ()
    retry_delays: Annotated[tuple[Seconds, ...], Field(min_length=1)] = DEFAULT_RETRY_DELAYS
    timeout: Seconds = 15.0
    events: tuple[StrictStr, ...] = DEFAULT_EVENTS
    allow_private: tuple[StrictStr, ...] = ()
    endpoints: dict[StrictStr, EndpointSettings] = Field(default_factory=dict)
    #: deliveries in flight at once, over all receivers
    concurrency: Annotated[StrictInt, Field(ge=1, le=1024)] = 64
    #: deliveries in flight at once to one host
    per_host: Annotated[StrictInt, Field(ge=1, le=1024)] = 8
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


class RetentionSettings(_Section):
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


class LoggingSettings(_Section):
    """[logging]: verbosity and line format."""

    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


DEFAULT_SESSION_LIFETIME = 43200.0


class DashboardSettings(_Section):
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


class Settings(_Section):
    """Everything the daemon needs, validated once at start (and at reload)."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    upstream: UpstreamSettings
    upstreams: dict[StrictStr, UpstreamSettings] = Field(default_factory=dict)
    poll: PollSettings = Field(default_factory=PollSettings)
    platforms: dict[StrictStr, PlatformSettings] = Field(default_factory=dict)
    webhooks: WebhookSettings
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @pydantic.model_validator(mode="after")
    def _references(self) -> Settings:
        for name, platform in self.platforms.items():
            if platform.upstream is not None and platform.upstream not in self.upstreams:
                raise ValueError(
                    f"platforms.{name}.upstream names {platform.upstream!r}, "
                    "which is not an [upstreams.NAME] section"
                )
        for name, endpoint in self.webhooks.endpoints.items():
            if endpoint.events is not None:
                try:
                    check_events(endpoint.events)
                except ValueError as exc:
                    raise ValueError(f"webhooks.endpoints.{name}.events: {exc}") from None
        return self

    def dashboard_enabled(self) -> bool:
        """Whether /ui is served: as configured, else only on a loopback host."""
        if self.dashboard.enabled is not None:
            return self.dashboard.enabled
        return is_loopback(self.server.host)

    def secrets(self) -> list[str]:
        """Every secret value in the settings, for the log redactor."""
        found = [self.upstream.api_key, self.webhooks.secret]
        found += [u.api_key for u in self.upstreams.values()]
        found += list(self.server.api_tokens)
        if self.dashboard.token is not None:
            found.append(self.dashboard.token)
        found += [p.secret for p in self.webhooks.previous_secrets]
        for endpoint in self.webhooks.endpoints.values():
            found += [endpoint.secret, *(p.secret for p in endpoint.previous_secrets)]
        return [s.get_secret_value() for s in found if s.get_secret_value()]


def placeholder_problems(settings: Settings) -> list[str]:
    """The example config's placeholder credentials still in ``settings``, one line each."""
    problems = []
    if any(t.get_secret_value() in PLACEHOLDER_TOKENS for t in settings.server.api_tokens):
        problems.append(f"server.api_tokens: the example's placeholder token; {MAKE_REAL_ONES}")
    upstreams = {"upstream": settings.upstream} | {
        f"upstreams.{name}": u for name, u in settings.upstreams.items()
    }
    for where, upstream in upstreams.items():
        if upstream.api_key.get_secret_value() in PLACEHOLDER_KEYS:
            problems.append(
                f"{where}.api_key: the example's placeholder; put your relay key here or in "
                "TRACKER_UPSTREAM_API_KEY (`tracker run --simulate` needs none)"
            )
    hooks = settings.webhooks
    secrets = {"webhooks.secret": hooks.secret} | {
        f"webhooks.previous_secrets.{i}": p.secret for i, p in enumerate(hooks.previous_secrets)
    }
    for name, endpoint in hooks.endpoints.items():
        secrets[f"webhooks.endpoints.{name}.secret"] = endpoint.secret
    for where, secret in secrets.items():
        if secret.get_secret_value() in PLACEHOLDER_SECRETS:
            problems.append(
                f"{where}: the example's published secret; {MAKE_REAL_ONES} (or run "
                "python -c 'from tracker import signing; print(signing.new_secret())')"
            )
    return problems


_SQLITE_URL = re.compile(r"^sqlite(\+\w+)?:///(?P<path>[^?]*)")


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL; None for another database or an in-memory one."""
    match = _SQLITE_URL.match(url)
    if match is None:
        return None
    database = match.group("path")
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database)


def resolve_database(settings: Settings, base: Path) -> Settings:
    """``settings`` with a relative SQLite path made absolute against ``base``.

    The config file's directory is the base, so the daemon and every CLI command open the
    same file whatever directory they were started from.
    """
    url = settings.database.url
    path = sqlite_path(url)
    match = _SQLITE_URL.match(url)
    if path is None or path.is_absolute() or match is None:
        return settings
    start, end = match.span("path")
    absolute = url[:start] + str((base / path).resolve()) + url[end:]
    database = settings.database.model_copy(update={"url": absolute})
    return settings.model_copy(update={"database": database})


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


def _location(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def parse(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a decoded TOML document, applying the environment overrides first."""
    environ = os.environ if environ is None else environ
    document: dict[str, Any] = dict(raw)
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value:
            table = document.get(section)
            document[section] = {**(table if isinstance(table, dict) else {}), key: value}
    try:
        return Settings.model_validate(document)
    except pydantic.ValidationError as exc:
        # The input value is left out on purpose: it may be a secret.
        problems = [
            f"{_location(error['loc'])}: {_describe(error)}"
            for error in exc.errors(include_url=False, include_input=False)
        ]
        raise ConfigError(problems) from None


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML file at ``path``."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the config file ({exc.strerror})"]) from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML ({exc})"]) from None
    return resolve_database(parse(raw, environ), file.absolute().parent)
