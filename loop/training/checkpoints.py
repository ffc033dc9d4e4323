"""Checkpoints: the live weights written to disk, pruned, and written back; and making every kept version durable.

- `write(pinned=)` writes the live weights as an HF folder (the worker writes a temporary folder, fsyncs and
  renames it) under the weights lock but outside vLLM's pause, records the folder on the version, points a future
  vLLM restart at it (`supervisor.model_path`) and prunes the automatic ones beyond `settings.keep_checkpoints`
  (pinned ones, the live version's and anything outside the checkpoint folder, such as the base model, are kept).
- `restore(version, path)` writes a version's folder back into the live weights under the pause, as a NEW version
  (kind "restore", parent v) sharing that folder, so a later vLLM restart loads it too. Version 0 restores from
  the base model folder when its own checkpoint is gone.
- `Flusher`: after every kept version, make it durable soon, in the background and outside the pause (the next
  update waits for the writer, since the weights must not change under it). `settings.checkpoint_every` = N makes
  every N-th version durable (1, the default: every one; 0: only on request and at a clean shutdown — for models
  whose checkpoint takes minutes).

Run the tests: .venv/bin/python -m pytest tests/unit/training/test_training.py tests/unit/training/test_durability.py
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from loop.db.models import WeightVersion
from loop.training.versions import VersionRecords, is_durable
from loop.training.weights import LiveWeights
from loop.worker import protocol as p

if TYPE_CHECKING:
    from loop.state import LoopState
    from loop.training.worker import WorkerControl

log = logging.getLogger("loop.training")

CHECKPOINT_TIMEOUT_S = 1800.0
PIN_FILE = "PINNED"  # in a checkpoint folder: written on request, never pruned
RETRY_S = 5.0  # a failed background write is tried again after this long (the worker may be restarting)


class Checkpoints:
    def __init__(self, state: LoopState, control: WorkerControl, weights: LiveWeights,
                 versions: VersionRecords) -> None:
        self.state = state
        self.settings = state.settings
        self.control = control
        self.weights = weights
        self.versions = versions

    def restorable_path(self, row: WeightVersion) -> str | None:
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

    async def write(self, *, pinned: bool = False) -> tuple[int, str]:
        """Write the live weights as a checkpoint (or return the live version's existing one)."""
        async with self.state.weights_lock:  # the weights must not change while they are written
            version = self.state.weight_version
            row = self.versions.get(version)
            existing = row.checkpoint_path if row is not None else None
            if existing and is_durable(existing):
                if pinned:
                    (Path(existing) / PIN_FILE).touch()
                return version, existing
            path = self.settings.checkpoint_dir / f"v{version:06d}"
            if path.exists():  # left by a run whose database write never happened: replace it
                shutil.rmtree(path)
            done = await self.control.call(p.Checkpoint(path=str(path), version=version), timeout=CHECKPOINT_TIMEOUT_S)
            assert isinstance(done, p.CheckpointDone)
            if pinned:
                (Path(done.path) / PIN_FILE).touch()
            self.versions.set_checkpoint(version, done.path)  # a vLLM restart now loads this one
            log.info("checkpoint of version %d written to %s in %.0f ms", version, done.path, done.ms)
            await asyncio.to_thread(self.prune)
        return version, done.path

    def prune(self) -> list[str]:
        """Delete automatic checkpoints beyond the newest `keep_checkpoints` (a big model's is tens of GB, and
        the guard writes one per run). Pruned versions lose their path (restore then answers 409)."""
        keep_n = self.settings.keep_checkpoints
        if keep_n <= 0:
            return []
        root = self.settings.checkpoint_dir.resolve()
        rows = self.versions.checkpoints()
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
        self.versions.forget_checkpoints(gone)
        for path in gone:
            shutil.rmtree(path, ignore_errors=True)
        log.info("pruned %d automatic checkpoint(s) beyond the newest %d: %s", len(gone), keep_n, ", ".join(gone))
        return gone

    async def restore(self, version: int, path: str) -> dict[str, float]:
        """Write `path` (version `version`'s weights) into the live weights under the pause, as a new version."""

        async def work(t: dict[str, float]) -> bool:
            reply = await self.control.call(p.Restore(path=path, skip=self.weights.unpaused),
                                            timeout=CHECKPOINT_TIMEOUT_S)
            assert isinstance(reply, p.Restored)
            left = self.weights.unpaused  # out of routing already, each with its own why
            self.state.replicas_lost([k for k in reply.lost if k not in left],
                                     f"could not take the restore of version {version}")
            t["restore_ms"] = reply.ms
            # the live weights are now bit for bit the checkpoint: the new version shares its folder
            await asyncio.to_thread(self.versions.new, "restore", version, None, path,
                                    f"restored from version {version}")
            self.weights.release()  # known weights again: the resume after this lets vLLM serve
            return True

        # a hung replica must not stop a rollback: the others take the restored weights, it leaves routing
        return await self.weights.change(work, atomic=True, spare=True)


class Flusher:
    """Makes the live version durable soon after it changes, in a background task.

    `checkpoint()` writes the live version (or reuses its folder) under the weights lock, never inside vLLM's
    pause. `changed(version)` is called after every new version; `flush()` writes now (a clean shutdown),
    whatever the policy says."""

    def __init__(self, checkpoint: Callable[[], Awaitable[tuple[int, str]]], every: int) -> None:
        self._checkpoint = checkpoint
        self.every = every
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_error: str | None = None
        self.pending: int | None = None  # the version waiting to be written
        self.writing = False  # a checkpoint is being written right now
        self.written: list[tuple[int, str]] = []

    def changed(self, version: int) -> None:
        if self.every and version % self.every == 0:
            self.pending = version
            self._wake.set()
            if self._task is None or self._task.done():
                with contextlib.suppress(RuntimeError):  # no running loop: nothing to schedule
                    self._task = asyncio.get_running_loop().create_task(self._loop(), name="durability")

    async def _loop(self) -> None:
        while self.pending is not None:
            self._wake.clear()
            want = self.pending
            self.writing = True
            try:
                version, path = await self._checkpoint()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - retried: the worker or vLLM may be coming back
                self.last_error = f"making version {want} durable failed: {exc}"
                log.warning("%s; trying again in %.0f s", self.last_error, RETRY_S)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RETRY_S)
                continue
            finally:
                self.writing = False
            self.last_error = None
            self.written.append((version, path))
            if self.pending == want or (self.pending is not None and version >= self.pending):
                self.pending = None

    async def flush(self) -> tuple[int, str]:
        """Write the live version now (or return its existing checkpoint)."""
        result = await self._checkpoint()
        if self.pending is not None and result[0] >= self.pending:
            self.pending = None
        return result

    async def idle(self, timeout: float) -> None:
        """Wait until nothing is pending (tests; a caller that needs the live version on disk uses flush())."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.pending is not None or (self._task is not None and not self._task.done()):
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"version {self.pending} still not durable after {timeout:g} s")
            await asyncio.sleep(0.02)

    async def stop(self, finish_write_s: float = 0.0) -> None:
        """Stop the background task; a write in flight is first given `finish_write_s` to end (cancelling it
        would leave the worker writing a folder that the next checkpoint of the same version then collides with)."""
        deadline = asyncio.get_running_loop().time() + finish_write_s
        while self.writing and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    def describe(self) -> dict[str, object]:
        return {"every": self.every, "pending_version": self.pending, "last_error": self.last_error,
                "written": len(self.written)}
