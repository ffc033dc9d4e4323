"""The low-memory atomic apply (loop/worker/lowmem.py) on vLLM-style fused views.

The model is built on tensors laid out as vLLM keeps them (fused qkv / gate_up, padded vocab, tied head), so q, k
and v are views of one base: the in-place writes during the second backward must not trip autograd's version
check. The staged path (train_step + compute_updates + add) is the reference: same deltas, same optimizer state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loop.worker.apollo import make_optimizer, trainable_parameters
from loop.worker.lowmem import PausedBackward
from loop.worker.objectives import (
    KTOBatch,
    PairBatch,
    enable_gradient_checkpointing,
    train_step,
)
from loop.worker.update import weights_checksum
from loop.worker.views import build_model
from tests.unit.worker.test_views import CONFIGS
from tests.vllm_like import vllm_layout


def _fused(name: str, tmp_path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    config = CONFIGS[name]()
    ref = AutoModelForCausalLM.from_config(config).to(dtype)
    config.save_pretrained(tmp_path)
    return vllm_layout(ref)[0]


def _model(tmp_path: Path, fused: dict[str, torch.Tensor]) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    # the layout depends on the config only: derived again from a model of the same config
    layout = vllm_layout(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tmp_path)))[1]
    model = build_model(str(tmp_path), fused, layout=layout)
    return model, [p for _, p in trainable_parameters(model)]


def _pairs(n: int = 2, t: int = 12, answer: int = 5, vocab: int = 100, seed: int = 1) -> PairBatch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2 * n, t), generator=g)
    ids[n:, : t - answer] = ids[:n, : t - answer]  # same prompt, different answers
    loss = torch.zeros(2 * n, t, dtype=torch.long)
    loss[:, t - answer :] = 1
    return PairBatch(ids, torch.ones_like(ids), loss, n)


def _clone(fused: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, torch.Tensor] = {}
    for k, v in fused.items():  # keep the tied head one tensor
        out[k] = seen.setdefault(id(v), v.clone())
    return out


@pytest.mark.parametrize("family", ["llama-tied", "qwen2-bias"])
def test_same_update_and_state_as_the_staged_path(tmp_path: Path, family: str) -> None:
    fused = _fused(family, tmp_path)
    fused_ref = _clone(fused)
    model, params = _model(tmp_path, fused)
    ref, ref_params = _model(tmp_path, fused_ref)
    opt = make_optimizer("apollo-mini", params, lr=1e-3)
    ref_opt = make_optimizer("apollo-mini", ref_params, lr=1e-3)
    batch = _pairs()
    for step in range(2):  # the second step sees the first one's committed state (moments, limiter)
        pb = PausedBackward(model, opt, max_update_ratio=1.0, stochastic_rounding=False)
        prep = pb.prepare(batch, objective="dpo", beta=0.1)
        assert prep.check.ok and prep.update_norm > 0
        before = weights_checksum(model.named_parameters())
        assert weights_checksum(model.named_parameters()) == before  # prepare writes nothing
        pb.apply()
        assert not pb.pending
        r = train_step(ref, ref_opt, batch, objective="dpo", beta=0.1)
        with torch.no_grad():
            for p, d in r.deltas.items():
                p.add_(d)
        ref_opt.commit()
        for (name, a), b in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"step {step}: {name}")
    for a, b in zip(params, ref_params):
        for key in ref_opt.state[b]:
            torch.testing.assert_close(opt.state[a][key], ref_opt.state[b][key])
    assert not any(p.grad is not None for p in params)


def test_bf16_views_with_stochastic_rounding_and_gradient_checkpointing(tmp_path: Path) -> None:
    fused = _fused("qwen3-qknorm", tmp_path, torch.bfloat16)
    model, params = _model(tmp_path, fused)
    enable_gradient_checkpointing(model)
    qkv = fused["model.layers.0.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    pb = PausedBackward(model, make_optimizer("apollo-mini", params, lr=1e-3), max_update_ratio=10.0)
    assert pb.prepare(_pairs(t=16), objective="dpo", beta=0.1).check.ok
    assert torch.equal(qkv, before)
    ms = pb.apply()
    assert ms > 0 and not torch.equal(qkv, before) and torch.isfinite(qkv.float()).all()


def test_non_finite_update_refused_with_weights_and_state_untouched(tmp_path: Path) -> None:
    fused = _fused("llama-tied", tmp_path)
    model, params = _model(tmp_path, fused)
    opt = make_optimizer("apollo-mini", params, lr=1e-3)
    pb = PausedBackward(model, opt, max_update_ratio=1.0, names={p: n for n, p in model.named_parameters()})
    before = weights_checksum(model.named_parameters())
    prep = pb.prepare(_pairs(), objective="dpo", beta=0.1, inject_nan=True)
    assert not prep.check.ok and "non-finite" in prep.check.reason and "nothing was written" in prep.check.reason
    with pytest.raises(RuntimeError, match="refused"):
        pb.apply()
    pb.drop()
    assert not pb.pending and weights_checksum(model.named_parameters()) == before
    assert opt.state == {} or all(not s for s in opt.state.values())


def test_over_the_cap_refused_and_drop_forgets(tmp_path: Path) -> None:
    fused = _fused("mistral", tmp_path)
    model, params = _model(tmp_path, fused)
    opt = make_optimizer("sgd", params, lr=10.0)
    pb = PausedBackward(model, opt, max_update_ratio=1e-6, names={p: n for n, p in model.named_parameters()})
    before = weights_checksum(model.named_parameters())
    prep = pb.prepare(_pairs(), objective="dpo", beta=0.1)
    assert not prep.check.ok and "exceeds the cap" in prep.check.reason and prep.check.max_tensor_ratio > 1e-6
    pb.drop()
    with pytest.raises(RuntimeError, match="nothing prepared"):
        pb.apply()
    assert weights_checksum(model.named_parameters()) == before


def test_kto_examples(tmp_path: Path) -> None:
    fused = _fused("llama-tied", tmp_path)
    model, params = _model(tmp_path, fused)
    pb = PausedBackward(model, make_optimizer("apollo-mini", params, lr=1e-3), max_update_ratio=1.0)
    p = _pairs()
    batch = KTOBatch(p.input_ids, p.attention_mask, p.loss_mask, torch.tensor([True, False, True, False]),
                     p.input_ids.roll(1, 0), p.attention_mask, p.loss_mask)
    before = weights_checksum(model.named_parameters())
    assert pb.prepare(batch, objective="kto", beta=0.1).check.ok
    pb.apply()
    assert weights_checksum(model.named_parameters()) != before
