"""A mixture of experts' fused 3-D expert weights under APOLLO (loop/worker/apollo.py Apollo._update_stacked).

Why: a (E x m x n) expert stack is not a matrix; treated as "anything else" it got plain AdamW, two fp32 copies of
every expert staged during the backward, so a per-layer step on a mixture grew by several expert tensors per layer
and ran out of memory beside vLLM. Specified here: each expert gets the update a lone matrix would get, an expert
with no routed token is left alone, the state is low-rank, and the live bytes of a whole lowmem / staged step
grow with the number of layers by far less than one expert tensor per layer.

Run: .venv/bin/python -m pytest -q -p no:cacheprovider tests/unit/worker/test_moe_memory.py
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from loop.worker.apollo import Apollo, trainable_parameters
from loop.worker.lowmem import PausedBackward
from loop.worker.objectives import enable_gradient_checkpointing, train_step

E, M, N = 4, 6, 10  # experts, rows, columns


def _opt(p: torch.Tensor, mini: bool, **kw: Any) -> Apollo:
    return Apollo.mini([p], lr=1e-2, **kw) if mini else Apollo([p], lr=1e-2, rank=2, proj_gap=2, **kw)


class _LoneMatrix(Apollo):
    """The 2-D maths, fed the projection the stacked optimizer draws (the stack shares one per interval)."""

    def __init__(self, p: torch.Tensor, stacked: Apollo, stack: torch.Tensor, **kw: Any) -> None:
        self.stacked, self.stack = stacked, stack
        super().__init__([p], **kw)

    def _projection(self, p, group, step, r, size):  # type: ignore[no-untyped-def]
        return self.stacked._projection(self.stack, self.stacked.param_groups[0], step, r, size)


@pytest.mark.parametrize("mini", [True, False], ids=["apollo-mini", "apollo"])
@pytest.mark.parametrize("shape", [(E, M, N), (E, N, M)], ids=["wide", "tall"])
def test_each_expert_gets_the_update_of_a_lone_matrix(mini: bool, shape: tuple[int, int, int]) -> None:
    g = torch.Generator().manual_seed(0)
    stack = torch.nn.Parameter(torch.randn(*shape, generator=g))
    opt = _opt(stack, mini, norm_growth_limit=1.01)
    hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
    lone = [torch.nn.Parameter(stack.detach()[e].clone()) for e in range(E)]
    lone_opts = [_LoneMatrix(w, opt, stack, **hyper) for w in lone]
    for step in range(3):  # the third step's growth limiter compares with the second's norm
        grads = torch.randn(*shape, generator=g) * (1 + step)
        stack.grad = grads.clone()
        deltas = opt.compute_updates(free_grads=True)
        opt.commit()
        for e, (w, o) in enumerate(zip(lone, lone_opts)):
            w.grad = grads[e].clone()
            want = o.compute_updates(free_grads=True)[w]
            o.commit()
            torch.testing.assert_close(deltas[stack][e], want, rtol=1e-4, atol=1e-7)  # reduction order
    assert opt.state[stack]["exp_avg"].shape[0] == E


def test_an_expert_without_routed_tokens_is_left_as_it_was() -> None:
    g = torch.Generator().manual_seed(1)
    stack = torch.nn.Parameter(torch.randn(E, M, N, generator=g))
    opt = _opt(stack, mini=True, weight_decay=0.1)
    for _ in range(2):
        stack.grad = torch.randn(E, M, N, generator=g)
        opt.compute_updates(free_grads=True)
        opt.commit()
    before = {k: v.clone() for k, v in opt.state[stack].items()}
    grad = torch.randn(E, M, N, generator=g)
    grad[1] = 0  # no token went to expert 1: its decayed moments over a zero gradient must not make inf / NaN
    stack.grad = grad
    delta = opt.compute_updates(free_grads=True)[stack]
    opt.commit()
    after = opt.state[stack]
    assert torch.isfinite(delta).all()
    assert torch.equal(delta[1], torch.zeros_like(delta[1]))  # not even weight decay: as a Linear with no grad
    assert all((delta[e] != 0).any() for e in (0, 2, 3))
    for k in ("exp_avg", "exp_avg_sq", "prev_norm"):
        assert torch.equal(after[k][1], before[k][1]) and not torch.equal(after[k][0], before[k][0]), k
    assert after["hits"].tolist() == [3, 2, 3, 3]
    stack.grad = torch.randn(E, M, N, generator=g)  # routed again: the limiter compares with its own last norm
    delta = opt.compute_updates(free_grads=True)[stack]
    assert torch.isfinite(delta).all() and (delta[1] != 0).any()


def test_stacked_state_is_low_rank_and_round_trips(tmp_path: Path) -> None:
    stack = torch.nn.Parameter(torch.randn(E, 32, 48, dtype=torch.bfloat16))
    opt = _opt(stack, mini=True)
    stack.grad = torch.randn_like(stack)
    assert opt.compute_updates(free_grads=True)[stack].dtype == torch.bfloat16
    opt.commit()
    assert opt.state[stack]["exp_avg"].shape == (E, 1, 48)
    assert opt.state_bytes() < 2 * E * 48 * 4 + 64 * E  # two rank-1 fp32 moments per expert + counters
    opt.save(tmp_path / "opt.safetensors")
    again = _opt(stack, mini=True)
    again.load(tmp_path / "opt.safetensors")
    assert all(torch.equal(again.state[stack][k], v) for k, v in opt.state[stack].items())
    full = {"step": torch.tensor(1), "exp_avg": torch.zeros(E, 32, 48), "exp_avg_sq": torch.zeros(E, 32, 48)}
    again.state[stack] = full  # full-size moments (AdamW's) are replaced, never broadcast into
    stack.grad = torch.randn_like(stack)
    again.compute_updates(free_grads=True)
    again.commit()
    assert again.state[stack]["exp_avg"].shape == (E, 1, 48)


# --- the whole step on a tiny mixture ---------------------------------------------------------------------------
class _LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensor storages created while active (each counted once, uncounted when freed);
    storages that existed before (the weights) are not counted, so the figure is the step's extra memory."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._known = {t.untyped_storage().data_ptr() for t in existing}
        self._seen: set[int] = set()

    def _free(self, key: int, n: int) -> None:
        self.live -= n
        self._seen.discard(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._seen and key not in self._known:
                    self._seen.add(key)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, key, st.nbytes())
        return out


def _moe(layers: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    torch.manual_seed(0)
    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=64,
                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                            num_experts=16, num_experts_per_tok=4, max_position_embeddings=128)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16)
    enable_gradient_checkpointing(model)  # as the bench and the worker run it
    return model


def _step_peak(mode: str, layers: int) -> tuple[int, int]:
    """(peak extra bytes of the second step, bytes of one layer's gate_up_proj) for loop's two atomic modes."""
    from loop.bench.train import synthetic_pairs

    model = _moe(layers)
    opt = Apollo.mini([p for _, p in trainable_parameters(model)], lr=1e-5)
    batch = synthetic_pairs(256, 1, 48, 24)
    ref: list[Any] = [None]

    def step() -> None:
        if mode == "lowmem":
            pb = PausedBackward(model, opt, max_update_ratio=1.0)
            prep = pb.prepare(batch, objective="dpo", beta=0.1, ref_logps=ref[0])
            assert prep.check.ok, prep.check.reason
            ref[0] = prep.ref_logps
            pb.apply()
        else:  # staged: the deltas are the staged values (1x the weights by design); measured here is the rest
            r = train_step(model, opt, batch, objective="dpo", beta=0.1, ref_logps=ref[0], per_layer=True,
                           on_update=lambda p, d: None)
            ref[0] = r.ref_logps
            opt.commit()

    step()  # the first step creates the committed state; the second one is measured
    gc.collect()
    with _LiveBytes(list(model.parameters()) + list(model.buffers())) as live:
        step()
    expert = model.model.layers[0].mlp.experts.gate_up_proj
    return live.peak, expert.numel() * expert.element_size()


@pytest.mark.parametrize("mode", ["lowmem", "staged"])
def test_moe_step_memory_grows_by_less_than_one_expert_tensor_per_layer(mode: str) -> None:
    (few, expert), (many, _) = _step_peak(mode, 2), _step_peak(mode, 4)
    per_layer = (many - few) / 2
    assert few > 0  # the meter sees the step's activations and gradients
    assert per_layer < 0.25 * expert, f"{per_layer / expert:.2f} gate_up_proj tensors per layer"
