"""The one place that turns feedback into training data (export, stats and the scheduler all call this).

Preference pairs (DPO), from two sources:
1. A/B comparisons (current ones): winner "a" → a chosen, b rejected; "b" the reverse; "tie" and "both_bad"
   give no pair (nothing to prefer).
2. Responses to the same prompt (same `prompt_hash`) rated differently. Each response's verdict is built from
   its current ratings (all raters): the mean score when both responses have scores, otherwise the net thumbs
   (ups − downs) when both have thumbs; the higher one is chosen, equal verdicts give no pair. Every
   differently rated pair in a prompt group yields one pair.
Unpaired examples (KTO), one per current rating: thumb up → label True, down → False; without a thumb the score
decides: ≥ 7 → True, ≤ 4 → False, 5–6 is skipped (a middling score says too little to push the model either
way; the thresholds split 1–10 into clear thirds with a neutral band).

Each item carries the ids of the feedback it came from (`rating_ids`, `comparison_ids`), so a training run can
record them in `run_feedback`; `untrained_only=True` drops items any of whose feedback a run already consumed
(in SQL: only the untrained part of the history is read). Held-out feedback (reserved for the eval guard) is
left out unless asked for. Order is deterministic: comparison pairs by comparison id, then rating pairs by
(prompt_hash, chosen id, rejected id); examples by rating id.

`count_available` counts what `preference_pairs` / `unpaired_examples` would yield with aggregate SQL (the
figures `GET /api/stats` shows, without walking every pair in Python), and `inputs_key` is a cheap key that
changes whenever anything these functions read changes (loop/readcache.py caches on it). Tests:
`.venv/bin/python -m pytest -q tests/unit/test_pairs.py tests/unit/test_stats_counts.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased, load_only

from loop.db.models import Comparison, Rating, Response, RunFeedback
from loop.feedback.queries import in_time_range

POSITIVE_SCORE = 7  # score >= this (without a thumb) → a desirable example
NEGATIVE_SCORE = 4  # score <= this → undesirable
STREAM_ROWS = 500  # rows fetched at a time: an export of a long history never holds all of it in memory
# What a pair or an example needs of a response; token ids, log-probs and the raw request (most of a row's bytes)
# are never read here.
_RESPONSE_COLUMNS = ("id", "messages", "prompt_text", "prompt_hash", "completion", "finish_reason", "truncated")
_held_out_marks = 0  # bumped by note_held_out_marked(): part of inputs_key


@dataclass(frozen=True)
class Prompt:
    """What the model saw before answering: chat messages, or the raw text of a completion request."""

    messages: list[dict[str, Any]] | None
    text: str | None
    prompt_hash: str

    @classmethod
    def of(cls, r: Response) -> "Prompt":
        return cls(messages=r.messages, text=r.prompt_text, prompt_hash=r.prompt_hash)


@dataclass(frozen=True)
class Pair:
    prompt: Prompt
    chosen: str
    rejected: str
    chosen_response_id: str
    rejected_response_id: str
    source: str  # "comparison" | "ratings"
    rating_ids: tuple[int, ...] = ()
    comparison_ids: tuple[int, ...] = ()
    chosen_cut: bool = False  # the answer was cut off by max_tokens: it did not end there (no EOS to learn)
    rejected_cut: bool = False


@dataclass(frozen=True)
class Example:
    prompt: Prompt
    completion: str
    label: bool
    response_id: str
    rating_ids: tuple[int, ...] = field(default=())
    cut: bool = False  # cut off by max_tokens (see Pair.chosen_cut)


@dataclass(frozen=True)
class PairFilters:
    since: datetime | None = None  # on the feedback's created_at
    until: datetime | None = None
    model: str | None = None
    weight_version: int | None = None
    rater: str | None = None
    untrained_only: bool = False
    include_held_out: bool = False


def _consumed_ratings() -> Any:
    return select(RunFeedback.rating_id).where(RunFeedback.rating_id.is_not(None))


def _consumed_comparisons() -> Any:
    return select(RunFeedback.comparison_id).where(RunFeedback.comparison_id.is_not(None))


def _responses_with_consumed_ratings(f: PairFilters) -> Any:
    """Responses one of whose ratings (among those `f` selects) a run consumed: every rating pair they are in
    carries that rating, so none of their pairs is untrained."""
    r = aliased(Rating)
    return (select(r.response_id).join(RunFeedback, RunFeedback.rating_id == r.id)
            .where(*_feedback_conds(r, f)))


def _response_conds(resp: Any, f: PairFilters) -> list[Any]:
    conds = []
    if f.model is not None:
        conds.append(resp.model == f.model)
    if f.weight_version is not None:
        conds.append(resp.weight_version == f.weight_version)
    return conds


def _feedback_conds(table: Any, f: PairFilters) -> list[Any]:
    conds = [table.is_current.is_(True)]
    if not f.include_held_out:
        conds.append(table.held_out.is_(False))
    conds += in_time_range(table.created_at, f.since, f.until)
    if f.rater is not None:
        conds.append(table.rater == f.rater)
    return conds


def _current_ratings(s: Session, f: PairFilters, *extra: Any) -> Iterator[tuple[Any, Response]]:
    """(rating, its response) for the current ratings `f` selects; a rating here is a row with the `id`, `thumb`
    and `score` columns (no ORM object: an untrained backlog can be tens of thousands of ratings)."""
    stmt = (select(Rating.id, Rating.thumb, Rating.score, Response).join(Response, Response.id == Rating.response_id)
            .where(and_(*_feedback_conds(Rating, f), *_response_conds(Response, f), *extra))
            .options(load_only(*(getattr(Response, c) for c in _RESPONSE_COLUMNS)))
            .order_by(Rating.id).execution_options(yield_per=STREAM_ROWS))
    for row in s.execute(stmt):
        yield row, row.Response


def preference_pairs(s: Session, f: PairFilters = PairFilters()) -> Iterator[Pair]:
    a, b = aliased(Response), aliased(Response)
    untrained_c = [Comparison.id.not_in(_consumed_comparisons())] if f.untrained_only else []
    stmt = (select(Comparison, a, b).join(a, a.id == Comparison.response_a_id).join(b, b.id == Comparison.response_b_id)
            .where(and_(*_feedback_conds(Comparison, f), Comparison.winner.in_(("a", "b")), *_response_conds(a, f),
                        *untrained_c))
            .options(load_only(*(getattr(a, c) for c in _RESPONSE_COLUMNS)),
                     load_only(*(getattr(b, c) for c in _RESPONSE_COLUMNS)))
            .order_by(Comparison.id).execution_options(yield_per=STREAM_ROWS))
    for comp, ra, rb in s.execute(stmt):
        chosen, rejected = (ra, rb) if comp.winner == "a" else (rb, ra)
        yield Pair(Prompt.of(chosen), chosen.completion, rejected.completion, chosen.id, rejected.id,
                   "comparison", comparison_ids=(comp.id,), chosen_cut=was_cut(chosen), rejected_cut=was_cut(rejected))

    # Verdict per response from its current ratings; then all strictly ordered pairs within a prompt.
    untrained_r = [Rating.response_id.not_in(_responses_with_consumed_ratings(f))] if f.untrained_only else []
    by_prompt: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    for rating, response in _current_ratings(s, f, *untrained_r):
        v = by_prompt[response.prompt_hash].setdefault(
            response.id, {"response": response, "scores": [], "net": 0, "thumbs": 0, "rating_ids": []})
        v["rating_ids"].append(rating.id)
        if rating.score is not None:
            v["scores"].append(rating.score)
        if rating.thumb is not None:
            v["net"] += rating.thumb
            v["thumbs"] += 1
    for prompt_hash in sorted(by_prompt):
        group = by_prompt[prompt_hash]
        ids = sorted(group)
        found: list[Pair] = []
        for i, x_id in enumerate(ids):
            for y_id in ids[i + 1:]:
                x, y = group[x_id], group[y_id]
                order = _prefer(x, y)
                if order == 0:
                    continue
                win, lose = (x, y) if order > 0 else (y, x)
                rating_ids = tuple(sorted(win["rating_ids"] + lose["rating_ids"]))
                found.append(Pair(Prompt.of(win["response"]), win["response"].completion,
                                  lose["response"].completion, win["response"].id, lose["response"].id,
                                  "ratings", rating_ids=rating_ids, chosen_cut=was_cut(win["response"]),
                                  rejected_cut=was_cut(lose["response"])))
        yield from sorted(found, key=lambda p: (p.chosen_response_id, p.rejected_response_id))


def count_available(s: Session) -> dict[str, int]:
    """How many pairs and examples `preference_pairs` / `unpaired_examples` yield without filters, all and
    untrained only, counted by aggregate SQL: per response, its current ratings' score sum and count, net thumbs
    and whether a run consumed any of them; then the differently rated response pairs within a prompt (means
    compared as cross products, so integer maths decides equality exactly as the division in `_prefer` does)."""
    f = PairFilters()
    consumed_r, consumed_c = _consumed_ratings(), _consumed_comparisons()

    def untrained(cond: Any) -> Any:
        return func.coalesce(func.sum(case((cond, 1), else_=0)), 0)

    comp = s.execute(select(func.count(), untrained(Comparison.id.not_in(consumed_c)))
                     .where(*_feedback_conds(Comparison, f), Comparison.winner.in_(("a", "b")))).one()
    labelled = (Rating.thumb.is_not(None)) | (Rating.score >= POSITIVE_SCORE) | (Rating.score <= NEGATIVE_SCORE)
    examples = s.execute(select(func.count(), untrained(Rating.id.not_in(consumed_r)))
                         .where(*_feedback_conds(Rating, f), labelled)).one()
    per_response = (select(Rating.response_id.label("rid"), func.count(Rating.score).label("ns"),
                           func.coalesce(func.sum(Rating.score), 0).label("ss"),
                           func.count(Rating.thumb).label("nt"), func.coalesce(func.sum(Rating.thumb), 0).label("net"),
                           func.max(case((Rating.id.in_(consumed_r), 1), else_=0)).label("used"))
                    .where(*_feedback_conds(Rating, f)).group_by(Rating.response_id))
    verdicts = per_response.cte("verdicts")
    x, y = verdicts.alias("x"), verdicts.alias("y")
    rx, ry = aliased(Response), aliased(Response)
    both_scored = and_(x.c.ns > 0, y.c.ns > 0)
    differ = ((both_scored & (x.c.ss * y.c.ns != y.c.ss * x.c.ns))
              | (~both_scored & (x.c.nt > 0) & (y.c.nt > 0) & (x.c.net != y.c.net)))
    # x's response, the other answers to its prompt (the prompt_hash index), then their verdicts (by id)
    rated = s.execute(select(func.count(), untrained((x.c.used == 0) & (y.c.used == 0)))
                      .select_from(x.join(rx, rx.id == x.c.rid)
                                   .join(ry, (ry.prompt_hash == rx.prompt_hash) & (ry.id > rx.id))
                                   .join(y, y.c.rid == ry.id))
                      .where(differ)).one()
    return {"pairs_available": int(comp[0]) + int(rated[0]), "untrained_pairs": int(comp[1]) + int(rated[1]),
            "unpaired_available": int(examples[0]), "untrained_unpaired": int(examples[1])}


def inputs_key(s: Session) -> tuple[Any, ...]:
    """Changes whenever a row this module reads changes: a new rating or comparison (a changed mind is a new row
    too), feedback consumed or released by a run, feedback marked held out (`note_held_out_marked`). A few
    indexed reads, so a cache can ask it on every request."""
    row = s.execute(select(select(func.max(Rating.id)).scalar_subquery(),
                           select(func.max(Comparison.id)).scalar_subquery(),
                           select(func.count()).select_from(RunFeedback).scalar_subquery(),
                           select(func.max(RunFeedback.id)).scalar_subquery())).one()
    return (*row, _held_out_marks)


def note_held_out_marked() -> None:
    """Called by whoever marks feedback held out (an update no new row reveals), so `inputs_key` moves."""
    global _held_out_marks
    _held_out_marks += 1


def was_cut(response: Any) -> bool:
    """The answer stopped at max_tokens (or a client disconnect), not by itself: trained without an end token,
    so a preference for it never teaches the model to end answers there."""
    return getattr(response, "finish_reason", None) == "length" or bool(getattr(response, "truncated", False))


def _prefer(x: dict[str, Any], y: dict[str, Any]) -> int:
    """>0: x preferred, <0: y preferred, 0: no preference (equal, or nothing comparable)."""
    if x["scores"] and y["scores"]:
        diff = sum(x["scores"]) / len(x["scores"]) - sum(y["scores"]) / len(y["scores"])
    elif x["thumbs"] and y["thumbs"]:
        diff = x["net"] - y["net"]
    else:
        return 0
    return (diff > 0) - (diff < 0)


def unpaired_examples(s: Session, f: PairFilters = PairFilters()) -> Iterator[Example]:
    untrained = [Rating.id.not_in(_consumed_ratings())] if f.untrained_only else []
    for rating, response in _current_ratings(s, f, *untrained):
        label = example_label(rating.thumb, rating.score)
        if label is None:
            continue
        yield Example(Prompt.of(response), response.completion, label, response.id, rating_ids=(rating.id,),
                      cut=was_cut(response))


def example_label(thumb: int | None, score: int | None) -> bool | None:
    if thumb is not None:
        return thumb > 0
    if score is not None:
        if score >= POSITIVE_SCORE:
            return True
        if score <= NEGATIVE_SCORE:
            return False
    return None


# --- TRL dataset records (https://huggingface.co/docs/trl/dataset_formats) ---
# preference: {"prompt", "chosen", "rejected"}; unpaired preference: {"prompt", "completion", "label"}.
# Conversational: prompt is a list of messages, chosen/rejected/completion a one-message assistant list.
# Standard: plain strings. A completion-endpoint prompt becomes one user message in conversational form.

def prompt_messages(p: Prompt) -> list[dict[str, Any]]:
    if p.messages:
        return [{"role": m.get("role"), "content": m.get("content")} for m in p.messages if isinstance(m, dict)]
    return [{"role": "user", "content": p.text or ""}]


def prompt_string(p: Prompt) -> str:
    if p.text is not None:
        return p.text
    return "\n".join(str(m.get("content") or "") for m in p.messages or [] if isinstance(m, dict))


def _answer(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def trl_preference(pair: Pair, *, conversational: bool = True) -> dict[str, Any]:
    prompt = prompt_messages(pair.prompt) if conversational else prompt_string(pair.prompt)
    return {"prompt": prompt, "chosen": _answer(pair.chosen, conversational),
            "rejected": _answer(pair.rejected, conversational)}


def trl_unpaired(ex: Example, *, conversational: bool = True) -> dict[str, Any]:
    prompt = prompt_messages(ex.prompt) if conversational else prompt_string(ex.prompt)
    return {"prompt": prompt, "completion": _answer(ex.completion, conversational), "label": ex.label}
