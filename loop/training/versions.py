"""The version records: one owner of every `WeightVersion` row, and what a reload from disk does to them.

Every weight version loop served is a row: `new()` records the next one as live (the others superseded) and makes
it the one responses carry (`state.weight_version`); checkpoints add their folder (`set_checkpoint`); the eval
guard's figures and rollbacks are noted here too (`note_eval`, `note_rollback`), so nothing else writes these rows.

A version is *durable* once its weights are on disk: its `checkpoint_path` names a complete checkpoint folder
(written to a temporary folder, fsync'd and renamed by the worker), or it is version 0, whose weights are the model
folder the service started from. When vLLM (re)loads a version from disk after a crash or a restart,
`reconcile(...)` marks every version since it that was not durable `lost` (with why), every run whose training is
not in the served weights `lost`, and puts their feedback back in the queue (its `run_feedback` rows are deleted)
— never left consumed. A deliberate restore (POST /api/versions/{v}/restore, the guard's rollback) is not a
reload: what it undoes stays consumed, as the operator or the guard meant.

Run the tests: .venv/bin/python -m pytest tests/unit/training/test_durability.py
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import TrainingRun, WeightVersion
from loop.training import quarantine

if TYPE_CHECKING:
    from loop.state import LoopState

log = logging.getLogger("loop.training")

# A version (or run) whose weights are not in what vLLM serves any more; a lost run's feedback was released.
LOST = "lost"


def is_durable(checkpoint_path: str | None) -> bool:
    from loop.worker.checkpoint import has_weights

    return bool(checkpoint_path) and has_weights(Path(checkpoint_path))


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
            out.released_feedback += quarantine.release(s, run.id)
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
            quarantine.release(s, run.id)


class VersionRecords:
    """The `WeightVersion` rows and the live version number; `load_id()` names the weights vLLM has loaded now
    (the worker's hello), stamped on every new version so a later reload is recognised."""

    def __init__(self, state: LoopState, load_id: Callable[[], str | None]) -> None:
        self.state = state
        self._load_id = load_id

    @property
    def live(self) -> int:
        return self.state.weight_version

    def get(self, version: int) -> WeightVersion | None:
        with self.state.sessions() as s:
            return s.get(WeightVersion, version)

    def new(self, kind: str, parent: int | None, run_id: int | None, checkpoint_path: str | None,
            note: str | None) -> int:
        """Record the next version as live (the others superseded) and make it the one responses carry."""
        with self.state.sessions() as s:
            version = self.state.weight_version + 1
            s.execute(update(WeightVersion).where(WeightVersion.status == "live").values(status="superseded"))
            s.add(WeightVersion(version=version, kind=kind, parent_version=parent, run_id=run_id,
                                checkpoint_path=checkpoint_path, status="live", note=note, load_id=self._load_id()))
            s.commit()
        self.state.weight_version = version
        if checkpoint_path:
            self._restart_from(checkpoint_path)
        return version

    def _restart_from(self, path: str) -> None:
        """The live version's weights are in `path`: a vLLM restart must load them — not the newest folder
        written, which after a restore or a rollback holds the weights that were undone."""
        if self.state.supervisor is not None:
            self.state.supervisor.model_path = path

    def live_is_durable(self) -> bool:
        row = self.get(self.state.weight_version)
        return row is not None and durable(row)

    def checkpoints(self) -> list[tuple[int, str]]:
        """(version, folder) of every version that names a checkpoint, newest first."""
        with self.state.sessions() as s:
            rows = s.execute(select(WeightVersion.version, WeightVersion.checkpoint_path)
                             .where(WeightVersion.checkpoint_path.is_not(None))
                             .order_by(WeightVersion.version.desc())).all()
        return [(int(v), str(path)) for v, path in rows]

    def newest_checkpoint(self) -> tuple[int, str] | None:
        for version, path in self.checkpoints():
            if is_durable(path):
                return version, path
        return None

    def version_of_checkpoint(self, path: str) -> int | None:
        """The newest version whose checkpoint is `path` (what vLLM serves after loading that folder)."""
        with self.state.sessions() as s:
            return s.scalar(select(WeightVersion.version).where(WeightVersion.checkpoint_path == path)
                            .order_by(WeightVersion.version.desc()).limit(1))

    def set_checkpoint(self, version: int, path: str) -> None:
        with self.state.sessions() as s:
            s.execute(update(WeightVersion).where(WeightVersion.version == version).values(checkpoint_path=path))
            s.commit()
        if version == self.state.weight_version:
            self._restart_from(path)

    def forget_checkpoints(self, paths: list[str]) -> None:
        """The folders are about to be deleted: the versions lose their path first (a crash then leaves folders,
        never dangling paths)."""
        with self.state.sessions() as s:
            s.execute(update(WeightVersion).where(WeightVersion.checkpoint_path.in_(paths))
                      .values(checkpoint_path=None))
            s.commit()

    def reconcile(self, served: int, reason: str) -> Reconciled:
        return reconcile(self.state.sessions, served, reason)

    def mark_lost(self, version: int, run_id: int | None, reason: str) -> None:
        mark_lost(self.state.sessions, version, run_id, reason)

    @staticmethod
    def note_eval(s: Session, version: int | None, figures: dict[str, Any] | None, run_id: int,
                  measured_at: str | None) -> None:
        """The eval guard measured `version` (in the caller's transaction, beside the run's own record)."""
        if version is None or figures is None:
            return
        wv = s.get(WeightVersion, version)
        if wv is not None:
            wv.eval = {**(wv.eval or {}), **figures, "run_id": run_id, "measured_at": measured_at}

    @staticmethod
    def note_rollback(s: Session, run_id: int, undone: int | None, restored: int | None, before: int | None,
                      reason: str) -> None:
        """The guard undid run `run_id`: its version `undone` is rolled back, and the version `restored` (a restore
        of `before`) is the rollback, carrying `before`'s eval figures."""
        if undone is not None and (wv := s.get(WeightVersion, undone)) is not None:
            wv.status = "rolled_back"
            wv.note = reason
        if restored is not None and (nv := s.get(WeightVersion, restored)) is not None:
            nv.kind = "rollback"
            nv.note = f"rollback of run {run_id}: {reason}"
            before_row = s.get(WeightVersion, before) if before is not None else None
            if before_row is not None and before_row.eval:
                nv.eval = dict(before_row.eval)
