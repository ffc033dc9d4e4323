"""Shared by the scheduler tests: a fake clock, a fake trainer that books runs like loop.training.Trainer, a
scripted guard, a minimal state over a real SQLite file, and a helper to seed A/B comparisons."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from loop.config import Settings
from loop.db.models import Comparison, Response, RunFeedback, TrainingRun, WeightVersion
from loop.db.session import make_engine, make_sessionmaker, migrate
from loop.scheduler.guard import EvalFigures


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


class FakeHandle:
    """loop.training.RunHandle's interface: the id, and the final status once the run ended."""

    def __init__(self, state: "State", run_id: int, done: "asyncio.Future[None]") -> None:
        self.state, self.id, self._done = state, run_id, done

    async def finished(self, timeout: float | None = None) -> str:
        await asyncio.wait_for(asyncio.shield(self._done), timeout)
        with self.state.sessions() as s:
            return s.get(TrainingRun, self.id).status


class FakeTrainer:
    """Records the run and its feedback like loop.training.Trainer, and 'applies' by adding a version."""

    def __init__(self, state: "State") -> None:
        self.state = state
        self.busy = False
        self.requests: list[Any] = []
        self.batches: list[Any] = []  # the Batch the scheduler built, handed over with each request
        self.restored: list[int] = []
        self.checkpoints = 0
        self.fail = False
        self.reject = False  # the screen holds the whole batch back (it pulls against what was learned)
        self.screens: list[Any] = []  # the ScreenPolicy (or None) each run was given
        self.replays: list[list[Any]] = []  # the kept pairs each run was given to train again

    async def run(self, request: Any, *, batch: Any = None, trigger: str = "manual", screen: Any = None,
                  replay: Any = ()) -> "FakeHandle":
        self.requests.append(request)
        self.replays.append(list(replay))
        self.batches.append(batch)
        self.screens.append(screen)
        with self.state.sessions() as s:
            run = TrainingRun(status="running", trigger=trigger, objective=request.objective,
                              version_before=self.state.weight_version, batch={"n": len(batch.items) if batch else len(request.pairs)})
            s.add(run)
            s.flush()
            s.add_all([RunFeedback(run_id=run.id, comparison_id=c) for c in request.comparison_ids])
            s.add_all([RunFeedback(run_id=run.id, rating_id=r) for r in request.rating_ids])
            s.commit()
            run_id = run.id
        done = asyncio.get_running_loop().create_future()

        def finish() -> None:
            self._finish(run_id)
            done.set_result(None)

        asyncio.get_running_loop().call_soon(finish)
        return FakeHandle(self.state, run_id, done)

    def _finish(self, run_id: int) -> None:
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            if self.fail:
                run.status, run.version_after = "failed", run.version_before
                s.query(RunFeedback).filter(RunFeedback.run_id == run_id).delete()
            elif self.reject and self.screens[-1] is not None:
                run.status, run.version_after = "rejected", run.version_before  # feedback stays consumed
                run.error = "the batch: 12 of 12 items pull the model back from what the kept runs taught"
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

    async def measure(self, pairs: list[Any], before: EvalFigures | None = None) -> EvalFigures:
        self.calls.append(len(pairs))
        acc, ppl = self.figures.pop(0) if self.figures else (None, 10.0)
        # as if 10 held-out pairs were measured (enough for the accuracy criterion)
        return EvalFigures(accuracy=acc, n_pairs=10, mean_margin=None, canary_perplexity=ppl,
                           canary_tokens=100, ms=1.0)


@dataclass
class State:
    settings: Settings
    sessions: sessionmaker[Session]
    weight_version: int = 0
    trainer: Any = None
    supervisor: Any = None
    vllm: Any = None


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    url = f"sqlite:///{tmp_path / 'loop.db'}"
    migrate(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        s.add(WeightVersion(version=0, kind="initial"))
        s.commit()
    base = tmp_path / "base-model"  # the model folder the scheduler hands to the worker's direction check
    base.mkdir()
    (base / "config.json").write_text("{}")
    settings = Settings(data_dir=tmp_path, scheduler_interval_s=60, scheduler_min_pairs=3, scheduler_max_wait_s=3600,
                        holdout_fraction=0.0, admin_token="x" * 32, model=str(base))
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
