"""Config reloads: which changes apply to a running daemon at once and which wait for a restart
(``plan_reload``, pure), and putting the live ones in force (``apply``, ``reload_file``).

A reload refuses whatever `tracker run` refuses at start (`startup.start_problems`), so a config
the daemon could not start with is never half put in force by SIGHUP.

The environment is read at start only (systemd reads `EnvironmentFile=` then too): a key an
environment variable overrides keeps the variable's value over any edit to the file, and a
reload that meets such an edit says so (``EnvOverrides``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import structlog

from tracker import config, events, logs, platforms, startup
from tracker.config import loading

if TYPE_CHECKING:
    from tracker.compose import Parts

log = structlog.get_logger("tracker.app")

#: sections a reload applies whole, without a restart
LIVE_SECTIONS = ("poll", "webhooks", "logging", "retention")
#: [server] keys a reload applies (the API reads them on every request)
LIVE_SERVER_KEYS = ("api_tokens", "metrics_require_auth")
#: [webhooks] keys that need a restart: the SSRF guard is built into the transport at start
RESTART_WEBHOOK_KEYS = ("allow_private",)
#: [platforms.NAME] keys a reload applies (the poller takes them from its next drain on); a
#: platform added or removed, or its style, path, upstream or statuses changed, waits
LIVE_PLATFORM_KEYS = ("batch_size", "rate_limit")

#: applied keys whose words the reload's log line shows, beside every number and switch
SHOWN_WORDS = ("logging.level", "logging.format")

#: what `tracker run` changed in the file's settings before starting (``--simulate`` points
#: them at its simulated relay); a reload applies the same, or the file would undo it
Overrides = Callable[[config.Settings], config.Settings]


@dataclasses.dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a reload does: the settings that will be in force and what changed."""

    settings: config.Settings  #: the old settings with every live change applied
    applied: list[str]  #: dotted keys whose new value takes effect now
    needs_restart: list[str]  #: dotted keys whose new value waits for a restart
    refused: list[str]  #: live keys kept at their old value, with the reason
    #: applied key -> [old value, new value], for the numbers, switches and SHOWN_WORDS among
    #: them: never a token, a secret or a URL, so the log line holds none even unredacted
    values: dict[str, list[Any]] = dataclasses.field(default_factory=dict)


def _changed_fields(old: pydantic.BaseModel, new: pydantic.BaseModel) -> list[str]:
    return [name for name in type(old).model_fields if getattr(old, name) != getattr(new, name)]


def _changed_keys(prefix: str, old: pydantic.BaseModel, new: pydantic.BaseModel) -> list[str]:
    return [f"{prefix}.{name}" for name in _changed_fields(old, new)]


def plan_reload(old: config.Settings, new: config.Settings) -> ReloadPlan:
    """Split the difference between two configs into what applies live and what cannot."""
    applied: list[str] = []
    needs_restart: list[str] = []
    refused: list[str] = []
    live: dict[str, Any] = {}
    for section in type(old).model_fields:
        before, after = getattr(old, section), getattr(new, section)
        if before == after:
            continue
        keys = (
            _changed_keys(section, before, after)
            if isinstance(before, pydantic.BaseModel)
            else [section]
        )
        if section in LIVE_SECTIONS:
            live[section] = after
            applied += keys
        elif section == "platforms":
            in_force, platform_keys, waiting = _platform_changes(before, after)
            if platform_keys:
                live[section] = in_force
                applied += platform_keys
            needs_restart += waiting
        elif section != "server":
            needs_restart += keys
    held = [k for k in RESTART_WEBHOOK_KEYS if getattr(old.webhooks, k) != getattr(new.webhooks, k)]
    if held:
        live["webhooks"] = new.webhooks.model_copy(
            update={k: getattr(old.webhooks, k) for k in held}
        )
        applied = [k for k in applied if k not in {f"webhooks.{h}" for h in held}]
        needs_restart += [f"webhooks.{k}" for k in held]
    server_update = {
        k: getattr(new.server, k)
        for k in LIVE_SERVER_KEYS
        if getattr(old.server, k) != getattr(new.server, k)
    }
    # An open API is allowed on loopback only, and the host in force is the old one.
    emptied = "api_tokens" in server_update and not server_update["api_tokens"]
    if emptied and not config.is_loopback(old.server.host):
        del server_update["api_tokens"]
        refused.append(
            "server.api_tokens: cannot be emptied while listening on "
            f"{old.server.host!r}; restart with a loopback host first"
        )
    if server_update:
        live["server"] = old.server.model_copy(update=server_update)
        applied += [f"server.{k}" for k in server_update]
    needs_restart += [
        f"server.{name}"
        for name in type(old.server).model_fields
        if name not in LIVE_SERVER_KEYS and getattr(old.server, name) != getattr(new.server, name)
    ]
    settings = old.model_copy(update=live)
    return ReloadPlan(
        settings=settings,
        applied=applied,
        needs_restart=needs_restart,
        refused=refused,
        values=_shown_values(old, settings, applied),
    )


def _shown_values(
    old: config.Settings, new: config.Settings, keys: list[str]
) -> dict[str, list[Any]]:
    shown: dict[str, list[Any]] = {}
    for key in keys:
        pair = [_setting(old, key), _setting(new, key)]
        plain = all(v is None or isinstance(v, bool | int | float) for v in pair)
        if plain or key in SHOWN_WORDS:
            shown[key] = pair
    return shown


def _setting(settings: config.Settings, key: str) -> Any:
    """The value of a dotted key ("poll.interval", "platforms.luma.rate_limit")."""
    section, *path = key.split(".")
    value: Any = getattr(settings, section)
    if section == "platforms":
        name, *path = path
        value = _platform(value, name)
    for name in path:
        value = getattr(value, name)
    return value


def _platform_changes(
    old: Mapping[str, config.PlatformSettings], new: Mapping[str, config.PlatformSettings]
) -> tuple[dict[str, config.PlatformSettings], list[str], list[str]]:
    """The [platforms] in force after a reload (the old ones, with their LIVE_PLATFORM_KEYS
    from ``new``; a built-in platform's section added or removed counts as its keys set or
    unset), the dotted keys applied, and those that wait for a restart."""
    in_force = dict(old)
    applied: list[str] = []
    waiting: list[str] = []
    for name in sorted(old.keys() | new.keys()):
        before, after = _platform(old, name), _platform(new, name)
        if before == after:
            continue
        if before is None or after is None:  # a platform of its own added or removed
            waiting.append(f"platforms.{name}")
            continue
        changed = _changed_fields(before, after)
        live = [k for k in changed if k in LIVE_PLATFORM_KEYS]
        waiting += [f"platforms.{name}.{k}" for k in changed if k not in live]
        if live:
            in_force[name] = before.model_copy(update={k: getattr(after, k) for k in live})
            applied += [f"platforms.{name}.{k}" for k in live]
    return in_force, applied, waiting


def _platform(
    section: Mapping[str, config.PlatformSettings], name: str
) -> config.PlatformSettings | None:
    """A platform's settings in [platforms]: a built-in platform is there with or without a
    section of its own (without one, it has the defaults); None for another one not there."""
    default = config.PlatformSettings() if name in platforms.BUILTIN else None
    return section.get(name, default)


class LogSecrets:
    """The secrets the log redacts: every one known since start, a rotated-out one included."""

    def __init__(self, settings: config.Settings) -> None:
        self._secrets = set(settings.secrets())

    def update(self, old: config.Settings, new: config.Settings) -> None:
        """Follow the new [logging] level and format, and redact the new secrets too."""
        secrets = set(new.secrets())
        if secrets <= self._secrets and old.logging.format == new.logging.format:
            logs.set_level(new.logging.level)
            return
        # New secrets must be redacted from the next line on; old ones stay redacted too.
        self._secrets |= secrets
        logs.configure(
            level=new.logging.level, fmt=new.logging.format, secrets=sorted(self._secrets)
        )


def apply(parts: Parts, secrets: LogSecrets, new: config.Settings) -> ReloadPlan:
    """Put the live parts of ``new`` in force; returns what was applied and what was not."""
    old = parts.state.settings
    plan = plan_reload(old, new)
    current = plan.settings
    secrets.update(old, current)
    parts.state.settings = current
    # Rebuilt from the settings now in force, for the batch sizes [poll] implies.
    parts.poller.configure(current.poll, platforms.build(current), events.Targets(current.webhooks))
    parts.relay_health.interval = current.poll.interval
    parts.deliverer.configure(current.webhooks)
    if current.retention.interval != old.retention.interval:
        parts.jobs.reschedule("retention", current.retention.interval)
    parts.engine.wake()
    log.info("reloaded", applied=plan.applied, values=plan.values, needs_restart=plan.needs_restart)
    if plan.needs_restart:
        log.warning("restart_needed", keys=plan.needs_restart)
    for problem in plan.refused:
        log.error("reload_refused", problem=problem)
    return plan


class EnvOverrides:
    """The keys the environment overrides (``config.ENV_OVERRIDES``), and the file's own value
    of each as last read (at start, then by each reload applied), to tell which of them an
    operator has since edited in the file.

    A running process never reads its environment again, so such an edit changes nothing: the
    variable's value stays in force until a restart (with the variable changed or removed).
    The values may be secrets: they are compared here, never logged.
    """

    def __init__(self, path: Path | None, environ: Mapping[str, str] | None = None) -> None:
        #: the environment the daemon started with (its settings' overrides)
        self.environ: Mapping[str, str] = os.environ if environ is None else environ
        self._file: dict[str, tuple[str, object]] = {}
        if path is not None:
            # Unreadable now: the first reload has nothing to compare with, and says nothing.
            with contextlib.suppress(config.ConfigError):
                self._file = loading.overridden(loading.read(path), self.environ)

    def warn_edited(self, raw: Mapping[str, Any]) -> list[str]:
        """Log ``env_override_kept`` for each overridden key the file ``raw`` (as read now)
        sets otherwise than when last read; returns those keys, and remembers ``raw``'s."""
        now = loading.overridden(raw, self.environ)
        edited: list[str] = []
        for variable, (key, value) in now.items():
            before = self._file.get(variable)
            if before is None or before[1] == value:
                continue
            edited.append(key)
            log.warning(
                "env_override_kept",
                key=key,
                variable=variable,
                hint=f"{variable} is set in the environment and overrides {key}, so the "
                "value edited in the config file does not apply; the environment's value "
                "stays in force. The environment (systemd's EnvironmentFile=, e.g. "
                "/etc/tracker/tracker.env) is read at start only: change or remove the "
                "variable there and restart the daemon (a reload does not apply it)",
            )
        self._file = now
        return edited


def _validated(
    raw: Mapping[str, Any],
    path: Path,
    overrides: Overrides | None,
    environ: Mapping[str, str] | None,
) -> config.Settings:
    new = loading.from_document(raw, path, environ)
    if overrides is not None:
        new = overrides(new)
    problems = startup.start_problems(new)
    if problems:
        raise config.ConfigError(problems)
    return new


def reload_file(
    parts: Parts,
    secrets: LogSecrets,
    path: Path | None,
    overrides: Overrides | None = None,
    env: EnvOverrides | None = None,
) -> None:
    """Re-read the config file at ``path`` and apply what can change live (SIGHUP).

    ``overrides`` are the changes `tracker run` made to the file's settings at start; the
    file is refused (ConfigError) for anything `run` refuses. ``env`` holds the environment
    the daemon started with and the file's values it overrides as last read: a key the file
    now sets otherwise is logged as kept at the environment's value (without it, the
    process's environment and no such warning). Brackets the work with RELOADING=1 and
    READY=1; a file `tracker run` would refuse changes nothing.
    """
    if parts.stop.is_set():
        log.info("reload_ignored", reason="shutting down")
        return
    if path is None:
        log.warning("reload_ignored", reason="no config file to re-read")
        return
    parts.notifier.reloading()
    try:
        raw = loading.read(path)
        new = _validated(raw, path, overrides, env.environ if env is not None else None)
    except config.ConfigError as exc:
        log.error(  # noqa: TRY400 - the problems say it all; a traceback would not
            "reload_failed", problems=exc.problems, config=str(path)
        )
    else:
        try:
            apply(parts, secrets, new)
        except Exception:
            log.exception("reload_failed", config=str(path))
        else:
            if env is not None:
                env.warn_edited(raw)
    finally:
        parts.notifier.ready()
