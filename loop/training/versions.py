"""Durable learning: which weight versions survive a restart, and what happens to the ones that do not.

A version is *durable* once its weights are on disk: its `checkpoint_path` names a complete checkpoint folder
(written to a temporary folder, fsync'd and renamed by the worker), or it is version 0, whose weights are the
model folder the service started from. Anything else lives only in vLLM's memory and is gone when vLLM is.

Two parts, one job each:
- `Flusher`: after every kept version, make it durable soon, in the background and outside vLLM's pause (the
  checkpoint reads the live weights while vLLM keeps serving; the next update waits for it, since the weights must
  not change under the writer). `settings.checkpoint_every` = N makes every N-th version durable (1, the default:
  every one; 0: only on request and at a clean shutdown — for models whose checkpoint takes minutes).
- `reconcile(...)`: when vLLM (re)loaded a version from disk after a crash or a restart, every version since it
  that was not durable is marked `lost` (with why), every run whose training is not in the served weights is
  marked `lost`, and its feedback goes back to the queue (its `run_feedback` rows are deleted) — never left
  consumed. A deliberate restore (POST /api/versions/{v}/restore, the guard's rollback) is not a reload: what it
  undoes stays consumed, as the operator or the guard meant.

Run the tests: .venv/bin/python -m pytest tests/unit/test_durability.py
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import RunFeedback, TrainingRun, WeightVersion

log = logging.getLogger("loop.durability")

# A run whose training is not in the served weights any more: its feedback was released.
LOST = "lost"
RETRY_S = 5.0  # a failed background write is tried again after this long (the worker may be restarting)


def is_durable(checkpoint_path: str | None) -> bool:
    return bool(checkpoint_path) and (Path(checkpoint_path) / "model.safetensors").is_file()


def durable(row: WeightVersion) -> bool:
    """Version 0 and a restore of it are the model folder the service started from; the others need a checkpoint."""
    if is_durable(row.checkpoint_path):
        return True
    return row.version == 0 or (row.kind in ("restore", "rollback") and row.parent_version == 0
                                and not row.checkpoint_path)


def lineage(s: Session, version: int) -> set[int]:
    """The versions whose weights are contained in `version`: it, its parent, the parent's parent, ... A train
    version's parent is the version it was trained from; a restore's is the version it restored."""
    parents = dict(s.execute(select(WeightVersion.version, WeightVersion.parent_version)).all())
    seen: set[int] = set()
    v: int | None = version
    while v is not None and v not in seen:
        seen.add(v)
        v = parents.get(v)
    return seen


@dataclass
class Reconciled:
    served: int
    lost_versions: list[int] = field(default_factory=list)
    lost_runs: list[int] = field(default_factory=list)
    released_feedback: int = 0


def reconcile(sessions: sessionmaker[Session], served: int, reason: str) -> Reconciled:
    """vLLM now serves the weights of version `served` (loaded from disk): record what was lost since.

    Versions newer than `served` that are not in its lineage and were still live or superseded become `lost`;
    runs that trained them (succeeded, or left running), none of whose versions are in the lineage, become `lost`
    and release their feedback. One transaction: either all of it is recorded or none."""
    out = Reconciled(served=served)
    with sessions() as s, s.begin():
        kept = lineage(s, served)
        for wv in s.scalars(select(WeightVersion).where(WeightVersion.version > served,
                                                         WeightVersion.status.in_(("live", "superseded")))):
            if wv.version not in kept:
                wv.status = LOST
                wv.note = f"lost: {reason}" + (f" ({wv.note})" if wv.note else "")
                out.lost_versions.append(wv.version)
        trained: dict[int, set[int]] = {}
        for version, run_id in s.execute(select(WeightVersion.version, WeightVersion.run_id)
                                         .where(WeightVersion.run_id.is_not(None))):
            trained.setdefault(int(run_id), set()).add(int(version))
        runs = s.scalars(select(TrainingRun).where(TrainingRun.status.in_(("succeeded", "running", "queued")))).all()
        for run in runs:
            versions = trained.get(run.id, set())
            if not versions or versions & kept or max(versions) <= served:
                # nothing applied (the scheduler's recovery handles it), its training is served, or it was undone
                # before the served version by a deliberate restore
                continue
            run.status = LOST
            run.finished_at = run.finished_at or datetime.now(timezone.utc)
            run.error = (f"its weights (version {max(versions)}) were not durable when vLLM reloaded version "
                         f"{served}: {reason}; its feedback is back in the queue")
            released = s.execute(delete(RunFeedback).where(RunFeedback.run_id == run.id))
            out.released_feedback += released.rowcount or 0
            out.lost_runs.append(run.id)
    if out.lost_versions or out.lost_runs:
        log.warning("vLLM serves version %d again (%s): versions %s lost, runs %s lost, %d feedback items back in "
                    "the queue", served, reason, out.lost_versions, out.lost_runs, out.released_feedback)
    return out


def mark_lost(sessions: sessionmaker[Session], version: int, run_id: int | None, reason: str) -> None:
    """A version that was never served (vLLM died before its run finished): it and its run are lost at once."""
    with sessions() as s, s.begin():
        wv = s.get(WeightVersion, version)
        if wv is not None and wv.status in ("live", "superseded"):
            wv.status = LOST
            wv.note = f"lost: {reason}"
        run = s.get(TrainingRun, run_id) if run_id is not None else None
        if run is not None:
            run.status, run.error = LOST, f"{reason}; its feedback is back in the queue"
            run.finished_at = run.finished_at or datetime.now(timezone.utc)
            s.execute(delete(RunFeedback).where(RunFeedback.run_id == run.id))


class Flusher:
    """Makes the live version durable soon after it changes, in a background task.

    `checkpoint()` is the trainer's: it writes the live version (or reuses its folder) under the weights lock,
    never inside vLLM's pause. `changed(version)` is called after every new version; `flush()` writes now
    (a clean shutdown), whatever the policy says."""

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
