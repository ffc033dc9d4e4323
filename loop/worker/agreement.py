"""Does a staged update go on with what the model has learned so far, or pull it back? Judged before the write.

What: the weights the service started from (the base model folder, read tensor by tensor from its safetensors)
and the live weights differ by everything the kept runs taught: `acc = w_live - w_base`. For the staged update
`delta` of a scheduled run the worker measures, per trained tensor, `dot = <delta, acc>` and the norms, and from
them the global cosine of `delta` with `acc` and the t statistic of the per-tensor dots (mean / standard error
over tensors). A batch that reverses what was learned — the same pairs rated the other way round — points its
update back along `acc`: cosine below zero, the per-tensor dots strongly negative. `verdict` rejects it when the
cosine is negative and t < -max_conflict_t. Measured on the fp32 `delta` and the live weights, neither stochastic
rounding nor bf16 arithmetic (which blur the after-the-write margins the guard reads from vLLM) enters.

How far it can be trusted depends on how much the first kept runs trained on: with first batches of ~10 pairs
it misses poisoned batches and rejects good ones, from ~20 pairs on it separates them (figures in
docs/measurements.md, "pre-write direction check"). The per-tensor t is not calibrated (tensors are correlated),
so the limit is off by default (`max_conflict_t` unset: every scheduled run records the figures, nothing is
rejected); exactly reversed pairs are caught (tests/e2e/test_loop_e2e.py).

Cost: one pass over the base weights from disk (page cache after the first run) in row chunks, so the extra
memory is one chunk in fp32, never a second copy of the model. Works in both train modes: atomic measures the
staged deltas; lowmem measures each delta in its dry-backward hook. Nothing learned yet (the first run, or a
base folder without the tensor) means nothing to contradict: no verdict.

Unit tests: .venv/bin/pytest tests/unit/worker/test_agreement.py
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loop.stats import t_statistic

log = logging.getLogger("loop.worker")

CHUNK = 1 << 24  # elements per chunk of one tensor (64 MiB in fp32)


class BaseWeights:
    """Tensors of a model folder's safetensors (one file or an index of shards), read in row slices on demand."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: folder / f for name, f in weight_map.items()}
        elif (folder / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
                self.files = {name: folder / "model.safetensors" for name in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        else:
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json")
        self._open: dict[Path, Any] = {}

    def slice(self, name: str, start: int, stop: int) -> torch.Tensor | None:
        """Rows [start, stop) of the tensor (flattened to rows of its last dimension), or None if absent."""
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self._open:
            from safetensors import safe_open

            self._open[path] = safe_open(str(path), framework="pt")
        return self._open[path].get_slice(name)[start:stop]

    def close(self) -> None:
        self._open.clear()


@dataclass
class Agreement:
    n_tensors: int
    cosine: float  # of the update with the accumulated change w_live - w_base (0 when nothing was learned yet)
    t: float | None  # mean / standard error of the per-tensor dots (None below 2 tensors)
    n_down: int  # tensors whose dot is negative
    ms: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"agreement_tensors": float(self.n_tensors), "agreement_cosine": self.cosine,
               "agreement_down": float(self.n_down), "agreement_ms": self.ms}
        if self.t is not None and math.isfinite(self.t):
            out["agreement_t"] = self.t
        return out


class DirectionCheck:
    """Feed it (parameter, delta) as the deltas appear; `result()` gives the Agreement."""

    def __init__(self, base: BaseWeights, names: dict[Any, str]) -> None:
        self.base = base
        self.names = names
        self._rows: list[torch.Tensor] = []  # per tensor: (dot, ||delta||^2, ||acc||^2), on the tensor's device
        self.missing: list[str] = []
        import time

        self._t0 = time.perf_counter()

    @torch.no_grad()
    def observe(self, prm: torch.Tensor, delta: torch.Tensor) -> None:
        name = self.names.get(prm)
        if name is None or name not in self.base.files:
            self.missing.append(name or f"{tuple(prm.shape)}")
            return
        w = prm.detach()
        rows = w.shape[0] if w.dim() > 1 else w.numel()
        per_row = max(1, w[0].numel()) if w.dim() > 1 else 1
        step = max(1, CHUNK // per_row)
        acc = torch.zeros(3, dtype=torch.float64, device=w.device)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            b = self.base.slice(name, start, stop)
            if b is None or tuple(b.shape) != tuple(w[start:stop].shape):
                self.missing.append(name)
                return
            change = (w[start:stop].float() - b.to(w.device, non_blocking=True).float()).view(-1)
            d = delta[start:stop].float().reshape(-1)
            acc += torch.stack([torch.dot(d, change), torch.dot(d, d), torch.dot(change, change)]).double()
        self._rows.append(acc)

    def result(self) -> Agreement:
        import time

        if not self._rows:
            return Agreement(0, 0.0, None, 0, (time.perf_counter() - self._t0) * 1000)
        rows = torch.stack([r.cpu() for r in self._rows]).tolist()
        dots = [r[0] for r in rows]
        d2, a2 = sum(r[1] for r in rows), sum(r[2] for r in rows)
        cosine = sum(dots) / math.sqrt(d2 * a2) if d2 > 0 and a2 > 0 else 0.0
        t = t_statistic(dots) if a2 > 0 else None
        return Agreement(len(dots), cosine, t, sum(x < 0 for x in dots), (time.perf_counter() - self._t0) * 1000)


def for_step(base_weights: str, step: int, names: dict[Any, str]) -> DirectionCheck | None:
    """The check of a run's step-1 update against the change since `base_weights` (a model folder); None when
    there is nothing to check (no base given, a later step) or the base cannot be read (logged: unchecked)."""
    if not base_weights or step != 1:
        return None
    try:
        return DirectionCheck(BaseWeights(base_weights), names)
    except (OSError, ValueError) as e:
        log.warning("cannot read the base weights %s (%s); the update is not checked against them", base_weights, e)
        return None


def judge(direction: DirectionCheck, max_conflict_t: float | None, metrics: dict[str, Any], run_id: int) -> str | None:
    """The figures into the step's `metrics`; why the update must not be written (None: it may, or no limit)."""
    found = direction.result()
    direction.base.close()
    metrics.update(found.metrics())
    log.info("run %d: update vs change since the base: cosine %+.4f, per-tensor t %s, %d of %d tensors back "
             "(%.0f ms)", run_id, found.cosine, f"{found.t:+.2f}" if found.t is not None else "-", found.n_down,
             found.n_tensors, found.ms)
    return verdict(found, max_conflict_t=max_conflict_t) if max_conflict_t is not None else None


def verdict(found: Agreement, *, max_conflict_t: float) -> str | None:
    """Why the update must not be written (it would pull the weights back from what was learned), or None."""
    if found.t is None or found.cosine >= 0 or found.t >= -max_conflict_t:
        return None
    return (f"the update would undo what the kept runs taught: its cosine with the weights' change since the base "
            f"model is {found.cosine:+.4f}, and the per-tensor dot products lie {found.t:+.2f} standard errors below "
            f"zero (< -{max_conflict_t:.2f}; {found.n_down} of {found.n_tensors} tensors pulled back); a batch "
            f"whose labels contradict the feedback learned so far; nothing was written")
