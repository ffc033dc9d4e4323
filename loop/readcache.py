"""ReadCache: a value recomputed only when a cheap key says its inputs changed, one computation at a time.

Why: figures such as the feedback stats and the scheduler's untrained counts read every feedback row, and the web
UI asks for them every few seconds from every open tab. The key (a few indexed `max(id)` / `count(*)` reads, see
`loop.pairs.inputs_key`) changes whenever a row they read changes, so an answer from the cache is the answer a
fresh computation would give; `max_age_s` bounds how long a change the key cannot see (a write by another
process) stays invisible. Readers that arrive while the value is being computed wait for that computation
instead of starting their own, so N pollers cost one computation, not N.

Callers run `get` in a worker thread (it may block on the database), never on the event loop.
Tests: `.venv/bin/python -m pytest -q tests/unit/test_stats_cache.py`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class ReadCache(Generic[T]):
    def __init__(self, *, max_age_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_age_s = max_age_s
        self.clock = clock
        self._lock = threading.Lock()
        self._entry: tuple[Hashable, float, T] | None = None
        self.computed = 0  # how many times compute ran (tests and the bench read it)

    def get(self, key: Callable[[], Hashable], compute: Callable[[], T]) -> T:
        """The cached value when `key()` still equals the key it was computed under (and it is young enough),
        else `compute()`'s, cached. `key()` is read before computing, so a change during the computation makes
        the next call compute again rather than hide it. An exception from `compute` is raised and not cached."""
        with self._lock:  # one computation at a time: later readers find its result
            k = key()
            entry = self._entry
            if entry is not None and entry[0] == k and self.clock() - entry[1] < self.max_age_s:
                return entry[2]
            started = self.clock()
            value = compute()
            self.computed += 1
            self._entry = (k, started, value)
            return value

    def clear(self) -> None:
        with self._lock:
            self._entry = None
