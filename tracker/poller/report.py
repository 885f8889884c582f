"""What a drain did: the figures of its `poll_cycle` log line, its lag, and its rate-limit waits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass(slots=True)
class CycleReport:
    """What a drain did since its last log line, for that line and the health checks."""

    claimed: int = 0
    requests: int = 0
    errors: int = 0
    changed: int = 0
    events: int = 0
    given_up: int = 0
    #: tasks whose claim ran too short to ask about them (asked again when it lapses)
    lapsed: int = 0
    #: how overdue the most overdue task was when claimed or asked about, in seconds
    lag: float = 0.0
    #: that task's platform (None while nothing was claimed late)
    lagging: str | None = None
    seconds: float = 0.0
    #: seconds requests waited on each platform's rate limit (not logged)
    rate_waits: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def total(cls, parts: Sequence[CycleReport]) -> CycleReport:
        """One report for a whole drain that logged several lines."""
        if len(parts) == 1:
            return parts[0]
        worst = max(parts, key=lambda p: p.lag)
        whole = cls(lag=worst.lag, lagging=worst.lagging)
        for name in ("claimed", "requests", "errors", "changed", "events", "given_up", "lapsed"):
            setattr(whole, name, sum(getattr(p, name) for p in parts))
        whole.seconds = sum(p.seconds for p in parts)
        for part in parts:
            for platform, waited in part.rate_waits.items():
                whole.rate_waits[platform] = whole.rate_waits.get(platform, 0.0) + waited
        return whole

    def line(self) -> dict[str, Any]:
        """The figures of the log line."""
        return {
            "claimed": self.claimed,
            "requests": self.requests,
            "errors": self.errors,
            "changed": self.changed,
            "events": self.events,
            "given_up": self.given_up,
            "lapsed": self.lapsed,
            "lag": round(self.lag, 3),
            "seconds": round(self.seconds, 3),
        }
