"""The database schema: what loop remembers.

One row per generated choice (`Response`); feedback as `Rating` (thumbs / score / comment / tags on one
response) and `Comparison` (an A/B pick between two responses to the same prompt); `TrainingRun` and
`RunFeedback` (which feedback a run consumed: unique per feedback item, so nothing is trained on twice);
`WeightVersion` (every state of the live weights, with its checkpoint and eval figures); `Quarantine` (feedback a
scheduled run's screen held back as contrary to what was learned, until an operator re-queues or drops it);
`SchedulerState`; `RaterAccount` (who may rate, and with which token, when accounts are on); `Conversation` (a
rater's chat as the UI shows it: turns referring to logged responses).

Ratings and comparisons are append-only: a rater who changes their mind adds a new row and the older one is
marked `is_current = False`, so the latest counts and the history is kept.
Schema changes go through Alembic (migrations/); never edit a migration that has shipped.

Counters that grow with use (ids, weight versions) are 64-bit (`Id`: BIGINT, plain INTEGER on SQLite, which is
64-bit there and must stay INTEGER to be the rowid); the API refuses values outside that range (`MAX_ID`).
Free text that vLLM or a client produces is `NulSafeText`: PostgreSQL's text cannot hold U+0000, which a model can
generate, and SQLite's LIKE stops at one, so it is stored escaped and read back exactly (JSON columns need nothing:
the serializer writes NUL as the escape `\\u0000`, which PostgreSQL's `json` type keeps).
"""

from __future__ import annotations

import re
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
    TypeDecorator,
    UniqueConstraint,
    and_,
    or_,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

Id = BigInteger().with_variant(Integer, "sqlite")
MAX_ID = 2**63 - 1  # the largest value an `Id` column (BIGINT, SQLite INTEGER) holds


# NUL escaping: ESC is U+FFFF, a Unicode noncharacter (never assigned, so text is all but certain
# not to contain it). ESC becomes ESC "e" and NUL becomes ESC "0"; text with neither is stored unchanged, so
# searches (LIKE) and rows written before this existed read as they always did.
_ESC = "\uffff"
_NUL_ESCAPED = re.compile(_ESC + "([0e])")
_UNESCAPE = {"0": "\x00", "e": _ESC}


def escape_nul(text: str) -> str:
    if _ESC in text:
        text = text.replace(_ESC, _ESC + "e")
    return text.replace("\x00", _ESC + "0") if "\x00" in text else text


def unescape_nul(text: str) -> str:
    if _ESC not in text:
        return text
    return _NUL_ESCAPED.sub(lambda m: _UNESCAPE.get(m.group(1), m.group(0)), text)


class NulSafeText(TypeDecorator[str]):
    """TEXT that holds any Python str, NUL included, on every backend (stored escaped: see escape_nul; one
    representation everywhere, so a database moved between backends reads the same). Comparisons and LIKE
    patterns against the column are escaped the same way, so they still match."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return escape_nul(value) if value is not None else value

    def process_result_value(self, value: str | None, dialect: Dialect) -> str | None:
        return unescape_nul(value) if value is not None else value


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON, datetime: DateTime(timezone=True)}


def _same_as_first_version(context: Any) -> Any:
    return context.get_current_parameters()["weight_version"]


class Response(Base):
    """One generated choice, as vLLM produced it and as loop served it."""

    __tablename__ = "responses"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "resp-<32 hex>", returned to clients
    group_id: Mapped[str] = mapped_column(String(40), index=True)  # one id per upstream request (n>1 shares it)
    choice_index: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    endpoint: Mapped[str] = mapped_column(String(16))  # "chat" | "completion"
    model: Mapped[str] = mapped_column(String(200), index=True)
    # The versions that generated it: the first, and the last when an update landed while it was generated (the
    # pause keeps in-flight answers and continues them on the new weights); equal for most responses.
    weight_version: Mapped[int] = mapped_column(Id, index=True)
    weight_version_last: Mapped[int] = mapped_column(Id, index=True, default=_same_as_first_version)
    # The request as the client sent it (messages or prompt + sampling parameters).
    request: Mapped[dict[str, Any]] = mapped_column(JSON)
    # Chat: the messages that formed the prompt; completion: [{"role": "user", "content": prompt}]-free raw prompt.
    messages: Mapped[list[Any] | None] = mapped_column(JSON, nullable=True)
    prompt_text: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)
    # Canonical identity of the conversation before this answer (sha256 hex): pairs are built within one hash.
    prompt_hash: Mapped[str] = mapped_column(String(64), index=True)
    completion: Mapped[str] = mapped_column(NulSafeText, default="")
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
    error: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)


def generated_with(resp: Any, version: int) -> Any:
    """`resp` (the Response entity or an alias of it) was generated, at least in part, with `version`: its first
    version, or a later one up to its last when an update landed while it was generated. The first branch is the
    common case and an index lookup; the second only reads rows that started before `version`."""
    return or_(resp.weight_version == version,
               and_(resp.weight_version < version, resp.weight_version_last >= version))


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = (Index("ix_ratings_response_rater", "response_id", "rater"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    response_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    rater: Mapped[str] = mapped_column(String(200), default="anonymous", index=True)
    thumb: Mapped[int | None] = mapped_column(Integer, nullable=True)  # +1 up, -1 down
    score: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 1..10
    comment: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)
    tags: Mapped[list[Any]] = mapped_column(JSON, default=list)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)  # reserved for the eval guard
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class Comparison(Base):
    __tablename__ = "comparisons"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    response_a_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    response_b_id: Mapped[str] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    winner: Mapped[str] = mapped_column(String(16))  # "a" | "b" | "tie" | "both_bad"
    rater: Mapped[str] = mapped_column(String(200), default="anonymous", index=True)
    comment: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(String(200), nullable=True, unique=True)
    is_current: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    held_out: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class WeightVersion(Base):
    """A state of the live weights. Version 0 is what vLLM loaded."""

    __tablename__ = "weight_versions"

    version: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # "initial" | "train" | "restore" | "rollback"
    parent_version: Mapped[int | None] = mapped_column(Id, nullable=True)
    run_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    checkpoint_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    # "live" | "superseded" | "rolled_back" | "lost" (not durable when vLLM reloaded from disk: loop/durability.py)
    status: Mapped[str] = mapped_column(String(16), default="live")
    eval: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    note: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)
    load_id: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the vLLM load these weights live in


class TrainingRun(Base):
    __tablename__ = "training_runs"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    # queued | running | succeeded | failed | refused | rejected | rolled_back | lost
    # (lost: its version was not durable when vLLM reloaded from disk, or vLLM died before serving it — feedback
    # released, see loop/durability.py)
    # (refused: the update was not finite or over the cap — feedback released; rejected: the screen before training
    # (loop/scheduler/screening.py) held the whole batch back as contrary to what the kept runs taught — its
    # feedback stays consumed while quarantined, see Quarantine)
    trigger: Mapped[str] = mapped_column(String(16), default="manual")  # manual | scheduler
    objective: Mapped[str] = mapped_column(String(16), default="dpo")  # dpo | kto | mixed
    batch: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # final figures
    history: Mapped[list[Any]] = mapped_column(JSON, default=list)  # per-step figures
    version_before: Mapped[int | None] = mapped_column(Id, nullable=True)
    version_after: Mapped[int | None] = mapped_column(Id, nullable=True)
    error: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)


class RunFeedback(Base):
    """Feedback consumed by a run. The unique constraints make 'never train twice' a database fact."""

    __tablename__ = "run_feedback"
    __table_args__ = (
        UniqueConstraint("rating_id", name="uq_run_feedback_rating"),
        UniqueConstraint("comparison_id", name="uq_run_feedback_comparison"),
    )

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    rating_id: Mapped[int | None] = mapped_column(ForeignKey("ratings.id", ondelete="CASCADE"), nullable=True)
    comparison_id: Mapped[int | None] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"), nullable=True)


class Quarantine(Base):
    """Feedback a scheduled run's screen held back: its items pulled against what the kept runs taught at the
    screen's significance level (loop/scheduler/screening.py). While `held` the feedback stays consumed by the run
    (RunFeedback), so no batch picks it up; `requeued` releases it to the queue (screened again with the next
    batch); `dropped` keeps it out for good. `evidence` holds the figures the decision was made on."""

    __tablename__ = "quarantine"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("training_runs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    scope: Mapped[str] = mapped_column(NulSafeText)  # "batch" | "rater:<name>"
    reason: Mapped[str] = mapped_column(NulSafeText)
    evidence: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    rating_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    comparison_ids: Mapped[list[int]] = mapped_column(JSON, default=list)
    state: Mapped[str] = mapped_column(String(16), default="held", index=True)  # held | requeued | dropped
    decided_at: Mapped[datetime | None] = mapped_column(nullable=True)
    decided_by: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)
    note: Mapped[str | None] = mapped_column(NulSafeText, nullable=True)


class RaterAccount(Base):
    """A person who rates (role `rater`) or runs loop (role `admin`). Only a hash of the token is kept (a token is
    random, 256 bits: a plain SHA-256 is as strong as a slow hash here and costs a lookup nothing); a revoked
    account keeps its row, so the ratings it gave stay attributed to a known name that no one can take over."""

    __tablename__ = "raters"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="rater")  # rater | admin
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Conversation(Base):
    """A rater's chat, kept so it can be listed, reopened and continued. `turns` is the screen's own record: user
    messages, and per assistant turn the sibling answers (regenerations, each a logged response id with its text and
    weight version) and which one is shown. `revision` counts saves: a save from a stale screen (another tab saved
    since) is refused rather than overwriting."""

    __tablename__ = "conversations"
    __table_args__ = (Index("ix_conversations_rater_updated", "rater", "updated_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)  # "conv-<32 hex>"
    rater: Mapped[str] = mapped_column(String(200))
    title: Mapped[str] = mapped_column(NulSafeText)
    turns: Mapped[list[Any]] = mapped_column(JSON, default=list)
    revision: Mapped[int] = mapped_column(Id, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class SchedulerState(Base):
    """Key/value state the scheduler keeps across restarts (paused, last run, ...)."""

    __tablename__ = "scheduler_state"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
