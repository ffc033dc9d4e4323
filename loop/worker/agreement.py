"""Does a staged update agree with the preferences we already trust? Measured before anything is written.

What: for trusted preference pairs (the scheduler's eval set: held-out feedback older than the batch, and pairs
that kept runs learned from), the first-order change the staged update `delta` would make to each pair's margin
per answer token,

    a_j = < d m_j / d w , delta >,   m_j = log p(chosen_j)/|chosen_j| - log p(rejected_j)/|rejected_j|,

and across pairs (or groups of pairs) the mean and its t statistic (mean / standard error). A batch with flipped
labels pulls the trusted margins down (t well below zero); a batch from the same rater pulls them up.

Why here and not only after the write (loop/scheduler/guard.py): after the write the same question is asked of
vLLM's bf16 log-probs, and an update of a few 1e-5 relative moves each margin by less than the noise of stochastic
rounding (most bf16 weights move by one ulp or not at all) and of bf16 arithmetic. The staged delta here is the
optimizer's exact fp32 update, and the gradients are those of the live weights, so neither noise enters; what is
left is how differently the pairs respond. And a batch judged harmful is never served, not even for the seconds
before a rollback.

Cost: one forward + backward per group (at most `max_groups`), each gradient consumed per tensor as it arrives
(a post-accumulate-grad hook takes its dot product with the delta and frees it), so the extra memory is one
tensor's gradient and the activations of one group. Needs the staged deltas: train_mode=lowmem does not keep them,
and there only the guard after the write judges.

Unit tests: .venv/bin/pytest tests/unit/test_agreement.py
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from loop.stats import t_statistic
from loop.worker.objectives import PairBatch, disable_dropout, sequence_logps


@dataclass
class Agreement:
    n_pairs: int
    n_groups: int
    mean: float  # mean over groups of the predicted change of the mean per-token margin, nats per token
    t: float | None  # mean / standard error over groups (None below 2 groups or without spread)
    values: list[float]
    ms: float = 0.0

    def metrics(self) -> dict[str, float]:
        out = {"agreement_pairs": float(self.n_pairs), "agreement_groups": float(self.n_groups),
               "agreement_mean": self.mean, "agreement_ms": self.ms}
        if self.t is not None and math.isfinite(self.t):
            out["agreement_t"] = self.t
        return out


def groups_of(n: int, max_groups: int) -> list[list[int]]:
    """Indices 0..n-1 dealt round-robin into min(n, max_groups) groups."""
    k = max(1, min(n, max_groups))
    return [list(range(g, n, k)) for g in range(k)]


def per_token_margins(model: nn.Module, batch: PairBatch) -> torch.Tensor:
    """Tensor[n_pairs]: log p(chosen)/|chosen| - log p(rejected)/|rejected| (answer tokens, EOS included)."""
    logps = sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)
    lengths = batch.loss_mask[:, 1:].sum(1).clamp(min=1).to(logps.dtype)
    per_tok = logps / lengths
    n = batch.n_pairs
    return per_tok[:n] - per_tok[n:]


def predicted_change(model: nn.Module, deltas: Mapping[torch.Tensor, torch.Tensor], batch: PairBatch) -> float:
    """< d mean(margins of `batch`) / d w , delta > summed over the tensors in `deltas`, without keeping grads."""
    total = torch.zeros((), dtype=torch.float64, device=next(iter(deltas)).device)
    handles = []

    def take(prm: torch.Tensor) -> None:
        nonlocal total
        if prm.grad is not None:
            total = total + (prm.grad.float() * deltas[prm].float()).sum().double()
            prm.grad = None

    for prm in deltas:
        handles.append(prm.register_post_accumulate_grad_hook(take))
    try:
        with torch.enable_grad():
            per_token_margins(model, batch).mean().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)  # parameters outside `deltas` (frozen ones never get a grad)
    return float(total)


def measure(model: nn.Module, deltas: Mapping[torch.Tensor, torch.Tensor], groups: Sequence[PairBatch]) -> Agreement:
    """The predicted per-token margin change of each group under `deltas`, and their t statistic."""
    import time

    t0 = time.perf_counter()
    disable_dropout(model)
    values = [predicted_change(model, deltas, g) for g in groups] if deltas else []
    mean = sum(values) / len(values) if values else 0.0
    return Agreement(n_pairs=sum(g.n_pairs for g in groups), n_groups=len(values), mean=mean,
                     t=t_statistic(values), values=values, ms=(time.perf_counter() - t0) * 1000)


def encode_groups(tokenizer: Any, pairs: Sequence[tuple[Any, str, str]], max_len: int, max_groups: int,
                  device: Any) -> list[PairBatch]:
    from loop.worker.objectives import encode_pairs

    return [encode_pairs(tokenizer, [pairs[i] for i in idx], max_len).to(device)
            for idx in groups_of(len(pairs), max_groups) if idx]


def verdict(agreement: Agreement, *, max_conflict_t: float, min_pairs: int) -> str | None:
    """Why the update must not be written (it would undo trusted preferences), or None."""
    if agreement.n_pairs < min_pairs or agreement.t is None or agreement.t >= -max_conflict_t:
        return None
    down = sum(v < 0 for v in agreement.values)
    return (f"the update would undo trusted preferences: it is predicted to move the margin log p(chosen) - "
            f"log p(rejected) of {agreement.n_pairs} trusted pairs by {agreement.mean:+.2e} nats per token on "
            f"average, {agreement.t:+.2f} standard errors < -{max_conflict_t:.2f} ({down} of {agreement.n_groups} "
            f"groups down); nothing was written")
