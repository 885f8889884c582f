"""Recent activity kept in memory: per-minute counts for the last hour and the relay's last errors.

The dashboard charts these; nothing here is stored, so a restart starts them afresh.
"""

from __future__ import annotations

import dataclasses
import enum
import threading
import time
from collections import deque
from collections.abc import Callable

#: minutes of per-minute counts kept
WINDOW_MINUTES = 60
#: relay errors kept, newest last
ERRORS_KEPT = 50
#: characters of a relay error message kept
ERROR_CHARS = 300


class Series(enum.StrEnum):
    """What is counted per minute."""

    #: task ids asked about upstream
    POLLS = "polls"
    #: webhook delivery attempts, whatever their outcome
    WEBHOOKS = "webhooks"


@dataclasses.dataclass(frozen=True, slots=True)
class RelayError:
    """One relay request that changed nothing because it failed."""

    at: float  #: epoch seconds
    platform: str
    code: str
    message: str


class Activity:
    """Counts per minute over the last hour, and a ring of the relay's recent errors."""

    def __init__(self, now: Callable[[], float] = time.time) -> None:
        self._now = now
        self._lock = threading.Lock()
        #: series -> minute number (epoch // 60) -> count
        self._minutes: dict[Series, dict[int, int]] = {s: {} for s in Series}
        self._errors: deque[RelayError] = deque(maxlen=ERRORS_KEPT)

    def count(self, series: Series, amount: int = 1) -> None:
        """Add ``amount`` to the current minute of ``series``."""
        minute = int(self._now() // 60)
        with self._lock:
            buckets = self._minutes[series]
            buckets[minute] = buckets.get(minute, 0) + amount
            if len(buckets) > WINDOW_MINUTES + 1:
                for old in [m for m in buckets if m <= minute - WINDOW_MINUTES]:
                    del buckets[old]

    def relay_error(self, platform: str, code: str, message: str) -> None:
        """Remember a failed relay request (the oldest is forgotten past ERRORS_KEPT)."""
        entry = RelayError(self._now(), platform, code, message[:ERROR_CHARS])
        with self._lock:
            self._errors.append(entry)

    def per_minute(self, series: Series) -> list[int]:
        """The last WINDOW_MINUTES minutes of ``series``, oldest first, the current one last."""
        current = int(self._now() // 60)
        with self._lock:
            buckets = dict(self._minutes[series])
        return [buckets.get(m, 0) for m in range(current - WINDOW_MINUTES + 1, current + 1)]

    def recent_errors(self) -> list[RelayError]:
        """The relay's recent errors, newest first."""
        with self._lock:
            return list(reversed(self._errors))
