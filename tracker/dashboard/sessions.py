"""Dashboard sign-in: tokens exchanged for sessions stored in the database, each with its own
CSRF token.

Stored, not kept in one daemon's memory: every daemon on the database knows every session
(behind a load balancer any host serves any page), a restart signs nobody out, and a sign-out
ends the session everywhere at once (a signed, stateless cookie could not be revoked). The
database holds nothing that opens a session or helps guess a token: a session's row is keyed
by a digest of the cookie's value, and keeps the token it signed in with as a MAC keyed by
that value. The sign-in throttle is the one part each daemon keeps for itself.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import hmac
import ipaddress
import re
import secrets
import threading
from collections.abc import Callable, Sequence

from tracker.store.sessions import SessionRows, StoredSession

#: the cookie that carries the session id
COOKIE = "tracker_session"
#: the cookie that carries the sign-in form's CSRF token, before any session exists
LOGIN_COOKIE = "tracker_login"
#: seconds a browser keeps the sign-in form's CSRF token after it last loaded the form
LOGIN_LIFETIME = 3600
#: sessions kept at most; the oldest go first (a flood of sign-ins cannot fill the table)
MAX_SESSIONS = 10_000
#: refused sign-ins one client may make within SIGN_IN_WINDOW before it must wait
MAX_SIGN_IN_FAILURES = 10
#: seconds over which refused sign-ins are counted, and that a blocked client waits at most
SIGN_IN_WINDOW = 60.0
#: clients whose refused sign-ins are remembered; the least recent are forgotten first
MAX_TRACKED_CLIENTS = 10_000
#: what a session's CSRF token is the MAC of; a token's MAC is of SIGN_IN_PREFIX and the
#: token, so neither can be the other
CSRF_MESSAGE = "csrf"
SIGN_IN_PREFIX = "token:"
#: what a result page's signature is the MAC of: this prefix and the result, so it can be
#: neither of the above
OUTCOME_PREFIX = "outcome:"
#: what ``login_csrf`` makes: 32 random bytes, URL-safe base64
_LOGIN_CSRF = re.compile(r"[A-Za-z0-9_-]{43}")


@dataclasses.dataclass(frozen=True, slots=True)
class Session:
    """One signed-in browser."""

    #: the cookie's value
    id: str
    expires_at: float  #: epoch seconds
    #: the token it signed in with, as a MAC keyed by ``id``: the session lasts only while
    #: that token does
    token_mac: str

    @property
    def csrf(self) -> str:
        """The token its forms carry: made from its id, so every daemon knows it."""
        return _mac(self.id, CSRF_MESSAGE)

    def sign(self, outcome: str) -> str:
        """The signature of a result page's ``outcome``: only this session's daemons make it
        (it is keyed by the cookie, which no page shows), so a made-up result is not shown."""
        return _mac(self.id, OUTCOME_PREFIX + outcome)

    def signed(self, outcome: str, signature: str) -> bool:
        """Whether ``signature`` is this session's for ``outcome`` (``sign``)."""
        return hmac.compare_digest(signature.encode(), self.sign(outcome).encode())

    def signed_in_with(self, tokens: Sequence[str]) -> bool:
        """Whether the token it signed in with is one of ``tokens``."""
        matches = [hmac.compare_digest(_token_mac(self.id, t), self.token_mac) for t in tokens]
        return any(matches)


def _mac(session_id: str, message: str) -> str:
    return hmac.new(session_id.encode(), message.encode(), hashlib.sha256).hexdigest()


def _token_mac(session_id: str, token: str) -> str:
    return _mac(session_id, SIGN_IN_PREFIX + token)


def _key(session_id: str) -> str:
    """A session's key in the database: what a reader of it cannot turn into a cookie."""
    return hashlib.sha256(session_id.encode()).hexdigest()


def login_csrf(cookie: str | None) -> str:
    """The sign-in form's CSRF token for a browser whose login cookie holds ``cookie``: that
    one while the browser keeps it (every sign-in form it has open carries the same token, so
    each of them works), a new one when it has none or one this module did not make."""
    if cookie is not None and _LOGIN_CSRF.fullmatch(cookie):
        return cookie
    return secrets.token_urlsafe(32)


def tokens_match(presented: str, accepted: Sequence[str]) -> bool:
    """Whether ``presented`` is one of ``accepted``, in time that does not depend on which."""
    given = presented.encode()
    matches = [hmac.compare_digest(given, token.encode()) for token in accepted]
    return any(matches)


class Sessions:
    """The live sessions, in the database (each call a transaction: run it off the loop).

    A session lives for ``lifetime`` seconds from its sign-in, as this daemon is configured:
    a shorter ``session_lifetime`` shortens the sessions already given out too.
    """

    def __init__(
        self,
        rows: SessionRows,
        lifetime: float,
        now: Callable[[], float],
        *,
        keep: int = MAX_SESSIONS,
    ) -> None:
        self.lifetime = lifetime
        #: sessions kept at most; the oldest go first
        self.keep = keep
        self._rows = rows
        self._now = now

    def start(self, token: str) -> Session:
        """A new session for a browser that signed in with ``token`` ("" when none is needed),
        valid for ``lifetime`` seconds while that token stays accepted."""
        now = self._now()
        session_id = secrets.token_urlsafe(32)
        session = Session(session_id, now + self.lifetime, _token_mac(session_id, token))
        stored = StoredSession(_key(session_id), session.token_mac, now)
        self._rows.add_session(stored, born_after=now - self.lifetime, keep=self.keep)
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id, None when unknown or expired."""
        if not session_id:
            return None
        stored = self._rows.find_session(_key(session_id), self._now() - self.lifetime)
        if stored is None:
            return None
        return Session(session_id, stored.issued_at + self.lifetime, stored.token_mac)

    def end(self, session_id: str) -> None:
        """Sign out: end the session on every daemon."""
        self._rows.remove_session(_key(session_id))

    def count(self) -> int:
        """Sessions live now (a query: not a ``len()``, which reads as free)."""
        return self._rows.count_sessions(self._now() - self.lifetime)


def client_key(host: str) -> str:
    """What the throttle counts a client by: its address, or for IPv6 its /64, which one
    client owns whole (an IPv4 address written as IPv6 counts as that IPv4 address)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))
    return host


class SignInThrottle:
    """Refused sign-ins per client address: past MAX_SIGN_IN_FAILURES within SIGN_IN_WINDOW
    seconds, the client is turned away without its token being looked at until the oldest of
    them leaves the window, so a token cannot be guessed at the speed of the network.

    The sign-in asks ``wait`` and counts a refusal with nothing awaited in between, so
    sign-ins sent at once check no more tokens than sign-ins sent one after another. IPv6
    clients are counted by their /64 (``client_key``).
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self._now = now
        self._lock = threading.Lock()
        #: client -> times of its refused sign-ins within the window, oldest first
        self._failures: dict[str, collections.deque[float]] = {}

    def wait(self, client: str) -> float:
        """Seconds ``client`` must wait before its next sign-in is looked at (0: none)."""
        with self._lock:
            return self._wait(client_key(client))

    def refused(self, client: str) -> bool:
        """Count one refused sign-in of ``client``; True when it makes the client wait."""
        key = client_key(client)
        with self._lock:
            failures = self._recent(key)
            if failures is None:
                while len(self._failures) >= MAX_TRACKED_CLIENTS:
                    del self._failures[next(iter(self._failures))]
                failures = self._failures[key] = collections.deque()
            else:
                # Most recently refused last, so the least recent are forgotten first.
                self._failures[key] = self._failures.pop(key)
            failures.append(self._now())
            while len(failures) > MAX_SIGN_IN_FAILURES:
                failures.popleft()
            return len(failures) == MAX_SIGN_IN_FAILURES

    def _wait(self, key: str) -> float:
        failures = self._recent(key)
        if failures is None or len(failures) < MAX_SIGN_IN_FAILURES:
            return 0.0
        return max(failures[0] + SIGN_IN_WINDOW - self._now(), 0.0)

    def _recent(self, key: str) -> collections.deque[float] | None:
        failures = self._failures.get(key)
        if failures is None:
            return None
        horizon = self._now() - SIGN_IN_WINDOW
        while failures and failures[0] <= horizon:
            failures.popleft()
        return failures


def csrf_ok(session: Session, presented: str | None) -> bool:
    """Whether a form's CSRF field carries this session's token."""
    return presented is not None and hmac.compare_digest(presented.encode(), session.csrf.encode())
