"""Reading the config: the TOML file, the environment overrides, and errors that name the key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pydantic

from tracker.config.settings import IN_MEMORY, ConfigError, Settings, in_memory, resolve_database

# Environment variables that override a key, so secrets can live outside the config file
# (systemd's EnvironmentFile=).
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "TRACKER_UPSTREAM_API_KEY": ("upstream", "api_key"),
    "TRACKER_WEBHOOKS_SECRET": ("webhooks", "secret"),
    "TRACKER_SERVER_API_TOKENS": ("server", "api_tokens"),
    "TRACKER_DASHBOARD_TOKEN": ("dashboard", "token"),
}
#: the overridden keys that hold a list: the variable's value is split at whitespace
_LIST_KEYS = frozenset({("server", "api_tokens")})


__all__ = [
    "ENV_OVERRIDES",
    "ConfigError",
    "from_document",
    "from_environment",
    "load",
    "overridden",
    "parse",
    "read",
    "with_overrides",
]


def _location(loc: tuple[int | str, ...]) -> str:
    # A bad table name (a dict key) is named by its own path: platforms.NAME, not NAME.[key].
    return ".".join(str(part) for part in loc if part != "[key]") or "(top level)"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    return message.removeprefix("Value error, ")


def _in_force(
    environ: Mapping[str, str] | None,
) -> Iterator[tuple[str, str, str, str]]:
    """The overrides ``environ`` (the process's by default) sets: variable, section, key and
    value of each (a blank variable, systemd's ``KEY=``, overrides nothing)."""
    environ = os.environ if environ is None else environ
    for variable, (section, key) in ENV_OVERRIDES.items():
        value = environ.get(variable)
        if value and value.strip():
            yield variable, section, key, value


def with_overrides(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The decoded document ``raw`` with the environment overrides set in it, as ``parse``
    validates it."""
    document: dict[str, Any] = dict(raw)
    for _variable, section, key, value in _in_force(environ):
        table = document.get(section)
        setting = value.split() if (section, key) in _LIST_KEYS else value
        document[section] = {**(table if isinstance(table, dict) else {}), key: setting}
    return document


def from_environment(problems: list[str], environ: Mapping[str, str] | None = None) -> list[str]:
    """``problems`` with each one about a key an environment variable set (``ENV_OVERRIDES``)
    naming that variable: ``webhooks.secret (from TRACKER_WEBHOOKS_SECRET): ...``, so it is not
    looked for in the file. The value itself is never added."""
    named = list(problems)
    for variable, section, key, _value in _in_force(environ):
        dotted = f"{section}.{key}"
        # A list's items are named by their index: server.api_tokens.0: ...
        named = [
            f"{dotted} (from {variable}){p.removeprefix(dotted)}"
            if p.startswith((f"{dotted}:", f"{dotted}."))
            else p
            for p in named
        ]
    return named


def parse(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """Validate a decoded TOML document, applying the environment overrides first."""
    document = with_overrides(raw, environ)
    try:
        return Settings.model_validate(document)
    except pydantic.ValidationError as exc:
        # The input value is left out on purpose: it may be a secret.
        problems: list[str] = []
        for error in exc.errors(include_url=False, include_input=False):
            cause = error.get("ctx", {}).get("error")
            if isinstance(cause, ConfigError):  # several problems, each naming its key
                problems += cause.problems
            else:
                problems.append(f"{_location(error['loc'])}: {_describe(error)}")
        raise ConfigError(from_environment(problems, environ)) from None


def overridden(
    raw: Mapping[str, Any], environ: Mapping[str, str] | None = None
) -> dict[str, tuple[str, object]]:
    """The environment overrides in force over the decoded document ``raw``: for each variable
    set (as ``parse`` reads it), its dotted key and the file's own value there (None when the
    file has none). The values may be secrets: compare them, never log them."""
    found: dict[str, tuple[str, object]] = {}
    for variable, section, key, _value in _in_force(environ):
        table = raw.get(section)
        value = table.get(key) if isinstance(table, dict) else None
        found[variable] = (f"{section}.{key}", value)
    return found


def _in_memory_problems(raw: Mapping[str, Any]) -> list[str]:
    # Checked for a file the daemon or a command would open, not in `parse`, which also
    # validates documents built in code (tests use sqlite:// for settings never opened).
    database = raw.get("database")
    url = database.get("url") if isinstance(database, dict) else None
    return [f"database.url: {IN_MEMORY}"] if isinstance(url, str) and in_memory(url) else []


def read(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The TOML file at ``path`` decoded, not validated (ConfigError if it cannot be)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{file}: cannot read the config file ({exc.strerror})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{file}: not valid TOML ({exc})"]) from None


def load(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None) -> Settings:
    """Read and validate the TOML file at ``path``."""
    return from_document(read(path), path, environ)


def from_document(
    raw: Mapping[str, Any],
    path: str | os.PathLike[str],
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Validate ``raw``, the document ``read`` decoded from the file at ``path``, as ``load``
    does (relative SQLite paths resolve against the file's directory)."""
    file = Path(path)
    memory = _in_memory_problems(raw)
    try:
        settings = parse(raw, environ)
    except ConfigError as exc:
        raise ConfigError([*exc.problems, *memory]) from None
    if memory:
        raise ConfigError(memory)
    return resolve_database(settings, file.absolute().parent)
