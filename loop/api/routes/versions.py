"""Weight versions: list them, checkpoint the live one, restore an earlier one in place.

`GET /api/versions` → every state the live weights have been in (newest first) and which one is live;
`POST /api/checkpoint` (admin) writes the live weights as an HF folder; `POST /api/versions/{v}/restore`
(admin) writes version v's checkpoint back into vLLM's memory under the same pause protocol as an update,
which makes a NEW version (kind "restore", parent v). The work is `loop.training.Trainer`'s.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Path
from sqlalchemy import select

from loop.api.deps import AdminDep, SessionDep, StateDep, TrainerDep, trainer_of
from loop.db.models import MAX_ID, WeightVersion
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


@router.get("/versions")
def list_versions(state: StateDep, session: SessionDep) -> dict[str, Any]:
    rows = session.scalars(select(WeightVersion).order_by(WeightVersion.version.desc())).all()
    return {"items": [version_json(v) for v in rows], "live": state.weight_version}


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
