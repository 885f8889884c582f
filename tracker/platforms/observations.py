"""From a relay's answer items to clean Observations: the fields every style reads alike, and
`settle`, which keeps one observation per asked id."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import structlog

from tracker import sanitize, status
from tracker.status import Observation

if TYPE_CHECKING:
    from tracker.platforms.base import Platform

log = structlog.get_logger("tracker.platforms")

#: ids named in one log line about an odd answer (duplicates, unasked ids)
LOGGED_IDS = 5

#: answer items read between two yields to the event loop: a 1,000-item answer read in one go
#: would hold up the API's requests on the same loop for tens of milliseconds
READ_CHUNK = 100


async def pause_every(count: int) -> None:
    """Yield to the event loop before every READ_CHUNK-th item (and right after the decode)."""
    if count % READ_CHUNK == 0:
        await asyncio.sleep(0)


def settle(
    platform: str, asked: Sequence[str], observations: Sequence[Observation]
) -> list[Observation]:
    """Clean observations, keep those of asked ids, one per id.

    An id the answer lists twice keeps its most advanced copy (statuses only move forward,
    so an older copy from a stale replica cannot undo a newer one; among equally advanced
    copies the first listed wins), and copies that disagree are logged. Ids nobody asked
    about are dropped and logged.
    """
    wanted = set(asked)
    kept: dict[str, Observation] = {}
    unasked: list[str] = []
    conflicts: dict[str, set[str]] = {}
    for raw in observations:
        observation = clean_observation(raw)
        task_id = observation.task_id
        if task_id not in wanted:
            unasked.append(task_id)
            continue
        earlier = kept.get(task_id)
        if earlier is None:
            kept[task_id] = observation
            continue
        if earlier.upstream_status != observation.upstream_status:
            conflicts.setdefault(task_id, {earlier.upstream_status}).add(
                observation.upstream_status
            )
        if _further(observation, earlier):
            kept[task_id] = observation
    if unasked:
        log.warning(
            "upstream_unasked_ids", platform=platform, count=len(unasked), ids=unasked[:LOGGED_IDS]
        )
    if conflicts:
        log.warning(
            "upstream_conflicting_duplicates",
            platform=platform,
            count=len(conflicts),
            statuses={k: sorted(v) for k, v in list(conflicts.items())[:LOGGED_IDS]},
        )
    return list(kept.values())


def _further(new: Observation, old: Observation) -> bool:
    if new.status is None:
        return False
    return old.status is None or status.can_move(old.status, new.status)


def clean_observation(observation: Observation) -> Observation:
    """The observation with its texts cleaned and capped to their columns."""
    word = sanitize.clean_text(observation.upstream_status, sanitize.MAX_WORD)
    progress = sanitize.clean_optional(observation.upstream_progress, sanitize.MAX_WORD)
    reason = sanitize.clean_text(observation.fail_reason, sanitize.MAX_REASON)
    # clean_text hands back the very string when it had nothing to clean: nearly every
    # observation is clean already, and a copy of it would cost more than the check.
    if (
        word is observation.upstream_status
        and progress is observation.upstream_progress
        and reason is observation.fail_reason
        and type(observation.result) is dict
    ):
        return observation
    return dataclasses.replace(
        observation,
        upstream_status=word,
        upstream_progress=progress,
        fail_reason=reason,
        # Kept as it is: items come from sanitize.loads, whose answer is clean already.
        result=dict(observation.result),
    )


def read_progress(raw: object) -> tuple[int | None, str | None]:
    """``(progress 0-100, upstream text)`` from a progress value of any relay.

    Strings are percentages ("45%" and "45" are 45). Integers are percentages (one-hub's 45).
    A float in [0, 1] is a fraction of one (Runway's 0.45 through a relay is 45; 1.0 is 100),
    a larger float is a percentage. "" (a failed Midjourney task) and junk give None.
    """
    if isinstance(raw, str):
        return _read_progress_text(raw)
    if isinstance(raw, float) and 0.0 <= raw <= 1.0:
        return status.parse_progress(raw, fraction=True), status.raw_progress(raw)
    return status.parse_progress(raw), status.raw_progress(raw)


@functools.lru_cache(maxsize=1024)
def _read_progress_text(raw: str) -> tuple[int | None, str | None]:
    # Answers repeat a handful of progress texts ("0%", "45%"): each is parsed once.
    return status.parse_progress(raw), status.raw_progress(raw)


def task_id_of(value: object) -> str | None:
    """An upstream id as text: strings as they are, integers (some relays) as digits."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def reason_of(value: object) -> str:
    """A failure reason as text: a string, or the message of an error object (Replicate, OpenAI)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("message", "detail", "error", "msg"):
            text = value.get(key)
            if isinstance(text, str) and text:
                return text
    return sanitize.dumps(value)


def positive_seconds(value: object) -> float | None:
    """A wait estimate in seconds when it is a positive number, else None."""
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


def observe_new_api_item(
    platform: Platform,
    item: Mapping[str, Any],
    *,
    wait_hint: float | None = None,
    task_id: str | None = None,
) -> Observation | None:
    """An Observation from a new-api TaskDto, trusting its top-level ``status`` (not ``data``).

    ``task_id`` names the task when the request already did (per-id endpoints); otherwise the
    item's own ``task_id`` does, and an item without one is skipped (None). An item without a
    status word is still an observation (status None): the relay knows the id.
    """
    return observe_item(
        platform,
        item,
        task_id=task_id or task_id_of(item.get("task_id")),
        reason_key="fail_reason",
        wait_hint=wait_hint,
    )


def observe_item(
    platform: Platform,
    item: Mapping[str, Any],
    *,
    task_id: str | None,
    reason_key: str,
    wait_hint: float | None = None,
) -> Observation | None:
    """An Observation of ``task_id`` from an item with `status` and `progress` fields."""
    if task_id is None:
        return None
    word = item.get("status")
    progress, upstream_progress = read_progress(item.get("progress"))
    # Positional (task_id, upstream_status, status, progress, upstream_progress, fail_reason,
    # result, wait_hint): one per answered id, and keywords cost a third more.
    return Observation(
        task_id,
        word if isinstance(word, str) else "",
        platform.normalise(word),
        progress,
        upstream_progress,
        reason_of(item.get(reason_key)),
        dict(item),
        wait_hint,
    )
