"""The scheduler's decisions (loop/scheduler/scheduler.py) with a fake trainer and a scripted guard, a real SQLite
file and a fake clock: triggers, pause/resume and the schedule across restarts, no overlap, automatic rollback."""

from __future__ import annotations

import pytest
from scheduler_support import Clock, ScriptedGuard, State, add_comparisons, runs, state  # noqa: F401 - fixture
from sqlalchemy import select

from loop.db.models import RunFeedback, TrainingRun, WeightVersion
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
    assert len(state.trainer.requests[0].pairs) == 3 and ids[0] in state.trainer.requests[0].comparison_ids
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
