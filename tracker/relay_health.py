"""Relay problems only a human can fix (a refused key, a relay gone or refusing every request
for long), for /readyz."""

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
            elif relay.silent_since is not None:
                silent = now - relay.silent_since
                if silent > window:
                    found.append(
                        f"relay {url} unreachable for {silent:.0f} s ({relay.error}; "
                        f"more than {UNREACHABLE_INTERVALS} poll intervals)"
                    )
            elif relay.limited_since is not None:
                limited = now - relay.limited_since
                if limited > window:
                    found.append(
                        f"relay {url} has answered only 429 Too Many Requests for "
                        f"{limited:.0f} s (more than {UNREACHABLE_INTERVALS} poll intervals): "
                        "lower the platforms' rate_limit, or ask the relay for a higher limit"
                    )
        return found

    async def check(self) -> str | None:
        """The readiness check: every relay answers and takes our key."""
        return "; ".join(self.problems()) or None
