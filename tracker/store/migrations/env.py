"""Alembic's entry point: runs the migrations on the connection tracker hands it.

``tracker db upgrade`` (tracker/store/migrate.py) opens the connection, takes the lock and
passes the connection in; the ``alembic`` command line (for writing new revisions, see
alembic.ini at the top of the repository) gets a URL instead.
"""

from __future__ import annotations

from typing import Any, Literal

import sqlalchemy as sa
from alembic import context
from alembic.autogenerate.api import AutogenContext
from sqlmodel import SQLModel
from sqlmodel.sql.sqltypes import AutoString

from tracker.store.engine import make_engine
from tracker.store.models import UTCDateTime


def _render_item(kind: str, obj: Any, _context: AutogenContext) -> str | Literal[False]:
    """Write the plain SQL types behind the models' own, so a revision never imports them."""
    if kind == "type" and isinstance(obj, UTCDateTime):
        return "sa.DateTime(timezone=True)"
    if kind == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})"
    return False


def _run(connection: sa.Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=SQLModel.metadata,
        # SQLite alters a table by copying it; batch mode writes that copy for us.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        render_item=_render_item,
    )
    with context.begin_transaction():
        context.run_migrations()


def main() -> None:
    """Run against the given connection, or a URL from the alembic command line."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    if not url:
        raise SystemExit("give the database: alembic -x url=sqlite:///dev.db ...")
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


main()
