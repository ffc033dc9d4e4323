"""Quarantined feedback and the per-rater signal: what the screen before each scheduled run held back, and why.

`GET /api/quarantine` lists held-back batches (newest first; `?state=held|requeued|dropped`) with the evidence:
the sign-flip test's p-value and level, the figures of every rater group in the batch, and each held item's
contribution and feedback ids. `POST /api/quarantine/{id}/requeue` (admin) gives the feedback back to the queue
(a later batch trains on it, screened again); `POST /api/quarantine/{id}/drop` (admin) keeps it out for good. A
batch is decided once: a second decision answers 409. `GET /api/raters/signal` sums the screens of recent
scheduled runs per rater: an account whose feedback keeps pulling against what was learned is flagged.
The work is loop/training/quarantine.py and loop/scheduler/screening.py.
Tests: `.venv/bin/python -m pytest -q tests/unit/api/test_quarantine_api.py`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select

from loop.api.deps import AdminDep, SessionDep, StateDep
from loop.db.models import MAX_ID, Quarantine, TrainingRun
from loop.scheduler import screening
from loop.training import quarantine

router = APIRouter(prefix="/api", tags=["quarantine"])

QuarantineId = Annotated[int, Path(ge=1, le=MAX_ID, description="an id from GET /api/quarantine")]


class Decision(BaseModel):
    model_config = ConfigDict(extra="forbid")

    by: str | None = Field(None, max_length=200, description="who decided (shown beside the decision)")
    note: str | None = Field(None, max_length=2000, description="why")


@router.get("/quarantine")
def list_quarantine(s: SessionDep,
                    state: Annotated[Literal["held", "requeued", "dropped"] | None, Query()] = None,
                    limit: Annotated[int, Query(ge=1, le=500)] = 100,
                    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> dict[str, Any]:
    held = s.query(Quarantine).filter(Quarantine.state == "held").count()
    return {"items": quarantine.listing(s, state=state, limit=limit, offset=offset), "held": held}


@router.get("/quarantine/{quarantine_id}")
def get_quarantine(quarantine_id: QuarantineId, s: SessionDep) -> dict[str, Any]:
    return quarantine.describe(quarantine.get(s, quarantine_id))


@router.post("/quarantine/{quarantine_id}/requeue", dependencies=[AdminDep])
def requeue(quarantine_id: QuarantineId, s: SessionDep, body: Decision | None = None) -> dict[str, Any]:
    body = body or Decision()
    return quarantine.decide(s, quarantine_id, "requeue", by=body.by, note=body.note)


@router.post("/quarantine/{quarantine_id}/drop", dependencies=[AdminDep])
def drop(quarantine_id: QuarantineId, s: SessionDep, body: Decision | None = None) -> dict[str, Any]:
    body = body or Decision()
    return quarantine.decide(s, quarantine_id, "drop", by=body.by, note=body.note)


@router.get("/raters/signal")
def rater_signal(s: SessionDep, state: StateDep,
                 runs: Annotated[int, Query(ge=1, le=10_000, description="the newest scheduled runs read")] = 200,
                 ) -> dict[str, Any]:
    """Per rater over the screens of the newest `runs` scheduled runs: items screened, items that pulled back,
    the mean contribution, the sign-flip p-value of all of them, items quarantined, and `flagged` (p below the
    screen's level)."""
    rows = s.scalars(select(TrainingRun.metrics).where(TrainingRun.trigger == "scheduler")
                     .order_by(TrainingRun.id.desc()).limit(runs)).all()
    screens = [m["screen"] for m in rows if isinstance(m, dict) and isinstance(m.get("screen"), dict)]
    alpha = state.scheduler.config()["poison_alpha"] if state.scheduler is not None else state.settings.poison_alpha
    return {"runs": len(screens), "alpha": alpha,
            "raters": screening.rater_signal(screens, alpha=alpha or screening.DEFAULT_ALPHA)}
