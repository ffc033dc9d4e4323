"""The scheduler's decisions (loop/scheduler/scheduler.py) with a fake trainer and a scripted guard, a real SQLite
file and a fake clock: triggers, pause/resume and the schedule across restarts, no overlap, automatic rollback."""

from __future__ import annotations

from typing import Any

import pytest
from tests.unit.scheduler_support import Clock, ScriptedGuard, State, add_comparisons, runs, state  # noqa: F401 - fixture
from sqlalchemy import select

from loop.db.models import RunFeedback, TrainingRun, WeightVersion
from loop.scheduler.batches import is_held_out
from loop.scheduler.guard import EvalFigures
from loop.scheduler.scheduler import Scheduler


async def test_threshold_trigger_starts_a_run_and_records_why(state: State) -> None:
    clock = Clock()
    sched = Scheduler(state, guard=None, clock=clock)
    sched.configure(guard_enabled=False)
    add_comparisons(state, 2)
    assert await sched.tick() is None
    assert "2 items < 3" in sched.last_decision
    ids = add_comparisons(state, 1)
    run_id = await sched.tick()
    assert run_id is not None
    (run,) = runs(state)
    assert run.trigger == "scheduler" and run.status == "succeeded"
    assert run.batch["scheduler"]["trigger"] == "threshold"
    assert "3 untrained items" in run.batch["scheduler"]["reason"]
    assert len(state.trainer.batches[0].pairs) == 3 and ids[0] in state.trainer.requests[0].comparison_ids
    # consumed: nothing waits now, so the next tick does nothing
    assert await sched.tick() is None
    assert sched.describe()["untrained"] == {"pairs": 0, "examples": 0}


async def test_interval_trigger_trains_whatever_waits_when_the_interval_elapses(state: State) -> None:
    clock = Clock()
    sched = Scheduler(state, guard=None, clock=clock)
    sched.configure(guard_enabled=False, min_pairs=100)
    add_comparisons(state, 1)
    assert await sched.tick() is None
    clock.t += 61
    assert await sched.tick() is not None
    assert runs(state)[0].batch["scheduler"]["trigger"] == "interval"
    # the interval clock moved on: another item right away does not trigger until the next interval
    add_comparisons(state, 1)
    clock.t += 10
    assert await sched.tick() is None
    clock.t += 55
    assert await sched.tick() is not None


async def test_max_wait_trigger_fires_for_old_feedback(state: State) -> None:
    import time as _time

    clock = Clock()
    clock.t = _time.time()  # feedback rows carry real timestamps
    sched = Scheduler(state, guard=None, clock=clock)
    sched.configure(guard_enabled=False, min_pairs=100, interval_s=1e9)
    add_comparisons(state, 1)
    assert await sched.tick() is None
    clock.t += 3601
    assert await sched.tick() is not None
    assert runs(state)[0].batch["scheduler"]["trigger"] == "max_wait"


async def test_pause_resume_and_schedule_survive_a_new_instance(state: State) -> None:
    clock = Clock()
    first = Scheduler(state, guard=None, clock=clock)
    first.configure(guard_enabled=False, min_pairs=2)
    first.pause()
    next_at = first.describe()["next_interval_at"]
    add_comparisons(state, 5)
    second = Scheduler(state, guard=None, clock=clock)  # as after a restart
    assert second.paused and second.config()["min_pairs"] == 2
    assert second.describe()["next_interval_at"] == next_at
    assert await second.tick() is None and runs(state) == []
    second.resume()
    third = Scheduler(state, guard=None, clock=clock)
    assert not third.paused
    assert await third.tick() is not None
    assert Scheduler(state, guard=None, clock=clock).describe()["last_run_id"] == runs(state)[0].id


async def test_no_overlap_while_a_run_is_in_progress(state: State) -> None:
    sched = Scheduler(state, guard=None, clock=Clock())
    sched.configure(guard_enabled=False)
    add_comparisons(state, 5)
    state.trainer.busy = True
    assert await sched.tick() is None and sched.last_decision == "a run is in progress"
    state.trainer.busy = False
    async with sched._lock:  # a run of the scheduler itself
        assert await sched.tick() is None
    assert await sched.tick() is not None


async def test_regression_is_rolled_back_with_reason_and_figures(state: State) -> None:
    add_comparisons(state, 3)
    guard = ScriptedGuard([(0.9, 10.0), (0.5, 10.1)])  # accuracy falls by 0.4 > 0.1
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    run_id = await sched.tick()
    assert run_id is not None
    assert state.trainer.checkpoints == 1  # the live version had no checkpoint: written before the update
    assert state.trainer.restored == [0]
    with state.sessions() as s:
        run = s.get(TrainingRun, run_id)
        assert run.status == "rolled_back"
        assert "accuracy fell from 0.900 to 0.500" in run.error
        assert run.metrics["eval_before"]["accuracy"] == 0.9 and run.metrics["eval_after"]["accuracy"] == 0.5
        assert run.metrics["rollback"]["restored_version"] == 2
        assert s.get(WeightVersion, 1).status == "rolled_back" and s.get(WeightVersion, 1).eval["accuracy"] == 0.5
        assert s.get(WeightVersion, 0).eval["accuracy"] == 0.9
        assert s.get(WeightVersion, 2).kind == "rollback"
        # the poisoned feedback stays consumed: it is not retried
        assert len(s.scalars(select(RunFeedback).where(RunFeedback.run_id == run_id)).all()) == 3


async def test_perplexity_rise_rolls_back_and_a_good_run_stays(state: State) -> None:
    add_comparisons(state, 3)
    guard = ScriptedGuard([(None, 10.0), (None, 10.2), (None, 10.0), (None, 11.0)])
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    good = await sched.tick()  # +2 % < 5 %
    add_comparisons(state, 3)
    bad = await sched.tick()  # +10 %
    with state.sessions() as s:
        assert s.get(TrainingRun, good).status == "succeeded"
        assert s.get(TrainingRun, bad).status == "rolled_back"
        assert "canary perplexity rose" in s.get(TrainingRun, bad).error
    assert state.trainer.restored == [1]


async def test_failed_run_releases_feedback_for_the_next_run(state: State) -> None:
    sched = Scheduler(state, guard=None, clock=Clock())
    sched.configure(guard_enabled=False)
    ids = add_comparisons(state, 3)
    state.trainer.fail = True
    await sched.tick()
    state.trainer.fail = False
    await sched.tick()
    first, second = runs(state)
    assert (first.status, second.status) == ("failed", "succeeded")
    assert sorted(state.trainer.requests[1].comparison_ids) == ids


def test_interrupted_runs_are_failed_and_release_their_feedback(state: State) -> None:
    ids = add_comparisons(state, 2)
    with state.sessions() as s:
        run = TrainingRun(status="running", trigger="scheduler", version_before=0)
        s.add(run)
        s.flush()
        s.add_all([RunFeedback(run_id=run.id, comparison_id=c) for c in ids])
        s.commit()
    sched = Scheduler(state, guard=None, clock=Clock())
    assert sched.recover_interrupted() == [run.id]
    (r,) = runs(state)
    assert r.status == "failed" and "interrupted" in r.error
    assert sched.describe()["untrained"]["pairs"] == 2


def test_configure_validates_names_and_persists(state: State) -> None:
    sched = Scheduler(state, guard=None, clock=Clock())
    with pytest.raises(ValueError, match="unknown scheduler setting"):
        sched.configure(bogus=1)
    sched.configure(min_pairs=7, interval_s=5)
    again = Scheduler(state, guard=None, clock=Clock())
    assert again.config()["min_pairs"] == 7 and again.config()["interval_s"] == 5.0
    again.configure(min_pairs=None)  # back to the setting
    assert Scheduler(state, guard=None, clock=Clock()).config()["min_pairs"] == 3


class MarginGuard:
    """Reports the given margin change (in standard errors) after each update, in order; remembers the pairs."""

    tokenizer = None

    def __init__(self, dmargins: list[float]) -> None:
        self.dmargins = list(dmargins)
        self.measured: list[list[Any]] = []

    async def measure(self, pairs: list[Any], before: EvalFigures | None = None) -> EvalFigures:
        self.measured.append(list(pairs))
        dm = self.dmargins.pop(0) if before is not None else None
        dm = dm if pairs else None
        return EvalFigures(accuracy=1.0 if pairs else None, n_pairs=len(pairs), mean_margin=None,
                           canary_perplexity=10.0, canary_tokens=100, ms=1.0,
                           reward_accuracy=0.5 if dm is not None else None, mean_reward_margin=dm,
                           mean_token_margin_change=dm / 100 if dm is not None else None, margin_change_t=dm,
                           # the sign-flip p of a change dm "standard errors" down: tiny past -2, else not small
                           margin_change_p=None if dm is None else 1e-3 if dm < -2 else 0.3)


def _held(state: State, ids: list[int]) -> list[int]:
    return [c for c in ids if is_held_out("comparison", c, state.settings.holdout_fraction)]


async def test_eval_set_is_frozen_per_run_and_never_holds_the_batchs_own_round(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5, "eval_min_pairs": 1,
                                                       "eval_replay_pairs": 0})  # held-out pairs only here
    guard = MarginGuard([+0.3, +0.3, +0.3])
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1)
    round1 = add_comparisons(state, 12)
    first = await sched.tick()
    round2 = add_comparisons(state, 12)  # feedback collected after the first batch was built
    second = await sched.tick()
    held1, held2 = _held(state, round1), _held(state, round2)
    assert held1 and held2 and len(held1) < 12 and len(held2) < 12
    with state.sessions() as s:
        set1 = s.get(TrainingRun, first).batch["scheduler"]["eval_set"]
        set2 = s.get(TrainingRun, second).batch["scheduler"]["eval_set"]
    # first run: only held-out pairs older than every item of its batch (none, or the first few of round 1)
    trained1 = sorted(set(round1) - set(held1))
    assert set1["comparison_ids"] == [c for c in held1 if c < trained1[0]]
    # second run: exactly round 1's held-out pairs — round 2's own held-out pairs came with its batch
    assert set2["comparison_ids"] == held1 and set2["n_pairs"] == len(held1)
    assert not set(set2["comparison_ids"]) & set(held2)
    # the same frozen set was measured before and after the update
    assert [len(p) for p in guard.measured] == [len(set1["comparison_ids"])] * 2 + [len(held1)] * 2
    assert guard.measured[2] == guard.measured[3]
    # and round 2's held-out pairs judge the next run
    add_comparisons(state, 4)
    third = await sched.tick()
    with state.sessions() as s:
        assert s.get(TrainingRun, third).batch["scheduler"]["eval_set"]["comparison_ids"] == held1 + held2


async def test_held_out_margins_moved_the_wrong_way_roll_back_and_a_good_run_stays(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5})
    guard = MarginGuard([-3.0, +2.0, -3.0])
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, margin_alpha=0.01)
    add_comparisons(state, 20)
    first = await sched.tick()  # too few pairs older than its batch to judge preferences: perplexity only
    add_comparisons(state, 12)
    good = await sched.tick()  # margins moved the right way
    add_comparisons(state, 12)
    bad = await sched.tick()  # raw accuracy unchanged, but the margins fell by 3 standard errors
    with state.sessions() as s:
        assert s.get(TrainingRun, first).batch["scheduler"]["eval_set"]["n_pairs"] < 5
        assert s.get(TrainingRun, first).status == "succeeded"
        assert s.get(TrainingRun, good).status == "succeeded"
        run = s.get(TrainingRun, bad)
        assert run.status == "rolled_back" and "sign-flip test p = 0.001 < 0.01" in run.error
        assert run.metrics["eval_after"]["margin_change_t"] == -3.0
        assert run.metrics["rollback"]["reason"] in run.error


async def test_eval_set_replays_pairs_of_kept_runs_never_of_rolled_back_ones(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5, "eval_min_pairs": 1,
                                                       "eval_replay_pairs": 4})
    guard = MarginGuard([+0.3, -5.0, +0.3, +0.3])
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, margin_alpha=0.01)
    round1 = add_comparisons(state, 12)
    await sched.tick()  # kept
    round2 = add_comparisons(state, 12)
    second = await sched.tick()  # rolled back: its pairs must never judge a later run
    add_comparisons(state, 12)
    third = await sched.tick()
    trained1 = sorted(set(round1) - set(_held(state, round1)))
    trained2 = sorted(set(round2) - set(_held(state, round2)))
    with state.sessions() as s:
        assert s.get(TrainingRun, second).status == "rolled_back"
        set2 = s.get(TrainingRun, second).batch["scheduler"]["eval_set"]
        set3 = s.get(TrainingRun, third).batch["scheduler"]["eval_set"]
    # run 2 replays the newest 4 pairs run 1 learned from, beside round 1's held-out pairs
    assert set2["n_replayed"] == 4 and set(trained1[-4:]) <= set(set2["comparison_ids"])
    # run 3: still run 1's pairs, none of the rolled-back run 2's
    assert set3["n_replayed"] == 4 and set(trained1[-4:]) <= set(set3["comparison_ids"])
    assert not set(set3["comparison_ids"]) & set(trained2)


async def test_replay_trains_kept_pairs_again_never_the_eval_sets_or_a_rolled_back_runs(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5, "eval_min_pairs": 1,
                                                       "eval_replay_pairs": 2})
    guard = MarginGuard([+0.3, -5.0, +0.3, +0.3])
    sched = Scheduler(state, guard=guard, clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, margin_alpha=0.01)
    round1 = add_comparisons(state, 12)
    await sched.tick()  # kept: the first run has nothing to replay (nothing was kept yet)
    sched.configure(replay_pairs=3)
    round2 = add_comparisons(state, 12)
    second = await sched.tick()  # rolled back
    add_comparisons(state, 12)
    third = await sched.tick()
    trained1 = set(round1) - set(_held(state, round1))
    trained2 = set(round2) - set(_held(state, round2))
    first_replay, second_replay, third_replay = state.trainer.replays
    with state.sessions() as s:
        assert s.get(TrainingRun, second).status == "rolled_back"
        evals = [set(s.get(TrainingRun, r).batch["scheduler"]["eval_set"]["comparison_ids"]) for r in (second, third)]
    assert first_replay == []
    for replay, eval_ids, batch in zip((second_replay, third_replay), evals, state.trainer.batches[1:]):
        ids = {c for item in replay for c in item.comparison_ids}
        assert len(replay) == 3 and all(item.kind == "pair" and item.prompt_loaded for item in replay)
        assert ids <= trained1 and not ids & eval_ids  # run 1's pairs, none the guard judges the run by
        assert not ids & set(batch.comparison_ids) and not ids & trained2  # never the rolled-back run's
    sched.configure(replay_pairs=0)
    add_comparisons(state, 12)
    await sched.tick()
    assert state.trainer.replays[-1] == []


async def test_replay_fills_a_run_up_to_batch_size_and_never_past_it(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5, "eval_min_pairs": 1,
                                                       "eval_replay_pairs": 0})
    sched = Scheduler(state, guard=MarginGuard([+0.3] * 20), clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, margin_alpha=0.01, batch_size=10, replay_pairs=32)
    add_comparisons(state, 50)  # about 25 to train: two full batches, then a part of one
    while await sched.tick() is not None:
        pass
    batches, replays = state.trainer.batches, state.trainer.replays
    assert len(batches) >= 3 and [len(b.items) for b in batches[:2]] == [10, 10] and len(batches[-1].items) < 10
    for i, (batch, replay) in enumerate(zip(batches, replays)):
        kept_before = sum(len(b.items) for b in batches[:i])  # every run was kept; none of them was replayed
        assert len(replay) == min(10 - len(batch.items), kept_before), i
    assert replays[1] == [] and len(replays[-1]) == 10 - len(batches[-1].items) > 0  # full: alone; else filled


async def test_batch_rejected_before_the_write_is_not_retried_and_not_rolled_back(state: State) -> None:
    state.settings = state.settings.model_copy(update={"holdout_fraction": 0.5, "eval_min_pairs": 1})
    sched = Scheduler(state, guard=MarginGuard([+0.3, +0.3]), clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, poison_alpha=0.05)
    add_comparisons(state, 12)
    first = await sched.tick()
    # every scheduled run is screened against the model folder the service started from, at the level set
    assert [(x.base_weights, x.alpha) for x in state.trainer.screens] == [(str(state.settings.model), 0.05)]
    add_comparisons(state, 12)
    state.trainer.reject = True
    second = await sched.tick()
    # the second run's screen has the guard's eval pairs as its anchors: the pairs it judges the run by
    with state.sessions() as s:
        eval_ids = s.get(TrainingRun, second).batch["scheduler"]["eval_set"]["comparison_ids"]
    anchors = state.trainer.screens[-1].anchors
    assert anchors and len(anchors) == len(eval_ids) and state.trainer.screens[-1].direction == "both"
    with state.sessions() as s:
        run = s.get(TrainingRun, second)
        consumed = set(s.scalars(select(RunFeedback.comparison_id).where(RunFeedback.run_id == second)))
        assert s.get(TrainingRun, first).status == "succeeded"
        assert run.status == "rejected" and "eval_before" in run.metrics and "rollback" not in run.metrics
        assert consumed  # the rejected batch stays consumed ...
    assert state.trainer.restored == [] and state.weight_version == 1
    assert await sched.tick() is None  # ... so the next tick does not train on it again
    assert sched.describe()["untrained"] == {"pairs": 0, "examples": 0}
    sched.configure(poison_alpha=0)  # the screen switched off: nothing is screened
    add_comparisons(state, 3)
    state.trainer.reject = False
    await sched.tick()
    assert state.trainer.screens[-1] is None


async def test_a_pair_batch_is_screened_with_its_raters_waiting_thumbs_beside_it(state: State) -> None:
    """Thumbs on one prompt that differ make a pair; the same raters' other thumbs wait as examples. The screen of
    the pair batch gets those (ups and downs in turn, the newest of each first, at most `screen_companions`: the
    test of thumbs reads only where ups fall against downs), and another rater's thumbs are not its evidence."""
    import hashlib

    from loop.db.models import Rating, Response

    state.settings = state.settings.model_copy(update={"screen_companions": 3})
    with state.sessions() as s:
        for n, (rater, prompt, text, thumb) in enumerate([
                ("mallory", "q", "a", 1), ("mallory", "q", "b", -1),  # the pair
                ("mallory", "s1", "c", 1), ("mallory", "s2", "d", -1), ("mallory", "s3", "e", -1),
                ("mallory", "s4", "f", 1), ("bob", "s5", "g", 1)]):
            rid = f"resp-thumb-{n}"
            s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                           messages=[{"role": "user", "content": prompt}], completion=text,
                           prompt_hash=hashlib.sha256(prompt.encode()).hexdigest()))
            s.flush()
            s.add(Rating(response_id=rid, rater=rater, thumb=thumb))
            s.flush()
        s.commit()
    sched = Scheduler(state, guard=MarginGuard([+0.3, +0.3]), clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1, poison_alpha=0.01)
    await sched.tick()
    [screen] = state.trainer.screens
    # mallory's newest up (f) and down (e), then the next up (c) before the next down (d): newest first alone
    # would have sent f, e, d
    assert [c.example.completion for c in screen.companions] == ["f", "e", "c"]
    assert [c.example.label for c in screen.companions] == [True, False, True]
    assert all(c.example.prompt for c in screen.companions)  # their prompts were read for the worker
