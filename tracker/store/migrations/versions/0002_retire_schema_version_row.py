"""Mark the database as migration-managed, so release 0.1.0 refuses to open it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Release 0.1.0 starts only on schema_version 1; from here alembic_version says it all."""
    meta = sa.table("tracker_meta", sa.column("key"), sa.column("value"))
    op.execute(meta.update().where(meta.c.key == "schema_version").values(value="2"))


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("tracker migrations go forward only")
