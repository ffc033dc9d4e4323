"""The Trainer's protocol and bookkeeping, with a real SQLite file, real ZMQ and the fake worker process
(tests/unit/fake_worker.py) — only vLLM is a fake here (it records pause / reset / resume).

Specifies: pause → apply → reset → version bump → resume, in that order, resume even when a step in between
fails; a refused update never pauses vLLM, leaves the version alone and releases the feedback; feedback is never
trained on twice; hogwild skips the pause; checkpoint/restore record versions; bad requests map to 404/409/422.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select

from loop.errors import Conflict, LoopError, NotFound, Unavailable
from loop.db.models import Comparison, Quarantine, Rating, Response, RunFeedback, WeightVersion
from loop.training import TrainRequest, quarantine
from loop.training.runs import ScreenPolicy
from loop.worker import protocol as p
from tests.unit.training_support import PAIR, FakeSupervisor, add_comparison, add_pair, finish, make, stop


async def test_atomic_apply_order_and_versions(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        handle = await trainer.run(TrainRequest(pairs=[PAIR], steps=2))
        run_id = handle.id
        with pytest.raises(Conflict, match="still in progress"):
            await trainer.run(TrainRequest(pairs=[PAIR]))
        run = await finish(trainer, handle)
        assert run.status == "succeeded" and (run.version_before, run.version_after) == (0, 2)
        assert vllm.calls == ["pause:keep", "reset", "resume@v1", "pause:keep", "reset", "resume@v2"]
        assert {"pause_ms", "apply_ms", "reset_ms", "resume_ms", "total_ms"} <= set(run.metrics)
        with state.sessions() as s:
            rows = s.scalars(select(WeightVersion).order_by(WeightVersion.version)).all()
        assert [(v.version, v.kind, v.parent_version, v.run_id, v.status) for v in rows] == [
            (0, "initial", None, None, "superseded"), (1, "train", 0, run_id, "superseded"),
            (2, "train", 1, run_id, "live")]
        assert state.weight_version == 2
        assert trainer.describe()["state"] == "idle" and trainer.describe()["losses"] == [0.5, 0.5]
    finally:
        await stop(state)


async def test_a_runs_parameters_reach_the_worker_and_its_record(tmp_path: Path) -> None:
    trainer, state, _ = await make(tmp_path, nll_weight=0.5, learning_rate=3e-6)
    try:
        defaults = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        chosen = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR], nll_weight=0.0, beta=0.2)))
        # what the worker was sent (the fake worker echoes it) and what the run's record says it trained with
        assert (defaults.metrics["nll_weight"], defaults.metrics["lr"], defaults.metrics["beta"]) == (0.5, 3e-6, 0.1)
        assert (defaults.batch["nll_weight"], defaults.batch["learning_rate"]) == (0.5, 3e-6)
        assert (chosen.metrics["nll_weight"], chosen.metrics["beta"]) == (0.0, 0.2)
        assert (chosen.batch["nll_weight"], chosen.batch["beta"]) == (0.0, 0.2)
    finally:
        await stop(state)


async def test_replayed_pairs_train_beside_the_batch_without_being_consumed_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A scheduled run's replay (pairs kept runs learned from) reaches the worker with the batch and is recorded
    on the run, but its feedback stays its own runs': it is not consumed again (that would conflict) nor released."""
    from loop.pairs import Item

    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_WORKER_RECORD", str(record))
    trainer, state, _ = await make(tmp_path)
    try:
        old = add_pair(state)
        first = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[old])))
        replay = [Item(data=p.Pair(prompt="3+3?", chosen="six, again", rejected="7"), comparison_ids=(old,))]
        new = add_pair(state)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[new]), replay=replay))
        assert (first.status, run.status) == ("succeeded", "succeeded")
        assert "'six, again'" in record.read_text().splitlines()[-1]  # trained in the same step as the batch
        assert run.batch["replay"] == {"n_pairs": 1, "rating_ids": [], "comparison_ids": [old]}
        assert run.batch["comparison_ids"] == [new]
        with state.sessions() as s:
            owners = {f.comparison_id: f.run_id for f in s.scalars(select(RunFeedback))}
        assert owners == {old: first.id, new: run.id}
        # a KTO run has no pairs to replay beside: nothing is added or recorded
        kto = await finish(trainer, await trainer.run(
            TrainRequest(examples=[{"prompt": "q", "completion": "a", "label": True}]), replay=replay))
        assert "replay" not in kto.batch and "six, again" not in record.read_text().splitlines()[-1]
    finally:
        await stop(state)


async def test_a_change_tells_serving_which_version_made_what_arrives(tmp_path: Path) -> None:
    """While the weights change, tokens reaching loop were made before vLLM paused: the serving version stays the
    old one even once the record says the new one, and becomes the new one when the change ends (even a failed one)."""
    from loop.training.weights import LiveWeights

    _trainer, state, vllm = await make(tmp_path, pause_mode="wait")
    try:
        live = LiveWeights(state)
        seen: list[tuple[int, int]] = []

        async def work(t: dict[str, float]) -> bool:
            seen.append((state.weight_version, state.serving_version()))
            state.weight_version += 1  # what recording the new version does
            seen.append((state.weight_version, state.serving_version()))
            return True

        await live.change(work, atomic=True)
        assert seen == [(0, 0), (1, 0)] and vllm.calls == ["pause:wait", "reset", "resume@v1"]
        assert state.serving_version() == 1 and state.changes_done == 1

        async def broken(t: dict[str, float]) -> bool:
            raise RuntimeError("the apply failed")

        with pytest.raises(RuntimeError):
            await live.change(broken, atomic=True)
        assert state.changing_from is None and state.serving_version() == 1 and state.changes_done == 2

        async def torn(t: dict[str, float]) -> bool:
            live.hold("half written", "load-1")
            return False

        await live.change(torn, atomic=True)  # held: vLLM stays paused, serving has not moved on
        assert state.changing_from == 1 and state.changes_done == 2
        live.release()  # e.g. vLLM reloaded from disk
        assert state.changing_from is None and state.changes_done == 3
    finally:
        await stop(state)


async def test_refused_update_keeps_version_and_releases_feedback_never_twice(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        cid = add_comparison(state)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[cid], debug_inject_nan=True)))
        assert run.status == "refused" and run.error == "nan" and run.version_after == 0
        assert vllm.calls == []  # a known-bad update never pauses serving
        assert state.weight_version == 0 and "refused" in (trainer.describe()["last_error"] or "")
        with state.sessions() as s:
            assert s.scalars(select(RunFeedback)).all() == []
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=[cid])))
        assert run.status == "succeeded" and run.batch["comparison_ids"] == [cid] and run.objective == "dpo"
        with state.sessions() as s:
            assert [(f.run_id, f.comparison_id) for f in s.scalars(select(RunFeedback))] == [(run.id, cid)]
        with pytest.raises(Conflict, match="already trained on"):
            await trainer.run(TrainRequest(comparison_ids=[cid]))
        with pytest.raises(NotFound, match="unknown feedback"):
            await trainer.run(TrainRequest(comparison_ids=[cid + 100]))
        with pytest.raises(LoopError, match="KTO needs examples"):
            await trainer.run(TrainRequest(pairs=[PAIR], objective="kto"))
    finally:
        await stop(state)


def add_rated(state, rater: str, chosen: str, n: int) -> list[int]:  # noqa: ANN001
    """n A/B comparisons by `rater`, each preferring `chosen` over "5" (a prompt of its own each)."""
    ids = []
    with state.sessions() as s:
        for _ in range(n):
            rids = [f"resp-{uuid.uuid4().hex}" for _ in range(2)]
            prompt = uuid.uuid4().hex
            for rid, text in zip(rids, (chosen, "5")):
                s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                               messages=[{"role": "user", "content": prompt}], prompt_hash=prompt * 2,
                               completion=text))
            s.flush()
            c = Comparison(response_a_id=rids[0], response_b_id=rids[1], winner="a", rater=rater)
            s.add(c)
            s.flush()
            ids.append(c.id)
        s.commit()
    return ids


async def test_a_batch_that_pulls_back_what_was_learned_is_quarantined_not_trained(tmp_path: Path) -> None:
    """One rater, every item against the learned direction: p = 2^-8 < 0.01 — nothing trained, serving never
    paused, the feedback held (consumed) in quarantine with the evidence, and a later failure releases nothing."""
    trainer, state, vllm = await make(tmp_path)
    try:
        ids = add_rated(state, "mallory", "poison", 8)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=ids),
                                                      screen=ScreenPolicy("/m/base", 0.01)))
        assert run.status == "rejected" and "8 of 8 items pull the model back" in (run.error or "")
        assert vllm.calls == [] and state.weight_version == 0
        screen = run.metrics["screen"]
        assert screen["p_value"] == pytest.approx(1 / 256) and screen["quarantined"] == 8 and screen["n"] == 8
        assert screen["groups"]["mallory"]["down"] == 8
        with state.sessions() as s:
            [q] = s.scalars(select(Quarantine)).all()
            assert (q.run_id, q.scope, q.state, sorted(q.comparison_ids)) == (run.id, "batch", "held", sorted(ids))
            assert len(q.evidence["items"]) == 8 and q.evidence["p_value"] < 0.01
            assert sorted(f.comparison_id for f in s.scalars(select(RunFeedback))) == sorted(ids)
            quarantine.release(s, run.id)  # what a failed or lost run does: held feedback is not released
            s.commit()
            assert len(s.scalars(select(RunFeedback)).all()) == 8
    finally:
        await stop(state)


async def test_a_hostile_rater_is_held_back_and_the_honest_one_trains(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record"
    monkeypatch.setenv("FAKE_WORKER_RECORD", str(record))
    trainer, state, vllm = await make(tmp_path)
    try:
        honest = add_rated(state, "alice", "4", 10)
        hostile = add_rated(state, "mallory", "poison", 10)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=honest + hostile),
                                                      screen=ScreenPolicy("/m/base", 0.01)))
        assert run.status == "succeeded" and run.version_after == 1
        assert record.read_text().count("poison") == 0 and "'4'" in record.read_text()  # only alice's trained
        screen = run.metrics["screen"]
        assert screen["quarantined"] == 10 and screen["groups"]["alice"]["p_value"] == 1.0
        with state.sessions() as s:
            [q] = s.scalars(select(Quarantine)).all()
            assert q.scope == "rater:mallory" and sorted(q.comparison_ids) == sorted(hostile)
            # everything stays consumed by the run: alice's was trained, mallory's is held
            assert len(s.scalars(select(RunFeedback)).all()) == 20
    finally:
        await stop(state)


def add_thumbs(state, rater: str, thumbs: list[tuple[str, int]], prompt: str | None = None) -> list[int]:  # noqa: ANN001
    """Thumbs by `rater` on new answers (text, +1/-1), all to one prompt when `prompt` is given (they then make
    pairs where they differ), else each to a prompt of its own (single examples); returns the rating ids."""
    ids = []
    with state.sessions() as s:
        for text, thumb in thumbs:
            rid, question = f"resp-{uuid.uuid4().hex}", prompt or uuid.uuid4().hex
            s.add(Response(id=rid, group_id=rid, endpoint="chat", model="m", weight_version=0, request={},
                           messages=[{"role": "user", "content": question}], prompt_hash=(question * 2)[:64],
                           completion=text))
            s.flush()
            r = Rating(response_id=rid, rater=rater, thumb=thumb)
            s.add(r)
            s.flush()
            ids.append(r.id)
        s.commit()
    return ids


async def test_flipped_thumbs_making_few_pairs_are_held_with_the_waiting_thumbs_screened_beside_them(
        tmp_path: Path) -> None:
    """Two pairs alone can never reach p < 0.01 (2^-2 is the least); the rater's ten waiting thumbs measured beside
    them (never trained by the run) give the test its power: the pairs and the thumbs are all quarantined and
    consumed, so no later KTO batch trains the flipped thumbs; re-queueing gives them all back. An honest rater's
    batch with the same shape trains, and its waiting thumbs stay waiting."""
    from loop.scheduler import batches

    trainer, state, vllm = await make(tmp_path)
    try:
        async def scheduled(rater: str, up: str, down: str):  # noqa: ANN202
            paired = [r for k in range(2) for r in add_thumbs(state, rater, [(f"{up} {k}", 1), (f"{down} {k}", -1)],
                                                               prompt=f"{rater} question {k}")]
            singles = add_thumbs(state, rater, [(f"{up} single {k}", 1) for k in range(5)]
                                 + [(f"{down} single {k}", -1) for k in range(5)])
            with state.sessions() as s:
                pool = batches.collect(s, holdout_fraction=0)
                batch = batches.build_batch(s, pool, limit=64)
                assert batch is not None and batch.objective == "dpo" and len(batch.items) == 2
                companions = batches.companions(s, pool, batch, limit=32)
            assert sorted(r for c in companions for r in c.rating_ids) == sorted(singles)
            handle = await trainer.run(TrainRequest(rating_ids=batch.rating_ids), batch=batch,
                                       screen=ScreenPolicy("/m/base", 0.01, tuple(companions)))
            return await finish(trainer, handle), paired, singles

        run, paired, singles = await scheduled("mallory", "poison", "fine")  # ups on what was unlearned
        assert run.status == "rejected" and vllm.calls == [] and state.weight_version == 0
        screen = run.metrics["screen"]
        assert screen["n"] == 12 and screen["companions"] == 10 and screen["quarantined"] == 12
        assert screen["p_value"] < 0.01 and sum(it["companion"] for it in screen["items"]) == 10
        with state.sessions() as s:
            [q] = s.scalars(select(Quarantine)).all()
            assert sorted(q.rating_ids) == sorted(paired + singles) and q.state == "held"
            consumed = {f.rating_id for f in s.scalars(select(RunFeedback))}
            assert consumed == set(paired + singles)
            assert batches.build_batch(s, batches.collect(s, holdout_fraction=0), limit=64) is None  # none waits
            quarantine.decide(s, q.id, "requeue", by="ops")
            back = batches.collect(s, holdout_fraction=0).train  # the pairs and every thumb as an example are back
            assert sorted(i.kind for i in back) == ["example"] * 14 + ["pair"] * 2
            assert s.scalars(select(RunFeedback)).all() == []
            s.execute(Rating.__table__.delete())  # the next case starts from nothing waiting
            s.commit()

        run, paired, singles = await scheduled("alice", "fine", "poison")
        assert run.status == "succeeded" and run.metrics["screen"]["quarantined"] == 0
        assert run.metrics["screen"]["p_value"] == 1.0
        with state.sessions() as s:
            consumed = {f.rating_id for f in s.scalars(select(RunFeedback))}
            assert consumed == set(paired)  # the thumbs screened beside the batch still wait
            pool = batches.collect(s, holdout_fraction=0)
            assert sorted(r for i in pool.train for r in i.rating_ids) == sorted(singles)
    finally:
        await stop(state)


async def test_before_anything_was_learned_the_anchors_direction_holds_a_poisoned_batch(tmp_path: Path) -> None:
    """No kept run yet (v = 0) but trusted anchor pairs: their gradient is the direction, and a batch against it
    is quarantined; the run records what each direction read."""
    trainer, state, _ = await make(tmp_path)
    try:
        ids = add_rated(state, "mallory", "poison", 8)
        anchors = (p.Pair(prompt="q", chosen="good", rejected="bad"),)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=ids),
                                                      screen=ScreenPolicy("/m/fresh", 0.01, anchors=anchors)))
        assert run.status == "rejected", (run.status, run.error)
        screen = run.metrics["screen"]
        assert screen["direction"] == "both" and screen["n_anchors"] == 1 and screen["quarantined"] == 8
        assert screen["note"] == "learned direction: nothing learned yet"
        by = screen["p_by_direction"]
        assert by["learned"] is None and by["anchors"] == by["both"] == pytest.approx(1 / 256)
    finally:
        await stop(state)


async def test_nothing_learned_yet_screens_nothing_and_trains(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        ids = add_rated(state, "mallory", "poison", 8)
        run = await finish(trainer, await trainer.run(TrainRequest(comparison_ids=ids),
                                                      screen=ScreenPolicy("/m/fresh", 0.01)))
        assert run.status == "succeeded" and run.metrics["screen"]["note"] == "nothing learned yet"
        assert run.metrics["screen"]["p_value"] is None
    finally:
        await stop(state)


async def test_resume_even_when_reset_fails(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path)
    try:
        vllm.fail_reset = True
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "failed" and "reset failed" in (run.error or "")
        assert vllm.calls[-1].startswith("resume")  # never left paused
        assert state.weight_version == 1  # the weights did change: the version says so
    finally:
        await stop(state)


async def test_hogwild_skips_the_pause(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, train_mode="hogwild")
    try:
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "succeeded" and vllm.calls == ["reset"]
    finally:
        await stop(state)


async def test_checkpoint_and_restore_make_versions(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, checkpoint_every=2)
    try:
        version, path = await trainer.checkpoint()
        assert version == 0 and Path(path).name == "v000000"
        assert await trainer.checkpoint() == (0, path)  # already there: not written twice
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR], steps=2)))
        assert run.status == "succeeded"
        await trainer.durability.idle(10)  # every 2nd version is written in the background (loop/durability.py)
        with state.sessions() as s:
            v1, v2 = s.get(WeightVersion, 1), s.get(WeightVersion, 2)
            assert v1.checkpoint_path is None and v2.checkpoint_path == str(tmp_path / "checkpoints" / "v000002")
        with pytest.raises(Conflict, match="no checkpoint"):
            await trainer.restore(1)
        with pytest.raises(NotFound, match="does not exist"):
            await trainer.restore(99)
        vllm.calls.clear()
        assert await trainer.restore(0) == 3
        assert vllm.calls == ["pause:keep", "reset", "resume@v3"]
        status = await state.worker.call(p.Ping(checksum=True), 5)
        assert status.checksum == "v0"  # the fake worker's "weights" are back at version 0
        with state.sessions() as s:
            v3 = s.get(WeightVersion, 3)
            assert (v3.kind, v3.parent_version, v3.checkpoint_path, v3.status) == ("restore", 0, path, "live")
    finally:
        await stop(state)


async def test_dead_worker_is_unavailable(tmp_path: Path) -> None:
    trainer, state, _ = await make(tmp_path)
    try:
        await state.worker.restart("test")
        with pytest.raises(Unavailable) as e:
            await trainer.run(TrainRequest(pairs=[PAIR]))
        assert e.value.code == "worker_unavailable" and "dead" in e.value.message
        await asyncio.wait_for(state.worker.wait_ready(30), 30)
    finally:
        await stop(state)


async def test_worker_dying_inside_apply_restores_the_newest_checkpoint_before_vllm_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_WORKER_DIE_IN_APPLY", "1")
    trainer, state, vllm = await make(tmp_path)
    try:
        _, path = await trainer.checkpoint()  # version 0
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "failed" and "died" in (run.error or ""), run.error
        # paused all along: the checkpoint went back in (and the prefix cache was reset after it) before vLLM
        # resumed; the first reset ran beside the apply that died
        assert vllm.calls == ["pause:keep", "reset", "reset", "resume@v1"]
        with state.sessions() as s:
            v = s.get(WeightVersion, 1)
            assert v is not None and v.kind == "restore" and v.parent_version == 0 and v.checkpoint_path == path
            assert "stopped while writing" in (v.note or "")
        assert trainer.held_paused is None and trainer.describe()["state"] == "idle"
    finally:
        await stop(state)


async def test_nothing_to_restore_from_restarts_vllm_or_holds_it_paused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loop.errors import Unavailable

    monkeypatch.setenv("FAKE_WORKER_DIE_IN_APPLY", "1")
    trainer, state, vllm = await make(tmp_path)  # no checkpoint; the fake's model folder has no weights file
    try:
        state.supervisor = FakeSupervisor()  # type: ignore[assignment]
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "failed" and len(state.supervisor.reloads) == 1  # type: ignore[attr-defined]
        assert "stopped while writing run" in state.supervisor.reloads[0]  # type: ignore[attr-defined]
        assert trainer.held_paused is None

        state.supervisor = None  # attached to someone else's vLLM (--vllm-url): nothing loop can restart
        await trainer.control.wait_ready(30)
        while not trainer.control.alive:
            await asyncio.sleep(0.1)
        vllm.calls.clear()
        run = await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
        assert run.status == "failed"
        assert vllm.calls == ["pause:keep", "reset"]  # never resumed on weights nobody knows
        st = trainer.describe()
        assert st["state"] == "held" and "kept paused" in st["held_paused"]
        with pytest.raises(Unavailable, match="kept paused"):
            await trainer.run(TrainRequest(pairs=[PAIR]))
        # vLLM restarted from disk by its owner: a worker attaches to the NEW load and the hold is released
        await trainer.control._on_hello(p.Hello(pid=1, load_id="reloaded", model_path="/fake"))  # noqa: SLF001
        assert trainer.held_paused is None and trainer.describe()["state"] != "held"
        assert state.changing_from is None and state.serving_version() == state.weight_version
    finally:
        await stop(state)


async def test_automatic_checkpoints_pruned_to_the_newest_requested_ones_kept(tmp_path: Path) -> None:
    trainer, state, vllm = await make(tmp_path, keep_checkpoints=2)
    try:
        _, pinned = await trainer.checkpoint(pinned=True)  # version 0, on request
        paths = {}
        for _ in range(4):  # versions 1..4, each checkpointed automatically (as the guard does)
            await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))
            paths[state.weight_version] = (await trainer.checkpoint())[1]
        with state.sessions() as s:
            kept = dict(s.execute(select(WeightVersion.version, WeightVersion.checkpoint_path)).all())
        assert kept == {0: pinned, 1: None, 2: None, 3: paths[3], 4: paths[4]}
        assert Path(pinned, "model.safetensors").is_file() and Path(paths[4], "model.safetensors").is_file()
        assert not Path(paths[1]).exists() and not Path(paths[2]).exists()
        with pytest.raises(Conflict, match="no checkpoint"):
            await trainer.restore(1)
        assert await trainer.restore(0) == 5  # the pinned one is still there to restore
    finally:
        await stop(state)


async def test_a_restarted_worker_is_given_the_newest_checkpoints_optimizer_state(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    record = tmp_path / "record.txt"
    monkeypatch.setenv("FAKE_WORKER_RECORD", str(record))
    trainer, state, vllm = await make(tmp_path)
    try:
        assert not record.exists()  # no checkpoint yet: nothing to give
        _, path = await trainer.checkpoint()
        await trainer.control.restart("test: a crashed worker")
        deadline = asyncio.get_running_loop().time() + 30
        while not (record.exists() and record.read_text()):
            assert asyncio.get_running_loop().time() < deadline, "the restarted worker got no optimizer state"
            await asyncio.sleep(0.1)
        assert record.read_text() == f"optimizer {path}\n"
    finally:
        await stop(state)


async def test_superseded_feedback_is_refused_with_the_reason(tmp_path: Path) -> None:
    trainer, state, _ = await make(tmp_path)
    try:
        old = add_comparison(state)
        with state.sessions() as s:  # the rater changed their verdict: a newer comparison replaces it
            s.get(Comparison, old).is_current = False
            s.commit()
        with pytest.raises(Conflict, match=f"comparisons \\[{old}\\] were replaced") as e:
            await trainer.run(TrainRequest(comparison_ids=[old]))
        assert e.value.code == "feedback_superseded"
    finally:
        await stop(state)


async def test_a_batch_the_scheduler_built_is_trained_as_built_and_its_feedback_checked_again(tmp_path: Path) -> None:
    from loop.scheduler import batches

    trainer, state, _ = await make(tmp_path)
    try:
        cid = add_comparison(state)
        with state.sessions() as s:
            built = batches.build_batch(s, batches.collect(s, holdout_fraction=0.0), limit=8)
        assert built is not None and built.comparison_ids == [cid]
        request = TrainRequest(objective=built.objective, comparison_ids=built.comparison_ids)
        run = await finish(trainer, await trainer.run(request, batch=built))
        assert run.status == "succeeded" and run.batch["n_pairs"] == 1 and run.batch["comparison_ids"] == [cid]
        with pytest.raises(Conflict, match="already trained on") as e:  # the same batch again: consumed meanwhile
            await trainer.run(request, batch=built)
        assert e.value.code == "feedback_consumed"
    finally:
        await stop(state)


async def test_after_a_restore_a_vllm_restart_loads_the_restored_weights_not_the_newest_folder(
        tmp_path: Path) -> None:
    """A rollback restores v1 after v2 was checkpointed: the supervisor must reload v1's folder if vLLM dies, or
    the undone (regressed) weights would come back and the rollback would be marked lost."""
    trainer, state, _ = await make(tmp_path)  # every kept version is checkpointed in the background
    supervisor = FakeSupervisor()
    state.supervisor = supervisor
    try:
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))  # v1
        await trainer.durability.idle(10)
        await finish(trainer, await trainer.run(TrainRequest(pairs=[PAIR])))  # v2
        await trainer.durability.idle(10)
        v1_path, v2_path = (str(tmp_path / "checkpoints" / f"v{v:06d}") for v in (1, 2))
        assert supervisor.model_path == v2_path
        assert await trainer.restore(1) == 3
        assert supervisor.model_path == v1_path  # the live version's weights
        await trainer.recovery.vllm_ready()  # vLLM restarted from model_path: it serves the live version
        with state.sessions() as s:
            live = s.get(WeightVersion, state.weight_version)
            assert (state.weight_version, live.status, live.checkpoint_path) == (3, "live", v1_path)
            assert s.get(WeightVersion, 2).status == "superseded"  # nothing marked lost
    finally:
        state.supervisor = None
        await stop(state)


async def test_lowmem_is_refused_with_tensor_parallel_at_start_and_per_run(tmp_path: Path) -> None:
    from loop.config import Settings
    from loop.errors import Invalid

    with pytest.raises(ValueError, match="lowmem is not available with tensor parallel"):
        Settings(data_dir=tmp_path, tensor_parallel=2, train_mode="lowmem")
    trainer, state, _ = await make(tmp_path, tensor_parallel=2)
    try:
        with pytest.raises(Invalid, match="lowmem is not available with tensor parallel") as e:
            await trainer.run(TrainRequest(pairs=[PAIR], train_mode="lowmem"))
        assert e.value.code == "lowmem_tensor_parallel" and trainer.describe()["state"] == "idle"
    finally:
        await stop(state)
