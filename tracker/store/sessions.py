"""The dashboard's sign-in sessions: rows every daemon on the database shares."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from tracker.store.base import SqlBase, dashboard_sessions

#: PostgreSQL advisory lock held while a sign-in stores its session: daemons signing browsers
#: in at once take turns, so the bound on sessions holds and no two trims cross
SIGN_IN_LOCK_KEY = 868687


@dataclasses.dataclass(frozen=True, slots=True)
class StoredSession:
    """What the database keeps of a session (see tracker/dashboard/sessions.py)."""

    #: digest of the cookie's value (the value itself is stored nowhere)
    key: str
    #: the token it signed in with, as a MAC keyed by the cookie's value
    token_mac: str
    #: epoch seconds; the session lives for the lifetime the daemon reading it is configured
    #: with, so a shorter ``session_lifetime`` shortens the sessions already given out
    issued_at: float


class SessionRows(SqlBase):
    """The dashboard's sessions, live until their lifetime passes or they are removed."""

    def add_session(self, session: StoredSession, *, born_after: float, keep: int) -> None:
        """Store ``session``; those issued at or before ``born_after`` (expired) go, and the
        oldest beyond ``keep`` (a flood of sign-ins cannot fill the table)."""
        table = dashboard_sessions
        with self._write() as conn:
            if self.dialect == "postgresql":
                conn.execute(
                    sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": SIGN_IN_LOCK_KEY}
                )
            conn.execute(table.delete().where(table.c.issued_at <= born_after))
            held = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            if held >= keep:
                oldest = (
                    sa.select(table.c.key)
                    .order_by(table.c.issued_at, table.c.key)
                    .limit(held - keep + 1)
                )
                conn.execute(table.delete().where(table.c.key.in_(oldest.scalar_subquery())))
            conn.execute(table.insert().values(dataclasses.asdict(session)))

    def find_session(self, key: str, born_after: float) -> StoredSession | None:
        """The session stored under ``key`` if it was issued after ``born_after`` (None when
        there is none, or it expired)."""
        table = dashboard_sessions
        query = sa.select(table.c.key, table.c.token_mac, table.c.issued_at).where(
            table.c.key == key, table.c.issued_at > born_after
        )
        with self._read() as conn:
            found = conn.execute(query).first()
        return None if found is None else StoredSession(*found)

    def remove_session(self, key: str) -> None:
        """End the session stored under ``key`` (sign-out), on every daemon at once."""
        with self._write() as conn:
            conn.execute(dashboard_sessions.delete().where(dashboard_sessions.c.key == key))

    def count_sessions(self, born_after: float) -> int:
        """Sessions issued after ``born_after``: those live."""
        table = dashboard_sessions
        query = sa.select(sa.func.count()).select_from(table).where(table.c.issued_at > born_after)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())
