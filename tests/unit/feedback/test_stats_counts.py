"""`loop.pairs.count_available` (the SQL behind GET /api/stats) counts exactly what `preference_pairs` and
`unpaired_examples` yield, and their untrained-only reading (done in SQL) keeps exactly the items whose feedback
no run consumed — on random feedback histories, SQLite and PostgreSQL."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest
from sqlalchemy.orm import Session, sessionmaker

from tests.unit.feedback_support import add_response, db_url, sessions  # noqa: F401 - fixtures
from loop.db.models import Comparison, Rating, RunFeedback, TrainingRun
from loop.pairs import PairFilters, count_available, preference_pairs, unpaired_examples


def random_history(sessions: sessionmaker[Session], seed: int, groups: int = 25) -> tuple[set[int], set[int]]:
    """Prompt groups of 1-4 answers; ratings from a few raters with thumbs and/or scores from a narrow range (so
    equal means and equal net thumbs are common), some superseded or held out; A/B picks of every kind; a random
    share of the feedback consumed by runs. Returns the consumed (rating ids, comparison ids)."""
    rng = random.Random(seed)
    now = datetime.now(timezone.utc)
    ratings: list[Rating] = []
    comparisons: list[Comparison] = []
    for g in range(groups):
        answers = [add_response(sessions, prompt=f"question {seed}-{g}", completion=f"answer {g}.{j}")
                   for j in range(rng.randint(1, 4))]
        for rid in answers:
            for k in range(rng.randint(0, 3)):
                thumb = rng.choice((1, -1, None))
                score = rng.choice((None, 3, 4, 5, 6, 7)) if thumb is not None else rng.choice((3, 4, 5, 6, 7))
                ratings.append(Rating(response_id=rid, thumb=thumb, score=score, rater=f"r{k}", tags=[],
                                      is_current=rng.random() > 0.15, held_out=rng.random() < 0.15, created_at=now))
        for _ in range(rng.randint(0, 2) if len(answers) > 1 else 0):
            a, b = rng.sample(answers, 2)
            comparisons.append(Comparison(response_a_id=a, response_b_id=b, rater="c",
                                          winner=rng.choice(("a", "b", "tie", "both_bad")),
                                          is_current=rng.random() > 0.15, held_out=rng.random() < 0.15,
                                          created_at=now))
    with sessions() as s, s.begin():
        s.add_all(ratings + comparisons)
        s.flush()
        run = TrainingRun(status="succeeded")
        s.add(run)
        s.flush()
        used_r = {r.id for r in ratings if rng.random() < 0.3}
        used_c = {c.id for c in comparisons if rng.random() < 0.3}
        s.add_all([RunFeedback(run_id=run.id, rating_id=i) for i in used_r]
                  + [RunFeedback(run_id=run.id, comparison_id=i) for i in used_c])
    return used_r, used_c


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sql_counts_equal_what_the_pairs_module_yields(sessions, seed: int) -> None:
    used_r, used_c = random_history(sessions, seed)
    untrained = PairFilters(untrained_only=True)
    with sessions() as s:
        all_pairs = list(preference_pairs(s))
        all_examples = list(unpaired_examples(s))
        fresh_pairs = list(preference_pairs(s, untrained))
        fresh_examples = list(unpaired_examples(s, untrained))
        counts = count_available(s)
    assert {p.source for p in all_pairs} == {"comparison", "ratings"}  # the history exercises both kinds
    assert 0 < len(fresh_pairs) < len(all_pairs) and 0 < len(fresh_examples) < len(all_examples)
    assert counts == {"pairs_available": len(all_pairs), "untrained_pairs": len(fresh_pairs),
                      "unpaired_available": len(all_examples), "untrained_unpaired": len(fresh_examples)}
    # untrained = everything, less the items any of whose feedback a run consumed; same items, same order
    assert fresh_pairs == [p for p in all_pairs
                           if not used_r.intersection(p.rating_ids) and not used_c.intersection(p.comparison_ids)]
    assert fresh_examples == [e for e in all_examples if not used_r.intersection(e.rating_ids)]


def test_counts_of_an_empty_database_are_zero(sessions) -> None:
    with sessions() as s:
        assert count_available(s) == {"pairs_available": 0, "untrained_pairs": 0, "unpaired_available": 0,
                                      "untrained_unpaired": 0}


def test_equal_means_make_no_pair_however_they_are_reached(sessions) -> None:
    a = add_response(sessions, prompt="p", completion="a")
    b = add_response(sessions, prompt="p", completion="b")
    c = add_response(sessions, prompt="p", completion="c")
    with sessions() as s, s.begin():  # means 5, 5 and 5.5: only the pairs with c differ
        s.add_all([Rating(response_id=rid, score=score, rater=rater, tags=[])
                   for rid, score, rater in ((a, 4, "x"), (a, 6, "y"), (b, 5, "x"), (c, 5, "x"), (c, 6, "y"))])
    with sessions() as s:
        assert len(list(preference_pairs(s))) == count_available(s)["pairs_available"] == 2
