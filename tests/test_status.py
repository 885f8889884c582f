"""The pure status rules: every pair of statuses, progress parsing, and random answer sequences."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracker import status
from tracker.status import FINAL, Observation, Snapshot, TaskStatus

ORDER = [TaskStatus.PENDING, TaskStatus.QUEUED, TaskStatus.IN_PROGRESS]


def observe(new: TaskStatus | None, word: str = "WORD", **kw: object) -> Observation:
    return Observation(task_id="t", upstream_status=word, status=new, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("old", "new"), list(itertools.product(TaskStatus, TaskStatus)))
def test_can_move_over_every_pair(old: TaskStatus, new: TaskStatus) -> None:
    """Only forward moves out of a non-final status are allowed; finals never move."""
    if old in FINAL or old == new:
        expected = False
    elif new in FINAL:
        expected = True
    else:
        expected = ORDER.index(new) > ORDER.index(old)

    assert expected == status.can_move(old, new)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(TaskStatus, TaskStatus)))
def test_apply_over_every_pair(old: TaskStatus, new: TaskStatus) -> None:
    """apply() moves the status exactly when can_move() says so, and fires the matching event."""
    change = status.apply(Snapshot(status=old), observe(new))

    if old in FINAL:
        assert change is None
        return
    assert change is not None  # the upstream word is new, so something is written
    moved = status.can_move(old, new)
    assert (new if moved else old) == change.after.status
    if moved and new in FINAL:
        assert status.FINAL_EVENTS[new] in change.events
    if moved and new == TaskStatus.IN_PROGRESS:
        assert (status.EventType.STARTED,) == change.events
    if not moved:
        assert not any(e in status.FINAL_EVENTS.values() for e in change.events)


def test_unknown_word_is_kept_but_changes_no_status() -> None:
    """A word outside the table is stored as upstream_status and the status stays."""
    change = status.apply(Snapshot(TaskStatus.QUEUED, "QUEUED"), observe(None, "UNKNOWN"))

    assert change is not None
    assert TaskStatus.QUEUED == change.after.status
    assert "UNKNOWN" == change.after.upstream_status
    assert () == change.events


def test_same_answer_twice_writes_nothing() -> None:
    """An answer identical to what is stored yields no change at all."""
    current = Snapshot(TaskStatus.IN_PROGRESS, "IN_PROGRESS", 30, "30%")

    assert (
        status.apply(
            current,
            observe(TaskStatus.IN_PROGRESS, "IN_PROGRESS", progress=30, upstream_progress="30%"),
        )
        is None
    )


def test_progress_change_fires_progress_event() -> None:
    """A new progress value on the same status fires task.progress."""
    current = Snapshot(TaskStatus.IN_PROGRESS, "IN_PROGRESS", 30, "30%")
    change = status.apply(
        current,
        observe(TaskStatus.IN_PROGRESS, "IN_PROGRESS", progress=60, upstream_progress="60%"),
    )

    assert change is not None
    assert (status.EventType.PROGRESS,) == change.events
    assert not change.moved


def test_missing_progress_keeps_the_last_known() -> None:
    """An answer without progress does not erase the stored progress."""
    current = Snapshot(TaskStatus.IN_PROGRESS, "IN_PROGRESS", 30, "30%")
    change = status.apply(current, observe(TaskStatus.IN_PROGRESS, "RUNNING"))

    assert change is not None
    assert 30 == change.after.progress
    assert "30%" == change.after.upstream_progress


def test_completed_without_progress_counts_as_100() -> None:
    """A success with no progress reports 100."""
    change = status.apply(
        Snapshot(TaskStatus.IN_PROGRESS), observe(TaskStatus.COMPLETED, "SUCCESS")
    )

    assert change is not None
    assert 100 == change.after.progress


def test_failure_keeps_the_upstream_reason() -> None:
    """A failure carries the relay's fail_reason."""
    change = status.apply(
        Snapshot(TaskStatus.QUEUED), observe(TaskStatus.FAILED, "FAILURE", fail_reason="nsfw")
    )

    assert change is not None
    assert "nsfw" == change.after.fail_reason
    assert ("task.failed",) == change.events


def test_give_up_fails_with_reason_and_leaves_finals_alone() -> None:
    """give_up fails an open task with the reason, and does nothing to a final one."""
    change = status.give_up(Snapshot(TaskStatus.IN_PROGRESS), "gave up")

    assert change is not None
    assert (TaskStatus.FAILED, "gave up") == (change.after.status, change.after.fail_reason)
    assert ("task.failed",) == change.events
    assert status.give_up(Snapshot(TaskStatus.COMPLETED), "gave up") is None


@pytest.mark.parametrize(
    ("raw", "fraction", "expected"),
    [
        ("45%", False, 45),
        ("45", False, 45),
        (" 7 % ", False, 7),
        ("100%", False, 100),
        ("150%", False, 100),
        ("12.9%", False, 12),
        (45, False, 45),
        (0.45, True, 45),
        ("0.45", True, 45),
        ("45%", True, 45),
        ("", False, None),
        (None, False, None),
        ("abc", False, None),
        (True, False, None),
        (float("nan"), False, None),
        ([], False, None),
        (-5, False, 0),
    ],
)
def test_parse_progress(raw: object, fraction: bool, expected: int | None) -> None:
    """Progress becomes an integer 0-100 from every shape relays send, or None."""
    assert expected == status.parse_progress(raw, fraction=fraction)


words = st.sampled_from([*TaskStatus, None])


@given(st.lists(st.tuples(words, st.integers(0, 100) | st.none()), max_size=30))
def test_no_answer_sequence_leaves_a_final_status_or_fires_two_final_events(
    answers: list[tuple[TaskStatus | None, int | None]],
) -> None:
    """Whatever the relay says in whatever order, a task finishes at most once."""
    current = Snapshot(TaskStatus.PENDING)
    finals = 0
    finished_as: TaskStatus | None = None
    for new, progress in answers:
        change = status.apply(current, observe(new, str(new), progress=progress))
        if change is None:
            continue
        finals += sum(e in status.FINAL_EVENTS.values() for e in change.events)
        if finished_as is not None:
            pytest.fail("a final task changed")
        current = change.after
        if current.status in FINAL:
            finished_as = current.status
            assert 1 == finals
        assert current.progress is None or 0 <= current.progress <= 100

    assert finals == (1 if finished_as is not None else 0)


def test_event_types_keep_the_names_receivers_see() -> None:
    """Each event type is sent, configured and filtered on by its exact ``type`` name."""
    expected = ["task.started", "task.progress", "task.completed", "task.failed", "task.canceled"]
    assert expected == [str(e) for e in status.EventType]
