"""The training worker process: an HF model made of views into vLLM's live weights, trained in place.

Started and supervised by the API (`loop/control.py`) with one argument, its config as JSON (every field of
`WorkerConfig` in loop/worker/config.py, which `worker_command(settings, endpoint)` writes; no defaults here):
    python -m loop.worker.main '{"endpoint": "ipc://<runtime_dir>/worker.sock", "runtime_dir": "<runtime_dir>", ...}'

What it does, in order:
1. Connects its DEALER (`channel.py`: heartbeats from an I/O thread, so a long backward never looks dead) and
   reports "waiting" until vLLM's loop plugin has written the handle file into the runtime dir.
2. Attaches to vLLM's weights (`handles.attach`, no copy), builds the HF model on them (`views.build_model`),
   marks the trainable parameters and builds the staged optimizer; says `Hello`.
3. Serves requests one at a time (protocol.py): `Screen` measures how each item of a batch pulls along what the
   kept runs taught, writing nothing (loop/worker/screen.py); `Train` computes a staged update — reference log-probs,
   forward, backward, optimizer maths — while vLLM keeps serving; `Apply` (sent while the API holds vLLM paused)
   finds it checked (finite, ratio cap) and already rounded (stochastic rounding, done before the pause),
   copies it in place and commits the optimizer
   state (with `Train.lowmem` the update is only measured in `Train`, and `Apply` writes it by replaying the
   backward: loop/worker/lowmem.py); `Train` and `Screen` rest between decoder layers while vLLM has work
   (`train_share` < 1, loop/worker/pacing.py), `Apply` never does; `Discard` drops it (optimizer state as
   before); `Checkpoint` writes an HF folder atomically; `Restore` copies a checkpoint back into the live
   weights through the same views.
4. Before each request, and every few idle seconds, compares the handle file's load id with its own: a new id
   means vLLM restarted (new memory), so it re-attaches, keeping the optimizer state.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from loop.worker import protocol as p
from loop.worker.channel import Channel
from loop.worker.checkpoint import checkpoint_tensors, restore_targets, write_folder
from loop.worker.config import EXIT_REFUSED, REFUSED_PREFIX, WorkerConfig
from loop.worker.pacing import Pacer, VLLMLoad, default_share, lower_priority, share_cpu_cores

log = logging.getLogger("loop.worker")

# Files of a model folder that are not weights: copied into every checkpoint so it loads on its own.
OPTIMIZER_DIR, OPTIMIZER_FILE = "optimizer", "optimizer.safetensors"


class Worker:
    def __init__(self, config: WorkerConfig, channel: Channel) -> None:
        self.config = config
        self.ch = channel
        self.runtime_dir = Path(config.runtime_dir)
        self.model: Any = None
        self.tokenizer: Any = None
        self.opt: Any = None
        self.meta: dict[str, Any] = {}
        self.names: dict[Any, str] = {}
        self.trainable: list[tuple[str, Any]] = []
        self._staged: tuple[int, dict[Any, Any] | None, Any] | None = None  # (run_id, new values, UpdateCheck)
        self._lowmem: Any = None  # loop.worker.lowmem.PausedBackward of train_mode=lowmem (values None above)
        self._run: dict[str, Any] = {}  # the current run's encoded batch, reference log-probs and history
        # Train and Screen yield to serving while vLLM has work (train_share < 1); Apply never does
        self.pacer = Pacer(1.0, lambda: False)  # set for the device at attach
        self.cores = os.sched_getaffinity(0)  # on the CPU, each load's split starts from these
        # tensor parallel (loop/worker/tp.py): this process's rank; rank 0 answers the API and starts the others
        self.rank = int(os.environ.get("LOOP_WORKER_RANK", "0"))
        self.tp: Any = None
        self.ranks: list[Any] = []  # rank 0: the processes of ranks 1..N-1
        # replicas 1..K-1 (loop/worker/mirrors.py): every write to these weights is copied into them
        from loop.worker.mirrors import Mirrors

        self.mirrors = Mirrors(config.mirrors, self.rank)
        self.vllm_tensors: dict[str, Any] = {}  # replica 0's tensors by vLLM name, what the mirrors copy
        # replicas on other hosts (loop/worker/remotes.py): staged over the network before the pause, written in it
        from loop.worker.config import REPLICA_TOKEN_ENV
        from loop.worker.remotes import Remotes

        self.remotes = Remotes(config.remotes, os.environ.get(REPLICA_TOKEN_ENV), first=len(config.mirrors) + 1,
                               min_mb_s=config.remote_min_mb_s, rank=self.rank)

    # ------------------------------------------------------------ attach

    def current_load_id(self) -> str | None:
        from loop.worker.handles import HandleError, read_handles

        try:
            return str(read_handles(self.runtime_dir).meta["load_id"])
        except HandleError:
            return None

    def attach(self) -> None:
        """Wait for vLLM's handle file, attach, build the model on views; keep optimizer state across loads."""
        self.ch.state = "waiting"
        first = self.runtime_dir / "weights-tp0.json"
        said = time.monotonic()
        while not first.exists():  # wait before importing torch: an idle worker stays small (~50 MB)
            if time.monotonic() - said > 60:
                log.info("waiting for vLLM's weight-handle file %s", first)
                said = time.monotonic()
            time.sleep(0.5)
        import torch
        from transformers import AutoTokenizer

        from loop.worker.apollo import make_optimizer, trainable_parameters
        from loop.worker.handles import HandleError, attach, read_handles
        from loop.worker.views import build_model, layout_of, views_alias

        self.ch.state = "waiting"
        said = 0.0
        while True:
            try:
                handle_set = read_handles(self.runtime_dir, wait_s=5.0)
                break
            except HandleError as e:
                if time.monotonic() - said > 60:  # say it now and then, not every poll
                    log.info("waiting for vLLM's weight handles: %s", e)
                    said = time.monotonic()
        t0 = time.perf_counter()
        world = int(handle_set.meta["tp_size"])
        if self.tp is not None and self.tp.world != world:
            raise GroupRestart(f"vLLM now runs with tensor parallel {world}, the worker's group has {self.tp.world}")
        if world > 1 and self.tp is None:
            self._join_group(world, handle_set.meta["device"])
        from loop.worker.views import rank_meta

        tensors = attach(handle_set, self.rank)
        meta = rank_meta(handle_set, self.rank)
        try:
            layout = layout_of(meta)
            model = build_model(meta["model_path"], tensors, layout=layout, tp=self.tp)
        except ValueError as e:  # not every weight is a view: nothing to train in place, now or after a restart
            raise ModelRefused(str(e)) from e
        views_alias(model, tensors)
        self.vllm_tensors = tensors
        self.mirrors.attached.clear()  # replica 0 reloaded: the API syncs every replica from the new weights
        self.remotes.forget()
        self.remotes.device, self.remotes.world = str(handle_set.meta.get("device", "cpu")), world
        if meta.get("device") == "cpu" and self.config.cpu_nice:  # the API processes first (settings say why)
            lower_priority(os.getpid(), self.config.cpu_nice)
        if meta.get("device") == "cpu" and meta.get("pid") and self.tp is None:
            share_cpu_cores(int(meta["pid"]), self.cores)
        self._pace(meta.get("device", "cpu"))
        model.train(False)  # no dropout: the DPO reference and the policy must see the same function
        old_state = self.opt.state_dict() if self.opt is not None else None
        self.model, self.meta = model, meta
        self.trainable = trainable_parameters(model)
        self.names = {prm: name for name, prm in self.trainable}
        self.opt = make_optimizer(self.config.optimizer, [prm for _, prm in self.trainable],
                                  lr=self.config.learning_rate)
        self.opt.tp = self.tp
        if old_state is not None:
            try:
                self.opt.load_state_dict(old_state)
            except (ValueError, KeyError, IndexError) as e:
                log.warning("optimizer state does not fit the new load (%s); starting it fresh", e)
        if self.tokenizer is None or meta["model_path"] != getattr(self.tokenizer, "name_or_path", None):
            self.tokenizer = AutoTokenizer.from_pretrained(meta["model_path"])
        self._staged, self._run, self._lowmem = None, {}, None
        self.ch.load_id = meta["load_id"]
        self.ch.state = "idle"
        n_params = sum(prm.numel() for prm in model.parameters())
        n_train = sum(prm.numel() for _, prm in self.trainable)
        log.info("attached to load %s (%s, %d params, %d trainable) in %.2f s", meta["load_id"], meta["model_path"],
                 n_params, n_train, time.perf_counter() - t0)
        torch.set_grad_enabled(True)
        self.ch.send(p.Hello(pid=os.getpid(), load_id=meta["load_id"], model_path=meta["model_path"],
                             architecture=meta["architecture"], device=meta["device"], n_params=n_params,
                             n_trainable=n_train, optimizer=self.config.optimizer, train_share=self.pacer.share,
                             layout=layout.kinds(), tensor_parallel=self.tp.world if self.tp else 1))

    def _join_group(self, world: int, device: str) -> None:
        """Tensor parallel: rank 0 starts the other ranks; every rank joins the group (loop/worker/tp.py)."""
        import torch

        from loop.worker.tp import init_group, remove_stale_rendezvous, rendezvous_file, start_ranks

        if self.rank == 0:
            remove_stale_rendezvous(self.runtime_dir)
            rendezvous = rendezvous_file(self.runtime_dir, os.getpid())
            rendezvous.unlink(missing_ok=True)
            self.ranks = start_ranks(self.config.encode(), world, rendezvous)
        else:
            rendezvous = Path(os.environ["LOOP_WORKER_RENDEZVOUS"])
        if device == "cpu":  # the ranks share this process's cores (vLLM's ranks have their own binding)
            torch.set_num_threads(max(1, len(self.cores) // world))
        self.tp = init_group(self.rank, world, rendezvous, device)
        log.info("tensor-parallel rank %d of %d joined", self.rank, world)

    def forward(self, msg: p.Msg) -> None:
        """Rank 0 of a tensor-parallel worker: hand a request that reads or writes the weights to every rank."""
        if self.tp is None or self.rank != 0:
            return
        self.check_ranks()
        self.tp.send(p.encode(msg))

    def check_ranks(self) -> None:
        """Rank 0: GroupRestart if one of the other ranks' processes has exited."""
        dead = [r.pid for r in self.ranks if r.poll() is not None]
        if dead:
            raise GroupRestart(f"worker rank process(es) {dead} exited")

    def _pace(self, device: str) -> None:
        share = self.config.train_share or default_share(device)
        if share != self.pacer.share:
            close = getattr(self.pacer.load, "close", None)
            if close is not None:
                close()
            self.pacer = Pacer(share, VLLMLoad(self.config.vllm_address) if share < 1 else (lambda: False))

    def ensure_attached(self) -> None:
        if self.current_load_id() != self.meta.get("load_id"):
            if self.tp is not None:  # every rank must re-attach at once: the group starts over
                raise GroupRestart("vLLM's load id changed under a tensor-parallel worker")
            log.info("vLLM's load id changed (%s -> %s): re-attaching", self.meta.get("load_id"),
                     self.current_load_id())
            self.model = None
            self.attach()

    def checksum(self) -> str:
        """sha256 of the weights; on a tensor-parallel worker (every rank calls it) of every rank's in rank order."""
        from loop.worker.update import weights_checksum

        mine = weights_checksum(list(self.model.named_parameters()))
        if self.tp is None:
            return mine
        import hashlib

        return hashlib.sha256(b"".join(self.tp.every(mine.encode()))).hexdigest()

    # ------------------------------------------------------------ requests

    def handle(self, msg: p.Msg) -> p.Msg:
        if isinstance(msg, p.Ping):
            return p.Status(req=msg.req, pid=os.getpid(), state=self.ch.state, load_id=self.ch.load_id,
                            staged_run_id=self._staged[0] if self._staged else None,
                            checksum=self.checksum() if msg.checksum else "",
                            mirrors=self.replica_checksums() if msg.checksum and (self.mirrors.dirs or self.remotes.urls)
                            else [])
        if isinstance(msg, p.Train):
            return self.train(msg)
        if isinstance(msg, p.Screen):
            return self.screen(msg)
        if isinstance(msg, p.Apply):
            return self.apply(msg)
        if isinstance(msg, p.Discard):
            self._drop_staged()
            return p.Discarded(req=msg.req, run_id=msg.run_id)
        if isinstance(msg, p.Checkpoint):
            return self.write_checkpoint(msg)
        if isinstance(msg, p.Restore):
            return self.restore(msg)
        if isinstance(msg, p.Sync):
            return self.sync(msg)
        return p.Error(req=msg.req, message=f"the worker does not handle {type(msg).__name__} requests")

    def _drop_staged(self) -> None:
        self._staged = None
        if self.remotes.staged:
            self.remotes.discard()
        if self._lowmem is not None:
            self._lowmem.drop()  # frees the retained graph too
        if self.opt is not None:
            self.opt.discard()

    def train(self, msg: p.Train) -> p.Msg:
        import torch

        from loop.worker.memwatch import StepMemory, figures
        from loop.worker.objectives import encode_examples, encode_pairs, train_step
        from loop.worker.update import check_updates

        if not msg.pairs and not msg.examples:
            return p.Error(req=msg.req, message="Train needs pairs (dpo) or examples (kto); got neither")
        self._drop_staged()
        self.ch.state, self.ch.run_id, self.ch.step = "training", msg.run_id, msg.step
        t0 = time.perf_counter()
        first = self._run.get("run_id") != msg.run_id or msg.step == 1
        device = next(self.model.parameters()).device
        # The step's extra memory: on CUDA every step (the allocator's own counters, free). On the CPU only a run's
        # first step, the largest (its optimizer state is new): the figure costs a malloc_trim there, which makes
        # the step fault its freed memory in again.
        memory = StepMemory(device).start() if first or device.type == "cuda" else None
        unstaged: list[int] = []
        staging: dict[str, float] = {}  # what staging on the remote replicas cost, when it ran
        try:
            if first:
                if msg.objective == "dpo":
                    batch = encode_pairs(self.tokenizer, msg.pairs, msg.max_len)
                else:
                    batch = encode_examples(self.tokenizer, msg.examples, msg.max_len)
                batch = batch.to(next(self.model.parameters()).device)  # tokenised on the host; CUDA views
                self._run = {"run_id": msg.run_id, "batch": batch, "ref": None, "history": []}
            for group in self.opt.param_groups:
                group["lr"] = msg.lr if msg.lr is not None else self.config.learning_rate
            if msg.lowmem and self.tp is None:  # tensor parallel: the staged path (lowmem writes mid-backward)
                with self.pacer.active(self.model):
                    check, d_norm, n_tensors, result = self._prepare_lowmem(msg)
            else:
                # the check and the rounding read every weight and delta beside serving: paced like the step
                with self.pacer.active(self.model):
                    result = train_step(self.model, self.opt, self._run["batch"], objective=msg.objective,
                                        beta=msg.beta, ref_logps=self._run["ref"], per_layer=True,
                                        nll_weight=msg.nll_weight)
                    self.model.zero_grad(set_to_none=True)
                    deltas = result.deltas
                    if msg.inject_nan and deltas:
                        next(iter(deltas.values())).fill_(float("nan"))
                    check = check_updates(deltas, self.config.max_update_ratio, names=self.names, tp=self.tp,
                                          tick=self.pacer.tick)
                    d_norm = check.update_norm if deltas else 0.0
                    if not math.isfinite(d_norm):  # refused before every norm was read: say what it was
                        d_norm = float(torch.sqrt(sum((d.float() ** 2).sum() for d in deltas.values())))
                    values = self._new_values(deltas, self.tp, tick=self.pacer.tick) if check.ok else {}
                    if values and self.remotes.synced:  # phase 1 of a remote replica's switch, before any pause
                        from loop.worker.remotes import UpdatePlan

                        plan = UpdatePlan(self.model, self.vllm_tensors, values)
                        unstaged = self.remotes.stage(msg.run_id, lambda: plan.tensors(self.pacer.tick), plan.sizes())
                        staging = dict(self.remotes.figures)
                        del plan
                    unstaged = self.agreed_lost(unstaged)  # every rank: one that missed a rank's part is out
                    if staging:
                        staging["remote_staged"] = float(len(self.remotes.staged))
                self._staged = (msg.run_id, values, check)
                n_tensors = len(values)
                del deltas, values
            if self._run["ref"] is None:  # the pre-run policy stays the reference for the later steps
                self._run["ref"] = getattr(result, "ref_logps", None)
            metrics = {k: float(v) for k, v in dict(result.metrics).items() if isinstance(v, (int, float))}
            metrics["step_ms"] = (time.perf_counter() - t0) * 1000
            metrics.update(staging)
            if memory is not None:
                extra = memory.stop()
                if self.tp is not None:  # every rank's figure (every rank handles this Train alike)
                    ranks = self.tp.every_ints([-1 if extra is None else extra, self.weight_bytes])
                    metrics.update(figures([None if e < 0 else e for e, _ in ranks], [w for _, w in ranks]))
                else:
                    metrics.update(figures([extra], [self.weight_bytes]))
            self._run["history"].append({"step": float(msg.step), **metrics})
            self.ch.send(p.Progress(run_id=msg.run_id, step=msg.step, loss=metrics.get("loss", float("nan")),
                                    metrics=metrics))
            stats = p.UpdateStats(ok=check.ok, reason=check.reason or "", update_norm=d_norm,
                                  weight_norm=d_norm / check.global_ratio if check.global_ratio > 0 else 0.0,
                                  ratio=check.global_ratio, n_tensors=n_tensors)
            return p.TrainDone(req=msg.req, run_id=msg.run_id, step=msg.step, metrics=metrics,
                               history=list(self._run["history"]), update=stats, ms=metrics["step_ms"],
                               unstaged=unstaged)
        finally:
            self.ch.state = "idle"

    @property
    def weight_bytes(self) -> int:
        """The bytes of the weights this rank trains (its slices of split tensors)."""
        return sum(prm.numel() * prm.element_size() for _, prm in self.trainable)

    def _prepare_lowmem(self, msg: p.Train) -> tuple[Any, float, int, Any]:
        """train_mode=lowmem: forward + a dry backward now (graph kept); Apply writes it with a second backward."""
        from loop.worker.lowmem import PausedBackward

        if self._lowmem is None or self._lowmem.model is not self.model or self._lowmem.opt is not self.opt:
            self._lowmem = PausedBackward(self.model, self.opt, max_update_ratio=self.config.max_update_ratio,
                                          names=self.names)
        prep = self._lowmem.prepare(self._run["batch"], objective=msg.objective, beta=msg.beta,
                                    ref_logps=self._run["ref"], inject_nan=msg.inject_nan,
                                    nll_weight=msg.nll_weight)
        if not prep.check.ok:
            self._lowmem.drop()
        self._staged = (msg.run_id, None, prep.check)
        return prep.check, prep.update_norm, len(self.trainable) if prep.check.ok else 0, prep

    def screen(self, msg: p.Screen) -> p.Msg:
        """Each item's pull along what the kept runs taught (loop/worker/screen.py); writes nothing."""
        from loop.worker.screen import screen

        wanted = msg.pairs if msg.objective == "dpo" else msg.examples
        if not wanted:
            return p.Error(req=msg.req, message=f"Screen with objective {msg.objective!r} needs "
                                                f"{'pairs' if msg.objective == 'dpo' else 'examples'}; got none")
        self.ch.state, self.ch.run_id, self.ch.step = "screening", msg.run_id, 0
        try:
            with self.pacer.active(self.model):
                found = screen(self.model, self.tokenizer, self.trainable, base_weights=msg.base_weights,
                               pairs=msg.pairs, examples=msg.examples, max_len=msg.max_len,
                               budget_bytes=self.config.screen_budget_bytes, tp=self.tp, anchors=msg.anchors)
        finally:
            self.ch.state = "idle"
        if found.anchored:
            log.info("run %d: screen: %d of %d items pull against %d anchor pairs' gradient", msg.run_id,
                     sum(s < 0 for s in found.anchored), len(found.anchored), found.n_anchors)
        if found.note:
            log.info("run %d: screen measured nothing along w_live - w_base: %s", msg.run_id, found.note)
        else:
            down = sum(s < 0 for s in found.contributions)
            log.info("run %d: screen: %d of %d items pull back along w_live - w_base (%d weights, %.0f%% of its "
                     "norm^2 probed, %.0f ms)", msg.run_id, down, len(found.contributions), found.n_tensors,
                     100 * found.probed_fraction, found.ms)
        return p.Screened(req=msg.req, run_id=msg.run_id, contributions=found.contributions,
                          n_tensors=found.n_tensors, probed_fraction=found.probed_fraction, ms=found.ms,
                          note=found.note, anchored=found.anchored, learned_norm=found.learned_norm,
                          anchor_norm=found.anchor_norm, anchor_note=found.anchor_note, n_anchors=found.n_anchors)

    @staticmethod
    def _new_values(deltas: dict[Any, Any], tp: Any = None, tick: Any = None) -> dict[Any, Any]:
        """The weights after the update, rounded stochastically to their dtype, computed BEFORE the pause.

        Why not `apply_updates_` inside Apply: its fp32 add + random bits take seconds on a CPU for a 135M
        model, and vLLM is paused meanwhile. Nothing else writes the weights between Train and Apply (a restore
        or a re-attach drops the staged values), so w + delta can be rounded now and Apply is one copy per
        tensor. Memory is the same as staging the deltas themselves (one tensor of the weight's dtype each).
        Contiguous bf16 CUDA weights take the fused kernel (sr_triton.py), which writes the value over its bf16
        delta in one pass: this runs beside serving, and the torch path's fp32 temporaries are about ten passes.
        `tick` (the pacer's yield point) is called after each tensor."""
        import torch

        from loop.worker import sr_triton
        from loop.worker.update import stochastic_round

        out: dict[Any, Any] = {}
        seed = None
        with torch.no_grad():
            for i, prm in enumerate(list(deltas)):  # keys only: a list of the items would keep every delta alive
                d = deltas.pop(prm)  # this delta is freed as soon as its value exists
                if sr_triton.available(prm, d):
                    if seed is None:  # the kernel's Philox seed; tensor i uses seed + i
                        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
                    out[prm] = sr_triton.sr_sum_(prm, d, d if d.dtype == torch.bfloat16 else torch.empty_like(prm),
                                                 seed + i)
                else:
                    total = prm.float() + d.float()
                    out[prm] = total.to(prm.dtype) if prm.dtype in (torch.float32, torch.float64) else \
                        stochastic_round(total, prm.dtype)
                    del total
                if tp is not None and not tp.sharded(prm):  # a weight every rank holds: the same values on each
                    tp.same(out[prm])
                del d
                if tick is not None:
                    tick()
        return out

    def apply(self, msg: p.Apply) -> p.Msg:
        if self._staged is None or self._staged[0] != msg.run_id:
            have = f"run {self._staged[0]}" if self._staged else "nothing"
            return p.Error(req=msg.req, message=f"no staged update for run {msg.run_id} (staged: {have}); train first")
        run_id, values, check = self._staged
        cap = msg.max_update_ratio if msg.max_update_ratio is not None else self.config.max_update_ratio
        if check.ok and max(check.global_ratio, check.max_tensor_ratio) > cap:
            check.ok, check.reason = False, (f"update norm ratio {max(check.global_ratio, check.max_tensor_ratio):.3g}"
                                             f" exceeds the cap {cap:g}; nothing was written")
        if not check.ok:
            self._drop_staged()
            return p.Refused(req=msg.req, run_id=run_id, reason=check.reason or "refused")
        import torch

        self.ch.state = "applying"
        try:
            t0 = time.perf_counter()
            left = self.mirrors.leave(msg.skip) + self.remotes.leave(msg.skip)  # they serve on: never written
            if values is None:  # lowmem: the second backward writes each layer in place and commits
                self._lowmem.apply()
            else:
                with torch.no_grad():
                    for prm, v in values.items():
                        prm.copy_(v)
                self.opt.commit()
            from loop.worker.views import write_back

            write_back(self.model)  # weights trained as copies (vLLM's rows in another order): into vLLM, now
            self.mirrors.copy(self.vllm_tensors)  # every replica switches within the same pause
            if self.tp is not None:  # rank 0 answers once every rank has written, inside the same pause
                self.tp.barrier()
            # remote replicas: phase 2 (each writes what it staged); lowmem staged nothing, so the whole weights
            t_remote = time.perf_counter()
            lost = left + (self.remotes.commit(run_id) if values is not None else self.remotes.resync(self.vllm_tensors))
            lost = self.agreed_lost(lost)  # a replica whose commit failed on any rank holds torn weights: out
            remote_ms = (time.perf_counter() - t_remote) * 1000 if self.remotes.urls else None
            ms = (time.perf_counter() - t0) * 1000
            self._staged = None
        finally:
            self.ch.state = "idle"
        return p.Applied(req=msg.req, run_id=run_id, checksum="", ms=ms, lost=lost, remote_ms=remote_ms)

    # ------------------------------------------------------------ checkpoints

    def hf_state(self) -> Any:
        """Checkpoint names → tensors, as `save_pretrained` writes this model (loop/worker/checkpoint.py). On a
        tensor-parallel worker (every rank calls it) a `checkpoint.Lazy` source instead: the whole shapes now, each
        shard file's split weights gathered whole only when that file is written, so rank 0 never holds the whole
        model."""
        if self.tp is None:
            return checkpoint_tensors(self.model)
        import torch

        from loop.worker.checkpoint import lazy_checkpoint

        params = dict(self.model.named_parameters())
        whole = {n: torch.empty(self.tp.shards[id(t)].full if self.tp.sharded(t) else t.shape, dtype=t.dtype,
                                device="meta") for n, t in params.items()}

        def gather(names: list[str]) -> dict[str, Any]:
            out = {}
            for n in names:  # one whole tensor at a time; rank 0 keeps them in host memory until the file is written
                t = self.tp.full(params[n], params[n].detach())
                if self.rank == 0:
                    out[n] = t.cpu()
            return out

        return lazy_checkpoint(self.model, whole, gather)

    def write_checkpoint(self, msg: p.Checkpoint) -> p.Msg:
        import json

        t0 = time.perf_counter()
        src = Path(self.meta["model_path"])

        def extra(tmp: Path) -> None:
            # In a subfolder: vLLM loads every *.safetensors at the top of a model folder as weights
            (tmp / OPTIMIZER_DIR).mkdir()
            self.opt.save(tmp / OPTIMIZER_DIR / OPTIMIZER_FILE)
            info = {"version": msg.version, "load_id": self.meta["load_id"], "source_model": str(src),
                    "optimizer": self.config.optimizer, "created_unix": time.time(), **msg.meta}
            (tmp / "loop.json").write_text(json.dumps(info, indent=1))

        final = Path(msg.path)
        state = self.hf_state()
        if self.rank != 0:  # rank 0's gathers, shard file by shard file; rank 0 writes the folder
            from loop.worker.checkpoint import drain

            drain(state)
            return p.CheckpointDone(req=msg.req, path=str(final), ms=(time.perf_counter() - t0) * 1000, files=[])
        try:
            files = write_folder(final, src, state, extra)
        except FileExistsError as exc:
            return p.Error(req=msg.req, message=str(exc))
        except OSError as exc:  # nothing written; every rank took part in every gather, so the group goes on
            return p.Error(req=msg.req, message=f"checkpoint {final} not written: {type(exc).__name__}: {exc}")
        return p.CheckpointDone(req=msg.req, path=str(final), ms=(time.perf_counter() - t0) * 1000, files=files)

    def restore(self, msg: p.Restore) -> p.Msg:
        import torch

        t0 = time.perf_counter()
        folder = Path(msg.path)
        if not msg.weights:  # a restarted worker picks up the optimizer state where the checkpoint left it
            opt_file = folder / OPTIMIZER_DIR / OPTIMIZER_FILE
            if opt_file.is_file() and not self.opt.state and self._staged is None:
                self.opt.load(opt_file)
                log.info("optimizer state loaded from %s", opt_file)
            return p.Restored(req=msg.req, path=str(folder), ms=(time.perf_counter() - t0) * 1000)
        from loop.worker.checkpoint import has_weights
        from loop.worker.screen import BaseWeights

        if not has_weights(folder):
            return p.Error(req=msg.req, message=f"{folder} has neither model.safetensors nor the index of its shards: "
                                                "not a loop checkpoint")
        params = dict(self.model.named_parameters())
        whole = None
        if self.tp is not None:  # names and whole shapes only (meta tensors): each rank reads its own slices
            whole = {n: torch.empty(self.tp.shards[id(t)].full, device="meta") if self.tp.sharded(t) else t
                     for n, t in params.items()}
        live = checkpoint_tensors(self.model, whole)
        f = BaseWeights(folder)  # one file or the shards of a big model, opened as needed
        try:
            keys = f.names
            missing = sorted(set(live) - keys)
            if missing:
                return p.Error(req=msg.req, message=f"checkpoint {folder} lacks {len(missing)} weights, "
                                                    f"e.g. {missing[0]}; nothing was written")
            for name, t in live.items():  # validate everything before writing anything
                shape = f.shape(name)
                if shape != tuple(t.shape):
                    return p.Error(req=msg.req, message=f"checkpoint {folder}: {name} has shape {shape}, "
                                                        f"the live model {tuple(t.shape)}; nothing was written")
            # a plain split of one tensor (the conversion passes the parameter through): this rank reads its slice
            sliced = {n for n, t in live.items() if self.tp is not None and n in params
                      and self.tp.sharded(params[n]) and t is whole[n]}
            direct = {n for n, t in live.items() if n in params and tuple(params[n].shape) == tuple(t.shape)} - sliced
            try:
                scatter = restore_targets(self.model, set(live) - direct - sliced)
            except ValueError as e:
                return p.Error(req=msg.req, message=f"checkpoint {folder}: {e}; nothing was written")
            self.ch.state = "restoring"
            try:
                left = self.mirrors.leave(msg.skip) + self.remotes.leave(msg.skip)  # they serve on: never written
                with torch.no_grad():
                    for name in live:
                        if name in sliced:  # this rank's slice of a tensor-parallel weight
                            shard = self.tp.shards[id(params[name])]
                            start, n = shard.ranges[self.tp.rank]
                            params[name].copy_(f.part(name, shard.dim, start, n))
                            continue
                        value = f.tensor(name)
                        if name in direct:
                            params[name].copy_(value)
                        else:  # a tensor transformers keeps fused with others: element by element, exactly
                            prm, index = scatter[name]
                            prm[torch.unravel_index(index.reshape(-1), prm.shape)] = value.reshape(-1).to(prm.dtype)
                from loop.worker.views import write_back

                write_back(self.model)
                self.mirrors.copy(self.vllm_tensors)
                if self.tp is not None:  # rank 0 answers once every rank has written, its replicas too
                    self.tp.barrier()
                lost = self.agreed_lost(left + self.remotes.resync(self.vllm_tensors))  # nothing staged: all, now
            finally:
                self.ch.state = "idle"
        finally:
            f.close()
        self._drop_staged()
        opt_file = folder / OPTIMIZER_DIR / OPTIMIZER_FILE
        if msg.load_optimizer and opt_file.is_file():
            self.opt.load(opt_file)
        return p.Restored(req=msg.req, path=str(folder), ms=(time.perf_counter() - t0) * 1000, lost=lost)

    def sync(self, msg: p.Sync) -> p.Msg:
        from loop.worker.mirrors import MirrorError

        self.ch.state = "syncing"
        error, load_id, ms = "", "", 0.0
        from loop.worker.remotes import RemoteError

        try:
            if self.remotes.owns(msg.replica):
                load_id, ms = self.remotes.sync(msg.replica, self.vllm_tensors)
            else:
                load_id, ms = self.mirrors.sync(msg.replica, self.vllm_tensors)
        except (MirrorError, RemoteError) as e:
            error = str(e)
        finally:
            self.ch.state = "idle"
        if self.tp is not None:  # every rank syncs its own shards: the replica serves only when all of them did
            ok, bad = self.tp.agree(not error)
            if not ok:
                self.mirrors.attached.pop(msg.replica, None)
                self.remotes.leave([msg.replica])
                error = error or (f"tensor-parallel rank(s) {bad} could not sync replica {msg.replica} (the "
                                  "worker log says why)")
        if error:
            return p.Error(req=msg.req, message=error)
        return p.Synced(req=msg.req, replica=msg.replica, load_id=load_id, ms=ms)

    def replica_checksums(self) -> list[str]:
        """`Mirrors.checksums` then `Remotes.checksums`; on a tensor-parallel worker (every rank calls it) each
        replica's over every rank's shards in rank order, "" where a rank has none for it."""
        mine = self.mirrors.checksums(self.vllm_tensors) + self.remotes.checksums()
        if self.tp is None:
            return mine
        import hashlib

        missing = b"-" * 64  # a sha256 in hex is 64 characters: every rank sends the same length
        out = []
        for c in mine:
            parts = self.tp.every(c.encode() or missing)
            out.append("" if missing in parts else hashlib.sha256(b"".join(parts)).hexdigest())
        return out

    def agreed_lost(self, lost: list[int]) -> list[int]:
        """The replicas a write or a stage missed on any rank (every rank of a tensor-parallel worker calls it with
        its own list and gets the union): each rank's part of a remote replica moves on its own, and a replica
        that missed one rank's holds torn weights, so every rank forgets it and it is synced whole before it
        serves. Without tensor parallel: `lost`."""
        if self.tp is None or not self.remotes.urls:
            return lost
        n = 1 + len(self.mirrors.dirs) + len(self.remotes.urls)
        flags = self.tp.every_ints([int(k in lost) for k in range(n)])
        union = [k for k in range(n) if any(f[k] for f in flags)]
        self.remotes.leave([k for k in union if k not in lost])
        return union


class ModelRefused(Exception):
    """The model vLLM serves cannot be trained in place (loop/worker/views.py says which weights and why)."""


class GroupRestart(Exception):
    """A tensor-parallel worker's ranks can no longer go on together (a rank died, vLLM reloaded): the process exits
    with EXIT_RESTART and the supervisor starts the whole group again."""


EXIT_RESTART = 75  # sysexits EX_TEMPFAIL
# requests every rank of a tensor-parallel worker handles (the others only rank 0)
_EVERY_RANK = (p.Train, p.Screen, p.Apply, p.Discard, p.Checkpoint, p.Restore, p.Sync)


class _Quiet:
    """The channel of ranks 1..N-1: they answer nobody (rank 0 does)."""

    state, run_id, step, load_id = "idle", 0, 0, ""

    def send(self, msg: p.Msg) -> None:
        pass


def follow(config: WorkerConfig) -> int:
    """Ranks 1..N-1: attach to this rank's weights, then handle what rank 0 hands over until it says stop."""
    worker = Worker(config, _Quiet())  # type: ignore[arg-type]
    try:
        worker.attach()
    except ModelRefused as e:
        log.error("rank %d: %s%s", worker.rank, REFUSED_PREFIX, e)
        return EXIT_REFUSED
    while True:
        payload = worker.tp.send(None)
        if payload is None:
            return 0
        msg = p.decode(payload)
        worker.handle(msg)  # an exception ends this rank; rank 0's next collective fails and the group restarts


def serve(config: WorkerConfig) -> int:
    ch = Channel(config.endpoint, config.heartbeat_s)
    ch.start()  # heartbeats start before the slow imports and the attach
    worker = Worker(config, ch)
    try:
        worker.attach()
        return _serve(worker, ch)
    except ModelRefused as e:  # at start, or a restarted vLLM now serving a model loop cannot train in place
        log.error("%s%s", REFUSED_PREFIX, e)
        ch.close()
        return EXIT_REFUSED
    except GroupRestart as e:
        log.error("the tensor-parallel worker starts over: %s", e)
        ch.close()
        return EXIT_RESTART


def _serve(worker: Worker, ch: Channel) -> int:
    inbox = ch.messages()
    pending: queue.Queue[p.Msg] = queue.Queue()
    import threading

    def pump() -> None:  # lets the main thread wake up when idle to notice a vLLM restart
        for m in inbox:
            pending.put(m)
        pending.put(p.Shutdown())

    threading.Thread(target=pump, name="loop-worker-inbox", daemon=True).start()
    while True:
        try:
            msg = pending.get(timeout=2.0)
        except queue.Empty:
            worker.check_ranks()  # a tensor-parallel rank gone: the group cannot train; start it over
            current = worker.current_load_id()
            if current is None:  # vLLM is gone or restarting: our views point at memory nobody serves
                ch.state = "waiting"
            elif current != worker.meta.get("load_id"):
                worker.ensure_attached()
            elif ch.state == "waiting":
                ch.state = "idle"
            continue
        if isinstance(msg, p.Shutdown):
            if worker.tp is not None:
                worker.tp.send(None)  # the other ranks stop too
            ch.send(p.Bye(req=msg.req))
            ch.close()
            return 0
        try:
            if not isinstance(msg, p.Ping):
                worker.ensure_attached()
            if isinstance(msg, _EVERY_RANK) or (isinstance(msg, p.Ping) and msg.checksum):
                worker.forward(msg)  # a checksum covers every rank's weights
            reply = worker.handle(msg)
        except ModelRefused as e:
            ch.send(p.Error(req=msg.req, message=f"{REFUSED_PREFIX}{e}"))
            raise
        except GroupRestart as e:
            ch.send(p.Error(req=msg.req, message=f"the tensor-parallel worker starts over: {e}"))
            raise
        except Exception as e:  # noqa: BLE001 - report to the API, keep serving
            log.exception("request %s failed", type(msg).__name__)
            reply = p.Error(req=msg.req, message=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            if worker.tp is not None:  # a rank may be half-way through a collective: the group starts over
                ch.send(reply)
                raise GroupRestart(f"{type(msg).__name__} failed: {e}") from e
        ch.send(reply)


def main(argv: list[str] | None = None) -> int:
    """`python -m loop.worker.main <WorkerConfig as JSON>`; exit code 2 for anything else."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        if len(argv) != 1:
            raise ValueError(f"expected one argument, the worker config as JSON (loop/worker/config.py), got {argv!r}")
        config = WorkerConfig.decode(argv[0])
    except ValueError as exc:
        print(f"python -m loop.worker.main: {exc}", file=sys.stderr)
        return 2
    rank = int(os.environ.get("LOOP_WORKER_RANK", "0"))
    # `kill -USR1 <pid>` prints every thread's stack to the worker log: a rank stuck in a collective says where
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=config.log_level.upper(),
                        format=f"%(asctime)s worker{f' rank {rank}' if rank else ''} %(levelname)s %(message)s")
    return follow(config) if rank else serve(config)


if __name__ == "__main__":
    raise SystemExit(main())
