"""GET /api/stats: counts by day, the rating distribution, and how much training data feedback has produced.

"Pairs available" counts exactly what `loop.pairs` would hand the trainer (and the export would write);
"untrained" leaves out feedback a run already consumed. Days are UTC.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loop.api.deps import SessionDep
from loop.api.schemas import Stats
from loop.db.models import Comparison, Rating, Response
from loop.pairs import PairFilters, preference_pairs, unpaired_examples

router = APIRouter(prefix="/api", tags=["stats"])


def _day(s: Session, column: Any) -> Any:
    if s.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.strftime("%Y-%m-%d", column)  # SQLite keeps UTC wall time as text


def _per_day(s: Session, table: Any, since: datetime) -> dict[str, int]:
    day = _day(s, table.created_at)
    rows = s.execute(select(day, func.count()).where(table.created_at >= since).group_by(day))
    return {str(d): int(n) for d, n in rows}


def stats(s: Session, days: int = 30) -> dict[str, Any]:
    since = datetime.combine(date.today() - timedelta(days=days - 1), datetime.min.time(), tzinfo=timezone.utc)
    per = {name: _per_day(s, table, since)
           for name, table in (("responses", Response), ("ratings", Rating), ("comparisons", Comparison))}
    all_days = sorted(set().union(*per.values()))
    thumbs = dict(s.execute(select(Rating.thumb, func.count()).where(Rating.is_current.is_(True),
                                                                       Rating.thumb.is_not(None))
                            .group_by(Rating.thumb)).tuples().all())
    scores = dict(s.execute(select(Rating.score, func.count()).where(Rating.is_current.is_(True),
                                                                       Rating.score.is_not(None))
                            .group_by(Rating.score)).tuples().all())
    untrained = PairFilters(untrained_only=True)
    return {
        "responses_total": s.scalar(select(func.count()).select_from(Response)) or 0,
        "ratings_total": s.scalar(select(func.count()).select_from(Rating)) or 0,
        "comparisons_total": s.scalar(select(func.count()).select_from(Comparison)) or 0,
        "by_day": [{"day": d, **{name: per[name].get(d, 0) for name in per}} for d in all_days],
        "thumbs": {"up": int(thumbs.get(1, 0)), "down": int(thumbs.get(-1, 0))},
        "scores": {str(i): int(scores.get(i, 0)) for i in range(1, 11)},
        "pairs_available": sum(1 for _ in preference_pairs(s)),
        "unpaired_available": sum(1 for _ in unpaired_examples(s)),
        "untrained_pairs": sum(1 for _ in preference_pairs(s, untrained)),
        "untrained_unpaired": sum(1 for _ in unpaired_examples(s, untrained)),
    }


@router.get("/stats", response_model=Stats)
def get_stats(s: SessionDep, days: Annotated[int, Query(ge=1, le=3650, description="days in by_day")] = 30
              ) -> dict[str, Any]:
    """Totals (ratings/comparisons count every row, history included), per-day counts, current ratings'
    thumbs and score distribution, and the training data available."""
    return stats(s, days)
