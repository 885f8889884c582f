"""Dashboard sign-in: tokens exchanged for server-side sessions, each with its own CSRF token.

Sessions live in memory: a restart signs everyone out, which a single daemon can afford, and
sign-out takes effect at once (a signed, stateless cookie could not be revoked).
"""

from __future__ import annotations

import collections
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
#: refused sign-ins one client may make within SIGN_IN_WINDOW before it must wait
MAX_SIGN_IN_FAILURES = 10
#: seconds over which refused sign-ins are counted, and that a blocked client waits at most
SIGN_IN_WINDOW = 60.0
#: clients whose refused sign-ins are remembered; the least recent are forgotten first
MAX_TRACKED_CLIENTS = 10_000


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


class SignInThrottle:
    """Refused sign-ins per client address: past MAX_SIGN_IN_FAILURES within SIGN_IN_WINDOW
    seconds, the client is turned away without its token being looked at until the oldest of
    them leaves the window, so a token cannot be guessed at the speed of the network.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._lock = threading.Lock()
        #: client -> times of its refused sign-ins within the window, oldest first
        self._failures: dict[str, collections.deque[float]] = {}

    def wait(self, client: str) -> float:
        """Seconds ``client`` must wait before its next sign-in is looked at (0: none)."""
        with self._lock:
            failures = self._recent(client)
            if failures is None or len(failures) < MAX_SIGN_IN_FAILURES:
                return 0.0
            return max(failures[0] + SIGN_IN_WINDOW - self._now(), 0.0)

    def refused(self, client: str) -> bool:
        """Count one refused sign-in of ``client``; True when it makes the client wait."""
        with self._lock:
            failures = self._recent(client)
            if failures is None:
                while len(self._failures) >= MAX_TRACKED_CLIENTS:
                    del self._failures[next(iter(self._failures))]
                failures = self._failures[client] = collections.deque()
            else:
                # Most recently refused last, so the least recent are forgotten first.
                self._failures[client] = self._failures.pop(client)
            failures.append(self._now())
            while len(failures) > MAX_SIGN_IN_FAILURES:
                failures.popleft()
            return len(failures) == MAX_SIGN_IN_FAILURES

    def _recent(self, client: str) -> collections.deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        horizon = self._now() - SIGN_IN_WINDOW
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether a form's CSRF field carries this session's token."""
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())
