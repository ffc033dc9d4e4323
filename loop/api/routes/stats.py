"""GET /api/stats: counts by day, the rating distribution, and how much training data feedback has produced.

"Pairs available" counts exactly what `loop.pairs` would hand the trainer (and the export would write), counted
in SQL (`pairs.count_available`); "untrained" leaves out feedback a run already consumed. Days are UTC.

The web UI polls this from every open Training view, and every figure reads all feedback, so the answer is
cached per app (loop/readcache.py) under a key that moves with every write it depends on (a rating, comparison,
response, consumption or held-out mark; the day; `days`): a repeated request costs a few indexed reads and
gives what a fresh computation would. `?stale_ok=true` (the UI's timers) never waits for a recomputation: while
one runs in the background it answers the previous figures with `fresh: false` and their `as_of`. Tests: `.venv/bin/python -m pytest -q tests/unit/feedback/test_export.py
tests/unit/feedback/test_stats_counts.py`.
"""

from __future__ import annotations

import threading
from datetime import date, datetime, timedelta, timezone
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from loop import pairs
from loop.api.deps import SessionDep
from loop.api.schemas import Stats
from loop.db.models import Comparison, Rating, Response
from loop.feedback.agreement import agreement_summary
from loop.readcache import ReadCache

router = APIRouter(prefix="/api", tags=["stats"])
_cache_lock = threading.Lock()


def _day(s: Session, column: Any) -> Any:
    if s.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", column), "YYYY-MM-DD")
    return func.substr(column, 1, 10)  # SQLite keeps the UTC wall time as text, "YYYY-MM-DD HH:MM:SS..."


def _per_day(s: Session, table: Any, since: datetime) -> dict[str, int]:
    day = _day(s, table.created_at)
    rows = s.execute(select(day, func.count()).where(table.created_at >= since).group_by(day))
    return {str(d): int(n) for d, n in rows}


def _distribution(s: Session, column: Any) -> dict[Any, int]:
    rows = s.execute(select(column, func.count()).where(Rating.is_current.is_(True), column.is_not(None))
                     .group_by(column))
    return {value: int(n) for value, n in rows}


def stats(s: Session, days: int = 30) -> dict[str, Any]:
    since = datetime.combine(date.today() - timedelta(days=days - 1), datetime.min.time(), tzinfo=timezone.utc)
    per = {name: _per_day(s, table, since)
           for name, table in (("responses", Response), ("ratings", Rating), ("comparisons", Comparison))}
    all_days = sorted(set().union(*per.values()))
    thumbs = _distribution(s, Rating.thumb)
    scores = _distribution(s, Rating.score)
    return {
        "responses_total": s.scalar(select(func.count()).select_from(Response)) or 0,
        "ratings_total": s.scalar(select(func.count()).select_from(Rating)) or 0,
        "comparisons_total": s.scalar(select(func.count()).select_from(Comparison)) or 0,
        "by_day": [{"day": d, **{name: per[name].get(d, 0) for name in per}} for d in all_days],
        "thumbs": {"up": thumbs.get(1, 0), "down": thumbs.get(-1, 0)},
        "scores": {str(i): scores.get(i, 0) for i in range(1, 11)},
        **pairs.count_available(s),
        "agreement": agreement_summary(s),
    }


def stats_key(s: Session, days: int) -> tuple[Any, ...]:
    """Moves whenever a figure of `stats(s, days)` could: new responses, anything `pairs.inputs_key` sees, the day."""
    return (days, date.today(), s.scalar(select(func.count()).select_from(Response)), *pairs.inputs_key(s))


def _stats_cache(request: Request, days: int) -> ReadCache[dict[str, Any]]:
    """One cache per `days` (a stale answer must be for the days asked), a handful kept."""
    app_state = request.app.state
    with _cache_lock:
        caches = getattr(app_state, "stats_caches", None)
        if caches is None or (days not in caches and len(caches) >= 8):
            caches = app_state.stats_caches = {}
        return caches.setdefault(days, ReadCache())


@router.get("/stats", response_model=Stats)
def get_stats(request: Request, s: SessionDep,
              days: Annotated[int, Query(ge=1, le=3650, description="days in by_day")] = 30,
              stale_ok: Annotated[bool, Query(description="answer at once with the last figures while newer "
                                                          "feedback is being counted (fresh: false)")] = False,
              ) -> dict[str, Any]:
    """Totals (ratings/comparisons count every row, history included), per-day counts, current ratings'
    thumbs and score distribution, the training data available, and the raters' agreement (Krippendorff's alpha
    over answers two or more raters rated: loop/feedback/agreement.py)."""
    cache = _stats_cache(request, days)
    sessions = request.app.state.loop.sessions

    def refresh() -> None:
        with sessions() as own:
            cache.get(lambda: stats_key(own, days), lambda: stats(own, days))

    read = cache.read(lambda: stats_key(s, days), lambda: stats(s, days), stale_ok=stale_ok, refresh=refresh)
    return {**read.value, "as_of": datetime.fromtimestamp(read.as_of, timezone.utc), "fresh": read.fresh}
