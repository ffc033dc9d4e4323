"""History routes: list and filter responses (with their rating summaries), and one response in full.

Both read what was served before the read: a proxied answer's row is committed just after its reply
(loop.feedback.responses), so they first wait, briefly, for rows still pending.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request

from loop.api.deps import SessionDep
from loop.api.errors import ApiError
from loop.api.schemas import ResponseDetail, ResponsePage
from loop.db.models import MAX_ID
from loop.errors import NotFound
from loop.feedback.queries import (
    RatingFilter,
    ResponseFilters,
    ResponseSort,
    list_responses,
    response_detail,
)

router = APIRouter(prefix="/api", tags=["history"])

# A healthy database commits a pending row in milliseconds; past this, answer with what is committed.
READ_WAIT_S = 2.0


async def served_rows_committed(request: Request) -> None:
    """The asked-for response (or, for a list, every row pending now) is committed, or READ_WAIT_S has passed."""
    rid = request.path_params.get("response_id")
    await request.app.state.loop.response_writer.settled([rid] if rid else None, READ_WAIT_S)


@router.get("/responses", response_model=ResponsePage, dependencies=[Depends(served_rows_committed)])
def get_responses(
    s: SessionDep,
    since: Annotated[datetime | None, Query(description="ISO-8601; created at or after")] = None,
    until: Annotated[datetime | None, Query(description="ISO-8601; created before")] = None,
    rating: Annotated[RatingFilter | None, Query(description="up | down | rated | unrated (current ratings)")] = None,
    min_score: Annotated[float | None, Query(ge=1, le=10, description="mean current score at least")] = None,
    max_score: Annotated[float | None, Query(ge=1, le=10, description="mean current score at most")] = None,
    tag: Annotated[str | None, Query(max_length=64)] = None,
    rater: str | None = None,
    model: str | None = None,
    weight_version: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None,
    q: Annotated[str | None, Query(max_length=500, description="text in the prompt or the completion")] = None,
    sort: ResponseSort = "-created_at",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> dict[str, Any]:
    """Logged responses, filtered, sorted and paginated."""
    if min_score is not None and max_score is not None and min_score > max_score:
        raise ApiError(f"min_score ({min_score}) is above max_score ({max_score}); swap them", status_code=422,
                        param="min_score")
    f = ResponseFilters(since=since, until=until, rating=rating, min_score=min_score, max_score=max_score, tag=tag,
                        rater=rater, model=model, weight_version=weight_version, q=q)
    items, total = list_responses(s, f, sort=sort, limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get("/responses/{response_id}", response_model=ResponseDetail,
            dependencies=[Depends(served_rows_committed)])
def get_response(response_id: str, s: SessionDep) -> dict[str, Any]:
    """One response with everything stored about it, its ratings (history included, newest first) and comparisons."""
    detail = response_detail(s, response_id)
    if detail is None:
        raise NotFound(f"response {response_id!r} not found; list ids with GET /api/responses",
                       code="response_not_found")
    return detail
