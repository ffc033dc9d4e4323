"""loop.pairs: which feedback becomes which training item, with its feedback ids, in a stable order."""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy.orm import Session, sessionmaker

from tests.unit.feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import Comparison, Rating, Response, RunFeedback, TrainingRun
from loop.pairs import PairFilters, example_label, preference_pairs, unpaired_examples


def rating(sessions: sessionmaker[Session], rid: str, *, thumb: int | None = None, score: int | None = None,
           rater: str = "anonymous", current: bool = True, held_out: bool = False) -> int:
    with sessions() as s, s.begin():
        row = Rating(response_id=rid, thumb=thumb, score=score, rater=rater, tags=[], is_current=current,
                     held_out=held_out, created_at=datetime.now(timezone.utc))
        s.add(row)
        s.flush()
        return row.id


def comparison(sessions: sessionmaker[Session], a: str, b: str, winner: str, current: bool = True) -> int:
    with sessions() as s, s.begin():
        row = Comparison(response_a_id=a, response_b_id=b, winner=winner, rater="r", is_current=current,
                         held_out=False, created_at=datetime.now(timezone.utc))
        s.add(row)
        s.flush()
        return row.id


def consume(sessions: sessionmaker[Session], *, rating_ids: tuple[int, ...] = (),
            comparison_ids: tuple[int, ...] = ()) -> None:
    with sessions() as s, s.begin():
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, rating_id=i) for i in rating_ids]
                  + [RunFeedback(run_id=run.id, comparison_id=i) for i in comparison_ids])


def test_comparisons_make_pairs_ties_and_both_bad_do_not(sessions) -> None:
    a, b = add_response(sessions, completion="A"), add_response(sessions, completion="B")
    c_b = comparison(sessions, a, b, "b")
    c_a = comparison(sessions, a, b, "a")
    comparison(sessions, a, b, "tie")
    comparison(sessions, a, b, "both_bad")
    comparison(sessions, a, b, "a", current=False)  # superseded: does not count
    with sessions() as s:
        pairs = list(preference_pairs(s))
    assert [(p.pair.chosen, p.pair.rejected, p.comparison_ids, p.source) for p in pairs] == [
        ("B", "A", (c_b,), "comparison"), ("A", "B", (c_a,), "comparison")]
    assert pairs[0].pair.prompt == [{"role": "user", "content": "What is 2+2?"}]
    assert pairs[0].response_ids == (b, a) and pairs[0].raters == ("r",) and pairs[0].created_at is not None


def test_differently_rated_answers_to_one_prompt_make_pairs(sessions) -> None:
    good = add_response(sessions, completion="4")
    bad = add_response(sessions, completion="5")
    meh = add_response(sessions, completion="four-ish")
    elsewhere = add_response(sessions, prompt="other prompt", completion="x")
    r_good = rating(sessions, good, score=9)
    r_bad = rating(sessions, bad, score=2)
    rating(sessions, bad, score=10, current=False)  # an old verdict: ignored
    r_meh = rating(sessions, meh, thumb=1)  # thumbs only: not comparable with score-only answers
    rating(sessions, elsewhere, score=1)
    with sessions() as s:
        pairs = list(preference_pairs(s))
    assert [(*p.response_ids, p.rating_ids) for p in pairs] == [
        (good, bad, tuple(sorted((r_good, r_bad))))]
    # Thumbs compare with thumbs: net ups − downs.
    r_meh2 = rating(sessions, good, thumb=1, rater="x")
    r_bad2 = rating(sessions, bad, thumb=-1, rater="x")
    with sessions() as s:
        pairs = {p.response_ids for p in preference_pairs(s)}
    assert pairs == {(good, bad), (meh, bad)}  # good vs meh: equal net thumbs (+1 each) → no pair
    assert r_meh and r_meh2 and r_bad2


def test_equal_verdicts_give_no_pair(sessions) -> None:
    a, b = add_response(sessions), add_response(sessions)
    rating(sessions, a, score=7)
    rating(sessions, b, score=7)
    with sessions() as s:
        assert list(preference_pairs(s)) == []


def test_unpaired_labels_and_thresholds(sessions) -> None:
    rid = add_response(sessions)
    ids = [rating(sessions, rid, thumb=1, rater="a"), rating(sessions, rid, thumb=-1, rater="b"),
           rating(sessions, rid, score=7, rater="c"), rating(sessions, rid, score=4, rater="d"),
           rating(sessions, rid, score=5, rater="e"), rating(sessions, rid, score=6, rater="f"),
           rating(sessions, rid, thumb=-1, score=9, rater="g")]
    with sessions() as s:
        out = [(e.rating_ids, e.example.label) for e in unpaired_examples(s)]
    assert out == [((ids[0],), True), ((ids[1],), False), ((ids[2],), True), ((ids[3],), False),
                   ((ids[6],), False)]  # the thumb wins over the score
    assert [example_label(None, s) for s in range(1, 11)] == [False] * 4 + [None] * 2 + [True] * 4


def test_untrained_only_drops_consumed_feedback(sessions) -> None:
    a, b = add_response(sessions, completion="A"), add_response(sessions, completion="B")
    c1 = comparison(sessions, a, b, "a")
    c2 = comparison(sessions, b, a, "a")
    r1, r2 = rating(sessions, a, thumb=1), rating(sessions, b, thumb=-1)
    consume(sessions, comparison_ids=(c1,), rating_ids=(r1,))
    untrained = PairFilters(untrained_only=True)
    with sessions() as s:
        assert len(list(preference_pairs(s))) == 3
        left = list(preference_pairs(s, untrained))
        assert [p.comparison_ids for p in left] == [(c2,)]  # the rating pair used r1: gone too
        assert [e.rating_ids for e in unpaired_examples(s, untrained)] == [(r2,)]
        assert len(list(unpaired_examples(s))) == 2


def test_filters_held_out_and_order_is_stable(sessions) -> None:
    a = add_response(sessions, model="m1", weight_version=3)
    b = add_response(sessions, model="m2")
    rating(sessions, a, thumb=1)
    rating(sessions, b, thumb=1, held_out=True)
    with sessions() as s:
        assert [e.response_ids[0] for e in unpaired_examples(s)] == [a]
        assert {e.response_ids[0] for e in unpaired_examples(s, PairFilters(include_held_out=True))} == {a, b}
        assert [e.response_ids[0] for e in unpaired_examples(s, PairFilters(model="m2", include_held_out=True))] == [b]
        assert [e.response_ids[0] for e in unpaired_examples(s, PairFilters(weight_version=3))] == [a]
        assert list(unpaired_examples(s, PairFilters(since=datetime(2999, 1, 1)))) == []
        first = [p.response_ids for p in preference_pairs(s)]
        assert first == [p.response_ids for p in preference_pairs(s)]


def test_one_normaliser_gives_the_wire_prompt() -> None:
    """Chat messages become {role, content} text (content parts joined, as prompt_hash reads them); a completion
    prompt stays its raw text."""
    from loop.pairs import prompt_of

    parts = [{"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2+2?"}]}]
    assert prompt_of(parts, None) == [{"role": "user", "content": "What is 2+2?"}]
    assert prompt_of(None, "Once upon a time") == "Once upon a time"
    assert prompt_of([], None) == ""


def test_items_without_prompts_are_filled_by_load_prompts(sessions) -> None:
    """The scheduler's pool reads no prompt; load_prompts fills exactly the items it is given."""
    from loop.pairs import load_prompts

    a, b = add_response(sessions, completion="A"), add_response(sessions, completion="B")
    comparison(sessions, a, b, "a")
    with sessions() as s:
        bare = list(preference_pairs(s, prompts=False))
        assert [(i.prompt_loaded, i.pair.prompt) for i in bare] == [(False, "")]
        loaded = load_prompts(s, bare)
    assert loaded[0].prompt_loaded and loaded[0].pair.prompt == [{"role": "user", "content": "What is 2+2?"}]


def stored_ids(sessions: sessionmaker[Session], rid: str, prompt: list[int] | None, completion: list[int] | None
               ) -> None:
    with sessions() as s, s.begin():
        row = s.get(Response, rid)
        row.prompt_token_ids, row.completion_token_ids = prompt, completion


def test_loaded_items_carry_the_token_ids_vllm_produced_for_their_rows(sessions) -> None:
    """Each answer's own completion ids; the prompt ids only when both answers of a pair were given identical ones
    (one prompt_hash can hide different tokens: tools, template options); rows stored without ids give None."""
    a, b, c, d = (add_response(sessions, completion=x) for x in "ABCD")
    stored_ids(sessions, a, [1, 2, 3], [10, 2])
    stored_ids(sessions, b, [1, 2, 3], [11])
    stored_ids(sessions, c, [1, 2, 3, 9], [12, 2])  # same prompt_hash, other prompt tokens
    stored_ids(sessions, d, None, [])  # as a vLLM that returned no ids leaves a row
    for other in (b, c, d):
        comparison(sessions, a, other, "a")
    rating(sessions, b, thumb=1)
    rating(sessions, d, thumb=-1)
    with sessions() as s:
        pairs = [i.pair for i in preference_pairs(s)]
        examples = [i.example for i in unpaired_examples(s)]
    assert [(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs] == [
        ([1, 2, 3], [10, 2], [11]), (None, [10, 2], [12, 2]), (None, [10, 2], None),
        (None, [11], None)]  # the thumbs: B up, D down
    assert [(e.completion, e.prompt_ids, e.completion_ids) for e in examples] == [
        ("B", [1, 2, 3], [11]), ("D", None, None)]
    assert all(p.prompt == [{"role": "user", "content": "What is 2+2?"}] for p in pairs)  # the text rides along
