"""The scheduler's decisions (loop/scheduler/scheduler.py) with a fake trainer and a scripted guard, a real SQLite
file and a fake clock: triggers, pause/resume and the schedule across restarts, no overlap, automatic rollback."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loop.config import Settings
from loop.db.models import Comparison, Response, RunFeedback, TrainingRun, WeightVersion
from loop.db.session import make_engine, make_sessionmaker, migrate
from loop.scheduler.guard import EvalFigures
from loop.scheduler.scheduler import Scheduler


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class FakeTrainer:
    """Records the run and its feedback like loop.training.Trainer, and 'applies' by adding a version."""

    def __init__(self, state: "State") -> None:
        self.state = state
        self.busy = False
        self.requests: list[Any] = []
        self.restored: list[int] = []
        self.checkpoints = 0
        self.fail = False

    async def run(self, request: Any, *, trigger: str = "manual") -> int:
        self.requests.append(request)
        with self.state.sessions() as s:
            run = TrainingRun(status="running", trigger=trigger, objective=request.objective,
                              version_before=self.state.weight_version, batch={"n": len(request.pairs)})
            s.add(run)
            s.flush()
            s.add_all([RunFeedback(run_id=run.id, comparison_id=c) for c in request.comparison_ids])
            s.add_all([RunFeedback(run_id=run.id, rating_id=r) for r in request.rating_ids])
            s.commit()
            run_id = run.id
        asyncio.get_running_loop().call_soon(self._finish, run_id)
        return run_id

    def _finish(self, run_id: int) -> None:
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            if self.fail:
                run.status, run.version_after = "failed", run.version_before
                s.query(RunFeedback).filter(RunFeedback.run_id == run_id).delete()
            else:
                v = self._new_version(s, "train", run_id)
                run.status, run.version_after = "succeeded", v
            s.commit()

    def _new_version(self, s: Session, kind: str, run_id: int | None, path: str | None = None) -> int:
        v = self.state.weight_version + 1
        s.add(WeightVersion(version=v, kind=kind, parent_version=self.state.weight_version, run_id=run_id,
                            checkpoint_path=path))
        self.state.weight_version = v
        return v

    async def checkpoint(self) -> tuple[int, str]:
        self.checkpoints += 1
        with self.state.sessions() as s:
            s.get(WeightVersion, self.state.weight_version).checkpoint_path = f"/ckpt/v{self.state.weight_version}"
            s.commit()
        return self.state.weight_version, f"/ckpt/v{self.state.weight_version}"

    async def restore(self, version: int) -> int:
        self.restored.append(version)
        with self.state.sessions() as s:
            v = self._new_version(s, "restore", None, f"/ckpt/v{version}")
            s.commit()
        return v


class ScriptedGuard:
    """Returns the figures it is given, in order; remembers what it was asked to measure."""

    tokenizer = None

    def __init__(self, figures: list[tuple[float | None, float]]) -> None:
        self.figures = list(figures)
        self.calls: list[int] = []

    async def measure(self, pairs: list[Any]) -> EvalFigures:
        self.calls.append(len(pairs))
        acc, ppl = self.figures.pop(0) if self.figures else (None, 10.0)
        return EvalFigures(accuracy=acc, n_pairs=len(pairs), mean_margin=None, canary_perplexity=ppl,
                           canary_tokens=100, ms=1.0)


@dataclass
class State:
    settings: Settings
    sessions: sessionmaker[Session]
    weight_version: int = 0
    trainer: Any = None
    supervisor: Any = None
    vllm: Any = None
    extras: dict[str, Any] = field(default_factory=dict)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        s.add(WeightVersion(version=0, kind="initial"))
        s.commit()
    settings = Settings(data_dir=tmp_path, scheduler_interval_s=60, scheduler_min_pairs=3, scheduler_max_wait_s=3600,
                        holdout_fraction=0.0, admin_token="x" * 32)
    st = State(settings=settings, sessions=sessions)
    st.trainer = FakeTrainer(st)
    yield st
    engine.dispose()


_n = 0


def add_comparisons(state: State, k: int, winner: str = "a") -> list[int]:
    global _n
    ids = []
    with state.sessions() as s:
        for _ in range(k):
            _n += 1
            prompt = f"prompt {_n}"
            h = hashlib.sha256(prompt.encode()).hexdigest()
            a, b = f"resp-{_n:030x}a", f"resp-{_n:030x}b"
            for rid, text in ((a, "yes"), (b, "no")):
                s.add(Response(id=rid, group_id=a, endpoint="chat", model="m", weight_version=0, request={},
                               messages=[{"role": "user", "content": prompt}], prompt_hash=h, completion=text))
            s.flush()
            c = Comparison(response_a_id=a, response_b_id=b, winner=winner)
            s.add(c)
            s.flush()
            ids.append(c.id)
        s.commit()
    return ids


def runs(state: State) -> list[TrainingRun]:
    with state.sessions() as s:
        return list(s.scalars(select(TrainingRun).order_by(TrainingRun.id)))


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
