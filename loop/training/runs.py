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
- Checkpoints, restore, the version records and the recovery of an unfinished apply are in loop/versions.py
  (the `Versions` mixin). Every kept version is made durable in the background, outside the pause
  (loop/durability.py: `settings.checkpoint_every`, 1 by default). A run is `succeeded` only when vLLM still
  serves its version at the end; otherwise it is `lost` and its feedback goes back to the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator
from sqlalchemy import delete, select

from loop.errors import Conflict, Invalid, NotFound, Unavailable
from loop.state import LoopState
from loop.control import WorkerControl, WorkerTimeout, WorkerUnavailable
from loop.db.models import MAX_ID, Comparison, Rating, RunFeedback, TrainingRun, WeightVersion
from loop.durability import LOST, Flusher, durable, mark_lost
from loop.versions import CHECKPOINT_TIMEOUT_S, Versions
from loop.worker import protocol as p

log = logging.getLogger("loop.training")

TRAIN_TIMEOUT_S = 1800.0  # one step of forward + backward; CPU runs of long batches are slow
APPLY_TIMEOUT_S = 120.0


class PairIn(BaseModel):
    prompt: str | list[dict[str, str]] = Field(..., description="plain text, or chat messages before the answer")
    chosen: str = Field(..., min_length=1)
    rejected: str = Field(..., min_length=1)
    chosen_cut: bool = Field(False, description="the chosen answer was cut off (max_tokens): train it without an "
                             "end-of-sequence token, so the model is not taught to end there")
    rejected_cut: bool = Field(False, description="the same for the rejected answer")


class ExampleIn(BaseModel):
    prompt: str | list[dict[str, str]]
    completion: str = Field(..., min_length=1)
    label: bool
    cut: bool = Field(False, description="the completion was cut off (max_tokens): no end-of-sequence token")


FeedbackId = Annotated[int, Field(ge=1, le=MAX_ID)]  # a rating/comparison id: the column's 64-bit range


class TrainRequest(BaseModel):
    """Body of POST /api/train; the scheduler builds the same object."""

    pairs: list[PairIn] = Field(default_factory=list)
    examples: list[ExampleIn] = Field(default_factory=list)
    rating_ids: list[FeedbackId] = Field(default_factory=list, max_length=100_000,
                                         description="feedback to train on (KTO examples or pairs)")
    comparison_ids: list[FeedbackId] = Field(default_factory=list, max_length=100_000,
                                             description="A/B picks to train on (DPO pairs)")
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


class Trainer(Versions):
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
        self.durability = Flusher(self.checkpoint, state.settings.checkpoint_every)
        self.control.on_progress.append(self._on_progress)
        self.control.on_hello.append(self._on_worker_hello)
        if self.control.hello is not None:  # the worker said hello before the trainer existed
            with contextlib.suppress(RuntimeError):  # no running loop (a test building it by hand)
                self._on_worker_hello(self.control.hello)

    # ------------------------------------------------------------ lifecycle

    def prepare_supervisor(self, supervisor: Any) -> None:
        """Before vLLM starts: load the newest checkpoint, and learn about every (re)start."""
        newest = self._newest_checkpoint()
        if newest is not None:
            supervisor.model_path = newest[1]
            log.info("vLLM will load the newest checkpoint, version %d: %s", *newest)
        supervisor.add_ready_callback(self._on_vllm_ready)

    async def stop(self) -> None:
        """A clean shutdown: end the run in progress, then make the live version durable before vLLM goes."""
        if self._task is not None and not self._task.done():
            deadline = time.monotonic() + APPLY_TIMEOUT_S
            while self.phase == "applying" and time.monotonic() < deadline:
                await asyncio.sleep(0.05)  # an apply runs to its end: its version is recorded, then written
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - shutting down
                pass
        await self.durability.stop(CHECKPOINT_TIMEOUT_S)
        if not self.live_is_durable():
            try:
                version, path = await asyncio.wait_for(self.durability.flush(), CHECKPOINT_TIMEOUT_S)
                log.info("shutting down: version %d made durable in %s", version, path)
            except Exception as exc:  # noqa: BLE001 - say what will be lost, then go on stopping
                log.error("shutting down: the live version %d could not be made durable (%s); it will be lost",
                          self.state.weight_version, exc)

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
        return {"state": state, "held_paused": self.held_paused, "run_id": self.run_id, "step": self.step,
                "losses": list(self.losses), "metrics": dict(self.metrics), "last_error": self.last_error,
                "weight_version": self.state.weight_version, "worker": worker,
                "durability": {**self.durability.describe(), "live_durable": self.live_is_durable()}}

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

    async def run(self, request: TrainRequest, *, trigger: str = "manual", base_weights: str | None = None,
                  max_conflict_t: float | None = None) -> int:
        """Record and start a run; returns its id at once (the run goes on in the background).

        `base_weights` (the scheduler's runs: the base model folder): the worker measures whether step 1's update
        goes on with the weights' change since that base or pulls it back, before writing it; with
        `max_conflict_t` an update that pulls back is rejected (loop/worker/agreement.py) and its feedback stays
        consumed."""
        if self.busy:
            raise Conflict(f"run {self.run_id} is still in progress; wait for it (GET /api/train/status)",
                           code="run_in_progress")
        if self.phase == "restoring":
            raise Conflict("a version is being restored; start the run after it (GET /api/train/status)",
                           code="restore_in_progress")
        self._require_worker()
        objective, pairs, examples, rating_ids, comparison_ids = await asyncio.to_thread(self._resolve, request)
        run_id = await asyncio.to_thread(self._create_run, request, trigger, objective, pairs, examples,
                                         rating_ids, comparison_ids)
        self.run_id, self.step, self.losses, self.metrics, self.last_error = run_id, 0, [], {}, None
        self._task = asyncio.create_task(self._execute(run_id, request, objective, pairs, examples, base_weights,
                                                       max_conflict_t), name=f"train-run-{run_id}")
        return run_id

    def _resolve(self, req: TrainRequest) -> tuple[str, list[p.Pair], list[p.Example], list[int], list[int]]:
        """Inline data plus feedback ids → the batch (DPO pairs or KTO examples) and the ids it consumes."""
        pairs = [p.Pair(prompt=x.prompt, chosen=x.chosen, rejected=x.rejected, chosen_cut=x.chosen_cut,
                        rejected_cut=x.rejected_cut) for x in req.pairs]
        examples = [p.Example(prompt=x.prompt, completion=x.completion, label=x.label, cut=x.cut)
                    for x in req.examples]
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
                stale_r = set(s.scalars(select(Rating.id).where(Rating.id.in_(want_r), Rating.is_current.is_(False))))
                stale_c = set(s.scalars(select(Comparison.id).where(Comparison.id.in_(want_c),
                                                                    Comparison.is_current.is_(False))))
                if stale_r or stale_c:
                    raise Conflict(f"superseded feedback: ratings {sorted(stale_r)}, comparisons {sorted(stale_c)} were "
                                   "replaced by a newer verdict of the same rater; send the current ids "
                                   "(GET /api/responses/{id} lists each item's feedback with is_current)",
                                   code="feedback_superseded")
                filters = PairFilters(untrained_only=True, include_held_out=True)
                if req.feedback_inline:  # built by loop/scheduler/batches.py from exactly these ids
                    used_r, used_c, want_r, want_c = set(want_r), set(want_c), set(), set()
                if req.objective != "kto" and (want_r or want_c):
                    for item in preference_pairs(s, filters):
                        ids_r, ids_c = set(item.rating_ids), set(item.comparison_ids)
                        if (ids_r or ids_c) and ids_r <= want_r and ids_c <= want_c:
                            pairs.append(p.Pair(prompt=prompt_messages(item.prompt), chosen=item.chosen,
                                                rejected=item.rejected, chosen_cut=item.chosen_cut,
                                                rejected_cut=item.rejected_cut))
                            used_r |= ids_r
                            used_c |= ids_c
                if (want_r or want_c) and (req.objective == "kto" or (req.objective is None and not pairs)):
                    for ex in unpaired_examples(s, filters):
                        if ex.rating_ids and set(ex.rating_ids) <= want_r:
                            examples.append(p.Example(prompt=prompt_messages(ex.prompt), completion=ex.completion,
                                                      label=ex.label, cut=ex.cut))
                            used_r |= set(ex.rating_ids)
        objective = req.objective or ("dpo" if pairs else "kto")
        if objective == "dpo" and not pairs:
            raise Invalid("no preference pairs in this batch: DPO needs pairs (inline, A/B comparisons with a "
                            "winner, or two responses to one prompt rated differently)",
                          code="empty_batch")
        if objective == "kto" and not examples:
            raise Invalid("no examples in this batch: KTO needs examples (inline, or thumbs/scores on responses)",
                          code="empty_batch")
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
            if status == "succeeded" and version_after is not None:
                live = s.get(WeightVersion, version_after)
                if live is not None and live.status == LOST:  # vLLM reloaded from disk meanwhile (durability.py)
                    run.status, run.error = LOST, f"{live.note}; its feedback is back in the queue"
                    status = LOST
            if status not in ("succeeded", "rejected"):  # release the feedback: a later run may use it
                s.execute(delete(RunFeedback).where(RunFeedback.run_id == run_id))
            s.commit()

    def _on_progress(self, msg: p.Progress) -> None:
        if msg.run_id == self.run_id:
            self.step = msg.step
            self.losses.append(msg.loss)

    async def _execute(self, run_id: int, req: TrainRequest, objective: str, pairs: list[p.Pair],
                       examples: list[p.Example], base_weights: str | None = None,
                       max_conflict_t: float | None = None) -> None:
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
                            lowmem=mode == "lowmem", base_weights=base_weights or "", max_conflict_t=max_conflict_t),
                    timeout=TRAIN_TIMEOUT_S)
                assert isinstance(done, p.TrainDone)
                history = done.history
                self.metrics.update({k: v for k, v in done.metrics.items()})
                self.metrics["update_ratio"] = done.update.ratio
                self.metrics["update_norm"] = done.update.update_norm
                if not done.update.ok:  # known bad: no need to pause vLLM to hear the worker refuse it
                    await self.control.call(p.Discard(run_id=run_id), timeout=APPLY_TIMEOUT_S)
                    self._refused(run_id, done.update.reason, history,
                                  status="rejected" if done.update.conflict else "refused")
                    return
                self.phase = "applying"
                version_after, reason = await self._apply(run_id, mode)
                if reason is not None:
                    self._refused(run_id, reason, history)
                    return
                self.durability.changed(version_after)
            gone = await self._not_served()
            if gone is not None:  # vLLM died after the write: this version never reached a user
                await asyncio.to_thread(mark_lost, self.state.sessions, version_after, run_id, gone)
                self.last_error = f"run {run_id}: {gone}"
                return
            await asyncio.to_thread(self._finish_run, run_id, "succeeded", history=history,
                                    version_after=version_after)
        except asyncio.CancelledError:
            # loop is stopping: steps already written are served (and made durable by stop()), so they count
            applied = version_after is not None
            await asyncio.to_thread(self._finish_run, run_id, "succeeded" if applied else "failed",
                                    error=f"stopped after step {self.step} of {req.steps} (loop is stopping)",
                                    history=history, version_after=version_after)
            raise
        except Exception as e:  # noqa: BLE001 - any failure ends the run, releases feedback, is shown in status
            self.last_error = f"run {run_id} failed: {e}"
            log.error("%s", self.last_error)
            await asyncio.to_thread(self._finish_run, run_id, "failed", error=str(e), history=history,
                                    version_after=version_after)
        finally:
            self.phase = "idle"

    async def _not_served(self) -> str | None:
        """Why the version just written is not what vLLM serves (it died or reloaded meanwhile), or None."""
        sup = self.state.supervisor
        hello = self.control.hello
        with self.state.sessions() as s:
            row = s.get(WeightVersion, self.state.weight_version)
        if row is not None and hello is not None and row.load_id and hello.load_id != row.load_id:
            return f"vLLM reloaded its weights (load {hello.load_id}) before version {row.version} was served"
        for attempt in range(3):  # a busy engine may miss one health check; a dead one misses all three
            if sup is not None and sup.state != "ready":
                return f"vLLM stopped before the new version was served ({sup.describe()})"
            if await self.state.vllm.health(timeout=5.0):
                return None
            await asyncio.sleep(1.0 * (attempt + 1))
        return "vLLM did not answer /health after the write; the new version was never served"

    def live_is_durable(self) -> bool:
        with self.state.sessions() as s:
            row = s.get(WeightVersion, self.state.weight_version)
            return row is not None and durable(row)

    def _refused(self, run_id: int, reason: str, history: list[Any], *, status: str = "refused") -> None:
        """Nothing was written. refused (not finite, over the cap): the feedback is released; rejected (it would
        undo what the kept runs taught): the feedback stays consumed, so a poisoned batch is not tried again."""
        self.last_error = f"run {run_id}: update {status}: {reason}"
        self.metrics["refused_reason"] = reason
        self._finish_run(run_id, status, error=reason, history=history)

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
