"""The next poll of each live task in a narrow table of its own (polls), not in tasks.

Every poll moves a task's next poll twice (the claim's lease, then the next plan). In tasks,
SQLite rewrote the whole row at each move, stored result included, and PostgreSQL added an
entry to every index of the table; a polls row is a key and a time.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlite3

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: SQLite learned ALTER TABLE ... DROP COLUMN in 3.35
SQLITE_DROP_COLUMN = (3, 35)


def upgrade() -> None:
    """Create polls from the live tasks' next polls, then retire tasks.next_poll_at."""
    op.create_table(
        "polls",
        sa.Column("task_pk", sa.Integer(), nullable=False),
        sa.Column("next_poll_at", sa.Float(precision=53), nullable=False),
        sa.ForeignKeyConstraint(["task_pk"], ["tasks.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("task_pk"),
    )
    op.execute(
        "INSERT INTO polls (task_pk, next_poll_at)"
        " SELECT id, next_poll_at FROM tasks WHERE next_poll_at IS NOT NULL"
    )
    op.create_index("ix_polls_next_poll_at", "polls", ["next_poll_at"])
    op.drop_index("ix_tasks_next_poll_at", table_name="tasks")
    if op.get_bind().dialect.name == "sqlite" and sqlite3.sqlite_version_info < SQLITE_DROP_COLUMN:
        # An older SQLite could only drop the column by copying the table, which would drop
        # the row-count triggers with it: the column stays, empty and never read again.
        op.execute("UPDATE tasks SET next_poll_at = NULL")
    else:
        op.drop_column("tasks", "next_poll_at")


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("tracker migrations go forward only")
