"""Weight versions, seen from the API process: the version record, checkpoints, restore, and the recovery of
an apply the worker did not finish. A mixin of `loop.training.Trainer` (it shares the trainer's worker, state and
pause protocol); split out so each file reads on its own.

- `_new_version` records the next version as live (the others superseded) and makes it the one responses carry.
- `checkpoint()` writes the live weights as an HF folder (worker-side, atomic) and records the path on the
  version; a vLLM restart then loads it (`supervisor.model_path`), and `_on_vllm_ready` records which version
  vLLM serves after every (re)start.
- `restore(v)` writes version v's checkpoint back into the live weights under the pause: a NEW version (kind
  "restore", parent v).
- `_recover_torn` runs when the worker died or hung inside Apply, with vLLM still paused: a known version goes
  back before vLLM serves again.

Run the tests: .venv/bin/pytest tests/unit/test_training.py; end to end: tests/e2e/test_training_e2e.py
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from loop.errors import Conflict, NotFound
from loop.state import LoopState
from loop.control import WorkerControl, WorkerTimeout
from loop.db.models import WeightVersion
from loop.durability import LOST, is_durable, reconcile
from loop.worker import protocol as p

log = logging.getLogger("loop.training")

CHECKPOINT_TIMEOUT_S = 1800.0
PIN_FILE = "PINNED"  # in a checkpoint folder: written on request, never pruned
TORN_WAIT_S = 300.0  # how long a torn apply waits for the worker to come back before restarting vLLM instead


class Versions:
    """Checkpoint / restore / version bookkeeping; the attributes below are the Trainer's."""

    state: LoopState
    settings: Any
    control: WorkerControl
    metrics: dict[str, Any]
    phase: str
    run_id: int | None
    held_paused: str | None
    _held_load: str | None = None  # the load id whose weights were left half written
    _optimizer_task: asyncio.Task[None] | None = None
    _loaded_path: str | None

    if TYPE_CHECKING:  # defined by Trainer
        busy: bool

        def _require_worker(self, *, restoring: bool = False) -> None: ...

        async def _paused(self, work: Any, *, atomic: bool) -> dict[str, float]: ...

    async def _recover_torn(self, run_id: int, error: Exception) -> None:
        """The worker died or hung inside Apply, so the live weights may be half written. vLLM is still paused:
        put a known version back before it serves again. First choice: the worker (restarted) restores the
        newest checkpoint in place, or the base model folder when nothing was checkpointed; failing that, vLLM is
        restarted from that folder (the supervisor's model_path); with neither, vLLM stays paused (`held`)."""
        why = f"the training worker stopped while writing run {run_id}'s update ({error})"
        log.error("%s: the weights may be half written; restoring a known version before vLLM serves again", why)
        self.metrics["torn_apply"] = str(error)
        if isinstance(error, WorkerTimeout):  # it may still be writing: stop it before anything else writes
            await self.control.restart(f"Apply timed out: {error}")
        newest = self._newest_checkpoint()
        base = self.control.hello.model_path if self.control.hello else None
        if newest is not None:
            version, path = newest
        elif base and (Path(base) / "model.safetensors").is_file():
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
                await self.state.vllm.reset_prefix_cache()  # cached prefixes were computed on other weights
                await asyncio.to_thread(reconcile, self.state.sessions, version, why)
                await asyncio.to_thread(self._new_version, "restore", version, None,
                                        path if newest is not None else None,
                                        f"{why}; restored from version {version}")
                log.warning("run %d: version %d restored in place after the torn apply", run_id, version)
                return
            except Exception as e:  # noqa: BLE001 - fall through to a vLLM restart
                log.error("run %d: restoring version %d after the torn apply failed: %s", run_id, version, e)
        supervisor = self.state.supervisor
        if supervisor is not None:
            log.warning("run %d: restarting vLLM from %s after the torn apply", run_id, supervisor.model_path)
            await supervisor.reload(why)  # the ready callback records the version the new vLLM serves
            return
        self.held_paused = f"{why}; vLLM is kept paused: restore a checkpointed version (POST " \
                           "/api/versions/{v}/restore) or restart vLLM"
        self._held_load = self.control.hello.load_id if self.control.hello else None
        self.control.on_hello.append(self._release_hold)
        log.error("%s", self.held_paused)

    def _on_worker_hello(self, hello: p.Hello) -> None:
        """A worker (re)started with a fresh optimizer: give it the newest checkpoint's optimizer state, so a
        worker crash or a service restart does not reset the moments. Sent from a task: this runs inside the
        receiver, which must stay free to deliver the reply."""
        newest = self._newest_checkpoint()
        if newest is None:
            return

        async def send() -> None:
            try:
                await self.control.call(p.Restore(path=newest[1], weights=False), timeout=CHECKPOINT_TIMEOUT_S)
            except Exception as e:  # noqa: BLE001 - a fresh optimizer is the fallback, not a failure
                log.warning("could not give the worker the optimizer state of %s: %s", newest[1], e)

        self._optimizer_task = asyncio.get_running_loop().create_task(send(), name="worker-optimizer-state")

    def _release_hold(self, hello: p.Hello) -> None:
        """A worker attached to a NEW load: vLLM was restarted from disk, so its weights are whole again."""
        if self.held_paused and hello.load_id != self._held_load:
            log.warning("vLLM reloaded its weights (load %s): no longer holding it paused", hello.load_id)
            self.held_paused = None
            if self._release_hold in self.control.on_hello:
                self.control.on_hello.remove(self._release_hold)

    def _new_version(self, kind: str, parent: int | None, run_id: int | None, checkpoint_path: str | None,
                     note: str | None) -> int:
        """Record the next version as live (the others superseded) and make it the one responses carry."""
        with self.state.sessions() as s:
            version = self.state.weight_version + 1
            s.execute(update(WeightVersion).where(WeightVersion.status == "live").values(status="superseded"))
            s.add(WeightVersion(version=version, kind=kind, parent_version=parent, run_id=run_id,
                                checkpoint_path=checkpoint_path, status="live", note=note,
                                load_id=self.control.hello.load_id if self.control.hello else None))
            s.commit()
        self.state.weight_version = version
        return version

    # ------------------------------------------------------------ checkpoints and restore

    def _restorable_path(self, row: WeightVersion) -> str | None:
        """The folder holding version `row`'s weights: its checkpoint, or for version 0 (never pruned away: it
        is the model the service started from) the base model folder."""
        if is_durable(row.checkpoint_path):
            return row.checkpoint_path
        if row.version == 0:
            from loop.model_cache import base_model_dir

            base = base_model_dir(self.settings)
            if base and is_durable(base):
                return base
        return None

    def _newest_checkpoint(self) -> tuple[int, str] | None:
        with self.state.sessions() as s:
            rows = s.execute(select(WeightVersion.version, WeightVersion.checkpoint_path)
                             .where(WeightVersion.checkpoint_path.is_not(None))
                             .order_by(WeightVersion.version.desc())).all()
        for version, path in rows:
            if path and (Path(path) / "model.safetensors").is_file():
                return int(version), str(path)
        return None

    async def checkpoint(self, *, pinned: bool = False) -> tuple[int, str]:
        """Write the live weights as a checkpoint (or return the live version's existing one).

        pinned (POST /api/checkpoint): never pruned. The automatic ones (the guard's rollback points,
        `checkpoint_every`) are pruned to the newest `settings.keep_checkpoints`."""
        self._require_worker()
        async with self.state.weights_lock:  # the weights must not change while they are written
            version = self.state.weight_version
            with self.state.sessions() as s:
                row = s.get(WeightVersion, version)
                existing = row.checkpoint_path if row is not None else None
            if existing and (Path(existing) / "model.safetensors").is_file():
                if pinned:
                    (Path(existing) / PIN_FILE).touch()
                return version, existing
            path = self.settings.checkpoint_dir / f"v{version:06d}"
            if path.exists():  # left by a run whose database write never happened: replace it
                shutil.rmtree(path)
            self.phase = "checkpointing" if self.phase == "idle" else self.phase
            try:
                done = await self.control.call(p.Checkpoint(path=str(path), version=version),
                                               timeout=CHECKPOINT_TIMEOUT_S)
            finally:
                self.phase = "idle" if self.phase == "checkpointing" else self.phase
            assert isinstance(done, p.CheckpointDone)
            if pinned:
                (Path(done.path) / PIN_FILE).touch()
            with self.state.sessions() as s:
                s.execute(update(WeightVersion).where(WeightVersion.version == version)
                          .values(checkpoint_path=done.path))
                s.commit()
            if self.state.supervisor is not None:
                self.state.supervisor.model_path = done.path  # a vLLM restart now loads this one
            log.info("checkpoint of version %d written to %s in %.0f ms", version, done.path, done.ms)
            await asyncio.to_thread(self._prune_checkpoints)
        return version, done.path

    def _prune_checkpoints(self) -> list[str]:
        """Delete automatic checkpoints beyond the newest `keep_checkpoints` (a 7B one is 15 GB, and the guard
        writes one per run). Kept: pinned ones, the live version's, the newest N, anything outside the
        checkpoint folder (a base model). Pruned versions lose their path (restore then answers 409)."""
        keep_n = self.settings.keep_checkpoints
        if keep_n <= 0:
            return []
        root = self.settings.checkpoint_dir.resolve()
        with self.state.sessions() as s:
            rows = s.execute(select(WeightVersion.version, WeightVersion.checkpoint_path)
                             .where(WeightVersion.checkpoint_path.is_not(None))
                             .order_by(WeightVersion.version.desc())).all()
        keep: set[str] = set()
        unpinned = 0
        for version, path in rows:  # newest first
            folder = Path(path)
            if path in keep:
                continue
            if (folder / PIN_FILE).exists() or not folder.resolve().is_relative_to(root):
                keep.add(path)
            elif unpinned < keep_n or version == self.state.weight_version:
                keep.add(path)
                unpinned += 1
        gone = sorted({path for _, path in rows if path not in keep})
        if not gone:
            return []
        with self.state.sessions() as s:  # first the records (a crash here leaves folders, never dangling paths)
            s.execute(update(WeightVersion).where(WeightVersion.checkpoint_path.in_(gone))
                      .values(checkpoint_path=None))
            s.commit()
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        log.info("pruned %d automatic checkpoint(s) beyond the newest %d: %s", len(gone), keep_n, ", ".join(gone))
        return gone

    async def restore(self, version: int) -> int:
        """Write version `version`'s checkpoint back into the live weights; returns the new live version."""
        with self.state.sessions() as s:
            row = s.get(WeightVersion, version)
        if row is None:
            raise NotFound(f"weight version {version} does not exist; GET /api/versions lists them",
                           code="version_not_found")
        path = self._restorable_path(row)
        if path is None:
            why = " (its weights were lost: " + row.note + ")" if row.status == LOST and row.note else ""
            raise Conflict(f"weight version {version} has no checkpoint to restore from{why}; checkpoint a "
                           "version first (POST /api/checkpoint writes the live one)", code="no_checkpoint")
        if self.busy:
            raise Conflict(f"run {self.run_id} is in progress; restore after it ends", code="run_in_progress")
        self._require_worker(restoring=True)

        async def work(t: dict[str, float]) -> bool:
            reply = await self.control.call(p.Restore(path=path), timeout=CHECKPOINT_TIMEOUT_S)
            assert isinstance(reply, p.Restored)
            t["restore_ms"] = reply.ms
            # the live weights are now bit for bit the checkpoint: the new version shares its folder
            await asyncio.to_thread(self._new_version, "restore", version, None, path, f"restored from version {version}")
            self.held_paused = None  # known weights again: the resume below lets vLLM serve
            return True

        self.phase = "restoring"  # from here on no run starts (Trainer.run answers 409) until the restore ends
        try:
            async with self.state.weights_lock:
                timings = await self._paused(work, atomic=True)
        finally:
            self.phase = "idle"
        log.info("restored version %d as version %d (%s)", version, self.state.weight_version, timings)
        return self.state.weight_version

    async def _on_vllm_ready(self) -> None:
        """vLLM (re)started and loaded `supervisor.model_path`: record the version it now serves."""
        supervisor = self.state.supervisor
        loaded = str(supervisor.model_path) if supervisor is not None and supervisor.model_path else None
        self._loaded_path = loaded
        async with self.state.weights_lock:
            with self.state.sessions() as s:
                live = s.get(WeightVersion, self.state.weight_version)
                ckpt_version = s.scalar(select(WeightVersion.version).where(WeightVersion.checkpoint_path == loaded)
                                        .order_by(WeightVersion.version.desc()).limit(1)) if loaded else None
            if live is not None and ckpt_version is not None and live.checkpoint_path == loaded:
                return  # vLLM serves exactly the live version's checkpoint
            if ckpt_version is None and self.state.weight_version == 0:
                return  # the base model, never trained
            parent = ckpt_version if ckpt_version is not None else 0
            reason = f"vLLM (re)started from {loaded or 'the base model'}"
            if supervisor is not None and supervisor.exit_reason:
                reason += f" (its last exit: {supervisor.exit_reason})"
            await asyncio.to_thread(reconcile, self.state.sessions, parent, reason)
            await asyncio.to_thread(self._new_version, "restore", parent, None,
                                    loaded if ckpt_version is not None else None,
                                    f"vLLM (re)started from {loaded or 'the base model'}")
            log.info("vLLM serves %s: recorded as version %d", loaded, self.state.weight_version)
