"""Dashboard sign-in: tokens exchanged for server-side sessions, each with its own CSRF token.

Sessions live in memory: a restart signs everyone out, which a single daemon can afford, and
sign-out takes effect at once (a signed, stateless cookie could not be revoked).
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable, Sequence

#: the cookie that carries the session id
COOKIE = "tracker_session"
#: the cookie that carries the sign-in form's CSRF token, before any session exists
LOGIN_COOKIE = "tracker_login"
#: sessions kept at most; the oldest go first (a flood of sign-ins cannot fill memory)
MAX_SESSIONS = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """One signed-in browser."""

    id: str
    csrf: str
    expires_at: float  #: epoch seconds
    #: digest of the token it signed in with: the session lasts only while that token does
    token_digest: str


def digest(token: str) -> str:
    """What a session remembers of its token (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


def tokens_match(presented: str, accepted: Sequence[str]) -> bool:
    """Whether ``presented`` is one of ``accepted``, in time that does not depend on which."""
    given = presented.encode()
    matches = [hmac.compare_digest(given, token.encode()) for token in accepted]
    return any(matches)


class Sessions:
    """The live sessions, by id."""

    def __init__(self, lifetime: float, now: Callable[[], float]) -> None:
        self.lifetime = lifetime
        self._now = now
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}

    def start(self, token_digest: str) -> Session:
        """A new session, valid for ``lifetime`` seconds while its token stays accepted."""
        session = Session(
            id=secrets.token_urlsafe(32),
            csrf=secrets.token_urlsafe(32),
            expires_at=self._now() + self.lifetime,
            token_digest=token_digest,
        )
        with self._lock:
            self._prune()
            while len(self._sessions) >= MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
            self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, None when unknown or expired."""
        if not session_id:
            return None
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None and session.expires_at <= self._now():
                del self._sessions[session_id]
                return None
        return session

    def end(self, session_id: str) -> None:
        """Sign out: forget the session."""
        with self._lock:
            self._sessions.pop(session_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)

    def _prune(self) -> None:
        now = self._now()
        for key in [k for k, s in self._sessions.items() if s.expires_at <= now]:
            del self._sessions[key]


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether a form's CSRF field carries this session's token."""
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())
