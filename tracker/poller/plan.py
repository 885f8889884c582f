"""What one answer means for each polled task, and when each is asked next (pure: no I/O)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from datetime import datetime

import structlog

from tracker import events, status
from tracker.config import PollSettings
from tracker.platforms.base import Glance, Platform
from tracker.platforms.observations import read_progress
from tracker.store.records import KEEP, DueTask, Keep, Replan, TaskUpdate

log = structlog.get_logger("tracker.poller")

NOT_FOUND_REASON = "not found upstream"

#: A poll answered later than this share of its back-off before the next planned one is
#: re-planned from the answer; otherwise the next poll would follow the late one too closely.
REPHASE_SHARE = 0.25
#: A poll that waited more than this many seconds within a drain (behind other due tasks) is
#: re-planned from its answer too. Tasks sharing one planned instant (a bulk registration)
#: are claimed one claim after another; keeping each one's phase would keep them in one burst
#: for good, and where a task falls in the burst moves with the load, so its gaps would swing
#: by the burst's length. Re-planned from their answers they spread into a steady flow. A
#: task already late when the drain started (the engine was held up) keeps its phase.
LATE_TOLERANCE = 1.0


def back_off(settings: PollSettings, now: float, last_change_at: float) -> float:
    """Seconds to the next poll: ``interval`` while the task moves, then a quarter of the time
    since it last moved, up to ``max_interval``."""
    quiet = (now - last_change_at) / 4
    return min(max(quiet, settings.interval), settings.max_interval)


def next_poll(
    planned: float,
    now: float,
    gap: float,
    started: float | None = None,
    asked: float | None = None,
) -> float:
    """The poll after one planned at ``planned`` and answered at ``now``, ``gap`` seconds on.

    Planned from the planned time, not from the answer, so the time a claim, a request and
    its record take never adds up from one poll to the next. A task answered so late that
    the next planned poll would follow within a quarter of ``gap`` (work beyond capacity, or
    a restart) starts a new phase from now instead, so no backlog is polled twice in a row;
    so does one that waited more than LATE_TOLERANCE in the drain that ``started`` then,
    before its request went out at ``asked`` (default ``now``): the relay's own time to
    answer is not waiting, and counted as such it would move every poll of a slow relay.
    """
    following = planned + gap
    if following < now + gap * REPHASE_SHARE:
        return now + gap
    sent = now if asked is None else asked
    if started is not None and sent - max(planned, started) > LATE_TOLERANCE:
        return now + gap
    return following


@dataclasses.dataclass(slots=True)
class Decided:
    """A batch's decisions: updates to record, and the next polls of answers that moved
    nothing."""

    updates: list[TaskUpdate] = dataclasses.field(default_factory=list)
    replans: list[Replan] = dataclasses.field(default_factory=list)


def _unmoved(task: DueTask, glance: Glance, statuses: Mapping[str, status.TaskStatus]) -> bool:
    """Whether ``glance`` says what ``task`` holds: `status.apply` would change nothing (the
    same word meaning the same status, no progress or the same), and the task was not missing.
    Anything else, even what apply would find unchanged, goes the full way.
    """
    snapshot = task.snapshot
    word = glance.word
    if (
        type(word) is not str
        or word != snapshot.upstream_status
        or task.missing_since is not None
        or statuses.get(word) is not snapshot.status
    ):
        return False
    if glance.progress is None:
        return True  # an answer without progress keeps the progress the task holds
    progress, upstream_progress = read_progress(glance.progress)
    return progress is None or (
        progress == snapshot.progress and upstream_progress == snapshot.upstream_progress
    )


class Planner:
    """Turns a relay's answer about a batch into a decision per task: a TaskUpdate, or a
    Replan where a glance shows the answer moved nothing."""

    def __init__(self, settings: PollSettings, targets: events.Targets) -> None:
        self.settings = settings
        self.targets = targets
        #: epoch seconds the current drain started (None outside one): see LATE_TOLERANCE
        self.drain_started: float | None = None

    def decide(
        self,
        platform: Platform,
        tasks: Sequence[DueTask],
        seen: Mapping[str, status.Observation | Glance],
        now: datetime,
        asked: datetime | None = None,
    ) -> Decided:
        """Every task of the batch gets a decision: at least its next poll (which ends the claim).

        ``seen`` is the answer by task id: observations, or glances at items (see `Glance`),
        answered at ``now`` to a request sent at ``asked`` (see `next_poll`). A claimed task
        whose glance shows the word and progress it holds moved nothing: only its next poll
        is decided (a Replan), with no Observation or TaskUpdate built.
        """
        epoch = now.timestamp()
        sent = None if asked is None else asked.timestamp()
        aside = self.set_aside_until(epoch)
        settings, started = self.settings, self.drain_started
        statuses = platform.statuses
        decided = Decided()
        updates, replans = decided.updates, decided.replans
        for task in tasks:
            found = seen.get(task.task_id)
            if found is None:
                updates.append(self._missing(task, now, sent))
                continue
            if isinstance(found, Glance):
                if task.claim is not None and _unmoved(task, found, statuses):
                    gap = back_off(settings, epoch, task.last_change_at)
                    planned = next_poll(task.planned, epoch, gap, started, sent)
                    following = self._hinted(found.wait_hint, epoch, planned)
                    replans.append(Replan(following, task.pk, task.claim.until))
                    continue
                observation = platform.observe_glance(found)
            else:
                observation = found
            if observation.status is None:
                log.warning(
                    "unknown_upstream_status",
                    platform=platform.name,
                    task_id=task.task_id,
                    upstream_status=observation.upstream_status,
                )
            change = status.apply(task.snapshot, observation)
            missing = None if task.missing_since is not None else KEEP
            moved = change is not None and (
                change.moved or change.after.progress != change.before.progress
            )
            last_change = epoch if moved else task.last_change_at
            gap = back_off(settings, epoch, last_change)
            planned = next_poll(task.planned, epoch, gap, started, sent)
            following = self._hinted(observation.wait_hint, epoch, planned)
            if change is None:
                # Positional, as keywords cost a third more on a path taken for nearly every
                # polled task whose platform does not glance.
                updates.append(TaskUpdate(task, None, (), missing, following, aside))
                continue
            target = self.targets.for_task(task)
            updates.append(
                TaskUpdate(
                    task,
                    change,
                    events.outbox_entries(task, change, target, now),
                    missing_since=missing,
                    next_poll_at=following,
                    set_aside_until=aside,
                )
            )
        return decided

    def set_aside_until(self, epoch: float) -> float:
        """When a task polled at ``epoch`` is asked again should the database refuse its
        update: after the longest back-off, so a value the database refuses costs one poll
        per ``max_interval``, not one per claim (about the relay's timeout)."""
        return epoch + self.settings.max_interval

    def unchanged(self, task: DueTask, now: datetime, asked: float | None = None) -> TaskUpdate:
        """Nothing learnt (a platform left the config): just the next poll, on plan."""
        epoch = now.timestamp()
        gap = back_off(self.settings, epoch, task.last_change_at)
        return TaskUpdate(
            task,
            next_poll_at=next_poll(task.planned, epoch, gap, self.drain_started, asked),
            set_aside_until=self.set_aside_until(epoch),
        )

    def later(self, task: DueTask, now: datetime, seconds: float) -> TaskUpdate:
        """Not asked now (its relay is paused, or has one request out after failures): asked
        again ``seconds`` on."""
        epoch = now.timestamp()
        return TaskUpdate(
            task, next_poll_at=epoch + seconds, set_aside_until=self.set_aside_until(epoch)
        )

    def retry(self, task: DueTask, now: datetime) -> TaskUpdate:
        """After an unusable answer: asked again one interval on, not after the back-off."""
        epoch = now.timestamp()
        return TaskUpdate(
            task,
            next_poll_at=epoch + self.settings.interval,
            set_aside_until=self.set_aside_until(epoch),
        )

    def expired(self, task: DueTask, now: datetime) -> TaskUpdate | None:
        """The give-up update when ``task`` has run past give_up_after, else None."""
        if (now - task.created_at).total_seconds() < self.settings.give_up_after:
            return None
        reason = f"gave up after {self.settings.give_up_after:g} s without a final status"
        return self._give_up(task, reason, now)

    def _hinted(self, hint: float | None, epoch: float, planned: float) -> float:
        # The upstream's own estimate moves the next poll, but only later, never past the cap.
        if hint is None or hint <= self.settings.interval:
            return planned
        return max(planned, epoch + min(hint, self.settings.max_interval))

    def _missing(self, task: DueTask, now: datetime, asked: float | None) -> TaskUpdate:
        epoch = now.timestamp()
        if task.missing_since is not None and (
            epoch - task.missing_since >= self.settings.not_found_after
        ):
            return self._give_up(task, NOT_FOUND_REASON, now)
        update = self.unchanged(task, now, asked)
        since: float | Keep = epoch if task.missing_since is None else KEEP
        return TaskUpdate(
            task,
            missing_since=since,
            next_poll_at=update.next_poll_at,
            set_aside_until=update.set_aside_until,
        )

    def _give_up(self, task: DueTask, reason: str, now: datetime) -> TaskUpdate:
        change = status.give_up(task.snapshot, reason)
        if change is None:  # claimed tasks are never final; kept for the type checker
            return self.unchanged(task, now)
        target = self.targets.for_task(task)
        entries = events.outbox_entries(task, change, target, now)
        aside = self.set_aside_until(now.timestamp())
        return TaskUpdate(task, change, entries, set_aside_until=aside)
