"""Batch building, the one place a batch is made: the scheduler's (`collect` → `build_batch`), a manual run's
(`resolve`: inline pairs/examples plus feedback ids, as POST /api/train sends them), and the eval set.

Built on `loop/pairs.py` (the one place that turns feedback into pairs and examples); this module adds what a
training run needs on top (each rule is stated again by a test in tests/unit/scheduler/test_batches.py):
- A/B winner a/b → DPO pair; responses to the same prompt (same `prompt_hash`) rated differently → DPO pair;
  single thumbs / clear scores → KTO examples (all from pairs.py).
- tie → nothing: the rater saw no difference, so there is no direction to train in.
- both_bad → each of the two answers becomes a KTO negative (label False): the rater judged each answer on its
  own as unacceptable — exactly KTO's unpaired "undesirable" signal — while a DPO pair would need a winner.
- One objective per run: DPO pairs when any wait (the stronger, relative signal), else KTO examples. A rating
  behind both a pair and an example is consumed by the pair's run, so its example is never trained afterwards:
  each feedback row trains once (`run_feedback` makes that a database fact).
- Duplicates (same prompt_hash and the same chosen/rejected texts, or the same completion and label) merge into
  the first; the merged item carries every feedback id, so the duplicates are consumed with it.
- Rater weighting: the worker's `Train` message has no per-item weights, so raters are balanced by selection: a
  capped batch is filled round-robin over raters (oldest item first within each), so one prolific rater (or a
  script) cannot fill a batch alone. Each item's nominal weight, 1 / (items of its rater in the batch)
  normalised to mean 1, is recorded in the batch summary.
- Held-out slice: feedback whose `sha256("<kind>:<id>")` falls below `holdout_fraction` is marked
  `held_out=True` on its row before a batch is built (rows already consumed are never marked). Held-out
  feedback is never trained on (pairs.py skips it) and its pairs are the eval guard's set. Deterministic: a
  restart or a rebuild gives the same split. The eval set of a run holds only held-out pairs whose feedback
  is older than anything in the run's batch (`held_out_pairs(created_before=...)`, see loop/scheduler/guard.py).
- Token ids: the items carry the ids vLLM produced for their stored responses (`pairs.load_prompts`), which
  the worker trains as they are (loop/worker/tokens.py); inline pairs and rows without ids carry text only.
- Long conversations: with a tokenizer, the oldest turns are dropped until the templated prompt fits
  `max_prompt_tokens` (loop/worker/tokens.py's rule; the worker applies it again to the whole row); stored
  prompt ids that fit keep the prompt whole, and are left off a prompt that lost turns.
- Cheap to poll: the pool (`collect`, on every scheduler tick) reads ids, verdicts, answer texts and times only;
  prompts are read for the items a batch takes.
Tests: `.venv/bin/python -m pytest -q tests/unit/scheduler/test_batches.py`.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import msgspec
from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from loop import pairs
from loop.db.models import Comparison, Rating, Response, RunFeedback
from loop.errors import Conflict, Invalid, NotFound
from loop.pairs import Item
from loop.worker import tokens
from loop.worker.protocol import Example, Pair, Prompt


@dataclass
class Batch:
    """What one run trains on: DPO pairs or KTO examples, and the feedback ids the run consumes."""

    objective: str  # "dpo" | "kto"
    items: list[Item]
    rating_ids: list[int] = field(default_factory=list)
    comparison_ids: list[int] = field(default_factory=list)

    @property
    def pairs(self) -> list[Pair]:
        return [i.pair for i in self.items if i.kind == "pair"]

    @property
    def examples(self) -> list[Example]:
        return [i.example for i in self.items if i.kind == "example"]

    def oldest(self) -> datetime | None:
        """When the oldest feedback in the batch was given."""
        return _oldest(*(i.created_at for i in self.items))

    def summary(self) -> dict[str, Any]:
        by_source: dict[str, int] = defaultdict(int)
        by_rater: dict[str, int] = defaultdict(int)
        for i in self.items:
            by_source[i.source] += 1
            for r in set(i.raters):
                by_rater[r] += 1
        return {"objective": self.objective, "size": len(self.items), "by_source": dict(by_source),
                "by_rater": dict(by_rater), "weights": [round(i.weight, 4) for i in self.items],
                "rating_ids": self.rating_ids, "comparison_ids": self.comparison_ids}


# ---------------------------------------------------------------------------------------------- held-out split


def is_held_out(kind: str, feedback_id: int, fraction: float) -> bool:
    """Deterministic: the same feedback is always on the same side of the split."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(f"{kind}:{feedback_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------- pure rules


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def _oldest(*times: datetime | None) -> datetime | None:
    known = [_aware(t) for t in times if t is not None]
    return min(known) if known else None


def dedupe(items: Iterable[Item]) -> list[Item]:
    """Merge items with the same key into the first one seen (its feedback ids grow)."""
    seen: dict[tuple[Any, ...], Item] = {}
    for item in items:
        first = seen.get(item.key())
        if first is None:
            seen[item.key()] = item
            continue
        first.rating_ids = tuple(sorted(set(first.rating_ids) | set(item.rating_ids)))
        first.comparison_ids = tuple(sorted(set(first.comparison_ids) | set(item.comparison_ids)))
        first.raters = first.raters + item.raters
        first.created_at = _oldest(first.created_at, item.created_at)
        first.held_out = first.held_out or item.held_out
    return list(seen.values())


def select_balanced(items: Sequence[Item], limit: int) -> list[Item]:
    """Up to `limit` items, round-robin over raters (oldest first within each), then set nominal weights."""
    queues: dict[str, list[Item]] = defaultdict(list)
    far_future = datetime.max.replace(tzinfo=timezone.utc)
    for item in sorted(items, key=lambda i: (i.created_at or far_future, i.rating_ids, i.comparison_ids)):
        queues[item.raters[0] if item.raters else "anonymous"].append(item)
    chosen: list[Item] = []
    for round_ in itertools.zip_longest(*(queues[r] for r in sorted(queues))):
        for item in round_:
            if item is not None and len(chosen) < limit:
                chosen.append(item)
    counts: dict[str, int] = defaultdict(int)
    for item in chosen:
        counts[item.raters[0] if item.raters else "anonymous"] += 1
    raw = [1.0 / counts[i.raters[0] if i.raters else "anonymous"] for i in chosen]
    mean = sum(raw) / len(raw) if raw else 1.0
    for item, w in zip(chosen, raw):
        item.weight = w / mean
    return chosen


def truncate_prompt(prompt: Prompt, tokenizer: Any, max_tokens: int) -> Prompt:
    """Drop the oldest turns until the prompt fits (loop/worker/tokens.py's rule, which the worker applies again
    to the whole row); a plain-text prompt is left to the worker's token cut."""
    if tokenizer is None or isinstance(prompt, str) or len(prompt) <= 1:
        return prompt
    return tokens.drop_turns(tokenizer, prompt, max_tokens)


# ---------------------------------------------------------------------------------------------- database


@dataclass
class Pool:
    """Everything usable right now: trainable items (not held out, not consumed)."""

    train: list[Item]

    def counts(self) -> dict[str, int]:
        return {"pairs": sum(i.kind == "pair" for i in self.train),
                "examples": sum(i.kind == "example" for i in self.train)}

    def oldest(self) -> datetime | None:
        return _oldest(*(i.created_at for i in self.train))


def mark_held_out(session: Session, fraction: float) -> int:
    """Persist the deterministic split on the feedback rows not yet consumed; returns how many were marked.

    Consumed rows are left alone (they were trained on: calling them held out would make the eval lie), and a
    row once marked stays marked, so lowering the fraction later never moves eval feedback into training."""
    if fraction <= 0:
        return 0
    marked = 0
    for model, kind, col in ((Rating, "rating", RunFeedback.rating_id),
                             (Comparison, "comparison", RunFeedback.comparison_id)):
        used = select(col).where(col.is_not(None))
        ids = session.scalars(select(model.id).where(model.held_out.is_(False)).where(model.id.not_in(used))).all()
        held = [i for i in ids if is_held_out(kind, i, fraction)]
        if held:
            session.execute(update(model).where(model.id.in_(held)).values(held_out=True))
            marked += len(held)
    if marked:
        session.commit()
        pairs.note_held_out_marked()
    return marked


def _feedback_meta(session: Session, rating_ids: set[int], comparison_ids: set[int]
                   ) -> dict[tuple[str, int], tuple[str, datetime]]:
    """(kind, id) → (rater, created_at) for the given feedback rows."""
    meta: dict[tuple[str, int], tuple[str, datetime]] = {}
    for model, kind, ids in ((Rating, "rating", rating_ids), (Comparison, "comparison", comparison_ids)):
        id_list = sorted(ids)
        for chunk in range(0, len(id_list), 500):
            for fid, rater, created in session.execute(
                    select(model.id, model.rater, model.created_at).where(model.id.in_(id_list[chunk:chunk + 500]))):
                meta[(kind, fid)] = (rater, _aware(created))
    return meta


def _both_bad(session: Session, *, untrained_only: bool, exclude_raters: tuple[str, ...] = ()) -> list[Item]:
    """Each answer of a current, not held-out "both bad" pick as a KTO negative (prompts not loaded)."""
    a, b = aliased(Response), aliased(Response)
    stmt = (select(Comparison.id, Comparison.rater, Comparison.created_at, *pairs._answer_cols(a),
                   *pairs._answer_cols(b))
            .join(a, a.id == Comparison.response_a_id).join(b, b.id == Comparison.response_b_id)
            .where(Comparison.is_current.is_(True), Comparison.winner == "both_bad",
                   Comparison.held_out.is_(False)).order_by(Comparison.id))
    if untrained_only:
        stmt = stmt.where(Comparison.id.not_in(
            select(RunFeedback.comparison_id).where(RunFeedback.comparison_id.is_not(None))))
    if exclude_raters:
        stmt = stmt.where(Comparison.rater.not_in(exclude_raters))
    return [pairs.example_item("both_bad", answer, False, comparison_ids=(row[0],), raters=(row[1],),
                               created_at=_aware(row[2]) if row[2] is not None else None)
            for row in session.execute(stmt) for answer in (tuple(row[3:8]), tuple(row[8:13]))]


def _items(session: Session, *, untrained_only: bool, exclude_raters: tuple[str, ...] = ()) -> list[Item]:
    """Trainable items (not held out) from ids, verdicts and times only: prompts are loaded for a chosen batch."""
    f = pairs.PairFilters(untrained_only=untrained_only, exclude_raters=exclude_raters)
    items = list(pairs.preference_pairs(session, f, prompts=False))
    items += pairs.unpaired_examples(session, f, prompts=False)
    items += _both_bad(session, untrained_only=untrained_only, exclude_raters=exclude_raters)
    return dedupe(items)


def collect(session: Session, *, holdout_fraction: float, exclude_raters: Iterable[str] = ()) -> Pool:
    """Current feedback not yet consumed by any run and not held out, as training items (split persisted first);
    `exclude_raters`' feedback counts for nothing (stays untrained, and pairs are formed without it)."""
    mark_held_out(session, holdout_fraction)
    return Pool(train=_items(session, untrained_only=True, exclude_raters=tuple(sorted(exclude_raters))))


def held_out_pairs(session: Session, *, holdout_fraction: float, limit: int,
                   created_before: datetime | None = None) -> list[Item]:
    """The eval set: pairs with held-out feedback behind them (held-out feedback is never consumed), oldest
    first so the set is stable from one run to the next as it grows.

    `created_before` freezes the set in time: a pair counts only when ALL its feedback is older than that instant
    (the scheduler passes the oldest feedback of the batch it is about to train on). Feedback collected together
    with a batch — the same session, the same rater, perhaps the same mistake — then never judges that batch: a
    poisoned round's own held-out pairs carry its flipped labels and would vote for the poison."""
    mark_held_out(session, holdout_fraction)
    held_r = set(session.scalars(select(Rating.id).where(Rating.held_out.is_(True))))
    held_c = set(session.scalars(select(Comparison.id).where(Comparison.held_out.is_(True))))
    found = [p for p in pairs.preference_pairs(session, pairs.PairFilters(include_held_out=True), prompts=False)
             if held_r.intersection(p.rating_ids) or held_c.intersection(p.comparison_ids)]
    found = _older_than(session, found, created_before)[:limit]
    for item in found:
        item.held_out = True
    return pairs.load_prompts(session, found)


def _kept_pairs(session: Session) -> list[Item]:
    """Pairs whose feedback was all learned from by runs that were kept (succeeded; a rolled-back run's feedback
    is poison until shown otherwise), oldest first, prompts not loaded."""
    from loop.db.models import TrainingRun

    kept = (select(RunFeedback).join(TrainingRun, TrainingRun.id == RunFeedback.run_id)
            .where(TrainingRun.status == "succeeded"))
    runs_r = {f.rating_id for f in session.scalars(kept) if f.rating_id is not None}
    runs_c = {f.comparison_id for f in session.scalars(kept) if f.comparison_id is not None}
    return [p for p in pairs.preference_pairs(session, pairs.PairFilters(include_held_out=True), prompts=False)
            if (p.rating_ids or p.comparison_ids) and set(p.rating_ids) <= runs_r and set(p.comparison_ids) <= runs_c]


def trained_pairs(session: Session, *, limit: int, created_before: datetime | None = None) -> list[Item]:
    """The replay half of the eval set: pairs already learned from by kept runs (`_kept_pairs`), newest first,
    frozen like `held_out_pairs`.

    Why: a flipped-label batch contradicts exactly what earlier batches taught, so it pulls the margins of the
    pairs the model has fitted down hard, while a good batch from the same rater leaves them be or raises them.
    Unseen held-out pairs alone move little either way in one small update (the measurements document has the
    figures)."""
    found = _older_than(session, _kept_pairs(session), created_before)
    return pairs.load_prompts(session, list(reversed(found[-limit:]))) if limit > 0 else []


def replay_pairs(session: Session, batch: Batch, *, limit: int, seed: int, exclude: Iterable[Item] = (),
                 tokenizer: Any = None, max_prompt_tokens: int = 768) -> list[Item]:
    """Pairs kept runs already learned from, trained again beside a DPO batch: at most `limit`, drawn uniformly
    (seeded) from the whole kept history, none sharing feedback with the batch or with `exclude` (the eval set).
    None for a KTO batch or limit 0.

    Why: a rater gives a round ~10 pairs; one pass over them moves a slow trait less than it moves general
    likelihood, and the next round's pairs are new. Practising the kept pairs again lets the trait accumulate
    over rounds instead of being learned from each round's few pairs alone. Only kept runs' pairs are replayed:
    a rolled-back or quarantined batch is never trained twice. The batch's own feedback stays the run's: the
    replayed rows were consumed by their own runs and are not consumed again."""
    if batch.objective != "dpo" or limit <= 0:
        return []
    exclude = list(exclude)
    used_r = set(batch.rating_ids) | {r for i in exclude for r in i.rating_ids}
    used_c = set(batch.comparison_ids) | {c for i in exclude for c in i.comparison_ids}
    found = [p for p in _kept_pairs(session)
             if not used_r.intersection(p.rating_ids) and not used_c.intersection(p.comparison_ids)]
    if len(found) > limit:
        found = random.Random(seed).sample(found, limit)
    chosen = pairs.load_prompts(session, found)
    for item in chosen:
        item.data = _cut_prompt(item.data, tokenizer, max_prompt_tokens)
    return chosen


def eval_pairs(session: Session, settings: Any, *, created_before: datetime | None = None) -> list[Item]:
    """The guard's eval set: held-out pairs (never trained on) plus replayed ones (learned from by kept runs),
    both frozen at `created_before`; sizes from settings (`eval_max_pairs`, `eval_replay_pairs`)."""
    held = held_out_pairs(session, holdout_fraction=settings.holdout_fraction, limit=settings.eval_max_pairs,
                          created_before=created_before)
    return held + trained_pairs(session, limit=settings.eval_replay_pairs, created_before=created_before)


def _older_than(session: Session, found: list[Item], created_before: datetime | None) -> list[Item]:
    """The pairs whose feedback is all older than `created_before` (all of them when it is None)."""
    if created_before is None:
        return found
    cutoff = _aware(created_before)
    meta = _feedback_meta(session, {r for p in found for r in p.rating_ids}, {c for p in found for c in p.comparison_ids})

    def newest(p: Item) -> datetime | None:
        keys = [("rating", r) for r in p.rating_ids] + [("comparison", c) for c in p.comparison_ids]
        times = [meta[k][1] for k in keys if k in meta]
        return max(times) if times else None

    return [p for p in found if (t := newest(p)) is not None and t < cutoff]


def disagreeing_raters(session: Session, min_rate: float, min_pairs: int) -> dict[str, dict[str, Any]]:
    """Raters whose thumbs agree with the other raters' (current ratings, shared answers) less often than
    `min_rate`, judged once they have `min_pairs` shared judgments: rater -> their agreement figures."""
    from loop.feedback.agreement import per_rater_agreement, rating_values

    thumbs, _ = rating_values(session)
    return {name: a.to_json() for name, a in sorted(per_rater_agreement(thumbs).items())
            if a.pairs >= min_pairs and a.rate is not None and a.rate < min_rate}


def build_batch(session: Session, pool: Pool, *, limit: int, tokenizer: Any = None,
                max_prompt_tokens: int = 768) -> Batch | None:
    """The next batch: DPO pairs when any wait (the stronger signal), else KTO examples; None when empty. Only
    the chosen items' prompts are read."""
    pair_items = [i for i in pool.train if i.kind == "pair"]
    examples = [i for i in pool.train if i.kind == "example"]
    objective, candidates = ("dpo", pair_items) if pair_items else ("kto", examples)
    if not candidates:
        return None
    chosen = pairs.load_prompts(session, select_balanced(candidates, limit))
    for item in chosen:
        item.data = _cut_prompt(item.data, tokenizer, max_prompt_tokens)
    return _batch(objective, chosen)


def companions(session: Session, pool: Pool, batch: Batch, *, limit: int, tokenizer: Any = None,
               max_prompt_tokens: int = 768) -> list[Item]:
    """The waiting thumbs of a pair batch's raters that the batch does not use, at most `limit`: the screen measures
    them beside the batch (loop/scheduler/screening.py says why). None for a KTO batch (its examples are the thumbs
    themselves) or `limit` 0.

    Ups and downs in turn, newest first within each, until `limit` or both run out: the screen's test of thumbs
    exchanges the given thumbs over their answers, so thumbs of one kind carry nothing for it (a rater who says
    "down" to every answer is told apart from one who says it to what was learned only by where the ups fall).
    Newest first alone once sent 32 downs beside a batch whose flipped rater had given ups too, and the test could
    not see them. The choice looks at the labels and their age, never at what the screen will measure, so the
    test stays exact."""
    if batch.objective != "dpo" or limit <= 0:
        return []
    raters = {r for i in batch.items for r in i.raters}
    used = set(batch.rating_ids)
    oldest = datetime.min.replace(tzinfo=timezone.utc)
    found = [i for i in pool.train if i.kind == "example" and set(i.raters) & raters
             and not used.intersection(i.rating_ids)]
    found.sort(key=lambda i: (_aware(i.created_at) if i.created_at else oldest, i.rating_ids), reverse=True)
    ups, downs = [i for i in found if i.example.label], [i for i in found if not i.example.label]
    picked: list[Item] = []
    while len(picked) < limit and (ups or downs):
        for kind in (ups, downs):
            if kind and len(picked) < limit:
                picked.append(kind.pop(0))
    picked.sort(key=lambda i: (_aware(i.created_at) if i.created_at else oldest, i.rating_ids), reverse=True)
    chosen = pairs.load_prompts(session, picked)
    for item in chosen:
        item.data = _cut_prompt(item.data, tokenizer, max_prompt_tokens)
    return chosen


def _cut_prompt(data: Pair | Example, tokenizer: Any, max_tokens: int) -> Pair | Example:
    """`truncate_prompt` for a batch item: stored prompt ids within `max_tokens` keep the prompt whole; when old
    turns are dropped the stored ids (of the whole conversation) go too, and the kept text is tokenised."""
    if data.prompt_ids is not None and len(data.prompt_ids) <= max_tokens:
        return data
    prompt = truncate_prompt(data.prompt, tokenizer, max_tokens)
    if prompt == data.prompt:
        return data
    return msgspec.structs.replace(data, prompt=prompt, prompt_ids=None)


def _batch(objective: str, items: list[Item]) -> Batch:
    return Batch(objective=objective, items=items, rating_ids=sorted({r for i in items for r in i.rating_ids}),
                 comparison_ids=sorted({c for i in items for c in i.comparison_ids}))


# ---------------------------------------------------------------------------------------------- manual runs


def check_feedback(session: Session, rating_ids: Iterable[int], comparison_ids: Iterable[int]) -> None:
    """Raise unless every id names current feedback no run consumed: NotFound `feedback_not_found`, Conflict
    `feedback_consumed` or `feedback_superseded`."""
    want_r, want_c = set(rating_ids), set(comparison_ids)
    if not (want_r or want_c):
        return
    have_r = set(session.scalars(select(Rating.id).where(Rating.id.in_(want_r))))
    have_c = set(session.scalars(select(Comparison.id).where(Comparison.id.in_(want_c))))
    if want_r - have_r or want_c - have_c:
        raise NotFound(f"unknown feedback: ratings {sorted(want_r - have_r)}, comparisons "
                       f"{sorted(want_c - have_c)}", code="feedback_not_found")
    taken_r = set(session.scalars(select(RunFeedback.rating_id).where(RunFeedback.rating_id.in_(want_r))))
    taken_c = set(session.scalars(select(RunFeedback.comparison_id).where(RunFeedback.comparison_id.in_(want_c))))
    if taken_r or taken_c:
        raise Conflict(f"already trained on: ratings {sorted(taken_r)}, comparisons {sorted(taken_c)}; "
                       "feedback is never trained on twice", code="feedback_consumed")
    stale_r = set(session.scalars(select(Rating.id).where(Rating.id.in_(want_r), Rating.is_current.is_(False))))
    stale_c = set(session.scalars(select(Comparison.id).where(Comparison.id.in_(want_c),
                                                              Comparison.is_current.is_(False))))
    if stale_r or stale_c:
        raise Conflict(f"superseded feedback: ratings {sorted(stale_r)}, comparisons {sorted(stale_c)} were "
                       "replaced by a newer verdict of the same rater; send the current ids "
                       "(GET /api/responses/{id} lists each item's feedback with is_current)",
                       code="feedback_superseded")


def resolve(session: Session, *, objective: str | None = None, pairs_in: Sequence[Pair] = (),
            examples_in: Sequence[Example] = (), rating_ids: Iterable[int] = (),
            comparison_ids: Iterable[int] = ()) -> Batch:
    """A manual run's batch (`POST /api/train`): the inline pairs/examples plus what the named feedback yields.

    Feedback ids give every pair whose feedback is all among them (unless `objective` is "kto"), and examples
    when `objective` is "kto", or None and no pair was found; held-out feedback may be named. The batch consumes
    the ids of the items it took (a named rating that yields nothing is not consumed). Objective None: "dpo" when
    there are pairs, else "kto". Raises `check_feedback`'s errors, and Invalid `empty_batch` when the objective
    has nothing to train on."""
    want_r, want_c = set(rating_ids), set(comparison_ids)
    items = [Item(x, source="inline") for x in pairs_in] + [Item(x, source="inline") for x in examples_in]
    if want_r or want_c:
        check_feedback(session, want_r, want_c)
        f = pairs.PairFilters(untrained_only=True, include_held_out=True)
        if objective != "kto":
            items += [i for i in pairs.preference_pairs(session, f, prompts=False)
                      if (i.rating_ids or i.comparison_ids) and set(i.rating_ids) <= want_r
                      and set(i.comparison_ids) <= want_c]
        if objective == "kto" or (objective is None and not any(i.kind == "pair" for i in items)):
            items += [i for i in pairs.unpaired_examples(session, f, prompts=False)
                      if i.rating_ids and set(i.rating_ids) <= want_r]
        pairs.load_prompts(session, items)
    has_pairs = any(i.kind == "pair" for i in items)
    objective = objective or ("dpo" if has_pairs else "kto")
    if objective == "dpo" and not has_pairs:
        raise Invalid("no preference pairs in this batch: DPO needs pairs (inline, A/B comparisons with a "
                      "winner, or two responses to one prompt rated differently)", code="empty_batch")
    kind = "pair" if objective == "dpo" else "example"
    chosen = [i for i in items if i.kind == kind]
    if not chosen:
        raise Invalid("no examples in this batch: KTO needs examples (inline, or thumbs/scores on responses)",
                      code="empty_batch")
    return _batch(objective, chosen)
