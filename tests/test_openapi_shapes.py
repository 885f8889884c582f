"""The OpenAPI document types what the API really sends and takes: a cursor a client can pass
back, timestamps as date-times, and the token on the operational routes when they ask for it.
"""

from __future__ import annotations

import re
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tracker import config
from tracker.api import models
from tracker.app import Daemon
from tracker.testing.simulator import SimulatedRelay

TOKEN = {"Authorization": "Bearer test-token"}
BEARER = [{"HTTPBearer": []}]
#: how every timestamp of an answer is written: RFC 3339, UTC, with a Z
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")

Started = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture(name="started")
async def _started(
    settings_for: Callable[..., config.Settings], tmp_path: Path
) -> AsyncIterator[Started]:
    """Starts a daemon with config overrides, each on a database of its own; answers a client
    of its API."""
    running: list[tuple[Daemon, httpx.AsyncClient]] = []

    async def start(**overrides: Any) -> httpx.AsyncClient:
        overrides.setdefault("poll", {"interval": 3600})
        database = f"sqlite:///{tmp_path / f'tracker{len(running)}.db'}"
        daemon = Daemon(settings_for(database, **overrides))
        await daemon.start()
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{daemon.api_port}")
        running.append((daemon, client))
        return client

    yield start
    for daemon, client in running:
        await client.aclose()
        await daemon.stop()


async def document_of(client: httpx.AsyncClient) -> dict[str, Any]:
    """The OpenAPI document the daemon serves."""
    answer = await client.get("/openapi.json", headers=TOKEN)
    assert 200 == answer.status_code, answer.text
    document: dict[str, Any] = answer.json()
    return document


def resolved(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with a ``$ref`` to the document's components followed."""
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    """The alternatives of ``schema`` other than null (itself when it has none)."""
    options = schema.get("anyOf", [schema])
    return [option for option in options if option.get("type") != "null"]


async def test_the_cursor_parameter_takes_what_next_cursor_gives(
    started: Started, relay: SimulatedRelay
) -> None:
    """Both listings document ``cursor`` with the type of ``next_cursor`` (a string), in a
    pattern each real next_cursor matches; and what was accepted before still is."""
    relay.auto_create = False
    client = await started()
    registered = await client.post(
        "/v1/tasks", json={"platform": "luma", "ids": ["a", "b", "c"]}, headers=TOKEN
    )
    assert 201 == registered.status_code
    document = await document_of(client)

    for path, model in (("/v1/tasks", "TaskPageOut"), ("/v1/deliveries", "DeliveryPageOut")):
        parameters = document["paths"][path]["get"]["parameters"]
        cursor = next(p for p in parameters if p["name"] == "cursor")
        properties = document["components"]["schemas"][model]["properties"]
        [next_cursor] = branches(properties["next_cursor"])
        [taken] = branches(cursor["schema"])
        assert "string" == next_cursor["type"] == taken["type"], path
    pattern = re.compile(taken["pattern"])

    page = (await client.get("/v1/tasks", params={"limit": "1"}, headers=TOKEN)).json()
    assert isinstance(page["next_cursor"], str)
    assert pattern.search(page["next_cursor"])
    assert pattern.search(""), "a blank cursor is taken, as if absent"
    assert not pattern.search("0")
    assert pattern.search(str(2**31 - 1))
    # The forms the parameter took as an integer are all taken still, and the bad ones refused
    # with the same problem.
    for value in ("", page["next_cursor"], "2", "02", " 2", "+2", "2.0", "1_0", str(2**31 - 1)):
        answer = await client.get("/v1/tasks", params={"cursor": value}, headers=TOKEN)
        assert 200 == answer.status_code, (value, answer.text)
    for value in ("0", "-1", "x", "2.5", " ", str(2**31), "\u0661"):
        answer = await client.get("/v1/deliveries", params={"cursor": value}, headers=TOKEN)
        assert 422 == answer.status_code, value
        expected = ["cursor: must be a next_cursor value from an earlier page"]
        assert expected == answer.json()["problems"], value


def _timestamp_fields() -> Iterator[tuple[str, str]]:
    """(model, property) of every answer field typed as a Timestamp in tracker.api.models."""
    for name, value in vars(models).items():
        if isinstance(value, type) and issubclass(value, models._Out) and value is not models._Out:
            for field_name, field in value.model_fields.items():
                hints = typing.get_type_hints(value, include_extras=True)
                if _is_timestamp(hints[field_name]):
                    yield name, field.serialization_alias or field_name


def _is_timestamp(annotation: Any) -> bool:
    if annotation == models.Timestamp:
        return True
    return any(_is_timestamp(a) for a in typing.get_args(annotation) if a is not type(None))


def _date_time(schema: dict[str, Any]) -> bool:
    return all(
        option.get("type") == "string" and option.get("format") == "date-time"
        for option in branches(schema)
    )


async def test_every_timestamp_is_documented_as_a_date_time(
    started: Started, relay: SimulatedRelay
) -> None:
    """Every ``at`` and ``*_at`` of the answers' schemas, and every Timestamp field, is a
    string of format date-time; the answers carry RFC 3339 UTC times as before."""
    relay.auto_create = False
    client = await started()
    document = await document_of(client)
    schemas = document["components"]["schemas"]

    by_name = {
        (model, name): schema
        for model, body in schemas.items()
        for name, schema in body.get("properties", {}).items()
        if name == "at" or name.endswith("_at")
    }
    by_type = set(_timestamp_fields())
    assert {("TaskOut", "created_at"), ("TransitionOut", "at"), ("AttemptOut", "at")} <= by_type
    assert by_type <= set(by_name)
    assert {name: schema for name, schema in by_name.items() if not _date_time(schema)} == {}

    registered = await client.post(
        "/v1/tasks", json={"platform": "luma", "ids": ["t"]}, headers=TOKEN
    )
    assert 201 == registered.status_code
    task = (await client.get("/v1/tasks/luma/t", headers=TOKEN)).json()
    for name in ("created_at", "updated_at"):
        assert RFC3339_UTC.fullmatch(task[name]), task[name]
        assert datetime.fromisoformat(task[name]).utcoffset() is not None


async def test_the_operational_routes_list_the_token_when_the_setting_asks_for_it(
    started: Started,
) -> None:
    """With metrics_require_auth, /readyz and /metrics answer 401 without the token and the
    document lists the bearer scheme on them; without it they ask for nothing and the document
    lists none. /v1 routes list it either way."""
    for required in (True, False):
        client = await started(server={"metrics_require_auth": required})
        document = await document_of(client)
        assert "HTTPBearer" in document["components"]["securitySchemes"]
        assert BEARER == document["paths"]["/v1/tasks"]["get"]["security"]
        for path in ("/readyz", "/metrics"):
            operation = document["paths"][path]["get"]
            assert (BEARER if required else None) == operation.get("security"), (required, path)
            unauthenticated = await client.get(path)
            assert (401 == unauthenticated.status_code) is required, (required, path)
