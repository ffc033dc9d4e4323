"""Preference objectives: tokenisation of rated answers, sequence log-probs, DPO and KTO, one training step.

What: `encode_pairs` / `encode_examples` turn the wire's pairs and examples into padded batches (token ids by
the one rule in loop/worker/tokens.py, which the eval guard scores too) whose loss mask covers only the
answers; `sequence_logps` sums answer-token log-probs; `dpo_loss` (Rafailov et al. 2023) and `kto_loss`
(Ethayarajh et al. 2024), optionally with a likelihood term on the preferred answers (`forward_loss`); `train_step` computes reference log-probs with the current
(pre-update) weights, runs forward + backward and returns the optimizer's staged deltas WITHOUT applying them:
the worker applies them later, under vLLM's pause (loop/worker/update.py).

Choices:
- The reference policy is the pre-update model itself (computed under no_grad before the step): no second
  model copy, which is what makes training beside a serving vLLM fit in memory.
- Tokens: loop/worker/tokens.py (the ids vLLM produced when a pair carries them, else the chat template or raw
  prompt as vLLM saw it and EOS unless the answer was cut off; prompts cut from the left; chosen and rejected
  share one prompt cut).
- Log-probs never materialise B x L x vocab logits: the decoder's hidden states are gathered at answer
  positions only and projected through lm_head in chunks under activation checkpointing, in fp32.
- Dropout is switched off (disable_dropout) so the reference and the policy agree at step start.
- KTO's reference point z0 is estimated from mismatched pairs (prompt i with completion i+1 of the batch, as
  in the paper's implementation): z0 = max(0, mean(log pi(y_j|x_i) - log ref(y_j|x_i))), detached.

Run the tests: .venv/bin/pytest tests/unit/worker/test_objectives.py
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from loop.worker import tokens
from loop.worker.apollo import StagedOptimizer
from loop.worker.protocol import Example, Pair


@dataclass
class PairBatch:
    """2B rows: chosen answers first, then the rejected ones, right-padded."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    n_pairs: int
    truncated: list[bool] = field(default_factory=list)

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), self.n_pairs, self.truncated)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


@dataclass
class KTOBatch:
    """B rows of (prompt, completion) with a thumb label, plus the mismatched rows for the KL estimate."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    loss_mask: torch.Tensor
    labels: torch.Tensor  # bool: True = desirable
    kl_input_ids: torch.Tensor
    kl_attention_mask: torch.Tensor
    kl_loss_mask: torch.Tensor
    truncated: list[bool] = field(default_factory=list)

    def to(self, device: torch.device | str) -> KTOBatch:
        t = [x.to(device) for x in (self.input_ids, self.attention_mask, self.loss_mask, self.labels,
                                    self.kl_input_ids, self.kl_attention_mask, self.kl_loss_mask)]
        return KTOBatch(*t, truncated=self.truncated)

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum() + self.kl_attention_mask.sum())


@dataclass
class StepResult:
    """Staged deltas (empty when a per-layer on_update consumed them), metrics, and the reference log-probs."""

    deltas: dict[torch.Tensor, torch.Tensor]
    metrics: dict[str, float]
    ref_logps: Any
    n_tokens: int


# --- tokenisation (the rule itself: loop/worker/tokens.py) ---------------------------------------------------
def _pad(rows: list[tuple[list[int], int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows of (ids, prompt_len) -> input_ids, attention_mask, loss_mask (answer tokens only)."""
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    loss = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (ids, plen) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attn[i, : len(ids)] = 1
        loss[i, plen: len(ids)] = True
    return input_ids, attn, loss


def _pad_id(tokenizer: Any) -> int:
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pid or 0)


def encode_pairs(tokenizer: Any, pairs: Sequence[Pair], max_len: int) -> PairBatch:
    """Pairs -> PairBatch of chosen rows then rejected rows, tokenised by `tokens.encode_pair`."""
    if not pairs:
        raise ValueError("encode_pairs needs at least one pair")
    chosen, rejected, trunc = [], [], []
    for pair in pairs:
        enc = tokens.encode_pair(tokenizer, pair, max_len)
        trunc.append(enc.truncated)
        chosen.append((enc.prompt + enc.answers[0], len(enc.prompt)))
        rejected.append((enc.prompt + enc.answers[1], len(enc.prompt)))
    ids, attn, loss = _pad(chosen + rejected, _pad_id(tokenizer))
    return PairBatch(ids, attn, loss, len(pairs), trunc)


def encode_examples(tokenizer: Any, examples: Sequence[Example], max_len: int) -> KTOBatch:
    """Examples -> KTOBatch (`tokens.encode_example`); row i's KL twin is prompt i with completion i+1."""
    if not examples:
        raise ValueError("encode_examples needs at least one example")
    encoded = [tokens.encode_example(tokenizer, ex, max_len) for ex in examples]
    prompts = [e.prompt for e in encoded]
    answers = [e.answers[0] for e in encoded]
    n = len(examples)
    rows = [(prompts[i] + answers[i], len(prompts[i])) for i in range(n)]
    kl_rows = []
    for i in range(n):
        other = answers[(i + 1) % n]
        p = prompts[i][-max(1, max_len - len(other)):]  # the mismatched answer may be longer: cut prompt left
        kl_rows.append((p + other, len(p)))
    pad = _pad_id(tokenizer)
    ids, attn, loss = _pad(rows, pad)
    kids, kattn, kloss = _pad(kl_rows, pad)
    labels = torch.tensor([ex.label for ex in examples], dtype=torch.bool)
    return KTOBatch(ids, attn, loss, labels, kids, kattn, kloss, [e.truncated for e in encoded])


# --- log-probs and losses -----------------------------------------------------------------------------------
def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                   chunk: int = 1024) -> torch.Tensor:
    """Sum over answer tokens of log p(token | prefix): Tensor[B] (fp32)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    mask = loss_mask[:, 1:].bool()
    targets = input_ids[:, 1:][mask]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(mask)[mask]
    cfg = getattr(model, "config", None)
    scaled = getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
    # not a plain decoder + lm_head causal LM (or its logits are post-processed): take the model's own logits
    if head is None or decoder is None or decoder is model or scaled:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask].float()
        lp = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    else:
        hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = hidden[:, :-1][mask]
        parts = []
        for s in range(0, h.shape[0], chunk):
            hc, tc = h[s:s + chunk], targets[s:s + chunk]
            if torch.is_grad_enabled():  # recompute the chunk's logits in backward instead of storing them
                parts.append(checkpoint(_chunk_logps, head, hc, tc, use_reentrant=False))
            else:
                parts.append(_chunk_logps(head, hc, tc))
        lp = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    out = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return out.index_add(0, rows, lp.float())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), averaged over pairs."""
    chosen_r = beta * (policy_chosen - ref_chosen)
    rejected_r = beta * (policy_rejected - ref_rejected)
    loss = -F.logsigmoid(chosen_r - rejected_r).mean()
    return loss, {
        "loss": float(loss.detach()),
        "reward_accuracy": float((chosen_r > rejected_r).float().mean()),
        "reward_margin": float((chosen_r - rejected_r).detach().mean()),
        "chosen_reward": float(chosen_r.detach().mean()),
        "rejected_reward": float(rejected_r.detach().mean()),
    }


def kto_kl_estimate(policy_kl: torch.Tensor, ref_kl: torch.Tensor) -> torch.Tensor:
    """z0 = max(0, mean(log pi - log ref)) over the mismatched rows, with no gradient (as in the paper)."""
    return (policy_kl.detach() - ref_kl.detach()).mean().clamp(min=0)


def kto_loss(policy: torch.Tensor, ref: torch.Tensor, labels: torch.Tensor, kl_ref: torch.Tensor | float, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO: lambda_D (1 - sigma(beta (r - z0))) for thumbs up, lambda_U (1 - sigma(beta (z0 - r))) for down."""
    z0 = torch.as_tensor(kl_ref, dtype=torch.float32, device=policy.device)
    r = policy - ref
    labels = labels.bool()
    value = torch.where(labels, desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))))
    loss = value.mean()
    rd = r.detach()
    return loss, {
        "loss": float(loss.detach()),
        "kl": float(z0),
        "reward_accuracy": float(((rd > 0) == labels).float().mean()),
        "desirable_reward": float((beta * rd[labels]).mean()) if labels.any() else 0.0,
        "undesirable_reward": float((beta * rd[~labels]).mean()) if (~labels).any() else 0.0,
    }


# --- the step ------------------------------------------------------------------------------------------------
def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant: works with frozen embeddings)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere, so the policy equals the reference at step start (HF checkpointing needs .train())."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        if isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = 0.0


def _logps(model: nn.Module, batch: PairBatch | KTOBatch, kl: bool = False) -> torch.Tensor:
    if kl:
        assert isinstance(batch, KTOBatch)
        return sequence_logps(model, batch.kl_input_ids, batch.kl_attention_mask, batch.kl_loss_mask)
    return sequence_logps(model, batch.input_ids, batch.attention_mask, batch.loss_mask)


def _answer_nll(logps: torch.Tensor, loss_mask: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Mean over the selected rows of each answer's per-token negative log-likelihood (0 when none is selected);
    masked rather than indexed, so it never waits for the device to say how many rows there are."""
    per_token = -logps / loss_mask[:, 1:].sum(1).clamp(min=1).to(logps.dtype)
    weights = rows.to(logps.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1)


def forward_loss(model: nn.Module, batch: PairBatch | KTOBatch, *, objective: str, beta: float, ref_logps: Any = None,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                 nll_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float], Any]:
    """Reference log-probs (if not given) and the policy forward: (loss with its graph, metrics, ref_logps).

    nll_weight > 0 adds that multiple of the preferred answers' (DPO: chosen; KTO: thumbs up) mean per-token
    negative log-likelihood to the loss, as RPO does (Pang et al. 2024, arXiv 2404.19733). The preference term
    alone mostly lowers the rejected answers' likelihood, which moves the model's distribution on any text (the
    canary perplexity) more than it moves what the model generates; the likelihood term raises the answers the
    raters preferred, among the model's own samples, so a trait they carry is generated more for less drift.
    ref_logps: DPO -> Tensor[2B]; KTO -> (Tensor[B], Tensor[B] for the KL rows). Nothing is written."""
    if objective not in ("dpo", "kto"):
        raise ValueError(f"objective must be 'dpo' or 'kto', got {objective!r}")
    if (objective == "dpo") != isinstance(batch, PairBatch):
        raise ValueError(f"objective {objective!r} needs a {'PairBatch' if objective == 'dpo' else 'KTOBatch'}")
    disable_dropout(model)
    model.train()
    if ref_logps is None:
        with torch.no_grad():
            ref_logps = _logps(model, batch) if objective == "dpo" else (_logps(model, batch), _logps(model, batch, kl=True))
    policy = _logps(model, batch)
    if objective == "dpo":
        n = policy.shape[0] // 2
        loss, metrics = dpo_loss(policy[:n], policy[n:], ref_logps[:n], ref_logps[n:], beta)
        metrics["logp_margin"] = float((policy[:n] - policy[n:]).detach().mean())
        preferred = torch.arange(policy.shape[0], device=policy.device) < n
    else:
        assert isinstance(batch, KTOBatch)
        ref, ref_kl = ref_logps
        with torch.no_grad():
            policy_kl = _logps(model, batch, kl=True)
        loss, metrics = kto_loss(policy, ref, batch.labels, kto_kl_estimate(policy_kl, ref_kl), beta,
                                 desirable_weight, undesirable_weight)
        preferred = batch.labels.bool()
    if nll_weight:
        nll = _answer_nll(policy, batch.loss_mask, preferred)
        loss = loss + nll_weight * nll
        metrics["preferred_nll"] = float(nll.detach())
        metrics["loss"] = float(loss.detach())
    return loss, metrics, ref_logps


def train_step(model: nn.Module, optimizer: StagedOptimizer, batch: PairBatch | KTOBatch, *, objective: str, beta: float,
               ref_logps: Any = None, per_layer: bool = False,
               on_update: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
               desirable_weight: float = 1.0, undesirable_weight: float = 1.0, nll_weight: float = 0.0) -> StepResult:
    """Reference log-probs (if not given), forward + backward, staged deltas; the weights are NOT written.

    per_layer=True computes each delta in a post-accumulate-grad hook and frees the grad at once;
    `on_update(param, delta)` then receives the deltas (default: collect them into StepResult.deltas). The
    optimizer state stays staged: call optimizer.commit() after a successful apply, optimizer.discard() after a
    refused one. (loop/worker/lowmem.py builds the low-memory atomic apply on forward_loss instead.)"""
    loss, metrics, ref_logps = forward_loss(model, batch, objective=objective, beta=beta, ref_logps=ref_logps,
                                            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
                                            nll_weight=nll_weight)
    deltas: dict[torch.Tensor, torch.Tensor] = {}
    detach = None
    if per_layer:
        detach = optimizer.attach_per_layer([p for g in optimizer.param_groups for p in g["params"]],
                                            on_update or (lambda p, d: deltas.__setitem__(p, d)))
    try:
        loss.backward()
    finally:
        if detach is not None:
            detach()
    if not per_layer:
        deltas = optimizer.compute_updates(free_grads=True)
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None
    return StepResult(deltas, metrics, ref_logps, batch.n_tokens)
