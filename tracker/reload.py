"""Config reloads: which changes apply to a running daemon at once and which wait for a restart
(``plan_reload``, pure), and putting the live ones in force (``apply``, ``reload_file``).

A reload refuses whatever `tracker run` refuses at start (`startup.start_problems`), so a config
the daemon could not start with is never half put in force by SIGHUP.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydantic
import structlog

from tracker import config, events, logs, platforms, startup

if TYPE_CHECKING:
    from tracker.compose import Parts

log = structlog.get_logger("tracker.app")

#: sections a reload applies whole, without a restart
LIVE_SECTIONS = ("poll", "webhooks", "logging", "retention")
#: [server] keys a reload applies (the API reads them on every request)
LIVE_SERVER_KEYS = ("api_tokens", "metrics_require_auth")
#: [webhooks] keys that need a restart: the SSRF guard is built into the transport at start
RESTART_WEBHOOK_KEYS = ("allow_private",)

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


def _changed_keys(prefix: str, old: pydantic.BaseModel, new: pydantic.BaseModel) -> list[str]:
    return [
        f"{prefix}.{name}"
        for name in type(old).model_fields
        if getattr(old, name) != getattr(new, name)
    ]


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
    return ReloadPlan(
        settings=old.model_copy(update=live),
        applied=applied,
        needs_restart=needs_restart,
        refused=refused,
    )


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
    log.info("reloaded", applied=plan.applied, needs_restart=plan.needs_restart)
    if plan.needs_restart:
        log.warning("restart_needed", keys=plan.needs_restart)
    for problem in plan.refused:
        log.error("reload_refused", problem=problem)
    return plan


def read(path: Path, overrides: Overrides | None = None) -> config.Settings:
    """The config file at ``path`` as `tracker run` would start with it: ``overrides``
    applied, and refused (ConfigError) for anything `run` refuses."""
    new = config.load(path)
    if overrides is not None:
        new = overrides(new)
    problems = startup.start_problems(new)
    if problems:
        raise config.ConfigError(problems)
    return new


def reload_file(
    parts: Parts, secrets: LogSecrets, path: Path | None, overrides: Overrides | None = None
) -> None:
    """Re-read the config file at ``path`` and apply what can change live (SIGHUP).

    ``overrides`` are the changes `tracker run` made to the file's settings at start (see
    ``read``). Brackets the work with RELOADING=1 and READY=1; a file `tracker run` would
    refuse changes nothing.
    """
    if parts.stop.is_set():
        log.info("reload_ignored", reason="shutting down")
        return
    if path is None:
        log.warning("reload_ignored", reason="no config file to re-read")
        return
    parts.notifier.reloading()
    try:
        new = read(path, overrides)
    except config.ConfigError as exc:
        log.error(  # noqa: TRY400 - the problems say it all; a traceback would not
            "reload_failed", problems=exc.problems, config=str(path)
        )
    else:
        try:
            apply(parts, secrets, new)
        except Exception:
            log.exception("reload_failed", config=str(path))
    finally:
        parts.notifier.ready()
