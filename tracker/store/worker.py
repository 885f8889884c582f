"""A part's store calls on a thread of its own: blocking I/O off the event loop, one at a time.

The poller and the deliverer each own one. One call at a time, because a claim and a write at
once would only queue on SQLite's write lock, whose busy handler sleeps in steps of up to
100 ms; a thread per part, so polling and delivery never wait on each other's calls.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import weakref
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class StoreWorker:
    """Runs store calls one after another on one thread, for coroutines to await."""

    def __init__(self, name: str) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        weakref.finalize(self, self._thread.shutdown, wait=False)

    async def call(self, function: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` on the worker's thread, once the calls before it ran."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._thread, functools.partial(function, *args, **kwargs)
        )
