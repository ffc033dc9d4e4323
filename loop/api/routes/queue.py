"""Rating queue routes: the next answer for the caller to rate, and what each rater has done.

GET /api/queue/next answers 200 with `{"item": ..., "progress": ..., "raters_per_item": N | null}`; when nothing
is left for the caller, `item` is null (200, not 204: the progress still comes with it). The caller is who
POST /api/ratings would file a rating under (`rater_for`: the signed-in account, else, where tokens are not
required, the `rater` query parameter or `anonymous`). Skipping is client-side state: the client sends the ids
it skipped as repeated `skip` parameters; nothing about a skip is stored. The domain is loop/feedback/queue.py.
Tests: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/feedback/test_queue.py
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from loop.api.deps import SessionDep, rater_for
from loop.api.errors import ApiError
from loop.api.routes.history import served_rows_committed
from loop.feedback.queries import ResponseFilters
from loop.feedback.queue import next_answer, progress, rater_stats

router = APIRouter(prefix="/api/queue", tags=["queue"])

# A client skips a handful of answers per session; the bound keeps one URL (and one NOT IN list) small.
MAX_SKIP = 500


@router.get("/next", dependencies=[Depends(served_rows_committed)])
def get_next(
    request: Request,
    s: SessionDep,
    skip: Annotated[list[str], Query(description="ids this client skipped (repeat the parameter); kept by the "
                                                 "client, never stored")] = [],  # noqa: B006 - FastAPI copies it
    rater: Annotated[str | None, Query(max_length=200, description="whose queue, where tokens are not required "
                                                                   "(signed in: the token's rater)")] = None,
    q: Annotated[str | None, Query(max_length=500, description="only answers with this text in the prompt or "
                                                               "the completion")] = None,
    since: Annotated[datetime | None, Query(description="ISO-8601; only answers created at or after")] = None,
    until: Annotated[datetime | None, Query(description="ISO-8601; only answers created before")] = None,
    model: str | None = None,
) -> dict[str, Any]:
    """The next answer for the caller to rate: one they have not rated (no current, non-withdrawn rating of
    theirs) and did not skip, fewest raters first, oldest first among equals; with LOOP_QUEUE_RATERS_PER_ITEM
    = N, answers N raters rated are left out and answers 1..N-1 rated come first. `item` is null when nothing is
    left. `progress`: rated_by_you, left_for_you (skipped answers included), total."""
    if len(skip) > MAX_SKIP:
        raise ApiError(f"at most {MAX_SKIP} skip ids, got {len(skip)}: forget the oldest skips (a reload of the "
                       "queue starts with none)", status_code=422, code="too_many_skips", param="skip")
    name = rater_for(request, rater)
    per_item = request.app.state.loop.settings.queue_raters_per_item
    f = ResponseFilters(q=q, since=since, until=until, model=model)
    item = next_answer(s, name, skip=skip, raters_per_item=per_item, filters=f)
    return {"rater": name, "item": item, "progress": progress(s, name, raters_per_item=per_item, filters=f),
            "raters_per_item": per_item}


@router.get("/stats")
def get_queue_stats(request: Request, s: SessionDep) -> dict[str, Any]:
    """Per rater (current, non-withdrawn ratings): answers rated, thumbs up/down, answers scored, mean score, last
    rated at, and thumbs agreement with the other raters on shared answers (`rate` = agreed / pairs); totals; and
    Krippendorff's alpha for thumbs and scores (as in GET /api/stats)."""
    return {**rater_stats(s), "raters_per_item": request.app.state.loop.settings.queue_raters_per_item}
