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
A run's keep-mode write first waits for the recompute guard (loop/training/recompute.py): the answers the last
write preempted must have recovered, and their recompute be at most `keep_recompute_share` of the time since, or
writes back to back would keep preempting answers that never get to decode. Rollbacks, restores and repairs never
wait. While a change is under way `state.changing_from` names the version serving had, so the proxy can record which
versions a response spans (`LoopState.serving_version`).

Run the tests: .venv/bin/python -m pytest tests/unit/training/test_training.py
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from loop.training.recompute import Counters, RecomputeGuard, read_counters
from loop.vllm.replicas import ReplicaClient

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
        self.guard = RecomputeGuard(state.settings.keep_recompute_share)
        self._recovery: asyncio.Task[None] | None = None
        self.left_behind: list[int] = []  # replicas the current change's pause left out (`change(spare=True)`)
        # every replica the current change did not pause (out of routing, or left behind): `work` must not write
        # into them, since requests may still run there, and each is synced again before it serves
        self.unpaused: list[int] = []

    def _guarded(self, atomic: bool) -> bool:
        return atomic and self.state.settings.pause_mode == "keep" and self.guard.share < 1

    async def change(self, work: Work, *, atomic: bool, yields: bool = False, spare: bool = False
                     ) -> dict[str, float]:
        """Run `work` under the weights lock, with vLLM paused around it when `atomic`; returns the timings.
        `yields` (a training run's write, after `yield_to_serving`): in keep mode, watch the preempted answers
        recover, which the run's next write waits for. `spare`: a replica other than replica 0 that cannot be
        paused is left behind instead of failing the change: out of routing and listed in `left_behind`. Every
        replica the pause did not reach (left behind, or out of routing already) is listed in `unpaused`: `work`
        must not write into it (requests may still run there), and it is synced again before it serves
        (loop/training/replicas.py)."""
        guarded = yields and self._guarded(atomic)
        async with self.state.weights_lock:
            t = await self._paused(work, atomic=atomic, guarded=guarded, spare=spare)
        if guarded and self.guard.last_recompute_s is not None:
            t["last_recompute_ms"] = self.guard.last_recompute_s * 1000
        return t

    async def yield_to_serving(self, *, atomic: bool) -> float:
        """Before a run's keep-mode write: wait until the answers the last one preempted have recovered (the
        recompute guard); the seconds waited. Outside the weights lock: a rollback is never held up by it."""
        if not self._guarded(atomic):
            return 0.0
        t0 = time.monotonic()
        while (wait := self.guard.wait_s(time.monotonic())) > 0:
            await asyncio.sleep(min(wait, 0.05))  # the recovery watch updates the guard meanwhile
        return time.monotonic() - t0

    async def counters(self) -> Counters | None:
        """vLLM's running answers and generated tokens, summed over the routable replicas (those a write pauses;
        one out of routing may be a hung host, whose silence would cost every write the timeout); None when
        unreadable."""
        vllm = self.state.vllm
        if hasattr(vllm, "client"):
            clients = [vllm.client(r["index"]) for r in vllm.describe() if r["routable"]]
        else:
            clients = [vllm]
        if not clients:
            return None
        try:
            replies = await asyncio.gather(*(c.get("/metrics", timeout=5.0) for c in clients))
            each = [read_counters(r.text) for r in replies]
        except Exception:  # noqa: BLE001 - no figures: the guard then does not hold writes back
            return None
        return Counters(running=sum(c.running for c in each), generated=sum(c.generated for c in each))

    async def _watch_recovery(self) -> None:
        first = await self.counters()  # right after the resume: the baseline of the preempted answers' tokens
        if first is not None:
            self.guard.resumed(first)
        while self.guard.recovering:
            await asyncio.sleep(0.05)
            now_counters = await self.counters()
            if now_counters is None:
                self.guard.wait_s(time.monotonic())  # gives up after its limit
            else:
                self.guard.observe(time.monotonic(), now_counters)

    def _recovering(self, before: Counters | None) -> None:
        self.guard.wrote(time.monotonic(), before)
        if self.guard.recovering:  # a watch of an earlier write would miss this one's baseline: a new one
            if self._recovery is not None and not self._recovery.done():
                self._recovery.cancel()
            self._recovery = asyncio.create_task(self._watch_recovery(), name="keep-recovery")

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._recovery

    async def _paused(self, work: Work, *, atomic: bool, guarded: bool = False, spare: bool = False
                      ) -> dict[str, float]:
        t: dict[str, float] = {}
        vllm = self.state.vllm
        paused = wrote = False
        # The answers a keep-mode write will preempt, read just before the pause rather than inside it (a read of
        # vLLM's /metrics under load takes milliseconds that every pause would add); the tokens decoded between
        # the read and the pause are left out by the watch's first read, after the resume.
        counted = await self.counters() if guarded and atomic else None
        t0 = time.perf_counter()
        self._changing = True
        self.state.changing_from = self.state.weight_version
        reset: asyncio.Task[None] | None = None
        try:
            self.left_behind, self.unpaused = [], []
            if atomic:
                if isinstance(vllm, ReplicaClient) and len(vllm) > 1:
                    routable = {r["index"] for r in vllm.describe() if r["paused_for_writes"]}  # what it pauses
                    self.left_behind = await vllm.pause(mode=self.state.settings.pause_mode,
                                                        spare=range(1, len(vllm)) if spare else ())
                    whys = {r["index"]: r["why"] for r in vllm.describe()}
                    for k in self.left_behind:
                        self.state.replicas_lost([k], str(whys.get(k)))
                    self.unpaused = [k for k in range(1, len(vllm)) if k not in routable or k in self.left_behind]
                    replicas = getattr(self.state, "replicas", None)
                    if replicas is not None:
                        replicas.forget(self.unpaused)
                else:
                    await vllm.pause(mode=self.state.settings.pause_mode)
                paused = True
                t["pause_ms"] = (time.perf_counter() - t0) * 1000
                # Paused, vLLM computes nothing until the resume: the reset (its caches, the frozen answers' keys
                # and values) and the write (the weights) touch different memory and neither is seen before the
                # resume, so they run side by side and the pause is not their sum.
                reset = asyncio.create_task(self._reset(t))
            if await work(t):
                wrote = True
                if reset is None:  # not paused: vLLM serves, so only a reset after the write drops old keys
                    await self._reset(t)
            if reset is not None:
                await reset
        finally:
            if reset is not None and not reset.done():  # the write failed: the reset still ends before the resume
                with contextlib.suppress(Exception):
                    await reset
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
                    if guarded and wrote:  # the answers in flight were preempted: watch them recover
                        self._recovering(counted)
                t["total_ms"] = (time.perf_counter() - t0) * 1000
            finally:
                self._changing = False
                if not self.held:  # held: vLLM stays paused, serving has not moved on yet
                    self._settled()
        return t

    async def _reset(self, t: dict[str, float]) -> None:
        t1 = time.perf_counter()
        await self.state.vllm.reset_prefix_cache()
        t["reset_ms"] = (time.perf_counter() - t1) * 1000

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
