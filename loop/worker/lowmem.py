"""The low-memory atomic apply: a dry backward while vLLM serves, the real one while it is paused.

Why: the default atomic apply (`train_mode=atomic`) stages the new value of every trained weight before the
pause, so the pause covers only a copy — but the staged values cost as many bytes as the trained weights. On a
card where that does not fit beside vLLM, `train_mode=lowmem` keeps the per-layer mode's memory (one gradient alive at a time) and stays atomic:
no generation ever runs on a half-written update, and a non-finite or oversized update is refused before
anything is written. The price is a longer pause: vLLM waits for one backward pass instead of one copy.

How, per step:
1. `prepare()` (vLLM serving): reference log-probs (first step), forward, then `backward(retain_graph=True)`
   with per-layer hooks that compute each delta, measure it (finite? ||delta|| / ||w|| under the cap?) and drop
   it with its gradient. The optimizer's staged state is discarded; the graph (the activations) is kept.
   One host sync at the end turns the per-tensor norms into an `UpdateCheck` exactly like the staged path's.
2. `apply()` (vLLM paused by the caller): the same backward again over the retained graph; each hook recomputes
   the delta from the same committed optimizer state and adds it in place with stochastic rounding
   (`apply_updates_`, the fused kernel on CUDA). A layer's weight is written only after its own backward node ran,
   and no later node reads it (frozen embeddings; a tied head is frozen with them), so the rest of the backward is
   exact. The second backward is the first one replayed on the same graph: the deltas are the checked ones (on
   CUDA up to kernel non-determinism); as a last line of defence a non-finite element is written as 0, never
   as NaN. Then the optimizer state is committed.
3. `drop()` frees the graph and forgets the staged state (a refused or abandoned step).

Run the tests: .venv/bin/pytest tests/unit/worker/test_lowmem.py
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loop.worker.apollo import StagedOptimizer
from loop.worker.objectives import KTOBatch, PairBatch, forward_loss
from loop.worker.update import UpdateCheck, apply_updates_


@dataclass
class Prepared:
    """A step whose update is measured but not written: `check` says whether `apply()` may write it."""

    check: UpdateCheck
    metrics: dict[str, float]
    ref_logps: Any
    n_tokens: int
    update_norm: float


def _alias(p: torch.Tensor) -> torch.Tensor:
    """The same memory as `p` under a fresh autograd version counter.

    vLLM fuses q/k/v (and gate/up) into one tensor, so their HF parameters are views of one base and share its
    version counter: writing q_proj in place while k_proj's backward node has not run yet would make autograd
    refuse k_proj's saved weight ("modified by an inplace operation") although its bytes are untouched. The
    write goes through this alias instead; the slices are disjoint and each is written after its own node ran."""
    out = torch.empty(0, dtype=p.dtype, device=p.device)
    return out.set_(p.untyped_storage(), p.storage_offset(), p.size(), p.stride())


class PausedBackward:
    """prepare() while vLLM serves; apply() while it is paused (or drop()). One prepared step at a time."""

    def __init__(self, model: nn.Module, optimizer: StagedOptimizer, *, max_update_ratio: float,
                 names: dict[torch.Tensor, str] | None = None, stochastic_rounding: bool = True) -> None:
        self.model = model
        self.opt = optimizer
        self.max_update_ratio = max_update_ratio
        self.names = names or {}
        self.stochastic_rounding = stochastic_rounding
        self._loss: torch.Tensor | None = None
        self._prepared: Prepared | None = None

    @property
    def pending(self) -> bool:
        return self._loss is not None

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.opt.param_groups for p in g["params"] if p.requires_grad]

    def prepare(self, batch: PairBatch | KTOBatch, *, objective: str, beta: float, ref_logps: Any = None,
                inject_nan: bool = False, nll_weight: float = 0.0) -> Prepared:
        """Forward + dry backward (graph kept); returns the check of the update apply() would write."""
        self.drop()
        loss, metrics, ref_logps = forward_loss(self.model, batch, objective=objective, beta=beta, ref_logps=ref_logps,
                                                nll_weight=nll_weight)
        norms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (param, ||delta||, ||w||) on device
        first = [True]

        def measure(p: torch.Tensor, d: torch.Tensor) -> None:
            if inject_nan and first[0]:  # tests: poison the first delta to see the step refused
                d = d.float().fill_(float("nan"))
                first[0] = False
            norms.append((p, torch.linalg.vector_norm(d, dtype=torch.float32),
                          torch.linalg.vector_norm(p, dtype=torch.float32)))

        detach = self.opt.attach_per_layer(self._params(), measure)
        try:
            loss.backward(retain_graph=True)
        except BaseException:
            self.opt.discard()
            raise
        finally:
            detach()
        self.opt.discard()  # apply() recomputes every delta from the same committed state
        check, d_norm = self._check(norms)
        self._loss = loss
        self._prepared = Prepared(check, metrics, ref_logps, batch.n_tokens, d_norm)
        return self._prepared

    def _check(self, norms: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[UpdateCheck, float]:
        """The staged path's rules (check_updates) on norms measured per layer: one host sync for all."""
        if not norms:
            return UpdateCheck(True), 0.0
        values = torch.stack([torch.stack([dn, wn.to(dn.device)]) for _, dn, wn in norms]).tolist()
        d2 = w2 = 0.0
        ratios: dict[str, float] = {}
        worst, worst_ratio = None, 0.0
        for i, ((p, _, _), (dn, wn)) in enumerate(zip(norms, values)):
            label = self.names.get(p) or f"tensor #{i} {tuple(p.shape)}"
            if not math.isfinite(dn):
                return UpdateCheck(False, f"{label}: update has non-finite values (NaN/inf); nothing was written"), dn
            d2, w2 = d2 + dn * dn, w2 + wn * wn
            if wn > 0:
                ratios[label] = r = dn / wn
                if r > worst_ratio:
                    worst, worst_ratio = label, r
                if r > self.max_update_ratio:
                    return UpdateCheck(False, f"{label}: update norm ratio {r:.3g} exceeds the cap "
                                       f"{self.max_update_ratio:g} (lower the learning rate or raise the cap); nothing "
                                       "was written", max_tensor_ratio=r, worst_tensor=label, ratios=ratios), math.sqrt(d2)
        g = math.sqrt(d2) / math.sqrt(w2) if w2 > 0 else 0.0
        if g > self.max_update_ratio:
            return UpdateCheck(False, f"global update norm ratio {g:.3g} exceeds the cap {self.max_update_ratio:g}; "
                               "nothing was written", global_ratio=g, max_tensor_ratio=worst_ratio, worst_tensor=worst,
                               ratios=ratios), math.sqrt(d2)
        return UpdateCheck(True, None, g, worst_ratio, worst, ratios), math.sqrt(d2)

    def apply(self) -> float:
        """Write the prepared update in place (the caller holds vLLM paused); returns milliseconds."""
        if self._loss is None or self._prepared is None:
            raise RuntimeError("nothing prepared: call prepare() first")
        if not self._prepared.check.ok:
            raise RuntimeError(f"the prepared update was refused: {self._prepared.check.reason}")
        t0 = time.perf_counter()
        sr = self.stochastic_rounding

        aliases = {p: _alias(p) for p in self._params()}

        def write(p: torch.Tensor, d: torch.Tensor) -> None:
            with torch.no_grad():
                torch.nan_to_num_(d, nan=0.0, posinf=0.0, neginf=0.0)
                apply_updates_({aliases[p]: d}, stochastic_rounding=sr)

        loss, self._loss = self._loss, None
        detach = self.opt.attach_per_layer(self._params(), write)
        try:
            loss.backward()
        except BaseException:
            self.opt.discard()
            raise
        finally:
            detach()
            del loss
        self.opt.commit()
        if any(p.is_cuda for p in aliases):
            torch.cuda.synchronize()
        self._prepared = None
        return (time.perf_counter() - t0) * 1000

    def drop(self) -> None:
        """Free the retained graph and forget the staged optimizer state."""
        self._loss = None
        self._prepared = None
        self.opt.discard()
        for p in self._params():
            p.grad = None
