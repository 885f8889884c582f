"""The one interface every upstream platform adapter implements, and what adapters share."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import functools
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, ClassVar, cast
from urllib.parse import quote

import httpx
import structlog

from tracker import config, sanitize, status
from tracker.status import Observation, TaskStatus

log = structlog.get_logger("tracker.platforms")

#: ids named in one log line about an odd answer (duplicates, unasked ids)
LOGGED_IDS = 5

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
        try:
            observations = await self.ask(client, ids)
        except (UpstreamError, httpx.HTTPError):
            raise
        except (ValueError, TypeError, LookupError, AttributeError, RecursionError) as exc:
            # An answer shaped in a way no adapter foresaw is that request's problem alone: a
            # relay error like any other, never a failed cycle.
            raise UpstreamError(f"unreadable answer: {type(exc).__name__}: {exc}") from exc
        return settle(self.name, ids, observations)

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


async def read_bounded(
    client: httpx.AsyncClient, request: httpx.Request, deadline: float, max_bytes: int
) -> httpx.Response:
    """Send ``request`` and read its answer, all within ``deadline`` seconds and ``max_bytes``.

    httpx's own timeouts bound each read, so a body trickled a byte at a time would never
    time out; this bounds the whole exchange (httpx.ReadTimeout when it runs out). An answer
    declaring more than ``max_bytes`` is refused before its body is read, and one that turns
    out longer is cut off there (UpstreamError either way), so memory stays bounded too.
    """
    try:
        async with asyncio.timeout(deadline):
            response = await client.send(request, stream=True)
            try:
                body = await _read_limited(response, max_bytes)
            finally:
                await response.aclose()
    except TimeoutError:
        raise httpx.ReadTimeout(f"no whole answer within {deadline:g} s", request=request) from None
    # The body is decoded already; the rebuilt response must not decode it again.
    headers = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in {"content-encoding", "content-length", "transfer-encoding"}
    ]
    return httpx.Response(response.status_code, headers=headers, content=body, request=request)


async def _read_limited(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UpstreamError(
            f"answer of {int(declared)} bytes is over the {max_bytes} byte limit",
            status_code=response.status_code,
        )
    body = bytearray()
    # aiter_bytes is an async generator (typed as a plain iterator); close it, do not leave it
    # to the garbage collector.
    chunks = cast("AsyncGenerator[bytes, None]", response.aiter_bytes())
    async with contextlib.aclosing(chunks) as stream:
        async for chunk in stream:
            body += chunk
            if len(body) > max_bytes:
                raise UpstreamError(
                    f"answer is over the {max_bytes} byte limit (cut off unread)",
                    status_code=response.status_code,
                )
    return bytes(body)


#: answer items read between two yields to the event loop: a 1,000-item answer read in one go
#: would hold up the API's requests on the same loop for tens of milliseconds
READ_CHUNK = 100


async def pause_every(count: int) -> None:
    """Yield to the event loop before every READ_CHUNK-th item (and right after the decode)."""
    if count % READ_CHUNK == 0:
        await asyncio.sleep(0)


def read_json(response: httpx.Response) -> Any:
    """The decoded, cleaned JSON body of a 2xx answer, or UpstreamError saying what came back.

    A body whose Content-Type says it is something else (text/plain, text/html) is not read
    as JSON; nor is one that is not strict JSON (see `sanitize.loads`).
    """
    if not response.is_success:
        raise UpstreamError(
            f"HTTP {response.status_code}: {excerpt(response)}", status_code=response.status_code
        )
    media_type = _media_type(response)
    if media_type and "json" not in media_type:
        raise UpstreamError(
            f"answer is not JSON but {media_type}: {excerpt(response)}",
            status_code=response.status_code,
        )
    try:
        return sanitize.loads(response.content)
    except sanitize.BadJSONError as exc:
        raise UpstreamError(
            f"answer is not JSON ({exc}): {excerpt(response)}", status_code=response.status_code
        ) from None


def try_json(response: httpx.Response) -> Any:
    """The decoded, cleaned JSON body whatever the HTTP status, None when it is not JSON."""
    media_type = _media_type(response)
    if media_type and "json" not in media_type:
        return None
    try:
        return sanitize.loads(response.content)
    except sanitize.BadJSONError:
        return None


def _media_type(response: httpx.Response) -> str:
    declared: str = response.headers.get("content-type", "")
    return declared.split(";", 1)[0].strip().lower()


def excerpt(response: httpx.Response) -> str:
    """The start of an answer for log lines, with the key the request carried redacted."""
    text = sanitize.excerpt(response.content, _request_secrets(response))
    return text if text else "(empty body)"


def _request_secrets(response: httpx.Response) -> list[str]:
    # A relay that echoes the request (some error pages do) echoes its key.
    try:
        headers = response.request.headers
    except RuntimeError:  # a response built without its request
        return []
    found = [headers.get("mj-api-secret", "")]
    authorization = headers.get("authorization", "")
    found.append(authorization.removeprefix("Bearer ").removeprefix("bearer "))
    return [secret for secret in found if secret]


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
    return dataclasses.replace(
        observation,
        upstream_status=sanitize.clean_text(observation.upstream_status, sanitize.MAX_WORD),
        upstream_progress=sanitize.clean_optional(observation.upstream_progress, sanitize.MAX_WORD),
        fail_reason=sanitize.clean_text(observation.fail_reason, sanitize.MAX_REASON),
        # Kept as it is: items come from sanitize.loads, whose answer is clean already.
        result=dict(observation.result),
    )


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
