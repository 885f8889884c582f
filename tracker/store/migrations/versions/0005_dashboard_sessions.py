"""The dashboard's sign-in sessions in the database, so every daemon on it knows them.

Kept in each daemon's memory before, a session opened on one host was unknown to the others
behind a load balancer, and a restart signed everyone out.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create dashboard_sessions (empty: the sessions in memory end with the old release)."""
    op.create_table(
        "dashboard_sessions",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("token_mac", sa.String(length=64), nullable=False),
        sa.Column("issued_at", sa.Float(precision=53), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_index("ix_dashboard_sessions_issued_at", "dashboard_sessions", ["issued_at"])


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("tracker migrations go forward only")
