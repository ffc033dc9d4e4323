"""APOLLO / APOLLO-Mini and the staged optimizer API (loop/worker/apollo.py)."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from loop.worker.apollo import AdamW, Apollo, make_optimizer, trainable_parameters
from loop.worker.update import weights_checksum


def _regression(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 48, generator=g)
    target = torch.randn(48, 96, generator=g) / 7
    y = torch.tanh(x @ target) + 0.01 * torch.randn(256, 96, generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(48, 128), nn.Tanh(), nn.Linear(128, 96))
    return model, x, y


def _train(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    for _ in range(steps):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


def _grad_once(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    for p in model.parameters():
        p.grad = None
    nn.functional.mse_loss(model(x), y).backward()


def test_apollo_converges_comparably_to_adamw() -> None:
    model, x, y = _regression()
    start = float(nn.functional.mse_loss(model(x), y))
    results = {}
    for name, make in {
        "adamw": lambda ps: torch.optim.AdamW(ps, lr=5e-3),
        "apollo": lambda ps: Apollo(ps, lr=5e-3, rank=8, proj_gap=50),
        "apollo-mini": lambda ps: Apollo.mini(ps, lr=5e-3 / math.sqrt(128) * 4, proj_gap=50),
        "sgd": lambda ps: torch.optim.SGD(ps, lr=5e-3),  # the bar: APOLLO must beat plain SGD by far
    }.items():
        m = copy.deepcopy(model)
        results[name] = _train(m, make(list(m.parameters())), x, y, 120)
    assert results["adamw"] < 0.2 * start and results["sgd"] > 0.5 * start, results
    assert results["apollo"] < 0.2 * start and results["apollo"] < 2.0 * results["adamw"], results
    assert results["apollo-mini"] < 0.3 * start and results["apollo-mini"] < 3.0 * results["adamw"], results


def test_written_out_adamw_matches_torch() -> None:
    model, x, y = _regression()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    _train(a, torch.optim.AdamW(a.parameters(), lr=1e-2, weight_decay=0.1), x, y, 5)
    _train(b, AdamW(b.parameters(), lr=1e-2, weight_decay=0.1), x, y, 5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["apollo", "apollo-mini", "adamw", "sgd"])
def test_compute_updates_leaves_params_and_state_untouched_until_commit(name: str) -> None:
    model, x, y = _regression()
    opt = make_optimizer(name, list(model.parameters()), lr=1e-2, **({"rank": 4} if name == "apollo" else {}))
    _grad_once(model, x, y)
    opt.step()  # some committed state to protect
    before_w = weights_checksum(model.parameters())
    before_state = {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state_dict()["state"].items()}
    _grad_once(model, x, y)
    first = opt.compute_updates()
    assert weights_checksum(model.parameters()) == before_w
    opt.discard()
    after_state = opt.state_dict()["state"]
    assert before_state.keys() == after_state.keys()
    for k in before_state:
        for n in before_state[k]:
            assert torch.equal(before_state[k][n], after_state[k][n]), (k, n)
    again = opt.compute_updates()  # discard really restored it: the same step gives the same deltas
    assert all(torch.equal(first[p], again[p]) for p in first)
    opt.commit()
    assert any(not torch.equal(before_state[k][n], opt.state_dict()["state"][k][n])
               for k in before_state for n in before_state[k]) or name == "sgd"


def test_deltas_are_to_be_added_and_have_param_dtype() -> None:
    lin = nn.Linear(32, 64).to(torch.bfloat16)
    opt = Apollo.mini(list(lin.parameters()), lr=1e-3)
    lin(torch.randn(8, 32, dtype=torch.bfloat16)).float().pow(2).sum().backward()
    deltas = opt.compute_updates()
    assert all(d.dtype == torch.bfloat16 and d.shape == p.shape for p, d in deltas.items())
    # descent direction: <delta, grad> < 0
    assert all(float((d.float() * p.grad.float()).sum()) < 0 for p, d in deltas.items())


def test_state_is_low_rank() -> None:
    m, n = 512, 1024
    w = nn.Parameter(torch.randn(m, n) * 0.02)
    b = nn.Parameter(torch.zeros(m))
    for make, moment_bytes in [
        (lambda ps: Apollo.mini(ps, lr=1e-3), 2 * 1 * n * 4),
        (lambda ps: Apollo(ps, lr=1e-3, rank=16), 2 * 16 * n * 4),
    ]:
        opt = make([w, b])
        w.grad, b.grad = torch.randn(m, n), torch.randn(m)
        opt.step()
        expected = moment_bytes + 4 + 8 + (2 * m * 4 + 8)  # + prev_norm + step; bias: full AdamW
        assert opt.state_bytes() == expected
    adamw = AdamW([w, b], lr=1e-3)
    w.grad, b.grad = torch.randn(m, n), torch.randn(m)
    adamw.step()
    assert adamw.state_bytes() > 100 * Apollo.mini([w], lr=1e-3).state_bytes() + 2 * m * n * 4 - 1


def test_tall_matrices_project_the_other_side() -> None:
    w = nn.Parameter(torch.randn(256, 32) * 0.02)
    opt = Apollo(list([w]), lr=1e-3, rank=4)
    w.grad = torch.randn(256, 32)
    opt.step()
    assert opt.state[w]["exp_avg"].shape == (256, 4)


def test_projection_is_seeded_and_regenerated_every_proj_gap_steps() -> None:
    w = nn.Parameter(torch.randn(16, 64))
    opt = Apollo([w], lr=1e-3, rank=2, proj_gap=3, seed=7)
    group = opt.param_groups[0]
    p1, p3, p4 = (opt._projection(w, group, s, 2, 16) for s in (1, 3, 4))
    assert torch.equal(p1, p3) and not torch.equal(p3, p4)
    other = Apollo([w], lr=1e-3, rank=2, proj_gap=3, seed=8)
    assert not torch.equal(p1, other._projection(w, other.param_groups[0], 1, 2, 16))


def test_norm_growth_limiter_caps_the_update_norm() -> None:
    w = nn.Parameter(torch.randn(32, 64) * 0.02)
    opt = Apollo([w], lr=1.0, rank=4, norm_growth_limit=1.01)
    g = torch.randn(32, 64)
    w.grad = g
    d1 = opt.compute_updates()[w]
    opt.commit()
    w.grad = g * 1000 + torch.randn(32, 64) * 100  # a gradient spike
    d2 = opt.compute_updates()[w]
    assert float(d2.norm()) <= 1.01 * float(d1.norm()) * (1 + 1e-5)
    unlimited = Apollo([w], lr=1.0, rank=4, norm_growth_limit=None)
    assert unlimited.param_groups[0]["norm_growth_limit"] is None


def test_per_layer_mode_gives_the_same_deltas_and_holds_one_grad_at_a_time() -> None:
    model, x, y = _regression()
    full_model, layer_model = copy.deepcopy(model), copy.deepcopy(model)
    full_opt = Apollo(list(full_model.parameters()), lr=1e-2, rank=4, seed=3)
    layer_opt = Apollo(list(layer_model.parameters()), lr=1e-2, rank=4, seed=3)

    def live_grads(m: nn.Module) -> int:
        return sum(p.grad is not None for p in m.parameters())

    seen: dict[str, list[int]] = {"full": [], "layer": []}
    for key, m in (("full", full_model), ("layer", layer_model)):
        for p in m.parameters():  # registered first, so it runs before the optimizer's hook
            p.register_post_accumulate_grad_hook(lambda _p, m=m, key=key: seen[key].append(live_grads(m)))

    nn.functional.mse_loss(full_model(x), y).backward()
    full = full_opt.compute_updates()
    got: dict[torch.Tensor, torch.Tensor] = {}
    detach = layer_opt.attach_per_layer(layer_model, lambda p, d: got.__setitem__(p, d))
    nn.functional.mse_loss(layer_model(x), y).backward()
    detach()

    assert max(seen["layer"]) == 1 and max(seen["full"]) == 4  # the instrument does see accumulation
    assert all(p.grad is None for p in layer_model.parameters())
    for pf, pl in zip(full_model.parameters(), layer_model.parameters()):
        torch.testing.assert_close(full[pf], got[pl], rtol=0, atol=0)
    layer_opt.commit()
    assert len(layer_opt.state) == 4


def test_state_round_trips_through_safetensors_and_weights_only_load(tmp_path: Path) -> None:
    model, x, y = _regression()
    opt = Apollo(list(model.parameters()), lr=1e-2, rank=4, proj_gap=2, seed=5)
    _train(model, opt, x, y, 3)
    opt.save(tmp_path / "optim.safetensors")
    torch.save(opt.state_dict(), tmp_path / "optim.pt")

    for loader in ("safetensors", "torch"):
        twin = Apollo(list(model.parameters()), lr=0.5, rank=4, proj_gap=2, seed=0)  # wrong hparams: overwritten
        if loader == "safetensors":
            twin.load(tmp_path / "optim.safetensors")
        else:
            twin.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
        assert twin.param_groups[0]["lr"] == 1e-2 and twin.param_groups[0]["seed"] == 5
        _grad_once(model, x, y)
        a, b = opt.compute_updates(), twin.compute_updates()
        assert all(torch.equal(a[p], b[p]) for p in a)
        opt.discard()


def test_load_refuses_mismatched_parameters() -> None:
    opt = Apollo([nn.Parameter(torch.randn(4, 8))], lr=1e-3)
    other = Apollo([nn.Parameter(torch.randn(4, 8)), nn.Parameter(torch.randn(4))], lr=1e-3)
    with pytest.raises(ValueError, match="does not match"):
        opt.load_state_dict(other.state_dict())


def test_make_optimizer_names() -> None:
    p = [nn.Parameter(torch.randn(4, 8))]
    mini = make_optimizer("apollo-mini", p, lr=1e-3)
    assert isinstance(mini, Apollo) and mini.param_groups[0]["rank"] == 1
    assert mini.param_groups[0]["scale_type"] == "tensor" and mini.param_groups[0]["scale"] == math.sqrt(128)
    with pytest.raises(ValueError, match="apollo, apollo-mini, adamw, sgd"):
        make_optimizer("lion", p, lr=1e-3)
    with pytest.raises(ValueError, match="scale_type"):
        Apollo(p, scale_type="row")


def test_trainable_parameters_freezes_embeddings_by_default() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    names = [n for n, _ in trainable_parameters(model)]
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert not model.get_input_embeddings().weight.requires_grad
    assert any("q_proj" in n for n in names) and any("norm" in n for n in names)
    with_emb = trainable_parameters(model, train_embeddings=True)
    assert sum(p is model.get_input_embeddings().weight for _, p in with_emb) == 1  # tied: one parameter


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_per_layer_matches_full_and_state_stays_fp32() -> None:
    model, x, y = _regression()
    model = model.cuda().to(torch.bfloat16)
    x, y = x.cuda().bfloat16(), y.cuda().bfloat16()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    opt_a, opt_b = Apollo.mini(list(a.parameters()), lr=1e-3), Apollo.mini(list(b.parameters()), lr=1e-3)
    nn.functional.mse_loss(a(x), y).backward()
    full = opt_a.compute_updates()
    got: dict[torch.Tensor, torch.Tensor] = {}
    detach = opt_b.attach_per_layer(b, lambda p, d: got.__setitem__(p, d))
    nn.functional.mse_loss(b(x), y).backward()
    detach()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert full[pa].dtype == torch.bfloat16 and full[pa].is_cuda
        torch.testing.assert_close(full[pa], got[pb])
    opt_b.commit()
    assert all(st["exp_avg"].dtype == torch.float32 for st in opt_b.state.values())


@pytest.mark.parametrize("make", ["qwen3_moe", "llama4", "llama"])
def test_mixture_of_experts_routers_are_frozen_and_everything_else_trains(make: str) -> None:
    from transformers import AutoModelForCausalLM, Llama4TextConfig, LlamaConfig, Qwen3MoeConfig

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=16)
    config = {"qwen3_moe": lambda: Qwen3MoeConfig(**small, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16),
              "llama4": lambda: Llama4TextConfig(**small, num_local_experts=4, interleave_moe_layer_step=1,
                                                 intermediate_size_mlp=48),
              "llama": lambda: LlamaConfig(**small)}[make]()
    model = AutoModelForCausalLM.from_config(config)
    names = [n for n, _ in trainable_parameters(model)]
    routers = [n for n, p in model.named_parameters() if p.dim() == 2 and p.shape == (4, 32)]
    assert bool(routers) == (make != "llama") and not set(routers) & set(names)
    assert all(not model.get_parameter(n).requires_grad for n in routers)
    embed = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    assert set(names) == {n for n, p in model.named_parameters() if n not in routers and id(p) not in embed}
