"""Tests for webhook targets, the events a change fires, and the exact JSON they carry."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from tracker import config, events, signing, status
from tracker.status import Change, Snapshot, TaskStatus
from tracker.store.records import DueTask

NOW = datetime(2026, 3, 4, 5, 6, 7, 890123, tzinfo=UTC)
DEFAULT_URL = "https://hooks.example/default"
ENDPOINT_URL = "https://ops.example/hooks"
CONTRACT_FIELDS = {
    "platform",
    "task_id",
    "status",
    "previous_status",
    "upstream_status",
    "progress",
    "upstream_progress",
    "fail_reason",
    "metadata",
    "result",
    "finished_at",
}


def hooks(**overrides: Any) -> config.WebhookSettings:
    """[webhooks] with a default URL and one named endpoint, plus overrides."""
    document: dict[str, Any] = {
        "url": DEFAULT_URL,
        "secret": signing.new_secret(),
        "endpoints": {"ops": {"url": ENDPOINT_URL, "secret": signing.new_secret()}},
    }
    document.update(overrides)
    return config.WebhookSettings.model_validate(document)


def due(**overrides: Any) -> DueTask:
    """A claimed task as the poller sees it."""
    fields: dict[str, Any] = {
        "pk": 7,
        "platform": "suno",
        "task_id": "task-1",
        "snapshot": Snapshot(TaskStatus.IN_PROGRESS, "IN_PROGRESS", 40, "40%"),
        "created_at": NOW,
        "missing_since": None,
        "webhook_url": None,
        "endpoint": None,
        "events": None,
        "metadata": {"user": "u-1", "tags": ["a", "b"]},
    }
    fields.update(overrides)
    return DueTask(**fields)


def completed(task: DueTask) -> Change:
    """The change that finishes ``task`` with a result."""
    change = status.apply(
        task.snapshot,
        status.Observation(
            task_id=task.task_id,
            upstream_status="SUCCESS",
            status=TaskStatus.COMPLETED,
            progress=100,
            upstream_progress="100%",
            result={"audio_url": "https://cdn.example/a.mp3"},
        ),
    )
    assert change is not None
    return change


def started() -> Change:
    """A pending task seen running at 30 %: task.started."""
    change = status.apply(
        Snapshot(TaskStatus.PENDING),
        status.Observation("task-1", "RUNNING", TaskStatus.IN_PROGRESS, 30, "30%"),
    )
    assert change is not None
    return change


def progressed() -> Change:
    """A running task moving from 40 % to 60 %: task.progress."""
    change = status.apply(
        Snapshot(TaskStatus.IN_PROGRESS, "RUNNING", 40, "40%"),
        status.Observation("task-1", "RUNNING", TaskStatus.IN_PROGRESS, 60, "60%"),
    )
    assert change is not None
    return change


# -- Targets.resolve ---------------------------------------------------------------------------


def test_without_a_registration_target_the_default_url_is_used() -> None:
    """A task registered with neither webhook_url nor endpoint goes to [webhooks].url."""
    target = events.Targets(hooks()).resolve(None, None, None)

    assert target == events.Target(
        url=DEFAULT_URL,
        endpoint=None,
        guarded=False,
        events=frozenset({"task.completed", "task.failed"}),
    )


def test_a_registration_webhook_url_wins_and_is_guarded() -> None:
    """A webhook_url given at registration is the target, and only it passes the SSRF guard."""
    target = events.Targets(hooks()).resolve("https://client.example/cb", None, None)

    assert target is not None
    assert ("https://client.example/cb", None, True) == (
        target.url,
        target.endpoint,
        target.guarded,
    )


def test_a_named_endpoint_uses_its_own_url_and_events() -> None:
    """An endpoint's url is used unguarded, with the endpoint's own event list."""
    settings = hooks(
        endpoints={
            "ops": {
                "url": ENDPOINT_URL,
                "secret": signing.new_secret(),
                "events": ["task.started"],
            }
        }
    )

    target = events.Targets(settings).resolve(None, "ops", None)

    assert target == events.Target(
        url=ENDPOINT_URL, endpoint="ops", guarded=False, events=frozenset({"task.started"})
    )


def test_an_endpoint_without_events_takes_the_global_list() -> None:
    """An endpoint that names no events gets [webhooks].events."""
    settings = hooks(events=["task.completed", "task.progress"])

    target = events.Targets(settings).resolve(None, "ops", None)

    assert target is not None
    assert frozenset({"task.completed", "task.progress"}) == target.events


def test_without_any_url_the_default_targets_events_are_addressed_to_be_held() -> None:
    """No webhook_url, no endpoint and no [webhooks].url (a reload took it out after the task
    was registered): the events are still written, with no URL, for the deliverer to hold
    until the config has one, as a gone endpoint's are."""
    target = events.Targets(hooks(url=None)).resolve(None, None, None)

    assert target is not None
    assert ("", None, False) == (target.url, target.endpoint, target.guarded)


def test_an_endpoint_gone_from_the_config_still_gets_its_events_addressed_to_its_name() -> None:
    """An endpoint name no longer in the settings (a reload removed it) keeps its events,
    addressed to the name alone (the deliverer holds them until it is back), never to the
    default URL."""
    target = events.Targets(hooks(url=DEFAULT_URL)).resolve(None, "missing", None)

    assert target is not None
    assert ("", "missing", False) == (target.url, target.endpoint, target.guarded)
    assert {"task.completed", "task.failed"} <= target.events


def test_registration_events_narrow_but_never_widen() -> None:
    """A registration's events intersect the configured ones; unconfigured ones stay off."""
    settings = hooks(events=["task.completed", "task.failed", "task.progress"])

    target = events.Targets(settings).resolve(None, None, ["task.progress", "task.started"])

    assert target is not None
    assert frozenset({"task.progress"}) == target.events


def test_a_registration_kind_is_resolved_once_and_many_urls_still_resolve_right() -> None:
    """A drain resolves a target per changed task: the same registration gets the same
    (immutable) target without working it out again, a list of events as its tuple does, and
    more per-task URLs than are kept still each resolve to their own."""
    settings = hooks(events=["task.progress", "task.started"])
    targets = events.Targets(settings)
    first = targets.resolve(None, None, ("task.progress",))

    assert first is targets.resolve(None, None, ["task.progress"])
    for n in range(events.RESOLVED_KEPT + 10):
        url = f"https://client.example/cb/{n}"
        target = targets.resolve(url, None, None)
        assert target is not None
        assert (url, True) == (target.url, target.guarded)
    assert first == targets.resolve(None, None, ("task.progress",))
    assert first is not None
    assert {status.EventType.PROGRESS} == first.events


def test_for_task_resolves_from_the_claimed_row() -> None:
    """for_task reads webhook_url, endpoint and events off the claimed task."""
    task = due(endpoint="ops", events=("task.failed",))

    target = events.Targets(hooks()).for_task(task)

    assert target is not None
    assert (ENDPOINT_URL, "ops", frozenset({"task.failed"})) == (
        target.url,
        target.endpoint,
        target.events,
    )


# -- which events go out -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "event"),
    [
        (TaskStatus.COMPLETED, "task.completed"),
        (TaskStatus.FAILED, "task.failed"),
        (TaskStatus.CANCELED, "task.canceled"),
    ],
)
def test_final_events_always_go_even_when_not_wanted(final: TaskStatus, event: str) -> None:
    """A final event reaches a target whose event list is empty."""
    change = status.apply(
        Snapshot(TaskStatus.IN_PROGRESS), status.Observation("task-1", "X", final)
    )
    assert change is not None
    target = events.Target(url=DEFAULT_URL, endpoint=None, guarded=False, events=frozenset())

    assert [event] == events.wanted_events(change, target)


def test_started_and_progress_go_only_when_wanted() -> None:
    """Non-final events go only to targets that asked for them."""
    only_progress = events.Target(
        url=DEFAULT_URL, endpoint=None, guarded=False, events=frozenset({"task.progress"})
    )
    default = events.Targets(hooks()).resolve(None, None, None)
    assert default is not None

    assert ("task.started",) == started().events
    assert ("task.progress",) == progressed().events
    assert [] == events.wanted_events(started(), only_progress)
    assert ["task.progress"] == events.wanted_events(progressed(), only_progress)
    assert [] == events.wanted_events(started(), default)
    assert [] == events.wanted_events(progressed(), default)


def test_outbox_entries_carry_the_target_and_a_fresh_id_per_event() -> None:
    """Each wanted event becomes one outbox row with the target and its own message id."""
    task = due(webhook_url="https://client.example/cb")
    settings = hooks(events=["task.started", "task.progress", "task.completed"])
    target = events.Targets(settings).for_task(task)

    entries = [
        *events.outbox_entries(task, started(), target, NOW),
        *events.outbox_entries(task, progressed(), target, NOW),
    ]

    assert ["task.started", "task.progress"] == [e.event_type for e in entries]
    assert all(e.url == "https://client.example/cb" and e.guarded for e in entries)
    assert all(e.endpoint is None for e in entries)
    assert all(e.webhook_id.startswith("msg_") and "." not in e.webhook_id for e in entries)
    assert entries[0].webhook_id != entries[1].webhook_id
    assert ["task.started", "task.progress"] == [json.loads(e.payload)["type"] for e in entries]


def test_no_target_no_outbox_entries() -> None:
    """Without a target a change writes no outbox rows."""
    task = due()

    assert () == events.outbox_entries(task, completed(task), None, NOW)


# -- the payload -------------------------------------------------------------------------------


def test_payload_carries_exactly_the_contract_fields() -> None:
    """The body is {type, timestamp, data} with exactly the documented data fields."""
    task = due()
    change = completed(task)

    body = json.loads(events.payload(task, change, "task.completed", NOW))

    assert {"type", "timestamp", "data"} == set(body)
    assert CONTRACT_FIELDS == set(body["data"])
    assert {
        "type": "task.completed",
        "timestamp": "2026-03-04T05:06:07Z",
        "data": {
            "platform": "suno",
            "task_id": "task-1",
            "status": "completed",
            "previous_status": "in_progress",
            "upstream_status": "SUCCESS",
            "progress": 100,
            "upstream_progress": "100%",
            "fail_reason": "",
            "metadata": {"user": "u-1", "tags": ["a", "b"]},
            "result": {"audio_url": "https://cdn.example/a.mp3"},
            "finished_at": "2026-03-04T05:06:07.890123Z",
        },
    } == body


def test_payload_of_a_running_task_has_no_finish_time_and_empty_metadata() -> None:
    """A non-final event has finished_at null; a task without metadata sends {}."""
    task = due(snapshot=Snapshot(TaskStatus.PENDING), metadata=None)

    body = json.loads(events.payload(task, started(), "task.started", NOW))

    assert ("in_progress", "pending") == (body["data"]["status"], body["data"]["previous_status"])
    assert (None, {}, None) == (
        body["data"]["finished_at"],
        body["data"]["metadata"],
        body["data"]["result"],
    )


def test_payload_of_a_failure_carries_the_reason() -> None:
    """task.failed carries fail_reason and the failed status."""
    task = due()
    change = status.give_up(task.snapshot, "upstream lost the task")
    assert change is not None

    body = json.loads(events.payload(task, change, "task.failed", NOW))

    assert ("task.failed", "failed", "upstream lost the task") == (
        body["type"],
        body["data"]["status"],
        body["data"]["fail_reason"],
    )


def test_payload_is_compact_utf8_json() -> None:
    """The bytes are minified UTF-8 JSON, non-ASCII kept as is (they are what gets signed)."""
    task = due(metadata={"title": "Åsa's song"})

    raw = events.payload(task, completed(task), "task.completed", NOW)

    assert b", " not in raw
    assert b": " not in raw
    assert "Åsa's song".encode() in raw
