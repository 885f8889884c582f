"""Row counts kept by triggers, and the indexes retention and the figures read.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# (table, kind, the column counted, the platform expression) for each counted table.
COUNTED = (
    ("tasks", "task", "status", "{row}.platform"),
    ("deliveries", "delivery", "state", "''"),
)

SQLITE_TRIGGERS = """
CREATE TRIGGER tracker_count_{kind}_insert AFTER INSERT ON {table} BEGIN
    INSERT INTO tracker_counts (kind, platform, status, n)
    VALUES ('{kind}', {new_platform}, NEW.{column}, 1);
END;
CREATE TRIGGER tracker_count_{kind}_delete AFTER DELETE ON {table} BEGIN
    INSERT INTO tracker_counts (kind, platform, status, n)
    VALUES ('{kind}', {old_platform}, OLD.{column}, -1);
END;
CREATE TRIGGER tracker_count_{kind}_update AFTER UPDATE OF {column}, platform ON {table}
WHEN OLD.{column} IS NOT NEW.{column} OR OLD.platform IS NOT NEW.platform BEGIN
    INSERT INTO tracker_counts (kind, platform, status, n)
    VALUES ('{kind}', {old_platform}, OLD.{column}, -1),
           ('{kind}', {new_platform}, NEW.{column}, 1);
END
"""

POSTGRESQL_TRIGGERS = """
CREATE FUNCTION tracker_count_{kind}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP <> 'INSERT' THEN
        INSERT INTO tracker_counts (kind, platform, status, n)
        VALUES ('{kind}', {old_platform}, OLD.{column}, -1);
    END IF;
    IF TG_OP <> 'DELETE' THEN
        INSERT INTO tracker_counts (kind, platform, status, n)
        VALUES ('{kind}', {new_platform}, NEW.{column}, 1);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER tracker_count_{kind}_insert_delete AFTER INSERT OR DELETE ON {table}
FOR EACH ROW EXECUTE FUNCTION tracker_count_{kind}();
CREATE TRIGGER tracker_count_{kind}_update AFTER UPDATE OF {column}, platform ON {table}
FOR EACH ROW WHEN (OLD.{column} IS DISTINCT FROM NEW.{column}
                   OR OLD.platform IS DISTINCT FROM NEW.platform)
EXECUTE FUNCTION tracker_count_{kind}()
"""


def upgrade() -> None:
    """Create tracker_counts, its triggers and the counts of the rows already there."""
    op.create_table(
        "tracker_counts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("platform", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_tracker_counts_key", "tracker_counts", ["kind", "platform", "status", "n"])
    op.create_index("ix_tasks_finished_at", "tasks", ["finished_at"])
    op.create_index("ix_deliveries_state_created", "deliveries", ["state", "created_at"])
    op.create_index("ix_deliveries_delivered_at", "deliveries", ["delivered_at"])
    template = (
        POSTGRESQL_TRIGGERS if op.get_bind().dialect.name == "postgresql" else SQLITE_TRIGGERS
    )
    for table, kind, column, platform in COUNTED:
        ddl = template.format(
            table=table,
            kind=kind,
            column=column,
            new_platform=platform.format(row="NEW"),
            old_platform=platform.format(row="OLD"),
        )
        # One statement at a time: neither driver runs several in one execute. Each starts
        # with CREATE at the start of a line (the PostgreSQL function body has none).
        for statement in ("\n" + ddl.strip()).split("\nCREATE ")[1:]:
            op.execute("CREATE " + statement.strip().rstrip(";"))
        # Creating the triggers locked the table against writers (PostgreSQL), and SQLite's
        # write transaction holds the whole database: no row slips between them and this.
        keys = column if table == "deliveries" else f"platform, {column}"
        op.execute(
            f"INSERT INTO tracker_counts (kind, platform, status, n) "  # noqa: S608 - constants
            f"SELECT '{kind}', {platform.format(row=table)}, {column}, count(*) "
            f"FROM {table} GROUP BY {keys}"
        )


def downgrade() -> None:
    """Not supported: restore the backup taken before upgrading."""
    raise NotImplementedError("tracker migrations go forward only")
