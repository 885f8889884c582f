"""The one source of time: injected everywhere, so tests move time without sleeping."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Protocol

#: seconds the wall clock must fall behind the monotonic one between two looks to count as a
#: step back: NTP slews the clock by at most half a millisecond a second, a step is sudden
STEP_TOLERANCE = 1.0


class Clock(Protocol):
    """Tells the current time as an aware UTC datetime."""

    def now(self) -> datetime:
        """The current time."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps, to tell when ``now`` did."""
        ...


class SystemClock:
    """The wall clock."""

    def now(self) -> datetime:
        """The current time, from the operating system."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """The operating system's monotonic clock."""
        return time.monotonic()


class FakeClock:
    """A clock that moves only when told to (for tests and benchmarks)."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._monotonic = 0.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        """The frozen current time."""
        with self._lock:
            return self._now

    def monotonic(self) -> float:
        """Seconds advanced since the clock was made (steps of the wall time left out)."""
        with self._lock:
            return self._monotonic

    def advance(self, seconds: float) -> datetime:
        """Move time forward and return the new now."""
        with self._lock:
            self._now += timedelta(seconds=seconds)
            self._monotonic += seconds
            return self._now

    def step(self, seconds: float) -> datetime:
        """Step the wall time alone by ``seconds`` (negative: back), as NTP or an operator
        setting the clock does, and return the new now."""
        with self._lock:
            self._now += timedelta(seconds=seconds)
            return self._now


class StepWatch:
    """Tells when the wall clock stepped back (an NTP step, a hardware clock set right), or
    jumped forward.

    Plans are wall-clock times in the database: after a step back of an hour, every task
    planned before it would look an hour away, so the plans follow the step. A jump forward is
    only told: it cannot be told from a machine that was suspended, whose tasks are overdue
    indeed.
    """

    def __init__(self, clock: Clock, tolerance: float = STEP_TOLERANCE) -> None:
        self._clock = clock
        self._tolerance = tolerance
        self._offset = self._read()
        self._forward = 0.0

    def _read(self) -> float:
        return self._clock.now().timestamp() - self._clock.monotonic()

    def stepped_back(self) -> float:
        """Seconds the wall clock stepped back and `followed` was not told of; 0.0 if none."""
        offset = self._read()
        back = self._offset - offset
        if back > self._tolerance:
            return back
        if -back > self._tolerance:
            self._forward -= back
        # Forward steps and slewing: measured from here on.
        self._offset = offset
        return 0.0

    def jumped_forward(self) -> float:
        """Seconds the wall clock jumped forward (a suspended machine, a step) since this was
        last asked, as `stepped_back` saw them; 0.0 if none."""
        forward, self._forward = self._forward, 0.0
        return forward

    def followed(self, back: float) -> None:
        """The plans were moved back by ``back`` seconds (what `stepped_back` said)."""
        self._offset -= back


def isoformat(moment: datetime | None) -> str | None:
    """RFC 3339 text in UTC with a ``Z``, as every JSON answer and webhook carries it."""
    if moment is None:
        return None
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
