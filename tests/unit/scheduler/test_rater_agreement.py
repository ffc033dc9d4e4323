"""rater_min_agreement (off by default): the scheduler leaves out the feedback of a rater who disagrees with the
others on shared answers, judged only once there is enough evidence; what it leaves out stays untrained. A real
SQLite file, the fake trainer of tests/unit/scheduler_support.py."""

from __future__ import annotations

import hashlib

from tests.unit.scheduler_support import Clock, State, runs, state  # noqa: F401 - fixture

from loop.db.models import Rating, Response, RunFeedback
from loop.scheduler.scheduler import Scheduler

HONEST = ("ann", "bob")


def rate_answers(state: State, prompts: int, *, contrarian: str = "eve", also: int = 0) -> None:
    """Each prompt has a good and a bad answer: the honest raters thumb good up and bad down, the contrarian the
    opposite; `also` more prompts only the contrarian rates (nobody to agree or disagree with)."""
    with state.sessions() as s:
        for n in range(prompts + also):
            prompt = f"question {n} {contrarian}"
            h = hashlib.sha256(prompt.encode()).hexdigest()
            good, bad = f"good-{n:028x}{contrarian}", f"bad-{n:029x}{contrarian}"
            for rid, text in ((good, "a helpful answer"), (bad, "an unhelpful one")):
                s.add(Response(id=rid, group_id=good, endpoint="chat", model="m", weight_version=0, request={},
                               messages=[{"role": "user", "content": prompt}], prompt_hash=h, completion=text))
            s.flush()
            raters = HONEST if n < prompts else ()
            for rater in raters:
                s.add_all([Rating(response_id=good, rater=rater, thumb=1), Rating(response_id=bad, rater=rater, thumb=-1)])
            s.add_all([Rating(response_id=good, rater=contrarian, thumb=-1),
                       Rating(response_id=bad, rater=contrarian, thumb=1)])
        s.commit()


def trained_raters(state: State) -> set[str]:
    with state.sessions() as s:
        ids = [r for (r,) in s.query(RunFeedback.rating_id).filter(RunFeedback.rating_id.is_not(None))]
        return {s.get(Rating, i).rater for i in ids}


async def test_off_by_default_every_raters_feedback_trains(state: State) -> None:
    rate_answers(state, 6)
    sched = Scheduler(state, guard=None, clock=Clock())
    sched.configure(guard_enabled=False, batch_size=100)
    assert sched.config()["rater_min_agreement"] is None
    assert await sched.tick() is not None
    assert trained_raters(state) == {"ann", "bob", "eve"}
    assert sched.describe()["raters_left_out"] == {}


async def test_a_rater_who_disagrees_with_everyone_is_left_out_and_their_feedback_waits(state: State) -> None:
    rate_answers(state, 6, also=2)
    sched = Scheduler(state, guard=None, clock=Clock())
    sched.configure(guard_enabled=False, batch_size=100, rater_min_agreement=0.5, rater_agreement_min_pairs=10)
    run_id = await sched.tick()
    assert run_id is not None
    # eve: 12 thumbs on shared answers, each beside 2 others that disagree: 24 pairs, 0 agreed
    left = sched.describe()["raters_left_out"]
    assert left == {"eve": {"items": 12, "pairs": 24, "agreed": 0, "rate": 0.0}}
    assert trained_raters(state) == {"ann", "bob"}
    (run,) = runs(state)
    assert run.batch["scheduler"]["raters_left_out"] == left
    # the pairs were formed without eve's thumbs: every trained pair prefers the good answer
    assert all(p.chosen == "a helpful answer" for p in state.trainer.batches[0].pairs)
    # eve's feedback (including her answers nobody else rated) is not consumed: it waits, untrained
    assert sched.describe()["untrained"]["pairs"] + sched.describe()["untrained"]["examples"] > 0
    with state.sessions() as s:
        consumed = {r for (r,) in s.query(RunFeedback.rating_id).filter(RunFeedback.rating_id.is_not(None))}
        eve = {r.id for r in s.query(Rating).filter(Rating.rater == "eve")}
    assert not consumed & eve


async def test_too_little_evidence_keeps_the_rater(state: State) -> None:
    rate_answers(state, 2)  # eve: 4 thumbs beside 2 others = 8 pairs < 10
    sched = Scheduler(state, guard=None, clock=Clock())
    sched.configure(guard_enabled=False, batch_size=100, min_pairs=1, rater_min_agreement=0.5,
                    rater_agreement_min_pairs=10)
    assert await sched.tick() is not None
    assert sched.describe()["raters_left_out"] == {}
    assert "eve" in trained_raters(state)


def test_the_threshold_is_a_rate_between_0_and_1(state: State) -> None:
    import pytest

    sched = Scheduler(state, guard=None, clock=Clock())
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="rater_min_agreement must be a finite float"):
            sched.configure(rater_min_agreement=bad)
    sched.configure(rater_min_agreement=None)
    assert sched.config()["rater_min_agreement"] is None
