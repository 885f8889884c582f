"""Rows the database refused: which were logged already, so each is logged once per reason."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

from tracker.store.base import _is_row_error

_T = TypeVar("_T")

#: rows remembered at most; the longest-remembered is forgotten first (and may be logged again)
MEMORY_ROWS = 10_000
#: distinct reasons remembered per row; more than this many are not logged for it
MEMORY_REASONS = 8


class RefusalMemory:
    """The rows (by id) whose write was refused, with the reasons already logged for each.

    A row refused again for a reason already logged is not logged again: a task refused at
    every poll, or a delivery at every attempt, writes one line, not one per try. A row the
    database takes again is forgotten, so a later refusal is news and is logged.
    """

    def __init__(self, rows: int = MEMORY_ROWS) -> None:
        self._rows = rows
        self._reasons: collections.OrderedDict[Hashable, set[str]] = collections.OrderedDict()
        # The poll and the delivery store threads, and tests, may share one store.
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._reasons)

    def __contains__(self, row: Hashable) -> bool:
        return row in self._reasons

    def first(self, row: Hashable, reason: str) -> bool:
        """Whether ``row`` is refused for ``reason`` for the first time (then remembered)."""
        with self._lock:
            reasons = self._reasons.get(row)
            if reasons is None:
                reasons = self._reasons[row] = set()
                while len(self._reasons) > self._rows:
                    self._reasons.popitem(last=False)
            if reason in reasons or len(reasons) >= MEMORY_REASONS:
                return False
            reasons.add(reason)
            return True

    def forget(self, row: Hashable) -> bool:
        """Forget ``row``; whether it had been refused."""
        with self._lock:
            return self._reasons.pop(row, None) is not None


def _isolated(
    items: Sequence[_T],
    write: Callable[[Sequence[_T]], int],
    refused: Callable[[_T, Exception], int],
    accepted: Callable[[Sequence[_T]], None] | None = None,
    unit: Callable[[_T], Hashable] | None = None,
) -> int:
    """``write(items)``; when the database refuses some row's values, the halves apart.

    Halving until the refused rows stand alone costs about 2 log2(n) extra transactions per
    bad row, and only when there is one; each lone refused row goes to ``refused``, and
    every part written whole to ``accepted``. Items of one ``unit`` (lying next to each other)
    are never split apart: written, or refused (the first of them named), together.
    """
    try:
        written = write(items)
    except Exception as exc:
        if not _is_row_error(exc):
            raise
        middle = _middle(items, unit)
        if middle is None:
            return refused(items[0], exc)
    else:
        if accepted is not None:
            accepted(items)
        return written
    return _isolated(items[:middle], write, refused, accepted, unit) + _isolated(
        items[middle:], write, refused, accepted, unit
    )


def _middle(items: Sequence[_T], unit: Callable[[_T], Hashable] | None) -> int | None:
    """Where to halve ``items``: nearest the middle, between two units (None: one unit)."""
    if len(items) < 2:
        return None
    half = len(items) // 2
    if unit is None:
        return half
    keys = [unit(item) for item in items]
    bounds = [i for i in range(1, len(keys)) if keys[i] != keys[i - 1]]
    return min(bounds, key=lambda i: abs(i - half)) if bounds else None
