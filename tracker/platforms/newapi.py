"""Adapters for relays of the new-api / one-api family (`{code, message, data}` envelopes)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import httpx

from tracker.platforms.answers import (
    UpstreamError,
    excerpt,
    read_json,
    relay_message,
    try_json,
)
from tracker.platforms.base import CANCELED_WORDS, Glance, PerIdPlatform, Platform
from tracker.platforms.observations import (
    READ_CHUNK,
    clean_observation,
    observe_item,
    observe_new_api_item,
    positive_seconds,
    read_progress,
    reason_of,
    settle,
    task_id_of,
)
from tracker.status import Observation, TaskStatus

#: The new-api task status enum (model/task.go), shared by its batch and per-id endpoints.
#: UNKNOWN is left out on purpose: it is not final and says nothing about progress.
NEW_API_STATUSES: Mapping[str, TaskStatus] = {
    "NOT_START": TaskStatus.QUEUED,
    "SUBMITTED": TaskStatus.QUEUED,
    "QUEUED": TaskStatus.QUEUED,
    "IN_PROGRESS": TaskStatus.IN_PROGRESS,
    "SUCCESS": TaskStatus.COMPLETED,
    "FAILURE": TaskStatus.FAILED,
}

#: Luma's own `state` words: the web wrapper's pending/processing and the official API's
#: queued/dreaming, for relays that answer with a bare array of raw Luma objects.
LUMA_STATES: Mapping[str, TaskStatus] = {
    "pending": TaskStatus.QUEUED,
    "queued": TaskStatus.QUEUED,
    "processing": TaskStatus.IN_PROGRESS,
    "dreaming": TaskStatus.IN_PROGRESS,
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
}

#: new-api's OpenAI-video view (dto/openai_video.go); its `unknown` stays unknown on purpose.
OPENAI_VIDEO_STATUSES: Mapping[str, TaskStatus] = {
    "queued": TaskStatus.QUEUED,
    "in_progress": TaskStatus.IN_PROGRESS,
    "completed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
}

#: Kling's `task_status`, for one-hub, which serves the stored raw Kling answer.
KLING_STATUSES: Mapping[str, TaskStatus] = {
    "submitted": TaskStatus.QUEUED,
    "processing": TaskStatus.IN_PROGRESS,
    "succeed": TaskStatus.COMPLETED,
    "failed": TaskStatus.FAILED,
}

#: `newapi-batch` (luma, suno): the new-api enum, cancel words, Luma's raw states.
NEWAPI_BATCH_STATUSES: Mapping[str, TaskStatus] = {
    **NEW_API_STATUSES,
    **CANCELED_WORDS,
    **LUMA_STATES,
}

#: `newapi-single` (video, kling): the new-api enum, cancel words, OpenAI-video and Kling words.
NEWAPI_SINGLE_STATUSES: Mapping[str, TaskStatus] = {
    **NEW_API_STATUSES,
    **CANCELED_WORDS,
    **OPENAI_VIDEO_STATUSES,
    **KLING_STATUSES,
}

# new-api answers an unknown id on a per-id endpoint with HTTP 400 and this code.
TASK_NOT_EXIST = "task_not_exist"


def _wait_hint(item: Mapping[str, Any]) -> float | None:
    vendor = item.get("data")
    if isinstance(vendor, dict):
        return positive_seconds(vendor.get("estimate_wait_seconds"))
    return None


def _observe_raw_luma(platform: Platform, item: Mapping[str, Any]) -> Observation | None:
    """A raw Luma generation object, as some relays return from `/luma/tasks` (no TaskDto)."""
    task_id = task_id_of(item.get("id"))
    word = item.get("state")
    if task_id is None or not isinstance(word, str):
        return None
    progress, upstream_progress = read_progress(item.get("progress"))
    return Observation(
        task_id=task_id,
        upstream_status=word,
        status=platform.normalise(word),
        progress=progress,
        upstream_progress=upstream_progress,
        fail_reason=reason_of(item.get("failure_reason") or item.get("state_reason")),
        result=dict(item),
        wait_hint=positive_seconds(item.get("estimate_wait_seconds")),
    )


class NewApiBatch(Platform):
    """`POST {path} {"ids": [...]}` answering many tasks at once (Luma, Suno).

    The top-level `status` of each TaskDto is the truth: the vendor object in `data` (a Luma
    object, a list of Suno clips) can lag behind it (new-api#5715). Times may be ISO strings or
    unix seconds; none are read, the item is kept whole as the result.
    """

    style: ClassVar[str] = "newapi-batch"

    async def ask(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask for ``ids`` in one request."""
        return await self._observe_all(await self.post_ids(client, ids))

    async def fetch_seen(
        self, client: httpx.AsyncClient, ids: Sequence[str]
    ) -> dict[str, Observation | Glance]:
        """A glance at each item of a plain answer (one TaskDto per asked id, each once); an
        answer with anything else in it (raw Luma objects, an id twice or unasked, an odd
        item) is read in full and settled, as `fetch` does."""
        items = await self.readable(self.post_ids(client, ids))
        glances = await self._glances(items, ids)
        if glances is not None:
            return glances
        observations = await self.readable(self._observe_all(items))
        return {o.task_id: o for o in settle(self.name, ids, observations)}

    def observe_glance(self, glance: Glance) -> Observation:
        """The clean observation of a glanced TaskDto."""
        observation = observe_new_api_item(self, glance.item, wait_hint=glance.wait_hint)
        if observation is None:  # a glanced item has its task_id; kept for the type checker
            raise UpstreamError("answer item without a task_id")
        return clean_observation(observation)

    async def _glances(
        self, items: list[Any], ids: Sequence[str]
    ) -> dict[str, Observation | Glance] | None:
        asked = set(ids)
        glances: dict[str, Observation | Glance] = {}
        for count, item in enumerate(items):
            if count % READ_CHUNK == 0:  # pause_every, without a coroutine per item
                await asyncio.sleep(0)
            if type(item) is not dict:
                return None
            task_id = item.get("task_id")
            if type(task_id) is not str or task_id not in asked or task_id in glances:
                return None
            glances[task_id] = Glance(
                item.get("status"), item.get("progress"), _wait_hint(item), item
            )
        return glances

    async def _observe_all(self, items: list[Any]) -> list[Observation]:
        observations = []
        for count, item in enumerate(items):
            if count % READ_CHUNK == 0:  # pause_every, without a coroutine per item
                await asyncio.sleep(0)
            if not isinstance(item, dict):
                continue
            if "task_id" not in item and "state" in item:
                observation = _observe_raw_luma(self, item)
            else:
                observation = observe_new_api_item(self, item, wait_hint=_wait_hint(item))
            if observation is not None:
                observations.append(observation)
        return observations


def _no_such_route(response: httpx.Response) -> bool:
    """Whether a 404 comes from the relay's router, not from its task lookup: a body that is
    not JSON (a proxy's or a web server's page), or the "Invalid URL (GET /path)" error that
    new-api, one-api and OpenAI answer for a path they do not serve."""
    body = try_json(response)
    if not isinstance(body, dict):
        return True
    error = body.get("error")
    message = error.get("message") if isinstance(error, dict) else None
    return isinstance(message, str) and message.startswith("Invalid URL")


def _says_not_exist(body: object) -> bool:
    return isinstance(body, dict) and TASK_NOT_EXIST in (body.get("code"), body.get("message"))


class NewApiSingle(PerIdPlatform):
    """`GET {path}` per id with the `{code, message, data: TaskDto}` envelope (video, Kling).

    Also read: one-hub's raw Kling answer (`{code: 0, data: {task_status, ...}}`) and the
    OpenAI video object (`{object: "video", status, progress, error}`) of `/v1/videos/{id}`.
    HTTP 404, or a `task_not_exist` code (new-api sends it with HTTP 400), means "no such id";
    but not a 404 from the relay's router (a path it does not serve): that is a relay error,
    or a mistyped `path` would fail every task of the platform as not found.
    """

    style: ClassVar[str] = "newapi-single"

    def read_one(self, task_id: str, response: httpx.Response) -> Observation | None:
        """Read one answer; None when the relay does not know ``task_id``."""
        if response.status_code == 404:
            if _no_such_route(response):
                raise UpstreamError(
                    f"HTTP 404, no such route on the relay (check [platforms.{self.name}].path):"
                    f" {excerpt(response)}",
                    status_code=404,
                )
            return None
        if response.status_code == 400 and _says_not_exist(try_json(response)):
            return None
        body = read_json(response)
        if not isinstance(body, dict):
            raise UpstreamError(
                f"answer is not an object: {type(body).__name__}", status_code=response.status_code
            )
        if _says_not_exist(body):
            return None
        code, data = body.get("code"), body.get("data")
        if code == "success":
            if not isinstance(data, dict):
                raise UpstreamError(
                    f"'data' is {type(data).__name__}, not a task object",
                    status_code=response.status_code,
                )
            return observe_new_api_item(self, data, wait_hint=_wait_hint(data), task_id=task_id)
        if code == 0 and isinstance(data, dict) and "task_status" in data:
            return self._observe_kling(task_id, data)
        if "code" not in body and body.get("object") == "video":
            return observe_item(self, body, task_id=task_id, reason_key="error")
        raise UpstreamError(
            f"code {code!r}: {relay_message(response, body)}",
            status_code=response.status_code,
        )

    def _observe_kling(self, task_id: str, data: Mapping[str, Any]) -> Observation:
        word = data.get("task_status")
        return Observation(
            task_id=task_id,
            upstream_status=word if isinstance(word, str) else "",
            status=self.normalise(word),
            fail_reason=reason_of(data.get("task_status_msg")),
            result=dict(data),
        )
