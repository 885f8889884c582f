"""The API's edge over a real daemon on loopback: strict JSON in and out, bounded bodies,
parsed and range-checked numbers, ids and tokens, one error shape, and the deliveries route.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
import sqlalchemy as sa
from conftest import base_config, merge
from test_api import TOKEN, Api

from tracker import config
from tracker.app import Daemon
from tracker.store import Registration

REGISTRATION = b'{"platform": "luma", "ids": ["a"], "metadata": {"x": %s}}'


# One daemon for the module: each case here either stores nothing or uses its own ids.
pytestmark = pytest.mark.asyncio(loop_scope="module")


async def started(directory: Path, overrides: dict[str, Any]) -> Api:
    """A daemon over its own SQLite file with an unreachable relay, and a client."""
    database = f"sqlite:///{directory / 'tracker.db'}"
    document = base_config("http://127.0.0.1:9", "http://127.0.0.1:9/hook", database)
    overrides = {"poll": {"interval": 3600}, **overrides}
    daemon = Daemon(config.parse(merge(document, overrides), environ={}))
    await daemon.start()
    return Api(daemon, httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}"))


@pytest_asyncio.fixture(name="api", scope="module", loop_scope="module")
async def _api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Api]:
    api = await started(tmp_path_factory.mktemp("api"), {})
    yield api
    await api.client.aclose()
    await api.daemon.stop()


@pytest_asyncio.fixture(name="api_for", loop_scope="module")
async def _api_for(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    apis: list[Api] = []

    async def start(**overrides: Any) -> Api:
        directory = tmp_path / str(len(apis))
        directory.mkdir()
        apis.append(await started(directory, overrides))
        return apis[-1]

    yield start
    for api in apis:
        await api.client.aclose()
        await api.daemon.stop()


async def task_count(api: Api) -> int:
    """How many tasks the daemon stores."""
    return len((await api.get("/v1/tasks", params={"limit": "1000"})).json()["tasks"])


def strict_loads(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as a strict client would."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    return json.loads(text, parse_constant=refuse)


async def post(api: Api, path: str, body: bytes, **headers: str) -> httpx.Response:
    return await api.client.post(path, content=body, headers={**TOKEN, **headers})


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (REGISTRATION % b"NaN", "body: NaN is not a JSON number"),
        (REGISTRATION % b"Infinity", "body: Infinity is not a JSON number"),
        (REGISTRATION % b"-Infinity", "body: -Infinity is not a JSON number"),
        (REGISTRATION % b"1e400", "body: holds a number out of the range of a 64-bit float"),
        # an integer literal past a float's range (a JSON reader in another language would
        # take it for infinity, or refuse the webhook body carrying it)
        (REGISTRATION % (b"1" + b"0" * 400), "body: holds a number out of the range of a 64"),
        (REGISTRATION % (b"-1" + b"0" * 400), "body: holds a number out of the range of a 64"),
        (REGISTRATION % (b"9" * 5000), "body: holds a number too long to read"),
        (REGISTRATION % b'"\\ud800"', "body: holds a lone UTF-16 surrogate"),
        (REGISTRATION % b'{"\\udfff": 1}', "body: holds a lone UTF-16 surrogate"),
        (REGISTRATION % b'"caf\xe9"', "body: not valid UTF-8 at byte"),
        (REGISTRATION % (b"[" * 40 + b"]" * 40), "body: nested more than 32 levels deep"),
        (b"[" * 100_000 + b"]" * 100_000, "body: nested more than 32 levels deep"),
        (REGISTRATION % b"tru", "body: not valid JSON"),
    ],
)
async def test_bodies_that_are_not_strict_json_are_refused_and_nothing_is_stored(
    api: Api, body: bytes, problem: str
) -> None:
    """NaN, Infinity, huge numbers, lone surrogates, bad UTF-8 and deep nesting answer 422."""
    before = await task_count(api)
    answer = await post(api, "/v1/tasks", body, **{"Content-Type": "application/json"})

    assert 422 == answer.status_code
    assert answer.json()["problems"][0].startswith(problem), answer.json()
    assert before == await task_count(api)


async def test_a_valid_pair_of_surrogates_is_text_and_is_kept(api: Api) -> None:
    """An escaped surrogate pair is one character outside the BMP, stored and shown as such."""
    body = b'{"platform": "luma", "ids": ["pair"], "metadata": {"x": "\\ud83d\\ude00"}}'
    answer = await post(api, "/v1/tasks", body)

    assert 201 == answer.status_code
    assert {"x": "\U0001f600"} == (await api.get("/v1/tasks/luma/pair")).json()["metadata"]


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_body_that_is_not_sent_as_json_is_415(api: Api, content_type: str) -> None:
    """A declared content type other than JSON is refused, naming the type; nothing stored."""
    body = b'{"platform": "luma", "ids": ["plain"]}'
    answer = await post(api, "/v1/tasks", body, **{"Content-Type": content_type})

    assert 415 == answer.status_code
    assert content_type in answer.json()["error"]
    assert 404 == (await api.get("/v1/tasks/luma/plain")).status_code


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "application/x+json"]
)
async def test_json_content_types_are_taken(api: Api, content_type: str) -> None:
    """application/json, with a charset or as a +json type, registers."""
    body = json.dumps({"platform": "luma", "ids": [content_type]}).encode()
    answer = await post(api, "/v1/tasks", body, **{"Content-Type": content_type})

    assert 201 == answer.status_code


async def test_a_body_over_the_cap_is_413_whether_declared_or_streamed(
    api_for: Callable[..., Any],
) -> None:
    """[server].max_body_bytes bounds a body by its Content-Length and while it streams."""
    api = await api_for(server={"max_body_bytes": 2048})
    body = json.dumps({"platform": "luma", "ids": [f"id{n}" for n in range(400)]}).encode()

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    declared = await post(api, "/v1/tasks", body)
    streamed = await api.client.post("/v1/tasks", content=chunks(), headers=TOKEN)

    assert (413, 413) == (declared.status_code, streamed.status_code)
    assert "max_body_bytes" in declared.json()["error"]
    assert [] == (await api.get("/v1/tasks")).json()["tasks"]
    small = await post(api, "/v1/tasks", b'{"platform": "luma", "ids": ["a"]}')
    assert 201 == small.status_code


@pytest.mark.parametrize(
    ("path", "params", "problem"),
    [
        ("/v1/tasks", {"limit": "\u00b2"}, "limit: must be an integer from 1 to 1000"),
        ("/v1/tasks", {"limit": "1001"}, "limit: must be an integer from 1 to 1000"),
        ("/v1/tasks", {"limit": "9" * 30}, "limit: must be an integer from 1 to 1000"),
        ("/v1/tasks", {"limit": "abc"}, "limit: must be an integer from 1 to 1000"),
        ("/v1/tasks", {"cursor": "9" * 30}, "cursor: must be a next_cursor value"),
        ("/v1/tasks", {"cursor": "-1"}, "cursor: must be a next_cursor value"),
        ("/v1/tasks", {"cursor": "\u0661\u0662"}, "cursor: must be a next_cursor value"),
        ("/v1/tasks", {"status": "bogus"}, "status: must be one of ['canceled', "),
        ("/v1/deliveries", {"cursor": "9" * 30}, "cursor: must be a next_cursor value"),
        ("/v1/deliveries", {"limit": "\u00b2"}, "limit: must be an integer from 1 to 1000"),
        ("/v1/deliveries", {"state": "lost"}, "state: must be one of"),
    ],
)
async def test_query_numbers_are_parsed_and_range_checked(
    api: Api, path: str, params: dict[str, str], problem: str
) -> None:
    """A listing parameter out of its range or not a number answers 422 naming it."""
    answer = await api.get(path, params=params)

    assert 422 == answer.status_code
    assert {"error", "problems"} == set(answer.json())
    assert answer.json()["problems"][0].startswith(problem), answer.json()


async def test_blank_listing_parameters_mean_the_default(api: Api) -> None:
    """?limit=&cursor=&status= lists as if they were absent."""
    await api.register(ids=["blank"])
    answer = await api.get("/v1/tasks", params={"limit": "", "cursor": "", "status": ""})

    assert 200 == answer.status_code
    assert "blank" in [t["task_id"] for t in answer.json()["tasks"]]


@pytest.mark.parametrize(
    "delivery_id", ["9" * 30, str(2**31), "\u00b2", "-1", "0", "1" * 5000, "x"]
)
async def test_a_delivery_id_that_cannot_exist_is_404_naming_it(api: Api, delivery_id: str) -> None:
    """Redeliver takes ids from 1 to 2^31-1; anything else names no delivery."""
    answer = await api.client.post(f"/v1/deliveries/{delivery_id}/redeliver", headers=TOKEN)

    assert 404 == answer.status_code
    assert answer.json()["error"].startswith("no delivery")


@pytest.mark.parametrize(
    "since",
    [
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-01:00",
        "1969-12-31T23:59:59Z",
        "2026-11-25T10:00:00",
        "yesterday",
        12345,
        None,
    ],
)
async def test_recover_checks_its_window(api: Api, since: object) -> None:
    """since must be a zoned ISO 8601 time within years 1970-9999 UTC; else 422 naming it."""
    answer = await api.client.post("/v1/deliveries/recover", json={"since": since}, headers=TOKEN)

    assert 422 == answer.status_code
    assert answer.json()["problems"][0].startswith("since: must"), answer.json()


async def test_a_token_with_other_than_ascii_is_compared_not_crashed_on(
    api_for: Callable[..., Any],
) -> None:
    """A non-ASCII bearer token answers 401 when wrong and 200 when it is the configured one."""
    api = await api_for(server={"api_tokens": ["t\u00f6k\u00e9n-1"], "metrics_require_auth": True})

    def bearer(token: str) -> dict[str, bytes]:
        return {"Authorization": b"Bearer " + token.encode()}

    for path in ("/v1/tasks", "/metrics", "/openapi.json"):
        wrong = await api.client.get(path, headers=bearer("\u00fc\u00f1\u00ee"))
        right = await api.client.get(path, headers=bearer("t\u00f6k\u00e9n-1"))
        assert (401, 200) == (wrong.status_code, right.status_code), path
        assert "Bearer" == wrong.headers["www-authenticate"]


async def test_a_task_id_ending_in_deliveries_is_reachable(api: Api) -> None:
    """A literal /deliveries suffix lists a task's deliveries; with the slash encoded as %2F
    it is part of the id, so both tasks stay reachable.
    """
    await api.register(ids=["x", "x/deliveries", "y/deliveries"])

    own = await api.get("/v1/tasks/luma/x%2Fdeliveries")
    listed = await api.get("/v1/tasks/luma/x/deliveries")
    only_suffixed = await api.get("/v1/tasks/luma/y/deliveries")

    assert (200, "x/deliveries") == (own.status_code, own.json()["task_id"])
    assert {"deliveries": []} == listed.json()
    assert 404 == only_suffixed.status_code  # the deliveries of a task "y", which is unknown
    gone = await api.client.delete("/v1/tasks/luma/x%2Fdeliveries", headers=TOKEN)
    assert 204 == gone.status_code
    assert 404 == (await api.get("/v1/tasks/luma/x%2Fdeliveries")).status_code


async def test_every_error_has_the_api_shape(api: Api) -> None:
    """Unmatched routes and methods answer {"error"} like the API's own errors, never
    {"detail"}; under /v1/ a caller without the token learns nothing.
    """
    unknown = await api.client.get("/nope")
    wrong_method = await api.client.put("/v1/tasks", headers=TOKEN)
    unknown_v1 = await api.get("/v1/nope")
    anonymous_v1 = await api.client.get("/v1/nope")

    assert (404, ["error"]) == (unknown.status_code, list(unknown.json()))
    assert (405, ["error"]) == (wrong_method.status_code, list(wrong_method.json()))
    assert "POST" in wrong_method.headers["allow"]
    assert (404, ["error"]) == (unknown_v1.status_code, list(unknown_v1.json()))
    assert 401 == anonymous_v1.status_code


async def test_a_slash_too_many_or_too_few_is_an_error_not_a_redirect(api: Api) -> None:
    """A path that differs from a route by a trailing slash gets the API's errors: a 404, and
    under /v1/ a 401 without the token. (It was a bare 307 to the other spelling, answered
    before the token was looked at: a caller without one learnt which routes exist.)"""
    anonymous = [await api.client.get(p) for p in ("/v1/tasks/", "/v1/deliveries/")]
    with_token = await api.get("/v1/deliveries/")
    health = await api.client.get("/healthz/")

    assert [401, 401] == [a.status_code for a in anonymous]
    assert (404, ["error"]) == (with_token.status_code, list(with_token.json()))
    assert (404, ["error"]) == (health.status_code, list(health.json()))


async def test_a_405_names_every_method_the_path_takes(api: Api) -> None:
    """A wrong method's Allow header lists every method the path takes, though each is a route
    of its own (RFC 9110), and a caller without the token still learns nothing under /v1/."""
    on_task = await api.client.put("/v1/tasks/luma/x", headers=TOKEN)
    on_list = await api.client.patch("/v1/tasks", headers=TOKEN)
    on_health = await api.client.post("/healthz")
    anonymous = await api.client.put("/v1/tasks/luma/x")

    assert (405, "GET, HEAD, DELETE") == (on_task.status_code, on_task.headers["allow"])
    assert (405, "GET, HEAD, POST") == (on_list.status_code, on_list.headers["allow"])
    assert (405, "GET, HEAD") == (on_health.status_code, on_health.headers["allow"])
    assert (401, None) == (anonymous.status_code, anonymous.headers.get("allow"))


async def test_head_is_answered_wherever_get_is_without_a_body(api: Api) -> None:
    """HEAD (an uptime monitor's probe) gets GET's status and headers and no body, behind the
    same token; on a path without GET it is refused like any other method."""
    await api.register(ids=["headed"])
    health = await api.client.head("/healthz")
    got = await api.client.get("/healthz")
    task = await api.client.head("/v1/tasks/luma/headed", headers=TOKEN)
    anonymous = await api.client.head("/v1/tasks/luma/headed")
    unknown = await api.client.head("/v1/tasks/luma/nobody", headers=TOKEN)
    post_only = await api.client.head("/v1/deliveries/recover", headers=TOKEN)

    assert (200, b"") == (health.status_code, health.content)
    assert (200, b"") == (task.status_code, task.content)
    assert got.headers["content-length"] == health.headers["content-length"] != "0"
    assert got.headers["content-type"] == health.headers["content-type"]
    assert (401, b"") == (anonymous.status_code, anonymous.content)
    assert (404, b"") == (unknown.status_code, unknown.content)
    assert (405, b"", "POST") == (
        post_only.status_code,
        post_only.content,
        post_only.headers["allow"],
    )


async def test_values_stored_before_the_edge_was_strict_are_shown_as_strict_json(
    api: Api,
) -> None:
    """A NaN or a lone surrogate already in the database is answered as null and U+FFFD,
    in the task and in the listing, rather than failing the request.
    """
    api.daemon.parts.store.register(Registration(platform="luma", ids=["old"]), datetime.now(UTC))
    with api.daemon.parts.store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE tasks SET metadata = :m WHERE task_id = 'old'"),
            {"m": '{"nan": NaN, "text": "\\ud800"}'},
        )

    one = await api.get("/v1/tasks/luma/old")
    listed = await api.get("/v1/tasks", params={"limit": "1"})

    assert 200 == one.status_code
    assert {"nan": None, "text": "\ufffd"} == strict_loads(one.text)["metadata"]
    assert 200 == listed.status_code
    assert {"nan": None, "text": "\ufffd"} == strict_loads(listed.text)["tasks"][0]["metadata"]


@pytest.mark.postgres
async def test_values_postgresql_would_refuse_are_answered_without_asking_it(
    api_for: Callable[..., Any], make_pg_url: Callable[[], str]
) -> None:
    """PostgreSQL refuses NUL in text parameters and ids beyond its 32-bit INTEGER; the API
    answers 404, 422 or an empty page without a query, and a NUL inside metadata is kept as
    JSON's \\u0000.
    """
    api = await api_for(database={"url": make_pg_url()})
    largest = await api.get("/v1/deliveries", params={"cursor": str(2**31 - 1)})
    beyond = await api.get("/v1/tasks", params={"cursor": str(2**31)})
    redeliver = await api.client.post(f"/v1/deliveries/{2**31}/redeliver", headers=TOKEN)
    assert (200, 422, 404) == (largest.status_code, beyond.status_code, redeliver.status_code)

    for path in ("/v1/tasks/luma/a%00b", "/v1/tasks/lu%00ma/a", "/v1/tasks/luma/a%00b/deliveries"):
        assert 404 == (await api.get(path)).status_code, path
    assert 404 == (await api.client.delete("/v1/tasks/luma/a%00b", headers=TOKEN)).status_code
    listed = await api.get("/v1/tasks", params={"platform": "lu\x00ma"})
    assert (200, []) == (listed.status_code, listed.json()["tasks"])
    registered = await api.register(ids=["nul"], metadata={"k": "a\x00b"})
    assert 201 == registered.status_code
    assert {"k": "a\x00b"} == (await api.get("/v1/tasks/luma/nul")).json()["metadata"]


# -- an open API (no token) and web pages -------------------------------------------------------

#: what a browser adds to a request a page on another site makes (a form post, a fetch)
CROSS_SITE = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}


async def test_with_no_token_programs_are_served_and_web_pages_are_refused(
    api_for: Callable[..., Any],
) -> None:
    """An open API on loopback: a program (no Origin, a loopback Host) registers and reads; a
    cross-site page's POST (a body with no content type, as a fetch sends a Blob) and its
    bodiless redeliver are 403 and change nothing; a DNS-rebound page (Host naming its own
    site) can read nothing, the dashboard included; the browser's own same-origin requests
    (the dashboard's forms) pass."""
    api = await api_for(server={"api_tokens": []})
    client = api.client
    port = api.daemon.api_port
    body = b'{"platform": "luma", "ids": ["by-a-program"]}'
    assert 201 == (await client.post("/v1/tasks", content=body)).status_code

    page = b'{"platform": "luma", "ids": ["by-a-page"]}'
    refused = await client.post("/v1/tasks", content=page, headers=CROSS_SITE)
    assert 403 == refused.status_code
    assert "web page" in refused.json()["error"]
    assert "api_tokens" in refused.json()["error"]
    form = {"Origin": "https://evil.example"}  # an older browser: Origin only
    assert 403 == (await client.post("/v1/deliveries/1/redeliver", headers=form)).status_code
    rebound = {"Host": f"evil.example:{port}"}
    for path in ("/v1/tasks", "/ui/login", "/metrics"):
        answer = await client.get(path, headers=rebound)
        assert 403 == answer.status_code, path
        assert "not a loopback address" in answer.json()["error"]
    same_origin = {"Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"}
    assert 200 == (await client.get("/ui/login", headers=same_origin)).status_code
    assert 200 == (await client.get("/v1/tasks", headers={"Host": f"localhost:{port}"})).status_code

    ids = [t["task_id"] for t in (await client.get("/v1/tasks")).json()["tasks"]]
    assert ["by-a-program"] == ids


async def test_with_a_token_the_host_and_origin_are_not_judged(api: Api) -> None:
    """With tokens configured the token decides: a reverse proxy's Host or a page's Origin
    does not refuse a request that carries it."""
    headers = {**TOKEN, **CROSS_SITE, "Host": "tracker.example.com"}
    assert 200 == (await api.client.get("/v1/tasks", headers=headers)).status_code
