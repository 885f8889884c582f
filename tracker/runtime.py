"""Process-wide settings of a `tracker run` process (not of tracker used as a library)."""

from __future__ import annotations

import gc

#: container allocations between two young-generation collections (Python's default: 700)
GC_YOUNG = 10_000


def tune_gc() -> None:
    """Collect less often, and never again walk what startup built.

    A drain allocates a handful of containers per polled task (decoded JSON, claim rows,
    decisions) that reference counting frees at once; at the default threshold the collector
    runs every ~100 tasks and re-walks every live object at each full collection, a sixth of
    the drain's CPU. Freezing moves the modules, settings and parts built so far out of the
    collector's sight for good.
    """
    _, middle, old = gc.get_threshold()
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG, middle, old)
