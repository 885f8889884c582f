"""Tests for the upstream platform adapters, spoken to over real HTTP on loopback."""

from __future__ import annotations

import dataclasses
import json
import ssl
import threading
from collections.abc import AsyncIterator, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import relay_samples as samples

from tracker import config
from tracker.platforms import (
    BUILTIN,
    DEFAULT_UPSTREAM,
    STATUS_TABLES,
    Midjourney,
    NewApiBatch,
    NewApiSingle,
    Platform,
    Replicate,
    Upstream,
    UpstreamError,
    build,
)
from tracker.platforms.observations import read_progress
from tracker.status import Observation, TaskStatus
from tracker.testing.simulator import SimulatedRelay

Q, RUN, DONE, FAIL, CANCEL = (
    TaskStatus.QUEUED,
    TaskStatus.IN_PROGRESS,
    TaskStatus.COMPLETED,
    TaskStatus.FAILED,
    TaskStatus.CANCELED,
)
CANCEL_WORDS = dict.fromkeys(("CANCEL", "CANCELED", "CANCELLED", "canceled", "cancelled"), CANCEL)
NEW_API = {
    "NOT_START": Q,
    "SUBMITTED": Q,
    "QUEUED": Q,
    "IN_PROGRESS": RUN,
    "SUCCESS": DONE,
    "FAILURE": FAIL,
}
# The contract, written out independently of the code: every word each style knows.
EXPECTED_TABLES: dict[str, dict[str, TaskStatus]] = {
    "newapi-batch": {
        **NEW_API,
        **CANCEL_WORDS,
        "pending": Q,
        "queued": Q,
        "processing": RUN,
        "dreaming": RUN,
        "completed": DONE,
        "failed": FAIL,
    },
    "newapi-single": {
        **NEW_API,
        **CANCEL_WORDS,
        "queued": Q,
        "in_progress": RUN,
        "completed": DONE,
        "failed": FAIL,
        "submitted": Q,
        "processing": RUN,
        "succeed": DONE,
    },
    "midjourney": {
        "NOT_START": Q,
        "SUBMITTED": Q,
        "QUEUED": Q,
        "IN_PROGRESS": RUN,
        "MODAL": RUN,
        "SUCCESS": DONE,
        "FAILURE": FAIL,
        **CANCEL_WORDS,
    },
    "replicate": {
        "starting": Q,
        "processing": RUN,
        "succeeded": DONE,
        "failed": FAIL,
        **CANCEL_WORDS,
    },
}
UNKNOWN_WORDS = ("UNKNOWN", "unknown", "THROTTLED", "Success", "")

KEY = "sk-test-key"
VIDEO_PATH = "/v1/video/generations/{task_id}"
PREDICTION_PATH = "/v1/predictions/{task_id}"


# -- a canned relay on loopback ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorded:
    """One request the canned relay received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


class CannedRelay:
    """Serves a fixed (status, body) per request path and records every request."""

    def __init__(self) -> None:
        self.answers: dict[str, tuple[int, bytes, str]] = {}
        self.requests: list[Recorded] = []
        relay = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                """Keep the test output clean."""

            def do_GET(self) -> None:
                self._serve()

            def do_POST(self) -> None:
                self._serve()

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                relay.requests.append(
                    Recorded(
                        self.command,
                        self.path,
                        {k.lower(): v for k, v in self.headers.items()},
                        json.loads(raw) if raw else None,
                    )
                )
                status, body, content_type = relay.answers.get(
                    self.path, (501, b"no canned answer for " + self.path.encode(), "text/plain")
                )
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(
        self, path: str, body: Any, status: int = 200, content_type: str = "application/json"
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[path] = (status, raw, content_type)

    def upstream(self, *, auth: str = "bearer", key: str = KEY) -> Upstream:
        return Upstream("canned", self.base_url, key, timeout=5.0, auth=auth)


@pytest.fixture(name="relay")
def _relay() -> Iterator[CannedRelay]:
    relay = CannedRelay()
    relay.thread.start()
    yield relay
    relay.server.shutdown()
    relay.server.server_close()
    relay.thread.join()


# Building an SSL context per client costs ~50 ms; every test here speaks plain HTTP anyway.
TLS = ssl.create_default_context()


@pytest.fixture(name="client")
async def _client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(verify=TLS) as client:
        yield client


def luma(relay: CannedRelay, **kwargs: Any) -> NewApiBatch:
    return NewApiBatch(
        "luma",
        relay.upstream(**kwargs),
        "/luma/tasks",
        STATUS_TABLES["newapi-batch"],
        batch_size=100,
    )


def video(relay: CannedRelay, path: str = VIDEO_PATH) -> NewApiSingle:
    return NewApiSingle("video", relay.upstream(), path, STATUS_TABLES["newapi-single"])


def midjourney(relay: CannedRelay, **kwargs: Any) -> Midjourney:
    return Midjourney(
        "midjourney",
        relay.upstream(**kwargs),
        "/mj/task/list-by-condition",
        STATUS_TABLES["midjourney"],
        batch_size=100,
    )


def replicate(relay: CannedRelay) -> Replicate:
    return Replicate("replicate", relay.upstream(), PREDICTION_PATH, STATUS_TABLES["replicate"])


def by_id(observations: list[Observation]) -> dict[str, Observation]:
    return {o.task_id: o for o in observations}


# -- status tables ----------------------------------------------------------------------------


def test_status_tables_hold_exactly_the_documented_words() -> None:
    """Each style's table maps exactly the words the research lists, no more and no less."""
    assert {style: dict(table) for style, table in STATUS_TABLES.items()} == EXPECTED_TABLES


def serve_word(relay: CannedRelay, style: str, word: str) -> tuple[Platform, str]:
    """Put an answer carrying ``word`` on the relay; the platform to ask and the id to ask."""
    if style == "newapi-batch":
        relay.answer("/luma/tasks", samples.envelope([samples.luma_item(status=word)]))
        return luma(relay), samples.LUMA_ID
    if style == "newapi-single":
        body = samples.envelope(samples.video_dto(status=word))
        relay.answer(f"/v1/video/generations/{samples.VIDEO_ID}", body)
        return video(relay), samples.VIDEO_ID
    if style == "midjourney":
        relay.answer("/mj/task/list-by-condition", [samples.mj_task("mj-1", word, "0%")])
        return midjourney(relay), "mj-1"
    relay.answer(f"/v1/predictions/{samples.REPLICATE_ID}", samples.prediction(word))
    return replicate(relay), samples.REPLICATE_ID


@pytest.mark.parametrize(
    ("style", "word", "expected"),
    [(s, w, t) for s, table in EXPECTED_TABLES.items() for w, t in table.items()],
)
async def test_every_table_word_is_read_through_its_adapter(
    relay: CannedRelay, client: httpx.AsyncClient, style: str, word: str, expected: TaskStatus
) -> None:
    """An answer carrying a table word comes out as that word's tracker status."""
    platform, task_id = serve_word(relay, style, word)

    [observation] = await platform.fetch(client, [task_id])

    assert (observation.task_id, observation.upstream_status) == (task_id, word)
    assert observation.status == expected


@pytest.mark.parametrize(
    ("style", "word"), [(s, w) for s in EXPECTED_TABLES for w in UNKNOWN_WORDS]
)
async def test_unknown_words_are_kept_but_not_normalised(
    relay: CannedRelay, client: httpx.AsyncClient, style: str, word: str
) -> None:
    """A word outside the table gives status None (never final) and keeps the upstream word."""
    platform, task_id = serve_word(relay, style, word)

    [observation] = await platform.fetch(client, [task_id])

    assert observation.status is None
    assert observation.upstream_status == word


# -- newapi-batch -----------------------------------------------------------------------------


async def test_luma_seed_answer_is_read_and_the_request_is_the_documented_one(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """The seed page's answer gives an in-progress task; the request is POST {"ids"} + Bearer."""
    relay.answer("/luma/tasks", samples.LUMA_SEED_ANSWER)

    [observation] = await luma(relay).fetch(client, [samples.LUMA_ID, "unknown-id"])

    assert observation.task_id == samples.LUMA_ID
    assert (observation.upstream_status, observation.status) == ("IN_PROGRESS", RUN)
    assert (observation.progress, observation.upstream_progress) == (None, None)
    assert observation.fail_reason == ""
    assert observation.wait_hint is None
    assert observation.result["data"]["state"] == "processing"
    [request] = relay.requests
    assert (request.method, request.path) == ("POST", "/luma/tasks")
    assert request.body == {"ids": [samples.LUMA_ID, "unknown-id"]}
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["content-type"] == "application/json"


@pytest.mark.parametrize("iso_times", [True, False])
async def test_iso_and_integer_times_both_read(
    relay: CannedRelay, client: httpx.AsyncClient, *, iso_times: bool
) -> None:
    """created_at/updated_at as ISO strings (seed fork) or unix seconds (new-api) both work."""
    item = samples.luma_item(status="SUCCESS", iso_times=iso_times, progress="100%")
    relay.answer("/luma/tasks", samples.envelope([item]))

    [observation] = await luma(relay).fetch(client, [samples.LUMA_ID])

    assert (observation.status, observation.progress) == (DONE, 100)
    assert observation.result["created_at"] == item["created_at"]


async def test_bare_array_without_envelope_is_accepted(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A relay answering a bare array of TaskDtos (no envelope) is read the same way."""
    relay.answer("/luma/tasks", [samples.luma_item(status="FAILURE", fail_reason="nsfw prompt")])

    [observation] = await luma(relay).fetch(client, [samples.LUMA_ID])

    assert (observation.status, observation.fail_reason) == (FAIL, "nsfw prompt")


async def test_bare_array_of_raw_luma_objects_uses_their_state(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """v98store-style raw Luma objects are keyed by `id` and read by their `state`."""
    failed = {
        **samples.RAW_LUMA_OBJECT,
        "id": "luma-2",
        "state": "failed",
        "failure_reason": "400: prompt not allowed",
    }
    queued = {**samples.RAW_LUMA_OBJECT, "id": "luma-3", "state": "pending"}
    queued["estimate_wait_seconds"] = 90
    relay.answer("/luma/tasks", [samples.RAW_LUMA_OBJECT, failed, queued])

    asked = [samples.RAW_LUMA_OBJECT["id"], "luma-2", "luma-3"]
    seen = by_id(await luma(relay).fetch(client, asked))

    assert seen[samples.RAW_LUMA_OBJECT["id"]].status == DONE
    assert (seen["luma-2"].status, seen["luma-2"].fail_reason) == (FAIL, "400: prompt not allowed")
    assert (seen["luma-3"].status, seen["luma-3"].wait_hint) == (Q, 90.0)


async def test_luma_estimate_wait_seconds_becomes_the_wait_hint(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A positive `data.estimate_wait_seconds` is the wait hint; zero or junk is no hint."""
    waiting = samples.luma_item("a", "QUEUED")
    waiting["data"]["estimate_wait_seconds"] = 42
    zero = samples.luma_item("b", "QUEUED")
    zero["data"]["estimate_wait_seconds"] = 0
    junk = samples.luma_item("c", "QUEUED")
    junk["data"]["estimate_wait_seconds"] = "soon"
    relay.answer("/luma/tasks", samples.envelope([waiting, zero, junk]))

    seen = by_id(await luma(relay).fetch(client, ["a", "b", "c"]))

    assert {k: o.wait_hint for k, o in seen.items()} == {"a": 42.0, "b": None, "c": None}


async def test_suno_clip_list_does_not_override_the_top_level_status(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Suno's `data` is a list of clips; the task's own status and progress are the truth."""
    item = samples.suno_item(status="IN_PROGRESS", progress="0%", clip_status="complete")
    relay.answer("/suno/fetch", samples.envelope([item]))
    suno = NewApiBatch(
        "suno", relay.upstream(), "/suno/fetch", STATUS_TABLES["newapi-batch"], batch_size=10
    )

    [observation] = await suno.fetch(client, [samples.SUNO_ID])

    assert (observation.status, observation.progress, observation.upstream_progress) == (
        RUN,
        0,
        "0%",
    )
    assert len(observation.result["data"]) == 2
    assert relay.requests[0].path == "/suno/fetch"


async def test_one_hub_integer_progress_is_a_percentage(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """one-hub's integer progress 45 is 45%, and its text form is kept."""
    relay.answer("/suno/fetch", samples.envelope([samples.suno_item(progress=45)]))
    suno = NewApiBatch(
        "suno", relay.upstream(), "/suno/fetch", STATUS_TABLES["newapi-batch"], batch_size=10
    )

    [observation] = await suno.fetch(client, [samples.SUNO_ID])

    assert (observation.progress, observation.upstream_progress) == (45, "45")


async def test_items_missing_fields_are_skipped_or_kept_without_status(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Items without an id or not objects are skipped; an id without a status stays unknown."""
    no_status = samples.luma_item("no-status")
    del no_status["status"]
    no_id = samples.luma_item("ignored")
    del no_id["task_id"]
    del no_id["data"]
    numeric_id = {"task_id": 12345, "status": "SUCCESS"}
    answer = [no_status, no_id, "garbage", None, 7, numeric_id, {"status": "SUCCESS"}]
    relay.answer("/luma/tasks", samples.envelope(answer))

    seen = by_id(await luma(relay).fetch(client, ["no-status", "12345"]))

    assert set(seen) == {"no-status", "12345"}
    assert (seen["no-status"].status, seen["no-status"].upstream_status) == (None, "")
    assert seen["12345"].status == DONE


async def test_missing_ids_are_absent_and_order_does_not_matter(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Ids the relay leaves out are absent; answers in any order are matched by task_id."""
    items = [samples.luma_item("b", "SUCCESS"), samples.luma_item("a", "QUEUED")]
    relay.answer("/luma/tasks", samples.envelope(items))

    seen = by_id(await luma(relay).fetch(client, ["a", "b", "c"]))

    assert {k: o.status for k, o in seen.items()} == {"a": Q, "b": DONE}


async def test_null_data_means_no_tasks(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """A success envelope with `data: null` (an empty id list) gives no observations."""
    relay.answer("/luma/tasks", samples.envelope(None))

    assert await luma(relay).fetch(client, ["a"]) == []


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (200, samples.envelope(None, "fail", "upstream busy"), "code 'fail': upstream busy"),
        (200, {"code": "unauthorized", "data": None}, "no message"),
        (500, samples.envelope(None, "internal_error", "boom"), "HTTP 500"),
        (429, samples.envelope(None, "rate_limited", "slow down"), "HTTP 429"),
        (401, {"error": {"message": "invalid token"}}, "invalid token"),
        (200, b"<html>502 Bad Gateway</html>", "not JSON"),
        (200, b"", "(empty body)"),
        (200, samples.envelope("unexpected"), "'data' is str"),
        (200, samples.envelope({"task_id": "a"}), "'data' is dict"),
        (200, "just a string", "neither"),
    ],
)
async def test_unusable_batch_answers_raise_upstream_error(
    relay: CannedRelay, client: httpx.AsyncClient, status: int, body: Any, needle: str
) -> None:
    """Non-2xx, non-JSON, `code != success` and a non-list `data` are UpstreamErrors."""
    relay.answer("/luma/tasks", body, status)

    with pytest.raises(UpstreamError) as caught:
        await luma(relay).fetch(client, ["a"])

    assert needle in str(caught.value)
    assert caught.value.status_code == status


async def test_base_url_with_a_path_prefix_is_kept(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A base URL like https://relay/api/ keeps its prefix in front of the platform path."""
    relay.answer("/api/luma/tasks", samples.LUMA_SEED_ANSWER)
    upstream = Upstream("prefixed", relay.base_url + "/api/", KEY)
    platform = NewApiBatch("luma", upstream, "luma/tasks", {}, batch_size=1)

    [observation] = await platform.fetch(client, [samples.LUMA_ID])

    assert observation.task_id == samples.LUMA_ID
    assert observation.status is None  # an empty table knows no word


# -- newapi-single ----------------------------------------------------------------------------


async def test_video_task_is_fetched_with_a_get_per_id(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Each id is one GET on the path with the id filled in, authenticated with Bearer."""
    relay.answer(f"/v1/video/generations/{samples.VIDEO_ID}", samples.envelope(samples.video_dto()))
    relay.answer("/v1/video/generations/other", samples.envelope(samples.video_dto("SUCCESS")))

    seen = by_id(await video(relay).fetch(client, [samples.VIDEO_ID, "other"]))

    assert {k: o.status for k, o in seen.items()} == {samples.VIDEO_ID: RUN, "other": DONE}
    assert seen[samples.VIDEO_ID].progress == 30
    # The requested id names the task even when the DTO carries another (new-api's task_ ids).
    assert seen["other"].result["task_id"] == samples.VIDEO_ID
    assert [(r.method, r.path) for r in relay.requests] == [
        ("GET", f"/v1/video/generations/{samples.VIDEO_ID}"),
        ("GET", "/v1/video/generations/other"),
    ]
    assert {r.headers["authorization"] for r in relay.requests} == {f"Bearer {KEY}"}


async def test_task_id_is_url_quoted_in_the_path(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """An id with a slash, a space or a question mark cannot escape its path segment."""
    relay.answer("/v1/video/generations/a%2Fb%20c%3Fd", samples.envelope(samples.video_dto()))

    [observation] = await video(relay).fetch(client, ["a/b c?d"])

    assert observation.task_id == "a/b c?d"
    assert relay.requests[0].path == "/v1/video/generations/a%2Fb%20c%3Fd"


@pytest.mark.parametrize(("task_id", "segment"), [(".", "%2E"), ("..", "%2E%2E")])
async def test_a_dot_segment_id_asks_about_itself_not_the_parent_path(
    relay: CannedRelay, client: httpx.AsyncClient, task_id: str, segment: str
) -> None:
    """An id of one or two dots (stored before registration refused them) is asked about
    under its own, encoded name, never as a dot segment that would ask the parent path."""
    relay.answer(f"/v1/video/generations/{segment}", samples.envelope(samples.video_dto()))

    [observation] = await video(relay).fetch(client, [task_id])

    assert observation.task_id == task_id
    assert relay.requests[0].path == f"/v1/video/generations/{segment}"


@pytest.mark.parametrize(
    ("raw", "progress", "text"),
    [
        (0.45, 45, "0.45"),  # Runway through a relay: a fraction of one
        (1.0, 100, "1.0"),
        (0.0, 0, "0.0"),
        (45, 45, "45"),  # one-hub: an integer percentage
        (1, 1, "1"),
        (45.5, 45, "45.5"),  # a float above 1 is a percentage
        ("45%", 45, "45%"),  # new-api: the "NN%" string
        ("45", 45, "45"),
        ("", None, ""),
        (None, None, None),
        ("soon", None, "soon"),
    ],
)
async def test_video_progress_rule(
    relay: CannedRelay, client: httpx.AsyncClient, raw: Any, progress: int | None, text: str | None
) -> None:
    """Integers and strings are percentages, a float in [0, 1] is a fraction of one."""
    relay.answer(
        f"/v1/video/generations/{samples.VIDEO_ID}",
        samples.envelope(samples.video_dto(progress=raw)),
    )

    [observation] = await video(relay).fetch(client, [samples.VIDEO_ID])

    assert (observation.progress, observation.upstream_progress) == (progress, text)
    assert read_progress(raw) == (progress, text)


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, samples.TASK_NOT_EXIST),
        (404, samples.TASK_NOT_EXIST),
        (404, {"error": {"message": "Video 'gone' not found", "type": "invalid_request_error"}}),
        (200, samples.TASK_NOT_EXIST),
    ],
)
async def test_task_not_exist_means_not_found(
    relay: CannedRelay, client: httpx.AsyncClient, status: int, body: Any
) -> None:
    """new-api's 400 task_not_exist, and a 404 about the id, leave the id out (not found, not
    failed)."""
    relay.answer("/v1/video/generations/gone", body, status)
    relay.answer("/v1/video/generations/here", samples.envelope(samples.video_dto("SUCCESS")))

    observations = await video(relay).fetch(client, ["gone", "here"])

    assert [o.task_id for o in observations] == ["here"]


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (400, {"code": "invalid_request", "message": "bad id", "data": None}, "HTTP 400"),
        (429, {"error": {"message": "rate limited", "code": "429"}}, "HTTP 429"),
        (500, samples.envelope(None, "fetch_task_failed", "upstream down"), "HTTP 500"),
        (502, b"<html>Bad Gateway</html>", "Bad Gateway"),
        (200, samples.envelope(None, "fail", "upstream busy"), "upstream busy"),
        (200, samples.envelope(None), "'data' is NoneType"),
        (200, samples.envelope([samples.video_dto()]), "'data' is list"),
        (200, [samples.video_dto()], "not an object"),
        (200, b"not json", "not JSON"),
        (200, {"code": 1001, "message": "kling says no", "data": None}, "kling says no"),
        # the relay's router: no such path (a mistyped path must not fail every task)
        (404, {"error": {"message": "Invalid URL (GET /v1/x)"}}, "no such route on the relay"),
        (404, b"404 page not found", "check [platforms.video].path"),
    ],
)
async def test_unusable_single_answers_raise_upstream_error(
    relay: CannedRelay, client: httpx.AsyncClient, status: int, body: Any, needle: str
) -> None:
    """Errors (429 included: unchanged, asked again) raise UpstreamError with the HTTP status."""
    relay.answer("/v1/video/generations/t1", body, status)

    with pytest.raises(UpstreamError) as caught:
        await video(relay).fetch(client, ["t1"])

    assert needle in str(caught.value)
    assert caught.value.status_code == status


@pytest.mark.parametrize("style", ["batch", "single"])
async def test_a_relay_message_quoting_the_key_is_raised_with_the_key_redacted(
    relay: CannedRelay, client: httpx.AsyncClient, style: str
) -> None:
    """A relay's own error message (a `code` envelope, HTTP 200) that quotes the key the
    request carried is kept, the key in it redacted: these messages reach the dashboard."""
    body = {"code": "invalid_token", "message": f"token {KEY} is disabled", "data": None}
    relay.answer("/luma/tasks", body)
    relay.answer("/v1/video/generations/t1", body)
    platform = luma(relay) if style == "batch" else video(relay)

    with pytest.raises(UpstreamError) as caught:
        await platform.fetch(client, ["t1"])

    assert "code 'invalid_token': token [redacted] is disabled" == str(caught.value)


async def test_kling_failure_through_new_api(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """new-api's Kling TaskDto gives FAILURE with the relay's fail_reason."""
    relay.answer(
        f"/kling/v1/videos/text2video/{samples.KLING_ID}",
        samples.envelope(samples.kling_dto("FAILURE", "risk control")),
    )
    kling = video(relay, "/kling/v1/videos/text2video/{task_id}")

    [observation] = await kling.fetch(client, [samples.KLING_ID])

    assert (observation.status, observation.fail_reason) == (FAIL, "risk control")
    assert observation.progress == 100


async def test_one_hub_raw_kling_answer(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """one-hub's raw Kling answer (code 0) is read from task_status and task_status_msg."""
    relay.answer(f"/kling/v1/videos/image2video/{samples.KLING_ID}", samples.KLING_RAW_ANSWER)
    kling = video(relay, "/kling/v1/videos/image2video/{task_id}")

    [observation] = await kling.fetch(client, [samples.KLING_ID])

    assert (observation.upstream_status, observation.status) == ("failed", FAIL)
    assert observation.fail_reason == "Failure to pass the risk control system"
    assert observation.progress is None


async def test_openai_video_object(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """new-api's `/v1/videos/{id}` OpenAI video object is read, its error becoming the reason."""
    relay.answer(f"/v1/videos/{samples.VIDEO_ID}", samples.OPENAI_VIDEO_OBJECT)
    platform = video(relay, "/v1/videos/{task_id}")

    [observation] = await platform.fetch(client, [samples.VIDEO_ID])

    assert (observation.status, observation.progress) == (FAIL, 100)
    assert observation.fail_reason == "content policy violation"


def test_per_id_platforms_ask_one_id_and_need_the_placeholder() -> None:
    """A per-id platform always has batch_size 1 and refuses a path without {task_id}."""
    upstream = Upstream("u", "http://127.0.0.1:9", KEY)
    platform = NewApiSingle("v", upstream, VIDEO_PATH, {}, batch_size=50, rate_limit=2.0)

    assert (platform.batch_size, platform.rate_limit) == (1, 2.0)
    with pytest.raises(ValueError, match=r"\{task_id\}"):
        Replicate("r", upstream, "/v1/predictions", {})


# -- midjourney -------------------------------------------------------------------------------


async def test_midjourney_request_uses_the_mj_api_secret_header(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """An mj-api-secret upstream sends that header, no Authorization, and POSTs {"ids"}."""
    relay.answer("/mj/task/list-by-condition", samples.MJ_ANSWER)
    ids = [t["id"] for t in samples.MJ_ANSWER]

    observations = await midjourney(relay, auth="mj-api-secret").fetch(client, ids)

    assert len(observations) == len(ids)
    [request] = relay.requests
    assert (request.method, request.body) == ("POST", {"ids": ids})
    assert request.headers["mj-api-secret"] == KEY
    assert "authorization" not in request.headers


async def test_midjourney_bare_array_is_normalised(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Each MJ word maps as documented; a failure's "" progress is None with "" kept."""
    relay.answer("/mj/task/list-by-condition", samples.MJ_ANSWER)

    asked = [item["id"] for item in samples.MJ_ANSWER]
    seen = by_id(await midjourney(relay).fetch(client, asked))

    summary = {k: (o.status, o.progress, o.upstream_progress) for k, o in seen.items()}
    assert summary == {
        "14001929738841620": (DONE, 100, "100%"),
        "14001929738841621": (RUN, 45, "45%"),
        "14001929738841622": (FAIL, None, ""),
        "14001929738841623": (RUN, 0, "0%"),
        "14001929738841624": (CANCEL, 0, "0%"),
        "14001929738841625": (Q, 0, "0%"),
    }
    assert seen["14001929738841622"].fail_reason == "Banned prompt: cat"
    assert seen["14001929738841620"].fail_reason == ""  # failReason null
    assert seen["14001929738841620"].result["imageUrl"].endswith("cat.png")
    assert relay.requests[0].headers["authorization"] == f"Bearer {KEY}"


async def test_midjourney_inside_a_new_api_envelope(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """Some relays wrap the MJ array in {code, message, data}; items without an id are skipped."""
    items = [samples.mj_task("m1", "IN_PROGRESS", "10%"), {"status": "SUCCESS"}, "junk"]
    relay.answer("/mj/task/list-by-condition", samples.envelope(items))

    [observation] = await midjourney(relay).fetch(client, ["m1"])

    assert (observation.task_id, observation.status, observation.progress) == ("m1", RUN, 10)


async def test_midjourney_error_answer(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """A 401 from the proxy is an UpstreamError carrying its status and message."""
    relay.answer("/mj/task/list-by-condition", {"error": "Unauthorized"}, 401)

    with pytest.raises(UpstreamError, match="Unauthorized") as caught:
        await midjourney(relay).fetch(client, ["m1"])

    assert caught.value.status_code == 401


# -- replicate --------------------------------------------------------------------------------


async def test_replicate_prediction_is_fetched_with_bearer(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A succeeded prediction is completed, has no progress, and is kept as the result."""
    output = ["https://replicate.delivery/xezq/output.mp4"]
    relay.answer(
        f"/v1/predictions/{samples.REPLICATE_ID}",
        samples.prediction("succeeded", output=output, completed_at="2024-11-23T08:14:01Z"),
    )

    [observation] = await replicate(relay).fetch(client, [samples.REPLICATE_ID])

    assert (observation.status, observation.progress, observation.upstream_progress) == (
        DONE,
        None,
        None,
    )
    assert observation.result["output"] == output
    [request] = relay.requests
    assert (request.method, request.path) == ("GET", f"/v1/predictions/{samples.REPLICATE_ID}")
    assert request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("CUDA out of memory", "CUDA out of memory"),
        ({"message": "NSFW content detected", "code": "E005"}, "NSFW content detected"),
        ({"detail": "Prediction interrupted"}, "Prediction interrupted"),
        ({"code": "E999"}, '{"code":"E999"}'),
        (None, ""),
    ],
)
async def test_replicate_error_becomes_the_fail_reason(
    relay: CannedRelay, client: httpx.AsyncClient, error: Any, reason: str
) -> None:
    """`error` as a string or an object becomes fail_reason text."""
    relay.answer(
        f"/v1/predictions/{samples.REPLICATE_ID}", samples.prediction("failed", error=error)
    )

    [observation] = await replicate(relay).fetch(client, [samples.REPLICATE_ID])

    assert (observation.status, observation.fail_reason) == (FAIL, reason)


async def test_replicate_numeric_progress_is_read(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A numeric `progress` a relay adds is read; a non-numeric one is ignored."""
    relay.answer("/v1/predictions/a", samples.prediction("processing", progress=0.25))
    relay.answer("/v1/predictions/b", samples.prediction("processing", progress="25%"))

    seen = by_id(await replicate(relay).fetch(client, ["a", "b"]))

    assert (seen["a"].progress, seen["b"].progress) == (25, None)


async def test_replicate_404_means_not_found(relay: CannedRelay, client: httpx.AsyncClient) -> None:
    """Replicate's 404 {"detail": "Not found."} leaves the id out."""
    relay.answer("/v1/predictions/gone", {"detail": "Not found."}, 404)

    assert await replicate(relay).fetch(client, ["gone"]) == []


@pytest.mark.parametrize(
    ("status", "body", "needle"),
    [
        (401, {"detail": "Invalid token.", "status": 401}, "HTTP 401"),
        (429, {"detail": "Request was throttled.", "status": 429}, "HTTP 429"),
        (500, b"Internal Server Error", "HTTP 500"),
        (200, ["not", "a", "prediction"], "not a prediction"),
        (200, samples.envelope(None, "fail", "busy"), "no prediction status"),
        (200, b"<html></html>", "not JSON"),
    ],
)
async def test_unusable_replicate_answers_raise_upstream_error(
    relay: CannedRelay, client: httpx.AsyncClient, status: int, body: Any, needle: str
) -> None:
    """Error statuses and answers that are not a prediction raise UpstreamError."""
    relay.answer("/v1/predictions/p1", body, status)

    with pytest.raises(UpstreamError) as caught:
        await replicate(relay).fetch(client, ["p1"])

    assert needle in str(caught.value)
    assert caught.value.status_code == status


# -- build() ----------------------------------------------------------------------------------


def settings(**extra: Any) -> config.Settings:
    raw: dict[str, Any] = {
        "upstream": {"base_url": "https://relay.example/", "api_key": "sk-main"},
        "webhooks": {"secret": "whsec_dGVzdA=="},
        **extra,
    }
    return config.parse(raw, environ={})


def test_build_without_platform_sections_gives_every_builtin() -> None:
    """With no [platforms] the six built-ins exist with their style, path and the main relay."""
    platforms = build(settings(poll={"batch_size": 250}))

    assert {name: (p.style, p.path) for name, p in platforms.items()} == dict(BUILTIN)
    assert {name: p.batch_size for name, p in platforms.items()} == {
        "luma": 250,
        "suno": 250,
        "midjourney": 250,
        "video": 1,
        "kling": 1,
        "replicate": 1,
    }
    luma_platform = platforms["luma"]
    assert isinstance(luma_platform, NewApiBatch)
    assert luma_platform.upstream == Upstream(DEFAULT_UPSTREAM, "https://relay.example/", "sk-main")
    assert luma_platform.rate_limit is None
    assert luma_platform.statuses == STATUS_TABLES["newapi-batch"]
    assert isinstance(platforms["midjourney"], Midjourney)
    assert isinstance(platforms["kling"], NewApiSingle)
    assert isinstance(platforms["replicate"], Replicate)
    assert "sk-main" not in repr(luma_platform)


def test_build_overrides_a_builtin_and_layers_statuses() -> None:
    """A section named like a built-in overrides only what it sets; statuses layer on top."""
    platforms = build(
        settings(
            platforms={
                "luma": {
                    "path": "/rix/luma/tasks",
                    "batch_size": 20,
                    "rate_limit": 2.5,
                    "statuses": {"UNKNOWN": "failed", "QUEUED": "in_progress"},
                },
                "kling": {"batch_size": 50},
            }
        )
    )

    luma_platform = platforms["luma"]
    assert (luma_platform.style, luma_platform.path) == ("newapi-batch", "/rix/luma/tasks")
    assert (luma_platform.batch_size, luma_platform.rate_limit) == (20, 2.5)
    assert luma_platform.statuses["UNKNOWN"] == FAIL
    assert luma_platform.statuses["QUEUED"] == RUN
    assert luma_platform.statuses["SUCCESS"] == DONE
    assert STATUS_TABLES["newapi-batch"]["QUEUED"] == Q  # the style's own table is untouched
    assert platforms["suno"].statuses == STATUS_TABLES["newapi-batch"]
    assert platforms["kling"].batch_size == 1  # per-id, whatever the section says


def test_build_custom_platform_on_a_named_upstream() -> None:
    """A new [platforms.NAME] with style and path uses its [upstreams.NAME] relay and auth."""
    platforms = build(
        settings(
            upstreams={
                "mjproxy": {
                    "base_url": "http://127.0.0.1:8080",
                    "api_key": "mj-secret",
                    "auth": "mj-api-secret",
                    "timeout": 7.5,
                }
            },
            platforms={
                "mj-direct": {
                    "style": "midjourney",
                    "path": "/mj/task/list-by-ids",
                    "upstream": "mjproxy",
                },
                "kling-i2v": {
                    "style": "newapi-single",
                    "path": "/kling/v1/videos/image2video/{task_id}",
                },
            },
        )
    )

    assert len(platforms) == len(BUILTIN) + 2
    direct = platforms["mj-direct"]
    assert isinstance(direct, Midjourney)
    assert direct.upstream == Upstream(
        "mjproxy", "http://127.0.0.1:8080", "mj-secret", 7.5, "mj-api-secret"
    )
    assert direct.upstream.headers() == {"mj-api-secret": "mj-secret"}
    assert direct.batch_size == 100
    i2v = platforms["kling-i2v"]
    assert isinstance(i2v, NewApiSingle)
    assert i2v.upstream.name == DEFAULT_UPSTREAM
    assert i2v.statuses == STATUS_TABLES["newapi-single"]


@pytest.mark.parametrize(
    ("section", "missing"),
    [
        ({"path": "/x"}, ["platforms.custom.style"]),
        ({"style": "replicate"}, ["platforms.custom.path"]),
        ({}, ["platforms.custom.style", "platforms.custom.path"]),
    ],
)
def test_build_refuses_a_new_platform_without_style_or_path(
    section: dict[str, Any], missing: list[str]
) -> None:
    """A platform that is not built in needs both style and path; the error names the key."""
    with pytest.raises(ValueError, match="not a built-in platform") as caught:
        build(settings(platforms={"custom": section}))

    for key in missing:
        assert key in str(caught.value)


@pytest.mark.parametrize(
    "platforms",
    [
        {"custom": {"style": "newapi-single", "path": "/v1/video/generations"}},
        {"video": {"path": "/v1/video/generations"}},
        {"luma": {"style": "replicate"}},
    ],
)
def test_build_refuses_a_per_id_path_without_placeholder(platforms: dict[str, Any]) -> None:
    """A per-id style whose path has no {task_id} is refused, naming platforms.NAME.path."""
    name = next(iter(platforms))

    with pytest.raises(ValueError, match=rf"platforms\.{name}\.path must contain \{{task_id\}}"):
        build(settings(platforms=platforms))


async def test_built_platform_talks_to_its_named_upstream(
    relay: CannedRelay, client: httpx.AsyncClient
) -> None:
    """A built platform sends its requests to the chosen relay with that relay's key."""
    relay.answer("/mj/task/list-by-condition", samples.MJ_ANSWER[:1])
    platforms = build(
        settings(
            upstreams={
                "canned": {"base_url": relay.base_url, "api_key": "sk-other", "auth": "bearer"}
            },
            platforms={"midjourney": {"upstream": "canned"}},
        )
    )

    [observation] = await platforms["midjourney"].fetch(client, ["14001929738841620"])

    assert observation.status == DONE
    assert relay.requests[0].headers["authorization"] == "Bearer sk-other"


# -- against the simulated relay --------------------------------------------------------------

FAMILIES = ("luma", "suno", "midjourney", "video", "kling", "replicate")


def sim_platforms(base_url: str, **upstream: Any) -> Mapping[str, Platform]:
    return build(settings(upstream={"base_url": base_url, "api_key": "sk-sim", **upstream}))


@pytest.mark.parametrize("family", FAMILIES)
async def test_simulated_relay_finished_tasks(client: httpx.AsyncClient, family: str) -> None:
    """Against the simulator every built-in reads a finished success and failure correctly."""
    with SimulatedRelay(step=0.0) as sim:
        platform = sim_platforms(sim.base_url)[family]
        seen = by_id(await platform.fetch(client, ["ok-1"]))
        seen |= by_id(await platform.fetch(client, ["fail-1"]))

    # Replicate reports no progress; completion alone says 100 in the poller.
    assert (seen["ok-1"].status, seen["ok-1"].progress) == (
        DONE,
        None if family == "replicate" else 100,
    )
    assert seen["fail-1"].status == FAIL
    assert seen["fail-1"].fail_reason == "simulated failure of fail-1"
    if family == "midjourney":
        assert (seen["fail-1"].progress, seen["fail-1"].upstream_progress) == (None, "")


@pytest.mark.parametrize("family", FAMILIES)
async def test_simulated_relay_new_and_hidden_tasks(client: httpx.AsyncClient, family: str) -> None:
    """A fresh task is queued, and an id the relay hides is absent, for every built-in."""
    with SimulatedRelay(step=60.0) as sim:
        sim.hide(family, "hidden")
        platform = sim_platforms(sim.base_url)[family]
        seen = by_id(await platform.fetch(client, ["new", "hidden"]))

    assert set(seen) == {"new"}
    assert seen["new"].status == Q


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("fault", "code"),
    [
        ("http_500", 500),
        ("http_429", 429),
        ("bad_json", 200),
        ("code_error", 200),
        ("wrong_shape", 200),
    ],
)
async def test_simulated_relay_faults_raise_upstream_error(
    client: httpx.AsyncClient, family: str, fault: str, code: int
) -> None:
    """The simulator's injected faults surface as UpstreamError from every built-in."""
    with SimulatedRelay(step=0.0) as sim:
        platform = sim_platforms(sim.base_url)[family]
        sim.fail_next(fault)
        with pytest.raises(UpstreamError) as caught:
            await platform.fetch(client, ["t1"])

    assert caught.value.status_code == code


@pytest.mark.parametrize(("bare", "int_times"), [(True, False), (False, True), (True, True)])
async def test_simulated_luma_variants(
    client: httpx.AsyncClient, *, bare: bool, int_times: bool
) -> None:
    """The simulator's bare-array and integer-time Luma answers read like the seed shape."""
    with SimulatedRelay(step=0.0) as sim:
        sim.luma_bare_array, sim.luma_int_times = bare, int_times
        [observation] = await sim_platforms(sim.base_url)["luma"].fetch(client, ["ok-1"])

    assert observation.status == DONE
    assert isinstance(observation.result["created_at"], int) is int_times


async def test_simulated_midjourney_with_mj_api_secret(client: httpx.AsyncClient) -> None:
    """The simulator accepts the mj-api-secret header that an mj-api-secret upstream sends."""
    with SimulatedRelay(step=0.0) as sim:
        platform = sim_platforms(sim.base_url, auth="mj-api-secret")["midjourney"]
        [observation] = await platform.fetch(client, ["ok-1"])
        [request] = sim.requests

    assert observation.status == DONE
    assert request.headers["mj-api-secret"] == "sk-sim"
    assert "authorization" not in request.headers
