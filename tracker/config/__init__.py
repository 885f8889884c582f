"""Frozen settings read from a TOML file and the environment, with errors that name the key.

What each section accepts is in `sections`, the whole `Settings` and the checks beyond single
keys in `settings`, reading the file and the environment in `loading`; every name is
importable from `tracker.config` as before.
"""

from __future__ import annotations

from tracker.config.loading import ENV_OVERRIDES, ConfigError, load, parse
from tracker.config.sections import (
    DEFAULT_EVENTS,
    DEFAULT_MAX_INTERVAL,
    DEFAULT_MAX_RESPONSE_BYTES,
    DEFAULT_RETRY_DELAYS,
    DEFAULT_SESSION_LIFETIME,
    DEFAULT_WEBHOOK_RESPONSE_BYTES,
    Count,
    DashboardSettings,
    DatabaseSettings,
    Days,
    EndpointSettings,
    HttpUrl,
    LoggingSettings,
    PlatformSettings,
    PollSettings,
    PreviousSecret,
    RetentionSettings,
    Seconds,
    ServerSettings,
    SigningSecret,
    Style,
    UpstreamSettings,
    WebhookSettings,
    check_events,
    is_loopback,
)
from tracker.config.settings import (
    MAKE_REAL_ONES,
    PLACEHOLDER_KEYS,
    PLACEHOLDER_SECRETS,
    PLACEHOLDER_TOKENS,
    Settings,
    placeholder_problems,
    resolve_database,
    sqlite_path,
)

__all__ = [
    "DEFAULT_EVENTS",
    "DEFAULT_MAX_INTERVAL",
    "DEFAULT_MAX_RESPONSE_BYTES",
    "DEFAULT_RETRY_DELAYS",
    "DEFAULT_SESSION_LIFETIME",
    "DEFAULT_WEBHOOK_RESPONSE_BYTES",
    "ENV_OVERRIDES",
    "MAKE_REAL_ONES",
    "PLACEHOLDER_KEYS",
    "PLACEHOLDER_SECRETS",
    "PLACEHOLDER_TOKENS",
    "ConfigError",
    "Count",
    "DashboardSettings",
    "DatabaseSettings",
    "Days",
    "EndpointSettings",
    "HttpUrl",
    "LoggingSettings",
    "PlatformSettings",
    "PollSettings",
    "PreviousSecret",
    "RetentionSettings",
    "Seconds",
    "ServerSettings",
    "Settings",
    "SigningSecret",
    "Style",
    "UpstreamSettings",
    "WebhookSettings",
    "check_events",
    "is_loopback",
    "load",
    "parse",
    "placeholder_problems",
    "resolve_database",
    "sqlite_path",
]
