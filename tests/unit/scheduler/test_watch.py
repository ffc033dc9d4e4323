"""The base watch (loop/scheduler/watch.py): base figures measured once on the base weights and kept in a file, the
live weights' drift and generation health after a run, and what the scheduler does with the verdict — a degenerate
run is rolled back; a run past the drift budget is rolled back and training pauses, saying why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.unit.scheduler.test_health import FakeVLLM
from tests.unit.scheduler.test_scheduler import MarginGuard
from tests.unit.scheduler_support import Clock, State, add_comparisons, state  # noqa: F401 - fixture

from loop.db.models import TrainingRun
from loop.scheduler.health import Answer, DriftLimits, HealthLimits, HealthProbe
from loop.scheduler.scheduler import Scheduler
from loop.scheduler.watch import FIGURES_FILE, BaseWatch, Verdict

MODEL = "/models/base"
GOOD = [Answer("Paris is the capital of France.", 8, "stop"), Answer("Bees make honey from nectar.", 7, "stop"),
        Answer("Seven plus five is twelve.", 6, "stop"), Answer("Water freezes at zero degrees.", 6, "stop")]
STUTTER = [Answer("1. **1. **1. **1. **1.", 12, "stop")] * 4


class SmallTokenizer:
    """Characters as ids inside FakeVLLM's vocabulary of 16."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 16 for c in text[:40]]}


def watch(tmp_path: Path, vllm: FakeVLLM, model: str = MODEL) -> BaseWatch:
    return BaseWatch(vllm, SmallTokenizer(), data_dir=tmp_path, model=model,
                     probe=HealthProbe(vllm, prompts=[[{"role": "user", "content": f"q{i}"}] for i in range(4)]))


async def test_base_figures_are_measured_on_the_base_once_and_kept_in_a_file(tmp_path: Path) -> None:
    vllm = FakeVLLM(answers=GOOD)
    w = watch(tmp_path, vllm)
    await w.ensure_base(live_is_base=True)
    assert w.ready and w.note == "" and (tmp_path / FIGURES_FILE).is_file()
    sent = len(vllm.bodies)
    again = watch(tmp_path, vllm)  # a restart: read back, nothing measured, even on other weights
    await again.ensure_base(live_is_base=False)
    assert again.ready and len(vllm.bodies) == sent
    figures = await again.measure()
    assert figures is not None and figures["drift"]["kl_per_token"] == pytest.approx(0.0, abs=1e-12)
    assert figures["health"]["stutter_rate"] == 0.0 and figures["health"]["base"]["stutter_rate"] == 0.0
    assert again.verdict(figures, DriftLimits(), HealthLimits()) == Verdict()


async def test_no_base_figures_on_other_weights_judges_nothing_and_says_why(tmp_path: Path) -> None:
    vllm = FakeVLLM(answers=GOOD)
    w = watch(tmp_path, vllm)
    await w.ensure_base(live_is_base=False)
    assert not w.ready and "started from other weights" in w.note and vllm.bodies == []
    assert await w.measure() is None and w.verdict(None, DriftLimits(), HealthLimits()).reason is None


async def test_figures_of_another_base_are_not_used_and_are_measured_again_on_the_base(tmp_path: Path) -> None:
    vllm = FakeVLLM(answers=GOOD)
    await watch(tmp_path, vllm, model="/models/old").ensure_base(live_is_base=True)
    w = watch(tmp_path, vllm)
    await w.ensure_base(live_is_base=False)
    assert not w.ready and "cannot be used" in w.note and "/models/old" in w.note
    await w.ensure_base(live_is_base=True)
    assert w.ready and json.loads((tmp_path / FIGURES_FILE).read_text())["drift"]["model"] == MODEL


async def test_figures_taken_while_the_weights_changed_are_thrown_away(tmp_path: Path) -> None:
    w = watch(tmp_path, FakeVLLM(answers=GOOD))
    await w.ensure_base(live_is_base=True, still_base=lambda: False)  # a run wrote while the probes ran
    assert not w.ready and "weights changed" in w.note and not (tmp_path / FIGURES_FILE).exists()


async def test_a_corrupt_file_is_reported_not_fatal(tmp_path: Path) -> None:
    (tmp_path / FIGURES_FILE).write_text("{not json")
    w = watch(tmp_path, FakeVLLM(answers=GOOD))
    await w.ensure_base(live_is_base=False)
    assert not w.ready and "cannot be used" in w.note


async def test_drift_and_degeneration_past_the_limits_are_named(tmp_path: Path) -> None:
    vllm = FakeVLLM(answers=GOOD)
    w = watch(tmp_path, vllm)
    await w.ensure_base(live_is_base=True)
    vllm.shift = lambda tok: 3.0 if tok == 5 else 0.0  # the live weights moved far from the base
    vllm.answers = STUTTER
    figures = await w.measure()
    found = w.verdict(figures, DriftLimits(max_kl_per_token=0.01), HealthLimits())
    assert found.drift and "drifted from the base model" in found.drift
    assert found.health and "stutter" in found.health and "open with" in found.health
    assert w.verdict(figures, None, HealthLimits()).drift is None  # drift not judged when off
    assert w.verdict(figures, DriftLimits(max_kl_per_token=10, max_perplexity_vs_base=100), None).reason is None


class FakeWatch:
    """What the scheduler needs from BaseWatch, with the figures and verdict a test sets."""

    ready = True
    note = ""

    def __init__(self, verdicts: list[Verdict]) -> None:
        self.verdicts = list(verdicts)
        self.bases: list[bool] = []

    async def ensure_base(self, *, live_is_base: bool, still_base: Any = None) -> None:
        self.bases.append(live_is_base)

    async def measure(self) -> dict[str, Any]:
        return {"drift": {"kl_per_token": 0.5, "perplexity_vs_base": 0.01}, "health": {"stutter_rate": 0.0}}

    def verdict(self, figures: Any, drift: Any, health: Any) -> Verdict:
        return self.verdicts.pop(0)


async def test_the_scheduler_rolls_back_a_degenerate_run_and_pauses_past_the_drift_budget(state: State) -> None:
    w = FakeWatch([Verdict(), Verdict(health="60% of the canary answers stutter"),
                   Verdict(drift="KL(base || live) 0.5 > 0.2")])
    sched = Scheduler(state, guard=MarginGuard([+1.0, +1.0, +1.0]), watch=w, clock=Clock())  # type: ignore[arg-type]
    sched.configure(min_pairs=1)
    add_comparisons(state, 4)
    kept = await sched.tick()
    assert w.bases[0] is True  # the base figures are asked for while version 0 is served
    add_comparisons(state, 4)
    degenerate = await sched.tick()
    assert not sched.paused  # health: this run is undone, training goes on
    add_comparisons(state, 4)
    drifted = await sched.tick()
    with state.sessions() as s:
        assert s.get(TrainingRun, kept).status == "succeeded"
        assert s.get(TrainingRun, kept).metrics["eval_after"]["drift"]["kl_per_token"] == 0.5
        run = s.get(TrainingRun, degenerate)
        assert run.status == "rolled_back" and "stutter" in run.error
        run = s.get(TrainingRun, drifted)
        assert run.status == "rolled_back" and "KL" in run.error
    assert sched.paused and "training paused after run" in (sched.last_error or "")
    status = sched.describe()
    assert status["paused_by"] == "drift" and "KL" in status["paused_reason"]
    add_comparisons(state, 4)
    assert await sched.tick() is None  # paused: nothing trains until an operator resumes
    sched.resume()
    assert sched.describe()["paused_by"] is None and sched.describe()["paused_reason"] is None


async def test_the_base_figures_are_taken_at_start_up_while_version_0_is_served(state: State) -> None:
    w = FakeWatch([])
    sched = Scheduler(state, guard=MarginGuard([]), watch=w, clock=Clock())  # type: ignore[arg-type]
    state.weight_version = 0
    await sched._measure_base_early()
    assert w.bases == [True]
    state.weight_version = 3  # started from a later version: nothing to measure the base on
    await sched._measure_base_early()
    assert w.bases == [True]
