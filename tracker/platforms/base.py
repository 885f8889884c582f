"""The one interface every upstream platform adapter implements, and what adapters share."""

from __future__ import annotations

import abc
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar
from urllib.parse import quote

import httpx

from tracker import status
from tracker.status import Observation, TaskStatus

# How much of a relay's error answer we keep for the log line: enough to see what it said.
ERROR_EXCERPT = 300

#: The placeholder a per-id path carries, replaced by the URL-quoted task id.
TASK_ID_PLACEHOLDER = "{task_id}"

#: Every spelling of "canceled" seen upstream; every style's table includes these.
CANCELED_WORDS: Mapping[str, TaskStatus] = dict.fromkeys(
    ("CANCEL", "CANCELED", "CANCELLED", "canceled", "cancelled"), TaskStatus.CANCELED
)


class UpstreamError(Exception):
    """The relay did not give a usable answer; no task changes and the ids are asked again."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """Where one relay lives and how to authenticate to it."""

    name: str
    base_url: str
    api_key: str = dataclasses.field(repr=False)
    timeout: float = 30.0
    auth: str = "bearer"  #: "bearer" or "mj-api-secret"

    def url(self, path: str) -> str:
        """The absolute URL of ``path`` on this relay."""
        return self.base_url.rstrip("/") + "/" + path.lstrip("/")

    def headers(self) -> dict[str, str]:
        """The authentication headers this relay expects."""
        if not self.api_key:
            return {}
        if self.auth == "mj-api-secret":
            return {"mj-api-secret": self.api_key}
        return {"Authorization": f"Bearer {self.api_key}"}


StatusTable = Mapping[str, TaskStatus]


class Platform(abc.ABC):
    """An upstream task family: how to ask about ids and how to read the answer."""

    #: the ``[platforms.NAME] style`` value this class implements
    style: ClassVar[str]
    #: whether the upstream is asked one id per request (``batch_size`` is then always 1)
    per_id: ClassVar[bool] = False

    #: ids per request; 1 for platforms that only have a per-id endpoint
    batch_size: int
    #: requests per second for this platform, None for no limit beyond ``[poll].concurrency``
    rate_limit: float | None = None

    def __init__(
        self,
        name: str,
        upstream: Upstream,
        path: str,
        statuses: StatusTable,
        *,
        batch_size: int,
        rate_limit: float | None = None,
    ) -> None:
        self.name = name
        self.upstream = upstream
        self.path = path
        self.statuses = statuses
        self.batch_size = batch_size
        self.rate_limit = rate_limit

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, upstream={self.upstream.name!r}, "
            f"path={self.path!r}, batch_size={self.batch_size})"
        )

    @abc.abstractmethod
    async def fetch(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask the upstream about ``ids``; ids it leaves out are simply absent from the result.

        Raises UpstreamError when the answer is unusable.
        """

    async def post_ids(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Any]:
        """`POST {path} {"ids": [...]}` and the items of the answer (envelope or bare array)."""
        response = await client.post(
            self.upstream.url(self.path),
            json={"ids": list(ids)},
            headers=self.upstream.headers(),
            timeout=self.upstream.timeout,
        )
        return new_api_items(read_json(response), status_code=response.status_code)

    def normalise(self, word: object) -> TaskStatus | None:
        """The tracker status for an upstream word, None when the word is not in the table."""
        return self.statuses.get(word) if isinstance(word, str) else None


class PerIdPlatform(Platform):
    """A platform that only has `GET {path}` with ``{task_id}`` filled in, one id per request."""

    per_id: ClassVar[bool] = True

    def __init__(
        self,
        name: str,
        upstream: Upstream,
        path: str,
        statuses: StatusTable,
        *,
        batch_size: int = 1,
        rate_limit: float | None = None,
    ) -> None:
        # batch_size is accepted so every style is built the same way; one id per request it is.
        del batch_size
        if TASK_ID_PLACEHOLDER not in path:
            raise ValueError(f"path {path!r} has no {TASK_ID_PLACEHOLDER} placeholder")
        super().__init__(name, upstream, path, statuses, batch_size=1, rate_limit=rate_limit)

    def task_url(self, task_id: str) -> str:
        """The URL asking about one task (the id quoted, slashes included)."""
        return self.upstream.url(self.path.replace(TASK_ID_PLACEHOLDER, quote(task_id, safe="")))

    async def fetch(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask for each id in turn; any unusable answer fails the whole call."""
        observations = []
        for task_id in ids:
            response = await client.get(
                self.task_url(task_id),
                headers=self.upstream.headers(),
                timeout=self.upstream.timeout,
            )
            observation = self.read_one(task_id, response)
            if observation is not None:
                observations.append(observation)
        return observations

    @abc.abstractmethod
    def read_one(self, task_id: str, response: httpx.Response) -> Observation | None:
        """The observation in the answer about ``task_id``; None when the upstream has no such id.

        Raises UpstreamError when the answer is unusable.
        """


def read_json(response: httpx.Response) -> Any:
    """The decoded JSON body of a 2xx answer, or UpstreamError saying what came back instead."""
    if not response.is_success:
        raise UpstreamError(
            f"HTTP {response.status_code}: {excerpt(response)}", status_code=response.status_code
        )
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UpstreamError(
            f"answer is not JSON: {excerpt(response)}", status_code=response.status_code
        ) from exc


def try_json(response: httpx.Response) -> Any:
    """The decoded JSON body whatever the HTTP status, None when it is not JSON."""
    try:
        return response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def excerpt(response: httpx.Response) -> str:
    """The first bytes of an answer, for log lines."""
    text = response.content[:ERROR_EXCERPT].decode("utf-8", "replace")
    return text if text else "(empty body)"


def new_api_items(body: Any, *, status_code: int | None = None) -> list[Any]:
    """The items of a new-api answer: the ``{code, message, data}`` envelope or a bare array.

    ``status_code`` is the HTTP status of the answer, carried by the UpstreamError raised.
    """
    if isinstance(body, list):
        return body
    if not isinstance(body, dict):
        raise UpstreamError(
            f"answer is neither an object nor an array: {type(body).__name__}",
            status_code=status_code,
        )
    code = body.get("code")
    if code != "success":
        raise UpstreamError(
            f"code {code!r}: {body.get('message') or '(no message)'}", status_code=status_code
        )
    data = body.get("data")
    if data is None:
        return []
    if not isinstance(data, list):
        raise UpstreamError(
            f"'data' is {type(data).__name__}, not an array", status_code=status_code
        )
    return data


def read_progress(raw: object) -> tuple[int | None, str | None]:
    """``(progress 0-100, upstream text)`` from a progress value of any relay.

    Strings are percentages ("45%" and "45" are 45). Integers are percentages (one-hub's 45).
    A float in [0, 1] is a fraction of one (Runway's 0.45 through a relay is 45; 1.0 is 100),
    a larger float is a percentage. "" (a failed Midjourney task) and junk give None.
    """
    if isinstance(raw, float) and 0.0 <= raw <= 1.0:
        return status.parse_progress(raw, fraction=True), status.raw_progress(raw)
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
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


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
    return Observation(
        task_id=task_id,
        upstream_status=word if isinstance(word, str) else "",
        status=platform.normalise(word),
        progress=progress,
        upstream_progress=upstream_progress,
        fail_reason=reason_of(item.get(reason_key)),
        result=dict(item),
        wait_hint=wait_hint,
    )
