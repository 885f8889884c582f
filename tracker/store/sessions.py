"""The dashboard's sign-in sessions: rows every daemon on the database shares."""

from __future__ import annotations

import dataclasses

import sqlalchemy as sa

from tracker.store.base import SqlBase, dashboard_sessions


@dataclasses.dataclass(frozen=True, slots=True)
class SessionRow:
    """A stored session: what tracker/dashboard/sessions.py keeps of one."""

    #: digest of the cookie's value (the value itself is stored nowhere)
    key: str
    #: the token it signed in with, as a MAC keyed by the cookie's value
    token_mac: str
    #: epoch seconds
    expires_at: float


class SessionRows(SqlBase):
    """The dashboard's sessions, live until they expire or are removed."""

    def add_session(self, row: SessionRow, *, now: float, keep: int) -> None:
        """Store ``row``; the sessions expired by ``now`` go, and the oldest beyond ``keep``
        (a flood of sign-ins cannot fill the table)."""
        table = dashboard_sessions
        with self._write() as conn:
            conn.execute(table.delete().where(table.c.expires_at <= now))
            held = conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            if held >= keep:
                # Every session lives as long: the first to expire is the oldest.
                oldest = (
                    sa.select(table.c.key)
                    .order_by(table.c.expires_at, table.c.key)
                    .limit(held - keep + 1)
                )
                conn.execute(table.delete().where(table.c.key.in_(oldest.scalar_subquery())))
            conn.execute(table.insert().values(dataclasses.asdict(row)))

    def find_session(self, key: str, now: float) -> SessionRow | None:
        """The session stored under ``key``, None when there is none or it expired by ``now``."""
        table = dashboard_sessions
        query = sa.select(table.c.key, table.c.token_mac, table.c.expires_at).where(
            table.c.key == key, table.c.expires_at > now
        )
        with self._read() as conn:
            found = conn.execute(query).first()
        return None if found is None else SessionRow(*found)

    def remove_session(self, key: str) -> None:
        """End the session stored under ``key`` (sign-out), on every daemon at once."""
        with self._write() as conn:
            conn.execute(dashboard_sessions.delete().where(dashboard_sessions.c.key == key))

    def count_sessions(self, now: float) -> int:
        """Sessions live at ``now``."""
        table = dashboard_sessions
        query = sa.select(sa.func.count()).select_from(table).where(table.c.expires_at > now)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())
