"""ReadCache: a value recomputed only when a cheap key says its inputs changed, one computation at a time.

Why: figures such as the feedback stats and the scheduler's untrained counts read every feedback row, and the web
UI asks for them every few seconds from every open tab. The key (a few indexed `max(id)` / `count(*)` reads, see
`loop.pairs.inputs_key`) changes whenever a row they read changes, so an answer from the cache is the answer a
fresh computation would give; `max_age_s` bounds how long a change the key cannot see (a write by another
process) stays invisible. Readers that arrive while the value is being computed wait for that computation
instead of starting their own, so N pollers cost one computation, not N.

Pollers that can live with a figure one computation old (the web UI's timers) use `read(..., stale_ok=True)`:
while a change is being recomputed in the background they get the last value at once, marked with when it was
computed, so under continuous writes a poll costs the key's few indexed reads instead of a full recomputation.
Everyone else gets the exact answer.

Callers run `get` / `read` in a worker thread (they may block on the database), never on the event loop.
Tests: `.venv/bin/python -m pytest -q tests/unit/api/test_stats_cache.py`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Read(Generic[T]):
    value: T
    as_of: float  # wall-clock time (time.time()) the computation that produced `value` started
    fresh: bool  # False: the inputs changed since; a recomputation is under way


class ReadCache(Generic[T]):
    def __init__(self, *, max_age_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 refresh_duty: float = 0.33) -> None:
        self.max_age_s = max_age_s
        self.refresh_duty = refresh_duty
        self.clock = clock
        self._lock = threading.Lock()
        self._guard = threading.Lock()  # guards _refreshing only; never held while computing
        self._entry: tuple[Hashable, float, T, float] | None = None  # key, clock at start, value, wall time
        self._refreshing = False
        self._next_refresh_at = 0.0
        self.computed = 0  # how many times compute ran (tests and the bench read it)

    def get(self, key: Callable[[], Hashable], compute: Callable[[], T]) -> T:
        """The cached value when `key()` still equals the key it was computed under (and it is young enough),
        else `compute()`'s, cached. `key()` is read before computing, so a change during the computation makes
        the next call compute again rather than hide it. An exception from `compute` is raised and not cached."""
        return self._get(key, compute)[0]

    def _get(self, key: Callable[[], Hashable], compute: Callable[[], T]) -> tuple[T, float]:
        with self._lock:  # one computation at a time: later readers find its result
            k = key()
            entry = self._entry
            if entry is not None and self._current(entry, k):
                return entry[2], entry[3]
            started, wall = self.clock(), time.time()
            value = compute()
            self.computed += 1
            self._entry = (k, started, value, wall)
            return value, wall

    def _current(self, entry: tuple[Hashable, float, T, float], k: Hashable) -> bool:
        return entry[0] == k and self.clock() - entry[1] < self.max_age_s

    def read(self, key: Callable[[], Hashable], compute: Callable[[], T], *, stale_ok: bool = False,
             refresh: Callable[[], object] | None = None) -> Read[T]:
        """`get`, with when the value was computed. With `stale_ok`, a value whose inputs changed is returned at
        once (`fresh=False`) and `refresh` (which must open its own database session: the caller's is gone by
        then; it normally calls `get` again) runs in a background thread, one at a time. The first read ever,
        or a reader that is not `stale_ok`, waits for an exact value."""
        entry = self._entry
        if stale_ok and entry is not None and refresh is not None:
            k = key()
            if self._current(entry, k):
                return Read(entry[2], entry[3], True)
            self._refresh_in_background(refresh)
            return Read(entry[2], entry[3], False)
        value, wall = self._get(key, compute)
        return Read(value, wall, True)

    def _refresh_in_background(self, refresh: Callable[[], object]) -> None:
        """Starts `refresh` unless one runs, or the last one ended too recently: background refreshes take at
        most `refresh_duty` of the time (they share the GIL with every request, so under continuous writes an
        unthrottled recount would slow every other answer)."""
        with self._guard:
            if self._refreshing or self.clock() < self._next_refresh_at:
                return
            self._refreshing = True

        def run() -> None:
            started = self.clock()
            try:
                refresh()
            except Exception:  # noqa: BLE001 - a failed refresh leaves the old value; the next read tries again
                log.warning("background refresh of a cached figure failed", exc_info=True)
            finally:
                ended = self.clock()
                with self._guard:
                    self._refreshing = False
                    self._next_refresh_at = ended + (ended - started) * (1 / self.refresh_duty - 1)

        threading.Thread(target=run, name="readcache-refresh", daemon=True).start()

    def clear(self) -> None:
        with self._lock:
            self._entry = None
