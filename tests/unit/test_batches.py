"""Batch building (loop/scheduler/batches.py): each rule, against a real SQLite file with rows as the API writes them."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loop.db.models import Comparison, Rating, Response, RunFeedback, TrainingRun
from loop.db.session import make_engine, make_sessionmaker, migrate
from loop.scheduler import batches

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    migrate(url)
    engine = make_engine(url)
    yield make_sessionmaker(engine)
    engine.dispose()


class DB:
    def __init__(self, s: Session) -> None:
        self.s = s
        self.n = 0

    def response(self, prompt: str, completion: str, finish_reason: str | None = "stop") -> str:
        self.n += 1
        rid = f"resp-{self.n:032x}"
        messages = [{"role": "user", "content": prompt}]
        self.s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                            messages=messages, prompt_hash=hashlib.sha256(prompt.encode()).hexdigest(),
                            completion=completion, finish_reason=finish_reason))
        self.s.commit()
        return rid

    def rate(self, rid: str, *, thumb: int | None = None, score: int | None = None, rater: str = "r1",
             minutes: int = 0) -> int:
        r = Rating(response_id=rid, thumb=thumb, score=score, rater=rater, created_at=T0 + timedelta(minutes=minutes))
        self.s.add(r)
        self.s.commit()
        return r.id

    def compare(self, a: str, b: str, winner: str, *, rater: str = "r1", minutes: int = 0) -> int:
        c = Comparison(response_a_id=a, response_b_id=b, winner=winner, rater=rater,
                       created_at=T0 + timedelta(minutes=minutes))
        self.s.add(c)
        self.s.commit()
        return c.id


def pool(s: Session, fraction: float = 0.0) -> batches.Pool:
    return batches.collect(s, holdout_fraction=fraction)


def test_ab_winner_gives_a_pair_with_the_winner_chosen(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        a, b = db.response("q", "short"), db.response("q", "a long answer")
        cid = db.compare(a, b, "b")
        (item,) = pool(s).train
        assert (item.kind, item.chosen, item.rejected, item.comparison_ids) == ("pair", "a long answer", "short", (cid,))
        assert item.prompt == [{"role": "user", "content": "q"}]


def test_answers_cut_off_by_max_tokens_are_marked_so_no_end_token_is_trained(
        sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        a, b = db.response("q", "Short."), db.response("q", "a long answer that went on and", finish_reason="length")
        db.compare(a, b, "a")
        c = db.response("r", "cut", finish_reason="length")
        db.rate(c, thumb=-1)
        p = pool(s)
        (pair,) = [i for i in p.train if i.kind == "pair"]
        (example,) = [i for i in p.train if i.kind == "example"]
        assert (pair.chosen_cut, pair.rejected_cut, example.cut) == (False, True, True)
        body = batches.build_batch(p, limit=10).request()
        assert (body["pairs"][0]["chosen_cut"], body["pairs"][0]["rejected_cut"]) == (False, True)


def test_tie_gives_nothing_and_both_bad_gives_two_kto_negatives(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        a, b = db.response("q", "x"), db.response("q", "y")
        db.compare(a, b, "tie")
        assert pool(s).train == []
        cid = db.compare(a, b, "both_bad", rater="r2")
        items = pool(s).train
        assert sorted((i.kind, i.completion, i.label, i.source) for i in items) == [
            ("example", "x", False, "both_bad"), ("example", "y", False, "both_bad")]
        assert all(i.comparison_ids == (cid,) for i in items)
        batch = batches.build_batch(pool(s), limit=10)
        assert batch is not None and batch.objective == "kto" and batch.comparison_ids == [cid]


def test_same_prompt_rated_differently_gives_a_pair_and_single_thumbs_give_examples(
        sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        good, bad = db.response("q", "good"), db.response("q", "bad")
        r1, r2 = db.rate(good, thumb=1), db.rate(bad, thumb=-1)
        lone = db.response("other", "lonely")
        r3 = db.rate(lone, score=8)
        items = pool(s).train
        pairs = [i for i in items if i.kind == "pair"]
        assert [(p.chosen, p.rejected, p.rating_ids) for p in pairs] == [("good", "bad", (r1, r2))]
        examples = {(i.completion, i.label, i.rating_ids) for i in items if i.kind == "example"}
        assert examples == {("good", True, (r1,)), ("bad", False, (r2,)), ("lonely", True, (r3,))}
        # DPO first: the pair's run consumes r1 and r2, so their examples never train afterwards
        batch = batches.build_batch(pool(s), limit=10)
        assert batch is not None and batch.objective == "dpo" and batch.rating_ids == [r1, r2]
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, rating_id=r) for r in batch.rating_ids])
        s.commit()
        left = pool(s).train
        assert [(i.completion, i.rating_ids) for i in left] == [("lonely", (r3,))]


def test_middling_scores_and_superseded_ratings_are_skipped(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        rid = db.response("q", "meh")
        db.rate(rid, score=5)
        old = db.rate(db.response("q2", "z"), thumb=1)
        s.get(Rating, old).is_current = False
        s.commit()
        assert pool(s).train == []


def test_duplicates_merge_and_carry_every_feedback_id(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        a, b = db.response("q", "yes"), db.response("q", "no")
        a2, b2 = db.response("q", "yes"), db.response("q", "no")  # same texts, new responses
        c1 = db.compare(a, b, "a")
        c2 = db.compare(a2, b2, "a", rater="r2")
        (item,) = [i for i in pool(s).train if i.kind == "pair"]
        assert item.comparison_ids == (c1, c2)
        assert sorted(item.raters) == ["r1", "r2"]


def test_raters_are_balanced_round_robin_and_weighted(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        for i in range(6):  # a prolific rater
            db.compare(db.response(f"p{i}", "a"), db.response(f"p{i}", "b"), "a", rater="bot", minutes=i)
        for i in range(2):
            db.compare(db.response(f"h{i}", "a"), db.response(f"h{i}", "b"), "b", rater="human", minutes=10 + i)
        batch = batches.build_batch(pool(s), limit=4)
        assert batch is not None
        assert batch.summary()["by_rater"] == {"bot": 2, "human": 2}
        full = batches.build_batch(pool(s), limit=100)
        assert full is not None
        w = {i.raters[0]: i.weight for i in full.items}
        # 6 bot items and 2 human items: each human item weighs 3x a bot item; the mean weight is 1
        assert w["human"] == pytest.approx(3 * w["bot"])
        assert sum(i.weight for i in full.items) / len(full.items) == pytest.approx(1.0)
        # oldest first within a rater
        bot_prompts = [i.prompt[0]["content"] for i in batch.items if i.raters[0] == "bot"]
        assert bot_prompts == ["p0", "p1"]


def test_held_out_split_is_deterministic_persisted_and_never_trained(sessions: sessionmaker[Session]) -> None:
    fraction = 0.3
    with sessions() as s:
        db = DB(s)
        ids = [db.compare(db.response(f"q{i}", "a"), db.response(f"q{i}", "b"), "a") for i in range(40)]
        expected = {c for c in ids if batches.is_held_out("comparison", c, fraction)}
        assert 4 <= len(expected) <= 20  # ~30 % of 40
        train = pool(s, fraction).train
        trained = {c for i in train for c in i.comparison_ids}
        assert trained == set(ids) - expected
        marked = set(s.scalars(select(Comparison.id).where(Comparison.held_out.is_(True))))
        assert marked == expected
        evals = batches.held_out_pairs(s, holdout_fraction=fraction, limit=100)
        assert {c for i in evals for c in i.comparison_ids} == expected
        assert batches.held_out_pairs(s, holdout_fraction=fraction, limit=3) == evals[:3]
    # the same ids always land on the same side
    assert [batches.is_held_out("rating", i, 0.1) for i in range(200)] == \
        [batches.is_held_out("rating", i, 0.1) for i in range(200)]
    assert not any(batches.is_held_out("rating", i, 0.0) for i in range(200))


def test_eval_set_is_frozen_before_the_batch_feedback(sessions: sessionmaker[Session]) -> None:
    """Only held-out pairs whose feedback ALL predates the cutoff judge a batch: the same round's held-out pairs
    (and a ratings pair with one newer rating) are left out; a later cutoff takes them in, oldest first."""
    fraction = 0.5
    with sessions() as s:
        db = DB(s)
        ids = [db.compare(db.response(f"q{i}", "a"), db.response(f"q{i}", "b"), "a", minutes=i) for i in range(30)]
        held = [c for c in ids if batches.is_held_out("comparison", c, fraction)]
        early = [c for c in held if c <= ids[14]]  # minutes 0..14
        assert early and len(early) < len(held)
        cutoff = T0 + timedelta(minutes=15)
        evals = batches.held_out_pairs(s, holdout_fraction=fraction, limit=100, created_before=cutoff)
        assert [c for i in evals for c in i.comparison_ids] == early
        assert batches.held_out_pairs(s, holdout_fraction=fraction, limit=100, created_before=T0) == []
        later = batches.held_out_pairs(s, holdout_fraction=fraction, limit=100, created_before=T0 + timedelta(days=1))
        assert [c for i in later for c in i.comparison_ids] == held
        assert batches.held_out_pairs(s, holdout_fraction=fraction, limit=100) == later  # no cutoff: all
        # a pair from two ratings counts from its newest rating
        up, down = db.response("rated", "good"), db.response("rated", "bad")
        r1 = db.rate(up, thumb=1, minutes=1)
        r2 = db.rate(down, thumb=-1, minutes=20)
        s.query(Rating).filter(Rating.id.in_((r1, r2))).update({"held_out": True})
        s.commit()
        with_ratings = batches.held_out_pairs(s, holdout_fraction=fraction, limit=100, created_before=cutoff)
        assert not any(i.rating_ids for i in with_ratings)
        with_ratings = batches.held_out_pairs(s, holdout_fraction=fraction, limit=100,
                                              created_before=T0 + timedelta(minutes=21))
        assert [i.rating_ids for i in with_ratings if i.rating_ids] == [(r1, r2)]


def test_consumed_feedback_is_never_marked_held_out(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        ids = [db.compare(db.response(f"q{i}", "a"), db.response(f"q{i}", "b"), "a") for i in range(20)]
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, comparison_id=c) for c in ids])
        s.commit()
        assert batches.mark_held_out(s, 0.9) == 0


class WordTokenizer:
    """A tiny stand-in with the two methods truncation uses: one token per word."""

    def apply_chat_template(self, msgs: list[dict[str, str]], add_generation_prompt: bool, tokenize: bool) -> str:
        return " ".join(f"<{m['role']}> {m['content']}" for m in msgs) + " <assistant>"

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(range(len(text.split())))}


def test_long_conversations_lose_old_turns_but_keep_system_and_last_turn() -> None:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 20},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    msgs.append({"role": "user", "content": "final question"})
    out = batches.truncate_prompt(msgs, WordTokenizer(), max_tokens=60)
    assert out[0] == msgs[0] and out[-1] == msgs[-1]
    assert len(out) < len(msgs)
    assert len(WordTokenizer()(WordTokenizer().apply_chat_template(out, True, False))["input_ids"]) <= 60
    # a prompt that fits is untouched; a plain-text prompt is left to the worker's token truncation
    assert batches.truncate_prompt(msgs[:3], WordTokenizer(), max_tokens=1000) == msgs[:3]
    assert batches.truncate_prompt("raw text", WordTokenizer(), max_tokens=1) == "raw text"


def test_request_is_a_valid_train_request_that_names_its_feedback(sessions: sessionmaker[Session]) -> None:
    from loop.training import TrainRequest

    with sessions() as s:
        db = DB(s)
        cid = db.compare(db.response("q", "a"), db.response("q", "b"), "a")
        batch = batches.build_batch(pool(s), limit=8)
        assert batch is not None
        req = TrainRequest(**batch.request())
        assert req.feedback_inline and req.comparison_ids == [cid] and len(req.pairs) == 1
        assert batches.build_batch(batches.Pool(train=[]), limit=8) is None
