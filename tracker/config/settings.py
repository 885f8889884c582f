"""`Settings`, the whole config, and what is checked of it beyond its keys: the example's
placeholder credentials, an in-memory SQLite database, and the SQLite path made absolute
against the config's directory."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pydantic
from pydantic import Field, SecretStr, StrictStr

from tracker import sanitize
from tracker.config.sections import (
    DashboardSettings,
    DatabaseSettings,
    LoggingSettings,
    Name,
    PlatformSettings,
    PollSettings,
    RetentionSettings,
    Section,
    ServerSettings,
    UpstreamSettings,
    WebhookSettings,
    is_loopback,
)

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


class ConfigError(ValueError):
    """The configuration is not usable; the message lists every problem by key.

    Raised inside a validator too, with problems that each name their own dotted key: `parse`
    then reports every one of them instead of the validator's first.
    """

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Settings(Section):
    """Everything the daemon needs, validated once at start (and at reload)."""

    server: ServerSettings = Field(default_factory=ServerSettings)
    database: DatabaseSettings = Field(default_factory=DatabaseSettings)
    upstream: UpstreamSettings
    upstreams: dict[StrictStr, UpstreamSettings] = Field(default_factory=dict)
    poll: PollSettings = Field(default_factory=PollSettings)
    platforms: dict[Name, PlatformSettings] = Field(default_factory=dict)
    webhooks: WebhookSettings
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    dashboard: DashboardSettings = Field(default_factory=DashboardSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)

    @pydantic.field_validator("platforms")
    @classmethod
    def _known_upstreams(
        cls, value: dict[str, PlatformSettings], info: pydantic.ValidationInfo
    ) -> dict[str, PlatformSettings]:
        # A field validator, not a model one, so it is reported with every other bad key;
        # upstreams comes first, and is missing from info.data when it is invalid itself.
        if "upstreams" not in info.data:
            return value
        problems = [
            f"platforms.{name}.upstream: names {platform.upstream!r}, which is not an "
            "[upstreams.NAME] section"
            for name, platform in value.items()
            if platform.upstream is not None and platform.upstream not in info.data["upstreams"]
        ]
        if problems:
            raise ConfigError(problems)
        return value

    def dashboard_enabled(self) -> bool:
        """Whether /ui is served: as configured, else only on a loopback host."""
        if self.dashboard.enabled is not None:
            return self.dashboard.enabled
        return is_loopback(self.server.host)

    def secrets(self) -> list[str]:
        """Every secret value in the settings, for the log redactor: the passwords written in
        its URLs too (a relay or receiver behind basic auth, the database's), those of at
        least MIN_SECRET_PREFIX characters."""
        found = [self.upstream.api_key, self.webhooks.secret]
        found += [u.api_key for u in self.upstreams.values()]
        found += list(self.server.api_tokens)
        if self.dashboard.token is not None:
            found.append(self.dashboard.token)
        found += [p.secret for p in self.webhooks.previous_secrets]
        for endpoint in self.webhooks.endpoints.values():
            found += [endpoint.secret, *(p.secret for p in endpoint.previous_secrets)]
        values = [s.get_secret_value() for s in found]
        urls = [self.upstream.base_url, *(u.base_url for u in self.upstreams.values())]
        urls += [self.webhooks.url or "", *(e.url for e in self.webhooks.endpoints.values())]
        passwords = [p for url in [*urls, self.database.url] for p in url_passwords(url)]
        passwords += _database_passwords(self.database.url)
        # A short one ("postgres", "1") would be cut out of every word and number that holds
        # it; the URLs themselves are never shown with their passwords (without_userinfo).
        values += [p for p in passwords if len(p) >= sanitize.MIN_SECRET_PREFIX]
        return [v for v in values if v]


def url_passwords(url: str) -> list[str]:
    """The password written in ``url`` (``scheme://user:password@host``) as written and
    %-decoded, as a log line may show either; none when it has none or cannot be read.

    Usernames are left out: often a plain word ("admin", "tracker") the redactor would then
    cut out of every line.
    """
    try:
        password = urlsplit(url).password
    except ValueError:
        return []
    return [] if not password else sorted({password, unquote(password)})


def _database_passwords(url: str) -> list[str]:
    """The passwords of a database URL as SQLAlchemy reads it: it takes "/", "?" or "#" in a
    password unescaped, which `url_passwords` would miss, and reads them from the query too."""
    from sqlalchemy.engine import make_url  # noqa: PLC0415 - cold path
    from sqlalchemy.exc import ArgumentError  # noqa: PLC0415

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return []
    found = [] if "@" in (parsed.host or "") else [parsed.password]
    for key, value in parsed.query.items():
        if key.lower() in sanitize.SECRET_QUERY_KEYS:
            found += [value] if isinstance(value, str) else list(value)
    return [str(p) for p in found if p]


def is_placeholder(value: str, known: frozenset[str]) -> bool:
    """Whether ``value`` is a placeholder, not a credential: one of ``known``, or blank or
    an ellipsis (``...``, ``…``, ``sk-...``) as the README's examples write one. An empty
    value is not judged here (the keys that cannot be empty refuse it themselves)."""
    return value in known or (value != "" and _ELLIPSIS.fullmatch(value) is not None)


#: whitespace, dots and ellipses only, after an optional "sk-"
_ELLIPSIS = re.compile(r"\s*(sk-)?[\s.\u2026]*")
#: how to make a dashboard token, there being no example one to keep
_DASHBOARD_HINT = (
    "set a random one (python -c 'import secrets; print(secrets.token_urlsafe(24))') "
    "or leave it unset to sign in with an API token"
)


def placeholder_problems(settings: Settings) -> list[str]:
    """The example config's placeholder credentials still in ``settings``, one line each."""
    return document_placeholder_problems(settings.model_dump())


def document_placeholder_problems(document: Mapping[str, Any]) -> list[str]:
    """The placeholder credentials among the values of ``document``, one line each: the
    settings dumped (``placeholder_problems``), or a decoded TOML document, the whole of
    which may not validate (a value of another type than the key takes is left to the
    error that names it)."""
    problems = []
    server = _table(document.get("server"))
    tokens = server.get("api_tokens")
    if isinstance(tokens, list | tuple) and any(
        is_placeholder(t, PLACEHOLDER_TOKENS) for t in map(_text, tokens) if t is not None
    ):
        problems.append(f"server.api_tokens: the example's placeholder token; {MAKE_REAL_ONES}")
    upstreams = {"upstream": _table(document.get("upstream"))} | {
        f"upstreams.{name}": _table(u) for name, u in _table(document.get("upstreams")).items()
    }
    for where, upstream in upstreams.items():
        key = _text(upstream.get("api_key"))
        if key is not None and is_placeholder(key, PLACEHOLDER_KEYS):
            # Only [upstream]'s key has an environment variable (ENV_OVERRIDES).
            elsewhere = " or in TRACKER_UPSTREAM_API_KEY" if where == "upstream" else ""
            problems.append(
                f"{where}.api_key: the example's placeholder; put your relay key here"
                f"{elsewhere} (`tracker run --simulate` needs none)"
            )
    hooks = _table(document.get("webhooks"))
    secrets = {"webhooks.secret": hooks.get("secret")}
    previous = hooks.get("previous_secrets")
    for i, old in enumerate(previous if isinstance(previous, list | tuple) else ()):
        secrets[f"webhooks.previous_secrets.{i}"] = _table(old).get("secret")
    for name, endpoint in _table(hooks.get("endpoints")).items():
        secrets[f"webhooks.endpoints.{name}.secret"] = _table(endpoint).get("secret")
    for where, secret in secrets.items():
        if _text(secret) in PLACEHOLDER_SECRETS:
            problems.append(
                f"{where}: the example's published secret; {MAKE_REAL_ONES} (or run "
                "python -c 'from tracker import signing; print(signing.new_secret())')"
            )
    token = _text(_table(document.get("dashboard")).get("token"))
    if token is not None and is_placeholder(token, PLACEHOLDER_TOKENS):
        problems.append(f"dashboard.token: the example's placeholder token; {_DASHBOARD_HINT}")
    return problems


def _table(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _text(value: object) -> str | None:
    """The string a credential key holds, as written or as its SecretStr; None for another
    type."""
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    return value if isinstance(value, str) else None


_SQLITE_URL = re.compile(r"^sqlite(\+\w+)?:///(?P<path>[^?]*)")
_SQLITE_ANY = re.compile(r"^sqlite(\+\w+)?:///?(?P<path>[^?]*)\??(?P<query>.*)$")
IN_MEMORY = (
    "an in-memory SQLite database cannot be used: each of the daemon's connection pools "
    "would get its own empty one; name a file, e.g. sqlite:///tracker.db"
)


def in_memory(url: str) -> bool:
    """Whether ``url`` is an in-memory SQLite database: no path, :memory: or mode=memory."""
    match = _SQLITE_ANY.match(url)
    if match is None:
        return False
    path, query = match.group("path"), match.group("query").lower().split("&")
    return path in ("", ":memory:") or path.startswith("file::memory:") or "mode=memory" in query


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
