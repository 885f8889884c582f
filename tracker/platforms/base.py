"""The one interface every upstream platform adapter implements: `Platform` (and `PerIdPlatform`
for relays asked one id per request) and the `Upstream` it asks.

Reading an answer is in `answers`, turning its items into observations in `observations`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import httpx

from tracker import config
from tracker.paths import segment
from tracker.platforms.answers import UpstreamError, new_api_items, read_bounded, read_json
from tracker.platforms.observations import settle
from tracker.status import Observation, TaskStatus

# UpstreamError is raised by every part of a platform; callers know it from here.
__all__ = [
    "CANCELED_WORDS",
    "TASK_ID_PLACEHOLDER",
    "Glance",
    "PerIdPlatform",
    "Platform",
    "StatusTable",
    "Upstream",
    "UpstreamError",
]

_T = TypeVar("_T")

#: The placeholder a per-id path carries, replaced by the URL-quoted task id.
TASK_ID_PLACEHOLDER = "{task_id}"

#: Every spelling of "canceled" seen upstream; every style's table includes these.
CANCELED_WORDS: Mapping[str, TaskStatus] = dict.fromkeys(
    ("CANCEL", "CANCELED", "CANCELLED", "canceled", "cancelled"), TaskStatus.CANCELED
)


class Glance(NamedTuple):
    """An answer item read no further than a poll needs to tell that it moved nothing: its
    status word and progress as sent. Most answers move nothing, and for those no Observation
    is built; the planner has the platform read the item in full (`Platform.observe_glance`)
    only when these differ from what the task holds.
    """

    word: object
    progress: object
    wait_hint: float | None
    item: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class Upstream:
    """Where one relay lives and how to authenticate to it."""

    name: str
    base_url: str
    api_key: str = dataclasses.field(repr=False)
    #: seconds one whole request may take, body included, however slowly it trickles
    timeout: float = 30.0
    auth: str = "bearer"  #: "bearer" or "mj-api-secret"
    #: bytes of an answer read at most; a longer one is a relay error, and is not read whole
    max_response_bytes: int = config.DEFAULT_MAX_RESPONSE_BYTES

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

    async def fetch(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask the upstream about ``ids``: one clean observation per id it answered.

        Ids it leaves out are simply absent from the result; ids nobody asked about are
        dropped; an id listed twice is settled by `settle`. Raises UpstreamError (or an
        httpx.HTTPError) when the answer is unusable.
        """
        return settle(self.name, ids, await self.readable(self.ask(client, ids)))

    async def fetch_seen(
        self, client: httpx.AsyncClient, ids: Sequence[str]
    ) -> dict[str, Observation | Glance]:
        """`fetch`, by task id; a platform that glances at its items (see `Glance`) hands out
        a glance of each instead of an observation."""
        return {o.task_id: o for o in await self.fetch(client, ids)}

    def observe_glance(self, glance: Glance) -> Observation:
        """The clean observation of an item this platform glanced at (in `fetch_seen`)."""
        raise NotImplementedError(f"{type(self).__name__} does not glance at items")

    @staticmethod
    async def readable(answer: Awaitable[_T]) -> _T:
        """``answer`` awaited, where an answer shaped in a way no adapter foresaw is that
        request's problem alone: an UpstreamError like any other, never a failed drain."""
        try:
            return await answer
        except (UpstreamError, httpx.HTTPError):
            raise
        except (ValueError, TypeError, LookupError, AttributeError, RecursionError) as exc:
            raise UpstreamError(f"unreadable answer: {type(exc).__name__}: {exc}") from exc

    @abc.abstractmethod
    async def ask(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """The observations in the upstream's answer(s) about ``ids``, as it gave them.

        Raises UpstreamError when the answer is unusable.
        """

    async def send(
        self, client: httpx.AsyncClient, method: str, url: str, **kwargs: Any
    ) -> httpx.Response:
        """One request to the relay within its bounds, the answer read (see `read_bounded`)."""
        request = client.build_request(
            method, url, headers=self.upstream.headers(), timeout=self.upstream.timeout, **kwargs
        )
        return await read_bounded(
            client, request, self.upstream.timeout, self.upstream.max_response_bytes
        )

    async def post_ids(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Any]:
        """`POST {path} {"ids": [...]}` and the items of the answer (envelope or bare array)."""
        response = await self.send(
            client, "POST", self.upstream.url(self.path), json={"ids": list(ids)}
        )
        return new_api_items(read_json(response), response)

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
        return self.upstream.url(self.path.replace(TASK_ID_PLACEHOLDER, segment(task_id)))

    async def ask(self, client: httpx.AsyncClient, ids: Sequence[str]) -> list[Observation]:
        """Ask for each id in turn; any unusable answer fails the whole call."""
        observations = []
        for task_id in ids:
            response = await self.send(client, "GET", self.task_url(task_id))
            observation = self.read_one(task_id, response)
            if observation is not None:
                observations.append(observation)
        return observations

    @abc.abstractmethod
    def read_one(self, task_id: str, response: httpx.Response) -> Observation | None:
        """The observation in the answer about ``task_id``; None when the upstream has no such id.

        Raises UpstreamError when the answer is unusable.
        """
