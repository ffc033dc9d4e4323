"""Training-run history and the scheduler's controls.

- `GET /api/runs?status=&trigger=&limit=&offset=` → `{items, total, limit, offset}`, newest first.
- `GET /api/runs/{id}` → one run: batch summary (and why the scheduler started it), final metrics, per-step
  history, the versions before/after (with their eval figures), eval before/after, rollback reason.
- `GET /api/scheduler` → state, paused, thresholds, untrained counts, next-trigger estimate, last run.
- `POST /api/scheduler/pause`, `/resume`, `/run` (run now, thresholds aside), `/config` (change thresholds at
  runtime; `null` resets one to its setting) — admin.
"""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from sqlalchemy import func, select

from loop.api.deps import AdminDep, SchedulerDep, SessionDep, StateDep, scheduler_of
from loop.api.errors import ApiError
from loop.db.models import MAX_ID, RunFeedback, TrainingRun, WeightVersion
from loop.errors import NotFound
from loop.scheduler.tunables import TunableChanges

router = APIRouter(prefix="/api", tags=["runs"])

STATUSES = ("queued", "running", "succeeded", "failed", "refused", "rejected", "rolled_back", "lost")


def _iso(dt: Any) -> str | None:
    return dt.isoformat() if dt is not None else None


def run_summary(run: TrainingRun) -> dict[str, Any]:
    batch = run.batch or {}
    metrics = run.metrics or {}
    sched = batch.get("scheduler") or {}
    before, after = metrics.get("eval_before") or {}, metrics.get("eval_after") or {}
    return {
        "id": run.id, "created_at": _iso(run.created_at), "finished_at": _iso(run.finished_at),
        "status": run.status, "trigger": run.trigger, "objective": run.objective,
        "reason": sched.get("reason"), "size": sched.get("size", batch.get("n_pairs", 0) + batch.get("n_examples", 0)),
        "loss": metrics.get("loss"), "version_before": run.version_before, "version_after": run.version_after,
        "accuracy_before": before.get("accuracy"), "accuracy_after": after.get("accuracy"),
        "perplexity_before": before.get("canary_perplexity"), "perplexity_after": after.get("canary_perplexity"),
        "error": run.error,
    }


def _version(session: Any, v: int | None) -> dict[str, Any] | None:
    if v is None:
        return None
    from loop.api.routes.versions import version_json

    row = session.get(WeightVersion, v)
    return version_json(row) if row is not None else None


@router.get("/runs")
def list_runs(session: SessionDep, status: str | None = None, trigger: str | None = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0) -> dict[str, Any]:
    stmt = select(TrainingRun)
    if status is not None:
        if status not in STATUSES:
            raise ApiError(f"status must be one of {', '.join(STATUSES)}, not {status!r}", status_code=422,
                            code="invalid_status", param="status")
        stmt = stmt.where(TrainingRun.status == status)
    if trigger is not None:
        stmt = stmt.where(TrainingRun.trigger == trigger)
    total = session.scalar(select(func.count()).select_from(stmt.subquery())) or 0
    rows = session.scalars(stmt.order_by(TrainingRun.id.desc()).limit(limit).offset(offset)).all()
    return {"items": [run_summary(r) for r in rows], "total": total, "limit": limit, "offset": offset}


@router.get("/runs/{run_id}")
def get_run(run_id: Annotated[int, Path(ge=1, le=MAX_ID, description="a run id from GET /api/runs")],
            session: SessionDep) -> dict[str, Any]:
    run = session.get(TrainingRun, run_id)
    if run is None:
        raise NotFound(f"training run {run_id} does not exist; GET /api/runs lists them", code="run_not_found")
    metrics = run.metrics or {}
    consumed = session.execute(select(RunFeedback.rating_id, RunFeedback.comparison_id)
                               .where(RunFeedback.run_id == run_id)).all()
    rollback = metrics.get("rollback")
    return {
        **run_summary(run),
        "batch": run.batch or {},
        "metrics": metrics,
        "history": run.history or [],
        "consumed": {"rating_ids": sorted(r for r, _ in consumed if r is not None),
                     "comparison_ids": sorted(c for _, c in consumed if c is not None)},
        "version_before_info": _version(session, run.version_before),
        "version_after_info": _version(session, run.version_after),
        "eval_before": metrics.get("eval_before"),
        "eval_after": metrics.get("eval_after"),
        "rolled_back": run.status == "rolled_back",
        "rollback_reason": rollback.get("reason") if rollback else None,
        "rollback": rollback,
    }


@router.get("/scheduler")
async def scheduler_status(
        state: StateDep,
        stale_ok: Annotated[bool, Query(description="answer at once with the last untrained counts while newer "
                                                    "feedback is being counted (untrained_fresh: false)")] = False,
) -> dict[str, Any]:
    sched = scheduler_of(state)
    return await asyncio.to_thread(lambda: sched.describe(stale_ok=stale_ok))


@router.post("/scheduler/pause", dependencies=[AdminDep])
async def scheduler_pause(sched: SchedulerDep) -> dict[str, Any]:
    sched.pause()
    return await asyncio.to_thread(sched.describe)


@router.post("/scheduler/resume", dependencies=[AdminDep])
async def scheduler_resume(sched: SchedulerDep) -> dict[str, Any]:
    sched.resume()
    return await asyncio.to_thread(sched.describe)


@router.post("/scheduler/run", status_code=202, dependencies=[AdminDep])
async def scheduler_run_now(sched: SchedulerDep) -> dict[str, Any]:
    if sched.paused:
        raise ApiError("the scheduler is paused; resume it first (POST /api/scheduler/resume)", status_code=409,
                        code="scheduler_paused")
    sched.request_run()
    return await asyncio.to_thread(sched.describe)


@router.post("/scheduler/config", dependencies=[AdminDep])
async def scheduler_config(body: TunableChanges, state: StateDep) -> dict[str, Any]:  # type: ignore[valid-type]
    """Change thresholds at runtime (loop/scheduler/tunables.py: the settings' own ranges, finite numbers)."""
    sched = scheduler_of(state)
    try:
        sched.configure(**body.model_dump(exclude_unset=True))
    except ValueError as exc:  # the model checks the same ranges; this keeps the two from drifting into a 500
        raise ApiError(str(exc), status_code=422, code="invalid_scheduler_config") from exc
    return await asyncio.to_thread(sched.describe)
