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

Each is an `Item`: the wire's `Pair` or `Example` (loop/worker/protocol.py: the one shape from here to the GPU,
prompts normalised by `prompt_of`) with the ids of the feedback it came from (`rating_ids`, `comparison_ids`, so a
training run can record them in `run_feedback`), its raters and the time of its oldest feedback. With
`prompts=False` only ids, verdicts, answer texts and times are read (the scheduler's pool) and `load_prompts`
fills in the prompts of the items a batch takes, with the token ids vLLM produced for them (trained as they
are). `untrained_only=True` drops items any of whose feedback a run already consumed (in SQL: only the
untrained part of the history is read). Held-out feedback (reserved for the eval guard) is
left out unless asked for. Order is deterministic: comparison pairs by comparison id, then rating pairs by
(prompt_hash, chosen id, rejected id); examples by rating id.

`count_available` counts what `preference_pairs` / `unpaired_examples` would yield with aggregate SQL (the
figures `GET /api/stats` shows, without walking every pair in Python), and `inputs_key` is a cheap key that
changes whenever anything these functions read changes (loop/readcache.py caches on it). Tests:
`.venv/bin/python -m pytest -q tests/unit/feedback/test_pairs.py tests/unit/feedback/test_stats_counts.py`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import msgspec
from sqlalchemy import and_, case, func, select
from sqlalchemy.orm import Session, aliased

from loop.db.models import Comparison, Rating, Response, RunFeedback, generated_with
from loop.feedback.queries import in_time_range
from loop.vllm.capture import normalise_messages
from loop.worker.protocol import Example, Pair, Prompt

POSITIVE_SCORE = 7  # score >= this (without a thumb) → a desirable example
NEGATIVE_SCORE = 4  # score <= this → undesirable
STREAM_ROWS = 500  # rows fetched at a time: an export of a long history never holds all of it in memory
_held_out_marks = 0  # bumped by note_held_out_marked(): part of inputs_key


def prompt_of(messages: list[Any] | None, text: str | None) -> Prompt:
    """The conversation before an answer as the worker and the guard read it: chat messages as {role, content}
    text (`loop.vllm.capture.normalise_messages`, the rule `prompt_hash` is computed with), else the raw
    completion prompt."""
    if messages:
        return normalise_messages([m for m in messages if isinstance(m, dict)])
    return text or ""


@dataclass
class Item:
    """One pair (DPO) or example (KTO) with the feedback it came from. `data` is the wire type the worker trains
    on (loop/worker/protocol.py); everything else is what a run records and the scheduler weighs it by."""

    data: Pair | Example
    prompt_hash: str = ""
    source: str = ""  # "comparison" | "ratings" | "rating" | "both_bad" | "inline"
    response_ids: tuple[str, ...] = ()  # (chosen, rejected) of a pair, (response,) of an example
    rating_ids: tuple[int, ...] = ()
    comparison_ids: tuple[int, ...] = ()
    raters: tuple[str, ...] = ()  # the rater of each feedback row behind it
    created_at: datetime | None = None  # the oldest feedback behind it
    held_out: bool = False
    weight: float = 1.0
    prompt_loaded: bool = True  # False: `data.prompt` is a placeholder until `load_prompts`

    @property
    def kind(self) -> str:
        return "pair" if isinstance(self.data, Pair) else "example"

    @property
    def pair(self) -> Pair:
        assert isinstance(self.data, Pair), "not a pair"
        return self.data

    @property
    def example(self) -> Example:
        assert isinstance(self.data, Example), "not an example"
        return self.data

    def key(self) -> tuple[Any, ...]:
        """Same prompt and the same answer texts (and label): a duplicate, merged by `batches.dedupe`."""
        d = self.data
        if isinstance(d, Pair):
            return ("pair", self.prompt_hash, d.chosen, d.rejected)
        return ("example", self.prompt_hash, d.completion, d.label)


@dataclass(frozen=True)
class PairFilters:
    since: datetime | None = None  # on the feedback's created_at
    until: datetime | None = None
    model: str | None = None
    weight_version: int | None = None
    rater: str | None = None
    exclude_raters: tuple[str, ...] = ()  # their feedback counts for nothing (pairs are formed without it)
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
        conds.append(generated_with(resp, f.weight_version))
    return conds


def _feedback_conds(table: Any, f: PairFilters) -> list[Any]:
    conds = [table.is_current.is_(True)]
    if not f.include_held_out:
        conds.append(table.held_out.is_(False))
    conds += in_time_range(table.created_at, f.since, f.until)
    if f.rater is not None:
        conds.append(table.rater == f.rater)
    if f.exclude_raters:
        conds.append(table.rater.not_in(f.exclude_raters))
    return conds


# What a pair or an example needs of a response, before its prompt is loaded: plain columns, no ORM object (a
# backlog is tens of thousands of rows), no JSON (messages, token ids and the raw request are most of a row's bytes).
def _answer_cols(resp: Any) -> tuple[Any, ...]:
    return resp.id, resp.prompt_hash, resp.completion, resp.finish_reason, resp.truncated


def _current_ratings(s: Session, f: PairFilters, *extra: Any) -> Iterator[Any]:
    """The current ratings `f` selects as rows of (id, thumb, score, rater, created_at, then the answer columns
    of its response)."""
    stmt = (select(Rating.id, Rating.thumb, Rating.score, Rating.rater, Rating.created_at, *_answer_cols(Response))
            .join(Response, Response.id == Rating.response_id)
            .where(and_(*_feedback_conds(Rating, f), *_response_conds(Response, f), *extra))
            .order_by(Rating.id).execution_options(yield_per=STREAM_ROWS))
    yield from s.execute(stmt)


def _aware(t: datetime | None) -> datetime | None:
    return t if t is None or t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _cut(finish_reason: str | None, truncated: bool | None) -> bool:
    return finish_reason == "length" or bool(truncated)


def _pair_item(source: str, chosen: Any, rejected: Any, **meta: Any) -> Item:
    """`chosen`/`rejected`: (id, prompt_hash, completion, finish_reason, truncated); the prompt is the chosen
    answer's (both answer one prompt) and is loaded later (`load_prompts`)."""
    return Item(Pair(prompt="", chosen=chosen[2], rejected=rejected[2], chosen_cut=_cut(chosen[3], chosen[4]),
                     rejected_cut=_cut(rejected[3], rejected[4])),
                prompt_hash=chosen[1], source=source, response_ids=(chosen[0], rejected[0]), prompt_loaded=False,
                **meta)


def example_item(source: str, answer: Any, label: bool, **meta: Any) -> Item:
    """An example of one answer (id, prompt_hash, completion, finish_reason, truncated); prompt loaded later."""
    return Item(Example(prompt="", completion=answer[2], label=label, cut=_cut(answer[3], answer[4])),
                prompt_hash=answer[1], source=source, response_ids=(answer[0],), prompt_loaded=False, **meta)


def _stored(ids: list[Any] | None) -> list[int] | None:
    """Stored token ids, or None where a row has none (older rows, an attached vLLM that returned none)."""
    return [int(t) for t in ids] if ids else None


def _with_prompt(data: Pair | Example, prompt: Prompt, rows: list[tuple[list[int] | None, list[int] | None]]
                 ) -> Pair | Example:
    """`data` with its prompt and the ids of its rows ((prompt ids, completion ids) per answer, in order): each
    answer's own completion ids; the prompt ids only when every answer was given exactly the same ones."""
    first = rows[0][0]
    shared = first if all(p == first for p, _ in rows) else None
    if isinstance(data, Pair):
        return msgspec.structs.replace(data, prompt=prompt, prompt_ids=shared, chosen_ids=rows[0][1],
                                       rejected_ids=rows[1][1])
    return msgspec.structs.replace(data, prompt=prompt, prompt_ids=shared, completion_ids=rows[0][1])


def load_prompts(s: Session, items: list[Item]) -> list[Item]:
    """Fill in the prompt of every item whose prompt is not loaded yet, and the token ids vLLM produced for it
    (read in chunks); returns `items`.

    The prompt text is the first answer's. Ids (loop/worker/tokens.py trains and scores them as they are): each
    answer's completion ids from its own row; the prompt ids only when both answers of a pair were given identical
    stored prompt ids — two requests with one `prompt_hash` can still differ in tokens (tools or chat-template
    options are not hashed) — else None, so the text is tokenised. Rows stored without ids leave None."""
    todo = [i for i in items if not i.prompt_loaded]
    for start in range(0, len(todo), STREAM_ROWS):
        chunk = todo[start:start + STREAM_ROWS]
        rows = s.execute(select(Response.id, Response.messages, Response.prompt_text)
                         .where(Response.id.in_({i.response_ids[0] for i in chunk})))
        prompts = {rid: prompt_of(messages, text) for rid, messages, text in rows}
        rows = s.execute(select(Response.id, Response.prompt_token_ids, Response.completion_token_ids)
                         .where(Response.id.in_({r for i in chunk for r in i.response_ids})))
        ids = {rid: (_stored(p), _stored(c)) for rid, p, c in rows}
        for item in chunk:
            item.data = _with_prompt(item.data, prompts[item.response_ids[0]],
                                     [ids[r] for r in item.response_ids])
            item.prompt_loaded = True
    return items


def preference_pairs(s: Session, f: PairFilters = PairFilters(), *, prompts: bool = True) -> Iterator[Item]:
    """The pairs `f` selects, in the module's order; `prompts=False` leaves the prompts to `load_prompts` (the
    scheduler's pool only needs ids, verdicts and times)."""
    items = _preference_items(s, f)
    if not prompts:
        yield from items
        return
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == STREAM_ROWS:
            yield from load_prompts(s, chunk)
            chunk = []
    yield from load_prompts(s, chunk)


def _preference_items(s: Session, f: PairFilters) -> Iterator[Item]:
    a, b = aliased(Response), aliased(Response)
    untrained_c = [Comparison.id.not_in(_consumed_comparisons())] if f.untrained_only else []
    stmt = (select(Comparison.id, Comparison.winner, Comparison.rater, Comparison.created_at, *_answer_cols(a),
                   *_answer_cols(b))
            .join(a, a.id == Comparison.response_a_id).join(b, b.id == Comparison.response_b_id)
            .where(and_(*_feedback_conds(Comparison, f), Comparison.winner.in_(("a", "b")), *_response_conds(a, f),
                        *untrained_c))
            .order_by(Comparison.id).execution_options(yield_per=STREAM_ROWS))
    for row in s.execute(stmt):
        ra, rb = tuple(row[4:9]), tuple(row[9:14])
        chosen, rejected = (ra, rb) if row[1] == "a" else (rb, ra)
        yield _pair_item("comparison", chosen, rejected, comparison_ids=(row[0],), raters=(row[2],),
                         created_at=_aware(row[3]))

    # Verdict per response from its current ratings; then all strictly ordered pairs within a prompt.
    untrained_r = [Rating.response_id.not_in(_responses_with_consumed_ratings(f))] if f.untrained_only else []
    by_prompt: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    who: dict[int, tuple[str, datetime | None]] = {}  # rating id -> (rater, created_at)
    for row in _current_ratings(s, f, *untrained_r):
        answer = tuple(row[5:10])
        v = by_prompt[answer[1]].setdefault(answer[0], {"answer": answer, "scores": [], "net": 0, "thumbs": 0,
                                                        "rating_ids": []})
        v["rating_ids"].append(row.id)
        who[row.id] = (row.rater, _aware(row.created_at))
        if row.score is not None:
            v["scores"].append(row.score)
        if row.thumb is not None:
            v["net"] += row.thumb
            v["thumbs"] += 1
    for prompt_hash in sorted(by_prompt):
        group = by_prompt[prompt_hash]
        ids = sorted(group)
        found: list[Item] = []
        for i, x_id in enumerate(ids):
            for y_id in ids[i + 1:]:
                x, y = group[x_id], group[y_id]
                order = _prefer(x, y)
                if order == 0:
                    continue
                win, lose = (x, y) if order > 0 else (y, x)
                rating_ids = tuple(sorted(win["rating_ids"] + lose["rating_ids"]))
                times = [t for r in rating_ids if (t := who[r][1]) is not None]
                found.append(_pair_item("ratings", win["answer"], lose["answer"], rating_ids=rating_ids,
                                        raters=tuple(who[r][0] for r in rating_ids),
                                        created_at=min(times) if times else None))
        yield from sorted(found, key=lambda p: p.response_ids)


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
    return _cut(getattr(response, "finish_reason", None), getattr(response, "truncated", False))


def _prefer(x: dict[str, Any], y: dict[str, Any]) -> int:
    """>0: x preferred, <0: y preferred, 0: no preference (equal, or nothing comparable)."""
    if x["scores"] and y["scores"]:
        diff = sum(x["scores"]) / len(x["scores"]) - sum(y["scores"]) / len(y["scores"])
    elif x["thumbs"] and y["thumbs"]:
        diff = x["net"] - y["net"]
    else:
        return 0
    return (diff > 0) - (diff < 0)


def unpaired_examples(s: Session, f: PairFilters = PairFilters(), *, prompts: bool = True) -> Iterator[Item]:
    """One example per current rating with a clear label (see the module docstring), by rating id."""
    untrained = [Rating.id.not_in(_consumed_ratings())] if f.untrained_only else []
    chunk: list[Item] = []
    for row in _current_ratings(s, f, *untrained):
        label = example_label(row.thumb, row.score)
        if label is None:
            continue
        chunk.append(example_item("rating", tuple(row[5:10]), label, rating_ids=(row.id,), raters=(row.rater,),
                                  created_at=_aware(row.created_at)))
        if len(chunk) == STREAM_ROWS:
            yield from load_prompts(s, chunk) if prompts else chunk
            chunk = []
    yield from load_prompts(s, chunk) if prompts else chunk


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

def prompt_messages(p: Prompt) -> list[dict[str, str]]:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


def prompt_string(p: Prompt) -> str:
    return p if isinstance(p, str) else "\n".join(m["content"] for m in p)


def _answer(text: str, conversational: bool) -> Any:
    return [{"role": "assistant", "content": text}] if conversational else text


def trl_preference(item: Item, *, conversational: bool = True) -> dict[str, Any]:
    pair = item.pair
    prompt = prompt_messages(pair.prompt) if conversational else prompt_string(pair.prompt)
    return {"prompt": prompt, "chosen": _answer(pair.chosen, conversational),
            "rejected": _answer(pair.rejected, conversational)}


def trl_unpaired(item: Item, *, conversational: bool = True) -> dict[str, Any]:
    ex = item.example
    prompt = prompt_messages(ex.prompt) if conversational else prompt_string(ex.prompt)
    return {"prompt": prompt, "completion": _answer(ex.completion, conversational), "label": ex.label}
