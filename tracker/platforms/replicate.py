"""Adapter for Replicate's prediction API (`GET /v1/predictions/{task_id}`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

import httpx

from tracker.platforms.answers import UpstreamError, excerpt, read_json
from tracker.platforms.base import CANCELED_WORDS, PerIdPlatform
from tracker.platforms.observations import read_progress, reason_of
from tracker.status import Observation, TaskStatus

#: Replicate's prediction `status`, plus the cancel spellings.
REPLICATE_STATUSES: Mapping[str, TaskStatus] = {
    "starting": TaskStatus.QUEUED,
    "processing": TaskStatus.IN_PROGRESS,
    "succeeded": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
    **CANCELED_WORDS,
}


class Replicate(PerIdPlatform):
    """`GET {path}` per id answering a prediction object; 404 means "no such prediction".

    `error` (a string, or an object with a message) is the fail reason. Replicate reports no
    progress; a numeric `progress`, if a relay adds one, is read like any other.
    """

    style: ClassVar[str] = "replicate"

    def read_one(self, task_id: str, response: httpx.Response) -> Observation | None:
        """Read one prediction; None when Replicate does not know ``task_id``."""
        if response.status_code == 404:
            return None
        body = read_json(response)
        if not isinstance(body, dict):
            raise UpstreamError(
                f"answer is not a prediction object: {type(body).__name__}",
                status_code=response.status_code,
            )
        word = body.get("status")
        if not isinstance(word, str):
            # An object without a status is an error page or a proxy's answer, not a prediction.
            raise UpstreamError(
                f"answer has no prediction status: {excerpt(response)}",
                status_code=response.status_code,
            )
        raw = body.get("progress")
        numeric = isinstance(raw, int | float) and not isinstance(raw, bool)
        progress, upstream_progress = read_progress(raw) if numeric else (None, None)
        return Observation(
            task_id=task_id,
            upstream_status=word,
            status=self.normalise(word),
            progress=progress,
            upstream_progress=upstream_progress,
            fail_reason=reason_of(body.get("error")),
            result=dict(body),
        )
