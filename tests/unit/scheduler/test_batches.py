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

    def response(self, prompt: str | list[dict[str, str]], completion: str, finish_reason: str | None = "stop", *,
                 prompt_ids: list[int] | None = None, completion_ids: list[int] | None = None) -> str:
        self.n += 1
        rid = f"resp-{self.n:032x}"
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        self.s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                            messages=messages, prompt_hash=hashlib.sha256(str(prompt).encode()).hexdigest(),
                            completion=completion, finish_reason=finish_reason, prompt_token_ids=prompt_ids,
                            completion_token_ids=completion_ids))
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
        assert (item.kind, item.pair.chosen, item.pair.rejected, item.comparison_ids) == (
            "pair", "a long answer", "short", (cid,))
        assert item.pair.prompt == "" and not item.prompt_loaded  # the pool reads no prompt
        batch = batches.build_batch(s, pool(s), limit=10)
        assert batch is not None and batch.pairs[0].prompt == [{"role": "user", "content": "q"}]


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
        assert (pair.pair.chosen_cut, pair.pair.rejected_cut, example.example.cut) == (False, True, True)
        (sent,) = batches.build_batch(s, p, limit=10).pairs  # what the worker receives
        assert (sent.chosen_cut, sent.rejected_cut) == (False, True)


def test_tie_gives_nothing_and_both_bad_gives_two_kto_negatives(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        a, b = db.response("q", "x"), db.response("q", "y")
        db.compare(a, b, "tie")
        assert pool(s).train == []
        cid = db.compare(a, b, "both_bad", rater="r2")
        items = pool(s).train
        assert sorted((i.kind, i.example.completion, i.example.label, i.source) for i in items) == [
            ("example", "x", False, "both_bad"), ("example", "y", False, "both_bad")]
        assert all(i.comparison_ids == (cid,) for i in items)
        batch = batches.build_batch(s, pool(s), limit=10)
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
        assert [(p.pair.chosen, p.pair.rejected, p.rating_ids) for p in pairs] == [("good", "bad", (r1, r2))]
        examples = {(i.example.completion, i.example.label, i.rating_ids) for i in items if i.kind == "example"}
        assert examples == {("good", True, (r1,)), ("bad", False, (r2,)), ("lonely", True, (r3,))}
        # DPO first: the pair's run consumes r1 and r2, so their examples never train afterwards
        batch = batches.build_batch(s, pool(s), limit=10)
        assert batch is not None and batch.objective == "dpo" and batch.rating_ids == [r1, r2]
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, rating_id=r) for r in batch.rating_ids])
        s.commit()
        left = pool(s).train
        assert [(i.example.completion, i.rating_ids) for i in left] == [("lonely", (r3,))]


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
        batch = batches.build_batch(s, pool(s), limit=4)
        assert batch is not None
        assert batch.summary()["by_rater"] == {"bot": 2, "human": 2}
        full = batches.build_batch(s, pool(s), limit=100)
        assert full is not None
        w = {i.raters[0]: i.weight for i in full.items}
        # 6 bot items and 2 human items: each human item weighs 3x a bot item; the mean weight is 1
        assert w["human"] == pytest.approx(3 * w["bot"])
        assert sum(i.weight for i in full.items) / len(full.items) == pytest.approx(1.0)
        # oldest first within a rater
        bot_prompts = [i.pair.prompt[0]["content"] for i in batch.items if i.raters[0] == "bot"]
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

    chat_template = "words"

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


def test_a_built_batch_names_the_feedback_it_consumes(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        db = DB(s)
        cid = db.compare(db.response("q", "a"), db.response("q", "b"), "a")
        batch = batches.build_batch(s, pool(s), limit=8)
        assert batch is not None
        assert (batch.objective, batch.comparison_ids, len(batch.pairs), batch.examples) == ("dpo", [cid], 1, [])
        assert batches.build_batch(s, batches.Pool(train=[]), limit=8) is None


# ---------------------------------------------------------------------------------------------- manual runs


def test_resolve_takes_the_pairs_whose_feedback_is_all_named_and_consumes_only_those(
        sessions: sessionmaker[Session]) -> None:
    from loop.worker.protocol import Pair

    with sessions() as s:
        db = DB(s)
        cid = db.compare(db.response("q", "a"), db.response("q", "b"), "b")
        good, bad = db.response("r", "good"), db.response("r", "bad")
        r1, r2 = db.rate(good, thumb=1), db.rate(bad, thumb=-1)
        lone = db.rate(db.response("x", "lonely"), thumb=1)  # named, but yields no pair: not consumed
        inline = Pair(prompt="inline prompt", chosen="yes", rejected="no")
        batch = batches.resolve(s, pairs_in=[inline], rating_ids=[r1, r2, lone], comparison_ids=[cid])
        assert batch.objective == "dpo"
        assert [(p.prompt, p.chosen, p.rejected) for p in batch.pairs] == [
            ("inline prompt", "yes", "no"), ([{"role": "user", "content": "q"}], "b", "a"),
            ([{"role": "user", "content": "r"}], "good", "bad")]
        assert (batch.rating_ids, batch.comparison_ids) == ([r1, r2], [cid])
        # only ratings without pairs: the examples (KTO), unless DPO is asked for
        kto = batches.resolve(s, rating_ids=[lone])
        assert (kto.objective, [(e.completion, e.label) for e in kto.examples], kto.rating_ids) == (
            "kto", [("lonely", True)], [lone])
        asked = batches.resolve(s, objective="kto", rating_ids=[r1, r2])
        assert sorted(e.completion for e in asked.examples) == ["bad", "good"] and asked.rating_ids == [r1, r2]


def test_resolve_refuses_unknown_consumed_superseded_feedback_and_empty_batches(
        sessions: sessionmaker[Session]) -> None:
    from loop.errors import Conflict, Invalid, NotFound
    from loop.worker.protocol import Example, Pair

    with sessions() as s:
        db = DB(s)
        cid = db.compare(db.response("q", "a"), db.response("q", "b"), "a")
        rid = db.rate(db.response("y", "z"), thumb=1)
        with pytest.raises(NotFound) as e:
            batches.resolve(s, comparison_ids=[cid, 999])
        assert e.value.code == "feedback_not_found" and "[999]" in e.value.message
        with pytest.raises(Invalid) as e:
            batches.resolve(s, objective="dpo", rating_ids=[rid])  # a thumb alone makes no pair
        assert e.value.code == "empty_batch"
        with pytest.raises(Invalid) as e:
            batches.resolve(s, objective="kto", pairs_in=[Pair(prompt="p", chosen="a", rejected="b")])
        assert e.value.code == "empty_batch"
        assert batches.resolve(s, examples_in=[Example(prompt="p", completion="c", label=True)]).objective == "kto"
        s.get(Rating, rid).is_current = False
        s.commit()
        with pytest.raises(Conflict) as e:
            batches.resolve(s, rating_ids=[rid])
        assert e.value.code == "feedback_superseded"
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        s.add(RunFeedback(run_id=run.id, comparison_id=cid))
        s.commit()
        with pytest.raises(Conflict) as e:
            batches.resolve(s, comparison_ids=[cid])
        assert e.value.code == "feedback_consumed"


def test_resolve_normalises_stored_prompts_like_the_scheduler(sessions: sessionmaker[Session]) -> None:
    """Content parts become text and a completion-endpoint prompt stays raw text, for manual and scheduled runs."""
    with sessions() as s:
        db = DB(s)
        parts = [{"role": "user", "content": [{"type": "text", "text": "two "}, {"type": "text", "text": "parts"}]}]
        ids = []
        for completion in ("a", "b"):
            rid = db.response("parts", completion)
            s.get(Response, rid).messages = parts
            ids.append(rid)
        raw = [db.response("raw", c) for c in ("c", "d")]
        for rid in raw:
            row = s.get(Response, rid)
            row.messages, row.prompt_text, row.endpoint = None, "Once upon a time", "completion"
        s.commit()
        c1, c2 = db.compare(ids[0], ids[1], "a"), db.compare(raw[0], raw[1], "a")
        manual = batches.resolve(s, comparison_ids=[c1, c2])
        scheduled = batches.build_batch(s, pool(s), limit=10)
        assert scheduled is not None
        assert [p.prompt for p in manual.pairs] == [p.prompt for p in scheduled.pairs] == [
            [{"role": "user", "content": "two parts"}], "Once upon a time"]


def test_scheduled_and_manual_batches_send_the_token_ids_stored_with_their_rows(
        sessions: sessionmaker[Session]) -> None:
    """The ids vLLM produced for the rows travel with the pairs and examples to the worker, which trains them as
    they are; inline text pairs carry none (and encode on the wire as before the ids existed)."""
    import msgspec

    from loop.worker import protocol

    with sessions() as s:
        db = DB(s)
        a = db.response("q", "a", prompt_ids=[1, 2], completion_ids=[10, 0])  # 0: the end token it sampled
        b = db.response("q", "b", "length", prompt_ids=[1, 2], completion_ids=[11, 12])  # cut: no end token
        cid = db.compare(a, b, "b")
        scheduled = batches.build_batch(s, pool(s), limit=10)
        manual = batches.resolve(s, comparison_ids=[cid], pairs_in=[protocol.Pair(prompt="p", chosen="x",
                                                                                  rejected="y")])
        assert scheduled is not None
        want = ([1, 2], [11, 12], [10, 0])
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in scheduled.pairs] == [want]
        assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in manual.pairs] == [(None, None, None), want]
        sent = protocol.decode(protocol.encode(protocol.Train(run_id=1, pairs=manual.pairs)))
        assert isinstance(sent, protocol.Train) and sent.pairs == manual.pairs
        assert set(msgspec.msgpack.decode(protocol.encode(protocol.Train(run_id=1, pairs=manual.pairs[:1])))
                   ["pairs"][0]) == {"prompt", "chosen", "rejected"}
        lone = db.rate(db.response("r", "c", prompt_ids=[3], completion_ids=[13, 0]), thumb=1)
        kto = batches.resolve(s, rating_ids=[lone])
        assert [(e.prompt_ids, e.completion_ids) for e in kto.examples] == [([3], [13, 0])]


def test_a_prompt_that_loses_turns_in_a_batch_loses_its_stored_ids(sessions: sessionmaker[Session]) -> None:
    """Stored prompt ids that fit keep the whole conversation; a conversation cut to `max_prompt_tokens` is no
    longer the one the ids belong to, so its kept text is tokenised instead."""
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(10):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 20},
                 {"role": "assistant", "content": f"answer {i} " + "word " * 20}]
    msgs.append({"role": "user", "content": "final question"})
    with sessions() as s:
        db = DB(s)
        for n_ids in (50, 500):
            a = db.response(msgs, f"a{n_ids}", prompt_ids=[7] * n_ids, completion_ids=[1])
            b = db.response(msgs, f"b{n_ids}", prompt_ids=[7] * n_ids, completion_ids=[2])
            db.compare(a, b, "a")
        batch = batches.build_batch(s, pool(s), limit=10, tokenizer=WordTokenizer(), max_prompt_tokens=60)
        assert batch is not None
        fits, cut = batch.pairs
        assert (fits.prompt, fits.prompt_ids, fits.chosen_ids) == (msgs, [7] * 50, [1])
        assert (cut.prompt_ids, cut.chosen_ids) == (None, [1]) and len(cut.prompt) < len(msgs)
        assert cut.prompt[0] == msgs[0] and cut.prompt[-1] == msgs[-1]
