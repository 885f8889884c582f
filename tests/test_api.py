"""The HTTP API over a real daemon on loopback: auth, validation, JSON shapes, paging, replay."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from conftest import eventually
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from tracker import config
from tracker.api import deliveries as delivery_routes
from tracker.api import ops
from tracker.api import tasks as task_routes
from tracker.app import Daemon
from tracker.dashboard.actions import router as actions
from tracker.dashboard.pages import router as pages
from tracker.store import Registration
from tracker.store.sql import deliveries, tasks
from tracker.testing.simulator import SimulatedRelay

TOKEN = {"Authorization": "Bearer test-token"}
TASK_FIELDS = {
    "platform", "task_id", "status", "upstream_status", "progress", "upstream_progress",
    "fail_reason", "metadata", "webhook_url", "endpoint", "events", "result", "created_at",
    "updated_at", "finished_at", "transitions",
}  # fmt: skip


class Api:
    """A started daemon and an HTTP client pointed at it."""

    def __init__(self, daemon: Daemon, client: httpx.AsyncClient) -> None:
        self.daemon = daemon
        self.client = client

    async def register(self, **body: Any) -> httpx.Response:
        body.setdefault("platform", "luma")
        return await self.client.post("/v1/tasks", json=body, headers=TOKEN)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.client.get(path, headers=TOKEN, **kw)


async def polled(api: Api, task_id: str, status: str, within: float = 5.0) -> dict[str, Any]:
    """The task once the poll engine (woken by its registration) has recorded ``status``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while loop.time() < deadline:
        task: dict[str, Any] = (await api.get(f"/v1/tasks/luma/{task_id}")).json()
        if task.get("status") == status:
            return task
        await asyncio.sleep(0.02)
    pytest.fail(f"{task_id} did not become {status} within {within:g} s")


@pytest.fixture(name="api_for")
async def _api_for(
    settings_for: Callable[..., config.Settings],
) -> AsyncIterator[Callable[..., Any]]:
    started: list[Api] = []

    async def start(**overrides: Any) -> Api:
        overrides.setdefault("poll", {"interval": 3600})
        daemon = Daemon(settings_for(**overrides))
        await daemon.start()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}")
        started.append(Api(daemon, client))
        return started[-1]

    yield start
    for api in started:
        await api.client.aclose()
        await api.daemon.stop()


@pytest.fixture(name="api")
async def _api(api_for: Callable[..., Any]) -> Api:
    api: Api = await api_for()
    return api


async def test_v1_needs_a_bearer_token_but_healthz_does_not(api: Api) -> None:
    """/v1/* answers 401 without the right token; /healthz is open."""
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic dGVzdA=="}):
        answer = await api.client.get("/v1/tasks", headers=headers)
        assert 401 == answer.status_code
        assert "Bearer" == answer.headers["www-authenticate"]
    assert 200 == (await api.client.get("/healthz")).status_code
    assert 200 == (await api.get("/v1/tasks")).status_code


def _sync_calls(dependant: Dependant) -> Iterator[str]:
    """The plain-def callables FastAPI would run on a worker thread for this dependant."""
    call = dependant.call
    if call is not None and not (
        inspect.iscoroutinefunction(call)
        or inspect.iscoroutinefunction(getattr(call, "__call__", None))  # noqa: B004 - instances
    ):
        yield getattr(call, "__qualname__", repr(call))
    for sub in dependant.dependencies:
        yield from _sync_calls(sub)


def test_no_route_or_dependency_hops_to_a_worker_thread_of_its_own() -> None:
    """Every route and dependency of the API and the dashboard is a coroutine.

    FastAPI runs a plain def on a worker thread: a thread hop, and a wait for the GIL while
    the poller works, on every request. The store's blocking calls are the only hops, each
    made explicitly.
    """
    api = [task_routes.router, delivery_routes.router, ops.router, ops.protected]
    routers = [*api, pages, actions]
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    assert len(routes) > 20
    offenders = {f"{r.path}: {call}" for r in routes for call in _sync_calls(r.dependant)}
    assert set() == offenders


async def test_registration_is_idempotent(api: Api) -> None:
    """New ids answer 201; ids already tracked are reported as existing with 200."""
    first = await api.register(ids=["a", "b"], metadata={"k": "v"})
    again = await api.register(ids=["b", "a"])
    mixed = await api.register(ids=["a", "c", "c"])

    assert (201, {"registered": ["a", "b"], "existing": []}) == (first.status_code, first.json())
    assert (200, {"registered": [], "existing": ["b", "a"]}) == (again.status_code, again.json())
    assert (201, {"registered": ["c"], "existing": ["a"]}) == (mixed.status_code, mixed.json())
    assert {"k": "v"} == (await api.get("/v1/tasks/luma/a")).json()["metadata"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"ids": []}, "ids:"),
        ({"ids": "abc"}, "ids:"),
        ({}, "ids:"),
        ({"ids": [f"id{n}" for n in range(1001)]}, "at most 1000"),
        ({"ids": ["ok", 5]}, "ids[1]"),
        ({"ids": ["ok", ""]}, "ids[1]"),
        ({"ids": ["x" * 201]}, "ids[0]"),
        ({"ids": ["tab\there"]}, "ids[0]"),
        ({"ids": ["ok", "trailing "]}, "ids[1]"),
        ({"ids": [" leading"]}, "ids[0]"),
        ({"ids": ["ok", ".."]}, "ids[1]: must be"),
        ({"ids": ["."]}, "not '.' or '..'"),
        ({"ids": ["a"], "platform": "nope"}, "platform:"),
        ({"ids": ["a"], "webhook_url": "ftp://x.example.com/h"}, "webhook_url:"),
        ({"ids": ["a"], "webhook_url": "http://127.0.0.1:99999/h"}, "webhook_url: port 99999"),
        ({"ids": ["a"], "webhook_url": "http://127.0.0.1:0/h"}, "webhook_url: port 0"),
        ({"ids": ["a"], "metadata": [1]}, "metadata:"),
        ({"ids": ["a"], "metadata": {"blob": "x" * 5000}}, "4096 bytes"),
        ({"ids": ["a"], "colour": "red"}, "colour: unknown field"),
        ({"ids": ["a"], "events": ["task.exploded"]}, "events:"),
        ({"ids": ["a"], "endpoint": "nope"}, "endpoint:"),
    ],
)
async def test_invalid_registrations_are_refused_whole(
    api: Api, body: dict[str, Any], problem: str
) -> None:
    """Any invalid part answers 422 naming the problem, and nothing at all is stored."""
    answer = await api.register(**body)

    assert 422 == answer.status_code
    assert any(problem in p for p in answer.json()["problems"]), answer.json()
    assert [] == (await api.get("/v1/tasks")).json()["tasks"]


async def test_a_dot_id_stored_before_it_was_refused_can_still_be_read_and_removed(
    api: Api,
) -> None:
    """Registration refuses the ids "." and "..", but a task stored under one earlier is still
    read and removed by a client that sends it encoded (%2E%2E), as the client module does."""
    store = api.daemon.parts.store
    store.register(Registration("luma", [".."]), datetime.now(UTC))

    read = await api.get("/v1/tasks/luma/%2E%2E")
    removed = await api.client.delete("/v1/tasks/luma/%2E%2E", headers=TOKEN)

    assert (200, "..") == (read.status_code, read.json()["task_id"])
    assert 204 == removed.status_code
    assert store.get("luma", "..") is None


async def test_every_problem_is_named_at_once(api: Api) -> None:
    """A body with several problems lists each of them."""
    answer = await api.register(platform="nope", ids=["ok", 7], metadata="x")

    problems = answer.json()["problems"]
    assert 3 == len(problems)


async def test_body_that_is_not_json_is_422(api: Api) -> None:
    """A body that is not JSON is refused with a reason."""
    answer = await api.client.post("/v1/tasks", content=b"{nope", headers=TOKEN)

    assert 422 == answer.status_code
    assert ["body: not valid JSON"] == answer.json()["problems"]


async def test_webhook_url_to_a_private_address_is_refused(api_for: Callable[..., Any]) -> None:
    """Without an allow-list entry, a webhook_url on loopback is refused with the reason."""
    api = await api_for(webhooks={"allow_private": []})
    answer = await api.register(ids=["a"], webhook_url="http://127.0.0.1:9/hook")

    assert 422 == answer.status_code
    assert "webhook_url" in answer.json()["problems"][0]
    assert "loopback" in answer.json()["problems"][0]


async def test_get_task_shows_the_contract_fields(api: Api, relay: SimulatedRelay) -> None:
    """GET answers every documented field, with transitions oldest first; 404 when unknown."""
    relay.set("luma", "t/1", "IN_PROGRESS", "40%")
    await api.register(ids=["t/1"], webhook_url="http://127.0.0.1:9/h")
    task = await polled(api, "t%2F1", "in_progress")

    assert TASK_FIELDS == set(task)
    assert ("in_progress", 40, "40%") == (
        task["status"],
        task["progress"],
        task["upstream_progress"],
    )
    assert [("pending", "in_progress")] == [(t["from"], t["to"]) for t in task["transitions"]]
    assert {"from", "to", "upstream_status", "progress", "at"} == set(task["transitions"][0])
    assert task["created_at"].endswith("Z")
    assert 404 == (await api.get("/v1/tasks/luma/unknown")).status_code


async def test_listing_pages_newest_first_with_filters(api: Api, relay: SimulatedRelay) -> None:
    """GET /v1/tasks pages newest first through every task exactly once, and filters."""
    relay.auto_create = False  # the ids stay pending however soon they are polled
    await api.register(ids=[f"id{n}" for n in range(7)])
    await api.register(platform="suno", ids=["s1"])
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = (await api.get("/v1/tasks", params=params)).json()
        seen += [t["task_id"] for t in page["tasks"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert ["s1", *(f"id{n}" for n in reversed(range(7)))] == seen
    suno = (await api.get("/v1/tasks", params={"platform": "suno"})).json()["tasks"]
    assert ["s1"] == [t["task_id"] for t in suno]
    pending = (await api.get("/v1/tasks", params={"status": "pending"})).json()["tasks"]
    assert 8 == len(pending)
    assert 422 == (await api.get("/v1/tasks", params={"status": "bogus"})).status_code
    assert 422 == (await api.get("/v1/tasks", params={"limit": "0"})).status_code


async def test_delete_stops_tracking_and_no_webhook_follows(
    api: Api, relay: SimulatedRelay
) -> None:
    """DELETE answers 204, then 404; the task is never polled again and no event is queued."""
    relay.set("luma", "gone", "IN_PROGRESS", "10%")
    await api.register(ids=["gone"])
    await polled(api, "gone", "in_progress")  # the poll its registration started is over
    assert 204 == (await api.client.delete("/v1/tasks/luma/gone", headers=TOKEN)).status_code
    assert 404 == (await api.client.delete("/v1/tasks/luma/gone", headers=TOKEN)).status_code
    relay.set("luma", "gone", "SUCCESS", "100%")
    relay.clear_requests()
    await api.daemon.parts.poller.run_cycle()

    assert [] == relay.requests
    with api.daemon.parts.store.engine.connect() as conn:
        assert 0 == conn.execute(sa.select(sa.func.count()).select_from(deliveries)).scalar()


async def test_registrations_get_503_while_stopping(api: Api) -> None:
    """Once the daemon stops taking work, POST /v1/tasks answers 503 and stores nothing."""
    api.daemon.parts.state.accepting = False
    answer = await api.register(ids=["late"])

    assert 503 == answer.status_code
    assert 404 == (await api.get("/v1/tasks/luma/late")).status_code


async def test_a_tasks_deliveries_are_listed_whole_past_a_thousand(
    api: Api, relay: SimulatedRelay
) -> None:
    """A task that sent many progress events: its deliveries route lists every one, oldest
    first, as the README says. (It stopped at the newest 1000, without a cursor or a sign.)"""
    # The registration is due at once: asked about, the task is not found (no event of its
    # own to list), where the relay would otherwise make it up and finish it.
    relay.auto_create = False
    store = api.daemon.parts.store
    store.register(Registration("luma", ["many"]), datetime.now(UTC))
    # A write transaction from the start (BEGIN IMMEDIATE on SQLite): it waits for the poll
    # engine's writes (the registration woke it) instead of failing on the lock.
    with store.engine.connect() as conn, conn.execution_options(tracker_write=True).begin():
        pk = conn.execute(sa.select(tasks.c.id).where(tasks.c.task_id == "many")).scalar_one()
        now = datetime.now(UTC)
        conn.execute(
            deliveries.insert(),
            [
                {
                    "webhook_id": f"msg_many{n:05}",
                    "task_pk": pk,
                    "platform": "luma",
                    "task_id": "many",
                    "event_type": "task.progress",
                    "payload": "{}",
                    "url": "http://127.0.0.1:9/hook",
                    "guarded": False,
                    "state": "delivered",
                    "attempts": 1,
                    "next_attempt_at": 0.0,
                    "created_at": now,
                }
                for n in range(1005)
            ],
        )

    listed = (await api.get("/v1/tasks/luma/many/deliveries")).json()["deliveries"]

    assert [f"msg_many{n:05}" for n in range(1005)] == [d["webhook_id"] for d in listed]


async def test_deliveries_can_be_listed_redelivered_and_recovered(
    api: Api, relay: SimulatedRelay
) -> None:
    """Deliveries are listed per task and by state; redeliver and recover re-queue them."""
    api.daemon.parts.jobs.pause()  # keep the delivery loop from racing the edits below
    relay.set("luma", "d1", "SUCCESS", "100%")
    relay.set("luma", "d2", "FAILURE", "100%", fail_reason="nope")
    await api.register(ids=["d1", "d2"])
    await polled(api, "d1", "completed")
    await polled(api, "d2", "failed")
    # A run under way when the jobs were paused (the one at start) may still take these two;
    # once it ends no other starts, and its writes cannot overwrite the edit below.
    await eventually(lambda: not api.daemon.parts.delivering.running, 10, "the run to end")
    with api.daemon.parts.store.engine.begin() as conn:
        conn.execute(deliveries.update().values(state="dead", last_error="HTTP 500"))

    per_task = (await api.get("/v1/tasks/luma/d1/deliveries")).json()["deliveries"]
    assert ["task.completed"] == [d["event_type"] for d in per_task]
    dead = (await api.get("/v1/deliveries", params={"state": "dead"})).json()["deliveries"]
    assert {"d1", "d2"} == {d["task_id"] for d in dead}
    assert 422 == (await api.get("/v1/deliveries", params={"state": "lost"})).status_code

    one = per_task[0]["id"]
    answer = await api.client.post(f"/v1/deliveries/{one}/redeliver", headers=TOKEN)
    assert (202, {"requeued": [one]}) == (answer.status_code, answer.json())
    again = (await api.get("/v1/tasks/luma/d1/deliveries")).json()["deliveries"][0]
    assert ("pending", per_task[0]["webhook_id"]) == (again["state"], again["webhook_id"])
    missing = await api.client.post("/v1/deliveries/999999/redeliver", headers=TOKEN)
    assert 404 == missing.status_code

    since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    recovered = await api.client.post(
        "/v1/deliveries/recover", json={"since": since}, headers=TOKEN
    )
    assert 200 == recovered.status_code
    assert 1 == len(recovered.json()["requeued"])  # d1 is pending already; d2 was dead
    bad = await api.client.post("/v1/deliveries/recover", json={"until": "x"}, headers=TOKEN)
    assert 422 == bad.status_code
    assert {"since: required", "until: must be an ISO 8601 time with a zone, e.g. "
            "2026-11-25T10:00:00Z"} <= set(bad.json()["problems"])  # fmt: skip
