"""The scheduler: turns new feedback into weight updates on its own, one run at a time, guarded.

An asyncio task in the API process (`Scheduler(state)`, started by `loop serve` when `scheduler_enabled`). Every
`poll_s` it counts the trainable feedback (loop/scheduler/batches.py: not consumed, not held out; the count is
reused until the feedback changes, loop/readcache.py, so ticks and polled status stay cheap) and starts a run
when one of three triggers fires, recording which one and why on the run (`trigger="scheduler"`,
`batch["scheduler"]["reason"]`):
- threshold: at least `min_pairs` pairs/examples wait;
- max wait: the oldest waiting feedback is older than `max_wait_s`;
- interval: every `interval_s`, whatever waits (if anything) is trained on.
Runs never overlap (one lock; a manual run in progress also defers the scheduler). Each run:
1. builds the batch; freezes its eval set: the held-out pairs whose feedback is older than the previous scheduled
   batch and than every item of this one (`_eval_cutoff`; recorded as `batch["scheduler"]["eval_set"]`);
   measures the eval guard (held-out margins and accuracy, canary perplexity) on the live weights and makes sure
   the live version has a checkpoint to roll back to;
2. hands the batch to the Trainer (records the run, marks the feedback consumed, applies atomically under vLLM's
   pause, releases the feedback if the run fails) with a screen (`poison_alpha` > 0): before training, the worker
   measures how each item pulls along the weights' change since the base model, and the items that pull back at
   that significance level, per rater and for the batch, are quarantined for an operator (re-queue or drop;
   loop/scheduler/screening.py) — the rest trains, and if nothing is left the run is `rejected`;
3. measures the same pairs again, and the live weights against the base model (loop/scheduler/watch.py: drift
   and the canary answers' health); when the update moved their margins the wrong way, accuracy fell or perplexity
   rose past the limits (guard.verdict), or the answers degenerated, restores the pre-update version in place
   (Trainer.restore, same pause protocol), marks the run `rolled_back` with the reason and the figures, and the
   rolled-back version `rolled_back`; past the drift budget it also pauses itself (drift only grows with further
   runs) and says why. Eval figures are stored on the WeightVersion rows (`eval`).
   Feedback consumed by a rolled-back run stays consumed: a poisoned batch is not retried.
State (paused, the interval clock, last run, runtime threshold overrides) lives in the `scheduler_state` table,
so a restart keeps the schedule. Thresholds can be changed at runtime (`POST /api/scheduler/config`, admin;
one model of them, derived from Settings: loop/scheduler/tunables.py).

Unit tests with a fake trainer: `.venv/bin/pytest tests/unit/scheduler/test_scheduler.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime, timezone
from typing import Any, Callable

from sqlalchemy import select

from loop import pairs
from loop.db.models import SchedulerState, TrainingRun, WeightVersion
from loop.readcache import Read, ReadCache
from loop.scheduler import batches, tunables
from loop.scheduler.guard import (
    EvalFigures,
    EvalGuard,
    GuardError,
    load_tokenizer,
    verdict,
)
from loop.scheduler.health import DriftLimits, HealthLimits
from loop.scheduler.watch import BaseWatch, Verdict
from loop.training import quarantine
from loop.training.versions import VersionRecords

log = logging.getLogger("loop.scheduler")

STATE_KEY = "scheduler"
TERMINAL = ("succeeded", "failed", "refused", "rejected", "rolled_back", "lost")
_TIMES = ("next_interval_at", "paused_at", "last_run_at")  # stored epoch seconds


def _sane_state(stored: dict[str, Any]) -> dict[str, Any]:
    """The stored state with anything a route could not use (a threshold out of range or not finite, a time that
    is no timestamp) dropped, each with a warning: a bad row must not break the scheduler or its routes."""
    state = dict(stored)
    overrides = state.get("overrides")
    if not isinstance(overrides, dict):
        if overrides is not None:
            log.warning("ignoring stored scheduler overrides %r: not an object", overrides)
        overrides = {}
    kept = {}
    for name, value in overrides.items():
        try:
            kept[name] = tunables.check(name, value)
        except ValueError as exc:
            log.warning("ignoring the stored scheduler setting %s=%r (%s); using the configured value", name,
                        value, exc)
    state["overrides"] = kept
    for key in _TIMES:
        value = state.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1e11):
            log.warning("ignoring the stored scheduler time %s=%r: not a timestamp", key, value)
            state.pop(key)
    return state


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat() if ts is not None else None


class Scheduler:
    def __init__(self, state: Any, *, guard: EvalGuard | None = None, watch: BaseWatch | None = None,
                 clock: Callable[[], float] = time.time, poll_s: float | None = None,
                 run_timeout_s: float = 3600.0) -> None:
        self.state = state
        self.settings = state.settings
        self.guard = guard
        self.watch = watch  # made beside the guard when the scheduler makes its own
        self.clock = clock
        self.poll_s = poll_s
        self.run_timeout_s = run_timeout_s
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.running_run_id: int | None = None
        self._requested: str | None = None  # "run now" asked through the API (admin)
        self.last_error: str | None = None
        self.last_decision: str | None = None
        self.raters_left_out: dict[str, dict[str, Any]] = {}
        self._pool_cache: ReadCache[batches.Pool] = ReadCache()
        self._persisted = self._load()
        if self._persisted.get("next_interval_at") is None:
            self._save(next_interval_at=self.clock() + self.config()["interval_s"])

    # ------------------------------------------------------------------ persisted state
    def _load(self) -> dict[str, Any]:
        with self.state.sessions() as s:
            row = s.get(SchedulerState, STATE_KEY)
            value = row.value if row is not None else {}
        if not isinstance(value, dict):
            log.warning("ignoring the stored scheduler state %r: not an object", value)
            value = {}
        return _sane_state(value)

    def _save(self, **changes: Any) -> None:
        self._persisted.update(changes)
        with self.state.sessions() as s:
            row = s.get(SchedulerState, STATE_KEY)
            if row is None:
                s.add(SchedulerState(key=STATE_KEY, value=dict(self._persisted)))
            else:
                row.value = dict(self._persisted)  # a new dict, so SQLAlchemy sees the JSON change
            s.commit()

    @property
    def paused(self) -> bool:
        return bool(self._persisted.get("paused", False))

    def pause(self, *, by: str = "operator", reason: str | None = None) -> None:
        """Stop starting runs. `by`: "operator" (the API, the CLI) or "drift" (the drift budget was reached:
        every further run would add to it), with the reason shown in the status until someone resumes."""
        self._save(paused=True, paused_at=self.clock(), paused_by=by, paused_reason=reason)

    def resume(self) -> None:
        self._save(paused=False, paused_at=None, paused_by=None, paused_reason=None)
        self._wake.set()

    def request_run(self, why: str = "requested through the API") -> None:
        """Train on whatever waits at the next tick, thresholds aside (still one run at a time, still guarded)."""
        self._requested = why
        self._wake.set()

    def config(self) -> dict[str, Any]:
        """Effective thresholds: Settings, overridden by what was set at runtime (persisted)."""
        return self.config_from(self._persisted.get("overrides", {}))

    def configure(self, **changes: Any) -> dict[str, Any]:
        """Change thresholds at runtime (persisted; survives restarts). Unknown names, values of the wrong type,
        not finite or outside the settings' ranges (loop/scheduler/tunables.py) raise ValueError, and nothing
        changes; None resets a threshold to its setting."""
        unknown = sorted(set(changes) - set(tunables.SETTING))
        if unknown:
            raise ValueError(f"unknown scheduler setting(s) {unknown}; known: {sorted(tunables.SETTING)}")
        overrides = dict(self._persisted.get("overrides", {}))
        for name, value in changes.items():
            if value is None:
                overrides.pop(name, None)
            else:
                overrides[name] = tunables.check(name, value)
        update: dict[str, Any] = {"overrides": overrides}
        if "interval_s" in changes:  # a new interval starts counting now
            update["next_interval_at"] = self.clock() + self.config_from(overrides)["interval_s"]
        self._save(**update)
        self._wake.set()
        return self.config()

    def config_from(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return tunables.effective(self.settings, overrides).model_dump()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        # only the trainer of the database (loop/training/leader.py): another process's runs are not interrupted
        recovered = await asyncio.to_thread(self.recover_interrupted) if self.state.trainer is not None else []
        if recovered:
            log.warning("runs %s were interrupted by a stop; marked failed, feedback released", recovered)
        if self._task is None and self.settings.scheduler_enabled:
            self._task = asyncio.create_task(self._loop(), name="loop-scheduler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    def _poll_interval(self) -> float:
        return self.poll_s if self.poll_s is not None else max(0.2, min(5.0, self.config()["interval_s"] / 2))

    async def _measure_base_early(self) -> None:
        """The base figures (drift, generation health) while version 0 is still served, before any run (a manual
        one through the API included) changes the weights; a failure here is retried before the first run."""
        if self.state.trainer is None or self.state.weight_version != 0:
            return
        try:
            cfg = self.config()
            if await self._ensure_guard() is None and not (cfg["drift_enabled"] or cfg["health_enabled"]):
                return
            async with self._lock:
                if self.state.weight_version == 0 and not getattr(self.state.trainer, "busy", False):
                    await self._watch_base(cfg)
        except Exception as exc:  # noqa: BLE001 - vLLM may still be starting: the first run tries again
            log.info("base figures not taken at start-up (%s); the first scheduled run takes them", exc)

    async def _loop(self) -> None:
        await self._measure_base_early()
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the scheduler must outlive one bad tick
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("scheduler tick failed")
            self._wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_interval())

    # ------------------------------------------------------------------ decisions
    def _pool(self) -> batches.Pool:
        with self.state.sessions() as s:
            return batches.collect(s, holdout_fraction=self.settings.holdout_fraction)

    def _waiting(self) -> batches.Pool:
        """What waits, for deciding and for status: the pool as `_pool` builds it, reused until a rating,
        comparison, consumption or held-out mark changes it (pairs.inputs_key), so a tick or a polled status
        costs a few indexed reads while nothing new came in. Read-only: a run builds its batch from a fresh pool."""
        return self._read_pool().value

    def _read_pool(self, *, stale_ok: bool = False) -> Read[batches.Pool]:
        """`_waiting`'s pool with when it was counted; `stale_ok`: the last one at once while a recount runs."""
        with self.state.sessions() as s:
            return self._pool_cache.read(lambda: pairs.inputs_key(s),
                                         lambda: batches.collect(s, holdout_fraction=self.settings.holdout_fraction),
                                         stale_ok=stale_ok, refresh=self._waiting)

    def _busy(self) -> bool:
        return self._lock.locked() or bool(getattr(self.state.trainer, "busy", False))

    def recover_interrupted(self) -> list[int]:
        """Runs left 'running'/'queued' by a process that died mid-run (nobody is running them now): mark them
        failed and release their feedback, so it is trained on later — once, since the weights of a run that
        never recorded its new version were not kept (vLLM restarts from the newest checkpoint)."""
        if self._busy():
            return []
        with self.state.sessions() as s:
            runs = s.scalars(select(TrainingRun).where(TrainingRun.status.in_(("queued", "running")))).all()
            for run in runs:
                run.finished_at = datetime.now(timezone.utc)
                kept = s.scalar(select(WeightVersion).where(WeightVersion.run_id == run.id,
                                                            WeightVersion.checkpoint_path.is_not(None))
                                .order_by(WeightVersion.version.desc()).limit(1))
                if kept is not None:  # its update was applied and checkpointed: it did train on that feedback
                    run.status, run.version_after = "succeeded", kept.version
                    run.error = "interrupted after its update was applied and checkpointed; feedback kept consumed"
                    continue
                run.status = "failed"
                run.error = "interrupted: loop stopped during the run; its feedback was released"
                if run.version_after is None:
                    run.version_after = run.version_before
                quarantine.release(s, run.id)
            s.commit()
            return [r.id for r in runs]

    async def tick(self) -> int | None:
        """Check the triggers once; start (and await) a run when one fires. Returns the run id, if any."""
        if self.paused or self.state.trainer is None:
            self.last_decision = "paused" if self.paused else "no trainer"
            return None
        if await asyncio.to_thread(self._busy):
            self.last_decision = "a run is in progress"
            return None
        cfg = self.config()
        now = self.clock()
        pool = await asyncio.to_thread(self._waiting)
        counts = pool.counts()
        waiting = counts["pairs"] + counts["examples"]
        oldest = pool.oldest()
        due = now >= float(self._persisted.get("next_interval_at") or 0)
        if due:  # the interval clock ticks whether or not anything waits
            self._save(next_interval_at=now + cfg["interval_s"], last_interval_at=now)
        reason = trigger = None
        requested, self._requested = self._requested, None
        if requested and waiting:
            trigger, reason = "requested", f"{requested}; {waiting} items wait"
        elif waiting >= cfg["min_pairs"]:
            trigger, reason = "threshold", f"{waiting} untrained items wait (threshold {cfg['min_pairs']})"
        elif waiting and oldest is not None and now - oldest.timestamp() >= cfg["max_wait_s"]:
            trigger, reason = "max_wait", (f"oldest untrained feedback is {now - oldest.timestamp():.0f} s old "
                                           f"(max wait {cfg['max_wait_s']:.0f} s)")
        elif waiting and due:
            trigger, reason = "interval", f"interval of {cfg['interval_s']:.0f} s elapsed; {waiting} items wait"
        if trigger is None:
            self.last_decision = f"waiting: {waiting} items < {cfg['min_pairs']}"
            return None
        self.last_decision = f"{trigger}: {reason}"
        return await self.run_once(trigger, reason)

    # ------------------------------------------------------------------ one run
    async def _ensure_guard(self) -> EvalGuard | None:
        if self.guard is None and self.config()["guard_enabled"]:
            from loop.model_cache import resolve_model

            model_dir = getattr(self.state.supervisor, "model_path", None) or resolve_model(
                self.settings.model, self.settings.cache_dir, progress=False)
            tokenizer = await asyncio.to_thread(load_tokenizer, str(model_dir))
            self.guard = EvalGuard(self.state.vllm, tokenizer, max_len=self.settings.max_model_len)
            if self.watch is None:
                from loop.model_cache import base_model_dir

                base = await asyncio.to_thread(base_model_dir, self.settings)
                self.watch = BaseWatch(self.state.vllm, tokenizer, data_dir=self.settings.data_dir,
                                       model=base or str(self.settings.model), max_len=self.settings.max_model_len)
        return self.guard if self.config()["guard_enabled"] else None

    async def _watch_base(self, cfg: dict[str, Any]) -> BaseWatch | None:
        """The base watch, with the base figures in hand if they can be had (measured now on version 0)."""
        if self.watch is None or not (cfg["drift_enabled"] or cfg["health_enabled"]):
            return None
        try:
            await self.watch.ensure_base(live_is_base=self.state.weight_version == 0,
                                         still_base=lambda: self.state.weight_version == 0)
        except GuardError as exc:
            self.watch.note = f"the base figures could not be measured: {exc}"
            log.warning("%s", self.watch.note)
        return self.watch if self.watch.ready else None

    def _replay(self, batch: batches.Batch, eval_items: list[pairs.Item], limit: int, tokenizer: Any
                ) -> list[pairs.Item]:
        """Kept pairs to train again beside `batch` (`batches.replay_pairs`), none of the eval set's: the guard
        judges the write by how those pairs' margins move, and training them would hide a poisoned batch's pull."""
        if limit <= 0 or batch.objective != "dpo":
            return []
        with self.state.sessions() as s:
            return batches.replay_pairs(s, batch, limit=limit, seed=min(batch.comparison_ids + batch.rating_ids,
                                                                            default=0),
                                        exclude=eval_items, tokenizer=tokenizer,
                                        max_prompt_tokens=self.settings.max_prompt_tokens)

    async def run_once(self, trigger: str, reason: str, *, pool: batches.Pool | None = None) -> int | None:
        async with self._lock:
            cfg = self.config()
            guard = await self._ensure_guard()
            if pool is None:
                pool = await asyncio.to_thread(self._pool)
            tokenizer = guard.tokenizer if guard is not None else None

            left_out: dict[str, dict[str, Any]] = {}
            companions: list[pairs.Item] = []

            def build(chosen_from: batches.Pool) -> batches.Batch | None:  # reads the chosen items' prompts
                with self.state.sessions() as s:
                    if cfg["rater_min_agreement"] is not None:
                        left_out.update(batches.disagreeing_raters(s, cfg["rater_min_agreement"],
                                                                   cfg["rater_agreement_min_pairs"]))
                        if left_out:
                            chosen_from = batches.collect(s, holdout_fraction=self.settings.holdout_fraction,
                                                          exclude_raters=left_out)
                    built = batches.build_batch(s, chosen_from, limit=cfg["batch_size"], tokenizer=tokenizer,
                                                max_prompt_tokens=self.settings.max_prompt_tokens)
                    if built is not None and cfg["poison_alpha"] > 0:
                        companions.extend(batches.companions(s, chosen_from, built,
                                                             limit=self.settings.screen_companions,
                                                             tokenizer=tokenizer,
                                                             max_prompt_tokens=self.settings.max_prompt_tokens))
                    return built

            batch = await asyncio.to_thread(build, pool)
            self.raters_left_out = left_out
            if batch is None:
                return None
            before: EvalFigures | None = None
            eval_items: list[pairs.Item] = []
            built_at = datetime.now(timezone.utc)  # wall clock, like the feedback rows' created_at
            eval_set: dict[str, Any] = {}
            if guard is not None:
                frozen_at = self._eval_cutoff(batch, built_at)
                eval_items = await asyncio.to_thread(self._eval_items, frozen_at)
                eval_set = {"eval_set": {"created_before": frozen_at.isoformat(), "n_pairs": len(eval_items),
                                         "n_replayed": sum(not i.held_out for i in eval_items),
                                         "comparison_ids": sorted({c for i in eval_items for c in i.comparison_ids}),
                                         "rating_ids": sorted({r for i in eval_items for r in i.rating_ids})}}
                before = await guard.measure([_eval_pair(i) for i in eval_items])
                await self._watch_base(cfg)
                await self.state.trainer.checkpoint()  # rollback restores it (the live one's is reused if it has one)
            # replay fills the run up to batch_size and never past it: batch_size is what an operator sizes a
            # run's memory by, so a full batch of new feedback trains alone
            room = max(0, cfg["batch_size"] - len(batch.items))
            replay = await asyncio.to_thread(self._replay, batch, eval_items, min(cfg["replay_pairs"], room),
                                             tokenizer)
            from loop.training import TrainRequest

            request = TrainRequest(objective=batch.objective, rating_ids=batch.rating_ids,
                                   comparison_ids=batch.comparison_ids, steps=cfg["steps"],
                                   learning_rate=cfg["learning_rate"], nll_weight=cfg["nll_weight"])
            started = self.clock()
            from loop.model_cache import (
                base_model_dir,  # the screen's base: what "learned" is measured from
            )
            from loop.training.runs import ScreenPolicy

            base = await asyncio.to_thread(base_model_dir, self.settings)
            anchors = tuple(_eval_pair(i) for i in eval_items[:self.settings.screen_anchors]) \
                if self.settings.screen_anchors else ()
            screen = (ScreenPolicy(base, cfg["poison_alpha"], tuple(companions), anchors=anchors,
                                   direction=self.settings.screen_direction)
                      if base and cfg["poison_alpha"] > 0 else None)
            handle = await self.state.trainer.run(request, batch=batch, trigger="scheduler", screen=screen,
                                                  replay=replay)
            run_id = handle.id
            self._save(last_batch_at=built_at.isoformat())
            self.running_run_id = run_id
            try:
                await asyncio.to_thread(self._annotate, run_id, {"trigger": trigger, "reason": reason,
                                                                 **batch.summary(), **eval_set,
                                                                 "raters_left_out": left_out})
                status = await handle.finished(self.run_timeout_s)
                if status == "succeeded" and guard is not None and before is not None:
                    try:
                        after = await guard.measure([_eval_pair(i) for i in eval_items], before=before)
                        watch = await self._watch_base(cfg)
                        if watch is not None:
                            figures = await watch.measure()
                            after.drift, after.health = (figures or {}).get("drift"), (figures or {}).get("health")
                    except GuardError as exc:  # cannot judge: keep the update, say so on the run
                        self.last_error = f"eval after run {run_id} failed: {exc}"
                        await asyncio.to_thread(self._record_eval, run_id, before, None, None)
                    else:
                        await self._judge(run_id, before, after, cfg)
                elif before is not None:
                    await asyncio.to_thread(self._record_eval, run_id, before, None, None)
            finally:
                self.running_run_id = None
                self._save(last_run_id=run_id, last_run_at=started, last_trigger=trigger, last_reason=reason)
            return run_id

    def _eval_cutoff(self, batch: batches.Batch, built_at: datetime) -> datetime:
        """The instant the run's eval set is frozen at: the batch's feedback began to be collected when the previous
        scheduled batch was built, and no pair may be newer than the batch's oldest item (feedback left over from
        earlier, e.g. released by a failed run). Held-out pairs from the same collection window share the batch's
        rater and session — a poisoned round's own held-out pairs carry its flipped labels — so they judge the
        next run instead (see guard.py)."""
        times = [t for t in (batch.oldest(), _parse(self._persisted.get("last_batch_at"))) if t is not None]
        return min(times) if times else built_at

    def _eval_items(self, created_before: datetime | None = None) -> list[pairs.Item]:
        with self.state.sessions() as s:
            return batches.eval_pairs(s, self.settings, created_before=created_before)

    def _annotate(self, run_id: int, info: dict[str, Any]) -> None:
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            if run is not None:
                run.trigger = "scheduler"
                run.batch = {**(run.batch or {}), "scheduler": info}
                s.commit()

    def _record_eval(self, run_id: int, before: EvalFigures, after: EvalFigures | None,
                     rollback: dict[str, Any] | None) -> None:
        """The run's eval figures and verdict, and (through the version records, in the same transaction) the
        figures of the versions it measured and the rollback's marks."""
        with self.state.sessions() as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                return
            metrics = dict(run.metrics or {})
            metrics["eval_before"] = before.to_dict()
            if after is not None:
                metrics["eval_after"] = after.to_dict()
            measured_at = _iso(self.clock())
            VersionRecords.note_eval(s, run.version_before, before.to_dict(), run_id, measured_at)
            VersionRecords.note_eval(s, run.version_after, after.to_dict() if after is not None else None, run_id,
                                     measured_at)
            if rollback is not None:
                metrics["rollback"] = rollback
                run.status = "rolled_back"
                run.error = f"rolled back by the eval guard: {rollback['reason']}"
                VersionRecords.note_rollback(s, run_id, run.version_after, rollback.get("restored_version"),
                                             run.version_before, rollback["reason"])
            run.metrics = metrics
            s.commit()

    def _watch_verdict(self, after: EvalFigures, cfg: dict[str, Any]) -> Verdict:
        if self.watch is None or after.drift is None or after.health is None:
            return Verdict()
        s = self.settings
        drift = (DriftLimits(max_perplexity_vs_base=cfg["max_perplexity_vs_base"], max_kl_per_token=cfg["max_drift_kl"])
                 if cfg["drift_enabled"] else None)
        health = (HealthLimits(max_stutter_rise=s.max_stutter_rise, max_collapse_rise=s.max_collapse_rise,
                               max_unfinished_rise=s.max_unfinished_rise, max_distinct_2_drop=s.max_distinct2_drop)
                  if cfg["health_enabled"] else None)
        return self.watch.verdict({"drift": after.drift, "health": after.health}, drift, health)

    async def _judge(self, run_id: int, before: EvalFigures, after: EvalFigures, cfg: dict[str, Any]) -> None:
        found = verdict(before, after, max_accuracy_drop=cfg["max_accuracy_drop"],
                        max_perplexity_rise=cfg["max_perplexity_rise"], min_pairs=self.settings.eval_min_pairs,
                        margin_alpha=cfg["margin_alpha"], accuracy_alpha=cfg["accuracy_alpha"])
        watched = self._watch_verdict(after, cfg)
        why = "; ".join(r for r in (found, watched.reason) if r) or None
        if watched.drift:  # a total that every further run adds to: stop training until an operator decides
            self.last_error = (f"training paused after run {run_id}: {watched.drift}. Raise the limit "
                               f"(max_drift_kl / max_perplexity_vs_base in POST /api/scheduler/config) or turn "
                               f"drift_enabled off, then resume")
            self.pause(by="drift", reason=self.last_error)
            log.warning("%s", self.last_error)
        if why is None:
            await asyncio.to_thread(self._record_eval, run_id, before, after, None)
            return
        with self.state.sessions() as s:
            version_before = s.get(TrainingRun, run_id).version_before
        log.warning("run %s regressed, rolling back to version %s: %s", run_id, version_before, why)
        rollback: dict[str, Any] = {"reason": why, "to_version": version_before}
        try:
            result = await self.state.trainer.restore(version_before)
            rollback["restored_version"] = _version_of(result)
            rollback["check"] = (await self.guard.measure([])).to_dict() if self.guard is not None else None
        except Exception as exc:  # noqa: BLE001 - record the failure on the run; the operator must act
            rollback["error"] = f"restore failed: {exc}"
            self.last_error = rollback["error"]
        await asyncio.to_thread(self._record_eval, run_id, before, after, rollback)

    # ------------------------------------------------------------------ status
    def describe(self, *, stale_ok: bool = False) -> dict[str, Any]:
        """The status. With `stale_ok` (the UI's timers) the untrained counts never wait for the pool to be
        rebuilt: while that runs in the background they are the previous ones, `untrained_fresh: false`."""
        cfg = self.config()
        counts: dict[str, Any] = {}
        oldest = as_of = None
        fresh = True
        try:
            read = self._read_pool(stale_ok=stale_ok)
            pool, as_of, fresh = read.value, read.as_of, read.fresh
            counts = pool.counts()
            oldest = pool.oldest()
        except Exception as exc:  # noqa: BLE001 - status must answer even if the DB hiccups
            counts = {"error": str(exc)}
        now = self.clock()
        p = self._persisted
        next_at = float(p.get("next_interval_at") or now)
        if oldest is not None:
            next_at = min(next_at, oldest.timestamp() + cfg["max_wait_s"])
        waiting = counts.get("pairs", 0) + counts.get("examples", 0)
        return {
            "state": "paused" if self.paused else ("training" if self.running_run_id else "idle"),
            "enabled": self.settings.scheduler_enabled,
            "paused": self.paused,
            "paused_by": p.get("paused_by") if self.paused else None,
            "paused_reason": p.get("paused_reason") if self.paused else None,
            "running_run_id": self.running_run_id,
            "thresholds": cfg,
            "untrained": counts,
            "oldest_untrained_at": oldest.isoformat() if oldest else None,
            "next_trigger_estimate": ("now" if waiting >= cfg["min_pairs"] else _iso(max(next_at, now)))
            if not self.paused else None,
            "next_interval_at": _iso(p.get("next_interval_at")),
            "last_run_id": p.get("last_run_id"),
            "last_run_at": _iso(p.get("last_run_at")),
            "last_trigger": p.get("last_trigger"),
            "last_reason": p.get("last_reason"),
            "last_decision": self.last_decision,
            "last_error": self.last_error,
            "untrained_as_of": datetime.fromtimestamp(as_of, timezone.utc).isoformat() if as_of else None,
            "untrained_fresh": fresh,
            # rater_min_agreement: the raters the last batch left out, with their agreement figures
            "raters_left_out": self.raters_left_out,
        }


def _eval_pair(item: pairs.Item) -> Any:
    return item.pair


def _parse(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso) if iso else None


def _version_of(result: Any) -> int | None:
    if isinstance(result, int):
        return result
    if isinstance(result, dict):
        return result.get("version")
    return getattr(result, "version", None)
