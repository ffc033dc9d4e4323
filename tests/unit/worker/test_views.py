"""build_model on vLLM-style fused/padded tensors: same logits as the HF model, every parameter a view.

A small helper fuses an HF state dict the way vLLM lays out its weights (qkv_proj, gate_up_proj, vocab rows padded
to a multiple of 64, tied lm_head sharing embed_tokens' tensor) for tiny random configs of each supported family.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from loop.worker.views import PACKED_MODULES, build_model, views_alias, vllm_shard_for

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


def fuse_like_vllm(model: torch.nn.Module, mapping: dict[str, list[str]], pad_to: int = 64) -> dict[str, torch.Tensor]:
    """vLLM's layout of `model`'s weights: fused projections, padded vocab, tied lm_head = embed_tokens tensor."""
    sd = dict(model.named_parameters(remove_duplicate=False))
    out: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name in sd:
        if name in done:
            continue
        parts = name.split(".")
        hit = next(((i, fused) for i, p in enumerate(parts) for fused, subs in mapping.items() if p == subs[0]), None)
        if hit is not None:
            i, fused = hit
            names = [".".join(parts[:i] + [s] + parts[i + 1 :]) for s in mapping[fused]]
            out[".".join(parts[:i] + [fused] + parts[i + 1 :])] = torch.cat([sd[n].detach() for n in names]).clone()
            done.update(names)
        elif parts[-2] in ("embed_tokens", "lm_head"):
            w = sd[name].detach()
            rows = -(-w.shape[0] // pad_to) * pad_to
            padded = torch.randn(rows, w.shape[1], dtype=w.dtype)  # garbage rows: must never be used
            padded[: w.shape[0]] = w
            out[name] = padded
            done.add(name)
        else:
            out[name] = sd[name].detach().clone()
            done.add(name)
    if model.config.tie_word_embeddings:
        out["lm_head.weight"] = out["model.embed_tokens.weight"]  # vLLM lists both, one storage
    return out


@pytest.fixture(params=sorted(CONFIGS))
def family(request: pytest.FixtureRequest, tmp_path: Path):
    torch.manual_seed(0)
    config = CONFIGS[request.param]()
    ref = AutoModelForCausalLM.from_config(config).eval()
    config.save_pretrained(tmp_path)
    fused = fuse_like_vllm(ref, PACKED_MODULES[config.architectures[0]])
    return ref, fused, tmp_path


def test_logits_match_and_every_param_is_a_view(family) -> None:
    ref, fused, path = family
    model = build_model(str(path), fused)
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=1e-6)
    assert views_alias(model, fused)
    assert not any(p.is_meta for p in model.parameters())
    assert all(b.device.type == "cpu" for b in model.buffers())


def test_in_place_write_through_a_view_changes_the_fused_tensor(family) -> None:
    ref, fused, path = family
    model = build_model(str(path), fused)
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
    ref, fused, path = family
    model = build_model(str(path), fused)
    emb = model.get_input_embeddings().weight
    assert emb.shape[0] == ref.config.vocab_size and fused["model.embed_tokens.weight"].shape[0] == 128
    head = model.get_output_embeddings().weight
    if ref.config.tie_word_embeddings:
        assert head is emb
        assert len(list(model.parameters())) == len(dict(model.named_parameters()))
    else:
        assert head is not emb and head.data_ptr() == fused["lm_head.weight"].data_ptr()


def test_gradients_flow_into_views(family) -> None:
    ref, fused, path = family
    model = build_model(str(path), fused)
    ids = torch.randint(0, ref.config.vocab_size, (1, 6))
    model(ids, labels=ids).loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    before = fused["model.layers.0.self_attn.o_proj.weight"].clone()
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1 * p.grad)
    assert not torch.equal(before, fused["model.layers.0.self_attn.o_proj.weight"])


def test_views_alias_names_a_copied_parameter(family) -> None:
    ref, fused, path = family
    model = build_model(str(path), fused)
    model.model.norm.weight = torch.nn.Parameter(model.model.norm.weight.detach().clone())
    with pytest.raises(ValueError, match="model.norm.weight"):
        views_alias(model, fused)


def test_shape_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    config = CONFIGS["llama-tied"]()
    config.save_pretrained(tmp_path)
    ref = AutoModelForCausalLM.from_config(config)
    fused = fuse_like_vllm(ref, PACKED_MODULES["LlamaForCausalLM"])
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    fused[qkv] = fused[qkv][: fused[qkv].shape[0] // 2]  # what one tensor-parallel rank holds
    with pytest.raises(ValueError, match="tensor parallel"):
        build_model(str(tmp_path), fused)
    with pytest.raises(ValueError, match="cannot change dtype"):
        build_model(str(tmp_path), fuse_like_vllm(ref, PACKED_MODULES["LlamaForCausalLM"]), dtype=torch.bfloat16)


def test_vllm_shard_for() -> None:
    m = PACKED_MODULES["Qwen2ForCausalLM"]
    assert vllm_shard_for("model.layers.3.self_attn.v_proj.bias", m) == ("model.layers.3.self_attn.qkv_proj.bias", 2)
    assert vllm_shard_for("model.layers.0.mlp.up_proj.weight", m) == ("model.layers.0.mlp.gate_up_proj.weight", 1)
    assert vllm_shard_for("model.norm.weight", m) == ("model.norm.weight", 0)
