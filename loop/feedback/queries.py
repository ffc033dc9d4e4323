"""History queries: filter, sort and page responses, ratings and comparisons — portable SQL only.

Everything here runs unchanged on SQLite and PostgreSQL (both are tested):
- text search is `ILIKE` (SQLAlchemy renders `lower(x) LIKE lower(y)` on SQLite) over prompt_text, completion
  and the JSON text of messages, with LIKE wildcards in the user's text escaped;
- tags are a JSON list in `ratings.tags`; "has tag t" is a LIKE on the JSON text for the JSON-encoded string
  `"t"` (both backends store the JSON text loop wrote, so the quoting is identical) — no JSON1/JSONB operators;
- "rating" filters and the score sort look only at current ratings (a changed mind replaces the old verdict);
- "rater" matches every response that rater gave feedback on: rated or compared (A or B side), history included.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Select, String, and_, cast, exists, func, or_, select, union
from sqlalchemy.orm import Session

from loop.db.models import Comparison, Rating, Response, generated_with
from loop.feedback.store import comparison_json, is_withdrawal, iso, rating_json

RatingFilter = Literal["up", "down", "rated", "unrated"]
ResponseSort = Literal["created_at", "-created_at", "score", "-score"]
PREVIEW_CHARS = 200


def as_utc(dt: datetime | None) -> datetime | None:
    """Bind value for a time filter, in UTC (a time without zone is taken as UTC). SQLite stores the UTC wall
    time as text and its bind drops the zone; PostgreSQL compares timestamptz properly either way."""
    if dt is None:
        return None
    if dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


def in_time_range(column: Any, since: datetime | None, until: datetime | None) -> list[Any]:
    """`since <= column < until` as SQL conditions (either bound may be absent); times taken as UTC."""
    conds: list[Any] = []
    if since is not None:
        conds.append(column >= as_utc(since))
    if until is not None:
        conds.append(column < as_utc(until))
    return conds


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def tag_clause(column: Any, tag: str) -> Any:
    return cast(column, String).like(f"%{like_escape(json.dumps(tag))}%", escape="\\")


@dataclass(frozen=True)
class ResponseFilters:
    since: datetime | None = None
    until: datetime | None = None
    rating: RatingFilter | None = None
    min_score: float | None = None
    max_score: float | None = None
    tag: str | None = None
    rater: str | None = None
    model: str | None = None
    weight_version: int | None = None
    q: str | None = None


def _current(*conds: Any) -> Any:
    return exists().where(Rating.response_id == Response.id, Rating.is_current.is_(True), *conds)


def says_something() -> Any:
    """A rating that is not a withdrawal: the SQL form of loop.feedback.store.is_withdrawal."""
    return or_(Rating.thumb.is_not(None), Rating.score.is_not(None), func.coalesce(Rating.comment, "") != "",
               cast(Rating.tags, String) != "[]")


def mean_score_expr() -> Any:
    return (select(func.avg(Rating.score))
            .where(Rating.response_id == Response.id, Rating.is_current.is_(True), Rating.score.is_not(None))
            .correlate(Response).scalar_subquery())


def rated_or_compared_by(rater: str) -> Any:
    """Ids of the responses `rater` gave feedback on: rated (any rating, history included) or compared (either
    side of an A/B pick). One set from the rater indexes, so a rater with little feedback costs little."""
    return union(select(Rating.response_id).where(Rating.rater == rater),
                 select(Comparison.response_a_id).where(Comparison.rater == rater),
                 select(Comparison.response_b_id).where(Comparison.rater == rater))


def response_conditions(f: ResponseFilters) -> list[Any]:
    conds: list[Any] = []
    conds += in_time_range(Response.created_at, f.since, f.until)
    if f.model is not None:
        conds.append(Response.model == f.model)
    if f.weight_version is not None:
        conds.append(generated_with(Response, f.weight_version))
    if f.rating == "up":
        conds.append(_current(Rating.thumb == 1))
    elif f.rating == "down":
        conds.append(_current(Rating.thumb == -1))
    elif f.rating == "rated":
        conds.append(_current(says_something()))
    elif f.rating == "unrated":  # never rated, or every rater withdrew
        conds.append(~_current(says_something()))
    if f.min_score is not None:
        conds.append(mean_score_expr() >= f.min_score)
    if f.max_score is not None:
        conds.append(mean_score_expr() <= f.max_score)
    if f.tag is not None:
        conds.append(_current(tag_clause(Rating.tags, f.tag)))
    if f.rater is not None:
        conds.append(Response.id.in_(rated_or_compared_by(f.rater)))
    if f.q:
        pattern = f"%{like_escape(f.q)}%"
        conds.append(or_(Response.prompt_text.ilike(pattern, escape="\\"),
                         Response.completion.ilike(pattern, escape="\\"),
                         cast(Response.messages, String).ilike(pattern, escape="\\")))
    return conds


def _page(s: Session, stmt: Select[Any], order: list[Any], limit: int, offset: int) -> tuple[list[Any], int]:
    total = s.scalar(select(func.count()).select_from(stmt.order_by(None).subquery())) or 0
    rows = list(s.scalars(stmt.order_by(*order).limit(limit).offset(offset)))
    return rows, int(total)


def list_responses(s: Session, f: ResponseFilters, *, sort: ResponseSort = "-created_at", limit: int = 50,
                   offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    stmt = select(Response).where(and_(*response_conditions(f)))
    if sort in ("score", "-score"):
        score = mean_score_expr()
        order = [(score.asc() if sort == "score" else score.desc()).nulls_last(), Response.id]
    else:
        order = [Response.created_at.asc() if sort == "created_at" else Response.created_at.desc(),
                 Response.id.asc() if sort == "created_at" else Response.id.desc()]
    rows, total = _page(s, stmt, order, limit, offset)
    return summaries(s, rows), total


def prompt_preview(r: Response) -> str:
    if r.messages:
        users = [m for m in r.messages if isinstance(m, dict) and m.get("role") == "user"]
        content = (users or r.messages)[-1].get("content") if isinstance((users or r.messages)[-1], dict) else None
        text = content if isinstance(content, str) else json.dumps(content)
    else:
        text = r.prompt_text or ""
    return text[:PREVIEW_CHARS]


def summaries(s: Session, rows: list[Response]) -> list[dict[str, Any]]:
    """Summaries with rating aggregates of current ratings, fetched in one query for the whole page."""
    ids = [r.id for r in rows]
    agg: dict[str, dict[str, Any]] = {i: {"thumbs_up": 0, "thumbs_down": 0, "scores": [], "count": 0, "tags": []}
                                      for i in ids}
    if ids:
        for rid, thumb, score, tags, comment in s.execute(select(Rating.response_id, Rating.thumb, Rating.score,
                                                                 Rating.tags, Rating.comment)
                                                 .where(Rating.response_id.in_(ids), Rating.is_current.is_(True))
                                                 .order_by(Rating.id)):
            a = agg[rid]
            a["count"] += not is_withdrawal(thumb, score, comment, tags)
            a["thumbs_up"] += thumb == 1
            a["thumbs_down"] += thumb == -1
            if score is not None:
                a["scores"].append(score)
            for t in tags or []:
                if t not in a["tags"]:
                    a["tags"].append(t)
    out = []
    for r in rows:
        a = agg[r.id]
        mean = round(sum(a["scores"]) / len(a["scores"]), 3) if a["scores"] else None
        out.append({"id": r.id, "created_at": iso(r.created_at), "model": r.model, "weight_version": r.weight_version,
                    "weight_version_last": r.weight_version_last,
                    "endpoint": r.endpoint, "prompt_preview": prompt_preview(r), "completion": r.completion,
                    "finish_reason": r.finish_reason, "latency_ms": r.latency_ms,
                    "completion_tokens": r.completion_tokens, "truncated": bool(r.truncated),
                    "rating": {"thumbs_up": a["thumbs_up"], "thumbs_down": a["thumbs_down"], "mean_score": mean,
                               "count": a["count"]},
                    "tags": a["tags"]})
    return out


def response_detail(s: Session, response_id: str) -> dict[str, Any] | None:
    r = s.get(Response, response_id)
    if r is None:
        return None
    out = summaries(s, [r])[0]
    out.update({"group_id": r.group_id, "choice_index": r.choice_index, "prompt_hash": r.prompt_hash,
                "request": r.request, "messages": r.messages, "prompt_text": r.prompt_text,
                "prompt_token_ids": r.prompt_token_ids, "completion_token_ids": r.completion_token_ids,
                "completion_logprobs": r.completion_logprobs, "prompt_tokens": r.prompt_tokens,
                "ttft_ms": r.ttft_ms, "stream": bool(r.stream), "error": r.error})
    ratings = s.scalars(select(Rating).where(Rating.response_id == r.id)
                        .order_by(Rating.created_at.desc(), Rating.id.desc()))
    out["ratings"] = [rating_json(x) for x in ratings]
    comps = s.scalars(select(Comparison).where(or_(Comparison.response_a_id == r.id, Comparison.response_b_id == r.id))
                      .order_by(Comparison.created_at.desc(), Comparison.id.desc()))
    out["comparisons"] = [comparison_json(c) for c in comps]
    return out


@dataclass(frozen=True)
class FeedbackFilters:
    since: datetime | None = None
    until: datetime | None = None
    rater: str | None = None
    response_id: str | None = None
    current_only: bool = False
    tag: str | None = None  # ratings only
    winner: str | None = None  # comparisons only


def list_ratings(s: Session, f: FeedbackFilters, *, limit: int = 50, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    conds: list[Any] = []
    conds += in_time_range(Rating.created_at, f.since, f.until)
    if f.rater is not None:
        conds.append(Rating.rater == f.rater)
    if f.response_id is not None:
        conds.append(Rating.response_id == f.response_id)
    if f.current_only:
        conds.append(Rating.is_current.is_(True))
    if f.tag is not None:
        conds.append(tag_clause(Rating.tags, f.tag))
    rows, total = _page(s, select(Rating).where(and_(*conds)), [Rating.id.desc()], limit, offset)
    return [rating_json(r) for r in rows], total


def list_comparisons(s: Session, f: FeedbackFilters, *, limit: int = 50,
                     offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    conds: list[Any] = []
    conds += in_time_range(Comparison.created_at, f.since, f.until)
    if f.rater is not None:
        conds.append(Comparison.rater == f.rater)
    if f.response_id is not None:
        conds.append(or_(Comparison.response_a_id == f.response_id, Comparison.response_b_id == f.response_id))
    if f.current_only:
        conds.append(Comparison.is_current.is_(True))
    if f.winner is not None:
        conds.append(Comparison.winner == f.winner)
    rows, total = _page(s, select(Comparison).where(and_(*conds)), [Comparison.id.desc()], limit, offset)
    return [comparison_json(c) for c in rows], total
