"""Pydantic models for the feedback API's request bodies and replies (the shapes in the OpenAPI schema).

Bodies forbid unknown fields, so a typo (`scroe`) is a 422 that names the field instead of a silently ignored
value. In replies, times are ISO-8601 UTC strings. Ids and names (response ids, rater,
tags, idempotency keys) refuse NUL (U+0000) with a 422: PostgreSQL cannot store or compare one; free text
(comments) may hold it (loop.db.models.NulSafeText). Integers a client sends are bounded by their column
(`MAX_ID`, 64-bit).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loop.db.models import MAX_ID
from loop.feedback.store import RATING_FIELDS

__all__ = ["MAX_ID"]  # re-exported for routes that bound query integers

Thumb = Literal["up", "down"]
Winner = Literal["a", "b", "tie", "both_bad"]

MAX_TAGS = 32
MAX_TAG_LEN = 64


def no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain a NUL character (U+0000)")
    return value


class RatingIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(min_length=1, max_length=40, description="The loop response id (`resp-…`).")
    thumb: Thumb | None = None
    score: int | None = Field(None, ge=1, le=10, description="1 (worst) .. 10 (best).")
    comment: str | None = Field(None, max_length=10_000)
    tags: list[str] = Field(default_factory=list, max_length=MAX_TAGS)
    rater: str | None = Field(None, min_length=1, max_length=200, description=(
        "Who gives it. With a rater's token leave it out (the token says who; another name is refused). Without one, "
        "where the loop does not require tokens: a free-text name, default `anonymous` (an account's name is refused)."))
    idempotency_key: str | None = Field(None, min_length=1, max_length=200,
                                        description="Retries with the same key return the stored rating.")
    expected_current_id: int | None = Field(None, ge=1, le=MAX_ID, description=(
        "The id of the rater's current rating of this response as the screen showed it (null: none). When sent, a "
        "write made on a stale view is refused with 409 `stale_rating` instead of replacing a rating the rater "
        "never saw."))

    @field_validator("tags")
    @classmethod
    def _clean_tags(cls, tags: list[str]) -> list[str]:
        out: list[str] = []
        for tag in tags:
            tag = tag.strip()
            if not tag or len(tag) > MAX_TAG_LEN:
                raise ValueError(f"each tag must be 1..{MAX_TAG_LEN} characters after trimming, got {tag!r}")
            no_nul(tag)
            if tag not in out:
                out.append(tag)
        return out

    @field_validator("response_id", "rater", "idempotency_key")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return no_nul(value)

    @model_validator(mode="after")
    def _something_to_say(self) -> "RatingIn":
        if not self.model_fields_set & set(RATING_FIELDS):
            raise ValueError("a rating needs at least one of thumb ('up'/'down'), score (1..10), comment or tags "
                             "(a field left out keeps its current value; null clears it; all cleared withdraws)")
        return self


class RatingOut(BaseModel):
    id: int
    response_id: str
    rater: str
    thumb: Thumb | None
    score: int | None
    comment: str | None
    tags: list[str]
    is_current: bool
    withdrawn: bool = Field(False, description="Nothing left set: the rater withdrew their rating (kept in the "
                                               "history, never trained on).")
    created_at: str


class ComparisonIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_a_id: str = Field(min_length=1, max_length=40)
    response_b_id: str = Field(min_length=1, max_length=40)
    winner: Winner
    rater: str | None = Field(None, min_length=1, max_length=200, description=(
        "Who gives it. With a rater's token leave it out (the token says who; another name is refused). Without one, "
        "where the loop does not require tokens: a free-text name, default `anonymous` (an account's name is refused)."))
    comment: str | None = Field(None, max_length=10_000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("response_a_id", "response_b_id", "rater", "idempotency_key")
    @classmethod
    def _names(cls, value: str | None) -> str | None:
        return no_nul(value)

    @model_validator(mode="after")
    def _two_different(self) -> "ComparisonIn":
        if self.response_a_id == self.response_b_id:
            raise ValueError(f"response_a_id and response_b_id are both {self.response_a_id!r}; "
                             "a comparison needs two different responses to the same prompt")
        return self


class ComparisonOut(BaseModel):
    id: int
    response_a_id: str
    response_b_id: str
    winner: Winner
    rater: str
    comment: str | None
    is_current: bool
    created_at: str


class RatingSummary(BaseModel):
    thumbs_up: int
    thumbs_down: int
    mean_score: float | None
    count: int


class ResponseSummary(BaseModel):
    id: str
    created_at: str
    model: str
    weight_version: int = Field(description="The first weight version that generated it.")
    weight_version_last: int = Field(description="The last: higher than the first when an update landed while it "
                                     "was generated (it continued on the new weights).")
    endpoint: str
    prompt_preview: str
    completion: str
    finish_reason: str | None
    latency_ms: float
    completion_tokens: int
    truncated: bool
    rating: RatingSummary
    tags: list[str]


class ResponseDetail(ResponseSummary):
    group_id: str
    choice_index: int
    prompt_hash: str
    request: dict[str, Any]
    messages: list[Any] | None
    prompt_text: str | None
    prompt_token_ids: list[Any] | None
    completion_token_ids: list[Any] | None
    completion_logprobs: list[Any] | None
    prompt_tokens: int
    ttft_ms: float | None
    stream: bool
    error: str | None
    ratings: list[RatingOut]
    comparisons: list[ComparisonOut]


class ResponsePage(BaseModel):
    items: list[ResponseSummary]
    total: int
    limit: int
    offset: int


class RatingPage(BaseModel):
    items: list[RatingOut]
    total: int
    limit: int
    offset: int


class ComparisonPage(BaseModel):
    items: list[ComparisonOut]
    total: int
    limit: int
    offset: int


class DayCount(BaseModel):
    day: str
    responses: int
    ratings: int
    comparisons: int


class Alpha(BaseModel):
    alpha: float | None = Field(description="Krippendorff's alpha; null when undefined (nothing pairable, or "
                                "every value the same)")
    items: int = Field(description="answers with values from two or more raters")
    values: int = Field(description="pairable values (n)")


class Agreement(BaseModel):
    thumbs: Alpha = Field(description="nominal alpha over thumbs")
    scores: Alpha = Field(description="interval alpha over 1-10 scores")


class Stats(BaseModel):
    responses_total: int
    ratings_total: int
    comparisons_total: int
    by_day: list[DayCount]
    thumbs: dict[str, int]
    scores: dict[str, int]
    pairs_available: int
    unpaired_available: int
    untrained_pairs: int
    untrained_unpaired: int
    agreement: Agreement = Field(description="between raters, over answers two or more rated (current ratings)")
    as_of: datetime = Field(description="when these figures were computed")
    fresh: bool = Field(description="false only with stale_ok=true while newer feedback is being counted")


class WeightVersionOut(BaseModel):
    version: int
    created_at: str | None
    kind: str = Field(description="initial | train | restore | rollback")
    parent_version: int | None
    run_id: int | None = Field(description="The training run that made it (kind train), else null.")
    checkpoint_path: str | None
    status: str = Field(description="live | superseded | rolled_back | lost")
    durable: bool = Field(description="Its weights are on disk (a complete checkpoint, or version 0's model folder).")
    eval: dict[str, Any] | None = Field(description="The eval guard's figures for these weights (accuracy, "
                                        "canary_perplexity, drift, health, …); null when not evaluated.")
    note: str | None
    run_loss: float | None = Field(description="The training loss of the run that made this version (its last "
                                   "step's); null for versions no run made, or when the run recorded no finite loss.")


class VersionList(BaseModel):
    items: list[WeightVersionOut] = Field(description="Newest first.")
    live: int = Field(description="The version the live weights are in now.")
