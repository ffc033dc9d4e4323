"""The live weights: the one place where the weights vLLM serves change.

Every change — a run's apply, a restore, the guard's rollback, the repair of a torn apply — goes through
`change(work, atomic=...)`: under `state.weights_lock` (one change at a time; a checkpoint takes the same lock so
the weights do not move under its writer), vLLM is paused (unless the run is hogwild), `work` writes and records
the new version, the prefix cache is reset (cached prefixes were computed on the old weights), and vLLM resumes in a
`finally`, so it is never left paused — unless the weights are *held*: after a torn apply with nothing to restore
from, vLLM stays paused (`held` says why) until a restore or a reload makes them whole.

The pause mode is the `pause_mode` setting. `keep` (the default) freezes in-flight requests where they are, so the
pause lasts the write whatever the answers' length; the reset then preempts them (`reset_running_requests`): their
keys and values are dropped and recomputed from their tokens on the new weights when vLLM resumes, so every token
after the change is the new weights' answer to the same text, never a mix of old cache and new weights. `wait`
lets them finish on the old weights first, which makes the pause as long as the longest answer in flight.
While a change is under way `state.changing_from` names the version serving had, so the proxy can record which
versions a response spans (`LoopState.serving_version`).

Run the tests: .venv/bin/python -m pytest tests/unit/training/test_training.py
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loop.state import LoopState

# `work(timings)` writes the weights; it returns False when it wrote nothing (a refused update: no cache reset).
Work = Callable[[dict[str, float]], Awaitable[bool]]


class LiveWeights:
    def __init__(self, state: LoopState) -> None:
        self.state = state
        self.held: str | None = None  # why vLLM is kept paused (weights unknown, nothing to restore from)
        self.held_load: str | None = None  # the load id whose weights were left half written
        self._changing = False

    async def change(self, work: Work, *, atomic: bool) -> dict[str, float]:
        """Run `work` under the weights lock, with vLLM paused around it when `atomic`; returns the timings."""
        async with self.state.weights_lock:
            return await self._paused(work, atomic=atomic)

    async def _paused(self, work: Work, *, atomic: bool) -> dict[str, float]:
        t: dict[str, float] = {}
        vllm = self.state.vllm
        paused = False
        t0 = time.perf_counter()
        self._changing = True
        self.state.changing_from = self.state.weight_version
        try:
            if atomic:
                await vllm.pause(mode=self.state.settings.pause_mode)
                paused = True
                t["pause_ms"] = (time.perf_counter() - t0) * 1000
            if await work(t):
                t1 = time.perf_counter()
                await vllm.reset_prefix_cache()
                t["reset_ms"] = (time.perf_counter() - t1) * 1000
        finally:
            try:
                if paused and not self.held:
                    t2 = time.perf_counter()
                    try:
                        await vllm.resume()
                    except Exception:  # noqa: BLE001 - vLLM died or is being restarted: a new one starts unpaused
                        supervisor = self.state.supervisor
                        if supervisor is None or supervisor.state == "ready":
                            raise
                    t["resume_ms"] = (time.perf_counter() - t2) * 1000
                t["total_ms"] = (time.perf_counter() - t0) * 1000
            finally:
                self._changing = False
                if not self.held:  # held: vLLM stays paused, serving has not moved on yet
                    self._settled()
        return t

    def hold(self, why: str, load_id: str | None) -> None:
        """Keep vLLM paused: the weights of load `load_id` are not known to be whole."""
        self.held, self.held_load = why, load_id

    def release(self) -> None:
        self.held = self.held_load = None
        if not self._changing:  # a reloaded vLLM serves again; inside a change, its end settles it
            self._settled()

    def _settled(self) -> None:
        self.state.changing_from = None
        self.state.changes_done += 1
