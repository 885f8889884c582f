"""The process-wide settings `tracker run` applies before it starts."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tracker import runtime


@pytest.fixture(name="restored_gc")
def _restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


@pytest.mark.usefixtures("restored_gc")
def test_tune_gc_collects_the_young_generation_less_often_and_freezes_startup() -> None:
    """Young collections wait for GC_YOUNG allocations (the older thresholds unchanged), and
    what exists at the call leaves the collector's view."""
    gc.unfreeze()
    _, middle, old = gc.get_threshold()
    built_at_startup = [_Node() for _ in range(100)]

    runtime.tune_gc()

    assert gc.get_threshold() == (runtime.GC_YOUNG, middle, old)
    assert gc.get_freeze_count() >= len(built_at_startup)


@pytest.mark.usefixtures("restored_gc")
def test_the_collector_still_runs_on_its_own_after_tune_gc() -> None:
    """Tuning does not stop the collector: a reference cycle made afterwards goes by itself
    once more than GC_YOUNG containers have been allocated, with no explicit collect."""
    runtime.tune_gc()
    first, second = _Node(), _Node()
    first.other, second.other = second, first
    gone = weakref.ref(first)
    del first, second

    allocated = [[] for _ in range(3 * runtime.GC_YOUNG)]

    assert len(allocated) == 3 * runtime.GC_YOUNG
    assert gone() is None
