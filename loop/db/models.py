"""The database schema: what loop remembers.

One row per generated choice (`Response`); feedback as `Rating` (thumbs / score / comment / tags on one
response) and `Comparison` (an A/B pick between two responses to the same prompt); `TrainingRun` and
`RunFeedback` (which feedback a run consumed: unique per feedback item, so nothing is trained on twice);
`WeightVersion` (every state of the live weights, with its checkpoint and eval figures); `SchedulerState`.

Ratings and comparisons are append-only: a rater who changes their mind adds a new row and the older one is
marked `is_current = False`, so the latest counts and the history is kept.
Schema changes go through Alembic (migrations/); never edit a migration that has shipped.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


class Response(Base):
    """One generated choice, as vLLM produced it and as loop served it."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "resp-<32 hex>", returned to clients
    group_id: Mapped[str] = mapped_column(String(40), index=True)  # one id per upstream request (n>1 shares it)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    endpoint: Mapped[str] = mapped_column(String(16))  # "chat" | "completion"
    model: Mapped[str] = mapped_column(String(200), index=True)
    weight_version: Mapped[int] = mapped_column(Integer, index=True)
    # The request as the client sent it (messages or prompt + sampling parameters).
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Chat: the messages that formed the prompt; completion: [{"role": "user", "content": prompt}]-free raw prompt.
    messages: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    prompt_text: Mapped[str | None] = mapped_column(Text, nullable=True)
    # Canonical identity of the conversation before this answer (sha256 hex): pairs are built within one hash.
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    completion: Mapped[str] = mapped_column(Text, default="")
    prompt_token_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    completion_token_ids: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    completion_logprobs: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    finish_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    latency_ms: Mapped[float] = mapped_column(Float, default=0.0)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    truncated: Mapped[bool] = mapped_column(Boolean, default=False)  # client left mid-stream
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (Index("ix_ratings_response_rater", "response_id", "rater"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    rater: Mapped[str] = mapped_column(String(200), default="anonymous", index=True)
    thumb: Mapped[int | None] = mapped_column(Integer, nullable=True)  # +1 up, -1 down
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..10
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)  # reserved for the eval guard
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Comparison(Base):
    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    response_a_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    response_b_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    winner: Mapped[str] = mapped_column(String(16))  # "a" | "b" | "tie" | "both_bad"
    rater: Mapped[str] = mapped_column(String(200), default="anonymous", index=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WeightVersion(Base):
    """A state of the live weights. Version 0 is what vLLM loaded."""

    __tablename__ = "weight_versions"

    version: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # "initial" | "train" | "restore" | "rollback"
    parent_version: Mapped[int | None] = mapped_column(Integer, nullable=True)
    run_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="live")  # "live" | "superseded" | "rolled_back"
    eval: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    note: Mapped[str | None] = mapped_column(Text, nullable=True)
    load_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the vLLM load these weights live in


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # queued | running | succeeded | failed | refused | rejected | rolled_back
    # (refused: the update was not finite or over the cap — feedback released; rejected: the worker's direction check
    # (loop/worker/agreement.py) judged, before the write, that it would undo what the kept runs taught — feedback
    # stays consumed, never retried)
    trigger: Mapped[str] = mapped_column(String(16), default="manual")  # manual | scheduler
    objective: Mapped[str] = mapped_column(String(16), default="dpo")  # dpo | kto | mixed
    batch: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # final figures
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)  # per-step figures
    version_before: Mapped[int | None] = mapped_column(Integer, nullable=True)
    version_after: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RunFeedback(Base):
    """Feedback consumed by a run. The unique constraints make 'never train twice' a database fact."""

    __tablename__ = "run_feedback"
    __table_args__ = (
        UniqueConstraint("rating_id", name="uq_run_feedback_rating"),
        UniqueConstraint("comparison_id", name="uq_run_feedback_comparison"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    rating_id: Mapped[int | None] = mapped_column(ForeignKey("ratings.id", ondelete="CASCADE"), nullable=True)
    comparison_id: Mapped[int | None] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), nullable=True)


class SchedulerState(Base):
    """Key/value state the scheduler keeps across restarts (paused, last run, ...)."""

    __tablename__ = "scheduler_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
