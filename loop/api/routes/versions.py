"""Weight versions: list them, checkpoint the live one, restore an earlier one in place.

`GET /api/versions` → every state the live weights have been in (newest first) and which one is live, each with the
loss of the run that made it (`run_loss`, for the per-version charts); `POST /api/checkpoint` (admin) writes the
live weights as an HF folder; `POST /api/versions/{v}/restore` (admin) writes version v's checkpoint back into
vLLM's memory under the same pause protocol as an update, which makes a NEW version (kind "restore", parent v).
The work is `loop.training.Trainer`'s.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Path
from sqlalchemy import select

from loop.api.deps import AdminDep, SessionDep, StateDep, TrainerDep, trainer_of
from loop.api.schemas import VersionList
from loop.db.models import MAX_ID, TrainingRun, WeightVersion
from loop.training.versions import durable

router = APIRouter(prefix="/api", tags=["versions"])


def _utc(t: datetime | None) -> str | None:
    if t is None:
        return None
    return (t if t.tzinfo else t.replace(tzinfo=timezone.utc)).isoformat()  # SQLite returns naive UTC


def version_json(v: WeightVersion) -> dict[str, Any]:
    return {"version": v.version, "created_at": _utc(v.created_at), "kind": v.kind,
            "parent_version": v.parent_version, "run_id": v.run_id, "checkpoint_path": v.checkpoint_path,
            "status": v.status, "durable": durable(v), "eval": v.eval, "note": v.note}


def _final_loss(metrics: dict[str, Any] | None) -> float | None:
    loss = metrics.get("loss") if isinstance(metrics, dict) else None
    ok = isinstance(loss, (int, float)) and not isinstance(loss, bool) and math.isfinite(loss)
    return float(loss) if ok else None


@router.get("/versions", response_model=VersionList)
def list_versions(state: StateDep, session: SessionDep) -> dict[str, Any]:
    # One query: each version with the final figures of the run that made it. The JSON column is read whole and the
    # loss picked here, since a non-finite loss stored as NaN is not JSON every database's extractor accepts.
    rows = session.execute(select(WeightVersion, TrainingRun.metrics)
                           .outerjoin(TrainingRun, TrainingRun.id == WeightVersion.run_id)
                           .order_by(WeightVersion.version.desc())).all()
    return {"items": [{**version_json(v), "run_loss": _final_loss(metrics)} for v, metrics in rows],
            "live": state.weight_version}


@router.post("/checkpoint", dependencies=[AdminDep])
async def checkpoint(trainer: TrainerDep) -> dict[str, Any]:
    version, path = await trainer.checkpoint(pinned=True)  # worker errors: 503 worker_unavailable / 504
    return {"version": version, "path": path}


@router.post("/versions/{version}/restore", dependencies=[AdminDep])
async def restore(version: Annotated[int, Path(ge=0, le=MAX_ID, description="a version from GET /api/versions")],
                  state: StateDep) -> dict[str, Any]:
    trainer = trainer_of(state)
    new = await trainer.restore(version)
    return {"version": new, "restored_from": version}
