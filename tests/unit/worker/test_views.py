"""build_model on vLLM-style fused/padded tensors: same logits as the HF model, every parameter a view.

The tensors are laid out as vLLM keeps them (tests/vllm_like.py: qkv_proj, gate_up_proj, vocab rows padded to a
multiple of 64, tied lm_head sharing embed_tokens' tensor) for tiny random configs of each dense family, and the
views come from the layout loop/layout.py derives by probing that stand-in's load_weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from loop.layout import Placement
from loop.worker.views import build_model, layout_of, views_alias
from tests.vllm_like import vllm_layout

COMMON = dict(
    vocab_size=100,  # vLLM would pad it to 128
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

CONFIGS = {
    "llama-tied": lambda: LlamaConfig(**COMMON, tie_word_embeddings=True, architectures=["LlamaForCausalLM"]),
    "qwen2-bias": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"]),
    "qwen3-qknorm": lambda: Qwen3Config(**COMMON, head_dim=16, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]),
    "mistral": lambda: MistralConfig(**COMMON, tie_word_embeddings=False, architectures=["MistralForCausalLM"]),
}


@pytest.fixture(params=sorted(CONFIGS))
def family(request: pytest.FixtureRequest, tmp_path: Path):
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    ref = AutoModelForCausalLM.from_config(config).eval()
    config.save_pretrained(tmp_path)
    fused, layout = vllm_layout(ref)
    return ref, fused, tmp_path, layout


def test_logits_match_and_every_param_is_a_view(family) -> None:
    ref, fused, path, layout = family
    model = build_model(str(path), fused, layout=layout)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    assert views_alias(model, fused)
    assert not any(p.is_meta for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_in_place_write_through_a_view_changes_the_fused_tensor(family) -> None:
    ref, fused, path, layout = family
    model = build_model(str(path), fused, layout=layout)
    attn = model.model.layers[1].self_attn
    q_rows, k_rows = attn.q_proj.weight.shape[0], attn.k_proj.weight.shape[0]
    qkv = fused["model.layers.1.self_attn.qkv_proj.weight"]
    before = qkv.clone()
    with torch.no_grad():
        attn.k_proj.weight.add_(1.0)
    assert torch.equal(qkv[q_rows : q_rows + k_rows], before[q_rows : q_rows + k_rows] + 1.0)
    assert torch.equal(qkv[:q_rows], before[:q_rows]) and torch.equal(qkv[q_rows + k_rows :], before[q_rows + k_rows :])
    up = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        up.zero_()
    gate_up = fused["model.layers.0.mlp.gate_up_proj.weight"]
    assert gate_up[up.shape[0] :].abs().sum() == 0 and gate_up[: up.shape[0]].abs().sum() > 0


def test_vocab_rows_sliced_and_tied_embeddings_are_one_parameter(family) -> None:
    ref, fused, path, layout = family
    model = build_model(str(path), fused, layout=layout)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == ref.config.vocab_size and fused["model.embed_tokens.weight"].shape[0] == 128
    head = model.get_output_embeddings().weight
    if ref.config.tie_word_embeddings:
        assert head is emb
        assert len(list(model.parameters())) == len(dict(model.named_parameters()))
    else:
        assert head is not emb and head.data_ptr() == fused["lm_head.weight"].data_ptr()


def test_gradients_flow_into_views(family) -> None:
    ref, fused, path, layout = family
    model = build_model(str(path), fused, layout=layout)
    ids = torch.randint(0, ref.config.vocab_size, (1, 6))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = fused["model.layers.0.self_attn.o_proj.weight"].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    assert not torch.equal(before, fused["model.layers.0.self_attn.o_proj.weight"])


def test_views_alias_names_a_copied_parameter(family) -> None:
    ref, fused, path, layout = family
    model = build_model(str(path), fused, layout=layout)
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())
    with pytest.raises(ValueError, match="model.norm.weight"):
        views_alias(model, fused)


def test_a_weight_that_is_not_a_view_is_refused_by_name(tmp_path: Path) -> None:
    config = CONFIGS["llama-tied"]()
    config.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_config(config)
    fused, layout = vllm_layout(ref)
    q = "model.layers.0.self_attn.q_proj.weight"
    layout.tensors[q] = Placement("partial", param="model.layers.0.self_attn.qkv_proj.weight", shape=(32, 32),
                                  reason="16 of 1024 elements land nowhere")
    with pytest.raises(ValueError, match=f"{q}: partial \\(16 of 1024 elements land nowhere\\)"):
        build_model(str(tmp_path), fused, layout=layout)
    del layout.tensors[q]
    with pytest.raises(ValueError, match=f"{q}: not in the layout"):
        build_model(str(tmp_path), fused, layout=layout)


def test_a_view_past_the_end_of_its_parameter_or_another_dtype_is_refused(tmp_path: Path) -> None:
    config = CONFIGS["llama-tied"]()
    config.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_config(config)
    fused, layout = vllm_layout(ref)
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    fused[qkv] = fused[qkv][: fused[qkv].shape[0] // 2].clone()  # what one tensor-parallel rank holds
    with pytest.raises(ValueError, match="cannot hold the layout's view"):
        build_model(str(tmp_path), fused, layout=layout)
    fused, layout = vllm_layout(ref)
    with pytest.raises(ValueError, match="cannot change dtype"):
        build_model(str(tmp_path), fused, layout=layout, dtype=torch.bfloat16)


def test_a_handle_file_without_a_layout_says_why() -> None:
    with pytest.raises(ValueError, match="KeyError: boom"):
        layout_of({"layout": None, "layout_error": "KeyError: boom"})
    with pytest.raises(ValueError, match="carries no layout"):
        layout_of({})


def test_rows_vllm_keeps_in_another_order_train_as_a_copy_written_back(tmp_path: Path) -> None:
    """Llama 4's case (vLLM regroups q/k rows for its rotary layout): the HF weight is gathered from vLLM's rows, the
    forward matches, and `write_back` puts every row of a changed copy where vLLM reads it, touching nothing else."""
    from loop.worker.views import write_back

    config = CONFIGS["llama-tied"]()
    config.save_pretrained(tmp_path)
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(config).eval()
    fused, layout = vllm_layout(ref)
    q, qkv = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.qkv_proj.weight"
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        fused[qkv][:32] = ref.get_parameter(q)[perm]  # vLLM's row j holds HF row perm[j]
    layout.tensors[q] = Placement("rows", param=qkv, offset=0, shape=(32, 32), rows=tuple(torch.argsort(perm).tolist()),
                                  reason="its rows land whole but in another order")
    model = build_model(str(tmp_path), fused, layout=layout)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    assert views_alias(model, fused) and set(model.loop_rows) == {q}
    copy = model.get_parameter(q)
    assert copy.data_ptr() != fused[qkv].data_ptr() and torch.equal(copy.detach(), ref.get_parameter(q).detach())
    rest = fused[qkv][32:].clone()
    with torch.no_grad():
        copy.add_(1.0)  # what an apply does to the copy
    assert not torch.equal(fused[qkv][:32], copy.detach()[perm])  # not seen by vLLM until written back
    assert write_back(model) == 1
    assert torch.equal(fused[qkv][:32], copy.detach()[perm]) and torch.equal(fused[qkv][32:], rest)
