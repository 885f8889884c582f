"""The retention policy: how long finished work is kept, and the job that prunes the rest."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import sqlalchemy as sa
import structlog

from tracker.clock import Clock
from tracker.config import RetentionSettings
from tracker.store import prune
from tracker.store.prune import Cutoffs, Kind, Pruned

log = structlog.get_logger("tracker.retention")

#: what goes first: deliveries on their own, then tasks whose deliveries are all gone or due
ORDER = (Kind.DELIVERED, Kind.DEAD, Kind.TASKS)


def cutoffs(settings: RetentionSettings, now: datetime) -> Cutoffs:
    """The moments before which each kind of row may go (None: kept forever)."""

    def before(days: float) -> datetime | None:
        return now - timedelta(days=days) if days > 0 else None

    return Cutoffs(
        delivered=before(settings.delivered_days),
        dead=before(settings.dead_days),
        tasks=before(settings.final_tasks_days),
    )


def preview(engine: sa.Engine, settings: RetentionSettings, now: datetime) -> Pruned:
    """What a run would delete now, deleting nothing."""
    return prune.preview(engine, cutoffs(settings, now))


def run(engine: sa.Engine, settings: RetentionSettings, now: datetime) -> Pruned:
    """Prune everything due, batch after batch, each batch its own short transaction."""
    limits = cutoffs(settings, now)
    total = Pruned()
    for kind in ORDER:
        more = True
        while more:
            done, more = prune.batch(engine, kind, limits, settings.batch_size)
            total += done
    return total


async def run_async(
    engine: sa.Engine, settings: RetentionSettings, clock: Clock, stop: asyncio.Event
) -> Pruned:
    """``run`` for the daemon: batches in a worker thread, stopping between two when asked."""
    limits = cutoffs(settings, clock.now())
    total = Pruned()
    for kind in ORDER:
        more = True
        while more and not stop.is_set():
            done, more = await asyncio.to_thread(
                prune.batch, engine, kind, limits, settings.batch_size
            )
            total += done
    if total.rows:
        log.info(
            "retention_pruned",
            deliveries=total.deliveries,
            attempts=total.attempts,
            tasks=total.tasks,
            transitions=total.transitions,
        )
    return total
