"""Batch building: which feedback the scheduler trains on next, and which is kept back for eval.

Built on `loop/pairs.py` (the one place that turns feedback into pairs and examples); this module adds what a
training run needs on top (each rule is stated again by a test in tests/unit/test_batches.py):
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
- Long conversations: with a tokenizer, the oldest turns (after a leading system message) are dropped until the
  templated prompt fits `max_prompt_tokens`; the last turn and the rated answer are always kept. The worker
  truncates by tokens again (`encode_pairs`' max_len) as a last resort.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, aliased

from loop import pairs
from loop.db.models import Comparison, Rating, Response, RunFeedback

Prompt = str | list[dict[str, str]]


@dataclass
class Item:
    """One training (or eval) item with the feedback it came from."""

    kind: str  # "pair" | "example"
    prompt: Prompt
    prompt_hash: str
    chosen: str = ""  # pair
    rejected: str = ""  # pair
    completion: str = ""  # example
    label: bool = True  # example
    chosen_cut: bool = False  # cut off by max_tokens: no end token is trained after it (pairs.was_cut)
    rejected_cut: bool = False
    cut: bool = False  # example
    source: str = ""  # "comparison" | "ratings" | "both_bad" | "rating"
    rating_ids: tuple[int, ...] = ()
    comparison_ids: tuple[int, ...] = ()
    raters: tuple[str, ...] = ()
    created_at: datetime | None = None  # the oldest feedback behind it
    held_out: bool = False
    weight: float = 1.0

    def key(self) -> tuple[Any, ...]:
        if self.kind == "pair":
            return ("pair", self.prompt_hash, self.chosen, self.rejected)
        return ("example", self.prompt_hash, self.completion, self.label)


@dataclass
class Batch:
    objective: str  # "dpo" | "kto"
    items: list[Item]
    rating_ids: list[int] = field(default_factory=list)
    comparison_ids: list[int] = field(default_factory=list)

    def request(self) -> dict[str, Any]:
        """The body for the Trainer / `POST /api/train`."""
        body: dict[str, Any] = {"objective": self.objective, "rating_ids": self.rating_ids,
                                "comparison_ids": self.comparison_ids, "feedback_inline": True}
        if self.objective == "dpo":
            body["pairs"] = [{"prompt": i.prompt, "chosen": i.chosen, "rejected": i.rejected,
                              "chosen_cut": i.chosen_cut, "rejected_cut": i.rejected_cut} for i in self.items]
        else:
            body["examples"] = [{"prompt": i.prompt, "completion": i.completion, "label": i.label, "cut": i.cut}
                                for i in self.items]
        return body

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


def worker_prompt(prompt: pairs.Prompt) -> Prompt:
    """The conversation before the answer in the worker's `Pair.prompt` shape: {role, content} strings, or the
    raw completion prompt."""
    if prompt.messages:
        out = []
        for m in pairs.prompt_messages(prompt):
            content = m.get("content")
            if isinstance(content, list):  # OpenAI content parts: keep the text parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({"role": str(m.get("role") or "user"), "content": str(content or "")})
        return out
    return prompt.text or ""


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
    """Drop the oldest turns (keeping a leading system message and the last turn) until the prompt fits."""
    if tokenizer is None or isinstance(prompt, str) or len(prompt) <= 1:
        return prompt

    def n_tokens(msgs: list[dict[str, str]]) -> int:
        text = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    msgs = list(prompt)
    head = [msgs.pop(0)] if msgs[0].get("role") == "system" and len(msgs) > 1 else []
    while len(msgs) > 1 and n_tokens(head + msgs) > max_tokens:
        msgs.pop(0)
    return head + msgs


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


def _both_bad(session: Session, *, untrained_only: bool, held_out: bool) -> list[tuple[Comparison, Response, Response]]:
    a, b = aliased(Response), aliased(Response)
    stmt = (select(Comparison, a, b).join(a, a.id == Comparison.response_a_id).join(b, b.id == Comparison.response_b_id)
            .where(Comparison.is_current.is_(True), Comparison.winner == "both_bad",
                   Comparison.held_out.is_(held_out)).order_by(Comparison.id))
    if untrained_only:
        stmt = stmt.where(Comparison.id.not_in(
            select(RunFeedback.comparison_id).where(RunFeedback.comparison_id.is_not(None))))
    return [tuple(row) for row in session.execute(stmt)]  # type: ignore[misc]


def _items(session: Session, *, untrained_only: bool, include_held_out: bool) -> list[Item]:
    f = pairs.PairFilters(untrained_only=untrained_only, include_held_out=include_held_out)
    items = [_pair_item(p) for p in pairs.preference_pairs(session, f)]
    items += [Item(kind="example", prompt=worker_prompt(e.prompt), prompt_hash=e.prompt.prompt_hash,
                   completion=e.completion, label=e.label, source="rating", rating_ids=e.rating_ids, cut=e.cut)
              for e in pairs.unpaired_examples(session, f)]
    for c, ra, rb in _both_bad(session, untrained_only=untrained_only, held_out=False):
        for r in (ra, rb):
            items.append(Item(kind="example", prompt=worker_prompt(pairs.Prompt.of(r)), prompt_hash=r.prompt_hash,
                              completion=r.completion, label=False, source="both_bad", comparison_ids=(c.id,),
                              cut=pairs.was_cut(r)))
    meta = _feedback_meta(session, {r for i in items for r in i.rating_ids},
                          {c for i in items for c in i.comparison_ids})
    for item in items:
        keys = [("rating", r) for r in item.rating_ids] + [("comparison", c) for c in item.comparison_ids]
        item.raters = tuple(meta[k][0] for k in keys if k in meta)
        item.created_at = _oldest(*(meta[k][1] for k in keys if k in meta))
    return dedupe(items)


def collect(session: Session, *, holdout_fraction: float) -> Pool:
    """Current feedback not yet consumed by any run and not held out, as training items (split persisted first)."""
    mark_held_out(session, holdout_fraction)
    return Pool(train=_items(session, untrained_only=True, include_held_out=False))


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
    found = [p for p in pairs.preference_pairs(session, pairs.PairFilters(include_held_out=True))
             if held_r.intersection(p.rating_ids) or held_c.intersection(p.comparison_ids)]
    found = _older_than(session, found, created_before)
    return [_pair_item(p, held_out=True) for p in found[:limit]]


def trained_pairs(session: Session, *, limit: int, created_before: datetime | None = None) -> list[Item]:
    """The replay half of the eval set: pairs already learned from, by runs that were kept (succeeded; a rolled-
    back run's feedback is poison until shown otherwise), newest first, frozen like `held_out_pairs`.

    Why: a flipped-label batch contradicts exactly what earlier batches taught, so it pulls the margins of the
    pairs the model has fitted down hard, while a good batch from the same rater leaves them be or raises them.
    Unseen held-out pairs alone move little either way in one small update (see guard.py): a single round's t on
    them ranged from -1.6 for a good round to -0.7 for a poisoned one across seeds of `loop bench learning`."""
    from loop.db.models import TrainingRun

    kept = (select(RunFeedback).join(TrainingRun, TrainingRun.id == RunFeedback.run_id)
            .where(TrainingRun.status == "succeeded"))
    runs_r = {f.rating_id for f in session.scalars(kept) if f.rating_id is not None}
    runs_c = {f.comparison_id for f in session.scalars(kept) if f.comparison_id is not None}
    found = [p for p in pairs.preference_pairs(session, pairs.PairFilters(include_held_out=True))
             if (p.rating_ids or p.comparison_ids) and set(p.rating_ids) <= runs_r and set(p.comparison_ids) <= runs_c]
    found = _older_than(session, found, created_before)
    return [_pair_item(p, held_out=False) for p in reversed(found[-limit:])] if limit > 0 else []


def eval_pairs(session: Session, settings: Any, *, created_before: datetime | None = None) -> list[Item]:
    """The guard's eval set: held-out pairs (never trained on) plus replayed ones (learned from by kept runs),
    both frozen at `created_before`; sizes from settings (`eval_max_pairs`, `eval_replay_pairs`)."""
    held = held_out_pairs(session, holdout_fraction=settings.holdout_fraction, limit=settings.eval_max_pairs,
                          created_before=created_before)
    return held + trained_pairs(session, limit=settings.eval_replay_pairs, created_before=created_before)


def _older_than(session: Session, found: list[pairs.Pair], created_before: datetime | None) -> list[pairs.Pair]:
    """The pairs whose feedback is all older than `created_before` (all of them when it is None)."""
    if created_before is None:
        return found
    cutoff = _aware(created_before)
    meta = _feedback_meta(session, {r for p in found for r in p.rating_ids}, {c for p in found for c in p.comparison_ids})

    def newest(p: pairs.Pair) -> datetime | None:
        keys = [("rating", r) for r in p.rating_ids] + [("comparison", c) for c in p.comparison_ids]
        times = [meta[k][1] for k in keys if k in meta]
        return max(times) if times else None

    return [p for p in found if (t := newest(p)) is not None and t < cutoff]


def _pair_item(p: pairs.Pair, *, held_out: bool = False) -> Item:
    return Item(kind="pair", prompt=worker_prompt(p.prompt), prompt_hash=p.prompt.prompt_hash, chosen=p.chosen,
                rejected=p.rejected, source=p.source, rating_ids=p.rating_ids, comparison_ids=p.comparison_ids,
                held_out=held_out, chosen_cut=p.chosen_cut, rejected_cut=p.rejected_cut)


def build_batch(pool: Pool, *, limit: int, tokenizer: Any = None, max_prompt_tokens: int = 768) -> Batch | None:
    """The next batch: DPO pairs when any wait (the stronger signal), else KTO examples; None when empty."""
    pairs = [i for i in pool.train if i.kind == "pair"]
    examples = [i for i in pool.train if i.kind == "example"]
    objective, candidates = ("dpo", pairs) if pairs else ("kto", examples)
    if not candidates:
        return None
    chosen = select_balanced(candidates, limit)
    for item in chosen:
        item.prompt = truncate_prompt(item.prompt, tokenizer, max_prompt_tokens)
    return Batch(objective=objective, items=chosen,
                 rating_ids=sorted({r for i in chosen for r in i.rating_ids}),
                 comparison_ids=sorted({c for i in chosen for c in i.comparison_ids}))
