"""The outbox side of the store: delivery claims, attempt results, reads and re-queues."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
import structlog

from tracker import sanitize
from tracker.retry import DeliveryState
from tracker.status import EventType
from tracker.store import records
from tracker.store.base import (
    SqlBase,
    _describe_error,
    _epoch,
    _from_epoch,
    _is_row_error,
    attempts,
    chunks,
    deliveries,
    one_of,
    tasks,
)
from tracker.store.refusals import RefusalMemory, _isolated
from tracker.store.rows import _cut, _delivery_record, _page, _with_logs

log = structlog.get_logger("tracker.store")

#: seconds a delivery whose attempt cannot be recorded at all waits before it is sent again
#: (at the soonest; later if its retry schedule says so)
UNRECORDED_WAIT = 3600.0


class Outbox(SqlBase):
    """Webhook deliveries: claims and their leases, attempt results, reads, re-queues."""

    def release_claims(self) -> int:
        """Free every delivery lease (a single daemon starting: no one else holds them)."""
        with self._write() as conn:
            done = conn.execute(
                deliveries.update()
                .where(
                    deliveries.c.claimed_until.is_not(None),
                    deliveries.c.state == DeliveryState.PENDING,
                )
                .values(claimed_until=None)
            )
        return int(done.rowcount)

    # -- the delivery loop ------------------------------------------------------------------

    def claim_deliveries(
        self, now: datetime, limit: int, *, lease: float
    ) -> list[records.DeliveryJob]:
        """Take up to ``limit`` due deliveries, oldest first, for ``lease`` seconds.

        A delivery waits while an earlier event of the same task is still pending, so each
        receiver sees a task's events in the order they happened.
        """
        epoch = _epoch(now)
        until = epoch + lease
        rows = self._claim(_due_deliveries(epoch, limit), deliveries.c.claimed_until, until)
        return [_job(r, until) for r in rows]

    def extend_claims(self, claims: Mapping[int, float], until: float) -> set[int]:
        """Move to ``until`` the lease of each delivery still claimed under its token (id ->
        the lease's end as claimed or last extended); returns the ids it moved.

        The others were taken over by another claim after their lease lapsed, re-queued, or
        removed: their holder must not send them, and its results no longer move them on.
        """
        if not claims:
            return set()
        with self._write() as conn:
            current = self._current(conn, deliveries.c.claimed_until, set(claims))
            held = sorted(pk for pk, token in claims.items() if current.get(pk) == token)
            for chunk in chunks(held):
                conn.execute(
                    deliveries.update()
                    .where(one_of(conn, deliveries.c.id, chunk))
                    .values(claimed_until=until)
                )
        return set(held)

    def finish_attempts(self, results: Sequence[records.AttemptResult]) -> None:
        """Log attempts and move their deliveries on, in one transaction.

        A delivery removed meanwhile (its task was deleted) is skipped, so one removal does
        not fail the results of the whole batch. A result whose claim no longer holds its
        delivery (``job.lease_until`` is not the lease's end any more: the lease lapsed and
        another claim took it, or it was re-queued) is logged as an attempt but moves nothing:
        the state and the retry schedule belong to whoever holds the delivery now. A result
        whose own values the database refuses is written again without the receiver's answer
        text, and the others without it; one that cannot be recorded even so sets its delivery
        aside for UNRECORDED_WAIT, so it is not sent again at every lease's end. Each is logged
        once per delivery and reason.
        """
        if results:
            _isolated(results, self._finish_once, self._refused_result, self._accepted_results)

    @functools.cached_property
    def _result_refusals(self) -> RefusalMemory:
        return RefusalMemory()

    def _refused_result(self, result: records.AttemptResult, exc: Exception) -> int:
        job = result.job
        reason = _describe_error(exc)
        if self._result_refusals.first(job.pk, reason):
            log.error(
                "attempt_write_refused",
                webhook_id=job.webhook_id,
                task_id=job.task_id,
                error=reason,
            )
        error = None if result.error is None else sanitize.clean_text(result.error, 500)
        plain = dataclasses.replace(result, response_excerpt="", error=error)
        try:
            written = self._finish_once([plain])
        except Exception as again:
            if not _is_row_error(again):
                raise
            self._set_delivery_aside(result, _describe_error(again))
            return 0
        if result.state != DeliveryState.PENDING:
            self._result_refusals.forget(job.pk)  # no attempt follows
        return written

    def _set_delivery_aside(self, result: records.AttemptResult, reason: str) -> None:
        """Plan the next attempt of a delivery whose attempt no write can record, and end
        its claim: only times are written, which no answer can make the database refuse."""
        job = result.job
        until = max(result.next_attempt_at or 0.0, _epoch(result.at) + UNRECORDED_WAIT)
        with self._write() as conn:
            held = deliveries.c.state == DeliveryState.PENDING
            if job.lease_until is not None:  # not once another claim took it over
                held &= deliveries.c.claimed_until == job.lease_until
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id == job.pk, held)
                .values(next_attempt_at=until, claimed_until=None)
            )
        if self._result_refusals.first(job.pk, f"unrecorded: {reason}"):
            log.error(
                "attempt_unrecorded",
                webhook_id=job.webhook_id,
                task_id=job.task_id,
                error=reason,
                next_attempt=datetime.fromtimestamp(until, UTC).isoformat(),
            )

    def _accepted_results(self, results: Sequence[records.AttemptResult]) -> None:
        # A delivery whose answer is stored again is forgotten: a later refusal is news.
        if self._result_refusals:
            for result in results:
                self._result_refusals.forget(result.job.pk)

    def _finish_once(self, results: Sequence[records.AttemptResult]) -> int:
        with self._write() as conn:
            live = self._current(conn, deliveries.c.claimed_until, {r.job.pk for r in results})
            results = [r for r in results if r.job.pk in live]
            if not results:
                return 0
            # The compare-and-set: the lease read under lock, checked against the claim's token.
            held: list[records.AttemptResult] = []
            lost: list[records.AttemptResult] = []
            for r in results:
                (held if r.job.lease_until in (None, live[r.job.pk]) else lost).append(r)
            if lost:
                log.warning(
                    "attempts_after_takeover", webhook_ids=sorted({r.job.webhook_id for r in lost})
                )
            conn.execute(
                attempts.insert(),
                [
                    {
                        "delivery_pk": r.job.pk,
                        "at": r.at,
                        "url": r.job.url,
                        "status_code": r.status_code,
                        "error": r.error,
                        "latency_ms": r.latency_ms,
                        "response_excerpt": r.response_excerpt,
                    }
                    for r in results
                ],
            )
            if held:
                conn.execute(_FINISH, [_finish_values(r) for r in held])
        return len(results)

    def next_delivery_at(self) -> datetime | None:
        """When the earliest pending delivery falls due (None when none is pending)."""
        with self._read() as conn:
            value = conn.execute(
                sa.select(sa.func.min(deliveries.c.next_attempt_at)).where(
                    deliveries.c.state == DeliveryState.PENDING
                )
            ).scalar()
        return _from_epoch(value)

    def get_delivery(self, pk: int) -> records.DeliveryRecord | None:
        """One delivery with its attempt log, None when unknown."""
        with self._read() as conn:
            row = conn.execute(sa.select(deliveries).where(deliveries.c.id == pk)).first()
            if row is None:
                return None
            log = conn.execute(
                sa.select(attempts).where(attempts.c.delivery_pk == pk).order_by(attempts.c.id)
            ).all()
        return _delivery_record(row, log)

    def list_deliveries(
        self,
        *,
        state: DeliveryState | None = None,
        platform: str | None = None,
        task_id: str | None = None,
        limit: int = 50,
        before: int | None = None,
    ) -> tuple[list[records.DeliveryRecord], int | None]:
        """A page of deliveries, newest first, each with its attempt log."""
        if platform is not None and task_id is not None:
            # One task's deliveries through its row id: (task_pk, id) is indexed, the
            # (platform, task_id) copies on the delivery rows are not.
            task_pk = (
                sa.select(tasks.c.id)
                .where(tasks.c.platform == platform, tasks.c.task_id == task_id)
                .scalar_subquery()
            )
            query = _page(deliveries, limit, before, state=state).where(
                deliveries.c.task_pk == task_pk
            )
        else:
            query = _page(
                deliveries, limit, before, state=state, platform=platform, task_id=task_id
            )
        with self._read() as conn:
            rows, cursor = _cut(conn.execute(query).all(), limit)
            return _with_logs(conn, rows), cursor

    def requeue(
        self,
        now: datetime,
        *,
        pk: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[int]:
        """Send deliveries again with their own ``webhook-id``: one by id (any state), or every
        dead one created in [since, until). Returns the ids re-queued.

        Each starts the retry schedule again (``attempts`` back to 0; the attempt log keeps
        every earlier try): a delivery recovered after an outage gets the whole schedule, not
        one try and dead again at its first failure.
        """
        query = sa.select(deliveries.c.id)
        if pk is not None:
            query = query.where(deliveries.c.id == pk)
        else:
            query = query.where(deliveries.c.state == DeliveryState.DEAD)
            if since is not None:
                query = query.where(deliveries.c.created_at >= since)
            if until is not None:
                query = query.where(deliveries.c.created_at < until)
        if self.dialect == "postgresql":
            # Locked as read, in id order, so the ids returned are the rows updated: a row
            # pruned (or re-queued, when only dead ones are asked for) meanwhile is waited for,
            # then left out, not reported as re-queued. SQLite's writers take turns anyway.
            query = query.order_by(deliveries.c.id).with_for_update()
        # Acknowledged (202, or the CLI's word) once committed: synced to disk even on SQLite.
        with self._write(durable=True) as conn:
            pks = list(conn.execute(query).scalars())
            for chunk in chunks(pks):
                conn.execute(
                    deliveries.update()
                    .where(one_of(conn, deliveries.c.id, chunk))
                    .values(
                        state=DeliveryState.PENDING,
                        attempts=0,
                        next_attempt_at=_epoch(now),
                        claimed_until=None,
                        delivered_at=None,
                    )
                )
        return pks


# One statement for every finished attempt, run as an executemany.
_FINISH = (
    deliveries.update()
    .where(deliveries.c.id == sa.bindparam("pk_"))
    .values(
        state=sa.bindparam("state_"),
        # Where it went: an endpoint's delivery follows the endpoint's URL as configured.
        url=sa.bindparam("url_"),
        attempts=deliveries.c.attempts + 1,
        next_attempt_at=sa.func.coalesce(
            sa.bindparam("next_", type_=deliveries.c.next_attempt_at.type),
            deliveries.c.next_attempt_at,
        ),
        claimed_until=None,
        last_attempt_at=sa.bindparam("at_"),
        last_status_code=sa.bindparam("code_"),
        last_error=sa.bindparam("error_"),
        delivered_at=sa.bindparam("delivered_"),
    )
)


def _finish_values(result: records.AttemptResult) -> dict[str, Any]:
    """The parameters of _FINISH for one result."""
    delivered = result.at if result.state == DeliveryState.DELIVERED else None
    return {
        "pk_": result.job.pk,
        "state_": result.state,
        "url_": result.job.url,
        "next_": result.next_attempt_at,
        "at_": result.at,
        "code_": result.status_code,
        "error_": result.error,
        "delivered_": delivered,
    }


def _due_deliveries(epoch: float, limit: int) -> sa.Select[Any]:
    """Due pending deliveries not claimed, oldest first; none while an earlier event of its
    task is still pending, so each receiver sees a task's events in the order they happened."""
    earlier = deliveries.alias("earlier")
    blocked = (
        sa.select(earlier.c.id)
        .where(
            earlier.c.task_pk == deliveries.c.task_pk,
            earlier.c.state == DeliveryState.PENDING,
            earlier.c.id < deliveries.c.id,
        )
        # OFFSET 0 keeps this a per-row subplan on ix_deliveries_task: flattened into an
        # anti-join, PostgreSQL without fresh statistics chose a quadratic plan (seconds).
        .offset(0)
        .exists()
    )
    c = deliveries.c
    return (
        # Only what a DeliveryJob carries: each datetime column read costs a conversion.
        sa.select(
            c.id,
            c.webhook_id,
            c.task_pk,
            c.platform,
            c.task_id,
            c.event_type,
            c.payload,
            c.url,
            c.endpoint,
            c.guarded,
            c.attempts,
        )
        .where(
            deliveries.c.state == DeliveryState.PENDING,
            deliveries.c.next_attempt_at <= epoch,
            sa.or_(deliveries.c.claimed_until.is_(None), deliveries.c.claimed_until < epoch),
            ~blocked,
        )
        .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
        .limit(limit)
    )


def _job(row: Any, until: float) -> records.DeliveryJob:
    """A claimed delivery's row as the job the deliverer sends, leased until ``until``."""
    return records.DeliveryJob(
        pk=row.id,
        webhook_id=row.webhook_id,
        task_pk=row.task_pk,
        platform=row.platform,
        task_id=row.task_id,
        event_type=EventType(row.event_type),
        payload=row.payload.encode(),
        url=row.url,
        endpoint=row.endpoint,
        guarded=row.guarded,
        attempts=row.attempts,
        lease_until=until,
    )
