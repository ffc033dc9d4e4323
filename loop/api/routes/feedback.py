"""Feedback routes: rate a response, compare two, list ratings and comparisons.

POST /api/ratings is the hot path: it skips the per-request database session and hands the rating to the
app's `RatingWriter` (`LoopState.rating_writer`: group commit; the reply waits for the commit; drained when the
app stops). Idempotency keys come in the body (`idempotency_key`) or the `Idempotency-Key` header; a replay gets
200 and the stored object, the same key with another body 409.

A 2xx means the row is committed (and, on SQLite with `synchronous=FULL` or PostgreSQL, on disk). A write whose
transaction failed answers 503 `storage_unavailable` with Retry-After: nothing was stored, retry with the same
idempotency key. Should the outcome of a rating be unknown (a broken batch), 500 `storage_outcome_unknown` says
so; the same retry is safe. The store answers outcomes of a kind (loop.feedback.store.Outcome); `_reply` is the
one place that turns them into statuses. Tests: tests/unit/feedback/test_feedback.py, tests/unit/api/test_outcomes.py,
tests/faults/test_acknowledged.py.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from loop.api.deps import SessionDep, rater_for
from loop.api.errors import ApiError
from loop.api.schemas import (
    MAX_ID,
    ComparisonIn,
    ComparisonOut,
    ComparisonPage,
    RatingIn,
    RatingOut,
    RatingPage,
    Winner,
)
from loop.errors import Conflict, Invalid, NotFound, Unavailable
from loop.feedback import ComparisonInput, Outcome, RatingInput, write_comparison
from loop.feedback.queries import FeedbackFilters, list_comparisons, list_ratings
from loop.feedback.store import RATING_FIELDS, THUMB_TO_INT, not_stored
from loop.feedback.writer import RESPONSE_WAIT_S
from loop.state import LoopState

router = APIRouter(prefix="/api", tags=["feedback"])

IdemHeader = Annotated[str | None, Header(alias="Idempotency-Key", max_length=200,
                                          description="Same as the body's idempotency_key.")]


def _key(body_key: str | None, header_key: str | None) -> str | None:
    if header_key is not None and not 1 <= len(header_key) <= 200:
        raise ApiError(f"the Idempotency-Key header must be 1..200 characters, got {len(header_key)}",
                        status_code=422, code="invalid_idempotency_key", param="Idempotency-Key")
    if body_key and header_key and body_key != header_key:
        raise ApiError(f"the Idempotency-Key header ({header_key!r}) and the body's idempotency_key "
                        f"({body_key!r}) differ; send one of them", status_code=422, code="idempotency_key_mismatch",
                        param="idempotency_key")
    return body_key or header_key


# Seconds a client waits before retrying a write the database did not commit: long enough for a busy
# database to catch up, short enough that a person rating in the UI does not notice.
RETRY_AFTER_S = 1


STORAGE_UNAVAILABLE_DOC = {"description": "`storage_unavailable`: the database did not commit the write, nothing "
                                          "was stored; retry after Retry-After seconds with the same idempotency key"}


class StorageOutcomeUnknown(ApiError):
    def __init__(self, message: str, **kw: object) -> None:
        super().__init__(message, status_code=500, **kw)  # type: ignore[arg-type]


def _reply(outcome: Outcome, request: Request, kind: str) -> JSONResponse:
    """The store's outcome as HTTP: created 201, replayed 200, not_found 404, conflict 409 (the idempotency key),
    invalid 422, unavailable 503 with Retry-After, unknown 500."""
    match outcome.kind:
        case "created":
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                getattr(metrics, kind)()
            return JSONResponse(outcome.body, status_code=201)
        case "replayed":
            return JSONResponse(outcome.body, status_code=200)
        case "not_found":
            raise NotFound(outcome.message or "not found", code=outcome.code)
        case "conflict":
            raise Conflict(outcome.message or "conflict", code=outcome.code,
                           param="expected_current_id" if outcome.code == "stale_rating" else "idempotency_key")
        case "invalid":
            raise Invalid(outcome.message or "invalid", code=outcome.code)
        case "unavailable":
            raise Unavailable(outcome.message or "storage unavailable", code=outcome.code,
                              retry_after_s=RETRY_AFTER_S)
        case _:
            raise StorageOutcomeUnknown(outcome.message or "storing failed", code=outcome.code)


@router.post("/ratings", status_code=201, response_model=RatingOut,
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/json": {"schema": RatingIn.model_json_schema()}}}},
             responses={200: {"model": RatingOut, "description": "a replay of an idempotency key"},
                        503: STORAGE_UNAVAILABLE_DOC})
async def create_rating(request: Request) -> JSONResponse:
    """Rate a response: thumb and/or score 1..10, comment, tags. A rater's new rating supersedes their older and
    merges over it: a field left out keeps its value, null (or [] for tags) clears it, all cleared withdraws the
    rating (kept in the history, never trained on). `expected_current_id` refuses a write made on a stale view
    (409 `stale_rating`).

    The body is validated by hand with the same `RatingIn` model (pydantic's JSON parser, straight from the
    bytes): FastAPI's generic body and dependency handling cost more than storing the rating does."""
    try:
        body = RatingIn.model_validate_json(await request.body())
    except ValidationError as exc:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]) from None
    state: LoopState = request.app.state.loop  # not a dependency: resolving one costs more than the write
    sent = body.model_fields_set
    item = RatingInput(response_id=body.response_id, rater=rater_for(request, body.rater),
                       thumb=THUMB_TO_INT[body.thumb] if body.thumb else None, score=body.score,
                       comment=body.comment, tags=tuple(body.tags),
                       idempotency_key=_key(body.idempotency_key, request.headers.get("idempotency-key")),
                       given=frozenset(sent & set(RATING_FIELDS)), expects="expected_current_id" in sent,
                       expected_current_id=body.expected_current_id)
    return _reply(await state.rating_writer.submit(item), request, "rating")


@router.post("/comparisons", status_code=201, response_model=ComparisonOut,
             responses={200: {"model": ComparisonOut, "description": "a replay of an idempotency key"},
                        503: STORAGE_UNAVAILABLE_DOC})
async def create_comparison(body: ComparisonIn, request: Request,
                            idempotency_key: IdemHeader = None) -> JSONResponse:
    """Record which of two answers to the same prompt is better: a, b, tie or both_bad."""
    state: LoopState = request.app.state.loop
    item = ComparisonInput(body.response_a_id, body.response_b_id, body.winner, rater_for(request, body.rater),
                           body.comment,
                           _key(body.idempotency_key, idempotency_key))
    # Answers served a moment ago may still wait for their commit (loop.feedback.responses): wait, as ratings do.
    if not await state.response_writer.settled((item.response_a_id, item.response_b_id), RESPONSE_WAIT_S):
        return _reply(not_stored("comparison", "a response it names was served but its row is not committed yet "
                                               "(the database is refusing writes)"), request, "comparison")
    return _reply(await run_in_threadpool(write_comparison, state.sessions, item), request, "comparison")


Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0, le=MAX_ID)]


@router.get("/ratings", response_model=RatingPage)
def get_ratings(s: SessionDep, since: datetime | None = None, until: datetime | None = None,
                rater: str | None = None, response_id: str | None = None, tag: str | None = None,
                current_only: bool = False, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """All ratings, newest first (history included unless current_only=true)."""
    items, total = list_ratings(s, FeedbackFilters(since=since, until=until, rater=rater, response_id=response_id,
                                                   current_only=current_only, tag=tag), limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}


@router.get("/comparisons", response_model=ComparisonPage)
def get_comparisons(s: SessionDep, since: datetime | None = None, until: datetime | None = None,
                    rater: str | None = None, response_id: str | None = None, winner: Winner | None = None,
                    current_only: bool = False, limit: Limit = 50, offset: Offset = 0) -> dict[str, Any]:
    """All comparisons, newest first."""
    items, total = list_comparisons(s, FeedbackFilters(since=since, until=until, rater=rater,
                                                       response_id=response_id, current_only=current_only,
                                                       winner=winner), limit=limit, offset=offset)
    return {"items": items, "total": total, "limit": limit, "offset": offset}
