"""The planner's decisions from glances (tracker/poller/plan.py): pure, no I/O.

A platform that glances at its answer items (luma, suno) lets the planner find the answers
that moved nothing without building an Observation or a TaskUpdate. Whatever the task holds
and whatever the item says, the decision must be the one the full way gives.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tracker import config, events, platforms
from tracker.platforms.base import Glance, Platform
from tracker.platforms.newapi import _wait_hint
from tracker.platforms.observations import read_progress
from tracker.poller.plan import Planner
from tracker.status import FINAL, Snapshot, TaskStatus
from tracker.store.records import KEEP, Claim, DueTask, Replan, TaskUpdate

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
EPOCH = NOW.timestamp()
LEASE_END = EPOCH + 5.0

SETTINGS = config.parse(
    {
        "upstream": {"base_url": "http://127.0.0.1:9", "api_key": "sk-test"},
        "poll": {"interval": 10, "max_interval": 60},
        "webhooks": {"url": "http://127.0.0.1:9/hooks", "secret": "whsec_" + "A" * 32},
    },
    environ={},
)
PLATFORM: Platform = platforms.build(SETTINGS)["luma"]

WORDS = ["NOT_START", "SUBMITTED", "QUEUED", "IN_PROGRESS", "SUCCESS", "FAILURE", "UNKNOWN",
         "CANCELLED", "something-new", ""]  # fmt: skip
RAW_PROGRESS: list[Any] = [None, "", "0%", "50%", "50", "100%", 50, 0.5, 1.0, 250, "junk", True,
                           {"value": 5}, [1]]  # fmt: skip
LIVE = [s for s in TaskStatus if s not in FINAL]


def planner() -> Planner:
    planner = Planner(SETTINGS.poll, events.Targets(SETTINGS.webhooks))
    planner.drain_started = EPOCH - 2.0
    return planner


def due(snapshot: Snapshot, *, missing_since: float | None, last_change: float) -> DueTask:
    return DueTask(
        pk=7,
        platform="luma",
        task_id="t1",
        snapshot=snapshot,
        created_at=NOW - timedelta(minutes=5),
        missing_since=missing_since,
        webhook_url=None,
        endpoint=None,
        events=None,
        metadata=None,
        planned=EPOCH - 0.5,
        last_change_at=last_change,
        claim=Claim(LEASE_END, (7,)),
    )


def item(word: object, progress: object, hint: object, reason: object) -> dict[str, Any]:
    return {
        "task_id": "t1",
        "status": word,
        "progress": progress,
        "fail_reason": reason,
        "data": {"estimate_wait_seconds": hint},
    }


def glance_of(body: dict[str, Any]) -> Glance:
    """What NewApiBatch.fetch_seen makes of an item (its own wait-hint reader)."""
    return Glance(body.get("status"), body.get("progress"), _wait_hint(body), body)


@st.composite
def cases(draw: st.DrawFn) -> tuple[Snapshot, dict[str, Any]]:
    """A task's snapshot and an answer item, mostly alike (the case a glance decides alone),
    else apart in word, status, progress or reason."""
    word = draw(st.sampled_from(WORDS))
    known = PLATFORM.statuses.get(word)
    status = known if known in LIVE and draw(st.booleans()) else draw(st.sampled_from(LIVE))
    raw = draw(st.sampled_from(RAW_PROGRESS))
    progress, upstream_progress = read_progress(raw)
    snapshot = Snapshot(
        status=status,
        upstream_status=word if draw(st.booleans()) else draw(st.sampled_from([None, *WORDS])),
        progress=progress if draw(st.booleans()) else draw(st.sampled_from([None, 0, 50])),
        upstream_progress=(
            upstream_progress if draw(st.booleans()) else draw(st.sampled_from([None, "50%"]))
        ),
        fail_reason=draw(st.sampled_from(["", "boom"])),
    )
    body = item(
        word if draw(st.booleans()) else draw(st.sampled_from([*WORDS, None, 5])),
        raw if draw(st.booleans()) else draw(st.sampled_from(RAW_PROGRESS)),
        draw(st.sampled_from([None, 3, 30, 600, -1, "soon"])),
        draw(st.sampled_from(["", "boom", None])),
    )
    return snapshot, body


@settings(max_examples=500)
@given(
    case=cases(),
    missing_since=st.sampled_from([None, EPOCH - 30.0]),
    last_change=st.sampled_from([EPOCH - 1.0, EPOCH - 200.0]),
)
def test_a_glance_decides_what_the_full_observation_decides(
    case: tuple[Snapshot, dict[str, Any]], missing_since: float | None, last_change: float
) -> None:
    """From a glance the planner either replans (only when the full way finds no change and
    keeps missing_since, at the same next poll) or decides exactly what the full way does."""
    snapshot, body = case
    task = due(snapshot, missing_since=missing_since, last_change=last_change)
    glance = glance_of(body)
    observation = PLATFORM.observe_glance(glance)

    quick = planner().decide(PLATFORM, [task], {"t1": glance}, NOW)
    full = planner().decide(PLATFORM, [task], {"t1": observation}, NOW)

    assert full.replans == []
    [update] = full.updates
    if quick.replans:
        assert quick.updates == []
        assert (update.change, update.outbox, update.missing_since) == (None, (), KEEP)
        assert [Replan(update.next_poll_at, 7, LEASE_END)] == quick.replans  # type: ignore[arg-type]
    else:
        [decided] = quick.updates
        assert _comparable(decided) == _comparable(update)


def _comparable(update: TaskUpdate) -> tuple[Any, ...]:
    # Outbox entries carry a fresh webhook id each: compare what they say, not their ids.
    said = tuple((e.event_type, e.url) for e in update.outbox)
    return (update.change, said, update.missing_since, update.next_poll_at)


def test_a_quiet_answer_is_a_replan_planned_from_the_planned_time() -> None:
    """The common case: the word and progress the task holds, so a Replan one interval after
    the planned poll, under the claim's token; no update."""
    snapshot = Snapshot(TaskStatus.QUEUED, "NOT_START", 0, "0%")
    task = due(snapshot, missing_since=None, last_change=EPOCH - 1.0)
    glance = glance_of(item("NOT_START", "0%", None, ""))

    decided = planner().decide(PLATFORM, [task], {"t1": glance}, NOW)

    assert decided.updates == []
    assert decided.replans == [Replan(task.planned + 10.0, 7, LEASE_END)]


def test_a_glance_that_moved_the_task_is_read_in_full() -> None:
    """A new word: the full observation decides, with its change and event."""
    snapshot = Snapshot(TaskStatus.QUEUED, "NOT_START", 0, "0%")
    task = due(snapshot, missing_since=None, last_change=EPOCH - 1.0)
    glance = glance_of(item("SUCCESS", "100%", None, ""))

    decided = planner().decide(PLATFORM, [task], {"t1": glance}, NOW)

    assert decided.replans == []
    [update] = decided.updates
    assert update.change is not None
    assert update.change.after.status is TaskStatus.COMPLETED
    assert [e.event_type for e in update.outbox] == ["task.completed"]


def test_an_unclaimed_task_is_decided_in_full_even_when_quiet() -> None:
    """A replan needs the claim's token; a task without a claim gets a TaskUpdate."""
    snapshot = Snapshot(TaskStatus.QUEUED, "NOT_START", 0, "0%")
    task = due(snapshot, missing_since=None, last_change=EPOCH - 1.0)
    unclaimed = task._replace(claim=None)
    glance = glance_of(item("NOT_START", "0%", None, ""))

    decided = planner().decide(PLATFORM, [unclaimed], {"t1": glance}, NOW)

    assert decided.replans == []
    assert [u.change for u in decided.updates] == [None]
