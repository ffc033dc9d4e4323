"""The rating queue: which answer a rater should rate next, how far they are, and what each rater has done.

An answer is *rated by* a rater when that rater has a current, non-withdrawn rating of it; its *raters* are the
distinct raters who rated it so. The next answer for a rater is one they have not rated and did not skip,
fewest raters first (under-rated answers first), oldest first among equals. Skipping is the client's state: it
sends the ids it skipped (`skip`) with each request, so nothing about a skip is stored and a reload forgets it.

Assignment (`raters_per_item` = N, off by default): an answer leaves everyone's queue once N raters rated it, and
answers some but not all N raters rated (1..N-1) come first, the closest to N first, so the same N raters see
the same answers and their agreement can be measured (loop/feedback/agreement.py).

Portable SQL only (SQLite and PostgreSQL). No HTTP here: loop/api/routes/queue.py maps it.
Tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/feedback/test_queue.py
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session

from loop.db.models import Rating, Response
from loop.feedback.agreement import agreement_summary, per_rater_agreement, rating_values
from loop.feedback.queries import ResponseFilters, response_conditions, says_something
from loop.feedback.store import iso, rating_json


def _raters_per_answer() -> Any:
    """(response_id, raters) for every answer with at least one current, non-withdrawn rating."""
    return (select(Rating.response_id.label("response_id"),
                   func.count(func.distinct(Rating.rater)).label("raters"))
            .where(Rating.is_current.is_(True), says_something())
            .group_by(Rating.response_id).subquery())


def _rated_by(rater: str) -> Any:
    return select(Rating.response_id).where(Rating.rater == rater, Rating.is_current.is_(True), says_something())


def _candidates(rater: str, raters_per_item: int | None, filters: ResponseFilters) -> tuple[Any, Any, list[Any]]:
    """The answers still in `rater`'s queue (skips aside): the raters column and the conditions."""
    counts = _raters_per_answer()
    raters = func.coalesce(counts.c.raters, 0)
    conds = [*response_conditions(filters), Response.id.not_in(_rated_by(rater))]
    if raters_per_item is not None:
        conds.append(raters < raters_per_item)
    return counts, raters, conds


def next_answer(s: Session, rater: str, *, skip: Sequence[str] = (), raters_per_item: int | None = None,
                filters: ResponseFilters = ResponseFilters()) -> dict[str, Any] | None:
    """The next answer for `rater` (None when none is left), as `answer_json` shows it."""
    counts, raters, conds = _candidates(rater, raters_per_item, filters)
    if skip:
        conds.append(Response.id.not_in(list(skip)))
    order: list[Any] = []
    if raters_per_item is not None:  # started answers first, the closest to N first
        order += [case((raters > 0, 0), else_=1), raters.desc()]
    else:
        order.append(raters.asc())
    order += [Response.created_at.asc(), Response.id.asc()]
    row = s.execute(select(Response, raters).outerjoin(counts, counts.c.response_id == Response.id)
                    .where(and_(*conds)).order_by(*order).limit(1)).first()
    if row is None:
        return None
    response, n = row
    return answer_json(s, response, rater, int(n))


def answer_json(s: Session, r: Response, rater: str, raters: int) -> dict[str, Any]:
    """What a rater needs to judge an answer: the prompt (messages or prompt text) and the completion, named as
    GET /api/responses/{id} names them, the number of raters so far, and the rater's own current rating (a
    withdrawn one included: the widget must start from it). Other raters' ratings are left out so that each
    rater judges blind, which is what makes their agreement mean something."""
    mine = s.scalars(select(Rating).where(Rating.response_id == r.id, Rating.rater == rater,
                                          Rating.is_current.is_(True)).order_by(Rating.id.desc()).limit(1)).first()
    return {"id": r.id, "created_at": iso(r.created_at), "model": r.model, "endpoint": r.endpoint,
            "weight_version": r.weight_version, "weight_version_last": r.weight_version_last,
            "messages": r.messages, "prompt_text": r.prompt_text, "completion": r.completion,
            "finish_reason": r.finish_reason, "truncated": bool(r.truncated), "raters": raters,
            "your_rating": None if mine is None else rating_json(mine)}


def progress(s: Session, rater: str, *, raters_per_item: int | None = None,
             filters: ResponseFilters = ResponseFilters()) -> dict[str, int]:
    """`rated_by_you`: answers `rater` rated; `left_for_you`: answers still in their queue (skipped ones
    included: a skip is not stored); `total`: all answers (within `filters`). With assignment, answers N others
    rated are in neither of the first two."""
    base = response_conditions(filters)
    total = s.scalar(select(func.count()).select_from(Response).where(and_(*base))) or 0
    rated = s.scalar(select(func.count()).select_from(Response)
                     .where(and_(*base, Response.id.in_(_rated_by(rater))))) or 0
    counts, _, conds = _candidates(rater, raters_per_item, filters)
    left = s.scalar(select(func.count()).select_from(Response)
                    .outerjoin(counts, counts.c.response_id == Response.id).where(and_(*conds))) or 0
    return {"rated_by_you": int(rated), "left_for_you": int(left), "total": int(total)}


def rater_stats(s: Session) -> dict[str, Any]:
    """Per rater (current, non-withdrawn ratings): answers rated, thumbs up / down, mean score, when they last
    rated, and their thumbs agreement with the other raters on shared answers; totals over everyone; and alpha."""
    rows = s.execute(select(Rating.rater, func.count(), func.sum(case((Rating.thumb == 1, 1), else_=0)),
                            func.sum(case((Rating.thumb == -1, 1), else_=0)), func.avg(Rating.score),
                            func.count(Rating.score), func.max(Rating.created_at))
                     .where(Rating.is_current.is_(True), says_something())
                     .group_by(Rating.rater).order_by(Rating.rater)).all()
    values = rating_values(s)
    agreement = per_rater_agreement(values[0])
    raters = []
    for name, n, up, down, mean, scored, last in rows:
        a = agreement.get(name)
        raters.append({"rater": name, "ratings": int(n), "thumbs_up": int(up or 0), "thumbs_down": int(down or 0),
                       "scored": int(scored), "mean_score": None if mean is None else round(float(mean), 3),
                       "last_rated_at": iso(last),
                       "agreement": a.to_json() if a else {"items": 0, "pairs": 0, "agreed": 0, "rate": None}})
    n, up, down, mean, scored = s.execute(
        select(func.count(), func.sum(case((Rating.thumb == 1, 1), else_=0)),
               func.sum(case((Rating.thumb == -1, 1), else_=0)), func.avg(Rating.score), func.count(Rating.score))
        .where(Rating.is_current.is_(True), says_something())).one()
    totals = {"raters": len(raters), "ratings": int(n), "thumbs_up": int(up or 0), "thumbs_down": int(down or 0),
              "scored": int(scored), "mean_score": None if mean is None else round(float(mean), 3)}
    return {"raters": raters, "totals": totals, "agreement": agreement_summary(s, values)}
