"""Recovery: after something died, put known weights back and record truthfully what vLLM serves.

- `torn_apply(run_id, error)`: the worker died or hung inside an apply, with vLLM still paused, so the live
  weights may be half written. A known version goes back before vLLM serves again: the (restarted) worker restores
  the newest checkpoint in place, or the base model folder when nothing was checkpointed; failing that vLLM is
  restarted from that folder (the supervisor's model_path); with neither, vLLM stays paused (the weights are held)
  until a restore or a reload.
- `vllm_ready()`: vLLM (re)started and loaded `supervisor.model_path`: record the version it now serves, and mark
  what the reload lost (loop/training/versions.py: `reconcile`).
- `worker_hello(hello)`: a worker (re)started with a fresh optimizer gets the newest checkpoint's optimizer state,
  so a worker crash or a service restart does not reset the moments; a worker attached to a NEW load means vLLM
  reloaded from disk, so held weights are whole again.

Run the tests: .venv/bin/python -m pytest tests/unit/training/test_training.py tests/unit/training/test_durability.py
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from loop.training.checkpoints import CHECKPOINT_TIMEOUT_S, Checkpoints
from loop.training.versions import VersionRecords, is_durable
from loop.training.weights import LiveWeights
from loop.training.worker import WorkerTimeout
from loop.worker import protocol as p

if TYPE_CHECKING:
    from loop.state import LoopState
    from loop.training.worker import WorkerControl

log = logging.getLogger("loop.training")

TORN_WAIT_S = 300.0  # how long a torn apply waits for the worker to come back before restarting vLLM instead


class Recovery:
    def __init__(self, state: LoopState, control: WorkerControl, weights: LiveWeights, versions: VersionRecords,
                 checkpoints: Checkpoints) -> None:
        self.state = state
        self.control = control
        self.weights = weights
        self.versions = versions
        self.checkpoints = checkpoints
        self.loaded_path: str | None = None  # the folder vLLM loaded (a checkpoint, or the base model)
        self._optimizer_task: asyncio.Task[None] | None = None

    async def torn_apply(self, run_id: int, error: Exception) -> None:
        why = f"the training worker stopped while writing run {run_id}'s update ({error})"
        log.error("%s: the weights may be half written; restoring a known version before vLLM serves again", why)
        if isinstance(error, WorkerTimeout):  # it may still be writing: stop it before anything else writes
            await self.control.restart(f"Apply timed out: {error}")
        newest = self.versions.newest_checkpoint()
        base = self.control.hello.model_path if self.control.hello else None
        if newest is not None:
            version, path = newest
        elif base and is_durable(base):
            version, path = 0, base  # nothing checkpointed yet: vLLM's own starting weights
        else:
            version, path = -1, ""
        if path:
            deadline = time.monotonic() + TORN_WAIT_S
            while not self.control.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            try:
                reply = await self.control.call(p.Restore(path=path), timeout=CHECKPOINT_TIMEOUT_S)
                assert isinstance(reply, p.Restored)
                self.state.replicas_lost(reply.lost, f"could not take the restore of version {version}")
                await self.state.vllm.reset_prefix_cache()  # cached prefixes were computed on other weights
                await asyncio.to_thread(self.versions.reconcile, version, why)
                await asyncio.to_thread(self.versions.new, "restore", version, None,
                                        path if newest is not None else None, f"{why}; restored from version {version}")
                log.warning("run %d: version %d restored in place after the torn apply", run_id, version)
                return
            except Exception as e:  # noqa: BLE001 - fall through to a vLLM restart
                log.error("run %d: restoring version %d after the torn apply failed: %s", run_id, version, e)
        supervisor = self.state.supervisor
        if supervisor is not None:
            log.warning("run %d: restarting vLLM from %s after the torn apply", run_id, supervisor.model_path)
            await supervisor.reload(why)  # vllm_ready records the version the new vLLM serves
            return
        self.weights.hold(f"{why}; vLLM is kept paused: restore a checkpointed version (POST "
                          "/api/versions/{v}/restore) or restart vLLM",
                          self.control.hello.load_id if self.control.hello else None)
        log.error("%s", self.weights.held)

    def worker_hello(self, hello: p.Hello) -> None:
        """Runs inside the worker receiver, which must stay free to deliver the reply: the optimizer state is sent
        from a task."""
        if self.weights.held and hello.load_id != self.weights.held_load:
            log.warning("vLLM reloaded its weights (load %s): no longer holding it paused", hello.load_id)
            self.weights.release()
        newest = self.versions.newest_checkpoint()
        if newest is None:
            return

        async def send() -> None:
            try:
                await self.control.call(p.Restore(path=newest[1], weights=False), timeout=CHECKPOINT_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a fresh optimizer is the fallback, not a failure
                log.warning("could not give the worker the optimizer state of %s: %s", newest[1], e)

        self._optimizer_task = asyncio.get_running_loop().create_task(send(), name="worker-optimizer-state")

    async def vllm_ready(self) -> None:
        supervisor = self.state.supervisor
        loaded = str(supervisor.model_path) if supervisor is not None and supervisor.model_path else None
        self.loaded_path = loaded
        async with self.state.weights_lock:
            live = self.versions.get(self.state.weight_version)
            ckpt_version = self.versions.version_of_checkpoint(loaded) if loaded else None
            if live is not None and ckpt_version is not None and live.checkpoint_path == loaded:
                return  # vLLM serves exactly the live version's checkpoint
            if ckpt_version is None and self.state.weight_version == 0:
                return  # the base model, never trained
            parent = ckpt_version if ckpt_version is not None else 0
            reason = f"vLLM (re)started from {loaded or 'the base model'}"
            if supervisor is not None and supervisor.exit_reason:
                reason += f" (its last exit: {supervisor.exit_reason})"
            await asyncio.to_thread(self.versions.reconcile, parent, reason)
            await asyncio.to_thread(self.versions.new, "restore", parent, None,
                                    loaded if ckpt_version is not None else None,
                                    f"vLLM (re)started from {loaded or 'the base model'}")
            log.info("vLLM serves %s: recorded as version %d", loaded, self.state.weight_version)
