"""Training runs, seen from the API process: bookkeeping in the database, the worker over ZMQ, vLLM paused for
exactly the apply.

`Trainer(state)` is created by `create_app` when the worker is enabled. One run at a time:
- `await run(request)` validates the batch, records a `TrainingRun` (status running, version_before) and the
  feedback it consumes in `run_feedback` (unique per feedback item: nothing is trained on twice) and starts the
  run as a background task; it returns the run id at once (the route answers 202).
- Each step: the worker computes a staged update (`Train`) while vLLM keeps serving; then, under
  `state.weights_lock`: `vllm.pause(mode="wait")` → worker `Apply` (finite + ratio check, in-place write) →
  `vllm.reset_prefix_cache()` → new `WeightVersion` row and `state.weight_version += 1` → `vllm.resume()`, the
  resume in a `finally` so vLLM is never left paused. The figures of each part land in the run's metrics.
  `settings.train_mode == "lowmem"` keeps it atomic with ~0.2x the memory: the worker only measures the update
  in `Train` and writes it in `Apply` by a second backward (loop/worker/lowmem.py), so the pause is longer.
  `settings.train_mode == "hogwild"` skips the pause. A refused update (NaN/inf/over the cap) ends the run as
  "refused": weights untouched, version unchanged, feedback released. A failed run releases its feedback too.
- `checkpoint()` writes the live weights as an HF folder (worker-side, atomic) and records the path on the
  version; every `settings.checkpoint_every` versions it happens by itself. A vLLM restart loads the newest one
  (`supervisor.model_path`), and the ready callback records which version vLLM now serves.
- `restore(v)` writes version v's checkpoint back into the live weights with the same pause protocol: a NEW
  version (kind "restore", parent v).
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import delete, select, update

from loop.api.errors import Conflict, LoopError, NotFound, Unavailable
from loop.api.state import LoopState
from loop.control import WorkerControl, WorkerTimeout, WorkerUnavailable
from loop.db.models import Comparison, Rating, RunFeedback, TrainingRun, WeightVersion
from loop.worker import protocol as p

log = logging.getLogger("loop.training")

TRAIN_TIMEOUT_S = 1800.0  # one step of forward + backward; CPU runs of long batches are slow
APPLY_TIMEOUT_S = 120.0
CHECKPOINT_TIMEOUT_S = 1800.0
TORN_WAIT_S = 300.0  # how long a torn apply waits for the worker to come back before restarting vLLM instead


class PairIn(BaseModel):
    prompt: str | list[dict[str, str]] = Field(..., description="plain text, or chat messages before the answer")
    chosen: str = Field(..., min_length=1)
    rejected: str = Field(..., min_length=1)


class ExampleIn(BaseModel):
    prompt: str | list[dict[str, str]]
    completion: str = Field(..., min_length=1)
    label: bool


class TrainRequest(BaseModel):
    """Body of POST /api/train; the scheduler builds the same object."""

    pairs: list[PairIn] = Field(default_factory=list)
    examples: list[ExampleIn] = Field(default_factory=list)
    rating_ids: list[int] = Field(default_factory=list, description="feedback to train on (KTO examples or pairs)")
    comparison_ids: list[int] = Field(default_factory=list, description="A/B picks to train on (DPO pairs)")
    steps: int = Field(1, ge=1, le=100)
    learning_rate: float | None = Field(None, gt=0, le=1.0)
    beta: float | None = Field(None, gt=0)
    objective: Literal["dpo", "kto"] | None = None
    max_len: int = Field(1024, ge=16, le=32768)
    train_mode: Literal["atomic", "lowmem", "hogwild"] | None = Field(
        None, description="how this run's updates are written (default: LOOP_TRAIN_MODE): atomic stages them and "
        "pauses vLLM for a copy; lowmem pauses vLLM for a second backward pass instead (~0.2x the weight bytes "
        "extra rather than 1x); hogwild writes without a pause")
    debug_inject_nan: bool = Field(False, description="testing only: poison the update to see it refused")
    feedback_inline: bool = Field(False, description="the inline pairs/examples ARE the given feedback ids (the "
                                  "scheduler's built batch): record the ids as consumed, derive nothing from them")

    @model_validator(mode="after")
    def _not_empty(self) -> "TrainRequest":
        if not (self.pairs or self.examples or self.rating_ids or self.comparison_ids):
            raise ValueError("the batch is empty: send pairs, examples, rating_ids or comparison_ids")
        return self


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Trainer:
    def __init__(self, state: LoopState, control: WorkerControl | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.control: WorkerControl = control or state.worker
        self.run_id: int | None = None
        self.phase = "idle"  # idle | training | applying | checkpointing | restoring
        self.step = 0
        self.losses: list[float] = []
        self.metrics: dict[str, Any] = {}
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._loaded_path: str | None = None  # the folder vLLM loaded (a checkpoint, or the base model)
        self.held_paused: str | None = None  # why vLLM is kept paused (weights unknown, nothing to restore from)
        self.control.on_progress.append(self._on_progress)

    # ------------------------------------------------------------ lifecycle

    def prepare_supervisor(self, supervisor: Any) -> None:
        """Before vLLM starts: load the newest checkpoint, and learn about every (re)start."""
        newest = self._newest_checkpoint()
        if newest is not None:
            supervisor.model_path = newest[1]
            log.info("vLLM will load the newest checkpoint, version %d: %s", *newest)
        supervisor.add_ready_callback(self._on_vllm_ready)

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass

    async def wait(self, timeout: float | None = None) -> None:
        """Wait for the current run (if any) to end."""
        if self._task is not None:
            await asyncio.wait_for(asyncio.shield(self._task), timeout)

    @property
    def busy(self) -> bool:
        return self._task is not None and not self._task.done()

    def describe(self) -> dict[str, Any]:
        worker = self.control.describe()
        if worker["state"] in ("dead", "failed"):
            state = "dead"
        elif worker["state"] in ("starting", "waiting", "stopped"):
            state = "starting"
        elif self.phase in ("training", "applying"):
            state = self.phase
        else:
            state = "idle" if not self.busy else "training"
        if self.held_paused:
            state = "held"
        return {"state": state, "held_paused": self.held_paused, "run_id": self.run_id, "step": self.step, "losses": list(self.losses),
                "metrics": dict(self.metrics), "last_error": self.last_error,
                "weight_version": self.state.weight_version, "worker": worker}

    def _require_worker(self, *, restoring: bool = False) -> None:
        if self.held_paused and not restoring:
            raise Unavailable(self.held_paused, code="weights_held")
        sup = self.state.supervisor
        if sup is not None and sup.state != "ready":
            raise Unavailable(f"vLLM is not serving ({sup.describe()}); training waits for it", code="vllm_unavailable")
        if not self.control.alive:
            d = self.control.describe()
            why = f": {d['last_error']}" if d.get("last_error") else ""
            raise Unavailable(f"the training worker is {d['state']}{why}; retry when GET /api/train/status says idle",
                              code="worker_unavailable")

    # ------------------------------------------------------------ runs

    async def run(self, request: TrainRequest, *, trigger: str = "manual") -> int:
        """Record and start a run; returns its id at once (the run goes on in the background)."""
        if self.busy:
            raise Conflict(f"run {self.run_id} is still in progress; wait for it (GET /api/train/status)",
                           code="run_in_progress")
        self._require_worker()
        objective, pairs, examples, rating_ids, comparison_ids = await asyncio.to_thread(self._resolve, request)
        run_id = await asyncio.to_thread(self._create_run, request, trigger, objective, pairs, examples,
                                         rating_ids, comparison_ids)
        self.run_id, self.step, self.losses, self.metrics, self.last_error = run_id, 0, [], {}, None
        self._task = asyncio.create_task(self._execute(run_id, request, objective, pairs, examples),
                                         name=f"train-run-{run_id}")
        return run_id

    def _resolve(self, req: TrainRequest) -> tuple[str, list[p.Pair], list[p.Example], list[int], list[int]]:
        """Inline data plus feedback ids → the batch (DPO pairs or KTO examples) and the ids it consumes."""
        pairs = [p.Pair(prompt=x.prompt, chosen=x.chosen, rejected=x.rejected) for x in req.pairs]
        examples = [p.Example(prompt=x.prompt, completion=x.completion, label=x.label) for x in req.examples]
        used_r: set[int] = set()
        used_c: set[int] = set()
        if req.rating_ids or req.comparison_ids:
            from loop.pairs import PairFilters, preference_pairs, prompt_messages, unpaired_examples

            want_r, want_c = set(req.rating_ids), set(req.comparison_ids)
            with self.state.sessions() as s:
                have_r = set(s.scalars(select(Rating.id).where(Rating.id.in_(want_r))))
                have_c = set(s.scalars(select(Comparison.id).where(Comparison.id.in_(want_c))))
                if want_r - have_r or want_c - have_c:
                    raise NotFound(f"unknown feedback: ratings {sorted(want_r - have_r)}, comparisons "
                                   f"{sorted(want_c - have_c)}", code="feedback_not_found")
                taken_r = set(s.scalars(select(RunFeedback.rating_id).where(RunFeedback.rating_id.in_(want_r))))
                taken_c = set(s.scalars(select(RunFeedback.comparison_id)
                                        .where(RunFeedback.comparison_id.in_(want_c))))
                if taken_r or taken_c:
                    raise Conflict(f"already trained on: ratings {sorted(taken_r)}, comparisons {sorted(taken_c)}; "
                                   "feedback is never trained on twice", code="feedback_consumed")
                filters = PairFilters(untrained_only=True, include_held_out=True)
                if req.feedback_inline:  # built by loop/scheduler/batches.py from exactly these ids
                    used_r, used_c, want_r, want_c = set(want_r), set(want_c), set(), set()
                if req.objective != "kto" and (want_r or want_c):
                    for item in preference_pairs(s, filters):
                        ids_r, ids_c = set(item.rating_ids), set(item.comparison_ids)
                        if (ids_r or ids_c) and ids_r <= want_r and ids_c <= want_c:
                            pairs.append(p.Pair(prompt=prompt_messages(item.prompt), chosen=item.chosen,
                                                rejected=item.rejected))
                            used_r |= ids_r
                            used_c |= ids_c
                if (want_r or want_c) and (req.objective == "kto" or (req.objective is None and not pairs)):
                    for ex in unpaired_examples(s, filters):
                        if ex.rating_ids and set(ex.rating_ids) <= want_r:
                            examples.append(p.Example(prompt=prompt_messages(ex.prompt), completion=ex.completion,
                                                      label=ex.label))
                            used_r |= set(ex.rating_ids)
        objective = req.objective or ("dpo" if pairs else "kto")
        if objective == "dpo" and not pairs:
            raise LoopError("no preference pairs in this batch: DPO needs pairs (inline, A/B comparisons with a "
                            "winner, or two responses to one prompt rated differently)", status_code=422,
                            code="empty_batch")
        if objective == "kto" and not examples:
            raise LoopError("no examples in this batch: KTO needs examples (inline, or thumbs/scores on responses)",
                            status_code=422, code="empty_batch")
        return objective, pairs, examples, sorted(used_r), sorted(used_c)

    def _create_run(self, req: TrainRequest, trigger: str, objective: str, pairs: list[p.Pair],
                    examples: list[p.Example], rating_ids: list[int], comparison_ids: list[int]) -> int:
        from sqlalchemy.exc import IntegrityError

        batch = {"n_pairs": len(pairs) if objective == "dpo" else 0,
                 "n_examples": len(examples) if objective == "kto" else 0, "rating_ids": rating_ids,
                 "comparison_ids": comparison_ids, "steps": req.steps,
                 "learning_rate": req.learning_rate or self.settings.learning_rate,
                 "beta": req.beta or self.settings.dpo_beta, "optimizer": self.settings.optimizer,
                 "train_mode": req.train_mode or self.settings.train_mode, "inline": bool(req.pairs or req.examples)}
        with self.state.sessions() as s:
            run = TrainingRun(status="running", trigger=trigger, objective=objective, batch=batch,
                              version_before=self.state.weight_version)
            s.add(run)
            s.flush()
            s.add_all([RunFeedback(run_id=run.id, rating_id=i) for i in rating_ids]
                      + [RunFeedback(run_id=run.id, comparison_id=i) for i in comparison_ids])
            try:
                s.commit()
            except IntegrityError:
                s.rollback()
                raise Conflict("some of this feedback was just consumed by another run", code="feedback_consumed")
            return run.id

    def _finish_run(self, run_id: int, status: str, *, error: str | None = None, history: list[Any] | None = None,
                    version_after: int | None = None) -> None:
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            assert run is not None
            run.status, run.finished_at, run.error = status, _now(), error
            run.metrics = dict(self.metrics)
            run.history = history if history is not None else run.history
            run.version_after = version_after if version_after is not None else run.version_before
            if status != "succeeded":  # release the feedback: a later run may use it
                s.execute(delete(RunFeedback).where(RunFeedback.run_id == run_id))
            s.commit()

    def _on_progress(self, msg: p.Progress) -> None:
        if msg.run_id == self.run_id:
            self.step = msg.step
            self.losses.append(msg.loss)

    async def _execute(self, run_id: int, req: TrainRequest, objective: str, pairs: list[p.Pair],
                       examples: list[p.Example]) -> None:
        history: list[Any] = []
        version_after: int | None = None
        lr = req.learning_rate or self.settings.learning_rate
        beta = req.beta or self.settings.dpo_beta
        mode = req.train_mode or self.settings.train_mode
        try:
            for step in range(1, req.steps + 1):
                self.phase = "training"
                done = await self.control.call(
                    p.Train(run_id=run_id, objective=objective, pairs=pairs if objective == "dpo" else [],
                            examples=examples if objective == "kto" else [], step=step, steps=req.steps, lr=lr,
                            beta=beta, max_len=req.max_len, inject_nan=req.debug_inject_nan,
                            lowmem=mode == "lowmem"),
                    timeout=TRAIN_TIMEOUT_S)
                assert isinstance(done, p.TrainDone)
                history = done.history
                self.metrics.update({k: v for k, v in done.metrics.items()})
                self.metrics["update_ratio"] = done.update.ratio
                self.metrics["update_norm"] = done.update.update_norm
                if not done.update.ok:  # known bad: no need to pause vLLM to hear the worker refuse it
                    await self.control.call(p.Discard(run_id=run_id), timeout=APPLY_TIMEOUT_S)
                    self._refused(run_id, done.update.reason, history)
                    return
                self.phase = "applying"
                version_after, reason = await self._apply(run_id, mode)
                if reason is not None:
                    self._refused(run_id, reason, history)
                    return
                if self.settings.checkpoint_every and version_after % self.settings.checkpoint_every == 0:
                    await self.checkpoint()
            await asyncio.to_thread(self._finish_run, run_id, "succeeded", history=history,
                                    version_after=version_after)
        except asyncio.CancelledError:
            await asyncio.to_thread(self._finish_run, run_id, "failed", error="cancelled (loop is stopping)",
                                    history=history, version_after=version_after)
            raise
        except Exception as e:  # noqa: BLE001 - any failure ends the run, releases feedback, is shown in status
            self.last_error = f"run {run_id} failed: {e}"
            log.error("%s", self.last_error)
            await asyncio.to_thread(self._finish_run, run_id, "failed", error=str(e), history=history,
                                    version_after=version_after)
        finally:
            self.phase = "idle"

    def _refused(self, run_id: int, reason: str, history: list[Any]) -> None:
        self.last_error = f"run {run_id}: update refused: {reason}"
        self.metrics["refused_reason"] = reason
        self._finish_run(run_id, "refused", error=reason, history=history)

    # ------------------------------------------------------------ the atomic apply

    async def _paused(self, work: Any, *, atomic: bool) -> dict[str, float]:
        """Run `await work()` with vLLM paused (atomic) and its prefix cache reset after; resume in `finally`."""
        t: dict[str, float] = {}
        vllm = self.state.vllm
        paused = False
        t0 = time.perf_counter()
        try:
            if atomic:
                await vllm.pause(mode="wait")
                paused = True
                t["pause_ms"] = (time.perf_counter() - t0) * 1000
            if await work(t):
                t1 = time.perf_counter()
                await vllm.reset_prefix_cache()
                t["reset_ms"] = (time.perf_counter() - t1) * 1000
        finally:
            if paused and not self.held_paused:
                t2 = time.perf_counter()
                try:
                    await vllm.resume()
                except Exception:  # noqa: BLE001 - vLLM died or is being restarted: a new one starts unpaused
                    if self.state.supervisor is None or self.state.supervisor.state == "ready":
                        raise
                t["resume_ms"] = (time.perf_counter() - t2) * 1000
            t["total_ms"] = (time.perf_counter() - t0) * 1000
        return t

    async def _apply(self, run_id: int, mode: str) -> tuple[int, str | None]:
        """Apply the staged update; returns (live version, refusal reason or None)."""
        refused: list[str] = []

        async def work(t: dict[str, float]) -> bool:
            t1 = time.perf_counter()
            try:
                # lowmem: Apply runs the second backward pass, so it gets a step's time limit
                reply = await self.control.call(p.Apply(run_id=run_id),
                                                timeout=TRAIN_TIMEOUT_S if mode == "lowmem" else APPLY_TIMEOUT_S)
            except (WorkerUnavailable, WorkerTimeout) as e:  # it may have stopped halfway through the weights
                await self._recover_torn(run_id, e)
                raise
            t["apply_rtt_ms"] = (time.perf_counter() - t1) * 1000
            if isinstance(reply, p.Refused):
                refused.append(reply.reason)
                return False
            assert isinstance(reply, p.Applied)
            t["apply_ms"] = reply.ms
            t3 = time.perf_counter()
            await asyncio.to_thread(self._new_version, "train", self.state.weight_version, run_id, None, None)
            t["record_ms"] = (time.perf_counter() - t3) * 1000
            return True

        async with self.state.weights_lock:
            timings = await self._paused(work, atomic=mode != "hogwild")
        self.metrics.update({k: round(v, 3) for k, v in timings.items()})
        return self.state.weight_version, (refused[0] if refused else None)

    async def _recover_torn(self, run_id: int, error: Exception) -> None:
        """The worker died or hung inside Apply, so the live weights may be half written. vLLM is still paused:
        put a known version back before it serves again. First choice: the worker (restarted) restores the
        newest checkpoint in place, or the base model folder when nothing was checkpointed; failing that, vLLM is
        restarted from that folder (the supervisor's model_path); with neither, vLLM stays paused (`held`)."""
        why = f"the training worker stopped while writing run {run_id}'s update ({error})"
        log.error("%s: the weights may be half written; restoring a known version before vLLM serves again", why)
        self.metrics["torn_apply"] = str(error)
        if isinstance(error, WorkerTimeout):  # it may still be writing: stop it before anything else writes
            await self.control.restart(f"Apply timed out: {error}")
        newest = self._newest_checkpoint()
        base = self.control.hello.model_path if self.control.hello else None
        if newest is not None:
            version, path = newest
        elif base and (Path(base) / "model.safetensors").is_file():
            version, path = 0, base  # nothing checkpointed yet: vLLM's own starting weights
        else:
            version, path = -1, ""
        if path:
            deadline = time.monotonic() + TORN_WAIT_S
            while not self.control.alive and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            try:
                reply = await self.control.call(p.Restore(path=path), timeout=CHECKPOINT_TIMEOUT_S)
                assert isinstance(reply, p.Restored)
                await asyncio.to_thread(self._new_version, "restore", version, None,
                                        path if newest is not None else None,
                                        f"{why}; restored from version {version}")
                log.warning("run %d: version %d restored in place after the torn apply", run_id, version)
                return
            except Exception as e:  # noqa: BLE001 - fall through to a vLLM restart
                log.error("run %d: restoring version %d after the torn apply failed: %s", run_id, version, e)
        supervisor = self.state.supervisor
        if supervisor is not None:
            log.warning("run %d: restarting vLLM from %s after the torn apply", run_id, supervisor.model_path)
            await supervisor.reload(why)  # the ready callback records the version the new vLLM serves
            return
        self.held_paused = f"{why}; vLLM is kept paused: restore a checkpointed version (POST " \
                           "/api/versions/{v}/restore) or restart vLLM"
        log.error("%s", self.held_paused)

    def _new_version(self, kind: str, parent: int | None, run_id: int | None, checkpoint_path: str | None,
                     note: str | None) -> int:
        """Record the next version as live (the others superseded) and make it the one responses carry."""
        with self.state.sessions() as s:
            version = self.state.weight_version + 1
            s.execute(update(WeightVersion).where(WeightVersion.status == "live").values(status="superseded"))
            s.add(WeightVersion(version=version, kind=kind, parent_version=parent, run_id=run_id,
                                checkpoint_path=checkpoint_path, status="live", note=note,
                                load_id=self.control.hello.load_id if self.control.hello else None))
            s.commit()
        self.state.weight_version = version
        return version

    # ------------------------------------------------------------ checkpoints and restore

    def _newest_checkpoint(self) -> tuple[int, str] | None:
        with self.state.sessions() as s:
            rows = s.execute(select(WeightVersion.version, WeightVersion.checkpoint_path)
                             .where(WeightVersion.checkpoint_path.is_not(None))
                             .order_by(WeightVersion.version.desc())).all()
        for version, path in rows:
            if path and (Path(path) / "model.safetensors").is_file():
                return int(version), str(path)
        return None

    async def checkpoint(self) -> tuple[int, str]:
        """Write the live weights as a checkpoint (or return the live version's existing one)."""
        self._require_worker()
        async with self.state.weights_lock:  # the weights must not change while they are written
            version = self.state.weight_version
            with self.state.sessions() as s:
                row = s.get(WeightVersion, version)
                existing = row.checkpoint_path if row is not None else None
            if existing and (Path(existing) / "model.safetensors").is_file():
                return version, existing
            path = self.settings.checkpoint_dir / f"v{version:06d}"
            if path.exists():  # left by a run whose database write never happened: replace it
                import shutil

                shutil.rmtree(path)
            self.phase = "checkpointing" if self.phase == "idle" else self.phase
            try:
                done = await self.control.call(p.Checkpoint(path=str(path), version=version),
                                               timeout=CHECKPOINT_TIMEOUT_S)
            finally:
                self.phase = "idle" if self.phase == "checkpointing" else self.phase
            assert isinstance(done, p.CheckpointDone)
            with self.state.sessions() as s:
                s.execute(update(WeightVersion).where(WeightVersion.version == version)
                          .values(checkpoint_path=done.path))
                s.commit()
        if self.state.supervisor is not None:
            self.state.supervisor.model_path = done.path  # a vLLM restart now loads this one
        log.info("checkpoint of version %d written to %s in %.0f ms", version, done.path, done.ms)
        return version, done.path

    async def restore(self, version: int) -> int:
        """Write version `version`'s checkpoint back into the live weights; returns the new live version."""
        with self.state.sessions() as s:
            row = s.get(WeightVersion, version)
        if row is None:
            raise NotFound(f"weight version {version} does not exist; GET /api/versions lists them",
                           code="version_not_found")
        if not row.checkpoint_path or not (Path(row.checkpoint_path) / "model.safetensors").is_file():
            raise Conflict(f"weight version {version} has no checkpoint to restore from; checkpoint a version "
                           "first (POST /api/checkpoint writes the live one)", code="no_checkpoint")
        if self.busy:
            raise Conflict(f"run {self.run_id} is in progress; restore after it ends", code="run_in_progress")
        self._require_worker(restoring=True)
        path = row.checkpoint_path

        async def work(t: dict[str, float]) -> bool:
            reply = await self.control.call(p.Restore(path=path), timeout=CHECKPOINT_TIMEOUT_S)
            assert isinstance(reply, p.Restored)
            t["restore_ms"] = reply.ms
            # the live weights are now bit for bit the checkpoint: the new version shares its folder
            await asyncio.to_thread(self._new_version, "restore", version, None, path, f"restored from version {version}")
            self.held_paused = None  # known weights again: the resume below lets vLLM serve
            return True

        self.phase = "restoring"
        try:
            async with self.state.weights_lock:
                timings = await self._paused(work, atomic=True)
        finally:
            self.phase = "idle"
        log.info("restored version %d as version %d (%s)", version, self.state.weight_version, timings)
        return self.state.weight_version

    async def _on_vllm_ready(self) -> None:
        """vLLM (re)started and loaded `supervisor.model_path`: record the version it now serves."""
        supervisor = self.state.supervisor
        loaded = str(supervisor.model_path) if supervisor is not None and supervisor.model_path else None
        self._loaded_path = loaded
        async with self.state.weights_lock:
            with self.state.sessions() as s:
                live = s.get(WeightVersion, self.state.weight_version)
                ckpt_version = s.scalar(select(WeightVersion.version).where(WeightVersion.checkpoint_path == loaded)
                                        .order_by(WeightVersion.version.desc()).limit(1)) if loaded else None
            if live is not None and ckpt_version is not None and live.checkpoint_path == loaded:
                return  # vLLM serves exactly the live version's checkpoint
            if ckpt_version is None and self.state.weight_version == 0:
                return  # the base model, never trained
            parent = ckpt_version if ckpt_version is not None else 0
            await asyncio.to_thread(self._new_version, "restore", parent, None,
                                    loaded if ckpt_version is not None else None,
                                    f"vLLM (re)started from {loaded or 'the base model'}")
            log.info("vLLM serves %s: recorded as version %d", loaded, self.state.weight_version)
