"""How often each task was asked, read from a relay's request log (tests and benchmarks)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Protocol


class Logged(Protocol):
    """A request as a relay logged it: when it arrived and its JSON body."""

    at: float
    json_body: Any


def poll_gaps(requests: Iterable[Logged]) -> dict[str, list[float]]:
    """Seconds between consecutive requests naming each id (batch bodies ``{"ids": [...]}``)."""
    last: dict[str, float] = {}
    gaps: dict[str, list[float]] = {}
    for request in sorted(requests, key=lambda r: r.at):
        body = request.json_body
        ids = body.get("ids", ()) if isinstance(body, dict) else ()
        for task_id in ids:
            before = last.get(task_id)
            if before is not None:
                gaps.setdefault(task_id, []).append(request.at - before)
            last[task_id] = request.at
    return gaps


def quantile(values: Sequence[float], share: float) -> float:
    """The nearest-rank quantile of ``values`` (``share`` 0.5 is the median, 0.99 the p99)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(share * len(ordered)))
    return ordered[rank - 1]
