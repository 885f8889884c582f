"""Adapter for midjourney-proxy's batch query (`POST /mj/task/list-by-condition`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx

from tracker.platforms.base import CANCELED_WORDS, Platform
from tracker.platforms.observations import observe_item, pause_every, task_id_of
from tracker.status import Observation, TaskStatus

#: midjourney-proxy's TaskStatus (novicezk and trueai-org), plus the cancel spellings.
#: MODAL waits for the user to submit a remix/zoom dialog: running, never final.
MIDJOURNEY_STATUSES: Mapping[str, TaskStatus] = {
    "NOT_START": TaskStatus.QUEUED,
    "SUBMITTED": TaskStatus.QUEUED,
    "QUEUED": TaskStatus.QUEUED,
    "IN_PROGRESS": TaskStatus.IN_PROGRESS,
    "MODAL": TaskStatus.IN_PROGRESS,
    "SUCCESS": TaskStatus.COMPLETED,
    "FAILURE": TaskStatus.FAILED,
    **CANCELED_WORDS,
}


def observe_midjourney_item(platform: Platform, item: Mapping[str, Any]) -> Observation | None:
    """An Observation from one camelCase midjourney-proxy task; None without an `id`."""
    # A failed task has progress "": no number, but the upstream text is kept as sent.
    return observe_item(platform, item, task_id=task_id_of(item.get("id")), reason_key="failReason")


class Midjourney(Platform):
    """`POST {path} {"ids": [...]}` answering a bare array of tasks (or one in a new-api envelope).

    Times (`submitTime`, `startTime`, `finishTime`) are unix milliseconds; none are read.
    Authentication is the upstream's: `auth = "mj-api-secret"` for a midjourney-proxy itself.
    """

    style: ClassVar[str] = "midjourney"

    async def ask(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask for ``ids`` in one request."""
        observations = []
        for count, item in enumerate(await self.post_ids(client, ids)):
            await pause_every(count)
            if isinstance(item, dict):
                observation = observe_midjourney_item(self, item)
                if observation is not None:
                    observations.append(observation)
        return observations
