"""Reading the config: the TOML file, the environment overrides, and errors that name the key."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic

from tracker.config.settings import Settings, resolve_database

# Environment variables that override a key, so secrets can live outside the config file
# (systemd's EnvironmentFile=).
ENV_OVERRIDES: Mapping[str, tuple[str, str]] = {
    "TRACKER_UPSTREAM_API_KEY": ("upstream", "api_key"),
    "TRACKER_WEBHOOKS_SECRET": ("webhooks", "secret"),
}


class ConfigError(ValueError):
    """The configuration is not usable; the message lists every problem by key."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


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
