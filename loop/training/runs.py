"""Training runs: the trainer that holds the other parts of loop/training and carries one run at a time.

`Trainer(state)` is created by `create_app` when the worker is enabled.
- `await run(request)` resolves the batch, records a `TrainingRun` (status running, version_before) and the
  feedback it consumes in `run_feedback` (unique per feedback item: nothing is trained on twice), starts the run in
  the background and returns a `RunHandle` at once (the route answers 202; the scheduler awaits `handle.finished()`).
- Each step: the worker computes a staged update (`Train`) while vLLM keeps serving; then the live weights change
  (loop/training/weights.py: pause → worker `Apply` → new version → reset → resume). `train_mode` "lowmem" keeps it
  atomic with a fraction of the memory (the worker writes by a second backward inside the pause, so the pause is
  longer); "hogwild" skips the pause. A refused update (NaN/inf/over the cap) ends the run "refused": weights
  untouched, version unchanged, feedback released. A scheduled run is screened first (`ScreenPolicy`): items
  that pull back what the kept runs taught are quarantined (loop/training/quarantine.py) and the rest trains;
  "rejected" when nothing is left. A failed run releases its feedback (never what is quarantined).
- Every kept version is made durable in the background (loop/training/checkpoints.py); a run is `succeeded` only
  when vLLM still serves its version at the end, otherwise it is `lost` and its feedback goes back to the queue.

Run the tests: .venv/bin/python -m pytest tests/unit/training/
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BaseModel, Field, model_validator

from loop.config import LOWMEM_TP, Objective, TrainMode, TrainParams
from loop.db.models import MAX_ID, RunFeedback, TrainingRun, WeightVersion
from loop.errors import Conflict, Invalid, NotFound, Unavailable
from loop.pairs import Item
from loop.scheduler import batches, screening
from loop.scheduler.batches import Batch
from loop.state import LoopState
from loop.training import quarantine
from loop.training.checkpoints import CHECKPOINT_TIMEOUT_S, Checkpoints, Flusher
from loop.training.recovery import Recovery
from loop.training.versions import LOST, VersionRecords
from loop.training.weights import LiveWeights
from loop.training.worker import WorkerControl, WorkerTimeout, WorkerUnavailable
from loop.worker import protocol as p
from loop.worker.tokens import DEFAULT_MAX_LEN

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
    nll_weight: float | None = Field(None, ge=0, le=100, description="weight of the preferred answers' likelihood "
                                     "term beside the preference loss (default: LOOP_NLL_WEIGHT)")
    objective: Objective | None = None
    max_len: int = Field(DEFAULT_MAX_LEN, ge=16, le=32768, description="tokens per row (prompt + answer)")
    train_mode: TrainMode | None = Field(
        None, description="how this run's updates are written (default: LOOP_TRAIN_MODE): atomic stages them and "
        "pauses vLLM for a copy; lowmem pauses vLLM for a second backward pass instead (~0.2x the weight bytes "
        "extra rather than 1x); hogwild writes without a pause")
    debug_inject_nan: bool = Field(False, description="testing only: poison the update to see it refused")

    @model_validator(mode="after")
    def _not_empty(self) -> "TrainRequest":
        if not (self.pairs or self.examples or self.rating_ids or self.comparison_ids):
            raise ValueError("the batch is empty: send pairs, examples, rating_ids or comparison_ids")
        return self


def _now() -> datetime:
    return datetime.now(timezone.utc)


@dataclasses.dataclass(frozen=True)
class ScreenPolicy:
    """The screen a scheduled run goes through before training (loop/scheduler/screening.py)."""

    base_weights: str  # the base model folder: the learned direction is w_live minus these weights
    alpha: float = screening.DEFAULT_ALPHA
    # waiting thumbs of the batch's raters, measured beside it as evidence (loop/scheduler/screening.py), never
    # trained by this run; held back with their rater's items when the test says so
    companions: tuple[Item, ...] = ()
    # trusted pairs (the guard's eval set) whose margins' gradient is a direction too, and which one the test uses
    anchors: tuple[p.Pair, ...] = ()
    direction: str = screening.DEFAULT_DIRECTION


class RunHandle:
    """A started run: its id, and `await finished()` for its final status (the scheduler judges the outcome)."""

    def __init__(self, run_id: int, task: asyncio.Task[None], status: Any) -> None:
        self.id = run_id
        self._task = task
        self._status = status

    async def finished(self, timeout: float | None = None) -> str:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(self._task), timeout)
        return await asyncio.to_thread(self._status, self.id)

    def __int__(self) -> int:
        return self.id


class Trainer:
    """Runs, holding the live weights, the version records, the checkpoints and the recovery, each one job."""

    def __init__(self, state: LoopState, control: WorkerControl | None = None) -> None:
        self.state = state
        self.settings = state.settings
        self.control: WorkerControl = control or state.worker
        self.run_id: int | None = None
        self.phase = "idle"  # idle | screening | training | yielding | applying | checkpointing | restoring
        self.step = 0
        self.losses: list[float] = []
        self.metrics: dict[str, Any] = {}
        self.last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.weights = LiveWeights(state)
        self.versions = VersionRecords(state, lambda: self.control.hello.load_id if self.control.hello else None)
        self.checkpoints = Checkpoints(state, self.control, self.weights, self.versions)
        self.recovery = Recovery(state, self.control, self.weights, self.versions, self.checkpoints)
        self.durability = Flusher(self.checkpoint, state.settings.checkpoint_every)
        self.control.on_progress.append(self._on_progress)
        self.control.on_hello.append(self.recovery.worker_hello)
        if self.control.hello is not None:  # the worker said hello before the trainer existed
            with contextlib.suppress(RuntimeError):  # no running loop (a test building it by hand)
                self.recovery.worker_hello(self.control.hello)

    @property
    def held_paused(self) -> str | None:
        return self.weights.held

    # ------------------------------------------------------------ lifecycle

    def prepare_supervisor(self, supervisor: Any) -> None:
        """Before vLLM starts: load the newest checkpoint, and learn about every (re)start."""
        newest = self.versions.newest_checkpoint()
        if newest is not None:
            supervisor.model_path = newest[1]
            log.info("vLLM will load the newest checkpoint, version %d: %s", *newest)
        supervisor.add_ready_callback(self.recovery.vllm_ready)

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
        await self.weights.close()
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

    def live_is_durable(self) -> bool:
        return self.versions.live_is_durable()

    def describe(self) -> dict[str, Any]:
        worker = self.control.describe()
        if worker["state"] in ("dead", "failed"):
            state = "dead"
        elif worker["state"] in ("starting", "waiting", "stopped"):
            state = "starting"
        elif self.phase in ("screening", "training", "applying"):
            state = self.phase
        else:
            state = "idle" if not self.busy else "training"
        if self.held_paused:
            state = "held"
        return {"state": state, "held_paused": self.held_paused, "run_id": self.run_id, "step": self.step,
                "losses": list(self.losses), "metrics": dict(self.metrics), "last_error": self.last_error,
                "weight_version": self.state.weight_version, "worker": worker, "pause_mode": self.settings.pause_mode,
                "durability": {**self.durability.describe(), "live_durable": self.live_is_durable()}}

    # ------------------------------------------------------------ checkpoints and restore

    async def checkpoint(self, *, pinned: bool = False) -> tuple[int, str]:
        """Write the live weights as a checkpoint (or return the live version's existing one). pinned (POST
        /api/checkpoint): never pruned; the automatic ones (rollback points, `checkpoint_every`) are."""
        self._require_worker()
        self.phase = "checkpointing" if self.phase == "idle" else self.phase
        try:
            return await self.checkpoints.write(pinned=pinned)
        finally:
            self.phase = "idle" if self.phase == "checkpointing" else self.phase

    async def restore(self, version: int) -> int:
        """Write version `version`'s weights back into the live weights; returns the new live version."""
        row = await asyncio.to_thread(self.versions.get, version)
        if row is None:
            raise NotFound(f"weight version {version} does not exist; GET /api/versions lists them",
                           code="version_not_found")
        path = self.checkpoints.restorable_path(row)
        if path is None:
            why = " (its weights were lost: " + row.note + ")" if row.status == LOST and row.note else ""
            raise Conflict(f"weight version {version} has no checkpoint to restore from{why}; checkpoint a "
                           "version first (POST /api/checkpoint writes the live one)", code="no_checkpoint")
        if self.busy:
            raise Conflict(f"run {self.run_id} is in progress; restore after it ends", code="run_in_progress")
        self._require_worker(restoring=True)
        self.phase = "restoring"  # from here on no run starts (run() answers 409) until the restore ends
        try:
            timings = await self.checkpoints.restore(version, path)
        finally:
            self.phase = "idle"
        log.info("restored version %d as version %d (%s)", version, self.state.weight_version, timings)
        return self.state.weight_version

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

    async def run(self, request: TrainRequest, *, batch: Batch | None = None, trigger: str = "manual",
                  screen: ScreenPolicy | None = None, replay: Sequence[Item] = ()) -> RunHandle:
        """Record and start a run; returns its handle at once (the run goes on in the background).

        The batch is `batch` when the caller built it (the scheduler, loop/scheduler/batches.py: its feedback is
        checked again here, since time passed), else what `request` names (`batches.resolve`). `screen` (the
        scheduler's runs): before training, the worker measures how each item pulls along the weights' change
        since the base model, and the items that pull back at the policy's significance level are quarantined
        (loop/scheduler/screening.py, loop/training/quarantine.py) — the rest trains; if nothing is left the run
        is `rejected`. `replay` (the scheduler's DPO runs, `batches.replay_pairs`): pairs kept runs learned from,
        trained again beside what the screen kept; the run records them but does not consume their feedback."""
        if self.busy:
            raise Conflict(f"run {self.run_id} is still in progress; wait for it (GET /api/train/status)",
                           code="run_in_progress")
        if self.phase == "restoring":
            raise Conflict("a version is being restored; start the run after it (GET /api/train/status)",
                           code="restore_in_progress")
        if request.train_mode == "lowmem" and self.state.settings.tensor_parallel > 1:
            raise Invalid(LOWMEM_TP, code="lowmem_tensor_parallel")
        self._require_worker()
        batch = await asyncio.to_thread(self._resolve, request, batch)
        replay = tuple(replay) if batch.objective == "dpo" else ()
        run_id = await asyncio.to_thread(self._create_run, request, trigger, batch, replay)
        self.run_id, self.step, self.losses, self.metrics, self.last_error = run_id, 0, [], {}, None
        self._task = asyncio.create_task(self._execute(run_id, request, batch, screen, replay),
                                         name=f"train-run-{run_id}")
        return RunHandle(run_id, self._task, self._run_status)

    def _run_status(self, run_id: int) -> str:
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            return run.status if run is not None else "failed"

    def _resolve(self, req: TrainRequest, built: Batch | None) -> Batch:
        with self.state.sessions() as s:
            if built is not None:
                batches.check_feedback(s, built.rating_ids, built.comparison_ids)
                return built
            return batches.resolve(s, objective=req.objective,
                                   pairs_in=[p.Pair(**x.model_dump()) for x in req.pairs],
                                   examples_in=[p.Example(**x.model_dump()) for x in req.examples],
                                   rating_ids=req.rating_ids, comparison_ids=req.comparison_ids)

    def _create_run(self, req: TrainRequest, trigger: str, batch: Batch, replay: Sequence[Item] = ()) -> int:
        from sqlalchemy.exc import IntegrityError

        objective, rating_ids, comparison_ids = batch.objective, batch.rating_ids, batch.comparison_ids
        record = {"n_pairs": len(batch.pairs) if objective == "dpo" else 0,
                  "n_examples": len(batch.examples) if objective == "kto" else 0, "rating_ids": rating_ids,
                  "comparison_ids": comparison_ids, "steps": req.steps,
                  **self._params(req)._asdict(), "inline": bool(req.pairs or req.examples)}
        if replay:
            record["replay"] = {"n_pairs": len(replay),
                                "rating_ids": sorted({r for i in replay for r in i.rating_ids}),
                                "comparison_ids": sorted({c for i in replay for c in i.comparison_ids})}
        with self.state.sessions() as s:
            run = TrainingRun(status="running", trigger=trigger, objective=objective, batch=record,
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
                quarantine.release(s, run_id)
            s.commit()

    def _params(self, req: TrainRequest) -> TrainParams:
        return self.settings.train_params(learning_rate=req.learning_rate, beta=req.beta, train_mode=req.train_mode,
                                          nll_weight=req.nll_weight)

    def _on_progress(self, msg: p.Progress) -> None:
        if msg.run_id == self.run_id:
            self.step = msg.step
            self.losses.append(msg.loss)

    async def _execute(self, run_id: int, req: TrainRequest, batch: Batch, screen: ScreenPolicy | None = None,
                       replay: Sequence[Item] = ()) -> None:
        history: list[Any] = []
        version_after: int | None = None
        params = self._params(req)
        lr, beta, mode = params.learning_rate, params.beta, params.train_mode
        try:
            if screen is not None:
                self.phase = "screening"
                kept = await self._screen(run_id, req, batch, screen)
                if kept is None:
                    return
                batch = kept
            # the replayed pairs were screened and kept by their own runs: they join after this batch's screen
            train_pairs = batch.pairs + [i.pair for i in replay]
            for step in range(1, req.steps + 1):
                self.phase = "training"
                done = await self.control.call(
                    p.Train(run_id=run_id, objective=batch.objective, pairs=train_pairs, examples=batch.examples,
                            step=step, steps=req.steps, lr=lr,
                            beta=beta, nll_weight=params.nll_weight, max_len=req.max_len, inject_nan=req.debug_inject_nan,
                            lowmem=mode == "lowmem"),
                    timeout=TRAIN_TIMEOUT_S)
                assert isinstance(done, p.TrainDone)
                # a remote replica that could not stage the update leaves routing before the pause
                self.state.replicas_lost(done.unstaged, f"could not stage run {run_id}'s update")
                history = done.history
                self.metrics.update({k: v for k, v in done.metrics.items()})
                self.metrics["update_ratio"] = done.update.ratio
                self.metrics["update_norm"] = done.update.update_norm
                if not done.update.ok:  # known bad: no need to pause vLLM to hear the worker refuse it
                    await self.control.call(p.Discard(run_id=run_id), timeout=APPLY_TIMEOUT_S)
                    self._refused(run_id, done.update.reason, history)
                    return
                self.phase = "yielding"  # keep mode: the answers the last write preempted decode again first
                waited = await self.weights.yield_to_serving(atomic=mode != "hogwild")
                self.metrics["recovery_wait_ms"] = round(waited * 1000, 3)
                self.phase = "applying"
                version_after, reason = await self._apply(run_id, mode)
                if reason is not None:
                    self._refused(run_id, reason, history)
                    return
                self.durability.changed(version_after)
            gone = await self._not_served()
            if gone is not None:  # vLLM died after the write: this version never reached a user
                await asyncio.to_thread(self.versions.mark_lost, version_after, run_id, gone)
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
        row = await asyncio.to_thread(self.versions.get, self.state.weight_version)
        if row is not None and hello is not None and row.load_id and hello.load_id != row.load_id:
            return f"vLLM reloaded its weights (load {hello.load_id}) before version {row.version} was served"
        for attempt in range(3):  # a busy engine may miss one health check; a dead one misses all three
            if sup is not None and sup.state != "ready":
                return f"vLLM stopped before the new version was served ({sup.describe()})"
            if await self.state.vllm.health(timeout=5.0):
                return None
            await asyncio.sleep(1.0 * (attempt + 1))
        return "vLLM did not answer /health after the write; the new version was never served"

    async def _screen(self, run_id: int, req: TrainRequest, batch: Batch, screen: ScreenPolicy) -> Batch | None:
        """The screen before training: the batch with the held-back items removed (they are quarantined, still
        consumed by this run), or None when nothing is left (the run is then `rejected`). Companions held back
        are quarantined too, and consumed by this run so that no later batch trains them while they are held."""
        companions = list(screen.companions)
        reply = await self.control.call(
            p.Screen(run_id=run_id, base_weights=screen.base_weights, objective=batch.objective, pairs=batch.pairs,
                     examples=batch.examples + [c.example for c in companions], max_len=req.max_len,
                     anchors=list(screen.anchors)),
            timeout=TRAIN_TIMEOUT_S)
        assert isinstance(reply, p.Screened)
        items = ([i for i in batch.items if i.kind == "pair"] + [i for i in batch.items if i.kind == "example"]
                 + companions)
        trained = len(items) - len(companions)
        norms = (reply.learned_norm, reply.anchor_norm)
        contributions = screening.along(screen.direction, reply.contributions, reply.anchored, *norms)
        note = reply.note
        if screen.anchors:
            note = "; ".join(n for n in (reply.note and f"learned direction: {reply.note}",
                                         reply.anchor_note and f"anchors: {reply.anchor_note}") if n)
        decision = screening.decide(items, contributions, alpha=screen.alpha, note=note, seed=run_id,
                                    companions=range(trained, len(items)),
                                    also=screening.tested_with(screen.direction, reply.contributions,
                                                               reply.anchored))
        figures = decision.figures(items, contributions, screen.alpha)
        figures.update(ms=reply.ms, n_tensors=reply.n_tensors, probed_fraction=reply.probed_fraction,
                       direction=screen.direction, n_anchors=reply.n_anchors,
                       p_by_direction=screening.p_by_direction(items, reply.contributions, reply.anchored, *norms,
                                                               seed=run_id))
        self.metrics["screen"] = figures
        held = decision.held_indices()
        if not held:
            return batch
        reasons = "; ".join(h.reason for h in decision.held)
        held_companions = [items[i] for i in sorted(held) if i >= trained]

        def record() -> None:
            with self.state.sessions() as s, s.begin():
                quarantine.hold(s, run_id, items, decision, figures)
                quarantine.consume(s, run_id, {r for c in held_companions for r in c.rating_ids})

        await asyncio.to_thread(record)
        log.warning("run %d: %d of %d items quarantined by the screen (%d of them waiting thumbs screened beside "
                    "the batch): %s", run_id, len(held), len(items), len(held_companions), reasons)
        kept = [item for i, item in enumerate(items[:trained]) if i not in held]
        if not kept:
            await asyncio.to_thread(self._refused, run_id, f"{reasons}; nothing was trained, the feedback is "
                                    "quarantined (GET /api/quarantine)", [], status="rejected")
            return None
        if len(kept) == trained:
            return batch
        return dataclasses.replace(batch, items=kept)

    def _refused(self, run_id: int, reason: str, history: list[Any], *, status: str = "refused") -> None:
        """Nothing was written. refused (not finite, over the cap): the feedback is released; rejected (the
        screen held the whole batch back): the feedback stays consumed while quarantined."""
        self.last_error = f"run {run_id}: update {status}: {reason}"
        self.metrics["refused_reason"] = reason
        self._finish_run(run_id, status, error=reason, history=history)

    # ------------------------------------------------------------ the apply

    async def _apply(self, run_id: int, mode: str) -> tuple[int, str | None]:
        """Apply the staged update; returns (live version, refusal reason or None)."""
        refused: list[str] = []

        async def work(t: dict[str, float]) -> bool:
            t1 = time.perf_counter()
            try:
                # lowmem: Apply runs the second backward pass, so it gets a step's time limit
                reply = await self.control.call(p.Apply(run_id=run_id, skip=self.weights.unpaused),
                                                timeout=TRAIN_TIMEOUT_S if mode == "lowmem" else APPLY_TIMEOUT_S)
            except (WorkerUnavailable, WorkerTimeout) as e:  # it may have stopped halfway through the weights
                self.metrics["torn_apply"] = str(e)
                await self.recovery.torn_apply(run_id, e)
                raise
            t["apply_rtt_ms"] = (time.perf_counter() - t1) * 1000
            if isinstance(reply, p.Refused):
                refused.append(reply.reason)
                return False
            assert isinstance(reply, p.Applied)
            left = self.weights.unpaused  # out of routing already, each with its own why
            self.state.replicas_lost([k for k in reply.lost if k not in left],
                                     f"could not write run {run_id}'s update in the pause")
            t["apply_ms"] = reply.ms
            if reply.remote_ms is not None:
                t["remote_commit_ms"] = reply.remote_ms
            t3 = time.perf_counter()
            await asyncio.to_thread(self.versions.new, "train", self.state.weight_version, run_id, None, None)
            t["record_ms"] = (time.perf_counter() - t3) * 1000
            return True

        timings = await self.weights.change(work, atomic=mode != "hogwild", yields=True, spare=True)
        self.metrics.update({k: round(v, 3) for k, v in timings.items()})
        if self.weights.left_behind:  # replicas whose pause failed: still on the old weights, out of routing
            self.metrics["replicas_left_behind"] = list(self.weights.left_behind)
        if self.weights.unpaused:  # every replica this write skipped (left behind or out of routing): synced later
            self.metrics["replicas_not_written"] = list(self.weights.unpaused)
        return self.state.weight_version, (refused[0] if refused else None)
