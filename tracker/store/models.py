"""SQLModel tables: tasks, their transition history, the webhook outbox and its attempt log,
and the dashboard's sign-in sessions."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect
from sqlmodel import Field, SQLModel

from tracker.retry import DeliveryState


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes on every dialect (SQLite keeps no zone, so naive values mean UTC)."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Store as UTC; naive values are refused so local time never sneaks in."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Read back as aware UTC."""
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc(nullable: bool = False) -> Any:
    return Field(sa_type=UTCDateTime, nullable=nullable)


class TaskRow(SQLModel, table=True):
    """One tracked upstream task."""

    __tablename__ = "tasks"
    __table_args__ = (
        sa.UniqueConstraint("platform", "task_id", name="uq_tasks_platform_task_id"),
        sa.Index("ix_tasks_status_id", "status", "id"),
        # Retention finds final tasks past their keep time without reading the others.
        sa.Index("ix_tasks_finished_at", "finished_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    platform: str = Field(max_length=64)
    task_id: str = Field(max_length=200)
    status: str = Field(max_length=16)
    upstream_status: str | None = Field(default=None, max_length=64)
    progress: int | None = None
    upstream_progress: str | None = Field(default=None, max_length=64)
    fail_reason: str = Field(default="", sa_type=sa.Text)
    meta: dict[str, Any] | None = Field(default=None, sa_column=sa.Column("metadata", sa.JSON))
    webhook_url: str | None = Field(default=None, sa_type=sa.Text)
    endpoint: str | None = Field(default=None, max_length=64)
    events: list[str] | None = Field(default=None, sa_type=sa.JSON)
    result: dict[str, Any] | None = Field(default=None, sa_type=sa.JSON)
    created_at: datetime = _utc()
    updated_at: datetime = _utc()
    finished_at: datetime | None = _utc(nullable=True)
    #: epoch seconds of the last status or progress move, for the back-off
    last_change_at: float = Field(sa_type=sa.Float(precision=53))
    #: epoch seconds since the upstream started leaving this id out of its answers
    missing_since: float | None = Field(default=None, sa_type=sa.Float(precision=53))


class PollRow(SQLModel, table=True):
    """The next poll of one live task; a final task has none.

    A table of its own, not a column of tasks: every poll moves it twice (the claim's lease,
    then the next plan), and a write to the wide tasks row rewrites its stored result too
    (SQLite) or adds an entry to each of its indexes (PostgreSQL).
    """

    __tablename__ = "polls"
    __table_args__ = (
        # The poll cycle's only query: due tasks in due order.
        sa.Index("ix_polls_next_poll_at", "next_poll_at"),
    )

    task_pk: int = Field(
        sa_column=sa.Column(
            sa.Integer, sa.ForeignKey("tasks.id", ondelete="CASCADE"), primary_key=True
        )
    )
    #: epoch seconds of the next poll; while a claim holds the task, the end of its lease
    next_poll_at: float = Field(sa_type=sa.Float(precision=53))


class TransitionRow(SQLModel, table=True):
    """One status change of a task, in the order it happened."""

    __tablename__ = "transitions"

    id: int | None = Field(default=None, primary_key=True)
    task_pk: int = Field(
        sa_column=sa.Column(sa.ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    )
    from_status: str = Field(max_length=16)
    to_status: str = Field(max_length=16)
    upstream_status: str | None = Field(default=None, max_length=64)
    progress: int | None = None
    at: datetime = _utc()


class DeliveryRow(SQLModel, table=True):
    """One webhook event for one target: the outbox row and its delivery state."""

    __tablename__ = "deliveries"
    __table_args__ = (
        sa.Index("ix_deliveries_due", "state", "next_attempt_at"),
        sa.Index("ix_deliveries_task", "task_pk", "id"),
        # The oldest pending delivery (a gauge) in one index lookup, and dead ones by age.
        sa.Index("ix_deliveries_state_created", "state", "created_at"),
        # Retention finds delivered deliveries past their keep time without a scan.
        sa.Index("ix_deliveries_delivered_at", "delivered_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    webhook_id: str = Field(max_length=64, unique=True)
    task_pk: int = Field(sa_column=sa.Column(sa.ForeignKey("tasks.id", ondelete="CASCADE")))
    platform: str = Field(max_length=64)
    task_id: str = Field(max_length=200)
    event_type: str = Field(max_length=32)
    #: the exact bytes that are signed and sent, so every attempt carries the same body
    payload: str = Field(sa_type=sa.Text)
    url: str = Field(sa_type=sa.Text)
    endpoint: str | None = Field(default=None, max_length=64)
    #: the URL came through the API, so every connection is checked against the SSRF guard
    guarded: bool = False
    state: str = Field(default=DeliveryState.PENDING.value, max_length=16)
    attempts: int = 0
    next_attempt_at: float = Field(sa_type=sa.Float(precision=53))
    claimed_until: float | None = Field(default=None, sa_type=sa.Float(precision=53))
    created_at: datetime = _utc()
    last_attempt_at: datetime | None = _utc(nullable=True)
    last_status_code: int | None = None
    last_error: str | None = Field(default=None, sa_type=sa.Text)
    delivered_at: datetime | None = _utc(nullable=True)


class AttemptRow(SQLModel, table=True):
    """One try at delivering one event: the delivery log."""

    __tablename__ = "delivery_attempts"

    id: int | None = Field(default=None, primary_key=True)
    delivery_pk: int = Field(
        sa_column=sa.Column(sa.ForeignKey("deliveries.id", ondelete="CASCADE"), index=True)
    )
    at: datetime = _utc()
    url: str = Field(sa_type=sa.Text)
    status_code: int | None = None
    error: str | None = Field(default=None, sa_type=sa.Text)
    latency_ms: float = 0.0
    response_excerpt: str = Field(default="", sa_type=sa.Text)


class MetaRow(SQLModel, table=True):
    """Key/value facts about the database and the daemons using it."""

    __tablename__ = "tracker_meta"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=255)


class DashboardSessionRow(SQLModel, table=True):
    """One signed-in dashboard browser, shared by every daemon on the database.

    Nothing here opens a session or helps guess a token: the key is a digest of the cookie's
    value, and the token is kept as a MAC keyed by that value (see tracker/dashboard/sessions.py).
    """

    __tablename__ = "dashboard_sessions"
    __table_args__ = (sa.Index("ix_dashboard_sessions_issued_at", "issued_at"),)

    key: str = Field(primary_key=True, max_length=64)
    token_mac: str = Field(max_length=64)
    #: epoch seconds; it expires by the session_lifetime of the daemon that reads it
    issued_at: float = Field(sa_type=sa.Float(precision=53))


class CountRow(SQLModel, table=True):
    """A change to a row count, +n or -n; per key, their sum is the count.

    Written by database triggers on tasks and deliveries (see tracker/store/counts.py), never
    by tracker's code, so every path that adds, removes or moves a row keeps the counts right.
    """

    __tablename__ = "tracker_counts"
    __table_args__ = (
        # Reading the counts is an index-only scan, whatever size a burst of changes left the
        # table at: PostgreSQL keeps the pages of folded rows, and a sequential scan reads them.
        sa.Index("ix_tracker_counts_key", "kind", "platform", "status", "n"),
    )

    # 64-bit on PostgreSQL: two rows per change add up over years. SQLite's INTEGER PRIMARY
    # KEY is 64-bit already (and BIGINT would not be its rowid).
    id: int | None = Field(
        default=None,
        sa_column=sa.Column(sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
    )
    #: "task" (counted by platform and status) or "delivery" (by state; platform is "")
    kind: str = Field(max_length=16)
    platform: str = Field(max_length=64)
    status: str = Field(max_length=16)
    n: int
