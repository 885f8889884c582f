"""Upstream platform adapters: one small class per upstream shape behind `base.Platform`."""

from __future__ import annotations

from collections.abc import Mapping

from tracker import config
from tracker.platforms.base import (
    CANCELED_WORDS,
    TASK_ID_PLACEHOLDER,
    PerIdPlatform,
    Platform,
    StatusTable,
    Upstream,
    UpstreamError,
)
from tracker.platforms.midjourney import MIDJOURNEY_STATUSES, Midjourney
from tracker.platforms.newapi import (
    NEWAPI_BATCH_STATUSES,
    NEWAPI_SINGLE_STATUSES,
    NewApiBatch,
    NewApiSingle,
)
from tracker.platforms.replicate import REPLICATE_STATUSES, Replicate
from tracker.status import TaskStatus

__all__ = [
    "BUILTIN",
    "CANCELED_WORDS",
    "DEFAULT_UPSTREAM",
    "STATUS_TABLES",
    "STYLES",
    "Midjourney",
    "NewApiBatch",
    "NewApiSingle",
    "PerIdPlatform",
    "Platform",
    "Replicate",
    "Upstream",
    "UpstreamError",
    "build",
    "upstream_from",
]

#: The name of the `[upstream]` section's relay, used unless `platforms.NAME.upstream` says else.
DEFAULT_UPSTREAM = "default"

#: The adapter class of each `style`.
STYLES: Mapping[config.Style, type[Platform]] = {
    "newapi-batch": NewApiBatch,
    "newapi-single": NewApiSingle,
    "midjourney": Midjourney,
    "replicate": Replicate,
}

#: Upstream word -> tracker status, per style; `[platforms.NAME] statuses` is layered on top.
STATUS_TABLES: Mapping[config.Style, StatusTable] = {
    "newapi-batch": NEWAPI_BATCH_STATUSES,
    "newapi-single": NEWAPI_SINGLE_STATUSES,
    "midjourney": MIDJOURNEY_STATUSES,
    "replicate": REPLICATE_STATUSES,
}

#: The platforms that exist without configuration: name -> (style, path).
BUILTIN: Mapping[str, tuple[config.Style, str]] = {
    "luma": ("newapi-batch", "/luma/tasks"),
    "suno": ("newapi-batch", "/suno/fetch"),
    "midjourney": ("midjourney", "/mj/task/list-by-condition"),
    "video": ("newapi-single", "/v1/video/generations/{task_id}"),
    "kling": ("newapi-single", "/kling/v1/videos/text2video/{task_id}"),
    "replicate": ("replicate", "/v1/predictions/{task_id}"),
}


def upstream_from(name: str, settings: config.UpstreamSettings) -> Upstream:
    """The Upstream an `[upstream]` or `[upstreams.NAME]` section describes."""
    return Upstream(
        name=name,
        base_url=settings.base_url,
        api_key=settings.api_key.get_secret_value(),
        timeout=settings.timeout,
        auth=settings.auth,
        max_response_bytes=settings.max_response_bytes,
    )


def build(settings: config.Settings) -> dict[str, Platform]:
    """Every built-in platform and every `[platforms.NAME]`, keyed by name.

    A section named like a built-in overrides the fields it sets; any other name is a new
    platform and needs `style` and `path` (a ConfigError naming the missing key otherwise).
    Per-id styles always ask one id per request; batch styles ask `batch_size` ids, by default
    `[poll] batch_size`.
    """
    upstreams = {name: upstream_from(name, u) for name, u in settings.upstreams.items()}
    default = upstream_from(DEFAULT_UPSTREAM, settings.upstream)
    names = [*BUILTIN, *(name for name in settings.platforms if name not in BUILTIN)]
    platforms: dict[str, Platform] = {}
    for name in names:
        section = settings.platforms.get(name) or config.PlatformSettings()
        builtin_style, builtin_path = BUILTIN.get(name, (None, None))
        style = section.style or builtin_style
        path = section.path or builtin_path
        if style is None or path is None:
            missing = [
                f"platforms.{name}.{key}"
                for key, value in (("style", style), ("path", path))
                if value is None
            ]
            raise config.ConfigError(
                [
                    f"{' and '.join(missing)} must be set: {name!r} is not a built-in platform "
                    f"({', '.join(BUILTIN)})"
                ]
            )
        cls = STYLES[style]
        if cls.per_id and TASK_ID_PLACEHOLDER not in path:
            raise config.ConfigError(
                [
                    f"platforms.{name}.path must contain {TASK_ID_PLACEHOLDER} for style "
                    f"{style!r}, which asks one id per request (got {path!r})"
                ]
            )
        statuses: dict[str, TaskStatus] = {**STATUS_TABLES[style], **section.statuses}
        platforms[name] = cls(
            name,
            upstreams[section.upstream] if section.upstream else default,
            path,
            statuses,
            batch_size=section.batch_size or settings.poll.batch_size,
            rate_limit=section.rate_limit,
        )
    return platforms
