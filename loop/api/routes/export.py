"""Export routes: feedback as JSONL in TRL's dataset formats, streamed row by row.

    GET /api/export/preference.jsonl   {"prompt": [...], "chosen": [...], "rejected": [...]}   (DPO)
    GET /api/export/unpaired.jsonl     {"prompt": [...], "completion": [...], "label": bool}   (KTO)

`?format=conversational` (default: message lists) or `standard` (plain strings). Rows come from `loop.pairs`,
the same code the trainer uses, so an export is exactly what training would see. The generator runs in
Starlette's thread pool with its own session, so a large history never sits in memory or blocks the loop.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import StreamingResponse

from loop.db.models import MAX_ID
from loop.pairs import (
    PairFilters,
    preference_pairs,
    trl_preference,
    trl_unpaired,
    unpaired_examples,
)
from loop.state import LoopState

router = APIRouter(prefix="/api/export", tags=["export"])

Format = Literal["conversational", "standard"]


def _filters(since: datetime | None, until: datetime | None, model: str | None, weight_version: int | None,
             rater: str | None, untrained_only: bool, include_held_out: bool) -> PairFilters:
    return PairFilters(since=since, until=until, model=model, weight_version=weight_version, rater=rater,
                       untrained_only=untrained_only, include_held_out=include_held_out)


def _stream(state: LoopState, kind: str, f: PairFilters, conversational: bool) -> Iterator[bytes]:
    with state.sessions() as s:
        if kind == "preference":
            for pair in preference_pairs(s, f):
                yield (json.dumps(trl_preference(pair, conversational=conversational), ensure_ascii=False)
                       + "\n").encode()
        else:
            for ex in unpaired_examples(s, f):
                yield (json.dumps(trl_unpaired(ex, conversational=conversational), ensure_ascii=False)
                       + "\n").encode()


def _response(state: LoopState, kind: str, f: PairFilters, fmt: Format) -> StreamingResponse:
    return StreamingResponse(_stream(state, kind, f, fmt == "conversational"), media_type="application/x-ndjson",
                             headers={"Content-Disposition": f'attachment; filename="{kind}.jsonl"'})


@router.get("/preference.jsonl", response_class=StreamingResponse)
def export_preference(request: Request, format: Format = "conversational", since: datetime | None = None,
                      until: datetime | None = None, model: str | None = None,
                      weight_version: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None, rater: str | None = None,
                      untrained_only: bool = False, include_held_out: bool = False) -> StreamingResponse:
    """Preference pairs (A/B picks and differently rated answers to one prompt) as TRL preference JSONL."""
    f = _filters(since, until, model, weight_version, rater, untrained_only, include_held_out)
    return _response(request.app.state.loop, "preference", f, format)


@router.get("/unpaired.jsonl", response_class=StreamingResponse)
def export_unpaired(request: Request, format: Format = "conversational", since: datetime | None = None,
                    until: datetime | None = None, model: str | None = None,
                    weight_version: Annotated[int | None, Query(ge=0, le=MAX_ID)] = None, rater: str | None = None,
                    untrained_only: bool = False, include_held_out: bool = False) -> StreamingResponse:
    """Single thumbs / scores as TRL unpaired preference JSONL (label true = desirable)."""
    f = _filters(since, until, model, weight_version, rater, untrained_only, include_held_out)
    return _response(request.app.state.loop, "unpaired", f, format)
