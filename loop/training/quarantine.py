"""Quarantined feedback: held back by a scheduled run's screen, shown with its evidence, re-queued or dropped.

What: `hold` records, in the run's own transaction, each group of items the screen held back
(loop/scheduler/screening.py) with the test's figures; its feedback stays consumed by the run (RunFeedback), so
no batch picks it up while an operator looks (`consume` makes held companions, thumbs screened beside the batch
but not in it, consumed the same way). `requeue` releases it (a later batch trains on it — screened again
with that batch); `drop` keeps it out for good. Both are one conditional UPDATE (`state = 'held'`), so two
operators deciding at once get one success and one 409, and a decision is never applied twice.
Tests: `.venv/bin/python -m pytest -q tests/unit/training/test_quarantine.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from loop.db.models import Quarantine, RunFeedback
from loop.errors import Conflict, NotFound

if TYPE_CHECKING:
    from loop.pairs import Item
    from loop.scheduler.screening import Decision

STATES = ("held", "requeued", "dropped")


def hold(s: Session, run_id: int, items: Sequence[Item], decision: Decision, figures: dict[str, Any]) -> list[int]:
    """Record the decision's held groups (in the caller's transaction); returns the new quarantine ids."""
    rows = []
    for held in decision.held:
        chosen = [items[i] for i in held.indices]
        evidence = {"p_value": held.p_value, "alpha": held.alpha, "batch_p_value": decision.p_value,
                    "groups": decision.groups,
                    "items": [figures["items"][i] for i in held.indices] if figures.get("items") else []}
        rows.append(Quarantine(run_id=run_id, scope=held.scope, reason=held.reason, evidence=evidence,
                               rating_ids=sorted({r for it in chosen for r in it.rating_ids}),
                               comparison_ids=sorted({c for it in chosen for c in it.comparison_ids})))
    s.add_all(rows)
    s.flush()
    return [r.id for r in rows]


def consume(s: Session, run_id: int, rating_ids: set[int]) -> int:
    """Make held companions (waiting thumbs screened beside a batch) consumed by the run that held them, in the
    caller's transaction, so no batch picks them up while they are held; a rating some other run consumed
    meanwhile is left to it. Returns how many rows were added."""
    if not rating_ids:
        return 0
    taken = set(s.scalars(select(RunFeedback.rating_id).where(RunFeedback.rating_id.in_(rating_ids))))
    fresh = sorted(rating_ids - taken)
    s.add_all([RunFeedback(run_id=run_id, rating_id=r) for r in fresh])
    s.flush()
    return len(fresh)


def release(s: Session, run_id: int) -> int:
    """Give a run's feedback back to the queue (the run failed, was lost, rolled back, ...), except what its
    screen holds in quarantine: that waits for an operator. Returns how many rows were released."""
    held = s.execute(select(Quarantine.rating_ids, Quarantine.comparison_ids)
                     .where(Quarantine.run_id == run_id, Quarantine.state == "held")).all()
    keep_r = {i for r, _ in held for i in (r or [])}
    keep_c = {i for _, c in held for i in (c or [])}
    query = delete(RunFeedback).where(RunFeedback.run_id == run_id)
    if keep_r:
        query = query.where(or_(RunFeedback.rating_id.is_(None), RunFeedback.rating_id.not_in(keep_r)))
    if keep_c:
        query = query.where(or_(RunFeedback.comparison_id.is_(None), RunFeedback.comparison_id.not_in(keep_c)))
    return int(s.execute(query).rowcount or 0)


def describe(q: Quarantine) -> dict[str, Any]:
    return {"id": q.id, "run_id": q.run_id, "created_at": q.created_at, "scope": q.scope, "reason": q.reason,
            "state": q.state, "rating_ids": list(q.rating_ids or []), "comparison_ids": list(q.comparison_ids or []),
            "n_items": len((q.evidence or {}).get("items") or []), "evidence": q.evidence,
            "decided_at": q.decided_at, "decided_by": q.decided_by, "note": q.note}


def listing(s: Session, *, state: str | None = None, limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
    query = select(Quarantine).order_by(Quarantine.id.desc()).limit(limit).offset(offset)
    if state is not None:
        query = query.where(Quarantine.state == state)
    return [describe(q) for q in s.scalars(query)]


def get(s: Session, quarantine_id: int) -> Quarantine:
    q = s.get(Quarantine, quarantine_id)
    if q is None:
        raise NotFound(f"no quarantined batch {quarantine_id}; GET /api/quarantine lists them",
                       code="quarantine_not_found")
    return q


def decide(s: Session, quarantine_id: int, action: str, *, by: str | None = None, note: str | None = None
           ) -> dict[str, Any]:
    """`requeue` or `drop` a held batch, committed; Conflict if it was already decided."""
    if action not in ("requeue", "drop"):
        raise ValueError(f"unknown action {action!r}")
    q = get(s, quarantine_id)
    new_state = "requeued" if action == "requeue" else "dropped"
    done = s.execute(update(Quarantine).where(Quarantine.id == quarantine_id, Quarantine.state == "held")
                     .values(state=new_state, decided_at=datetime.now(timezone.utc), decided_by=by, note=note))
    if done.rowcount != 1:
        s.rollback()
        s.refresh(q)
        raise Conflict(f"quarantined batch {quarantine_id} was already {q.state}"
                       f"{' by ' + q.decided_by if q.decided_by else ''}; only a held batch can be re-queued or dropped",
                       code="quarantine_decided")
    if action == "requeue":
        conds = []
        if q.rating_ids:
            conds.append(RunFeedback.rating_id.in_(q.rating_ids))
        if q.comparison_ids:
            conds.append(RunFeedback.comparison_id.in_(q.comparison_ids))
        if conds:
            s.execute(delete(RunFeedback).where(RunFeedback.run_id == q.run_id, or_(*conds)))
    s.commit()  # fewer RunFeedback rows move pairs.inputs_key: the scheduler's pool is recounted
    s.refresh(q)
    return describe(q)
