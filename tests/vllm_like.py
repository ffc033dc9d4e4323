"""A stand-in for vLLM's model classes of the dense families, for unit tests that must not start vLLM.

`VllmLike(hf_model)` holds the weights the way vLLM 0.32's Llama/Qwen2/Qwen3/Mistral classes do: q/k/v stacked in
`qkv_proj` and gate/up in `gate_up_proj` (biases too), the vocabulary rows of `embed_tokens` / `lm_head` padded to a
multiple of 64 (the padding holds garbage that must never be read), and a tied `lm_head` that is the embedding's own
Parameter. Its `load_weights` stacks like vLLM's `stacked_params_mapping`, so loop/layout.py learns the layout from
it as it does from vLLM. The real classes are exercised by tests/e2e/test_zero_copy.py and tests/e2e/test_families.py.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from loop.layout import Layout, derive

STACKED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
VOCAB = ("embed_tokens", "lm_head")


class VllmLike(nn.Module):
    def __init__(self, hf_model: nn.Module, pad_to: int = 64, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.tied = bool(getattr(hf_model.config, "tie_word_embeddings", False))
        shapes = {n: tuple(p.shape) for n, p in hf_model.named_parameters()}
        dtype = dtype or next(hf_model.parameters()).dtype
        self.rows: dict[str, list[int]] = {}  # fused name -> rows of each stacked part, in order
        fused: dict[str, dict[int, tuple[int, ...]]] = {}
        for name, shape in shapes.items():
            target, part = self.vllm_name(name)
            if part is None:
                if name.split(".")[-2] in VOCAB:
                    shape = (-(-shape[0] // pad_to) * pad_to, *shape[1:])
                self._add(target, torch.randn(shape).to(dtype))
            else:
                fused.setdefault(target, {})[part] = shape
        for target, parts in fused.items():
            shapes_in_order = [parts[i] for i in sorted(parts)]
            self.rows[target] = [s[0] for s in shapes_in_order]
            self._add(target, torch.randn(sum(self.rows[target]), *shapes_in_order[0][1:]).to(dtype))
        if self.tied:
            self._modules_tree("lm_head.weight").register_parameter("weight", self.param("model.embed_tokens.weight"))

    @staticmethod
    def vllm_name(hf_name: str) -> tuple[str, int | None]:
        parts = hf_name.split(".")
        for i, p in enumerate(parts):
            if p in STACKED:
                fused, index = STACKED[p]
                return ".".join(parts[:i] + [fused] + parts[i + 1:]), index
        return hf_name, None

    def _modules_tree(self, name: str) -> nn.Module:
        mod: nn.Module = self
        for part in name.split(".")[:-1]:
            if part not in mod._modules:
                mod.add_module(part, nn.Module())
            mod = mod._modules[part]  # type: ignore[assignment]
        return mod

    def _add(self, name: str, value: torch.Tensor) -> None:
        self._modules_tree(name).register_parameter(name.split(".")[-1], nn.Parameter(value, requires_grad=False))

    def param(self, name: str) -> nn.Parameter:
        return self.get_parameter(name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = set()
        for name, w in weights:
            if self.tied and name == "lm_head.weight":
                continue
            target, part = self.vllm_name(name)
            p = self.param(target)
            if part is not None:
                start = sum(self.rows[target][:part])
                p.data.narrow(0, start, w.shape[0]).copy_(w)
            elif name.split(".")[-2] in VOCAB:
                p.data[: w.shape[0]].copy_(w)
            else:
                p.data.copy_(w)
            loaded.add(target)
        return loaded

    def tensors(self) -> dict[str, torch.Tensor]:
        """vLLM name -> tensor, as the plugin exports them (a tied lm_head listed beside the embedding it shares)."""
        return {n: p.data for n, p in self.named_parameters(remove_duplicate=False)}


def vllm_like(hf_model: nn.Module, pad_to: int = 64) -> VllmLike:
    """A VllmLike holding `hf_model`'s weights, loaded through its own load_weights."""
    out = VllmLike(hf_model, pad_to)
    out.load_weights((n, p.detach()) for n, p in hf_model.named_parameters())
    return out


def vllm_layout(hf_model: nn.Module, pad_to: int = 64) -> tuple[dict[str, torch.Tensor], Layout]:
    """vLLM-like tensors holding `hf_model`'s weights, and the layout loop/layout.py derives from their loader."""
    like = vllm_like(hf_model, pad_to)
    return like.tensors(), derive(like, {n: tuple(p.shape) for n, p in hf_model.named_parameters()})
