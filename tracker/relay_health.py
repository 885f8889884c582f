"""Relay problems only a human can fix (a refused key, a relay gone, refusing every request or
answering nothing usable for long), for /readyz."""

from __future__ import annotations

import dataclasses

import httpx

from tracker.clock import Clock
from tracker.platforms import DEFAULT_UPSTREAM
from tracker.platforms.base import Upstream, UpstreamError
from tracker.poller.drain import MAX_RELAY_PAUSE
from tracker.sanitize import without_userinfo

#: a relay that gave no answer for this many poll intervals makes the daemon not ready
UNREACHABLE_INTERVALS = 3
#: answers that mean the relay refused our key
REFUSED = frozenset({401, 403})
#: the answer of a relay that wants fewer requests
TOO_MANY = 429


@dataclasses.dataclass(slots=True)
class _Relay:
    """What the latest requests to one relay came to; times are `Clock.monotonic` seconds,
    so a step of the wall clock neither hides a silence nor makes one up."""

    where: str  #: the config section, e.g. "upstream" or "upstreams.second"
    asked: float  #: when the latest request to it ended (with or without an answer)
    timeout: float  #: its requests' timeout, as of that request
    refused: int | None = None  #: the status code of a refusal not followed by an answer
    silent_since: float | None = None  #: first request without an answer since the last
    error: str = ""  #: why the last request got no answer
    #: first 429 Too Many Requests since the last other answer: its pauses keep the relay's
    #: tasks planned ahead, so the poll lag does not show a relay that refuses every request
    limited_since: float | None = None
    #: first request without a usable answer (of any kind) since the last usable one: a relay
    #: answering only 500, or 503 with a Retry-After that pauses it, moves no task, and its
    #: tasks, asked again on plan, show no lag either
    failing_since: float | None = None
    failure: str = ""  #: what the last request without a usable answer got


class RelayHealth:
    """The outcome of the latest requests to each relay, reported once per request.

    Speaks only of relays that are being asked: one no request has ended at for longer than
    it takes to ask it again (`stale_after`) is not named, whatever its last outcome. A relay
    whose last tasks went (removed, given up) during an outage would otherwise be named for
    ever, as nothing asks it whether it is back; a refused key is dropped alike: it cannot be
    checked again without a task (a reload may have set it right), and the first request of a
    new task names it again at once.
    """

    def __init__(self, clock: Clock, interval: float) -> None:
        self.clock = clock
        self.interval = interval
        self._relays: dict[str, _Relay] = {}
        #: outcomes reported so far (tests wait on it)
        self.reports = 0

    def report(self, upstream: Upstream, error: Exception | None) -> None:
        """Note what a request to ``upstream`` came to: ``None`` for a usable answer."""
        where = "upstream" if upstream.name == DEFAULT_UPSTREAM else f"upstreams.{upstream.name}"
        now = self.clock.monotonic()
        relay = self._relays.get(upstream.base_url)
        if relay is None or self._stale(relay, now):
            # Not asked for long: a silence or refusal before that says nothing of it now.
            relay = self._relays[upstream.base_url] = _Relay(where, now, upstream.timeout)
        relay.where, relay.asked, relay.timeout = where, now, upstream.timeout
        self.reports += 1
        if error is None:
            relay.failing_since = None
        else:
            if relay.failing_since is None:
                relay.failing_since = now
            relay.failure = _failure(error)
        if isinstance(error, httpx.TransportError):
            # No answer at all (refused connection, DNS, timeout): down or unreachable.
            if relay.silent_since is None:
                relay.silent_since = now
            relay.error = type(error).__name__
            return
        relay.silent_since = None
        code = error.status_code if isinstance(error, UpstreamError) else None
        relay.refused = code if code in REFUSED else None
        if code != TOO_MANY:
            relay.limited_since = None
        elif relay.limited_since is None:
            relay.limited_since = now

    def stale_after(self, timeout: float) -> float:
        """Seconds without a request ending at a relay after which it is no longer named: the
        longest pause a relay is left alone (MAX_RELAY_PAUSE), twice its ``timeout`` (its
        probe may be called off at a drain's end, and sent again) and UNREACHABLE_INTERVALS
        poll intervals; a relay still asked ends a request well within that."""
        return MAX_RELAY_PAUSE + 2 * timeout + UNREACHABLE_INTERVALS * self.interval

    def _stale(self, relay: _Relay, now: float) -> bool:
        return now - relay.asked > self.stale_after(relay.timeout)

    def problems(self) -> list[str]:
        """What needs a human, one line per relay; never the key, nor a password in the URL."""
        window = UNREACHABLE_INTERVALS * self.interval
        now = self.clock.monotonic()
        found = []
        for base_url, relay in sorted(self._relays.items()):
            if self._stale(relay, now):
                continue  # no task of it is asked: nothing to say of it, nor a way to know
            url = without_userinfo(base_url)  # /readyz needs no token: no user or password
            if relay.refused is not None:
                found.append(
                    f"relay {url} refused the API key (HTTP {relay.refused}): "
                    f"check {relay.where}.api_key"
                )
            elif (silent := _beyond(relay.silent_since, now, window)) is not None:
                found.append(
                    f"relay {url} unreachable for {silent:.0f} s ({relay.error}; "
                    f"more than {UNREACHABLE_INTERVALS} poll intervals)"
                )
            elif (limited := _beyond(relay.limited_since, now, window)) is not None:
                found.append(
                    f"relay {url} has answered only 429 Too Many Requests for "
                    f"{limited:.0f} s (more than {UNREACHABLE_INTERVALS} poll intervals): "
                    "lower the platforms' rate_limit, or ask the relay for a higher limit"
                )
            elif (failing := _beyond(relay.failing_since, now, window)) is not None:
                found.append(
                    f"relay {url} has given no usable answer for {failing:.0f} s (last: "
                    f"{relay.failure}; more than {UNREACHABLE_INTERVALS} poll intervals)"
                )
        return found

    async def check(self) -> str | None:
        """The readiness check: every relay answers and takes our key."""
        return "; ".join(self.problems()) or None


def _beyond(since: float | None, now: float, window: float) -> float | None:
    """Seconds since ``since`` when more than ``window`` have passed, else None."""
    if since is None or now - since <= window:
        return None
    return now - since


def _failure(error: Exception) -> str:
    """What a request without a usable answer got, in words fit for /readyz (no token is
    asked there): the status code or the kind of failure, never the relay's own text."""
    if not isinstance(error, UpstreamError):
        return type(error).__name__
    code = error.status_code
    # A 2xx whose body is no usable answer (not JSON, an error envelope) names no code.
    return f"HTTP {code}" if code is not None and code >= 300 else "an answer it could not read"
