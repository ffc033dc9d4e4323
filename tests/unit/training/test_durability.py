"""Durable learning (loop/durability.py): what is kept across a crash or a restart, and what goes back to the queue.

With the fake worker over real ZMQ and a real SQLite file (tests/unit/training_support.py). Specifies: every kept
version is made durable in the background without pausing vLLM; after vLLM reloads an older version from disk,
the versions since are `lost`, their runs are `lost` and their feedback is trainable again; a run whose vLLM died
before its version was served is not `succeeded`; a clean stop makes the live version durable first; version 0
is always restorable from the base model folder; a restore and a run never interleave.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from sqlalchemy import select

from loop.errors import Conflict
from loop.db.models import RunFeedback, TrainingRun, WeightVersion
from loop.training.versions import lineage, reconcile
from loop.training import TrainRequest
from loop.worker import protocol as p
from tests.unit.training_support import PAIR, FakeSupervisor, add_pair, finish, make, stop


async def until(predicate, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def checkpoint_of(state, version: int) -> str | None:  # noqa: ANN001
    with state.sessions() as s:
        row = s.get(WeightVersion, version)
        return row.checkpoint_path if row is not None else None


def consumed(state, comparison_id: int) -> bool:  # noqa: ANN001
    with state.sessions() as s:
        return s.scalar(select(RunFeedback.id).where(RunFeedback.comparison_id == comparison_id)) is not None


def base_folder(tmp_path: Path) -> Path:
    """A model folder the fake worker can restore from (its "weights" are the version counter)."""
    base = tmp_path / "base-model"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (base / "model.safetensors").write_text("v0")
    return base


async def test_every_kept_version_becomes_durable_in_the_background_without_a_pause(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "succeeded" and run.version_after == 1
        await until(lambda: checkpoint_of(state, 1) is not None)
        assert Path(checkpoint_of(state, 1), "model.safetensors").read_text() == "v1"
        assert vllm.calls == ["pause:keep", "reset", "resume@v1"]  # the write added no pause
        assert trainer.live_is_durable() and trainer.describe()["durability"]["live_durable"]
    finally:
        await stop(state)


async def test_policy_zero_writes_nothing_until_a_clean_stop(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, checkpoint_every=0)
    try:
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        await asyncio.sleep(0.3)
        assert checkpoint_of(state, 1) is None and not trainer.live_is_durable()
        await trainer.stop()  # SIGTERM's path: the live version is written before vLLM goes
        assert Path(checkpoint_of(state, 1), "model.safetensors").read_text() == "v1"
    finally:
        await stop(state)


async def test_a_reload_from_disk_loses_what_was_not_durable_and_requeues_its_feedback(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, checkpoint_every=0)
    try:
        first, second, third = add_pair(state), add_pair(state), add_pair(state)
        await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[first])))
        _, durable_path = await trainer.checkpoint()  # version 1 is on disk
        for cid in (second, third):  # versions 2 and 3 live only in vLLM's memory
            assert (await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[cid])))).status == "succeeded"
        assert all(consumed(state, c) for c in (first, second, third))

        supervisor = FakeSupervisor()  # vLLM crashed and came back from the newest checkpoint
        supervisor.model_path, supervisor.exit_reason = durable_path, "killed by SIGKILL"
        state.supervisor = supervisor
        await trainer.recovery.vllm_ready()

        with state.sessions() as s:
            versions = {v.version: v for v in s.scalars(select(WeightVersion))}
            runs = {r.id: r for r in s.scalars(select(TrainingRun))}
        assert [versions[v].status for v in (2, 3)] == ["lost", "lost"]
        assert "killed by SIGKILL" in versions[2].note
        assert (versions[4].kind, versions[4].parent_version, versions[4].status) == ("restore", 1, "live")
        assert state.weight_version == 4
        assert [runs[i].status for i in (1, 2, 3)] == ["succeeded", "lost", "lost"]
        assert "back in the queue" in runs[2].error
        assert consumed(state, first) and not consumed(state, second) and not consumed(state, third)
        # and the released feedback trains again, once
        again = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[second, third])))
        assert again.status == "succeeded" and consumed(state, second)
    finally:
        state.supervisor = None
        await stop(state)


async def test_reconcile_follows_the_lineage_through_a_rollback(tmp_path: Path) -> None:
    trainer, state, _ = await make(tmp_path, checkpoint_every=0)
    try:
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))  # v1
        await trainer.checkpoint()
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))  # v2
        await trainer.restore(1)  # v3 = v1 again (a rollback: v2's run stays as the operator left it)
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))  # v4, trained from v3
        with state.sessions() as s:
            assert lineage(s, 4) == {4, 3, 1, 0}
        result = await asyncio.to_thread(reconcile, state.sessions, 3, "test reload")
        assert result.lost_versions == [4] and result.lost_runs == [3]
        with state.sessions() as s:
            assert s.get(WeightVersion, 2).status == "superseded"  # older than the served one: left alone
    finally:
        await stop(state)


async def test_a_run_whose_vllm_died_before_serving_is_lost_not_succeeded(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, checkpoint_every=0)
    try:
        cid = add_pair(state)
        orig_resume = vllm.resume

        async def resume_then_die() -> None:
            await orig_resume()
            vllm.dead = True  # the engine died right after the write

        vllm.resume = resume_then_die
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[cid])))
        assert run.status == "lost" and "never served" in run.error
        with state.sessions() as s:
            assert s.get(WeightVersion, 1).status == "lost"
        assert not consumed(state, cid)
    finally:
        vllm.dead = False
        await stop(state)


async def test_version_zero_is_restorable_from_the_base_folder_after_pruning(tmp_path: Path) -> None:
    base = base_folder(tmp_path)
    trainer, state, vllm = await make(tmp_path, model=str(base), keep_checkpoints=1)
    try:
        for _ in range(3):
            await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        await until(lambda: checkpoint_of(state, 3) is not None)
        assert checkpoint_of(state, 0) is None
        assert await trainer.restore(0) == 4
        assert checkpoint_of(state, 4) == str(base)
        status = await state.worker.call(p.Ping(checksum=True), 5)
        assert status.checksum == "v0"
    finally:
        await stop(state)


async def test_a_run_and_a_restore_never_interleave(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        await until(lambda: checkpoint_of(state, 1) is not None)
        run_id = await trainer.run(TrainRequest(pairs=[PAIR], steps=3))
        with pytest.raises(Conflict, match="in progress"):
            await trainer.restore(1)
        await finish(trainer, run_id)
        async with state.weights_lock:  # hold the weights so the restore waits inside its critical section
            restoring = asyncio.create_task(trainer.restore(1))
            await asyncio.sleep(0.1)
            with pytest.raises(Conflict, match="being restored"):
                await trainer.run(TrainRequest(pairs=[PAIR]))
        assert await restoring == state.weight_version
    finally:
        await stop(state)


async def test_a_stop_during_a_background_write_lets_it_finish_instead_of_colliding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER_CHECKPOINT_S", "1.0")
    trainer, state, _ = await make(tmp_path)
    try:
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        await until(lambda: trainer.durability.writing)
        await trainer.stop()  # SIGTERM while version 1 is being written
        assert trainer.live_is_durable() and trainer.durability.last_error is None
        assert Path(checkpoint_of(state, 1), "model.safetensors").read_text() == "v1"
    finally:
        await stop(state)
