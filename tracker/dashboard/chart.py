"""Small bar charts drawn on the server, as numbers an SVG template places (no script needed)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

WIDTH = 1100
HEIGHT = 90


@dataclasses.dataclass(frozen=True, slots=True)
class Bar:
    """One bar: its box in SVG units and what it stands for."""

    x: float
    y: float
    width: float
    height: float
    value: int
    #: e.g. "12 min ago"
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class Chart:
    """A per-minute bar chart of the last hour."""

    title: str
    bars: list[Bar]
    peak: int
    total: int
    width: int = WIDTH
    height: int = HEIGHT


def per_minute(title: str, values: Sequence[int]) -> Chart:
    """Bars for ``values`` (oldest first, the current minute last), scaled to the peak."""
    peak = max(values, default=0)
    slot = WIDTH / max(len(values), 1)
    bars = []
    for index, value in enumerate(values):
        height = 0.0 if peak == 0 else round(HEIGHT * value / peak, 2)
        ago = len(values) - 1 - index
        bars.append(
            Bar(
                x=round(index * slot, 2),
                y=round(HEIGHT - height, 2),
                width=round(max(slot - 1, 1), 2),
                height=height,
                value=value,
                label="this minute" if ago == 0 else f"{ago} min ago",
            )
        )
    return Chart(title=title, bars=bars, peak=peak, total=sum(values))
